//! Envoy resources in, a compiled [`Config`] out.
//!
//! Each resource is validated and compiled on its own into a small
//! intermediate (a `*Spec`): names still unresolved, matchers and regexes
//! already built. A resource that uses something the proxy does not
//! implement, and that would change behaviour if ignored, is rejected with a
//! message naming the resource, the field path and the reason; the other
//! resources of the same response still apply. Fields that change nothing
//! (names, stat prefixes, decorators, unrelated metadata) are ignored. The
//! accepted subset is `docs/xds-support.md`, section "Proxy: what
//! remora-proxy accepts".
//!
//! [`Compiler::build`] then assembles a [`Config`] from the latest specs of
//! every type, resolving cluster names and taking long-lived things
//! (endpoints, balancers, budgets, clients) from [`State`], so a response of
//! one type recompiles only that type's resources and the assembly is cheap.
//!
//! A route naming a cluster that does not exist is not an error (Envoy
//! answers such requests 503 and so do we): the destination is left out of
//! [`RouteAction::backends`] while its weight stays in
//! [`RouteAction::total_weight`], so a pick that lands on it finds nothing
//! and the data path answers `cluster_not_found`.

mod cluster;
mod endpoint;
mod listener;
mod route;
mod secret;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use remora_xds_proto::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use remora_xds_proto::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use remora_xds_proto::pb::envoy::config::listener::v3::Listener;
use remora_xds_proto::pb::envoy::config::route::v3::RouteConfiguration;
use remora_xds_proto::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use remora_xds_proto::pb::google::protobuf::{Any, Duration as PbDuration};
use remora_xds_proto::{type_url, unpack};

use super::{
    Cluster, Config, EndpointKey, Intercepted, Member, RetryPolicy, Route, RouteAction, RouteTable,
    State, VirtualHost, WeightedCluster,
};
use crate::http::retry::RetryBudget;
use crate::metrics::Direction;

use cluster::ClusterSpec;
use endpoint::AssignmentSpec;
use listener::ListenerSpec;
use route::RouteTableSpec;
pub use secret::ROOTCA;
use secret::SecretSpec;

/// Name of the explicit outbound listener, whose route table the proxy
/// serves.
pub const OUTBOUND_LISTENER: &str = "outbound";
/// Name of the listener that says what the inbound port accepts.
pub const INBOUND_LISTENER: &str = "inbound";

// === Resource kinds ===

/// The xDS resource types the proxy consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// LDS: `Listener`.
    Listener,
    /// RDS: `RouteConfiguration`.
    Route,
    /// CDS: `Cluster`.
    Cluster,
    /// EDS: `ClusterLoadAssignment`.
    Endpoint,
    /// SDS: `Secret` (only the trust bundle, `ROOTCA`).
    Secret,
}

impl ResourceKind {
    /// Every kind, in the order a first subscription asks for them.
    pub const ALL: [ResourceKind; 5] = [
        ResourceKind::Listener,
        ResourceKind::Route,
        ResourceKind::Cluster,
        ResourceKind::Endpoint,
        ResourceKind::Secret,
    ];

    /// The type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceKind::Listener => type_url::LISTENER,
            ResourceKind::Route => type_url::ROUTE,
            ResourceKind::Cluster => type_url::CLUSTER,
            ResourceKind::Endpoint => type_url::ENDPOINT,
            ResourceKind::Secret => type_url::SECRET,
        }
    }

    /// The kind of a type URL, if the proxy consumes it.
    pub fn from_type_url(url: &str) -> Option<ResourceKind> {
        ResourceKind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// `LDS`, `RDS`, `CDS` or `EDS`.
    pub fn short_name(self) -> &'static str {
        type_url::short_name(self.type_url())
    }

    /// The message name, as error messages name a resource.
    pub fn message_name(self) -> &'static str {
        match self {
            ResourceKind::Listener => "Listener",
            ResourceKind::Route => "RouteConfiguration",
            ResourceKind::Cluster => "Cluster",
            ResourceKind::Endpoint => "ClusterLoadAssignment",
            ResourceKind::Secret => "Secret",
        }
    }

    /// True when a response carries the whole set (LDS, CDS): names left
    /// out are removed. RDS and EDS responses carry what they have of the
    /// subscribed names.
    pub fn is_state_of_the_world(self) -> bool {
        matches!(self, ResourceKind::Listener | ResourceKind::Cluster)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

// === Errors ===

/// Why one resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {resource}: {detail}", kind = .kind.message_name())]
pub struct ResourceError {
    /// The resource's type.
    pub kind: ResourceKind,
    /// `"name"`, or `resources[i]` when the resource could not be decoded.
    pub resource: String,
    /// Field path and reason.
    pub detail: String,
}

/// A problem inside one resource: where, and why. Paths are built from the
/// leaf up with [`Invalid::within`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Invalid {
    path: String,
    reason: String,
}

