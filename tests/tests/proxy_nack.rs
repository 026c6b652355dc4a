//! `remora-proxy` rejects what it does not implement, resource by resource,
//! and keeps serving. Our control plane never sends such resources, so the
//! proxy is served by a scripted ADS server (`tests/peers/ads_server.py`):
//!
//! 1. a valid configuration: `svc-a` routes to application A;
//! 2. a CDS response with a new valid cluster `svc-b` and an ORIGINAL_DST
//!    cluster `svc-bad`, plus a route to `svc-b`: the proxy NACKs the CDS
//!    response with an `error_detail` naming `svc-bad` and its `type`,
//!    applies `svc-b` all the same (its route starts working), and keeps
//!    the previous version as its accepted one;
//! 3. a route configuration with a `prefix_rewrite`: NACKed whole, naming
//!    the field, and the previous routes keep serving.
//!
//! Traffic to `svc-a` flows the whole time without one failure.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use remora_tests::ads::AdsServer;
use remora_tests::client::HttpClient;
use remora_tests::eventually::eventually;
use remora_tests::load::{Load, LoadSpec};
use remora_tests::proxy::{ControlLink, Proxy, ProxyConfig};
use remora_tests::{HttpServer, TestDir};
use serde_json::Value;

const STEP_TIMEOUT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_resource_is_nacked_and_the_rest_keeps_serving() {
    let dir = TestDir::new("proxy-nack");
    dir.check(nack(&dir).await);
}

/// The request that answered the response of `ty` with nonce `nonce`.
fn answer_to<'a>(events: &'a [Value], ty: &str, nonce: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| e["event"] == "request" && e["type"] == ty && e["response_nonce"] == nonce)
}

/// The last response the server sent of `ty`.
fn last_response(events: &[Value], ty: &str) -> Result<Value> {
    events
        .iter()
        .rev()
        .find(|e| e["event"] == "response" && e["type"] == ty)
        .cloned()
        .ok_or_else(|| anyhow!("the server sent no {ty} response"))
}

async fn nack(dir: &TestDir) -> Result<()> {
    let a = HttpServer::start("app-a").await?;
    let b = HttpServer::start("app-b").await?;
    let mut ads = AdsServer::start(dir, a.port(), b.port()).await?;
    let mut proxy = Proxy::start(
        dir,
        &ControlLink::Plaintext(ads.addr()),
        &ProxyConfig::client("client", "test"),
    )
    .await?;
    proxy.wait_ready(STEP_TIMEOUT).await?;
    let outbound = proxy.outbound_addr();
    let http = HttpClient::new();
    let reply = http.get(outbound, "svc-a", "/", &[]).await?;
    ensure!(
        reply.outcome() == "app-a",
        "svc-a at stage 1: {}",
        reply.outcome()
    );
    let (status, _) = http
        .get(outbound, "svc-b", "/", &[])
        .await
        .map(|r| (r.status, ()))?;
    ensure!(status == 404, "svc-b does not exist yet, got {status}");

    // Everything of stage 1 was ACKed.
    let events = ads.events();
    for ty in ["LDS", "RDS", "CDS", "EDS"] {
        let sent = last_response(&events, ty)?;
        let nonce = sent["nonce"].as_str().unwrap_or_default();
        let ack = answer_to(&events, ty, nonce)
            .ok_or_else(|| anyhow!("no answer to the {ty} response {sent}"))?;
        ensure!(
            ack["error_detail"].is_null() && ack["version_info"] == sent["version"],
            "stage 1's {ty} response was not ACKed: {ack}"
        );
    }
    let cds_v1 = last_response(&events, "CDS")?["version"].clone();

    let load =
        Load::start(LoadSpec::new(outbound, "svc-a:80", "/", 2).paced(Duration::from_millis(10)));
    load.wait_for_more(100, STEP_TIMEOUT).await?;

    // Stage 2: one bad cluster among good ones.
    ads.stage(2)?;
    let nack = ads
        .wait_for("a NACK of the stage 2 CDS response", STEP_TIMEOUT, |e| {
            e["event"] == "request" && e["type"] == "CDS" && !e["error_detail"].is_null()
        })
        .await?;
    let message = nack["error_detail"]["message"].as_str().unwrap_or_default();
    ensure!(
        nack["error_detail"]["code"] == 3
            && message.contains("svc-bad")
            && message.contains("type")
            && message.contains("ORIGINAL_DST")
            && !message.contains("svc-b\""),
        "the NACK's error_detail should name svc-bad, its `type` and ORIGINAL_DST (and only it): \
         {nack}"
    );
    let events = ads.events();
    let rejected = last_response(&events, "CDS")?;
    ensure!(
        nack["response_nonce"] == rejected["nonce"] && nack["version_info"] == cds_v1,
        "the NACK should answer the stage 2 response (nonce {}) and keep the last accepted \
         version {cds_v1}: {nack}",
        rejected["nonce"]
    );
    // The valid cluster of the rejected response applies: svc-b works.
    eventually("svc-b routes to app-b", STEP_TIMEOUT, async || {
        let reply = http.get(outbound, "svc-b", "/", &[]).await?;
        ensure!(
            reply.outcome() == "app-b",
            "svc-b answered {}",
            reply.outcome()
        );
        Ok(())
    })
    .await?;
    let dump = proxy.config_dump().await?;
    let clusters: Vec<&String> = dump["config"]["clusters"]
        .as_object()
        .context("config.clusters in /config_dump")?
        .keys()
        .collect();
    ensure!(
        clusters == ["svc-a", "svc-b"],
        "the proxy's clusters after the NACK: {clusters:?}"
    );
    let last_nack = &dump["xds"]["types"]["CDS"]["last_nack"];
    ensure!(
        last_nack["message"]
            .as_str()
            .is_some_and(|m| m.contains("svc-bad")),
        "/config_dump's xds.types.CDS.last_nack does not name svc-bad: {}",
        dump["xds"]
    );
    let nacks = proxy
        .counter("remora_proxy_xds_nacks_total", &[("type", "CDS")])
        .await?;
    ensure!(
        nacks == 1.0,
        "remora_proxy_xds_nacks_total{{type=\"CDS\"}} is {nacks}"
    );

    // Stage 3: a route configuration with a prefix_rewrite, NACKed whole.
    ads.stage(3)?;
    let nack = ads
        .wait_for("a NACK of the stage 3 RDS response", STEP_TIMEOUT, |e| {
            e["event"] == "request" && e["type"] == "RDS" && !e["error_detail"].is_null()
        })
        .await?;
    let message = nack["error_detail"]["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("outbound") && message.contains("prefix_rewrite"),
        "the RDS NACK should name the route configuration and prefix_rewrite: {nack}"
    );
    load.wait_for_more(100, STEP_TIMEOUT).await?;
    for _ in 0..20 {
        let reply = http.get(outbound, "svc-a", "/", &[]).await?;
        if reply.outcome() != "app-a" {
            bail!(
                "after the rejected route configuration svc-a answered {}; the previous routes \
                 must keep serving",
                reply.outcome()
            );
        }
    }
    let nacks = proxy
        .counter("remora_proxy_xds_nacks_total", &[("type", "RDS")])
        .await?;
    ensure!(
        nacks == 1.0,
        "remora_proxy_xds_nacks_total{{type=\"RDS\"}} is {nacks}"
    );
    proxy.check_running()?;

    let report = load.stop().await?;
    report.expect_no_failures()?;
    report.tally.only_from(&["app-a"])?;
    Ok(())
}
