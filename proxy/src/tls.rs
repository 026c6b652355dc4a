//! Mutual TLS between workloads, authenticated by SPIFFE IDs.
//!
//! rustls verifies DNS names, not URI SANs, so [`SpiffeVerifier`] builds the
//! chain with rustls' webpki machinery and then checks the leaf's single URI
//! SAN itself. [`server_config`] and [`client_config`] are built once per
//! trust bundle; certificates come from a [`CredentialResolver`] that a
//! rotation updates in place.
//!
//! # Expected server identities
//!
//! The identity a client expects from an endpoint travels in the
//! [`ServerName`] passed to `connect`: [`server_name_for`] turns a SPIFFE ID
//! into a DNS name made of its SHA-256 digest, and the verifier recomputes
//! the digest of the ID the server presents and compares. So one
//! `ClientConfig` serves every endpoint, and rustls' session cache, which
//! is keyed by server name, never resumes a session that was verified
//! against a different expected identity. SNI is switched off so the
//! digest is not sent.

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::ServerSessionMemoryCache;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, ServerName};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{SpiffeId, SpiffeIdError, TrustDomain, uri_sans};

mod context;
mod resolve;
#[cfg(test)]
mod tests;
mod verify;

pub use self::context::{ALPN_HTTP11, Alpn, BundleFollower, HandshakeError, TlsContext};
pub use self::resolve::CredentialResolver;
pub use self::verify::SpiffeVerifier;

/// ALPN protocol spoken between proxies.
pub const ALPN_H2: &[u8] = b"h2";
/// Sessions each side remembers for resumption.
const SESSION_CACHE_SIZE: usize = 1024;
/// The suffix of server names made by [`server_name_for`].
const SERVER_NAME_SUFFIX: &str = "spiffe.remora.invalid";

/// The only crypto provider Remora uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// === TrustBundle ===

/// Errors building a trust bundle or a TLS config.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The bundle PEM could not be read.
    #[error("invalid trust bundle PEM: {0}")]
    Pem(String),
    /// The bundle held no usable root certificate.
    #[error("the trust bundle for {0} has no root certificate")]
    EmptyBundle(TrustDomain),
    /// rustls refused a root or the configuration.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// rustls refused to build the client-certificate verifier.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The roots a trust domain's certificates must chain to. Several roots are
/// allowed (for CA rotation).
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
}

impl TrustBundle {
    /// A bundle from DER root certificates.
    pub fn new(
        trust_domain: TrustDomain,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let mut store = RootCertStore::empty();
        for root in roots {
            store.add(root)?;
        }
        if store.is_empty() {
            return Err(TlsError::EmptyBundle(trust_domain));
        }
        Ok(Self {
            trust_domain,
            roots: Arc::new(store),
        })
    }

    /// A bundle from concatenated PEM `CERTIFICATE` blocks.
    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<Self, TlsError> {
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        Self::new(trust_domain, roots)
    }

    /// The trust domain whose identities this bundle vouches for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificates.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }
}

// === Configs ===

/// The server side of inbound mTLS: TLS 1.3 only, ALPN `h2`, a client
/// certificate from `bundle`'s trust domain required, resumption by tickets
/// and by session cache, certificate read from `resolver` per handshake.
pub fn server_config(
    resolver: Arc<CredentialResolver>,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = Arc::new(SpiffeVerifier::new(bundle.clone())?);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// The client side of outbound mTLS: TLS 1.3 only, ALPN `h2`, our
/// certificate from `resolver`, the server checked against `bundle` and
/// the identity encoded in the connection's [`ServerName`] (see
/// [`server_name_for`]), resumption on, SNI off.
pub fn client_config(
    resolver: Arc<CredentialResolver>,
    bundle: &TrustBundle,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(SpiffeVerifier::new(bundle.clone())?);
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::in_memory_sessions(SESSION_CACHE_SIZE);
    // The server name is a digest of the expected ID, meaningless to the peer.
    config.enable_sni = false;
    Ok(Arc::new(config))
}

// === Expected identities ===

/// The [`ServerName`] to connect with when the server must prove `expected`.
///
/// It is `<hex>.<hex>.spiffe.remora.invalid`, the two labels being the
/// SHA-256 of the ID's string form.
pub fn server_name_for(expected: &SpiffeId) -> ServerName<'static> {
    let name = format!("{}.{SERVER_NAME_SUFFIX}", id_digest_labels(expected));
    // Invariant: 32 hex digits per label, two labels plus a fixed valid
    // suffix is always a valid DNS name.
    #[allow(clippy::expect_used)]
    let dns = DnsName::try_from(name).expect("hex digest labels form a valid DNS name");
    ServerName::DnsName(dns)
}

/// Whether `server_name` is the name [`server_name_for`] gives `presented`.
pub(crate) fn server_name_matches(server_name: &ServerName<'_>, presented: &SpiffeId) -> bool {
    let ServerName::DnsName(dns) = server_name else {
        return false;
    };
    dns.as_ref()
        .strip_suffix(SERVER_NAME_SUFFIX)
        .and_then(|s| s.strip_suffix('.'))
        .is_some_and(|labels| labels == id_digest_labels(presented))
}

