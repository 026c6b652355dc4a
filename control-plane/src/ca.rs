//! The mesh certificate authority: issues workload certificates that carry
//! SPIFFE IDs (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`).
//!
//! Two ways to get a [`Ca`]:
//! - [`Ca::load_or_create`]: the embedded default. On first start it creates a
//!   self-signed root (ECDSA P-256) in the state directory and reuses it on
//!   later starts.
//! - [`Ca::from_files`]: an operator-given root or intermediate (an offline
//!   root, cert-manager), with the chain up to the root.
//!
//! [`Ca::sign_csr`] turns a workload's CSR into a short-lived leaf after
//! checking that the CSR asks for exactly the identity the caller proved.
//! The trust bundle ([`Ca::trust_bundle`]) may hold several roots, which is
//! how a root is rotated without downtime.
//!
//! Time is always passed in (`now`), so that tests are deterministic.
//!
//! [`service`] serves the CA over gRPC (`remora.identity.v1.CertificateService`)
//! to workloads that prove their identity with a bearer token.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::model::Identity;

pub mod service;

#[cfg(test)]
mod tests;

/// File name of the embedded root certificate inside the state directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// File name of the embedded root's private key inside the state directory
/// (mode 0600).
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Validity of a root created by [`Ca::load_or_create`]: 10 years.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Default lifetime of a workload certificate: 24 hours.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How far back a leaf's `not_before` is set, to tolerate clock skew between
/// the control plane and the workloads: 1 minute.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Common name of a root created by [`Ca::load_or_create`].
pub const ROOT_COMMON_NAME: &str = "Remora root CA";

const SPIFFE_SCHEME: &str = "spiffe://";

// === errors ===

/// Why a CA could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The configured trust domain is not a valid SPIFFE trust domain name.
    #[error(
        "invalid trust domain {0:?}: a SPIFFE trust domain uses only lowercase letters, digits, '.', '-' and '_'"
    )]
    InvalidTrustDomain(String),
    /// The state directory could not be created.
    #[error("cannot create the CA state directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// One of the root's two files exists without the other.
    #[error(
        "{present} exists but {missing} does not: restore the missing file, or remove both to \
         create a new root (every workload certificate must then be reissued)"
    )]
    IncompletePair {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// A certificate source is not PEM, or holds no certificate.
    #[error("{source_name} is not a PEM certificate file: {reason}")]
    NotPem {
        /// The file (or "additional roots").
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// A PEM certificate block does not hold a parseable X.509 certificate.
    #[error("{source_name}: certificate #{index} is not a valid X.509 certificate: {reason}")]
    BadCertificate {
        /// The file (or "additional roots").
        source_name: String,
        /// Position in the file, from 1.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A certificate that must be a CA is not one.
    #[error("{source_name}: certificate #{index} is not a CA certificate: {reason}")]
    NotCa {
        /// The file (or "additional roots").
        source_name: String,
        /// Position in the file, from 1.
        index: usize,
        /// What is missing.
        reason: String,
    },
    /// The private key file is not a usable key.
    #[error("{path} is not a usable private key: {reason}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The private key is not the key of the signing certificate.
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The signing certificate has expired.
    #[error("the CA certificate in {path} expired at {not_after}")]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// Its expiry.
        not_after: OffsetDateTime,
    },
    /// The signing certificate is not valid yet (check the clock).
    #[error("the CA certificate in {path} is not valid before {not_before}: check the clock")]
    NotYetValid {
        /// The certificate file.
        path: PathBuf,
        /// Start of its validity.
        not_before: OffsetDateTime,
    },
    /// The CA certificate names another trust domain than the configured one.
    #[error(
        "the CA certificate in {path} is for trust domain {found:?} but the configured trust domain is {configured:?}"
    )]
    TrustDomainMismatch {
        /// The certificate file.
        path: PathBuf,
        /// The trust domain in its URI SAN.
        found: String,
        /// The configured trust domain.
        configured: String,
    },
    /// A certificate in the chain file is not signed by the next one.
    #[error(
        "{path}: certificate #{index} is not signed by certificate #{next} (the chain must list the signing certificate first, then each issuer): {reason}"
    )]
    ChainBroken {
        /// The chain file.
        path: PathBuf,
        /// Position of the certificate, from 1.
        index: usize,
        /// Position of its supposed issuer.
        next: usize,
        /// The verification failure.
        reason: String,
    },
    /// No root to trust: the chain does not end with a self-signed root and no
    /// bundle was given.
    #[error(
        "{path} does not end with a self-signed root certificate and no trust bundle was given: append the root to the chain or pass a bundle file"
    )]
    NoRoot {
        /// The chain file.
        path: PathBuf,
    },
    /// The chain does not lead to any root of the trust bundle.
    #[error("the last certificate of {path} is not signed by any root of the trust bundle")]
    UntrustedChain {
        /// The chain file.
        path: PathBuf,
    },
    /// rcgen failed to generate a key or certificate.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The cause.
        source: rcgen::Error,
    },
    /// The operating system's random source failed.
    #[error("cannot draw a random serial number: {0}")]
    Random(getrandom::Error),
    /// The requested lifetime is zero.
    #[error("a workload certificate lifetime (ttl) of zero was requested")]
    ZeroTtl,
    /// The requested lifetime does not fit in a date.
    #[error("the requested workload certificate lifetime {0:?} is too long")]
    TtlTooLong(Duration),
    /// The CA cannot sign any more because its own certificate expired.
    #[error("the CA certificate expired at {not_after}; rotate the CA")]
    CaExpired {
        /// Its expiry.
        not_after: OffsetDateTime,
    },
    /// The identity the caller is allowed to get is outside this CA's trust
    /// domain (a bug in the caller, not in the CSR).
    #[error("identity {id:?} is not a SPIFFE ID in trust domain {trust_domain:?}")]
    AllowedOutsideTrustDomain {
        /// The identity.
        id: String,
        /// This CA's trust domain.
        trust_domain: String,
    },
    /// The CSR was refused.
    #[error("certificate signing request refused: {0}")]
    Csr(#[from] CsrError),
    /// Signing the leaf failed.
    #[error("cannot sign the workload certificate: {0}")]
    Sign(rcgen::Error),
}

