//! The scripted ADS server (`tests/peers/ads_server.py`): serves a proxy
//! configurations our control plane never sends (resources the proxy must
//! reject), in stages the test moves through, and reports every request it
//! receives, ACKs and NACKs with their `error_detail` included.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::eventually::eventually;
use crate::process::Child;
use crate::testdir::TestDir;
use crate::workspace;

/// How long the server may take to listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `ads_server.py`; stopped on drop.
pub struct AdsServer {
    port: u16,
    events: Arc<Mutex<Vec<Value>>>,
    stdin: ChildStdin,
    // Dropped last: stops the process.
    child: Child,
}

impl AdsServer {
    /// Starts the server with svc-a's application on `app_a` and svc-b's
    /// on `app_b` (ports on 127.0.0.1), at stage 1.
    pub async fn start(dir: &TestDir, app_a: u16, app_b: u16) -> Result<AdsServer> {
        workspace::check_python_grpc()?;
        let script = workspace::peer_script("ads_server.py");
        let mut cmd = Command::new(workspace::python());
        cmd.arg(&script)
            .args(["--app-a", &app_a.to_string()])
            .args(["--app-b", &app_b.to_string()]);
        let log = dir.unique_file("ads-server", "log");
        let mut child = Child::spawn_with_stdio(
            dir,
            "ads-server (stderr)",
            &mut cmd,
            &log,
            Stdio::piped(),
            Some(Stdio::piped()),
        )?;
        let stdout = child
            .inner_mut()
            .stdout
            .take()
            .ok_or_else(|| anyhow!("ads_server.py: stdout was not piped"))?;
        let stdin = child
            .inner_mut()
            .stdin
            .take()
            .ok_or_else(|| anyhow!("ads_server.py: stdin was not piped"))?;
        // Its stdout, the event stream, is kept in memory and in a log of
        // the test directory.
        let events_log = dir.unique_file("ads-server-events", "log");
        dir.register_log("ads-server (events)", &events_log);
        let mut file = std::fs::File::create(&events_log)
            .with_context(|| format!("creating {}", events_log.display()))?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "unparsed", "line": line}));
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(value);
            }
        });
        let port = eventually("ads_server.py listens", START_TIMEOUT, async || {
            child.check_running()?;
            let events = events.lock().unwrap_or_else(PoisonError::into_inner);
            let listening = events
                .iter()
                .find(|e| e["event"] == "listening")
                .ok_or_else(|| anyhow!("no `listening` event yet"))?;
            listening["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| anyhow!("bad listening event {listening}"))
        })
        .await?;
        Ok(AdsServer {
            port,
            events,
            stdin,
            child,
        })
    }

    /// The ADS address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Moves the scenario to `stage`: the server pushes what changed.
    pub fn stage(&mut self, stage: u32) -> Result<()> {
        self.child.check_running()?;
        writeln!(self.stdin, "stage {stage}").context("writing to ads_server.py's stdin")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The requests received of type `ty` (`CDS`, ...).
    pub fn requests(&self, ty: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == "request" && e["type"] == ty)
            .collect()
    }

    /// Waits (at most `timeout`) for an event that `matches`, and returns
    /// it.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        eventually(what, timeout, async || {
            self.child.check_running()?;
            let events = self.events();
            match events.iter().find(|e| matches(e)) {
                Some(e) => Ok(e.clone()),
                None => bail!(
                    "not among the {} events so far; the last ones:\n{}",
                    events.len(),
                    events
                        .iter()
                        .rev()
                        .take(12)
                        .rev()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        })
        .await
    }
}
