//! The monitoring listener (default `127.0.0.1:15014`): `/metrics`,
//! `/ready`, `/debug/syncz` and `/debug/trust-bundle`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use remora_runtime::{AdminResponse, json_response, metrics_response, text};
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::xds::status::SyncRegistry;

/// What the monitoring endpoints read.
pub struct Admin {
    metrics: Arc<Metrics>,
    registry: Arc<SyncRegistry>,
    ready: AtomicBool,
    trust_bundle: Option<String>,
}

impl Admin {
    /// Monitoring state; not ready until [`Admin::set_ready`].
    pub fn new(metrics: Arc<Metrics>, registry: Arc<SyncRegistry>) -> Admin {
        Admin {
            metrics,
            registry,
            ready: AtomicBool::new(false),
            trust_bundle: None,
        }
    }

    /// Serves `pem` (the CA's trust bundle, public data) at
    /// `/debug/trust-bundle`.
    pub fn with_trust_bundle(mut self, pem: String) -> Admin {
        self.trust_bundle = Some(pem);
        self
    }

    /// Marks the control plane as serving.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Serves HTTP/1.1 on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        remora_runtime::serve_admin(
            listener,
            Arc::new(move |req: &Request<Incoming>| self.handle(req)),
        )
        .await;
    }

    fn handle(&self, req: &Request<Incoming>) -> AdminResponse {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match req.uri().path() {
            "/metrics" => metrics_response(self.metrics.registry()),
            "/ready" => {
                if self.ready.load(Ordering::Acquire) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                }
            }
            "/debug/syncz" => json_response(&self.registry.snapshot()),
            "/debug/trust-bundle" => match &self.trust_bundle {
                Some(pem) => {
                    let mut response = text(StatusCode::OK, pem.clone());
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/x-pem-file"),
                    );
                    response
                }
                None => text(StatusCode::NOT_FOUND, "no CA configured\n"),
            },
            "/" => text(
                StatusCode::OK,
                "remora-control-plane monitoring\n  /metrics      Prometheus metrics\n  /ready        200 once serving\n  /debug/syncz  per-client xDS sync status (JSON)\n  /debug/trust-bundle  the CA's trust bundle (PEM)\n",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found; see /\n"),
        }
    }
}
