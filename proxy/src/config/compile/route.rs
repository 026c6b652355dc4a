//! Route configurations: virtual hosts by authority, routes in order with
//! precompiled matchers, and their actions with cluster names still
//! unresolved (they are resolved when a [`Config`](crate::config::Config)
//! is assembled, so a cluster change does not recompile routes).

// Deprecated Envoy fields are read on purpose: to honour them (the old
// header matchers, `http2_protocol_options`) or to reject them.
#![allow(deprecated)]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderName;
use regex::{Regex, RegexBuilder};
use remora_xds_proto::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, RetryPolicy as PbRetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch as PbRouteMatch, VirtualHost, WeightedCluster,
    header_matcher::HeaderMatchSpecifier,
    query_parameter_matcher::QueryParameterMatchSpecifier,
    route::Action,
    route_action::{ClusterNotFoundResponseCode, ClusterSpecifier},
    route_match::PathSpecifier,
    virtual_host::TlsRequirementType,
};
use remora_xds_proto::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};

use super::{Invalid, Result, duration, element, reject_if};
use crate::config::{HeaderMatch, PathMatch, QueryMatch, RetryOn, RouteMatch, StringMatch};
use crate::metrics::RouteMetrics;

/// Envoy's route timeout when `timeout` is absent.
pub(super) const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's retry backoff base when `retry_back_off` is absent.
pub(super) const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Compiled regexes are bounded so a hostile pattern cannot take much
/// memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// The conditions `retry_on` may name.
const RETRY_ON_SUPPORTED: &str = "5xx, gateway-error, connect-failure, reset, \
     retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, \
     unavailable";
/// The name a `:method` condition carries; the data path matches the
/// request method when `is_method` is set and never looks at it.
const METHOD_PLACEHOLDER: HeaderName = HeaderName::from_static("method");

/// A route configuration, compiled but for its cluster names.
#[derive(Debug)]
pub(super) struct RouteTableSpec {
    pub(super) name: String,
    pub(super) virtual_hosts: Vec<VirtualHostSpec>,
    pub(super) domains: HashMap<String, usize>,
}

#[derive(Debug)]
pub(super) struct VirtualHostSpec {
    pub(super) name: String,
    pub(super) service: String,
    pub(super) routes: Vec<RouteSpec>,
}

