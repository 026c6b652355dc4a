//! The mesh model: services, their ports and endpoints, routes and policies.
//!
//! Every source (the YAML file today, Kubernetes next) fills this model, and
//! `translate` reads it. It knows nothing of files, Kubernetes or xDS. The
//! only way to get a [`Mesh`] is [`Mesh::new`], which checks everything that
//! spans more than one field (duplicates, references between services, weight
//! sums), so code that holds a `Mesh` never re-checks it.
//!
//! Errors carry a [`FieldPath`] in the mesh file's own vocabulary
//! (`services[2].routes[0].backends[1].service`); lists keep the order their
//! source gave them, so a source can map a path back to where it came from
//! (a file line, a Kubernetes object).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Serialize;

/// The DNS suffix of in-mesh service names (`name.namespace.svc.<suffix>`).
pub const DNS_SUFFIX: &str = "cluster.local";

/// Trust domain used in SPIFFE identities when a source names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

// === Mesh ===

/// A validated mesh: every reference resolves, names are unique.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mesh {
    trust_domain: String,
    services: Vec<Service>,
    workload_tokens: Vec<WorkloadToken>,
    outbound_traffic: OutboundTraffic,
}

/// What sidecars do with intercepted connections to destinations outside
/// the mesh (Istio's `outboundTrafficPolicy` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTraffic {
    /// Passed through to where they were going.
    #[default]
    AllowAny,
    /// Refused (and counted).
    RegistryOnly,
}

impl Mesh {
    /// Checks the cross-field rules and returns the mesh, or every problem
    /// found (not just the first). `workload_tokens` are the bootstrap tokens
    /// workloads may present to the certificate authority (empty: none).
    pub fn new(
        trust_domain: String,
        services: Vec<Service>,
        workload_tokens: Vec<WorkloadToken>,
    ) -> Result<Mesh, Vec<ModelError>> {
        let mesh = Mesh {
            trust_domain,
            services,
            workload_tokens,
            outbound_traffic: OutboundTraffic::default(),
        };
        let errors = validate(&mesh);
        if errors.is_empty() {
            Ok(mesh)
        } else {
            Err(errors)
        }
    }

    /// A mesh with no services.
    pub fn empty() -> Mesh {
        Mesh {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            services: Vec::new(),
            workload_tokens: Vec::new(),
            outbound_traffic: OutboundTraffic::default(),
        }
    }

    /// The mesh with `policy` for destinations outside it.
    pub fn with_outbound_traffic(mut self, policy: OutboundTraffic) -> Mesh {
        self.outbound_traffic = policy;
        self
    }

    /// What happens to intercepted connections to destinations outside
    /// the mesh.
    pub fn outbound_traffic(&self) -> OutboundTraffic {
        self.outbound_traffic
    }

    /// The SPIFFE trust domain of workload identities.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Services in source order.
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Looks a service up by namespace and name.
    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.iter().find(|s| s.key() == *key)
    }

    /// Bootstrap tokens, in source order: each lets a workload obtain a
    /// certificate for one identity.
    pub fn workload_tokens(&self) -> &[WorkloadToken] {
        &self.workload_tokens
    }
}

// === Workload tokens ===

/// Shortest bootstrap token accepted, in characters.
pub const MIN_TOKEN_LEN: usize = 16;

/// A bootstrap token and the one identity it proves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadToken {
    /// The identity a workload presenting [`WorkloadToken::token`] gets.
    pub identity: Identity,
    /// The secret itself.
    pub token: Secret,
}

/// A secret string that stays out of logs, `Debug` output and config dumps:
/// all of them show `<redacted>`. Read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret, for the one place that must compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

// === Services ===

/// Identifies a service: its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceKey {
    /// Kubernetes-style namespace.
    pub namespace: String,
    /// Service name, unique within its namespace.
    pub name: String,
}

impl ServiceKey {
    /// `name.namespace.svc.cluster.local`.
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.{}", self.name, self.namespace, DNS_SUFFIX)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// A service: a named set of endpoints reachable on one or more ports, and
/// the routes that decide where requests addressed to it go.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Virtual IP that clients may dial (used by transparent interception).
    pub vip: Option<IpAddr>,
    /// For a service outside the mesh: the DNS name its instances are
    /// found under (`api.example.test`). Such a service has no endpoints
    /// and no subsets; proxies resolve the name themselves, honouring
    /// TTLs, and every address in the answer is an instance.
    pub hostname: Option<String>,
    /// Ports, at least one.
    pub ports: Vec<ServicePort>,
    /// How requests are spread over endpoints.
    pub load_balancer: LoadBalancer,
    /// Time allowed to open a connection to an endpoint.
    pub connect_timeout: Duration,
    /// What the service's sidecars accept on their inbound listener.
    pub mtls: MtlsMode,
    /// How long an intercepting sidecar waits for a client's first bytes
    /// to tell the protocol of a connection to this service; `None` for
    /// the proxy's default (500 ms). Ports with `protocol: tcp` are never
    /// detected (server-speaks-first protocols).
    pub detect_timeout: Option<Duration>,
    /// Named label selectors over the endpoints, for routing to a version.
    pub subsets: Vec<Subset>,
    /// The instances that serve this service.
    pub endpoints: Vec<Endpoint>,
    /// Ordered route rules; the first match wins. Empty means "everything to
    /// this service on the same port".
    pub routes: Vec<Route>,
}

