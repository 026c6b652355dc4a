//! SDS: the secrets that sidecars' TLS contexts name, served on the ADS
//! stream like any other type but made per client, not per view.
//!
//! - [`SECRET_ROOTCA`]: the trust bundle (every root, `--ca-extra-roots`
//!   included) as a validation context. The same for every client; its
//!   version changes when the bundle does.
//! - [`SECRET_DEFAULT`]: a workload certificate and key for a sidecar that
//!   cannot make a CSR itself (a stock Envoy). The control plane makes the
//!   key, signs a leaf for the node's identity (`NAMESPACE`,
//!   `SERVICE_ACCOUNT` node metadata) and re-issues it at half-life. Sent
//!   only to a node that proves that identity: a client certificate for it
//!   on the TLS listener, or its bootstrap token in `REMORA_TOKEN`.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use remora_xds_proto::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use remora_xds_proto::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret as PbSecret, TlsCertificate, secret,
};
use time::OffsetDateTime;

use crate::ca::service::{CaMetrics, RefusalReason, lookup_token};
use crate::ca::{Ca, CaError};
use crate::metrics::Metrics;
use crate::model::{Identity, Mesh, Secret};
use crate::translate::{
    META_NAMESPACE, META_SERVICE_ACCOUNT, META_TOKEN, Resource, SECRET_DEFAULT, SECRET_ROOTCA,
    resource,
};

/// How long to wait before retrying a certificate the CA failed to sign.
const RETRY: Duration = Duration::from_secs(30);

/// What the control plane needs to make secrets.
pub struct SecretSource {
    ca: Arc<Ca>,
    leaf_ttl: Duration,
    rootca: Resource,
    metrics: CaMetrics,
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSource")
            .field("ca", &self.ca)
            .field("leaf_ttl", &self.leaf_ttl)
            .field("rootca_version", &self.rootca.version)
            .finish_non_exhaustive()
    }
}

/// The stored PEM of a secret, inline.
fn inline(pem: String) -> DataSource {
    DataSource {
        specifier: Some(Specifier::InlineBytes(pem.into_bytes())),
        ..Default::default()
    }
}

