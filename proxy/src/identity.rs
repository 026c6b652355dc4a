//! Workload identity: SPIFFE IDs, the workload's key pair and the
//! certificate chain the CA issued for it.
//!
//! An identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! The key pair lives only in memory; the CA sees a CSR, and what it returns
//! becomes [`Credentials`], which [`crate::tls`] presents in handshakes.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
    string::Ia5String,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub mod client;
pub mod renew;
#[cfg(test)]
mod tests;

/// The URI scheme of every SPIFFE ID.
const SCHEME: &str = "spiffe://";
/// Longest SPIFFE ID accepted, as the SPIFFE spec recommends.
const MAX_ID_LEN: usize = 2048;
/// Longest trust domain accepted (a DNS name).
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID (or trust domain) Remora accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The ID does not start with `spiffe://` (lower case).
    #[error("SPIFFE ID must start with `spiffe://`")]
    Scheme,
    /// The ID is longer than 2048 bytes.
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    /// The trust domain is empty, too long, or not a DNS-like name.
    #[error(
        "trust domain {0:?} must be a DNS-like name of lower-case letters, digits, `-` and `.`"
    )]
    TrustDomain(String),
    /// The authority has userinfo (`user@`).
    #[error("SPIFFE ID must not contain userinfo (`@`)")]
    Userinfo,
    /// The authority has a port (`:port`).
    #[error("SPIFFE ID must not contain a port (`:`)")]
    Port,
    /// The ID has a query (`?`) or a fragment (`#`).
    #[error("SPIFFE ID must not contain a query or fragment")]
    QueryOrFragment,
    /// The ID contains a percent-escape.
    #[error("SPIFFE ID must not contain percent-escapes (`%`)")]
    PercentEscape,
    /// The ID contains a character outside the allowed set (NUL, `*`, upper case, ...).
    #[error("SPIFFE ID contains the forbidden character {0:?}")]
    Character(char),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("SPIFFE ID path {0:?} must be `/ns/<namespace>/sa/<service-account>`")]
    Path(String),
    /// A path segment is `.`, `..` or contains `..`.
    #[error("SPIFFE ID path segment {0:?} must not be or contain `..`, nor be `.`")]
    DotSegment(String),
}

// === impl TrustDomain ===

/// A SPIFFE trust domain: a DNS-like name of lower-case letters, digits,
/// `-` and `.`, with non-empty labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Validates `name` as a trust domain.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_TRUST_DOMAIN_LEN
            && name.split('.').all(|label| !label.is_empty())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if ok {
            Ok(Self(name.into()))
        } else {
            Err(SpiffeIdError::TrustDomain(name.to_owned()))
        }
    }

    /// The trust domain as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl SpiffeId ===

