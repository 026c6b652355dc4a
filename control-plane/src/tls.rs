//! The control plane's TLS listener (default `127.0.0.1:15012`): TLS 1.3
//! only, ALPN `h2`, rustls with the ring provider.
//!
//! - The serving certificate is issued by the control plane's own CA for
//!   [`control_plane_spiffe_id`], with a key made in memory, and renewed at
//!   half-life by [`ServingCert::renew_forever`]; handshakes pick up the
//!   current one through [`ServingCert`]'s [`ResolvesServerCert`].
//! - Client certificates are optional (a workload without one yet calls
//!   `Sign` with its bootstrap token); one that is presented must chain to
//!   the trust bundle. The client's SPIFFE ID, if any, travels to the gRPC
//!   services as [`TlsPeer`] (`Request::extensions`).
//! - [`incoming`] accepts connections and handshakes them in tasks of their
//!   own; a failed handshake is logged at debug and counted in
//!   `remora_tls_handshake_failures_total`, and never ends the listener.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{Ca, CaError};

/// Namespace of the control plane's own identity.
pub const NAMESPACE: &str = "remora-system";
/// Service account of the control plane's own identity.
pub const SERVICE_ACCOUNT: &str = "remora-control-plane";
/// ALPN protocol of the listener.
pub const ALPN_H2: &[u8] = b"h2";
/// How long a client has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait before retrying a failed renewal.
const RENEW_RETRY: Duration = Duration::from_secs(30);

/// The control plane's SPIFFE ID in `trust_domain`.
pub fn control_plane_spiffe_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}")
}