#[derive(Debug)]
pub(super) struct RouteSpec {
    /// The route's name, or `routes[i]` when it has none.
    pub(super) label: String,
    pub(super) matcher: RouteMatch,
    /// Cluster names and weights, zero weights left out.
    pub(super) backends: Vec<(String, u32)>,
    pub(super) total_weight: u32,
    pub(super) timeout: Option<Duration>,
    pub(super) retry: Option<RetrySpec>,
    /// Metric handles, resolved on the first assembly and kept while the
    /// route configuration does not change.
    pub(super) metrics: OnceLock<Arc<RouteMetrics>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RetrySpec {
    pub(super) on: RetryOn,
    pub(super) num_retries: u32,
    pub(super) per_try_timeout: Option<Duration>,
    pub(super) backoff_base: Duration,
    pub(super) backoff_max: Duration,
    pub(super) retriable_status_codes: Vec<u16>,
}

impl RouteTableSpec {
    /// Every cluster a route names.
    pub(super) fn cluster_names(&self) -> impl Iterator<Item = &str> {
        self.virtual_hosts
            .iter()
            .flat_map(|vh| &vh.routes)
            .flat_map(|r| &r.backends)
            .map(|(name, _)| name.as_str())
    }
}

pub(super) fn compile(config: &RouteConfiguration) -> Result<RouteTableSpec> {
    reject_if(config.vhds.is_some(), "vhds")?;
    reject_if(
        !config.internal_only_headers.is_empty(),
        "internal_only_headers",
    )?;
    reject_if(
        !config.request_headers_to_add.is_empty(),
        "request_headers_to_add",
    )?;
    reject_if(
        !config.request_headers_to_remove.is_empty(),
        "request_headers_to_remove",
    )?;
    reject_if(
        !config.response_headers_to_add.is_empty(),
        "response_headers_to_add",
    )?;
    reject_if(
        !config.response_headers_to_remove.is_empty(),
        "response_headers_to_remove",
    )?;
    reject_if(
        !config.cluster_specifier_plugins.is_empty(),
        "cluster_specifier_plugins",
    )?;
    reject_if(
        !config.request_mirror_policies.is_empty(),
        "request_mirror_policies",
    )?;
    reject_if(
        config.ignore_port_in_host_matching,
        "ignore_port_in_host_matching",
    )?;
    reject_if(!config.vhost_header.is_empty(), "vhost_header")?;
    reject_if(
        config.ignore_path_parameters_in_path_matching,
        "ignore_path_parameters_in_path_matching",
    )?;

    let mut domains = HashMap::new();
    let mut virtual_hosts = Vec::with_capacity(config.virtual_hosts.len());
    for (i, vh) in config.virtual_hosts.iter().enumerate() {
        let prefix = element("virtual_hosts", i, &vh.name);
        let spec = virtual_host(vh).map_err(|e| e.within(&prefix))?;
        if vh.domains.is_empty() {
            return Err(Invalid::new("domains", "is empty").within(&prefix));
        }
        for (j, domain) in vh.domains.iter().enumerate() {
            let field = format!("domains[{j}]");
            if domain.is_empty() {
                return Err(Invalid::new(field, "is empty").within(&prefix));
            }
            if domain != "*" && domain.contains('*') {
                return Err(Invalid::new(
                    field,
                    format!("{domain:?}: wildcard domains are not supported (only \"*\")"),
                )
                .within(&prefix));
            }
            if domains.insert(domain.to_ascii_lowercase(), i).is_some() {
                return Err(Invalid::new(
                    field,
                    format!("{domain:?} is also a domain of an earlier virtual host"),
                )
                .within(&prefix));
            }
        }
        virtual_hosts.push(spec);
    }
    Ok(RouteTableSpec {
        name: config.name.clone(),
        virtual_hosts,
        domains,
    })
}

fn virtual_host(vh: &VirtualHost) -> Result<VirtualHostSpec> {
    reject_if(
        vh.require_tls != TlsRequirementType::None as i32,
        "require_tls",
    )?;
    reject_if(!vh.rate_limits.is_empty(), "rate_limits")?;
    reject_if(
        !vh.request_headers_to_add.is_empty(),
        "request_headers_to_add",
    )?;
    reject_if(
        !vh.request_headers_to_remove.is_empty(),
        "request_headers_to_remove",
    )?;
    reject_if(
        !vh.response_headers_to_add.is_empty(),
        "response_headers_to_add",
    )?;
    reject_if(
        !vh.response_headers_to_remove.is_empty(),
        "response_headers_to_remove",
    )?;
    reject_if(vh.cors.is_some(), "cors")?;
    reject_if(vh.retry_policy.is_some(), "retry_policy (set it per route)")?;
    reject_if(
        vh.retry_policy_typed_config.is_some(),
        "retry_policy_typed_config",
    )?;
    reject_if(vh.hedge_policy.is_some(), "hedge_policy")?;
    reject_if(
        !vh.request_mirror_policies.is_empty(),
        "request_mirror_policies",
    )?;
    reject_if(
        vh.include_request_attempt_count,
        "include_request_attempt_count",
    )?;
    reject_if(
        vh.include_attempt_count_in_response,
        "include_attempt_count_in_response",
    )?;
    reject_if(
        vh.include_is_timeout_retry_header,
        "include_is_timeout_retry_header",
    )?;
    reject_if(vh.matcher.is_some(), "matcher")?;

    let routes = vh
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route(i, r).map_err(|e| e.within(&element("routes", i, &r.name))))
        .collect::<Result<Vec<_>>>()?;
    Ok(VirtualHostSpec {
        name: vh.name.clone(),
        service: service_label(&vh.name),
        routes,
    })
}

/// The service a virtual host serves, for metrics: `name.namespace`, the
/// same form inbound metrics use, taken from the `FQDN:PORT` name our
/// control plane gives virtual hosts; other names are kept whole.
fn service_label(vhost: &str) -> String {
    let host = match vhost.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => vhost,
    };
    host.strip_suffix(".svc.cluster.local")
        .unwrap_or(host)
        .to_string()
}

