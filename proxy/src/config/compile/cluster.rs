//! Clusters: EDS over ADS, or STRICT_DNS / LOGICAL_DNS with one hostname
//! endpoint (services outside the mesh, resolved by `crate::dns`); round
//! robin or least request, HTTP/1.1 or HTTP/2 to the application.

// Deprecated Envoy fields are read on purpose: to honour them (the old
// header matchers, `http2_protocol_options`) or to reject them.
#![allow(deprecated)]

use std::time::Duration;

use remora_xds_proto::pb::envoy::config::cluster::v3::{
    Cluster,
    cluster::{
        ClusterDiscoveryType, ClusterProtocolSelection, DiscoveryType, DnsLookupFamily,
        LbPolicy as PbLb,
    },
};
use remora_xds_proto::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use remora_xds_proto::pb::envoy::config::core::v3::{
    TransportSocket, address, socket_address, transport_socket,
};
use remora_xds_proto::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use remora_xds_proto::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use remora_xds_proto::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{UpstreamProtocolOptions, explicit_http_config::ProtocolConfig},
};
use remora_xds_proto::pb::google::protobuf::value::Kind;
use remora_xds_proto::{metadata, unpack};

use super::{Invalid, Result, duration, reject_if};
use crate::config::{AppProtocol, LbPolicy};
use crate::dns::{DEFAULT_REFRESH, DnsTarget, LookupFamily};

/// Envoy's connect timeout when `connect_timeout` is absent.
pub(super) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The key Envoy reads upstream HTTP protocol options under.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// The type name of Envoy's plaintext transport socket.
const RAW_BUFFER: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// What the proxy keeps of a cluster until its endpoints join it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ClusterSpec {
    /// The ClusterLoadAssignment name: `service_name`, else the cluster's.
    /// Unused by DNS clusters.
    pub(super) eds_name: String,
    /// For STRICT_DNS and LOGICAL_DNS clusters: what to resolve.
    pub(super) dns: Option<DnsTarget>,
    pub(super) connect_timeout: Duration,
    pub(super) lb_policy: LbPolicy,
    pub(super) protocol: AppProtocol,
    /// `metadata.filter_metadata.remora.detect_timeout_ms`: the service's
    /// protocol detection wait for intercepted connections.
    pub(super) detect_timeout: Option<Duration>,
}

