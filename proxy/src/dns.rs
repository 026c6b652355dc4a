//! Clusters found by DNS (Envoy's STRICT_DNS and LOGICAL_DNS): services
//! outside the mesh, declared by hostname.
//!
//! A [`Resolution`] belongs to one cluster: a background task resolves the
//! cluster's hostname with `hickory-resolver`, publishes every address of
//! the answer as a member (only the first, for LOGICAL_DNS) through an
//! `ArcSwap`, and resolves again when the answer's TTL runs out (at least
//! [`MIN_REFRESH`], at most [`MAX_REFRESH`]). When a resolution fails the
//! last answer stays, a warning is logged once per streak of failures and
//! the next try follows a doubling back-off. The data path reads the
//! current answer with one atomic load, no lock (see `balance.rs`).
//!
//! Resolutions outlive config recompiles: [`resolution`] hands out the
//! live one for the same cluster and target, so a recompile of unrelated
//! resources neither restarts the task nor forgets the answer, and
//! endpoints keep their pooled connections across answers that keep their
//! address. The task stops when the last config holding the cluster goes.
//!
//! The resolver is the system's (`/etc/resolv.conf`) unless [`configure`]
//! names a server (`--dns-server`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use prometheus::{IntCounter, IntCounterVec, Opts};
use serde::Serialize;
use tokio::task::AbortHandle;

use crate::config::{AppProtocol, Endpoint, EndpointKey, Member, State};
use crate::upstream::Pool;

/// Shortest wait before resolving again, whatever the TTL says.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest wait before resolving again, whatever the TTL says.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// First wait after a failed resolution; it doubles up to
/// [`MAX_FAILURE_RETRY`].
pub const MIN_FAILURE_RETRY: Duration = Duration::from_secs(1);
/// Longest wait after a failed resolution.
pub const MAX_FAILURE_RETRY: Duration = Duration::from_secs(30);
/// Envoy's `dns_refresh_rate` when the cluster gives none.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
/// Time allowed for one query to the server, and how many tries.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_ATTEMPTS: usize = 2;
/// Past the answer's expiry before asking again, so the resolver's cache
/// has let it go.
const EXPIRY_SLACK: Duration = Duration::from_millis(20);

// === Configuration ===

static SERVER: OnceLock<Option<SocketAddr>> = OnceLock::new();

/// Sets the DNS server every resolution asks (`--dns-server`); `None`: the
/// system's resolver configuration. Only the first call counts, so call it
/// once at startup, before any cluster is compiled.
pub fn configure(server: Option<SocketAddr>) {
    let _ = SERVER.set(server);
}

fn server() -> Option<SocketAddr> {
    SERVER.get().copied().flatten()
}

/// Which address families an answer is made of (Envoy's
/// `dns_lookup_family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LookupFamily {
    /// IPv6 if the name has any, else IPv4 (Envoy's `AUTO`).
    Auto,
    /// IPv4 only.
    V4Only,
    /// IPv6 only.
    V6Only,
    /// IPv4 if the name has any, else IPv6.
    V4Preferred,
    /// Both.
    All,
}

impl LookupFamily {
    fn strategy(self) -> LookupIpStrategy {
        match self {
            LookupFamily::Auto => LookupIpStrategy::Ipv6thenIpv4,
            LookupFamily::V4Only => LookupIpStrategy::Ipv4Only,
            LookupFamily::V6Only => LookupIpStrategy::Ipv6Only,
            LookupFamily::V4Preferred => LookupIpStrategy::Ipv4thenIpv6,
            LookupFamily::All => LookupIpStrategy::Ipv4AndIpv6,
        }
    }
}

/// What a DNS cluster resolves and how often, as compiled from its
/// Cluster resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct DnsTarget {
    /// The name to resolve.
    pub host: String,
    /// The port every address is reached on.
    pub port: u16,
    /// Address families.
    pub family: LookupFamily,
    /// STRICT_DNS: every address is a member. LOGICAL_DNS: the first only.
    pub all_addresses: bool,
    /// Re-resolve when the answer's TTL runs out (`respect_dns_ttl`);
    /// otherwise every `refresh`.
    pub respect_ttl: bool,
    /// `dns_refresh_rate`.
    #[serde(with = "humantime_secs")]
    pub refresh: Duration,
}

