use std::collections::BTreeSet;

use remora_xds_proto::pb::envoy::config::cluster::v3::{Cluster, cluster, cluster::LbPolicy};
use remora_xds_proto::pb::envoy::config::core::v3::{Node, address, socket_address::PortSpecifier};
use remora_xds_proto::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, lb_endpoint::HostIdentifier,
};
use remora_xds_proto::pb::envoy::config::listener::v3::{Listener, filter};
use remora_xds_proto::pb::envoy::config::route::v3::{
    RouteConfiguration, route::Action, route_action::ClusterSpecifier,
};
use remora_xds_proto::pb::google::protobuf::{Struct, Value, value::Kind};
use remora_xds_proto::unpack;

use super::*;
use crate::model::fixtures::*;
use crate::model::{
    Backoff, HeaderMatch, Identity, Mesh, MtlsMode, PathMatch, Protocol, RetryOn, RetryPolicy,
    StringMatch, Subset,
};

fn sidecar() -> View {
    View {
        flavor: Flavor::Sidecar,
        outbound_listener: "127.0.0.1:15001".parse().expect("literal"),
        inbound: None,
    }
}

fn grpc() -> View {
    View {
        flavor: Flavor::ProxylessGrpc,
        outbound_listener: DEFAULT_OUTBOUND_LISTENER,
        inbound: None,
    }
}

/// web (http 80) routes to api (http 8080, subsets v1/v2): header canary to
/// v2, everything else split 80/20 with a timeout and retries.
fn mesh() -> Mesh {
    let mut api = service("api", 8080, Protocol::Http);
    let mut v2 = endpoint([127, 0, 0, 2], 9002);
    v2.labels.insert("version".into(), "v2".into());
    api.endpoints[0]
        .labels
        .insert("version".into(), "v1".into());
    api.endpoints.push(v2);
    api.subsets = ["v1", "v2"]
        .iter()
        .map(|v| Subset {
            name: (*v).into(),
            labels: [("version".to_string(), (*v).to_string())].into(),
        })
        .collect();
    let mut canary = route("canary", vec![backend("api", 1)]);
    canary.backends[0].subset = Some("v2".into());
    canary.matches.headers.push(HeaderMatch {
        name: "x-canary".into(),
        value: StringMatch::Exact("true".into()),
        invert: false,
    });
    let mut split = route("split", vec![backend("api", 80), backend("api", 20)]);
    split.backends[0].subset = Some("v1".into());
    split.backends[1].subset = Some("v2".into());
    split.matches.path = Some(PathMatch::Prefix("/".into()));
    split.timeout = Some(std::time::Duration::from_secs(2));
    split.retry = Some(RetryPolicy {
        on: vec![RetryOn::ServerError, RetryOn::GrpcUnavailable],
        attempts: 7,
        per_try_timeout: Some(std::time::Duration::from_millis(500)),
        backoff: Backoff::default(),
        status_codes: Vec::new(),
    });
    let mut web = service("web", 80, Protocol::Http);
    web.routes = vec![canary, split];
    let grpc_svc = service("greeter", 9090, Protocol::Grpc);
    Mesh::new("cluster.local".into(), vec![web, api, grpc_svc], Vec::new()).expect("valid mesh")
}

fn decode<M: prost::Message + prost::Name + Default>(
    r: &Resources,
    ty: ResourceType,
    name: &str,
) -> M {
    let resource = r
        .of(ty)
        .get(name)
        .unwrap_or_else(|| panic!("no {ty} resource {name:?}; have {:?}", names(r, ty)));
    unpack(&resource.any).expect("decodes")
}

fn names(r: &Resources, ty: ResourceType) -> BTreeSet<String> {
    r.of(ty).names().map(str::to_string).collect()
}

