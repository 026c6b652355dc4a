//! The certificate client and the renewal loop against the real signing
//! service, served over TLS 1.3 in-process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use clap::Parser as _;
use remora_control_plane::ca::Ca;
use remora_control_plane::ca::service::{MeshTokens, SigningService};
use remora_control_plane::metrics::Metrics as CpMetrics;
use remora_control_plane::model::{Identity, Mesh, Secret, WorkloadToken};
use remora_xds_proto::identity::v1::certificate_service_server::CertificateServiceServer;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use super::*;
use crate::identity::renew::{self, RenewConfig};
use crate::metrics::Metrics;
use crate::tls::CredentialResolver;

const CATALOG_TOKEN: &str = "catalog-token-0123456789";
const REVIEWS_TOKEN: &str = "reviews-token-0123456789";
const CATALOG_ID: &str = "spiffe://cluster.local/ns/shop/sa/catalog";
const CONTROL_PLANE_ID: &str = "spiffe://cluster.local/ns/remora-system/sa/remora-control-plane";
/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(8);

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "remora-proxy-cert-client-{}-{}",
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

struct TestCa {
    _dir: TempDir,
    ca: Arc<Ca>,
    bundle: TrustBundle,
}

fn test_ca() -> TestCa {
    let dir = TempDir::new();
    let ca = Arc::new(Ca::load_or_create(&dir.0, "cluster.local").unwrap());
    let bundle = TrustBundle::from_pem(
        TrustDomain::new("cluster.local").unwrap(),
        &ca.trust_bundle_pem(),
    )
    .unwrap();
    TestCa {
        _dir: dir,
        ca,
        bundle,
    }
}

fn catalog() -> SpiffeId {
    SpiffeId::parse(CATALOG_ID).unwrap()
}

fn roots(ca: &Ca) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for root in ca.trust_bundle() {
        roots.add(root).unwrap();
    }
    roots
}

/// A TLS 1.3 server config presenting a certificate `ca` issued for `id`;
/// a client certificate from `ca` is optional.
fn serving_config(ca: &Ca, id: &str) -> Arc<ServerConfig> {
    let id = SpiffeId::parse(id).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let leaf = ca
        .sign_csr(
            &key.csr(&id).unwrap(),
            &id.to_string(),
            Duration::from_secs(3600),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    let credentials =
        Credentials::from_pem(&leaf.full_chain_pem(), &key, &id, time::Duration::ZERO).unwrap();
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca)),
                    Arc::new(rustls::crypto::ring::default_provider()),
                )
                .allow_unauthenticated()
                .build()
                .unwrap(),
            )
            .with_single_cert(
                credentials.chain().to_vec(),
                credentials.private_key().clone_key(),
            )
            .unwrap();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// A server-side TLS stream tonic can serve.
struct Io(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for Io {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The signing service behind a TLS listener.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
    metrics: Arc<CpMetrics>,
    /// The identity each client presented, in handshake order.
    peers: Arc<std::sync::Mutex<Vec<Option<SpiffeId>>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mesh() -> Arc<Mesh> {
    let token = |sa: &str, token: &str| WorkloadToken {
        identity: Identity {
            namespace: "shop".into(),
            service_account: sa.into(),
        },
        token: Secret::new(token),
    };
    let tokens = vec![
        token("catalog", CATALOG_TOKEN),
        token("reviews", REVIEWS_TOKEN),
    ];
    Arc::new(Mesh::new("cluster.local".into(), Vec::new(), tokens).unwrap())
}

/// Serves the signing service of `ca` on `addr` (port 0 for any), TLS
/// with `tls`, granting leaves of `ttl`.
async fn serve(ca: &Arc<Ca>, tls: Arc<ServerConfig>, addr: SocketAddr, ttl: Duration) -> Server {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tx, rx) = watch::channel(mesh());
    let metrics = Arc::new(CpMetrics::new());
    let service = SigningService::new(Arc::clone(ca), Arc::new(MeshTokens::new(rx)), &metrics)
        .with_ttls(ttl, ttl);
    let acceptor = TlsAcceptor::from(tls);
    let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let state = (listener, acceptor, Arc::clone(&peers));
    let incoming = futures::stream::unfold(state, |(listener, acceptor, peers)| async {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            if let Ok(tls) = acceptor.accept(tcp).await {
                let peer = crate::tls::peer_identity(tls.get_ref().1).ok();
                peers.lock().unwrap().push(peer);
                return Some((
                    Ok::<_, std::io::Error>(Io(tls)),
                    (listener, acceptor, peers),
                ));
            }
        }
    });
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(CertificateServiceServer::new(service))
            .serve_with_incoming(incoming)
            .await;
    });
    Server {
        addr,
        task,
        metrics,
        peers,
    }
}

