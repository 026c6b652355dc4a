//! Timeouts of `remora-proxy` against a slow application: a route timeout
//! and a per-try timeout each fire within 10% of the configured value, with
//! a 504 and `x-remora-error` naming which; per-try timeouts are retried
//! when the route says so; a gRPC caller gets `DEADLINE_EXCEEDED`; a caller
//! that gives up is counted as 499 and leaves nothing in flight.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use http::StatusCode;
use remora_tests::app_client::AppClient;
use remora_tests::echo::{DELAY_HEADER, EchoServer};
use remora_tests::grpc::{GrpcServer, Method, Rpc};
use remora_tests::mesh::MeshFile;
use remora_tests::proxy::AppProtocol;
use remora_tests::topology::{App, Topology};
use remora_tests::{TestDir, eventually};

const MESH: &str = r#"
services:
  - name: slow
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
    routes:
      - name: route-timeout
        match: {path: {prefix: /route}}
        backends: [{service: slow}]
        timeout: 500ms
      # Per-try timeouts are not retried on a status code condition: one
      # try, cut at 300 ms.
      - name: per-try
        match: {path: {prefix: /try}}
        backends: [{service: slow}]
        timeout: 5s
        retry: {on: [retriable-status-codes], status_codes: [418], attempts: 1, per_try_timeout: 300ms}
      # Retried on 5xx (which covers a per-try timeout): three tries of
      # 200 ms, 10 ms of backoff at most between them.
      - name: per-try-retried
        match: {path: {prefix: /retried}}
        backends: [{service: slow}]
        timeout: 5s
        retry: {on: [5xx], attempts: 2, per_try_timeout: 200ms, backoff: {base: 10ms, max: 10ms}}
  - name: slowrpc
    namespace: test
    ports: [{name: grpc, port: 9090, protocol: grpc}]
    routes:
      - name: rpc-timeout
        backends: [{service: slowrpc}]
        timeout: 500ms
"#;

/// Tries of each measurement.
const TRIES: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_per_try_timeouts_fire_on_time_with_504() {
    let dir = TestDir::new("proxy-timeouts");
    dir.check(timeouts(&dir).await);
}

/// Sends `GET path` to a slow application `TRIES` times (from both kinds of
/// callers) and checks each answer is a 504 naming `reason`, arriving
/// between `low` and `high` after the request.
async fn expect_timeout(
    outbound: SocketAddr,
    path: &str,
    reason: &str,
    low: Duration,
    high: Duration,
) -> Result<()> {
    for protocol in [AppProtocol::Http1, AppProtocol::Http2] {
        let client = AppClient::new(outbound, protocol);
        for _ in 0..TRIES {
            let start = Instant::now();
            let reply = client
                .get("slow.test:8080", path, &[(DELAY_HEADER, "3000")])
                .await?;
            let took = start.elapsed();
            ensure!(
                reply.status == StatusCode::GATEWAY_TIMEOUT && reply.remora_error() == Some(reason),
                "{protocol:?} GET {path} to an application answering after 3 s: expected 504 \
                 with x-remora-error: {reason}, got {}",
                reply.describe()
            );
            ensure!(
                took >= low && took <= high,
                "{protocol:?} GET {path}: the {reason} answer came after {took:?}, expected \
                 between {low:?} and {high:?}"
            );
        }
    }
    Ok(())
}

/// `configured` ± 10%.
fn within_10_percent(configured: Duration) -> (Duration, Duration) {
    (configured.mul_f64(0.9), configured.mul_f64(1.1))
}

async fn timeouts(dir: &TestDir) -> Result<()> {
    let slow = EchoServer::start("slow").await?;
    let rpc = GrpcServer::start_with(dir, "slowrpc", &["--delay", "3"]).await?;
    let rpc_addr = SocketAddr::from(([127, 0, 0, 1], rpc.port()));
    let topology = Topology::start(
        dir,
        MeshFile::parse(MESH)?,
        vec![
            App::new("slow", "slow.test", slow.addr()),
            App::new("slowrpc", "slowrpc.test", rpc_addr).protocol(AppProtocol::Http2),
        ],
    )
    .await?;
    let client = topology.client();
    let outbound = client.outbound_addr();

    // A fast answer on the same routes is not cut.
    let fast = AppClient::new(outbound, AppProtocol::Http1);
    for path in ["/route", "/try", "/retried"] {
        let reply = fast
            .get("slow.test:8080", path, &[(DELAY_HEADER, "50")])
            .await?;
        reply
            .echoed()
            .with_context(|| format!("a 50 ms answer on {path} must not time out"))?;
    }

    let (low, high) = within_10_percent(Duration::from_millis(500));
    expect_timeout(outbound, "/route", "route_timeout", low, high).await?;
    let (low, high) = within_10_percent(Duration::from_millis(300));
    expect_timeout(outbound, "/try", "per_try_timeout", low, high).await?;

    // Three tries of 200 ms, each cut, with at most 10 ms between them.
    let before = slow.requests();
    let (low, _) = within_10_percent(Duration::from_millis(600));
    let (_, high) = within_10_percent(Duration::from_millis(620));
    expect_timeout(outbound, "/retried", "per_try_timeout", low, high).await?;
    let tries = slow.requests() - before;
    ensure!(
        tries == 3 * 2 * TRIES as u64,
        "{} requests on the retried route should have made 3 tries each, the application saw \
         {tries}",
        2 * TRIES
    );

    let route = client
        .counter("remora_proxy_timeouts_total", &[("kind", "route")])
        .await?;
    let per_try = client
        .counter("remora_proxy_timeouts_total", &[("kind", "per_try")])
        .await?;
    ensure!(
        route >= (2 * TRIES) as f64 && per_try >= (2 * TRIES + 3 * 2 * TRIES) as f64,
        "remora_proxy_timeouts_total is {route} for kind=route and {per_try} for kind=per_try"
    );

    // A gRPC caller gets DEADLINE_EXCEEDED from the route timeout, long
    // before its own 10 s deadline.
    let outcome = Rpc::new(outbound, "slowrpc.test:9090", Method::Who)
        .timeout(Duration::from_secs(10))
        .run(dir)
        .await?;
    ensure!(
        outcome.code == "DEADLINE_EXCEEDED"
            && outcome
                .trailing_metadata
                .get("x-remora-error")
                .is_some_and(|v| v == &["route_timeout"]),
        "a gRPC call to an application answering after 3 s behind a 500 ms route timeout: \
         {outcome:?}"
    );

    // A caller that gives up before the answer: counted as 499, nothing
    // left in flight.
    let impatient = AppClient::new(outbound, AppProtocol::Http1);
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        impatient.get("slow.test:8080", "/route", &[(DELAY_HEADER, "3000")]),
    )
    .await;
    ensure!(
        gave_up.is_err(),
        "the slow answer came within 100 ms: {gave_up:?}"
    );
    eventually(
        "the abandoned request is counted as 499 and nothing is in flight",
        Duration::from_secs(5),
        async || {
            let cancelled = client
                .counter(
                    "remora_proxy_requests_total",
                    &[("code", "499"), ("route", "route-timeout")],
                )
                .await?;
            let in_flight = client
                .counter(
                    "remora_proxy_requests_in_flight",
                    &[("direction", "outbound")],
                )
                .await?;
            ensure!(
                cancelled == 1.0 && in_flight == 0.0,
                "requests_total{{code=\"499\"}} is {cancelled}, requests_in_flight is {in_flight}"
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}
