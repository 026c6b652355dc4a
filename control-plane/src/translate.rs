//! Turns the mesh model into standard Envoy v3 resources.
//!
//! What a client receives depends only on its [`View`], derived from its
//! node descriptor: a sidecar (Envoy or Remora) gets bound listeners and
//! Envoy-flavoured routes; a proxyless gRPC client gets `api_listener`s named
//! after its targets and routes restricted to what gRPC honours. Every client
//! with the same view receives byte-identical resources, so a view is
//! translated once per mesh change however many clients share it.
//!
//! Names follow Istio's conventions so that operators' habits carry over:
//! clusters `outbound|PORT|SUBSET|FQDN`, per-port route configurations named
//! after the port, per-port listeners `0.0.0.0_PORT`.

mod clusters;
mod endpoints;
mod listeners;
mod routes;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use bytes::{Bytes, BytesMut};

use remora_xds_proto::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, Node, config_source::ConfigSourceSpecifier,
};
use remora_xds_proto::pb::google::protobuf::{Any, Duration as PbDuration, Value, value::Kind};
use remora_xds_proto::{pack, type_url};
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use crate::model::{Mesh, Service, ServiceKey, ServicePort};

pub use tls::{SECRET_DEFAULT, SECRET_ROOTCA};

/// Node metadata key for the explicit outbound listener's address.
pub const META_OUTBOUND_LISTENER: &str = "REMORA_OUTBOUND_LISTENER";
/// Node metadata key naming the config generator; `grpc` selects the
/// proxyless gRPC view (Istio's convention).
pub const META_GENERATOR: &str = "GENERATOR";
/// Node metadata key for the address a sidecar binds its inbound listener
/// at (`ip:port`); with it, the node is sent the [`INBOUND`] listener.
pub const META_INBOUND_LISTENER: &str = "REMORA_INBOUND_LISTENER";
/// Node metadata key for the local application's address (`ip:port`), for
/// sidecars (a stock Envoy) that learn it from the control plane: with it,
/// the node is sent the STATIC cluster [`INBOUND_APP_CLUSTER`].
pub const META_APP_ADDRESS: &str = "REMORA_APP_ADDRESS";
/// Node metadata key for the local application's protocol: `http`
/// (HTTP/1.1, the default), `http2` or `grpc` (HTTP/2).
pub const META_APP_PROTOCOL: &str = "REMORA_APP_PROTOCOL";
/// Node metadata key for the node's namespace (Istio's convention); with
/// `node.cluster` (the service name) it names the node's service, and with
/// [`META_SERVICE_ACCOUNT`] its identity. Default `default`.
pub const META_NAMESPACE: &str = "NAMESPACE";
/// Node metadata key for the node's service account (Istio's convention).
pub const META_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
/// Node metadata key for the workload's bootstrap token (see the mesh
/// file's `workload_tokens`), with which a node that cannot make a CSR
/// (a stock Envoy) is sent its certificate over SDS. Never logged.
pub const META_TOKEN: &str = "REMORA_TOKEN";
/// Name of a sidecar's inbound listener.
pub const INBOUND: &str = "inbound";
/// Name of the cluster a sidecar's inbound listener sends requests to: the
/// local application.
pub const INBOUND_APP_CLUSTER: &str = "inbound|app";
/// Default address of the explicit outbound listener.
pub const DEFAULT_OUTBOUND_LISTENER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15001);
/// Name of the explicit outbound listener and its route configuration.
pub const OUTBOUND: &str = "outbound";

// === Views ===

/// The resource types served, in make-before-break push order: secrets
/// (clusters and listeners wait for theirs), clusters, then their
/// endpoints, then listeners, then the routes listeners use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ResourceType {
    /// SDS. Not part of a view: secrets are per client (see
    /// `xds::secrets`).
    Secret,
    /// CDS.
    Cluster,
    /// EDS.
    Endpoint,
    /// LDS.
    Listener,
    /// RDS.
    Route,
}

impl ResourceType {
    /// All types in push order.
    pub const ALL: [ResourceType; 5] = [
        ResourceType::Secret,
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::Route,
    ];