#[test]
fn one_cluster_per_port_and_subset_with_matching_endpoints() {
    let r = translate(&mesh(), &sidecar());
    let expected: BTreeSet<String> = [
        "outbound|80||web.default.svc.cluster.local",
        "outbound|8080||api.default.svc.cluster.local",
        "outbound|8080|v1|api.default.svc.cluster.local",
        "outbound|8080|v2|api.default.svc.cluster.local",
        "outbound|9090||greeter.default.svc.cluster.local",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names(&r, ResourceType::Cluster), expected);
    assert_eq!(names(&r, ResourceType::Endpoint), expected);

    let v2: ClusterLoadAssignment = decode(
        &r,
        ResourceType::Endpoint,
        "outbound|8080|v2|api.default.svc.cluster.local",
    );
    let lb = &v2.endpoints[0].lb_endpoints;
    assert_eq!(lb.len(), 1, "only the v2 endpoint");
    let Some(HostIdentifier::Endpoint(ep)) = &lb[0].host_identifier else {
        panic!("endpoint")
    };
    let Some(address::Address::SocketAddress(sa)) =
        ep.address.as_ref().and_then(|a| a.address.clone())
    else {
        panic!("socket address")
    };
    assert_eq!(sa.address, "127.0.0.2");
    assert_eq!(sa.port_specifier, Some(PortSpecifier::PortValue(9002)));
    assert_eq!(
        v2.endpoints[0]
            .load_balancing_weight
            .as_ref()
            .map(|w| w.value),
        Some(1)
    );
    let identity =
        &lb[0].metadata.as_ref().expect("metadata").filter_metadata["remora"].fields["identity"];
    assert_eq!(
        identity.kind,
        Some(Kind::StringValue(
            "spiffe://cluster.local/ns/default/sa/default".into()
        ))
    );

    let mut services = mesh().services().to_vec();
    services[1].endpoints[1].identity = None;
    let no_sidecar = translate(
        &Mesh::new("cluster.local".into(), services, Vec::new()).expect("valid"),
        &sidecar(),
    );
    let v2: ClusterLoadAssignment = decode(
        &no_sidecar,
        ResourceType::Endpoint,
        "outbound|8080|v2|api.default.svc.cluster.local",
    );
    assert_eq!(
        v2.endpoints[0].lb_endpoints[0].metadata, None,
        "no sidecar, no identity"
    );

    let all: ClusterLoadAssignment = decode(
        &r,
        ResourceType::Endpoint,
        "outbound|8080||api.default.svc.cluster.local",
    );
    assert_eq!(all.endpoints[0].lb_endpoints.len(), 2);
}

#[test]
fn h2_upstreams_get_http2_options_only_for_sidecars_and_grpc_gets_round_robin() {
    let mut m = mesh().services().to_vec();
    m[1].load_balancer = crate::model::LoadBalancer::LeastRequest;
    // A plain web endpoint (no sidecar): its HTTP/1 cluster keeps HTTP/1.
    for service in &mut m {
        if service.name == "web" {
            service.endpoints[0].identity = None;
        }
    }
    let m = Mesh::new("cluster.local".into(), m, Vec::new()).expect("valid");
    let side = translate(&m, &sidecar());
    let g: Cluster = decode(
        &side,
        ResourceType::Cluster,
        "outbound|9090||greeter.default.svc.cluster.local",
    );
    assert!(
        g.typed_extension_protocol_options
            .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    );
    let w: Cluster = decode(
        &side,
        ResourceType::Cluster,
        "outbound|80||web.default.svc.cluster.local",
    );
    assert!(w.typed_extension_protocol_options.is_empty());
    let a: Cluster = decode(
        &side,
        ResourceType::Cluster,
        "outbound|8080||api.default.svc.cluster.local",
    );
    assert_eq!(a.lb_policy, LbPolicy::LeastRequest as i32);

    let proxyless = translate(&m, &grpc());
    let a: Cluster = decode(
        &proxyless,
        ResourceType::Cluster,
        "outbound|8080||api.default.svc.cluster.local",
    );
    assert_eq!(a.lb_policy, LbPolicy::RoundRobin as i32);
    let g: Cluster = decode(
        &proxyless,
        ResourceType::Cluster,
        "outbound|9090||greeter.default.svc.cluster.local",
    );
    assert!(g.typed_extension_protocol_options.is_empty());
}

