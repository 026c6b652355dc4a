//! The mesh's processes: the control plane and the sidecars, each a child
//! process running this executable's hidden `control-plane` or `proxy`
//! subcommand, with its output in a log file of the demo's directory.
//!
//! Children get a process group of their own, so Ctrl-C reaches only the
//! demo, which stops the traffic before it stops them (SIGTERM, then SIGKILL
//! after a grace period). Their stdin is a pipe from the demo: if the demo
//! dies without stopping them, they see end of file and exit
//! (`REMORA_EXIT_WITH_PARENT`, see `main.rs`).

use std::ffi::OsString;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::process::ChildStdin;

use crate::EXIT_WITH_PARENT_ENV;

/// Lines of a child's log quoted in an error.
const LOG_TAIL_LINES: usize = 30;

/// Why a child could not be started or did not come up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("cannot create the log file {path} for {what}: {error}")]
    Log {
        what: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot start {what} ({exe}): {error}")]
    Spawn {
        what: String,
        exe: PathBuf,
        error: std::io::Error,
    },
    #[error("{what} exited ({status}); its log {log} ends with:\n{tail}")]
    Exited {
        what: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "{what} did not write its address file {file} within {timeout:?} ({detail}); its log {log} ends with:\n{tail}"
    )]
    NoAddressFile {
        what: String,
        file: PathBuf,
        timeout: Duration,
        detail: String,
        log: PathBuf,
        tail: String,
    },
}

/// `--address-file` of the control plane.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) struct ControlPlaneAddrs {
    pub(crate) monitoring: SocketAddr,
    /// The TLS listener: the CA and xDS over mTLS.
    pub(crate) tls: SocketAddr,
}

/// `--address-file` of a sidecar.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) struct SidecarAddrs {
    pub(crate) outbound: SocketAddr,
    /// Absent when the sidecar runs without `--app-addr`.
    pub(crate) inbound: Option<SocketAddr>,
    pub(crate) admin: SocketAddr,
}

/// A running child process.
pub(crate) struct Child {
    what: String,
    log: PathBuf,
    child: tokio::process::Child,
    /// Held open for the child's lifetime; see the module docs.
    _stdin: Option<ChildStdin>,
    exited: Option<ExitStatus>,
}

impl Child {
    /// Starts `exe args...` with stdout and stderr in `log`.
    pub(crate) fn spawn(
        what: &str,
        exe: &Path,
        args: &[OsString],
        log: &Path,
    ) -> Result<Child, Box<StartError>> {
        let log_error = |error| {
            Box::new(StartError::Log {
                what: what.to_string(),
                path: log.to_path_buf(),
                error,
            })
        };
        let out = File::create(log).map_err(log_error)?;
        let err = out.try_clone().map_err(log_error)?;
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .env(EXIT_WITH_PARENT_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            // A last resort if the demo unwinds without stopping it.
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| {
                Box::new(StartError::Spawn {
                    what: what.to_string(),
                    exe: exe.to_path_buf(),
                    error,
                })
            })?;
        let stdin = child.stdin.take();
        Ok(Child {
            what: what.to_string(),
            log: log.to_path_buf(),
            child,
            _stdin: stdin,
            exited: None,
        })
    }

    /// The child's log file.
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// Fails, quoting the log, if the child has exited.
    pub(crate) fn check_running(&mut self) -> Result<(), Box<StartError>> {
        match self.try_exited() {
            None => Ok(()),
            Some(status) => Err(Box::new(StartError::Exited {
                what: self.what.clone(),
                status,
                log: self.log.clone(),
                tail: log_tail(&self.log),
            })),
        }
    }

    fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits for the child to write its `--address-file` and reads it.
    pub(crate) async fn wait_for_address_file<T: DeserializeOwned>(
        &mut self,
        path: &Path,
        timeout: Duration,
    ) -> Result<T, Box<StartError>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            // The file is written whole and renamed into place, so once it
            // exists it parses; a parse error is a real one.
            let detail = match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<T>(&bytes) {
                    Ok(addrs) => return Ok(addrs),
                    Err(e) => format!(
                        "it holds {:?}, which is not what was expected: {e}",
                        String::from_utf8_lossy(&bytes)
                    ),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "none yet".to_string(),
                Err(e) => format!("cannot read it: {e}"),
            };
            if Instant::now() >= deadline {
                return Err(Box::new(StartError::NoAddressFile {
                    what: self.what.clone(),
                    file: path.to_path_buf(),
                    timeout,
                    detail,
                    log: self.log.clone(),
                    tail: log_tail(&self.log),
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks the child to stop (SIGTERM). False if that could not be sent.
    async fn terminate(&mut self) -> bool {
        if self.try_exited().is_some() {
            return true;
        }
        let Some(pid) = self.child.id() else {
            return true;
        };
        // std and tokio only send SIGKILL; `kill(1)` is on every Unix.
        tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    /// Waits until `deadline` for the child to exit, then kills it. Returns
    /// a note when something was not clean.
    async fn reap(&mut self, deadline: tokio::time::Instant) -> Option<String> {
        if self.exited.is_some() {
            // Already reported by `check_running`.
            return None;
        }
        match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => None,
            Ok(Ok(status)) => Some(format!(
                "{} exited ({status}); see {}",
                self.what,
                self.log.display()
            )),
            Ok(Err(e)) => Some(format!("waiting for {}: {e}", self.what)),
            Err(_) => {
                let killed = self.child.kill().await;
                Some(match killed {
                    Ok(()) => format!("{} did not stop after SIGTERM and was killed", self.what),
                    Err(e) => format!(
                        "{} did not stop after SIGTERM and could not be killed: {e}",
                        self.what
                    ),
                })
            }
        }
    }
}

/// Stops every child: SIGTERM, then up to `grace` to exit, then SIGKILL.
/// The first child (the control plane, started first) is stopped last, once
/// the others are gone, so no sidecar sees its control plane vanish.
/// Returns notes on anything that was not clean.
pub(crate) async fn stop_all(children: &mut [Child], grace: Duration) -> Vec<String> {
    let mut notes = Vec::new();
    let (first, rest) = match children.split_first_mut() {
        Some((first, rest)) => (Some(first), rest),
        None => (None, children),
    };
    stop_group(rest, grace, &mut notes).await;
    if let Some(first) = first {
        stop_group(std::slice::from_mut(first), grace, &mut notes).await;
    }
    notes
}

async fn stop_group(children: &mut [Child], grace: Duration, notes: &mut Vec<String>) {
    for child in children.iter_mut() {
        if !child.terminate().await {
            notes.push(format!("could not send SIGTERM to {}", child.what));
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    for child in children.iter_mut() {
        notes.extend(child.reap(deadline).await);
    }
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            if tail.is_empty() {
                "(nothing)".to_string()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}
