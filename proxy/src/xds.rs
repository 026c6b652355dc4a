//! The xDS client: one ADS stream (state of the world) to the control
//! plane, for as long as the proxy runs.
//!
//! The protocol lives in [`client::AdsClient`], a state machine without
//! sockets; this module connects, feeds it responses, sends what it answers,
//! publishes each new config to the [`ConfigStore`], and reconnects with a
//! capped, jittered exponential backoff. The last good config keeps serving
//! while the control plane is away: the store is never cleared, and `/ready`
//! stays true once a complete config was applied.
//!
//! With mTLS on (the normal case) the stream runs over TLS to the control
//! plane's port 15012: the proxy presents its workload certificate and
//! checks the control plane's SPIFFE ID, and it subscribes to the trust
//! bundle (`ROOTCA`) so a root rotation reaches every handshake at once.

pub mod client;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use remora_xds_proto::pb::envoy::config::core::v3::Node;
use remora_xds_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::backoff::Backoff;
use crate::config::compile::{ROOTCA, ResourceKind};
use crate::config::{ConfigStore, State};
use crate::tls::{Alpn, TlsContext};
use client::{AdsClient, Step, TypeStatus};

/// First reconnect delay (before jitter).
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Time allowed to open the connection to the control plane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings find a control plane that vanished without closing.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response accepted; a big mesh's endpoints exceed tonic's 4 MiB
/// default.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Where the control plane is and how the proxy presents itself.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// The control plane's gRPC address: `http://127.0.0.1:15010`, or
    /// `host:port` (plaintext is assumed).
    pub control_plane: String,
    /// The node descriptor sent on the first request of each stream.
    pub node: Node,
    /// mTLS to the control plane, which must prove the identity encoded
    /// in the server name; `None` for plaintext (testing against other
    /// xDS servers).
    pub tls: Option<(Arc<TlsContext>, ServerName<'static>)>,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The address is not a URI.
    #[error("invalid control plane address {address:?}: {reason}")]
    Address {
        /// What was configured.
        address: String,
        /// Why it is not a URI.
        reason: String,
    },
    /// The connection could not be opened.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The control plane ended the stream with a gRPC status.
    #[error("stream failed: {0}")]
    Rpc(String),
    /// The control plane closed the stream.
    #[error("the control plane closed the stream")]
    Closed,
}

/// Runs the ADS client forever: connect, subscribe, apply, reconnect.
pub async fn run(
    config: XdsConfig,
    store: Arc<ConfigStore>,
    state: Arc<State>,
    status: Arc<XdsStatus>,
) {
    let address = if config.control_plane.contains("://") {
        config.control_plane.clone()
    } else {
        format!("http://{}", config.control_plane)
    };
    status.update(|s| s.control_plane = address.clone());
    let mut client = AdsClient::new(config.node);
    if config.tls.is_some() {
        client = client.with_secrets([ROOTCA]);
    }
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX, fastrand::Rng::new());
    let mut connects: u64 = 0;
    // Consecutive failures to open a stream; logged at warn on the first
    // and then about once a minute, so hours without a control plane do
    // not flood the log.
    let mut failures: u64 = 0;
    loop {
        let mut session = Session {
            address: &address,
            tls: config.tls.as_ref(),
            client: &mut client,
            store: &store,
            state: &state,
            status: &status,
            connected: false,
            received: false,
        };
        let error = session.stream(&mut connects).await;
        let (connected, received) = (session.connected, session.received);
        state.metrics.xds_connected.set(0);
        let reason = error.to_string();
        status.update(|s| {
            s.connected = false;
            s.last_error = Some(reason.clone());
            s.types = client.status();
        });
        if received {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        if connected {
            failures = 0;
            tracing::warn!(
                control_plane = %address,
                %reason,
                retry_in = ?delay,
                "xDS stream to the control plane ended; serving the last good config meanwhile"
            );
        } else {
            failures += 1;
            if failures == 1 || failures.is_multiple_of(12) {
                tracing::warn!(
                    control_plane = %address,
                    %reason,
                    attempts = failures,
                    retry_in = ?delay,
                    "cannot reach the control plane; serving the last good config meanwhile \
                     (check --control-plane and that the control plane is up)"
                );
            } else {
                tracing::debug!(control_plane = %address, %reason, "cannot reach the control plane");
            }
        }
        tokio::time::sleep(delay).await;
    }
}

/// One stream's worth of borrowed state.
struct Session<'a> {
    address: &'a str,
    tls: Option<&'a (Arc<TlsContext>, ServerName<'static>)>,
    client: &'a mut AdsClient,
    store: &'a ConfigStore,
    state: &'a State,
    status: &'a XdsStatus,
    /// The stream was established.
    connected: bool,
    /// At least one response arrived (the backoff starts over).
    received: bool,
}

