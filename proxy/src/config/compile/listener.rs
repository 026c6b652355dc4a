//! Listeners: the explicit `outbound` listener matters for the name of its
//! route table; `inbound` for what the inbound port accepts (its filter
//! chains' transport protocols: `tls` only is STRICT, `tls` and
//! `raw_buffer` is PERMISSIVE); `0.0.0.0_PORT` (an HTTP route table per
//! port) and `VIP_PORT` (`tcp_proxy` to a TCP service's cluster) for
//! intercepted connections, matched by original destination. Listeners of
//! other shapes are accepted and ignored.

use std::net::{IpAddr, SocketAddr};

use remora_xds_proto::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use remora_xds_proto::pb::envoy::config::core::v3::{address, socket_address};
use remora_xds_proto::pb::envoy::config::listener::v3::{Filter, Listener, filter};
use remora_xds_proto::pb::envoy::extensions::filters::http::router::v3::Router;
use remora_xds_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager::CodecType,
    http_connection_manager::RouteSpecifier, http_filter,
};
use remora_xds_proto::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy,
};
use remora_xds_proto::unpack;

use super::{INBOUND_LISTENER, Invalid, OUTBOUND_LISTENER, Result, element, reject_if};
use crate::config::InboundMode;

/// The network filter name of the HTTP connection manager.
const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
/// The HTTP filter name of the router.
const ROUTER_FILTER: &str = "envoy.filters.http.router";

/// What the proxy keeps of a listener.
#[derive(Debug, Default)]
pub(super) struct ListenerSpec {
    /// The RDS name its HTTP connection manager uses (`outbound`, and the
    /// per-port listeners); `None` for the others.
    pub(super) route_config: Option<String>,
    /// For `inbound`: what the inbound port accepts.
    pub(super) inbound_mode: Option<InboundMode>,
    /// For `0.0.0.0_PORT`: intercepted HTTP to any address on this port
    /// uses `route_config`.
    pub(super) port_table: Option<u16>,
    /// For `VIP_PORT` with `tcp_proxy`: intercepted connections to this
    /// address go to this cluster as opaque TCP.
    pub(super) tcp_vip: Option<(SocketAddr, String)>,
    /// For `virtualOutbound`: true when destinations outside the mesh are
    /// refused (its default chain goes to `BlackHoleCluster`).
    pub(super) block_unknown: Option<bool>,
}

/// The listener saying what happens to intercepted connections to
/// destinations outside the mesh (Istio's name and layout).
pub(super) const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
/// Its default chain's cluster when they are refused.
pub(super) const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
/// Its default chain's cluster when they pass through.
pub(super) const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

pub(super) fn compile(listener: &Listener) -> Result<ListenerSpec> {
    if listener.name == INBOUND_LISTENER {
        return inbound(listener).map(|mode| ListenerSpec {
            inbound_mode: Some(mode),
            ..ListenerSpec::default()
        });
    }
    if listener.name == VIRTUAL_OUTBOUND {
        return virtual_outbound(listener);
    }
    if listener.name != OUTBOUND_LISTENER {
        return intercepted(listener);
    }
    // The address is ignored: the proxy binds where its own flags say.
    Ok(ListenerSpec {
        route_config: Some(hcm_route_config(listener)?),
        ..ListenerSpec::default()
    })
}