/// Why a certificate signing request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Not a PEM `CERTIFICATE REQUEST`, or not a parseable PKCS#10 request.
    #[error("not a PEM PKCS#10 certificate signing request")]
    Malformed,
    /// The CSR's self-signature does not verify.
    #[error("the CSR's signature does not verify with its own public key")]
    BadSignature,
    /// The CSR uses an algorithm, extension or name form we do not support.
    #[error("the CSR uses something unsupported: {0}")]
    Unsupported(String),
    /// The CSR has no subject alternative name.
    #[error("the CSR has no URI SAN; it must carry exactly one: {expected}")]
    NoSan {
        /// The SPIFFE ID it must carry.
        expected: String,
    },
    /// The CSR carries a DNS name.
    #[error("the CSR has a DNS SAN {0:?}; workload certificates carry only their SPIFFE ID")]
    DnsSan(String),
    /// The CSR carries an IP address, e-mail address or other name.
    #[error("the CSR has a {kind} SAN {value:?}; workload certificates carry only their SPIFFE ID")]
    OtherSan {
        /// The kind of name.
        kind: &'static str,
        /// Its value.
        value: String,
    },
    /// The CSR carries more than one URI SAN.
    #[error("the CSR has {count} URI SANs; it must carry exactly one: {expected}")]
    ExtraSans {
        /// How many.
        count: usize,
        /// The SPIFFE ID it must carry.
        expected: String,
    },
    /// The URI SAN is not a `spiffe://` URI.
    #[error("the CSR's URI SAN {0:?} is not a spiffe:// URI")]
    NotSpiffe(String),
    /// The SPIFFE ID is in another trust domain.
    #[error("the CSR asks for trust domain {found:?} but this mesh's trust domain is {expected:?}")]
    WrongTrustDomain {
        /// The trust domain asked for.
        found: String,
        /// This CA's trust domain.
        expected: String,
    },
    /// The SPIFFE ID is not the one the caller may have.
    #[error("the CSR asks for identity {found:?} but the caller is {expected:?}")]
    WrongIdentity {
        /// The identity asked for.
        found: String,
        /// The identity the caller proved.
        expected: String,
    },
}

// === public types ===

/// A workload certificate just issued.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedLeaf {
    /// The leaf certificate, DER.
    pub cert: CertificateDer<'static>,
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The certificates between the leaf and the root: the signing
    /// certificate, then its issuers, not including the root. Empty when a
    /// root signs directly.
    pub chain: Vec<CertificateDer<'static>>,
    /// End of the leaf's validity.
    pub not_after: OffsetDateTime,
    /// The leaf's serial number, big-endian.
    pub serial: Vec<u8>,
}