impl Invalid {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A field the proxy does not implement.
    fn unsupported(path: impl Into<String>) -> Invalid {
        Invalid::new(path, "is not supported")
    }

    /// Prefixes the path: `within("retry_policy.")`, or
    /// `within("routes[2] \"split\": ")` for a named element.
    fn within(mut self, prefix: &str) -> Invalid {
        self.path.insert_str(0, prefix);
        self
    }

    fn detail(&self) -> String {
        // A problem with a whole element leaves its prefix's separator.
        let path = self.path.trim_end_matches(": ").trim_end_matches('.');
        if path.is_empty() {
            self.reason.clone()
        } else {
            format!("{path}: {}", self.reason)
        }
    }
}

type Result<T> = std::result::Result<T, Invalid>;

/// Rejects `field` when it is set.
fn reject_if(set: bool, field: &str) -> Result<()> {
    if set {
        Err(Invalid::unsupported(field))
    } else {
        Ok(())
    }
}

/// The path prefix of a list element, with its name when it has one:
/// `routes[2] "split": `.
fn element(list: &str, index: usize, name: &str) -> String {
    if name.is_empty() {
        format!("{list}[{index}]: ")
    } else {
        format!("{list}[{index}] {name:?}: ")
    }
}

/// A protobuf duration, checked.
fn duration(d: &PbDuration, field: &str) -> Result<std::time::Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Invalid::new(
            field,
            format!(
                "{}s {}ns is not a valid non-negative duration",
                d.seconds, d.nanos
            ),
        ));
    }
    Ok(std::time::Duration::new(
        d.seconds.unsigned_abs(),
        d.nanos.unsigned_abs(),
    ))
}

// === The compiler ===

/// One compiled resource and the bytes it came from, so an unchanged
/// resource in a later response is not compiled again.
#[derive(Debug)]
struct Entry<T> {
    bytes: Vec<u8>,
    spec: Arc<T>,
}

/// The compiled form of everything accepted so far, per type, and the
/// accepted versions. Fed one response at a time by the xDS client.
#[derive(Debug, Default)]
pub struct Compiler {
    listeners: BTreeMap<String, Entry<ListenerSpec>>,
    routes: BTreeMap<String, Entry<RouteTableSpec>>,
    clusters: BTreeMap<String, Entry<ClusterSpec>>,
    assignments: BTreeMap<String, Entry<AssignmentSpec>>,
    secrets: BTreeMap<String, Entry<SecretSpec>>,
    versions: BTreeMap<ResourceKind, String>,
}

/// What applying one response did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Resources rejected; empty means the response is accepted whole.
    pub errors: Vec<ResourceError>,
    /// Names added, changed or removed.
    pub changed: bool,
}

impl Compiler {
    /// An empty compiler.
    pub fn new() -> Compiler {
        Compiler::default()
    }

    /// The last version accepted whole for `kind`.
    pub fn version(&self, kind: ResourceKind) -> Option<&str> {
        self.versions.get(&kind).map(String::as_str)
    }

