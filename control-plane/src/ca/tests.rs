#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::*;

const TD: &str = "example.org";
const ID: &str = "spiffe://example.org/ns/shop/sa/cart";

/// A fixed instant (2027-01-15), so validity checks are deterministic.
fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "remora-ca-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        std::fs::create_dir_all(&self.0).unwrap();
        let path = self.file(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

/// A CSR from a fresh key with the given SANs and an empty subject.
fn csr(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => (*u).to_owned(),
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect()
}

/// A CA certificate made with rcgen, as an operator would bring one.
struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
    pem: String,
}

fn test_root(cn: &str) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    TestCa {
        params,
        key,
        der: cert.der().clone(),
        pem: cert.pem(),
    }
}

fn test_intermediate(root: &TestCa, cn: &str) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_params(&root.params, &root.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    TestCa {
        params,
        key,
        der: cert.der().clone(),
        pem: cert.pem(),
    }
}

fn embedded(dir: &TempDir) -> Ca {
    Ca::load_or_create_at(dir.path(), TD, now()).unwrap()
}

// === embedded root ===

#[test]
fn creates_root_then_reloads_the_same() {
    let dir = TempDir::new("create");
    let ca = embedded(&dir);
    assert_eq!(ca.trust_domain(), TD);
    assert!(ca.chain().is_empty(), "a root signs directly");
    let bundle = ca.trust_bundle();
    assert_eq!(bundle.len(), 1);

    let root = parse(&bundle[0]);
    let bc = root.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(1));
    let ku = root.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let cn = root.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), ROOT_COMMON_NAME);
    assert_eq!(uri_sans(&root), vec![format!("spiffe://{TD}")]);
    assert_eq!(
        root.validity().not_after.to_datetime(),
        now() + time::Duration::try_from(ROOT_VALIDITY).unwrap()
    );
    assert!(root.verify_signature(None).is_ok(), "self-signed");
    assert_eq!(
        root.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.file(ROOT_KEY_FILE)), 0o600);
        assert_eq!(mode(dir.path()), 0o700);
    }

    // A later start, a year on, reuses the files.
    let later = now() + time::Duration::days(365);
    let again = Ca::load_or_create_at(dir.path(), TD, later).unwrap();
    assert_eq!(again.trust_bundle(), bundle);
    assert_eq!(again.not_after(), ca.not_after());
    let pem = ca.trust_bundle_pem();
    assert_eq!(
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap(),
        bundle
    );
}

#[test]
fn reload_with_another_trust_domain_is_refused() {
    let dir = TempDir::new("td");
    embedded(&dir);
    let err = Ca::load_or_create_at(dir.path(), "other.org", now()).unwrap_err();
    assert!(
        matches!(&err, CaError::TrustDomainMismatch { found, configured, .. }
            if found == TD && configured == "other.org"),
        "{err}"
    );
}

#[test]
fn invalid_trust_domain_is_refused() {
    let dir = TempDir::new("badtd");
    let err = Ca::load_or_create_at(dir.path(), "Example.org/x", now()).unwrap_err();
    assert!(matches!(err, CaError::InvalidTrustDomain(_)), "{err}");
    assert!(!dir.path().exists(), "nothing was created");
}

#[test]
fn one_file_of_the_pair_missing_is_refused() {
    let dir = TempDir::new("pair");
    embedded(&dir);
    std::fs::remove_file(dir.file(ROOT_KEY_FILE)).unwrap();
    let err = Ca::load_or_create_at(dir.path(), TD, now()).unwrap_err();
    assert!(
        matches!(&err, CaError::IncompletePair { missing, .. } if missing.ends_with(ROOT_KEY_FILE)),
        "{err}"
    );
    assert!(!dir.file(ROOT_KEY_FILE).exists(), "no new key written");
    assert!(err.to_string().contains(ROOT_KEY_FILE), "{err}");
}

