//! The demo's HTTP/1.1 client: `frontend`'s requests to its sidecar, and
//! reads of the admin pages.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::demo::apps::BACKEND_HEADER;

/// Time allowed for one request, response body included. Above the
/// example's route timeout (2 s), so the sidecar's own answer is seen.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The header a Remora sidecar names its own failures in.
const REMORA_ERROR_HEADER: &str = "x-remora-error";

/// A pooled HTTP/1.1 client. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Client {
    inner: HyperClient<HttpConnector, Empty<Bytes>>,
}

/// A response, read whole.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    /// The demo application that answered (`x-backend`), if one did.
    pub(crate) backend: Option<String>,
    /// The sidecar's reason (`x-remora-error`) when it answered itself.
    pub(crate) remora_error: Option<String>,
    pub(crate) body: Bytes,
}

impl Reply {
    /// One line for messages: status, who answered, and why.
    pub(crate) fn describe(&self) -> String {
        let mut out = format!("status {}", self.status.as_u16());
        if let Some(b) = &self.backend {
            out.push_str(&format!(" from {b}"));
        }
        if let Some(e) = &self.remora_error {
            out.push_str(&format!(", x-remora-error: {e}"));
        }
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(120)]);
        let body = body.trim();
        if !body.is_empty() {
            out.push_str(&format!(", body {body:?}"));
        }
        out
    }
}

impl Client {
    /// A client with its own connection pool.
    pub(crate) fn new() -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Client {
            inner: HyperClient::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build(connector),
        }
    }

    /// `GET path` sent to `addr` with `Host: host` and extra headers.
    pub(crate) async fn get(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        headers: &[(&'static str, &'static str)],
    ) -> Result<Reply> {
        let mut request = Request::get(format!("http://{addr}{path}"))
            .header(header::HOST, host)
            .body(Empty::<Bytes>::new())
            .with_context(|| format!("building GET {path} for Host {host}"))?;
        for (name, value) in headers {
            request.headers_mut().append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let what = || format!("GET http://{addr}{path} (Host: {host})");
        let (parts, body) = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let response = self.inner.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok((parts, body))
        })
        .await
        .with_context(|| format!("{}: no response within {REQUEST_TIMEOUT:?}", what()))?
        .with_context(what)?;
        let text = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(Reply {
            status: parts.status,
            backend: text(BACKEND_HEADER),
            remora_error: text(REMORA_ERROR_HEADER),
            body,
        })
    }

    /// `GET path` on an admin or monitoring listener; fails unless 200.
    pub(crate) async fn get_text(&self, addr: SocketAddr, path: &str) -> Result<String> {
        let reply = self.get(addr, &addr.to_string(), path, &[]).await?;
        if reply.status != StatusCode::OK {
            bail!("GET http://{addr}{path}: {}", reply.describe());
        }
        Ok(String::from_utf8_lossy(&reply.body).into_owned())
    }
}
