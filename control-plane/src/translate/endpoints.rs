//! Endpoint assignments: the members of each cluster, grouped by locality.
//! Services found by DNS have none: their clusters carry the hostname in
//! their own `load_assignment`.

use std::collections::BTreeMap;

use remora_xds_proto::pb::envoy::config::core::v3::{
    Address, HealthStatus, Locality, Metadata, SocketAddress, address,
    socket_address::PortSpecifier,
};
use remora_xds_proto::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints,
    lb_endpoint::HostIdentifier,
};
use remora_xds_proto::pb::google::protobuf::UInt32Value;

use super::tls::{UpstreamTls, endpoint_filter_metadata, upstream_tls};
use super::{all_clusters, cluster_name};
use crate::model::{Endpoint, Health, Mesh, ServicePort};

pub(super) fn load_assignments(mesh: &Mesh) -> Vec<ClusterLoadAssignment> {
    all_clusters(mesh)
        .filter(|(service, _, _)| service.hostname.is_none())
        .map(|(service, port, subset_name)| {
            let subset = subset_name.and_then(|n| service.subset(n));
            let mixed = matches!(
                upstream_tls(mesh, service, port, subset_name),
                UpstreamTls::Mixed(_)
            );
            // Group by zone; BTreeMap keeps the order (and so the bytes)
            // stable.
            let mut localities: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
            let mut weights: BTreeMap<&str, u32> = BTreeMap::new();
            for endpoint in service.endpoints_in(subset) {
                let zone = endpoint.zone.as_deref().unwrap_or("");
                localities
                    .entry(zone)
                    .or_default()
                    .push(lb_endpoint(mesh, endpoint, port, mixed));
                let w = weights.entry(zone).or_default();
                *w = w.saturating_add(endpoint.weight.get());
            }
            ClusterLoadAssignment {
                cluster_name: cluster_name(&service.key(), port.port, subset_name),
                endpoints: localities
                    .into_iter()
                    .map(|(zone, lb_endpoints)| LocalityLbEndpoints {
                        locality: Some(Locality {
                            zone: zone.to_string(),
                            ..Default::default()
                        }),
                        // gRPC skips localities without a weight; the sum of
                        // the endpoint weights keeps every endpoint's share
                        // what its own weight says.
                        load_balancing_weight: Some(UInt32Value {
                            value: weights.get(zone).copied().unwrap_or(1).max(1),
                        }),
                        lb_endpoints,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }
        })
        .collect()
}

fn lb_endpoint(mesh: &Mesh, endpoint: &Endpoint, port: &ServicePort, mixed: bool) -> LbEndpoint {
    let health = match endpoint.health {
        Health::Healthy => HealthStatus::Healthy,
        Health::Unhealthy => HealthStatus::Unhealthy,
        Health::Draining => HealthStatus::Draining,
    };
    // Only endpoints with a sidecar carry an identity, and in clusters
    // that mix them with plain endpoints, the mark that selects mutual TLS.
    let metadata = endpoint.identity.as_ref().map(|identity| Metadata {
        filter_metadata: endpoint_filter_metadata(identity.spiffe_id(mesh.trust_domain()), mixed),
        ..Default::default()
    });
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(PbEndpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: endpoint.address.to_string(),
                    port_specifier: Some(PortSpecifier::PortValue(u32::from(
                        endpoint.port_for(port),
                    ))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: health as i32,
        load_balancing_weight: Some(UInt32Value {
            value: endpoint.weight.get(),
        }),
        metadata,
    }
}
