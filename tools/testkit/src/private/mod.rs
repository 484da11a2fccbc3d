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

mod postgres;
mod rabbit;

pub use postgres::PrivatePostgres;
pub use rabbit::PrivateRabbit;
