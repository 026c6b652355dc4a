//! Proxyless gRPC: a grpcio client resolves `xds:///reviews.shop:9090`
//! through the control plane and spreads calls over reviews v1 and v2 by the
//! route's 70/30 split.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use remora_tests::grpc::{Call, GrpcServer, write_bootstrap};
use remora_tests::mesh::TestEndpoint;
use remora_tests::{ControlPlane, Shop, TestDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyless_grpc_follows_the_split() {
    let dir = TestDir::new("grpc");
    dir.check(follows_the_split(&dir).await);
}

async fn follows_the_split(dir: &TestDir) -> Result<()> {
    let mut shop = Shop::start().await?;
    // grpcio shortens timeouts that come from its service config (which is
    // where xDS `max_stream_duration` lands) by a second or more
    // (grpc/grpc#34547, #40633): with the example's `timeout: 1s` every
    // call fails at once with DEADLINE_EXCEEDED. A longer route timeout
    // keeps the test about routing.
    shop.mesh
        .route_mut("reviews.shop", "split")?
        .insert("timeout".into(), "30s".into());
    let v1 = GrpcServer::start(dir, "reviews-v1").await?;
    let v2 = GrpcServer::start(dir, "reviews-v2").await?;
    shop.mesh.set_endpoints(
        "reviews.shop",
        &[
            TestEndpoint::version(v1.port(), "v1"),
            TestEndpoint::version(v2.port(), "v2"),
        ],
    )?;
    let mesh = shop.write_mesh(dir)?;
    let cp = ControlPlane::start(dir, &mesh).await?;

    // With the port: 70/30 over 400 calls.
    let bootstrap = write_bootstrap(dir, cp.xds_addr(), "grpc-client-port")?;
    let counts = Call::new("xds:///reviews.shop:9090", 400)
        .bootstrap(bootstrap)
        .run(dir)
        .await?;
    check_only_reviews(&counts, 400)?;
    let share = percent(&counts, "reviews-v1");
    ensure!(
        (share - 70.0).abs() <= 8.0,
        "expected reviews-v1 to answer 70% ± 8 points of calls to xds:///reviews.shop:9090, \
         got {share:.1}%: {counts:?}"
    );

    // Without the port.
    let bootstrap = write_bootstrap(dir, cp.xds_addr(), "grpc-client-noport")?;
    let counts = Call::new("xds:///reviews.shop", 50)
        .bootstrap(bootstrap)
        .run(dir)
        .await
        .context("target without a port")?;
    check_only_reviews(&counts, 50)?;
    ensure!(
        counts.len() == 2,
        "50 calls to xds:///reviews.shop all went to one version: {counts:?}"
    );

    // Neither client NACKed anything.
    let nacks = cp.metric_value("remora_xds_nacks_total", &[]).await?;
    ensure!(
        nacks.unwrap_or(0.0) == 0.0,
        "remora_xds_nacks_total is {nacks:?}: the gRPC client rejected a resource (see the \
         control plane's log)"
    );
    Ok(())
}

fn check_only_reviews(counts: &BTreeMap<String, u64>, total: u64) -> Result<()> {
    let sum: u64 = counts.values().sum();
    ensure!(sum == total, "{sum} answers for {total} calls: {counts:?}");
    ensure!(
        counts
            .keys()
            .all(|k| k == "reviews-v1" || k == "reviews-v2"),
        "answers from outside reviews: {counts:?}"
    );
    Ok(())
}

fn percent(counts: &BTreeMap<String, u64>, name: &str) -> f64 {
    let total: u64 = counts.values().sum();
    if total == 0 {
        return 0.0;
    }
    100.0 * counts.get(name).copied().unwrap_or(0) as f64 / total as f64
}
