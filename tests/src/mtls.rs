//! mTLS peers made by tests: certificate authorities (the control plane's
//! own root, read from its `--ca-dir`, or a fresh one), leaves with any
//! SPIFFE ID and validity, and a client that handshakes with a sidecar's
//! inbound port the way a peer sidecar does (TLS 1.3, ALPN `h2`, the
//! server's SPIFFE ID checked with the proxy's own verifier).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use remora_proxy::identity::{SpiffeId, TrustDomain};
use remora_proxy::tls::{SpiffeVerifier, TrustBundle, server_name_for};
use rustls::{ClientConfig, SupportedProtocolVersion};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::testdir::TestDir;

/// A client certificate chain and its key.
pub type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A certificate authority that can sign leaves.
pub struct TestCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// The root a control plane started by the harness created in `dir`'s
    /// `control-plane-ca` (its `--ca-dir`).
    pub fn of_control_plane(dir: &TestDir) -> Result<TestCa> {
        TestCa::from_dir(&dir.file("control-plane-ca"))
    }

    /// The root in a control plane's CA state directory.
    pub fn from_dir(ca_dir: &Path) -> Result<TestCa> {
        let read = |name: &str| {
            let path = ca_dir.join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        TestCa::from_pem(read("root-cert.pem")?, read("root-key.pem")?)
    }

    /// A CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: String, key_pem: String) -> Result<TestCa> {
        let key = KeyPair::from_pem(&key_pem).context("parsing the CA key")?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).context("parsing the CA cert")?;
        Ok(TestCa {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// A fresh self-signed ECDSA P-256 root named `name`, valid for a day
    /// (another CA, or the next root of a rotation).
    pub fn new_root(name: &str) -> Result<TestCa> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(1);
        let cert = params.self_signed(&key)?;
        TestCa::from_pem(cert.pem(), key.serialize_pem())
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A workload leaf for `spiffe_id` valid from `not_before` to
    /// `not_after` (client and server auth), with its key.
    pub fn leaf(
        &self,
        spiffe_id: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<ClientCert> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow!("the leaf key: {e}"))?;
        Ok((vec![cert.der().clone()], key))
    }

    /// A leaf for `spiffe_id` valid for the next hour.
    pub fn valid_leaf(&self, spiffe_id: &str) -> Result<ClientCert> {
        let now = OffsetDateTime::now_utc();
        self.leaf(
            spiffe_id,
            now - Duration::minutes(1),
            now + Duration::hours(1),
        )
    }
}

/// Handshakes with a sidecar's inbound port at `addr` like a peer sidecar:
/// ALPN `h2`, `versions`, `client` as the client certificate (if any), and
/// the server proving `server_id` with a chain to `bundle_pem`.
pub async fn handshake(
    addr: SocketAddr,
    client: Option<ClientCert>,
    bundle_pem: &str,
    server_id: &str,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<TlsStream<TcpStream>> {
    let expected: SpiffeId = server_id.parse()?;
    let bundle = TrustBundle::from_pem(TrustDomain::new("cluster.local")?, bundle_pem)?;
    let verifier = Arc::new(SpiffeVerifier::new(bundle)?);
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
    let mut config = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    let tcp = TcpStream::connect(addr).await?;
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name_for(&expected), tcp)
        .await?;
    // In TLS 1.3 the server checks the client certificate after the
    // client's handshake ends: a refusal shows as an alert on the first
    // read, so wait for the server's session tickets or that alert.
    use tokio::io::AsyncReadExt as _;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(
        std::time::Duration::from_millis(500),
        stream.read(&mut byte),
    )
    .await
    {
        Err(_) => Ok(stream),
        Ok(Ok(_)) => Ok(stream),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// The leaf certificate the server presented.
pub fn server_leaf(stream: &TlsStream<TcpStream>) -> Option<CertificateDer<'static>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.clone().into_owned())
}
