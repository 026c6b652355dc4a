//! The certificate-signing API (`remora.identity.v1.CertificateService`):
//! a workload presents a bearer token and a CSR and gets a short-lived
//! certificate for the one identity the token proves.
//!
//! Who a token belongs to is an [`Authenticator`]'s business. Today that is
//! [`MeshTokens`], the bootstrap tokens of the mesh file, read live from the
//! published [`Mesh`]; a Kubernetes TokenReview authenticator will plug in
//! the same way.
//!
//! Served on the TLS listener (see [`crate::tls`]); a caller that presents
//! a client certificate is logged with its SPIFFE ID.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use remora_xds_proto::identity::v1::certificate_service_server::CertificateService;
use remora_xds_proto::identity::v1::{SignRequest, SignResponse};
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::{Ca, CaError, CsrError, DEFAULT_LEAF_TTL, SignedLeaf, pem_encode};
use crate::metrics::Metrics;
use crate::model::{Identity, Mesh};
use crate::tls::TlsPeer;

#[cfg(test)]
mod tests;

/// Longest certificate lifetime a caller may ask for by default: 7 days.
/// Longer requests are lowered to it.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The gRPC metadata key that carries the credential.
pub const AUTHORIZATION: &str = "authorization";

// === Authenticator ===

/// A boxed future, so that [`Authenticator`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Tells which workload identity a bearer token proves.
///
/// Asynchronous because a Kubernetes implementation asks the API server
/// (TokenReview).
pub trait Authenticator: Send + Sync + 'static {
    /// The identity `token` proves, or `None` if the token is unknown.
    /// Implementations must not log the token.
    fn identity<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Option<Identity>>;
}

/// The bootstrap tokens of the mesh file (`workload_tokens`), read from the
/// currently published mesh on every call, so token edits apply live.
#[derive(Debug, Clone)]
pub struct MeshTokens {
    mesh: watch::Receiver<Arc<Mesh>>,
}

impl MeshTokens {
    /// Reads tokens from whatever mesh `mesh` holds at each call.
    pub fn new(mesh: watch::Receiver<Arc<Mesh>>) -> MeshTokens {
        MeshTokens { mesh }
    }

    /// The lookup itself, synchronous: compares `token` with every entry in
    /// constant time (per entry) and without stopping at the first match,
    /// so timing says nothing about which entry, or how much of one,
    /// matched.
    pub fn lookup(&self, token: &str) -> Option<Identity> {
        // Clone the Arc so the watch lock is released at once.
        let mesh = Arc::clone(&self.mesh.borrow());
        lookup_token(&mesh, token)
    }
}

/// The identity `token` proves among `mesh`'s `workload_tokens`, compared
/// with every entry in constant time (per entry) and without stopping at
/// the first match.
pub fn lookup_token(mesh: &Mesh, token: &str) -> Option<Identity> {
    let mut found = None;
    for entry in mesh.workload_tokens() {
        if constant_time_eq(token.as_bytes(), entry.token.expose().as_bytes()) && found.is_none() {
            found = Some(entry.identity.clone());
        }
    }
    found
}

impl Authenticator for MeshTokens {
    fn identity<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Option<Identity>> {
        let identity = self.lookup(token);
        Box::pin(std::future::ready(identity))
    }
}

/// Compares two byte strings in time that depends only on the length of
/// `presented` (the caller's, so not secret), never on where they differ.
fn constant_time_eq(presented: &[u8], secret: &[u8]) -> bool {
    let mut diff = presented.len() ^ secret.len();
    for (i, &b) in presented.iter().enumerate() {
        let s = secret.get(i).copied().unwrap_or(0);
        diff |= usize::from(b ^ s);
    }
    std::hint::black_box(diff) == 0
}

// === Refusals ===

/// Why a signing request was refused: the `reason` label of
/// `remora_ca_certificates_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalReason {
    /// No `authorization` metadata, or not `Bearer <token>`.
    MissingCredentials,
    /// The token proves no identity.
    UnknownToken,
    /// The CSR asks for another identity (or trust domain) than the token's.
    WrongIdentity,
    /// The CSR is malformed or carries other names.
    InvalidCsr,
    /// The CA could not sign (expired CA, random source, signing failure).
    Internal,
}

