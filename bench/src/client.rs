//! A simulated Envoy on one ADS state-of-the-world stream: subscribes CDS
//! and LDS wildcard, then EDS and RDS by the names those reference, and
//! ACKs every response with its version and nonce.
//!
//! Thousands of these run in one process next to the control plane on the
//! same cores, so they decode as little as they can: a response is kept as
//! bytes and only its version, type URL, nonce and resource count are read
//! (prost skips the rest without copying). The names EDS and RDS need are
//! read from the CDS and LDS resources once per version for all clients
//! ([`NameCache`]): clients of the same view get the same versions.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use bytes::{Buf, Bytes};
use http::uri::PathAndQuery;
use prost::Message;
use remora_xds_proto::pb::envoy::config::core::v3::Node;
use remora_xds_proto::pb::envoy::service::discovery::v3::DiscoveryRequest;
use remora_xds_proto::type_url;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// The ADS method, as `AggregatedDiscoveryServiceClient` calls it.
pub const ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// The resource types a sidecar subscribes to, in the order Envoy asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Type {
    /// Clusters, wildcard.
    Cds = 0,
    /// Endpoints, by the EDS names of the clusters.
    Eds = 1,
    /// Listeners, wildcard.
    Lds = 2,
    /// Routes, by the RDS names of the listeners.
    Rds = 3,
}

impl Type {
    /// Every type, indexable by `as usize`.
    pub const ALL: [Type; 4] = [Type::Cds, Type::Eds, Type::Lds, Type::Rds];

    /// The type URL.
    pub fn url(self) -> &'static str {
        match self {
            Type::Cds => type_url::CLUSTER,
            Type::Eds => type_url::ENDPOINT,
            Type::Lds => type_url::LISTENER,
            Type::Rds => type_url::ROUTE,
        }
    }

    /// The short name (`CDS`, ...).
    pub fn short(self) -> &'static str {
        type_url::short_name(self.url())
    }

    fn from_url(url: &str) -> Option<Type> {
        Type::ALL.into_iter().find(|t| t.url() == url)
    }
}

/// What a client tells the benchmark.
#[derive(Debug)]
pub enum Event {
    /// Every type ACKed once, EDS and RDS with the names CDS and LDS
    /// reference. `versions` is indexed by [`Type`].
    Synced {
        /// The client's index.
        client: usize,
        /// When the last ACK of the initial config was queued.
        at: Instant,
        /// The ACKed versions.
        versions: [String; 4],
        /// The size of the last response of each type, bytes.
        sizes: [usize; 4],
    },
    /// A later ACK.
    Acked {
        /// The client's index.
        client: usize,
        /// Its type.
        ty: Type,
        /// The ACKed version.
        version: String,
        /// When the ACK was queued.
        at: Instant,
    },
    /// The stream failed.
    Failed {
        /// The client's index.
        client: usize,
        /// The status.
        error: String,
    },
}

// === Cheap decoding ===

/// The parts of a `DiscoveryResponse` a client needs; `resources` is only
/// counted.
#[derive(Clone, PartialEq, Message)]
struct ResponseHeader {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(message, repeated, tag = "2")]
    resources: Vec<Skipped>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
}

/// A message whose content is skipped.
#[derive(Clone, PartialEq, Message)]
struct Skipped {}

/// `DiscoveryResponse.resources` as `Any` values, unparsed.
#[derive(Clone, PartialEq, Message)]
struct ResourceValues {
    #[prost(message, repeated, tag = "2")]
    resources: Vec<AnyValue>,
}

#[derive(Clone, PartialEq, Message)]
struct AnyValue {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
}

/// `Cluster`: name, discovery type (`type`, EDS = 3) and EDS service name.
#[derive(Clone, PartialEq, Message)]
struct ClusterNames {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int32, optional, tag = "2")]
    discovery_type: Option<i32>,
    #[prost(message, optional, tag = "3")]
    eds_cluster_config: Option<EdsClusterConfig>,
}

#[derive(Clone, PartialEq, Message)]
struct EdsClusterConfig {
    #[prost(string, tag = "2")]
    service_name: String,
}

const DISCOVERY_TYPE_EDS: i32 = 3;

/// `Listener`: filter chains down to the HCM's RDS name.
#[derive(Clone, PartialEq, Message)]
struct ListenerChains {
    #[prost(message, repeated, tag = "3")]
    filter_chains: Vec<FilterChain>,
    #[prost(message, optional, tag = "25")]
    default_filter_chain: Option<FilterChain>,
}

#[derive(Clone, PartialEq, Message)]
struct FilterChain {
    #[prost(message, repeated, tag = "3")]
    filters: Vec<Filter>,
}