#[test]
fn sidecar_routes_match_every_authority_form_in_order() {
    let r = translate(&mesh(), &sidecar());
    let outbound: RouteConfiguration = decode(&r, ResourceType::Route, "outbound");
    let web = outbound
        .virtual_hosts
        .iter()
        .find(|v| v.name == "web.default.svc.cluster.local:80")
        .expect("web vhost");
    for d in [
        "web",
        "web:80",
        "web.default",
        "web.default:80",
        "web.default.svc.cluster.local",
        "web.default.svc.cluster.local:80",
    ] {
        assert!(
            web.domains.contains(&d.to_string()),
            "{d} missing from {:?}",
            web.domains
        );
    }
    assert_eq!(
        web.routes
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["canary", "split"]
    );

    let Some(Action::Route(canary)) = &web.routes[0].action else {
        panic!("route action")
    };
    assert_eq!(
        canary.cluster_specifier,
        Some(ClusterSpecifier::Cluster(
            "outbound|8080|v2|api.default.svc.cluster.local".into()
        ))
    );
    assert_eq!(
        canary.timeout,
        Some(Default::default()),
        "no timeout is an explicit 0"
    );
    assert_eq!(
        web.routes[0].r#match.as_ref().expect("match").headers[0].name,
        "x-canary"
    );

    let Some(Action::Route(split)) = &web.routes[1].action else {
        panic!("route action")
    };
    let Some(ClusterSpecifier::WeightedClusters(wc)) = &split.cluster_specifier else {
        panic!("weighted")
    };
    let weights: Vec<(String, u32)> = wc
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
        .collect();
    assert_eq!(
        weights,
        vec![
            (
                "outbound|8080|v1|api.default.svc.cluster.local".to_string(),
                80
            ),
            (
                "outbound|8080|v2|api.default.svc.cluster.local".to_string(),
                20
            ),
        ]
    );
    assert_eq!(
        split.timeout,
        Some(duration(std::time::Duration::from_secs(2)))
    );
    let retry = split.retry_policy.as_ref().expect("retry");
    assert_eq!(retry.retry_on, "5xx,unavailable");
    assert_eq!(retry.num_retries.as_ref().map(|n| n.value), Some(7));
    assert!(retry.per_try_timeout.is_some());

    let per_port: RouteConfiguration = decode(&r, ResourceType::Route, "80");
    assert_eq!(per_port.virtual_hosts.len(), 1);
}

#[test]
fn grpc_routes_use_max_stream_duration_and_grpc_retry_conditions_only() {
    let r = translate(&mesh(), &grpc());
    assert!(
        !names(&r, ResourceType::Route).contains(OUTBOUND),
        "no explicit listener for gRPC"
    );
    let rc: RouteConfiguration = decode(&r, ResourceType::Route, "80");
    let Some(Action::Route(split)) = &rc.virtual_hosts[0].routes[1].action else {
        panic!("route")
    };
    assert_eq!(split.timeout, None);
    assert!(split.max_stream_duration.is_some());
    let retry = split.retry_policy.as_ref().expect("retry");
    assert_eq!(retry.retry_on, "unavailable");
    assert_eq!(
        retry.num_retries.as_ref().map(|n| n.value),
        Some(4),
        "gRPC caps at 5 attempts"
    );
    assert!(retry.per_try_timeout.is_none());
}

