//! Child processes that are stopped when dropped.
//!
//! A test that fails must not leave an Envoy or a control plane running, so
//! every child is owned by a [`Child`] whose `Drop` asks it to stop
//! (SIGTERM, so Envoy frees its shared memory), waits a little, then kills it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::testdir::TestDir;

/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A running child process with its output in a log file.
pub struct Child {
    child: std::process::Child,
    what: String,
    log: PathBuf,
}

impl Child {
    /// Spawns `cmd` with stdout and stderr appended to a fresh log file in
    /// `dir` (registered to be printed if the test fails) and stdin closed.
    pub fn spawn(dir: &TestDir, what: &str, cmd: &mut Command) -> Result<Child> {
        let log = dir.unique_file(what, "log");
        Child::spawn_with_stdio(dir, what, cmd, &log, Stdio::null(), None)
    }

    /// Like [`Child::spawn`], with a chosen stdin and, if `stdout` is given,
    /// stdout piped instead of logged.
    pub fn spawn_with_stdio(
        dir: &TestDir,
        what: &str,
        cmd: &mut Command,
        log: &Path,
        stdin: Stdio,
        stdout: Option<Stdio>,
    ) -> Result<Child> {
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = file
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        dir.register_log(what, log);
        cmd.stdin(stdin)
            .stdout(stdout.unwrap_or_else(|| Stdio::from(file)))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {what}: {cmd:?}"))?;
        Ok(Child {
            child,
            what: what.to_string(),
            log: log.to_path_buf(),
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The log file holding the child's stderr (and stdout unless piped).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The exit status if the child has exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails with the exit status and the log tail if the child has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.try_exited() {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "{} exited ({status}); its log ({}) ends with:\n{}",
                self.what,
                self.log.display(),
                self.log_tail(40)
            ),
        }
    }

    /// The underlying child (for its pipes).
    pub fn inner_mut(&mut self) -> &mut std::process::Child {
        &mut self.child
    }

    /// Kills the child at once (SIGKILL) and reaps it: a crash, for tests
    /// of what its peers do when it vanishes.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the child: SIGTERM, then SIGKILL after [`STOP_GRACE`].
    pub fn stop(&mut self) {
        if self.try_exited().is_some() {
            return;
        }
        // std has no SIGTERM; `kill(1)` is everywhere the tests run.
        let termed = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if termed {
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if self.try_exited().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}