    /// The type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Secret => type_url::SECRET,
            ResourceType::Cluster => type_url::CLUSTER,
            ResourceType::Endpoint => type_url::ENDPOINT,
            ResourceType::Listener => type_url::LISTENER,
            ResourceType::Route => type_url::ROUTE,
        }
    }

    /// The type for a type URL, if served.
    pub fn from_type_url(url: &str) -> Option<ResourceType> {
        ResourceType::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// `SDS`, `CDS`, `EDS`, `LDS`, `RDS`.
    pub fn short_name(self) -> &'static str {
        type_url::short_name(self.type_url())
    }

    /// True when an empty subscription means "everything" (LDS and CDS).
    pub fn wildcard_by_default(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// Which family of configuration a client needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    /// A sidecar proxy (Envoy or remora-proxy): bound listeners.
    Sidecar,
    /// A proxyless gRPC client: `api_listener`s, gRPC-compatible routes.
    ProxylessGrpc,
}

/// Everything about a client that changes what it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct View {
    /// Configuration family.
    pub flavor: Flavor,
    /// Where a sidecar binds its explicit outbound listener.
    pub outbound_listener: SocketAddr,
    /// A sidecar's inbound side, when its node names an inbound listener.
    pub inbound: Option<InboundView>,
}

/// What a sidecar's inbound listener depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct InboundView {
    /// Where the listener is bound ([`META_INBOUND_LISTENER`]).
    pub listener: SocketAddr,
    /// The node's service: `node.cluster` in namespace [`META_NAMESPACE`].
    /// Its `mtls` mode decides whether plaintext is accepted; a service
    /// the mesh does not know is STRICT.
    pub service: ServiceKey,
    /// The local application, when the control plane is to send the
    /// cluster that reaches it ([`META_APP_ADDRESS`]).
    pub app: Option<AppView>,
}

/// The local application behind a sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct AppView {
    /// Its address ([`META_APP_ADDRESS`]).
    pub address: SocketAddr,
    /// True when it speaks HTTP/2 ([`META_APP_PROTOCOL`] `http2` or `grpc`).
    pub http2: bool,
}

/// Why a node descriptor cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {node:?}: metadata field {field}: {message}")]
pub struct NodeError {
    node: String,
    field: &'static str,
    message: String,
}

impl View {
    /// The view a node asks for through its metadata.
    pub fn for_node(node: &Node) -> Result<View, NodeError> {
        let meta = |key: &str| node_metadata(node, key);
        let flavor = if meta(META_GENERATOR) == Some("grpc") {
            Flavor::ProxylessGrpc
        } else {
            Flavor::Sidecar
        };
        let address = |field: &'static str| -> Result<Option<SocketAddr>, NodeError> {
            meta(field)
                .map(|s| {
                    s.parse().map_err(|e| NodeError {
                        node: node.id.clone(),
                        field,
                        message: format!("{s:?} is not an ip:port socket address ({e})"),
                    })
                })
                .transpose()
        };
        let outbound_listener =
            address(META_OUTBOUND_LISTENER)?.unwrap_or(DEFAULT_OUTBOUND_LISTENER);
        let inbound = match (flavor, address(META_INBOUND_LISTENER)?) {
            (Flavor::Sidecar, Some(listener)) => {
                let app = match address(META_APP_ADDRESS)? {
                    None => None,
                    Some(address) => {
                        let http2 = match meta(META_APP_PROTOCOL) {
                            None | Some("http") => false,
                            Some("http2" | "grpc") => true,
                            Some(other) => {
                                return Err(NodeError {
                                    node: node.id.clone(),
                                    field: META_APP_PROTOCOL,
                                    message: format!(
                                        "{other:?} is not an application protocol \
                                         (http, http2 or grpc)"
                                    ),
                                });
                            }
                        };
                        Some(AppView { address, http2 })
                    }
                };
                Some(InboundView {
                    listener,
                    service: ServiceKey {
                        namespace: meta(META_NAMESPACE).unwrap_or("default").to_string(),
                        name: node.cluster.clone(),
                    },
                    app,
                })
            }
            _ => None,
        };
        Ok(View {
            flavor,
            outbound_listener,
            inbound,
        })
    }

    /// A sidecar view with no inbound listener.
    pub fn sidecar(outbound_listener: SocketAddr) -> View {
        View {
            flavor: Flavor::Sidecar,
            outbound_listener,
            inbound: None,
        }
    }
}

