//! A stock Envoy (1.40) and `remora-proxy` sidecars in one mesh, over
//! mutual TLS both ways: Envoy gets its certificate (`default`) and the
//! trust bundle (`ROOTCA`) over SDS on its ADS stream, proving its identity
//! with its bootstrap token, and every hop between the two kinds of sidecar
//! is TLS 1.3 with SPIFFE identities checked on both ends. HTTP/1.1 and
//! gRPC, Envoy as the caller and Envoy as the server; plaintext to a STRICT
//! Envoy is refused and accepted once the service is PERMISSIVE; a node
//! with a wrong token gets no certificate. An application behind an Envoy
//! sidecar is held to what one behind a Remora sidecar gets: exactly the
//! mTLS caller's `x-remora-peer-identity`, no other `x-remora-*` header,
//! and no identity a caller wrote itself.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use http::StatusCode;
use remora_tests::echo::{EchoServer, Echoed};
use remora_tests::envoy::{DynamicResources, SidecarNode};
use remora_tests::grpc::{GrpcServer, Method as Rpcm, Rpc};
use remora_tests::mesh::MeshFile;
use remora_tests::proxy::{AppProtocol, Proxy, ProxyConfig};
use remora_tests::topology::{App, CLIENT_IDENTITY, Topology};
use remora_tests::{Api, ControlPlane, Envoy, HttpClient, TestDir, eventually};
use serde_yaml_ng::{Mapping, Value};

/// An HTTP/1.1 service and a gRPC one, STRICT (the default).
const MESH: &str = r#"
services:
  - name: web
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
    endpoints: []
  - name: greeter
    namespace: test
    ports: [{name: grpc, port: 9090, protocol: grpc}]
    endpoints: []
"#;

const WEB: &str = "web.test:8080";
const GREETER: &str = "greeter.test:9090";
const WEB_CLUSTER: &str = "outbound|8080||web.test.svc.cluster.local";
const GREETER_CLUSTER: &str = "outbound|9090||greeter.test.svc.cluster.local";

/// How long a fresh sidecar may take to get its secrets and route.
const CONVERGE: Duration = Duration::from_secs(15);

/// The Envoy caller's identity: not the topology's Remora client
/// (`.../sa/client`), so what the applications see can only have come from
/// the certificate Envoy got over SDS.
const ENVOY_CLIENT_IDENTITY: &str = "spiffe://cluster.local/ns/test/sa/envoy-client";

/// Envoy's counter or gauge `name` (exact), 0 when absent.
async fn envoy_stat(envoy: &Envoy, name: &str) -> Result<i64> {
    // The filter is a regex; the stats asked for here end in a plain word,
    // so filter on that and look the exact name up.
    let tail = name.rsplit('.').next().unwrap_or(name);
    Ok(envoy
        .stats(&format!("\\.{tail}$"))
        .await?
        .get(name)
        .copied()
        .unwrap_or(0))
}

fn echoed(body: &[u8], what: &str) -> Result<Echoed> {
    serde_json::from_slice(body).with_context(|| {
        format!(
            "{what}: the body is not the echo application's JSON: {:?}",
            String::from_utf8_lossy(body)
        )
    })
}

// === Envoy calls Remora ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_client_to_remora_server_over_mtls_http_and_grpc() {
    let dir = TestDir::new("envoy-mtls-client");
    dir.check(envoy_client(&dir).await);
}

