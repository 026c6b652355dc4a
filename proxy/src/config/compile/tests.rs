//! The compiler against the exact resources Remora's control plane sends
//! (translated from mesh YAML), and against hand-made variations of them
//! for every NACK case.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use remora_control_plane::translate::{
    self, DEFAULT_OUTBOUND_LISTENER, Flavor, ResourceType, Resources, View,
};
use remora_xds_proto::pb::envoy::config::cluster::v3::{
    Cluster as PbCluster, OutlierDetection,
    cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as PbLb},
};
use remora_xds_proto::pb::envoy::config::core::v3::{HealthCheck, HealthStatus, TransportSocket};
use remora_xds_proto::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use remora_xds_proto::pb::envoy::config::listener::v3::{Listener, filter};
use remora_xds_proto::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, HedgePolicy, RedirectAction, Route as PbRoute,
    RouteConfiguration,
    header_matcher::HeaderMatchSpecifier,
    retry_policy::{RetryHostPredicate, RetryPriority},
    route::Action,
    route_action::{ClusterSpecifier, HostRewriteSpecifier, RequestMirrorPolicy},
    route_match::PathSpecifier,
};
use remora_xds_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, ScopedRoutes, http_connection_manager::RouteSpecifier,
};
use remora_xds_proto::pb::envoy::r#type::matcher::v3::{RegexMatchAndSubstitute, RegexMatcher};
use remora_xds_proto::pb::envoy::r#type::v3::Int64Range;
use remora_xds_proto::pb::google::protobuf::{BoolValue, Duration as PbDuration};
use remora_xds_proto::{pack, unpack};

use super::*;
use crate::config::{AppProtocol, HeaderMatch, InboundMode, LbPolicy, PathMatch, StringMatch};
use crate::metrics::Metrics;

const EXAMPLE: &str = include_str!("../../../../examples/mesh.yaml");
const CATALOG: &str = "catalog.shop.svc.cluster.local:8080";
const CATALOG_V1: &str = "outbound|8080|v1|catalog.shop.svc.cluster.local";
const CATALOG_V2: &str = "outbound|8080|v2|catalog.shop.svc.cluster.local";
const CATALOG_ALL: &str = "outbound|8080||catalog.shop.svc.cluster.local";
const REVIEWS_ALL: &str = "outbound|9090||reviews.shop.svc.cluster.local";
const FRONTEND: &str = "outbound|80||frontend.shop.svc.cluster.local";

// === Helpers ===

fn translate_yaml(yaml: &str) -> Resources {
    let mesh = remora_control_plane::sources::file::parse(Path::new("mesh.yaml"), yaml)
        .expect("the test mesh is valid");
    translate::translate(
        &mesh,
        &View {
            flavor: Flavor::Sidecar,
            outbound_listener: DEFAULT_OUTBOUND_LISTENER,
            inbound: None,
        },
    )
}

fn state() -> State {
    State::new(Arc::new(Metrics::new()))
}

fn kind(ty: ResourceType) -> ResourceKind {
    ResourceKind::from_type_url(ty.type_url()).expect("consumed type")
}

fn anys(res: &Resources, ty: ResourceType) -> Vec<Any> {
    res.of(ty).iter().map(|r| r.any.clone()).collect()
}

/// Applies one response of `ty` the way the xDS client does.
fn apply(compiler: &mut Compiler, ty: ResourceType, version: &str, resources: &[Any]) -> Applied {
    let kind = kind(ty);
    let subscribed = match kind {
        ResourceKind::Route => compiler.route_names(),
        ResourceKind::Endpoint => compiler.endpoint_names(),
        _ => BTreeSet::new(),
    };
    compiler.apply(kind, version, resources, &subscribed)
}

/// Applies every type in the order a control plane pushes them; returns
/// every error.
fn feed(compiler: &mut Compiler, res: &Resources) -> Vec<ResourceError> {
    let mut errors = Vec::new();
    for ty in [
        ResourceType::Cluster,
        ResourceType::Listener,
        ResourceType::Route,
        ResourceType::Endpoint,
    ] {
        let version = res.of(ty).version.clone();
        errors.extend(apply(compiler, ty, &version, &anys(res, ty)).errors);
    }
    errors
}

fn compiled(yaml: &str) -> (Compiler, Resources) {
    let res = translate_yaml(yaml);
    let mut compiler = Compiler::new();
    let errors = feed(&mut compiler, &res);
    assert!(errors.is_empty(), "{errors:#?}");
    (compiler, res)
}

/// Replaces resource `name` of `ty` with a modified copy.
fn modified<M>(res: &Resources, ty: ResourceType, name: &str, f: impl FnOnce(&mut M)) -> Vec<Any>
where
    M: prost::Message + prost::Name + Default,
{
    let mut f = Some(f);
    res.of(ty)
        .iter()
        .map(|r| {
            if r.name == name
                && let Some(f) = f.take()
            {
                let mut m: M = unpack(&r.any).expect("decodes");
                f(&mut m);
                return pack(&m);
            }
            r.any.clone()
        })
        .collect()
}

fn route<'a>(config: &'a Config, vhost: &str, route: &str) -> &'a Route {
    let table = config.outbound.as_ref().expect("outbound table");
    table
        .virtual_hosts
        .iter()
        .find(|v| v.name == vhost)
        .and_then(|v| v.routes.iter().find(|r| r.name == route))
        .expect("route exists")
}

