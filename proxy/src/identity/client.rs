//! The client of the control plane's certificate-signing API
//! (`remora.identity.v1.CertificateService`), over TLS 1.3.
//!
//! The control plane must prove `spiffe://<td>/ns/remora-system/sa/remora-control-plane`
//! against a trust bundle the operator distributes (`--ca-bundle`): that
//! is how the very first connection, before the workload has any
//! certificate, is authenticated. Once the workload has a certificate it
//! presents it as its client certificate. The workload itself is
//! authenticated by a bearer token (`--token-file`), read afresh for every
//! request so a rotated file is picked up, and never logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::rt::TokioIo;
use remora_xds_proto::identity::v1::SignRequest;
use remora_xds_proto::identity::v1::certificate_service_client::CertificateServiceClient;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, SignatureScheme};
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use super::{Credentials, CredentialsError, SpiffeId, TrustDomain, WorkloadKey};
use crate::tls::{
    ALPN_H2, HandshakeFailure, SpiffeVerifier, TlsError, TrustBundle, server_name_for,
};

#[cfg(test)]
mod tests;

/// Namespace of the control plane's identity.
pub const CONTROL_PLANE_NAMESPACE: &str = "remora-system";
/// Service account of the control plane's identity.
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "remora-control-plane";
/// Time allowed to open the TCP connection and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one signing request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity the control plane proves in `trust_domain`:
/// `spiffe://<td>/ns/remora-system/sa/remora-control-plane`.
pub fn control_plane_id(trust_domain: &TrustDomain) -> SpiffeId {
    // Invariant: a valid trust domain plus fixed valid segments is a valid ID.
    #[allow(clippy::expect_used)]
    SpiffeId::parse(&format!(
        "spiffe://{trust_domain}/ns/{CONTROL_PLANE_NAMESPACE}/sa/{CONTROL_PLANE_SERVICE_ACCOUNT}"
    ))
    .expect("the control plane's SPIFFE ID is valid")
}

// === Token ===

/// A bearer token. Its `Debug` form is `<redacted>`; read it with
/// [`Token::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token from its value (surrounding whitespace removed).
    pub fn new(value: impl Into<String>) -> Token {
        let value: String = value.into();
        Token(value.trim().to_owned())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A file, read again every time the token is needed (`--token-file`).
    File(PathBuf),
    /// A fixed value (tests, embedding).
    Value(Token),
}

impl TokenSource {
    /// The current token.
    pub fn read(&self) -> Result<Token, ClientError> {
        match self {
            TokenSource::Value(token) => Ok(token.clone()),
            TokenSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ClientError::Token {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let token = Token::new(text);
                if token.expose().is_empty() {
                    return Err(ClientError::Token {
                        path: path.clone(),
                        reason: "the file is empty".to_owned(),
                    });
                }
                Ok(token)
            }
        }
    }
}

// === Errors ===

/// Why a signing request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The token could not be read.
    #[error("cannot read the bearer token from {path:?}: {reason}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// Why (never the token).
        reason: String,
    },
    /// The token has characters a gRPC metadata value cannot carry.
    #[error("the bearer token is not printable ASCII, so it cannot be sent")]
    InvalidToken,
    /// The CA address is not `host:port`.
    #[error("invalid CA address {0:?}: expected HOST:PORT")]
    Address(String),
    /// The control plane could not be reached (TCP, or the connection broke).
    #[error("cannot reach the control plane's CA at {addr}: {reason}")]
    Unreachable {
        /// The CA address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The TLS handshake failed; e.g. the server is not the control plane.
    #[error(
        "TLS handshake with the control plane's CA at {addr} failed ({failure:?}; expected \
         identity {expected}): {reason}"
    )]
    Handshake {
        /// The CA address.
        addr: String,
        /// The classified failure.
        failure: HandshakeFailure,
        /// The identity the server had to prove.
        expected: SpiffeId,
        /// The rustls error.
        reason: String,
    },
    /// Connecting or signing took too long.
    #[error("the control plane's CA at {0} did not answer in time")]
    Timeout(String),
    /// The CA refused the request.
    #[error("the control plane's CA refused to sign ({code:?}): {message}{hint}")]
    Refused {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
        /// What to check, if we know.
        hint: &'static str,
    },
    /// The key or CSR could not be made, or the answer is unusable.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