    /// Applies one response of `kind`. LDS and CDS responses are the whole
    /// set: names left out are removed. RDS and EDS responses update the
    /// names they carry; names outside `subscribed` are ignored. A rejected
    /// resource keeps its previously accepted form, if any; the others
    /// apply. The version is recorded only when nothing was rejected.
    pub fn apply(
        &mut self,
        kind: ResourceKind,
        version: &str,
        resources: &[Any],
        subscribed: &BTreeSet<String>,
    ) -> Applied {
        let mut applied = match kind {
            ResourceKind::Listener => apply_type(
                &mut self.listeners,
                kind,
                resources,
                None,
                |l: &Listener| l.name.clone(),
                listener::compile,
            ),
            ResourceKind::Route => apply_type(
                &mut self.routes,
                kind,
                resources,
                Some(subscribed),
                |r: &RouteConfiguration| r.name.clone(),
                route::compile,
            ),
            ResourceKind::Cluster => apply_type(
                &mut self.clusters,
                kind,
                resources,
                None,
                |c: &PbCluster| c.name.clone(),
                cluster::compile,
            ),
            ResourceKind::Endpoint => apply_type(
                &mut self.assignments,
                kind,
                resources,
                Some(subscribed),
                |c: &ClusterLoadAssignment| c.cluster_name.clone(),
                endpoint::compile,
            ),
            ResourceKind::Secret => apply_type(
                &mut self.secrets,
                kind,
                resources,
                Some(subscribed),
                |s: &Secret| s.name.clone(),
                secret::compile,
            ),
        };
        if applied.errors.is_empty() && self.version(kind) != Some(version) {
            self.versions.insert(kind, version.to_string());
            applied.changed = true;
        }
        applied
    }

    /// Forgets RDS or EDS resources no longer subscribed (their listener
    /// or cluster went away). Returns true when something was dropped.
    pub fn retain(&mut self, kind: ResourceKind, subscribed: &BTreeSet<String>) -> bool {
        fn keep<T>(map: &mut BTreeMap<String, Entry<T>>, names: &BTreeSet<String>) -> bool {
            let before = map.len();
            map.retain(|name, _| names.contains(name));
            map.len() != before
        }
        match kind {
            ResourceKind::Route => keep(&mut self.routes, subscribed),
            ResourceKind::Endpoint => keep(&mut self.assignments, subscribed),
            ResourceKind::Secret => keep(&mut self.secrets, subscribed),
            ResourceKind::Listener | ResourceKind::Cluster => false,
        }
    }

    /// The route configurations the listeners need (RDS subscription):
    /// the explicit outbound listener's and the per-port ones intercepted
    /// HTTP uses.
    pub fn route_names(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .filter_map(|l| l.spec.route_config.clone())
            .collect()
    }

    /// The assignments the clusters need (EDS subscription).
    pub fn endpoint_names(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .filter(|c| c.spec.dns.is_none())
            .map(|c| c.spec.eds_name.clone())
            .collect()
    }

    /// Assembles a [`Config`] from the latest specs, and says whether it is
    /// complete: the outbound listener, its route table, every cluster the
    /// table names and every cluster's endpoints have arrived.
    pub fn build(&self, state: &State) -> (Config, bool) {
        let clusters: BTreeMap<String, Arc<Cluster>> = self
            .clusters
            .iter()
            .map(|(name, entry)| {
                let assignment = self.assignments.get(&entry.spec.eds_name);
                let cluster = build_cluster(
                    state,
                    name,
                    &entry.spec,
                    assignment.map(|a| a.spec.as_ref()),
                );
                (name.clone(), Arc::new(cluster))
            })
            .collect();
        let all_endpoints = self
            .clusters
            .values()
            .all(|c| c.spec.dns.is_some() || self.assignments.contains_key(&c.spec.eds_name));

        let table = self
            .listeners
            .get(OUTBOUND_LISTENER)
            .and_then(|l| l.spec.route_config.as_ref())
            .and_then(|name| self.routes.get(name));
        let (outbound, all_clusters) = match table {
            None => (None, false),
            Some(entry) => {
                let all = entry
                    .spec
                    .cluster_names()
                    .all(|name| clusters.contains_key(name));
                (
                    Some(Arc::new(build_table(state, &entry.spec, &clusters))),
                    all,
                )
            }
        };
        let complete = outbound.is_some() && all_clusters && all_endpoints;
        let intercepted = self.build_intercepted(state, &clusters);
        let config = Config {
            versions: self
                .versions
                .iter()
                .map(|(kind, v)| (kind.short_name(), v.clone()))
                .collect(),
            outbound,
            clusters,
            inbound_mode: self
                .listeners
                .get(INBOUND_LISTENER)
                .and_then(|l| l.spec.inbound_mode)
                .unwrap_or_default(),
            trust_bundle_pem: self
                .secrets
                .get(ROOTCA)
                .map(|s| Arc::clone(&s.spec.roots_pem)),
            intercepted,
        };
        (config, complete)
    }