#[test]
fn sidecar_listeners_bind_outbound_only_and_grpc_gets_named_api_listeners() {
    let r = translate(&mesh(), &sidecar());
    assert_eq!(
        names(&r, ResourceType::Listener),
        [
            "0.0.0.0_80",
            "0.0.0.0_8080",
            "0.0.0.0_9090",
            "outbound",
            "virtualOutbound"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    );
    // Destinations outside the mesh pass through unless the mesh says
    // REGISTRY_ONLY.
    let tcp_cluster = |mesh: &Mesh| {
        let r = translate(mesh, &sidecar());
        let l: Listener = decode(&r, ResourceType::Listener, "virtualOutbound");
        let chain = l.default_filter_chain.expect("a default chain");
        chain.name
    };
    assert_eq!(tcp_cluster(&mesh()), "PassthroughCluster");
    assert_eq!(
        tcp_cluster(&mesh().with_outbound_traffic(crate::model::OutboundTraffic::RegistryOnly)),
        "BlackHoleCluster"
    );
    let outbound: Listener = decode(&r, ResourceType::Listener, "outbound");
    assert_eq!(outbound.use_original_dst.map(|b| b.value), Some(true));
    assert!(
        outbound.bind_to_port.is_none(),
        "the explicit listener binds"
    );
    let per_port: Listener = decode(&r, ResourceType::Listener, "0.0.0.0_80");
    assert_eq!(per_port.bind_to_port.map(|b| b.value), Some(false));

    let g = translate(&mesh(), &grpc());
    let listeners = names(&g, ResourceType::Listener);
    for name in [
        "greeter",
        "greeter:9090",
        "greeter.default",
        "greeter.default:9090",
        "greeter.default.svc.cluster.local:9090",
    ] {
        assert!(
            listeners.contains(name),
            "{name} missing from {listeners:?}"
        );
    }
    let l: Listener = decode(&g, ResourceType::Listener, "greeter.default:9090");
    assert!(l.api_listener.is_some() && l.address.is_none());
}

#[test]
fn a_short_name_used_in_two_namespaces_is_left_out() {
    let mut services = mesh().services().to_vec();
    let mut other = service("web", 80, Protocol::Http);
    other.namespace = "other".into();
    services.push(other);
    let m = Mesh::new("cluster.local".into(), services, Vec::new()).expect("valid");
    let r = translate(&m, &sidecar());
    let rc: RouteConfiguration = decode(&r, ResourceType::Route, "80");
    let mut seen = BTreeSet::new();
    for vh in &rc.virtual_hosts {
        assert!(
            !vh.domains.iter().any(|d| d == "web" || d == "web:80"),
            "{:?}",
            vh.domains
        );
        for d in &vh.domains {
            assert!(seen.insert(d.clone()), "domain {d} twice");
        }
    }
}

#[test]
fn versions_are_stable_and_change_only_where_content_does() {
    let a = translate(&mesh(), &sidecar());
    let b = translate(&mesh(), &sidecar());
    assert_eq!(a, b, "same mesh, same bytes and versions");

    let mut services = mesh().services().to_vec();
    services[1].endpoints[0].weight = std::num::NonZeroU32::new(5).expect("5 > 0");
    let c = translate(
        &Mesh::new("cluster.local".into(), services, Vec::new()).expect("valid"),
        &sidecar(),
    );
    assert_eq!(
        a.of(ResourceType::Cluster).version,
        c.of(ResourceType::Cluster).version
    );
    assert_eq!(
        a.of(ResourceType::Listener).version,
        c.of(ResourceType::Listener).version
    );
    assert_eq!(
        a.of(ResourceType::Route).version,
        c.of(ResourceType::Route).version
    );
    assert_ne!(
        a.of(ResourceType::Endpoint).version,
        c.of(ResourceType::Endpoint).version
    );
    let changed: Vec<&String> = a
        .of(ResourceType::Endpoint)
        .iter()
        .filter(|r| {
            c.of(ResourceType::Endpoint)
                .get(&r.name)
                .is_some_and(|new| new.version != r.version)
        })
        .map(|r| &r.name)
        .collect();
    assert_eq!(
        changed,
        [
            "outbound|8080|v1|api.default.svc.cluster.local",
            "outbound|8080||api.default.svc.cluster.local"
        ]
    );
}

#[test]
fn views_come_from_node_metadata() {
    let node = |fields: &[(&str, &str)]| Node {
        id: "n".into(),
        metadata: Some(Struct {
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
        }),
        ..Default::default()
    };
    assert_eq!(
        View::for_node(&node(&[])).expect("ok"),
        View::sidecar(DEFAULT_OUTBOUND_LISTENER)
    );
    assert_eq!(
        View::for_node(&node(&[("GENERATOR", "grpc")]))
            .expect("ok")
            .flavor,
        Flavor::ProxylessGrpc
    );
    assert_eq!(client_kind(&node(&[("GENERATOR", "grpc")])), "grpc");
    let v = View::for_node(&node(&[(META_OUTBOUND_LISTENER, "127.0.0.1:0")])).expect("ok");
    assert_eq!(v.outbound_listener.port(), 0);
    let err = View::for_node(&node(&[(META_OUTBOUND_LISTENER, "localhost")])).expect_err("bad");
    assert!(
        err.to_string().contains("REMORA_OUTBOUND_LISTENER"),
        "{err}"
    );
}

// === mutual TLS ===

use remora_xds_proto::pb::envoy::config::core::v3::TransportSocket;
use remora_xds_proto::pb::envoy::config::listener::v3::listener_filter;
use remora_xds_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use remora_xds_proto::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, UpstreamTlsContext, common_tls_context::ValidationContextType,
    tls_parameters::TlsProtocol,
};
use remora_xds_proto::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{UpstreamProtocolOptions, explicit_http_config::ProtocolConfig},
};
use remora_xds_proto::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;

