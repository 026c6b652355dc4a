//! Clusters: one EDS cluster per service port and subset, reaching
//! sidecar endpoints over mutual TLS (sidecar view); and, for a sidecar
//! that asks, the STATIC cluster of its local application.

use remora_xds_proto::pack;
use remora_xds_proto::pb::envoy::config::cluster::v3::{
    Cluster,
    cluster::{
        ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy, TransportSocketMatch,
    },
};
use remora_xds_proto::pb::envoy::config::core::v3::{Http1ProtocolOptions, Http2ProtocolOptions};
use remora_xds_proto::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use remora_xds_proto::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    },
};

use super::listeners::socket_address;
use super::tls::{
    MTLS_MATCH_NAME, UpstreamTls, mtls_match, upstream_tls, upstream_transport_socket,
};
use super::{
    AppView, Flavor, INBOUND_APP_CLUSTER, View, ads, all_clusters, cluster_name, duration,
};
use crate::model::{DEFAULT_CONNECT_TIMEOUT, LoadBalancer, Mesh};

/// The key Envoy reads upstream HTTP protocol options under.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

pub(super) fn clusters(mesh: &Mesh, view: &View) -> Vec<Cluster> {
    let flavor = view.flavor;
    let mut clusters: Vec<Cluster> = all_clusters(mesh)
        .map(|(service, port, subset)| {
            let name = cluster_name(&service.key(), port.port, subset);
            let lb_policy = match (flavor, service.load_balancer) {
                // gRPC rejects clusters whose policy it does not implement;
                // round robin is the one every gRPC release has.
                (Flavor::ProxylessGrpc, _) | (_, LoadBalancer::RoundRobin) => LbPolicy::RoundRobin,
                (Flavor::Sidecar, LoadBalancer::LeastRequest) => LbPolicy::LeastRequest,
            };
            let mut cluster = Cluster {
                name: name.clone(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                eds_cluster_config: Some(EdsClusterConfig {
                    eds_config: Some(ads()),
                    service_name: name,
                }),
                connect_timeout: Some(duration(service.connect_timeout)),
                lb_policy: lb_policy as i32,
                ..Default::default()
            };
            if flavor != Flavor::Sidecar {
                // gRPC clients do not speak SDS: no TLS contexts for them.
                return cluster;
            }
            // The protocol options name what the application speaks: the
            // Remora proxy reads them to tell the peer sidecar (which
            // accepts HTTP/1.1 and HTTP/2 over mTLS alike), and Envoy speaks
            // that protocol through the peer sidecar to the application
            // (ALPN says which, so the peer picks the matching codec).
            let h2 = port.protocol.is_h2();
            match upstream_tls(mesh, service, port, subset) {
                UpstreamTls::Plaintext => {}
                UpstreamTls::All(ids) => {
                    cluster.transport_socket = Some(upstream_transport_socket(&ids, h2));
                }
                UpstreamTls::Mixed(ids) => {
                    cluster.transport_socket_matches = vec![TransportSocketMatch {
                        name: MTLS_MATCH_NAME.to_string(),
                        r#match: Some(mtls_match()),
                        transport_socket: Some(upstream_transport_socket(&ids, h2)),
                    }];
                }
            }
            let protocol = port.protocol.is_h2().then(http2);
            if let Some(options) = protocol {
                // One entry only: map encoding order must stay stable for
                // the content hash.
                cluster
                    .typed_extension_protocol_options
                    .insert(HTTP_PROTOCOL_OPTIONS.to_string(), pack(&options));
            }
            cluster
        })
        .collect();
    if let Some(app) = view.inbound.as_ref().and_then(|i| i.app.as_ref()) {
        clusters.push(inbound_app_cluster(app));
    }
    clusters
}

/// The local application, for a sidecar that learns its address from the
/// control plane ([`super::META_APP_ADDRESS`]).
fn inbound_app_cluster(app: &AppView) -> Cluster {
    let mut cluster = Cluster {
        name: INBOUND_APP_CLUSTER.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(duration(DEFAULT_CONNECT_TIMEOUT)),
        lb_policy: LbPolicy::RoundRobin as i32,
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: INBOUND_APP_CLUSTER.to_string(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket_address(app.address)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = if app.http2 { http2() } else { http1() };
    cluster
        .typed_extension_protocol_options
        .insert(HTTP_PROTOCOL_OPTIONS.to_string(), pack(&options));
    cluster
}

fn explicit(protocol_config: ProtocolConfig) -> HttpProtocolOptions {
    HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(protocol_config),
            },
        )),
        ..Default::default()
    }
}

fn http2() -> HttpProtocolOptions {
    explicit(ProtocolConfig::Http2ProtocolOptions(
        Http2ProtocolOptions::default(),
    ))
}

fn http1() -> HttpProtocolOptions {
    explicit(ProtocolConfig::HttpProtocolOptions(
        Http1ProtocolOptions::default(),
    ))
}