impl ClientError {
    /// The `reason` label of `remora_proxy_certificate_renewal_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ClientError::Token { .. } | ClientError::InvalidToken => "token",
            ClientError::Address(_) | ClientError::Unreachable { .. } => "unreachable",
            ClientError::Handshake { .. } => "handshake",
            ClientError::Timeout(_) => "timeout",
            ClientError::Refused { code, .. } => match code {
                tonic::Code::Unauthenticated => "unauthenticated",
                tonic::Code::PermissionDenied => "permission_denied",
                tonic::Code::Unavailable => "unavailable",
                _ => "refused",
            },
            ClientError::Credentials(CredentialsError::Rcgen(_) | CredentialsError::Key(_)) => {
                "key"
            }
            ClientError::Credentials(_) => "invalid_response",
        }
    }
}

// === Client certificate ===

/// The client certificate presented to the control plane: the workload's
/// current one while it is valid, none before the first or after expiry.
#[derive(Debug, Default)]
struct Presented {
    current: ArcSwapOption<(Arc<CertifiedKey>, OffsetDateTime)>,
}

impl Presented {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        let guard = self.current.load();
        let (key, expires_at) = guard.as_deref()?;
        (OffsetDateTime::now_utc() < *expires_at).then(|| Arc::clone(key))
    }
}

impl ResolvesClientCert for Presented {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

// === CertificateClient ===

/// Asks the control plane's CA for workload certificates.
///
/// Each [`CertificateClient::sign`] opens a new connection (renewals are
/// hours apart), so the client certificate presented is always the
/// current one.
#[derive(Debug, Clone)]
pub struct CertificateClient {
    addr: Arc<str>,
    expected: SpiffeId,
    server_name: ServerName<'static>,
    /// Rebuilt when the trust bundle changes (root rotation).
    tls: Arc<ArcSwap<ClientConfig>>,
    presented: Arc<Presented>,
    ttl: Option<Duration>,
    latest_bundle: Arc<ArcSwapOption<String>>,
}

impl CertificateClient {
    /// A client for the CA at `addr` (`host:port`), which must prove the
    /// control plane's identity in `bundle`'s trust domain
    /// ([`control_plane_id`]) with a chain to one of `bundle`'s roots.
    pub fn new(addr: &str, bundle: &TrustBundle) -> Result<Self, ClientError> {
        let expected = control_plane_id(bundle.trust_domain());
        Self::with_server_id(addr, bundle, expected)
    }

    /// [`CertificateClient::new`] expecting the server to prove `expected`.
    pub fn with_server_id(
        addr: &str,
        bundle: &TrustBundle,
        expected: SpiffeId,
    ) -> Result<Self, ClientError> {
        let addr = addr
            .strip_prefix("https://")
            .or_else(|| addr.strip_prefix("http://"))
            .unwrap_or(addr)
            .trim_end_matches('/');
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(ClientError::Address(addr.to_owned())),
        }
        let presented = Arc::new(Presented::default());
        let tls = tls_config(bundle, Arc::clone(&presented)).map_err(|e| {
            ClientError::Address(format!("{addr} (cannot build the TLS config: {e})"))
        })?;
        Ok(Self {
            addr: addr.into(),
            server_name: server_name_for(&expected),
            expected,
            tls: Arc::new(ArcSwap::new(tls)),
            presented,
            ttl: None,
            latest_bundle: Arc::default(),
        })
    }

    /// Checks the CA against `bundle` from now on (the control plane sent
    /// new roots: a root rotation).
    pub fn set_trust_bundle(&self, bundle: &TrustBundle) -> Result<(), TlsError> {
        let config = tls_config(bundle, Arc::clone(&self.presented))?;
        self.tls.store(config);
        Ok(())
    }

    /// Asks for certificates living `ttl` (the server may lower it);
    /// without it the server's default applies.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The CA address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Presents `credentials` as the client certificate on later
    /// connections (until they expire).
    pub fn present(&self, credentials: &Credentials) {
        self.presented.current.store(Some(Arc::new((
            Arc::clone(credentials.certified_key()),
            credentials.expires_at(),
        ))));
    }

