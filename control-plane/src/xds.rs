//! The Aggregated Discovery Service: state-of-the-world and delta streams
//! over gRPC, serving the views `translate` makes of each snapshot.
//!
//! Each stream is a task that owns a state machine ([`sotw::SotwStream`] or
//! [`delta::DeltaStream`]) and feeds it two inputs: the client's requests
//! and new snapshots. The state machines do all protocol work and are
//! tested without sockets.

pub mod delta;
pub mod snapshot;
pub mod sotw;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use remora_xds_proto::pb::envoy::config::core::v3::Node;
use remora_xds_proto::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::translate::{NodeError, ResourceType, Resources, View, client_kind};
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
}

impl ClientInfo {
    /// Reads the node descriptor of a stream's first request.
    pub fn from_node(node: Option<&Node>) -> Result<ClientInfo, StreamError> {
        let node = node.ok_or(StreamError::NoNode)?;
        Ok(ClientInfo {
            node_id: node.id.clone(),
            node_cluster: node.cluster.clone(),
            kind: client_kind(node),
            view: View::for_node(node)?,
        })
    }
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
    #[error("type {0:?} is not served here (served: LDS, RDS, CDS, EDS)")]
    UnknownType(String),
}

/// The ADS gRPC service.
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    registry: Arc<SyncRegistry>,
    next_stream: AtomicU64,
}

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
            next_stream: AtomicU64::new(1),
        }
    }

    /// The tonic service wrapping this server.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(16 << 20)
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

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let cx = self.stream_context();
        tokio::spawn(cx.run(request.into_inner(), tx, sotw::SotwStream::default()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let cx = self.stream_context();
        tokio::spawn(cx.run(request.into_inner(), tx, delta::DeltaStream::default()));
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

/// What both protocols keep per stream: who the client is and the nonce
/// counter.
#[derive(Debug)]
pub struct StreamCore {
    client: Option<ClientInfo>,
    last_nonce: u64,
    connected_at: u64,
}

impl Default for StreamCore {
    fn default() -> Self {
        StreamCore {
            client: None,
            last_nonce: 0,
            connected_at: status::unix_now(),
        }
    }
}

impl StreamCore {
    /// Learns the client from the first request's node.
    fn identify(&mut self, node: Option<&Node>) -> Result<(), StreamError> {
        if self.client.is_none() {
            self.client = Some(ClientInfo::from_node(node)?);
        }
        Ok(())
    }

    /// The client's view of `snapshot`.
    fn view(&self, snapshot: &Snapshot) -> Result<Arc<Resources>, StreamError> {
        let client = self.client.as_ref().ok_or(StreamError::NoNode)?;
        Ok(snapshot.view(&client.view))
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
        mut inbound: Streaming<M::Request>,
        tx: mpsc::Sender<Result<M::Response, Status>>,
        mut machine: M,
    ) {
        let mut counted: Option<(&'static str, &'static str)> = None;
        let result: Result<(), Status> = async {
            loop {
                let (responses, from_snapshot) = tokio::select! {
                    message = inbound.message() => {
                        let Some(request) = message? else { return Ok(()) };
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
                            Err(e) => return Err(Status::invalid_argument(e.to_string())),
                        }
                    }
                    changed = self.snapshots.changed() => {
                        if changed.is_err() {
                            return Err(Status::unavailable("control plane shutting down"));
                        }
                        let snapshot = self.snapshots.borrow_and_update().clone();
                        let responses = machine
                            .on_snapshot(&snapshot)
                            .map_err(|e| Status::invalid_argument(e.to_string()))?;
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
