//! Clusters: one EDS cluster per service port and subset.

use remora_xds_proto::pack;
use remora_xds_proto::pb::envoy::config::cluster::v3::{
    Cluster,
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
};
use remora_xds_proto::pb::envoy::config::core::v3::Http2ProtocolOptions;
use remora_xds_proto::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    },
};

use super::{Flavor, ads, all_clusters, cluster_name, duration};
use crate::model::{LoadBalancer, Mesh};

/// The key Envoy reads upstream HTTP protocol options under.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

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
            if flavor == Flavor::Sidecar && port.protocol.is_h2() {
                // One entry only: map encoding order must stay stable for
                // the content hash.
                cluster.typed_extension_protocol_options.insert(
                    HTTP_PROTOCOL_OPTIONS.to_string(),
                    pack(&HttpProtocolOptions {
                        upstream_protocol_options: Some(
                            UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                                    Http2ProtocolOptions::default(),
                                )),
                            }),
                        ),
                        ..Default::default()
                    }),
                );
            }
            cluster
        })
        .collect()
}
