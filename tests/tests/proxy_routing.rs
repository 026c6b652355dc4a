//! Routing through a pair of `remora-proxy` sidecars with the example
//! mesh's catalog routes (`x-canary: true` to v2, `/v2` to v2, the rest
//! split 80/20) plus a method route, every authority form of the service,
//! and the errors the proxy answers itself (`no_route`, `no_endpoint`,
//! `connect_failure`), each with its status and `x-remora-error`.

use std::net::SocketAddr;

use anyhow::{Context, Result, ensure};
use http::{Method, StatusCode};
use remora_tests::TestDir;
use remora_tests::app_client::{AppClient, empty};
use remora_tests::client::HttpClient;
use remora_tests::echo::EchoServer;
use remora_tests::mesh::MeshFile;
use remora_tests::proxy::AppProtocol;
use remora_tests::shop::CATALOG_AUTHORITIES;
use remora_tests::topology::{App, Topology, keep_services};
use serde_yaml_ng::Value;

/// A route sending DELETE to v2, put before the example's routes.
const METHOD_ROUTE: &str = r#"
name: by-method
match: {method: DELETE}
backends:
  - {service: catalog, subset: v2}
"#;

/// A service without endpoints, and one whose only endpoint (no sidecar)
/// refuses connections.
const BROKEN_SERVICES: &str = r#"
- name: empty
  namespace: shop
  ports: [{name: http, port: 8080, protocol: http}]
- name: gone
  namespace: shop
  ports: [{name: http, port: 8080, protocol: http}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_routes_split_and_match_through_the_pair() {
    let dir = TestDir::new("proxy-routing");
    dir.check(routing(&dir).await);
}

/// A port on 127.0.0.1 where nothing listens (bound, then closed).
async fn closed_port() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?)
}

async fn routing(dir: &TestDir) -> Result<()> {
    let v1 = EchoServer::start("catalog-v1").await?;
    let v2 = EchoServer::start("catalog-v2").await?;
    let gone = closed_port().await?;
    let mut mesh = MeshFile::example()?;
    keep_services(&mut mesh, &["catalog.shop"])?;
    let route: Value = serde_yaml_ng::from_str(METHOD_ROUTE)?;
    mesh.routes_mut("catalog.shop")?.insert(0, route);
    let extra: Vec<Value> = serde_yaml_ng::from_str(BROKEN_SERVICES)?;
    mesh.doc_mut()
        .get_mut("services")
        .and_then(Value::as_sequence_mut)
        .context("services")?
        .extend(extra);
    let topology = Topology::start(
        dir,
        mesh,
        vec![
            App::new("catalog-v1", "catalog.shop", v1.addr()).label("version", "v1"),
            App::new("catalog-v2", "catalog.shop", v2.addr()).label("version", "v2"),
            App::new("gone", "gone.shop", gone).without_sidecar(),
        ],
    )
    .await?;
    let client = topology.client();
    let outbound = client.outbound_addr();
    let http = HttpClient::new();

    // The 80/20 split, over 2,000 requests.
    let tally = http
        .tally(outbound, "catalog.shop:8080", "/items", &[], 2000, 8)
        .await?;
    tally.only_from(&["catalog-v1", "catalog-v2"])?;
    tally.expect_share("catalog-v1", 80.0, 5.0)?;
    let split_ok = client
        .counter(
            "remora_proxy_requests_total",
            &[
                ("direction", "outbound"),
                ("route", "split"),
                ("code", "200"),
            ],
        )
        .await?;
    ensure!(
        split_ok >= 2000.0,
        "remora_proxy_requests_total{{route=\"split\",code=\"200\"}} is {split_ok} after 2,000 \
         requests on that route"
    );

    // Header, path and method routes all go to v2.
    let canary = http
        .tally(
            outbound,
            "catalog.shop",
            "/items",
            &[("x-canary", "true")],
            50,
            4,
        )
        .await?;
    canary
        .only_from(&["catalog-v2"])
        .context("x-canary: true goes to v2")?;
    let not_canary = http
        .tally(
            outbound,
            "catalog.shop",
            "/items",
            &[("x-canary", "yes")],
            200,
            4,
        )
        .await?;
    ensure!(
        not_canary.count("catalog-v1") > 0,
        "x-canary: yes is not the canary header value, so the split applies: {not_canary}"
    );
    let by_path = http
        .tally(outbound, "catalog.shop", "/v2/items", &[], 50, 4)
        .await?;
    by_path
        .only_from(&["catalog-v2"])
        .context("/v2 goes to v2")?;
    let app = AppClient::new(outbound, AppProtocol::Http1);
    for _ in 0..20 {
        let reply = app
            .exchange(
                app.request(Method::DELETE, "catalog.shop", "/items/1")
                    .body(empty())?,
            )
            .await?;
        let echoed = reply.echoed()?;
        ensure!(
            echoed.backend == "catalog-v2" && echoed.method == "DELETE",
            "DELETE goes to v2 by the method route: {echoed:?}"
        );
    }
    let by_method = client
        .counter(
            "remora_proxy_requests_total",
            &[("route", "by-method"), ("code", "200")],
        )
        .await?;
    ensure!(
        by_method == 20.0,
        "remora_proxy_requests_total{{route=\"by-method\"}} is {by_method} after 20 DELETEs"
    );

    // Every authority form of the service, over both protocols.
    for protocol in [AppProtocol::Http1, AppProtocol::Http2] {
        let app = AppClient::new(outbound, protocol);
        for authority in CATALOG_AUTHORITIES {
            let reply = app.get(authority, "/v2/x", &[]).await?;
            let echoed = reply
                .echoed()
                .with_context(|| format!("{protocol:?} to {authority}"))?;
            ensure!(
                echoed.backend == "catalog-v2",
                "{protocol:?} to {authority}/v2/x reached {}",
                echoed.backend
            );
        }
    }

    // Errors the proxy answers itself.
    for (authority, status, reason) in [
        ("nothing.shop:8080", StatusCode::NOT_FOUND, "no_route"),
        ("catalog.shop:9999", StatusCode::NOT_FOUND, "no_route"),
        (
            "empty.shop:8080",
            StatusCode::SERVICE_UNAVAILABLE,
            "no_endpoint",
        ),
        ("gone.shop:8080", StatusCode::BAD_GATEWAY, "connect_failure"),
    ] {
        for protocol in [AppProtocol::Http1, AppProtocol::Http2] {
            let app = AppClient::new(outbound, protocol);
            let reply = app.get(authority, "/", &[]).await?;
            ensure!(
                reply.status == status && reply.remora_error() == Some(reason),
                "{protocol:?} GET {authority}: expected {status} with x-remora-error: {reason}, \
                 got {}",
                reply.describe()
            );
        }
        let errors = client
            .counter(
                "remora_proxy_errors_total",
                &[("direction", "outbound"), ("reason", reason)],
            )
            .await?;
        ensure!(
            errors >= 2.0,
            "remora_proxy_errors_total{{reason=\"{reason}\"}} is {errors} after two such answers"
        );
    }
    Ok(())
}