async fn control_plane(ca: &TestCa, ttl: Duration) -> Server {
    let tls = serving_config(&ca.ca, CONTROL_PLANE_ID);
    serve(&ca.ca, tls, "127.0.0.1:0".parse().unwrap(), ttl).await
}

// === CertificateClient ===

#[test]
fn the_control_plane_identity_is_the_documented_one() {
    let td = TrustDomain::new("cluster.local").unwrap();
    assert_eq!(control_plane_id(&td).to_string(), CONTROL_PLANE_ID);
}

#[test]
fn tokens_are_redacted_and_addresses_checked() {
    let token = Token::new(format!("  {CATALOG_TOKEN}\n"));
    assert_eq!(token.expose(), CATALOG_TOKEN);
    assert!(!format!("{token:?}").contains(CATALOG_TOKEN));
    let ca = test_ca();
    assert!(CertificateClient::new("127.0.0.1:15012", &ca.bundle).is_ok());
    assert!(CertificateClient::new("https://cp.example:15012/", &ca.bundle).is_ok());
    assert!(matches!(
        CertificateClient::new("127.0.0.1", &ca.bundle),
        Err(ClientError::Address(_))
    ));
}

#[tokio::test]
async fn the_right_token_gets_credentials_for_its_identity() {
    let ca = test_ca();
    let server = control_plane(&ca, Duration::from_secs(3600)).await;
    let client = CertificateClient::new(&server.addr.to_string(), &ca.bundle).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let credentials = client
        .sign(&key, &catalog(), &Token::new(CATALOG_TOKEN))
        .await
        .unwrap();
    assert_eq!(credentials.id(), &catalog());
    assert_eq!(
        crate::tls::spiffe_id_of(&credentials.chain()[0]).unwrap(),
        catalog()
    );
    let left = credentials.expires_at() - OffsetDateTime::now_utc();
    assert!(left > time::Duration::minutes(59) && left <= time::Duration::hours(1));
    assert_eq!(
        client.latest_trust_bundle_pem().as_deref(),
        Some(&ca.ca.trust_bundle_pem())
    );
    assert_eq!(server.metrics.ca_certificates_issued.get(), 1);

    // The first connection had no certificate to present; once the
    // client has one, it presents it.
    assert_eq!(server.peers.lock().unwrap().as_slice(), &[None]);
    client.present(&credentials);
    let again = client
        .sign(
            &WorkloadKey::generate().unwrap(),
            &catalog(),
            &Token::new(CATALOG_TOKEN),
        )
        .await
        .unwrap();
    assert_ne!(again.chain()[0], credentials.chain()[0]);
    assert_eq!(
        server.peers.lock().unwrap().as_slice(),
        &[None, Some(catalog())]
    );
}

