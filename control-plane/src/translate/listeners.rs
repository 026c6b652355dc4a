//! Listeners: where a sidecar accepts outbound traffic and, if it asks,
//! inbound traffic from other sidecars; or, for a proxyless gRPC client,
//! the `api_listener` behind each target name.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use remora_xds_proto::pack;
use remora_xds_proto::pb::envoy::config::core::v3::{
    Address, HeaderValue, HeaderValueOption, SocketAddress, TrafficDirection, address,
    header_value_option::HeaderAppendAction, socket_address::PortSpecifier,
};
use remora_xds_proto::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter,
    listener_filter,
};
use remora_xds_proto::pb::envoy::config::route::v3::{
    Route as PbRoute, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route::Action,
    route_action::ClusterSpecifier, route_match::PathSpecifier,
};
use remora_xds_proto::pb::envoy::extensions::filters::http::router::v3::Router;
use remora_xds_proto::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use remora_xds_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
    http_connection_manager::{CodecType, RouteSpecifier},
    http_filter::ConfigType,
};
use remora_xds_proto::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier as TcpClusterSpecifier,
};
use remora_xds_proto::pb::google::protobuf::BoolValue;

use super::routes::{ShortNames, http_ports};
use super::tls::{TRANSPORT_RAW_BUFFER, TRANSPORT_TLS, downstream_transport_socket};
use super::{
    Flavor, INBOUND, INBOUND_APP_CLUSTER, InboundView, OUTBOUND, View, ads, cluster_name, duration,
};
use crate::model::{Mesh, MtlsMode, OutboundTraffic, Protocol};

/// The listener that says what happens to intercepted connections to
/// destinations outside the mesh.
const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
/// Its default chain's cluster with `outbound_traffic: ALLOW_ANY`.
const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Its default chain's cluster with `outbound_traffic: REGISTRY_ONLY`.
const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";
const ROUTER_FILTER: &str = "envoy.filters.http.router";
const TLS_INSPECTOR_FILTER: &str = "envoy.filters.listener.tls_inspector";
/// The caller's identity, as a Remora sidecar gives it to its application.
const PEER_IDENTITY_HEADER: &str = "x-remora-peer-identity";
/// Headers only sidecars may set; Envoy removes exact names only.
const INTERNAL_HEADERS: [&str; 3] = [
    PEER_IDENTITY_HEADER,
    "x-remora-app-protocol",
    "x-remora-error",
];

/// The listeners every view of `flavor` has: for sidecars, the unbound
/// listeners that `use_original_dst` hands intercepted connections to
/// (Istio's layout), one per HTTP port and per opaque TCP service address;
/// for proxyless gRPC, the `api_listener` of every target.
pub(super) fn shared_listeners(mesh: &Mesh, flavor: Flavor) -> Vec<Listener> {
    match flavor {
        Flavor::Sidecar => unbound_listeners(mesh),
        Flavor::ProxylessGrpc => api_listeners(mesh),
    }
}

/// The listeners of one sidecar view: the explicit outbound listener bound
/// where the node asked, the virtual outbound listener for destinations
/// outside the mesh (it names that port too), and the inbound listener
/// when the node asks for one.
pub(super) fn view_listeners(mesh: &Mesh, view: &View) -> Vec<Listener> {
    if view.flavor != Flavor::Sidecar {
        return Vec::new();
    }
    let mut listeners = outbound_listeners(mesh, view.outbound_listener);
    if let Some(inbound) = &view.inbound {
        listeners.push(inbound_listener(mesh, inbound));
    }
    listeners
}

