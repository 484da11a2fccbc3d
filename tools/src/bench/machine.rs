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
    /// Whether this sqlx sets TCP_NODELAY on its sockets (0.9.0 does not: sqlx PR #4336).
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
        &crate::testkit::workspace_root()
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
    let (postgres_version, postgres_settings) = match PgConnection::connect(admin_url).await {
        Ok(mut c) => {
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
            (v, settings)
        }
        Err(e) => (format!("unreachable ({e})"), Vec::new()),
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
    let sqlx_tcp_nodelay = if sqlx_version == "0.9.0" {
        "no: sqlx 0.9.0 does not set TCP_NODELAY on PostgreSQL sockets (fixed upstream in sqlx \
         PR #4336, not released in 0.9.0); scenario S1u runs the worker over the Unix socket, \
         where Nagle does not apply, to show the difference"
            .into()
    } else {
        format!("sqlx {sqlx_version}: check its release notes for TCP_NODELAY (sqlx PR #4336)")
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
