//! The Python gRPC peer (`tests/peers/grpc_peer.py`): test servers that
//! name themselves, and a proxyless gRPC xDS client (grpcio) that calls them
//! through the control plane.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use crate::process::Child;
use crate::testdir::TestDir;
use crate::workspace;

/// How long a server may take to print its port.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A `grpc_peer.py serve` process answering `/remora.test.Echo/Who` with
/// its name; stopped on drop.
pub struct GrpcServer {
    name: String,
    port: u16,
    // Holds stdin open: the server exits when it closes.
    child: Child,
}

impl GrpcServer {
    /// Starts a server named `name` on `127.0.0.1:0`.
    pub async fn start(dir: &TestDir, name: &str) -> Result<GrpcServer> {
        GrpcServer::start_with(dir, name, &[]).await
    }

    /// Starts a server named `name` with more `serve` options
    /// (`--delay SECONDS`, `--fail-percent P`).
    pub async fn start_with(dir: &TestDir, name: &str, options: &[&str]) -> Result<GrpcServer> {
        workspace::check_python_grpc()?;
        let script = workspace::peer_script("grpc_peer.py");
        let mut cmd = Command::new(workspace::python());
        cmd.arg(&script)
            .args(["serve", "--name", name])
            .args(options);
        let log = dir.unique_file(&format!("grpc-server-{name}"), "log");
        let mut child = Child::spawn_with_stdio(
            dir,
            &format!("grpc-server-{name}"),
            &mut cmd,
            &log,
            Stdio::piped(),
            Some(Stdio::piped()),
        )?;
        let stdout = child
            .inner_mut()
            .stdout
            .take()
            .ok_or_else(|| anyhow!("grpc_peer.py serve: stdout was not piped"))?;
        // Read the first line on a thread: a blocking read with a deadline.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        let line = tokio::task::spawn_blocking(move || rx.recv_timeout(START_TIMEOUT))
            .await
            .context("waiting for grpc_peer.py serve")?;
        let line = match line {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => bail!("reading grpc_peer.py serve's stdout: {e}"),
            Err(_) => {
                child.check_running()?;
                bail!("grpc_peer.py serve --name {name} printed no port within {START_TIMEOUT:?}")
            }
        };
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse::<u16>().ok());
        let Some(port) = port else {
            child.check_running()?;
            bail!("grpc_peer.py serve printed {line:?}, expected `PORT <n>`");
        };
        Ok(GrpcServer {
            name: name.to_string(),
            port,
            child,
        })
    }

    /// Its name (what `Who` answers).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Fails if the server has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.child.check_running()
    }
}

