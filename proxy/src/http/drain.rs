//! Request bodies that the next hop stopped reading.
//!
//! A server may answer before it has read the whole request (a static
//! answer, a rejected upload) and then, over HTTP/2, resets the rest of the
//! request with RST_STREAM NO_ERROR (RFC 9113 section 8.1). The proxy then
//! drops the downstream request body. Dropped unread, hyper resets that
//! stream too, while its caller's DATA frames may already be on the wire;
//! h2 remembers only a few recently reset streams (10), and counts frames
//! arriving on streams it no longer remembers as the peer's protocol
//! errors: after 1,024 of them it closes the whole connection with
//! ENHANCE_YOUR_CALM. Between two sidecars that is an mTLS connection
//! carrying every request between them.
//!
//! So a body dropped before its end is read to its end in the background,
//! discarding what arrives, as nginx discards the body of a request it has
//! answered; its stream then ends normally. A caller that keeps sending
//! past [`DRAIN_LIMIT`] or for longer than [`DRAIN_TIMEOUT`] is reset after
//! all.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// The most a dropped body is read for.
pub const DRAIN_LIMIT: usize = 256 << 10;
/// How long a dropped body is read for.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A downstream request body that is drained, not reset, when dropped
/// before its end.
#[derive(Debug)]
pub struct Drained {
    inner: Option<Incoming>,
}

impl Drained {
    /// Wraps a request body as it arrives.
    pub fn new(body: Incoming) -> Drained {
        Drained { inner: Some(body) }
    }
}

impl HttpBody for Drained {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut().inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        // Outside a runtime (the process is shutting down) there is no one
        // to read it: let it be reset.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body));
        }
    }
}

/// Reads and discards the rest of `body`, within the limits.
async fn drain(mut body: Incoming) {
    let read = async {
        let mut left = DRAIN_LIMIT;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                left = left.saturating_sub(data.len());
                if left == 0 {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, read).await;
}