/// The outbound route configuration with `f` applied to the catalog
/// virtual host's route `index`.
fn with_catalog_route(
    index: usize,
    f: impl FnOnce(&mut PbRoute),
) -> impl FnOnce(&mut RouteConfiguration) {
    move |rc: &mut RouteConfiguration| {
        let vh = rc
            .virtual_hosts
            .iter_mut()
            .find(|v| v.name == CATALOG)
            .expect("catalog vhost");
        f(&mut vh.routes[index]);
    }
}

fn action(r: &mut PbRoute) -> &mut remora_xds_proto::pb::envoy::config::route::v3::RouteAction {
    match r.action.as_mut() {
        Some(Action::Route(a)) => a,
        _ => panic!("a route action"),
    }
}

/// Applies an RDS response whose `outbound` was changed by `f`; returns
/// the one error, and checks the previous table keeps serving.
fn rds_error(f: impl FnOnce(&mut RouteConfiguration)) -> String {
    let (mut compiler, res) = compiled(EXAMPLE);
    let before = compiler.version(ResourceKind::Route).map(str::to_string);
    let bad = modified(&res, ResourceType::Route, "outbound", f);
    let applied = apply(&mut compiler, ResourceType::Route, "v-bad", &bad);
    assert_eq!(applied.errors.len(), 1, "{:#?}", applied.errors);
    assert!(!applied.changed);
    assert_eq!(
        compiler.version(ResourceKind::Route).map(str::to_string),
        before
    );
    let (config, complete) = compiler.build(&state());
    assert!(complete, "the previous route table still serves");
    assert!(config.outbound.is_some());
    applied.errors[0].to_string()
}

/// Applies a CDS response whose cluster `name` was changed by `f`; returns
/// the one error, and checks the other clusters still apply.
fn cds_error(name: &str, f: impl FnOnce(&mut PbCluster)) -> String {
    let (mut compiler, res) = compiled(EXAMPLE);
    let bad = modified(&res, ResourceType::Cluster, name, f);
    let applied = apply(&mut compiler, ResourceType::Cluster, "v-bad", &bad);
    assert_eq!(applied.errors.len(), 1, "{:#?}", applied.errors);
    let (config, _) = compiler.build(&state());
    assert_eq!(
        config.clusters.len(),
        res.of(ResourceType::Cluster).len(),
        "the rejected cluster keeps its accepted form, the others apply"
    );
    applied.errors[0].to_string()
}

fn lds_error(f: impl FnOnce(&mut HttpConnectionManager)) -> String {
    let (mut compiler, res) = compiled(EXAMPLE);
    let bad = modified(
        &res,
        ResourceType::Listener,
        "outbound",
        |l: &mut Listener| {
            let filter = &mut l.filter_chains[0].filters[0];
            let Some(filter::ConfigType::TypedConfig(any)) = filter.config_type.as_mut() else {
                panic!("typed config");
            };
            let mut hcm: HttpConnectionManager = unpack(any).expect("hcm");
            f(&mut hcm);
            *any = pack(&hcm);
        },
    );
    let applied = apply(&mut compiler, ResourceType::Listener, "v-bad", &bad);
    assert_eq!(applied.errors.len(), 1, "{:#?}", applied.errors);
    // The outbound table, and one per HTTP port for intercepted traffic.
    assert_eq!(
        compiler.route_names(),
        BTreeSet::from(["80", "8080", "9090", "outbound"].map(String::from))
    );
    applied.errors[0].to_string()
}

fn eds_error(name: &str, f: impl FnOnce(&mut ClusterLoadAssignment)) -> String {
    let (mut compiler, res) = compiled(EXAMPLE);
    let bad = modified(&res, ResourceType::Endpoint, name, f);
    let applied = apply(&mut compiler, ResourceType::Endpoint, "v-bad", &bad);
    assert_eq!(applied.errors.len(), 1, "{:#?}", applied.errors);
    applied.errors[0].to_string()
}

// === The example mesh ===

#[test]
fn the_example_mesh_compiles_fully_and_completely() {
    let (compiler, res) = compiled(EXAMPLE);
    let (config, complete) = compiler.build(&state());
    assert!(complete);
    assert_eq!(
        config.versions.get("CDS"),
        Some(&res.of(ResourceType::Cluster).version)
    );
    assert_eq!(config.versions.len(), 4);
    assert_eq!(config.clusters.len(), res.of(ResourceType::Cluster).len());

    let catalog = &config.clusters[CATALOG_ALL];
    assert_eq!(catalog.lb_policy, LbPolicy::LeastRequest);
    assert_eq!(catalog.connect_timeout, Duration::from_millis(500));
    assert_eq!(catalog.protocol, AppProtocol::Http1);
    assert_eq!(catalog.members.len(), 2);
    assert_eq!(catalog.total_weight, 2);
    let v2 = &config.clusters[CATALOG_V2];
    assert_eq!(v2.members.len(), 1);
    let key = &v2.members[0].endpoint.key;
    assert_eq!(key.app, "127.0.0.1:9102".parse().expect("addr"));
    assert_eq!(
        key.proxy,
        Some(key.app),
        "an endpoint with an identity has a sidecar"
    );
    assert_eq!(
        key.identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/catalog")
    );

    let reviews = &config.clusters[REVIEWS_ALL];
    assert_eq!(reviews.protocol, AppProtocol::Http2);
    assert_eq!(reviews.lb_policy, LbPolicy::RoundRobin);
    assert_eq!(
        config.clusters[FRONTEND].connect_timeout,
        Duration::from_secs(1)
    );

    // The config dump serializes.
    let json = serde_json::to_value(&config).expect("serializes");
    assert!(json["outbound"]["virtual_hosts"].is_array());
}