fn route(index: usize, r: &Route) -> Result<RouteSpec> {
    reject_if(
        !r.request_headers_to_add.is_empty(),
        "request_headers_to_add",
    )?;
    reject_if(
        !r.request_headers_to_remove.is_empty(),
        "request_headers_to_remove",
    )?;
    reject_if(
        !r.response_headers_to_add.is_empty(),
        "response_headers_to_add",
    )?;
    reject_if(
        !r.response_headers_to_remove.is_empty(),
        "response_headers_to_remove",
    )?;
    let matcher = match &r.r#match {
        Some(m) => route_match(m).map_err(|e| e.within("match."))?,
        None => return Err(Invalid::new("match", "is missing")),
    };
    let action = match &r.action {
        Some(Action::Route(action)) => action,
        Some(Action::Redirect(_)) => return Err(Invalid::unsupported("redirect")),
        Some(Action::DirectResponse(_)) => return Err(Invalid::unsupported("direct_response")),
        Some(Action::FilterAction(_)) => return Err(Invalid::unsupported("filter_action")),
        Some(Action::NonForwardingAction(_)) => {
            return Err(Invalid::unsupported("non_forwarding_action"));
        }
        None => return Err(Invalid::new("route", "is missing (no action)")),
    };
    let compiled = route_action(action).map_err(|e| e.within("route."))?;
    Ok(RouteSpec {
        label: if r.name.is_empty() {
            format!("routes[{index}]")
        } else {
            r.name.clone()
        },
        matcher,
        backends: compiled.backends,
        total_weight: compiled.total_weight,
        timeout: compiled.timeout,
        retry: compiled.retry,
        metrics: OnceLock::new(),
    })
}

// === Matching ===

