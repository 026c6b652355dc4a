//! The sidecar's mTLS context: its rotating certificate, the trust bundle
//! (which the control plane may change, for root rotation), and the rustls
//! configs built from both. Handshakes in both directions go through here,
//! so each is counted once, by outcome.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntCounterVec;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::{
    ALPN_H2, CredentialResolver, HandshakeFailure, TlsError, TrustBundle, client_config,
    server_config,
};
use crate::identity::SpiffeId;
use crate::metrics::{Direction, Metrics};

/// ALPN for HTTP/1.1 connections between proxies (upgrades, WebSocket).
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The application protocol a client connection negotiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `h2`: every request between proxies.
    H2,
    /// `http/1.1`: upgrade requests, which need a connection of their own.
    Http11,
    /// [`crate::tcp::ALPN_TCP`]: an opaque TCP stream.
    Tcp,
}

/// The configs of one trust bundle. Replaced whole when the bundle changes,
/// which also starts fresh session caches: a session verified against a
/// root that was removed is never resumed.
#[derive(Debug)]
struct Configs {
    bundle: TrustBundle,
    /// The bundle's roots as DER, to tell a real change from a resend.
    root_keys: Vec<Vec<u8>>,
    server: Arc<ServerConfig>,
    client_h2: Arc<ClientConfig>,
    client_http11: Arc<ClientConfig>,
    client_tcp: Arc<ClientConfig>,
}

impl Configs {
    fn new(
        resolver: &Arc<CredentialResolver>,
        bundle: TrustBundle,
        root_keys: Vec<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let mut server = server_config(Arc::clone(resolver), &bundle)?;
        // Upgrades arrive over HTTP/1.1; the listener tells the protocols
        // apart by the preface, so both are offered.
        if let Some(config) = Arc::get_mut(&mut server) {
            config.alpn_protocols = vec![
                ALPN_H2.to_vec(),
                ALPN_HTTP11.to_vec(),
                crate::tcp::ALPN_TCP.to_vec(),
            ];
        }
        let client_h2 = client_config(Arc::clone(resolver), &bundle)?;
        let mut client_http11 = client_config(Arc::clone(resolver), &bundle)?;
        if let Some(config) = Arc::get_mut(&mut client_http11) {
            config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        }
        let mut client_tcp = client_config(Arc::clone(resolver), &bundle)?;
        if let Some(config) = Arc::get_mut(&mut client_tcp) {
            config.alpn_protocols = vec![crate::tcp::ALPN_TCP.to_vec()];
        }
        Ok(Self {
            bundle,
            root_keys,
            server,
            client_h2,
            client_http11,
            client_tcp,
        })
    }
}

/// A handshake that failed: why, in metric terms, and the full reason.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed ({}): {error}", .failure.as_str())]
pub struct HandshakeError {
    /// The classification used for metrics.
    pub failure: HandshakeFailure,
    /// The underlying error.
    pub error: io::Error,
}

/// The workload's mTLS context.
pub struct TlsContext {
    resolver: Arc<CredentialResolver>,
    configs: ArcSwap<Configs>,
    handshakes: IntCounterVec,
    failures: IntCounterVec,
    /// Told about every new bundle (the CA client, which checks the
    /// control plane against it). Called on rotation only, never on the
    /// data path.
    followers: Mutex<Vec<BundleFollower>>,
}