#[test]
fn corrupted_files_give_clear_errors() {
    let dir = TempDir::new("corrupt");
    embedded(&dir);
    let good_cert = std::fs::read_to_string(dir.file(ROOT_CERT_FILE)).unwrap();
    let good_key = std::fs::read_to_string(dir.file(ROOT_KEY_FILE)).unwrap();
    let load = || Ca::load_or_create_at(dir.path(), TD, now()).unwrap_err();

    // Certificate: not PEM.
    dir.write(ROOT_CERT_FILE, "hello\n");
    let err = load();
    assert!(matches!(err, CaError::NotPem { .. }), "{err}");
    assert!(err.to_string().contains(ROOT_CERT_FILE), "{err}");

    // Certificate: PEM, but not X.509 inside.
    dir.write(ROOT_CERT_FILE, &pem_encode(b"not a certificate"));
    let err = load();
    assert!(
        matches!(err, CaError::BadCertificate { index: 1, .. }),
        "{err}"
    );

    // Certificate: unreadable (a directory in its place).
    std::fs::remove_file(dir.file(ROOT_CERT_FILE)).unwrap();
    std::fs::create_dir(dir.file(ROOT_CERT_FILE)).unwrap();
    let err = load();
    assert!(matches!(err, CaError::Read { .. }), "{err}");
    std::fs::remove_dir(dir.file(ROOT_CERT_FILE)).unwrap();

    // Key: not PEM, then not a key.
    dir.write(ROOT_CERT_FILE, &good_cert);
    dir.write(ROOT_KEY_FILE, "garbage");
    let err = load();
    assert!(matches!(err, CaError::BadKey { .. }), "{err}");
    assert!(err.to_string().contains(ROOT_KEY_FILE), "{err}");
    dir.write(
        ROOT_KEY_FILE,
        &pem_encode_labeled("PRIVATE KEY", b"not a key"),
    );
    let err = load();
    assert!(matches!(err, CaError::BadKey { .. }), "{err}");

    // Key: another key.
    dir.write(ROOT_KEY_FILE, &KeyPair::generate().unwrap().serialize_pem());
    let err = load();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");

    // Certificate: not a CA.
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["leaf.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    dir.write(ROOT_CERT_FILE, &leaf.pem());
    dir.write(ROOT_KEY_FILE, &key.serialize_pem());
    let err = load();
    assert!(matches!(err, CaError::NotCa { index: 1, .. }), "{err}");

    // Expired: the same good files, eleven years on.
    dir.write(ROOT_CERT_FILE, &good_cert);
    dir.write(ROOT_KEY_FILE, &good_key);
    let err =
        Ca::load_or_create_at(dir.path(), TD, now() + time::Duration::days(11 * 365)).unwrap_err();
    assert!(matches!(err, CaError::Expired { .. }), "{err}");
    let err = Ca::load_or_create_at(dir.path(), TD, now() - time::Duration::days(1)).unwrap_err();
    assert!(matches!(err, CaError::NotYetValid { .. }), "{err}");
    Ca::load_or_create_at(dir.path(), TD, now()).unwrap();
}

// === signing ===

#[test]
fn signs_a_csr_for_the_right_identity() {
    let dir = TempDir::new("sign");
    let ca = embedded(&dir);
    let ttl = Duration::from_secs(3600);
    let leaf = ca.sign_csr(&csr(vec![uri(ID)]), ID, ttl, now()).unwrap();

    let cert = parse(&leaf.cert);
    assert_eq!(uri_sans(&cert), vec![ID.to_owned()]);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "the subject is empty, so the SAN is critical");
    assert_eq!(cert.subject().iter().count(), 0);
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(cert.validity().not_before.to_datetime(), now() - CLOCK_SKEW);
    assert_eq!(cert.validity().not_after.to_datetime(), now() + ttl);
    assert_eq!(leaf.not_after, now() + ttl);
    assert_eq!(cert.tbs_certificate.raw_serial(), leaf.serial.as_slice());
    assert_eq!(leaf.serial.len(), 16);
    assert!(leaf.chain.is_empty());

    // It chains to the root.
    let root_der = &ca.trust_bundle()[0];
    let root = parse(root_der);
    cert.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(cert.issuer().as_raw(), root.subject().as_raw());
    // The authority key identifier names the root's subject key identifier,
    // which OpenSSL-based peers (Envoy) use to build the chain.
    let ski = root
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
        .unwrap();
    let aki = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref(),
            _ => None,
        })
        .unwrap();
    assert_eq!(aki.0, ski.as_slice());

    // The PEM is the DER.
    assert_eq!(
        CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap(),
        leaf.cert
    );

    // Serials are random: the same CSR twice gets two serials.
    let again = ca.sign_csr(&csr(vec![uri(ID)]), ID, ttl, now()).unwrap();
    assert_ne!(again.serial, leaf.serial);
}