/// A string field of a node's metadata.
pub fn node_metadata<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    match node.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.as_str()),
        _ => None,
    }
}

/// What kind of program a client is, for metrics and the sync status.
pub fn client_kind(node: &Node) -> &'static str {
    let grpc_generator = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(META_GENERATOR))
        .is_some_and(|v| matches!(&v.kind, Some(Kind::StringValue(s)) if s == "grpc"));
    if grpc_generator || node.user_agent_name.to_ascii_lowercase().contains("grpc") {
        "grpc"
    } else if node.user_agent_name == "remora-proxy" {
        "remora"
    } else {
        "envoy"
    }
}

// === Resources ===

/// One resource, packed, with a version that changes exactly when its bytes
/// do.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// Resource name.
    pub name: String,
    /// Content hash.
    pub version: String,
    /// The packed message.
    pub any: Any,
    /// The resource as a state-of-the-world response carries it (field 2,
    /// `resources`: tag, length, packed message), encoded once and shared
    /// by every response that sends it.
    pub encoded: Bytes,
}

/// A field number of `DiscoveryResponse`: `repeated Any resources = 2`.
const RESPONSE_RESOURCES_FIELD: u32 = 2;

/// Resources of one type that many views share, with their encoding in a
/// response computed on first use.
#[derive(Debug, Default)]
pub struct ResourceSet {
    version: String,
    resources: BTreeMap<String, Resource>,
    all: OnceLock<Batch>,
    /// The last [`ResourceSet::changed_since`] answer: every stream that
    /// held the same older set asks the same question after a change.
    changed: Mutex<Option<(Weak<ResourceSet>, Arc<Batch>)>>,
}

impl PartialEq for ResourceSet {
    fn eq(&self, other: &ResourceSet) -> bool {
        self.resources == other.resources
    }
}

impl ResourceSet {
    /// A set of `resources`, versioned by their names and versions.
    pub fn new(resources: Vec<Resource>) -> ResourceSet {
        let resources: BTreeMap<String, Resource> =
            resources.into_iter().map(|r| (r.name.clone(), r)).collect();
        let mut hasher = Xxh3::new();
        hash_resources(&mut hasher, resources.values());
        ResourceSet {
            version: format!("{:016x}", hasher.digest()),
            resources,
            all: OnceLock::new(),
            changed: Mutex::new(None),
        }
    }

    /// Every resource.
    pub fn iter(&self) -> impl Iterator<Item = &Resource> {
        self.resources.values()
    }

    /// How many resources.
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// The resource `name`.
    pub fn get(&self, name: &str) -> Option<&Resource> {
        self.resources.get(name)
    }

    /// Every resource, as one batch.
    pub fn all(&self) -> &Batch {
        self.all.get_or_init(|| Batch::new(self.resources.values()))
    }

    /// The resources that are new or different from those in `old`, as one
    /// batch, made once per `old`.
    pub fn changed_since(&self, old: &Arc<ResourceSet>) -> Arc<Batch> {
        let mut cache = self.changed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, batch)) = cache.as_ref()
            && Weak::ptr_eq(seen, &Arc::downgrade(old))
        {
            return batch.clone();
        }
        let batch =
            Arc::new(Batch::new(self.resources.values().filter(|r| {
                old.get(&r.name).is_none_or(|o| o.version != r.version)
            })));
        *cache = Some((Arc::downgrade(old), batch.clone()));
        batch
    }
}

/// Resources that many clients are sent together: their names, and their
/// encoding in a response (the concatenation of their
/// [`Resource::encoded`]) in one buffer for every client.
#[derive(Debug, Default)]
pub struct Batch {
    names: Vec<String>,
    encoded: Bytes,
    /// The last subscription asked about, and whether it names them all:
    /// subscriptions are interned, so thousands of streams ask about the
    /// same one.
    covered: Mutex<Option<(Weak<BTreeSet<String>>, bool)>>,
}