#[derive(Clone, PartialEq, Message)]
struct Filter {
    #[prost(message, optional, tag = "4")]
    typed_config: Option<AnyValue>,
}

#[derive(Clone, PartialEq, Message)]
struct Hcm {
    #[prost(message, optional, tag = "3")]
    rds: Option<Rds>,
}

#[derive(Clone, PartialEq, Message)]
struct Rds {
    #[prost(string, tag = "2")]
    route_config_name: String,
}

const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

type Names = Arc<BTreeSet<String>>;

fn eds_names(response: &Bytes) -> Result<BTreeSet<String>, prost::DecodeError> {
    let mut names = BTreeSet::new();
    for any in ResourceValues::decode(response.clone())?.resources {
        let c = ClusterNames::decode(any.value)?;
        if c.discovery_type == Some(DISCOVERY_TYPE_EDS) {
            let service_name = c.eds_cluster_config.map(|e| e.service_name);
            names.insert(service_name.filter(|s| !s.is_empty()).unwrap_or(c.name));
        }
    }
    Ok(names)
}

fn rds_names(response: &Bytes) -> Result<BTreeSet<String>, prost::DecodeError> {
    let mut names = BTreeSet::new();
    for any in ResourceValues::decode(response.clone())?.resources {
        let l = ListenerChains::decode(any.value)?;
        for chain in l.filter_chains.iter().chain(&l.default_filter_chain) {
            for config in chain.filters.iter().filter_map(|f| f.typed_config.as_ref()) {
                if config.type_url == HCM_TYPE
                    && let Some(rds) = Hcm::decode(config.value.clone())?.rds
                {
                    names.insert(rds.route_config_name);
                }
            }
        }
    }
    Ok(names)
}

/// The EDS names of each CDS version and the RDS names of each LDS version,
/// read once for all clients.
#[derive(Debug, Default)]
pub struct NameCache {
    #[allow(clippy::type_complexity, reason = "a private memo table")]
    map: Mutex<HashMap<(Type, String), Arc<OnceLock<Result<Names, String>>>>>,
}