/// The listeners intercepted traffic is matched against (Istio's layout):
/// `0.0.0.0_PORT` (HTTP to any address on PORT, routed by authority) and
/// `VIP_PORT` (a TCP service's virtual IP). Listeners of other shapes are
/// ignored.
fn intercepted(listener: &Listener) -> Result<ListenerSpec> {
    let address = listener
        .address
        .as_ref()
        .and_then(|a| match &a.address {
            Some(address::Address::SocketAddress(s)) => Some(s),
            _ => None,
        })
        .and_then(|s| {
            let ip: IpAddr = s.address.parse().ok()?;
            match s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => {
                    Some(SocketAddr::new(ip, u16::try_from(p).ok()?))
                }
                _ => None,
            }
        });
    let (Some(address), [chain]) = (address, listener.filter_chains.as_slice()) else {
        return Ok(ListenerSpec::default());
    };
    let [filter] = chain.filters.as_slice() else {
        return Ok(ListenerSpec::default());
    };
    let url = match &filter.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => any.type_url.as_str(),
        _ => return Ok(ListenerSpec::default()),
    };
    if url == <HttpConnectionManager as prost::Name>::type_url() && address.ip().is_unspecified() {
        return Ok(ListenerSpec {
            route_config: Some(hcm_route_config(listener)?),
            port_table: Some(address.port()),
            ..ListenerSpec::default()
        });
    }
    if url == <TcpProxy as prost::Name>::type_url() {
        let Some(filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
            return Ok(ListenerSpec::default());
        };
        let proxy: TcpProxy = unpack(any)
            .map_err(|e| Invalid::new("filter_chains[0].filters[0].typed_config", e.to_string()))?;
        let cluster = match proxy.cluster_specifier {
            Some(tcp_proxy::ClusterSpecifier::Cluster(name)) if !name.is_empty() => name,
            _ => {
                return Err(Invalid::new(
                    "filter_chains[0].filters[0].typed_config (tcp_proxy).cluster",
                    "is required (weighted_clusters are not supported)",
                ));
            }
        };
        return Ok(ListenerSpec {
            tcp_vip: Some((address, cluster)),
            ..ListenerSpec::default()
        });
    }
    Ok(ListenerSpec::default())
}

/// `virtualOutbound`: its default filter chain's `tcp_proxy` names
/// `PassthroughCluster` or `BlackHoleCluster`.
fn virtual_outbound(listener: &Listener) -> Result<ListenerSpec> {
    let field = "default_filter_chain.filters[0].typed_config (tcp_proxy).cluster";
    let cluster = listener
        .default_filter_chain
        .as_ref()
        .and_then(|chain| chain.filters.first())
        .and_then(|filter| match &filter.config_type {
            Some(filter::ConfigType::TypedConfig(any)) => unpack::<TcpProxy>(any).ok(),
            _ => None,
        })
        .and_then(|proxy| match proxy.cluster_specifier {
            Some(tcp_proxy::ClusterSpecifier::Cluster(name)) => Some(name),
            _ => None,
        })
        .ok_or_else(|| Invalid::new(field, "is missing (a tcp_proxy to a cluster)"))?;
    let block = match cluster.as_str() {
        BLACKHOLE_CLUSTER => true,
        PASSTHROUGH_CLUSTER => false,
        other => {
            return Err(Invalid::new(
                field,
                format!(
                    "{other:?} is not supported (only {PASSTHROUGH_CLUSTER} or {BLACKHOLE_CLUSTER})"
                ),
            ));
        }
    };
    Ok(ListenerSpec {
        block_unknown: Some(block),
        ..ListenerSpec::default()
    })
}

/// The RDS name of a listener made of one chain with one HTTP connection
/// manager.
fn hcm_route_config(listener: &Listener) -> Result<String> {
    reject_if(listener.api_listener.is_some(), "api_listener")?;
    reject_if(
        listener.default_filter_chain.is_some(),
        "default_filter_chain",
    )?;
    reject_if(
        listener.filter_chain_matcher.is_some(),
        "filter_chain_matcher",
    )?;
    let chain = match listener.filter_chains.as_slice() {
        [] => return Err(Invalid::new("filter_chains", "is empty")),
        [chain] => chain,
        _ => {
            return Err(Invalid::new(
                "filter_chains",
                "has more than one filter chain; only one is supported",
            ));
        }
    };
    let prefix = element("filter_chains", 0, &chain.name);
    if chain.transport_socket.is_some() {
        return Err(Invalid::new(
            "transport_socket",
            "is not supported (applications talk plaintext to their sidecar)",
        )
        .within(&prefix));
    }
    let hcm = match chain.filters.as_slice() {
        [only] => http_connection_manager(only).map_err(|e| e.within("filters[0].")),
        _ => Err(Invalid::new(
            "filters",
            format!(
                "must hold exactly one filter, {HCM_FILTER}, found {}",
                chain.filters.len()
            ),
        )),
    }
    .map_err(|e| e.within(&prefix))?;
    route_config_name(&hcm)
        .map_err(|e| e.within(&format!("{prefix}filters[0].typed_config ({HCM_FILTER}).")))
}

