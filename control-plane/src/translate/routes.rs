//! Route configurations: virtual hosts matched by authority, each holding a
//! service's ordered route rules.

use std::collections::{BTreeSet, HashMap};

use remora_xds_proto::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, RetryPolicy as PbRetryPolicy, Route as PbRoute,
    RouteAction, RouteConfiguration, RouteMatch as PbRouteMatch, VirtualHost, WeightedCluster,
    header_matcher::HeaderMatchSpecifier,
    query_parameter_matcher::QueryParameterMatchSpecifier,
    retry_policy::RetryBackOff,
    route::Action,
    route_action::{ClusterSpecifier, MaxStreamDuration},
    route_match::PathSpecifier,
    weighted_cluster::ClusterWeight,
};
use remora_xds_proto::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use remora_xds_proto::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

use super::{Flavor, OUTBOUND, cluster_name, duration};
use crate::model::{
    Backend, Mesh, PathMatch, RetryPolicy, Route, Service, ServicePort, StringMatch,
};

/// gRPC caps attempts at 5, the first try included.
const GRPC_MAX_RETRIES: u32 = 4;

pub(super) fn route_configurations(mesh: &Mesh, flavor: Flavor) -> Vec<RouteConfiguration> {
    let names = ShortNames::new(mesh);
    let mut configs = Vec::new();
    if flavor == Flavor::Sidecar {
        // The explicit outbound listener: every HTTP service, every port.
        // Authorities without a port go to the service's first HTTP port.
        let virtual_hosts = http_ports(mesh)
            .map(|(service, port, is_default)| {
                virtual_host(mesh, &names, service, port, is_default, flavor)
            })
            .collect();
        configs.push(RouteConfiguration {
            name: OUTBOUND.to_string(),
            virtual_hosts,
            ..Default::default()
        });
    }
    // One configuration per port, for traffic that arrives already knowing
    // its port: intercepted connections and gRPC targets.
    let ports: BTreeSet<u16> = http_ports(mesh).map(|(_, p, _)| p.port).collect();
    for number in ports {
        let virtual_hosts = http_ports(mesh)
            .filter(|(_, p, _)| p.port == number)
            .map(|(service, port, _)| virtual_host(mesh, &names, service, port, true, flavor))
            .collect();
        configs.push(RouteConfiguration {
            name: number.to_string(),
            virtual_hosts,
            ..Default::default()
        });
    }
    configs
}

/// Every HTTP port of every service, and whether it is the service's first
/// HTTP port (the one an authority without a port means).
pub(super) fn http_ports(mesh: &Mesh) -> impl Iterator<Item = (&Service, &ServicePort, bool)> {
    mesh.services().iter().flat_map(|service| {
        service
            .ports
            .iter()
            .filter(|p| p.protocol.is_http())
            .enumerate()
            .map(move |(i, port)| (service, port, i == 0))
    })
}

/// Which short names (`name`, without namespace) are unambiguous. A name
/// used in two namespaces gets only its qualified forms, since one route
/// configuration cannot hold a domain twice.
pub(super) struct ShortNames<'a> {
    count: HashMap<&'a str, usize>,
}

impl<'a> ShortNames<'a> {
    pub(super) fn new(mesh: &'a Mesh) -> ShortNames<'a> {
        let mut count = HashMap::new();
        for service in mesh.services() {
            *count.entry(service.name.as_str()).or_default() += 1;
        }
        ShortNames { count }
    }

    /// The host names a service answers to, shortest first.
    pub(super) fn hosts(&self, service: &Service) -> Vec<String> {
        let key = service.key();
        let mut hosts = Vec::with_capacity(4);
        if self.count.get(service.name.as_str()) == Some(&1) {
            hosts.push(service.name.clone());
        }
        hosts.push(key.to_string());
        hosts.push(format!("{key}.svc"));
        hosts.push(key.fqdn());
        hosts
    }
}

fn virtual_host(
    mesh: &Mesh,
    names: &ShortNames<'_>,
    service: &Service,
    port: &ServicePort,
    portless: bool,
    flavor: Flavor,
) -> VirtualHost {
    let mut domains = Vec::new();
    for host in names.hosts(service) {
        if portless {
            domains.push(host.clone());
        }
        domains.push(format!("{host}:{}", port.port));
    }
    // A service outside the mesh also answers to the name the application
    // would call it by without a mesh.
    if let Some(hostname) = &service.hostname {
        if portless {
            domains.push(hostname.clone());
        }
        domains.push(format!("{hostname}:{}", port.port));
    }
    if let Some(vip) = service.vip {
        domains.push(match vip {
            std::net::IpAddr::V4(ip) => format!("{ip}:{}", port.port),
            std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", port.port),
        });
    }
    let routes = if service.routes.is_empty() {
        vec![PbRoute {
            name: "default".to_string(),
            r#match: Some(PbRouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/".to_string())),
                ..Default::default()
            }),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster_name(
                    &service.key(),
                    port.port,
                    None,
                ))),
                timeout: Some(no_timeout()),
                ..Default::default()
            })),
            ..Default::default()
        }]
    } else {
        service
            .routes
            .iter()
            .map(|route| translate_route(mesh, route, port.port, flavor))
            .collect()
    };
    VirtualHost {
        name: format!("{}:{}", service.key().fqdn(), port.port),
        domains,
        routes,
        ..Default::default()
    }
}

/// Envoy applies a 15 s route timeout unless told otherwise; the mesh file
/// says "no timeout" by leaving it out, which Envoy spells 0.
fn no_timeout() -> PbDuration {
    PbDuration::default()
}

