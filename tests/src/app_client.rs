//! What an application does with its sidecar: sends HTTP/1.1 or h2c (HTTP/2
//! with prior knowledge) to the sidecar's outbound listener, addressing a
//! service by authority, with any method, headers and (streamed) body.
//!
//! Unlike [`crate::client::HttpClient`], the connection goes to the sidecar
//! while `:authority` names the service, for HTTP/2 too (hyper's pooled
//! client would put the sidecar's address in `:authority`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::echo::Echoed;
use crate::proxy::AppProtocol;

/// The request body type.
pub type ReqBody = BoxBody<Bytes, std::io::Error>;

/// Time allowed for one exchange unless the caller says otherwise.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// An empty body.
pub fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body holding `data`, sent with its length.
pub fn full(data: impl Into<Bytes>) -> ReqBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// Trailers, if any arrived.
    pub trailers: Option<HeaderMap>,
}

impl Exchange {
    /// A response header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `x-remora-error`, if the proxy answered itself.
    pub fn remora_error(&self) -> Option<&str> {
        self.header("x-remora-error")
    }

    /// The body as an [`Echoed`] (what an echo application received).
    pub fn echoed(&self) -> Result<Echoed> {
        if self.status != StatusCode::OK {
            bail!(
                "expected 200 from the echo application, got {}",
                self.describe()
            );
        }
        serde_json::from_slice(&self.body)
            .with_context(|| format!("the body is not an echo: {}", self.describe()))
    }

    /// Status, the proxy's error header and the start of the body.
    pub fn describe(&self) -> String {
        format!(
            "status {} x-remora-error={:?} headers={:?} body={:?}",
            self.status.as_u16(),
            self.remora_error(),
            self.headers,
            String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
        )
    }
}

/// An application's client of its sidecar's outbound listener.
pub struct AppClient {
    addr: SocketAddr,
    protocol: AppProtocol,
    /// One multiplexed connection for HTTP/2, opened on first use.
    h2: Mutex<Option<http2::SendRequest<ReqBody>>>,
}

impl AppClient {
    /// A client sending `protocol` to `addr` (a sidecar's outbound
    /// listener).
    pub fn new(addr: SocketAddr, protocol: AppProtocol) -> AppClient {
        AppClient {
            addr,
            protocol,
            h2: Mutex::new(None),
        }
    }

    /// The protocol it speaks.
    pub fn protocol(&self) -> AppProtocol {
        self.protocol
    }

    /// A request builder addressed to `authority` and `path`, in the form
    /// the protocol needs: origin-form plus `Host` for HTTP/1.1, an
    /// absolute URI (`:authority`) for HTTP/2.
    pub fn request(&self, method: Method, authority: &str, path: &str) -> request::Builder {
        match self.protocol {
            AppProtocol::Http1 => Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, authority),
            AppProtocol::Http2 => Request::builder()
                .method(method)
                .version(http::Version::HTTP_2)
                .uri(format!("http://{authority}{path}")),
        }
    }

    /// Sends a request; the response body is left to the caller. HTTP/1.1
    /// uses a new connection per request.
    pub async fn send(&self, request: Request<ReqBody>) -> Result<Response<Incoming>> {
        let what = format!(
            "{} {} ({:?}, Host {:?}) to {}",
            request.method(),
            request.uri(),
            self.protocol,
            request.headers().get(http::header::HOST),
            self.addr
        );
        let result = match self.protocol {
            AppProtocol::Http1 => self.send_h1(request).await,
            AppProtocol::Http2 => self.send_h2(request).await,
        };
        result.with_context(|| what)
    }

    async fn send_h1(&self, request: Request<ReqBody>) -> Result<Response<Incoming>> {
        let stream = TcpStream::connect(self.addr).await?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender.send_request(request).await?)
    }

    async fn send_h2(&self, request: Request<ReqBody>) -> Result<Response<Incoming>> {
        let mut slot = self.h2.lock().await;
        let mut sender = match slot.as_ref().filter(|s| !s.is_closed()) {
            Some(s) => s.clone(),
            None => {
                let stream = TcpStream::connect(self.addr).await?;
                let _ = stream.set_nodelay(true);
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(stream))
                    .await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                *slot = Some(sender.clone());
                sender
            }
        };
        drop(slot);
        sender.ready().await?;
        Ok(sender.send_request(request).await?)
    }

    /// Sends a request and reads the whole response (at most
    /// [`EXCHANGE_TIMEOUT`]).
    pub async fn exchange(&self, request: Request<ReqBody>) -> Result<Exchange> {
        self.exchange_within(request, EXCHANGE_TIMEOUT).await
    }

    /// [`AppClient::exchange`] with a chosen time limit.
    pub async fn exchange_within(
        &self,
        request: Request<ReqBody>,
        limit: Duration,
    ) -> Result<Exchange> {
        let what = format!("{} {}", request.method(), request.uri());
        tokio::time::timeout(limit, async {
            let response = self.send(request).await?;
            let (parts, body) = response.into_parts();
            let collected = body
                .collect()
                .await
                .with_context(|| format!("{what}: reading the response body"))?;
            let trailers = collected.trailers().cloned();
            Ok(Exchange {
                status: parts.status,
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
            })
        })
        .await
        .with_context(|| format!("{what}: no whole response within {limit:?}"))?
    }

    /// `GET path` on `authority` with `headers`, read whole.
    pub async fn get(
        &self,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Exchange> {
        let mut builder = self.request(Method::GET, authority, path);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        self.exchange(builder.body(empty())?).await
    }
}