impl SignedLeaf {
    /// The intermediates ([`SignedLeaf::chain`]) as concatenated PEM.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| pem_encode(c)).collect()
    }

    /// The leaf followed by its intermediates, as concatenated PEM: what a
    /// TLS server presents.
    pub fn full_chain_pem(&self) -> String {
        let mut out = self.cert_pem.clone();
        out.push_str(&self.chain_pem());
        out
    }

    /// The serial number in lowercase hex.
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for SignedLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedLeaf")
            .field("serial", &self.serial_hex())
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The certificate authority: a signing certificate and key, the chain from
/// that certificate up to (not including) the root, and the roots to trust.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// Signing certificate first, then its issuers; no root.
    chain: Vec<CertificateDer<'static>>,
    signing_not_after: OffsetDateTime,
    roots: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for Ca {
    // The key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("chain_len", &self.chain.len())
            .field("signing_not_after", &self.signing_not_after)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

// === impl Ca ===

impl Ca {
    /// The embedded default CA: loads `root-cert.pem` and `root-key.pem` from
    /// `state_dir`, or creates them (directory mode 0700, key mode 0600) on
    /// first start. Uses the current time; see [`Ca::load_or_create_at`].
    pub fn load_or_create(state_dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        Self::load_or_create_at(state_dir, trust_domain, OffsetDateTime::now_utc())
    }

    /// [`Ca::load_or_create`] at a given time: a new root is valid from
    /// `now - 1 min` for [`ROOT_VALIDITY`]; a loaded one must be valid at `now`
    /// and be for `trust_domain`.
    pub fn load_or_create_at(
        state_dir: &Path,
        trust_domain: &str,
        now: OffsetDateTime,
    ) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)?;
        let cert_path = state_dir.join(ROOT_CERT_FILE);
        let key_path = state_dir.join(ROOT_KEY_FILE);
        let cert_exists = exists(&cert_path)?;
        let key_exists = exists(&key_path)?;
        match (cert_exists, key_exists) {
            (true, true) => Self::load_root(&cert_path, &key_path, trust_domain, now),
            (false, false) => {
                Self::create_root(state_dir, &cert_path, &key_path, trust_domain, now)
            }
            (true, false) => Err(CaError::IncompletePair {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::IncompletePair {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn load_root(
        cert_path: &Path,
        key_path: &Path,
        trust_domain: &str,
        now: OffsetDateTime,
    ) -> Result<Self, CaError> {
        warn_if_key_readable_by_others(key_path);
        let ca = Self::from_files_with_bundle_at(cert_path, key_path, None, trust_domain, now)?;
        Ok(ca)
    }

    fn create_root(
        state_dir: &Path,
        cert_path: &Path,
        key_path: &Path,
        trust_domain: &str,
        now: OffsetDateTime,
    ) -> Result<Self, CaError> {
        create_private_dir(state_dir)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            CaError::Generate {
                what: "the root CA key",
                source,
            }
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Remora");
        dn.push(DnType::CommonName, ROOT_COMMON_NAME);
        params.distinguished_name = dn;
        // Path length 1: the root may sign one level of intermediates (one
        // per cluster, later) which then sign leaves.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri_san(&format!("{SPIFFE_SCHEME}{trust_domain}"))?];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = add(now, ROOT_VALIDITY)?;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(|source| CaError::Generate {
                what: "the root CA certificate",
                source,
            })?;

        // Key first: a crash between the two writes leaves a key without a
        // certificate, which the next start reports instead of silently
        // replacing a root that workloads may already trust.
        write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(
            cert = %cert_path.display(),
            trust_domain,
            "created a new root CA"
        );

        let der = cert.der().clone();
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|source| CaError::Generate {
            what: "the root CA issuer",
            source,
        })?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            chain: Vec::new(),
            signing_not_after: params.not_after,
            roots: vec![der],
        })
    }

    /// An operator-given CA: `cert_chain` holds the signing certificate (a
    /// root or an intermediate) first, then its issuers up to and including
    /// the root; `key` is the signing certificate's private key (PKCS#8 PEM;
    /// SEC1 and PKCS#1 are accepted too). Uses the current time.
    pub fn from_files(cert_chain: &Path, key: &Path, trust_domain: &str) -> Result<Self, CaError> {
        Self::from_files_with_bundle_at(
            cert_chain,
            key,
            None,
            trust_domain,
            OffsetDateTime::now_utc(),
        )
    }

    /// [`Ca::from_files`] with an optional trust bundle file (PEM roots), for
    /// when the chain file stops below the root (cert-manager's `tls.crt`
    /// with the root in `ca.crt`) or while rotating roots; checked at `now`.
    pub fn from_files_with_bundle_at(
        cert_chain: &Path,
        key: &Path,
        bundle: Option<&Path>,
        trust_domain: &str,
        now: OffsetDateTime,
    ) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)?;
        let chain_name = cert_chain.display().to_string();
        let chain_pem = read(cert_chain)?;
        let mut chain = parse_pem_certs(&chain_pem, &chain_name)?;

        // Check the signing certificate.
        let Some(signing_der) = chain.first().cloned() else {
            return Err(CaError::NotPem {
                source_name: chain_name,
                reason: "no CERTIFICATE block".to_owned(),
            });
        };
        let signing = parse_cert(&signing_der, &chain_name, 1)?;
        check_is_ca(&signing, &chain_name, 1)?;
        let not_before = signing.validity().not_before.to_datetime();
        let signing_not_after = signing.validity().not_after.to_datetime();
        if now < not_before {
            return Err(CaError::NotYetValid {
                path: cert_chain.to_owned(),
                not_before,
            });
        }
        if now > signing_not_after {
            return Err(CaError::Expired {
                path: cert_chain.to_owned(),
                not_after: signing_not_after,
            });
        }
        if let Some(found) = spiffe_trust_domain_of(&signing)
            && found != trust_domain
        {
            return Err(CaError::TrustDomainMismatch {
                path: cert_chain.to_owned(),
                found,
                configured: trust_domain.to_owned(),
            });
        }

        // Check the key.
        let key_pair = load_key(key)?;
        if key_pair.public_key_raw() != &*signing.public_key().subject_public_key.data {
            return Err(CaError::KeyMismatch {
                cert: cert_chain.to_owned(),
                key: key.to_owned(),
            });
        }

        // Check the chain links, and split off a trailing self-signed root.
        let parsed = chain
            .iter()
            .enumerate()
            .map(|(i, der)| parse_cert(der, &chain_name, i + 1))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, pair) in parsed.windows(2).enumerate() {
            let [child, parent] = pair else { continue };
            check_is_ca(parent, &chain_name, i + 2)?;
            child
                .verify_signature(Some(parent.public_key()))
                .map_err(|e| CaError::ChainBroken {
                    path: cert_chain.to_owned(),
                    index: i + 1,
                    next: i + 2,
                    reason: e.to_string(),
                })?;
        }
        let mut roots = Vec::new();
        let ends_with_root = parsed.last().is_some_and(is_self_signed);
        drop(parsed);
        if ends_with_root && let Some(root) = chain.pop() {
            roots.push(root);
        }
        if let Some(bundle) = bundle {
            let name = bundle.display().to_string();
            let pem = read(bundle)?;
            for der in parse_roots(&pem, &name)? {
                if !roots.contains(&der) {
                    roots.push(der);
                }
            }
        }
        if roots.is_empty() {
            return Err(CaError::NoRoot {
                path: cert_chain.to_owned(),
            });
        }
        if !ends_with_root {
            // The top of the chain must be signed by a bundle root.
            let top_der = chain.last().unwrap_or(&signing_der);
            let top = parse_cert(top_der, &chain_name, chain.len())?;
            let trusted = roots.iter().any(|r| {
                x509_parser::parse_x509_certificate(r)
                    .is_ok_and(|(_, r)| top.verify_signature(Some(r.public_key())).is_ok())
            });
            if !trusted {
                return Err(CaError::UntrustedChain {
                    path: cert_chain.to_owned(),
                });
            }
        }
        drop(signing);

        let issuer = Issuer::from_ca_cert_der(&signing_der, key_pair).map_err(|e| {
            CaError::BadCertificate {
                source_name: chain_name,
                index: 1,
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            chain,
            signing_not_after,
            roots,
        })
    }

    /// Adds roots to the trust bundle (PEM, one or more CA certificates).
    /// During a root rotation both the old and the new root are trusted.
    /// Roots already present are not repeated.
    pub fn with_additional_roots(mut self, pem: &str) -> Result<Self, CaError> {
        for der in parse_roots(pem.as_bytes(), "additional roots")? {
            if !self.roots.contains(&der) {
                self.roots.push(der);
            }
        }
        Ok(self)
    }

    /// The trust domain this CA issues identities in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots to trust, in order: this CA's own root first.
    pub fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    /// [`Ca::trust_bundle`] as concatenated PEM.
    pub fn trust_bundle_pem(&self) -> String {
        self.roots.iter().map(|c| pem_encode(c)).collect()
    }

    /// The signing certificate followed by its issuers, not including the
    /// root: what is sent along with every leaf.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// End of the signing certificate's validity: no leaf outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.signing_not_after
    }

    /// [`Ca::sign_csr`] for a workload identity in this CA's trust domain.
    pub fn sign_csr_for(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<SignedLeaf, CaError> {
        self.sign_csr(csr_pem, &identity.spiffe_id(&self.trust_domain), ttl, now)
    }

    /// Signs a workload's CSR if it asks for exactly `allowed` (a SPIFFE ID
    /// the caller has proved it owns) and nothing else.
    ///
    /// The leaf is valid from `now - 1 min` (clock skew) to `now + ttl`,
    /// shortened to the signing certificate's own expiry; it is not a CA,
    /// has key usage digitalSignature, extended key usages serverAuth and
    /// clientAuth, an empty subject, the SPIFFE ID as its only (critical) SAN
    /// and a random serial. Everything else the CSR asks for is ignored.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        allowed: &str,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<SignedLeaf, CaError> {
        if ttl.is_zero() {
            return Err(CaError::ZeroTtl);
        }
        if now > self.signing_not_after {
            return Err(CaError::CaExpired {
                not_after: self.signing_not_after,
            });
        }
        match split_spiffe_id(allowed) {
            Some((td, path)) if td == self.trust_domain && !path.is_empty() => {}
            _ => {
                return Err(CaError::AllowedOutsideTrustDomain {
                    id: allowed.to_owned(),
                    trust_domain: self.trust_domain.clone(),
                });
            }
        }

        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(csr_error)?;
        check_csr_sans(&csr.params.subject_alt_names, allowed, &self.trust_domain)?;

        let not_after = add(now, ttl)?.min(self.signing_not_after);
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![uri_san(allowed)?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = not_after;
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        // Only the CSR's public key is used; what else it asked for is not.
        csr.params = params;
        let cert = csr.signed_by(&self.issuer).map_err(CaError::Sign)?;
        Ok(SignedLeaf {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            chain: self.chain.clone(),
            not_after,
            serial: serial.as_ref().to_vec(),
        })
    }
}

