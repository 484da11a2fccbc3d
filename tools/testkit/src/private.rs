//! Private throwaway PostgreSQL and RabbitMQ servers, for tests that must stop, restart or
//! kill a server. The shared servers (`DATABASE_URL`, `AMQP_URL`) are never touched: other
//! tests run against them at the same moment.
//!
//! What this module owns: one folder per instance under `/tmp/refunds-private/` (data, logs,
//! config, pid files; removed on drop), the server process, which is a child of the test
//! process, and the ports it listens on (127.0.0.1 only). Each instance has its own folder,
//! ports and, for RabbitMQ, Erlang node name, so tests may run several in parallel.
//!
//! * [`PrivatePostgres`] runs `initdb` into a fresh data folder (trust authentication, user
//!   `postgres`) and the `postgres` server from the newest `/usr/lib/postgresql/*/bin/`.
//!   It runs with `fsync = off`: [`PrivatePostgres::kill9`] crashes the *process*, and the
//!   kernel keeps every byte PostgreSQL wrote, so a committed transaction survives a kill
//!   with or without fsync; only a machine crash would tell the difference, and tests do
//!   not simulate those. `synchronous_commit` keeps its default (on).
//! * [`PrivateRabbit`] runs `rabbitmq-server` as its own node `rabbit-test-…@localhost` with
//!   its own config, data (mnesia), log folder, plugin file (no plugins) and AMQP and
//!   distribution ports; the Erlang port mapper (epmd, 4369) is shared, which distinct node
//!   names make harmless. It takes about 5–10 s to start.
//!
//! Both run as their system users (`postgres`, `rabbitmq`) when the tests run as root (the
//! servers refuse root, and RabbitMQ's Erlang cookie is the `rabbitmq` user's), and as the
//! current user otherwise. The server is started directly as a child process rather than
//! daemonised (`pg_ctl start`, `rabbitmq-server -detached`): this machine's PID 1 reaps
//! orphans only lazily (up to ~20 s later), and a daemonised postmaster killed with SIGKILL
//! stays a zombie meanwhile, which PostgreSQL takes for a live postmaster when it starts
//! again ("lock file already exists"). A child is reaped by the test process at once.
//!
//! Errors say what failed: the command line, its exit status or signal, and the last lines of
//! the server's log. A test process that dies without dropping its instances leaves servers
//! running; the next `start` in any process kills those whose owner process is gone and
//! removes their folders.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Gid, Pid, Uid, User, chown, geteuid};

/// Where instances keep their folders.
fn private_root() -> PathBuf {
    PathBuf::from("/tmp/refunds-private")
}

/// How long a server may take to become ready.
const PG_START_TIMEOUT: Duration = Duration::from_secs(60);
const RABBIT_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a graceful stop may take before the server is killed (and the stop is an error).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const LOG_LINES: usize = 30;

// ---------------------------------------------------------------------------------------------
// Shared plumbing.

/// The system user a server runs as (when the tests run as root).
#[derive(Clone, Debug)]
struct RunAs {
    name: String,
    uid: Uid,
    gid: Gid,
    home: PathBuf,
}

fn run_as(name: &str) -> Result<Option<RunAs>> {
    if !geteuid().is_root() {
        return Ok(None);
    }
    let u = User::from_name(name)
        .with_context(|| format!("cannot look up the system user `{name}`"))?
        .ok_or_else(|| {
            anyhow!(
                "the system user `{name}` does not exist: a private server runs as it when \
                 tests run as root (is the server package installed?)"
            )
        })?;
    Ok(Some(RunAs {
        name: name.to_owned(),
        uid: u.uid,
        gid: u.gid,
        home: u.dir,
    }))
}

/// A command with a clean environment, run as `user` if given.
fn command(program: &Path, user: Option<&RunAs>) -> Command {
    let mut c = Command::new(program);
    c.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            }),
        )
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null());
    match user {
        Some(u) => {
            c.uid(u.uid.as_raw())
                .gid(u.gid.as_raw())
                .env("HOME", &u.home)
                .env("USER", &u.name)
                .env("LOGNAME", &u.name);
        }
        None => {
            if let Some(h) = std::env::var_os("HOME") {
                c.env("HOME", h);
            }
        }
    }
    c
}

