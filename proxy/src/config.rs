//! The compiled configuration the data path reads.
//!
//! The xDS client validates Envoy resources and compiles them (see
//! [`compile`]) into these types: route tables with precompiled matchers,
//! clusters with their endpoints, per-route policies and metric handles. A
//! whole [`Config`] is published through [`ConfigStore`] (`arc-swap`); the
//! data path loads one snapshot per request and never takes a lock to read
//! it.
//!
//! State that must outlive a config change (connection pools, outstanding
//! request counts, round-robin positions, retry budgets) lives in
//! [`State`], keyed by stable names and looked up at compile time, so a
//! snapshot holds `Arc`s to it and an endpoint or route update keeps live
//! connections and counters.

pub mod compile;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderName;
use serde::Serialize;

use rustls_pki_types::ServerName;

use crate::http::retry::RetryBudget;
use crate::identity::SpiffeId;
use crate::metrics::{Metrics, RouteMetrics};
use crate::upstream::{Clients, Pool};

// === The snapshot ===

/// One compiled, immutable configuration.
#[derive(Debug, Default, Serialize)]
pub struct Config {
    /// Applied version per xDS type (`LDS`, `RDS`, `CDS`, `EDS`).
    pub versions: BTreeMap<&'static str, String>,
    /// The route table of the explicit outbound listener (RDS `outbound`).
    pub outbound: Option<Arc<RouteTable>>,
    /// Every cluster by name.
    #[serde(serialize_with = "serialize_cluster_names")]
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// Whether the inbound port also takes plaintext (listener `inbound`).
    pub inbound_mode: InboundMode,
    /// The mesh's roots (PEM), from the SDS secret `ROOTCA`, when sent.
    pub trust_bundle_pem: Option<Arc<str>>,
    /// Where intercepted connections go, by original destination.
    pub intercepted: Intercepted,
}

/// What intercepted connections are matched against, by original
/// destination (see `transparent.rs`).
#[derive(Debug, Default, Serialize)]
pub struct Intercepted {
    /// HTTP route tables per destination port (listeners `0.0.0.0_PORT`).
    #[serde(serialize_with = "serialize_table_names")]
    pub ports: BTreeMap<u16, Arc<RouteTable>>,
    /// Virtual IPs and ports of HTTP services (from the tables' domains).
    pub http_vips: BTreeSet<SocketAddr>,
    /// Virtual IPs and ports of TCP services, and their clusters.
    #[serde(serialize_with = "serialize_vip_clusters")]
    pub tcp_vips: HashMap<SocketAddr, Arc<Cluster>>,
    /// The names of those clusters: an endpoint of one gets opaque TCP.
    #[serde(skip)]
    pub tcp_clusters: HashSet<String>,
    /// Known endpoint addresses (pod IP and port) and a cluster holding
    /// each; the subset-less cluster when there is one.
    #[serde(skip)]
    pub endpoints: HashMap<SocketAddr, (Arc<Cluster>, Arc<Endpoint>)>,
    /// Connections to anything else: passed through, or refused when the
    /// mesh says `outbound_traffic: REGISTRY_ONLY` (cluster `BlackHoleCluster`).
    pub block_unknown: bool,
}

fn serialize_table_names<S: serde::Serializer>(
    tables: &BTreeMap<u16, Arc<RouteTable>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(tables.iter().map(|(port, table)| (port, &table.name)))
}

fn serialize_vip_clusters<S: serde::Serializer>(
    vips: &HashMap<SocketAddr, Arc<Cluster>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let sorted: BTreeMap<_, _> = vips.iter().map(|(a, c)| (a, &c.name)).collect();
    s.collect_map(sorted)
}

/// What the inbound port accepts, per the control plane's `inbound`
/// listener: a TLS filter chain only (STRICT), or also a `raw_buffer` one
/// (PERMISSIVE).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InboundMode {
    /// mTLS only; plaintext connections are refused and counted.
    #[default]
    Strict,
    /// mTLS and plaintext on the same port, told apart by the first byte.
    Permissive,
}