fn route_match(m: &PbRouteMatch) -> Result<RouteMatch> {
    reject_if(
        m.case_sensitive.as_ref().is_some_and(|b| !b.value),
        "case_sensitive (false)",
    )?;
    reject_if(m.runtime_fraction.is_some(), "runtime_fraction")?;
    reject_if(!m.cookies.is_empty(), "cookies")?;
    reject_if(m.grpc.is_some(), "grpc")?;
    reject_if(m.tls_context.is_some(), "tls_context")?;
    reject_if(!m.dynamic_metadata.is_empty(), "dynamic_metadata")?;
    reject_if(!m.filter_state.is_empty(), "filter_state")?;
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::SafeRegex(r)) => PathMatch::Regex(regex(r, "safe_regex")?),
        Some(PathSpecifier::ConnectMatcher(_)) => {
            return Err(Invalid::unsupported("connect_matcher"));
        }
        Some(PathSpecifier::PathSeparatedPrefix(_)) => {
            return Err(Invalid::unsupported("path_separated_prefix"));
        }
        Some(PathSpecifier::PathMatchPolicy(_)) => {
            return Err(Invalid::unsupported("path_match_policy"));
        }
        None => {
            return Err(Invalid::new(
                "path_specifier",
                "is missing (one of prefix, path, safe_regex)",
            ));
        }
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_match(h).map_err(|e| e.within(&element("headers", i, &h.name))))
        .collect::<Result<Vec<_>>>()?;
    let query = m
        .query_parameters
        .iter()
        .enumerate()
        .map(|(i, q)| {
            query_match(q).map_err(|e| e.within(&element("query_parameters", i, &q.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RouteMatch {
        path,
        headers,
        query,
    })
}

fn header_match(h: &HeaderMatcher) -> Result<HeaderMatch> {
    reject_if(
        h.treat_missing_header_as_empty,
        "treat_missing_header_as_empty",
    )?;
    let lower = h.name.to_ascii_lowercase();
    let (name, is_method) = if lower == ":method" {
        (METHOD_PLACEHOLDER, true)
    } else if lower.starts_with(':') {
        return Err(Invalid::new(
            "name",
            format!("{lower:?}: of the pseudo-headers only :method can be matched"),
        ));
    } else {
        let name = HeaderName::from_bytes(lower.as_bytes())
            .map_err(|_| Invalid::new("name", format!("{:?} is not a header name", h.name)))?;
        (name, false)
    };
    let mut invert = h.invert_match;
    let value = match &h.header_match_specifier {
        // Envoy matches on presence when no specifier is given.
        None | Some(HeaderMatchSpecifier::PresentMatch(true)) => None,
        Some(HeaderMatchSpecifier::PresentMatch(false)) => {
            // `present_match: false` matches when the header is absent.
            invert = !invert;
            None
        }
        Some(HeaderMatchSpecifier::ExactMatch(s)) => Some(StringMatch::Exact(s.clone())),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => Some(StringMatch::Prefix(s.clone())),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => Some(StringMatch::Suffix(s.clone())),
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => Some(StringMatch::Contains(s.clone())),
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => {
            Some(StringMatch::Regex(regex(r, "safe_regex_match")?))
        }
        Some(HeaderMatchSpecifier::RangeMatch(_)) => {
            return Err(Invalid::unsupported("range_match"));
        }
        Some(HeaderMatchSpecifier::StringMatch(m)) => {
            Some(string_match(m).map_err(|e| e.within("string_match."))?)
        }
    };
    Ok(HeaderMatch {
        name,
        is_method,
        value,
        invert,
    })
}

fn query_match(q: &QueryParameterMatcher) -> Result<QueryMatch> {
    if q.name.is_empty() {
        return Err(Invalid::new("name", "is empty"));
    }
    let value = match &q.query_parameter_match_specifier {
        Some(QueryParameterMatchSpecifier::StringMatch(m)) => {
            Some(string_match(m).map_err(|e| e.within("string_match."))?)
        }
        Some(QueryParameterMatchSpecifier::PresentMatch(true)) => None,
        Some(QueryParameterMatchSpecifier::PresentMatch(false)) => {
            return Err(Invalid::unsupported("present_match (false)"));
        }
        None => {
            return Err(Invalid::new(
                "query_parameter_match_specifier",
                "is missing (one of string_match, present_match)",
            ));
        }
    };
    Ok(QueryMatch {
        name: q.name.clone(),
        value,
    })
}

fn string_match(m: &StringMatcher) -> Result<StringMatch> {
    reject_if(m.ignore_case, "ignore_case")?;
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => StringMatch::Exact(s.clone()),
        Some(MatchPattern::Prefix(s)) => StringMatch::Prefix(s.clone()),
        Some(MatchPattern::Suffix(s)) => StringMatch::Suffix(s.clone()),
        Some(MatchPattern::Contains(s)) => StringMatch::Contains(s.clone()),
        Some(MatchPattern::SafeRegex(r)) => StringMatch::Regex(regex(r, "safe_regex")?),
        Some(MatchPattern::Custom(_)) => return Err(Invalid::unsupported("custom")),
        None => {
            return Err(Invalid::new(
                "match_pattern",
                "is missing (one of exact, prefix, suffix, contains, safe_regex)",
            ));
        }
    })
}

/// Envoy's regexes match the whole value; anchoring makes the regex crate
/// do the same.
fn regex(m: &RegexMatcher, field: &str) -> Result<Regex> {
    RegexBuilder::new(&format!("^(?:{})$", m.regex))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            let reason = e.to_string();
            let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
            Invalid::new(
                format!("{field}.regex"),
                format!("{:?} does not compile: {reason}", m.regex),
            )
        })
}

// === Actions ===

struct CompiledAction {
    backends: Vec<(String, u32)>,
    total_weight: u32,
    timeout: Option<Duration>,
    retry: Option<RetrySpec>,
}

