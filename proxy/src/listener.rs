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
use crate::identity::SpiffeId;
use crate::metrics::{Direction, Metrics};
use crate::tls::{TlsContext, peer_identity};
use crate::upstream::Body;

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

/// What a listener accepts.
#[derive(Clone)]
pub enum Security {
    /// Plaintext only: the outbound listener (the local application), or
    /// a sidecar running without identity.
    Plaintext,
    /// The inbound mesh port: mTLS, told apart from plaintext by the first
    /// byte (a TLS handshake record); plaintext is served only while the
    /// config's inbound mode is PERMISSIVE.
    Mesh {
        /// Credentials and trust bundle.
        tls: Arc<TlsContext>,
        /// Where the inbound mode is read, per connection.
        store: Arc<ConfigStore>,
    },
}

/// Who is at the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The TCP peer.
    pub addr: SocketAddr,
    /// The SPIFFE ID the peer proved over mTLS; `None` for plaintext.
    pub identity: Option<SpiffeId>,
}

/// Serves HTTP on every connection `listener` accepts until `drain` turns
/// true, then lets in-flight requests finish for up to `grace`. Each
/// connection is secured as `security` says, then served by the handler
/// `make_handler` returns for its [`Peer`].
pub async fn serve<M, H, F>(
    listener: TcpListener,
    direction: Direction,
    metrics: Arc<Metrics>,
    security: Security,
    make_handler: M,
    mut drain: watch::Receiver<bool>,
    grace: Duration,
) where
    M: Fn(&Peer) -> H + Send + Sync + 'static,
    H: Fn(hyper::Request<Incoming>) -> F + Clone + Send + Sync + 'static,
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
    let make_handler = Arc::new(make_handler);
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
        let io = Counted {
            inner: stream,
            read: read.clone(),
            written: written.clone(),
            _open: OpenGuard::new(open.clone()),
        };
        let watcher = graceful.watcher();
        let builder = Arc::clone(&builder);
        let make_handler = Arc::clone(&make_handler);
        let security = security.clone();
        // The handshake runs in the connection's task, so a slow or
        // hostile client never holds up the accept loop.
        tokio::spawn(async move {
            let secured = match secure(&security, io, peer).await {
                Some(secured) => secured,
                None => return,
            };
            let (io, identity) = secured;
            let handler = make_handler(&Peer {
                addr: peer,
                identity,
            });
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

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

/// A connection's byte stream once secured: plaintext or server-side TLS.
type Secured = Either<Counted, tokio_rustls::server::TlsStream<Counted>>;

/// Detects TLS by the first byte and runs the handshake; `None` when the
/// connection is refused (and already logged and counted).
async fn secure(
    security: &Security,
    io: Counted,
    peer: SocketAddr,
) -> Option<(Secured, Option<SpiffeId>)> {
    let (tls, store) = match security {
        Security::Plaintext => return Some((Either::Left(io), None)),
        Security::Mesh { tls, store } => (tls, store),
    };
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(DETECT_TIMEOUT, io.inner.peek(&mut first)).await;
    match peeked {
        Ok(Ok(1..)) => {}
        Ok(Ok(0)) => return None,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection failed before its first byte");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, ?DETECT_TIMEOUT, "nothing received; closing");
            return None;
        }
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        if store.load().inbound_mode == InboundMode::Permissive {
            return Some((Either::Left(io), None));
        }
        tls.count_plaintext_refused();
        tracing::info!(
            %peer,
            "refused a plaintext connection: this port is STRICT (mTLS only); \
             mark the service PERMISSIVE in the mesh file to allow plaintext callers"
        );
        return None;
    }
    match tls.accept(io, HANDSHAKE_TIMEOUT).await {
        Ok(stream) => {
            let identity = match peer_identity(stream.get_ref().1) {
                Ok(id) => Some(id),
                Err(e) => {
                    // The verifier already required a valid SPIFFE ID.
                    tracing::warn!(%peer, error = %e, "verified peer without an identity");
                    None
                }
            };
            Some((Either::Right(stream), identity))
        }
        Err(e) => {
            tracing::info!(%peer, reason = e.failure.as_str(), error = %e.error, "refused an mTLS connection");
            None
        }
    }
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
