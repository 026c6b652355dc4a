#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use remora_xds_proto::identity::v1::certificate_service_client::CertificateServiceClient;
use remora_xds_proto::identity::v1::certificate_service_server::CertificateServiceServer;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::transport::Channel;
use x509_parser::extensions::GeneralName;

use super::*;
use crate::model::{Secret, WorkloadToken};

const CATALOG_TOKEN: &str = "catalog-token-0123456789";
const REVIEWS_TOKEN: &str = "reviews-token-0123456789";
const CATALOG_ID: &str = "spiffe://cluster.local/ns/shop/sa/catalog";

fn identity(namespace: &str, service_account: &str) -> Identity {
    Identity {
        namespace: namespace.into(),
        service_account: service_account.into(),
    }
}

fn mesh(tokens: &[(&str, &str)]) -> Arc<Mesh> {
    let tokens = tokens
        .iter()
        .map(|(sa, token)| WorkloadToken {
            identity: identity("shop", sa),
            token: Secret::new(*token),
        })
        .collect();
    Arc::new(Mesh::new("cluster.local".into(), Vec::new(), tokens).unwrap())
}

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "remora-ca-service-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn csr_for(uri: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

// === Authenticator ===

#[tokio::test]
async fn mesh_tokens_map_a_token_to_its_identity() {
    let (_tx, rx) = watch::channel(mesh(&[
        ("catalog", CATALOG_TOKEN),
        ("reviews", REVIEWS_TOKEN),
    ]));
    let auth = MeshTokens::new(rx);
    assert_eq!(
        auth.identity(CATALOG_TOKEN).await,
        Some(identity("shop", "catalog"))
    );
    assert_eq!(
        auth.identity(REVIEWS_TOKEN).await,
        Some(identity("shop", "reviews"))
    );
    assert_eq!(
        auth.identity("catalog-token-012345678").await,
        None,
        "prefix"
    );
    assert_eq!(
        auth.identity("catalog-token-01234567890").await,
        None,
        "longer"
    );
    assert_eq!(auth.identity("").await, None);
}

#[tokio::test]
async fn mesh_token_edits_apply_live() {
    let (tx, rx) = watch::channel(mesh(&[("catalog", CATALOG_TOKEN)]));
    let auth = MeshTokens::new(rx);
    assert!(auth.identity(CATALOG_TOKEN).await.is_some());
    tx.send(mesh(&[("reviews", REVIEWS_TOKEN)])).unwrap();
    assert_eq!(auth.identity(CATALOG_TOKEN).await, None, "revoked");
    assert_eq!(
        auth.identity(REVIEWS_TOKEN).await,
        Some(identity("shop", "reviews"))
    );
}

#[test]
fn constant_time_eq_is_plain_equality() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"ab", b"abc"));
    assert!(!constant_time_eq(b"abc", b"ab"));
    assert!(!constant_time_eq(b"ab\0", b"ab"));
    assert!(constant_time_eq(b"", b""));
}

#[test]
fn bearer_token_parsing_names_what_is_wrong() {
    let md = |value: Option<&str>| {
        let mut m = tonic::metadata::MetadataMap::new();
        if let Some(v) = value {
            m.insert(AUTHORIZATION, v.parse().unwrap());
        }
        m
    };
    assert_eq!(bearer_token(&md(Some("Bearer abc"))), Ok("abc"));
    assert_eq!(bearer_token(&md(Some("bearer abc"))), Ok("abc"));
    assert!(
        bearer_token(&md(None))
            .unwrap_err()
            .contains("missing `authorization`")
    );
    assert!(
        bearer_token(&md(Some("Basic abc")))
            .unwrap_err()
            .contains("scheme")
    );
    assert!(
        bearer_token(&md(Some("abc")))
            .unwrap_err()
            .contains("Bearer <token>")
    );
    assert!(
        bearer_token(&md(Some("Bearer  ")))
            .unwrap_err()
            .contains("empty")
    );
}

// === TTLs ===

#[test]
fn ttls_default_and_clamp() {
    let dir = TempDir::new();
    let ca = Arc::new(Ca::load_or_create(&dir.0, "cluster.local").unwrap());
    let (_tx, rx) = watch::channel(mesh(&[]));
    let metrics = Metrics::new();
    let svc = SigningService::new(ca, Arc::new(MeshTokens::new(rx)), &metrics)
        .with_ttls(Duration::from_secs(3600), Duration::from_secs(7200));
    assert_eq!(svc.granted_ttl(0), Duration::from_secs(3600));
    assert_eq!(svc.granted_ttl(60), Duration::from_secs(60));
    assert_eq!(svc.granted_ttl(100_000), Duration::from_secs(7200));
    let svc = svc.with_ttls(Duration::from_secs(10_000), Duration::ZERO);
    assert_eq!(
        svc.granted_ttl(0),
        Duration::from_secs(7200),
        "default <= max"
    );
}

