#![allow(clippy::unwrap_used)]

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, string::Ia5String,
};
use rustls::client::Resumption;
use rustls::{HandshakeKind, ProtocolVersion};
use rustls_pki_types::PrivateKeyDer;
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::*;
use crate::identity::{Credentials, WorkloadKey};

const TD: &str = "cluster.local";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn web() -> SpiffeId {
    id("spiffe://cluster.local/ns/default/sa/web")
}

fn db() -> SpiffeId {
    id("spiffe://cluster.local/ns/default/sa/db")
}

// === test PKI ===

/// A root and an intermediate that signs the leaves, as the mesh CA would
/// with an operator-given intermediate.
struct Pki {
    root: CertifiedIssuer<'static, KeyPair>,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl Pki {
    fn new(name: &str) -> Self {
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} root")),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(&format!("{name} intermediate")),
            KeyPair::generate().unwrap(),
            &root,
        )
        .unwrap();
        Self { root, intermediate }
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(TrustDomain::new(TD).unwrap(), &self.root.pem()).unwrap()
    }

    /// Leaf params as the CA sets them: both EKUs, valid around now.
    fn leaf_params(params: &mut CertificateParams) {
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::hours(1);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
    }

    /// Signs `key`'s CSR for `id` through the real CSR path; `tweak` changes
    /// the leaf (validity, ...). Returns the PEM chain (leaf, intermediate).
    fn sign(
        &self,
        key: &WorkloadKey,
        id: &SpiffeId,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> String {
        let mut csr = CertificateSigningRequestParams::from_pem(&key.csr(id).unwrap()).unwrap();
        Self::leaf_params(&mut csr.params);
        tweak(&mut csr.params);
        let leaf = csr.signed_by(&self.intermediate).unwrap();
        format!("{}{}", leaf.pem(), self.intermediate.pem())
    }

    fn credentials(&self, id: &SpiffeId) -> Credentials {
        self.credentials_with(id, |_| {})
    }

    fn credentials_with(
        &self,
        id: &SpiffeId,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Credentials {
        let key = WorkloadKey::generate().unwrap();
        let pem = self.sign(&key, id, tweak);
        Credentials::from_pem(&pem, &key, id, Duration::ZERO).unwrap()
    }

    /// A chain and key with arbitrary SANs, bypassing [`Credentials`]' checks
    /// (which would refuse them).
    fn raw_leaf(
        &self,
        sans: Vec<SanType>,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        Self::leaf_params(&mut params);
        params.subject_alt_names = sans;
        let leaf = params.signed_by(&key, &self.intermediate).unwrap();
        (
            vec![leaf.der().clone(), self.intermediate.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).unwrap())
}

// === handshake harness ===

struct Workload {
    resolver: Arc<CredentialResolver>,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl Workload {
    fn new(credentials: Credentials, bundle: &TrustBundle) -> Self {
        let resolver = Arc::new(CredentialResolver::new(credentials));
        Self {
            client: client_config(resolver.clone(), bundle).unwrap(),
            server: server_config(resolver.clone(), bundle).unwrap(),
            resolver,
        }
    }
}

type Handshake = (
    io::Result<client::TlsStream<DuplexStream>>,
    io::Result<server::TlsStream<DuplexStream>>,
);

async fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    name: ServerName<'static>,
) -> Handshake {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let connect = TlsConnector::from(client).connect(name, c);
    let accept = TlsAcceptor::from(server).accept(s);
    let (client, server) = tokio::join!(
        async move {
            let mut tls = connect.await?;
            // In TLS 1.3 the client finishes first; a read surfaces the
            // server's verdict on our certificate (an alert) or, when
            // accepted, its first bytes.
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"hello");
            Ok(tls)
        },
        async move {
            let mut tls = accept.await?;
            tls.write_all(b"hello").await?;
            tls.flush().await?;
            Ok(tls)
        }
    );
    (client, server)
}

/// One request/response over an established pair.
async fn ping(
    client: &mut client::TlsStream<DuplexStream>,
    server: &mut server::TlsStream<DuplexStream>,
) {
    client.write_all(b"ping").await.unwrap();
    client.flush().await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.unwrap();
    server.flush().await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

fn failure<T>(result: &io::Result<T>) -> HandshakeFailure {
    match result {
        Ok(_) => panic!("the handshake succeeded"),
        Err(e) => HandshakeFailure::of_io(e),
    }
}

// === tests ===

#[tokio::test]
async fn workloads_of_one_ca_authenticate_each_other() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(pki.credentials(&web()), &bundle);
    let server = Workload::new(pki.credentials(&db()), &bundle);

    let (c, s) = handshake(client.client, server.server, server_name_for(&db())).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    ping(&mut c, &mut s).await;

    let (_, cconn) = c.get_ref();
    let (_, sconn) = s.get_ref();
    assert_eq!(peer_identity(cconn).unwrap(), db());
    assert_eq!(peer_identity(sconn).unwrap(), web());
    assert_eq!(cconn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(cconn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(sconn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(
        cconn.peer_certificates().unwrap().len(),
        2,
        "leaf + intermediate"
    );
    assert_eq!(sconn.server_name(), None, "SNI is off");
}

#[tokio::test]
async fn second_connection_resumes_and_keeps_identities() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(pki.credentials(&web()), &bundle);
    let server = Workload::new(pki.credentials(&db()), &bundle);

    for kind in [HandshakeKind::Full, HandshakeKind::Resumed] {
        let (c, s) = handshake(
            client.client.clone(),
            server.server.clone(),
            server_name_for(&db()),
        )
        .await;
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        // Tickets arrive after the handshake: exchange data so the client
        // reads them.
        ping(&mut c, &mut s).await;
        assert_eq!(c.get_ref().1.handshake_kind(), Some(kind));
        assert_eq!(peer_identity(c.get_ref().1).unwrap(), db());
        assert_eq!(peer_identity(s.get_ref().1).unwrap(), web());
    }

    // A session is only reused for the identity it was verified against.
    let (c, _) = handshake(
        client.client.clone(),
        server.server.clone(),
        server_name_for(&web()),
    )
    .await;
    assert_eq!(failure(&c), HandshakeFailure::IdentityMismatch);
}

#[tokio::test]
async fn server_from_another_ca_is_unknown() {
    let pki = Pki::new("mesh");
    let rogue = Pki::new("rogue");
    let client = Workload::new(pki.credentials(&web()), &pki.bundle());
    let server = Workload::new(rogue.credentials(&db()), &rogue.bundle());

    let (c, _) = handshake(client.client, server.server, server_name_for(&db())).await;
    assert_eq!(failure(&c), HandshakeFailure::UnknownCa);
}

#[tokio::test]
async fn bundle_with_several_roots_accepts_each() {
    let old = Pki::new("old");
    let new = Pki::new("new");
    let pem = format!("{}{}", old.root.pem(), new.root.pem());
    let bundle = TrustBundle::from_pem(TrustDomain::new(TD).unwrap(), &pem).unwrap();
    let client = Workload::new(new.credentials(&web()), &bundle);
    let server = Workload::new(old.credentials(&db()), &bundle);

    let (c, s) = handshake(client.client, server.server, server_name_for(&db())).await;
    assert_eq!(peer_identity(c.unwrap().get_ref().1).unwrap(), db());
    assert_eq!(peer_identity(s.unwrap().get_ref().1).unwrap(), web());
}

#[tokio::test]
async fn expired_server_certificate() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(pki.credentials(&web()), &bundle);
    let server = Workload::new(
        pki.credentials_with(&db(), |p| {
            let now = OffsetDateTime::now_utc();
            p.not_before = now - Duration::hours(2);
            p.not_after = now - Duration::hours(1);
        }),
        &bundle,
    );
    let (c, _) = handshake(client.client, server.server, server_name_for(&db())).await;
    assert_eq!(failure(&c), HandshakeFailure::Expired);
}

#[tokio::test]
async fn expired_client_certificate() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(
        pki.credentials_with(&web(), |p| {
            p.not_after = OffsetDateTime::now_utc() - Duration::minutes(1);
        }),
        &bundle,
    );
    let server = Workload::new(pki.credentials(&db()), &bundle);
    let (c, s) = handshake(client.client, server.server, server_name_for(&db())).await;
    assert_eq!(failure(&s), HandshakeFailure::Expired);
    assert!(c.is_err(), "the client sees the server's alert");
}

#[tokio::test]
async fn not_yet_valid_server_certificate() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(pki.credentials(&web()), &bundle);
    let server = Workload::new(
        pki.credentials_with(&db(), |p| {
            let now = OffsetDateTime::now_utc();
            p.not_before = now + Duration::hours(1);
            p.not_after = now + Duration::hours(2);
        }),
        &bundle,
    );
    let (c, _) = handshake(client.client, server.server, server_name_for(&db())).await;
    assert_eq!(failure(&c), HandshakeFailure::NotYetValid);
}

