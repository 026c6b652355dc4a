#![allow(clippy::unwrap_used)]

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use time::{Duration, OffsetDateTime};

use super::*;

#[test]
fn parses_valid_ids() {
    for s in [
        "spiffe://cluster.local/ns/default/sa/web",
        "spiffe://example.org/ns/prod-1/sa/my.service_account",
        "spiffe://td/ns/a/sa/b",
        "spiffe://a-b.c0/ns/0/sa/9",
    ] {
        let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(id.to_string(), s, "the string form is canonical");
        assert_eq!(s.parse::<SpiffeId>().unwrap(), id);
    }
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    assert_eq!(id.trust_domain().as_str(), "cluster.local");
    assert_eq!(id.namespace(), "default");
    assert_eq!(id.service_account(), "web");
}

#[test]
fn rejects_invalid_ids() {
    use SpiffeIdError as E;
    let long = format!("spiffe://td/ns/a/sa/{}", "x".repeat(2048));
    let cases: &[(&str, E)] = &[
        ("", E::Scheme),
        ("https://td/ns/a/sa/b", E::Scheme),
        ("SPIFFE://td/ns/a/sa/b", E::Scheme),
        ("spiffe:/td/ns/a/sa/b", E::Scheme),
        ("spiffe://TD/ns/a/sa/b", E::Character('T')),
        ("spiffe://td/ns/A/sa/b", E::Character('A')),
        ("spiffe://td/ns/a/sa/b\0", E::Character('\0')),
        ("spiffe://td/ns/*/sa/b", E::Character('*')),
        ("spiffe://*.td/ns/a/sa/b", E::Character('*')),
        ("spiffe://td/ns/a/sa/b c", E::Character(' ')),
        ("spiffe://td/ns/a/sa/%62", E::PercentEscape),
        ("spiffe://td/ns/a/sa/b?x=1", E::QueryOrFragment),
        ("spiffe://td/ns/a/sa/b#f", E::QueryOrFragment),
        ("spiffe://user@td/ns/a/sa/b", E::Userinfo),
        ("spiffe://td:443/ns/a/sa/b", E::Port),
        ("spiffe:///ns/a/sa/b", E::TrustDomain(String::new())),
        ("spiffe://td./ns/a/sa/b", E::TrustDomain("td.".into())),
        ("spiffe://.td/ns/a/sa/b", E::TrustDomain(".td".into())),
        ("spiffe://a..b/ns/a/sa/b", E::TrustDomain("a..b".into())),
        ("spiffe://td_x/ns/a/sa/b", E::TrustDomain("td_x".into())),
        ("spiffe://td", E::Path(String::new())),
        ("spiffe://td/", E::Path("/".into())),
        ("spiffe://td/ns/a", E::Path("/ns/a".into())),
        ("spiffe://td/ns/a/sa/b/", E::Path("/ns/a/sa/b/".into())),
        ("spiffe://td/ns/a/sa/b/c", E::Path("/ns/a/sa/b/c".into())),
        ("spiffe://td/ns//sa/b", E::Path("/ns//sa/b".into())),
        ("spiffe://td/ns/a/sa/", E::Path("/ns/a/sa/".into())),
        ("spiffe://td//ns/a/sa/b", E::Path("//ns/a/sa/b".into())),
        ("spiffe://td/sa/b/ns/a", E::Path("/sa/b/ns/a".into())),
        ("spiffe://td/ns/../sa/b", E::DotSegment("..".into())),
        ("spiffe://td/ns/./sa/b", E::DotSegment(".".into())),
        ("spiffe://td/ns/a/sa/x..y", E::DotSegment("x..y".into())),
        (long.as_str(), E::TooLong),
    ];
    for (s, want) in cases {
        assert_eq!(SpiffeId::parse(s).as_ref(), Err(want), "{s:?}");
    }
}

#[test]
fn csr_carries_exactly_the_id() {
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let pem = key.csr(&id).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
    // from_pem also checks the CSR's signature.
    let csr = CertificateSigningRequestParams::from_pem(&pem).unwrap();
    let sans: Vec<_> = csr.params.subject_alt_names.iter().collect();
    assert_eq!(sans.len(), 1);
    let SanType::URI(uri) = sans[0] else {
        panic!("expected a URI SAN, got {sans:?}");
    };
    assert_eq!(uri.as_str(), id.to_string());
    assert_eq!(csr.public_key.der_bytes(), key.key_pair().der_bytes());
    assert!(!format!("{key:?}").contains("PRIVATE"));
}

/// A one-level CA that signs CSRs like the control plane's would.
fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn sign(
    ca: &CertifiedIssuer<'static, KeyPair>,
    csr: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> String {
    let mut csr = CertificateSigningRequestParams::from_pem(csr).unwrap();
    csr.params.not_before = not_before;
    csr.params.not_after = not_after;
    let leaf = csr.signed_by(ca).unwrap();
    format!("{}{}", leaf.pem(), ca.pem())
}

#[test]
fn credentials_from_the_ca_answer() {
    let ca = ca();
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let start = OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
    let end = start + Duration::hours(24);
    let pem = sign(&ca, &key.csr(&id).unwrap(), start, end);

    let creds = Credentials::from_pem(&pem, &key, &id, Duration::ZERO).unwrap();
    assert_eq!(creds.id(), &id);
    assert_eq!(creds.chain().len(), 2, "leaf and CA");
    assert_eq!(creds.not_before(), start);
    assert_eq!(creds.expires_at(), end);
    assert_eq!(creds.renew_at(), start + Duration::hours(12));
    assert_eq!(creds.certified_key().cert.len(), 2);
    assert!(matches!(creds.private_key(), PrivateKeyDer::Pkcs8(_)));

    let early = Credentials::from_pem(&pem, &key, &id, Duration::minutes(-30)).unwrap();
    assert_eq!(early.renew_at(), start + Duration::minutes(11 * 60 + 30));
    // Jitter never pushes renewal past expiry.
    let clamped = Credentials::from_pem(&pem, &key, &id, Duration::days(7)).unwrap();
    assert_eq!(clamped.renew_at(), end);
}

#[test]
fn credentials_reject_a_wrong_answer() {
    let ca = ca();
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let other = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/db").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let start = OffsetDateTime::now_utc();
    let end = start + Duration::hours(1);

    let pem = sign(&ca, &key.csr(&other).unwrap(), start, end);
    assert!(matches!(
        Credentials::from_pem(&pem, &key, &id, Duration::ZERO),
        Err(CredentialsError::IdMismatch { .. })
    ));

    let stranger = WorkloadKey::generate().unwrap();
    let pem = sign(&ca, &stranger.csr(&id).unwrap(), start, end);
    assert!(matches!(
        Credentials::from_pem(&pem, &key, &id, Duration::ZERO),
        Err(CredentialsError::KeyMismatch)
    ));

    assert!(matches!(
        Credentials::from_pem("", &key, &id, Duration::ZERO),
        Err(CredentialsError::NoCertificate)
    ));
}