/// Default endpoint connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Service {
    /// The service's key.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The port named by number.
    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }

    /// The subset named `name`.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The endpoints that belong to `subset` (all of them for `None`).
    pub fn endpoints_in<'a>(
        &'a self,
        subset: Option<&'a Subset>,
    ) -> impl Iterator<Item = &'a Endpoint> + 'a {
        self.endpoints
            .iter()
            .filter(move |e| subset.is_none_or(|s| s.selects(e)))
    }

    /// Which port of this service a backend reference lands on: the one it
    /// names, else the only one, else the one numbered like `from_port`.
    pub fn backend_port(&self, named: Option<u16>, from_port: u16) -> Option<&ServicePort> {
        match named {
            Some(n) => self.port(n),
            None if self.ports.len() == 1 => self.ports.first(),
            None => self.port(from_port),
        }
    }
}

/// A port a service is reachable on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePort {
    /// Optional name; endpoints may map named ports to their own numbers.
    pub name: Option<String>,
    /// The port clients dial.
    pub port: u16,
    /// What is spoken on it.
    pub protocol: Protocol,
    /// The endpoint port when endpoints do not name one (default: `port`).
    pub target_port: Option<u16>,
}

/// Application protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (upgrades to HTTP/2 between proxies).
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC: HTTP/2 with gRPC status semantics.
    Grpc,
    /// Opaque TCP.
    Tcp,
}

impl Protocol {
    /// True for the protocols that get HTTP routing.
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }

    /// True when the upstream must be spoken to over HTTP/2.
    pub fn is_h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Least outstanding requests, power of two choices, weighted.
    LeastRequest,
}

/// What a service's sidecars accept from callers (Istio's
/// `PeerAuthentication` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Mutual TLS only: a caller without a mesh certificate is refused.
    #[default]
    Strict,
    /// Mutual TLS or plaintext, so that callers outside the mesh still get
    /// through while a service is being migrated.
    Permissive,
}

/// A named subset of a service's endpoints, chosen by labels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Subset {
    /// Subset name, unique within the service.
    pub name: String,
    /// Every label here must be on the endpoint with the same value.
    pub labels: BTreeMap<String, String>,
}

impl Subset {
    /// True when the endpoint carries every label of the subset.
    pub fn selects(&self, endpoint: &Endpoint) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| endpoint.labels.get(k) == Some(v))
    }
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoint {
    /// IP address of the instance.
    pub address: IpAddr,
    /// Port for every service port that has no entry in `ports`.
    pub port: Option<u16>,
    /// Port per service port name, for multi-port services.
    pub ports: BTreeMap<String, u16>,
    /// Relative share of traffic.
    pub weight: NonZeroU32,
    /// The workload identity the instance runs as. `Some` means the
    /// instance has a sidecar: proxies reach it over the mesh protocol
    /// (HTTP/2, mutual TLS once identity lands) and check this identity.
    /// `None`: no sidecar; proxies speak the application's protocol to it.
    pub identity: Option<Identity>,
    /// Free-form labels, matched by subsets.
    pub labels: BTreeMap<String, String>,
    /// Health as the source knows it.
    pub health: Health,
    /// Failure domain (a zone), used as the endpoint's locality.
    pub zone: Option<String>,
}

impl Endpoint {
    /// The port this endpoint serves `service_port` on: its entry by port
    /// name, else its own `port`, else the service port's target port, else
    /// the service port itself.
    pub fn port_for(&self, service_port: &ServicePort) -> u16 {
        service_port
            .name
            .as_ref()
            .and_then(|n| self.ports.get(n).copied())
            .or(self.port)
            .or(service_port.target_port)
            .unwrap_or(service_port.port)
    }
}

impl ServicePort {
    /// The port instances serve it on when no endpoint says otherwise
    /// (and always, for a service found by DNS): `target_port`, else the
    /// port itself.
    pub fn instance_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// A workload identity: namespace and service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Identity {
    /// Namespace the workload runs in.
    pub namespace: String,
    /// Its service account.
    pub service_account: String,
}