fn identity(sa: &str) -> Option<Identity> {
    Some(Identity {
        namespace: "default".into(),
        service_account: sa.into(),
    })
}

/// web (PERMISSIVE, plain endpoint), api (two sidecars), mixed (a sidecar
/// and a plain endpoint), db (tcp, sidecar), rpc (grpc, sidecar).
fn tls_mesh() -> Mesh {
    let mut web = service("web", 80, Protocol::Http);
    web.mtls = MtlsMode::Permissive;
    web.endpoints[0].identity = None;
    let mut api = service("api", 8080, Protocol::Http);
    api.endpoints[0].identity = identity("api");
    let mut second = endpoint([127, 0, 0, 2], 9000);
    second.identity = identity("api-b");
    api.endpoints.push(second);
    let mut mixed = service("mixed", 8081, Protocol::Http);
    mixed.endpoints[0].identity = identity("mixed");
    let mut plain = endpoint([127, 0, 0, 3], 9000);
    plain.identity = None;
    mixed.endpoints.push(plain);
    let mut db = service("db", 5432, Protocol::Tcp);
    db.endpoints[0].identity = identity("db");
    let mut rpc = service("rpc", 9090, Protocol::Grpc);
    rpc.endpoints[0].identity = identity("rpc");
    Mesh::new(
        "cluster.local".into(),
        vec![web, api, mixed, db, rpc],
        Vec::new(),
    )
    .expect("valid")
}

fn cluster(res: &Resources, name: &str) -> Cluster {
    let r = res
        .of(ResourceType::Cluster)
        .get(name)
        .unwrap_or_else(|| panic!("no cluster {name:?}"));
    unpack(&r.any).expect("a cluster")
}

fn protocol_options(c: &Cluster) -> Option<UpstreamProtocolOptions> {
    let any = c
        .typed_extension_protocol_options
        .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")?;
    unpack::<HttpProtocolOptions>(any)
        .expect("options")
        .upstream_protocol_options
}

fn is_explicit_h2(options: Option<UpstreamProtocolOptions>) -> bool {
    matches!(
        options,
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(e))
            if matches!(e.protocol_config, Some(ProtocolConfig::Http2ProtocolOptions(_)))
    )
}

fn upstream_context(socket: &TransportSocket) -> UpstreamTlsContext {
    assert_eq!(socket.name, "envoy.transport_sockets.tls");
    let Some(
        remora_xds_proto::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
            any,
        ),
    ) = &socket.config_type
    else {
        panic!("typed config expected");
    };
    unpack(any).expect("an UpstreamTlsContext")
}