fn serialize_cluster_names<S: serde::Serializer>(
    clusters: &BTreeMap<String, Arc<Cluster>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(clusters.len()))?;
    for (name, cluster) in clusters {
        map.serialize_entry(name, cluster.as_ref())?;
    }
    map.end()
}

/// Holds the current [`Config`] and whether a complete one was applied.
#[derive(Debug, Default)]
pub struct ConfigStore {
    current: ArcSwap<Config>,
    ready: AtomicBool,
}

impl ConfigStore {
    /// The current snapshot: one atomic load, no lock.
    pub fn load(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Publishes a new snapshot.
    pub fn store(&self, config: Config, complete: bool) {
        self.current.store(Arc::new(config));
        if complete {
            self.ready.store(true, Ordering::Release);
        }
    }

    /// True once a complete configuration (listeners, routes, clusters and
    /// their endpoints) has been applied; stays true while disconnected.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

// === Routing ===

/// Virtual hosts and the authorities that select them.
#[derive(Debug, Serialize)]
pub struct RouteTable {
    /// RouteConfiguration name.
    pub name: String,
    /// Virtual hosts in order.
    pub virtual_hosts: Vec<VirtualHost>,
    /// Lower-case authority (with or without port) -> index in
    /// `virtual_hosts`. `*` is the catch-all.
    #[serde(skip)]
    pub domains: HashMap<String, usize>,
}

impl RouteTable {
    /// The virtual host for an authority: exact (case-insensitive) match,
    /// then the catch-all `*`.
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let index = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            self.domains.get(&authority.to_ascii_lowercase())
        } else {
            self.domains.get(authority)
        };
        index
            .or_else(|| self.domains.get("*"))
            .and_then(|&i| self.virtual_hosts.get(i))
    }
}

/// A virtual host: one service's routes.
#[derive(Debug, Serialize)]
pub struct VirtualHost {
    /// Envoy's virtual host name (`FQDN:PORT` from Remora's control plane).
    pub name: String,
    /// Service label for metrics (the name without the port).
    pub service: String,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
}

/// One route rule.
#[derive(Debug, Serialize)]
pub struct Route {
    /// Route name; a metrics label.
    pub name: String,
    /// What the request must look like.
    pub matcher: RouteMatch,
    /// Where it goes and under which policy.
    pub action: RouteAction,
    /// Metric handles, resolved at compile time; shared, so a response
    /// holds them with one reference count.
    #[serde(skip)]
    pub metrics: Arc<RouteMetrics>,
}

/// Precompiled request match.
#[derive(Debug, Clone, Serialize)]
pub struct RouteMatch {
    /// Path condition.
    pub path: PathMatch,
    /// Header conditions, `:method` included.
    pub headers: Vec<HeaderMatch>,
    /// Query parameter conditions.
    pub query: Vec<QueryMatch>,
}

/// Path condition.
#[derive(Debug, Clone, Serialize)]
pub enum PathMatch {
    /// Starts with.
    Prefix(String),
    /// Equals (query excluded).
    Exact(String),
    /// Whole path matches.
    Regex(#[serde(serialize_with = "serialize_regex")] regex::Regex),
}

/// A header condition. `:method` is matched against the request method.
#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatch {
    /// Lower-case header name, or `:method`.
    #[serde(serialize_with = "serialize_header_name")]
    pub name: HeaderName,
    /// Matched against the request method instead of a header.
    pub is_method: bool,
    /// How the value is matched; `None` means "present".
    pub value: Option<StringMatch>,
    /// Match when the condition does not hold.
    pub invert: bool,
}

/// A query parameter condition.
#[derive(Debug, Clone, Serialize)]
pub struct QueryMatch {
    /// Parameter name.
    pub name: String,
    /// How the value is matched; `None` means "present".
    pub value: Option<StringMatch>,
}