fn route_action(a: &RouteAction) -> Result<CompiledAction> {
    reject_if(
        a.cluster_not_found_response_code != ClusterNotFoundResponseCode::ServiceUnavailable as i32,
        "cluster_not_found_response_code (only SERVICE_UNAVAILABLE)",
    )?;
    reject_if(a.metadata_match.is_some(), "metadata_match")?;
    reject_if(!a.prefix_rewrite.is_empty(), "prefix_rewrite")?;
    reject_if(a.regex_rewrite.is_some(), "regex_rewrite")?;
    reject_if(a.path_rewrite_policy.is_some(), "path_rewrite_policy")?;
    reject_if(!a.path_rewrite.is_empty(), "path_rewrite")?;
    if let Some(host) = &a.host_rewrite_specifier {
        use remora_xds_proto::pb::envoy::config::route::v3::route_action::HostRewriteSpecifier as H;
        let field = match host {
            H::HostRewriteLiteral(_) => "host_rewrite_literal",
            H::AutoHostRewrite(_) => "auto_host_rewrite",
            H::HostRewriteHeader(_) => "host_rewrite_header",
            H::HostRewritePathRegex(_) => "host_rewrite_path_regex",
            H::HostRewrite(_) => "host_rewrite",
        };
        return Err(Invalid::unsupported(field));
    }
    reject_if(a.idle_timeout.is_some(), "idle_timeout")?;
    reject_if(a.flush_timeout.is_some(), "flush_timeout")?;
    reject_if(
        a.retry_policy_typed_config.is_some(),
        "retry_policy_typed_config",
    )?;
    reject_if(
        !a.request_mirror_policies.is_empty(),
        "request_mirror_policies",
    )?;
    reject_if(!a.rate_limits.is_empty(), "rate_limits")?;
    reject_if(a.cors.is_some(), "cors")?;
    reject_if(a.max_grpc_timeout.is_some(), "max_grpc_timeout")?;
    reject_if(a.grpc_timeout_offset.is_some(), "grpc_timeout_offset")?;
    reject_if(!a.upgrade_configs.is_empty(), "upgrade_configs")?;
    reject_if(
        a.internal_redirect_policy.is_some(),
        "internal_redirect_policy",
    )?;
    reject_if(a.internal_redirect_action != 0, "internal_redirect_action")?;
    reject_if(a.max_internal_redirects.is_some(), "max_internal_redirects")?;
    reject_if(a.hedge_policy.is_some(), "hedge_policy")?;
    reject_if(
        a.max_stream_duration.is_some(),
        "max_stream_duration (use timeout)",
    )?;

    let (backends, total_weight) = match &a.cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) => {
            if name.is_empty() {
                return Err(Invalid::new("cluster", "is empty"));
            }
            (vec![(name.clone(), 1)], 1)
        }
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            weighted_clusters(w).map_err(|e| e.within("weighted_clusters."))?
        }
        Some(ClusterSpecifier::ClusterHeader(_)) => {
            return Err(Invalid::unsupported("cluster_header"));
        }
        Some(ClusterSpecifier::ClusterSpecifierPlugin(_)) => {
            return Err(Invalid::unsupported("cluster_specifier_plugin"));
        }
        Some(ClusterSpecifier::InlineClusterSpecifierPlugin(_)) => {
            return Err(Invalid::unsupported("inline_cluster_specifier_plugin"));
        }
        None => {
            return Err(Invalid::new(
                "cluster_specifier",
                "is missing (one of cluster, weighted_clusters)",
            ));
        }
    };
    // Absent: Envoy's 15 s default. An explicit 0: no timeout.
    let timeout = match &a.timeout {
        None => Some(DEFAULT_ROUTE_TIMEOUT),
        Some(d) => Some(duration(d, "timeout")?).filter(|d| !d.is_zero()),
    };
    let retry = a
        .retry_policy
        .as_ref()
        .map(|p| retry_policy(p).map_err(|e| e.within("retry_policy.")))
        .transpose()?;
    Ok(CompiledAction {
        backends,
        total_weight,
        timeout,
        retry,
    })
}

