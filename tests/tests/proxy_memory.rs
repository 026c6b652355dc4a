//! Large bodies stream through `remora-proxy` instead of piling up in it:
//! 100 MiB uploads and downloads through a pair of sidecars, over HTTP/1.1
//! and h2c, on a plain route and on a retrying one (whose replay buffer
//! must give up past 64 KiB, not grow), arrive whole and in order, while
//! each sidecar's peak resident memory (`VmHWM` in `/proc/<pid>/status`)
//! stays under 64 MiB.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use remora_tests::TestDir;
use remora_tests::app_client::{AppClient, empty};
use remora_tests::echo::{DOWNLOAD_HEADER, EchoServer};
use remora_tests::mesh::MeshFile;
use remora_tests::pattern::{PatternBody, PatternCheck};
use remora_tests::proxy::AppProtocol;
use remora_tests::topology::{App, Topology};

/// `/retried` goes through a retrying route: its request bodies are kept
/// for replay only up to 64 KiB, then streamed once.
const MESH: &str = r#"
services:
  - name: bulk
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
    routes:
      - name: retried
        match: {path: {prefix: /retried}}
        backends: [{service: bulk}]
        retry: {on: [5xx, reset], attempts: 2}
      - name: plain
        backends: [{service: bulk}]
"#;

/// The size of each transfer.
const LEN: u64 = 100 << 20;
/// The most memory a sidecar may hold at its peak.
const RSS_LIMIT_KIB: u64 = 64 << 10;
/// Time allowed for each transfer (a debug build moves a few tens of MiB/s
/// through two proxies on two shared cores).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_upload_and_download_stream_through_the_pair_in_bounded_memory() {
    let dir = TestDir::new("proxy-memory");
    dir.check(bulk(&dir).await);
}

async fn bulk(dir: &TestDir) -> Result<()> {
    let app = EchoServer::start("bulk").await?;
    let topology = Topology::start(
        dir,
        MeshFile::parse(MESH)?,
        vec![App::new("bulk", "bulk.test", app.addr())],
    )
    .await?;
    let outbound = topology.client().outbound_addr();
    let proxies = [
        ("client sidecar", topology.client()),
        ("bulk sidecar", topology.sidecar("bulk")?),
    ];
    let mut before = Vec::new();
    for (name, proxy) in &proxies {
        before.push((name, proxy.memory()?));
    }

    for protocol in [AppProtocol::Http1, AppProtocol::Http2] {
        let client = AppClient::new(outbound, protocol);
        for path in ["/upload", "/retried/upload"] {
            let took = upload(&client, path).await?;
            println!("{protocol:?}: 100 MiB upload to {path} in {took:?}");
        }
        let took = download(&client).await?;
        println!("{protocol:?}: 100 MiB download in {took:?}");
    }

    let retried = topology
        .client()
        .counter(
            "remora_proxy_requests_total",
            &[("route", "retried"), ("code", "200")],
        )
        .await?;
    ensure!(
        retried == 2.0,
        "remora_proxy_requests_total{{route=\"retried\",code=\"200\"}} is {retried} after two \
         uploads on that route"
    );

    for ((name, proxy), (_, was)) in proxies.iter().zip(&before) {
        let now = proxy.memory()?;
        println!("{name}: before {was:?}, after {now:?}");
        ensure!(
            now.hwm_kib < RSS_LIMIT_KIB,
            "the {name}'s peak resident memory reached {} KiB (limit {RSS_LIMIT_KIB} KiB; \
             {} KiB before the transfers): the bodies were buffered, not streamed",
            now.hwm_kib,
            was.hwm_kib
        );
    }
    Ok(())
}

/// Uploads `LEN` pattern bytes, 64 KiB at a time with no length announced
/// (chunked, over HTTP/1.1); the application checks them as they arrive.
async fn upload(client: &AppClient, path: &str) -> Result<Duration> {
    let start = Instant::now();
    let req = client
        .request(Method::PUT, "bulk.test:8080", path)
        .body(PatternBody::new(LEN, 64 << 10).boxed())?;
    let reply = client.exchange_within(req, TRANSFER_TIMEOUT).await?;
    let what = format!("the {:?} 100 MiB upload to {path}", client.protocol());
    let echoed = reply.echoed().context(what.clone())?;
    ensure!(
        echoed.body_len == LEN && echoed.body_is_pattern,
        "{what}: the application received {} bytes (pattern intact: {})",
        echoed.body_len,
        echoed.body_is_pattern
    );
    Ok(start.elapsed())
}

/// Downloads `LEN` pattern bytes, checked as they arrive.
async fn download(client: &AppClient) -> Result<Duration> {
    let start = Instant::now();
    let what = format!("the {:?} 100 MiB download", client.protocol());
    let req = client
        .request(Method::GET, "bulk.test:8080", "/download")
        .header(DOWNLOAD_HEADER, LEN.to_string())
        .body(empty())?;
    let check = tokio::time::timeout(TRANSFER_TIMEOUT, async {
        let response = client.send(req).await?;
        ensure!(
            response.status() == StatusCode::OK,
            "{what} was answered {:?}",
            response
        );
        let mut body = response.into_body();
        let mut check = PatternCheck::new();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.context("reading the download")?.data_ref() {
                check.feed(data);
            }
        }
        anyhow::Ok(check)
    })
    .await
    .with_context(|| format!("{what} did not finish within {TRANSFER_TIMEOUT:?}"))??;
    check.expect(LEN).context(what)?;
    Ok(start.elapsed())
}