impl Identity {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// Endpoint health as known to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Takes traffic.
    #[default]
    Healthy,
    /// Takes no traffic.
    Unhealthy,
    /// Finishing what it has; takes no new traffic.
    Draining,
}

// === Routes ===

/// One routing rule of a service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    /// Name, unique within the service; used in metrics labels.
    pub name: String,
    /// What a request must look like for this rule to apply.
    pub matches: RouteMatch,
    /// Where matching requests go, split by weight.
    pub backends: Vec<Backend>,
    /// Whole-request timeout, retries included. `None`: no timeout.
    pub timeout: Option<Duration>,
    /// Retry policy. `None`: no retries.
    pub retry: Option<RetryPolicy>,
}

/// Request match. Every condition given must hold; none given matches all.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RouteMatch {
    /// Path condition.
    pub path: Option<PathMatch>,
    /// HTTP method, upper case (`GET`).
    pub method: Option<String>,
    /// Header conditions.
    pub headers: Vec<HeaderMatch>,
    /// Query parameter conditions.
    pub query: Vec<QueryMatch>,
}

/// How a path is matched.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    /// The whole path, query excluded.
    Exact(String),
    /// A path prefix.
    Prefix(String),
    /// A regular expression over the whole path (RE2 syntax).
    Regex(Pattern),
}

/// A header condition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeaderMatch {
    /// Header name, lower case.
    pub name: String,
    /// How the value is matched.
    pub value: StringMatch,
    /// Match when the condition does not hold.
    pub invert: bool,
}

/// A query parameter condition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryMatch {
    /// Parameter name.
    pub name: String,
    /// How the value is matched.
    pub value: StringMatch,
}

/// How a string value is matched.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Whole value matches the expression (RE2 syntax).
    Regex(Pattern),
    /// The header or parameter is there, whatever its value.
    Present,
}

/// A regular expression known to compile (RE2-compatible syntax: the `regex`
/// crate and RE2 agree on the features we accept, no backreferences or
/// look-around).
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Pattern(String);

impl Pattern {
    /// Compiles `source` to check it, keeping the text.
    pub fn new(source: &str) -> Result<Pattern, regex::Error> {
        regex::Regex::new(source)?;
        Ok(Pattern(source.to_string()))
    }

    /// The expression's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

/// A weighted destination of a route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backend {
    /// The destination service.
    pub service: ServiceKey,
    /// Its port; may be left out when the service has one port, or has the
    /// same port number as the one the request came in on.
    pub port: Option<u16>,
    /// A subset of its endpoints.
    pub subset: Option<String>,
    /// Relative share; the route's weights must not all be 0.
    pub weight: u32,
}

/// When and how often a request is tried again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Conditions that allow a retry.
    pub on: Vec<RetryOn>,
    /// Retries after the first try.
    pub attempts: u32,
    /// Timeout of each try. `None`: only the route timeout applies.
    pub per_try_timeout: Option<Duration>,
    /// Exponential backoff between tries (jittered).
    pub backoff: Backoff,
    /// Status codes retried under [`RetryOn::RetriableStatusCodes`].
    pub status_codes: Vec<u16>,
}

/// Backoff bounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Backoff {
    /// First interval.
    pub base: Duration,
    /// Ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    /// Envoy's defaults: 25 ms base, 10× ceiling.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}

/// A retry condition, named as Envoy names it in `retry_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum RetryOn {
    /// Any 5xx response, connect failure or reset.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503, 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// The connection to the endpoint could not be opened.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The endpoint reset the stream or connection.
    #[serde(rename = "reset")]
    Reset,
    /// A status code listed in `status_codes`.
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
    /// gRPC `CANCELLED`.
    #[serde(rename = "cancelled")]
    GrpcCancelled,
    /// gRPC `DEADLINE_EXCEEDED`.
    #[serde(rename = "deadline-exceeded")]
    GrpcDeadlineExceeded,
    /// gRPC `INTERNAL`.
    #[serde(rename = "internal")]
    GrpcInternal,
    /// gRPC `RESOURCE_EXHAUSTED`.
    #[serde(rename = "resource-exhausted")]
    GrpcResourceExhausted,
    /// gRPC `UNAVAILABLE`.
    #[serde(rename = "unavailable")]
    GrpcUnavailable,
}

impl RetryOn {
    /// Every condition, for parsing and docs.
    pub const ALL: [RetryOn; 10] = [
        RetryOn::ServerError,
        RetryOn::GatewayError,
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::RetriableStatusCodes,
        RetryOn::GrpcCancelled,
        RetryOn::GrpcDeadlineExceeded,
        RetryOn::GrpcInternal,
        RetryOn::GrpcResourceExhausted,
        RetryOn::GrpcUnavailable,
    ];