impl NameCache {
    fn names(&self, ty: Type, version: &str, response: &Bytes) -> Result<Names, Status> {
        let cell = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((ty, version.to_string()))
            .or_default()
            .clone();
        cell.get_or_init(|| {
            let names = match ty {
                Type::Cds => eds_names(response),
                _ => rds_names(response),
            };
            names.map(Arc::new).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| Status::internal(format!("cannot read {} resources: {e}", ty.short())))
    }
}

// === Codec: requests as prost messages, responses as bytes ===

/// Encodes `DiscoveryRequest`s and hands responses over as bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdsCodec;

/// A `DiscoveryResponse`, not yet decoded.
#[derive(Debug)]
pub struct RawResponse(Bytes);

/// [`AdsCodec`]'s encoder.
#[derive(Debug)]
pub struct RequestEncoder;

/// [`AdsCodec`]'s decoder.
#[derive(Debug)]
pub struct RawDecoder;

impl Codec for AdsCodec {
    type Encode = DiscoveryRequest;
    type Decode = RawResponse;
    type Encoder = RequestEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RequestEncoder {
        RequestEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RequestEncoder {
    type Item = DiscoveryRequest;
    type Error = Status;

    fn encode(&mut self, item: DiscoveryRequest, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding a request: {e}")))
    }
}

impl Decoder for RawDecoder {
    type Item = RawResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<RawResponse>, Status> {
        // `BytesMut::copy_to_bytes` splits the buffer: no copy.
        Ok(Some(RawResponse(src.copy_to_bytes(src.remaining()))))
    }
}

// === The client ===

#[derive(Debug, Default)]
struct TypeState {
    names: Names,
    version: String,
    nonce: String,
    acks: u64,
    /// A subscription change was sent and not yet answered.
    pending: bool,
}

fn request(ty: Type, names: &Names, version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: ty.url().to_string(),
        resource_names: names.iter().cloned().collect(),
        version_info: version.to_string(),
        response_nonce: nonce.to_string(),
        ..Default::default()
    }
}

/// Runs client `client` on `channel` until its stream ends; reports
/// through `events` (a failure included).
pub async fn run(
    channel: Channel,
    client: usize,
    node: Node,
    cache: Arc<NameCache>,
    events: mpsc::UnboundedSender<Event>,
) {
    if let Err(status) = stream(channel, client, node, &cache, &events).await {
        let _ = events.send(Event::Failed {
            client,
            error: format!("{}: {}", status.code(), status.message()),
        });
    }
}

async fn stream(
    channel: Channel,
    client: usize,
    node: Node,
    cache: &NameCache,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    let send = |r: DiscoveryRequest| {
        tx.send(r)
            .map_err(|_| Status::cancelled("request stream closed"))
    };
    // Like Envoy with `set_node_on_first_message_only`.
    let none = Names::default();
    send(DiscoveryRequest {
        node: Some(node),
        ..request(Type::Cds, &none, "", "")
    })?;
    send(request(Type::Lds, &none, "", ""))?;

    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let mut responses = grpc
        .streaming(
            tonic::Request::new(UnboundedReceiverStream::new(rx)),
            PathAndQuery::from_static(ADS_PATH),
            AdsCodec,
        )
        .await?
        .into_inner();

    let mut types: [TypeState; 4] = Default::default();
    let mut sizes = [0; 4];
    let mut synced = false;
    while let Some(RawResponse(bytes)) = responses.message().await? {
        let header = ResponseHeader::decode(bytes.clone())
            .map_err(|e| Status::internal(format!("malformed response: {e}")))?;
        let Some(ty) = Type::from_url(&header.type_url) else {
            continue;
        };
        // A new set of clusters or listeners may reference other endpoints
        // or routes: subscribe before ACKing, as Envoy does while warming.
        let follower = match ty {
            Type::Cds => Some(Type::Eds),
            Type::Lds => Some(Type::Rds),
            Type::Eds | Type::Rds => None,
        };
        if let Some(f) = follower {
            let names = cache.names(ty, &header.version_info, &bytes)?;
            let state = &mut types[f as usize];
            if names != state.names || state.acks == 0 && !state.pending {
                state.names = names;
                state.pending = true;
                send(request(f, &state.names, &state.version, &state.nonce))?;
            }
        } else {
            types[ty as usize].pending = false;
        }
        sizes[ty as usize] = bytes.len();
        let state = &mut types[ty as usize];
        state.version = header.version_info;
        state.nonce = header.nonce;
        state.acks += 1;
        send(request(ty, &state.names, &state.version, &state.nonce))?;
        let at = Instant::now();

        if synced {
            let _ = events.send(Event::Acked {
                client,
                ty,
                version: state.version.clone(),
                at,
            });
        } else if types.iter().all(|t| t.acks > 0 && !t.pending) {
            synced = true;
            let _ = events.send(Event::Synced {
                client,
                at,
                versions: types.each_ref().map(|t| t.version.clone()),
                sizes,
            });
        }
    }
    Err(Status::unavailable("the control plane ended the stream"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_xds_proto::pack;
    use remora_xds_proto::pb::envoy::config::cluster::v3::{Cluster, cluster};
    use remora_xds_proto::pb::envoy::config::listener::v3 as lds;
    use remora_xds_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use remora_xds_proto::pb::envoy::service::discovery::v3::DiscoveryResponse;

    #[test]
    fn names_are_read_from_clusters_and_listeners() {
        let eds = |name: &str, service: &str| Cluster {
            name: name.into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            eds_cluster_config: Some(cluster::EdsClusterConfig {
                service_name: service.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let dns = Cluster {
            name: "dns".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::StrictDns as i32,
            )),
            ..Default::default()
        };
        let response = DiscoveryResponse {
            version_info: "v1".into(),
            resources: vec![pack(&eds("a", "")), pack(&eds("b", "b-eds")), pack(&dns)],
            type_url: type_url::CLUSTER.into(),
            nonce: "7".into(),
            ..Default::default()
        };
        let bytes = Bytes::from(response.encode_to_vec());
        let header = ResponseHeader::decode(bytes.clone()).expect("header");
        assert_eq!(
            (header.version_info.as_str(), header.nonce.as_str()),
            ("v1", "7")
        );
        assert_eq!(header.resources.len(), 3);
        let names: Vec<String> = eds_names(&bytes).expect("clusters").into_iter().collect();
        assert_eq!(names, ["a", "b-eds"]);

        let manager = hcm::HttpConnectionManager {
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                hcm::Rds {
                    route_config_name: "8080".into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let listener = lds::Listener {
            name: "outbound".into(),
            filter_chains: vec![lds::FilterChain {
                filters: vec![lds::Filter {
                    name: "hcm".into(),
                    config_type: Some(lds::filter::ConfigType::TypedConfig(pack(&manager))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let response = DiscoveryResponse {
            resources: vec![pack(&listener)],
            type_url: type_url::LISTENER.into(),
            ..Default::default()
        };
        let bytes = Bytes::from(response.encode_to_vec());
        let names: Vec<String> = rds_names(&bytes).expect("listeners").into_iter().collect();
        assert_eq!(names, ["8080"]);
    }
}