/// The exact URI SANs, SDS names and ALPN of an upstream context.
fn sans_and_secrets(ctx: &UpstreamTlsContext) -> (Vec<String>, String, String, Vec<String>) {
    let common = ctx.common_tls_context.as_ref().expect("common context");
    let params = common.tls_params.as_ref().expect("params");
    assert_eq!(
        params.tls_minimum_protocol_version,
        TlsProtocol::TlSv13 as i32
    );
    assert_eq!(
        params.tls_maximum_protocol_version,
        TlsProtocol::TlSv13 as i32
    );
    let cert = common.tls_certificate_sds_secret_configs[0].name.clone();
    let Some(ValidationContextType::CombinedValidationContext(combined)) =
        &common.validation_context_type
    else {
        panic!("a combined validation context expected");
    };
    let sans = combined
        .default_validation_context
        .as_ref()
        .expect("default context")
        .match_typed_subject_alt_names
        .iter()
        .map(|m| {
            assert_eq!(m.san_type, 3, "URI");
            match m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) {
                Some(MatchPattern::Exact(s)) => s.clone(),
                other => panic!("exact matcher expected, got {other:?}"),
            }
        })
        .collect();
    let root = combined
        .validation_context_sds_secret_config
        .as_ref()
        .expect("SDS root")
        .name
        .clone();
    (sans, cert, root, common.alpn_protocols.clone())
}

#[test]
fn clusters_of_sidecar_endpoints_speak_mtls() {
    let res = translate(&tls_mesh(), &sidecar());
    let api = cluster(&res, "outbound|8080||api.default.svc.cluster.local");
    let (sans, cert, root, alpn) = sans_and_secrets(&upstream_context(
        api.transport_socket.as_ref().expect("TLS"),
    ));
    assert_eq!(
        sans,
        [
            "spiffe://cluster.local/ns/default/sa/api",
            "spiffe://cluster.local/ns/default/sa/api-b"
        ]
    );
    assert_eq!((cert.as_str(), root.as_str()), ("default", "ROOTCA"));
    assert!(api.transport_socket_matches.is_empty());
    // The protocol options and ALPN keep naming the application's protocol.
    assert!(protocol_options(&api).is_none());
    assert_eq!(alpn, ["http/1.1"]);
    let rpc = cluster(&res, "outbound|9090||rpc.default.svc.cluster.local");
    let (sans, .., alpn) = sans_and_secrets(&upstream_context(
        rpc.transport_socket.as_ref().expect("TLS"),
    ));
    assert_eq!(sans, ["spiffe://cluster.local/ns/default/sa/rpc"]);
    assert_eq!(alpn, ["h2"]);
    assert!(is_explicit_h2(protocol_options(&rpc)));

    // No sidecar: plaintext, protocol untouched.
    let web = cluster(&res, "outbound|80||web.default.svc.cluster.local");
    assert!(web.transport_socket.is_none() && web.transport_socket_matches.is_empty());
    assert!(protocol_options(&web).is_none());
    // Opaque TCP stays plaintext even to a sidecar.
    let db = cluster(&res, "outbound|5432||db.default.svc.cluster.local");
    assert!(db.transport_socket.is_none() && db.transport_socket_matches.is_empty());

    // gRPC clients get no TLS (they do not speak SDS).
    let grpc_res = translate(&tls_mesh(), &grpc());
    let api = cluster(&grpc_res, "outbound|8080||api.default.svc.cluster.local");
    assert!(api.transport_socket.is_none());
}

