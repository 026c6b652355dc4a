//! The Aggregated Discovery Service: state-of-the-world and delta streams
//! over gRPC, serving the views `translate` makes of each snapshot.
//!
//! Each stream is a task that owns a state machine ([`sotw::SotwStream`] or
//! [`delta::DeltaStream`]) and feeds it two inputs: the client's requests
//! and new snapshots. The state machines do all protocol work and are
//! tested without sockets.

pub mod delta;
pub mod grpc;
pub mod names;
pub mod secrets;
pub mod snapshot;
pub mod sotw;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use remora_xds_proto::pb::envoy::config::core::v3::Node;
use remora_xds_proto::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_server::AggregatedDiscoveryService,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::model::{Identity, Secret};
use crate::tls::TlsPeer;
use crate::translate::{
    Flavor, META_NAMESPACE, META_SERVICE_ACCOUNT, META_TOKEN, NodeError, Resource, ResourceType,
    Resources, SECRET_DEFAULT, TypeResources, View, client_kind, node_metadata,
};
use secrets::{NodeCredentials, SecretSource};
use snapshot::Snapshot;
use status::SyncRegistry;

/// Responses queued per stream before the stream task waits for the client.
const STREAM_BUFFER: usize = 4;

/// Who is on the other end of a stream, from its first request.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientInfo {
    /// `node.id`.
    pub node_id: String,
    /// `node.cluster`.
    pub node_cluster: String,
    /// `envoy`, `grpc` or `remora`.
    pub kind: &'static str,
    /// What it is sent.
    pub view: View,
    /// How it may prove its identity, for its SDS certificate.
    pub credentials: NodeCredentials,
}

impl ClientInfo {
    /// Reads the node descriptor of a stream's first request, which came
    /// over `transport`. On the TLS listener the node's identity (metadata
    /// `NAMESPACE` and `SERVICE_ACCOUNT`) must be its certificate's.
    pub fn from_node(
        node: Option<&Node>,
        transport: &Transport,
        trust_domain: &str,
    ) -> Result<ClientInfo, StreamError> {
        let node = node.ok_or(StreamError::NoNode)?;
        let identity = node_metadata(node, META_SERVICE_ACCOUNT).map(|sa| Identity {
            namespace: node_metadata(node, META_NAMESPACE)
                .unwrap_or("default")
                .to_string(),
            service_account: sa.to_string(),
        });
        let tls_peer = match transport {
            Transport::Plaintext => None,
            Transport::Tls { spiffe_id } => {
                let claimed = identity.as_ref().map(|i| i.spiffe_id(trust_domain));
                if claimed.as_deref() != Some(spiffe_id.as_str()) {
                    return Err(StreamError::PermissionDenied(format!(
                        "node {:?}: the node metadata ({META_NAMESPACE}, {META_SERVICE_ACCOUNT}) \
                         names identity {} but the client certificate is {spiffe_id}",
                        node.id,
                        claimed.as_deref().unwrap_or("none (no SERVICE_ACCOUNT)"),
                    )));
                }
                Some(spiffe_id.clone())
            }
        };
        Ok(ClientInfo {
            node_id: node.id.clone(),
            node_cluster: node.cluster.clone(),
            kind: client_kind(node),
            view: View::for_node(node)?,
            credentials: NodeCredentials {
                identity,
                token: node_metadata(node, META_TOKEN).map(Secret::new),
                tls_peer,
            },
        })
    }
}

/// Which listener a stream came in on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Transport {
    /// The plaintext listener (local only): nodes are who they say.
    #[default]
    Plaintext,
    /// The TLS listener, with a client certificate for this SPIFFE ID.
    Tls {
        /// The client certificate's SPIFFE ID.
        spiffe_id: String,
    },
}

/// What handling one request produced.
#[derive(Debug)]
pub struct Outcome<R> {
    /// Responses to send, in order.
    pub responses: Vec<R>,
    /// A NACK the client sent: type and message.
    pub nack: Option<(ResourceType, String)>,
}

