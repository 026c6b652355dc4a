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

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use remora_xds_proto::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, Node, config_source::ConfigSourceSpecifier,
};
use remora_xds_proto::pb::google::protobuf::{Any, Duration as PbDuration, Value, value::Kind};
use remora_xds_proto::{pack, type_url};
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use crate::model::{Mesh, Service, ServiceKey, ServicePort};

/// Node metadata key for the explicit outbound listener's address.
pub const META_OUTBOUND_LISTENER: &str = "REMORA_OUTBOUND_LISTENER";
/// Node metadata key naming the config generator; `grpc` selects the
/// proxyless gRPC view (Istio's convention).
pub const META_GENERATOR: &str = "GENERATOR";
/// Default address of the explicit outbound listener.
pub const DEFAULT_OUTBOUND_LISTENER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15001);
/// Name of the explicit outbound listener and its route configuration.
pub const OUTBOUND: &str = "outbound";

// === Views ===

/// The resource types served, in make-before-break push order: clusters,
/// then their endpoints, then listeners, then the routes listeners use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ResourceType {
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
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::Route,
    ];

    /// The type URL.
    pub fn type_url(self) -> &'static str {
        match self {
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

    /// `CDS`, `EDS`, `LDS`, `RDS`.
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
        let meta = |key: &str| -> Option<&str> {
            let fields = &node.metadata.as_ref()?.fields;
            match fields.get(key)?.kind.as_ref()? {
                Kind::StringValue(s) => Some(s.as_str()),
                _ => None,
            }
        };
        let flavor = if meta(META_GENERATOR) == Some("grpc") {
            Flavor::ProxylessGrpc
        } else {
            Flavor::Sidecar
        };
        let outbound_listener = match meta(META_OUTBOUND_LISTENER) {
            None => DEFAULT_OUTBOUND_LISTENER,
            Some(s) => s.parse().map_err(|e| NodeError {
                node: node.id.clone(),
                field: META_OUTBOUND_LISTENER,
                message: format!("{s:?} is not an ip:port socket address ({e})"),
            })?,
        };
        Ok(View {
            flavor,
            outbound_listener,
        })
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
}

/// All resources of one type in a view.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TypeResources {
    /// Hash over every resource name and version: the state-of-the-world
    /// version of this type.
    pub version: String,
    /// Resources by name.
    pub resources: BTreeMap<String, Resource>,
}

impl TypeResources {
    fn new(resources: Vec<Resource>) -> TypeResources {
        let resources: BTreeMap<String, Resource> =
            resources.into_iter().map(|r| (r.name.clone(), r)).collect();
        let mut hasher = Xxh3::new();
        for r in resources.values() {
            hasher.update(r.name.as_bytes());
            hasher.update(&[0]);
            hasher.update(r.version.as_bytes());
            hasher.update(&[0]);
        }
        TypeResources {
            version: format!("{:016x}", hasher.digest()),
            resources,
        }
    }
}

/// Everything one view of the mesh holds, per type.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    by_type: [TypeResources; 4],
}

impl Resources {
    /// The resources of `ty`.
    pub fn of(&self, ty: ResourceType) -> &TypeResources {
        &self.by_type[ty as usize]
    }
}

fn resource<M: prost::Message + prost::Name>(name: String, message: &M) -> Resource {
    let any = pack(message);
    // A stable hash: the same mesh gives the same versions after a restart,
    // so reconnecting clients are not sent changes that are not changes.
    // Messages must not contain maps with more than one entry, whose
    // encoding order would vary.
    let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&any.value));
    Resource { name, version, any }
}

/// Translates the mesh for one view.
pub fn translate(mesh: &Mesh, view: &View) -> Resources {
    let clusters = clusters::clusters(mesh, view.flavor)
        .into_iter()
        .map(|c| resource(c.name.clone(), &c))
        .collect();
    let endpoints = endpoints::load_assignments(mesh)
        .into_iter()
        .map(|c| resource(c.cluster_name.clone(), &c))
        .collect();
    let listeners = listeners::listeners(mesh, view)
        .into_iter()
        .map(|l| resource(l.name.clone(), &l))
        .collect();
    let routes = routes::route_configurations(mesh, view.flavor)
        .into_iter()
        .map(|r| resource(r.name.clone(), &r))
        .collect();
    Resources {
        by_type: [
            TypeResources::new(clusters),
            TypeResources::new(endpoints),
            TypeResources::new(listeners),
            TypeResources::new(routes),
        ],
    }
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
