//! Retries through `remora-proxy` and their budget (20% of requests over
//! 10 s plus 10 retries per second, per route):
//!
//! - a backend answering 503 to 30% of requests behind a route retrying on
//!   5xx: at least 99.5% of requests succeed, every failed try is either
//!   retried or the request's last, and the retries stay within the budget;
//! - the same backend failing every request: the load it sees stays under
//!   1.2 times the offered load plus the budget's floor of 10 retries per
//!   second, instead of the 4 times that 3 retries per request would make;
//! - retried requests carry their whole body each time, while a body over
//!   the 64 KiB replay buffer is streamed once and never retried;
//! - gRPC calls to a server failing 30% with UNAVAILABLE all succeed behind
//!   a route retrying on `unavailable`;
//! - with one of two endpoints dead (its sidecar gone, still in the mesh),
//!   a route retrying on `connect-failure` retries on the other one, so no
//!   request fails.

use std::time::Duration;

use anyhow::{Result, ensure};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use remora_tests::TestDir;
use remora_tests::app_client::AppClient;
use remora_tests::echo::EchoServer;
use remora_tests::grpc::{Call, GrpcServer};
use remora_tests::load::{Load, LoadSpec};
use remora_tests::mesh::MeshFile;
use remora_tests::pattern::PatternBody;
use remora_tests::proxy::AppProtocol;
use remora_tests::topology::{App, Topology};

const MESH: &str = r#"
services:
  - name: flaky
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
    routes:
      - name: flaky-retried
        backends: [{service: flaky}]
        retry: {on: [5xx], attempts: 3, backoff: {base: 5ms, max: 50ms}}
"#;

/// The budget's floor: retries allowed every second whatever the ratio.
const FLOOR_PER_SECOND: f64 = 10.0;
/// The budget's ratio of requests.
const RATIO: f64 = 0.2;

struct Run {
    requests: u64,
    ok: u64,
    elapsed: Duration,
    retries: f64,
    exhausted: f64,
    arrivals: u64,
    failed_tries: u64,
}

/// One backend behind a retrying route, failing `percent`% of requests,
/// under `requests` requests paced by `workers` clients at one per `pace`.
async fn run(
    dir: &TestDir,
    percent: u32,
    requests: u64,
    workers: usize,
    pace: Duration,
) -> Result<(Run, remora_tests::load::LoadReport)> {
    let app = EchoServer::start("flaky").await?;
    let topology = Topology::start(
        dir,
        MeshFile::parse(MESH)?,
        vec![App::new("flaky", "flaky.test", app.addr())],
    )
    .await?;
    app.set_fail_percent(percent);
    let client = topology.client();
    let mut load = Load::start_bounded(
        LoadSpec::new(client.outbound_addr(), "flaky.test:8080", "/", workers).paced(pace),
        requests,
    );
    let report = load.join().await?;
    let labels = [("direction", "outbound"), ("route", "flaky-retried")];
    let retries = client
        .counter("remora_proxy_retries_total", &labels)
        .await?;
    let exhausted = client
        .counter("remora_proxy_retry_budget_exhausted_total", &labels)
        .await?;
    let run = Run {
        requests: report.sent,
        ok: report.ok,
        elapsed: report.elapsed,
        retries,
        exhausted,
        arrivals: app.requests(),
        failed_tries: app.failed(),
    };
    Ok((run, report))
}

impl Run {
    /// Retries the budget allows over the run: the ratio of requests, and
    /// the floor in every second the run touched (the budget counts whole
    /// seconds, so a run of 6.2 s can touch 8 of them).
    fn budget(&self) -> f64 {
        RATIO * self.requests as f64 + FLOOR_PER_SECOND * (self.elapsed.as_secs_f64().ceil() + 1.0)
    }

