//! Opaque TCP: bytes copied both ways until both sides are done, with
//! half-close honoured (EOF from one side shuts down writing to the other,
//! and the other direction carries on) and backpressure (a slow reader
//! slows the writer; nothing is buffered beyond the copy buffers).
//! Counted per service as the bytes flow, not only at the end.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::errors::ProxyError;
use crate::metrics::{Direction, Metrics};
use crate::upstream::Security;

/// ALPN naming an opaque TCP stream between sidecars over mTLS; the peer
/// hands the bytes to the application at the connection's original
/// destination.
pub const ALPN_TCP: &[u8] = b"remora-tcp/1";

/// A byte stream of either side.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Connects to `addr` for opaque TCP: over mTLS (ALPN [`ALPN_TCP`]) to a
/// peer sidecar, or directly.
pub async fn connect(
    addr: SocketAddr,
    security: Security<'_>,
    timeout: Duration,
) -> Result<Box<dyn Stream>, ProxyError> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => return Err(ProxyError::Connect { addr, source }),
        Err(_) => return Err(ProxyError::ConnectTimeout { addr, timeout }),
    };
    let _ = tcp.set_nodelay(true);
    match security {
        Security::Plaintext => Ok(Box::new(tcp)),
        Security::Mtls { tls, server_name } => {
            let stream = tls
                .connect(tcp, server_name.clone(), crate::tls::Alpn::Tcp, timeout)
                .await
                .map_err(|source| ProxyError::Tls { addr, source })?;
            Ok(Box::new(stream))
        }
    }
}

/// Copies between `downstream` and `upstream` until both directions ended,
/// counting bytes for `service`. Returns why it ended, if not cleanly.
pub async fn forward(
    downstream: impl Stream,
    upstream: impl Stream,
    metrics: &Metrics,
    direction: Direction,
    service: &str,
) -> io::Result<()> {
    let sent = metrics
        .tcp_service_bytes
        .with_label_values(&[direction.as_str(), service, "sent"]);
    let received =
        metrics
            .tcp_service_bytes
            .with_label_values(&[direction.as_str(), service, "received"]);
    let mut downstream = CountReads {
        inner: downstream,
        counter: sent,
    };
    let mut upstream = CountReads {
        inner: upstream,
        counter: received,
    };
    tokio::io::copy_bidirectional(&mut downstream, &mut upstream)
        .await
        .map(|_| ())
}

/// Counts the bytes read through a stream.
struct CountReads<S> {
    inner: S,
    counter: IntCounter,
}

impl<S: Stream> AsyncRead for CountReads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.counter.inc_by((buf.filled().len() - before) as u64);
        result
    }
}

impl<S: Stream> AsyncWrite for CountReads<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