/// String condition.
#[derive(Debug, Clone, Serialize)]
pub enum StringMatch {
    /// Equals.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Contains.
    Contains(String),
    /// Whole value matches.
    Regex(#[serde(serialize_with = "serialize_regex")] regex::Regex),
}

fn serialize_regex<S: serde::Serializer>(r: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

fn serialize_header_name<S: serde::Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(h.as_str())
}

/// Where a matched request goes.
#[derive(Debug, Serialize)]
pub struct RouteAction {
    /// Weighted destinations (one entry for a single cluster) whose
    /// cluster exists. May be empty: a destination whose cluster the proxy
    /// does not have is left out, but its weight still counts in
    /// `total_weight`.
    pub backends: Vec<WeightedCluster>,
    /// Sum of the weights of every destination the route names, missing
    /// clusters included; above 0. Pick a point in `0..total_weight` and
    /// walk `backends`; a point past them (always, when `backends` is
    /// empty) fell on a missing cluster: answer 503 `cluster_not_found`, as
    /// Envoy does.
    pub total_weight: u32,
    /// Whole-request timeout, retries included; `None` = no timeout.
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retry: Option<RetryPolicy>,
}

/// A destination and its share.
#[derive(Debug, Serialize)]
pub struct WeightedCluster {
    /// The cluster.
    #[serde(serialize_with = "serialize_cluster_name")]
    pub cluster: Arc<Cluster>,
    /// Its weight.
    pub weight: u32,
}

fn serialize_cluster_name<S: serde::Serializer>(c: &Arc<Cluster>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&c.name)
}

/// Retry conditions, as in Envoy's `retry_on`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// `5xx`: any 5xx, connect failure or reset.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504.
    pub gateway_error: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `reset`.
    pub reset: bool,
    /// `retriable-status-codes`.
    pub retriable_status_codes: bool,
    /// gRPC statuses that allow a retry (`cancelled` 1, `deadline-exceeded`
    /// 4, `resource-exhausted` 8, `internal` 13, `unavailable` 14).
    pub grpc_statuses: u32,
}

impl RetryOn {
    /// True when `code` is a gRPC status (0-16) that allows a retry.
    pub fn grpc(&self, code: u32) -> bool {
        code < 32 && self.grpc_statuses & (1 << code) != 0
    }
}

/// A route's retry policy.
#[derive(Debug, Serialize)]
pub struct RetryPolicy {
    /// Conditions.
    pub on: RetryOn,
    /// Retries after the first try.
    pub num_retries: u32,
    /// Timeout of each try.
    pub per_try_timeout: Option<Duration>,
    /// First backoff interval (jittered, doubling).
    pub backoff_base: Duration,
    /// Backoff ceiling.
    pub backoff_max: Duration,
    /// Status codes retried under `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
    /// The route's retry budget (shared across config versions).
    #[serde(skip)]
    pub budget: Arc<RetryBudget>,
}

// === Clusters and endpoints ===

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Weighted round robin.
    RoundRobin,
    /// Power of two choices over outstanding requests, weighted.
    LeastRequest,
}

/// What the application behind an endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppProtocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC).
    Http2,
}

/// A cluster: a set of endpoints and how to reach them.
#[derive(Debug, Serialize)]
pub struct Cluster {
    /// Cluster name.
    pub name: String,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// How long to wait for an intercepted client's first bytes to detect
    /// its protocol; `None` for the proxy's default.
    pub detect_timeout: Option<Duration>,
    /// Balancing algorithm.
    pub lb_policy: LbPolicy,
    /// The protocol the endpoints' applications speak.
    pub protocol: AppProtocol,
    /// Endpoints that take traffic, in a stable order (EDS; empty for a
    /// DNS cluster, whose members are in `dns`).
    pub members: Vec<Member>,
    /// Sum of the members' weights.
    pub total_weight: u64,
    /// For a STRICT_DNS or LOGICAL_DNS cluster: the live answer, kept
    /// fresh by a background task, which balancing reads instead of
    /// `members` (one atomic load).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Arc<crate::dns::Resolution>>,
    /// Balancer state shared across config versions.
    #[serde(skip)]
    pub balancer: Arc<BalancerState>,
    /// Pooled clients with this cluster's connect timeout.
    #[serde(skip)]
    pub clients: Arc<Clients>,
}

/// An endpoint's membership in a cluster.
#[derive(Debug, Serialize)]
pub struct Member {
    /// The endpoint.
    pub endpoint: Arc<Endpoint>,
    /// Its relative share, at least 1.
    pub weight: u32,
}

