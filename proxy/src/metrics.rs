//! The proxy's Prometheus metrics.
//!
//! Families are registered once. Per-route handles ([`RouteMetrics`]) are
//! resolved when config is compiled, so the data path never looks a metric
//! up by label, except for the response code, whose handles are cached per
//! route in a lock-free map that only grows on a code never seen before.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arc_swap::ArcSwap;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Which side of the proxy a request or connection is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the local application to the mesh.
    Outbound,
    /// From the mesh to the local application.
    Inbound,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Distinct server names `remora_proxy_tls_passthrough_total` labels.
pub const MAX_SNI_SERIES: usize = 256;

/// Latency buckets in seconds, fine enough below a millisecond.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Every metric family the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    retries: IntCounterVec,
    budget_exhausted: IntCounterVec,
    timeouts: IntCounterVec,
    /// Requests in flight, by direction.
    pub in_flight: IntGaugeVec,
    /// TCP connections accepted, by direction.
    pub tcp_connections: IntCounterVec,
    /// TCP connections open, by direction.
    pub tcp_open: IntGaugeVec,
    /// Bytes received from downstream, by direction.
    pub tcp_read_bytes: IntCounterVec,
    /// Bytes sent to downstream, by direction.
    pub tcp_write_bytes: IntCounterVec,
    /// Errors the proxy itself answered, by direction and reason.
    pub proxy_errors: IntCounterVec,
    /// 1 while the xDS stream is up.
    pub xds_connected: IntGauge,
    /// Applied version per type, as a label on a gauge set to 1.
    pub xds_version: IntGaugeVec,
    /// Unix time of the last applied update, per type.
    pub xds_last_update: IntGaugeVec,
    /// Responses rejected, per type.
    pub xds_nacks: IntCounterVec,
    /// Reconnects to the control plane.
    pub xds_reconnects: IntCounter,
    /// Seconds until the workload certificate expires, computed when scraped.
    pub certificate_expiry: CertificateExpiry,
    /// Certificates obtained from the CA (the first one included).
    pub certificate_renewals: IntCounter,
    /// Failed requests for a certificate, by reason.
    pub certificate_renewal_failures: IntCounterVec,
    /// mTLS handshakes completed, by direction.
    pub tls_handshakes: IntCounterVec,
    /// Intercepted connections, by direction, destination service (or
    /// `passthrough`, `blocked`, `loop`) and detected protocol.
    pub intercepted: IntCounterVec,
    /// Time protocol detection waited, by direction and outcome.
    pub detection: HistogramVec,
    /// Opaque TCP bytes, by direction, service and way (`sent` to the
    /// destination, `received` from it).
    pub tcp_service_bytes: IntCounterVec,
    /// TLS from applications passed through, by server name (SNI).
    tls_passthrough: IntCounterVec,
    /// Server names already given a `tls_passthrough` series: bounded, so
    /// whatever names applications use, the series stay few.
    sni_seen: std::sync::Mutex<std::collections::HashSet<String>>,
    /// mTLS handshakes failed (and plaintext refused), by direction and reason.
    pub tls_handshake_failures: IntCounterVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only static definitions reach here; a failure is a programming error
    // caught by the first test that builds `Metrics`.
    r.expect("static metric definition")
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let route_labels = ["direction", "service", "route"];
        let duration = must(HistogramVec::new(
            HistogramOpts::new(
                "remora_proxy_request_duration_seconds",
                "Time from request headers to response headers",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &route_labels,
        ));
        must(registry.register(Box::new(duration.clone())));
        let xds_connected = must(IntGauge::new(
            "remora_proxy_xds_connected",
            "1 while the xDS stream to the control plane is up",
        ));
        must(registry.register(Box::new(xds_connected.clone())));
        let xds_reconnects = must(IntCounter::new(
            "remora_proxy_xds_reconnects_total",
            "Connections to the control plane after the first",
        ));
        must(registry.register(Box::new(xds_reconnects.clone())));
        let certificate_expiry = CertificateExpiry::new();
        must(registry.register(Box::new(certificate_expiry.clone())));
        let certificate_renewals = must(IntCounter::new(
            "remora_proxy_certificate_renewals_total",
            "Workload certificates obtained from the CA, the first one included",
        ));
        must(registry.register(Box::new(certificate_renewals.clone())));
        Metrics {
            requests: counter(
                "remora_proxy_requests_total",
                "Requests by direction, service, route, response code, gRPC status and, \
                 inbound over mTLS, the caller's SPIFFE ID",
                &[
                    "direction",
                    "service",
                    "route",
                    "code",
                    "grpc_status",
                    "source_identity",
                ],
            ),
            duration,
            retries: counter("remora_proxy_retries_total", "Retries sent", &route_labels),
            budget_exhausted: counter(
                "remora_proxy_retry_budget_exhausted_total",
                "Retries not sent because the route's retry budget was spent",
                &route_labels,
            ),
            timeouts: counter(
                "remora_proxy_timeouts_total",
                "Requests or tries that timed out",
                &["direction", "service", "route", "kind"],
            ),
            in_flight: gauge(
                "remora_proxy_requests_in_flight",
                "Requests in flight",
                &["direction"],
            ),
            tcp_connections: counter(
                "remora_proxy_tcp_connections_total",
                "TCP connections accepted",
                &["direction"],
            ),
            tcp_open: gauge(
                "remora_proxy_tcp_connections_open",
                "TCP connections open",
                &["direction"],
            ),
            tcp_read_bytes: counter(
                "remora_proxy_tcp_read_bytes_total",
                "Bytes received from downstream connections",
                &["direction"],
            ),
            tcp_write_bytes: counter(
                "remora_proxy_tcp_write_bytes_total",
                "Bytes sent to downstream connections",
                &["direction"],
            ),
            proxy_errors: counter(
                "remora_proxy_errors_total",
                "Responses the proxy produced itself, by reason (the x-remora-error value)",
                &["direction", "reason"],
            ),
            xds_connected,
            xds_version: gauge(
                "remora_proxy_xds_applied_version",
                "Applied xDS version per type (value 1, version in the label)",
                &["type", "version"],
            ),
            xds_last_update: gauge(
                "remora_proxy_xds_last_update_timestamp_seconds",
                "Unix time of the last applied update per type; staleness is now minus this",
                &["type"],
            ),
            xds_nacks: counter(
                "remora_proxy_xds_nacks_total",
                "xDS responses the proxy rejected",
                &["type"],
            ),
            xds_reconnects,
            certificate_expiry,
            certificate_renewals,
            certificate_renewal_failures: counter(
                "remora_proxy_certificate_renewal_failures_total",
                "Failed requests for a workload certificate, by reason",
                &["reason"],
            ),
            intercepted: counter(
                "remora_proxy_intercepted_connections_total",
                "Intercepted connections by direction, destination service (passthrough, \
                 blocked or loop when not a mesh service) and detected protocol",
                &["direction", "service", "protocol"],
            ),
            detection: {
                let h = must(HistogramVec::new(
                    HistogramOpts::new(
                        "remora_proxy_protocol_detection_seconds",
                        "Time protocol detection waited for a connection's first bytes",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["direction", "protocol"],
                ));
                must(registry.register(Box::new(h.clone())));
                h
            },
            tcp_service_bytes: counter(
                "remora_proxy_tcp_service_bytes_total",
                "Opaque TCP bytes by direction, service and way (sent to the destination, \
                 received from it)",
                &["direction", "service", "way"],
            ),
            sni_seen: std::sync::Mutex::default(),
            tls_passthrough: counter(
                "remora_proxy_tls_passthrough_total",
                "TLS connections from applications passed through untouched, by server name",
                &["sni"],
            ),
            tls_handshakes: counter(
                "remora_proxy_tls_handshakes_total",
                "mTLS handshakes completed, by direction (inbound: as server)",
                &["direction"],
            ),
            tls_handshake_failures: counter(
                "remora_proxy_tls_handshake_failures_total",
                "mTLS handshakes failed, and plaintext connections refused on STRICT ports, \
                 by direction and reason",
                &["direction", "reason"],
            ),
            registry,
        }
    }

    /// Counts a TLS connection passed through for server name `sni`
    /// (empty without SNI). After [`MAX_SNI_SERIES`] distinct names, new
    /// ones are counted as `other`.
    pub fn count_tls_passthrough(&self, sni: &str) {
        let label = {
            let mut seen = self
                .sni_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.contains(sni) || seen.len() < MAX_SNI_SERIES && seen.insert(sni.to_owned()) {
                sni
            } else {
                "other"
            }
        };
        self.tls_passthrough.with_label_values(&[label]).inc();
    }

    /// Handles for one route, resolved once per compiled config.
    pub fn route(&self, direction: Direction, service: &str, route: &str) -> RouteMetrics {
        self.route_from(direction, service, route, "")
    }

    /// Handles for one route as seen from one caller identity (`source`,
    /// a SPIFFE ID, or empty when unknown): inbound, resolved once per
    /// connection.
    pub fn route_from(
        &self,
        direction: Direction,
        service: &str,
        route: &str,
        source: &str,
    ) -> RouteMetrics {
        let labels = [direction.as_str(), service, route];
        RouteMetrics {
            labels: Arc::new(RouteLabels {
                direction: direction.as_str(),
                service: service.to_string(),
                route: route.to_string(),
                source: source.to_string(),
            }),
            requests: self.requests.clone(),
            codes: Arc::new(ArcSwap::default()),
            duration: self.duration.with_label_values(&labels),
            retries: self.retries.with_label_values(&labels),
            budget_exhausted: self.budget_exhausted.with_label_values(&labels),
            timeouts: self.timeouts.clone(),
        }
    }

    /// The registry every family is in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// `remora_proxy_certificate_expiry_seconds`: seconds until the current
/// workload certificate expires (negative once it has), computed at each
/// scrape. Absent until a certificate has been obtained.
#[derive(Debug, Clone)]
pub struct CertificateExpiry {
    gauge: Gauge,
    /// `notAfter` as Unix seconds; `i64::MIN` while there is none.
    expires_at: Arc<AtomicI64>,
}

impl CertificateExpiry {
    fn new() -> Self {
        Self {
            gauge: must(Gauge::new(
                "remora_proxy_certificate_expiry_seconds",
                "Seconds until the workload certificate expires",
            )),
            expires_at: Arc::new(AtomicI64::new(i64::MIN)),
        }
    }

    /// Records the `notAfter` of the certificate now in use.
    pub fn set_expires_at(&self, expires_at: time::OffsetDateTime) {
        self.expires_at
            .store(expires_at.unix_timestamp(), Ordering::Relaxed);
    }

    /// Seconds until expiry, if there is a certificate.
    pub fn seconds_left(&self) -> Option<f64> {
        let at = self.expires_at.load(Ordering::Relaxed);
        if at == i64::MIN {
            return None;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Some(at as f64 - now)
    }
}

impl Collector for CertificateExpiry {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match self.seconds_left() {
            Some(left) => {
                self.gauge.set(left);
                self.gauge.collect()
            }
            None => Vec::new(),
        }
    }
}

#[derive(Debug)]
struct RouteLabels {
    direction: &'static str,
    service: String,
    route: String,
    source: String,
}

/// Per-route metric handles.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    labels: Arc<RouteLabels>,
    requests: IntCounterVec,
    /// (status code, gRPC status or -1) -> counter; grows only.
    codes: Arc<ArcSwap<HashMap<(u16, i32), IntCounter>>>,
    /// Request duration.
    pub duration: Histogram,
    /// Retries sent.
    pub retries: IntCounter,
    /// Retries refused by the budget.
    pub budget_exhausted: IntCounter,
    timeouts: IntCounterVec,
}