pub(super) fn compile(c: &Cluster) -> Result<ClusterSpec> {
    let dns = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32 => {
            eds_config(c)?;
            None
        }
        Some(ClusterDiscoveryType::Type(t))
            if *t == DiscoveryType::StrictDns as i32 || *t == DiscoveryType::LogicalDns as i32 =>
        {
            Some(dns_target(c, *t == DiscoveryType::StrictDns as i32)?)
        }
        Some(ClusterDiscoveryType::Type(t)) => {
            let name = DiscoveryType::try_from(*t)
                .map_or_else(|_| t.to_string(), |d| d.as_str_name().to_string());
            return Err(Invalid::new(
                "type",
                format!("{name} is not supported (only EDS, STRICT_DNS, LOGICAL_DNS)"),
            ));
        }
        Some(ClusterDiscoveryType::ClusterType(_)) => {
            return Err(Invalid::unsupported("cluster_type"));
        }
        None => {
            return Err(Invalid::new(
                "type",
                "STATIC (the default) is not supported (only EDS, STRICT_DNS, LOGICAL_DNS)",
            ));
        }
    };
    let lb_policy = match PbLb::try_from(c.lb_policy) {
        Ok(PbLb::RoundRobin) => LbPolicy::RoundRobin,
        Ok(PbLb::LeastRequest) => LbPolicy::LeastRequest,
        Ok(other) => {
            return Err(Invalid::new(
                "lb_policy",
                format!(
                    "{} is not supported (only ROUND_ROBIN, LEAST_REQUEST)",
                    other.as_str_name()
                ),
            ));
        }
        Err(_) => {
            return Err(Invalid::new(
                "lb_policy",
                format!("{} is not a known policy", c.lb_policy),
            ));
        }
    };
    // The proxy secures a connection by the endpoint's identity metadata:
    // mTLS with that identity when present, plaintext otherwise. The TLS
    // contexts the control plane adds for Envoy say the same thing and are
    // only checked to be of a kind that agrees.
    if let Some(socket) = &c.transport_socket {
        transport_socket(socket).map_err(|e| e.within("transport_socket."))?;
    }
    for (i, m) in c.transport_socket_matches.iter().enumerate() {
        if let Some(socket) = &m.transport_socket {
            let prefix = format!("transport_socket_matches[{i}].transport_socket.");
            transport_socket(socket).map_err(|e| e.within(&prefix))?;
        }
    }
    reject_if(
        c.transport_socket_matcher.is_some(),
        "transport_socket_matcher",
    )?;
    reject_if(!c.health_checks.is_empty(), "health_checks")?;
    reject_if(c.outlier_detection.is_some(), "outlier_detection")?;
    reject_if(c.circuit_breakers.is_some(), "circuit_breakers")?;
    reject_if(c.lb_subset_config.is_some(), "lb_subset_config")?;
    reject_if(c.load_balancing_policy.is_some(), "load_balancing_policy")?;
    reject_if(c.lb_config.is_some(), "lb_config")?;
    reject_if(c.common_lb_config.is_some(), "common_lb_config")?;
    reject_if(!c.filters.is_empty(), "filters")?;
    reject_if(c.upstream_config.is_some(), "upstream_config")?;
    reject_if(c.upstream_bind_config.is_some(), "upstream_bind_config")?;
    reject_if(
        c.protocol_selection == ClusterProtocolSelection::UseDownstreamProtocol as i32,
        "protocol_selection (USE_DOWNSTREAM_PROTOCOL)",
    )?;

    let connect_timeout = match &c.connect_timeout {
        None => DEFAULT_CONNECT_TIMEOUT,
        Some(d) => {
            let d = duration(d, "connect_timeout")?;
            if d.is_zero() {
                return Err(Invalid::new("connect_timeout", "must be above 0"));
            }
            d
        }
    };

    // The deprecated field still means HTTP/2 in Envoy.
    let mut protocol = if c.http2_protocol_options.is_some() {
        AppProtocol::Http2
    } else {
        AppProtocol::Http1
    };
    for (key, any) in &c.typed_extension_protocol_options {
        let field = format!("typed_extension_protocol_options[{key:?}]");
        if key != HTTP_PROTOCOL_OPTIONS {
            return Err(Invalid::new(
                field,
                format!("is not supported (only {HTTP_PROTOCOL_OPTIONS})"),
            ));
        }
        let options: HttpProtocolOptions =
            unpack(any).map_err(|e| Invalid::new(field.clone(), e.to_string()))?;
        if c.http2_protocol_options.is_some() {
            return Err(Invalid::new(
                field,
                "conflicts with the deprecated http2_protocol_options",
            ));
        }
        protocol = http_protocol(&options).map_err(|e| e.within(&format!("{field}.")))?;
    }

    let eds_name = c
        .eds_cluster_config
        .as_ref()
        .map(|eds| eds.service_name.clone())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| c.name.clone());
    let detect_timeout = detect_timeout(c).map_err(|e| e.within("metadata."))?;
    Ok(ClusterSpec {
        eds_name,
        dns,
        connect_timeout,
        lb_policy,
        protocol,
        detect_timeout,
    })
}

/// The service's protocol detection wait, when the control plane sets one.
fn detect_timeout(c: &Cluster) -> Result<Option<Duration>> {
    let Some(value) = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(metadata::NAMESPACE))
        .and_then(|s| s.fields.get(metadata::DETECT_TIMEOUT_MS))
    else {
        return Ok(None);
    };
    let field = format!(
        "filter_metadata[{:?}].{}",
        metadata::NAMESPACE,
        metadata::DETECT_TIMEOUT_MS
    );
    match value.kind {
        Some(Kind::NumberValue(ms)) if (1.0..=3_600_000.0).contains(&ms) => {
            Ok(Some(Duration::from_millis(ms as u64)))
        }
        _ => Err(Invalid::new(
            field,
            "must be a number of milliseconds from 1 to 3600000",
        )),
    }
}

/// An EDS cluster's endpoints come over ADS.
fn eds_config(c: &Cluster) -> Result<()> {
    let eds = c
        .eds_cluster_config
        .as_ref()
        .ok_or_else(|| Invalid::new("eds_cluster_config", "is missing"))?;
    let ads = matches!(
        eds.eds_config
            .as_ref()
            .and_then(|s| s.config_source_specifier.as_ref()),
        Some(ConfigSourceSpecifier::Ads(_))
    );
    if !ads {
        return Err(Invalid::new(
            "eds_cluster_config.eds_config",
            "is not supported (only ads)",
        ));
    }
    Ok(())
}

