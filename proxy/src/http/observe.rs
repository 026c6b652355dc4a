//! Response bodies that report when they end: the request is counted with
//! its final gRPC status (which usually arrives in trailers), and the
//! endpoint's in-flight count drops, when the body is finished or dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus::IntGauge;

use crate::balance::InFlight;
use crate::http::headers::grpc_status;
use crate::metrics::RouteMetrics;
use crate::upstream::{Body, BoxError};

/// Wraps a response body; counts the request once, at its end.
pub struct Observed {
    inner: Body,
    metrics: Arc<RouteMetrics>,
    status: u16,
    grpc_status: Option<u32>,
    _in_flight: Option<InFlight>,
    _gauge: GaugeGuard,
}

impl Observed {
    /// Observes `inner`, the body of a response with `status` and (from
    /// its headers) `grpc_status`.
    pub fn new(
        inner: Body,
        metrics: Arc<RouteMetrics>,
        status: u16,
        grpc_status: Option<u32>,
        in_flight: Option<InFlight>,
        gauge: GaugeGuard,
    ) -> Observed {
        Observed {
            inner,
            metrics,
            status,
            grpc_status,
            _in_flight: in_flight,
            _gauge: gauge,
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.metrics.count(self.status, self.grpc_status);
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(code) = grpc_status(trailers)
        {
            self.grpc_status = Some(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Holds a gauge up by one until dropped (requests in flight).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    /// Increments `gauge` now, decrements it on drop.
    pub fn new(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