fn outbound_listeners(mesh: &Mesh, outbound: SocketAddr) -> Vec<Listener> {
    let mut listeners = vec![Listener {
        name: OUTBOUND.to_string(),
        address: Some(socket_address(outbound)),
        use_original_dst: Some(BoolValue { value: true }),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![FilterChain {
            name: OUTBOUND.to_string(),
            filters: vec![network_filter(
                HCM_FILTER,
                &http_connection_manager(OUTBOUND),
            )],
            ..Default::default()
        }],
        ..Default::default()
    }];

    // Destinations outside the mesh (Istio's layout: the virtual outbound
    // listener's default chain). Envoy gets no such clusters from us yet,
    // so an Envoy sidecar refuses them either way; a Remora sidecar reads
    // the cluster name.
    let unknown = match mesh.outbound_traffic() {
        OutboundTraffic::AllowAny => PASSTHROUGH_CLUSTER,
        OutboundTraffic::RegistryOnly => BLACKHOLE_CLUSTER,
    };
    listeners.push(Listener {
        name: VIRTUAL_OUTBOUND.to_string(),
        address: Some(socket_address(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            outbound.port(),
        ))),
        bind_to_port: Some(BoolValue { value: false }),
        use_original_dst: Some(BoolValue { value: true }),
        traffic_direction: TrafficDirection::Outbound as i32,
        default_filter_chain: Some(FilterChain {
            name: unknown.to_string(),
            filters: vec![network_filter(
                TCP_PROXY_FILTER,
                &TcpProxy {
                    stat_prefix: unknown.to_string(),
                    cluster_specifier: Some(TcpClusterSpecifier::Cluster(unknown.to_string())),
                    ..Default::default()
                },
            )],
            ..Default::default()
        }),
        ..Default::default()
    });
    listeners
}

/// One unbound listener per HTTP port and per opaque TCP service address.
fn unbound_listeners(mesh: &Mesh) -> Vec<Listener> {
    let mut listeners = Vec::new();
    let mut http_port_numbers: Vec<u16> = http_ports(mesh).map(|(_, p, _)| p.port).collect();
    http_port_numbers.sort_unstable();
    http_port_numbers.dedup();
    for port in http_port_numbers {
        let address = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        listeners.push(unbound_listener(
            address,
            network_filter(HCM_FILTER, &http_connection_manager(&port.to_string())),
        ));
    }

    // Opaque TCP can only be told apart by destination address, so only
    // services with a virtual IP get a listener.
    for service in mesh.services() {
        let Some(vip) = service.vip else { continue };
        for port in service.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
            let cluster = cluster_name(&service.key(), port.port, None);
            let tcp_proxy = TcpProxy {
                stat_prefix: cluster.clone(),
                cluster_specifier: Some(TcpClusterSpecifier::Cluster(cluster)),
                ..Default::default()
            };
            listeners.push(unbound_listener(
                SocketAddr::new(vip, port.port),
                network_filter(TCP_PROXY_FILTER, &tcp_proxy),
            ));
        }
    }
    listeners
}