impl Batch {
    fn new<'a>(resources: impl Iterator<Item = &'a Resource> + Clone) -> Batch {
        let len = resources.clone().map(|r| r.encoded.len()).sum();
        let mut encoded = BytesMut::with_capacity(len);
        let mut names = Vec::new();
        for r in resources {
            encoded.extend_from_slice(&r.encoded);
            names.push(r.name.clone());
        }
        Batch {
            names,
            encoded: encoded.freeze(),
            covered: Mutex::new(None),
        }
    }

    /// The resources' names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// How many resources.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// All of them, encoded.
    pub fn encoded(&self) -> Bytes {
        self.encoded.clone()
    }

    /// True when `subscribed` names every resource of the batch.
    pub fn covered_by(&self, subscribed: &Arc<BTreeSet<String>>) -> bool {
        let mut cache = self.covered.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, covered)) = cache.as_ref()
            && Weak::ptr_eq(seen, &Arc::downgrade(subscribed))
        {
            return *covered;
        }
        let covered = self.names.iter().all(|n| subscribed.contains(n));
        *cache = Some((Arc::downgrade(subscribed), covered));
        covered
    }
}

fn hash_resources<'a>(hasher: &mut Xxh3, resources: impl Iterator<Item = &'a Resource>) {
    for r in resources {
        hasher.update(r.name.as_bytes());
        hasher.update(&[0]);
        hasher.update(r.version.as_bytes());
        hasher.update(&[0]);
    }
}

/// All resources of one type in a view: a [`ResourceSet`] shared with
/// other views, plus the view's own resources (names never in both).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TypeResources {
    /// Hash over every resource name and version: the state-of-the-world
    /// version of this type.
    pub version: String,
    shared: Arc<ResourceSet>,
    own: BTreeMap<String, Resource>,
}

impl TypeResources {
    /// Resources of one type, none shared.
    pub fn new(resources: Vec<Resource>) -> TypeResources {
        TypeResources::layered(Arc::default(), resources)
    }

    /// The resources of `shared` plus `own`.
    pub fn layered(shared: Arc<ResourceSet>, own: Vec<Resource>) -> TypeResources {
        let own: BTreeMap<String, Resource> = own
            .into_iter()
            .filter(|r| {
                debug_assert!(shared.get(&r.name).is_none(), "{} is shared", r.name);
                shared.get(&r.name).is_none()
            })
            .map(|r| (r.name.clone(), r))
            .collect();
        let version = if own.is_empty() {
            shared.version.clone()
        } else {
            let mut hasher = Xxh3::new();
            hasher.update(shared.version.as_bytes());
            hasher.update(&[0]);
            hash_resources(&mut hasher, own.values());
            format!("{:016x}", hasher.digest())
        };
        TypeResources {
            version,
            shared,
            own,
        }
    }

    /// The resource `name`.
    pub fn get(&self, name: &str) -> Option<&Resource> {
        self.own.get(name).or_else(|| self.shared.get(name))
    }

    /// True when `name` is one of them.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every resource: the shared ones, then the view's own.
    pub fn iter(&self) -> impl Iterator<Item = &Resource> {
        self.shared.resources.values().chain(self.own.values())
    }

    /// Every resource name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|r| r.name.as_str())
    }

    /// How many resources.
    pub fn len(&self) -> usize {
        self.shared.len() + self.own.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The part shared with other views.
    pub fn shared(&self) -> &ResourceSet {
        &self.shared
    }

    /// The view's own resources.
    pub fn own(&self) -> impl Iterator<Item = &Resource> {
        self.own.values()
    }

    /// The resources that are new or different from those in `old`: the
    /// shared ones as a batch (None when the shared part is the same), and
    /// the view's own.
    pub fn changed_since<'a>(
        &'a self,
        old: &'a TypeResources,
    ) -> (Option<Arc<Batch>>, impl Iterator<Item = &'a Resource>) {
        let shared = (!Arc::ptr_eq(&self.shared, &old.shared))
            .then(|| self.shared.changed_since(&old.shared));
        let own = self
            .own
            .values()
            .filter(|r| old.get(&r.name).is_none_or(|o| o.version != r.version));
        (shared, own)
    }
}

/// Everything one view of the mesh holds, per type.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    by_type: [TypeResources; 5],
}

impl Resources {
    /// The resources of `ty` (none for [`ResourceType::Secret`]: secrets
    /// are per client).
    pub fn of(&self, ty: ResourceType) -> &TypeResources {
        &self.by_type[ty as usize]
    }
}