/// Something that must trust the same roots as the data path.
pub type BundleFollower = Box<dyn Fn(&TrustBundle) + Send + Sync>;

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("id", &self.resolver.current().id().to_string())
            .field("roots", &self.root_count())
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    /// A context presenting `resolver`'s credentials and trusting
    /// `bundle`'s roots; handshakes counted in `metrics`.
    pub fn new(
        resolver: Arc<CredentialResolver>,
        bundle: TrustBundle,
        metrics: &Metrics,
    ) -> Result<Self, TlsError> {
        let root_keys = root_keys(&bundle);
        let configs = Configs::new(&resolver, bundle, root_keys)?;
        Ok(Self {
            resolver,
            configs: ArcSwap::from_pointee(configs),
            handshakes: metrics.tls_handshakes.clone(),
            failures: metrics.tls_handshake_failures.clone(),
            followers: Mutex::default(),
        })
    }

    /// Calls `follower` with every bundle set from now on.
    pub fn follow_bundle(&self, follower: BundleFollower) {
        self.followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(follower);
    }

    /// Trusts `pem`'s roots from now on (new handshakes only). Returns
    /// false when they are the roots already trusted.
    pub fn set_bundle_pem(&self, pem: &str) -> Result<bool, TlsError> {
        let trust_domain = self.configs.load().bundle.trust_domain().clone();
        let bundle = TrustBundle::from_pem(trust_domain, pem)?;
        let roots = root_keys(&bundle);
        if roots == self.configs.load().root_keys {
            return Ok(false);
        }
        let configs = Configs::new(&self.resolver, bundle.clone(), roots)?;
        self.configs.store(Arc::new(configs));
        for follower in self
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            follower(&bundle);
        }
        Ok(true)
    }

    /// The credentials were renewed: new handshakes already present them
    /// (the resolver is shared), and this also drops the session caches,
    /// so no session that carries the previous certificate is resumed,
    /// by us or by our peers (new tickets are needed).
    pub fn credentials_renewed(&self) -> Result<(), TlsError> {
        let current = self.configs.load();
        let configs = Configs::new(
            &self.resolver,
            current.bundle.clone(),
            current.root_keys.clone(),
        )?;
        self.configs.store(Arc::new(configs));
        Ok(())
    }

    /// The bundle new handshakes verify peers against.
    pub fn bundle(&self) -> TrustBundle {
        self.configs.load().bundle.clone()
    }

    /// How many roots the bundle holds.
    pub fn root_count(&self) -> usize {
        self.configs.load().root_keys.len()
    }

    /// The identity this workload presents.
    pub fn local_id(&self) -> SpiffeId {
        self.resolver.current().id().clone()
    }

    /// The credentials' resolver (rotated by the renewal loop).
    pub fn resolver(&self) -> &Arc<CredentialResolver> {
        &self.resolver
    }

    /// The client config for `alpn` (for connectors outside the data
    /// path, such as the xDS client).
    pub fn client_config(&self, alpn: Alpn) -> Arc<ClientConfig> {
        let configs = self.configs.load();
        match alpn {
            Alpn::H2 => Arc::clone(&configs.client_h2),
            Alpn::Http11 => Arc::clone(&configs.client_http11),
            Alpn::Tcp => Arc::clone(&configs.client_tcp),
        }
    }

    /// Opens mTLS over `tcp` to a server that must prove the identity
    /// encoded in `server_name` (see [`super::server_name_for`]).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        server_name: ServerName<'static>,
        alpn: Alpn,
        timeout: Duration,
    ) -> Result<client::TlsStream<TcpStream>, HandshakeError> {
        let connector = TlsConnector::from(self.client_config(alpn));
        let result = tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await;
        self.outcome(Direction::Outbound, flatten(result))
    }

    /// Accepts mTLS on `tcp`; the client must present a certificate from
    /// the bundle's trust domain.
    pub async fn accept<IO>(
        &self,
        tcp: IO,
        timeout: Duration,
    ) -> Result<server::TlsStream<IO>, HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(Arc::clone(&self.configs.load().server));
        let result = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
        self.outcome(Direction::Inbound, flatten(result))
    }

    /// Counts a plaintext connection refused on a STRICT port.
    pub fn count_plaintext_refused(&self) {
        self.failures
            .with_label_values(&[Direction::Inbound.as_str(), "plaintext_refused"])
            .inc();
    }

    fn outcome<T>(&self, direction: Direction, result: io::Result<T>) -> Result<T, HandshakeError> {
        match result {
            Ok(stream) => {
                self.handshakes
                    .with_label_values(&[direction.as_str()])
                    .inc();
                Ok(stream)
            }
            Err(error) => {
                let failure = if error.kind() == io::ErrorKind::TimedOut {
                    HandshakeFailure::Timeout
                } else {
                    HandshakeFailure::of_io(&error)
                };
                self.failures
                    .with_label_values(&[direction.as_str(), failure.as_str()])
                    .inc();
                Err(HandshakeError { failure, error })
            }
        }
    }
}

fn flatten<T>(result: Result<io::Result<T>, tokio::time::error::Elapsed>) -> io::Result<T> {
    match result {
        Ok(inner) => inner,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the TLS handshake did not finish in time",
        )),
    }
}

fn root_keys(bundle: &TrustBundle) -> Vec<Vec<u8>> {
    let mut roots: Vec<Vec<u8>> = bundle
        .roots()
        .roots
        .iter()
        .map(|anchor| anchor.subject_public_key_info.as_ref().to_vec())
        .collect();
    roots.sort();
    roots
}