impl SecretSource {
    /// Secrets from `ca`, with workload certificates valid for `leaf_ttl`,
    /// counted in `metrics` (`remora_ca_certificates_issued_total` and
    /// `..._refused_total`).
    pub fn new(ca: Arc<Ca>, leaf_ttl: Duration, metrics: &Metrics) -> SecretSource {
        let rootca = resource(
            SECRET_ROOTCA.to_string(),
            &PbSecret {
                name: SECRET_ROOTCA.to_string(),
                r#type: Some(secret::Type::ValidationContext(
                    CertificateValidationContext {
                        trusted_ca: Some(inline(ca.trust_bundle_pem())),
                        ..Default::default()
                    },
                )),
            },
        );
        SecretSource {
            ca,
            leaf_ttl,
            rootca,
            metrics: CaMetrics::new(metrics),
        }
    }

    /// The trust bundle secret.
    pub fn rootca(&self) -> &Resource {
        &self.rootca
    }

    /// Checks that `node` may hold its identity and issues the
    /// [`SECRET_DEFAULT`] secret for it, counting the outcome. Returns the
    /// secret and when to re-issue it (half-way through its life).
    pub fn workload_secret(
        &self,
        node: &NodeCredentials,
        mesh: &Mesh,
    ) -> Result<(Resource, std::time::Instant), Refused> {
        let result = self.authorize(node, mesh).and_then(|identity| {
            self.issue(&identity).map_err(|e| Refused {
                reason: RefusalReason::Internal,
                message: format!("the CA could not sign: {e}"),
            })
        });
        match &result {
            Ok(_) => self.metrics.issued.inc(),
            Err(refused) => self.metrics.refused(refused.reason).inc(),
        }
        result
    }

    /// The identity `node` proved.
    fn authorize(&self, node: &NodeCredentials, mesh: &Mesh) -> Result<Identity, Refused> {
        let identity = node.identity.clone().ok_or_else(|| Refused {
            reason: RefusalReason::MissingCredentials,
            message: format!(
                "the node metadata has no {META_SERVICE_ACCOUNT}, so there is no identity to \
                 issue a certificate for"
            ),
        })?;
        let spiffe_id = identity.spiffe_id(self.ca.trust_domain());
        if node.tls_peer.as_deref() == Some(spiffe_id.as_str()) {
            return Ok(identity);
        }
        let Some(token) = &node.token else {
            return Err(Refused {
                reason: RefusalReason::MissingCredentials,
                message: format!(
                    "nothing proves the node is {spiffe_id}: connect over the TLS listener \
                     with its certificate, or set {META_TOKEN} to its bootstrap token \
                     (workload_tokens in the mesh file)"
                ),
            });
        };
        match lookup_token(mesh, token.expose()) {
            Some(found) if found == identity => Ok(identity),
            Some(found) => Err(Refused {
                reason: RefusalReason::WrongIdentity,
                message: format!(
                    "{META_TOKEN} is the bootstrap token of {} but the node metadata \
                     ({META_NAMESPACE}, {META_SERVICE_ACCOUNT}) asks for {spiffe_id}",
                    found.spiffe_id(self.ca.trust_domain())
                ),
            }),
            None => Err(Refused {
                reason: RefusalReason::UnknownToken,
                message: format!(
                    "{META_TOKEN} is not a bootstrap token of the mesh file (workload_tokens)"
                ),
            }),
        }
    }

    /// A fresh P-256 key and a leaf for `identity`, as the `default`
    /// secret.
    fn issue(&self, identity: &Identity) -> Result<(Resource, std::time::Instant), IssueError> {
        let spiffe_id = identity.spiffe_id(self.ca.trust_domain());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.as_str().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let now = OffsetDateTime::now_utc();
        let leaf = self.ca.sign_csr_for(&csr, identity, self.leaf_ttl, now)?;
        let half = Duration::try_from((leaf.not_after - now) / 2).unwrap_or(Duration::ZERO);
        tracing::info!(
            spiffe_id,
            serial = leaf.serial_hex(),
            expires = %leaf.not_after,
            "issued a workload certificate over SDS"
        );
        let secret = PbSecret {
            name: SECRET_DEFAULT.to_string(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(leaf.full_chain_pem())),
                private_key: Some(inline(key.serialize_pem())),
                ..Default::default()
            })),
        };
        Ok((
            resource(SECRET_DEFAULT.to_string(), &secret),
            std::time::Instant::now() + half.max(Duration::from_secs(1)),
        ))
    }

    /// When to retry after the CA failed to sign.
    pub fn retry_at() -> std::time::Instant {
        std::time::Instant::now() + RETRY
    }
}

#[derive(Debug, thiserror::Error)]
enum IssueError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cannot make the key or CSR: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Why a node was not sent its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The `reason` label of `remora_ca_certificates_refused_total`.
    pub reason: RefusalReason,
    /// What is missing or wrong; never holds the token.
    pub message: String,
}

