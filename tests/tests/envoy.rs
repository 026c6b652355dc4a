//! A stock Envoy as a sidecar of the example mesh, over state-of-the-world
//! and delta ADS: it ACKs everything the control plane sends and routes real
//! HTTP through its `outbound` listener by path, header, weight and
//! authority.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use remora_tests::envoy::DynamicResources;
use remora_tests::shop::CATALOG_AUTHORITIES;
use remora_tests::{Api, ControlPlane, Envoy, HttpClient, Shop, TestDir, eventually};

/// Every xDS type the sidecar view uses.
const TYPES: [&str; 4] = ["LDS", "RDS", "CDS", "EDS"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sotw_acks_and_routes() {
    let dir = TestDir::new("envoy-sotw");
    dir.check(acks_and_routes(&dir, Api::Sotw).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_acks_and_routes() {
    let dir = TestDir::new("envoy-delta");
    dir.check(acks_and_routes(&dir, Api::Delta).await);
}

async fn acks_and_routes(dir: &TestDir, api: Api) -> Result<()> {
    let shop = Shop::start().await?;
    let mesh = shop.write_mesh(dir)?;
    let cp = ControlPlane::start(dir, &mesh).await?;
    let node = format!("sidecar-{api}");
    let mut envoy = Envoy::start(dir, cp.xds_addr(), &node, api).await?;
    let outbound = envoy.wait_for_listener("outbound").await?;
    let client = HttpClient::new();

    // Routing works once the route configuration has arrived.
    eventually(
        "Envoy routes catalog.shop/v2 to catalog v2",
        Duration::from_secs(10),
        async || {
            let reply = client
                .get(outbound, "catalog.shop", "/v2/items", &[])
                .await?;
            ensure!(reply.outcome() == "catalog-v2", "got {}", reply.outcome());
            Ok(())
        },
    )
    .await?;

    // The control plane sees every type ACKed, and no NACK.
    let status = cp
        .wait_synced(&node, &TYPES, Duration::from_secs(10))
        .await?;
    ensure!(
        status.kind == "envoy",
        "node kind is {:?}, expected envoy",
        status.kind
    );
    ensure!(
        status.api == api.to_string(),
        "node api is {:?}, expected {api}",
        status.api
    );
    let connected = cp
        .metric_value(
            "remora_xds_connected_clients",
            &[("kind", "envoy"), ("api", &api.to_string())],
        )
        .await?;
    ensure!(
        connected.is_some_and(|n| n >= 1.0),
        "remora_xds_connected_clients{{kind=\"envoy\",api=\"{api}\"}} is {connected:?}"
    );
    let nacks = cp.metric_value("remora_xds_nacks_total", &[]).await?;
    ensure!(
        nacks.unwrap_or(0.0) == 0.0,
        "remora_xds_nacks_total is {nacks:?}"
    );

    // Envoy holds the resources, none warming, none rejected.
    let res = eventually(
        "Envoy's config dump holds the mesh's resources, none warming",
        Duration::from_secs(10),
        async || {
            let res = envoy.dynamic_resources().await?;
            check_resources(&res, &shop).with_context(|| format!("config dump: {res}"))?;
            Ok(res)
        },
    )
    .await?;
    ensure!(
        res.errors.is_empty(),
        "Envoy reports rejected resources: {:?}",
        res.errors
    );
    let rejected = envoy.rejected_updates().await?;
    ensure!(rejected.is_empty(), "Envoy rejected updates: {rejected:?}");

    // By path: /v2 goes to v2 whatever the split says.
    let tally = client
        .tally(outbound, "catalog.shop", "/v2/items", &[], 50, 4)
        .await?;
    tally.only_from(&["catalog-v2"]).context("GET /v2/items")?;

    // By header: x-canary: true goes to v2.
    let tally = client
        .tally(
            outbound,
            "catalog.shop",
            "/",
            &[("x-canary", "true")],
            50,
            4,
        )
        .await?;
    tally
        .only_from(&["catalog-v2"])
        .context("GET / with x-canary: true")?;

    // By weight: 80/20 between v1 and v2.
    let tally = client
        .tally(outbound, "catalog.shop", "/", &[], 2000, 8)
        .await?;
    tally.only_from(&["catalog-v1", "catalog-v2"])?;
    tally
        .expect_share("catalog-v1", 80.0, 5.0)
        .context("GET / split 80/20")?;

    // By authority: every form of the name, with and without the port.
    for authority in CATALOG_AUTHORITIES {
        let reply = client.get(outbound, authority, "/v2/x", &[]).await?;
        ensure!(
            reply.outcome() == "catalog-v2",
            "Host: {authority} GET /v2/x: got {}",
            reply.outcome()
        );
        let tally = client.tally(outbound, authority, "/", &[], 20, 2).await?;
        tally
            .only_from(&["catalog-v1", "catalog-v2"])
            .with_context(|| format!("Host: {authority} GET /"))?;
    }
    for authority in ["frontend.shop", "frontend.shop.svc.cluster.local:80"] {
        let reply = client.get(outbound, authority, "/", &[]).await?;
        ensure!(
            reply.outcome() == "frontend",
            "Host: {authority}: got {}",
            reply.outcome()
        );
    }
    // A name outside the mesh matches no virtual host.
    let reply = client.get(outbound, "nowhere.shop", "/", &[]).await?;
    ensure!(
        reply.status == 404,
        "Host: nowhere.shop: expected 404 from Envoy, got {}",
        reply.outcome()
    );

    // Still in sync after all that, and the servers counted what Envoy sent.
    cp.wait_synced(&node, &TYPES, Duration::from_secs(5))
        .await?;
    ensure!(shop.catalog_v1.requests() > 0 && shop.catalog_v2.requests() > 0);
    envoy.check_running()?;
    Ok(())
}

/// The listeners, routes, clusters and endpoints the sidecar view must hold.
fn check_resources(res: &DynamicResources, shop: &Shop) -> Result<()> {
    let listeners = DynamicResources::names(&res.listeners);
    ensure!(
        listeners.contains(&"outbound"),
        "no active listener `outbound`"
    );
    ensure!(
        res.warming_listeners.is_empty(),
        "listeners still warming: {:?}",
        DynamicResources::names(&res.warming_listeners)
    );
    let routes = DynamicResources::names(&res.routes);
    ensure!(
        routes.contains(&"outbound"),
        "no route configuration `outbound`"
    );
    let clusters = DynamicResources::names(&res.clusters);
    for cluster in [
        "outbound|8080||catalog.shop.svc.cluster.local",
        "outbound|8080|v1|catalog.shop.svc.cluster.local",
        "outbound|8080|v2|catalog.shop.svc.cluster.local",
        "outbound|80||frontend.shop.svc.cluster.local",
        "outbound|9090|v1|reviews.shop.svc.cluster.local",
        "outbound|9090|v2|reviews.shop.svc.cluster.local",
    ] {
        ensure!(clusters.contains(&cluster), "no active cluster {cluster:?}");
    }
    ensure!(
        res.warming_clusters.is_empty(),
        "clusters still warming: {:?}",
        DynamicResources::names(&res.warming_clusters)
    );
    // EDS: the v1 and v2 subsets point at their servers.
    for (cluster, port) in [
        (
            "outbound|8080|v1|catalog.shop.svc.cluster.local",
            shop.catalog_v1.port(),
        ),
        (
            "outbound|8080|v2|catalog.shop.svc.cluster.local",
            shop.catalog_v2.port(),
        ),
    ] {
        let cla = res
            .endpoint_configs
            .iter()
            .find(|e| e["cluster_name"] == cluster)
            .with_context(|| format!("no endpoints for {cluster}"))?;
        let ports: Vec<u64> = cla["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["lb_endpoints"].as_array().into_iter().flatten())
            .filter_map(|e| e["endpoint"]["address"]["socket_address"]["port_value"].as_u64())
            .collect();
        ensure!(
            ports == [u64::from(port)],
            "{cluster} has endpoint ports {ports:?}, expected [{port}]"
        );
    }
    Ok(())
}