    /// Where intercepted connections go: per-port route tables, the
    /// virtual IPs of HTTP services (the `IP:PORT` domains of those tables)
    /// and of TCP services, and every known endpoint address.
    fn build_intercepted(
        &self,
        state: &State,
        clusters: &BTreeMap<String, Arc<Cluster>>,
    ) -> Intercepted {
        let mut intercepted = Intercepted::default();
        for listener in self.listeners.values() {
            let spec = &listener.spec;
            if let Some(block) = spec.block_unknown {
                intercepted.block_unknown = block;
            }
            if let (Some(port), Some(name)) = (spec.port_table, &spec.route_config)
                && let Some(entry) = self.routes.get(name)
            {
                let table = build_table(state, &entry.spec, clusters);
                intercepted.http_vips.extend(
                    table
                        .domains
                        .keys()
                        .filter_map(|d| d.parse::<SocketAddr>().ok())
                        .filter(|a| a.port() == port),
                );
                intercepted.ports.insert(port, Arc::new(table));
            }
            if let Some((addr, cluster)) = &spec.tcp_vip
                && let Some(cluster) = clusters.get(cluster)
            {
                intercepted.tcp_vips.insert(*addr, Arc::clone(cluster));
                intercepted.tcp_clusters.insert(cluster.name.clone());
            }
        }
        // Subset-less clusters (`outbound|PORT||FQDN`) first, so an endpoint
        // maps to its service's whole cluster when it has one.
        let mut ordered: Vec<&Arc<Cluster>> = clusters.values().collect();
        ordered.sort_by_key(|c| !c.name.contains("||"));
        for cluster in ordered {
            for member in &cluster.members {
                intercepted
                    .endpoints
                    .entry(member.endpoint.key.app)
                    .or_insert_with(|| (Arc::clone(cluster), Arc::clone(&member.endpoint)));
            }
        }
        intercepted
    }
}

/// Decodes and compiles every resource of one response into `map`.
fn apply_type<M, T>(
    map: &mut BTreeMap<String, Entry<T>>,
    kind: ResourceKind,
    resources: &[Any],
    subscribed: Option<&BTreeSet<String>>,
    name_of: impl Fn(&M) -> String,
    compile: impl Fn(&M) -> Result<T>,
) -> Applied
where
    M: prost::Message + prost::Name + Default,
{
    let mut errors = Vec::new();
    let mut next: BTreeMap<String, Entry<T>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut changed = false;
    for (index, any) in resources.iter().enumerate() {
        let message: M = match unpack(any) {
            Ok(m) => m,
            Err(e) => {
                errors.push(ResourceError {
                    kind,
                    resource: format!("resources[{index}]"),
                    detail: e.to_string(),
                });
                continue;
            }
        };
        let name = name_of(&message);
        let error = |detail: String| ResourceError {
            kind,
            resource: format!("{name:?}"),
            detail,
        };
        if name.is_empty() {
            errors.push(ResourceError {
                kind,
                resource: format!("resources[{index}]"),
                detail: "has no name".to_string(),
            });
            continue;
        }
        if subscribed.is_some_and(|s| !s.contains(&name)) {
            continue;
        }
        if !seen.insert(name.clone()) {
            errors.push(error("appears twice in one response".to_string()));
            continue;
        }
        if let Some(old) = map.remove(&name) {
            if old.bytes == any.value {
                next.insert(name, old);
                continue;
            }
            // Put it back: a rejected update keeps the accepted form.
            map.insert(name.clone(), old);
        }
        match compile(&message) {
            Ok(spec) => {
                map.remove(&name);
                changed = true;
                next.insert(
                    name,
                    Entry {
                        bytes: any.value.clone(),
                        spec: Arc::new(spec),
                    },
                );
            }
            Err(invalid) => errors.push(error(invalid.detail())),
        }
    }
    if kind.is_state_of_the_world() {
        // Rejected names keep their accepted form; every other name left
        // out of the response is gone.
        let rejected: BTreeSet<&str> = seen
            .iter()
            .filter(|n| !next.contains_key(*n))
            .map(String::as_str)
            .collect();
        let old = std::mem::take(map);
        for (name, entry) in old {
            if rejected.contains(name.as_str()) {
                next.insert(name, entry);
            } else {
                changed = true;
            }
        }
        *map = next;
    } else {
        map.extend(next);
    }
    Applied { errors, changed }
}

