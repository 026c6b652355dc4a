//! Clusters: one EDS cluster per service port and subset, reaching
//! sidecar endpoints over mutual TLS (sidecar view); one STRICT_DNS cluster
//! per port of a service found by DNS (`hostname`), outside the mesh, so
//! plaintext (LOGICAL_DNS for proxyless gRPC, which has no STRICT_DNS);
//! and, for a sidecar that asks, the STATIC cluster of its local
//! application.

use remora_xds_proto::pb::envoy::config::cluster::v3::{
    Cluster,
    cluster::{
        ClusterDiscoveryType, DiscoveryType, DnsLookupFamily, EdsClusterConfig, LbPolicy,
        TransportSocketMatch,
    },
};
use remora_xds_proto::pb::envoy::config::core::v3::{
    Address, Http1ProtocolOptions, Http2ProtocolOptions, Metadata, SocketAddress, address,
    socket_address::PortSpecifier,
};
use remora_xds_proto::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use remora_xds_proto::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    },
};
use remora_xds_proto::pb::google::protobuf::{Struct, Value, value};
use remora_xds_proto::{metadata, pack};

use super::listeners::socket_address;
use super::tls::{
    MTLS_MATCH_NAME, UpstreamTls, mtls_match, upstream_tls, upstream_transport_socket,
};
use super::{
    AppView, Flavor, INBOUND_APP_CLUSTER, View, ads, all_clusters, cluster_name, duration,
};
use crate::model::{DEFAULT_CONNECT_TIMEOUT, LoadBalancer, Mesh, Service, ServicePort};

/// The key Envoy reads upstream HTTP protocol options under.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// `filter_metadata.remora.detect_timeout_ms` (one namespace, one field:
/// the encoding stays byte-stable for the content hash).
fn detect_timeout_metadata(timeout: std::time::Duration) -> Metadata {
    let millis = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    Metadata {
        filter_metadata: [(
            metadata::NAMESPACE.to_string(),
            Struct {
                fields: [(
                    metadata::DETECT_TIMEOUT_MS.to_string(),
                    Value {
                        kind: Some(value::Kind::NumberValue(f64::from(millis))),
                    },
                )]
                .into(),
            },
        )]
        .into(),
        ..Default::default()
    }
}