// === gRPC round trip ===

struct Server {
    addr: SocketAddr,
    ca: Arc<Ca>,
    metrics: Arc<Metrics>,
    _mesh: watch::Sender<Arc<Mesh>>,
    _dir: TempDir,
}

async fn serve() -> Server {
    let dir = TempDir::new();
    let ca = Arc::new(Ca::load_or_create(&dir.0, "cluster.local").unwrap());
    let (tx, rx) = watch::channel(mesh(&[
        ("catalog", CATALOG_TOKEN),
        ("reviews", REVIEWS_TOKEN),
    ]));
    let metrics = Arc::new(Metrics::new());
    let service = SigningService::new(Arc::clone(&ca), Arc::new(MeshTokens::new(rx)), &metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CertificateServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Server {
        addr,
        ca,
        metrics,
        _mesh: tx,
        _dir: dir,
    }
}

async fn client(addr: SocketAddr) -> CertificateServiceClient<Channel> {
    CertificateServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn request(csr_pem: String, ttl_seconds: u32, token: Option<&str>) -> Request<SignRequest> {
    let mut request = Request::new(SignRequest {
        csr_pem,
        ttl_seconds,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn refused(metrics: &Metrics, reason: RefusalReason) -> u64 {
    metrics
        .ca_certificates_refused
        .with_label_values(&[reason.as_str()])
        .get()
}

#[tokio::test]
async fn the_right_token_gets_a_verifiable_certificate_for_its_identity() {
    let server = serve().await;
    let mut client = client(server.addr).await;
    let before = OffsetDateTime::now_utc();
    let response = client
        .sign(request(csr_for(CATALOG_ID), 3600, Some(CATALOG_TOKEN)))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(response.cert_chain_pem.len(), 1, "a root signs directly");
    assert_eq!(response.trust_bundle_pem, server.ca.trust_bundle_pem());
    let leaf_der = CertificateDer::from_pem_slice(response.cert_chain_pem[0].as_bytes()).unwrap();
    let root_der = CertificateDer::from_pem_slice(response.trust_bundle_pem.as_bytes()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(leaf.issuer().as_raw(), root.subject().as_raw());

    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => (*u).to_owned(),
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect();
    assert_eq!(sans, [CATALOG_ID]);

    let expires = response.expires_at_unix;
    assert_eq!(expires, leaf.validity().not_after.timestamp());
    let lifetime = expires - before.unix_timestamp();
    assert!(
        (3590..=3610).contains(&lifetime),
        "ttl honoured: {lifetime}"
    );

    assert_eq!(server.metrics.ca_certificates_issued.get(), 1);
    for reason in RefusalReason::ALL {
        assert_eq!(refused(&server.metrics, reason), 0, "{reason:?}");
    }
}

#[tokio::test]
async fn a_ttl_above_the_maximum_is_clamped() {
    let server = serve().await;
    let mut client = client(server.addr).await;
    let before = OffsetDateTime::now_utc().unix_timestamp();
    let response = client
        .sign(request(csr_for(CATALOG_ID), u32::MAX, Some(CATALOG_TOKEN)))
        .await
        .unwrap()
        .into_inner();
    let lifetime = response.expires_at_unix - before;
    let max = DEFAULT_MAX_TTL.as_secs() as i64;
    assert!((max - 10..=max + 10).contains(&lifetime), "{lifetime}");
}

#[tokio::test]
async fn refusals_have_the_right_codes_and_count() {
    let server = serve().await;
    let mut client = client(server.addr).await;

    let status = client
        .sign(request(csr_for(CATALOG_ID), 0, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("authorization"), "{status:?}");

    let wrong = "not-a-known-token-0123456789";
    let status = client
        .sign(request(csr_for(CATALOG_ID), 0, Some(wrong)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), "unknown bootstrap token", "never echoed");

    // The reviews token may not get catalog's identity.
    let status = client
        .sign(request(csr_for(CATALOG_ID), 0, Some(REVIEWS_TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(CATALOG_ID), "{status:?}");
    assert!(
        status
            .message()
            .contains("spiffe://cluster.local/ns/shop/sa/reviews"),
        "{status:?}"
    );

    let status = client
        .sign(request("not a csr".into(), 0, Some(CATALOG_TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("PKCS#10"), "{status:?}");

    let m = &server.metrics;
    assert_eq!(refused(m, RefusalReason::MissingCredentials), 1);
    assert_eq!(refused(m, RefusalReason::UnknownToken), 1);
    assert_eq!(refused(m, RefusalReason::WrongIdentity), 1);
    assert_eq!(refused(m, RefusalReason::InvalidCsr), 1);
    assert_eq!(refused(m, RefusalReason::Internal), 0);
    assert_eq!(m.ca_certificates_issued.get(), 0);
}
