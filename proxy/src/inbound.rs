//! The inbound side: requests from peer sidecars to the local application.
//!
//! Peers speak HTTP/2 to us (HTTP/1.1 for upgrades) and name the protocol
//! the application speaks in `x-remora-app-protocol`; the request is
//! forwarded to the application in that protocol, with the authority the
//! caller used, so each application sees exactly what its callers sent.
//! Over mTLS the caller's SPIFFE ID goes to the application in
//! `x-remora-peer-identity` and into the metrics' `source_identity` label.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::IntGauge;

use crate::config::AppProtocol;
use crate::errors::ProxyError;
use crate::http::headers::{self, APP_PROTOCOL, PEER_IDENTITY};
use crate::http::observe::{GaugeGuard, Observed};
use crate::http::upgrade;
use crate::listener::Peer;
use crate::metrics::{Direction, Metrics, RouteMetrics};
use crate::outbound::{boxed, hop_for};
use crate::upstream::{self, Body, Pool, Security};

/// Time allowed to connect to the local application.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The inbound request handler.
pub struct Inbound {
    /// The application, unless a connection's original destination says.
    app: Option<SocketAddr>,
    default_protocol: AppProtocol,
    /// Connections to the application, per address (one in explicit mode;
    /// one per port the application listens on when intercepted).
    pools: Mutex<HashMap<SocketAddr, Pool>>,
    metrics: Arc<Metrics>,
    service: String,
    /// Metric handles per caller identity (`""` for plaintext callers);
    /// looked up once per connection, never per request.
    routes: Mutex<HashMap<String, Arc<RouteMetrics>>>,
    in_flight: IntGauge,
}

/// What the inbound side knows about one connection from a peer.
#[derive(Debug)]
pub struct Connection {
    /// `x-remora-peer-identity` for the application, over mTLS.
    identity: Option<HeaderValue>,
    route: Arc<RouteMetrics>,
    /// Where the application is, and the connections to it.
    app: Option<(SocketAddr, Pool)>,
}

impl Inbound {
    /// Forwards to the application at `app` (or, for intercepted
    /// connections, at their original destination), which speaks
    /// `default_protocol` unless the peer says otherwise.
    pub fn new(
        app: Option<SocketAddr>,
        default_protocol: AppProtocol,
        service: &str,
        metrics: Arc<Metrics>,
    ) -> Inbound {
        Inbound {
            app,
            default_protocol,
            pools: Mutex::default(),
            service: service.to_owned(),
            routes: Mutex::default(),
            in_flight: metrics
                .in_flight
                .with_label_values(&[Direction::Inbound.as_str()]),
            metrics,
        }
    }

    /// What requests on a new connection from `peer` share.
    pub fn connection(&self, peer: &Peer) -> Arc<Connection> {
        let source = peer.identity.as_ref().map(ToString::to_string);
        let source = source.as_deref().unwrap_or("");
        let route = {
            let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(routes.entry(source.to_owned()).or_insert_with(|| {
                Arc::new(self.metrics.route_from(
                    Direction::Inbound,
                    &self.service,
                    "inbound",
                    source,
                ))
            }))
        };
        let app = peer.original_dst.or(self.app).map(|addr| {
            let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
            (addr, pools.entry(addr).or_default().clone())
        });
        Arc::new(Connection {
            identity: HeaderValue::from_str(source).ok().filter(|v| !v.is_empty()),
            route,
            app,
        })
    }

    /// Handles one request from a peer. Never fails: errors become
    /// responses that say why.
    pub async fn handle(
        self: Arc<Self>,
        connection: Arc<Connection>,
        mut request: Request<Incoming>,
    ) -> Response<Body> {
        let gauge = GaugeGuard::new(self.in_flight.clone());
        let start = Instant::now();
        let grpc = headers::is_grpc(request.headers());
        let protocol = match request.headers().get(APP_PROTOCOL).map(|v| v.as_bytes()) {
            Some(b"http2") => AppProtocol::Http2,
            Some(b"http1") => AppProtocol::Http1,
            _ => self.default_protocol,
        };
        let authority = match headers::authority(&request) {
            Ok(authority) => authority,
            Err(error) => return self.fail(error, grpc, None),
        };
        let upgrade = headers::is_upgrade(&request);
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        headers::strip_internal(&mut parts.headers);
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        if let Some(identity) = &connection.identity {
            parts.headers.insert(PEER_IDENTITY, identity.clone());
        }
        let route = &connection.route;
        let Some((app, pool)) = &connection.app else {
            return self.fail(
                ProxyError::BadRequest(
                    "no application: the proxy has no --app-addr and the connection was not \
                     intercepted"
                        .to_string(),
                ),
                grpc,
                None,
            );
        };
        let app = *app;

        let result = match downstream_upgrade {
            Some(downstream) => {
                match upstream::request(&parts, &authority, upstream::Hop::Http1, boxed(body)) {
                    Ok(request) => {
                        // Boxed: rare, and its connect future would
                        // otherwise size every request's future.
                        let sent = Box::pin(upstream::send_upgrade(
                            app,
                            Security::Plaintext,
                            APP_CONNECT_TIMEOUT,
                            request,
                        ))
                        .await;
                        sent.map(|mut response| {
                            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                                upgrade::splice(downstream, hyper::upgrade::on(&mut response));
                            }
                            response
                        })
                    }
                    Err(e) => Err(e),
                }
            }
            None => {
                let hop = hop_for(protocol);
                match upstream::request(&parts, &authority, hop, boxed(body)) {
                    Ok(request) => {
                        pool.send(app, hop, Security::Plaintext, APP_CONNECT_TIMEOUT, request)
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        route.duration.observe(start.elapsed().as_secs_f64());
        match result {
            Ok(response) => {
                let (mut head, body) = response.into_parts();
                headers::strip_hop_by_hop(&mut head.headers, head.status.as_u16() == 101);
                let grpc_status = headers::grpc_status(&head.headers);
                let body = Observed::new(
                    body.map_err(Into::into).boxed_unsync(),
                    Arc::clone(route),
                    head.status.as_u16(),
                    grpc_status,
                    None,
                    gauge,
                );
                Response::from_parts(head, body.boxed_unsync())
            }
            Err(error) => {
                let response = self.fail(error, grpc, Some(app));
                route.count(
                    response.status().as_u16(),
                    headers::grpc_status(response.headers()),
                );
                response
            }
        }
    }

    fn fail(&self, error: ProxyError, grpc: bool, app: Option<SocketAddr>) -> Response<Body> {
        self.metrics
            .proxy_errors
            .with_label_values(&[Direction::Inbound.as_str(), error.reason()])
            .inc();
        tracing::debug!(error = %error, app = ?app, "inbound request failed");
        error.to_response(grpc)
    }
}
