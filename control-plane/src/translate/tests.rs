use std::collections::BTreeSet;

use remora_xds_proto::pb::envoy::config::cluster::v3::{Cluster, cluster::LbPolicy};
use remora_xds_proto::pb::envoy::config::core::v3::{Node, address, socket_address::PortSpecifier};
use remora_xds_proto::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, lb_endpoint::HostIdentifier,
};
use remora_xds_proto::pb::envoy::config::listener::v3::Listener;
use remora_xds_proto::pb::envoy::config::route::v3::{
    RouteConfiguration, route::Action, route_action::ClusterSpecifier,
};
use remora_xds_proto::pb::google::protobuf::{Struct, Value, value::Kind};
use remora_xds_proto::unpack;

use super::*;
use crate::model::fixtures::*;
use crate::model::{
    Backoff, HeaderMatch, Mesh, PathMatch, Protocol, RetryOn, RetryPolicy, StringMatch, Subset,
};

fn sidecar() -> View {
    View {
        flavor: Flavor::Sidecar,
        outbound_listener: "127.0.0.1:15001".parse().expect("literal"),
    }
}

fn grpc() -> View {
    View {
        flavor: Flavor::ProxylessGrpc,
        outbound_listener: DEFAULT_OUTBOUND_LISTENER,
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
        .resources
        .get(name)
        .unwrap_or_else(|| panic!("no {ty} resource {name:?}; have {:?}", names(r, ty)));
    unpack(&resource.any).expect("decodes")
}

fn names(r: &Resources, ty: ResourceType) -> BTreeSet<String> {
    r.of(ty).resources.keys().cloned().collect()
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
        ["0.0.0.0_80", "0.0.0.0_8080", "0.0.0.0_9090", "outbound"]
            .iter()
            .map(|s| s.to_string())
            .collect()
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
        .resources
        .iter()
        .filter(|(n, r)| c.of(ResourceType::Endpoint).resources[*n].version != r.version)
        .map(|(n, _)| n)
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
        View {
            flavor: Flavor::Sidecar,
            outbound_listener: DEFAULT_OUTBOUND_LISTENER
        }
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