#[tokio::test]
async fn server_with_another_identity_is_rejected() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(pki.credentials(&web()), &bundle);
    let server = Workload::new(pki.credentials(&db()), &bundle);

    let expected = id("spiffe://cluster.local/ns/default/sa/cache");
    let (c, _) = handshake(
        client.client.clone(),
        server.server.clone(),
        server_name_for(&expected),
    )
    .await;
    let err = c.err().unwrap();
    assert_eq!(
        HandshakeFailure::of_io(&err),
        HandshakeFailure::IdentityMismatch
    );
    assert!(err.to_string().contains("sa/db"), "{err}");

    // A name that encodes no identity (an address) fails closed.
    let ip = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let (c, _) = handshake(client.client, server.server, ip).await;
    assert_eq!(failure(&c), HandshakeFailure::IdentityMismatch);
}

#[tokio::test]
async fn client_from_another_trust_domain_is_rejected() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let stranger = id("spiffe://other.domain/ns/default/sa/web");
    let client = Workload::new(pki.credentials(&stranger), &bundle);
    let server = Workload::new(pki.credentials(&db()), &bundle);
    let (_, s) = handshake(client.client, server.server, server_name_for(&db())).await;
    assert_eq!(failure(&s), HandshakeFailure::IdentityMismatch);
}

