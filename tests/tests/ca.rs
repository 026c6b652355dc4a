//! The CA on the control plane's TLS listener: a workload with a bootstrap
//! token gets a certificate for exactly its SPIFFE ID over TLS 1.3, a wrong
//! token is refused, ADS is served there too, and the root survives a
//! restart with the same `--ca-dir`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt as _;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use remora_proxy::identity::{SpiffeId, TrustDomain};
use remora_proxy::tls::{SpiffeVerifier, TrustBundle, server_name_for};
use remora_tests::{ControlPlane, TestDir, workspace};
use remora_xds_proto::identity::v1::SignRequest;
use remora_xds_proto::identity::v1::certificate_service_client::CertificateServiceClient;
use remora_xds_proto::pb::envoy::config::core::v3::Node;
use remora_xds_proto::pb::envoy::service::discovery::v3::DiscoveryRequest;
use remora_xds_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use remora_xds_proto::pb::google::protobuf::{Struct, Value, value::Kind};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tonic::transport::{Channel, Endpoint};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const CONTROL_PLANE_ID: &str = "spiffe://cluster.local/ns/remora-system/sa/remora-control-plane";
const CATALOG_ID: &str = "spiffe://cluster.local/ns/shop/sa/catalog";
const CATALOG_TOKEN: &str = "example-catalog-token-do-not-use";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The URI SANs of a DER certificate.
fn uri_sans(der: &[u8]) -> Result<Vec<String>> {
    let (_, cert) = X509Certificate::from_der(der).context("parsing a certificate")?;
    let Some(san) = cert.subject_alternative_name()? else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

fn roots_of(bundle_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(cert.context("parsing the trust bundle")?)?;
    }
    ensure!(!roots.is_empty(), "the trust bundle holds no certificate");
    Ok(Arc::new(roots))
}