impl Session<'_> {
    /// Runs one stream until it fails; returns why.
    async fn stream(&mut self, connects: &mut u64) -> XdsError {
        match self.try_stream(connects).await {
            Ok(()) => XdsError::Closed,
            Err(e) => e,
        }
    }

    async fn try_stream(&mut self, connects: &mut u64) -> Result<(), XdsError> {
        let endpoint = tonic::transport::Endpoint::from_shared(self.address.to_string())
            .map_err(|e| XdsError::Address {
                address: self.address.to_string(),
                reason: chain(&e),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = match self.tls {
            None => endpoint.connect().await,
            Some((tls, server_name)) => {
                let tls = Arc::clone(tls);
                let server_name = server_name.clone();
                let authority = endpoint.uri().authority().map(ToString::to_string);
                let connector = tower::service_fn(move |_uri: http::Uri| {
                    let tls = Arc::clone(&tls);
                    let server_name = server_name.clone();
                    let authority = authority.clone().unwrap_or_default();
                    async move {
                        let tcp = TcpStream::connect(authority.as_str()).await?;
                        tcp.set_nodelay(true)?;
                        let stream = tls
                            .connect(tcp, server_name, Alpn::H2, CONNECT_TIMEOUT)
                            .await
                            .map_err(std::io::Error::other)?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                });
                endpoint.connect_with_connector(connector).await
            }
        }
        .map_err(|e| XdsError::Connect(chain(&e)))?;
        let mut grpc = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);

        let (tx, rx) = mpsc::channel(64);
        for request in self.client.on_connect() {
            // The channel is empty and larger than the opening requests.
            if tx.try_send(request).is_err() {
                return Err(XdsError::Rpc("request queue full".to_string()));
            }
        }
        let mut responses = grpc
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|s| XdsError::Rpc(status_text(&s)))?
            .into_inner();

        self.connected = true;
        *connects += 1;
        if *connects > 1 {
            self.state.metrics.xds_reconnects.inc();
        }
        self.state.metrics.xds_connected.set(1);
        self.status.update(|s| {
            s.connected = true;
            s.connects = *connects;
            s.types = self.client.status();
        });
        tracing::info!(control_plane = %self.address, "xDS stream to the control plane is up");

        loop {
            let response = match responses.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Ok(()),
                Err(s) => return Err(XdsError::Rpc(status_text(&s))),
            };
            self.received = true;
            let step = self.client.on_response(response, unix_now());
            self.publish(&step);
            for request in step.requests {
                if tx.send(request).await.is_err() {
                    // The request stream is gone: the call ended.
                    return Ok(());
                }
            }
            self.status.update(|s| s.types = self.client.status());
        }
    }

    /// Publishes the config a step changed, and reports what happened.
    fn publish(&self, step: &Step) {
        let Some(kind) = step.kind else { return };
        let metrics = &self.state.metrics;
        let ty = kind.short_name();
        if step.changed {
            let (config, complete) = self.client.build(self.state);
            if kind == ResourceKind::Secret {
                self.update_trust_bundle(config.trust_bundle_pem.as_deref());
            }
            self.store.store(config, complete);
        }
        if let Some((previous, version)) = &step.accepted {
            if previous.as_deref() != Some(version.as_str()) {
                if let Some(previous) = previous {
                    let _ = metrics.xds_version.remove_label_values(&[ty, previous]);
                }
                metrics.xds_version.with_label_values(&[ty, version]).set(1);
                tracing::info!(
                    r#type = ty,
                    version,
                    ready = self.store.is_ready(),
                    "applied xDS update"
                );
            }
            metrics
                .xds_last_update
                .with_label_values(&[ty])
                .set(i64::try_from(unix_now()).unwrap_or(i64::MAX));
        }
        if let Some(nack) = &step.rejected {
            metrics.xds_nacks.with_label_values(&[ty]).inc();
            tracing::warn!(
                r#type = ty,
                version = nack.version,
                "rejected xDS update (NACK); the valid resources still apply:\n{}",
                nack.message
            );
        }
    }
}

impl Session<'_> {
    /// New handshakes trust the roots of the `ROOTCA` secret.
    fn update_trust_bundle(&self, pem: Option<&str>) {
        let (Some((tls, _)), Some(pem)) = (self.tls, pem) else {
            return;
        };
        match tls.set_bundle_pem(pem) {
            Ok(true) => tracing::info!(
                roots = tls.root_count(),
                "the trust bundle changed; new handshakes use it"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "cannot use the trust bundle from the control plane; keeping the current one"
            ),
        }
    }
}

// === Status ===

/// What `/config_dump` shows about xDS. Updated by [`run`], read by the
/// admin server; the lock is held only to copy.
#[derive(Debug, Default)]
pub struct XdsStatus {
    inner: Mutex<XdsStatusSnapshot>,
}

/// A copy of the xDS status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct XdsStatusSnapshot {
    /// The control plane's address.
    pub control_plane: String,
    /// True while a stream is up.
    pub connected: bool,
    /// Streams opened so far.
    pub connects: u64,
    /// Why the last stream or connection attempt ended.
    pub last_error: Option<String>,
    /// Per type: versions, nonce, subscription, last NACK.
    pub types: std::collections::BTreeMap<&'static str, TypeStatus>,
}

impl XdsStatus {
    /// An empty status (not connected yet).
    pub fn new() -> XdsStatus {
        XdsStatus::default()
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> XdsStatusSnapshot {
        self.lock().clone()
    }

    fn update(&self, f: impl FnOnce(&mut XdsStatusSnapshot)) {
        f(&mut self.lock());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, XdsStatusSnapshot> {
        // Plain data, consistent after any panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === Helpers ===

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An error and its sources on one line: tonic's transport errors say
/// little at the top level, and often repeat themselves below.
fn chain(e: &dyn std::error::Error) -> String {
    with_sources(e.to_string(), e.source())
}

fn status_text(s: &tonic::Status) -> String {
    with_sources(
        format!("{:?}: {}", s.code(), s.message()),
        std::error::Error::source(s),
    )
}

fn with_sources(mut text: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_snapshot_serializes() {
        let status = XdsStatus::new();
        status.update(|s| {
            s.control_plane = "http://127.0.0.1:15010".into();
            s.last_error = Some("cannot connect".into());
        });
        let json = serde_json::to_value(status.snapshot()).expect("serializes");
        assert_eq!(json["control_plane"], "http://127.0.0.1:15010");
        assert_eq!(json["connected"], false);
    }
}