/// The SHA-256 of `id` as two 32-hex-digit DNS labels.
fn id_digest_labels(id: &SpiffeId) -> String {
    let digest = sha256(id.to_string().as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}.{}", &hex[..32], &hex[32..])
}

/// SHA-256 from the ring provider's TLS 1.3 suite, so no second crypto
/// crate is needed.
fn sha256(data: &[u8]) -> Vec<u8> {
    // Invariant: TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite (its hash is SHA-256).
    #[allow(clippy::expect_used)]
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite");
    suite.common.hash_provider.hash(data).as_ref().to_vec()
}

// === Peer identity ===

/// Why a certificate does not carry a usable SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    /// The peer presented no certificate.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The leaf is not parseable X.509.
    #[error("the peer's certificate is not valid X.509: {0}")]
    Unparseable(String),
    /// The leaf has no URI SAN.
    #[error("the peer's certificate has no URI SAN (a SPIFFE ID is required)")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("the peer's certificate has {0} URI SANs, exactly one is allowed")]
    MultipleUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("the peer's URI SAN {uri:?} is not a valid SPIFFE ID: {error}")]
    InvalidId {
        /// The URI SAN.
        uri: String,
        /// Why it was rejected.
        error: SpiffeIdError,
    },
    /// The SPIFFE ID belongs to another trust domain.
    #[error("the peer's SPIFFE ID {presented} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The trust domain of our bundle.
        expected: TrustDomain,
        /// The ID the peer presented.
        presented: SpiffeId,
    },
}

/// The SPIFFE ID carried by a DER leaf certificate: exactly one URI SAN,
/// valid as a SPIFFE ID. Other SAN types are ignored.
pub fn spiffe_id_of(leaf: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdentityError> {
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|e| PeerIdentityError::Unparseable(e.to_string()))?;
    let mut uris = uri_sans(&cert).map_err(PeerIdentityError::Unparseable)?;
    match uris.len() {
        0 => Err(PeerIdentityError::NoUriSan),
        1 => {
            let uri = uris.remove(0);
            SpiffeId::parse(&uri).map_err(|error| PeerIdentityError::InvalidId { uri, error })
        }
        n => Err(PeerIdentityError::MultipleUriSans(n)),
    }
}

/// The SPIFFE ID of the peer of an established connection (client or
/// server side; also after resumption, where rustls keeps the chain).
pub fn peer_identity(conn: &rustls::CommonState) -> Result<SpiffeId, PeerIdentityError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(PeerIdentityError::NoCertificate)?;
    spiffe_id_of(leaf)
}

// === Failure classification ===

/// Why a handshake failed, in the terms metrics and logs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The chain does not lead to a root in the bundle.
    UnknownCa,
    /// A certificate in the chain has expired.
    Expired,
    /// A certificate in the chain is not valid yet.
    NotYetValid,
    /// The peer's SPIFFE ID is not the expected one (or not in our trust domain).
    IdentityMismatch,
    /// The leaf's SAN is not exactly one valid SPIFFE ID.
    BadSan,
    /// The client presented no certificate.
    NoClientCertificate,
    /// The peer does not speak TLS 1.3 (or our ALPN).
    Incompatible,
    /// The peer rejected us with an alert.
    AlertReceived,
    /// The handshake did not finish in time.
    Timeout,
    /// Anything else.
    Other,
}

impl HandshakeFailure {
    /// Classifies an error from a rustls connection (as found inside the
    /// `io::Error` tokio-rustls returns, see [`HandshakeFailure::of_io`]).
    pub fn of(error: &rustls::Error) -> Self {
        use rustls::Error as E;
        match error {
            E::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => Self::UnknownCa,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotYetValid
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Self::IdentityMismatch,
                CertificateError::Other(other) => {
                    match other.0.downcast_ref::<PeerIdentityError>() {
                        Some(PeerIdentityError::WrongTrustDomain { .. }) => Self::IdentityMismatch,
                        Some(_) => Self::BadSan,
                        None => Self::Other,
                    }
                }
                _ => Self::Other,
            },
            E::NoCertificatesPresented => Self::NoClientCertificate,
            E::PeerIncompatible(_) | E::NoApplicationProtocol => Self::Incompatible,
            E::AlertReceived(_) => Self::AlertReceived,
            _ => Self::Other,
        }
    }

    /// The metric label (`reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IdentityMismatch => "identity_mismatch",
            Self::BadSan => "bad_san",
            Self::NoClientCertificate => "no_client_certificate",
            Self::Incompatible => "protocol_version",
            Self::AlertReceived => "alert_received",
            Self::Timeout => "timeout",
            Self::Other => "other",
        }
    }

    /// Classifies the `io::Error` a tokio-rustls handshake returns.
    pub fn of_io(error: &std::io::Error) -> Self {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map_or(Self::Other, Self::of)
    }
}
