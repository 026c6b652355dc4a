//! Clusters: EDS over ADS, round robin or least request, HTTP/1.1 or
//! HTTP/2 to the application.

// Deprecated Envoy fields are read on purpose: to honour them (the old
// header matchers, `http2_protocol_options`) or to reject them.
#![allow(deprecated)]

use std::time::Duration;

use remora_xds_proto::pb::envoy::config::cluster::v3::{
    Cluster,
    cluster::{ClusterDiscoveryType, ClusterProtocolSelection, DiscoveryType, LbPolicy as PbLb},
};
use remora_xds_proto::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use remora_xds_proto::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use remora_xds_proto::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use remora_xds_proto::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{UpstreamProtocolOptions, explicit_http_config::ProtocolConfig},
};
use remora_xds_proto::unpack;

use super::{Invalid, Result, duration, reject_if};
use crate::config::{AppProtocol, LbPolicy};

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
    pub(super) eds_name: String,
    pub(super) connect_timeout: Duration,
    pub(super) lb_policy: LbPolicy,
    pub(super) protocol: AppProtocol,
}

pub(super) fn compile(c: &Cluster) -> Result<ClusterSpec> {
    match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32 => {}
        Some(ClusterDiscoveryType::Type(t)) => {
            let name = DiscoveryType::try_from(*t)
                .map_or_else(|_| t.to_string(), |d| d.as_str_name().to_string());
            return Err(Invalid::new(
                "type",
                format!("{name} is not supported (only EDS; DNS discovery comes later)"),
            ));
        }
        Some(ClusterDiscoveryType::ClusterType(_)) => {
            return Err(Invalid::unsupported("cluster_type"));
        }
        None => {
            return Err(Invalid::new(
                "type",
                "STATIC (the default) is not supported (only EDS)",
            ));
        }
    }
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

    Ok(ClusterSpec {
        eds_name: if eds.service_name.is_empty() {
            c.name.clone()
        } else {
            eds.service_name.clone()
        },
        connect_timeout,
        lb_policy,
        protocol,
    })
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