mod humantime_secs {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

// === Resolution ===

/// The current answer of a DNS cluster, as members.
#[derive(Debug, Default, Serialize)]
pub struct Answer {
    /// One member per address, weight 1, in the order of the answer.
    pub members: Vec<Member>,
    /// Sum of the members' weights.
    pub total_weight: u64,
}

#[derive(Debug)]
struct Shared {
    answer: ArcSwap<Answer>,
}

/// A cluster's live DNS answer and the task that keeps it fresh; the task
/// stops when this is dropped.
#[derive(Debug)]
pub struct Resolution {
    target: DnsTarget,
    shared: Arc<Shared>,
    task: Option<AbortHandle>,
}

impl Resolution {
    /// The current answer: one atomic load, no lock. Empty before the
    /// first answer arrives.
    pub fn answer(&self) -> Guard<Arc<Answer>> {
        self.shared.answer.load()
    }

    /// What it resolves.
    pub fn target(&self) -> &DnsTarget {
        &self.target
    }
}

impl Drop for Resolution {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Serialize for Resolution {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let answer = self.answer();
        let addresses: Vec<SocketAddr> =
            answer.members.iter().map(|m| m.endpoint.key.app).collect();
        let mut st = s.serialize_struct("Resolution", 2)?;
        st.serialize_field("target", &self.target)?;
        st.serialize_field("addresses", &addresses)?;
        st.end()
    }
}

type Key = (String, DnsTarget, AppProtocol);

/// Live resolutions by cluster name, target and protocol. Only the config
/// compiler takes this lock, never the data path. Process-wide (like the
/// resolver settings) rather than in [`State`], so that [`State`] keeps
/// its shape; a proxy process has one [`State`].
static LIVE: LazyLock<Mutex<HashMap<Key, Weak<Resolution>>>> = LazyLock::new(Mutex::default);

/// The live resolution of cluster `name` for `target`, or a new one whose
/// task starts on the current tokio runtime. Outside a runtime (unit tests
/// of the compiler) the resolution stays empty.
pub fn resolution(
    state: &State,
    name: &str,
    target: &DnsTarget,
    protocol: AppProtocol,
) -> Arc<Resolution> {
    let key = (name.to_string(), target.clone(), protocol);
    let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(existing) = live.get(&key).and_then(Weak::upgrade) {
        return existing;
    }
    live.retain(|_, weak| weak.strong_count() > 0);
    let counters = Counters::new(state, &target.host);
    let shared = Arc::new(Shared {
        answer: ArcSwap::from_pointee(Answer::default()),
    });
    let task = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => Some(
            runtime
                .spawn(resolve_forever(
                    name.to_string(),
                    target.clone(),
                    protocol,
                    shared.clone(),
                    counters,
                ))
                .abort_handle(),
        ),
        Err(_) => {
            tracing::warn!(
                cluster = name,
                host = target.host,
                "no async runtime: the DNS cluster is not resolved"
            );
            None
        }
    };
    let resolution = Arc::new(Resolution {
        target: target.clone(),
        shared,
        task,
    });
    live.insert(key, Arc::downgrade(&resolution));
    resolution
}

// === Metrics ===

struct Families {
    resolutions: IntCounterVec,
    failures: IntCounterVec,
}

static FAMILIES: LazyLock<Option<Families>> = LazyLock::new(|| {
    let counter = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["host"]);
    Some(Families {
        resolutions: counter(
            "remora_proxy_dns_resolutions_total",
            "Successful DNS resolutions of the hostnames of DNS clusters, by hostname",
        )
        .ok()?,
        failures: counter(
            "remora_proxy_dns_failures_total",
            "Failed DNS resolutions (the last answer is kept), by hostname",
        )
        .ok()?,
    })
});

/// One hostname's counters, resolved once.
#[derive(Clone)]
struct Counters {
    resolutions: Option<IntCounter>,
    failures: Option<IntCounter>,
}