    /// The name in Envoy's `retry_on` (and in the mesh file).
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::ServerError => "5xx",
            RetryOn::GatewayError => "gateway-error",
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::Reset => "reset",
            RetryOn::RetriableStatusCodes => "retriable-status-codes",
            RetryOn::GrpcCancelled => "cancelled",
            RetryOn::GrpcDeadlineExceeded => "deadline-exceeded",
            RetryOn::GrpcInternal => "internal",
            RetryOn::GrpcResourceExhausted => "resource-exhausted",
            RetryOn::GrpcUnavailable => "unavailable",
        }
    }

    /// Parses an Envoy `retry_on` name.
    pub fn parse(name: &str) -> Option<RetryOn> {
        RetryOn::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// True for the conditions that name a gRPC status.
    pub fn is_grpc_status(self) -> bool {
        matches!(
            self,
            RetryOn::GrpcCancelled
                | RetryOn::GrpcDeadlineExceeded
                | RetryOn::GrpcInternal
                | RetryOn::GrpcResourceExhausted
                | RetryOn::GrpcUnavailable
        )
    }
}

// === Errors ===

/// Where in a mesh description something is, in the mesh file's terms.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct FieldPath(Vec<PathSegment>);

/// One step of a [`FieldPath`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PathSegment {
    /// A mapping key.
    Key(String),
    /// A list index.
    Index(usize),
}

impl FieldPath {
    /// The root.
    pub fn root() -> FieldPath {
        FieldPath(Vec::new())
    }

    /// This path plus a key.
    pub fn key(&self, key: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(PathSegment::Key(key.to_string()));
        p
    }