impl<R> Outcome<R> {
    fn new() -> Outcome<R> {
        Outcome {
            responses: Vec::new(),
            nack: None,
        }
    }
}

/// Why a request could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The first request had no node descriptor.
    #[error("the first request on a stream must carry the node descriptor")]
    NoNode,
    /// The node's metadata is unusable.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A type this server does not serve.
    #[error("type {0:?} is not served here (served: LDS, RDS, CDS, EDS, SDS)")]
    UnknownType(String),
    /// On the TLS listener, the node claims another identity than its
    /// certificate's.
    #[error("{0}")]
    PermissionDenied(String),
}

impl StreamError {
    /// The gRPC status that ends the stream.
    fn status(&self) -> Status {
        match self {
            StreamError::PermissionDenied(m) => Status::permission_denied(m.clone()),
            e => Status::invalid_argument(e.to_string()),
        }
    }
}

/// The ADS gRPC service.
#[derive(Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    registry: Arc<SyncRegistry>,
    next_stream: Arc<AtomicU64>,
    secrets: Option<Arc<SecretSource>>,
    require_client_certificate: bool,
}

/// The message of a stream refused for lack of a client certificate.
pub const CLIENT_CERTIFICATE_REQUIRED: &str = "a client certificate is required for ADS on the TLS \
     listener: connect with the workload's mesh certificate, or use the plaintext listener \
     (--xds-addr) from the same host";

