//! An application to put behind a sidecar: it tells the caller exactly what
//! it received, and can be told to be slow, to fail, or to send a large body.
//!
//! Every response carries `x-backend: <name>` (so [`crate::client::Tally`]
//! works) and `x-echo-version` (`HTTP/1.1` or `HTTP/2`: the protocol the
//! application saw). Unless told otherwise the body is an [`Echoed`] as
//! JSON: version, method, path, authority, every header in order, and the
//! request body's length (read as a stream, never held whole) and whether
//! it matched [`crate::pattern`].
//!
//! Request headers change one response:
//!
//! | header | effect |
//! |---|---|
//! | `x-echo-delay-ms: N` | answer after N ms |
//! | `x-echo-status: N` | answer with status N |
//! | `x-echo-download: N` | the body is N pattern bytes, streamed, instead of JSON |
//! | `x-echo-trailers: 1` | end the body with the trailer `x-echo-trailer: done` |
//! | `x-echo-response-header: NAME: VALUE` | add that header to the response (repeatable) |
//!
//! Server-wide settings ([`EchoServer::set_fail_percent`],
//! [`EchoServer::set_delay`]) apply to every request from then on.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::pattern::{PatternBody, PatternCheck};
use crate::upstream::BACKEND_HEADER;

/// The response header naming the protocol the application saw.
pub const VERSION_HEADER: &str = "x-echo-version";
/// Request header: answer after this many milliseconds.
pub const DELAY_HEADER: &str = "x-echo-delay-ms";
/// Request header: answer with this status.
pub const STATUS_HEADER: &str = "x-echo-status";
/// Request header: answer with this many pattern bytes.
pub const DOWNLOAD_HEADER: &str = "x-echo-download";
/// Request header: end the response with a trailer.
pub const TRAILERS_HEADER: &str = "x-echo-trailers";
/// The trailer sent when asked.
pub const TRAILER: &str = "x-echo-trailer";
/// Request header: add `NAME: VALUE` to the response.
pub const RESPONSE_HEADER: &str = "x-echo-response-header";
/// Request header: answer 200 at once, without reading the request body
/// (as a server rejecting an upload, or nginx serving a static answer,
/// does; over HTTP/2 the server then resets the rest of the request).
pub const EARLY_HEADER: &str = "x-echo-early";

/// What the application received, as it answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Echoed {
    /// The server's name.
    pub backend: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub version: String,
    /// The request method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.1).
    pub authority: Option<String>,
    /// Every header, in the order received, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Request body length.
    pub body_len: u64,
    /// True when the body matched the pattern (an empty body does).
    pub body_is_pattern: bool,
    /// The body as text, when short and UTF-8.
    pub body: Option<String>,
    /// Request trailers.
    pub trailers: Vec<(String, String)>,
}

impl Echoed {
    /// Every value of header `name`.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// True when header `name` arrived.
    pub fn has_header(&self, name: &str) -> bool {
        self.headers.iter().any(|(k, _)| k == name)
    }
}

#[derive(Debug)]
struct State {
    name: String,
    requests: AtomicU64,
    /// Connections accepted.
    connections: AtomicU64,
    http1: AtomicU64,
    http2: AtomicU64,
    failed: AtomicU64,
    /// Requests counted for the failure pattern.
    fail_counter: AtomicU64,
    fail_percent: AtomicU32,
    delay_ms: AtomicU64,
}

