//! The admin listener (default `127.0.0.1:15020`, loopback only): `/metrics`,
//! `/ready`, `/live`, `/config_dump`, `/logging?level=`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::bootstrap::Bootstrap;
use crate::config::ConfigStore;
use crate::metrics::Metrics;
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
}

impl Admin {
    /// Serves HTTP/1.1 on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(&req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => text(StatusCode::OK, self.metrics.render()),
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n".into()),
            (&Method::GET, "/ready") => {
                if self.store.is_ready() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: no complete configuration from the control plane yet\n".into(),
                    )
                }
            }
            (&Method::GET, "/config_dump") => {
                let dump = serde_json::json!({
                    "bootstrap": &self.bootstrap,
                    "listening": &self.listening,
                    "xds": self.xds.snapshot(),
                    "ready": self.store.is_ready(),
                    "config": self.store.load().as_ref(),
                });
                match serde_json::to_string_pretty(&dump) {
                    Ok(body) => {
                        let mut r = text(StatusCode::OK, body);
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static("application/json"),
                        );
                        r
                    }
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                }
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
                        "usage: /logging?level=FILTER (e.g. debug, or remora_proxy=trace)\n".into(),
                    ),
                    Some(level) => match (self.set_log_level)(&level) {
                        Ok(()) => text(StatusCode::OK, format!("log filter is now {level}\n")),
                        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                    },
                }
            }
            (_, "/") => text(
                StatusCode::OK,
                "remora-proxy admin\n  /metrics      Prometheus metrics\n  /ready        200 once a complete config is applied\n  /live         200 while the process runs\n  /config_dump  effective config and xDS versions (JSON)\n  /logging?level=FILTER  change the log filter\n".into(),
            ),
            _ => text(StatusCode::NOT_FOUND, "not found; see /\n".into()),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