async fn envoy_client(dir: &TestDir) -> Result<()> {
    let web = EchoServer::start("web").await?;
    let greeter = GrpcServer::start(dir, "greeter-1").await?;
    let greeter_addr = SocketAddr::from(([127, 0, 0, 1], greeter.port()));
    let mut mesh = MeshFile::parse(MESH)?;
    let token = mesh.token_for("test", "envoy-client")?;
    let topology = Topology::start(
        dir,
        mesh,
        vec![
            App::new("web", "web.test", web.addr()),
            App::new("greeter-1", "greeter.test", greeter_addr).protocol(AppProtocol::Http2),
        ],
    )
    .await?;
    let web_sidecar = topology.sidecar("web")?;
    let greeter_sidecar = topology.sidecar("greeter-1")?;
    let inbound_handshakes = [("direction", "inbound")];
    let web_handshakes_before = web_sidecar
        .counter("remora_proxy_tls_handshakes_total", &inbound_handshakes)
        .await?;
    let greeter_handshakes_before = greeter_sidecar
        .counter("remora_proxy_tls_handshakes_total", &inbound_handshakes)
        .await?;

    let node = SidecarNode::client("envoy-client", "test").token(&token);
    ensure!(node.identity() == ENVOY_CLIENT_IDENTITY);
    let mut envoy = Envoy::start_sidecar(
        dir,
        topology.control_plane().xds_addr(),
        "envoy-client",
        Api::Sotw,
        &node,
    )
    .await?;
    let outbound = envoy.wait_for_listener("outbound").await?;
    let client = HttpClient::new();

    // The clusters to the Remora sidecars warm until Envoy has `default`
    // and `ROOTCA`; then HTTP/1.1 reaches the application over mTLS. A
    // caller's own x-remora-peer-identity must not survive.
    let spoof = [("x-remora-peer-identity", "spiffe://evil/ns/x/sa/y")];
    let reply = eventually(
        "Envoy reaches web.test through its outbound listener",
        CONVERGE,
        async || {
            let reply = client.get(outbound, WEB, "/who", &spoof).await?;
            if reply.status != StatusCode::OK {
                let dump = envoy.dynamic_resources().await?;
                bail!("got {}; Envoy holds {dump}", reply.outcome());
            }
            Ok(reply)
        },
    )
    .await?;
    let seen = echoed(&reply.body, "Envoy to web.test")?;
    ensure!(
        seen.header_values("x-remora-peer-identity") == [ENVOY_CLIENT_IDENTITY],
        "the application behind the Remora sidecar should see exactly \
         x-remora-peer-identity: {ENVOY_CLIENT_IDENTITY} (from Envoy's SDS certificate), saw \
         {:?}",
        seen.headers
    );
    for _ in 0..4 {
        let reply = client.get(outbound, WEB, "/again", &[]).await?;
        ensure!(reply.status == StatusCode::OK, "{}", reply.outcome());
    }

    // gRPC (HTTP/2, ALPN h2) to the gRPC application's sidecar.
    let who = Rpc::new(outbound, GREETER, Rpcm::Who)
        .metadata("x-remora-peer-identity", "spoofed")
        .run(dir)
        .await?;
    ensure!(
        who.code == "OK" && who.replies == ["greeter-1"],
        "gRPC Who from Envoy through the Remora sidecar: {who:?}"
    );
    ensure!(
        who.trailing_metadata.get("x-seen-x-remora-peer-identity")
            == Some(&vec![ENVOY_CLIENT_IDENTITY.to_string()]),
        "the gRPC server should see x-remora-peer-identity: {ENVOY_CLIENT_IDENTITY}: {who:?}"
    );
    let count = Rpc::new(outbound, GREETER, Rpcm::Count)
        .arg("500")
        .run(dir)
        .await?;
    ensure!(
        count.code == "OK" && count.replies.len() == 500,
        "server-streaming Count(500) from Envoy: code {} {}, {} replies",
        count.code,
        count.details,
        count.replies.len()
    );

    // Envoy's side: both clusters handshook, over TLS 1.3.
    for cluster in [WEB_CLUSTER, GREETER_CLUSTER] {
        let handshakes = envoy_stat(&envoy, &format!("cluster.{cluster}.ssl.handshake")).await?;
        let tls13 = envoy_stat(&envoy, &format!("cluster.{cluster}.ssl.versions.TLSv1.3")).await?;
        ensure!(
            handshakes > 0 && tls13 == handshakes,
            "Envoy's cluster {cluster}: {handshakes} TLS handshakes, {tls13} of them TLS 1.3; \
             expected some, all TLS 1.3: {:?}",
            envoy.stats("ssl").await?
        );
    }

    // The Remora side: inbound handshakes grew, and every request the
    // applications received is counted under Envoy's identity.
    let web_requests = web.requests();
    eventually(
        "the Remora sidecars count Envoy's handshakes and requests",
        Duration::from_secs(5),
        async || {
            let handshakes = web_sidecar
                .counter("remora_proxy_tls_handshakes_total", &inbound_handshakes)
                .await?;
            ensure!(
                handshakes > web_handshakes_before,
                "web's sidecar counts {handshakes} inbound TLS handshakes, {web_handshakes_before} \
                 before Envoy called"
            );
            let handshakes = greeter_sidecar
                .counter("remora_proxy_tls_handshakes_total", &inbound_handshakes)
                .await?;
            ensure!(
                handshakes > greeter_handshakes_before,
                "greeter's sidecar counts {handshakes} inbound TLS handshakes, \
                 {greeter_handshakes_before} before Envoy called"
            );
            let from_envoy = [
                ("direction", "inbound"),
                ("source_identity", ENVOY_CLIENT_IDENTITY),
            ];
            let counted = web_sidecar
                .counter("remora_proxy_requests_total", &from_envoy)
                .await?;
            ensure!(
                counted == web_requests as f64,
                "web's sidecar counts {counted} inbound requests from {ENVOY_CLIENT_IDENTITY}; \
                 the application received {web_requests}"
            );
            let counted = greeter_sidecar
                .counter("remora_proxy_requests_total", &from_envoy)
                .await?;
            ensure!(
                counted == 2.0,
                "greeter's sidecar counts {counted} inbound calls from {ENVOY_CLIENT_IDENTITY}, \
                 Envoy made 2"
            );
            Ok(())
        },
    )
    .await?;
    ensure!(
        envoy.rejected_updates().await?.is_empty(),
        "Envoy rejected updates: {:?}",
        envoy.rejected_updates().await?
    );
    Ok(())
}

