//! An HTTP/1.1 client for sending requests through Envoy (and reading admin
//! pages), plus a tally of which backend answered.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::upstream::BACKEND_HEADER;

/// Time allowed for one request, response body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled HTTP/1.1 client. Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient::new()
    }
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// The `x-backend` header the test servers set, if any.
    pub backend: Option<String>,
    /// All response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Reply {
    /// What answered, for tallies: the backend name on a 200 with
    /// `x-backend`, else `status <code>` (and Envoy's reason, if it gave one).
    pub fn outcome(&self) -> String {
        match (&self.backend, self.status) {
            (Some(b), StatusCode::OK) => b.clone(),
            _ => {
                let flags = self
                    .headers
                    .get("x-envoy-response-flags")
                    .and_then(|v| v.to_str().ok())
                    .map(|f| format!(" flags={f}"))
                    .unwrap_or_default();
                format!(
                    "status {}{flags} body={:?}",
                    self.status.as_u16(),
                    String::from_utf8_lossy(&self.body[..self.body.len().min(80)])
                )
            }
        }
    }
}

impl HttpClient {
    /// A client with its own connection pool.
    pub fn new() -> HttpClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        HttpClient {
            inner: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build(connector),
        }
    }

    /// Sends `GET path` to `addr` with the given `Host` (`:authority`) and
    /// extra headers, and reads the whole response.
    pub async fn get(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        let mut req = Request::get(format!("http://{addr}{path}"))
            .header(header::HOST, host)
            .body(Empty::<Bytes>::new())
            .context("building request")?;
        for (name, value) in headers {
            req.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes())?,
                http::HeaderValue::from_str(value)?,
            );
        }
        let what = format!("GET http://{addr}{path} (Host: {host}, headers {headers:?})");
        let res = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let res = self.inner.request(req).await?;
            let (parts, body) = res.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok((parts, body))
        })
        .await
        .with_context(|| format!("{what}: no response within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| what.clone())?;
        let (parts, body) = res;
        Ok(Reply {
            status: parts.status,
            backend: parts
                .headers
                .get(BACKEND_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            headers: parts.headers,
            body,
        })
    }

    /// `GET path` on an admin or monitoring port; fails unless the status is
    /// 200. Returns the body as text.
    pub async fn admin_get(&self, addr: SocketAddr, path: &str) -> Result<String> {
        let (status, body) = self.admin_get_status(addr, path).await?;
        if status != StatusCode::OK {
            bail!("GET http://{addr}{path} answered {status}: {body}");
        }
        Ok(body)
    }

    /// `GET path` on an admin or monitoring port, any status.
    pub async fn admin_get_status(
        &self,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(StatusCode, String)> {
        let reply = self.get(addr, &addr.to_string(), path, &[]).await?;
        Ok((
            reply.status,
            String::from_utf8_lossy(&reply.body).into_owned(),
        ))
    }

    /// Sends `count` requests (`concurrency` at a time) and tallies which
    /// backend answered each.
    pub async fn tally(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        count: usize,
        concurrency: usize,
    ) -> Result<Tally> {
        let concurrency = concurrency.clamp(1, count.max(1));
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..concurrency {
            let n = count / concurrency + usize::from(w < count % concurrency);
            let client = self.clone();
            let host = host.to_string();
            let path = path.to_string();
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            workers.spawn(async move {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let mut tally = Tally::default();
                for _ in 0..n {
                    let reply = client.get(addr, &host, &path, &headers).await?;
                    tally.add(reply.outcome());
                }
                anyhow::Ok(tally)
            });
        }
        let mut tally = Tally::default();
        while let Some(part) = workers.join_next().await {
            tally.merge(part.context("request worker panicked")??);
        }
        Ok(tally)
    }
}

/// How many requests each backend (or failure) answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    counts: BTreeMap<String, usize>,
}

impl Tally {
    /// Counts one answer.
    pub fn add(&mut self, outcome: String) {
        *self.counts.entry(outcome).or_default() += 1;
    }

    /// Adds another tally's counts.
    pub fn merge(&mut self, other: Tally) {
        for (k, v) in other.counts {
            *self.counts.entry(k).or_default() += v;
        }
    }

    /// Answers from `outcome`.
    pub fn count(&self, outcome: &str) -> usize {
        self.counts.get(outcome).copied().unwrap_or(0)
    }

    /// All answers.
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// Share of `outcome` in percent (0 when empty).
    pub fn percent(&self, outcome: &str) -> f64 {
        match self.total() {
            0 => 0.0,
            total => 100.0 * self.count(outcome) as f64 / total as f64,
        }
    }

    /// Every outcome and its count.
    pub fn counts(&self) -> &BTreeMap<String, usize> {
        &self.counts
    }

    /// Fails unless every answer came from one of `backends`.
    pub fn only_from(&self, backends: &[&str]) -> Result<()> {
        let others: Vec<_> = self
            .counts
            .keys()
            .filter(|k| !backends.contains(&k.as_str()))
            .collect();
        if !others.is_empty() {
            bail!("expected answers only from {backends:?}, got {self}");
        }
        Ok(())
    }

    /// Fails unless `outcome`'s share is `expected` ± `tolerance` percentage
    /// points.
    pub fn expect_share(&self, outcome: &str, expected: f64, tolerance: f64) -> Result<()> {
        let got = self.percent(outcome);
        if (got - expected).abs() > tolerance {
            bail!(
                "expected {outcome} to answer {expected}% ± {tolerance} points of requests, \
                 got {got:.1}%: {self}"
            );
        }
        Ok(())
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} answers {{", self.total())?;
        for (i, (k, v)) in self.counts.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{k}: {v} ({:.1}%)", self.percent(k))?;
        }
        write!(f, "}}")
    }
}