/// The sidecar's inbound listener: mutual TLS (a client certificate of
/// the mesh required), and for a PERMISSIVE service also plaintext, told
/// apart by the TLS inspector. Every request goes to the local
/// application ([`INBOUND_APP_CLUSTER`]). A Remora proxy reads only which
/// transport protocols the chains match.
fn inbound_listener(mesh: &Mesh, inbound: &InboundView) -> Listener {
    let mode = mesh
        .service(&inbound.service)
        .map_or(MtlsMode::Strict, |s| s.mtls);
    let mut filter_chains = vec![FilterChain {
        name: format!("{INBOUND}-tls"),
        filter_chain_match: Some(FilterChainMatch {
            transport_protocol: TRANSPORT_TLS.to_string(),
            ..Default::default()
        }),
        filters: vec![network_filter(
            HCM_FILTER,
            &inbound_http_connection_manager(true),
        )],
        transport_socket: Some(downstream_transport_socket()),
        ..Default::default()
    }];
    if mode == MtlsMode::Permissive {
        filter_chains.push(FilterChain {
            name: format!("{INBOUND}-plaintext"),
            filter_chain_match: Some(FilterChainMatch {
                transport_protocol: TRANSPORT_RAW_BUFFER.to_string(),
                ..Default::default()
            }),
            filters: vec![network_filter(
                HCM_FILTER,
                &inbound_http_connection_manager(false),
            )],
            ..Default::default()
        });
    }
    Listener {
        name: INBOUND.to_string(),
        address: Some(socket_address(inbound.listener)),
        traffic_direction: TrafficDirection::Inbound as i32,
        listener_filters: vec![ListenerFilter {
            name: TLS_INSPECTOR_FILTER.to_string(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack(
                &TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        filter_chains,
        ..Default::default()
    }
}

/// The inbound HTTP side of an Envoy sidecar: everything to the local
/// application, with the headers a Remora sidecar would give it: the
/// caller's `x-remora-*` removed, and over mTLS the caller's SPIFFE ID in
/// `x-remora-peer-identity` (the URI SAN of its certificate).
fn inbound_http_connection_manager(mtls: bool) -> HttpConnectionManager {
    let route = PbRoute {
        name: INBOUND.to_string(),
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(INBOUND_APP_CLUSTER.to_string())),
            // The caller's sidecar enforces the route's timeout; the
            // default 15 s would cut long requests short.
            timeout: Some(duration(std::time::Duration::ZERO)),
            ..Default::default()
        })),
        ..Default::default()
    };
    HttpConnectionManager {
        codec_type: CodecType::Auto as i32,
        stat_prefix: INBOUND.to_string(),
        route_specifier: Some(RouteSpecifier::RouteConfig(RouteConfiguration {
            name: INBOUND.to_string(),
            // Removed before the additions below are made.
            request_headers_to_remove: INTERNAL_HEADERS.iter().map(|h| h.to_string()).collect(),
            request_headers_to_add: if mtls {
                vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: PEER_IDENTITY_HEADER.to_string(),
                        value: "%DOWNSTREAM_PEER_URI_SAN%".to_string(),
                        ..Default::default()
                    }),
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..Default::default()
                }]
            } else {
                Vec::new()
            },
            virtual_hosts: vec![VirtualHost {
                name: INBOUND.to_string(),
                domains: vec!["*".to_string()],
                routes: vec![route],
                ..Default::default()
            }],
            ..Default::default()
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    }
}

fn unbound_listener(address: SocketAddr, filter: Filter) -> Listener {
    Listener {
        name: format!("{}_{}", address.ip(), address.port()),
        address: Some(socket_address(address)),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// gRPC looks a target up as a listener of the same name (`xds:///NAME`).
/// Each HTTP service port answers to every form of its name with the port,
/// and the service's first HTTP port also without it.
fn api_listeners(mesh: &Mesh) -> Vec<Listener> {
    let names = ShortNames::new(mesh);
    let mut listeners = Vec::new();
    for (service, port, is_default) in http_ports(mesh) {
        let hcm = pack(&http_connection_manager(&port.port.to_string()));
        for host in names.hosts(service) {
            if is_default {
                listeners.push(api_listener(host.clone(), hcm.clone()));
            }
            listeners.push(api_listener(format!("{host}:{}", port.port), hcm.clone()));
        }
    }
    listeners
}

fn api_listener(name: String, hcm: remora_xds_proto::pb::google::protobuf::Any) -> Listener {
    Listener {
        name,
        api_listener: Some(ApiListener {
            api_listener: Some(hcm),
        }),
        ..Default::default()
    }
}

fn http_connection_manager(route_config_name: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: route_config_name.to_string(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_config_name.to_string(),
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    }
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: ROUTER_FILTER.to_string(),
        config_type: Some(ConfigType::TypedConfig(pack(&Router::default()))),
        ..Default::default()
    }
}

fn network_filter<M: prost::Message + prost::Name>(name: &str, config: &M) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(pack(config))),
    }
}

pub(super) fn socket_address(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
            ..Default::default()
        })),
    }
}