#[test]
fn authorities_select_virtual_hosts() {
    let (compiler, _) = compiled(EXAMPLE);
    let (config, _) = compiler.build(&state());
    let table = config.outbound.as_ref().expect("table");
    for authority in [
        "catalog.shop.svc.cluster.local:8080",
        "catalog:8080",
        "catalog",
        "CATALOG.Shop:8080",
        "catalog.shop.svc",
    ] {
        assert_eq!(
            table.virtual_host(authority).map(|v| v.name.as_str()),
            Some(CATALOG),
            "{authority}"
        );
    }
    assert_eq!(table.virtual_host("catalog:9999").map(|v| &v.name), None);
    let vh = table.virtual_host("reviews:9090").expect("reviews");
    assert_eq!(
        vh.service, "reviews.shop",
        "name.namespace, as inbound metrics say it"
    );
}

#[test]
fn routes_keep_their_order_matchers_weights_and_policies() {
    let (compiler, _) = compiled(EXAMPLE);
    let (config, _) = compiler.build(&state());
    let table = config.outbound.as_ref().expect("table");
    let catalog = table.virtual_host("catalog").expect("catalog");
    let names: Vec<&str> = catalog.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["by-header", "v2-path", "split"]);

    let by_header = &catalog.routes[0];
    assert!(matches!(&by_header.matcher.path, PathMatch::Prefix(p) if p == "/"));
    let [h] = by_header.matcher.headers.as_slice() else {
        panic!("one header condition");
    };
    assert_eq!(h.name.as_str(), "x-canary");
    assert!(!h.is_method && !h.invert);
    assert!(matches!(&h.value, Some(StringMatch::Exact(v)) if v == "true"));
    assert_eq!(by_header.action.backends.len(), 1);
    assert_eq!(by_header.action.backends[0].cluster.name, CATALOG_V2);
    assert_eq!(by_header.action.timeout, None, "explicit 0: no timeout");
    assert!(by_header.action.retry.is_none());

    let v2_path = &catalog.routes[1];
    assert!(matches!(&v2_path.matcher.path, PathMatch::Prefix(p) if p == "/v2"));

    let split = &catalog.routes[2];
    let weights: Vec<(&str, u32)> = split
        .action
        .backends
        .iter()
        .map(|b| (b.cluster.name.as_str(), b.weight))
        .collect();
    assert_eq!(weights, [(CATALOG_V1, 80), (CATALOG_V2, 20)]);
    assert_eq!(split.action.total_weight, 100);
    assert_eq!(split.action.timeout, Some(Duration::from_secs(2)));
    let retry = split.action.retry.as_ref().expect("retry policy");
    assert!(retry.on.server_error && retry.on.connect_failure && retry.on.reset);
    assert!(!retry.on.gateway_error && retry.on.grpc_statuses == 0);
    assert_eq!(retry.num_retries, 2);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(retry.backoff_base, Duration::from_millis(25));
    assert_eq!(retry.backoff_max, Duration::from_millis(250));

    let reviews = table.virtual_host("reviews:9090").expect("reviews");
    let retry = reviews.routes[0].action.retry.as_ref().expect("retry");
    assert!(retry.on.grpc(14) && !retry.on.grpc(13));
    assert_eq!(
        reviews.routes[0].action.timeout,
        Some(Duration::from_secs(1))
    );

    let frontend = table.virtual_host("frontend").expect("frontend");
    assert_eq!(frontend.routes[0].name, "default");
    assert_eq!(frontend.routes[0].action.backends[0].cluster.name, FRONTEND);
}

const MATCHERS: &str = r#"
services:
  - name: api
    ports: [{name: http, port: 80, protocol: http}]
    endpoints:
      - {address: 10.0.0.1, port: 8080, identity: {}}
      - {address: "fd00::2", port: 8080, weight: 3}
      - {address: 10.0.0.3, port: 8080, health: draining}
      - {address: 10.0.0.4, port: 8080, health: unhealthy}
    routes:
      - name: regex
        match:
          path: {regex: "/items/[0-9]+"}
          method: POST
          headers:
            - {name: x-debug, present: true, invert: true}
            - {name: x-user, regex: "a.*"}
            - {name: x-tenant, prefix: acme-}
          query:
            - {name: page, exact: "2"}
            - {name: verbose, present: true}
        backends: [{service: api}]
        retry:
          on: [gateway-error, retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted]
          status_codes: [503, 429]
      - name: exact
        match: {path: {exact: /healthz}}
        backends: [{service: api}]
"#;

