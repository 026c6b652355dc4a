//! Editing the mesh file changes Envoy's routing within 2 s of the write;
//! an edit with a mistake changes nothing and is counted as a failed reload.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use remora_tests::eventually::{DEFAULT_INTERVAL, eventually_until};
use remora_tests::mesh::TestEndpoint;
use remora_tests::{Api, ControlPlane, Envoy, HttpClient, HttpServer, Shop, TestDir, eventually};
use serde_yaml_ng::Value;

/// From the moment the file is written to Envoy routing by the new mesh.
const RELOAD_DEADLINE: Duration = Duration::from_secs(2);

const FAILURES: &str = "remora_config_reload_failures_total";
const SOURCE_FILE: [(&str, &str); 1] = [("source", "file")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_file_edits_reach_envoy() {
    let dir = TestDir::new("reload");
    dir.check(edits_reach_envoy(&dir).await);
}

async fn edits_reach_envoy(dir: &TestDir) -> Result<()> {
    let mut shop = Shop::start().await?;
    let catalog_v1b = HttpServer::start("catalog-v1b").await?;
    let mesh_path = shop.write_mesh(dir)?;
    let cp = ControlPlane::start(dir, &mesh_path).await?;
    let node = "sidecar-reload";
    let mut envoy = Envoy::start(dir, cp.xds_addr(), node, Api::Sotw).await?;
    let outbound = envoy.wait_for_listener("outbound").await?;
    let client = HttpClient::new();
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
    cp.wait_synced(node, &["LDS", "RDS", "CDS", "EDS"], Duration::from_secs(10))
        .await?;
    let failures = cp.metric_value(FAILURES, &SOURCE_FILE).await?;
    ensure!(
        failures.unwrap_or(0.0) == 0.0,
        "{FAILURES} is {failures:?} before any edit"
    );
    let reloads_before = cp
        .metric_value("remora_config_reloads_total", &SOURCE_FILE)
        .await?
        .unwrap_or(0.0);

    // 1. A new catalog v1 endpoint starts getting traffic.
    shop.mesh.set_endpoints(
        "catalog.shop",
        &[
            TestEndpoint::version(shop.catalog_v1.port(), "v1"),
            TestEndpoint::version(catalog_v1b.port(), "v1"),
            TestEndpoint::version(shop.catalog_v2.port(), "v2"),
        ],
    )?;
    let written = write(&shop, &mesh_path)?;
    within_reload_deadline(
        written,
        "the new catalog v1 endpoint gets traffic",
        async || {
            let tally = client
                .tally(outbound, "catalog.shop", "/", &[], 20, 4)
                .await?;
            ensure!(tally.count("catalog-v1b") > 0, "{tally}");
            Ok(())
        },
    )
    .await?;

    // 2. The split becomes 50/50.
    shop.mesh
        .set_subset_weights("catalog.shop", "split", &[("v1", 50), ("v2", 50)])?;
    let written = write(&shop, &mesh_path)?;
    within_reload_deadline(written, "the split is 50/50", async || {
        // 80/20 would give v2 about 20% ± 3 here; 50/50 gives about 50%.
        let tally = client
            .tally(outbound, "catalog.shop", "/", &[], 200, 8)
            .await?;
        ensure!(tally.percent("catalog-v2") > 35.0, "{tally}");
        Ok(())
    })
    .await?;
    let tally = client
        .tally(outbound, "catalog.shop", "/", &[], 2000, 8)
        .await?;
    tally.only_from(&["catalog-v1", "catalog-v1b", "catalog-v2"])?;
    tally
        .expect_share("catalog-v2", 50.0, 5.0)
        .context("after changing the split to 50/50")?;

    // 3. Without the v2-path route, /v2 follows the split.
    shop.mesh.remove_route("catalog.shop", "v2-path")?;
    let written = write(&shop, &mesh_path)?;
    within_reload_deadline(written, "/v2 follows the split", async || {
        let tally = client
            .tally(outbound, "catalog.shop", "/v2/items", &[], 40, 4)
            .await?;
        ensure!(tally.count("catalog-v2") < 40, "{tally}");
        Ok(())
    })
    .await?;
    let tally = client
        .tally(outbound, "catalog.shop", "/v2/items", &[], 400, 8)
        .await?;
    tally.only_from(&["catalog-v1", "catalog-v1b", "catalog-v2"])?;
    tally
        .expect_share("catalog-v2", 50.0, 10.0)
        .context("/v2 after removing the v2-path route")?;

    let synced = cp
        .wait_synced(node, &["LDS", "RDS", "CDS", "EDS"], Duration::from_secs(5))
        .await?;
    let reloads = cp
        .metric_value("remora_config_reloads_total", &SOURCE_FILE)
        .await?
        .unwrap_or(0.0);
    ensure!(
        reloads >= reloads_before + 3.0,
        "remora_config_reloads_total{{source=\"file\"}} went from {reloads_before} to {reloads} \
         over 3 edits"
    );
    let route_version = envoy
        .dynamic_resources()
        .await?
        .route_version("outbound")
        .map(str::to_string);

    // 4. An edit with a mistake changes nothing. It would also send every
    // request to v1 if it were (wrongly) applied in part.
    let mut bad = shop.mesh.clone();
    bad.set_subset_weights("catalog.shop", "split", &[("v1", 100), ("v2", 0)])?;
    bad.routes_mut("catalog.shop")?.insert(
        0,
        serde_yaml_ng::from_str::<Value>(
            "{name: broken, match: {path: {prefix: /broken}}, backends: [{service: no-such-service}]}",
        )?,
    );
    let written = Instant::now();
    bad.write(&mesh_path)?;
    eventually_until(
        &format!("{FAILURES}{{source=\"file\"}} goes to 1"),
        written + RELOAD_DEADLINE,
        DEFAULT_INTERVAL,
        async || {
            let failures = cp.metric_value(FAILURES, &SOURCE_FILE).await?;
            ensure!(failures == Some(1.0), "{FAILURES} is {failures:?}");
            Ok(())
        },
    )
    .await?;
    // Envoy keeps routing by the last good mesh: 50/50, /v2 split too.
    let tally = client
        .tally(outbound, "catalog.shop", "/", &[], 400, 8)
        .await?;
    tally.only_from(&["catalog-v1", "catalog-v1b", "catalog-v2"])?;
    tally
        .expect_share("catalog-v2", 50.0, 10.0)
        .context("after a refused edit")?;
    let tally = client
        .tally(outbound, "catalog.shop", "/v2/items", &[], 100, 4)
        .await?;
    ensure!(
        tally.count("catalog-v2") < 100 && tally.count("catalog-v2") > 0,
        "/v2 after a refused edit: {tally}"
    );
    let reply = client.get(outbound, "catalog.shop", "/broken", &[]).await?;
    ensure!(
        reply.backend.is_some(),
        "/broken after a refused edit: {}",
        reply.outcome()
    );
    // Nothing new was sent, and the failure was counted once.
    let after = cp.sync_status(node).await?;
    for ty in ["LDS", "RDS", "CDS", "EDS"] {
        ensure!(
            after.sent(ty) == synced.sent(ty),
            "{ty} version changed after a refused edit: {:?} -> {:?}",
            synced.sent(ty),
            after.sent(ty)
        );
    }
    let now_version = envoy
        .dynamic_resources()
        .await?
        .route_version("outbound")
        .map(str::to_string);
    ensure!(
        now_version == route_version,
        "Envoy's route version changed after a refused edit: {route_version:?} -> {now_version:?}"
    );
    let failures = cp.metric_value(FAILURES, &SOURCE_FILE).await?;
    ensure!(
        failures == Some(1.0),
        "{FAILURES} is {failures:?}, expected 1"
    );
    envoy.check_running()?;
    Ok(())
}

/// Writes the shop's mesh and returns when.
fn write(shop: &Shop, path: &std::path::Path) -> Result<Instant> {
    let at = Instant::now();
    shop.mesh.write(path)?;
    Ok(at)
}

/// Polls `check` until it holds, failing if it does not within
/// [`RELOAD_DEADLINE`] of `written`.
async fn within_reload_deadline(
    written: Instant,
    what: &str,
    check: impl AsyncFnMut() -> Result<()>,
) -> Result<()> {
    eventually_until(
        &format!("{what} (within {RELOAD_DEADLINE:?} of writing the mesh file)"),
        written + RELOAD_DEADLINE,
        Duration::from_millis(20),
        check,
    )
    .await
}