// === Remora calls Envoy ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remora_client_to_envoy_server_over_mtls_http_and_grpc() {
    let dir = TestDir::new("envoy-mtls-server");
    dir.check(envoy_server(&dir).await);
}

/// Points `service`'s endpoints at `addr`, an Envoy sidecar running as
/// `service_account`.
fn set_sidecar_endpoint(
    mesh: &mut MeshFile,
    service: &str,
    addr: SocketAddr,
    service_account: &str,
) -> Result<()> {
    let mut identity = Mapping::new();
    identity.insert("service_account".into(), service_account.into());
    let mut ep = Mapping::new();
    ep.insert("address".into(), addr.ip().to_string().into());
    ep.insert("port".into(), Value::from(addr.port()));
    ep.insert("identity".into(), Value::Mapping(identity));
    mesh.service_mut(service)?.insert(
        "endpoints".into(),
        Value::Sequence(vec![Value::Mapping(ep)]),
    );
    Ok(())
}

/// Envoy's stat `stat` of the sidecar's inbound listener. Listener stats
/// are named after the configured address, `127.0.0.1:0`, not the bound
/// one, and the outbound listener is configured at the same address: the
/// two share these stats. The outbound listener never speaks TLS and has a
/// single catch-all filter chain, so TLS handshakes and filter chain misses
/// counted there are the inbound listener's.
fn inbound_listener_stat(stat: &str) -> String {
    format!("listener.127.0.0.1_0.{stat}")
}