#[test]
fn matchers_compile_as_the_control_plane_sends_them() {
    let (compiler, _) = compiled(MATCHERS);
    let (config, complete) = compiler.build(&state());
    assert!(complete);
    let r = route(&config, "api.default.svc.cluster.local:80", "regex");
    let PathMatch::Regex(re) = &r.matcher.path else {
        panic!("regex path");
    };
    assert!(re.is_match("/items/42"));
    assert!(!re.is_match("/items/42/x"), "anchored: the whole path");
    assert!(!re.is_match("/x/items/42"));
    let by_name = |name: &str| -> &HeaderMatch {
        r.matcher
            .headers
            .iter()
            .find(|h| h.name.as_str() == name || (name == ":method" && h.is_method))
            .expect("condition")
    };
    let method = by_name(":method");
    assert!(matches!(&method.value, Some(StringMatch::Exact(m)) if m == "POST"));
    let debug = by_name("x-debug");
    assert!(debug.invert && debug.value.is_none());
    assert!(
        matches!(&by_name("x-user").value, Some(StringMatch::Regex(re)) if re.is_match("alice") && !re.is_match("bob"))
    );
    assert!(matches!(&by_name("x-tenant").value, Some(StringMatch::Prefix(p)) if p == "acme-"));
    assert_eq!(r.matcher.query.len(), 2);
    assert!(matches!(&r.matcher.query[0].value, Some(StringMatch::Exact(v)) if v == "2"));
    assert!(r.matcher.query[1].value.is_none());

    let retry = r.action.retry.as_ref().expect("retry");
    assert!(retry.on.gateway_error && retry.on.retriable_status_codes);
    for code in [1, 4, 13, 8] {
        assert!(retry.on.grpc(code), "{code}");
    }
    assert!(!retry.on.grpc(14));
    assert_eq!(retry.num_retries, 1, "the mesh's default");
    assert_eq!(retry.retriable_status_codes, [503, 429]);

    let exact = route(&config, "api.default.svc.cluster.local:80", "exact");
    assert!(matches!(&exact.matcher.path, PathMatch::Exact(p) if p == "/healthz"));

    // Health and weights, with and without a sidecar.
    let api = &config.clusters["outbound|80||api.default.svc.cluster.local"];
    let members: Vec<(String, u32, bool)> = api
        .members
        .iter()
        .map(|m| {
            (
                m.endpoint.key.app.to_string(),
                m.weight,
                m.endpoint.key.proxy.is_some(),
            )
        })
        .collect();
    assert_eq!(
        members,
        [
            ("10.0.0.1:8080".to_string(), 1, true),
            ("[fd00::2]:8080".to_string(), 3, false)
        ],
        "draining and unhealthy endpoints take no traffic"
    );
    assert_eq!(api.total_weight, 4);
    assert_eq!(api.members[1].endpoint.key.identity, None);
}

// === Defaults Envoy applies ===

#[test]
fn an_absent_timeout_is_envoys_15_seconds_and_zero_is_none() {
    let (mut compiler, res) = compiled(EXAMPLE);
    let changed = modified(
        &res,
        ResourceType::Route,
        "outbound",
        with_catalog_route(0, |r| action(r).timeout = None),
    );
    let changed = modified_any(
        &changed,
        "outbound",
        with_catalog_route(1, |r| {
            action(r).timeout = Some(PbDuration {
                seconds: 3,
                nanos: 0,
            });
        }),
    );
    let applied = apply(&mut compiler, ResourceType::Route, "v2", &changed);
    assert!(applied.errors.is_empty() && applied.changed);
    let (config, _) = compiler.build(&state());
    assert_eq!(
        route(&config, CATALOG, "by-header").action.timeout,
        Some(Duration::from_secs(15))
    );
    assert_eq!(
        route(&config, CATALOG, "v2-path").action.timeout,
        Some(Duration::from_secs(3))
    );
    assert_eq!(
        route(&config, CATALOG, "split").action.timeout,
        Some(Duration::from_secs(2))
    );
}

/// Like [`modified`], over an already modified list of route configs.
fn modified_any(list: &[Any], name: &str, f: impl FnOnce(&mut RouteConfiguration)) -> Vec<Any> {
    let mut f = Some(f);
    list.iter()
        .map(|any| {
            let mut rc: RouteConfiguration = unpack(any).expect("decodes");
            if rc.name == name
                && let Some(f) = f.take()
            {
                f(&mut rc);
                return pack(&rc);
            }
            any.clone()
        })
        .collect()
}

#[test]
fn retry_defaults_follow_envoy() {
    let (mut compiler, res) = compiled(EXAMPLE);
    let changed = modified(
        &res,
        ResourceType::Route,
        "outbound",
        with_catalog_route(2, |r| {
            let policy = action(r).retry_policy.as_mut().expect("policy");
            policy.num_retries = None;
            policy
                .retry_back_off
                .as_mut()
                .expect("backoff")
                .max_interval = None;
            policy.per_try_timeout = None;
        }),
    );
    assert!(
        apply(&mut compiler, ResourceType::Route, "v2", &changed)
            .errors
            .is_empty()
    );
    let (config, _) = compiler.build(&state());
    let retry = route(&config, CATALOG, "split")
        .action
        .retry
        .as_ref()
        .expect("retry");
    assert_eq!(retry.num_retries, 1);
    assert_eq!(retry.backoff_max, Duration::from_millis(250), "10 x base");
    assert_eq!(retry.per_try_timeout, None);
}

// === Missing clusters ===

#[test]
fn a_route_to_a_missing_cluster_keeps_its_weight_with_no_backend() {
    let (mut compiler, res) = compiled(EXAMPLE);
    let without_v1: Vec<Any> = res
        .of(ResourceType::Cluster)
        .iter()
        .filter(|r| r.name != CATALOG_V1)
        .map(|r| r.any.clone())
        .collect();
    let applied = apply(&mut compiler, ResourceType::Cluster, "v2", &without_v1);
    assert!(applied.errors.is_empty() && applied.changed);
    let (config, complete) = compiler.build(&state());
    assert!(!complete, "a cluster the routes name is missing");
    assert!(!config.clusters.contains_key(CATALOG_V1));
    let split = route(&config, CATALOG, "split");
    assert_eq!(
        split.action.total_weight, 100,
        "80 of 100 land on nothing: 503"
    );
    let names: Vec<&str> = split
        .action
        .backends
        .iter()
        .map(|b| b.cluster.name.as_str())
        .collect();
    assert_eq!(names, [CATALOG_V2]);

    let rc = modified(
        &res,
        ResourceType::Route,
        "outbound",
        with_catalog_route(1, |r| {
            action(r).cluster_specifier = Some(ClusterSpecifier::Cluster("nowhere".into()));
        }),
    );
    assert!(
        apply(&mut compiler, ResourceType::Route, "v3", &rc)
            .errors
            .is_empty()
    );
    let (config, _) = compiler.build(&state());
    let v2_path = route(&config, CATALOG, "v2-path");
    assert!(v2_path.action.backends.is_empty());
    assert_eq!(v2_path.action.total_weight, 1);
}

