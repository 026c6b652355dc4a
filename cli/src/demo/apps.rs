//! The demo's applications: small HTTP servers in this process, each on
//! `127.0.0.1:0`, each behind its own sidecar.
//!
//! - `frontend`: the client side of the demo (the traffic is sent on its
//!   behalf, through its sidecar); it also answers 200 so its sidecar has an
//!   application behind its inbound listener like any other.
//! - `catalog` v1: answers 200 naming itself after 1 to 4 ms.
//! - `catalog` v2: answers 200 naming itself after 3 to 12 ms, except for
//!   [`FLAKY_RATIO`] of requests, answered 503 at once, so the table shows
//!   what retries hide.
//!
//! Every response carries `x-backend: <app>`, which is how `frontend` tells
//! who answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Share of requests `catalog` v2 answers with 503.
pub(crate) const FLAKY_RATIO: f64 = 0.3;

/// The response header naming the application that answered.
pub(crate) const BACKEND_HEADER: &str = "x-backend";

/// A running demo application; stops when dropped.
pub(crate) struct App {
    /// Where it listens (its sidecar's `--app-addr`).
    pub(crate) addr: SocketAddr,
    behaviour: Arc<Behaviour>,
    task: JoinHandle<()>,
}

struct Behaviour {
    /// `frontend`, `catalog-v1`...
    name: String,
    fail_ratio: f64,
    /// Milliseconds of work before answering, uniform in this range.
    latency_ms: (u64, u64),
    served: AtomicU64,
    failed: AtomicU64,
}

impl App {
    /// The `frontend` application.
    pub(crate) async fn frontend() -> Result<App> {
        App::start(Behaviour::new("frontend".into(), 0.0, (0, 0))).await
    }

    /// `catalog` at `version`, failing `fail_ratio` of requests with 503.
    pub(crate) async fn catalog(version: &str, fail_ratio: f64) -> Result<App> {
        let latency = if fail_ratio > 0.0 { (3, 12) } else { (1, 4) };
        App::start(Behaviour::new(
            format!("catalog-{version}"),
            fail_ratio,
            latency,
        ))
        .await
    }

    async fn start(behaviour: Behaviour) -> Result<App> {
        let listener = TcpListener::bind("127.0.0.1:0").await.with_context(|| {
            format!(
                "cannot listen on 127.0.0.1:0 for the demo's {}",
                behaviour.name
            )
        })?;
        let addr = listener
            .local_addr()
            .with_context(|| format!("cannot read the address of the demo's {}", behaviour.name))?;
        let behaviour = Arc::new(behaviour);
        let task = tokio::spawn(serve(listener, behaviour.clone()));
        Ok(App {
            addr,
            behaviour,
            task,
        })
    }

    /// Requests answered, and of those answered 503 on purpose.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.behaviour.served.load(Ordering::Relaxed),
            self.behaviour.failed.load(Ordering::Relaxed),
        )
    }

    /// A remark for the header, e.g. that it fails on purpose.
    pub(crate) fn describe(&self) -> String {
        if self.behaviour.fail_ratio > 0.0 {
            format!(" fails {:.0}% with 503", self.behaviour.fail_ratio * 100.0)
        } else {
            String::new()
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Behaviour {
    fn new(name: String, fail_ratio: f64, latency_ms: (u64, u64)) -> Behaviour {
        Behaviour {
            name,
            fail_ratio,
            latency_ms,
            served: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        self.served.fetch_add(1, Ordering::Relaxed);
        let (status, body) = if fastrand::f64() < self.fail_ratio {
            self.failed.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{}: failing on purpose (the demo's flaky version)\n",
                    self.name
                ),
            )
        } else {
            let (low, high) = self.latency_ms;
            if high > 0 {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(low..=high))).await;
            }
            (
                StatusCode::OK,
                format!(
                    "{}: {} {}\n",
                    self.name,
                    request.method(),
                    request.uri().path()
                ),
            )
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = http::HeaderValue::from_str(&self.name) {
            response.headers_mut().insert(BACKEND_HEADER, value);
        }
        response
    }
}

/// Accepts until the task is aborted; HTTP/1.1 or HTTP/2, whatever the
/// sidecar speaks.
async fn serve(listener: TcpListener, behaviour: Arc<Behaviour>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors, say: try again shortly.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let behaviour = behaviour.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let behaviour = behaviour.clone();
                async move { Ok::<_, Infallible>(behaviour.answer(request).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