// === CSR checks ===

fn csr_error(e: rcgen::Error) -> CsrError {
    match e {
        rcgen::Error::CouldNotParseCertificationRequest => CsrError::Malformed,
        rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
        rcgen::Error::UnsupportedExtension => CsrError::Unsupported(
            "an extension other than SAN, key usage, EKU or basic constraints".to_owned(),
        ),
        other => CsrError::Unsupported(other.to_string()),
    }
}

fn check_csr_sans(sans: &[SanType], allowed: &str, trust_domain: &str) -> Result<(), CsrError> {
    let mut uris = Vec::new();
    for san in sans {
        match san {
            SanType::URI(uri) => uris.push(uri.as_str()),
            SanType::DnsName(name) => return Err(CsrError::DnsSan(name.as_str().to_owned())),
            SanType::IpAddress(ip) => {
                return Err(CsrError::OtherSan {
                    kind: "IP address",
                    value: ip.to_string(),
                });
            }
            SanType::Rfc822Name(mail) => {
                return Err(CsrError::OtherSan {
                    kind: "e-mail",
                    value: mail.as_str().to_owned(),
                });
            }
            SanType::OtherName((oid, _)) => {
                return Err(CsrError::OtherSan {
                    kind: "otherName",
                    value: oid.iter().map(u64::to_string).collect::<Vec<_>>().join("."),
                });
            }
            other => {
                return Err(CsrError::OtherSan {
                    kind: "unknown",
                    value: format!("{other:?}"),
                });
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => {
            return Err(CsrError::NoSan {
                expected: allowed.to_owned(),
            });
        }
        [one] => *one,
        more => {
            return Err(CsrError::ExtraSans {
                count: more.len(),
                expected: allowed.to_owned(),
            });
        }
    };
    let Some((td, _)) = split_spiffe_id(uri) else {
        return Err(CsrError::NotSpiffe(uri.to_owned()));
    };
    if td != trust_domain {
        return Err(CsrError::WrongTrustDomain {
            found: td.to_owned(),
            expected: trust_domain.to_owned(),
        });
    }
    if uri != allowed {
        return Err(CsrError::WrongIdentity {
            found: uri.to_owned(),
            expected: allowed.to_owned(),
        });
    }
    Ok(())
}

/// `spiffe://td/path` into (`td`, `/path`); `None` if not a spiffe URI.
fn split_spiffe_id(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix(SPIFFE_SCHEME)?;
    Some(match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    })
}

/// SPIFFE trust domain names: lowercase letters, digits, '.', '-', '_'.
fn validate_trust_domain(td: &str) -> Result<(), CaError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CaError::InvalidTrustDomain(td.to_owned()))
    }
}