// === Completeness ===

#[test]
fn the_config_is_complete_only_when_every_part_arrived() {
    let res = translate_yaml(EXAMPLE);
    let st = state();
    let mut compiler = Compiler::new();
    let step = |c: &mut Compiler, ty: ResourceType| {
        let version = res.of(ty).version.clone();
        assert!(apply(c, ty, &version, &anys(&res, ty)).errors.is_empty());
        c.build(&st).1
    };
    assert!(!compiler.build(&st).1);
    assert!(!step(&mut compiler, ResourceType::Listener));
    assert_eq!(
        compiler.route_names(),
        BTreeSet::from(["80", "8080", "9090", "outbound"].map(String::from))
    );
    assert!(!step(&mut compiler, ResourceType::Route), "no clusters yet");
    assert!(
        !step(&mut compiler, ResourceType::Cluster),
        "no endpoints yet"
    );
    assert_eq!(
        compiler.endpoint_names().len(),
        res.of(ResourceType::Endpoint).len()
    );
    assert!(step(&mut compiler, ResourceType::Endpoint));
}

// === State-of-the-world semantics ===

#[test]
fn lds_and_cds_responses_are_the_whole_set_rds_and_eds_are_not() {
    let (mut compiler, res) = compiled(EXAMPLE);
    // A CDS response without a cluster removes it.
    let applied = apply(&mut compiler, ResourceType::Cluster, "v2", &[]);
    assert!(applied.changed);
    assert!(compiler.endpoint_names().is_empty());
    assert!(compiler.build(&state()).0.clusters.is_empty());

    assert!(!res.of(ResourceType::Cluster).is_empty());

    // An EDS response carrying one assignment keeps the others.
    let (mut compiler, res) = compiled(EXAMPLE);
    let one: Vec<Any> = vec![
        res.of(ResourceType::Endpoint)
            .get(FRONTEND)
            .expect("present")
            .any
            .clone(),
    ];
    let applied = apply(&mut compiler, ResourceType::Endpoint, "v2", &one);
    assert!(applied.errors.is_empty());
    assert_eq!(compiler.version(ResourceKind::Endpoint), Some("v2"));
    assert!(compiler.build(&state()).1, "still complete");

    // Unsubscribed assignments are dropped on request.
    let names: BTreeSet<String> = [FRONTEND.to_string()].into();
    assert!(compiler.retain(ResourceKind::Endpoint, &names));
    assert!(!compiler.build(&state()).1);
}

#[test]
fn an_unchanged_resource_is_not_recompiled() {
    let (mut compiler, res) = compiled(EXAMPLE);
    let before = Arc::clone(&compiler.routes["outbound"].spec);
    let version = res.of(ResourceType::Route).version.clone();
    let applied = apply(
        &mut compiler,
        ResourceType::Route,
        &version,
        &anys(&res, ResourceType::Route),
    );
    assert_eq!(applied, Applied::default());
    assert!(Arc::ptr_eq(&before, &compiler.routes["outbound"].spec));
}

// === Long-lived state ===

#[test]
fn recompiling_keeps_endpoints_budgets_balancers_and_metric_handles() {
    let st = state();
    let (mut compiler, res) = compiled(EXAMPLE);
    let (first, _) = compiler.build(&st);

    // An endpoint change: catalog v1 gains an instance.
    let more = EXAMPLE.replace(
        "      - address: 127.0.0.1\n        port: 9102",
        "      - address: 127.0.0.1\n        port: 9103\n        labels: {version: v1}\n      - address: 127.0.0.1\n        port: 9102",
    );
    let res2 = translate_yaml(&more);
    assert_ne!(
        res.of(ResourceType::Endpoint).version,
        res2.of(ResourceType::Endpoint).version
    );
    let errors = feed(&mut compiler, &res2);
    assert!(errors.is_empty(), "{errors:#?}");
    let (second, complete) = compiler.build(&st);
    assert!(complete);

    assert_eq!(second.clusters[CATALOG_ALL].members.len(), 3);
    let at_9101 = |c: &Config| {
        c.clusters[CATALOG_ALL]
            .members
            .iter()
            .find(|m| m.endpoint.key.app.port() == 9101)
            .map(|m| Arc::clone(&m.endpoint))
            .expect("9101 is a member")
    };
    assert!(
        Arc::ptr_eq(&at_9101(&first), &at_9101(&second)),
        "same endpoint, same pool and counters"
    );
    assert!(Arc::ptr_eq(
        &first.clusters[CATALOG_ALL].balancer,
        &second.clusters[CATALOG_ALL].balancer
    ));
    assert!(Arc::ptr_eq(
        &first.clusters[CATALOG_ALL].clients,
        &second.clusters[CATALOG_ALL].clients
    ));
    let budget = |c: &Config| {
        Arc::clone(
            &route(c, CATALOG, "split")
                .action
                .retry
                .as_ref()
                .expect("retry")
                .budget,
        )
    };
    assert!(Arc::ptr_eq(&budget(&first), &budget(&second)));
    // The route's metric handles are the same series.
    route(&first, CATALOG, "split").metrics.retries.inc();
    assert_eq!(route(&second, CATALOG, "split").metrics.retries.get(), 1);
}

// === NACKs: Listener ===