/// Packs `message` as the resource `name`, versioned by a hash of its
/// encoding.
pub fn resource<M: prost::Message + prost::Name>(name: String, message: &M) -> Resource {
    let any = pack(message);
    // A stable hash: the same mesh gives the same versions after a restart,
    // so reconnecting clients are not sent changes that are not changes.
    // Messages must not contain maps with more than one entry, whose
    // encoding order would vary, unless built to iterate in a fixed order
    // (`tls::endpoint_filter_metadata`).
    let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&any.value));
    let mut encoded = BytesMut::with_capacity(prost::encoding::message::encoded_len(
        RESPONSE_RESOURCES_FIELD,
        &any,
    ));
    prost::encoding::message::encode(RESPONSE_RESOURCES_FIELD, &any, &mut encoded);
    Resource {
        name,
        version,
        any,
        encoded: encoded.freeze(),
    }
}

/// The part of a translation that every view of one flavor shares: all of
/// it but the listeners bound where a node asks and the cluster of its
/// local application. Translated once per mesh change and flavor, however
/// many views there are.
#[derive(Debug)]
pub struct Shared {
    flavor: Flavor,
    by_type: [Arc<ResourceSet>; 5],
}

/// Translates what every view of `flavor` shares.
pub fn translate_shared(mesh: &Mesh, flavor: Flavor) -> Shared {
    let set = |resources: Vec<Resource>| Arc::new(ResourceSet::new(resources));
    let clusters = clusters::clusters(mesh, flavor)
        .into_iter()
        .map(|c| resource(c.name.clone(), &c))
        .collect();
    let endpoints = endpoints::load_assignments(mesh)
        .into_iter()
        .map(|c| resource(c.cluster_name.clone(), &c))
        .collect();
    let listeners = listeners::shared_listeners(mesh, flavor)
        .into_iter()
        .map(|l| resource(l.name.clone(), &l))
        .collect();
    let routes = routes::route_configurations(mesh, flavor)
        .into_iter()
        .map(|r| resource(r.name.clone(), &r))
        .collect();
    Shared {
        flavor,
        by_type: [
            Arc::default(),
            set(clusters),
            set(endpoints),
            set(listeners),
            set(routes),
        ],
    }
}

/// Translates `view` on top of what its flavor shares.
pub fn translate_view(mesh: &Mesh, shared: &Shared, view: &View) -> Resources {
    debug_assert_eq!(shared.flavor, view.flavor);
    let clusters = clusters::view_clusters(view)
        .into_iter()
        .map(|c| resource(c.name.clone(), &c))
        .collect();
    let listeners = listeners::view_listeners(mesh, view)
        .into_iter()
        .map(|l| resource(l.name.clone(), &l))
        .collect();
    let layer = |ty: ResourceType, own: Vec<Resource>| {
        TypeResources::layered(shared.by_type[ty as usize].clone(), own)
    };
    Resources {
        by_type: [
            TypeResources::default(),
            layer(ResourceType::Cluster, clusters),
            layer(ResourceType::Endpoint, Vec::new()),
            layer(ResourceType::Listener, listeners),
            layer(ResourceType::Route, Vec::new()),
        ],
    }
}

/// Translates the mesh for one view.
pub fn translate(mesh: &Mesh, view: &View) -> Resources {
    translate_view(mesh, &translate_shared(mesh, view.flavor), view)
}

// === Shared naming and helpers ===

/// `outbound|PORT|SUBSET|FQDN`, Istio's cluster name.
pub fn cluster_name(service: &ServiceKey, port: u16, subset: Option<&str>) -> String {
    format!(
        "outbound|{port}|{}|{}",
        subset.unwrap_or(""),
        service.fqdn()
    )
}

/// Every cluster of the mesh: one per service port and subset, with the
/// subset's name (`None` for the whole service).
fn all_clusters(mesh: &Mesh) -> impl Iterator<Item = (&Service, &ServicePort, Option<&str>)> {
    mesh.services().iter().flat_map(|service| {
        service.ports.iter().flat_map(move |port| {
            std::iter::once(None)
                .chain(service.subsets.iter().map(|s| Some(s.name.as_str())))
                .map(move |subset| (service, port, subset))
        })
    })
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn duration(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn string_value(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

#[cfg(test)]
mod tests;
