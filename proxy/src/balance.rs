//! Load balancing: which cluster of a weighted split, then which endpoint.
//!
//! Round robin walks the cumulative weights with a shared counter; least
//! request takes two weighted random candidates and keeps the one with
//! fewer requests in flight per unit of weight (power of two choices). A
//! retry avoids the endpoint that just failed when the cluster has another.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::config::{Cluster, Endpoint, LbPolicy, Member, WeightedCluster};

/// Picks a backend of a weighted split. `total_weight` also counts the
/// backends whose cluster is missing, which are left out of `backends`: a
/// pick that lands on one of those is `None` (the caller answers 503), as
/// in Envoy.
pub fn pick_backend(backends: &[WeightedCluster], total_weight: u32) -> Option<&WeightedCluster> {
    match backends {
        [] => None,
        [only] if only.weight >= total_weight => Some(only),
        _ => {
            let mut n = fastrand::u32(0..total_weight.max(1));
            backends.iter().find(|b| {
                if n < b.weight {
                    true
                } else {
                    n -= b.weight;
                    false
                }
            })
        }
    }
}

/// Picks an endpoint of `cluster`, avoiding `avoid` when another exists.
/// A DNS cluster's members are its current answer (one atomic load).
pub fn pick_endpoint(cluster: &Cluster, avoid: Option<&Arc<Endpoint>>) -> Option<Arc<Endpoint>> {
    match &cluster.dns {
        None => pick(cluster, &cluster.members, cluster.total_weight, avoid),
        Some(dns) => {
            let answer = dns.answer();
            pick(cluster, &answer.members, answer.total_weight, avoid)
        }
    }
}

fn pick(
    cluster: &Cluster,
    members: &[Member],
    total_weight: u64,
    avoid: Option<&Arc<Endpoint>>,
) -> Option<Arc<Endpoint>> {
    let choose = || match cluster.lb_policy {
        LbPolicy::RoundRobin => round_robin(cluster, members, total_weight),
        LbPolicy::LeastRequest => least_request(members, total_weight),
    };
    let first = match members.len() {
        0 => return None,
        1 => return members.first().map(|m| m.endpoint.clone()),
        _ => choose(),
    };
    match (first, avoid) {
        (Some(m), Some(avoid)) if Arc::ptr_eq(&m.endpoint, avoid) => {
            let second = choose();
            second
                .filter(|s| !Arc::ptr_eq(&s.endpoint, avoid))
                .or_else(|| members.iter().find(|m| !Arc::ptr_eq(&m.endpoint, avoid)))
                .map(|m| m.endpoint.clone())
        }
        (m, _) => m.map(|m| m.endpoint.clone()),
    }
}

fn round_robin<'a>(cluster: &Cluster, members: &'a [Member], total: u64) -> Option<&'a Member> {
    let total = total.max(1);
    let n = cluster.balancer.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
    by_weight(members, n)
}

fn least_request(members: &[Member], total: u64) -> Option<&Member> {
    let total = total.max(1);
    let a = by_weight(members, fastrand::u64(0..total))?;
    let b = by_weight(members, fastrand::u64(0..total))?;
    // Compare load per unit of weight without dividing:
    // a.load / a.weight <= b.load / b.weight.
    let load = |m: &Member| m.endpoint.outstanding.load(Ordering::Relaxed) as u64;
    if load(a) * u64::from(b.weight) <= load(b) * u64::from(a.weight) {
        Some(a)
    } else {
        Some(b)
    }
}

fn by_weight(members: &[Member], mut n: u64) -> Option<&Member> {
    members.iter().find(|m| {
        let w = u64::from(m.weight);
        if n < w {
            true
        } else {
            n -= w;
            false
        }
    })
}

/// Counts a request in flight to an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    /// Starts counting.
    pub fn new(endpoint: Arc<Endpoint>) -> InFlight {
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AppProtocol, BalancerState, EndpointKey};
    use crate::upstream::{Clients, Pool};
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn endpoint(port: u16) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            key: EndpointKey {
                app: ([127, 0, 0, 1], port).into(),
                proxy: None,
                protocol: AppProtocol::Http1,
                identity: None,
            },
            outstanding: AtomicUsize::new(0),
            pool: Pool::default(),
            server_name: None,
        })
    }

    fn cluster(policy: LbPolicy, weights: &[u32]) -> Cluster {
        let members: Vec<Member> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Member {
                endpoint: endpoint(9000 + i as u16),
                weight: w,
            })
            .collect();
        Cluster {
            name: "c".into(),
            connect_timeout: Duration::from_secs(1),
            detect_timeout: None,
            lb_policy: policy,
            protocol: AppProtocol::Http1,
            total_weight: members.iter().map(|m| u64::from(m.weight)).sum(),
            members,
            dns: None,
            balancer: Arc::new(BalancerState::default()),
            clients: Arc::new(Clients::new(Duration::from_secs(1))),
        }
    }

    fn shares(c: &Cluster, n: usize) -> HashMap<u16, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let e = pick_endpoint(c, None).expect("members");
            *counts.entry(e.key.app.port()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_exactly() {
        let c = cluster(LbPolicy::RoundRobin, &[1, 3]);
        let counts = shares(&c, 400);
        assert_eq!(counts[&9000], 100);
        assert_eq!(counts[&9001], 300);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let c = cluster(LbPolicy::LeastRequest, &[1, 1]);
        let _busy: Vec<InFlight> = (0..10)
            .map(|_| InFlight::new(c.members[0].endpoint.clone()))
            .collect();
        let counts = shares(&c, 200);
        // Only a draw of the busy endpoint twice picks it: about a quarter.
        assert!(counts.get(&9000).copied().unwrap_or(0) < 90, "{counts:?}");
    }

    #[test]
    fn a_retry_avoids_the_endpoint_that_failed() {
        let c = cluster(LbPolicy::RoundRobin, &[1, 1]);
        let failed = c.members[0].endpoint.clone();
        for _ in 0..10 {
            let e = pick_endpoint(&c, Some(&failed)).expect("members");
            assert!(!Arc::ptr_eq(&e, &failed));
        }
    }

    #[test]
    fn weighted_backends_split_by_weight() {
        let c1 = Arc::new(cluster(LbPolicy::RoundRobin, &[1]));
        let backends = vec![
            WeightedCluster {
                cluster: c1.clone(),
                weight: 0,
            },
            WeightedCluster {
                cluster: c1,
                weight: 5,
            },
        ];
        for _ in 0..50 {
            let b = pick_backend(&backends, 5).expect("one");
            assert_eq!(b.weight, 5, "weight 0 is never picked");
        }
        // A missing cluster's weight still counts: picks landing on it
        // find nothing.
        let c2 = Arc::new(cluster(LbPolicy::RoundRobin, &[1]));
        let partial = vec![WeightedCluster {
            cluster: c2,
            weight: 80,
        }];
        let misses = (0..1000)
            .filter(|_| pick_backend(&partial, 100).is_none())
            .count();
        assert!(
            (120..=280).contains(&misses),
            "{misses} of 1000 should miss (20%)"
        );
    }
}
