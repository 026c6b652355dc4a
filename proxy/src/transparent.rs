//! Transparent interception: where a captured connection was going, and
//! what the mesh says about that destination.
//!
//! `remora-proxy init` makes iptables redirect the pod's outbound TCP to
//! the outbound listener and inbound TCP to the inbound listener. The
//! kernel remembers the original destination (`SO_ORIGINAL_DST`, and
//! `IP6T_SO_ORIGINAL_DST` for IPv6). On the outbound side it is mapped:
//! a service's virtual IP and port to that service (HTTP routes for HTTP
//! ports, its cluster for TCP ports); a known endpoint address to that
//! endpoint; anything else is passed through as plain TCP, or refused when
//! the mesh blocks unknown destinations. A connection addressed to the
//! proxy's own ports would loop and is refused. A connection that was not
//! redirected (the application dialled the listener itself) is explicit
//! mode, routed by authority as before.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::config::{Cluster, Config, Endpoint};

/// Where a captured connection was going, if it was redirected: `None`
/// when the application connected to the listener itself (explicit mode)
/// or the kernel has no record (not intercepted).
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let socket = SockRef::from(stream);
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}

/// What the mesh says about an intercepted outbound destination.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A service's HTTP port (its virtual IP, or one of its endpoints):
    /// HTTP is routed by the port's route table; anything else the client
    /// sends goes to `cluster` as opaque TCP.
    Http {
        /// The destination port, selecting the route table.
        port: u16,
        /// The `service` label.
        service: String,
        /// Where non-HTTP bytes go.
        cluster: Option<Arc<Cluster>>,
        /// The exact endpoint, when the destination was an endpoint address.
        endpoint: Option<Arc<Endpoint>>,
    },
    /// A TCP service port, or an endpoint of one: opaque TCP.
    Tcp {
        /// The `service` label.
        service: String,
        /// Its endpoints.
        cluster: Arc<Cluster>,
        /// The exact endpoint, when the destination was an endpoint address.
        endpoint: Option<Arc<Endpoint>>,
    },
    /// Not in the mesh: plain TCP to where it was going.
    Passthrough,
    /// Not in the mesh, and the mesh blocks such destinations.
    Blocked,
    /// The proxy itself: would loop.
    Loop,
}

impl Destination {
    /// The `service` metric label.
    pub fn service(&self) -> &str {
        match self {
            Destination::Http { service, .. } | Destination::Tcp { service, .. } => service,
            Destination::Passthrough => "passthrough",
            Destination::Blocked => "blocked",
            Destination::Loop => "loop",
        }
    }
}

/// Maps an original destination. `own_ports` are the proxy's listener
/// ports: a destination on one of them at a local address would loop.
pub fn destination(config: &Config, dst: SocketAddr, own_ports: &[u16]) -> Destination {
    if own_ports.contains(&dst.port()) && is_local(dst.ip()) {
        return Destination::Loop;
    }
    let intercepted = &config.intercepted;
    if let Some(cluster) = intercepted.tcp_vips.get(&dst) {
        return Destination::Tcp {
            service: service_of(&cluster.name),
            cluster: Arc::clone(cluster),
            endpoint: None,
        };
    }
    let http_port = intercepted.ports.contains_key(&dst.port());
    if let Some((cluster, endpoint)) = intercepted.endpoints.get(&dst) {
        let service = service_of(&cluster.name);
        let is_tcp = intercepted.tcp_clusters.contains(&cluster.name);
        return if http_port && !is_tcp {
            Destination::Http {
                port: dst.port(),
                service,
                cluster: Some(Arc::clone(cluster)),
                endpoint: Some(Arc::clone(endpoint)),
            }
        } else {
            Destination::Tcp {
                service,
                cluster: Arc::clone(cluster),
                endpoint: Some(Arc::clone(endpoint)),
            }
        };
    }
    if intercepted.http_vips.contains(&dst) {
        let cluster = intercepted.ports.get(&dst.port()).and_then(|table| {
            let host = table.virtual_host(&dst.to_string())?;
            // Virtual hosts are named FQDN:PORT, as their clusters.
            let fqdn = host
                .name
                .rsplit_once(':')
                .map_or(host.name.as_str(), |(f, _)| f);
            config
                .clusters
                .get(&format!("outbound|{}||{fqdn}", dst.port()))
                .cloned()
        });
        let service = cluster
            .as_ref()
            .map_or_else(|| dst.to_string(), |c| service_of(&c.name));
        return Destination::Http {
            port: dst.port(),
            service,
            cluster,
            endpoint: None,
        };
    }
    if intercepted.block_unknown {
        Destination::Blocked
    } else {
        Destination::Passthrough
    }
}

/// `name.namespace` from a cluster name `outbound|PORT|SUBSET|name.namespace.svc...`.
pub(crate) fn service_of(cluster: &str) -> String {
    let fqdn = cluster.rsplit('|').next().unwrap_or(cluster);
    let mut labels = fqdn.split('.');
    match (labels.next(), labels.next()) {
        (Some(name), Some(namespace)) => format!("{name}.{namespace}"),
        _ => fqdn.to_string(),
    }
}

/// Whether `ip` is an address of this host (network namespace): binding a
/// socket to it succeeds only then. Asked only for destinations on the
/// proxy's own ports, never on the hot path.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_labels_come_from_cluster_names() {
        assert_eq!(
            service_of("outbound|5432||ledger.shop.svc.cluster.local"),
            "ledger.shop"
        );
        assert_eq!(service_of("outbound|80|v1|web.test"), "web.test");
    }

    #[test]
    fn the_proxys_own_ports_on_local_addresses_loop() {
        let config = Config::default();
        let own = [15001, 15006];
        assert!(matches!(
            destination(&config, "127.0.0.1:15006".parse().expect("address"), &own),
            Destination::Loop
        ));
        assert!(matches!(
            destination(&config, "192.0.2.7:15006".parse().expect("address"), &own),
            Destination::Passthrough
        ));
    }
}