/// State of a cluster's balancer that survives config changes.
#[derive(Debug, Default)]
pub struct BalancerState {
    /// Round-robin position.
    pub next: AtomicUsize,
}

/// How to reach one endpoint, and whom to expect there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointKey {
    /// Where the application listens.
    pub app: SocketAddr,
    /// Where the endpoint's sidecar accepts mesh traffic, when it has one
    /// and traffic is not intercepted (explicit mode).
    pub proxy: Option<SocketAddr>,
    /// What the application speaks.
    pub protocol: AppProtocol,
    /// SPIFFE identity the control plane says serves it.
    pub identity: Option<String>,
}

/// One endpoint, shared by every cluster and config version that has it,
/// so its connections and counters outlive config changes.
#[derive(Debug, Serialize)]
pub struct Endpoint {
    /// Addresses, protocol, identity.
    pub key: EndpointKey,
    /// Requests in flight to it (least-request balancing).
    #[serde(skip)]
    pub outstanding: AtomicUsize,
    /// Connections to it (to its sidecar when it has one).
    #[serde(skip)]
    pub pool: Pool,
    /// The expected identity in the form TLS connects with, when the
    /// endpoint has a sidecar (see [`crate::tls::server_name_for`]).
    #[serde(skip)]
    pub server_name: Option<ServerName<'static>>,
}

// === Long-lived state ===

/// What survives config changes, keyed by stable names. Only the compiler
/// takes these locks, never the data path.
#[derive(Debug)]
pub struct State {
    /// Metric families.
    pub metrics: Arc<Metrics>,
    endpoints: Mutex<HashMap<EndpointKey, Weak<Endpoint>>>,
    balancers: Mutex<HashMap<String, Weak<BalancerState>>>,
    budgets: Mutex<HashMap<String, Weak<RetryBudget>>>,
    clients: Mutex<HashMap<Duration, Weak<Clients>>>,
}

impl State {
    /// Empty state over `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> State {
        State {
            metrics,
            endpoints: Mutex::default(),
            balancers: Mutex::default(),
            budgets: Mutex::default(),
            clients: Mutex::default(),
        }
    }

    /// The live endpoint for `key`, or a new one.
    pub fn endpoint(&self, key: EndpointKey) -> Arc<Endpoint> {
        let mut map = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = map.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        map.retain(|_, weak| weak.strong_count() > 0);
        let server_name = key
            .identity
            .as_deref()
            .and_then(|id| SpiffeId::parse(id).ok())
            .map(|id| crate::tls::server_name_for(&id));
        let endpoint = Arc::new(Endpoint {
            key: key.clone(),
            outstanding: AtomicUsize::new(0),
            pool: Pool::default(),
            server_name,
        });
        map.insert(key, Arc::downgrade(&endpoint));
        endpoint
    }

    /// The balancer state of cluster `name`.
    pub fn balancer(&self, name: &str) -> Arc<BalancerState> {
        shared(&self.balancers, name, BalancerState::default)
    }

    /// Pooled clients for a connect timeout.
    pub fn clients(&self, connect_timeout: Duration) -> Arc<Clients> {
        let mut map = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = map.get(&connect_timeout).and_then(Weak::upgrade) {
            return existing;
        }
        map.retain(|_, weak| weak.strong_count() > 0);
        let clients = Arc::new(Clients::new(connect_timeout));
        map.insert(connect_timeout, Arc::downgrade(&clients));
        clients
    }

    /// The retry budget of route `key`.
    pub fn budget(&self, key: &str, make: impl FnOnce() -> RetryBudget) -> Arc<RetryBudget> {
        shared(&self.budgets, key, make)
    }
}

fn shared<T>(map: &Mutex<HashMap<String, Weak<T>>>, key: &str, make: impl FnOnce() -> T) -> Arc<T> {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(existing) = map.get(key).and_then(Weak::upgrade) {
        return existing;
    }
    map.retain(|_, weak| weak.strong_count() > 0);
    let value = Arc::new(make());
    map.insert(key.to_string(), Arc::downgrade(&value));
    value
}