#[test]
fn mixed_clusters_match_mtls_on_endpoint_metadata() {
    let res = translate(&tls_mesh(), &sidecar());
    let name = "outbound|8081||mixed.default.svc.cluster.local";
    let mixed = cluster(&res, name);
    assert!(mixed.transport_socket.is_none(), "plaintext by default");
    assert_eq!(mixed.transport_socket_matches.len(), 1);
    let m = &mixed.transport_socket_matches[0];
    let fields = &m.r#match.as_ref().expect("match").fields;
    assert_eq!(fields.len(), 1);
    assert_eq!(
        fields["remora.mtls"].kind,
        Some(Kind::StringValue("true".into()))
    );
    let (sans, ..) = sans_and_secrets(&upstream_context(m.transport_socket.as_ref().expect("TLS")));
    assert_eq!(sans, ["spiffe://cluster.local/ns/default/sa/mixed"]);
    assert!(protocol_options(&mixed).is_none(), "HTTP/1 port: HTTP/1.1");

    let cla: ClusterLoadAssignment = unpack(
        &res.of(ResourceType::Endpoint)
            .get(name)
            .expect("present")
            .any,
    )
    .expect("CLA");
    let metadata: Vec<Vec<String>> = cla.endpoints[0]
        .lb_endpoints
        .iter()
        .map(|e| {
            let mut keys: Vec<String> = e
                .metadata
                .as_ref()
                .map(|m| m.filter_metadata.keys().cloned().collect())
                .unwrap_or_default();
            keys.sort();
            keys
        })
        .collect();
    assert_eq!(
        metadata,
        [
            vec![
                "envoy.transport_socket_match".to_string(),
                "remora".to_string()
            ],
            vec![]
        ]
    );
    let api: ClusterLoadAssignment = unpack(
        &res.of(ResourceType::Endpoint)
            .get("outbound|8080||api.default.svc.cluster.local")
            .expect("present")
            .any,
    )
    .expect("CLA");
    assert_eq!(
        api.endpoints[0].lb_endpoints[0]
            .metadata
            .as_ref()
            .expect("identity")
            .filter_metadata
            .len(),
        1,
        "all-sidecar clusters need no match metadata"
    );
}

#[test]
fn two_translations_of_a_mixed_mesh_have_the_same_bytes() {
    let first = translate(&tls_mesh(), &sidecar());
    for _ in 0..16 {
        assert_eq!(translate(&tls_mesh(), &sidecar()), first);
    }
}

fn inbound_view(service: &str, app: Option<AppView>) -> View {
    View {
        inbound: Some(InboundView {
            listener: "0.0.0.0:15006".parse().expect("literal"),
            service: ServiceKey {
                namespace: "default".into(),
                name: service.into(),
            },
            app,
        }),
        ..sidecar()
    }
}

fn inbound(res: &Resources) -> Listener {
    unpack(
        &res.of(ResourceType::Listener)
            .get("inbound")
            .expect("present")
            .any,
    )
    .expect("a listener")
}

fn chain_protocols(l: &Listener) -> Vec<String> {
    l.filter_chains
        .iter()
        .map(|c| {
            c.filter_chain_match
                .as_ref()
                .expect("match")
                .transport_protocol
                .clone()
        })
        .collect()
}

#[test]
fn strict_inbound_listener_has_one_mtls_chain() {
    let res = translate(&tls_mesh(), &inbound_view("api", None));
    let l = inbound(&res);
    assert_eq!(l.name, "inbound");
    let Some(address::Address::SocketAddress(sa)) =
        l.address.as_ref().and_then(|a| a.address.as_ref())
    else {
        panic!("socket address expected");
    };
    assert_eq!(
        (sa.address.as_str(), sa.port_specifier.clone()),
        ("0.0.0.0", Some(PortSpecifier::PortValue(15006)))
    );
    assert_eq!(l.listener_filters.len(), 1);
    assert_eq!(
        l.listener_filters[0].name,
        "envoy.filters.listener.tls_inspector"
    );
    assert!(matches!(
        l.listener_filters[0].config_type,
        Some(listener_filter::ConfigType::TypedConfig(_))
    ));
    assert_eq!(chain_protocols(&l), ["tls"]);

    let chain = &l.filter_chains[0];
    let socket = chain.transport_socket.as_ref().expect("TLS");
    assert_eq!(socket.name, "envoy.transport_sockets.tls");
    let Some(
        remora_xds_proto::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
            any,
        ),
    ) = &socket.config_type
    else {
        panic!("typed config");
    };
    let ctx: DownstreamTlsContext = unpack(any).expect("downstream context");
    assert_eq!(ctx.require_client_certificate.map(|b| b.value), Some(true));
    let common = ctx.common_tls_context.expect("common");
    assert_eq!(common.alpn_protocols, ["h2", "http/1.1"]);
    assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "default");
    assert!(matches!(
        common.validation_context_type,
        Some(ValidationContextType::ValidationContextSdsSecretConfig(ref s)) if s.name == "ROOTCA"
    ));

    let Some(filter::ConfigType::TypedConfig(any)) = &chain.filters[0].config_type else {
        panic!("HCM");
    };
    let hcm: HttpConnectionManager = unpack(any).expect("HCM");
    assert_eq!(hcm.stat_prefix, "inbound");
    let Some(RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier else {
        panic!("inline routes");
    };
    let Some(Action::Route(action)) = &rc.virtual_hosts[0].routes[0].action else {
        panic!("route action");
    };
    assert_eq!(
        action.cluster_specifier,
        Some(ClusterSpecifier::Cluster("inbound|app".into()))
    );

    // Without REMORA_APP_ADDRESS, no inbound|app cluster.
    assert!(!res.of(ResourceType::Cluster).contains("inbound|app"));
    // Unknown services are STRICT.
    let unknown = inbound(&translate(&tls_mesh(), &inbound_view("nope", None)));
    assert_eq!(chain_protocols(&unknown), ["tls"]);
    // No inbound listener unless asked.
    assert!(
        !translate(&tls_mesh(), &sidecar())
            .of(ResourceType::Listener)
            .contains("inbound")
    );
}

