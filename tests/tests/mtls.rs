//! mTLS between `remora-proxy` sidecars, with real certificates from the
//! control plane's CA: one handshake per connection, callers counted by
//! identity, and every kind of bad peer refused with its own reason, a log
//! line and a metric, while the traffic of good peers goes on untouched.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use remora_tests::TestDir;
use remora_tests::client::HttpClient;
use remora_tests::echo::{EchoServer, Echoed};
use remora_tests::eventually::eventually;
use remora_tests::load::{Load, LoadSpec};
use remora_tests::mesh::MeshFile;
use remora_tests::mtls::{self, TestCa};
use remora_tests::proxy::{self, Proxy, ProxyConfig};
use remora_tests::topology::{App, CLIENT_IDENTITY, Topology};
use remora_tests::upstream::HttpServer;
use serde_yaml_ng::Value;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MESH: &str = r#"
services:
  - name: web
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
  - name: open
    namespace: test
    mtls: PERMISSIVE
    ports: [{name: http, port: 8080, protocol: http}]
"#;

const WEB: &str = "web.test:8080";
const WEB_ID: &str = "spiffe://cluster.local/ns/test/sa/web";
const HANDSHAKES: &str = "remora_proxy_tls_handshakes_total";
const FAILURES: &str = "remora_proxy_tls_handshake_failures_total";
const WAIT: Duration = Duration::from_secs(10);