// === certificates ===

fn uri_san(uri: &str) -> Result<SanType, CaError> {
    let ia5 = uri.try_into().map_err(|source| CaError::Generate {
        what: "a URI SAN",
        source,
    })?;
    Ok(SanType::URI(ia5))
}

fn parse_pem_certs(pem: &[u8], source_name: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::NotPem {
            source_name: source_name.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CaError::NotPem {
            source_name: source_name.to_owned(),
            reason: "no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

/// Parses PEM roots; each must be a CA certificate.
fn parse_roots(pem: &[u8], source_name: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = parse_pem_certs(pem, source_name)?;
    for (i, der) in certs.iter().enumerate() {
        let cert = parse_cert(der, source_name, i + 1)?;
        check_is_ca(&cert, source_name, i + 1)?;
    }
    Ok(certs)
}

fn parse_cert<'a>(
    der: &'a CertificateDer<'_>,
    source_name: &str,
    index: usize,
) -> Result<X509Certificate<'a>, CaError> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CaError::BadCertificate {
            source_name: source_name.to_owned(),
            index,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(CaError::BadCertificate {
            source_name: source_name.to_owned(),
            index,
            reason: "trailing bytes after the certificate".to_owned(),
        });
    }
    Ok(cert)
}

/// A CA: basic constraints with CA true and, if key usage is present,
/// keyCertSign.
fn check_is_ca(cert: &X509Certificate<'_>, source_name: &str, index: usize) -> Result<(), CaError> {
    let not_ca = |reason: &str| CaError::NotCa {
        source_name: source_name.to_owned(),
        index,
        reason: reason.to_owned(),
    };
    let bc = cert
        .basic_constraints()
        .map_err(|e| not_ca(&format!("bad basic constraints: {e}")))?;
    match bc {
        Some(bc) if bc.value.ca => {}
        Some(_) => return Err(not_ca("basic constraints say CA:FALSE")),
        None => return Err(not_ca("no basic constraints extension")),
    }
    let ku = cert
        .key_usage()
        .map_err(|e| not_ca(&format!("bad key usage: {e}")))?;
    if let Some(ku) = ku
        && !ku.value.key_cert_sign()
    {
        return Err(not_ca("key usage lacks keyCertSign"));
    }
    Ok(())
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok()
}