/// The mode of the `inbound` listener: a chain for `tls` is required (the
/// mesh always speaks mTLS); a `raw_buffer` chain as well means PERMISSIVE.
fn inbound(listener: &Listener) -> Result<InboundMode> {
    let mut tls = false;
    let mut plaintext = false;
    for (i, chain) in listener.filter_chains.iter().enumerate() {
        let protocol = chain
            .filter_chain_match
            .as_ref()
            .map_or("", |m| m.transport_protocol.as_str());
        match protocol {
            "tls" => tls = true,
            "raw_buffer" => plaintext = true,
            other => {
                return Err(Invalid::new(
                    "filter_chain_match.transport_protocol",
                    format!("{other:?} is not supported (only \"tls\" or \"raw_buffer\")"),
                )
                .within(&element("filter_chains", i, &chain.name)));
            }
        }
    }
    if !tls {
        return Err(Invalid::new(
            "filter_chains",
            "has no chain for transport_protocol \"tls\"; the inbound port always takes mTLS",
        ));
    }
    Ok(if plaintext {
        InboundMode::Permissive
    } else {
        InboundMode::Strict
    })
}

fn http_connection_manager(filter: &Filter) -> Result<HttpConnectionManager> {
    match &filter.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => {
            if any.type_url != <HttpConnectionManager as prost::Name>::type_url() {
                return Err(Invalid::new(
                    "typed_config",
                    format!(
                        "{} is not supported (only {HCM_FILTER})",
                        any.type_url.trim_start_matches("type.googleapis.com/")
                    ),
                ));
            }
            unpack(any).map_err(|e| Invalid::new("typed_config", e.to_string()))
        }
        Some(filter::ConfigType::ConfigDiscovery(_)) => {
            Err(Invalid::unsupported("config_discovery"))
        }
        None => Err(Invalid::new(
            "typed_config",
            format!("is missing (expected {HCM_FILTER})"),
        )),
    }
}

fn route_config_name(hcm: &HttpConnectionManager) -> Result<String> {
    let rds = match &hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => rds,
        Some(RouteSpecifier::RouteConfig(_)) => {
            return Err(Invalid::new(
                "route_config",
                "is not supported (routes must come over RDS)",
            ));
        }
        Some(RouteSpecifier::ScopedRoutes(_)) => {
            return Err(Invalid::unsupported("scoped_routes"));
        }
        None => return Err(Invalid::new("rds", "is missing")),
    };
    let ads = matches!(
        rds.config_source
            .as_ref()
            .and_then(|s| s.config_source_specifier.as_ref()),
        Some(ConfigSourceSpecifier::Ads(_))
    );
    if !ads {
        return Err(Invalid::new(
            "rds.config_source",
            "is not supported (only ads)",
        ));
    }
    if rds.route_config_name.is_empty() {
        return Err(Invalid::new("rds.route_config_name", "is empty"));
    }
    for (i, f) in hcm.http_filters.iter().enumerate() {
        router_filter(f).map_err(|e| e.within(&element("http_filters", i, &f.name)))?;
    }
    reject_if(
        hcm.codec_type != CodecType::Auto as i32,
        "codec_type (only AUTO)",
    )?;
    reject_if(!hcm.upgrade_configs.is_empty(), "upgrade_configs")?;
    reject_if(hcm.local_reply_config.is_some(), "local_reply_config")?;
    reject_if(hcm.request_timeout.is_some(), "request_timeout")?;
    reject_if(hcm.stream_idle_timeout.is_some(), "stream_idle_timeout")?;
    reject_if(
        hcm.normalize_path.as_ref().is_some_and(|b| b.value),
        "normalize_path",
    )?;
    reject_if(hcm.merge_slashes, "merge_slashes")?;
    reject_if(hcm.strip_matching_host_port, "strip_matching_host_port")?;
    reject_if(hcm.strip_port_mode.is_some(), "strip_port_mode")?;
    Ok(rds.route_config_name.clone())
}

fn router_filter(filter: &HttpFilter) -> Result<()> {
    let router_url = <Router as prost::Name>::type_url();
    let is_router = match &filter.config_type {
        Some(http_filter::ConfigType::TypedConfig(any)) => any.type_url == router_url,
        Some(http_filter::ConfigType::ConfigDiscovery(_)) => false,
        None => filter.name == ROUTER_FILTER,
    };
    if is_router {
        Ok(())
    } else {
        Err(Invalid::new(
            "",
            format!("only the router filter ({ROUTER_FILTER}) is supported"),
        ))
    }
}
