//! The outbound side: requests from the local application to the mesh.
//!
//! In the order a request flows: the listener hands it here; it is routed
//! by authority and route match; hop-by-hop and internal headers are
//! removed; then tries are made under the route timeout, each to a cluster
//! of the weighted split and an endpoint picked by the balancer, under the
//! per-try timeout, until one succeeds or the retry policy, the retry
//! budget or the replay buffer says stop. Endpoints with a sidecar are
//! reached over mTLS and HTTP/2, the sidecar proving the identity the
//! control plane gave the endpoint, with the destination's protocol named
//! in `x-remora-app-protocol`, so the peer restores it; others in
//! plaintext and their own protocol.

use std::sync::Arc;
use std::time::Instant;

use http::uri::Authority;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::IntGauge;

use crate::balance::{self, InFlight};
use crate::config::{AppProtocol, Cluster, ConfigStore, Endpoint, Route};
use crate::errors::ProxyError;
use crate::http::drain::Drained;
use crate::http::headers::{self, APP_PROTOCOL};
use crate::http::observe::{GaugeGuard, Observed};
use crate::http::retry::{self, ReplayBody};
use crate::http::upgrade;
use crate::metrics::{Direction, Metrics};
use crate::tls::TlsContext;
use crate::upstream::{self, Body, Hop, ResponseBody, Security};

/// How long a request on a route without a timeout may wait for its
/// response to start.
pub const STREAM_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The outbound request handler.
pub struct Outbound {
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
    in_flight: IntGauge,
    /// mTLS to peer sidecars; `None` when the proxy runs without identity.
    tls: Option<Arc<TlsContext>>,
}

impl Outbound {
    /// A handler reading config from `store`, reaching peer sidecars over
    /// `tls`.
    pub fn new(
        store: Arc<ConfigStore>,
        metrics: Arc<Metrics>,
        tls: Option<Arc<TlsContext>>,
    ) -> Outbound {
        let in_flight = metrics
            .in_flight
            .with_label_values(&[Direction::Outbound.as_str()]);
        Outbound {
            store,
            metrics,
            in_flight,
            tls,
        }
    }

    /// Handles one request from the application. Never fails: errors
    /// become responses that say why. `port` is the original destination
    /// port of an intercepted connection, whose route table applies;
    /// `None` in explicit mode (the `outbound` table).
    pub async fn handle(
        self: Arc<Self>,
        port: Option<u16>,
        mut request: Request<Incoming>,
    ) -> Response<Body> {
        let gauge = GaugeGuard::new(self.in_flight.clone());
        let grpc = headers::is_grpc(request.headers());
        let config = self.store.load();
        let table = match port {
            None => config.outbound.as_deref(),
            Some(port) => config.intercepted.ports.get(&port).map(Arc::as_ref),
        };
        let Some(table) = table else {
            return self.fail(ProxyError::NotReady, grpc);
        };
        let authority = match headers::authority(&request) {
            Ok(authority) => authority,
            Err(error) => return self.fail(error, grpc),
        };
        let upgrade = headers::is_upgrade(&request);
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let Some((_, route)) = table.route(authority.as_str(), &parts) else {
            return self.fail(
                ProxyError::NoRoute(format!("{authority}{}", parts.uri.path())),
                grpc,
            );
        };
        headers::strip_internal(&mut parts.headers);
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);