#[test]
fn permissive_inbound_listener_also_takes_plaintext_and_the_app_cluster_is_static() {
    let app = AppView {
        address: "127.0.0.1:8080".parse().expect("literal"),
        http2: true,
    };
    let res = translate(&tls_mesh(), &inbound_view("web", Some(app)));
    let l = inbound(&res);
    assert_eq!(chain_protocols(&l), ["tls", "raw_buffer"]);
    assert!(l.filter_chains[1].transport_socket.is_none());

    let c = cluster(&res, "inbound|app");
    assert!(matches!(
        c.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Static as i32
    ));
    assert!(is_explicit_h2(protocol_options(&c)));
    let h1 = translate(
        &tls_mesh(),
        &inbound_view(
            "web",
            Some(AppView {
                http2: false,
                ..app
            }),
        ),
    );
    assert!(!is_explicit_h2(protocol_options(&cluster(
        &h1,
        "inbound|app"
    ))));
}

#[test]
fn inbound_views_come_from_node_metadata() {
    let node = |fields: &[(&str, &str)]| Node {
        id: "n".into(),
        cluster: "web".into(),
        metadata: Some(Struct {
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
        }),
        ..Default::default()
    };
    let v = View::for_node(&node(&[
        (META_INBOUND_LISTENER, "0.0.0.0:15006"),
        (META_NAMESPACE, "shop"),
        (META_APP_ADDRESS, "127.0.0.1:8080"),
        (META_APP_PROTOCOL, "http2"),
    ]))
    .expect("ok");
    assert_eq!(
        v.inbound,
        Some(InboundView {
            listener: "0.0.0.0:15006".parse().expect("literal"),
            service: ServiceKey {
                namespace: "shop".into(),
                name: "web".into()
            },
            app: Some(AppView {
                address: "127.0.0.1:8080".parse().expect("literal"),
                http2: true
            }),
        })
    );
    let v = View::for_node(&node(&[(META_INBOUND_LISTENER, "0.0.0.0:15006")])).expect("ok");
    let inbound = v.inbound.expect("inbound");
    assert_eq!(inbound.service.namespace, "default");
    assert_eq!(inbound.app, None);
    let err = View::for_node(&node(&[
        (META_INBOUND_LISTENER, "0.0.0.0:15006"),
        (META_APP_ADDRESS, "127.0.0.1:8080"),
        (META_APP_PROTOCOL, "udp"),
    ]))
    .expect_err("bad protocol");
    assert!(err.to_string().contains("REMORA_APP_PROTOCOL"), "{err}");
    let err = View::for_node(&node(&[(META_INBOUND_LISTENER, "nowhere")])).expect_err("bad");
    assert!(err.to_string().contains("REMORA_INBOUND_LISTENER"), "{err}");
}