#[test]
fn sign_for_identity_uses_the_trust_domain() {
    let dir = TempDir::new("ident");
    let ca = embedded(&dir);
    let identity = Identity {
        namespace: "shop".to_owned(),
        service_account: "cart".to_owned(),
    };
    let leaf = ca
        .sign_csr_for(&csr(vec![uri(ID)]), &identity, DEFAULT_LEAF_TTL, now())
        .unwrap();
    assert_eq!(uri_sans(&parse(&leaf.cert)), vec![ID.to_owned()]);
    assert_eq!(leaf.not_after, now() + DEFAULT_LEAF_TTL);
}

#[test]
fn short_ttls_work_zero_is_refused_and_the_ca_expiry_caps() {
    let dir = TempDir::new("ttl");
    let ca = embedded(&dir);
    let leaf = ca
        .sign_csr(&csr(vec![uri(ID)]), ID, Duration::from_secs(5), now())
        .unwrap();
    assert_eq!(leaf.not_after, now() + Duration::from_secs(5));

    let err = ca
        .sign_csr(&csr(vec![uri(ID)]), ID, Duration::ZERO, now())
        .unwrap_err();
    assert!(matches!(err, CaError::ZeroTtl), "{err}");

    // A leaf never outlives its CA.
    let late = ca.not_after() - time::Duration::hours(1);
    let leaf = ca
        .sign_csr(&csr(vec![uri(ID)]), ID, DEFAULT_LEAF_TTL, late)
        .unwrap();
    assert_eq!(leaf.not_after, ca.not_after());

    let err = ca
        .sign_csr(
            &csr(vec![uri(ID)]),
            ID,
            DEFAULT_LEAF_TTL,
            ca.not_after() + time::Duration::SECOND,
        )
        .unwrap_err();
    assert!(matches!(err, CaError::CaExpired { .. }), "{err}");
}

fn refusal(ca: &Ca, csr_pem: &str) -> CsrError {
    match ca.sign_csr(csr_pem, ID, DEFAULT_LEAF_TTL, now()) {
        Err(CaError::Csr(e)) => e,
        other => panic!("expected a CSR refusal, got {other:?}"),
    }
}