/// A server presenting an arbitrary chain, verifying clients like ours.
fn raw_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundle: &TrustBundle,
) -> Arc<ServerConfig> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(SpiffeVerifier::new(bundle.clone()).unwrap()))
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

#[tokio::test]
async fn server_with_two_uri_sans_is_rejected() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(pki.credentials(&web()), &bundle);
    let (chain, key) = pki.raw_leaf(vec![
        uri("spiffe://cluster.local/ns/default/sa/db"),
        uri("spiffe://cluster.local/ns/default/sa/admin"),
    ]);
    let (c, _) = handshake(
        client.client,
        raw_server(chain, key, &bundle),
        server_name_for(&db()),
    )
    .await;
    let err = c.err().unwrap();
    assert_eq!(HandshakeFailure::of_io(&err), HandshakeFailure::BadSan);
    assert!(err.to_string().contains("MultipleUriSans(2)"), "{err}");
}

#[tokio::test]
async fn server_with_dns_san_only_is_rejected() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(pki.credentials(&web()), &bundle);
    let (chain, key) = pki.raw_leaf(vec![SanType::DnsName("db.default.svc".try_into().unwrap())]);
    let (c, _) = handshake(
        client.client,
        raw_server(chain, key, &bundle),
        server_name_for(&db()),
    )
    .await;
    assert_eq!(failure(&c), HandshakeFailure::BadSan);
}

#[tokio::test]
async fn server_with_invalid_spiffe_uri_is_rejected() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(pki.credentials(&web()), &bundle);
    let (chain, key) = pki.raw_leaf(vec![uri("spiffe://cluster.local/ns/default/sa/*")]);
    let (c, _) = handshake(
        client.client,
        raw_server(chain, key, &bundle),
        server_name_for(&db()),
    )
    .await;
    assert_eq!(failure(&c), HandshakeFailure::BadSan);
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let server = Workload::new(pki.credentials(&db()), &bundle);
    let anonymous = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeVerifier::new(bundle).unwrap()))
        .with_no_client_auth();
    let (c, s) = handshake(Arc::new(anonymous), server.server, server_name_for(&db())).await;
    assert_eq!(failure(&s), HandshakeFailure::NoClientCertificate);
    assert_eq!(failure(&c), HandshakeFailure::AlertReceived);
}

#[tokio::test]
async fn tls12_client_is_rejected() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(pki.credentials(&web()), &bundle);
    let server = Workload::new(pki.credentials(&db()), &bundle);
    let tls12 = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeVerifier::new(bundle).unwrap()))
        .with_client_cert_resolver(client.resolver.clone());
    let (c, s) = handshake(Arc::new(tls12), server.server, server_name_for(&db())).await;
    assert_eq!(failure(&s), HandshakeFailure::Incompatible);
    assert!(c.is_err());
}

#[tokio::test]
async fn rotation_changes_the_next_handshake_only() {
    let pki = Pki::new("mesh");
    let bundle = pki.bundle();
    let client = Workload::new(pki.credentials(&web()), &bundle);
    let server = Workload::new(pki.credentials(&db()), &bundle);
    // Full handshakes, so each connection shows the certificate in use.
    let mut fresh = (*client.client).clone();
    fresh.resumption = Resumption::disabled();
    let fresh = Arc::new(fresh);

    let (c, s) = handshake(fresh.clone(), server.server.clone(), server_name_for(&db())).await;
    let (mut c1, mut s1) = (c.unwrap(), s.unwrap());
    let old_leaf = server.resolver.current().chain()[0].clone();
    assert_eq!(c1.get_ref().1.peer_certificates().unwrap()[0], old_leaf);

    server.resolver.store(pki.credentials(&db()));
    let new_leaf = server.resolver.current().chain()[0].clone();
    assert_ne!(old_leaf, new_leaf);

    let (c, s) = handshake(fresh, server.server.clone(), server_name_for(&db())).await;
    let (mut c2, mut s2) = (c.unwrap(), s.unwrap());
    assert_eq!(c2.get_ref().1.peer_certificates().unwrap()[0], new_leaf);
    assert_eq!(peer_identity(c2.get_ref().1).unwrap(), db());

    // The connection made before the rotation keeps working.
    ping(&mut c1, &mut s1).await;
    ping(&mut c2, &mut s2).await;
    assert_eq!(c1.get_ref().1.peer_certificates().unwrap()[0], old_leaf);
}

#[test]
fn server_names_encode_identities() {
    let a = server_name_for(&web());
    assert!(server_name_matches(&a, &web()));
    assert!(!server_name_matches(&a, &db()));
    assert_eq!(a, server_name_for(&web()), "deterministic");
    let ServerName::DnsName(dns) = &a else {
        panic!("{a:?}")
    };
    assert!(dns.as_ref().ends_with(".spiffe.remora.invalid"), "{a:?}");
}

#[test]
fn empty_bundle_is_refused() {
    let err = TrustBundle::from_pem(TrustDomain::new(TD).unwrap(), "").unwrap_err();
    assert!(matches!(err, TlsError::EmptyBundle(_)), "{err}");
}