fn translate_route(mesh: &Mesh, route: &Route, from_port: u16, flavor: Flavor) -> PbRoute {
    let m = &route.matches;
    let path_specifier = Some(match &m.path {
        None => PathSpecifier::Prefix("/".to_string()),
        Some(PathMatch::Exact(p)) => PathSpecifier::Path(p.clone()),
        Some(PathMatch::Prefix(p)) => PathSpecifier::Prefix(p.clone()),
        Some(PathMatch::Regex(r)) => PathSpecifier::SafeRegex(regex(r.as_str())),
    });
    let mut headers = Vec::new();
    if let Some(method) = &m.method {
        headers.push(HeaderMatcher {
            name: ":method".to_string(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(string_matcher(
                MatchPattern::Exact(method.clone()),
            ))),
            ..Default::default()
        });
    }
    for h in &m.headers {
        headers.push(HeaderMatcher {
            name: h.name.clone(),
            invert_match: h.invert,
            header_match_specifier: Some(match string_match(&h.value) {
                Some(pattern) => HeaderMatchSpecifier::StringMatch(string_matcher(pattern)),
                None => HeaderMatchSpecifier::PresentMatch(true),
            }),
            ..Default::default()
        });
    }
    let query_parameters = m
        .query
        .iter()
        .map(|q| QueryParameterMatcher {
            name: q.name.clone(),
            query_parameter_match_specifier: Some(match string_match(&q.value) {
                Some(pattern) => QueryParameterMatchSpecifier::StringMatch(string_matcher(pattern)),
                None => QueryParameterMatchSpecifier::PresentMatch(true),
            }),
        })
        .collect();

    let mut action = RouteAction {
        cluster_specifier: Some(cluster_specifier(mesh, &route.backends, from_port)),
        ..Default::default()
    };
    match flavor {
        Flavor::Sidecar => {
            action.timeout = Some(route.timeout.map_or_else(no_timeout, duration));
            action.retry_policy = route.retry.as_ref().map(|r| retry_policy(r, flavor));
        }
        Flavor::ProxylessGrpc => {
            // gRPC ignores `timeout` and honours `max_stream_duration`.
            action.max_stream_duration = route.timeout.map(|t| MaxStreamDuration {
                max_stream_duration: Some(duration(t)),
                ..Default::default()
            });
            action.retry_policy = route
                .retry
                .as_ref()
                .filter(|r| r.on.iter().any(|c| c.is_grpc_status()))
                .map(|r| retry_policy(r, flavor));
        }
    }

    PbRoute {
        name: route.name.clone(),
        r#match: Some(PbRouteMatch {
            path_specifier,
            headers,
            query_parameters,
            ..Default::default()
        }),
        action: Some(Action::Route(action)),
        ..Default::default()
    }
}

fn cluster_specifier(mesh: &Mesh, backends: &[Backend], from_port: u16) -> ClusterSpecifier {
    let name = |b: &Backend| -> String {
        // Mesh::new checked that every backend resolves to a port; the
        // fallback keeps translation total should that ever change.
        let port = mesh
            .service(&b.service)
            .and_then(|s| s.backend_port(b.port, from_port))
            .map_or(from_port, |p| p.port);
        cluster_name(&b.service, port, b.subset.as_deref())
    };
    match backends {
        [only] => ClusterSpecifier::Cluster(name(only)),
        _ => ClusterSpecifier::WeightedClusters(WeightedCluster {
            // Envoy refuses zero-weight entries in some versions; leaving
            // them out is the same split.
            clusters: backends
                .iter()
                .filter(|b| b.weight > 0)
                .map(|b| ClusterWeight {
                    name: name(b),
                    weight: Some(UInt32Value { value: b.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    }
}

fn retry_policy(retry: &RetryPolicy, flavor: Flavor) -> PbRetryPolicy {
    let (conditions, retries, per_try_timeout) = match flavor {
        Flavor::Sidecar => (
            retry.on.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
            retry.attempts,
            retry.per_try_timeout.map(duration),
        ),
        // gRPC accepts status names only, caps attempts, has no per-try
        // timeout.
        Flavor::ProxylessGrpc => (
            retry
                .on
                .iter()
                .filter(|c| c.is_grpc_status())
                .map(|c| c.as_str())
                .collect(),
            retry.attempts.min(GRPC_MAX_RETRIES),
            None,
        ),
    };
    PbRetryPolicy {
        retry_on: conditions.join(","),
        num_retries: Some(UInt32Value { value: retries }),
        per_try_timeout,
        retriable_status_codes: match flavor {
            Flavor::Sidecar => retry.status_codes.iter().map(|&c| u32::from(c)).collect(),
            Flavor::ProxylessGrpc => Vec::new(),
        },
        retry_back_off: Some(RetryBackOff {
            base_interval: Some(duration(retry.backoff.base)),
            max_interval: Some(duration(retry.backoff.max)),
        }),
        ..Default::default()
    }
}

fn string_match(m: &StringMatch) -> Option<MatchPattern> {
    match m {
        StringMatch::Exact(s) => Some(MatchPattern::Exact(s.clone())),
        StringMatch::Prefix(s) => Some(MatchPattern::Prefix(s.clone())),
        StringMatch::Regex(r) => Some(MatchPattern::SafeRegex(regex(r.as_str()))),
        StringMatch::Present => None,
    }
}

fn string_matcher(pattern: MatchPattern) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

fn regex(source: &str) -> RegexMatcher {
    RegexMatcher {
        regex: source.to_string(),
        ..Default::default()
    }
}