impl RefusalReason {
    /// Every reason, in label order.
    pub const ALL: [RefusalReason; 5] = [
        RefusalReason::MissingCredentials,
        RefusalReason::UnknownToken,
        RefusalReason::WrongIdentity,
        RefusalReason::InvalidCsr,
        RefusalReason::Internal,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::MissingCredentials => "missing_credentials",
            RefusalReason::UnknownToken => "unknown_token",
            RefusalReason::WrongIdentity => "wrong_identity",
            RefusalReason::InvalidCsr => "invalid_csr",
            RefusalReason::Internal => "internal",
        }
    }
}

struct Refusal {
    reason: RefusalReason,
    status: Status,
}

impl Refusal {
    fn new(reason: RefusalReason, status: Status) -> Refusal {
        Refusal { reason, status }
    }
}

/// Metric handles, resolved once.
#[derive(Debug, Clone)]
pub(crate) struct CaMetrics {
    pub(crate) issued: IntCounter,
    refused: [IntCounter; RefusalReason::ALL.len()],
}

impl CaMetrics {
    pub(crate) fn new(metrics: &Metrics) -> CaMetrics {
        CaMetrics {
            issued: metrics.ca_certificates_issued.clone(),
            refused: RefusalReason::ALL.map(|r| {
                metrics
                    .ca_certificates_refused
                    .with_label_values(&[r.as_str()])
            }),
        }
    }

    pub(crate) fn refused(&self, reason: RefusalReason) -> &IntCounter {
        // ALL lists every variant, so the position always exists.
        let i = RefusalReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(RefusalReason::ALL.len() - 1);
        &self.refused[i]
    }
}

// === CertificateService ===

/// The `remora.identity.v1.CertificateService` implementation. Wrap it in
/// `CertificateServiceServer::new` to serve it.
pub struct SigningService {
    ca: Arc<Ca>,
    authenticator: Arc<dyn Authenticator>,
    default_ttl: Duration,
    max_ttl: Duration,
    metrics: CaMetrics,
}

impl std::fmt::Debug for SigningService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningService")
            .field("ca", &self.ca)
            .field("default_ttl", &self.default_ttl)
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

impl SigningService {
    /// Signs with `ca` for callers `authenticator` recognises, counting in
    /// `metrics`. Lifetimes: [`DEFAULT_LEAF_TTL`] (24 h) when the caller asks
    /// for none, at most [`DEFAULT_MAX_TTL`] (7 days); see
    /// [`SigningService::with_ttls`].
    pub fn new(ca: Arc<Ca>, authenticator: Arc<dyn Authenticator>, metrics: &Metrics) -> Self {
        SigningService {
            ca,
            authenticator,
            default_ttl: DEFAULT_LEAF_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            metrics: CaMetrics::new(metrics),
        }
    }

    /// Sets the lifetime given when a request asks for none (`ttl_seconds:
    /// 0`) and the longest one granted (longer requests are lowered to it).
    /// A default above the maximum is lowered to the maximum; zero durations
    /// keep the current values.
    pub fn with_ttls(mut self, default_ttl: Duration, max_ttl: Duration) -> Self {
        if !max_ttl.is_zero() {
            self.max_ttl = max_ttl;
        }
        if !default_ttl.is_zero() {
            self.default_ttl = default_ttl;
        }
        self.default_ttl = self.default_ttl.min(self.max_ttl);
        self
    }

    /// The lifetime granted for a requested `ttl_seconds`.
    pub fn granted_ttl(&self, ttl_seconds: u32) -> Duration {
        match ttl_seconds {
            0 => self.default_ttl,
            s => Duration::from_secs(u64::from(s)).min(self.max_ttl),
        }
    }

