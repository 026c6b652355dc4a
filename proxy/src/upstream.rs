//! Connections to endpoints: one pool per endpoint.
//!
//! Our own small pool instead of hyper-util's pooled client, because the
//! mesh needs what that client cannot give: the connection goes to the
//! endpoint (or its sidecar) while the request keeps the authority the
//! application used; connect timeouts and failures must be told apart for
//! retries and `x-remora-error`; and mTLS verifies each endpoint's own
//! identity ([`Security`]). HTTP/2 uses one multiplexed connection per
//! endpoint, so mTLS costs one handshake per endpoint, not per request;
//! HTTP/1.1 keeps idle keep-alive connections and returns a connection to
//! the pool once its response is done; its client side is our own
//! (`upstream/http1.rs` says why).

mod http1;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::either::Either;

use crate::errors::ProxyError;
use crate::tls::{Alpn, TlsContext};
use crate::workers;

/// Errors a body may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type the proxy sends and returns.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A response body as it comes from an endpoint.
#[derive(Debug)]
pub enum ResponseBody {
    /// From hyper: HTTP/2, and HTTP/1.1 upgrades.
    Hyper(Incoming),
    /// From our HTTP/1.1 client.
    Http1(http1::ResponseBody),
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ResponseBody::Http1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Hyper(b) => b.is_end_stream(),
            ResponseBody::Http1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ResponseBody::Hyper(b) => b.size_hint(),
            ResponseBody::Http1(b) => b.size_hint(),
        }
    }
}

/// How long an idle HTTP/1.1 connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per endpoint. HTTP/1.1 needs a
/// connection per concurrent request, so this must exceed the concurrency
/// an endpoint sees, or every request over it opens and closes a connection
/// (64 made a quarter of the requests at 128 concurrent streams open one).
/// Envoy's default connection limit per cluster is 1024.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;
/// HTTP/2 flow-control windows of our connections to endpoints: what a
/// peer may send before we have passed it on, so also what a slow reader
/// can make us hold per connection. 1 MiB per connection covers about
/// 8 Gbit/s at 1 ms round trip. With 4 MiB (and 1 MiB per stream) the
/// client sidecar held 2 MiB more during the 1 MiB-response benchmark
/// and moved no more bytes (A/B, two rounds: 660-688 MiB/s with 4 MiB,
/// 682-713 MiB/s with 1 MiB).
const H2_STREAM_WINDOW: u32 = 512 << 10;
const H2_CONNECTION_WINDOW: u32 = 1 << 20;

/// [`H2_CONNECTION_WINDOW`] shared by the workers: each has its own
/// connection to a peer, so with two workers a sidecar could otherwise hold
/// twice as much of a fast peer's data (lab A/B, default threads, two
/// rounds: client sidecar peak during 1 MiB responses 13.6-13.9 -> 12.6-12.9
/// MiB, 710-781 vs 671-785 MiB/s).
fn connection_window() -> u32 {
    let workers = u32::try_from(workers::count()).unwrap_or(u32::MAX);
    (H2_CONNECTION_WINDOW / workers.max(1)).max(H2_STREAM_WINDOW)
}
/// The most hyper's HTTP/1.1 client buffers for an upgrade's request and
/// response (its default is about 400 KiB).
const H1_MAX_BUF: usize = 128 << 10;

/// Connection settings shared by clusters with the same connect timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clients {
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
}

impl Clients {
    /// Settings with `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Clients {
        Clients { connect_timeout }
    }
}

/// The wire protocol of one hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// How connections to an endpoint are secured.
#[derive(Debug, Clone, Copy)]
pub enum Security<'a> {
    /// Plaintext: the local application, or an endpoint without a sidecar.
    Plaintext,
    /// mTLS to the endpoint's sidecar, which must prove the identity
    /// `server_name` encodes (see [`crate::tls::server_name_for`]).
    Mtls {
        /// Our credentials and trust bundle.
        tls: &'a TlsContext,
        /// The expected identity.
        server_name: &'a ServerName<'static>,
    },
}

