//! [`PrivateRabbit`]: a RabbitMQ node of its own (node name, ports, data folder) that a test
//! may stop and start again without disturbing the shared broker.

use std::ffi::OsString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;

use super::*;

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