    /// The trust bundle (PEM) the CA sent with its last answer, if any.
    pub fn latest_trust_bundle_pem(&self) -> Option<Arc<String>> {
        self.latest_bundle.load_full()
    }

    /// Asks the CA to certify `key` as `id`, proving who we are with
    /// `token`.
    pub async fn sign(
        &self,
        key: &WorkloadKey,
        id: &SpiffeId,
        token: &Token,
    ) -> Result<Credentials, ClientError> {
        let csr_pem = key.csr(id)?;
        let channel = self.connect().await?;
        let mut client = CertificateServiceClient::new(channel);
        let mut request = tonic::Request::new(SignRequest {
            csr_pem,
            ttl_seconds: self
                .ttl
                .map_or(0, |t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX)),
        });
        let value = format!("Bearer {}", token.expose())
            .parse()
            .map_err(|_| ClientError::InvalidToken)?;
        request.metadata_mut().insert("authorization", value);
        request.set_timeout(REQUEST_TIMEOUT);
        let response = tokio::time::timeout(REQUEST_TIMEOUT, client.sign(request))
            .await
            .map_err(|_| ClientError::Timeout(self.addr.to_string()))?
            .map_err(|status| refused(&status))?
            .into_inner();
        let chain = response.cert_chain_pem.join("\n");
        let credentials = Credentials::from_pem(&chain, key, id, time::Duration::ZERO)?;
        if !response.trust_bundle_pem.is_empty() {
            self.latest_bundle
                .store(Some(Arc::new(response.trust_bundle_pem)));
        }
        Ok(credentials)
    }

    /// Opens a TLS connection to the CA and an HTTP/2 channel over it.
    async fn connect(&self) -> Result<Channel, ClientError> {
        let addr = Arc::clone(&self.addr);
        let connector = TlsConnector::from(self.tls.load_full());
        let server_name = self.server_name.clone();
        let connect = tower::service_fn(move |_uri: http::Uri| {
            let addr = Arc::clone(&addr);
            let connector = connector.clone();
            let server_name = server_name.clone();
            async move {
                let tcp = TcpStream::connect(&*addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|_| ClientError::Address(self.addr.to_string()))?;
        tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect_with_connector(connect))
            .await
            .map_err(|_| ClientError::Timeout(self.addr.to_string()))?
            .map_err(|e| self.connect_error(&e))
    }

    fn connect_error(&self, error: &(dyn std::error::Error + 'static)) -> ClientError {
        let mut reason = error.to_string();
        let mut source = error.source();
        let mut handshake = None;
        while let Some(e) = source {
            reason = format!("{reason}: {e}");
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
            {
                handshake = Some((HandshakeFailure::of(tls), tls.to_string()));
            }
            source = e.source();
        }
        match handshake {
            Some((failure, reason)) => ClientError::Handshake {
                addr: self.addr.to_string(),
                failure,
                expected: self.expected.clone(),
                reason,
            },
            None => ClientError::Unreachable {
                addr: self.addr.to_string(),
                reason,
            },
        }
    }
}

fn refused(status: &tonic::Status) -> ClientError {
    let hint = match status.code() {
        tonic::Code::Unauthenticated => " (check the token in --token-file)",
        tonic::Code::PermissionDenied => {
            " (the token is for another identity: check --namespace and --service-account)"
        }
        _ => "",
    };
    ClientError::Refused {
        code: status.code(),
        message: status.message().to_owned(),
        hint,
    }
}

/// TLS 1.3 only, ring, ALPN `h2`, the server verified as a SPIFFE ID
/// against `bundle`, our certificate (if any) from `presented`.
fn tls_config(
    bundle: &TrustBundle,
    presented: Arc<Presented>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(SpiffeVerifier::new(bundle.clone())?);
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(presented);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A resumed TLS 1.3 session carries the client certificate of the
    // session it resumes (none, for the first one): always present the
    // current one instead. Connections are hours apart anyway.
    config.resumption = rustls::client::Resumption::disabled();
    // The server name is a digest of the expected ID, meaningless to the peer.
    config.enable_sni = false;
    Ok(Arc::new(config))
}
