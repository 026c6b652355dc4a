//! Endpoint changes while traffic flows through `remora-proxy`: an endpoint
//! removed from the mesh file, then its sidecar and application stopped
//! (a scale-down), and a new endpoint added, under several concurrent
//! clients: not one request fails, the removed endpoint gets no new
//! requests once the change is applied, and the new one gets some.

use std::time::Duration;

use anyhow::{Result, ensure};
use remora_tests::TestDir;
use remora_tests::echo::EchoServer;
use remora_tests::load::{Load, LoadSpec};
use remora_tests::mesh::MeshFile;
use remora_tests::topology::{App, CONVERGE_TIMEOUT, Topology};

const MESH: &str = r#"
services:
  - name: api
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
"#;

/// Requests each phase lets through before the next change (about 0.7 s
/// at the paced rate).
const PHASE: u64 = 400;
/// Six clients, each sending one request per 10 ms at most.
const CLIENTS: usize = 6;
const PACE: Duration = Duration::from_millis(10);
/// Time allowed for a phase's requests.
const PHASE_TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_removed_and_added_under_load_fail_no_request() {
    let dir = TestDir::new("proxy-endpoints");
    dir.check(endpoint_changes(&dir).await);
}

async fn endpoint_changes(dir: &TestDir) -> Result<()> {
    let a = EchoServer::start("api-a").await?;
    let b = EchoServer::start("api-b").await?;
    let mut c = Some(EchoServer::start("api-c").await?);
    let d = EchoServer::start("api-d").await?;
    let c_addr = c.as_ref().map(EchoServer::addr).unwrap_or(a.addr());
    let mut topology = Topology::start(
        dir,
        MeshFile::parse(MESH)?,
        vec![
            App::new("api-a", "api.test", a.addr()),
            App::new("api-b", "api.test", b.addr()),
            App::new("api-c", "api.test", c_addr),
            App::new("api-d", "api.test", d.addr()),
        ],
    )
    .await?;
    // api-d starts outside the mesh: it is added later.
    topology.set_endpoints("api.test", &["api-a", "api-b", "api-c"])?;
    topology.write_mesh()?;
    topology.wait_converged(CONVERGE_TIMEOUT).await?;

    let outbound = topology.client().outbound_addr();
    let load = Load::start(LoadSpec::new(outbound, "api.test:8080", "/", CLIENTS).paced(PACE));
    load.wait_for_more(PHASE, PHASE_TIMEOUT).await?;
    let c_before = c.as_ref().map_or(0, EchoServer::requests);
    ensure!(c_before > 0, "api-c got no traffic before its removal");

    // 1. api-c leaves the mesh file.
    topology.set_endpoints("api.test", &["api-a", "api-b"])?;
    topology.write_mesh()?;
    topology.wait_converged(CONVERGE_TIMEOUT).await?;
    load.wait_for_more(PHASE, PHASE_TIMEOUT).await?;
    let c_removed = c.as_ref().map_or(0, EchoServer::requests);
    load.wait_for_more(PHASE, PHASE_TIMEOUT).await?;
    let c_later = c.as_ref().map_or(0, EchoServer::requests);
    ensure!(
        c_later == c_removed,
        "api-c still got requests after its removal was applied: {c_removed}, then {c_later}"
    );

    // 2. Its sidecar and application go away (the scale-down completes).
    topology.sidecar_mut("api-c")?.stop();
    c.take();
    load.wait_for_more(PHASE, PHASE_TIMEOUT).await?;

    // 3. api-d joins and gets traffic.
    let d_before = d.requests();
    topology.set_endpoints("api.test", &["api-a", "api-b", "api-d"])?;
    topology.write_mesh()?;
    topology.wait_converged(CONVERGE_TIMEOUT).await?;
    load.wait_for_more(PHASE, PHASE_TIMEOUT).await?;
    ensure!(
        d.requests() > d_before,
        "api-d got no requests after it was added"
    );

    let report = load.stop().await?;
    report.expect_no_failures()?;
    for (name, server) in [("api-a", &a), ("api-b", &b)] {
        ensure!(
            server.requests() > 0,
            "{name} got no traffic: {}",
            report.tally
        );
    }
    Ok(())
}