/// A DNS cluster: exactly one endpoint, a hostname and port, in
/// `load_assignment`; resolved by the proxy's own resolver
/// (`--dns-server` or the system's), plaintext (the hosts are outside the
/// mesh).
#[allow(deprecated)] // the DNS fields Envoy moved into the `envoy.clusters.dns` extension
fn dns_target(c: &Cluster, all_addresses: bool) -> Result<DnsTarget> {
    let kind = if all_addresses {
        "STRICT_DNS"
    } else {
        "LOGICAL_DNS"
    };
    let shape =
        format!("a {kind} cluster needs exactly one endpoint: the hostname and port to resolve");
    let assignment = c
        .load_assignment
        .as_ref()
        .ok_or_else(|| Invalid::new("load_assignment", format!("is missing ({shape})")))?;
    let endpoints: Vec<_> = assignment
        .endpoints
        .iter()
        .flat_map(|l| l.lb_endpoints.iter())
        .collect();
    let [lb] = endpoints.as_slice() else {
        return Err(Invalid::new(
            "load_assignment.endpoints",
            format!("has {} endpoints ({shape})", endpoints.len()),
        ));
    };
    let field = "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address";
    let socket = match &lb.host_identifier {
        Some(HostIdentifier::Endpoint(e)) => {
            match e.address.as_ref().and_then(|a| a.address.as_ref()) {
                Some(address::Address::SocketAddress(s)) => s,
                _ => return Err(Invalid::new(field, format!("is missing ({shape})"))),
            }
        }
        _ => return Err(Invalid::new(field, format!("is missing ({shape})"))),
    };
    reject_if(
        socket.protocol != socket_address::Protocol::Tcp as i32,
        &format!("{field}.protocol (only TCP)"),
    )?;
    reject_if(
        !socket.resolver_name.is_empty(),
        &format!("{field}.resolver_name"),
    )?;
    if socket.address.is_empty() {
        return Err(Invalid::new(format!("{field}.address"), "is empty"));
    }
    let port = match &socket.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => match u16::try_from(*p) {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(Invalid::new(
                    format!("{field}.port_value"),
                    format!("{p} is not a port"),
                ));
            }
        },
        _ => return Err(Invalid::new(format!("{field}.port_value"), "is missing")),
    };
    if lb
        .metadata
        .as_ref()
        .is_some_and(|m| m.filter_metadata.contains_key(metadata::NAMESPACE))
    {
        return Err(Invalid::new(
            "load_assignment.endpoints[0].lb_endpoints[0].metadata",
            format!(
                "{:?} metadata (an identity) is not supported on {kind} clusters: their hosts are outside the mesh, reached without mTLS",
                metadata::NAMESPACE
            ),
        ));
    }
    if let Some(socket) = &c.transport_socket
        && !is_raw_buffer(socket)
    {
        return Err(Invalid::new(
            "transport_socket",
            format!(
                "only raw_buffer for {kind} clusters (their hosts are outside the mesh: the application speaks TLS itself if it needs it)"
            ),
        ));
    }
    reject_if(
        !c.transport_socket_matches.is_empty(),
        "transport_socket_matches (DNS clusters are plaintext)",
    )?;
    reject_if(
        !c.dns_resolvers.is_empty(),
        "dns_resolvers (the proxy resolves with --dns-server or the system's resolver)",
    )?;
    reject_if(c.dns_resolution_config.is_some(), "dns_resolution_config")?;
    reject_if(
        c.typed_dns_resolver_config.is_some(),
        "typed_dns_resolver_config",
    )?;
    reject_if(c.use_tcp_for_dns_lookups, "use_tcp_for_dns_lookups")?;
    reject_if(
        c.dns_failure_refresh_rate.is_some(),
        "dns_failure_refresh_rate",
    )?;
    reject_if(c.dns_jitter.is_some(), "dns_jitter")?;
    let family = match DnsLookupFamily::try_from(c.dns_lookup_family) {
        Ok(DnsLookupFamily::Auto) => LookupFamily::Auto,
        Ok(DnsLookupFamily::V4Only) => LookupFamily::V4Only,
        Ok(DnsLookupFamily::V6Only) => LookupFamily::V6Only,
        Ok(DnsLookupFamily::V4Preferred) => LookupFamily::V4Preferred,
        Ok(DnsLookupFamily::All) => LookupFamily::All,
        Err(_) => {
            return Err(Invalid::new(
                "dns_lookup_family",
                format!("{} is not a known family", c.dns_lookup_family),
            ));
        }
    };
    let refresh = match &c.dns_refresh_rate {
        None => DEFAULT_REFRESH,
        Some(d) => {
            let d = duration(d, "dns_refresh_rate")?;
            if d < std::time::Duration::from_millis(1) {
                return Err(Invalid::new("dns_refresh_rate", "must be at least 1ms"));
            }
            d
        }
    };
    Ok(DnsTarget {
        host: socket.address.to_ascii_lowercase(),
        port,
        family,
        all_addresses,
        respect_ttl: c.respect_dns_ttl,
        refresh,
    })
}

fn is_raw_buffer(socket: &TransportSocket) -> bool {
    matches!(&socket.config_type, Some(transport_socket::ConfigType::TypedConfig(any)) if any.type_url.ends_with(RAW_BUFFER))
}