        let start = Instant::now();
        let cancelled = CountIfCancelled::new(&route.metrics);
        let result = match downstream_upgrade {
            // Boxed: rare, and its connect future would otherwise size
            // every request's future.
            Some(downstream) => {
                Box::pin(self.upgrade(route, &parts, body, &authority, downstream)).await
            }
            None => self.forward(route, &parts, body, &authority).await,
        };
        cancelled.disarm();
        route
            .metrics
            .duration
            .observe(start.elapsed().as_secs_f64());
        match result {
            Ok((response, in_flight)) => {
                let (mut head, body) = response.into_parts();
                headers::strip_hop_by_hop(&mut head.headers, head.status.as_u16() == 101);
                let grpc_status = headers::grpc_status(&head.headers);
                let body = Observed::new(
                    body.map_err(Into::into).boxed_unsync(),
                    route.metrics.clone(),
                    head.status.as_u16(),
                    grpc_status,
                    Some(in_flight),
                    gauge,
                );
                Response::from_parts(head, body.boxed_unsync())
            }
            Err(error) => {
                match error {
                    ProxyError::RouteTimeout(_) => route.metrics.timeout("route"),
                    ProxyError::IdleTimeout(_) => route.metrics.timeout("idle"),
                    _ => {}
                }
                let response = self.fail(error, grpc);
                route.metrics.count(
                    response.status().as_u16(),
                    headers::grpc_status(response.headers()),
                );
                response
            }
        }
    }

    /// Tries under the route's timeout and retry policy.
    async fn forward(
        &self,
        route: &Route,
        parts: &http::request::Parts,
        body: Incoming,
        authority: &Authority,
    ) -> Result<(Response<ResponseBody>, InFlight), ProxyError> {
        let action = &route.action;
        let tries = async {
            let Some(policy) = action.retry.as_ref() else {
                let (cluster, endpoint) = pick(route, None)?;
                return self
                    .try_once(cluster, endpoint, parts, authority, boxed(body))
                    .await;
            };
            policy.budget.deposit(Instant::now());
            let (first, replayer) = ReplayBody::new(Drained::new(body));
            let mut next_body = Some(first);
            let mut failed: Option<Arc<Endpoint>> = None;
            let mut retries = 0;
            loop {
                let (cluster, endpoint) = pick(route, failed.as_ref())?;
                let body = next_body
                    .take()
                    .map_or_else(crate::errors::empty, BodyExt::boxed_unsync);
                let outcome = match policy.per_try_timeout {
                    Some(limit) => {
                        match tokio::time::timeout(
                            limit,
                            self.try_once(cluster, endpoint.clone(), parts, authority, body),
                        )
                        .await
                        {
                            Ok(outcome) => outcome,
                            Err(_) => {
                                route.metrics.timeout("per_try");
                                Err(ProxyError::PerTryTimeout(limit))
                            }
                        }
                    }
                    None => {
                        self.try_once(cluster, endpoint.clone(), parts, authority, body)
                            .await
                    }
                };
                let retry_allowed = retries < policy.num_retries
                    && retry::retryable(policy, outcome.as_ref().map(|(r, _)| r));
                if !retry_allowed {
                    return outcome;
                }
                let Some(again) = replayer.retry() else {
                    return outcome;
                };
                if !policy.budget.try_withdraw(Instant::now()) {
                    route.metrics.budget_exhausted.inc();
                    return outcome;
                }
                drop(outcome);
                retries += 1;
                route.metrics.retries.inc();
                failed = Some(endpoint);
                next_body = Some(again);
                tokio::time::sleep(retry::backoff(policy, retries)).await;
            }
        };
        // A route without a timeout still does not wait forever for a
        // response to start (Envoy's stream idle timeout, 5 minutes).
        let (limit, error) = match action.timeout {
            Some(limit) => (limit, ProxyError::RouteTimeout(limit)),
            None => (
                STREAM_IDLE_TIMEOUT,
                ProxyError::IdleTimeout(STREAM_IDLE_TIMEOUT),
            ),
        };
        tokio::time::timeout(limit, tries)
            .await
            .unwrap_or(Err(error))
    }

    /// An HTTP/1.1 upgrade: one try, on a connection of its own.
    async fn upgrade(
        &self,
        route: &Route,
        parts: &http::request::Parts,
        body: Incoming,
        authority: &Authority,
        downstream: hyper::upgrade::OnUpgrade,
    ) -> Result<(Response<ResponseBody>, InFlight), ProxyError> {
        let (cluster, endpoint) = pick(route, None)?;
        let addr = endpoint.key.proxy.unwrap_or(endpoint.key.app);
        let mut request = upstream::request(parts, authority, Hop::Http1, boxed(body))?;
        if endpoint.key.proxy.is_some() {
            request
                .headers_mut()
                .insert(APP_PROTOCOL, app_protocol_value(AppProtocol::Http1));
        }
        let security = self.security(&endpoint);
        let mut response =
            upstream::send_upgrade(addr, security, cluster.connect_timeout, request).await?;
        let in_flight = InFlight::new(endpoint);
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            upgrade::splice(downstream, hyper::upgrade::on(&mut response));
        }
        Ok((response, in_flight))
    }

    /// One try to one endpoint.
    async fn try_once(
        &self,
        cluster: &Cluster,
        endpoint: Arc<Endpoint>,
        parts: &http::request::Parts,
        authority: &Authority,
        body: Body,
    ) -> Result<(Response<ResponseBody>, InFlight), ProxyError> {
        let (addr, hop) = match endpoint.key.proxy {
            Some(proxy) => (proxy, Hop::Http2),
            None => (endpoint.key.app, hop_for(cluster.protocol)),
        };
        let mut request = upstream::request(parts, authority, hop, body)?;
        if endpoint.key.proxy.is_some() {
            request
                .headers_mut()
                .insert(APP_PROTOCOL, app_protocol_value(cluster.protocol));
        }
        let in_flight = InFlight::new(endpoint.clone());
        let response = endpoint
            .pool
            .send(
                addr,
                hop,
                self.security(&endpoint),
                cluster.connect_timeout,
                request,
            )
            .await?;
        Ok((response, in_flight))
    }

    /// mTLS to endpoints with a sidecar (expecting the identity the
    /// control plane gave them), plaintext to the others.
    fn security<'a>(&'a self, endpoint: &'a Endpoint) -> Security<'a> {
        match (self.tls.as_deref(), &endpoint.server_name) {
            (Some(tls), Some(server_name)) => Security::Mtls { tls, server_name },
            _ => Security::Plaintext,
        }
    }

    fn fail(&self, error: ProxyError, grpc: bool) -> Response<Body> {
        self.metrics
            .proxy_errors
            .with_label_values(&[Direction::Outbound.as_str(), error.reason()])
            .inc();
        tracing::debug!(error = %error, "outbound request failed");
        error.to_response(grpc)
    }
}

