//! Mutual TLS between sidecars, as Envoy configures it: TLS contexts whose
//! certificate and trust bundle come over SDS on the same ADS stream
//! (secrets [`SECRET_DEFAULT`] and [`SECRET_ROOTCA`]), TLS 1.3 only, and
//! the peer's SPIFFE ID checked against the identities the mesh says a
//! cluster's endpoints have.
//!
//! ALPN names the HTTP version inside the tunnel: a client offers the one
//! its cluster speaks (`h2` for HTTP/2 and gRPC ports, `http/1.1` for
//! HTTP/1 ports: an Envoy cluster's codec does not follow ALPN), and the
//! inbound listener accepts both, so the server side picks the codec the
//! client will use.

use std::collections::{BTreeSet, HashMap};

use remora_xds_proto::metadata;
use remora_xds_proto::pack;
use remora_xds_proto::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use remora_xds_proto::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, TlsParameters, UpstreamTlsContext,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
    tls_parameters::TlsProtocol,
};
use remora_xds_proto::pb::envoy::r#type::matcher::v3::{
    StringMatcher, string_matcher::MatchPattern,
};
use remora_xds_proto::pb::google::protobuf::{BoolValue, Struct};

use super::{ads, string_value};
use crate::model::{Mesh, Service, ServicePort};

/// SDS name of a workload's own certificate and key (Istio's name).
pub const SECRET_DEFAULT: &str = "default";
/// SDS name of the trust bundle: a validation context holding every root
/// the mesh trusts (Istio's name).
pub const SECRET_ROOTCA: &str = "ROOTCA";
/// Envoy's name of the TLS transport socket.
pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";
/// The endpoint filter-metadata namespace Envoy matches
/// `transport_socket_matches` against.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
/// The field, in [`TRANSPORT_SOCKET_MATCH`], that marks an endpoint to be
/// reached over mutual TLS (value `"true"`), in clusters that mix sidecar
/// and plain endpoints.
pub const MTLS_MATCH_KEY: &str = "remora.mtls";
/// Name of the `transport_socket_matches` entry that selects mutual TLS.
pub const MTLS_MATCH_NAME: &str = "mtls";
/// `filter_chain_match.transport_protocol` of TLS connections, as the TLS
/// inspector reports them.
pub const TRANSPORT_TLS: &str = "tls";
/// `filter_chain_match.transport_protocol` of everything else (plaintext).
pub const TRANSPORT_RAW_BUFFER: &str = "raw_buffer";
/// ALPN of HTTP/2.
const ALPN_H2: &str = "h2";
/// ALPN of HTTP/1.1.
const ALPN_HTTP11: &str = "http/1.1";

/// How a sidecar reaches the endpoints of one outbound cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum UpstreamTls {
    /// No endpoint has a sidecar (or the port is opaque TCP): plaintext.
    Plaintext,
    /// Every endpoint has a sidecar: mutual TLS, the peer being one of
    /// these SPIFFE IDs (sorted, distinct).
    All(Vec<String>),
    /// Some endpoints have a sidecar: mutual TLS to those (marked with
    /// [`MTLS_MATCH_KEY`]), plaintext to the others.
    Mixed(Vec<String>),
}

/// How the cluster of `port` (and `subset`) of `service` reaches its
/// endpoints. Opaque TCP stays plaintext: a sidecar's inbound listener
/// speaks HTTP only.
pub(super) fn upstream_tls(
    mesh: &Mesh,
    service: &Service,
    port: &ServicePort,
    subset: Option<&str>,
) -> UpstreamTls {
    if !port.protocol.is_http() {
        return UpstreamTls::Plaintext;
    }
    let subset = subset.and_then(|n| service.subset(n));
    let mut ids = BTreeSet::new();
    let mut plain = 0usize;
    for endpoint in service.endpoints_in(subset) {
        match &endpoint.identity {
            Some(identity) => {
                ids.insert(identity.spiffe_id(mesh.trust_domain()));
            }
            None => plain += 1,
        }
    }
    match (ids.is_empty(), plain) {
        (true, _) => UpstreamTls::Plaintext,
        (false, 0) => UpstreamTls::All(ids.into_iter().collect()),
        (false, _) => UpstreamTls::Mixed(ids.into_iter().collect()),
    }
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ads()),
    }
}