    /// This path plus an index.
    pub fn index(&self, index: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(PathSegment::Index(index));
        p
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> &[PathSegment] {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                PathSegment::Key(k) if i == 0 => write!(f, "{k}")?,
                PathSegment::Key(k) => write!(f, ".{k}")?,
                PathSegment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A problem with the mesh description, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ModelError {
    /// Where.
    pub path: FieldPath,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl ModelError {
    /// An error at `path`.
    pub fn new(path: FieldPath, message: impl Into<String>) -> ModelError {
        ModelError {
            path,
            message: message.into(),
        }
    }
}

// === Validation ===

fn validate(mesh: &Mesh) -> Vec<ModelError> {
    let mut errors = Vec::new();
    let root = FieldPath::root();
    if mesh.trust_domain.is_empty() || mesh.trust_domain.contains(['/', ':']) {
        errors.push(ModelError::new(
            root.key("trust_domain"),
            format!(
                "trust domain {:?} must be a non-empty DNS-like name without '/' or ':'",
                mesh.trust_domain
            ),
        ));
    }

    let mut seen: HashMap<ServiceKey, usize> = HashMap::new();
    for (i, service) in mesh.services.iter().enumerate() {
        let path = root.key("services").index(i);
        if let Some(first) = seen.insert(service.key(), i) {
            errors.push(ModelError::new(
                path.key("name"),
                format!(
                    "duplicate service {}: already defined at services[{first}]",
                    service.key()
                ),
            ));
        }
        validate_service(mesh, service, &path, &mut errors);
    }

    validate_tokens(&mesh.workload_tokens, &root, &mut errors);

    validate_hostnames(mesh, &root, &mut errors);

    let mut vips: HashMap<(IpAddr, u16), ServiceKey> = HashMap::new();
    for (i, service) in mesh.services.iter().enumerate() {
        let Some(vip) = service.vip else { continue };
        for (j, port) in service.ports.iter().enumerate() {
            if let Some(other) = vips.insert((vip, port.port), service.key()) {
                errors.push(ModelError::new(
                    root.key("services").index(i).key("ports").index(j),
                    format!(
                        "{vip}:{} is already the address of service {other}",
                        port.port
                    ),
                ));
            }
        }
    }
    errors
}

/// Services found by DNS: a valid name, not one the mesh's own services
/// answer to, used once; no endpoints or subsets (DNS gives the instances).
fn validate_hostnames(mesh: &Mesh, root: &FieldPath, errors: &mut Vec<ModelError>) {
    let mut in_mesh: HashMap<String, ServiceKey> = HashMap::new();
    for service in &mesh.services {
        let key = service.key();
        for name in [
            key.name.clone(),
            key.to_string(),
            format!("{key}.svc"),
            key.fqdn(),
        ] {
            in_mesh.entry(name).or_insert_with(|| key.clone());
        }
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, service) in mesh.services.iter().enumerate() {
        let Some(hostname) = service.hostname.as_deref() else {
            continue;
        };
        let path = root.key("services").index(i);
        if let Err(why) = check_hostname(hostname) {
            errors.push(ModelError::new(
                path.key("hostname"),
                format!("{hostname:?} is not a DNS name: {why}"),
            ));
        } else if let Some(other) = in_mesh.get(hostname) {
            errors.push(ModelError::new(
                path.key("hostname"),
                format!(
                    "{hostname:?} is a name of the mesh's service {other}: an external service needs a name outside the mesh"
                ),
            ));
        } else if let Some(first) = seen.insert(hostname, i) {
            errors.push(ModelError::new(
                path.key("hostname"),
                format!("duplicate hostname {hostname:?}: services[{first}] already has it"),
            ));
        }
        if !service.endpoints.is_empty() {
            errors.push(ModelError::new(
                path.key("endpoints"),
                "a service with a hostname gets its instances from DNS: remove `endpoints` (or `hostname`)",
            ));
        }
        if !service.subsets.is_empty() {
            errors.push(ModelError::new(
                path.key("subsets"),
                "a service with a hostname has no labelled endpoints to select: remove `subsets`",
            ));
        }
    }
}

/// A host name as DNS resolves it: dot-separated labels of letters, digits
/// and `-`, lower case, at most 253 characters, not an IP address.
fn check_hostname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err("it is an IP address: give the service `endpoints` instead");
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("write it in lower case");
    }
    if !name.split('.').all(is_dns_label) {
        return Err(
            "each dot-separated label must be 1-63 letters, digits or '-', not starting or ending with '-'",
        );
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err("it has only digits");
    }
    Ok(())
}

/// Messages never quote a token: they name the entry instead.
fn validate_tokens(tokens: &[WorkloadToken], root: &FieldPath, errors: &mut Vec<ModelError>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, entry) in tokens.iter().enumerate() {
        let path = root.key("workload_tokens").index(i);
        let identity = &entry.identity;
        for (field, value) in [
            ("namespace", &identity.namespace),
            ("service_account", &identity.service_account),
        ] {
            if !is_dns_label(value) {
                errors.push(ModelError::new(
                    path.key(field),
                    format!(
                        "{value:?} is not a valid {field}: use lower-case letters, digits and '-', at most 63 characters, starting and ending with a letter or digit"
                    ),
                ));
            }
        }
        let token = entry.token.expose();
        let len = token.chars().count();
        if len < MIN_TOKEN_LEN {
            errors.push(ModelError::new(
                path.key("token"),
                format!(
                    "the token has {len} characters; a bootstrap token needs at least {MIN_TOKEN_LEN} (generate one with `openssl rand -hex 32`)"
                ),
            ));
        } else if let Some(first) = seen.insert(token, i) {
            errors.push(ModelError::new(
                path.key("token"),
                format!(
                    "duplicate token: workload_tokens[{first}] has the same one; each token must prove exactly one identity"
                ),
            ));
        }
    }
}

fn validate_service(
    mesh: &Mesh,
    service: &Service,
    path: &FieldPath,
    errors: &mut Vec<ModelError>,
) {
    for (field, value) in [("name", &service.name), ("namespace", &service.namespace)] {
        if !is_dns_label(value) {
            errors.push(ModelError::new(
                path.key(field),
                format!(
                    "{value:?} is not a valid {field}: use lower-case letters, digits and '-', at most 63 characters, starting and ending with a letter or digit"
                ),
            ));
        }
    }

    if service.ports.is_empty() {
        errors.push(ModelError::new(
            path.key("ports"),
            "a service needs at least one port",
        ));
    }
    let mut port_numbers = HashSet::new();
    let mut port_names = HashSet::new();
    for (i, port) in service.ports.iter().enumerate() {
        let p = path.key("ports").index(i);
        if port.port == 0 {
            errors.push(ModelError::new(p.key("port"), "port must be 1-65535"));
        }
        if port.target_port == Some(0) {
            errors.push(ModelError::new(
                p.key("target_port"),
                "target_port must be 1-65535",
            ));
        }
        if !port_numbers.insert(port.port) {
            errors.push(ModelError::new(
                p.key("port"),
                format!("duplicate port {} in service {}", port.port, service.key()),
            ));
        }
        if let Some(name) = &port.name
            && !port_names.insert(name.as_str())
        {
            errors.push(ModelError::new(
                p.key("name"),
                format!("duplicate port name {name:?} in service {}", service.key()),
            ));
        }
    }

    let mut subset_names = HashSet::new();
    for (i, subset) in service.subsets.iter().enumerate() {
        let p = path.key("subsets").index(i);
        if !subset_names.insert(subset.name.as_str()) {
            errors.push(ModelError::new(
                p.key("name"),
                format!("duplicate subset {:?}", subset.name),
            ));
        }
        if subset.labels.is_empty() {
            errors.push(ModelError::new(
                p.key("labels"),
                "a subset needs at least one label to select endpoints by",
            ));
        }
    }

    let mut addresses = HashSet::new();
    for (i, endpoint) in service.endpoints.iter().enumerate() {
        let p = path.key("endpoints").index(i);
        if endpoint.port == Some(0) || endpoint.ports.values().any(|&n| n == 0) {
            errors.push(ModelError::new(p.key("port"), "port must be 1-65535"));
        }
        for name in endpoint.ports.keys() {
            if !port_names.contains(name.as_str()) {
                errors.push(ModelError::new(
                    p.key("ports").key(name),
                    format!(
                        "service {} has no port named {name:?}; named ports: {}",
                        service.key(),
                        list(port_names.iter())
                    ),
                ));
            }
        }
        for port in &service.ports {
            if !addresses.insert((port.port, endpoint.address, endpoint.port_for(port))) {
                errors.push(ModelError::new(
                    p.key("address"),
                    format!(
                        "duplicate endpoint {}:{} in service {}",
                        endpoint.address,
                        endpoint.port_for(port),
                        service.key()
                    ),
                ));
                break;
            }
        }
    }

    let mut route_names = HashSet::new();
    for (i, route) in service.routes.iter().enumerate() {
        let p = path.key("routes").index(i);
        if !route_names.insert(route.name.as_str()) {
            errors.push(ModelError::new(
                p.key("name"),
                format!("duplicate route name {:?}", route.name),
            ));
        }
        validate_route(mesh, service, route, &p, errors);
    }
}

fn validate_route(
    mesh: &Mesh,
    service: &Service,
    route: &Route,
    path: &FieldPath,
    errors: &mut Vec<ModelError>,
) {
    if let Some(PathMatch::Exact(s) | PathMatch::Prefix(s)) = &route.matches.path
        && !s.starts_with('/')
    {
        errors.push(ModelError::new(
            path.key("match").key("path"),
            format!("path {s:?} must start with '/'"),
        ));
    }
    if let Some(method) = &route.matches.method
        && (method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
    {
        errors.push(ModelError::new(
            path.key("match").key("method"),
            format!("method {method:?} must be an upper-case HTTP method such as GET"),
        ));
    }
    for (i, header) in route.matches.headers.iter().enumerate() {
        if !is_header_name(&header.name) {
            errors.push(ModelError::new(
                path.key("match").key("headers").index(i).key("name"),
                format!(
                    "{:?} is not a valid header name: use lower-case letters, digits and '-'",
                    header.name
                ),
            ));
        }
    }

    if route.backends.is_empty() {
        errors.push(ModelError::new(
            path.key("backends"),
            "a route needs at least one backend",
        ));
    } else if route.backends.iter().all(|b| b.weight == 0) {
        errors.push(ModelError::new(
            path.key("backends"),
            "backend weights sum to 0: give at least one backend a weight above 0",
        ));
    }
    let total: u64 = route.backends.iter().map(|b| u64::from(b.weight)).sum();
    if total > u64::from(u32::MAX) {
        errors.push(ModelError::new(
            path.key("backends"),
            "backend weights sum to more than 4294967295",
        ));
    }
    for (i, backend) in route.backends.iter().enumerate() {
        let p = path.key("backends").index(i);
        let Some(target) = mesh.service(&backend.service) else {
            errors.push(ModelError::new(
                p.key("service"),
                format!(
                    "route to a missing backend: no service {} in the mesh",
                    backend.service
                ),
            ));
            continue;
        };
        if !target.ports.iter().any(|p| p.protocol.is_http()) {
            errors.push(ModelError::new(
                p.key("service"),
                format!("backend {} has no HTTP port to route to", backend.service),
            ));
        }
        for port in service.ports.iter().filter(|p| p.protocol.is_http()) {
            if target.backend_port(backend.port, port.port).is_none() {
                let message = match backend.port {
                    Some(n) => format!("service {} has no port {n}", backend.service),
                    None => format!(
                        "service {} has several ports and none is {}: name one with `port`",
                        backend.service, port.port
                    ),
                };
                errors.push(ModelError::new(p.key("port"), message));
                break;
            }
        }
        if let Some(subset) = &backend.subset
            && target.subset(subset).is_none()
        {
            errors.push(ModelError::new(
                p.key("subset"),
                format!(
                    "service {} has no subset {subset:?}; subsets: {}",
                    backend.service,
                    list(target.subsets.iter().map(|s| &s.name))
                ),
            ));
        }
    }

    if let Some(timeout) = route.timeout
        && timeout.is_zero()
    {
        errors.push(ModelError::new(
            path.key("timeout"),
            "timeout must be above 0 (leave it out for no timeout)",
        ));
    }
    if let Some(retry) = &route.retry {
        let p = path.key("retry");
        if retry.on.is_empty() {
            errors.push(ModelError::new(
                p.key("on"),
                "a retry policy needs at least one condition",
            ));
        }
        if retry.on.contains(&RetryOn::RetriableStatusCodes) && retry.status_codes.is_empty() {
            errors.push(ModelError::new(
                p.key("status_codes"),
                "retriable-status-codes needs a list of status codes",
            ));
        }
        for (i, code) in retry.status_codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                errors.push(ModelError::new(
                    p.key("status_codes").index(i),
                    format!("{code} is not an HTTP status code"),
                ));
            }
        }
        if retry.per_try_timeout.is_some_and(|t| t.is_zero()) {
            errors.push(ModelError::new(
                p.key("per_try_timeout"),
                "per_try_timeout must be above 0",
            ));
        }
        if retry.backoff.base.is_zero() || retry.backoff.max < retry.backoff.base {
            errors.push(ModelError::new(
                p.key("backoff"),
                "backoff needs base > 0 and max >= base",
            ));
        }
    }
}