impl Counters {
    fn new(state: &State, host: &str) -> Counters {
        let Some(families) = FAMILIES.as_ref() else {
            return Counters {
                resolutions: None,
                failures: None,
            };
        };
        // Registered with the proxy's registry the first time a DNS
        // cluster appears; later attempts find them there already.
        let registry = state.metrics.registry();
        let _ = registry.register(Box::new(families.resolutions.clone()));
        let _ = registry.register(Box::new(families.failures.clone()));
        Counters {
            resolutions: families
                .resolutions
                .get_metric_with_label_values(&[host])
                .ok(),
            failures: families.failures.get_metric_with_label_values(&[host]).ok(),
        }
    }

    fn resolved(&self) {
        if let Some(c) = &self.resolutions {
            c.inc();
        }
    }

    fn failed(&self) {
        if let Some(c) = &self.failures {
            c.inc();
        }
    }
}

// === The task ===

fn resolver(family: LookupFamily) -> Result<TokioResolver, String> {
    let provider = TokioConnectionProvider::default();
    let mut builder = match server() {
        Some(addr) => {
            let servers = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                provider,
            );
            builder.options_mut().timeout = QUERY_TIMEOUT;
            builder.options_mut().attempts = QUERY_ATTEMPTS;
            builder
        }
        None => TokioResolver::builder(provider).map_err(|e| {
            format!("cannot read the system's DNS configuration (/etc/resolv.conf): {e}")
        })?,
    };
    let options: &mut ResolverOpts = builder.options_mut();
    options.ip_strategy = family.strategy();
    Ok(builder.build())
}

