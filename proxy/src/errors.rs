//! Errors the proxy answers itself, and the one place that turns them into
//! responses: a status code, an `x-remora-error` header naming the reason,
//! and for gRPC callers the matching `grpc-status`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::upstream::Body;

/// The response header that names why the proxy answered.
pub const ERROR_HEADER: &str = "x-remora-error";

/// Which side of the proxy an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client that sent the request.
    Downstream,
    /// The endpoint the request went to.
    Upstream,
    /// The proxy or its configuration.
    Internal,
}

/// An error the proxy answers with its own response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No configuration has arrived from the control plane yet.
    #[error("no configuration from the control plane yet")]
    NotReady,
    /// The request has no authority to route by.
    #[error("request has no :authority or Host header")]
    NoAuthority,
    /// No virtual host or route matches.
    #[error("no route for {0}")]
    NoRoute(String),
    /// The route names a cluster the proxy does not have.
    #[error("cluster {0} not found")]
    ClusterNotFound(String),
    /// The cluster has no endpoint that takes traffic.
    #[error("no healthy endpoint in cluster {0}")]
    NoEndpoint(String),
    /// Opening a connection failed.
    #[error("connection to {addr} failed: {source}")]
    Connect {
        /// The endpoint.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Opening a connection took longer than the cluster's connect timeout.
    #[error("connection to {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The endpoint.
        addr: std::net::SocketAddr,
        /// The connect timeout.
        timeout: Duration,
    },
    /// The mTLS handshake with the endpoint's sidecar failed (wrong
    /// identity, unknown CA, expired certificate...).
    #[error("mTLS to {addr} failed: {source}")]
    Tls {
        /// The endpoint.
        addr: std::net::SocketAddr,
        /// Why.
        source: crate::tls::HandshakeError,
    },
    /// The connection or stream to the endpoint failed mid-request.
    #[error("upstream {addr} reset the request: {source}")]
    Reset {
        /// The endpoint.
        addr: std::net::SocketAddr,
        /// Why.
        source: crate::upstream::BoxError,
    },
    /// The route timeout expired.
    #[error("route timeout of {0:?} expired")]
    RouteTimeout(Duration),
    /// A try's timeout expired.
    #[error("per-try timeout of {0:?} expired")]
    PerTryTimeout(Duration),
    /// A route without a timeout waited this long for a response to start.
    #[error("no response within the stream idle timeout of {0:?}")]
    IdleTimeout(Duration),
    /// The request from downstream was malformed or not allowed.
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl ProxyError {
    /// Which side it came from.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::NoAuthority | ProxyError::BadRequest(_) => Side::Downstream,
            ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout { .. }
            | ProxyError::Tls { .. }
            | ProxyError::Reset { .. }
            | ProxyError::PerTryTimeout(_)
            | ProxyError::IdleTimeout(_) => Side::Upstream,
            ProxyError::NotReady
            | ProxyError::NoRoute(_)
            | ProxyError::ClusterNotFound(_)
            | ProxyError::NoEndpoint(_)
            | ProxyError::RouteTimeout(_) => Side::Internal,
        }
    }

    /// The value of `x-remora-error`, and a metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NotReady => "no_config",
            ProxyError::NoAuthority => "no_authority",
            ProxyError::NoRoute(_) => "no_route",
            ProxyError::ClusterNotFound(_) => "cluster_not_found",
            ProxyError::NoEndpoint(_) => "no_endpoint",
            ProxyError::Connect { .. } => "connect_failure",
            ProxyError::ConnectTimeout { .. } => "connect_timeout",
            ProxyError::Tls { .. } => "tls_handshake_failure",
            ProxyError::Reset { .. } => "upstream_reset",
            ProxyError::RouteTimeout(_) => "route_timeout",
            ProxyError::PerTryTimeout(_) => "per_try_timeout",
            ProxyError::IdleTimeout(_) => "idle_timeout",
            ProxyError::BadRequest(_) => "bad_request",
        }
    }

    /// The HTTP status answered.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoAuthority | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::NotReady | ProxyError::ClusterNotFound(_) | ProxyError::NoEndpoint(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect { .. } | ProxyError::Tls { .. } | ProxyError::Reset { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::ConnectTimeout { .. }
            | ProxyError::RouteTimeout(_)
            | ProxyError::PerTryTimeout(_)
            | ProxyError::IdleTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The gRPC status for gRPC callers.
    pub fn grpc_status(&self) -> u32 {
        match self.status() {
            StatusCode::NOT_FOUND => 12,      // UNIMPLEMENTED
            StatusCode::BAD_REQUEST => 13,    // INTERNAL
            StatusCode::GATEWAY_TIMEOUT => 4, // DEADLINE_EXCEEDED
            _ => 14,                          // UNAVAILABLE
        }
    }

    /// The response the caller gets. gRPC callers get a trailers-only
    /// response (HTTP 200 with `grpc-status`), as gRPC requires.
    pub fn to_response(&self, grpc: bool) -> Response<Body> {
        let message = self.to_string();
        let mut response = if grpc {
            let mut r = Response::new(empty());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(full(format!("{message}\n")));
            *r.status_mut() = self.status();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        response
            .headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static(self.reason()));
        response
    }
}

/// gRPC's percent-encoding of `grpc-message`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An empty body.
pub fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body holding `s`.
pub fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_names_its_reason_and_grpc_callers_get_a_status() {
        let e = ProxyError::NoEndpoint("outbound|80||web".into());
        let r = e.to_response(false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[ERROR_HEADER], "no_endpoint");
        let g = ProxyError::RouteTimeout(Duration::from_secs(1)).to_response(true);
        assert_eq!(g.status(), StatusCode::OK);
        assert_eq!(g.headers()["grpc-status"], "4");
        assert_eq!(g.headers()[ERROR_HEADER], "route_timeout");
        assert_eq!(e.side(), Side::Internal);
    }
}
