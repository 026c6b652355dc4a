//! The control plane crashes (SIGKILL) and comes back on the same xDS
//! address while traffic flows through `remora-proxy`: not one request
//! fails, every sidecar notices (`remora_proxy_xds_connected` drops to 0),
//! reconnects (back to 1, `remora_proxy_xds_reconnects_total` counts it),
//! and takes mesh changes from the new control plane.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use remora_tests::echo::EchoServer;
use remora_tests::eventually::eventually;
use remora_tests::load::{Load, LoadSpec};
use remora_tests::mesh::MeshFile;
use remora_tests::topology::{App, CONVERGE_TIMEOUT, Topology};
use remora_tests::{ControlPlane, Proxy, TestDir};

const MESH: &str = r#"
services:
  - name: api
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
"#;

const PHASE: u64 = 300;
const PHASE_TIMEOUT: Duration = Duration::from_secs(20);
/// The proxy's reconnect backoff is capped at 5 s; a control plane away
/// for a second or two is back within a few tries.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_and_restarted_under_load_fails_no_request() {
    let dir = TestDir::new("proxy-control-plane");
    dir.check(restart(&dir).await);
}

async fn xds_connected(proxy: &Proxy) -> Result<f64> {
    proxy
        .metric_value("remora_proxy_xds_connected", &[])
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "proxy {} exposes no remora_proxy_xds_connected",
                proxy.name()
            )
        })
}

async fn restart(dir: &TestDir) -> Result<()> {
    let a = EchoServer::start("api-a").await?;
    let b = EchoServer::start("api-b").await?;
    let mut topology = Topology::start(
        dir,
        MeshFile::parse(MESH)?,
        vec![
            App::new("api-a", "api.test", a.addr()),
            App::new("api-b", "api.test", b.addr()),
        ],
    )
    .await?;
    for proxy in topology.proxies() {
        ensure!(
            xds_connected(proxy).await? == 1.0,
            "proxy {} is not connected to the control plane before the test",
            proxy.name()
        );
    }
    let xds = topology.control_plane().xds_addr();
    let tls = topology.control_plane().tls_addr()?;
    let outbound = topology.client().outbound_addr();
    let load = Load::start(
        LoadSpec::new(outbound, "api.test:8080", "/", 4).paced(Duration::from_millis(10)),
    );
    load.wait_for_more(PHASE, PHASE_TIMEOUT).await?;

    // The crash.
    topology.control_plane_mut().kill();
    for proxy in topology.proxies() {
        eventually(
            &format!("proxy {} sees the control plane gone", proxy.name()),
            Duration::from_secs(15),
            async || {
                let connected = xds_connected(proxy).await?;
                ensure!(
                    connected == 0.0,
                    "remora_proxy_xds_connected is {connected}"
                );
                Ok(())
            },
        )
        .await?;
    }
    let (status, body) = topology.client().admin_get_status("/ready").await?;
    ensure!(
        status == http::StatusCode::OK,
        "the client sidecar is no longer ready without a control plane: {status} {body}"
    );
    load.wait_for_more(PHASE, PHASE_TIMEOUT).await?;

    // The restart, on the same addresses and the same mesh file (and the
    // same CA state directory, so the same root).
    let mesh_path = topology.mesh_path().clone();
    let restarted = ControlPlane::restart_on(dir, &mesh_path, xds, tls).await?;
    ensure!(
        restarted.tls_addr()? == tls,
        "the control plane came back on {}",
        restarted.tls_addr()?
    );
    let _dead = topology.set_control_plane(restarted);
    for proxy in topology.proxies() {
        eventually(
            &format!(
                "proxy {} reconnects to the restarted control plane",
                proxy.name()
            ),
            RECONNECT_TIMEOUT,
            async || {
                let connected = xds_connected(proxy).await?;
                let reconnects = proxy
                    .counter("remora_proxy_xds_reconnects_total", &[])
                    .await?;
                if connected != 1.0 || reconnects < 1.0 {
                    bail!(
                        "remora_proxy_xds_connected is {connected}, \
                         remora_proxy_xds_reconnects_total is {reconnects}; xds status: {}",
                        proxy.xds_status().await?
                    );
                }
                Ok(())
            },
        )
        .await?;
    }
    load.wait_for_more(PHASE, PHASE_TIMEOUT).await?;

    // The new control plane's changes reach the sidecars: api-b leaves.
    topology.set_endpoints("api.test", &["api-a"])?;
    topology.write_mesh()?;
    topology.wait_converged(CONVERGE_TIMEOUT).await?;
    load.wait_for_more(PHASE, PHASE_TIMEOUT).await?;

    let report = load.stop().await?;
    report.expect_no_failures()?;
    ensure!(
        a.requests() > 0 && b.requests() > 0,
        "both endpoints should have had traffic: {}",
        report.tally
    );
    Ok(())
}