/// Connections to one endpoint address: a set per worker thread (see
/// `workers.rs`), so a request only ever uses connections driven by its
/// own thread.
#[derive(Debug, Clone)]
pub struct Pool {
    slots: Arc<[Arc<PoolInner>]>,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool {
            slots: (0..workers::count()).map(|_| Arc::default()).collect(),
        }
    }
}

#[derive(Debug, Default)]
struct PoolInner {
    h2: Mutex<H2Slot>,
    /// Idle connections, the most recently used at the back (reused
    /// first, so a burst's extra connections age out at the front).
    h1: Mutex<VecDeque<(http1::Connection, Instant)>>,
}

/// The endpoint's HTTP/2 connection.
#[derive(Debug, Default)]
struct H2Slot {
    sender: Option<http2::SendRequest<Body>>,
    /// Set while a request opens the connection: requests arriving
    /// meanwhile wait for it instead of each opening one (a burst at
    /// startup, or after the connection closed, would otherwise cost a TLS
    /// handshake per request and keep only the last connection).
    connecting: Option<watch::Receiver<()>>,
}

/// Held while opening the HTTP/2 connection; dropped (done, failed or
/// cancelled), it clears [`H2Slot::connecting`] and wakes the waiters.
struct Connecting<'a> {
    pool: &'a PoolInner,
    waiters: watch::Receiver<()>,
    _wake: watch::Sender<()>,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        let mut slot = lock(&self.pool.h2);
        if slot
            .connecting
            .as_ref()
            .is_some_and(|rx| rx.same_channel(&self.waiters))
        {
            slot.connecting = None;
        }
    }
}

impl Pool {
    /// Sends `request` to `addr` over `hop`, opening a connection if none
    /// is free. The request must be in the form the hop needs (see
    /// [`request`]).
    pub async fn send(
        &self,
        addr: SocketAddr,
        hop: Hop,
        security: Security<'_>,
        connect_timeout: Duration,
        request: Request<Body>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        match hop {
            Hop::Http2 => Ok(self
                .send_h2(addr, security, connect_timeout, request)
                .await?
                .map(ResponseBody::Hyper)),
            Hop::Http1 => self.send_h1(addr, security, connect_timeout, request).await,
        }
    }

