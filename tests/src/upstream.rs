//! Upstream HTTP test servers: each answers every request with 200, the
//! header `x-backend: <name>` and its name as the body, and counts requests.
//! They speak HTTP/1.1 and HTTP/2 (prior knowledge) on `127.0.0.1:0`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The response header naming the server that answered.
pub const BACKEND_HEADER: &str = "x-backend";

/// A running test server; it stops (and closes its connections) on drop.
pub struct HttpServer {
    name: String,
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Starts a server named `name` on `127.0.0.1:0` (on the current tokio
    /// runtime).
    pub async fn start(name: &str) -> Result<HttpServer> {
        HttpServer::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a server named `name` on `addr` (another loopback address,
    /// or a chosen port, for tests where DNS gives only addresses).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Result<HttpServer> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding a test server on {addr}"))?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(listener, name.to_string(), requests.clone()));
        Ok(HttpServer {
            name: name.to_string(),
            addr,
            requests,
            task,
        })
    }

    /// Starts one server per name.
    pub async fn start_all(names: &[&str]) -> Result<Vec<HttpServer>> {
        let mut servers = Vec::with_capacity(names.len());
        for name in names {
            servers.push(HttpServer::start(name).await?);
        }
        Ok(servers)
    }

    /// Its name (the `x-backend` value).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every
        // connection task.
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, name: String, requests: Arc<AtomicU64>) {
    let mut connections = JoinSet::new();
    let name = Bytes::from(name);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        let requests = requests.clone();
        connections.spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                requests.fetch_add(1, Ordering::Relaxed);
                let name = name.clone();
                async move {
                    let value = http::HeaderValue::from_maybe_shared(name.clone());
                    let mut res = Response::new(Full::new(name));
                    if let Ok(value) = value {
                        res.headers_mut().insert(BACKEND_HEADER, value);
                    }
                    Ok::<_, Infallible>(res)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            // Errors here are peers going away; the test sees them as
            // failed requests, not as server trouble.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
}