/// A running echo application; it stops (and closes its connections) on
/// drop.
pub struct EchoServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Starts a server named `name` on `127.0.0.1:0`, speaking HTTP/1.1 and
    /// HTTP/2 (prior knowledge).
    pub async fn start(name: &str) -> Result<EchoServer> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding an echo server on 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            name: name.to_string(),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            http1: AtomicU64::new(0),
            http2: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            fail_counter: AtomicU64::new(0),
            fail_percent: AtomicU32::new(0),
            delay_ms: AtomicU64::new(0),
        });
        let task = tokio::spawn(serve(listener, state.clone()));
        Ok(EchoServer { addr, state, task })
    }

    /// Its name (the `x-backend` value).
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests received so far (counted on arrival).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// Requests received over HTTP/1.1 and over HTTP/2.
    pub fn versions(&self) -> (u64, u64) {
        (
            self.state.http1.load(Ordering::Relaxed),
            self.state.http2.load(Ordering::Relaxed),
        )
    }

    /// Requests answered 503 by [`EchoServer::set_fail_percent`].
    pub fn failed(&self) -> u64 {
        self.state.failed.load(Ordering::Relaxed)
    }

    /// From now on, answer `percent`% of requests 503. The failures are
    /// spread evenly over arrivals (the n-th fails when `n * percent / 100`
    /// reaches a new integer), so any run sees the configured share and no
    /// two consecutive arrivals fail unless `percent` is above 50.
    pub fn set_fail_percent(&self, percent: u32) {
        self.state.fail_counter.store(0, Ordering::Relaxed);
        self.state
            .fail_percent
            .store(percent.min(100), Ordering::Relaxed);
    }

    /// From now on, answer every request after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.delay_ms.store(ms, Ordering::Relaxed);
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        state.connections.fetch_add(1, Ordering::Relaxed);
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            // Like nginx, it ignores frames that arrive on streams it has
            // reset (a client's DATA crossing an early answer's reset),
            // instead of counting them as the client's errors and closing
            // the connection after 1,024: the sidecars' own connections
            // are what the tests watch.
            builder.http2().max_local_error_reset_streams(None);
            // Errors here are peers going away mid-request (a timeout at
            // the proxy, say): what the test checks is what its client saw.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn handle(state: &State, req: Request<Incoming>) -> Response<EchoBody> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let version = match req.version() {
        Version::HTTP_2 => {
            state.http2.fetch_add(1, Ordering::Relaxed);
            "HTTP/2"
        }
        Version::HTTP_11 => {
            state.http1.fetch_add(1, Ordering::Relaxed);
            "HTTP/1.1"
        }
        other => {
            state.http1.fetch_add(1, Ordering::Relaxed);
            if other == Version::HTTP_10 {
                "HTTP/1.0"
            } else {
                "other"
            }
        }
    };
    let number = |name: &str| -> Option<u64> {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    };
    let delay = number(DELAY_HEADER).unwrap_or_else(|| state.delay_ms.load(Ordering::Relaxed));
    let status = number(STATUS_HEADER)
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok());
    let download = number(DOWNLOAD_HEADER);
    let trailers = req.headers().contains_key(TRAILERS_HEADER);
    let extra: Vec<(http::HeaderName, HeaderValue)> = req
        .headers()
        .get_all(RESPONSE_HEADER)
        .iter()
        .filter_map(|v| {
            let (name, value) = v.to_str().ok()?.split_once(':')?;
            Some((
                http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                HeaderValue::from_str(value.trim()).ok()?,
            ))
        })
        .collect();
    let fail = should_fail(state);
    if req.headers().contains_key(EARLY_HEADER) {
        return respond(state, version, StatusCode::OK, full("early"));
    }

    let (parts, mut body) = req.into_parts();
    let mut check = PatternCheck::new();
    let mut text = Vec::new();
    let mut request_trailers = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The caller went away; nobody reads this answer.
            return respond(state, version, StatusCode::BAD_REQUEST, full("body error"));
        };
        if let Some(data) = frame.data_ref() {
            check.feed(data);
            if text.len() < 4096 {
                text.extend_from_slice(&data[..data.len().min(4096 - text.len())]);
            }
        } else if let Some(t) = frame.trailers_ref() {
            request_trailers = pairs(t);
        }
    }
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if fail {
        state.failed.fetch_add(1, Ordering::Relaxed);
        return respond(
            state,
            version,
            StatusCode::SERVICE_UNAVAILABLE,
            full("failing on purpose (set_fail_percent)"),
        );
    }
    let status = status.unwrap_or(StatusCode::OK);
    if let Some(len) = download {
        return respond(
            state,
            version,
            status,
            PatternBody::new(len, 64 << 10).boxed(),
        );
    }
    let echoed = Echoed {
        backend: state.name.clone(),
        version: version.to_string(),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/".to_string(), ToString::to_string),
        authority: parts.uri.authority().map(ToString::to_string).or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        }),
        headers: pairs(&parts.headers),
        body_len: check.len(),
        body_is_pattern: check.ok(),
        body: (check.len() <= 4096)
            .then(|| String::from_utf8(text).ok())
            .flatten(),
        trailers: request_trailers,
    };
    // A HEAD answer has no body (hyper's HTTP/2 server would send one,
    // which an HTTP/2 client takes for a protocol error).
    let json = if parts.method == http::Method::HEAD {
        Vec::new()
    } else {
        serde_json::to_vec(&echoed).unwrap_or_default()
    };
    let body = if trailers {
        WithTrailer {
            data: Some(Bytes::from(json)),
            trailer_sent: false,
        }
        .boxed()
    } else {
        full(json)
    };
    let mut response = respond(state, version, status, body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in extra {
        response.headers_mut().append(name, value);
    }
    response
}

fn should_fail(state: &State) -> bool {
    let percent = u64::from(state.fail_percent.load(Ordering::Relaxed));
    if percent == 0 {
        return false;
    }
    let n = state.fail_counter.fetch_add(1, Ordering::Relaxed) + 1;
    n * percent / 100 != (n - 1) * percent / 100
}

fn respond(state: &State, version: &str, status: StatusCode, body: EchoBody) -> Response<EchoBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&state.name) {
        response.headers_mut().insert(BACKEND_HEADER, v);
    }
    response.headers_mut().insert(
        VERSION_HEADER,
        HeaderValue::from_static(static_version(version)),
    );
    response
}

fn static_version(v: &str) -> &'static str {
    match v {
        "HTTP/2" => "HTTP/2",
        "HTTP/1.1" => "HTTP/1.1",
        "HTTP/1.0" => "HTTP/1.0",
        _ => "other",
    }
}

fn full(data: impl Into<Bytes>) -> EchoBody {
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

fn pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// One data frame, then the trailer `x-echo-trailer: done`.
struct WithTrailer {
    data: Option<Bytes>,
    trailer_sent: bool,
}

impl Body for WithTrailer {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if !this.trailer_sent {
            this.trailer_sent = true;
            let mut t = HeaderMap::new();
            t.insert(TRAILER, HeaderValue::from_static("done"));
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailer_sent
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