fn list<'a>(items: impl Iterator<Item = &'a (impl AsRef<str> + ?Sized + 'a)>) -> String {
    let mut names: Vec<&str> = items.map(AsRef::as_ref).collect();
    names.sort_unstable();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// RFC 1123 label: what Kubernetes accepts for names and namespaces.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// Builders for tests of this crate: a valid service with sensible defaults.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub(crate) fn endpoint(ip: [u8; 4], port: u16) -> Endpoint {
        Endpoint {
            address: IpAddr::from(ip),
            port: Some(port),
            ports: BTreeMap::new(),
            weight: NonZeroU32::MIN,
            identity: Some(Identity {
                namespace: "default".into(),
                service_account: "default".into(),
            }),
            labels: BTreeMap::new(),
            health: Health::Healthy,
            zone: None,
        }
    }

    pub(crate) fn service(name: &str, port: u16, protocol: Protocol) -> Service {
        Service {
            name: name.into(),
            namespace: "default".into(),
            vip: None,
            hostname: None,
            ports: vec![ServicePort {
                name: Some("main".into()),
                port,
                protocol,
                target_port: None,
            }],
            load_balancer: LoadBalancer::RoundRobin,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            mtls: MtlsMode::Strict,
            detect_timeout: None,
            subsets: Vec::new(),
            endpoints: vec![endpoint([127, 0, 0, 1], 9000)],
            routes: Vec::new(),
        }
    }

    pub(crate) fn backend(name: &str, weight: u32) -> Backend {
        Backend {
            service: ServiceKey {
                namespace: "default".into(),
                name: name.into(),
            },
            port: None,
            subset: None,
            weight,
        }
    }

    pub(crate) fn route(name: &str, backends: Vec<Backend>) -> Route {
        Route {
            name: name.into(),
            matches: RouteMatch::default(),
            backends,
            timeout: None,
            retry: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    fn errors(services: Vec<Service>) -> Vec<String> {
        match Mesh::new(DEFAULT_TRUST_DOMAIN.into(), services, Vec::new()) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_valid_mesh_builds() {
        let mut web = service("web", 80, Protocol::Http);
        web.routes = vec![route("all", vec![backend("api", 1)])];
        let api = service("api", 8080, Protocol::Grpc);
        assert_eq!(errors(vec![web, api]), Vec::<String>::new());
    }

    fn external(name: &str, hostname: &str) -> Service {
        Service {
            namespace: "ext".into(),
            hostname: Some(hostname.into()),
            endpoints: Vec::new(),
            ..service(name, 8080, Protocol::Http)
        }
    }

    #[test]
    fn a_service_by_hostname_is_valid_and_routable() {
        let mut web = service("web", 80, Protocol::Http);
        let mut to_api = backend("api", 1);
        to_api.service.namespace = "ext".into();
        web.routes = vec![route("all", vec![to_api])];
        let api = external("api", "api.example.test");
        assert_eq!(errors(vec![web, api]), Vec::<String>::new());
    }

    #[test]
    fn a_hostname_is_checked_and_excludes_endpoints_and_subsets() {
        let mut with_endpoints = external("a", "a.example.test");
        with_endpoints.endpoints = vec![endpoint([127, 0, 0, 1], 9000)];
        with_endpoints.subsets = vec![Subset {
            name: "v1".into(),
            labels: BTreeMap::from([("version".into(), "v1".into())]),
        }];
        let errs = errors(vec![
            with_endpoints,
            external("b", "Api.Example.test"),
            external("c", "10.0.0.1"),
            external("d", "bad..name"),
            external("e", "a.example.test"),
            external("f", "web.default"),
            service("web", 80, Protocol::Http),
        ]);
        assert_eq!(
            errs,
            [
                "services[0].endpoints: a service with a hostname gets its instances from DNS: remove `endpoints` (or `hostname`)",
                "services[0].subsets: a service with a hostname has no labelled endpoints to select: remove `subsets`",
                "services[1].hostname: \"Api.Example.test\" is not a DNS name: write it in lower case",
                "services[2].hostname: \"10.0.0.1\" is not a DNS name: it is an IP address: give the service `endpoints` instead",
                "services[3].hostname: \"bad..name\" is not a DNS name: each dot-separated label must be 1-63 letters, digits or '-', not starting or ending with '-'",
                "services[4].hostname: duplicate hostname \"a.example.test\": services[0] already has it",
                "services[5].hostname: \"web.default\" is a name of the mesh's service web.default: an external service needs a name outside the mesh",
            ]
        );
    }

    #[test]
    fn duplicate_service_names_the_first_definition() {
        let errs = errors(vec![
            service("web", 80, Protocol::Http),
            service("web", 81, Protocol::Http),
        ]);
        assert_eq!(
            errs,
            vec!["services[1].name: duplicate service web.default: already defined at services[0]"]
        );
    }

    #[test]
    fn missing_backend_and_zero_weights_are_both_reported() {
        let mut web = service("web", 80, Protocol::Http);
        web.routes = vec![route("r", vec![backend("nope", 0)])];
        let errs = errors(vec![web]);
        assert!(
            errs.contains(&"services[0].routes[0].backends: backend weights sum to 0: give at least one backend a weight above 0".to_string()),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with(
                "services[0].routes[0].backends[0].service: route to a missing backend"
            )),
            "{errs:?}"
        );
    }

    #[test]
    fn ports_and_names_are_checked() {
        let mut web = service("Web", 0, Protocol::Http);
        web.ports.push(web.ports[0].clone());
        let errs = errors(vec![web]);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("services[0].name: \"Web\" is not a valid name")),
            "{errs:?}"
        );
        assert!(
            errs.contains(&"services[0].ports[0].port: port must be 1-65535".to_string()),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("services[0].ports[1].port: duplicate port 0")),
            "{errs:?}"
        );
    }

    #[test]
    fn unknown_subset_lists_the_known_ones() {
        let mut api = service("api", 80, Protocol::Http);
        api.subsets = vec![Subset {
            name: "v1".into(),
            labels: [("version".to_string(), "v1".to_string())].into(),
        }];
        let mut web = service("web", 80, Protocol::Http);
        let mut b = backend("api", 1);
        b.subset = Some("v2".into());
        web.routes = vec![route("r", vec![b])];
        assert_eq!(
            errors(vec![web, api]),
            vec![
                "services[0].routes[0].backends[0].subset: service api.default has no subset \"v2\"; subsets: v1"
            ]
        );
    }

    #[test]
    fn multi_port_backend_without_a_matching_port_must_name_one() {
        let mut api = service("api", 8080, Protocol::Http);
        api.ports.push(ServicePort {
            name: Some("admin".into()),
            port: 9090,
            protocol: Protocol::Http,
            target_port: None,
        });
        let mut web = service("web", 80, Protocol::Http);
        web.routes = vec![route("r", vec![backend("api", 1)])];
        let errs = errors(vec![web.clone(), api.clone()]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("name one with `port`"), "{errs:?}");
        web.routes[0].backends[0].port = Some(9090);
        assert_eq!(errors(vec![web, api]), Vec::<String>::new());
    }

    #[test]
    fn endpoint_port_resolution_prefers_named_then_own_then_target() {
        let port = ServicePort {
            name: Some("http".into()),
            port: 80,
            protocol: Protocol::Http,
            target_port: Some(8080),
        };
        let mut e = endpoint([10, 0, 0, 1], 9000);
        assert_eq!(e.port_for(&port), 9000);
        e.ports.insert("http".into(), 9001);
        assert_eq!(e.port_for(&port), 9001);
        e.ports.clear();
        e.port = None;
        assert_eq!(e.port_for(&port), 8080);
    }

    #[test]
    fn field_paths_render_like_the_file() {
        let p = FieldPath::root()
            .key("services")
            .index(2)
            .key("routes")
            .index(0)
            .key("name");
        assert_eq!(p.to_string(), "services[2].routes[0].name");
    }

    #[test]
    fn invalid_regex_is_refused_at_construction() {
        assert!(Pattern::new("^/api/(v1|v2").is_err());
        assert!(Pattern::new("^/api/(v1|v2)/.*$").is_ok());
    }
}