/// The command line, for error messages.
fn describe(c: &Command, user: Option<&RunAs>) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    if let Some(u) = user {
        s.push_str(&format!(" (as user {})", u.name));
    }
    s
}

/// The last `n` lines of a log file, headed by its path.
fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            let body: Vec<String> = lines[start..]
                .iter()
                .map(|l| {
                    if l.len() > 600 {
                        let mut cut = 600;
                        while !l.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        format!("{}…", &l[..cut])
                    } else {
                        (*l).to_owned()
                    }
                })
                .collect();
            if body.is_empty() {
                format!("{} is empty", path.display())
            } else {
                format!(
                    "last {} lines of {}:\n{}",
                    body.len(),
                    path.display(),
                    body.join("\n")
                )
            }
        }
        Err(e) => format!("(no log: {}: {e})", path.display()),
    }
}

fn tail_text(label: &str, bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return format!("{label}: (empty)");
    }
    let start = lines.len().saturating_sub(n);
    format!("{label}:\n{}", lines[start..].join("\n"))
}

/// Runs a command to completion; an error names the command, its status, its output and the
/// last lines of `logs`.
async fn run(
    mut c: Command,
    what: &str,
    user: Option<&RunAs>,
    timeout: Duration,
    logs: &[&Path],
) -> Result<String> {
    let desc = describe(&c, user);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut tc = tokio::process::Command::from(c);
    tc.kill_on_drop(true);
    let logs_text = || {
        logs.iter()
            .map(|l| tail(l, LOG_LINES))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let out = match tokio::time::timeout(timeout, tc.output()).await {
        Err(_) => bail!(
            "{what}: `{desc}` did not finish within {timeout:?}\n{}",
            logs_text()
        ),
        Ok(Err(e)) => bail!("{what}: cannot run `{desc}`: {e}"),
        Ok(Ok(o)) => o,
    };
    if !out.status.success() {
        bail!(
            "{what}: `{desc}` failed with {}\n{}\n{}\n{}",
            out.status,
            tail_text("stdout", &out.stdout, LOG_LINES),
            tail_text("stderr", &out.stderr, LOG_LINES),
            logs_text()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Ports handed out by this process (a stopped instance keeps its port for `start_again`).
fn taken_ports() -> MutexGuard<'static, BTreeSet<u16>> {
    static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    TAKEN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port that is free now, below the kernel's ephemeral range (20000–24999 by default here)
/// so that no outgoing connection and no port-0 listener (a fault proxy, a simulator) can take
/// it while its server is stopped for a restart.
fn free_port() -> Result<u16> {
    let (lo, hi) = port_range();
    let mut taken = taken_ports();
    for _ in 0..500 {
        let p: u16 = rand::random_range(lo..hi);
        if taken.contains(&p) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            taken.insert(p);
            return Ok(p);
        }
    }
    bail!("found no free port on 127.0.0.1 in {lo}..{hi}")
}

fn port_range() -> (u16, u16) {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low >= 25000 {
        (20000, 25000)
    } else {
        (20000, 60000)
    }
}

/// Creates a fresh folder for one instance, owned by `user`.
fn make_dir(kind: &str, user: Option<&RunAs>) -> Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    let root = private_root();
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    // The server users must be able to reach their folders.
    let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o755));
    for _ in 0..100 {
        let name = format!(
            "{kind}-{}-{}-{:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let dir = root.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("cannot chmod {}", dir.display()))?;
                give(&dir, user)?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(anyhow!("cannot create {}: {e}", dir.display())),
        }
    }
    bail!("cannot find a fresh folder name under {}", root.display())
}

/// Hands a path (recursively) to `user`.
fn give(path: &Path, user: Option<&RunAs>) -> Result<()> {
    let Some(u) = user else { return Ok(()) };
    chown(path, Some(u.uid), Some(u.gid))
        .with_context(|| format!("cannot chown {} to {}", path.display(), u.name))?;
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            give(&entry?.path(), user)?;
        }
    }
    Ok(())
}