    fn describe(&self) -> String {
        format!(
            "{} requests over {:?}: {} succeeded; the backend saw {} tries of which {} failed; \
             remora_proxy_retries_total {}, remora_proxy_retry_budget_exhausted_total {}, budget \
             {:.0}",
            self.requests,
            self.elapsed,
            self.ok,
            self.arrivals,
            self.failed_tries,
            self.retries,
            self.exhausted,
            self.budget()
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_backend_failing_30_percent_within_the_budget() {
    let dir = TestDir::new("proxy-retries-flaky");
    dir.check(flaky(&dir).await);
}

async fn flaky(dir: &TestDir) -> Result<()> {
    // 25 requests a second: the retries 30% failures need (about 0.43 per
    // request) fit in the budget (0.2 per request plus 10 a second).
    let (run, report) = run(dir, 30, 300, 4, Duration::from_millis(160)).await?;
    let what = run.describe();
    println!("{what}");
    ensure!(
        run.ok as f64 >= 0.995 * run.requests as f64,
        "fewer than 99.5% of requests succeeded: {what}; {}; first failures:\n{}",
        report.tally,
        report.failures.join("\n")
    );
    ensure!(
        run.failed_tries as f64 >= 0.25 * run.arrivals as f64,
        "the backend failed too few tries for this test to mean anything: {what}"
    );
    ensure!(
        run.retries <= run.budget(),
        "more retries than the budget allows: {what}"
    );
    // Every failed try was retried, unless it was its request's last.
    ensure!(
        run.failed_tries as f64 == run.retries + (run.requests - run.ok) as f64,
        "failed tries != retries + failed requests: {what}"
    );
    // Every retry reached the backend.
    ensure!(
        run.arrivals as f64 == run.requests as f64 + run.retries,
        "tries at the backend != requests + retries: {what}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_the_load_on_a_backend_failing_everything() {
    let dir = TestDir::new("proxy-retries-broken");
    dir.check(broken(&dir).await);
}

async fn broken(dir: &TestDir) -> Result<()> {
    // 100 requests a second for 6 s, every one failing: 3 retries each
    // would make 4 times the load.
    let (run, report) = run(dir, 100, 600, 5, Duration::from_millis(50)).await?;
    let what = run.describe();
    println!("{what}");
    // The backend's own 503 comes back (the last try's), not an error of
    // the proxy's.
    let own_503 = report
        .tally
        .counts()
        .keys()
        .all(|k| k.starts_with("status 503 ") && k.ends_with("x-remora-error=None"));
    ensure!(
        run.ok == 0 && own_503,
        "every request should end with the backend's own 503: {what}; {}",
        report.tally
    );
    let bound =
        1.2 * run.requests as f64 + FLOOR_PER_SECOND * (run.elapsed.as_secs_f64().ceil() + 1.0);
    ensure!(
        run.arrivals as f64 <= bound,
        "the backend saw {} tries, more than 1.2 x {} requests + 10/s over {:?} = {bound:.0}: \
         {what}",
        run.arrivals,
        run.requests,
        run.elapsed
    );
    ensure!(
        run.retries > 0.0 && run.exhausted > 0.0,
        "the budget should have allowed some retries and refused others: {what}"
    );
    ensure!(
        run.arrivals as f64 == run.requests as f64 + run.retries,
        "tries at the backend != requests + retries: {what}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_replay_small_bodies_whole_and_never_retry_large_ones() {
    let dir = TestDir::new("proxy-retries-bodies");
    dir.check(bodies(&dir).await);
}

async fn bodies(dir: &TestDir) -> Result<()> {
    let app = EchoServer::start("flaky").await?;
    let topology = Topology::start(
        dir,
        MeshFile::parse(MESH)?,
        vec![App::new("flaky", "flaky.test", app.addr())],
    )
    .await?;
    let client = topology.client();
    let labels = [("direction", "outbound"), ("route", "flaky-retried")];
    // Ten uploads a second at most: the retries they need stay under the
    // budget's floor of 10 a second, so none is refused for budget.
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    for protocol in [AppProtocol::Http1, AppProtocol::Http2] {
        let app_client = AppClient::new(client.outbound_addr(), protocol);
        let mut upload = async |len: u64| {
            pace.tick().await;
            let req = app_client
                .request(Method::POST, "flaky.test:8080", "/upload")
                .body(PatternBody::new(len, 8 << 10).boxed())?;
            app_client.exchange(req).await
        };

        // 32 KiB bodies, a third of the tries failing: every request
        // succeeds, and each try that got through carried the whole body.
        app.set_fail_percent(30);
        let failed_before = app.failed();
        for _ in 0..20 {
            let reply = upload(32 << 10).await?;
            let echoed = match reply.echoed() {
                Ok(e) => e,
                Err(e) => {
                    let exhausted = client
                        .counter("remora_proxy_retry_budget_exhausted_total", &labels)
                        .await?;
                    return Err(e.context(format!(
                        "{protocol:?} 32 KiB upload (remora_proxy_retry_budget_exhausted_total \
                         is {exhausted})"
                    )));
                }
            };
            ensure!(
                echoed.body_len == 32 << 10 && echoed.body_is_pattern,
                "{protocol:?}: a retried 32 KiB body arrived as {} bytes (intact: {})",
                echoed.body_len,
                echoed.body_is_pattern
            );
        }
        ensure!(
            app.failed() > failed_before,
            "{protocol:?}: no try failed, so nothing was replayed"
        );

        // Every try failing: a 1 KiB body is tried 4 times (3 retries); a
        // 1 MiB body, past the replay buffer, once.
        app.set_fail_percent(100);
        for (len, tries) in [(1u64 << 10, 4u64), (1 << 20, 1)] {
            let before = app.requests();
            let retries_before = client
                .counter("remora_proxy_retries_total", &labels)
                .await?;
            let reply = upload(len).await?;
            ensure!(
                reply.status == StatusCode::SERVICE_UNAVAILABLE && reply.remora_error().is_none(),
                "{protocol:?} {len} byte upload to a failing backend: expected its own 503, got {}",
                reply.describe()
            );
            let got = app.requests() - before;
            let retries = client
                .counter("remora_proxy_retries_total", &labels)
                .await?
                - retries_before;
            ensure!(
                got == tries && retries == (tries - 1) as f64,
                "{protocol:?}: a {len} byte body to a backend failing everything was tried {got} \
                 times ({retries} retries), expected {tries}"
            );
        }
    }
    Ok(())
}

const GRPC_MESH: &str = r#"
services:
  - name: greeter
    namespace: test
    ports: [{name: grpc, port: 9090, protocol: grpc}]
    routes:
      - name: greeter-retried
        backends: [{service: greeter}]
        timeout: 10s
        retry: {on: [unavailable], attempts: 3, backoff: {base: 5ms, max: 50ms}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_retried_on_unavailable() {
    let dir = TestDir::new("proxy-retries-grpc");
    dir.check(grpc(&dir).await);
}

async fn grpc(dir: &TestDir) -> Result<()> {
    let server = GrpcServer::start_with(dir, "greeter", &["--fail-percent", "30"]).await?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.port()));
    let topology = Topology::start(
        dir,
        MeshFile::parse(GRPC_MESH)?,
        vec![App::new("greeter", "greeter.test", addr).protocol(AppProtocol::Http2)],
    )
    .await?;
    let client = topology.client();
    // `call` stops at the first failed call: all 20 must succeed. (About
    // 9 retries: within the budget's floor of 10 a second, however fast.)
    let counts = Call::new(&client.outbound_addr().to_string(), 20)
        .authority("greeter.test:9090")
        .run(dir)
        .await?;
    ensure!(
        counts.get("greeter") == Some(&20),
        "20 calls through a route retrying on unavailable: {counts:?}"
    );
    let retries = client
        .counter(
            "remora_proxy_retries_total",
            &[("route", "greeter-retried")],
        )
        .await?;
    ensure!(
        retries >= 5.0,
        "a server failing 30% of the calls should have caused about 9 retries, \
         remora_proxy_retries_total is {retries}"
    );
    Ok(())
}

const DEAD_MESH: &str = r#"
services:
  - name: pair
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
    routes:
      - name: around
        backends: [{service: pair}]
        retry: {on: [connect-failure], attempts: 1, backoff: {base: 5ms, max: 10ms}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_avoids_the_endpoint_that_just_failed() {
    let dir = TestDir::new("proxy-retries-dead");
    dir.check(dead_endpoint(&dir).await);
}

async fn dead_endpoint(dir: &TestDir) -> Result<()> {
    let a = EchoServer::start("pair-a").await?;
    let b = EchoServer::start("pair-b").await?;
    let mut topology = Topology::start(
        dir,
        MeshFile::parse(DEAD_MESH)?,
        vec![
            App::new("pair-a", "pair.test", a.addr()),
            App::new("pair-b", "pair.test", b.addr()),
        ],
    )
    .await?;
    // pair-b's sidecar goes away; the mesh still names it.
    topology.sidecar_mut("pair-b")?.stop();
    let client = topology.client();
    // Ten a second: the retries (about half of the requests) stay under
    // the budget's floor.
    let mut load = Load::start_bounded(
        LoadSpec::new(client.outbound_addr(), "pair.test:8080", "/", 1)
            .paced(Duration::from_millis(100)),
        30,
    );
    let report = load.join().await?;
    report.expect_no_failures()?;
    report.tally.only_from(&["pair-a"])?;
    let retries = client
        .counter("remora_proxy_retries_total", &[("route", "around")])
        .await?;
    let refused = client
        .counter(
            "remora_proxy_requests_total",
            &[("route", "around"), ("code", "502")],
        )
        .await?;
    ensure!(
        retries >= 5.0 && refused == 0.0,
        "round robin over two endpoints, one dead: about 15 of 30 requests should have been \
         retried on the live one; remora_proxy_retries_total is {retries}, 502s counted {refused}"
    );
    Ok(())
}