fn common_tls_context(validation: ValidationContextType, alpn: &[&str]) -> CommonTlsContext {
    CommonTlsContext {
        tls_params: Some(TlsParameters {
            tls_minimum_protocol_version: TlsProtocol::TlSv13 as i32,
            tls_maximum_protocol_version: TlsProtocol::TlSv13 as i32,
            ..Default::default()
        }),
        alpn_protocols: alpn.iter().map(|p| (*p).to_string()).collect(),
        tls_certificate_sds_secret_configs: vec![sds(SECRET_DEFAULT)],
        validation_context_type: Some(validation),
        ..Default::default()
    }
}

fn transport_socket<M: prost::Message + prost::Name>(context: &M) -> TransportSocket {
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack(context))),
    }
}

/// The client side: our certificate, the peer checked against the roots
/// of [`SECRET_ROOTCA`] and, in the default context of a combined one, its
/// URI SAN against `spiffe_ids`. Envoy merges the two contexts; the SAN
/// matchers live only here, so the shared trust bundle never narrows or
/// widens them. ALPN offers `h2` if the cluster speaks HTTP/2, else
/// `http/1.1`.
pub(super) fn upstream_transport_socket(spiffe_ids: &[String], h2: bool) -> TransportSocket {
    let matchers = spiffe_ids
        .iter()
        .map(|id| SubjectAltNameMatcher {
            san_type: SanType::Uri as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(id.clone())),
                ignore_case: false,
            }),
            ..Default::default()
        })
        .collect();
    let validation =
        ValidationContextType::CombinedValidationContext(CombinedCertificateValidationContext {
            default_validation_context: Some(CertificateValidationContext {
                match_typed_subject_alt_names: matchers,
                ..Default::default()
            }),
            validation_context_sds_secret_config: Some(sds(SECRET_ROOTCA)),
            ..Default::default()
        });
    let alpn = if h2 { ALPN_H2 } else { ALPN_HTTP11 };
    transport_socket(&UpstreamTlsContext {
        common_tls_context: Some(common_tls_context(validation, &[alpn])),
        ..Default::default()
    })
}

/// The server side of a sidecar's inbound listener: our certificate, and
/// a client certificate required and checked against the roots of
/// [`SECRET_ROOTCA`]; ALPN `h2` or `http/1.1`, as the client offers.
pub(super) fn downstream_transport_socket() -> TransportSocket {
    let validation = ValidationContextType::ValidationContextSdsSecretConfig(sds(SECRET_ROOTCA));
    transport_socket(&DownstreamTlsContext {
        common_tls_context: Some(common_tls_context(validation, &[ALPN_H2, ALPN_HTTP11])),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    })
}

/// `{"remora.mtls": "true"}`: the `match` of the mutual-TLS transport
/// socket, and what marks an endpoint it applies to.
pub(super) fn mtls_match() -> Struct {
    Struct {
        fields: [(MTLS_MATCH_KEY.to_string(), string_value("true"))].into(),
    }
}

/// The filter metadata of an endpoint with a sidecar: its identity
/// (namespace [`metadata::NAMESPACE`]) and, in clusters that mix sidecar
/// and plain endpoints, the transport-socket match.
///
/// Versions are content hashes of the encoding, and prost encodes a
/// `HashMap` in its iteration order, which depends on the map's random
/// seed. A one-entry map always encodes the same; a two-entry one is
/// rebuilt until it iterates in sorted order (half the seeds do), so the
/// same mesh always gives the same bytes.
pub(super) fn endpoint_filter_metadata(spiffe_id: String, mixed: bool) -> HashMap<String, Struct> {
    let identity = Struct {
        fields: [(metadata::IDENTITY.to_string(), string_value(spiffe_id))].into(),
    };
    if !mixed {
        return [(metadata::NAMESPACE.to_string(), identity)].into();
    }
    let entries = [
        (TRANSPORT_SOCKET_MATCH.to_string(), mtls_match()),
        (metadata::NAMESPACE.to_string(), identity),
    ];
    sorted_map(&entries)
}

/// A map with `entries` (sorted by key) that iterates in that order. Gives
/// up after 64 seeds (a chance of 2^-64 for two entries): the map is still
/// right, only its version may then differ between two translations.
fn sorted_map<V: Clone>(entries: &[(String, V)]) -> HashMap<String, V> {
    let mut map = HashMap::new();
    for _ in 0..64 {
        map = entries.iter().cloned().collect::<HashMap<String, V>>();
        if map.keys().zip(entries).all(|(k, (e, _))| k == e) {
            break;
        }
    }
    map
}
