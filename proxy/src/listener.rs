//! Listeners: accept TCP connections, secure them (the inbound port: mTLS,
//! or plaintext where the service is PERMISSIVE), and serve HTTP/1.1 and
//! HTTP/2 (told apart by the HTTP/2 preface) on them, counting connections
//! and bytes, and draining gracefully on shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::either::Either;

use crate::config::{ConfigStore, InboundMode};
use crate::detect::{self, Protocol};
use crate::http::headers;
use crate::identity::SpiffeId;
use crate::metrics::{Direction, Metrics};
use crate::tcp;
use crate::tls::{ALPN_HTTP11, TlsContext, peer_identity};
use crate::transparent::{self, Destination};
use crate::upstream::{Body, Security};
use crate::workers::Workers;

/// Limits that keep a misbehaving client from costing much (see the h2
/// reset-flood advisories in FACTS.md): bounded header lists and streams.
const MAX_HEADER_LIST: u32 = 64 << 10;
const MAX_CONCURRENT_STREAMS: u32 = 1024;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the inbound port waits for a connection's first byte.
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take once started.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Connect timeout for intercepted TCP to destinations outside the mesh.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout to the local application.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Which side a listener serves, and how it treats its connections.
#[derive(Clone)]
pub enum Side {
    /// The outbound listener: the application's connections, either made
    /// to the listener itself (explicit mode: HTTP, routed by authority) or
    /// intercepted by iptables (mapped by original destination, see
    /// `transparent.rs`).
    Outbound(Arc<Intercept>),
    /// The inbound mesh port: mTLS, told apart from plaintext by the first
    /// byte (a TLS handshake record); plaintext is served only while the
    /// config's inbound mode is PERMISSIVE, or when the proxy runs without
    /// identity.
    Inbound(Arc<Intercept>),
}

impl Side {
    fn direction(&self) -> Direction {
        match self {
            Side::Outbound(_) => Direction::Outbound,
            Side::Inbound(_) => Direction::Inbound,
        }
    }

    fn intercept(&self) -> &Intercept {
        match self {
            Side::Outbound(intercept) | Side::Inbound(intercept) => intercept,
        }
    }
}

/// What connection handling needs besides HTTP.
pub struct Intercept {
    /// The compiled config.
    pub store: Arc<ConfigStore>,
    /// mTLS; `None` when the proxy runs without identity.
    pub tls: Option<Arc<TlsContext>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The proxy's listener ports: destinations on them would loop.
    pub own_ports: Vec<u16>,
    /// How long protocol detection waits.
    pub detect_timeout: Duration,
    /// Inbound: the application, when not given by an original destination.
    pub app: Option<SocketAddr>,
}

/// Who is at the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The TCP peer.
    pub addr: SocketAddr,
    /// The SPIFFE ID the peer proved over mTLS; `None` for plaintext.
    pub identity: Option<SpiffeId>,
    /// Where the connection was going before iptables redirected it;
    /// `None` in explicit mode.
    pub original_dst: Option<SocketAddr>,
}