/// What a node presents to get its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCredentials {
    /// The identity its metadata names (`NAMESPACE`, default `default`,
    /// and `SERVICE_ACCOUNT`), if it names a service account.
    pub identity: Option<Identity>,
    /// Its bootstrap token (`REMORA_TOKEN`).
    pub token: Option<Secret>,
    /// The SPIFFE ID of its client certificate, on the TLS listener.
    pub tls_peer: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WorkloadToken;
    use remora_xds_proto::unpack;

    const TOKEN: &str = "0123456789abcdef-web";

    fn ca() -> Arc<Ca> {
        let dir = std::env::temp_dir().join(format!(
            "remora-secrets-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::load_or_create(&dir, "cluster.local");
        let _ = std::fs::remove_dir_all(&dir);
        Arc::new(ca.unwrap_or_else(|e| panic!("creating a CA: {e}")))
    }

    fn web() -> Identity {
        Identity {
            namespace: "shop".into(),
            service_account: "web".into(),
        }
    }

    fn mesh() -> Mesh {
        Mesh::new(
            "cluster.local".into(),
            Vec::new(),
            vec![WorkloadToken {
                identity: web(),
                token: Secret::new(TOKEN),
            }],
        )
        .expect("valid")
    }

    fn node(token: Option<&str>, tls_peer: Option<&str>) -> NodeCredentials {
        NodeCredentials {
            identity: Some(web()),
            token: token.map(Secret::new),
            tls_peer: tls_peer.map(str::to_string),
        }
    }

    #[test]
    fn rootca_holds_the_whole_trust_bundle() {
        let ca = ca();
        let source = SecretSource::new(ca.clone(), Duration::from_secs(3600), &Metrics::new());
        let secret: PbSecret = unpack(&source.rootca().any).expect("a Secret");
        assert_eq!(secret.name, "ROOTCA");
        let Some(secret::Type::ValidationContext(vc)) = secret.r#type else {
            panic!("a validation context expected");
        };
        assert!(vc.match_typed_subject_alt_names.is_empty());
        assert_eq!(
            vc.trusted_ca.and_then(|d| d.specifier),
            Some(Specifier::InlineBytes(ca.trust_bundle_pem().into_bytes()))
        );
        let again = SecretSource::new(ca, Duration::from_secs(3600), &Metrics::new());
        assert_eq!(again.rootca().version, source.rootca().version);
    }

    #[test]
    fn default_is_issued_for_a_valid_token_or_a_matching_tls_peer() {
        let metrics = Metrics::new();
        let source = SecretSource::new(ca(), Duration::from_secs(3600), &metrics);
        let (secret, renew_at) = source
            .workload_secret(&node(Some(TOKEN), None), &mesh())
            .expect("issued");
        let in_half = renew_at - std::time::Instant::now();
        assert!(in_half > Duration::from_secs(1790) && in_half <= Duration::from_secs(1800));
        let secret: PbSecret = unpack(&secret.any).expect("a Secret");
        assert_eq!(secret.name, "default");
        let Some(secret::Type::TlsCertificate(cert)) = secret.r#type else {
            panic!("a TLS certificate expected");
        };
        let Some(Specifier::InlineBytes(chain)) = cert.certificate_chain.and_then(|d| d.specifier)
        else {
            panic!("inline chain");
        };
        let chain = String::from_utf8(chain).expect("PEM");
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(chain.as_bytes())
            .expect("a certificate");
        assert_eq!(
            crate::tls::spiffe_id_of(&der).as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert!(matches!(
            cert.private_key.and_then(|d| d.specifier),
            Some(Specifier::InlineBytes(k)) if k.starts_with(b"-----BEGIN PRIVATE KEY-----")
        ));

        let (again, _) = source
            .workload_secret(
                &node(None, Some("spiffe://cluster.local/ns/shop/sa/web")),
                &mesh(),
            )
            .expect("issued to the matching TLS peer");
        assert_ne!(again.version, "", "a new key each time");
        assert_eq!(metrics.ca_certificates_issued.get(), 2);
    }

    #[test]
    fn default_is_refused_without_proof() {
        let metrics = Metrics::new();
        let source = SecretSource::new(ca(), Duration::from_secs(3600), &metrics);
        let refused =
            |n: NodeCredentials| source.workload_secret(&n, &mesh()).expect_err("refused");

        let r = refused(node(None, None));
        assert_eq!(r.reason, RefusalReason::MissingCredentials);
        assert!(r.message.contains("REMORA_TOKEN"), "{}", r.message);

        let r = refused(node(Some("0123456789abcdef-bad"), None));
        assert_eq!(r.reason, RefusalReason::UnknownToken);
        assert!(!r.message.contains("0123456789abcdef"), "never the token");

        let r = refused(node(None, Some("spiffe://cluster.local/ns/shop/sa/other")));
        assert_eq!(r.reason, RefusalReason::MissingCredentials);

        let mut other = node(Some(TOKEN), None);
        other.identity = Some(Identity {
            namespace: "shop".into(),
            service_account: "admin".into(),
        });
        let r = refused(other);
        assert_eq!(r.reason, RefusalReason::WrongIdentity);
        assert!(r.message.contains("sa/web") && r.message.contains("sa/admin"));

        let mut anonymous = node(Some(TOKEN), None);
        anonymous.identity = None;
        assert_eq!(refused(anonymous).reason, RefusalReason::MissingCredentials);

        assert_eq!(metrics.ca_certificates_issued.get(), 0);
        let refused_total: u64 = RefusalReason::ALL
            .iter()
            .map(|r| {
                metrics
                    .ca_certificates_refused
                    .with_label_values(&[r.as_str()])
                    .get()
            })
            .sum();
        assert_eq!(refused_total, 5);
    }
}