    async fn send_h2(
        &self,
        addr: SocketAddr,
        security: Security<'_>,
        connect_timeout: Duration,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut request = request;
        // At most one reconnect: a pooled connection may have closed just
        // before we used it, and then the request was not sent at all.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut sender = self.h2_sender(addr, security, connect_timeout).await?;
            if let Err(source) = sender.ready().await {
                lock(&self.slot().h2).sender.take();
                if attempt == 1 {
                    continue;
                }
                return Err(ProxyError::Reset {
                    addr,
                    source: source.into(),
                });
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if attempt == 1 => {
                        lock(&self.slot().h2).sender.take();
                        request = unsent;
                    }
                    _ => {
                        return Err(ProxyError::Reset {
                            addr,
                            source: e.into_error().into(),
                        });
                    }
                },
            }
        }
    }

    /// The endpoint's HTTP/2 connection, opened if there is none. While one
    /// request opens it, the others wait for it; if that fails, each then
    /// tries on its own (so a dead endpoint costs each request one connect
    /// timeout at most twice, never a queue of them).
    async fn h2_sender(
        &self,
        addr: SocketAddr,
        security: Security<'_>,
        connect_timeout: Duration,
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        let mut waited = false;
        loop {
            // Decided under the lock, acted on after it.
            let step = {
                let mut slot = lock(&self.slot().h2);
                if let Some(sender) = slot.sender.as_ref().filter(|s| !s.is_closed()) {
                    return Ok(sender.clone());
                }
                match &slot.connecting {
                    Some(connecting) if !waited => Err(connecting.clone()),
                    _ => {
                        let (wake, waiters) = watch::channel(());
                        slot.connecting = Some(waiters.clone());
                        Ok(Connecting {
                            pool: self.slot(),
                            waiters,
                            _wake: wake,
                        })
                    }
                }
            };
            match step {
                Ok(connecting) => {
                    // Boxed: the connect and TLS handshake futures are
                    // large, and inline they would make every request's
                    // future (spawned per request) as large.
                    let sender = Box::pin(connect_h2(addr, security, connect_timeout)).await?;
                    lock(&self.slot().h2).sender = Some(sender.clone());
                    drop(connecting);
                    return Ok(sender);
                }
                // Woken when the connecting request is done, whatever
                // became of it (its sender dropped).
                Err(mut wait) => {
                    let _ = wait.changed().await;
                    waited = true;
                }
            }
        }
    }

    async fn send_h1(
        &self,
        addr: SocketAddr,
        security: Security<'_>,
        connect_timeout: Duration,
        request: Request<Body>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let mut request = request;
        loop {
            let (conn, reused) = match self.idle_h1() {
                Some(conn) => (conn, true),
                // Boxed, as in `send_h2`.
                None => (
                    Box::pin(connect_h1(addr, security, connect_timeout)).await?,
                    false,
                ),
            };
            match http1::send(conn, request, reused, self.slot()).await {
                Ok(response) => return Ok(response.map(ResponseBody::Http1)),
                // A kept-alive connection the server had closed: the
                // others idle as long may be closed too (the server
                // restarted); send on a new one.
                Err(http1::Failure::Stale(unsent)) => {
                    lock(&self.slot().h1).clear();
                    request = *unsent;
                }
                Err(http1::Failure::Error(e)) => {
                    return Err(ProxyError::Reset {
                        addr,
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// The calling worker's connections.
    fn slot(&self) -> &Arc<PoolInner> {
        &self.slots[workers::index() % self.slots.len()]
    }

    /// The most recently used idle connection still open.
    fn idle_h1(&self) -> Option<http1::Connection> {
        let mut idle = lock(&self.slot().h1);
        while let Some((mut conn, since)) = idle.pop_back() {
            if since.elapsed() < IDLE_TIMEOUT && conn.is_open() {
                return Some(conn);
            }
        }
        None
    }
}

impl PoolInner {
    /// Puts a connection back once its response has been read.
    fn recycle_h1(&self, conn: http1::Connection) {
        let now = Instant::now();
        let mut idle = lock(&self.h1);
        // Close what has idled too long or was closed by the server, oldest
        // first, so unused connections do not outlive the idle timeout (or
        // the server's) for want of a burst.
        while idle.front_mut().is_some_and(|(conn, since)| {
            now.duration_since(*since) >= IDLE_TIMEOUT || !conn.is_open()
        }) {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push_back((conn, now));
        }
    }
}

/// Sends an HTTP/1.1 upgrade request (WebSocket) on a connection of its
/// own; the caller takes the upgraded stream from the response.
pub async fn send_upgrade(
    addr: SocketAddr,
    security: Security<'_>,
    connect_timeout: Duration,
    request: Request<Body>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let tcp = connect(addr, connect_timeout).await?;
    let mut sender = match security {
        Security::Plaintext => handshake_upgrade(addr, TokioIo::new(tcp)).await?,
        Security::Mtls { tls, server_name } => {
            let stream = tls
                .connect(tcp, server_name.clone(), Alpn::Http11, connect_timeout)
                .await
                .map_err(|source| ProxyError::Tls { addr, source })?;
            handshake_upgrade(addr, TokioIo::new(stream)).await?
        }
    };
    let response = sender
        .send_request(request)
        .await
        .map_err(|source| ProxyError::Reset {
            addr,
            source: source.into(),
        })?;
    Ok(response.map(ResponseBody::Hyper))
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => return Err(ProxyError::Connect { addr, source }),
        Err(_) => return Err(ProxyError::ConnectTimeout { addr, timeout }),
    };
    // Latency over throughput for small requests; a failure only costs
    // batching, so it is not an error.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn connect_h2(
    addr: SocketAddr,
    security: Security<'_>,
    timeout: Duration,
) -> Result<http2::SendRequest<Body>, ProxyError> {
    let tcp = connect(addr, timeout).await?;
    match security {
        Security::Plaintext => handshake_h2(addr, TokioIo::new(tcp)).await,
        Security::Mtls { tls, server_name } => {
            let stream = tls
                .connect(tcp, server_name.clone(), Alpn::H2, timeout)
                .await
                .map_err(|source| ProxyError::Tls { addr, source })?;
            // Boxed: hyper spawns a task per request whose size is that of
            // its largest kind, the connection's own, which holds the IO
            // inline; with the TLS session inline each request's task was
            // 2.7 KB instead of 1.7 KB, allocated and copied per request.
            handshake_h2(addr, TokioIo::new(Box::new(stream))).await
        }
    }
}

async fn handshake_h2<I>(addr: SocketAddr, io: I) -> Result<http2::SendRequest<Body>, ProxyError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(connection_window())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_header_list_size(64 << 10)
        .handshake(io)
        .await
        .map_err(|source| ProxyError::Reset {
            addr,
            source: source.into(),
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%addr, error = %e, "HTTP/2 connection closed");
        }
    });
    Ok(sender)
}

async fn connect_h1(
    addr: SocketAddr,
    security: Security<'_>,
    timeout: Duration,
) -> Result<http1::Connection, ProxyError> {
    let tcp = connect(addr, timeout).await?;
    let io = match security {
        Security::Plaintext => Either::Left(tcp),
        Security::Mtls { tls, server_name } => {
            let stream = tls
                .connect(tcp, server_name.clone(), Alpn::Http11, timeout)
                .await
                .map_err(|source| ProxyError::Tls { addr, source })?;
            Either::Right(Box::new(stream))
        }
    };
    Ok(http1::Connection::new(io))
}

/// hyper's HTTP/1.1 client, for an upgrade: it hands over the upgraded
/// stream.
async fn handshake_upgrade<I>(
    addr: SocketAddr,
    io: I,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, ProxyError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(H1_MAX_BUF)
        .handshake(io)
        .await
        .map_err(|source| ProxyError::Reset {
            addr,
            source: source.into(),
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(%addr, error = %e, "HTTP/1.1 upgrade connection closed");
        }
    });
    Ok(sender)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Pool state is a list of senders; any state after a panic is usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Builds the request for one hop from the downstream request's head: the
/// target in the form the hop needs and the authority the application
/// used (`Host` for HTTP/1.1, `:authority` for HTTP/2).
///
/// The target is assembled from the parts already parsed (shared buffers),
/// not formatted and parsed again.
pub fn request(
    parts: &http::request::Parts,
    authority: &Authority,
    hop: Hop,
    body: Body,
) -> Result<Request<Body>, ProxyError> {
    let mut target = http::uri::Parts::default();
    target.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    let version = match hop {
        Hop::Http1 => http::Version::HTTP_11,
        Hop::Http2 => {
            target.scheme = Some(Scheme::HTTP);
            target.authority = Some(authority.clone());
            http::Version::HTTP_2
        }
    };
    let uri = Uri::from_parts(target).map_err(|e| {
        ProxyError::BadRequest(format!(
            "cannot forward {authority}{}: {e}",
            parts.uri.path()
        ))
    })?;
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = parts.headers.clone();
    match hop {
        Hop::Http1 => {
            let host = request.headers().get(http::header::HOST);
            if host.map(|h| h.as_bytes()) != Some(authority.as_str().as_bytes())
                && let Ok(host) = http::HeaderValue::from_str(authority.as_str())
            {
                request.headers_mut().insert(http::header::HOST, host);
            }
        }
        Hop::Http2 => {
            request.headers_mut().remove(http::header::HOST);
        }
    }
    Ok(request)
}