/// Serves HTTP on every connection `listener` accepts until `drain` turns
/// true, then lets in-flight requests finish for up to `grace`. Each
/// connection is secured and classified as `side` says, then served by the handler
/// `make_handler` returns for its [`Peer`].
pub async fn serve<M, H, F>(
    listener: TcpListener,
    workers: Arc<Workers>,
    side: Side,
    make_handler: M,
    mut drain: watch::Receiver<bool>,
    grace: Duration,
) where
    M: Fn(&Peer) -> H + Send + Sync + 'static,
    H: Fn(hyper::Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = hyper::Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    // HTTP/1 connections whose version is known without reading go to
    // hyper's HTTP/1 server directly (see `speaks_http1`), with the same
    // settings as `builder.http1()` above.
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let http1 = Arc::new(http1);
    let make_handler = Arc::new(make_handler);
    let direction = side.direction();
    let metrics = &side.intercept().metrics;
    let label = [direction.as_str()];
    let accepted = metrics.tcp_connections.with_label_values(&label);
    let open = metrics.tcp_open.with_label_values(&label);
    let read = metrics.tcp_read_bytes.with_label_values(&label);
    let written = metrics.tcp_write_bytes.with_label_values(&label);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of
                    // spinning.
                    tracing::warn!(direction = direction.as_str(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = drain.wait_for(|d| *d).await; } => break,
        };
        let _ = stream.set_nodelay(true);
        accepted.inc();
        let open = OpenGuard::new(open.clone());
        let (read, written) = (read.clone(), written.clone());
        let watcher = graceful.watcher();
        let mut drain = drain.clone();
        let builder = Arc::clone(&builder);
        let http1 = Arc::clone(&http1);
        let make_handler = Arc::clone(&make_handler);
        let side = side.clone();
        // The handshake runs in the connection's task, on a worker, so a
        // slow or hostile client never holds up the accept loop.
        workers.spawn(stream, move |stream| async move {
            let io = Counted {
                inner: stream,
                read,
                written,
                _open: open,
            };
            // Boxed, and freed once the connection is classified: inline,
            // the detection and TLS handshake futures (up to 6 KB) sized
            // the task for the connection's whole life (7.4 KB per
            // connection, 2 KB after).
            let prepared = match &side {
                Side::Outbound(intercept) => Box::pin(outbound(intercept, io, peer)).await,
                Side::Inbound(intercept) => Box::pin(inbound(intercept, io, peer)).await,
            };
            let Some((io, peer)) = prepared else {
                return;
            };
            let handler = make_handler(&peer);
            let service = service_fn(move |mut req| {
                // Before hyper reads the connection again (see there).
                headers::detach_from_read_buffer(&mut req);
                // Boxed: hyper spawns a task per HTTP/2 stream, and on its
                // way there the request's future (3-4 KB) was copied five
                // times or so (memmove was the top entry in `perf`); a
                // pointer is copied instead, and the task is small.
                let response = Box::pin(handler(req));
                async move { Ok::<_, std::convert::Infallible>(response.await) }
            });
            let served = if speaks_http1(&io).await {
                let connection = http1
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades();
                let mut connection = std::pin::pin!(connection);
                // hyper-util's graceful shutdown cannot watch this
                // connection type: it is told by `drain` instead, and
                // `watcher` is held so that the drain waits for it.
                let _watcher = watcher;
                tokio::select! {
                    served = connection.as_mut() => served,
                    _ = async { let _ = drain.wait_for(|d| *d).await; } => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                }
                .map_err(Into::into)
            } else {
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                watcher.watch(connection.into_owned()).await
            };
            if let Err(e) = served {
                tracing::debug!(peer = %peer.addr, error = %e, "connection ended with an error");
            }
        });
    }

    // Closed now, so that new connections are refused (and their clients
    // go elsewhere) instead of waiting in the backlog until the drain ends.
    drop(listener);
    tracing::info!(direction = direction.as_str(), "draining connections");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            direction = direction.as_str(),
            ?grace,
            "drain grace period over; closing remaining connections"
        );
    }
}

/// Whether a connection speaks HTTP/1, known without reading from it: TLS
/// that agreed on `http/1.1` by ALPN, or plaintext whose first bytes already
/// differ from the HTTP/2 preface (peeked). Otherwise hyper-util's server
/// tells the versions apart, but it reads the first 24 bytes itself and
/// hands them to hyper's HTTP/1 server as a read of their own; the request
/// head is then incomplete after hyper's first read, and hyper doubles its
/// 8 KiB read buffer for the rest, for the connection's whole life
/// (heaptrack, 100 client connections: 1.6 MiB of read buffers, not 0.8).
async fn speaks_http1(io: &Secured) -> bool {
    match io {
        Either::Left(plain) => {
            let mut first = [0u8; detect::HTTP_VERSION_BYTES];
            let peeked = tokio::time::timeout(HEADER_READ_TIMEOUT, plain.inner.peek(&mut first));
            match peeked.await {
                Ok(Ok(n)) => detect::http_version(&first[..n]) == Some(Protocol::Http1),
                _ => false,
            }
        }
        Either::Right(tls) => tls.get_ref().1.alpn_protocol() == Some(ALPN_HTTP11),
    }
}

/// A connection's byte stream once secured: plaintext or server-side TLS.
/// The TLS session is boxed: inline it made every connection's task 1.3 KB
/// larger, plaintext ones included.
type Secured = Either<Counted, Box<tokio_rustls::server::TlsStream<Counted>>>;