fn weighted_clusters(w: &WeightedCluster) -> Result<(Vec<(String, u32)>, u32)> {
    reject_if(w.random_value_specifier.is_some(), "header_name")?;
    let mut backends = Vec::with_capacity(w.clusters.len());
    let mut total: u32 = 0;
    for (i, c) in w.clusters.iter().enumerate() {
        let at = |e: Invalid| e.within(&element("clusters", i, &c.name));
        reject_if(!c.cluster_header.is_empty(), "cluster_header").map_err(at)?;
        reject_if(c.metadata_match.is_some(), "metadata_match").map_err(at)?;
        reject_if(
            !c.request_headers_to_add.is_empty(),
            "request_headers_to_add",
        )
        .map_err(at)?;
        reject_if(
            !c.request_headers_to_remove.is_empty(),
            "request_headers_to_remove",
        )
        .map_err(at)?;
        reject_if(
            !c.response_headers_to_add.is_empty(),
            "response_headers_to_add",
        )
        .map_err(at)?;
        reject_if(
            !c.response_headers_to_remove.is_empty(),
            "response_headers_to_remove",
        )
        .map_err(at)?;
        reject_if(c.host_rewrite_specifier.is_some(), "host_rewrite_literal").map_err(at)?;
        if c.name.is_empty() {
            return Err(at(Invalid::new("name", "is empty")));
        }
        let weight = c.weight.as_ref().map_or(0, |w| w.value);
        total = total
            .checked_add(weight)
            .ok_or_else(|| at(Invalid::new("weight", "the weights add up past 2^32")))?;
        if weight > 0 {
            backends.push((c.name.clone(), weight));
        }
    }
    if let Some(declared) = &w.total_weight
        && declared.value != total
    {
        return Err(Invalid::new(
            "total_weight",
            format!("is {} but the weights add up to {total}", declared.value),
        ));
    }
    if total == 0 {
        return Err(Invalid::new("clusters", "the weights add up to 0"));
    }
    Ok((backends, total))
}

fn retry_policy(p: &PbRetryPolicy) -> Result<RetrySpec> {
    reject_if(p.per_try_idle_timeout.is_some(), "per_try_idle_timeout")?;
    reject_if(p.retry_priority.is_some(), "retry_priority")?;
    reject_if(!p.retry_host_predicate.is_empty(), "retry_host_predicate")?;
    reject_if(
        !p.retry_options_predicates.is_empty(),
        "retry_options_predicates",
    )?;
    reject_if(
        p.rate_limited_retry_back_off.is_some(),
        "rate_limited_retry_back_off",
    )?;
    reject_if(!p.retriable_headers.is_empty(), "retriable_headers")?;
    reject_if(
        !p.retriable_request_headers.is_empty(),
        "retriable_request_headers",
    )?;

    let mut on = RetryOn::default();
    for condition in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match condition {
            "5xx" => on.server_error = true,
            "gateway-error" => on.gateway_error = true,
            "connect-failure" => on.connect_failure = true,
            "reset" => on.reset = true,
            "retriable-status-codes" => on.retriable_status_codes = true,
            "cancelled" => on.grpc_statuses |= 1 << 1,
            "deadline-exceeded" => on.grpc_statuses |= 1 << 4,
            "resource-exhausted" => on.grpc_statuses |= 1 << 8,
            "internal" => on.grpc_statuses |= 1 << 13,
            "unavailable" => on.grpc_statuses |= 1 << 14,
            other => {
                return Err(Invalid::new(
                    "retry_on",
                    format!("{other:?} is not supported (supported: {RETRY_ON_SUPPORTED})"),
                ));
            }
        }
    }
    let retriable_status_codes = p
        .retriable_status_codes
        .iter()
        .enumerate()
        .map(|(i, &code)| match u16::try_from(code) {
            Ok(code) if (100..=599).contains(&code) => Ok(code),
            _ => Err(Invalid::new(
                format!("retriable_status_codes[{i}]"),
                format!("{code} is not an HTTP status code"),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let per_try_timeout = p
        .per_try_timeout
        .as_ref()
        .map(|d| duration(d, "per_try_timeout"))
        .transpose()?
        .filter(|d| !d.is_zero());
    let (backoff_base, backoff_max) = match &p.retry_back_off {
        None => (DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_BASE * 10),
        Some(b) => {
            let base = match &b.base_interval {
                Some(d) => duration(d, "retry_back_off.base_interval")?,
                None => {
                    return Err(Invalid::new("retry_back_off.base_interval", "is missing"));
                }
            };
            if base.is_zero() {
                return Err(Invalid::new(
                    "retry_back_off.base_interval",
                    "must be above 0",
                ));
            }
            let max = match &b.max_interval {
                Some(d) => duration(d, "retry_back_off.max_interval")?,
                None => base.saturating_mul(10),
            };
            if max < base {
                return Err(Invalid::new(
                    "retry_back_off.max_interval",
                    format!("{max:?} is below base_interval {base:?}"),
                ));
            }
            (base, max)
        }
    };
    Ok(RetrySpec {
        on,
        num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout,
        backoff_base,
        backoff_max,
        retriable_status_codes,
    })
}
