//! A running `remora-proxy` sidecar, started on ports chosen by the OS.
//!
//! Explicit mode on loopback: the outbound listener (where an application
//! sends its requests), the inbound listener (where peer sidecars send
//! requests for the application; only with an application), and the admin
//! listener are all bound on `127.0.0.1:0`, and the proxy reports them in
//! its `--address-file`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use http::StatusCode;
use serde::Deserialize;

use crate::client::HttpClient;
use crate::eventually::eventually;
use crate::metrics::Metrics;
use crate::process::Child;
use crate::testdir::TestDir;
use crate::workspace;

/// Worker threads of every proxy the tests start (`--workers`): two cores
/// are shared by every test, so not one per core in each of a dozen
/// proxies. Each worker keeps its own connections to endpoints, so a
/// sidecar opens up to this many connections to a peer.
pub const WORKERS: usize = 2;

/// How long the proxy may take to bind its ports.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What an application speaks (`--app-protocol`, and the mesh's port
/// protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC).
    Http2,
}

impl AppProtocol {
    /// The `--app-protocol` value.
    pub fn flag(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http1",
            AppProtocol::Http2 => "http2",
        }
    }
}

/// How a sidecar reaches its control plane.
#[derive(Debug, Clone)]
pub enum ControlLink {
    /// Plaintext xDS and no identity (`--ca-bundle` left out): for xDS
    /// servers other than Remora's.
    Plaintext(SocketAddr),
    /// The normal case: the CA and xDS over mTLS on the control plane's
    /// TLS port, checked against `bundle`; the sidecar proves its identity
    /// with [`ProxyConfig::token`].
    Mtls {
        /// The control plane's TLS address.
        addr: SocketAddr,
        /// PEM roots for `--ca-bundle`.
        bundle: PathBuf,
    },
}

/// How to start one sidecar.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `--service`: the local service's name.
    pub service: String,
    /// `--namespace`.
    pub namespace: String,
    /// `--service-account`.
    pub service_account: String,
    /// `--app-addr` and `--app-protocol` (left to the proxy's default,
    /// `http1`, when `None`); no application for a client-only sidecar
    /// (no inbound listener).
    pub app: Option<(SocketAddr, Option<AppProtocol>)>,
    /// `--node-id`; the proxy's default (`<service>-<pid>`) when `None`.
    pub node_id: Option<String>,
    /// `--log`.
    pub log: String,
    /// The bootstrap token for `--token-file` (mTLS only).
    pub token: Option<String>,
}

impl ProxyConfig {
    /// A client-only sidecar of `service` in `namespace`.
    pub fn client(service: &str, namespace: &str) -> ProxyConfig {
        ProxyConfig {
            service: service.to_string(),
            namespace: namespace.to_string(),
            service_account: service.to_string(),
            app: None,
            node_id: None,
            token: None,
            log: std::env::var("REMORA_TESTS_PROXY_LOG")
                .unwrap_or_else(|_| "info,remora_proxy=debug".to_string()),
        }
    }

    /// A sidecar in front of an application at `app` speaking `protocol`.
    pub fn sidecar(
        service: &str,
        namespace: &str,
        app: SocketAddr,
        protocol: AppProtocol,
    ) -> ProxyConfig {
        ProxyConfig {
            app: Some((app, Some(protocol))),
            ..ProxyConfig::client(service, namespace)
        }
    }

    /// Leaves `--app-protocol` out: the sidecar assumes HTTP/1.1 unless a
    /// peer names the protocol (`x-remora-app-protocol`).
    pub fn default_app_protocol(mut self) -> ProxyConfig {
        if let Some((_, protocol)) = &mut self.app {
            *protocol = None;
        }
        self
    }

    /// Sets `--node-id`.
    pub fn node_id(mut self, id: &str) -> ProxyConfig {
        self.node_id = Some(id.to_string());
        self
    }

    /// Sets the bootstrap token the CA checks.
    pub fn token(mut self, token: &str) -> ProxyConfig {
        self.token = Some(token.to_string());
        self
    }

    /// Sets `--service-account`.
    pub fn service_account(mut self, sa: &str) -> ProxyConfig {
        self.service_account = sa.to_string();
        self
    }
}

/// What `--address-file` holds.
#[derive(Debug, Clone, Deserialize)]
struct Addresses {
    outbound: SocketAddr,
    inbound: Option<SocketAddr>,
    admin: SocketAddr,
}

