//! The machine a run happened on: CPUs, memory, kernel, server versions and settings, the sqlx
//! version in use, and the date. Recorded with every result, since a figure without its machine
//! means nothing.

use serde::Serialize;
use sqlx::{Connection, PgConnection, Row};

/// What the run ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub date: String,
    pub hostname: String,
    pub nproc: usize,
    pub memory_mib: u64,
    pub cpu_model: String,
    pub kernel: String,
    pub postgres_version: String,
    /// Settings that decide the cost of a commit.
    pub postgres_settings: Vec<(String, String)>,
    pub rabbitmq_version: String,
    pub sqlx_version: String,
    /// Whether sqlx's PostgreSQL sockets have TCP_NODELAY (released 0.9.0 does not: sqlx PR
    /// #4336; the workspace builds a patched copy), read from this process's own socket.
    pub sqlx_tcp_nodelay: String,
    /// Load average when the run started: other users of this machine show up here.
    pub loadavg_at_start: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!s.is_empty()).then_some(s)
}

/// The version of `package` in the workspace's Cargo.lock.
pub fn locked_version(package: &str) -> Option<String> {
    let lock = read(
        &testkit::workspace_root()
            .join("Cargo.lock")
            .to_string_lossy(),
    );
    let needle = format!("name = \"{package}\"\n");
    let at = lock.find(&needle)? + needle.len();
    let line = lock[at..].lines().next()?;
    Some(
        line.strip_prefix("version = ")?
            .trim_matches('"')
            .to_owned(),
    )
}

/// The TCP port of a `postgres://` URL (5432 when none is given); `None` for a Unix socket.
pub fn pg_port(url: &str) -> Option<u16> {
    let url = url::Url::parse(url).ok()?;
    let host = url.host_str().filter(|h| !h.is_empty())?;
    let unix = url
        .query_pairs()
        .any(|(k, v)| k == "host" && v.starts_with('/'));
    (!unix && !host.starts_with('%')).then(|| url.port().unwrap_or(5432))
}

/// TCP_NODELAY of this process's open TCP sockets to `port`, read back from the kernel: `None`
/// when none is open, `Some(false)` if any of them has Nagle on. The bench's own connections
/// are made by the same sqlx build as the worker's.
pub fn tcp_nodelay_to_port(port: u16) -> Option<bool> {
    use std::os::fd::{BorrowedFd, RawFd};
    let mut all = None;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the borrow only reads socket options and never closes the descriptor; if
        // another task closed and reused it meanwhile, the calls fail or describe the new
        // socket, which the port check filters.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let to_port = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a.port() == port);
        if to_port && let Ok(nodelay) = sock.tcp_nodelay() {
            all = Some(all.unwrap_or(true) && nodelay);
        }
    }
    all
}

/// Collects the description; `admin_url` is asked for the PostgreSQL version and settings.
pub async fn describe(admin_url: &str) -> Machine {
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory_mib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(0);
    let (postgres_version, postgres_settings, measured_nodelay) =
        match PgConnection::connect(admin_url).await {
            Ok(mut c) => {
                let nodelay = pg_port(admin_url).and_then(tcp_nodelay_to_port);
                let v: String = sqlx::query_scalar("SELECT version()")
                    .fetch_one(&mut c)
                    .await
                    .unwrap_or_else(|e| format!("unknown ({e})"));
                let rows = sqlx::query(
                    "SELECT name, current_setting(name) AS value FROM pg_settings
                 WHERE name IN ('synchronous_commit', 'fsync', 'wal_sync_method',
                                'shared_buffers', 'max_connections', 'commit_delay',
                                'full_page_writes', 'wal_level', 'track_wal_io_timing')
                 ORDER BY name",
                )
                .fetch_all(&mut c)
                .await
                .unwrap_or_default();
                let settings = rows
                    .iter()
                    .map(|r| (r.get::<String, _>("name"), r.get::<String, _>("value")))
                    .collect();
                let _ = c.close().await;
                (v, settings, nodelay)
            }
            Err(e) => (format!("unreachable ({e})"), Vec::new(), None),
        };
    let rabbitmq_version = command_line("rabbitmqctl", &["version"])
        .or_else(|| {
            command_line("rabbitmqctl", &["status"]).and_then(|s| {
                s.lines()
                    .find(|l| l.contains("RabbitMQ version"))
                    .map(|l| l.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown (rabbitmqctl not available)".into());
    let sqlx_version = locked_version("sqlx").unwrap_or_else(|| "unknown".into());
    let sqlx_tcp_nodelay = match measured_nodelay {
        Some(true) => "yes, on this process's PostgreSQL socket (sqlx-core 0.9.0 patched with \
                       upstream PR #4336, vendor/sqlx-core); S1u runs the worker over the Unix \
                       socket for comparison"
            .into(),
        Some(false) => format!(
            "no: sqlx {sqlx_version} leaves Nagle on for PostgreSQL sockets (sqlx PR #4336); \
             S1u runs the worker over the Unix socket, where Nagle does not apply"
        ),
        None => "not measured: the admin URL is not a TCP connection".into(),
    };
    Machine {
        date: chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        hostname: read("/proc/sys/kernel/hostname").trim().to_owned(),
        nproc: super::procs::ncpu(),
        memory_mib,
        cpu_model,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        postgres_version,
        postgres_settings,
        rabbitmq_version,
        sqlx_version,
        sqlx_tcp_nodelay,
        loadavg_at_start: read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    }
}