/// Transport sockets that agree with the proxy's own choice: TLS (an
/// `UpstreamTlsContext`) or plaintext (`raw_buffer`).
fn transport_socket(socket: &TransportSocket) -> Result<()> {
    let url = match &socket.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) => any.type_url.as_str(),
        None => return Err(Invalid::new("typed_config", "is missing")),
    };
    if url == <UpstreamTlsContext as prost::Name>::type_url() || url.ends_with(RAW_BUFFER) {
        Ok(())
    } else {
        Err(Invalid::new(
            "typed_config",
            format!(
                "{} is not supported (only UpstreamTlsContext or raw_buffer)",
                url.trim_start_matches("type.googleapis.com/")
            ),
        ))
    }
}

fn http_protocol(options: &HttpProtocolOptions) -> Result<AppProtocol> {
    reject_if(!options.http_filters.is_empty(), "http_filters")?;
    reject_if(options.outlier_detection.is_some(), "outlier_detection")?;
    reject_if(
        !options.request_mirror_policies.is_empty(),
        "request_mirror_policies",
    )?;
    reject_if(options.retry_policy.is_some(), "retry_policy")?;
    match &options.upstream_protocol_options {
        None => Ok(AppProtocol::Http1),
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) => {
            match &explicit.protocol_config {
                Some(ProtocolConfig::HttpProtocolOptions(_)) => Ok(AppProtocol::Http1),
                Some(ProtocolConfig::Http2ProtocolOptions(_)) => Ok(AppProtocol::Http2),
                Some(ProtocolConfig::Http3ProtocolOptions(_)) => Err(Invalid::unsupported(
                    "explicit_http_config.http3_protocol_options",
                )),
                None => Err(Invalid::new(
                    "explicit_http_config",
                    "names no protocol (one of http_protocol_options, http2_protocol_options)",
                )),
            }
        }
        Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => Err(Invalid::unsupported(
            "use_downstream_protocol_config (only explicit_http_config)",
        )),
        Some(UpstreamProtocolOptions::AutoConfig(_)) => Err(Invalid::unsupported(
            "auto_config (only explicit_http_config)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use remora_xds_proto::pb::envoy::config::core::v3::{Address, SocketAddress};
    use remora_xds_proto::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
    };

    use super::*;

    fn dns_cluster(hosts: &[&str]) -> Cluster {
        let lb_endpoints = hosts
            .iter()
            .map(|h| LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: (*h).to_string(),
                            port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            })
            .collect();
        Cluster {
            name: "outbound|8080||api.ext.svc.cluster.local".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(
                DiscoveryType::StrictDns as i32,
            )),
            dns_lookup_family: DnsLookupFamily::V4Preferred as i32,
            respect_dns_ttl: true,
            load_assignment: Some(ClusterLoadAssignment {
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_strict_dns_cluster_with_one_hostname_compiles() {
        let spec = compile(&dns_cluster(&["API.example.test"])).expect("accepted");
        let dns = spec.dns.expect("a DNS target");
        assert_eq!(dns.host, "api.example.test");
        assert_eq!(dns.port, 8080);
        assert_eq!(dns.family, LookupFamily::V4Preferred);
        assert!(dns.all_addresses && dns.respect_ttl);
        let mut logical = dns_cluster(&["api.example.test"]);
        logical.cluster_discovery_type =
            Some(ClusterDiscoveryType::Type(DiscoveryType::LogicalDns as i32));
        assert!(
            !compile(&logical)
                .expect("accepted")
                .dns
                .expect("dns")
                .all_addresses
        );
    }

    #[test]
    fn other_dns_shapes_are_refused_precisely() {
        let two = compile(&dns_cluster(&["a.example.test", "b.example.test"]));
        assert_eq!(
            two.map_err(|e| e.detail()).err().as_deref(),
            Some(
                "load_assignment.endpoints: has 2 endpoints (a STRICT_DNS cluster needs exactly \
                 one endpoint: the hostname and port to resolve)"
            )
        );
        let mut resolvers = dns_cluster(&["a.example.test"]);
        resolvers.dns_resolvers.push(Address::default());
        let detail = compile(&resolvers).map_err(|e| e.detail()).err();
        assert!(
            detail
                .as_deref()
                .is_some_and(|d| d.starts_with("dns_resolvers")),
            "{detail:?}"
        );
        let mut tls = dns_cluster(&["a.example.test"]);
        tls.transport_socket = Some(TransportSocket {
            name: "tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(
                remora_xds_proto::pack(&UpstreamTlsContext::default()),
            )),
        });
        let detail = compile(&tls).map_err(|e| e.detail()).err();
        assert!(
            detail
                .as_deref()
                .is_some_and(|d| d.starts_with("transport_socket: only raw_buffer")),
            "{detail:?}"
        );
    }
}