/// Writes a gRPC xDS bootstrap naming the control plane at `xds` and a node
/// with `GENERATOR: grpc` metadata (the proxyless view).
pub fn write_bootstrap(dir: &TestDir, xds: SocketAddr, node_id: &str) -> Result<PathBuf> {
    let path = dir.unique_file(&format!("grpc-bootstrap-{node_id}"), "json");
    let bootstrap = json!({
        "xds_servers": [{
            "server_uri": xds.to_string(),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": node_id,
            "cluster": "remora-tests",
            "metadata": {"GENERATOR": "grpc"},
        },
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&bootstrap)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Options of one `grpc_peer.py call` run.
#[derive(Debug, Clone)]
pub struct Call {
    /// `xds:///name.namespace:port`, or `127.0.0.1:port`.
    pub target: String,
    /// How many calls.
    pub count: usize,
    /// The bootstrap file (`GRPC_XDS_BOOTSTRAP`), for xDS targets.
    pub bootstrap: Option<PathBuf>,
    /// Seconds the first call may wait for xDS to resolve.
    pub ready_timeout: Duration,
    /// The whole run's limit.
    pub timeout: Duration,
    /// The `:authority` of every call (`--authority`), for a target that
    /// is a sidecar's outbound listener.
    pub authority: Option<String>,
}

impl Call {
    /// `count` calls to `target`, with default timeouts and no bootstrap.
    pub fn new(target: &str, count: usize) -> Call {
        Call {
            target: target.to_string(),
            count,
            bootstrap: None,
            ready_timeout: Duration::from_secs(15),
            timeout: Duration::from_secs(60),
            authority: None,
        }
    }

    /// Sets the `:authority` of every call.
    pub fn authority(mut self, authority: &str) -> Call {
        self.authority = Some(authority.to_string());
        self
    }

    /// Uses `bootstrap` as `GRPC_XDS_BOOTSTRAP`.
    pub fn bootstrap(mut self, bootstrap: PathBuf) -> Call {
        self.bootstrap = Some(bootstrap);
        self
    }

    /// Runs `grpc_peer.py call` and returns how many calls each server
    /// answered. Its stderr goes to a log of the test directory.
    pub async fn run(&self, dir: &TestDir) -> Result<BTreeMap<String, u64>> {
        workspace::check_python_grpc()?;
        let script = workspace::peer_script("grpc_peer.py");
        let log = dir.unique_file("grpc-call", "log");
        let stderr = std::fs::File::create(&log)?;
        dir.register_log(&format!("grpc-call {}", self.target), &log);
        let mut cmd = tokio::process::Command::new(workspace::python());
        cmd.arg(&script)
            .args(["call", "--target", &self.target])
            .args(["--count", &self.count.to_string()])
            .args([
                "--ready-timeout",
                &self.ready_timeout.as_secs_f64().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        if let Some(b) = &self.bootstrap {
            cmd.env("GRPC_XDS_BOOTSTRAP", b);
        }
        if let Some(a) = &self.authority {
            cmd.args(["--authority", a]);
        }
        if let Some(trace) = std::env::var_os("REMORA_TESTS_GRPC_TRACE") {
            // For debugging: e.g. `xds_client,xds_resolver`.
            cmd.env("GRPC_TRACE", trace).env("GRPC_VERBOSITY", "debug");
        }
        let what = format!(
            "grpc_peer.py call --target {} --count {}",
            self.target, self.count
        );
        let out = tokio::time::timeout(self.timeout, cmd.output())
            .await
            .with_context(|| format!("{what}: did not finish within {:?}", self.timeout))?
            .with_context(|| format!("running {what}"))?;
        // tokio's `output()` pipes stderr whatever was configured: keep it
        // in the log for the failure report.
        let _ = std::fs::write(&log, &out.stderr);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("{what} failed ({}): {}", out.status, stderr.trim());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("{what} printed {stdout:?}, expected a JSON object"))
    }
}

// === One call of any shape ===

/// The method an [`Rpc`] calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Unary `Who`: answers the server's name.
    Who,
    /// Unary `Fail`: ends with the status named in the argument
    /// (`NOT_FOUND:message`).
    Fail,
    /// Server streaming `Count`: answers N messages.
    Count,
    /// Bidirectional `Echo`: answers each message as it arrives.
    Echo,
}

impl Method {
    fn flag(self) -> &'static str {
        match self {
            Method::Who => "who",
            Method::Fail => "fail",
            Method::Count => "count",
            Method::Echo => "echo",
        }
    }
}

/// One `grpc_peer.py rpc` run.
#[derive(Debug, Clone)]
pub struct Rpc {
    /// `host:port`.
    pub target: String,
    /// `:authority`.
    pub authority: Option<String>,
    /// The method.
    pub method: Method,
    /// The request of `Who`, `Fail` and `Count`.
    pub arg: String,
    /// The messages of `Echo`.
    pub messages: Vec<String>,
    /// Request metadata.
    pub metadata: Vec<(String, String)>,
    /// The call's deadline.
    pub timeout: Duration,
}

/// What came back from one call.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RpcOutcome {
    /// The status code's name (`OK`, `NOT_FOUND`, ...).
    pub code: String,
    /// The status message.
    pub details: String,
    /// Every response message, as text.
    pub replies: Vec<String>,
    /// Response headers (initial metadata).
    pub initial_metadata: BTreeMap<String, Vec<String>>,
    /// Trailers (trailing metadata).
    pub trailing_metadata: BTreeMap<String, Vec<String>>,
}

impl Rpc {
    /// A call of `method` to `target` (a sidecar's outbound listener)
    /// addressed to `authority`.
    pub fn new(target: SocketAddr, authority: &str, method: Method) -> Rpc {
        Rpc {
            target: target.to_string(),
            authority: Some(authority.to_string()),
            method,
            arg: String::new(),
            messages: Vec::new(),
            metadata: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Sets the request argument.
    pub fn arg(mut self, arg: &str) -> Rpc {
        self.arg = arg.to_string();
        self
    }

    /// Sets the messages of a bidirectional call.
    pub fn messages(mut self, messages: &[&str]) -> Rpc {
        self.messages = messages.iter().map(|m| m.to_string()).collect();
        self
    }

    /// Adds request metadata.
    pub fn metadata(mut self, key: &str, value: &str) -> Rpc {
        self.metadata.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets the deadline.
    pub fn timeout(mut self, timeout: Duration) -> Rpc {
        self.timeout = timeout;
        self
    }

    /// Makes the call and returns what came back (a non-OK status is an
    /// outcome, not an error).
    pub async fn run(&self, dir: &TestDir) -> Result<RpcOutcome> {
        workspace::check_python_grpc()?;
        let script = workspace::peer_script("grpc_peer.py");
        let log = dir.unique_file("grpc-rpc", "log");
        let stderr = std::fs::File::create(&log)?;
        dir.register_log(&format!("grpc-rpc {:?} {}", self.method, self.target), &log);
        let mut cmd = tokio::process::Command::new(workspace::python());
        cmd.arg(&script)
            .args(["rpc", "--target", &self.target])
            .args(["--method", self.method.flag()])
            .args(["--arg", &self.arg])
            .args(["--messages", &self.messages.join(",")])
            .args(["--timeout", &self.timeout.as_secs_f64().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        if let Some(a) = &self.authority {
            cmd.args(["--authority", a]);
        }
        for (k, v) in &self.metadata {
            cmd.args(["--metadata", &format!("{k}={v}")]);
        }
        let what = format!("grpc_peer.py rpc {:?} to {}", self.method, self.target);
        let limit = self.timeout + Duration::from_secs(15);
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .with_context(|| format!("{what}: did not finish within {limit:?}"))?
            .with_context(|| format!("running {what}"))?;
        // tokio's `output()` pipes stderr whatever was configured: keep it
        // in the log for the failure report.
        let _ = std::fs::write(&log, &out.stderr);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("{what} failed ({}): {}", out.status, stderr.trim());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("{what} printed {stdout:?}, expected a JSON object"))
    }
}