#[test]
fn csrs_for_anything_else_are_refused() {
    let dir = TempDir::new("refuse");
    let ca = embedded(&dir);
    let other = "spiffe://example.org/ns/shop/sa/admin";

    assert_eq!(
        refusal(&ca, &csr(vec![uri(other)])),
        CsrError::WrongIdentity {
            found: other.to_owned(),
            expected: ID.to_owned()
        }
    );
    assert_eq!(
        refusal(&ca, &csr(vec![uri(ID), uri(other)])),
        CsrError::ExtraSans {
            count: 2,
            expected: ID.to_owned()
        }
    );
    assert_eq!(
        refusal(&ca, &csr(vec![uri(ID), dns("cart.shop.svc")])),
        CsrError::DnsSan("cart.shop.svc".to_owned())
    );
    assert_eq!(
        refusal(&ca, &csr(vec![dns("cart.shop.svc")])),
        CsrError::DnsSan("cart.shop.svc".to_owned())
    );
    assert!(matches!(
        refusal(
            &ca,
            &csr(vec![uri(ID), SanType::IpAddress([10, 0, 0, 1].into())])
        ),
        CsrError::OtherSan {
            kind: "IP address",
            ..
        }
    ));
    assert_eq!(
        refusal(&ca, &csr(vec![uri("spiffe://evil.org/ns/shop/sa/cart")])),
        CsrError::WrongTrustDomain {
            found: "evil.org".to_owned(),
            expected: TD.to_owned()
        }
    );
    assert_eq!(
        refusal(&ca, &csr(vec![uri("https://example.org/ns/shop/sa/cart")])),
        CsrError::NotSpiffe("https://example.org/ns/shop/sa/cart".to_owned())
    );
    assert_eq!(
        refusal(&ca, &csr(vec![])),
        CsrError::NoSan {
            expected: ID.to_owned()
        }
    );
    assert_eq!(refusal(&ca, "not a csr"), CsrError::Malformed);

    // A CSR whose signature was tampered with.
    let good = csr(vec![uri(ID)]);
    let mut der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = pem_encode_labeled("CERTIFICATE REQUEST", &der);
    assert_eq!(refusal(&ca, &tampered), CsrError::BadSignature);

    // The caller's allowed identity must be in our trust domain.
    let err = ca
        .sign_csr(
            &csr(vec![uri("spiffe://other.org/ns/a/sa/b")]),
            "spiffe://other.org/ns/a/sa/b",
            DEFAULT_LEAF_TTL,
            now(),
        )
        .unwrap_err();
    assert!(
        matches!(err, CaError::AllowedOutsideTrustDomain { .. }),
        "{err}"
    );
}

// === operator-given CA ===

#[test]
fn intermediate_from_files_signs_leaves_with_its_chain() {
    let dir = TempDir::new("inter");
    let root = test_root("Offline root");
    let inter = test_intermediate(&root, "Cluster intermediate");
    let chain = dir.write("chain.pem", &format!("{}{}", inter.pem, root.pem));
    let key = dir.write("key.pem", &inter.key.serialize_pem());

    let ca = Ca::from_files_with_bundle_at(&chain, &key, None, TD, now()).unwrap();
    assert_eq!(ca.trust_bundle(), vec![root.der.clone()]);
    assert_eq!(ca.chain(), std::slice::from_ref(&inter.der));

    let leaf = ca
        .sign_csr(&csr(vec![uri(ID)]), ID, DEFAULT_LEAF_TTL, now())
        .unwrap();
    assert_eq!(leaf.chain, vec![inter.der.clone()]);
    let cert = parse(&leaf.cert);
    let inter_cert = parse(&inter.der);
    let root_cert = parse(&root.der);
    cert.verify_signature(Some(inter_cert.public_key()))
        .unwrap();
    assert!(cert.verify_signature(Some(root_cert.public_key())).is_err());
    inter_cert
        .verify_signature(Some(root_cert.public_key()))
        .unwrap();
    assert_eq!(
        leaf.full_chain_pem(),
        format!("{}{}", leaf.cert_pem, pem_encode(&inter.der))
    );

    // The current-time constructor accepts the same files.
    Ca::from_files(&chain, &key, TD).unwrap();
}

#[test]
fn root_from_files_signs_directly() {
    let dir = TempDir::new("rootfiles");
    let root = test_root("Offline root");
    let chain = dir.write("chain.pem", &root.pem);
    let key = dir.write("key.pem", &root.key.serialize_pem());
    let ca = Ca::from_files_with_bundle_at(&chain, &key, None, TD, now()).unwrap();
    assert!(ca.chain().is_empty());
    let leaf = ca
        .sign_csr(&csr(vec![uri(ID)]), ID, DEFAULT_LEAF_TTL, now())
        .unwrap();
    parse(&leaf.cert)
        .verify_signature(Some(parse(&root.der).public_key()))
        .unwrap();
}