/// The only crypto provider the control plane uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why the TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA could not issue the serving certificate.
    #[error("cannot issue the control plane's serving certificate: {0}")]
    Ca(#[from] CaError),
    /// A key or CSR could not be made.
    #[error("cannot make the control plane's serving key or CSR: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a certificate, key or the configuration.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// rustls refused to build the client-certificate verifier.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

// === ServingCert ===

struct Issued {
    key: Arc<CertifiedKey>,
    not_before: OffsetDateTime,
    /// When it was signed (`not_before` is a minute earlier).
    issued_at: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// The control plane's serving certificate, issued by its own CA and
/// swapped in place on renewal.
pub struct ServingCert {
    ca: Arc<Ca>,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Issued>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current.load();
        f.debug_struct("ServingCert")
            .field("spiffe_id", &self.spiffe_id())
            .field("not_before", &current.not_before)
            .field("not_after", &current.not_after)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Issues a first certificate, valid for `ttl` (shortened to the CA's
    /// own expiry).
    pub fn issue(ca: Arc<Ca>, ttl: Duration) -> Result<Arc<ServingCert>, TlsError> {
        let provider = provider();
        let first = Self::make(&ca, ttl, &provider, OffsetDateTime::now_utc())?;
        Ok(Arc::new(ServingCert {
            ca,
            ttl,
            provider,
            current: ArcSwap::from_pointee(first),
        }))
    }

    fn make(
        ca: &Ca,
        ttl: Duration,
        provider: &CryptoProvider,
        now: OffsetDateTime,
    ) -> Result<Issued, TlsError> {
        let id = control_plane_spiffe_id(ca.trust_domain());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let leaf = ca.sign_csr(&csr, &id, ttl, now)?;
        let mut chain = vec![leaf.cert.clone()];
        chain.extend(leaf.chain.iter().cloned());
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = provider.key_provider.load_private_key(der)?;
        Ok(Issued {
            key: Arc::new(CertifiedKey::new(chain, signing_key)),
            // As `Ca::sign_csr` sets it.
            not_before: now - crate::ca::CLOCK_SKEW,
            issued_at: now,
            not_after: leaf.not_after,
        })
    }

    /// The SPIFFE ID the certificate carries.
    pub fn spiffe_id(&self) -> String {
        control_plane_spiffe_id(self.ca.trust_domain())
    }

    /// The current certificate chain (leaf first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().key.cert.clone()
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.current.load().not_after
    }

    /// Half-way through the current certificate's life, counted from when
    /// it was issued: `notBefore` is backdated for clock skew, and counting
    /// from it would renew a short-lived certificate at once, again and
    /// again.
    pub fn renew_at(&self) -> OffsetDateTime {
        let current = self.current.load();
        current.issued_at + (current.not_after - current.issued_at) / 2
    }

    /// Issues a new certificate and key now and swaps them in; handshakes
    /// already under way keep the old one.
    pub fn renew(&self) -> Result<(), TlsError> {
        let next = Self::make(
            &self.ca,
            self.ttl,
            &self.provider,
            OffsetDateTime::now_utc(),
        )?;
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// Renews at half-life, forever (retrying failures every 30 s until the
    /// certificate expires, and after).
    pub async fn renew_forever(self: Arc<Self>) {
        loop {
            let wait = self.renew_at() - OffsetDateTime::now_utc();
            let wait = Duration::try_from(wait)
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            loop {
                match self.renew() {
                    Ok(()) => {
                        tracing::info!(
                            spiffe_id = self.spiffe_id(),
                            expires = %self.not_after(),
                            "renewed the control plane's serving certificate"
                        );
                        break;
                    }
                    Err(e) => {
                        tracing::error!(
                            error = %e,
                            expires = %self.not_after(),
                            "cannot renew the control plane's serving certificate; retrying in 30s"
                        );
                        tokio::time::sleep(RENEW_RETRY).await;
                    }
                }
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

/// The listener's rustls configuration: TLS 1.3 only, ALPN `h2`, the
/// serving certificate from `cert`, optional client certificates verified
/// against `ca`'s trust bundle.
pub fn server_config(ca: &Ca, cert: Arc<ServingCert>) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for root in ca.trust_bundle() {
        roots.add(root)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

// === Connections ===

/// Who is at the other end of a TLS connection: what tonic's
/// `Request::extensions()` holds for requests on the TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPeer {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// The SPIFFE ID of the client's certificate, if it presented one
    /// (verified against the trust bundle) with exactly one `spiffe://`
    /// URI SAN.
    pub spiffe_id: Option<String>,
}

/// An accepted, handshaken TLS connection.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl std::fmt::Debug for TlsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnection")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl TlsConnection {
    /// Who the peer is.
    pub fn peer(&self) -> &TlsPeer {
        &self.peer
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The single `spiffe://` URI SAN of a DER certificate, if it has exactly one.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_owned()),
        _ => None,
    });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// Accepts TCP connections on `listener` and handshakes each in a task of
/// its own, yielding the connections that complete the handshake. Ends when
/// `stop` turns true (or the receiving side is dropped).
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    handshake_failures: IntCounter,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<TlsConnection>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let acceptor = TlsAcceptor::from(config);
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and the like: back off, keep listening.
                        tracing::warn!(error = %e, "cannot accept a TLS connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = async {
                    let _ = stop.wait_for(|stopped| *stopped).await;
                } => break,
                () = tx.closed() => break,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let failures = handshake_failures.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let spiffe_id = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(spiffe_id_of);
                        let peer = TlsPeer {
                            remote_addr: Some(remote),
                            spiffe_id,
                        };
                        tracing::debug!(?peer, "TLS connection");
                        let _ = tx.send(Ok(TlsConnection { stream, peer })).await;
                    }
                    Ok(Err(e)) => {
                        failures.inc();
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        failures.inc();
                        tracing::debug!(%remote, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(dir: &str) -> Arc<Ca> {
        let dir =
            std::env::temp_dir().join(format!("remora-tls-test-{dir}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::load_or_create(&dir, "cluster.local");
        let _ = std::fs::remove_dir_all(&dir);
        Arc::new(ca.unwrap_or_else(|e| panic!("creating a CA: {e}")))
    }

    #[test]
    fn serving_cert_carries_the_control_plane_id_and_renews() {
        let cert = ServingCert::issue(ca("renew"), Duration::from_secs(3600))
            .unwrap_or_else(|e| panic!("{e}"));
        let first = cert.chain();
        assert_eq!(
            first.first().and_then(spiffe_id_of).as_deref(),
            Some("spiffe://cluster.local/ns/remora-system/sa/remora-control-plane")
        );
        let half = cert.renew_at() - OffsetDateTime::now_utc();
        assert!(half > time::Duration::minutes(29) && half < time::Duration::minutes(31));
        cert.renew().unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(cert.chain(), first, "renewal swaps the certificate");
    }

    #[test]
    fn server_config_is_tls13_h2() {
        let ca = ca("config");
        let cert = ServingCert::issue(ca.clone(), Duration::from_secs(3600))
            .unwrap_or_else(|e| panic!("{e}"));
        let config = server_config(&ca, cert).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
    }
}
