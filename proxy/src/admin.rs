//! The admin listener (default `127.0.0.1:15020`, loopback only): `/metrics`,
//! `/ready`, `/live`, `/config_dump`, `/logging?level=`.

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use remora_runtime::{AdminResponse, json_response, metrics_response, text};
use tokio::net::TcpListener;

use crate::bootstrap::Bootstrap;
use crate::config::ConfigStore;
use crate::metrics::Metrics;
use crate::tls::TlsContext;
use crate::xds::XdsStatus;

/// Changes the log filter at runtime; returns an error naming what is wrong.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the admin endpoints read.
pub struct Admin {
    /// Startup settings, shown in `/config_dump`.
    pub bootstrap: Bootstrap,
    /// The addresses actually bound (they differ from the flags with port 0).
    pub listening: serde_json::Value,
    /// The compiled config.
    pub store: Arc<ConfigStore>,
    /// xDS state.
    pub xds: Arc<XdsStatus>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Log level changes.
    pub set_log_level: SetLogLevel,
    /// The mTLS context, once the first certificate arrived; stays empty
    /// when the proxy runs without identity (`identity_expected` false).
    pub tls: Arc<std::sync::OnceLock<Arc<TlsContext>>>,
    /// True when the proxy waits for a workload certificate.
    pub identity_expected: bool,
}

impl Admin {
    /// Serves HTTP/1.1 on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        remora_runtime::serve_admin(
            listener,
            Arc::new(move |req: &Request<Incoming>| self.handle(req)),
        )
        .await;
    }

    fn handle(&self, req: &Request<Incoming>) -> AdminResponse {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => metrics_response(self.metrics.registry()),
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if self.identity_expected && self.tls.get().is_none() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for the workload certificate from the control plane\n",
                    )
                } else if self.store.is_ready() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: no complete configuration from the control plane yet\n",
                    )
                }
            }
            (&Method::GET, "/config_dump") => {
                let dump = serde_json::json!({
                    "bootstrap": &self.bootstrap,
                    "listening": &self.listening,
                    "xds": self.xds.snapshot(),
                    "ready": self.store.is_ready(),
                    "identity": self.tls.get().map(|tls| {
                        let current = tls.resolver().current();
                        serde_json::json!({
                            "spiffe_id": current.id().to_string(),
                            "expires_at": current.expires_at().to_string(),
                            "renew_at": current.renew_at().to_string(),
                            "trust_bundle_roots": tls.root_count(),
                        })
                    }),
                    "config": self.store.load().as_ref(),
                });
                json_response(&dump)
            }
            (&Method::POST | &Method::PUT | &Method::GET, "/logging") => {
                let level = req.uri().query().and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("level="))
                        .map(str::to_string)
                });
                match level {
                    None => text(
                        StatusCode::BAD_REQUEST,
                        "usage: /logging?level=FILTER (e.g. debug, or remora_proxy=trace)\n",
                    ),
                    Some(level) => match (self.set_log_level)(&level) {
                        Ok(()) => text(StatusCode::OK, format!("log filter is now {level}\n")),
                        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                    },
                }
            }
            (_, "/") => text(
                StatusCode::OK,
                "remora-proxy admin\n  /metrics      Prometheus metrics\n  /ready        200 once a complete config is applied\n  /live         200 while the process runs\n  /config_dump  effective config and xDS versions (JSON)\n  /logging?level=FILTER  change the log filter\n",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found; see /\n"),
        }
    }
}
