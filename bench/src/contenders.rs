//! The servers under test, each started as its own process (so the kernel
//! can tell their CPU and memory apart) and stopped, with any workers it
//! started, when dropped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::runtime::Handle;

use crate::load::{self, Http, Target};

/// A running server.
pub struct Server {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `cmd` in its own process group, output to `<log_dir>/<name>.log`.
    pub fn start(name: &str, cmd: &mut Command, log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| log.display().to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server and the workers it forked.
    pub fn pids(&self) -> Vec<u32> {
        crate::procfs::tree(self.pid())
    }

    /// Waits until `target` answers a request with a 2xx.
    pub fn wait_ready(
        &mut self,
        rt: &Handle,
        client: &Http,
        target: &Arc<Target>,
        within: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{} exited ({status}) before it was ready; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            let probe = load::open_loop(
                rt,
                client,
                target,
                1.0,
                Duration::from_millis(1),
                Duration::from_secs(5),
                1,
            );
            if probe.errors == 0 {
                return Ok(());
            }
            last = probe.first_error.unwrap_or_default();
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "{} not ready within {within:?} (last: {last}); its log:\n{}",
            self.name,
            self.log_tail()
        )
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let kill = |signal: &str| {
            // The group may be gone already; that is not worth a message.
            let _ = Command::new("kill")
                .args([signal, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        kill("-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        kill("-KILL");
        let _ = self.child.wait();
    }
}

/// A loopback port nobody is listening on right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
