//! The control plane's Prometheus metrics, registered once at startup.
//!
//! Handles are created here and cloned where they are used, so nothing looks
//! a metric up by name on a hot path.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::model::Mesh;

/// Every metric the control plane exports.
pub struct Metrics {
    registry: Registry,
    /// Connected xDS clients by kind (`envoy`, `grpc`, `remora`) and API
    /// (`sotw`, `delta`).
    pub xds_clients: IntGaugeVec,
    /// Responses sent, by type (`LDS`, `RDS`, `CDS`, `EDS`).
    pub xds_pushes: IntCounterVec,
    /// Time from a model change to the response being queued on a stream.
    pub xds_push_duration: Histogram,
    /// NACKs received, by type.
    pub xds_nacks: IntCounterVec,
    /// Valid updates accepted from a source (`file`, `kubernetes`).
    pub config_reloads: IntCounterVec,
    /// Updates refused by validation, by source.
    pub config_reload_failures: IntCounterVec,
    /// Services in the served model.
    pub mesh_services: IntGauge,
    /// Endpoints in the served model.
    pub mesh_endpoints: IntGauge,
    /// Workload certificates issued by the CA's signing API.
    pub ca_certificates_issued: IntCounter,
    /// Signing requests refused, by reason (see
    /// [`crate::ca::service::RefusalReason`]).
    pub ca_certificates_refused: IntCounterVec,
    /// TLS handshakes on the TLS listener that failed or timed out.
    pub tls_handshake_failures: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            xds_clients: IntGaugeVec::new(
                Opts::new("remora_xds_connected_clients", "Connected xDS clients"),
                &["kind", "api"],
            )
            .expect("static metric definition"),
            xds_pushes: IntCounterVec::new(
                Opts::new("remora_xds_pushes_total", "xDS responses sent"),
                &["type"],
            )
            .expect("static metric definition"),
            xds_push_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "remora_xds_push_duration_seconds",
                    "Time from a mesh change to the response being queued for a client",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )
            .expect("static metric definition"),
            xds_nacks: IntCounterVec::new(
                Opts::new("remora_xds_nacks_total", "xDS NACKs received from clients"),
                &["type"],
            )
            .expect("static metric definition"),
            config_reloads: IntCounterVec::new(
                Opts::new("remora_config_reloads_total", "Valid mesh updates accepted"),
                &["source"],
            )
            .expect("static metric definition"),
            config_reload_failures: IntCounterVec::new(
                Opts::new(
                    "remora_config_reload_failures_total",
                    "Mesh updates refused by validation; the last good mesh keeps serving",
                ),
                &["source"],
            )
            .expect("static metric definition"),
            mesh_services: IntGauge::new("remora_mesh_services", "Services in the served mesh")
                .expect("static metric definition"),
            mesh_endpoints: IntGauge::new("remora_mesh_endpoints", "Endpoints in the served mesh")
                .expect("static metric definition"),
            ca_certificates_issued: IntCounter::new(
                "remora_ca_certificates_issued_total",
                "Workload certificates issued by the certificate-signing API",
            )
            .expect("static metric definition"),
            ca_certificates_refused: IntCounterVec::new(
                Opts::new(
                    "remora_ca_certificates_refused_total",
                    "Certificate signing requests refused, by reason",
                ),
                &["reason"],
            )
            .expect("static metric definition"),
            tls_handshake_failures: IntCounter::new(
                "remora_tls_handshake_failures_total",
                "TLS handshakes on the TLS listener that failed or timed out",
            )
            .expect("static metric definition"),
            registry,
        };
        // Registration fails only for duplicate names, which the definitions
        // above rule out.
        let collectors: [Box<dyn prometheus::core::Collector>; 11] = [
            Box::new(m.xds_clients.clone()),
            Box::new(m.xds_pushes.clone()),
            Box::new(m.xds_push_duration.clone()),
            Box::new(m.xds_nacks.clone()),
            Box::new(m.config_reloads.clone()),
            Box::new(m.config_reload_failures.clone()),
            Box::new(m.mesh_services.clone()),
            Box::new(m.mesh_endpoints.clone()),
            Box::new(m.ca_certificates_issued.clone()),
            Box::new(m.ca_certificates_refused.clone()),
            Box::new(m.tls_handshake_failures.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// Updates the gauges that describe the served model.
    pub fn record_mesh(&self, mesh: &Mesh) {
        let services = mesh.services();
        self.mesh_services.set(services.len() as i64);
        self.mesh_endpoints
            .set(services.iter().map(|s| s.endpoints.len() as i64).sum());
    }

    /// The registry every metric is in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