impl AdsServer {
    /// A server of the snapshots `snapshots` publishes. When `stop` turns
    /// true every stream ends with UNAVAILABLE, so clients reconnect (to
    /// another replica) instead of holding shutdown up.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        stop: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        registry: Arc<SyncRegistry>,
    ) -> AdsServer {
        AdsServer {
            snapshots,
            stop,
            metrics,
            registry,
            next_stream: Arc::new(AtomicU64::new(1)),
            secrets: None,
            require_client_certificate: false,
        }
    }

    /// Serves SDS secrets (`ROOTCA`, and `default` to nodes that prove
    /// their identity) from `source`.
    pub fn with_secrets(mut self, source: Arc<SecretSource>) -> AdsServer {
        self.secrets = Some(source);
        self
    }

    /// The same server for the TLS listener: every stream must come with
    /// a client certificate (else UNAUTHENTICATED), and its node must claim
    /// the certificate's identity (else PERMISSION_DENIED). Stream ids stay
    /// unique across both.
    pub fn for_tls_listener(&self) -> AdsServer {
        AdsServer {
            require_client_certificate: true,
            ..self.clone()
        }
    }

    /// Which transport a stream uses, or why it is refused.
    fn transport(&self, extensions: &http::Extensions) -> Result<Transport, Status> {
        if !self.require_client_certificate {
            return Ok(Transport::Plaintext);
        }
        let peer = extensions.get::<TlsPeer>();
        match peer.and_then(|p| p.spiffe_id.clone()) {
            Some(spiffe_id) => Ok(Transport::Tls { spiffe_id }),
            None => {
                tracing::info!(
                    peer = ?peer.and_then(|p| p.remote_addr),
                    "refused an ADS stream on the TLS listener without a client certificate"
                );
                Err(Status::unauthenticated(CLIENT_CERTIFICATE_REQUIRED))
            }
        }
    }

    /// The gRPC service serving this server's streams.
    pub fn into_service(self) -> grpc::AdsService {
        grpc::AdsService::new(self)
    }

    fn core(&self, transport: Transport) -> StreamCore {
        StreamCore::new(transport, self.secrets.clone())
    }

    fn stream_context(&self) -> StreamContext {
        StreamContext {
            id: self.next_stream.fetch_add(1, Ordering::Relaxed),
            snapshots: self.snapshots.clone(),
            stop: self.stop.clone(),
            metrics: self.metrics.clone(),
            registry: self.registry.clone(),
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    /// Never called: [`grpc::AdsService`] serves this method itself.
    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::internal(
            "state-of-the-world ADS is served by grpc::AdsService",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let core = self.core(self.transport(request.extensions())?);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let cx = self.stream_context();
        tokio::spawn(cx.run(request.into_inner(), tx, delta::DeltaStream::new(core)));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

// === Stream task ===

/// A protocol state machine, as the stream task drives it.
pub trait StreamMachine: Send + 'static {
    /// What the client sends.
    type Request: Send + 'static;
    /// What the server sends.
    type Response: Send + 'static;
    /// `sotw` or `delta`, for metrics and the sync status.
    const API: &'static str;

    /// Handles one request against the current snapshot.
    fn on_request(
        &mut self,
        request: Self::Request,
        snapshot: &Snapshot,
    ) -> Result<Outcome<Self::Response>, StreamError>;
    /// Sends what changed in `snapshot`, type by type in push order.
    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Result<Vec<Self::Response>, StreamError>;
    /// What every stream keeps.
    fn core(&self) -> &StreamCore;
    /// What every stream keeps, to change.
    fn core_mut(&mut self) -> &mut StreamCore;
    /// Per-type status, for `/debug/syncz`.
    fn type_statuses(&self) -> BTreeMap<&'static str, status::TypeStatus>;
    /// `CDS`, `EDS`, ... of a response.
    fn type_name(response: &Self::Response) -> &'static str;

    /// The client, once its first request named it.
    fn client(&self) -> Option<&ClientInfo> {
        self.core().client.as_ref()
    }

    /// The stream's status, once the client is known.
    fn status(&self) -> Option<status::ClientStatus> {
        let core = self.core();
        let client = core.client.as_ref()?;
        Some(status::ClientStatus {
            node_id: client.node_id.clone(),
            node_cluster: client.node_cluster.clone(),
            kind: client.kind,
            api: Self::API,
            connected_at: core.connected_at,
            types: self.type_statuses(),
        })
    }
}

/// What both protocols keep per stream: who the client is, how it
/// connected, its secrets and the nonce counter.
#[derive(Debug)]
pub struct StreamCore {
    client: Option<ClientInfo>,
    transport: Transport,
    secrets: Option<ClientSecrets>,
    last_nonce: u64,
    connected_at: u64,
}

impl Default for StreamCore {
    fn default() -> Self {
        StreamCore::new(Transport::Plaintext, None)
    }
}

/// A client's SDS secrets.
#[derive(Debug)]
struct ClientSecrets {
    source: Arc<SecretSource>,
    /// The `default` secret, once issued.
    default: Option<Resource>,
    /// What happens next to `default`.
    next: NextIssue,
    /// What the client is sent: `ROOTCA` and `default`.
    resources: Arc<TypeResources>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NextIssue {
    /// Not asked for yet.
    OnRequest,
    /// Re-issue (or retry) then.
    At(Instant),
    /// Refused: not until the client reconnects.
    Never,
}

/// The resources of one client: its view and its secrets.
#[derive(Debug, Clone)]
pub struct ClientResources {
    view: Arc<Resources>,
    secrets: Arc<TypeResources>,
}

impl ClientResources {
    /// The resources of `ty`.
    pub fn of(&self, ty: ResourceType) -> &TypeResources {
        match ty {
            ResourceType::Secret => &self.secrets,
            ty => self.view.of(ty),
        }
    }
}

impl StreamCore {
    /// A stream that came over `transport`, serving secrets from `secrets`
    /// (none: SDS requests get empty answers).
    pub fn new(transport: Transport, secrets: Option<Arc<SecretSource>>) -> StreamCore {
        StreamCore {
            client: None,
            transport,
            secrets: secrets.map(|source| ClientSecrets {
                source,
                default: None,
                next: NextIssue::OnRequest,
                resources: Arc::new(TypeResources::default()),
            }),
            last_nonce: 0,
            connected_at: status::unix_now(),
        }
    }

    /// Learns the client from the first request's node.
    fn identify(&mut self, node: Option<&Node>, snapshot: &Snapshot) -> Result<(), StreamError> {
        if self.client.is_none() {
            let client =
                ClientInfo::from_node(node, &self.transport, snapshot.mesh().trust_domain())?;
            if client.view.flavor != Flavor::Sidecar {
                // gRPC clients do not speak SDS.
                self.secrets = None;
            }
            if let Some(secrets) = &mut self.secrets {
                secrets.resources =
                    Arc::new(TypeResources::new(vec![secrets.source.rootca().clone()]));
            }
            self.client = Some(client);
        }
        Ok(())
    }

    /// The client's view of `snapshot`, and its secrets.
    fn view(&self, snapshot: &Snapshot) -> Result<ClientResources, StreamError> {
        let client = self.client.as_ref().ok_or(StreamError::NoNode)?;
        Ok(ClientResources {
            view: snapshot.view(&client.view),
            secrets: self
                .secrets
                .as_ref()
                .map(|s| s.resources.clone())
                .unwrap_or_default(),
        })
    }

    /// Called with each SDS subscription: the first that names `default`
    /// (or is a wildcard) issues the workload certificate, if the node
    /// proves its identity.
    fn secrets_requested(&mut self, wants_default: bool, snapshot: &Snapshot) {
        let pending = self
            .secrets
            .as_ref()
            .is_some_and(|s| s.next == NextIssue::OnRequest);
        if wants_default && pending {
            self.issue_default(snapshot);
        }
    }

    /// When the workload certificate is to be re-issued.
    pub fn secrets_due(&self) -> Option<Instant> {
        match self.secrets.as_ref()?.next {
            NextIssue::At(at) => Some(at),
            NextIssue::OnRequest | NextIssue::Never => None,
        }
    }

    /// Re-issues the workload certificate if it is due.
    pub fn renew_secrets(&mut self, snapshot: &Snapshot) {
        if self.secrets_due().is_some_and(|at| at <= Instant::now()) {
            self.issue_default(snapshot);
        }
    }

    fn issue_default(&mut self, snapshot: &Snapshot) {
        let (Some(secrets), Some(client)) = (self.secrets.as_mut(), self.client.as_ref()) else {
            return;
        };
        match secrets
            .source
            .workload_secret(&client.credentials, snapshot.mesh())
        {
            Ok((resource, renew_at)) => {
                secrets.default = Some(resource);
                secrets.next = NextIssue::At(renew_at);
            }
            Err(refused) => {
                let internal = refused.reason == crate::ca::service::RefusalReason::Internal;
                tracing::warn!(
                    node = client.node_id,
                    reason = refused.reason.as_str(),
                    "not sending the {SECRET_DEFAULT:?} certificate over SDS: {}",
                    refused.message
                );
                // A CA failure is retried; a refusal holds until the client
                // reconnects (with other credentials). A certificate issued
                // before keeps being served until it expires.
                secrets.next = if internal {
                    NextIssue::At(SecretSource::retry_at())
                } else {
                    NextIssue::Never
                };
            }
        }
        let mut resources = vec![secrets.source.rootca().clone()];
        resources.extend(secrets.default.clone());
        secrets.resources = Arc::new(TypeResources::new(resources));
    }

    fn next_nonce(&mut self) -> u64 {
        self.last_nonce += 1;
        self.last_nonce
    }
}

struct StreamContext {
    id: u64,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    registry: Arc<SyncRegistry>,
}

impl StreamContext {
    async fn run<M: StreamMachine>(
        mut self,
        inbound: impl futures::Stream<Item = Result<M::Request, Status>> + Send,
        tx: mpsc::Sender<Result<M::Response, Status>>,
        mut machine: M,
    ) {
        let mut counted: Option<(&'static str, &'static str)> = None;
        let mut inbound = std::pin::pin!(inbound);
        let result: Result<(), Status> = async {
            loop {
                let secrets_due = machine.core().secrets_due();
                let (responses, from_snapshot) = tokio::select! {
                    message = futures::StreamExt::next(&mut inbound) => {
                        let Some(request) = message.transpose()? else { return Ok(()) };
                        let snapshot = self.snapshots.borrow_and_update().clone();
                        match machine.on_request(request, &snapshot) {
                            Ok(outcome) => {
                                if let Some((ty, message)) = &outcome.nack {
                                    self.record_nack(&machine, *ty, message);
                                }
                                (outcome.responses, None)
                            }
                            Err(StreamError::UnknownType(url)) => {
                                tracing::warn!(stream = self.id, type_url = url, "request for a type this server does not serve, ignored");
                                (Vec::new(), None)
                            }
                            Err(e) => return Err(e.status()),
                        }
                    }
                    () = async {
                        match secrets_due {
                            Some(at) => tokio::time::sleep_until(at.into()).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        let snapshot = self.snapshots.borrow().clone();
                        machine.core_mut().renew_secrets(&snapshot);
                        let responses = machine.on_snapshot(&snapshot).map_err(|e| e.status())?;
                        (responses, None)
                    }
                    changed = self.snapshots.changed() => {
                        if changed.is_err() {
                            return Err(Status::unavailable("control plane shutting down"));
                        }
                        let snapshot = self.snapshots.borrow_and_update().clone();
                        let responses = machine.on_snapshot(&snapshot).map_err(|e| e.status())?;
                        (responses, Some(snapshot))
                    }
                    () = tx.closed() => return Ok(()),
                    () = async { let _ = self.stop.wait_for(|stop| *stop).await; } => {
                        return Err(Status::unavailable("control plane shutting down"));
                    }
                };
                if counted.is_none()
                    && let Some(client) = machine.client()
                {
                    let labels = (client.kind, M::API);
                    self.metrics.xds_clients.with_label_values(&[labels.0, labels.1]).inc();
                    counted = Some(labels);
                    tracing::info!(stream = self.id, node = client.node_id, kind = client.kind, api = M::API, "xDS client connected");
                }
                for response in responses {
                    self.metrics
                        .xds_pushes
                        .with_label_values(&[M::type_name(&response)])
                        .inc();
                    if let Some(snapshot) = &from_snapshot {
                        self.metrics
                            .xds_push_duration
                            .observe(snapshot.created().elapsed().as_secs_f64());
                    }
                    if tx.send(Ok(response)).await.is_err() {
                        return Ok(());
                    }
                }
                if let Some(status) = machine.status() {
                    self.registry.update(self.id, status);
                }
            }
        }
        .await;

        if let Err(status) = &result {
            tracing::info!(stream = self.id, node = machine.client().map(|c| c.node_id.as_str()), error = %status.message(), "xDS stream ended");
            let _ = tx.send(Err(status.clone())).await;
        } else {
            tracing::info!(
                stream = self.id,
                node = machine.client().map(|c| c.node_id.as_str()),
                "xDS client disconnected"
            );
        }
        if let Some((kind, api)) = counted {
            self.metrics
                .xds_clients
                .with_label_values(&[kind, api])
                .dec();
        }
        self.registry.remove(self.id);
    }

    fn record_nack<M: StreamMachine>(&self, machine: &M, ty: ResourceType, message: &str) {
        self.metrics
            .xds_nacks
            .with_label_values(&[ty.short_name()])
            .inc();
        let node = machine.client().map_or("", |c| c.node_id.as_str());
        tracing::warn!(stream = self.id, node, r#type = %ty, "client rejected configuration (NACK): {message}");
    }
}

#[cfg(test)]
mod tests;