/// An outbound connection: HTTP for the caller's HTTP server (explicit,
/// or intercepted towards an HTTP service), or handled here as opaque TCP
/// and `None`.
async fn outbound(intercept: &Intercept, io: Counted, addr: SocketAddr) -> Option<(Secured, Peer)> {
    let explicit = Peer {
        addr,
        identity: None,
        original_dst: None,
    };
    let Some(dst) = transparent::original_destination(&io.inner) else {
        return Some((Either::Left(io), explicit));
    };
    let config = intercept.store.load();
    let destination = transparent::destination(&config, dst, &intercept.own_ports);
    let direction = Direction::Outbound;
    let protocol = match &destination {
        Destination::Loop | Destination::Blocked => {
            count(intercept, direction, destination.service(), "none");
            tracing::info!(
                peer = %addr,
                %dst,
                reason = destination.service(),
                "refused an intercepted connection{}",
                if matches!(destination, Destination::Loop) {
                    " addressed to the proxy itself (it would loop)"
                } else {
                    " to a destination outside the mesh (outbound_traffic: REGISTRY_ONLY)"
                }
            );
            return None;
        }
        // A TCP service port: opaque, never worth a wait.
        Destination::Tcp { .. } => Protocol::Opaque,
        Destination::Http { cluster, .. } => {
            let wait = cluster.as_ref().and_then(|c| c.detect_timeout);
            detect_protocol(intercept, direction, &io.inner, dst.port(), wait).await
        }
        Destination::Passthrough => {
            detect_protocol(intercept, direction, &io.inner, dst.port(), None).await
        }
    };
    count(
        intercept,
        direction,
        destination.service(),
        protocol.as_str(),
    );
    if let Protocol::Tls { sni } = &protocol {
        intercept
            .metrics
            .count_tls_passthrough(sni.as_deref().unwrap_or(""));
    }
    let (cluster, endpoint) = match destination {
        Destination::Http { .. } if matches!(protocol, Protocol::Http1 | Protocol::Http2) => {
            let peer = Peer {
                original_dst: Some(dst),
                ..explicit
            };
            return Some((Either::Left(io), peer));
        }
        Destination::Http {
            cluster, endpoint, ..
        } => (cluster, endpoint),
        Destination::Tcp {
            cluster, endpoint, ..
        } => (Some(cluster), endpoint),
        _ => (None, None),
    };
    let service = match &cluster {
        Some(c) => transparent::service_of(&c.name),
        None => "passthrough".to_string(),
    };
    // Opaque bytes: to the chosen endpoint (over mTLS when it has a
    // sidecar), or where they were going.
    let endpoint = endpoint.or_else(|| {
        cluster
            .as_deref()
            .and_then(|c| crate::balance::pick_endpoint(c, None))
    });
    let timeout = cluster
        .as_deref()
        .map_or(PASSTHROUGH_CONNECT_TIMEOUT, |c| c.connect_timeout);
    // To the endpoint's sidecar over mTLS when it has one (and we have an
    // identity), else in plaintext to the endpoint or the destination.
    let (target, security) = match (&endpoint, intercept.tls.as_deref()) {
        (Some(e), Some(tls)) => match &e.server_name {
            Some(server_name) => (
                e.key.proxy.unwrap_or(e.key.app),
                Security::Mtls { tls, server_name },
            ),
            None => (e.key.app, Security::Plaintext),
        },
        (Some(e), None) => (e.key.app, Security::Plaintext),
        (None, _) if cluster.is_some() => {
            tracing::debug!(%dst, service, "no endpoint for intercepted TCP");
            return None;
        }
        (None, _) => (dst, Security::Plaintext),
    };
    match tcp::connect(target, security, timeout).await {
        Ok(upstream) => {
            if let Err(e) =
                tcp::forward(io, upstream, &intercept.metrics, direction, &service).await
            {
                tracing::debug!(peer = %addr, %dst, error = %e, "TCP connection ended with an error");
            }
        }
        Err(e) => {
            tracing::info!(peer = %addr, %dst, %target, error = %e, "cannot open intercepted TCP");
        }
    }
    None
}