/// Envoy sidecars in front of an HTTP/1.1 application (web) and a gRPC one
/// (greeter), over delta ADS, and a Remora client sidecar whose clusters
/// reach them.
struct EnvoyServers {
    web: EchoServer,
    _greeter: GrpcServer,
    mesh: MeshFile,
    mesh_path: std::path::PathBuf,
    _cp: ControlPlane,
    web_envoy: Envoy,
    greeter_envoy: Envoy,
    web_inbound: SocketAddr,
    greeter_inbound: SocketAddr,
    client: Proxy,
}

impl EnvoyServers {
    async fn start(dir: &TestDir) -> Result<EnvoyServers> {
        let web = EchoServer::start("web").await?;
        let greeter = GrpcServer::start(dir, "greeter-1").await?;
        let greeter_addr = SocketAddr::from(([127, 0, 0, 1], greeter.port()));
        let mut mesh = MeshFile::parse(MESH)?;
        let web_token = mesh.token_for("test", "web")?;
        let greeter_token = mesh.token_for("test", "greeter")?;
        let client_token = mesh.token_for("test", "client")?;
        let mesh_path = dir.file("mesh.yaml");
        mesh.write(&mesh_path)?;
        let cp = ControlPlane::start(dir, &mesh_path).await?;

        // Each Envoy binds its inbound listener on port 0; the mesh names
        // the bound address once known.
        let web_node = SidecarNode::server("web", "test", web.addr(), "http").token(&web_token);
        let greeter_node =
            SidecarNode::server("greeter", "test", greeter_addr, "grpc").token(&greeter_token);
        let mut web_envoy =
            Envoy::start_sidecar(dir, cp.xds_addr(), "envoy-web", Api::Delta, &web_node).await?;
        let mut greeter_envoy = Envoy::start_sidecar(
            dir,
            cp.xds_addr(),
            "envoy-greeter",
            Api::Delta,
            &greeter_node,
        )
        .await?;
        let web_inbound = web_envoy.wait_for_listener("inbound").await?;
        let greeter_inbound = greeter_envoy.wait_for_listener("inbound").await?;

        set_sidecar_endpoint(&mut mesh, "web.test", web_inbound, "web")?;
        set_sidecar_endpoint(&mut mesh, "greeter.test", greeter_inbound, "greeter")?;
        mesh.write(&mesh_path)?;
        let mut client = Proxy::start(
            dir,
            &cp.link(dir).await?,
            &ProxyConfig::client("client", "test")
                .node_id("client")
                .token(&client_token),
        )
        .await?;
        client.wait_ready(CONVERGE).await?;
        let expected: BTreeSet<SocketAddr> = [web_inbound, greeter_inbound].into();
        client.wait_for_members("", &expected, CONVERGE).await?;
        Ok(EnvoyServers {
            web,
            _greeter: greeter,
            mesh,
            mesh_path,
            _cp: cp,
            web_envoy,
            greeter_envoy,
            web_inbound,
            greeter_inbound,
            client,
        })
    }
}

/// `GET /who` from the Remora client (outbound listener `outbound`) to
/// web.test, polled until 200: web's Envoy sidecar may still be waiting for
/// its certificate.
async fn first_web_reply(
    http: &HttpClient,
    outbound: SocketAddr,
    web_envoy: &Envoy,
    headers: &[(&str, &str)],
) -> Result<Echoed> {
    let reply = eventually(
        "the Remora client reaches web.test behind Envoy",
        CONVERGE,
        async || {
            let reply = http.get(outbound, WEB, "/who", headers).await?;
            if reply.status != StatusCode::OK {
                bail!(
                    "got {} (x-remora-error {:?}); Envoy web holds {}",
                    reply.outcome(),
                    reply.headers.get("x-remora-error"),
                    web_envoy.dynamic_resources().await?
                );
            }
            Ok(reply)
        },
    )
    .await?;
    echoed(&reply.body, "Remora client to web.test behind Envoy")
}