// === Assembly ===

fn build_cluster(
    state: &State,
    name: &str,
    spec: &ClusterSpec,
    assignment: Option<&AssignmentSpec>,
) -> Cluster {
    let members: Vec<Member> = assignment
        .map(|a| a.members.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|m| Member {
            endpoint: state.endpoint(EndpointKey {
                app: m.address,
                // An endpoint with an identity has a sidecar; explicit mode
                // reaches the sidecar at the endpoint's address.
                proxy: m.identity.as_ref().map(|_| m.address),
                protocol: spec.protocol,
                identity: m.identity.clone(),
            }),
            weight: m.weight,
        })
        .collect();
    // A DNS cluster's members come from its resolution, which outlives
    // this config as long as a config has the cluster.
    let dns = spec
        .dns
        .as_ref()
        .map(|target| crate::dns::resolution(state, name, target, spec.protocol));
    Cluster {
        name: name.to_string(),
        connect_timeout: spec.connect_timeout,
        lb_policy: spec.lb_policy,
        protocol: spec.protocol,
        detect_timeout: spec.detect_timeout,
        total_weight: members.iter().map(|m| u64::from(m.weight)).sum(),
        members,
        dns,
        balancer: state.balancer(name),
        clients: state.clients(spec.connect_timeout),
    }
}

fn build_table(
    state: &State,
    spec: &RouteTableSpec,
    clusters: &BTreeMap<String, Arc<Cluster>>,
) -> RouteTable {
    let virtual_hosts = spec
        .virtual_hosts
        .iter()
        .map(|vh| VirtualHost {
            name: vh.name.clone(),
            service: vh.service.clone(),
            routes: vh
                .routes
                .iter()
                .map(|r| Route {
                    name: r.label.clone(),
                    matcher: r.matcher.clone(),
                    action: RouteAction {
                        backends: r
                            .backends
                            .iter()
                            .filter_map(|(cluster, weight)| {
                                Some(WeightedCluster {
                                    cluster: clusters.get(cluster)?.clone(),
                                    weight: *weight,
                                })
                            })
                            .collect(),
                        total_weight: r.total_weight,
                        timeout: r.timeout,
                        retry: r.retry.as_ref().map(|p| RetryPolicy {
                            on: p.on,
                            num_retries: p.num_retries,
                            per_try_timeout: p.per_try_timeout,
                            backoff_base: p.backoff_base,
                            backoff_max: p.backoff_max,
                            retriable_status_codes: p.retriable_status_codes.clone(),
                            budget: state.budget(
                                &format!("{}/{}/{}", spec.name, vh.name, r.label),
                                RetryBudget::default,
                            ),
                        }),
                    },
                    metrics: r
                        .metrics
                        .get_or_init(|| {
                            Arc::new(state.metrics.route(
                                Direction::Outbound,
                                &vh.service,
                                &r.label,
                            ))
                        })
                        .clone(),
                })
                .collect(),
        })
        .collect();
    RouteTable {
        name: spec.name.clone(),
        virtual_hosts,
        domains: spec.domains.clone(),
    }
}

#[cfg(test)]
mod tests;
