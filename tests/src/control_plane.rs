//! A running `remora-control-plane`, started on ports chosen by the OS.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::StatusCode;
use serde::Deserialize;

use crate::client::HttpClient;
use crate::eventually::eventually;
use crate::metrics::Metrics;
use crate::process::Child;
use crate::proxy::ControlLink;
use crate::testdir::TestDir;
use crate::workspace;

/// How long the control plane may take to bind its ports and be ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What `--address-file` holds.
#[derive(Debug, Deserialize)]
struct Addresses {
    xds: SocketAddr,
    #[serde(default)]
    tls: Option<SocketAddr>,
    monitoring: SocketAddr,
}

/// A control plane serving a mesh file; stopped on drop.
pub struct ControlPlane {
    child: Child,
    mesh: PathBuf,
    xds: SocketAddr,
    tls: Option<SocketAddr>,
    monitoring: SocketAddr,
    client: HttpClient,
}

impl ControlPlane {
    /// Starts the control plane on `mesh` with xDS, TLS and monitoring on
    /// port 0 and its CA in `dir`'s `control-plane-ca`, and waits (at most [`START_TIMEOUT`]) until it has written its
    /// address file and `/ready` answers 200.
    pub async fn start(dir: &TestDir, mesh: &Path) -> Result<ControlPlane> {
        ControlPlane::start_with(dir, mesh, "127.0.0.1:0", &[]).await
    }

    /// [`ControlPlane::start`] on the addresses a killed control plane
    /// had (plaintext xDS and TLS), so its clients reconnect.
    pub async fn restart_on(
        dir: &TestDir,
        mesh: &Path,
        xds_addr: SocketAddr,
        tls_addr: SocketAddr,
    ) -> Result<ControlPlane> {
        let tls = vec![OsString::from("--tls-addr"), tls_addr.to_string().into()];
        ControlPlane::start_with(dir, mesh, &xds_addr.to_string(), &tls).await
    }

    /// [`ControlPlane::start_at`] with more command-line arguments, passed
    /// last. Unless they name the CA (`--ca-dir`, `--ca-cert`), the CA lives
    /// in `dir`'s `control-plane-ca`, so a restart in the same test keeps its
    /// root.
    pub async fn start_with(
        dir: &TestDir,
        mesh: &Path,
        xds_addr: &str,
        extra_args: &[OsString],
    ) -> Result<ControlPlane> {
        let bin = workspace::control_plane_binary()?;
        let address_file = dir.unique_file("control-plane-addresses", "json");
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(mesh)
            .args(["--xds-addr", xds_addr])
            .args(["--monitoring-addr", "127.0.0.1:0"])
            .arg("--address-file")
            .arg(&address_file);
        if !extra_args.iter().any(|a| a == "--tls-addr") {
            cmd.args(["--tls-addr", "127.0.0.1:0"]);
        }
        let names_ca = extra_args
            .iter()
            .any(|a| [OsStr::new("--ca-dir"), OsStr::new("--ca-cert")].contains(&a.as_os_str()));
        if !names_ca {
            cmd.arg("--ca-dir").arg(dir.file("control-plane-ca"));
        }
        cmd.args(extra_args);
        if std::env::var_os("REMORA_LOG").is_none() {
            // Its `--log` filter; set REMORA_LOG to choose another.
            cmd.env("REMORA_LOG", "info,remora_control_plane=debug");
        }
        let mut child = Child::spawn(dir, "control-plane", &mut cmd)?;
        let addrs = eventually(
            "the control plane writes its address file",
            START_TIMEOUT,
            async || {
                child.check_running()?;
                let text = std::fs::read_to_string(&address_file)
                    .with_context(|| format!("reading {}", address_file.display()))?;
                serde_json::from_str::<Addresses>(&text)
                    .with_context(|| format!("parsing {}: {text:?}", address_file.display()))
            },
        )
        .await?;
        let client = HttpClient::new();
        eventually(
            "the control plane's /ready answers 200",
            START_TIMEOUT,
            async || {
                child.check_running()?;
                let (status, body) = client.admin_get_status(addrs.monitoring, "/ready").await?;
                if status != StatusCode::OK {
                    bail!("GET /ready answered {status}: {body}");
                }
                Ok(())
            },
        )
        .await?;
        Ok(ControlPlane {
            child,
            mesh: mesh.to_path_buf(),
            xds: addrs.xds,
            tls: addrs.tls,
            monitoring: addrs.monitoring,
            client,
        })
    }

    /// The ADS (xDS gRPC) address.
    pub fn xds_addr(&self) -> SocketAddr {
        self.xds
    }

    /// The TLS listener's address (ADS and certificate signing); fails if
    /// the address file did not name one.
    pub fn tls_addr(&self) -> Result<SocketAddr> {
        self.tls
            .context("the control plane's address file has no \"tls\" address")
    }

    /// `GET /debug/trust-bundle`: the CA's roots, PEM.
    pub async fn trust_bundle_pem(&self) -> Result<String> {
        self.get("/debug/trust-bundle").await
    }