async fn envoy_server(dir: &TestDir) -> Result<()> {
    let EnvoyServers {
        web,
        _greeter,
        mut mesh,
        mesh_path,
        _cp,
        mut web_envoy,
        greeter_envoy,
        web_inbound,
        greeter_inbound,
        client,
    } = EnvoyServers::start(dir).await?;
    let outbound_handshakes = [("direction", "outbound")];
    let handshakes_before = client
        .counter("remora_proxy_tls_handshakes_total", &outbound_handshakes)
        .await?;

    // HTTP/1.1 from the Remora client to the Envoy sidecar, over mTLS (the
    // Envoy listener has no plaintext chain: STRICT).
    let http = HttpClient::new();
    let outbound = client.outbound_addr();
    let seen = first_web_reply(&http, outbound, &web_envoy, &[]).await?;
    ensure!(
        seen.backend == "web" && seen.path == "/who",
        "the application behind Envoy saw {seen:?}"
    );
    for _ in 0..4 {
        let reply = http.get(outbound, WEB, "/again", &[]).await?;
        ensure!(reply.status == StatusCode::OK, "{}", reply.outcome());
    }

    // gRPC from the Remora client to the Envoy sidecar (ALPN h2).
    let who = Rpc::new(outbound, GREETER, Rpcm::Who).run(dir).await?;
    ensure!(
        who.code == "OK" && who.replies == ["greeter-1"],
        "gRPC Who from the Remora client to greeter behind Envoy: {who:?}"
    );
    let count = Rpc::new(outbound, GREETER, Rpcm::Count)
        .arg("500")
        .run(dir)
        .await?;
    ensure!(
        count.code == "OK" && count.replies.len() == 500,
        "server-streaming Count(500) to greeter behind Envoy: code {} {}, {} replies",
        count.code,
        count.details,
        count.replies.len()
    );

    // Envoy's inbound listeners handshook (TLS 1.3) and sent the requests
    // on to the applications.
    for (envoy, inbound) in [(&web_envoy, web_inbound), (&greeter_envoy, greeter_inbound)] {
        let handshakes = envoy_stat(envoy, &inbound_listener_stat("ssl.handshake")).await?;
        let tls13 = envoy_stat(envoy, &inbound_listener_stat("ssl.versions.TLSv1.3")).await?;
        // The inbound HTTP connection manager's own count (stat_prefix
        // `inbound`) is unambiguous.
        let tls_connections = envoy_stat(envoy, "http.inbound.downstream_cx_ssl_total").await?;
        ensure!(
            handshakes > 0 && tls13 == handshakes && tls_connections > 0,
            "Envoy {}'s inbound listener {inbound}: {handshakes} TLS handshakes, {tls13} of \
             them TLS 1.3, {tls_connections} TLS connections to the inbound HTTP connection \
             manager; expected some, all TLS 1.3: {:?}",
            envoy.node_id(),
            envoy.stats("ssl").await?
        );
        let to_app = envoy_stat(envoy, "cluster.inbound|app.upstream_rq_completed").await?;
        ensure!(
            to_app > 0,
            "Envoy {} sent no request to its application (cluster inbound|app): {:?}",
            envoy.node_id(),
            envoy.stats("inbound").await?
        );
    }
    let handshakes = client
        .counter("remora_proxy_tls_handshakes_total", &outbound_handshakes)
        .await?;
    ensure!(
        handshakes > handshakes_before,
        "the Remora client counts {handshakes} outbound TLS handshakes, {handshakes_before} \
         before it called the Envoy sidecars"
    );

    // Plaintext straight to a STRICT Envoy sidecar finds no filter chain.
    let no_match = inbound_listener_stat("no_filter_chain_match");
    let refused_before = envoy_stat(&web_envoy, &no_match).await?;
    // Refused: the connection is closed without an answer.
    if let Ok(reply) = http.get(web_inbound, WEB, "/plain", &[]).await {
        bail!(
            "plaintext to web's STRICT Envoy sidecar at {web_inbound} was answered: {}",
            reply.outcome()
        );
    }
    let refused = envoy_stat(&web_envoy, &no_match).await?;
    ensure!(
        refused > refused_before,
        "{no_match} is {refused} (was {refused_before}) after a plaintext request"
    );
    let requests = web.requests();

    // PERMISSIVE: the same listener (same port) takes plaintext too, and
    // mTLS keeps working.
    mesh.service_mut("web.test")?
        .insert("mtls".into(), "PERMISSIVE".into());
    mesh.write(&mesh_path)?;
    eventually(
        "web's Envoy sidecar takes plaintext once web is PERMISSIVE",
        CONVERGE,
        async || {
            let reply = http.get(web_inbound, WEB, "/plain", &[]).await?;
            ensure!(reply.status == StatusCode::OK, "got {}", reply.outcome());
            Ok(())
        },
    )
    .await?;
    ensure!(
        web.requests() > requests,
        "the plaintext request did not reach the application"
    );
    let inbound_now = web_envoy.wait_for_listener("inbound").await?;
    ensure!(
        inbound_now == web_inbound,
        "Envoy moved its inbound listener from {web_inbound} to {inbound_now} when the service \
         became PERMISSIVE; the mesh still names the old address"
    );
    let reply = http.get(outbound, WEB, "/after", &[]).await?;
    ensure!(
        reply.status == StatusCode::OK,
        "mTLS to web's PERMISSIVE Envoy sidecar: {}",
        reply.outcome()
    );
    for envoy in [&web_envoy, &greeter_envoy] {
        let rejected = envoy.rejected_updates().await?;
        ensure!(
            rejected.is_empty(),
            "Envoy {} rejected updates: {rejected:?}",
            envoy.node_id()
        );
    }
    Ok(())
}