#[test]
fn listener_nacks() {
    let msg = lds_error(|hcm| {
        hcm.route_specifier = Some(RouteSpecifier::RouteConfig(RouteConfiguration::default()));
    });
    assert_eq!(
        msg,
        "Listener \"outbound\": filter_chains[0] \"outbound\": filters[0].typed_config \
         (envoy.filters.network.http_connection_manager).route_config: is not supported \
         (routes must come over RDS)"
    );
    let msg = lds_error(|hcm| {
        hcm.route_specifier = Some(RouteSpecifier::ScopedRoutes(ScopedRoutes::default()));
    });
    assert!(msg.ends_with("scoped_routes: is not supported"), "{msg}");
    let msg = lds_error(|hcm| {
        hcm.http_filters.insert(
            0,
            HttpFilter {
                name: "envoy.filters.http.fault".into(),
                ..Default::default()
            },
        );
    });
    assert!(
        msg.ends_with(
            "http_filters[0] \"envoy.filters.http.fault\": only the router filter \
             (envoy.filters.http.router) is supported"
        ),
        "{msg}"
    );
}

#[test]
fn intercepted_traffic_gets_per_port_tables_and_tcp_vips() {
    let mesh = EXAMPLE.replacen(
        "  - name: catalog\n    namespace: shop\n",
        "  - name: catalog\n    namespace: shop\n    vip: 10.96.0.10\n",
        1,
    );
    let (compiler, _) = compiled(&mesh);
    let config = compiler.build(&state()).0;
    let intercepted = &config.intercepted;
    assert_eq!(
        intercepted.ports.keys().copied().collect::<Vec<_>>(),
        [80, 8080, 9090]
    );
    // catalog has a virtual IP on 8080 (HTTP), ledger one on 5432 (TCP).
    let catalog_vip: std::net::SocketAddr = "10.96.0.10:8080".parse().expect("address");
    assert!(intercepted.http_vips.contains(&catalog_vip));
    let http = crate::transparent::destination(&config, catalog_vip, &[15001]);
    let crate::transparent::Destination::Http { port, cluster, .. } = http else {
        panic!("{http:?}");
    };
    assert_eq!(port, 8080);
    assert_eq!(cluster.expect("the service's cluster").name, CATALOG_ALL);
    let (ledger_vip, ledger) = intercepted.tcp_vips.iter().next().expect("ledger's VIP");
    assert!(ledger.name.contains("ledger"), "{}", ledger.name);
    assert!(matches!(
        crate::transparent::destination(&config, *ledger_vip, &[15001]),
        crate::transparent::Destination::Tcp { .. }
    ));
    assert!(!intercepted.endpoints.is_empty());
}

#[test]
fn other_listeners_are_accepted_and_ignored() {
    // Listeners of shapes the proxy does not use are not even checked.
    let res = translate_yaml(EXAMPLE);
    let mut compiler = Compiler::new();
    let odd = modified(
        &res,
        ResourceType::Listener,
        "0.0.0.0_80",
        |l: &mut Listener| {
            l.filter_chains.clear();
        },
    );
    assert!(
        apply(&mut compiler, ResourceType::Listener, "v", &odd)
            .errors
            .is_empty()
    );
}

// === NACKs: RouteConfiguration ===

#[test]
fn the_precise_message_names_resource_field_and_reason() {
    let msg = rds_error(with_catalog_route(2, |r| {
        action(r).retry_policy.as_mut().expect("policy").retry_on = "5xx,refused-stream".into();
    }));
    assert_eq!(
        msg,
        "RouteConfiguration \"outbound\": virtual_hosts[1] \"catalog.shop.svc.cluster.local:8080\": \
         routes[2] \"split\": route.retry_policy.retry_on: \"refused-stream\" is not supported \
         (supported: 5xx, gateway-error, connect-failure, reset, retriable-status-codes, \
         cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)"
    );
}

