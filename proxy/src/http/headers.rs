//! Header handling at the proxy's edges.
//!
//! Hop-by-hop headers (RFC 9110 section 7.6.1: `Connection`, the headers it
//! lists, `Keep-Alive`, `Proxy-Connection`, `TE` except `trailers`,
//! `Transfer-Encoding`, `Upgrade` outside an upgrade) are removed before a
//! request or response is forwarded. `X-Forwarded-*` and `Forwarded` are
//! passed through untouched: a sidecar is not a gateway and adds nothing.
//! Remora's own `x-remora-*` request headers never cross from an
//! application into the mesh, so a caller cannot spoof them.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Version};

use crate::errors::ProxyError;

/// Sent from the outbound sidecar to the inbound one: the protocol the
/// destination application speaks (`http1` or `http2`).
pub const APP_PROTOCOL: HeaderName = HeaderName::from_static("x-remora-app-protocol");
/// Set by the inbound side for the application: the SPIFFE ID the caller's
/// sidecar proved over mTLS. Any copy arriving from outside is removed
/// first, with every other `x-remora-*` header.
pub const PEER_IDENTITY: HeaderName = HeaderName::from_static("x-remora-peer-identity");

const INTERNAL_PREFIX: &str = "x-remora-";

/// Removes hop-by-hop headers. With `upgrade`, `Connection: upgrade` and
/// `Upgrade` are kept, as an HTTP/1.1 upgrade needs them on the next hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim() == "trailers"))
    });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes every `x-remora-*` header.
pub fn strip_internal(headers: &mut HeaderMap) {
    let internal: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(INTERNAL_PREFIX))
        .cloned()
        .collect();
    for name in internal {
        headers.remove(name);
    }
}

/// True for an HTTP/1.1 upgrade request (WebSocket and the like).
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() <= Version::HTTP_11
        && request.method() == Method::GET
        && request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Moves an HTTP/1.x request's target and header values out of the
/// connection's read buffer into one buffer of their own.
///
/// hyper hands them over as slices of the buffer it read the head into, so
/// while the request is in flight that buffer is shared and hyper's next
/// read on the connection (it keeps reading to notice a client that goes
/// away) allocates a new 8 KiB one: a second buffer per busy connection, and
/// an allocation per request. One copy of a few hundred bytes instead keeps
/// the read buffer reusable (heaptrack, 100 busy connections: 2.1 MiB of
/// read buffers before). HTTP/2 heads are decoded into buffers of their own
/// and are left alone.
pub fn detach_from_read_buffer<B>(request: &mut Request<B>) {
    if request.version() > Version::HTTP_11 {
        return;
    }
    let values: usize = request.headers().values().map(HeaderValue::len).sum();
    let mut buf = bytes::BytesMut::with_capacity(values + request.uri().path().len() + 64);
    // Infallible: writing to memory.
    let _ = std::fmt::Write::write_fmt(&mut buf, format_args!("{}", request.uri()));
    let target = buf.len();
    for value in request.headers().values() {
        buf.extend_from_slice(value.as_bytes());
    }
    let buf = buf.freeze();
    if let Ok(uri) = http::Uri::from_maybe_shared(buf.slice(..target)) {
        *request.uri_mut() = uri;
    }
    let mut at = target;
    for value in request.headers_mut().values_mut() {
        let end = at + value.len();
        if let Ok(mut copy) = HeaderValue::from_maybe_shared(buf.slice(at..end)) {
            copy.set_sensitive(value.is_sensitive());
            *value = copy;
        }
        at = end;
    }
}

/// The authority a request is addressed to: the URI's (HTTP/2
/// `:authority`, or an absolute-form HTTP/1.1 target), else `Host`.
/// Taken as an [`Authority`] (a shared buffer) so that each hop's request
/// reuses it instead of formatting and re-parsing a URI.
pub fn authority<B>(request: &Request<B>) -> Result<Authority, ProxyError> {
    if let Some(authority) = request.uri().authority() {
        return Ok(authority.clone());
    }
    let host = request
        .headers()
        .get(header::HOST)
        .ok_or(ProxyError::NoAuthority)?;
    Authority::try_from(host.as_bytes())
        .map_err(|e| ProxyError::BadRequest(format!("invalid Host header {host:?}: {e}")))
}

/// True when the request is gRPC.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The `grpc-status` in a header map (response headers of a trailers-only
/// response, or trailers).
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_head_keeps_its_target_and_values() {
        for target in ["/a/b?c=d", "http://web.test:8080/x?y", "*"] {
            let mut request = Request::builder()
                .uri(target)
                .header("host", "web.test")
                .header("x-multi", "1")
                .header("x-multi", "2")
                .body(())
                .expect("request");
            let mut secret = HeaderValue::from_static("token");
            secret.set_sensitive(true);
            request.headers_mut().insert("authorization", secret);
            let before = request.headers().clone();
            detach_from_read_buffer(&mut request);
            assert_eq!(request.uri().to_string(), target);
            assert_eq!(request.headers(), &before);
            assert!(request.headers()["authorization"].is_sensitive());
        }
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_lists_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-secret") && !h.contains_key("keep-alive"));
        assert!(!h.contains_key(header::CONNECTION) && !h.contains_key(header::TRANSFER_ENCODING));
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1", "passed through untouched");
    }

    #[test]
    fn upgrades_keep_what_the_next_hop_needs() {
        let req = Request::builder()
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("valid");
        assert!(is_upgrade(&req));
        let mut h = req.headers().clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn internal_headers_from_applications_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(APP_PROTOCOL, HeaderValue::from_static("http2"));
        h.insert(
            "x-remora-peer-identity",
            HeaderValue::from_static("spoofed"),
        );
        h.insert("x-request-id", HeaderValue::from_static("1"));
        strip_internal(&mut h);
        assert_eq!(h.len(), 1);
    }
}