/// Memory use of a process, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak resident set since the process started.
    pub hwm_kib: u64,
}

impl Memory {
    /// Reads `/proc/<pid>/status`.
    pub fn of(pid: u32) -> Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> Result<u64> {
            let line = text
                .lines()
                .find(|l| l.starts_with(name))
                .ok_or_else(|| anyhow!("{path} has no {name} line"))?;
            line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("{path}: {line:?}"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }
}

/// A running sidecar; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proxy {
    child: Child,
    name: String,
    addrs: Addresses,
    client: HttpClient,
}

impl Proxy {
    /// Starts a sidecar against the control plane reached by `link` and
    /// waits (at most [`START_TIMEOUT`]) for its address file. It is not
    /// ready yet: see [`Proxy::wait_ready`].
    pub async fn start(dir: &TestDir, link: &ControlLink, config: &ProxyConfig) -> Result<Proxy> {
        let bin = workspace::proxy_binary()?;
        let label = config
            .node_id
            .clone()
            .unwrap_or_else(|| config.service.clone());
        let address_file = dir.unique_file(&format!("proxy-{label}-addresses"), "json");
        let mut cmd = Command::new(&bin);
        cmd.args(["--service", &config.service])
            .args(["--namespace", &config.namespace])
            .args(["--service-account", &config.service_account])
            .args(["--outbound-addr", "127.0.0.1:0"])
            .args(["--inbound-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--log", &config.log])
            .args(["--workers", &WORKERS.to_string()])
            .arg("--address-file")
            .arg(&address_file);
        if let Some((app, protocol)) = config.app {
            cmd.args(["--app-addr", &app.to_string()]);
            if let Some(protocol) = protocol {
                cmd.args(["--app-protocol", protocol.flag()]);
            }
        }
        if let Some(id) = &config.node_id {
            cmd.args(["--node-id", id]);
        }
        match link {
            ControlLink::Plaintext(addr) => {
                cmd.args(["--control-plane", &addr.to_string()]);
            }
            ControlLink::Mtls { addr, bundle } => {
                let token = config.token.as_deref().with_context(|| {
                    format!("remora-proxy {label} needs a bootstrap token for mTLS")
                })?;
                let token_file = dir.unique_file(&format!("proxy-{label}-token"), "txt");
                std::fs::write(&token_file, token)
                    .with_context(|| format!("writing {}", token_file.display()))?;
                cmd.args(["--control-plane", &addr.to_string()])
                    .arg("--ca-bundle")
                    .arg(bundle)
                    .arg("--token-file")
                    .arg(&token_file);
            }
        }
        // Flags say everything; a REMORA_* variable of the environment the
        // tests run in must not change what the proxy does.
        for var in [
            "REMORA_NODE_ID",
            "REMORA_CONTROL_PLANE",
            "REMORA_CA_ADDR",
            "REMORA_CA_BUNDLE",
            "REMORA_TOKEN_FILE",
            "REMORA_TRUST_DOMAIN",
            "REMORA_APP_ADDR",
            "REMORA_APP_PROTOCOL",
            "REMORA_LOG",
        ] {
            cmd.env_remove(var);
        }
        let mut child = Child::spawn(dir, &format!("proxy-{label}"), &mut cmd)?;
        let addrs = eventually(
            &format!("remora-proxy {label} writes its address file"),
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
        if config.app.is_some() && addrs.inbound.is_none() {
            bail!("remora-proxy {label} has --app-addr but reports no inbound listener");
        }
        Ok(Proxy {
            child,
            name: label,
            addrs,
            client: HttpClient::new(),
        })
    }

    /// The name it is known by in logs: its node id or service.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The outbound listener: where the application sends requests.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.addrs.outbound
    }

    /// The inbound listener: the address the mesh file names for this
    /// sidecar's endpoint.
    pub fn inbound_addr(&self) -> Result<SocketAddr> {
        self.addrs.inbound.ok_or_else(|| {
            anyhow!(
                "proxy {} has no inbound listener (no --app-addr)",
                self.name
            )
        })
    }

    /// The admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs.admin
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log (stderr).
    pub fn log_path(&self) -> &Path {
        self.child.log()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.child.log_tail(lines)
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.child.check_running()
    }