#[tokio::test]
async fn a_wrong_token_fails_with_a_clear_error() {
    let ca = test_ca();
    let server = control_plane(&ca, Duration::from_secs(3600)).await;
    let client = CertificateClient::new(&server.addr.to_string(), &ca.bundle).unwrap();
    let key = WorkloadKey::generate().unwrap();

    let error = client
        .sign(&key, &catalog(), &Token::new("not-a-known-token-000"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::Refused {
                code: tonic::Code::Unauthenticated,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.reason(), "unauthenticated");
    let message = error.to_string();
    assert!(message.contains("--token-file"), "{message}");
    assert!(!message.contains("not-a-known-token"), "{message}");

    // A valid token for another identity.
    let error = client
        .sign(&key, &catalog(), &Token::new(REVIEWS_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "permission_denied", "{error}");
    assert!(error.to_string().contains("--service-account"), "{error}");
}

#[tokio::test]
async fn the_token_file_is_read_at_every_request() {
    let ca = test_ca();
    let dir = TempDir::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join("token");
    let source = TokenSource::File(path.clone());
    assert_eq!(source.read().unwrap_err().reason(), "token");
    std::fs::write(&path, "old-token-0123456789\n").unwrap();
    assert_eq!(source.read().unwrap().expose(), "old-token-0123456789");
    std::fs::write(&path, CATALOG_TOKEN).unwrap();
    assert_eq!(source.read().unwrap().expose(), CATALOG_TOKEN);
    drop(ca);
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let ca = test_ca();
    let tls = serving_config(&ca.ca, "spiffe://cluster.local/ns/shop/sa/impostor");
    let server = serve(
        &ca.ca,
        tls,
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(3600),
    )
    .await;
    let client = CertificateClient::new(&server.addr.to_string(), &ca.bundle).unwrap();
    let error = client
        .sign(
            &WorkloadKey::generate().unwrap(),
            &catalog(),
            &Token::new(CATALOG_TOKEN),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::Handshake {
                failure: HandshakeFailure::IdentityMismatch,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.reason(), "handshake");
    assert!(error.to_string().contains(CONTROL_PLANE_ID), "{error}");
    assert_eq!(server.metrics.ca_certificates_issued.get(), 0);

    // The right identity from a CA outside the bundle.
    let other = test_ca();
    let server = control_plane(&other, Duration::from_secs(3600)).await;
    let client = CertificateClient::new(&server.addr.to_string(), &ca.bundle).unwrap();
    let error = client
        .sign(
            &WorkloadKey::generate().unwrap(),
            &catalog(),
            &Token::new(CATALOG_TOKEN),
        )
        .await
        .unwrap_err();
    // Both roots are named "Remora root CA", so webpki finds the issuer by
    // name and fails on its signature rather than reporting an unknown CA.
    assert!(
        matches!(
            error,
            ClientError::Handshake {
                failure: HandshakeFailure::UnknownCa | HandshakeFailure::Other,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(server.metrics.ca_certificates_issued.get(), 0);
}

#[tokio::test]
async fn an_unreachable_ca_is_reported_as_such() {
    let ca = test_ca();
    // Bind and drop, so the port is very likely closed.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let client = CertificateClient::new(&addr.to_string(), &ca.bundle).unwrap();
    let error = client
        .sign(
            &WorkloadKey::generate().unwrap(),
            &catalog(),
            &Token::new(CATALOG_TOKEN),
        )
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "unreachable", "{error:?}");
}

// === Renewal ===

fn leaf(resolver: &CredentialResolver) -> Vec<u8> {
    resolver.current().chain()[0].to_vec()
}

async fn wait_change(ready: &mut renew::Ready) {
    tokio::time::timeout(WAIT, ready.changed())
        .await
        .expect("credentials renewed in time")
        .unwrap();
}

#[tokio::test]
async fn the_renewal_loop_renews_and_survives_an_outage() {
    let ttl = Duration::from_secs(4);
    let ca = test_ca();
    let server = control_plane(&ca, ttl).await;
    let addr = server.addr;
    let client = CertificateClient::new(&addr.to_string(), &ca.bundle)
        .unwrap()
        .with_ttl(ttl);
    let mut config = RenewConfig::new(catalog(), TokenSource::Value(Token::new(CATALOG_TOKEN)));
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(300);
    let metrics = Arc::new(Metrics::new());
    let (mut ready, task) = renew::start(client, config, Arc::clone(&metrics));

    // Credentials become available.
    let resolver = tokio::time::timeout(WAIT, ready.wait_for(Option::is_some))
        .await
        .expect("first credentials in time")
        .unwrap()
        .clone()
        .unwrap();
    let first = resolver.current();
    assert_eq!(first.id(), &catalog());
    assert!(first.renew_at() > OffsetDateTime::now_utc() - time::Duration::seconds(1));
    assert!(first.renew_at() < first.expires_at());
    let left = metrics.certificate_expiry.seconds_left().unwrap();
    assert!(left > 0.0 && left <= 4.0, "{left}");

    // Renewed before expiry, with a new certificate and key.
    wait_change(&mut ready).await;
    let second = resolver.current();
    assert!(OffsetDateTime::now_utc() < first.expires_at());
    assert_ne!(second.chain()[0], first.chain()[0]);
    assert_ne!(
        crate::tls::spiffe_id_of(&second.chain()[0]).unwrap(),
        SpiffeId::parse(CONTROL_PLANE_ID).unwrap()
    );
    assert_ne!(
        second.certified_key().key.public_key(),
        first.certified_key().key.public_key()
    );
    assert!(metrics.certificate_renewals.get() >= 2);

    // The control plane goes away: renewals fail, the credentials stay.
    drop(server);
    let held = leaf(&resolver);
    let failures = || {
        metrics
            .certificate_renewal_failures
            .with_label_values(&["unreachable"])
            .get()
    };
    tokio::time::timeout(WAIT, async {
        while failures() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("renewal attempted while the control plane is down");
    assert_eq!(leaf(&resolver), held, "current credentials kept");

    // It comes back on the same address: renewal resumes.
    let tls = serving_config(&ca.ca, CONTROL_PLANE_ID);
    let _server = serve(&ca.ca, tls, addr, ttl).await;
    let _ = ready.borrow_and_update();
    wait_change(&mut ready).await;
    assert_ne!(leaf(&resolver), held);
    assert!(resolver.current().expires_at() > OffsetDateTime::now_utc());
    task.abort();
}

// === Bootstrap ===

#[test]
fn bootstrap_parses_the_identity_flags() {
    let b = crate::bootstrap::Bootstrap::try_parse_from(["remora-proxy"]).unwrap();
    assert_eq!(b.ca_addr(), "127.0.0.1:15012");
    assert_eq!(b.trust_domain, "cluster.local");
    assert!(b.ca_bundle.is_none() && b.token_file.is_none());
    let b = crate::bootstrap::Bootstrap::try_parse_from([
        "remora-proxy",
        "--ca-addr",
        "cp:15012",
        "--ca-bundle",
        "/etc/remora/root.pem",
        "--token-file",
        "/var/run/remora/token",
        "--trust-domain",
        "example.org",
    ])
    .unwrap();
    assert_eq!(b.ca_addr(), "cp:15012");
    assert_eq!(b.ca_bundle, Some(PathBuf::from("/etc/remora/root.pem")));
    assert_eq!(b.token_file, Some(PathBuf::from("/var/run/remora/token")));
    assert_eq!(b.trust_domain, "example.org");
    assert_eq!(
        b.workload_id().unwrap().to_string(),
        "spiffe://example.org/ns/default/sa/default"
    );
    assert!(matches!(b.token_source(), Some(TokenSource::File(_))));
    assert!(
        b.ca_trust_bundle().is_err(),
        "the bundle file does not exist"
    );

    let ca = test_ca();
    let dir = TempDir::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let root = dir.0.join("root.pem");
    std::fs::write(&root, ca.ca.trust_bundle_pem()).unwrap();
    let b = crate::bootstrap::Bootstrap::try_parse_from([
        "remora-proxy".as_ref(),
        "--ca-bundle".as_ref(),
        root.as_os_str(),
    ])
    .unwrap();
    let bundle = b.ca_trust_bundle().unwrap().unwrap();
    assert_eq!(bundle.trust_domain().as_str(), "cluster.local");
    assert_eq!(bundle.roots().len(), 1);
}