/// What a Remora sidecar promises its application (`proxy_protocols.rs`),
/// asked of an Envoy sidecar in the same mesh: the application sees
/// exactly `x-remora-peer-identity` of an mTLS caller, no other
/// `x-remora-*` header, and never an identity a caller wrote itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_server_gives_its_application_the_callers_identity_and_no_internal_headers() {
    let dir = TestDir::new("envoy-mtls-server-headers");
    dir.check(envoy_server_headers(&dir).await);
}

async fn envoy_server_headers(dir: &TestDir) -> Result<()> {
    let mut servers = EnvoyServers::start(dir).await?;
    let http = HttpClient::new();
    let mut problems = Vec::new();

    // From the Remora client, over mTLS.
    let seen = first_web_reply(
        &http,
        servers.client.outbound_addr(),
        &servers.web_envoy,
        &[],
    )
    .await?;
    let internal: Vec<&(String, String)> = seen
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-remora-") && k != "x-remora-peer-identity")
        .collect();
    if !internal.is_empty() {
        problems.push(format!(
            "over mTLS from a Remora caller the application saw the internal headers \
             {internal:?}"
        ));
    }
    if seen.header_values("x-remora-peer-identity") != [CLIENT_IDENTITY] {
        problems.push(format!(
            "over mTLS from {CLIENT_IDENTITY} the application saw x-remora-peer-identity \
             {:?}",
            seen.header_values("x-remora-peer-identity")
        ));
    }

    // In plaintext (PERMISSIVE) with an identity the caller wrote itself.
    let forged = "spiffe://cluster.local/ns/test/sa/admin";
    servers
        .mesh
        .service_mut("web.test")?
        .insert("mtls".into(), "PERMISSIVE".into());
    servers.mesh.write(&servers.mesh_path)?;
    let inbound = servers.web_inbound;
    let reply = eventually(
        "web's Envoy sidecar takes plaintext once web is PERMISSIVE",
        CONVERGE,
        async || {
            let reply = http
                .get(
                    inbound,
                    WEB,
                    "/plain",
                    &[("x-remora-peer-identity", forged)],
                )
                .await?;
            ensure!(reply.status == StatusCode::OK, "got {}", reply.outcome());
            Ok(reply)
        },
    )
    .await?;
    let seen = echoed(&reply.body, "plaintext to web's Envoy sidecar")?;
    if !seen.header_values("x-remora-peer-identity").is_empty() {
        problems.push(format!(
            "a plaintext caller's own x-remora-peer-identity reached the application: {:?}",
            seen.header_values("x-remora-peer-identity")
        ));
    }
    ensure!(
        problems.is_empty(),
        "behind an Envoy sidecar (its `inbound` listener as the control plane sends it): {}",
        problems.join("; ")
    );
    Ok(())
}