#[test]
fn route_configuration_nacks() {
    type Case = (&'static str, Box<dyn FnOnce(&mut RouteConfiguration)>);
    let route_case =
        |f: Box<dyn FnOnce(&mut PbRoute)>| -> Box<dyn FnOnce(&mut RouteConfiguration)> {
            Box::new(with_catalog_route(1, f))
        };
    let cases: Vec<Case> = vec![
        (
            "virtual_hosts[1] \"catalog.shop.svc.cluster.local:8080\": domains[0]: \"*.shop\": wildcard domains are not supported (only \"*\")",
            Box::new(|rc: &mut RouteConfiguration| {
                rc.virtual_hosts[1].domains[0] = "*.shop".into()
            }),
        ),
        (
            "virtual_hosts[1] \"catalog.shop.svc.cluster.local:8080\": retry_policy (set it per route): is not supported",
            Box::new(|rc: &mut RouteConfiguration| {
                rc.virtual_hosts[1].retry_policy = Some(Default::default());
            }),
        ),
        (
            "domains[0]: \"Frontend\" is also a domain of an earlier virtual host",
            Box::new(|rc: &mut RouteConfiguration| {
                rc.virtual_hosts[1].domains[0] = "Frontend".into()
            }),
        ),
        (
            "routes[1] \"v2-path\": match.safe_regex.regex: \"/v2(\" does not compile",
            route_case(Box::new(|r: &mut PbRoute| {
                r.r#match.as_mut().expect("match").path_specifier =
                    Some(PathSpecifier::SafeRegex(RegexMatcher {
                        regex: "/v2(".into(),
                        ..Default::default()
                    }));
            })),
        ),
        (
            "routes[1] \"v2-path\": match.case_sensitive (false): is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                r.r#match.as_mut().expect("match").case_sensitive =
                    Some(BoolValue { value: false });
            })),
        ),
        (
            "routes[1] \"v2-path\": match.headers[0] \"x-n\": range_match: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                r.r#match
                    .as_mut()
                    .expect("match")
                    .headers
                    .push(HeaderMatcher {
                        name: "x-n".into(),
                        header_match_specifier: Some(HeaderMatchSpecifier::RangeMatch(
                            Int64Range { start: 1, end: 5 },
                        )),
                        ..Default::default()
                    });
            })),
        ),
        (
            "routes[1] \"v2-path\": redirect: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                r.action = Some(Action::Redirect(RedirectAction::default()))
            })),
        ),
        (
            "routes[1] \"v2-path\": direct_response: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                r.action = Some(Action::DirectResponse(DirectResponseAction::default()))
            })),
        ),
        (
            "routes[1] \"v2-path\": route.prefix_rewrite: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                action(r).prefix_rewrite = "/".into()
            })),
        ),
        (
            "route.regex_rewrite: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                action(r).regex_rewrite = Some(RegexMatchAndSubstitute::default())
            })),
        ),
        (
            "route.host_rewrite_literal: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                action(r).host_rewrite_specifier =
                    Some(HostRewriteSpecifier::HostRewriteLiteral("x".into()));
            })),
        ),
        (
            "route.hedge_policy: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                action(r).hedge_policy = Some(HedgePolicy::default())
            })),
        ),
        (
            "route.request_mirror_policies: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                action(r)
                    .request_mirror_policies
                    .push(RequestMirrorPolicy::default())
            })),
        ),
        (
            "route.cluster_header: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                action(r).cluster_specifier =
                    Some(ClusterSpecifier::ClusterHeader("x-cluster".into()))
            })),
        ),
        (
            "route.cluster_specifier_plugin: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                action(r).cluster_specifier =
                    Some(ClusterSpecifier::ClusterSpecifierPlugin("p".into()))
            })),
        ),
        (
            "route.retry_policy.retry_host_predicate: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                action(r).retry_policy = Some(
                    remora_xds_proto::pb::envoy::config::route::v3::RetryPolicy {
                        retry_host_predicate: vec![RetryHostPredicate::default()],
                        ..Default::default()
                    },
                );
            })),
        ),
        (
            "route.retry_policy.retry_priority: is not supported",
            route_case(Box::new(|r: &mut PbRoute| {
                action(r).retry_policy = Some(
                    remora_xds_proto::pb::envoy::config::route::v3::RetryPolicy {
                        retry_priority: Some(RetryPriority::default()),
                        ..Default::default()
                    },
                );
            })),
        ),
    ];
    for (expected, f) in cases {
        let msg = rds_error(f);
        assert!(
            msg.starts_with("RouteConfiguration \"outbound\": "),
            "{msg}"
        );
        assert!(msg.contains(expected), "expected {expected:?} in\n{msg}");
    }
}

#[test]
fn weighted_clusters_must_weigh_something() {
    let msg = rds_error(with_catalog_route(2, |r| {
        if let Some(ClusterSpecifier::WeightedClusters(w)) = action(r).cluster_specifier.as_mut() {
            for c in &mut w.clusters {
                c.weight = None;
            }
        }
    }));
    assert!(
        msg.ends_with("route.weighted_clusters.clusters: the weights add up to 0"),
        "{msg}"
    );
}

// === NACKs: Cluster ===

#[test]
fn cluster_nacks() {
    let msg = cds_error(CATALOG_V1, |c| {
        c.cluster_discovery_type =
            Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
    });
    assert_eq!(
        msg,
        format!(
            "Cluster {CATALOG_V1:?}: load_assignment: is missing (a STRICT_DNS cluster needs exactly one endpoint: the hostname and port to resolve)"
        )
    );
    let msg = cds_error(CATALOG_V1, |c| {
        c.transport_socket = Some(TransportSocket::default())
    });
    assert!(
        msg.ends_with("transport_socket.typed_config: is missing"),
        "{msg}"
    );
    let msg = cds_error(CATALOG_V1, |c| c.health_checks.push(HealthCheck::default()));
    assert!(msg.ends_with("health_checks: is not supported"), "{msg}");
    let msg = cds_error(CATALOG_V1, |c| {
        c.outlier_detection = Some(OutlierDetection::default())
    });
    assert!(
        msg.ends_with("outlier_detection: is not supported"),
        "{msg}"
    );
    let msg = cds_error(CATALOG_V1, |c| c.lb_policy = PbLb::RingHash as i32);
    assert!(
        msg.ends_with("lb_policy: RING_HASH is not supported (only ROUND_ROBIN, LEAST_REQUEST)"),
        "{msg}"
    );
}

#[test]
fn a_rejected_cluster_keeps_its_accepted_form() {
    let (mut compiler, res) = compiled(EXAMPLE);
    let bad = modified(
        &res,
        ResourceType::Cluster,
        CATALOG_V1,
        |c: &mut PbCluster| {
            c.connect_timeout = Some(PbDuration {
                seconds: 9,
                nanos: 0,
            });
            c.health_checks.push(HealthCheck::default());
        },
    );
    let bad = bad
        .into_iter()
        .map(|any| {
            let mut c: PbCluster = unpack(&any).expect("cluster");
            if c.name == CATALOG_V2 {
                c.connect_timeout = Some(PbDuration {
                    seconds: 7,
                    nanos: 0,
                });
            }
            pack(&c)
        })
        .collect::<Vec<_>>();
    let applied = apply(&mut compiler, ResourceType::Cluster, "v2", &bad);
    assert_eq!(applied.errors.len(), 1);
    assert!(applied.changed, "the valid change applies");
    let (config, complete) = compiler.build(&state());
    assert!(complete);
    assert_eq!(
        config.clusters[CATALOG_V1].connect_timeout,
        Duration::from_millis(500)
    );
    assert_eq!(
        config.clusters[CATALOG_V2].connect_timeout,
        Duration::from_secs(7)
    );
    assert_ne!(compiler.version(ResourceKind::Cluster), Some("v2"));
}

