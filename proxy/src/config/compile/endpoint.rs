//! Endpoint assignments: the members of a cluster that take traffic, their
//! weights, and the identity of those that have a sidecar.

use std::net::{IpAddr, SocketAddr};

use remora_xds_proto::metadata;
use remora_xds_proto::pb::envoy::config::core::v3::{
    HealthStatus, Metadata, SocketAddress, address, socket_address,
};
use remora_xds_proto::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, LbEndpoint, lb_endpoint::HostIdentifier,
};
use remora_xds_proto::pb::google::protobuf::value::Kind;

use crate::identity::SpiffeId;

use super::{Invalid, Result, reject_if};

/// The members of one assignment that take traffic, in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AssignmentSpec {
    pub(super) members: Vec<MemberSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MemberSpec {
    /// Where the application listens.
    pub(super) address: SocketAddr,
    /// Its SPIFFE identity when it has a sidecar.
    pub(super) identity: Option<String>,
    pub(super) weight: u32,
}

pub(super) fn compile(cla: &ClusterLoadAssignment) -> Result<AssignmentSpec> {
    if let Some(policy) = &cla.policy {
        reject_if(!policy.drop_overloads.is_empty(), "policy.drop_overloads")?;
    }
    reject_if(!cla.named_endpoints.is_empty(), "named_endpoints")?;
    let mut members = Vec::new();
    // Locality weights are ignored: the endpoints' own weights decide.
    for (i, locality) in cla.endpoints.iter().enumerate() {
        if locality.priority > 0 {
            return Err(Invalid::new(
                format!("endpoints[{i}].priority"),
                format!(
                    "{} is not supported (only priority 0: no failover yet)",
                    locality.priority
                ),
            ));
        }
        for (j, lb) in locality.lb_endpoints.iter().enumerate() {
            let member = lb_endpoint(lb)
                .map_err(|e| e.within(&format!("endpoints[{i}].lb_endpoints[{j}].")))?;
            members.extend(member);
        }
    }
    Ok(AssignmentSpec { members })
}

/// The member, or `None` when its health keeps it from taking traffic.
fn lb_endpoint(lb: &LbEndpoint) -> Result<Option<MemberSpec>> {
    let endpoint = match &lb.host_identifier {
        Some(HostIdentifier::Endpoint(e)) => e,
        Some(HostIdentifier::EndpointName(_)) => {
            return Err(Invalid::unsupported("endpoint_name"));
        }
        None => return Err(Invalid::new("endpoint", "is missing")),
    };
    let address = match endpoint.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => {
            socket_address(s).map_err(|e| e.within("endpoint.address.socket_address."))?
        }
        Some(address::Address::Pipe(_)) => {
            return Err(Invalid::unsupported("endpoint.address.pipe"));
        }
        Some(address::Address::EnvoyInternalAddress(_)) => {
            return Err(Invalid::unsupported(
                "endpoint.address.envoy_internal_address",
            ));
        }
        None => return Err(Invalid::new("endpoint.address", "is missing")),
    };
    let weight = match &lb.load_balancing_weight {
        None => 1,
        Some(w) if w.value == 0 => {
            return Err(Invalid::new("load_balancing_weight", "must be at least 1"));
        }
        Some(w) => w.value,
    };
    let identity = lb
        .metadata
        .as_ref()
        .map(identity)
        .transpose()
        .map_err(|e| e.within("metadata."))?
        .flatten();
    let takes_traffic = match HealthStatus::try_from(lb.health_status) {
        Ok(HealthStatus::Healthy | HealthStatus::Unknown) => true,
        Ok(
            HealthStatus::Unhealthy
            | HealthStatus::Draining
            | HealthStatus::Timeout
            | HealthStatus::Degraded,
        ) => false,
        Err(_) => {
            return Err(Invalid::new(
                "health_status",
                format!("{} is not a known status", lb.health_status),
            ));
        }
    };
    Ok(takes_traffic.then_some(MemberSpec {
        address,
        identity,
        weight,
    }))
}

fn socket_address(s: &SocketAddress) -> Result<SocketAddr> {
    reject_if(
        s.protocol != socket_address::Protocol::Tcp as i32,
        "protocol (only TCP)",
    )?;
    reject_if(!s.resolver_name.is_empty(), "resolver_name")?;
    let port = match &s.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => match u16::try_from(*p) {
            Ok(p) if p > 0 => p,
            _ => return Err(Invalid::new("port_value", format!("{p} is not a port"))),
        },
        Some(socket_address::PortSpecifier::NamedPort(_)) => {
            return Err(Invalid::unsupported("named_port"));
        }
        None => return Err(Invalid::new("port_value", "is missing")),
    };
    let ip: IpAddr = s.address.parse().map_err(|_| {
        Invalid::new(
            "address",
            format!(
                "{:?} is not an IP address (host names need DNS, which comes later)",
                s.address
            ),
        )
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// `filter_metadata["remora"].identity`, when present.
fn identity(m: &Metadata) -> Result<Option<String>> {
    let Some(fields) = m.filter_metadata.get(metadata::NAMESPACE) else {
        return Ok(None);
    };
    let field = format!(
        "filter_metadata[{:?}].{}",
        metadata::NAMESPACE,
        metadata::IDENTITY
    );
    match fields
        .fields
        .get(metadata::IDENTITY)
        .map(|v| v.kind.as_ref())
    {
        None => Ok(None),
        Some(Some(Kind::StringValue(s))) if !s.is_empty() => match SpiffeId::parse(s) {
            Ok(_) => Ok(Some(s.clone())),
            Err(e) => Err(Invalid::new(
                field,
                format!("{s:?} is not a SPIFFE ID: {e}"),
            )),
        },
        Some(Some(Kind::StringValue(_))) => Err(Invalid::new(field, "is empty")),
        Some(_) => Err(Invalid::new(field, "must be a string (a SPIFFE ID)")),
    }
}