/// The trust domain in a `spiffe://` URI SAN of the certificate, if any.
fn spiffe_trust_domain_of(cert: &X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => split_spiffe_id(uri).map(|(td, _)| td.to_owned()),
        _ => None,
    })
}

fn load_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = read(path)?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| CaError::BadKey {
        path: path.to_owned(),
        reason: format!("no PEM private key ({e})"),
    })?;
    KeyPair::try_from(&der).map_err(|e| CaError::BadKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// A random, positive, 16-byte serial (RFC 5280 wants serials
/// unpredictable), from the operating system's random source.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(CaError::Random)?;
    // Positive and exactly 16 bytes long once DER-encoded.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from(bytes.to_vec()))
}

fn add(now: OffsetDateTime, d: Duration) -> Result<OffsetDateTime, CaError> {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| now.checked_add(d))
        .ok_or(CaError::TtlTooLong(d))
}

/// PEM-encodes a certificate.
fn pem_encode(der: &[u8]) -> String {
    pem_encode_labeled("CERTIFICATE", der)
}

fn pem_encode_labeled(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

// === files ===

fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| CaError::CreateDir {
        path: dir.to_owned(),
        source,
    })
}

/// Writes through a temporary file and a rename, so a crash never leaves a
/// half-written file under the final name.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let write_err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(write_err)?;
    // A leftover temporary file from a crash keeps its old mode: set it again.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(write_err)?;
    }
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(write_err)
}

fn warn_if_key_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    key = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the root CA key is readable by group or others; chmod 600 it"
                );
            }
        }
    }
}