// === NACKs: ClusterLoadAssignment ===

#[test]
fn endpoint_nacks() {
    let msg = eds_error(CATALOG_ALL, |cla| cla.endpoints[0].priority = 1);
    assert_eq!(
        msg,
        format!(
            "ClusterLoadAssignment {CATALOG_ALL:?}: endpoints[0].priority: 1 is not supported \
             (only priority 0: no failover yet)"
        )
    );
    let msg = eds_error(CATALOG_ALL, |cla| {
        cla.endpoints[0].lb_endpoints[0].load_balancing_weight = Some(Default::default());
    });
    assert!(
        msg.ends_with("endpoints[0].lb_endpoints[0].load_balancing_weight: must be at least 1"),
        "{msg}"
    );
}

#[test]
fn endpoint_health_decides_membership() {
    let (mut compiler, res) = compiled(EXAMPLE);
    let changed = {
        let mut list = Vec::new();
        for r in res.of(ResourceType::Endpoint).iter() {
            let mut cla: ClusterLoadAssignment = unpack(&r.any).expect("cla");
            if cla.cluster_name == CATALOG_ALL {
                let statuses = [HealthStatus::Timeout, HealthStatus::Unknown];
                for (lb, status) in cla
                    .endpoints
                    .iter_mut()
                    .flat_map(|l| &mut l.lb_endpoints)
                    .zip(statuses)
                {
                    lb.health_status = status as i32;
                }
            }
            list.push(pack(&cla));
        }
        list
    };
    assert!(
        apply(&mut compiler, ResourceType::Endpoint, "v2", &changed)
            .errors
            .is_empty()
    );
    let (config, _) = compiler.build(&state());
    let members = &config.clusters[CATALOG_ALL].members;
    assert_eq!(members.len(), 1, "TIMEOUT takes no traffic, UNKNOWN does");
    assert_eq!(members[0].endpoint.key.app.port(), 9102);
}

#[test]
fn undecodable_resources_are_named_by_position() {
    let mut compiler = Compiler::new();
    let garbage = Any {
        type_url: remora_xds_proto::type_url::CLUSTER.into(),
        value: vec![0xff, 0xff, 0xff],
    };
    let applied = apply(&mut compiler, ResourceType::Cluster, "v1", &[garbage]);
    assert_eq!(applied.errors.len(), 1);
    let msg = applied.errors[0].to_string();
    assert!(msg.starts_with("Cluster resources[0]: malformed"), "{msg}");
    assert_eq!(compiler.version(ResourceKind::Cluster), None);
}

// === mTLS: what the control plane sends a sidecar with an inbound port ===

fn compiled_for(service: &str) -> Config {
    let mesh = remora_control_plane::sources::file::parse(Path::new("mesh.yaml"), EXAMPLE)
        .expect("the example mesh is valid");
    let view = View {
        flavor: Flavor::Sidecar,
        outbound_listener: DEFAULT_OUTBOUND_LISTENER,
        inbound: Some(remora_control_plane::translate::InboundView {
            listener: ([127, 0, 0, 1], 15006).into(),
            service: remora_control_plane::model::ServiceKey {
                namespace: "shop".to_string(),
                name: service.to_string(),
            },
            app: None,
        }),
    };
    let res = translate::translate(&mesh, &view);
    let mut compiler = Compiler::new();
    let errors = feed(&mut compiler, &res);
    assert!(errors.is_empty(), "{errors:#?}");
    compiler.build(&state()).0
}

#[test]
fn the_inbound_listener_says_strict_or_permissive_and_tls_clusters_compile() {
    // The example marks frontend PERMISSIVE; catalog keeps the default.
    assert_eq!(
        compiled_for("frontend").inbound_mode,
        InboundMode::Permissive
    );
    let catalog = compiled_for("catalog");
    assert_eq!(catalog.inbound_mode, InboundMode::Strict);
    // Clusters to sidecars carry an UpstreamTlsContext for Envoy; the
    // proxy takes the expected identity from each endpoint.
    let cluster = &catalog.clusters[CATALOG_V1];
    assert!(!cluster.members.is_empty());
    for member in &cluster.members {
        let id = member.endpoint.key.identity.as_deref().expect("a sidecar");
        assert!(id.starts_with("spiffe://cluster.local/ns/shop/sa/"), "{id}");
    }
    // Without an inbound listener a sidecar stays STRICT.
    let (compiler, _) = compiled(EXAMPLE);
    assert_eq!(compiler.build(&state()).0.inbound_mode, InboundMode::Strict);
}

#[test]
fn a_services_detection_wait_rides_on_its_clusters() {
    let mesh = EXAMPLE.replacen(
        "  - name: catalog\n    namespace: shop\n",
        "  - name: catalog\n    namespace: shop\n    detect_timeout: 250ms\n",
        1,
    );
    let (compiler, _) = compiled(&mesh);
    let config = compiler.build(&state()).0;
    assert_eq!(
        config.clusters[CATALOG_ALL].detect_timeout,
        Some(std::time::Duration::from_millis(250))
    );
    assert_eq!(config.clusters[REVIEWS_ALL].detect_timeout, None);
}