    async fn sign(&self, request: Request<SignRequest>) -> Result<SignResponse, Refusal> {
        let token = bearer_token(request.metadata()).map_err(|msg| {
            Refusal::new(
                RefusalReason::MissingCredentials,
                Status::unauthenticated(msg),
            )
        })?;
        let Some(identity) = self.authenticator.identity(token).await else {
            return Err(Refusal::new(
                RefusalReason::UnknownToken,
                Status::unauthenticated("unknown bootstrap token"),
            ));
        };
        let SignRequest {
            csr_pem,
            ttl_seconds,
        } = request.into_inner();
        let ttl = self.granted_ttl(ttl_seconds);
        let leaf = self
            .ca
            .sign_csr_for(&csr_pem, &identity, ttl, OffsetDateTime::now_utc())
            .map_err(|e| self.refusal(&identity, e))?;
        let spiffe_id = identity.spiffe_id(self.ca.trust_domain());
        tracing::info!(
            spiffe_id,
            serial = leaf.serial_hex(),
            expires = %leaf.not_after,
            "issued a workload certificate"
        );
        Ok(response(&leaf, self.ca.trust_bundle_pem()))
    }

    fn refusal(&self, identity: &Identity, error: CaError) -> Refusal {
        let allowed = identity.spiffe_id(self.ca.trust_domain());
        match error {
            CaError::Csr(CsrError::WrongIdentity { found, .. }) => Refusal::new(
                RefusalReason::WrongIdentity,
                Status::permission_denied(format!(
                    "the CSR asks for identity {found} but this token allows only {allowed}"
                )),
            ),
            CaError::Csr(CsrError::WrongTrustDomain { found, expected }) => Refusal::new(
                RefusalReason::WrongIdentity,
                Status::permission_denied(format!(
                    "the CSR asks for trust domain {found:?} but this mesh's trust domain is \
                     {expected:?}; this token allows only {allowed}"
                )),
            ),
            CaError::Csr(e) => Refusal::new(
                RefusalReason::InvalidCsr,
                Status::invalid_argument(format!("{e} (the CSR must carry exactly {allowed})")),
            ),
            e @ CaError::CaExpired { .. } => {
                tracing::error!(error = %e, "cannot issue workload certificates");
                Refusal::new(RefusalReason::Internal, Status::unavailable(e.to_string()))
            }
            e => {
                tracing::error!(spiffe_id = allowed, error = %e, "cannot sign a workload certificate");
                Refusal::new(
                    RefusalReason::Internal,
                    Status::internal(format!("the CA could not sign: {e}")),
                )
            }
        }
    }
}

#[tonic::async_trait]
impl CertificateService for SigningService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let tls_peer = request.extensions().get::<TlsPeer>().cloned();
        let peer = request
            .remote_addr()
            .or_else(|| tls_peer.as_ref().and_then(|p| p.remote_addr));
        let peer_id = tls_peer.and_then(|p| p.spiffe_id);
        match SigningService::sign(self, request).await {
            Ok(response) => {
                self.metrics.issued.inc();
                Ok(Response::new(response))
            }
            Err(Refusal { reason, status }) => {
                self.metrics.refused(reason).inc();
                // The status message never holds the token.
                tracing::info!(
                    peer = ?peer,
                    peer_spiffe_id = ?peer_id,
                    reason = reason.as_str(),
                    message = status.message(),
                    "refused a certificate signing request"
                );
                Err(status)
            }
        }
    }
}

fn response(leaf: &SignedLeaf, trust_bundle_pem: String) -> SignResponse {
    let mut cert_chain_pem = vec![leaf.cert_pem.clone()];
    cert_chain_pem.extend(leaf.chain.iter().map(|c| pem_encode(c)));
    SignResponse {
        cert_chain_pem,
        trust_bundle_pem,
        expires_at_unix: leaf.not_after.unix_timestamp(),
    }
}

/// The token of `authorization: Bearer <token>`, or what is wrong with the
/// metadata. Messages never quote the value.
fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<&str, &'static str> {
    let value = metadata
        .get(AUTHORIZATION)
        .ok_or("missing `authorization` metadata: send `authorization: Bearer <token>`")?;
    let value = value.to_str().map_err(
        |_| "the `authorization` metadata is not ASCII: send `authorization: Bearer <token>`",
    )?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or("the `authorization` metadata is not `Bearer <token>`")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("the `authorization` metadata uses another scheme than `Bearer <token>`");
    }
    let token = token.trim();
    if token.is_empty() {
        return Err("the `authorization` metadata has an empty bearer token");
    }
    Ok(token)
}