#[test]
fn chain_without_root_needs_a_bundle() {
    let dir = TempDir::new("noroot");
    let root = test_root("Offline root");
    let inter = test_intermediate(&root, "Cluster intermediate");
    let chain = dir.write("tls.crt", &inter.pem);
    let key = dir.write("tls.key", &inter.key.serialize_pem());

    let err = Ca::from_files_with_bundle_at(&chain, &key, None, TD, now()).unwrap_err();
    assert!(matches!(err, CaError::NoRoot { .. }), "{err}");

    let bundle = dir.write("ca.crt", &root.pem);
    let ca = Ca::from_files_with_bundle_at(&chain, &key, Some(&bundle), TD, now()).unwrap();
    assert_eq!(ca.trust_bundle(), vec![root.der.clone()]);
    assert_eq!(ca.chain(), std::slice::from_ref(&inter.der));

    // A bundle of an unrelated root does not make the chain trusted.
    let stranger = dir.write("stranger.crt", &test_root("Stranger").pem);
    let err = Ca::from_files_with_bundle_at(&chain, &key, Some(&stranger), TD, now()).unwrap_err();
    assert!(matches!(err, CaError::UntrustedChain { .. }), "{err}");
}

#[test]
fn broken_chains_and_mismatched_keys_are_refused() {
    let dir = TempDir::new("broken");
    let root = test_root("Offline root");
    let inter = test_intermediate(&root, "Cluster intermediate");
    let stranger = test_root("Stranger");

    let chain = dir.write("chain.pem", &format!("{}{}", inter.pem, stranger.pem));
    let key = dir.write("key.pem", &inter.key.serialize_pem());
    let err = Ca::from_files_with_bundle_at(&chain, &key, None, TD, now()).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::ChainBroken {
                index: 1,
                next: 2,
                ..
            }
        ),
        "{err}"
    );

    let chain = dir.write("chain.pem", &format!("{}{}", inter.pem, root.pem));
    let key = dir.write("key.pem", &root.key.serialize_pem());
    let err = Ca::from_files_with_bundle_at(&chain, &key, None, TD, now()).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("key.pem"), "{err}");
}

// === trust bundle ===

#[test]
fn bundle_with_two_roots_holds_both() {
    let dir = TempDir::new("bundle");
    let ca = embedded(&dir);
    let own = ca.trust_bundle()[0].clone();
    let next_root = test_root("Next root");

    let ca = ca.with_additional_roots(&next_root.pem).unwrap();
    assert_eq!(ca.trust_bundle(), vec![own.clone(), next_root.der.clone()]);
    let pem = ca.trust_bundle_pem();
    let parsed = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(parsed, vec![own.clone(), next_root.der.clone()]);

    // Adding the same root again does not repeat it.
    let ca = ca.with_additional_roots(&pem).unwrap();
    assert_eq!(ca.trust_bundle().len(), 2);

    // Leaves still come from the CA's own key.
    let leaf = ca
        .sign_csr(&csr(vec![uri(ID)]), ID, DEFAULT_LEAF_TTL, now())
        .unwrap();
    parse(&leaf.cert)
        .verify_signature(Some(parse(&own).public_key()))
        .unwrap();
}

#[test]
fn additional_roots_must_be_ca_certificates() {
    let dir = TempDir::new("bundlebad");
    let ca = embedded(&dir);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["leaf.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let err = ca.with_additional_roots(&leaf.pem()).unwrap_err();
    assert!(matches!(err, CaError::NotCa { .. }), "{err}");
    assert!(err.to_string().contains("additional roots"), "{err}");

    let ca = embedded(&dir);
    let err = ca.with_additional_roots("nothing here").unwrap_err();
    assert!(matches!(err, CaError::NotPem { .. }), "{err}");
}

#[test]
fn pem_encoding_round_trips() {
    for len in [0usize, 1, 2, 3, 47, 48, 49, 100, 1000] {
        let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let pem = pem_encode(&der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back = CertificateDer::from_pem_slice(pem.as_bytes());
        if len == 0 {
            // An empty block is not a certificate; just no panic.
            continue;
        }
        assert_eq!(back.unwrap().as_ref(), der.as_slice(), "len {len}");
    }
}