fn write_file(path: &Path, text: &str, user: Option<&RunAs>) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    give(path, user)
}

/// The state letter and process group of a process, from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, i32, i32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// Processes of a process group that are still running (zombies do not count: PID 1 reaps
/// orphans late here).
fn live_group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| matches!(proc_stat(pid), Some((st, _, pg)) if pg == pgid && st != 'Z' && st != 'X'))
        .collect()
}

/// Children (by parent pid) that are still running.
fn live_children(ppid: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| matches!(proc_stat(pid), Some((st, pp, _)) if pp == ppid && st != 'Z' && st != 'X'))
        .collect()
}

fn signal(pid: i32, sig: Signal) -> Result<()> {
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(anyhow!("cannot send {sig} to process {pid}: {e}")),
    }
}

fn signal_group(pgid: i32, sig: Signal) {
    let _ = killpg(Pid::from_raw(pgid), sig);
}

/// The first line of a pid file, as a pid.
fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The server child process of an instance.
#[derive(Default)]
struct Server {
    child: Mutex<Option<Child>>,
}

impl Server {
    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, child: Child) {
        *self.lock() = Some(child);
    }

    /// The pid of the running child; reaps it (and answers `None`) if it has exited.
    fn pid(&self) -> Option<i32> {
        let mut g = self.lock();
        let c = g.as_mut()?;
        match c.try_wait() {
            Ok(None) => i32::try_from(c.id()).ok(),
            _ => {
                *g = None;
                None
            }
        }
    }

    /// `Some(status)` once the child has exited (and is reaped).
    fn exited(&self) -> Option<ExitStatus> {
        let mut g = self.lock();
        let c = g.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => {
                *g = None;
                Some(st)
            }
            _ => None,
        }
    }

    /// Waits until the child has exited; false on timeout (the child is left running).
    async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pid().is_none() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the child's process group and reaps the child (blocking; for drop and errors).
    fn kill_now(&self) {
        if let Some(mut c) = self.lock().take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                signal_group(pid, Signal::SIGKILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills servers left behind by test processes that died, and removes their folders.
fn reap_orphans() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = fs::read_dir(private_root()) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(owner) = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            let needle = dir.to_string_lossy().into_owned();
            for pid_file in [dir.join("data/postmaster.pid"), dir.join("rabbit.pid")] {
                let Some(pid) = read_pid(&pid_file) else {
                    continue;
                };
                // Only a process that names this folder, in case the pid was reused.
                let mentions = ["cmdline", "environ"].iter().any(|f| {
                    fs::read(format!("/proc/{pid}/{f}"))
                        .map(|b| String::from_utf8_lossy(&b).contains(&needle))
                        .unwrap_or(false)
                });
                if mentions {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            let _ = fs::remove_dir_all(&dir);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL.

/// A private PostgreSQL server on 127.0.0.1 and a port of its own; user `postgres`, trust
/// authentication. Dropping it shuts the server down (immediate mode) and removes its folder.
///
/// All methods take `&self`, so an `Arc<PrivatePostgres>` can be restarted from a chaos task
/// while the code under test uses [`PrivatePostgres::url`]; operations on one instance are
/// serialised.
pub struct PrivatePostgres {
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    port: u16,
    user: Option<RunAs>,
    server: Server,
    op: tokio::sync::Mutex<()>,
}

/// The newest `/usr/lib/postgresql/VERSION/bin` with `initdb` and `postgres`.
fn postgres_bin_dir() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            let Ok(v) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let bin = e.path().join("bin");
            if bin.join("initdb").is_file()
                && bin.join("postgres").is_file()
                && best.as_ref().is_none_or(|(b, _)| v > *b)
            {
                best = Some((v, bin));
            }
        }
    }
    best.map(|(_, b)| b).ok_or_else(|| {
        anyhow!(
            "no PostgreSQL server found: no /usr/lib/postgresql/*/bin/ with initdb and postgres \
             (apt-get install postgresql)"
        )
    })
}

impl PrivatePostgres {
    /// Creates a cluster in a fresh folder and starts it; ready for connections on return.
    pub async fn start() -> Result<PrivatePostgres> {
        reap_orphans();
        let bin = postgres_bin_dir()?;
        let user = run_as("postgres")?;
        let dir = make_dir("pg", user.as_ref())?;
        // From here on, Drop cleans up after a failure.
        let mut pg = PrivatePostgres {
            data: dir.join("data"),
            log: dir.join("postgres.log"),
            dir,
            bin,
            port: 0,
            user,
            server: Server::default(),
            op: tokio::sync::Mutex::new(()),
        };
        pg.initdb().await?;
        let mut last = None;
        for _ in 0..5 {
            pg.port = free_port()?;
            match pg.launch().await {
                Ok(()) => return Ok(pg),
                // Someone took the port between the check and the bind: try another.
                Err(e) if format!("{e:#}").contains("Address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("private PostgreSQL did not start")))
    }

    async fn initdb(&self) -> Result<()> {
        let mut c = command(&self.bin.join("initdb"), self.user.as_ref());
        c.arg("-D")
            .arg(&self.data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        run(
            c,
            "creating a private PostgreSQL cluster",
            self.user.as_ref(),
            Duration::from_secs(120),
            &[],
        )
        .await?;
        let conf = self.data.join("postgresql.conf");
        let mut text =
            fs::read_to_string(&conf).with_context(|| format!("cannot read {}", conf.display()))?;
        text.push_str(&format!(
            "\n# refunds private test server (testkit::private)\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n\
             max_connections = 200\n\
             shared_buffers = 32MB\n",
            self.dir.display()
        ));
        write_file(&conf, &text, self.user.as_ref())
    }

    /// Starts the postmaster (the folder is initialised) and waits until it accepts
    /// connections.
    async fn launch(&self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut c = command(&self.bin.join("postgres"), self.user.as_ref());
        c.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let desc = describe(&c, self.user.as_ref());
        let child = c.spawn().with_context(|| format!("cannot run `{desc}`"))?;
        let pid = i32::try_from(child.id())?;
        self.server.set(child);
        let deadline = Instant::now() + PG_START_TIMEOUT;
        loop {
            if let Some(status) = self.server.exited() {
                bail!(
                    "private PostgreSQL exited with {status} while starting (`{desc}`)\n{}",
                    tail(&self.log, LOG_LINES)
                );
            }
            if self.pid_file_says_ready(pid)
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.server.kill_now();
                bail!(
                    "private PostgreSQL did not become ready within {PG_START_TIMEOUT:?} \
                     (`{desc}`); killed it\n{}",
                    tail(&self.log, LOG_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `postmaster.pid` names this postmaster and says `ready` (line 8).
    fn pid_file_says_ready(&self, pid: i32) -> bool {
        let Ok(text) = fs::read_to_string(self.data.join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = text.lines().collect();
        lines.first().and_then(|l| l.trim().parse::<i32>().ok()) == Some(pid)
            && lines.get(7).map(|l| l.trim()) == Some("ready")
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL of the `postgres` database (a superuser connection).
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    /// The port it listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log (stderr of every run, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.server.pid()
    }

    /// Whether the postmaster runs.
    pub fn is_running(&self) -> bool {
        self.server.pid().is_some()
    }

    /// Creates a database; returns its URL. `name`: letters, digits and `_` only.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        use sqlx::Connection as _;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("database name `{name}`: use letters, digits and `_` only");
        }
        let mut admin = sqlx::PgConnection::connect(&self.admin_url())
            .await
            .with_context(|| format!("cannot connect to {}", self.admin_url()))?;
        // The name was checked above: letters, digits and `_` only.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("CREATE DATABASE {name} on {}", self.admin_url()))?;
        let _ = admin.close().await;
        Ok(self.url(name))
    }

    /// Creates a database with the refund processor's migrations applied; returns its URL.
    pub async fn create_migrated_database(&self, name: &str) -> Result<String> {
        let url = self.create_database(name).await?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        shared::store::migrate(&pool)
            .await
            .with_context(|| format!("migrating {url}"))?;
        pool.close().await;
        Ok(url)
    }

    /// Fast shutdown (SIGINT, like `pg_ctl stop -m fast`: sessions are ended, a checkpoint
    /// is written). Waits until the postmaster has exited. No-op when stopped.
    pub async fn stop(&self) -> Result<()> {
        let _op = self.op.lock().await;
        self.stop_inner().await
    }

    async fn stop_inner(&self) -> Result<()> {
        let Some(pid) = self.server.pid() else {
            return Ok(());
        };
        signal(pid, Signal::SIGINT)?;
        if !self.server.wait_exit(STOP_TIMEOUT).await {
            self.server.kill_now();
            bail!(
                "private PostgreSQL (pid {pid}) did not stop within {STOP_TIMEOUT:?} of SIGINT; \
                 killed it\n{}",
                tail(&self.log, LOG_LINES)
            );
        }
        Ok(())
    }

    /// Starts the server again on the same data folder and port (after `stop` or `kill9`;
    /// after a kill it runs crash recovery first). No-op when running.
    pub async fn start_again(&self) -> Result<()> {
        let _op = self.op.lock().await;
        self.start_again_inner().await
    }

    async fn start_again_inner(&self) -> Result<()> {
        if self.server.pid().is_some() {
            return Ok(());
        }
        let mut tries = 0;
        loop {
            match self.launch().await {
                Ok(()) => return Ok(()),
                // Backends of a killed postmaster may still hold the old shared memory.
                Err(e)
                    if tries < 10
                        && format!("{e:#}").contains("pre-existing shared memory block") =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `stop` then `start_again`.
    pub async fn restart(&self) -> Result<()> {
        let _op = self.op.lock().await;
        self.stop_inner().await?;
        self.start_again_inner().await
    }

    /// SIGKILLs the postmaster (a crash: no shutdown checkpoint), then waits until its other
    /// processes, which notice the postmaster's death, have exited too (they are SIGKILLed
    /// after 10 s). The server stays down until `start_again`.
    pub async fn kill9(&self) -> Result<()> {
        let _op = self.op.lock().await;
        let Some(pid) = self.server.pid() else {
            bail!("private PostgreSQL is not running: nothing to kill");
        };
        signal(pid, Signal::SIGKILL)?;
        if !self.server.wait_exit(Duration::from_secs(10)).await {
            bail!("private PostgreSQL postmaster {pid} survived SIGKILL for 10 s");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !live_group_members(pid).is_empty() {
            if Instant::now() > deadline {
                signal_group(pid, Signal::SIGKILL);
                tokio::time::sleep(Duration::from_millis(200)).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if let Some(pid) = self.server.pid() {
            // Immediate shutdown: quick, and it frees the shared memory (a SIGKILL would not).
            let _ = signal(pid, Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.server.pid().is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.server.kill_now();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ.

/// A private RabbitMQ node on 127.0.0.1 with its own AMQP and distribution ports, data and
/// logs; user `guest`/`guest`, vhost `/`. Dropping it kills the node (SIGKILL: its data is
/// thrown away anyway, and its epmd registration ends with its connection) and removes its
/// folder.
///
/// All methods take `&self`, like [`PrivatePostgres`]'s.
pub struct PrivateRabbit {
    dir: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
    server_script: PathBuf,
    ctl_script: PathBuf,
    user: Option<RunAs>,
    server: Server,
    op: tokio::sync::Mutex<()>,
}

/// `rabbitmq-server` and `rabbitmqctl`: the real scripts, not Debian's `/usr/sbin` wrappers
/// (those switch users with `su` and send the output to `/var/log/rabbitmq`).
fn rabbit_scripts() -> Result<(PathBuf, PathBuf)> {
    for dir in ["/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin"] {
        let dir = Path::new(dir);
        let (server, ctl) = (dir.join("rabbitmq-server"), dir.join("rabbitmqctl"));
        if server.exists() && ctl.exists() {
            return Ok((server, ctl));
        }
    }
    bail!(
        "RabbitMQ is not installed: no rabbitmq-server and rabbitmqctl under \
         /usr/lib/rabbitmq/bin (apt-get install rabbitmq-server)"
    )
}

impl PrivateRabbit {
    /// Starts a fresh node; ready (an AMQP connection succeeded) on return. Takes ~5–10 s.
    pub async fn start() -> Result<PrivateRabbit> {
        static N: AtomicU32 = AtomicU32::new(0);
        reap_orphans();
        let (server_script, ctl_script) = rabbit_scripts()?;
        let user = run_as("rabbitmq")?;
        let dir = make_dir("rabbit", user.as_ref())?;
        let node = format!(
            "rabbit-test-{}-{}-{:04x}@localhost",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            rand::random::<u16>()
        );
        let mut r = PrivateRabbit {
            dir,
            node,
            port: 0,
            dist_port: 0,
            server_script,
            ctl_script,
            user,
            server: Server::default(),
            op: tokio::sync::Mutex::new(()),
        };
        for sub in ["mnesia", "log"] {
            let p = r.dir.join(sub);
            fs::create_dir(&p).with_context(|| format!("cannot create {}", p.display()))?;
            give(&p, r.user.as_ref())?;
        }
        write_file(&r.dir.join("enabled_plugins"), "[].\n", r.user.as_ref())?;
        // Replaces /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
        write_file(
            &r.dir.join("rabbitmq-env.conf"),
            "# refunds private test node (testkit::private): settings come from the environment\n",
            r.user.as_ref(),
        )?;
        let mut last = None;
        for _ in 0..5 {
            r.port = free_port()?;
            r.dist_port = free_port()?;
            write_file(
                &r.dir.join("rabbitmq.conf"),
                &format!(
                    "# refunds private test node (testkit::private)\n\
                     listeners.tcp.default = 127.0.0.1:{}\n",
                    r.port
                ),
                r.user.as_ref(),
            )?;
            match r.launch().await {
                Ok(()) => return Ok(r),
                // Someone took a port between the check and the bind: try others.
                Err(e)
                    if ["eaddrinuse", "Address already in use"]
                        .iter()
                        .any(|m| format!("{e:#}").contains(m)) =>
                {
                    last = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("private RabbitMQ did not start")))
    }

    fn env(&self) -> Vec<(&'static str, OsString)> {
        let d = |p: &str| self.dir.join(p).into_os_string();
        vec![
            ("RABBITMQ_NODENAME", self.node.clone().into()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", self.port.to_string().into()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string().into()),
            ("RABBITMQ_MNESIA_BASE", d("mnesia")),
            ("RABBITMQ_LOG_BASE", d("log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins")),
            ("RABBITMQ_FEATURE_FLAGS_FILE", d("feature_flags")),
            ("RABBITMQ_PID_FILE", d("rabbit.pid")),
            ("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf")),
            ("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf")),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
        ]
    }

    fn console_log(&self) -> PathBuf {
        self.dir.join("log/console.log")
    }

    /// The node's own log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.node))
    }

    /// The last `n` lines of the node's log and of its console output.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "{}\n{}",
            tail(&self.log_path(), n),
            tail(&self.console_log(), n)
        )
    }

    async fn launch(&self) -> Result<()> {
        let console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.console_log())
            .with_context(|| format!("cannot open {}", self.console_log().display()))?;
        let mut c = command(&self.server_script, self.user.as_ref());
        c.envs(self.env())
            .current_dir(&self.dir)
            .stdout(console.try_clone()?)
            .stderr(console)
            .process_group(0);
        let desc = format!(
            "{} with RABBITMQ_NODENAME={}",
            describe(&c, self.user.as_ref()),
            self.node
        );
        let child = c.spawn().with_context(|| format!("cannot run `{desc}`"))?;
        self.server.set(child);
        let deadline = Instant::now() + RABBIT_START_TIMEOUT;
        let url = self.url();
        let mut last_err = String::from("the AMQP port is not open yet");
        loop {
            if let Some(status) = self.server.exited() {
                bail!(
                    "private RabbitMQ exited with {status} while starting (`{desc}`)\n{}",
                    self.log_tail(LOG_LINES)
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    shared::broker::connect(&url, "private-rabbit-ready"),
                )
                .await
                {
                    Ok(Ok(conn)) => {
                        let _ = conn.close(200, "ready".into()).await;
                        return Ok(());
                    }
                    Ok(Err(e)) => last_err = format!("AMQP connect: {e}"),
                    Err(_) => last_err = "AMQP connect timed out after 5 s".into(),
                }
            }
            if Instant::now() > deadline {
                self.server.kill_now();
                bail!(
                    "private RabbitMQ did not become ready within {RABBIT_START_TIMEOUT:?} \
                     (`{desc}`; last: {last_err}); killed it\n{}",
                    self.log_tail(LOG_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The AMQP port (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Erlang node name, e.g. `rabbit-test-1234-0-ab12@localhost`.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The pid of the Erlang VM (`beam.smp`) while it runs.
    pub fn pid(&self) -> Option<i32> {
        let sh = self.server.pid()?;
        // The server script (our child) runs the VM as its child.
        let from_file = read_pid(&self.dir.join("rabbit.pid"))
            .filter(|&p| matches!(proc_stat(p), Some((st, pp, _)) if pp == sh && st != 'Z'));
        from_file.or_else(|| live_children(sh).into_iter().next())
    }

    /// Whether the node's process runs.
    pub fn is_running(&self) -> bool {
        self.server.pid().is_some()
    }

    /// Runs `rabbitmqctl -n NODE ARGS…` against this node (as user rabbitmq, with its cookie);
    /// returns stdout. E.g. `ctl(&["list_queues", "name", "messages"])`.
    pub async fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut c = command(&self.ctl_script, self.user.as_ref());
        c.envs(self.env())
            .current_dir(&self.dir)
            .arg("-n")
            .arg(&self.node)
            .args(args);
        run(
            c,
            "rabbitmqctl on a private RabbitMQ",
            self.user.as_ref(),
            Duration::from_secs(120),
            &[&self.log_path()],
        )
        .await
    }

    /// Graceful stop (`rabbitmqctl -n NODE stop PIDFILE`, which returns once the VM has
    /// exited): durable queues and persistent messages are kept for `start_again`. No-op
    /// when stopped.
    pub async fn stop(&self) -> Result<()> {
        let _op = self.op.lock().await;
        self.stop_inner().await
    }

    async fn stop_inner(&self) -> Result<()> {
        if self.server.pid().is_none() {
            return Ok(());
        }
        let pid_file = self.dir.join("rabbit.pid");
        self.ctl(&["stop", &pid_file.to_string_lossy()]).await?;
        if !self.server.wait_exit(STOP_TIMEOUT).await {
            self.server.kill_now();
            bail!(
                "private RabbitMQ {} did not exit within {STOP_TIMEOUT:?} of `rabbitmqctl stop`; \
                 killed it\n{}",
                self.node,
                self.log_tail(LOG_LINES)
            );
        }
        Ok(())
    }

    /// Starts the node again with the same data, name and ports (after `stop` or `kill9`).
    /// No-op when running.
    pub async fn start_again(&self) -> Result<()> {
        let _op = self.op.lock().await;
        self.start_again_inner().await
    }

    async fn start_again_inner(&self) -> Result<()> {
        if self.server.pid().is_some() {
            return Ok(());
        }
        self.launch().await
    }

    /// `stop` then `start_again`.
    pub async fn restart(&self) -> Result<()> {
        let _op = self.op.lock().await;
        self.stop_inner().await?;
        self.start_again_inner().await
    }

    /// SIGKILLs the Erlang VM (a crash: nothing is flushed beyond what was already written;
    /// confirmed persistent messages were). The node stays down until `start_again`.
    pub async fn kill9(&self) -> Result<()> {
        let _op = self.op.lock().await;
        let Some(sh) = self.server.pid() else {
            bail!(
                "private RabbitMQ {} is not running: nothing to kill",
                self.node
            );
        };
        match self.pid() {
            Some(beam) => signal(beam, Signal::SIGKILL)?,
            None => signal_group(sh, Signal::SIGKILL),
        }
        // The server script notices and exits.
        if !self.server.wait_exit(Duration::from_secs(10)).await {
            self.server.kill_now();
        }
        Ok(())
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.server.kill_now();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