/// Counts a request whose caller went away before its response started
/// (the handler's future is dropped), as status 499 the way nginx logs it,
/// so cancellations show in `remora_proxy_requests_total`.
struct CountIfCancelled<'a>(Option<&'a crate::metrics::RouteMetrics>);

impl<'a> CountIfCancelled<'a> {
    fn new(metrics: &'a crate::metrics::RouteMetrics) -> Self {
        CountIfCancelled(Some(metrics))
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CountIfCancelled<'_> {
    fn drop(&mut self) {
        if let Some(metrics) = self.0 {
            metrics.count(499, None);
        }
    }
}

/// The cluster of the weighted split and the endpoint to try.
fn pick<'r>(
    route: &'r Route,
    avoid: Option<&Arc<Endpoint>>,
) -> Result<(&'r Cluster, Arc<Endpoint>), ProxyError> {
    let action = &route.action;
    let backend = balance::pick_backend(&action.backends, action.total_weight)
        .ok_or_else(|| ProxyError::ClusterNotFound(route.name.clone()))?;
    let cluster = backend.cluster.as_ref();
    let endpoint = balance::pick_endpoint(cluster, avoid)
        .ok_or_else(|| ProxyError::NoEndpoint(cluster.name.clone()))?;
    Ok((cluster, endpoint))
}

/// A downstream body as the proxy's body type, drained rather than reset
/// if the next hop stops reading it early (see `http/drain.rs`).
pub fn boxed(body: Incoming) -> Body {
    Drained::new(body).map_err(Into::into).boxed_unsync()
}

/// The hop that speaks an application protocol.
pub fn hop_for(protocol: AppProtocol) -> Hop {
    match protocol {
        AppProtocol::Http1 => Hop::Http1,
        AppProtocol::Http2 => Hop::Http2,
    }
}

/// The `x-remora-app-protocol` value for a protocol.
pub fn app_protocol_value(protocol: AppProtocol) -> HeaderValue {
    match protocol {
        AppProtocol::Http1 => HeaderValue::from_static("http1"),
        AppProtocol::Http2 => HeaderValue::from_static("http2"),
    }
}