/// A validated SPIFFE ID of the form
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Parsing is strict (no normalisation): the string form is canonical, so two
/// IDs are equal exactly when their strings are.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: Arc<str>,
    service_account: Arc<str>,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
        // Name the specific URI feature we refuse before the generic check.
        for c in rest.chars() {
            match c {
                '@' => return Err(SpiffeIdError::Userinfo),
                ':' => return Err(SpiffeIdError::Port),
                '?' | '#' => return Err(SpiffeIdError::QueryOrFragment),
                '%' => return Err(SpiffeIdError::PercentEscape),
                'a'..='z' | '0'..='9' | '-' | '.' | '_' | '/' => {}
                other => return Err(SpiffeIdError::Character(other)),
            }
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::new(authority)?;
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let [ns_key, namespace, sa_key, service_account] = segments[..] else {
            return Err(SpiffeIdError::Path(path.to_owned()));
        };
        if ns_key != "ns" || sa_key != "sa" || namespace.is_empty() || service_account.is_empty() {
            return Err(SpiffeIdError::Path(path.to_owned()));
        }
        for seg in [namespace, service_account] {
            if seg == "." || seg.contains("..") {
                return Err(SpiffeIdError::DotSegment(seg.to_owned()));
            }
        }
        Ok(Self {
            trust_domain,
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    /// The trust domain (the URI authority).
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The Kubernetes-style namespace (`/ns/<namespace>`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account (`/sa/<service-account>`).
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

// === impl WorkloadKey ===

/// Errors from key generation, CSRs and loading issued certificates.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// rcgen failed to generate the key or build the CSR.
    #[error("could not generate the workload key or CSR: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CA's answer held no `CERTIFICATE` PEM block.
    #[error("the CA returned no certificate (expected PEM `CERTIFICATE` blocks, leaf first)")]
    NoCertificate,
    /// The CA's answer is not valid PEM.
    #[error("the CA returned invalid PEM: {0}")]
    Pem(String),
    /// The leaf certificate is not valid DER/X.509.
    #[error("the CA returned an unparseable leaf certificate: {0}")]
    Parse(String),
    /// The leaf does not carry the key this workload generated.
    #[error("the CA returned a certificate for a different public key than the CSR's")]
    KeyMismatch,
    /// The leaf does not carry exactly the requested SPIFFE ID.
    #[error(
        "the CA returned a certificate for {presented:?}, expected exactly one URI SAN `{expected}`"
    )]
    IdMismatch {
        /// The ID the CSR asked for.
        expected: SpiffeId,
        /// The URI SANs the leaf carries.
        presented: Vec<String>,
    },
    /// The leaf's validity period is empty or not representable.
    #[error("the leaf certificate's validity period is invalid")]
    Validity,
    /// rustls refused the private key.
    #[error("rustls cannot use the workload key: {0}")]
    Key(#[from] rustls::Error),
}

/// The workload's ECDSA P-256 key pair. It is generated in memory and never
/// written anywhere; the private half leaves only as a rustls signing key.
pub struct WorkloadKey {
    key: KeyPair,
}

impl WorkloadKey {
    /// Generates a fresh ECDSA P-256 key pair.
    pub fn generate() -> Result<Self, CredentialsError> {
        Ok(Self {
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// A PEM PKCS#10 certificate signing request for `id`: empty subject,
    /// exactly one URI SAN (the ID), signed by this key.
    pub fn csr(&self, id: &SpiffeId) -> Result<String, CredentialsError> {
        let mut params = CertificateParams::default();
        // SPIFFE X509-SVIDs name the workload in the URI SAN only.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string())?)];
        Ok(params.serialize_request(&self.key)?.pem()?)
    }

    /// The raw public key (uncompressed EC point), as found in the
    /// certificate's SubjectPublicKeyInfo.
    pub fn public_key_raw(&self) -> &[u8] {
        self.key.public_key_raw()
    }

    /// The private key as PKCS#8 DER, for rustls.
    fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// The rcgen key pair, for tests that sign with it directly.
    #[cfg(test)]
    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key
    }
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("algorithm", &"ECDSA_P256_SHA256")
            .finish_non_exhaustive()
    }
}

// === impl Credentials ===

/// What the workload presents in handshakes: the certificate chain the CA
/// issued (leaf first) and the private key, as rustls types, plus when they
/// expire and when to renew them.
pub struct Credentials {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    certified: Arc<CertifiedKey>,
    not_before: OffsetDateTime,
    expires_at: OffsetDateTime,
    renew_at: OffsetDateTime,
}

impl Credentials {
    /// Builds credentials from the CA's PEM answer (leaf first, then any
    /// intermediates) and the key whose CSR it answers.
    ///
    /// Checks that the leaf carries `key`'s public key and exactly one URI
    /// SAN equal to `expected`. `renew_at` is the middle of the validity
    /// period shifted by `jitter` (which may be negative), kept inside the
    /// validity period.
    pub fn from_pem(
        chain_pem: &str,
        key: &WorkloadKey,
        expected: &SpiffeId,
        jitter: time::Duration,
    ) -> Result<Self, CredentialsError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CredentialsError::Pem(e.to_string()))?;
        let leaf = chain.first().ok_or(CredentialsError::NoCertificate)?;
        let (_, cert) =
            X509Certificate::from_der(leaf).map_err(|e| CredentialsError::Parse(e.to_string()))?;

        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CredentialsError::KeyMismatch);
        }
        let uris = uri_sans(&cert).map_err(CredentialsError::Parse)?;
        if uris.len() != 1 || uris[0] != expected.to_string() {
            return Err(CredentialsError::IdMismatch {
                expected: expected.clone(),
                presented: uris,
            });
        }

        let validity = cert.validity();
        let not_before = OffsetDateTime::from_unix_timestamp(validity.not_before.timestamp())
            .map_err(|_| CredentialsError::Validity)?;
        let expires_at = OffsetDateTime::from_unix_timestamp(validity.not_after.timestamp())
            .map_err(|_| CredentialsError::Validity)?;
        if expires_at <= not_before {
            return Err(CredentialsError::Validity);
        }
        let lifetime: time::Duration = expires_at - not_before;
        let half: time::Duration = lifetime / 2i32;
        let renew_at: OffsetDateTime = not_before + half + jitter;
        let renew_at = renew_at.clamp(not_before, expires_at);

        let der = key.private_key_der();
        let signer = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(der.clone_key())?;
        let certified = Arc::new(CertifiedKey::new(chain.clone(), signer));
        Ok(Self {
            id: expected.clone(),
            chain,
            key: der,
            certified,
            not_before,
            expires_at,
            renew_at,
        })
    }

    /// The identity these credentials prove.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key (PKCS#8).
    pub fn private_key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The chain and signing key, ready for a rustls certificate resolver.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    /// The leaf's `notBefore`.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// The leaf's `notAfter`.
    pub fn expires_at(&self) -> OffsetDateTime {
        self.expires_at
    }

    /// When to ask the CA for new credentials: half-way through the
    /// lifetime, plus the jitter given at construction (or the time set by
    /// [`Credentials::with_renew_at`]).
    pub fn renew_at(&self) -> OffsetDateTime {
        self.renew_at
    }

    /// The same credentials with another renewal time, kept inside the
    /// validity period. The renewal loop uses it to count the lifetime from
    /// when the certificate was asked for rather than from `notBefore`,
    /// which CAs backdate for clock skew.
    pub fn with_renew_at(mut self, renew_at: OffsetDateTime) -> Self {
        self.renew_at = renew_at.clamp(self.not_before, self.expires_at);
        self
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Credentials")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("expires_at", &self.expires_at)
            .field("renew_at", &self.renew_at)
            .finish_non_exhaustive()
    }
}

/// The URI SANs of a certificate, in order.
pub(crate) fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}
