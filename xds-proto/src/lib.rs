//! Envoy xDS v3 types and gRPC services for Remora.
//!
//! The message and service types come from the [`envoy_types`] crate, which
//! ships code generated from Envoy's own `.proto` files; nothing here copies
//! those files. This crate adds what every Remora component needs on top:
//! the type URLs of the resources Remora serves and consumes, and helpers to
//! pack messages into and out of [`pb::google::protobuf::Any`].
//!
//! Remora's own small protos (certificate signing, for one) will live here
//! too, compiled without a system `protoc`.

pub use envoy_types::pb;
pub use prost;

use pb::google::protobuf::Any;
use prost::{Message, Name};

/// Type URLs of the xDS resource types, as they appear in
/// `DiscoveryRequest.type_url` and `Any.type_url`.
pub mod type_url {
    /// `envoy.config.listener.v3.Listener` (LDS).
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// `envoy.config.route.v3.RouteConfiguration` (RDS).
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// `envoy.config.cluster.v3.Cluster` (CDS).
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// `envoy.extensions.transport_sockets.tls.v3.Secret` (SDS).
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

    /// The short name operators know a type by (`LDS`, `RDS`, ...), for logs,
    /// metrics labels and debug pages. Unknown types map to `"unknown"`.
    pub fn short_name(type_url: &str) -> &'static str {
        match type_url {
            LISTENER => "LDS",
            ROUTE => "RDS",
            CLUSTER => "CDS",
            ENDPOINT => "EDS",
            SECRET => "SDS",
            _ => "unknown",
        }
    }
}

/// Keys of the endpoint metadata Remora's control plane attaches and its
/// proxy reads (`LbEndpoint.metadata.filter_metadata`).
pub mod metadata {
    /// The filter-metadata namespace.
    pub const NAMESPACE: &str = "remora";
    /// The endpoint's SPIFFE identity, a string. Present only for
    /// endpoints that have a sidecar: proxies reach those over the mesh
    /// protocol; endpoints without it are reached in their own protocol.
    pub const IDENTITY: &str = "identity";
}

/// Packs a message into an `Any` under its canonical type URL.
pub fn pack<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// Why an `Any` could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The `Any` holds a different message type than the caller asked for.
    #[error("expected a {expected} but the resource is a {actual}")]
    WrongType {
        /// The type URL the caller asked for.
        expected: String,
        /// The type URL found in the `Any`.
        actual: String,
    },
    /// The bytes do not decode as the expected message.
    #[error("malformed {type_url}: {source}")]
    Decode {
        /// The type URL being decoded.
        type_url: String,
        /// The protobuf decoding error.
        #[source]
        source: prost::DecodeError,
    },
}

/// Unpacks an `Any` into `M`, checking the type URL first.
pub fn unpack<M: Message + Name + Default>(any: &Any) -> Result<M, UnpackError> {
    let expected = M::type_url();
    if any.type_url != expected {
        return Err(UnpackError::WrongType {
            expected,
            actual: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(|source| UnpackError::Decode {
        type_url: expected,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::envoy::config::cluster::v3::Cluster;
    use pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use pb::envoy::config::listener::v3::Listener;
    use pb::envoy::config::route::v3::RouteConfiguration;

    #[test]
    fn type_url_constants_match_generated_names() {
        assert_eq!(Listener::type_url(), type_url::LISTENER);
        assert_eq!(RouteConfiguration::type_url(), type_url::ROUTE);
        assert_eq!(Cluster::type_url(), type_url::CLUSTER);
        assert_eq!(ClusterLoadAssignment::type_url(), type_url::ENDPOINT);
        assert_eq!(
            pb::envoy::extensions::transport_sockets::tls::v3::Secret::type_url(),
            type_url::SECRET
        );
    }

    #[test]
    fn pack_then_unpack_round_trips_and_checks_the_type() {
        let cluster = Cluster {
            name: "outbound|80||web.default.svc.cluster.local".into(),
            ..Default::default()
        };
        let any = pack(&cluster);
        let back: Cluster = unpack(&any).expect("same type");
        assert_eq!(back, cluster);
        let err = unpack::<Listener>(&any).expect_err("wrong type");
        assert!(err.to_string().contains("Cluster"), "{err}");
    }

    #[test]
    fn garbage_bytes_are_a_decode_error_not_a_panic() {
        let any = Any {
            type_url: type_url::CLUSTER.into(),
            value: vec![0xff, 0xff, 0xff],
        };
        assert!(matches!(
            unpack::<Cluster>(&any),
            Err(UnpackError::Decode { .. })
        ));
    }
}
