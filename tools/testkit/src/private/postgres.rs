//! [`PrivatePostgres`]: a throwaway PostgreSQL cluster from `initdb`, on a port of its own,
//! that a test may stop, restart or kill without disturbing the shared server.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;

use super::*;
use crate::tls::ServerCert;

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
    tls: Option<ServerCert>,
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
        Self::start_with(None).await
    }

    /// Like [`PrivatePostgres::start`], with `ssl = on` and this certificate: clients may then
    /// connect with TLS (plain connections are still accepted, as `trust` allows them).
    pub async fn start_tls(cert: ServerCert) -> Result<PrivatePostgres> {
        Self::start_with(Some(cert)).await
    }

    async fn start_with(tls: Option<ServerCert>) -> Result<PrivatePostgres> {
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
            tls,
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
        if let Some(tls) = &self.tls {
            // In the data folder, owned by the server's user: PostgreSQL refuses a key file
            // that others may read.
            let cert = self.data.join("server.crt");
            let key = self.data.join("server.key");
            write_file(&cert, &tls.cert_pem, self.user.as_ref())?;
            write_file(&key, &tls.key_pem, self.user.as_ref())?;
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot restrict {}", key.display()))?;
            text.push_str(
                "ssl = on\n\
                 ssl_cert_file = 'server.crt'\n\
                 ssl_key_file = 'server.key'\n",
            );
        }
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