async fn web_topology(dir: &TestDir, web: &HttpServer) -> Result<Topology> {
    let mut mesh = MeshFile::parse(MESH)?;
    remora_tests::topology::keep_services(&mut mesh, &["web.test"])?;
    Topology::start(dir, mesh, vec![App::new("web", "web.test", web.addr())]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_handshake_once_per_connection_and_count_callers_by_identity() {
    let dir = TestDir::new("mtls-reuse");
    dir.check(reuse(&dir).await);
}

async fn reuse(dir: &TestDir) -> Result<()> {
    let web = HttpServer::start("web").await?;
    let topology = web_topology(dir, &web).await?;
    let client = topology.client();
    let server = topology.sidecar("web")?;
    let outbound = [("direction", "outbound")];
    let inbound_from_client = [
        ("direction", "inbound"),
        ("source_identity", CLIENT_IDENTITY),
    ];
    let handshakes_before = client.counter(HANDSHAKES, &outbound).await?;
    let counted_before = server
        .counter("remora_proxy_requests_total", &inbound_from_client)
        .await?;
    let http = HttpClient::new();
    for i in 0..200 {
        let reply = http.get(client.outbound_addr(), WEB, "/", &[]).await?;
        ensure!(reply.outcome() == "web", "request {i}: {}", reply.outcome());
    }
    let handshakes = client.counter(HANDSHAKES, &outbound).await? - handshakes_before;
    // A connection per request from the test client, handed to the
    // client sidecar's workers in turn: each worker opens its own mTLS
    // connection to the peer once and reuses it.
    ensure!(
        handshakes <= proxy::WORKERS as f64,
        "200 requests cost {handshakes} outbound handshakes; the mTLS connection must be \
         reused (at most one per worker, {} workers)",
        proxy::WORKERS
    );
    ensure!(
        server
            .counter(HANDSHAKES, &[("direction", "inbound")])
            .await?
            >= 1.0,
        "the web sidecar counted no inbound handshake"
    );
    let counted = server
        .counter("remora_proxy_requests_total", &inbound_from_client)
        .await?
        - counted_before;
    ensure!(
        counted == 200.0,
        "the web sidecar counted {counted} inbound requests from {CLIENT_IDENTITY}, expected 200"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_each_with_its_reason_and_good_traffic_goes_on() {
    let dir = TestDir::new("mtls-refusals");
    dir.check(refusals(&dir).await);
}

async fn refusals(dir: &TestDir) -> Result<()> {
    let web = HttpServer::start("web").await?;
    let topology = web_topology(dir, &web).await?;
    let server = topology.sidecar("web")?;
    let inbound = server.inbound_addr()?;
    let bundle = topology.control_plane().trust_bundle_pem().await?;
    let ca = TestCa::of_control_plane(dir)?;
    let load = Load::start(
        LoadSpec::new(topology.client().outbound_addr(), WEB, "/", 4)
            .paced(Duration::from_millis(5)),
    );
    load.wait_for_more(100, WAIT).await?;

    // A peer with a good certificate gets in, and sees the web identity.
    let good = mtls::handshake(
        inbound,
        Some(ca.valid_leaf(CLIENT_IDENTITY)?),
        &bundle,
        WEB_ID,
        &[&rustls::version::TLS13],
    )
    .await
    .context("a peer with a certificate from the mesh's CA")?;
    ensure!(mtls::server_leaf(&good).is_some(), "no server certificate");
    drop(good);

    let now = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let other_ca = TestCa::new_root("not the mesh")?;
    let cases = [
        (
            "a certificate from another CA",
            Some(other_ca.valid_leaf(CLIENT_IDENTITY)?),
            &rustls::version::TLS13,
            "unknown_ca",
        ),
        (
            "an expired certificate",
            Some(ca.leaf(CLIENT_IDENTITY, now - 2 * hour, now - hour)?),
            &rustls::version::TLS13,
            "expired",
        ),
        (
            "a certificate not valid yet",
            Some(ca.leaf(CLIENT_IDENTITY, now + hour, now + 2 * hour)?),
            &rustls::version::TLS13,
            "not_yet_valid",
        ),
        (
            "no client certificate",
            None,
            &rustls::version::TLS13,
            "no_client_certificate",
        ),
        (
            "TLS 1.2",
            Some(ca.valid_leaf(CLIENT_IDENTITY)?),
            &rustls::version::TLS12,
            "protocol_version",
        ),
    ];
    for (what, cert, version, reason) in cases {
        let labels = [("direction", "inbound"), ("reason", reason)];
        let before = server.counter(FAILURES, &labels).await?;
        if mtls::handshake(inbound, cert, &bundle, WEB_ID, &[version])
            .await
            .is_ok()
        {
            bail!("a peer with {what} was let in");
        }
        eventually(
            &format!("the web sidecar counts {what} as {reason}"),
            WAIT,
            async || {
                let now = server.counter(FAILURES, &labels).await?;
                ensure!(
                    now == before + 1.0,
                    "{FAILURES}{{reason={reason}}} is {now}"
                );
                Ok(())
            },
        )
        .await?;
    }

    // Plaintext to a STRICT port: no answer at all, counted.
    let labels = [("direction", "inbound"), ("reason", "plaintext_refused")];
    let before = server.counter(FAILURES, &labels).await?;
    let mut tcp = TcpStream::connect(inbound).await?;
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: web.test:8080\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .context("the STRICT port neither answered nor closed a plaintext connection")?;
    ensure!(
        answer.is_empty(),
        "a plaintext request to a STRICT port got an answer: {:?} ({read:?})",
        String::from_utf8_lossy(&answer)
    );
    ensure!(
        server.counter(FAILURES, &labels).await? == before + 1.0,
        "the plaintext connection was not counted as plaintext_refused"
    );
    let log = std::fs::read_to_string(server.log_path())?;
    for line in [
        "refused an mTLS connection",
        "refused a plaintext connection",
    ] {
        ensure!(log.contains(line), "the web sidecar's log lacks {line:?}");
    }

    load.wait_for_more(100, WAIT).await?;
    load.stop().await?.expect_no_failures()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_the_expected_identity_is_refused() {
    let dir = TestDir::new("mtls-identity-mismatch");
    dir.check(mismatch(&dir).await);
}

async fn mismatch(dir: &TestDir) -> Result<()> {
    let web = HttpServer::start("web").await?;
    let mut topology = web_topology(dir, &web).await?;
    // The control plane now says the endpoint is served by another
    // identity than the one its sidecar holds.
    let endpoints = topology
        .mesh_mut()
        .service_mut("web.test")?
        .get_mut("endpoints")
        .and_then(Value::as_sequence_mut)
        .context("web.test has endpoints")?;
    for endpoint in endpoints.iter_mut() {
        if let Some(identity) = endpoint.get_mut("identity").and_then(Value::as_mapping_mut) {
            identity.insert("service_account".into(), "payments".into());
        }
    }
    topology.write_mesh()?;
    let client = topology.client();
    let http = HttpClient::new();
    let labels = [("direction", "outbound"), ("reason", "identity_mismatch")];
    eventually(
        "the client refuses the web sidecar, which is not spiffe://.../sa/payments",
        WAIT,
        async || {
            let reply = http.get(client.outbound_addr(), WEB, "/", &[]).await?;
            let error = reply
                .headers
                .get("x-remora-error")
                .and_then(|v| v.to_str().ok());
            ensure!(
                reply.status == 502 && error == Some("tls_handshake_failure"),
                "got {} (x-remora-error {error:?})",
                reply.outcome()
            );
            ensure!(
                client.counter(FAILURES, &labels).await? >= 1.0,
                "no outbound identity_mismatch counted"
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_service_takes_plaintext_and_mtls_on_one_port() {
    let dir = TestDir::new("mtls-permissive");
    dir.check(permissive(&dir).await);
}

async fn permissive(dir: &TestDir) -> Result<()> {
    let open = EchoServer::start("open").await?;
    let mut mesh = MeshFile::parse(MESH)?;
    remora_tests::topology::keep_services(&mut mesh, &["open.test"])?;
    let topology =
        Topology::start(dir, mesh, vec![App::new("open", "open.test", open.addr())]).await?;
    let inbound = topology.sidecar("open")?.inbound_addr()?;

    // Plaintext straight to the inbound port: served, with no identity.
    let http = HttpClient::new();
    let reply = eventually(
        "the PERMISSIVE sidecar answers a plaintext request",
        WAIT,
        async || {
            let reply = http.get(inbound, "open.test:8080", "/who", &[]).await?;
            ensure!(reply.status == 200, "got {}", reply.outcome());
            Ok(reply)
        },
    )
    .await?;
    let echoed: Echoed = serde_json::from_slice(&reply.body).context("the echo")?;
    ensure!(
        echoed.header_values("x-remora-peer-identity").is_empty(),
        "a plaintext caller was given an identity: {echoed:?}"
    );

    // Through the client sidecar: mTLS, with the identity.
    let reply = http
        .get(
            topology.client().outbound_addr(),
            "open.test:8080",
            "/who",
            &[],
        )
        .await?;
    let echoed: Echoed = serde_json::from_slice(&reply.body).context("the echo")?;
    ensure!(
        echoed.header_values("x-remora-peer-identity") == [CLIENT_IDENTITY],
        "over mTLS the app should see {CLIENT_IDENTITY}: {echoed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_does_not_allow_the_identity_gets_no_certificate() {
    let dir = TestDir::new("mtls-wrong-identity-csr");
    dir.check(wrong_identity(&dir).await);
}

async fn wrong_identity(dir: &TestDir) -> Result<()> {
    let mut mesh = MeshFile::parse(MESH)?;
    let token = mesh.token_for("test", "client")?;
    let path = dir.file("mesh.yaml");
    mesh.write(&path)?;
    let cp = remora_tests::ControlPlane::start(dir, &path).await?;
    let link = cp.link(dir).await?;
    // The client's token, but asking to be `admin`.
    let config = ProxyConfig::client("client", "test")
        .service_account("admin")
        .token(&token);
    let proxy = Proxy::start(dir, &link, &config).await?;
    eventually(
        "the CA refuses the CSR and the proxy says why it is not ready",
        WAIT,
        async || {
            let failures = proxy
                .counter(
                    "remora_proxy_certificate_renewal_failures_total",
                    &[("reason", "permission_denied")],
                )
                .await?;
            ensure!(failures >= 1.0, "no permission_denied renewal failure yet");
            let (status, body) = proxy.admin_get_status("/ready").await?;
            ensure!(
                status == 503 && body.contains("workload certificate"),
                "/ready: {status} {body}"
            );
            let refused = cp
                .metric_value(
                    "remora_ca_certificates_refused_total",
                    &[("reason", "wrong_identity")],
                )
                .await?
                .unwrap_or(0.0);
            ensure!(
                refused >= 1.0,
                "the control plane counted no wrong_identity refusal"
            );
            Ok(())
        },
    )
    .await?;
    let log = std::fs::read_to_string(proxy.log_path())?;
    ensure!(
        log.contains("cannot get the workload certificate yet")
            && log.contains("--service-account"),
        "the proxy's log does not say why it has no certificate:\n{}",
        proxy.log_tail(20)
    );
    Ok(())
}