impl RouteMetrics {
    /// Counts a finished request.
    pub fn count(&self, status: u16, grpc_status: Option<u32>) {
        let key = (status, grpc_status.map_or(-1, |g| g as i32));
        if let Some(counter) = self.codes.load().get(&key) {
            counter.inc();
            return;
        }
        let grpc_label = grpc_status.map(|g| g.to_string()).unwrap_or_default();
        let counter = self.requests.with_label_values(&[
            self.labels.direction,
            &self.labels.service,
            &self.labels.route,
            &status.to_string(),
            &grpc_label,
            &self.labels.source,
        ]);
        counter.inc();
        self.codes.rcu(|codes| {
            let mut codes = HashMap::clone(codes);
            codes.insert(key, counter.clone());
            codes
        });
    }

    /// Counts a timeout of `kind` (`route`, `per_try`, `connect`, `idle`).
    pub fn timeout(&self, kind: &str) {
        self.timeouts
            .with_label_values(&[
                self.labels.direction,
                &self.labels.service,
                &self.labels.route,
                kind,
            ])
            .inc();
    }
}

impl Default for RouteMetrics {
    /// Handles registered nowhere, for tests of other modules.
    fn default() -> Self {
        Metrics::new().route(Direction::Outbound, "", "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_of_passed_through_tls_are_bounded() {
        let metrics = Metrics::new();
        for i in 0..MAX_SNI_SERIES + 50 {
            metrics.count_tls_passthrough(&format!("host-{i}.example.test"));
        }
        metrics.count_tls_passthrough("host-0.example.test");
        let families = metrics.registry().gather();
        let family = families
            .iter()
            .find(|f| f.name() == "remora_proxy_tls_passthrough_total")
            .expect("the family");
        assert_eq!(
            family.get_metric().len(),
            MAX_SNI_SERIES + 1,
            "the names and `other`"
        );
        let count = |label: &str| {
            family
                .get_metric()
                .iter()
                .find(|m| m.get_label()[0].value() == label)
                .map(|m| m.get_counter().get_value())
        };
        assert_eq!(count("other"), Some(50.0));
        assert_eq!(count("host-0.example.test"), Some(2.0));
    }
}