    /// Writes the trust bundle into `dir` for proxies' `--ca-bundle`.
    pub async fn write_trust_bundle(&self, dir: &TestDir) -> Result<PathBuf> {
        let pem = self.trust_bundle_pem().await?;
        let path = dir.unique_file("trust-bundle", "pem");
        std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// How sidecars reach this control plane: mTLS on its TLS port, checked
    /// against its trust bundle (written into `dir`).
    pub async fn link(&self, dir: &TestDir) -> Result<ControlLink> {
        Ok(ControlLink::Mtls {
            addr: self.tls_addr()?,
            bundle: self.write_trust_bundle(dir).await?,
        })
    }

    /// The monitoring HTTP address.
    pub fn monitoring_addr(&self) -> SocketAddr {
        self.monitoring
    }

    /// The mesh file it serves.
    pub fn mesh_path(&self) -> &Path {
        &self.mesh
    }

    /// Its log (stderr).
    pub fn log_path(&self) -> &Path {
        self.child.log()
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.child.check_running()
    }

    /// Kills it at once (SIGKILL): a crash. Its log stays in the test
    /// directory.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// `GET path` on the monitoring port; fails unless 200.
    pub async fn get(&self, path: &str) -> Result<String> {
        self.client.admin_get(self.monitoring, path).await
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> Result<Metrics> {
        Metrics::parse(&self.get("/metrics").await?).context("parsing the control plane's /metrics")
    }

    /// A metric's value (summed over the samples carrying `labels`), or
    /// `None` if no such sample is exposed.
    pub async fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        Ok(self.metrics().await?.value(name, labels))
    }

    /// `GET /debug/syncz` as JSON.
    pub async fn syncz_json(&self) -> Result<serde_json::Value> {
        let text = self.get("/debug/syncz").await?;
        serde_json::from_str(&text).with_context(|| format!("/debug/syncz is not JSON: {text}"))
    }

    /// `GET /debug/syncz`: every connected client's sync status.
    pub async fn syncz(&self) -> Result<Vec<SyncClient>> {
        let json = self.syncz_json().await?;
        serde_json::from_value(json.clone())
            .with_context(|| format!("/debug/syncz has an unexpected shape: {json}"))
    }

    /// The sync status of node `node_id` (its most recent stream).
    pub async fn sync_status(&self, node_id: &str) -> Result<SyncClient> {
        let clients = self.syncz().await?;
        let ids: Vec<&str> = clients.iter().map(|c| c.node_id.as_str()).collect();
        clients
            .iter()
            .filter(|c| c.node_id == node_id)
            .max_by_key(|c| c.connected_at)
            .cloned()
            .ok_or_else(|| {
                anyhow::anyhow!("/debug/syncz lists no node {node_id:?}; it lists {ids:?}")
            })
    }

    /// Waits (at most `timeout`) until node `node_id` has ACKed the last
    /// response of every type in `types` (`LDS`, `RDS`, `CDS`, `EDS`), and
    /// returns its status. Fails at once on a NACK.
    pub async fn wait_synced(
        &self,
        node_id: &str,
        types: &[&str],
        timeout: Duration,
    ) -> Result<SyncClient> {
        eventually(
            &format!("node {node_id} ACKs everything sent of {types:?} (per /debug/syncz)"),
            timeout,
            async || {
                let status = self.sync_status(node_id).await?;
                status.check_synced(types)?;
                Ok(status)
            },
        )
        .await
    }
}

/// Runs `remora-control-plane ARGS` to completion (killed after `timeout`)
/// and returns its exit status, stdout and stderr.
pub async fn run(args: &[&std::ffi::OsStr], timeout: Duration) -> Result<std::process::Output> {
    let bin = workspace::control_plane_binary()?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let what = format!("{} {args:?}", bin.display());
    tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("{what} did not exit within {timeout:?}"))?
        .with_context(|| format!("running {what}"))
}

// === /debug/syncz ===

/// One client in `/debug/syncz`.
#[derive(Debug, Clone, Deserialize)]
pub struct SyncClient {
    /// Node id.
    pub node_id: String,
    /// `envoy`, `grpc` or `remora`.
    #[serde(default)]
    pub kind: String,
    /// `sotw` or `delta`.
    #[serde(default)]
    pub api: String,
    /// When the stream opened (seconds since the epoch).
    #[serde(default)]
    pub connected_at: u64,
    /// By type short name (`CDS`, `EDS`, `LDS`, `RDS`).
    #[serde(default)]
    pub types: BTreeMap<String, SyncType>,
}

/// The sync status of one type on one stream.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct SyncType {
    /// Resources subscribed by name.
    pub subscribed: usize,
    /// Subscribed to everything.
    pub wildcard: bool,
    /// Version of the last response sent.
    pub sent_version: Option<String>,
    /// Last version ACKed.
    pub acked_version: Option<String>,
    /// NACKs on this stream.
    pub nacks: u64,
    /// The last NACK, as the client described it.
    pub last_nack: Option<serde_json::Value>,
}

impl SyncClient {
    /// Fails unless every type in `types` was sent, and its last response
    /// ACKed, with no NACK on the stream.
    pub fn check_synced(&self, types: &[&str]) -> Result<()> {
        for ty in types {
            let Some(t) = self.types.get(*ty) else {
                bail!("node {}: nothing about {ty} yet: {self:?}", self.node_id);
            };
            if t.nacks != 0 || t.last_nack.is_some() {
                bail!(
                    "node {} NACKed {ty} ({} NACKs), last: {}",
                    self.node_id,
                    t.nacks,
                    t.last_nack
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                );
            }
            if t.sent_version.is_none() || t.acked_version != t.sent_version {
                bail!(
                    "node {}: {ty} sent {:?}, acked {:?}",
                    self.node_id,
                    t.sent_version,
                    t.acked_version
                );
            }
        }
        Ok(())
    }

    /// The version last sent of `ty`.
    pub fn sent(&self, ty: &str) -> Option<&str> {
        self.types.get(ty)?.sent_version.as_deref()
    }
}