async fn resolve_forever(
    cluster: String,
    target: DnsTarget,
    protocol: AppProtocol,
    shared: Arc<Shared>,
    counters: Counters,
) {
    let resolver = loop {
        match resolver(target.family) {
            Ok(r) => break r,
            Err(e) => {
                counters.failed();
                tracing::warn!(
                    cluster,
                    host = target.host,
                    error = e,
                    "DNS cluster not resolved"
                );
                tokio::time::sleep(MAX_FAILURE_RETRY).await;
            }
        }
    };
    let mut failing = false;
    let mut retry = MIN_FAILURE_RETRY;
    loop {
        let outcome = match resolver.lookup_ip(target.host.as_str()).await {
            Ok(lookup) => {
                let mut addresses: Vec<IpAddr> = Vec::new();
                for ip in lookup.iter() {
                    if !addresses.contains(&ip) {
                        addresses.push(ip);
                    }
                }
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                if addresses.is_empty() {
                    Err("the answer has no address".to_string())
                } else {
                    Ok((addresses, ttl))
                }
            }
            Err(e) => Err(e.to_string()),
        };
        let wait = match outcome {
            Ok((addresses, ttl)) => {
                counters.resolved();
                if failing {
                    tracing::info!(
                        cluster,
                        host = target.host,
                        ?addresses,
                        "DNS resolves again"
                    );
                }
                failing = false;
                retry = MIN_FAILURE_RETRY;
                publish(&shared, &target, protocol, &addresses, &cluster);
                if target.respect_ttl {
                    ttl.clamp(MIN_REFRESH, MAX_REFRESH) + EXPIRY_SLACK
                } else {
                    target.refresh
                }
            }
            Err(error) => {
                counters.failed();
                if failing {
                    tracing::debug!(cluster, host = target.host, error, "DNS still failing");
                } else {
                    let kept = shared.answer.load().members.len();
                    tracing::warn!(
                        cluster,
                        host = target.host,
                        error,
                        kept_addresses = kept,
                        "DNS resolution failed; keeping the last answer and retrying (check \
                         --dns-server or /etc/resolv.conf, and the name)"
                    );
                }
                failing = true;
                let wait = retry;
                retry = (retry * 2).min(MAX_FAILURE_RETRY);
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Publishes an answer, keeping the endpoints (and their pooled
/// connections) of addresses that stay.
fn publish(
    shared: &Shared,
    target: &DnsTarget,
    protocol: AppProtocol,
    addresses: &[IpAddr],
    cluster: &str,
) {
    let take = if target.all_addresses {
        addresses.len()
    } else {
        1
    };
    let wanted: Vec<SocketAddr> = addresses
        .iter()
        .take(take)
        .map(|ip| SocketAddr::new(*ip, target.port))
        .collect();
    let old = shared.answer.load();
    let same = old.members.len() == wanted.len()
        && old
            .members
            .iter()
            .zip(&wanted)
            .all(|(m, a)| m.endpoint.key.app == *a);
    if same {
        return;
    }
    let members: Vec<Member> = wanted
        .iter()
        .map(|addr| {
            let endpoint = old
                .members
                .iter()
                .find(|m| m.endpoint.key.app == *addr)
                .map(|m| m.endpoint.clone())
                .unwrap_or_else(|| new_endpoint(*addr, protocol));
            Member {
                endpoint,
                weight: 1,
            }
        })
        .collect();
    tracing::info!(cluster, host = target.host, addresses = ?wanted, "DNS answer changed");
    shared.answer.store(Arc::new(Answer {
        total_weight: members.len() as u64,
        members,
    }));
}

/// An endpoint outside the mesh: no sidecar, no identity, plaintext.
fn new_endpoint(app: SocketAddr, protocol: AppProtocol) -> Arc<Endpoint> {
    Arc::new(Endpoint {
        key: EndpointKey {
            app,
            proxy: None,
            protocol,
            identity: None,
        },
        outstanding: AtomicUsize::new(0),
        pool: Pool::default(),
        server_name: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(all: bool) -> DnsTarget {
        DnsTarget {
            host: "api.example.test".into(),
            port: 8080,
            family: LookupFamily::V4Only,
            all_addresses: all,
            respect_ttl: true,
            refresh: DEFAULT_REFRESH,
        }
    }

    fn shared() -> Shared {
        Shared {
            answer: ArcSwap::from_pointee(Answer::default()),
        }
    }

    fn ips(list: &[[u8; 4]]) -> Vec<IpAddr> {
        list.iter().map(|o| IpAddr::from(*o)).collect()
    }

    #[test]
    fn an_answer_becomes_members_and_keeps_the_endpoints_of_addresses_that_stay() {
        let s = shared();
        let t = target(true);
        publish(
            &s,
            &t,
            AppProtocol::Http1,
            &ips(&[[127, 0, 0, 2], [127, 0, 0, 3]]),
            "c",
        );
        let first = s.answer.load_full();
        assert_eq!(first.total_weight, 2);
        publish(
            &s,
            &t,
            AppProtocol::Http1,
            &ips(&[[127, 0, 0, 3], [127, 0, 0, 4]]),
            "c",
        );
        let second = s.answer.load_full();
        let apps: Vec<SocketAddr> = second.members.iter().map(|m| m.endpoint.key.app).collect();
        assert_eq!(
            apps,
            [
                "127.0.0.3:8080".parse().expect("literal"),
                "127.0.0.4:8080".parse().expect("literal")
            ]
        );
        assert!(Arc::ptr_eq(
            &first.members[1].endpoint,
            &second.members[0].endpoint
        ));
        assert!(
            second
                .members
                .iter()
                .all(|m| m.endpoint.key.identity.is_none())
        );
    }

    #[test]
    fn logical_dns_keeps_the_first_address_only() {
        let s = shared();
        publish(
            &s,
            &target(false),
            AppProtocol::Http2,
            &ips(&[[10, 0, 0, 1], [10, 0, 0, 2]]),
            "c",
        );
        let answer = s.answer.load();
        assert_eq!(answer.members.len(), 1);
        assert_eq!(answer.members[0].endpoint.key.protocol, AppProtocol::Http2);
    }

    #[test]
    fn a_recompile_gets_the_same_live_resolution() {
        let state = State::new(Arc::new(crate::metrics::Metrics::new()));
        let t = target(true);
        let a = resolution(&state, "outbound|8080||api", &t, AppProtocol::Http1);
        let b = resolution(&state, "outbound|8080||api", &t, AppProtocol::Http1);
        assert!(Arc::ptr_eq(&a, &b));
        let other = DnsTarget {
            port: 8081,
            ..t.clone()
        };
        let c = resolution(&state, "outbound|8080||api", &other, AppProtocol::Http1);
        assert!(!Arc::ptr_eq(&a, &c), "a changed target starts afresh");
        assert!(
            a.answer().members.is_empty(),
            "no runtime here: nothing resolved"
        );
    }
}