/// A TLS 1.3 client config trusting `bundle_pem` for the control plane's
/// identity, with an optional client certificate.
fn client_config(
    bundle_pem: &str,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>> {
    // The proxy's own SPIFFE verifier: chain against the bundle, then the
    // expected identity, which rides in the server name (`tls_channel`).
    let bundle = TrustBundle::from_pem(TrustDomain::new("cluster.local")?, bundle_pem)?;
    let verifier = SpiffeVerifier::new(bundle)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Node metadata naming the workload identity `shop`/`service_account`.
fn node_metadata(service_account: &str) -> Struct {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    Struct {
        fields: [
            ("NAMESPACE".to_owned(), string("shop")),
            ("SERVICE_ACCOUNT".to_owned(), string(service_account)),
        ]
        .into(),
    }
}

/// A gRPC channel to `addr` over TLS with `config`.
async fn tls_channel(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<Channel> {
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let expected: SpiffeId = CONTROL_PLANE_ID.parse().map_err(std::io::Error::other)?;
            let name = server_name_for(&expected);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            let (_, conn) = tls.get_ref();
            if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
                return Err(std::io::Error::other("not TLS 1.3"));
            }
            if conn.alpn_protocol() != Some(b"h2") {
                return Err(std::io::Error::other("ALPN h2 not negotiated"));
            }
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting over TLS to {addr}"))
}

/// A fresh key and a CSR for `id`.
fn csr_for(id: &str) -> Result<(KeyPair, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

async fn sign(
    channel: Channel,
    token: &str,
    csr_pem: &str,
) -> Result<remora_xds_proto::identity::v1::SignResponse, tonic::Status> {
    let mut client = CertificateServiceClient::new(channel);
    let mut request = tonic::Request::new(SignRequest {
        csr_pem: csr_pem.to_owned(),
        ttl_seconds: 0,
    });
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| tonic::Status::internal("bad metadata"))?;
    request.metadata_mut().insert("authorization", value);
    client.sign(request).await.map(tonic::Response::into_inner)
}

/// Checks that `chain_pem` (leaf first) leads to a root of `bundle_pem` and
/// that the leaf carries exactly `id`; returns the parsed chain.
fn check_chain(
    chain_pem: &[String],
    bundle_pem: &str,
    id: &str,
) -> Result<Vec<CertificateDer<'static>>> {
    let chain = chain_pem
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the issued chain")?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        bail!("the response holds no certificate");
    };
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots_of(bundle_pem)?, provider()).build()?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .context("the issued chain does not verify against the trust bundle")?;
    let sans = uri_sans(leaf)?;
    ensure!(
        sans == [id],
        "the leaf carries URI SANs {sans:?}, expected only {id}"
    );
    Ok(chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_signs_serves_ads_and_keeps_its_root() {
    let dir = TestDir::new("ca-tls");
    dir.check(
        async {
            let mesh = workspace::example_mesh();
            let ca_dir: OsString = dir.file("ca").into();
            let ca_args = [OsString::from("--ca-dir"), ca_dir];
            let mut cp = ControlPlane::start_with(&dir, &mesh, "127.0.0.1:0", &ca_args).await?;
            let bundle = cp.trust_bundle_pem().await?;
            ensure!(
                bundle.contains("BEGIN CERTIFICATE"),
                "/debug/trust-bundle is not PEM: {bundle:?}"
            );
            let tls = cp.tls_addr()?;

            // Sign, without a client certificate (the bootstrap case).
            let channel = tls_channel(tls, client_config(&bundle, None)?).await?;
            let (key, csr) = csr_for(CATALOG_ID)?;
            let response = sign(channel.clone(), CATALOG_TOKEN, &csr)
                .await
                .context("Sign with the catalog's bootstrap token")?;
            ensure!(
                response.trust_bundle_pem == bundle,
                "the Sign response's bundle differs from /debug/trust-bundle"
            );
            let chain = check_chain(&response.cert_chain_pem, &bundle, CATALOG_ID)?;

            // A wrong token.
            let (_, other_csr) = csr_for(CATALOG_ID)?;
            match sign(channel.clone(), "not-a-token", &other_csr).await {
                Ok(_) => bail!("a wrong token got a certificate"),
                Err(status) => ensure!(
                    status.code() == tonic::Code::Unauthenticated,
                    "a wrong token got {status:?}, expected UNAUTHENTICATED"
                ),
            }

            // ADS on the same listener: refused without a client
            // certificate, refused for a node claiming another identity,
            // served to the node the certificate names.
            let ads_request = |service_account: &str| DiscoveryRequest {
                node: Some(Node {
                    id: "ca-test".to_owned(),
                    cluster: "catalog".to_owned(),
                    metadata: Some(node_metadata(service_account)),
                    ..Default::default()
                }),
                type_url: remora_xds_proto::type_url::CLUSTER.to_owned(),
                ..Default::default()
            };
            let open = async |channel: Channel, service_account: &str| {
                let mut ads = AggregatedDiscoveryServiceClient::new(channel);
                let mut stream = ads
                    .stream_aggregated_resources(
                        futures::stream::iter([ads_request(service_account)])
                            .chain(futures::stream::pending()),
                    )
                    .await?
                    .into_inner();
                match stream.message().await? {
                    Some(first) => Ok(first),
                    None => Err(tonic::Status::unavailable("the stream ended")),
                }
            };
            let anonymous = tls_channel(tls, client_config(&bundle, None)?).await?;
            match open(anonymous, "catalog").await {
                Ok(_) => bail!("ADS over TLS without a client certificate was served"),
                Err(status) => ensure!(
                    status.code() == tonic::Code::Unauthenticated,
                    "ADS without a client certificate got {status:?}, expected UNAUTHENTICATED"
                ),
            }
            let workload = || -> Result<Arc<ClientConfig>> {
                let key = PrivateKeyDer::try_from(key.serialize_der())
                    .map_err(|e| anyhow::anyhow!("the workload key: {e}"))?;
                client_config(&bundle, Some((chain.clone(), key)))
            };
            let impostor = tls_channel(tls, workload()?).await?;
            match open(impostor, "frontend").await {
                Ok(_) => bail!("a catalog certificate got ADS for a node claiming frontend"),
                Err(status) => ensure!(
                    status.code() == tonic::Code::PermissionDenied,
                    "a node claiming another identity got {status:?}, expected PERMISSION_DENIED"
                ),
            }
            let first = open(tls_channel(tls, workload()?).await?, "catalog")
                .await
                .context("ADS over TLS with the catalog's certificate")?;
            ensure!(
                !first.resources.is_empty(),
                "ADS over TLS sent no clusters: {first:?}"
            );

            // With the issued certificate as a client certificate.
            let client_key = PrivateKeyDer::try_from(key.serialize_der())
                .map_err(|e| anyhow::anyhow!("the workload key: {e}"))?;
            let channel =
                tls_channel(tls, client_config(&bundle, Some((chain, client_key)))?).await?;
            let (_, csr) = csr_for(CATALOG_ID)?;
            let renewed = sign(channel, CATALOG_TOKEN, &csr)
                .await
                .context("Sign with a client certificate")?;
            check_chain(&renewed.cert_chain_pem, &bundle, CATALOG_ID)?;

            // Same --ca-dir, same root.
            cp.kill();
            drop(cp);
            let cp = ControlPlane::start_with(&dir, &mesh, "127.0.0.1:0", &ca_args).await?;
            let again = cp.trust_bundle_pem().await?;
            ensure!(
                again == bundle,
                "the root changed across a restart with the same --ca-dir"
            );
            anyhow::Ok(())
        }
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_domain_that_disagrees_with_the_mesh_is_a_startup_error() {
    let dir = TestDir::new("ca-trust-domain");
    dir.check(
        async {
            let mesh = workspace::example_mesh();
            let ca_dir = dir.file("ca");
            let args: Vec<&std::ffi::OsStr> = vec![
                "--config".as_ref(),
                mesh.as_os_str(),
                "--xds-addr".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--tls-addr".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--monitoring-addr".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--ca-dir".as_ref(),
                ca_dir.as_os_str(),
                "--trust-domain".as_ref(),
                "other.example".as_ref(),
            ];
            let out =
                remora_tests::control_plane::run(&args, std::time::Duration::from_secs(20)).await?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(!out.status.success(), "it started; stderr:\n{stderr}");
            ensure!(
                stderr.contains("--trust-domain") && stderr.contains("other.example"),
                "the error does not name the flag and its value:\n{stderr}"
            );
            ensure!(!ca_dir.exists(), "it created a CA before refusing to start");
            anyhow::Ok(())
        }
        .await,
    );
}