/// The clusters every view of `flavor` has: one per service port and
/// subset.
pub(super) fn clusters(mesh: &Mesh, flavor: Flavor) -> Vec<Cluster> {
    all_clusters(mesh)
        .map(|(service, port, subset)| {
            let name = cluster_name(&service.key(), port.port, subset);
            let lb_policy = match (flavor, service.load_balancer) {
                // gRPC rejects clusters whose policy it does not implement;
                // round robin is the one every gRPC release has.
                (Flavor::ProxylessGrpc, _) | (_, LoadBalancer::RoundRobin) => LbPolicy::RoundRobin,
                (Flavor::Sidecar, LoadBalancer::LeastRequest) => LbPolicy::LeastRequest,
            };
            if let Some(hostname) = &service.hostname {
                return dns_cluster(service, port, hostname, name, lb_policy, flavor);
            }
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
            if let Some(timeout) = service.detect_timeout {
                cluster.metadata = Some(detect_timeout_metadata(timeout));
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
        .collect()
}

/// The clusters of one view: its local application's, when the node
/// names it.
pub(super) fn view_clusters(view: &View) -> Vec<Cluster> {
    view.inbound
        .as_ref()
        .and_then(|i| i.app.as_ref())
        .map(inbound_app_cluster)
        .into_iter()
        .collect()
}

/// A service outside the mesh, found by DNS: every address in the answer
/// is an endpoint (STRICT_DNS), re-resolved when the answer's TTL runs
/// out. IPv4 first, IPv6 when the name has no IPv4 address. No TLS
/// context: there is no sidecar on the other side to check an identity
/// of; an application that needs TLS to it speaks TLS itself.
///
/// `respect_dns_ttl` is deprecated in Envoy's protos in favour of the
/// `envoy.clusters.dns` extension, but Envoy 1.40 still accepts it and
/// the extension would shut out older Envoys and gRPC clients.
#[allow(deprecated)]
fn dns_cluster(
    service: &Service,
    port: &ServicePort,
    hostname: &str,
    name: String,
    lb_policy: LbPolicy,
    flavor: Flavor,
) -> Cluster {
    // gRPC clients implement LOGICAL_DNS (one address at a time), not
    // STRICT_DNS.
    let discovery = match flavor {
        Flavor::Sidecar => DiscoveryType::StrictDns,
        Flavor::ProxylessGrpc => DiscoveryType::LogicalDns,
    };
    let mut cluster = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(discovery as i32)),
        connect_timeout: Some(duration(service.connect_timeout)),
        lb_policy: lb_policy as i32,
        dns_lookup_family: DnsLookupFamily::V4Preferred as i32,
        respect_dns_ttl: true,
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(dns_address(hostname, port.instance_port())),
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
    if flavor == Flavor::Sidecar && port.protocol.is_h2() {
        cluster
            .typed_extension_protocol_options
            .insert(HTTP_PROTOCOL_OPTIONS.to_string(), pack(&http2()));
    }
    cluster
}

fn dns_address(hostname: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: hostname.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use remora_xds_proto::pb::envoy::config::route::v3::{
        route::Action, route_action::ClusterSpecifier,
    };

    use super::super::{Flavor, View, endpoints, routes};
    use super::*;
    use crate::sources::file;

    fn external_mesh() -> Mesh {
        let yaml = "\
services:
  - name: api
    namespace: ext
    hostname: api.example.test
    connect_timeout: 250ms
    ports: [{name: http, port: 8080, protocol: http, target_port: 80}]
    routes:
      - {backends: [{service: api}], timeout: 2s}
";
        file::parse(Path::new("mesh.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    #[allow(deprecated)]
    fn a_service_by_hostname_is_a_strict_dns_cluster_without_tls_or_eds() {
        let mesh = external_mesh();
        let view = View::sidecar("127.0.0.1:15001".parse().expect("literal"));
        let clusters = clusters(&mesh, view.flavor);
        let [cluster] = clusters.as_slice() else {
            panic!("one cluster: {clusters:?}");
        };
        assert_eq!(cluster.name, "outbound|8080||api.ext.svc.cluster.local");
        assert_eq!(
            cluster.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32))
        );
        assert!(cluster.respect_dns_ttl);
        assert_eq!(
            cluster.dns_lookup_family,
            DnsLookupFamily::V4Preferred as i32
        );
        assert!(cluster.eds_cluster_config.is_none());
        assert!(cluster.transport_socket.is_none() && cluster.transport_socket_matches.is_empty());
        let endpoint = cluster
            .load_assignment
            .as_ref()
            .and_then(|a| a.endpoints.first())
            .and_then(|l| l.lb_endpoints.first())
            .and_then(|e| match &e.host_identifier {
                Some(HostIdentifier::Endpoint(e)) => e.address.as_ref(),
                _ => None,
            })
            .and_then(|a| a.address.as_ref());
        let Some(address::Address::SocketAddress(socket)) = endpoint else {
            panic!("a hostname endpoint: {cluster:?}");
        };
        assert_eq!(socket.address, "api.example.test");
        assert_eq!(socket.port_specifier, Some(PortSpecifier::PortValue(80)));

        assert!(endpoints::load_assignments(&mesh).is_empty());

        let grpc = View {
            flavor: Flavor::ProxylessGrpc,
            ..view
        };
        assert_eq!(
            super::clusters(&mesh, grpc.flavor)[0].cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::LogicalDns as i32))
        );
    }

    #[test]
    fn its_virtual_host_answers_to_the_hostname_too() {
        let mesh = external_mesh();
        let configs = routes::route_configurations(&mesh, Flavor::Sidecar);
        let outbound = configs
            .iter()
            .find(|c| c.name == super::super::OUTBOUND)
            .expect("outbound routes");
        let vh = &outbound.virtual_hosts[0];
        for domain in ["api.example.test", "api.example.test:8080", "api.ext:8080"] {
            assert!(vh.domains.iter().any(|d| d == domain), "{domain}: {vh:?}");
        }
        let action = vh.routes[0].action.as_ref();
        let Some(Action::Route(action)) = action else {
            panic!("a route action: {vh:?}");
        };
        assert_eq!(
            action.cluster_specifier,
            Some(ClusterSpecifier::Cluster(
                "outbound|8080||api.ext.svc.cluster.local".into()
            ))
        );
        assert!(action.timeout.is_some(), "the route's timeout applies");
    }
}