/// An inbound connection: mTLS (then HTTP, or opaque TCP for the
/// application when the peer asked with ALPN), or plaintext where allowed.
/// `None` when handled here or refused (already logged and counted).
async fn inbound(intercept: &Intercept, io: Counted, addr: SocketAddr) -> Option<(Secured, Peer)> {
    let original_dst = transparent::original_destination(&io.inner);
    let app = original_dst.or(intercept.app);
    let plaintext = Peer {
        addr,
        identity: None,
        original_dst,
    };
    let Some(tls) = &intercept.tls else {
        return plaintext_inbound(intercept, io, plaintext, app).await;
    };
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(DETECT_TIMEOUT, io.inner.peek(&mut first)).await;
    match peeked {
        Ok(Ok(1..)) => {}
        Ok(Ok(0)) => return None,
        Ok(Err(e)) => {
            tracing::debug!(peer = %addr, error = %e, "connection failed before its first byte");
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = %addr, ?DETECT_TIMEOUT, "nothing received; closing");
            return None;
        }
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        if intercept.store.load().inbound_mode == InboundMode::Permissive {
            return plaintext_inbound(intercept, io, plaintext, app).await;
        }
        tls.count_plaintext_refused();
        tracing::info!(
            peer = %addr,
            "refused a plaintext connection: this port is STRICT (mTLS only); \
             mark the service PERMISSIVE in the mesh file to allow plaintext callers"
        );
        return None;
    }
    let stream = match tls.accept(io, HANDSHAKE_TIMEOUT).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(peer = %addr, reason = e.failure.as_str(), error = %e.error, "refused an mTLS connection");
            return None;
        }
    };
    let identity = match peer_identity(stream.get_ref().1) {
        Ok(id) => Some(id),
        Err(e) => {
            // The verifier already required a valid SPIFFE ID.
            tracing::warn!(peer = %addr, error = %e, "verified peer without an identity");
            None
        }
    };
    if stream.get_ref().1.alpn_protocol() == Some(tcp::ALPN_TCP) {
        let service = identity
            .as_ref()
            .map_or_else(String::new, ToString::to_string);
        forward_to_app(intercept, stream, app, addr, &service).await;
        return None;
    }
    let peer = Peer {
        identity,
        ..plaintext
    };
    Some((Either::Right(Box::new(stream)), peer))
}

/// Plaintext on the inbound port: HTTP for the HTTP server; opaque bytes
/// (intercepted only) straight to the application.
async fn plaintext_inbound(
    intercept: &Intercept,
    io: Counted,
    peer: Peer,
    app: Option<SocketAddr>,
) -> Option<(Secured, Peer)> {
    let Some(dst) = peer.original_dst else {
        return Some((Either::Left(io), peer));
    };
    let protocol =
        detect_protocol(intercept, Direction::Inbound, &io.inner, dst.port(), None).await;
    if matches!(protocol, Protocol::Http1 | Protocol::Http2) {
        return Some((Either::Left(io), peer));
    }
    forward_to_app(intercept, io, app, peer.addr, "").await;
    None
}

/// Opaque TCP from a peer to the local application.
async fn forward_to_app(
    intercept: &Intercept,
    io: impl tcp::Stream,
    app: Option<SocketAddr>,
    peer: SocketAddr,
    source: &str,
) {
    let Some(app) = app else {
        tracing::info!(%peer, "opaque TCP for the application, but no --app-addr and no original destination");
        return;
    };
    match tcp::connect(app, Security::Plaintext, APP_CONNECT_TIMEOUT).await {
        Ok(upstream) => {
            let label = if source.is_empty() { "inbound" } else { source };
            if let Err(e) =
                tcp::forward(io, upstream, &intercept.metrics, Direction::Inbound, label).await
            {
                tracing::debug!(%peer, %app, error = %e, "TCP connection ended with an error");
            }
        }
        Err(e) => tracing::info!(%peer, %app, error = %e, "cannot reach the application"),
    }
}

/// Detection, skipped (opaque) on server-first ports; waits the service's
/// `detect_timeout` if it has one, else the default; timed and counted.
async fn detect_protocol(
    intercept: &Intercept,
    direction: Direction,
    stream: &tokio::net::TcpStream,
    port: u16,
    wait: Option<Duration>,
) -> Protocol {
    if detect::server_speaks_first(port) {
        return Protocol::Opaque;
    }
    let start = std::time::Instant::now();
    let wait = wait.unwrap_or(intercept.detect_timeout);
    let protocol = detect::detect(stream, wait).await;
    intercept
        .metrics
        .detection
        .with_label_values(&[direction.as_str(), protocol.as_str()])
        .observe(start.elapsed().as_secs_f64());
    protocol
}

fn count(intercept: &Intercept, direction: Direction, service: &str, protocol: &str) {
    intercept
        .metrics
        .intercepted
        .with_label_values(&[direction.as_str(), service, protocol])
        .inc();
}

/// Decrements the open-connections gauge when the connection goes.
struct OpenGuard(IntGauge);

impl OpenGuard {
    fn new(gauge: IntGauge) -> OpenGuard {
        gauge.inc();
        OpenGuard(gauge)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pin_project_lite::pin_project! {
    /// A TCP stream that counts the bytes through it.
    struct Counted {
        #[pin]
        inner: TcpStream,
        read: IntCounter,
        written: IntCounter,
        _open: OpenGuard,
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.inner.poll_read(cx, buf);
        this.read.inc_by((buf.filled().len() - before) as u64);
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let result = this.inner.poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &result {
            this.written.inc_by(*n as u64);
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let result = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            this.written.inc_by(*n as u64);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