// === A wrong token ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_with_a_wrong_token_gets_no_certificate() {
    let dir = TestDir::new("envoy-mtls-wrong-token");
    dir.check(wrong_token(&dir).await);
}

async fn wrong_token(dir: &TestDir) -> Result<()> {
    let mut mesh = MeshFile::parse(MESH)?;
    // Nothing listens there: the cluster only has to exist, with an
    // identity, so that it needs the certificate.
    set_sidecar_endpoint(&mut mesh, "web.test", "127.0.0.1:9".parse()?, "web")?;
    mesh.token_for("test", "envoy-client")?;
    let web_token = mesh.token_for("test", "web")?;
    let mesh_path = dir.file("mesh.yaml");
    mesh.write(&mesh_path)?;
    let cp = ControlPlane::start(dir, &mesh_path).await?;

    // One node with a token the mesh does not know, one with another
    // workload's token.
    let cases = [
        (
            "envoy-unknown-token",
            "not-a-token-of-this-mesh",
            "unknown_token",
        ),
        ("envoy-stolen-token", web_token.as_str(), "wrong_identity"),
    ];
    let mut envoys = Vec::new();
    for (node_id, token, _) in &cases {
        let node = SidecarNode::client("envoy-client", "test").token(token);
        envoys.push(Envoy::start_sidecar(dir, cp.xds_addr(), node_id, Api::Sotw, &node).await?);
    }
    // Envoy stops waiting for a secret after its initial fetch timeout
    // (15 s) and activates the cluster without it; these checks run well
    // before that.
    for ((node_id, _, reason), envoy) in cases.iter().zip(&mut envoys) {
        eventually(
            &format!("{node_id} has ROOTCA, no default, and its cluster to web warming"),
            Duration::from_secs(10),
            async || {
                envoy.check_running()?;
                let dump = envoy.dynamic_resources().await?;
                let active = DynamicResources::names(&dump.secrets);
                ensure!(
                    active == ["ROOTCA"],
                    "{node_id}'s active secrets are {active:?}, expected only ROOTCA: {dump}"
                );
                ensure!(
                    DynamicResources::names(&dump.warming_clusters).contains(&WEB_CLUSTER),
                    "{node_id}'s cluster {WEB_CLUSTER} is not warming: {dump}"
                );
                let refused = cp
                    .metric_value(
                        "remora_ca_certificates_refused_total",
                        &[("reason", reason)],
                    )
                    .await?
                    .unwrap_or(0.0);
                ensure!(
                    refused >= 1.0,
                    "remora_ca_certificates_refused_total{{reason=\"{reason}\"}} is {refused}"
                );
                Ok(())
            },
        )
        .await?;
    }
    let issued = cp
        .metric_value("remora_ca_certificates_issued_total", &[])
        .await?
        .unwrap_or(0.0);
    ensure!(
        issued == 0.0,
        "the control plane issued {issued} certificates; neither node proved its identity"
    );
    let log = std::fs::read_to_string(cp.log_path())?;
    for (_, token, _) in &cases {
        ensure!(
            !log.contains(token),
            "the control plane's log holds a node's REMORA_TOKEN"
        );
    }
    Ok(())
}