    /// How it exited; `None` while it runs.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_exited()
    }

    /// Its memory use now, and its peak.
    pub fn memory(&self) -> Result<Memory> {
        Memory::of(self.pid())
    }

    /// `GET path` on the admin port, any status.
    pub async fn admin_get_status(&self, path: &str) -> Result<(StatusCode, String)> {
        self.client.admin_get_status(self.addrs.admin, path).await
    }

    /// `GET path` on the admin port; fails unless 200.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        self.client.admin_get(self.addrs.admin, path).await
    }

    /// Waits (at most `timeout`) until `/ready` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let name = self.name.clone();
        eventually(
            &format!("proxy {name}'s /ready answers 200"),
            timeout,
            async || {
                self.child.check_running()?;
                let (status, body) = self.admin_get_status("/ready").await?;
                if status != StatusCode::OK {
                    bail!("GET /ready answered {status}: {}", body.trim());
                }
                Ok(())
            },
        )
        .await
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> Result<Metrics> {
        let text = self.admin_get("/metrics").await?;
        Metrics::parse(&text).with_context(|| format!("parsing proxy {}'s /metrics", self.name))
    }

    /// A metric's value (summed over the samples carrying `labels`), or
    /// `None` if no such sample is exposed.
    pub async fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        Ok(self.metrics().await?.value(name, labels))
    }

    /// A counter's value, 0 when not exposed yet.
    pub async fn counter(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(self.metric_value(name, labels).await?.unwrap_or(0.0))
    }

    /// `GET /config_dump` as JSON.
    pub async fn config_dump(&self) -> Result<serde_json::Value> {
        let text = self.admin_get("/config_dump").await?;
        serde_json::from_str(&text)
            .with_context(|| format!("proxy {}'s /config_dump is not JSON: {text}", self.name))
    }

    /// Every cluster of the compiled config and the addresses its members
    /// are reached at (the sidecar's, for endpoints that have one).
    pub async fn cluster_members(&self) -> Result<BTreeMap<String, BTreeSet<SocketAddr>>> {
        let dump = self.config_dump().await?;
        cluster_members(&dump)
            .with_context(|| format!("reading the clusters of proxy {}'s /config_dump", self.name))
    }

    /// Waits (at most `timeout`) until the members of every cluster whose
    /// name contains `cluster` are exactly `expected` (together).
    pub async fn wait_for_members(
        &self,
        cluster: &str,
        expected: &BTreeSet<SocketAddr>,
        timeout: Duration,
    ) -> Result<()> {
        eventually(
            &format!(
                "proxy {}'s clusters matching {cluster:?} have the members {expected:?}",
                self.name
            ),
            timeout,
            async || {
                let clusters = self.cluster_members().await?;
                let got: BTreeSet<SocketAddr> = clusters
                    .iter()
                    .filter(|(name, _)| name.contains(cluster))
                    .flat_map(|(_, members)| members.iter().copied())
                    .collect();
                if &got != expected {
                    bail!("members are {got:?}; every cluster: {clusters:?}");
                }
                Ok(())
            },
        )
        .await
    }

    /// The `xds` part of `/config_dump`: connection state and, per type,
    /// versions and the last NACK.
    pub async fn xds_status(&self) -> Result<serde_json::Value> {
        Ok(self.config_dump().await?["xds"].clone())
    }

    /// Stops it (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        self.child.stop();
    }
}

/// `config.clusters.<name>.members[].endpoint.key.{proxy,app}` of a
/// `/config_dump`.
fn cluster_members(dump: &serde_json::Value) -> Result<BTreeMap<String, BTreeSet<SocketAddr>>> {
    let clusters = dump["config"]["clusters"]
        .as_object()
        .ok_or_else(|| anyhow!("no config.clusters object in {dump}"))?;
    let mut out = BTreeMap::new();
    for (name, cluster) in clusters {
        let mut members = BTreeSet::new();
        for member in cluster["members"].as_array().into_iter().flatten() {
            let key = &member["endpoint"]["key"];
            let addr = key["proxy"]
                .as_str()
                .or_else(|| key["app"].as_str())
                .ok_or_else(|| anyhow!("cluster {name}: a member without an address: {member}"))?;
            members.insert(
                addr.parse()
                    .with_context(|| format!("cluster {name}: member address {addr:?}"))?,
            );
        }
        out.insert(name.clone(), members);
    }
    Ok(out)
}
