//! Certificates and roots change while traffic flows through `remora-proxy`
//! sidecars, and not one request fails:
//!
//! - short-lived workload certificates (`--leaf-ttl 20`) are renewed again
//!   and again under load, and new handshakes present the new ones;
//! - the control plane is away past the renewal point: sidecars count the
//!   failed renewals, keep their certificate and traffic, and renew as soon
//!   as it is back, before the old certificate expires;
//! - the root CA is replaced by the three steps of `docs/operations.md`
//!   (trust both, sign with the new one, drop the old one);
//! - the control plane's own serving certificate, which lives `--leaf-ttl`
//!   too, is renewed at half its lifetime.
//!
//! Each test runs one HTTP application (`web`) with a sidecar and the
//! topology's client sidecar, with paced load from the client through both.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use remora_tests::echo::EchoServer;
use remora_tests::eventually::{eventually, eventually_until};
use remora_tests::load::{Load, LoadSpec};
use remora_tests::mesh::MeshFile;
use remora_tests::mtls::{self, ClientCert, TestCa};
use remora_tests::topology::{App, CLIENT_IDENTITY, Topology};
use remora_tests::{ControlPlane, Proxy, TestDir};
use x509_parser::prelude::{FromDer, X509Certificate};

const MESH: &str = r#"
services:
  - name: web
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
"#;

const WEB: &str = "web.test:8080";
/// The SPIFFE ID `web`'s sidecar proves on its inbound port.
const WEB_ID: &str = "spiffe://cluster.local/ns/test/sa/web";

/// Requests the load must make progress by between two checks.
const PROGRESS: u64 = 200;
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);
/// A sidecar's xDS reconnect backoff is capped at 5 s, so a restarted
/// control plane is reached again within a few tries.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

// === Shared steps ===

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

/// `web` behind a sidecar, the client sidecar, and a control plane started
/// with `control_plane_args`.
async fn start(dir: &TestDir, control_plane_args: &[&str]) -> Result<(Topology, EchoServer)> {
    let web = EchoServer::start("web").await?;
    let topology = Topology::start_with_control_plane_args(
        dir,
        MeshFile::parse(MESH)?,
        vec![App::new("web", "web.test", web.addr())],
        &args(control_plane_args),
    )
    .await?;
    Ok((topology, web))
}

/// Starts the control plane again on the xDS and TLS addresses the killed
/// one had (so every sidecar reconnects to it), with `control_plane_args`.
/// The harness adds `--ca-dir <dir>/control-plane-ca` unless they name
/// `--ca-dir` or `--ca-cert`.
async fn start_again(
    dir: &TestDir,
    topology: &mut Topology,
    control_plane_args: &[&str],
) -> Result<()> {
    let xds = topology.control_plane().xds_addr();
    let tls = topology.control_plane().tls_addr()?;
    let mut all = args(&["--tls-addr", &tls.to_string()]);
    all.extend(args(control_plane_args));
    let mesh = topology.mesh_path().clone();
    let started = ControlPlane::start_with(dir, &mesh, &xds.to_string(), &all).await?;
    ensure!(
        started.tls_addr()? == tls && started.xds_addr() == xds,
        "the control plane came back on {} / {} instead of {tls} / {xds}",
        started.xds_addr(),
        started.tls_addr()?
    );
    let _dead = topology.set_control_plane(started);
    Ok(())
}

/// Kills the control plane and starts it again at once (see
/// [`start_again`]).
async fn restart(
    dir: &TestDir,
    topology: &mut Topology,
    control_plane_args: &[&str],
) -> Result<()> {
    topology.control_plane_mut().kill();
    start_again(dir, topology, control_plane_args).await
}

fn paced_load(topology: &Topology, workers: usize, pace: Duration) -> Load {
    Load::start(LoadSpec::new(topology.client().outbound_addr(), WEB, "/", workers).paced(pace))
}

/// `/config_dump`'s `identity` of a sidecar.
async fn identity(proxy: &Proxy) -> Result<serde_json::Value> {
    let dump = proxy.config_dump().await?;
    dump.get("identity")
        .filter(|v| !v.is_null())
        .cloned()
        .ok_or_else(|| anyhow!("proxy {}'s /config_dump has no identity", proxy.name()))
}

async fn trust_bundle_roots(proxy: &Proxy) -> Result<u64> {
    let id = identity(proxy).await?;
    id.get("trust_bundle_roots")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| {
            anyhow!(
                "proxy {}: identity without trust_bundle_roots: {id}",
                proxy.name()
            )
        })
}

async fn expires_at(proxy: &Proxy) -> Result<String> {
    let id = identity(proxy).await?;
    id.get("expires_at")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("proxy {}: identity without expires_at: {id}", proxy.name()))
}

/// `remora_proxy_certificate_renewals_total` (the first certificate
/// included).
async fn renewals(proxy: &Proxy) -> Result<f64> {
    proxy
        .counter("remora_proxy_certificate_renewals_total", &[])
        .await
}

/// `remora_proxy_certificate_renewal_failures_total`, every reason.
async fn renewal_failures(proxy: &Proxy) -> Result<f64> {
    proxy
        .counter("remora_proxy_certificate_renewal_failures_total", &[])
        .await
}

/// `remora_proxy_certificate_renewal_failures_total` by reason, for
/// messages.
async fn renewal_failure_reasons(proxy: &Proxy) -> Result<String> {
    let metrics = proxy.metrics().await?;
    let reasons: Vec<String> = metrics
        .samples()
        .iter()
        .filter(|s| s.name == "remora_proxy_certificate_renewal_failures_total")
        .map(|s| {
            let reason = s.labels.get("reason").map_or("?", String::as_str);
            format!("{reason}: {}", s.value)
        })
        .collect();
    Ok(format!("[{}]", reasons.join(", ")))
}

/// `remora_proxy_certificate_expiry_seconds`: seconds until the current
/// certificate expires.
async fn expiry_seconds(proxy: &Proxy) -> Result<f64> {
    proxy
        .metric_value("remora_proxy_certificate_expiry_seconds", &[])
        .await?
        .ok_or_else(|| {
            anyhow!(
                "proxy {} exposes no remora_proxy_certificate_expiry_seconds",
                proxy.name()
            )
        })
}

/// Fails if any sidecar counted a failed TLS handshake (either
/// direction), naming the sidecar and its samples.
async fn expect_no_handshake_failures(topology: &Topology, during: &str) -> Result<()> {
    for proxy in topology.proxies() {
        let metrics = proxy.metrics().await?;
        let failed = metrics
            .value("remora_proxy_tls_handshake_failures_total", &[])
            .unwrap_or(0.0);
        if failed != 0.0 {
            let samples: Vec<String> = metrics
                .samples()
                .iter()
                .filter(|s| s.name == "remora_proxy_tls_handshake_failures_total")
                .map(|s| format!("{s:?}"))
                .collect();
            bail!(
                "proxy {} counted {failed} failed TLS handshakes {during}: {samples:?}",
                proxy.name()
            );
        }
    }
    Ok(())
}

/// Waits until every sidecar's `/config_dump` shows `roots` roots in its
/// trust bundle.
async fn wait_trust_bundle_roots(topology: &Topology, roots: u64, step: &str) -> Result<()> {
    for proxy in topology.proxies() {
        eventually(
            &format!(
                "proxy {} trusts {roots} roots (/config_dump identity.trust_bundle_roots) {step}",
                proxy.name()
            ),
            RECONNECT_TIMEOUT,
            async || {
                let now = trust_bundle_roots(proxy).await?;
                ensure!(now == roots, "trust_bundle_roots is {now}");
                Ok(())
            },
        )
        .await?;
    }
    Ok(())
}

/// Certificates in the control plane's `/debug/trust-bundle`.
async fn control_plane_roots(topology: &Topology) -> Result<usize> {
    let pem = topology.control_plane().trust_bundle_pem().await?;
    Ok(pem.matches("-----BEGIN CERTIFICATE-----").count())
}

// === Certificates ===

/// What a test checks of a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Leaf {
    der: Vec<u8>,
    serial: String,
    not_before: i64,
    not_after: i64,
    /// The issuer's name, DER.
    issuer: Vec<u8>,
    issuer_text: String,
}

impl Leaf {
    fn parse(der: &[u8]) -> Result<Leaf> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| anyhow!("a presented certificate does not parse: {e}"))?;
        Ok(Leaf {
            der: der.to_vec(),
            serial: cert.tbs_certificate.raw_serial_as_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            issuer: cert.issuer().as_raw().to_vec(),
            issuer_text: cert.issuer().to_string(),
        })
    }
}

/// The subject name (DER) of a CA certificate given as PEM.
fn subject_of(cert_pem: &str) -> Result<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| anyhow!("a CA certificate PEM does not parse: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow!("a CA certificate does not parse: {e}"))?;
    Ok(cert.subject().as_raw().to_vec())
}

/// Handshakes with `web`'s sidecar as a peer sidecar would (client
/// certificate `client`, the server checked against `bundle_pem` and
/// [`WEB_ID`]) and returns the leaf it presented.
async fn web_leaf(topology: &Topology, client: ClientCert, bundle_pem: &str) -> Result<Leaf> {
    let addr = topology.sidecar("web")?.inbound_addr()?;
    let stream = mtls::handshake(
        addr,
        Some(client),
        bundle_pem,
        WEB_ID,
        &[&rustls::version::TLS13],
    )
    .await
    .with_context(|| format!("a TLS handshake with web's sidecar at {addr}"))?;
    let der = mtls::server_leaf(&stream).context("web's sidecar presented no certificate")?;
    Leaf::parse(&der)
}

fn write(path: PathBuf, text: &str) -> Result<PathBuf> {
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn arg(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

// === 1. Rotation under load ===

/// Leaf lifetime of the first test: renewed every 8 to 12 s.
const SHORT_TTL: &str = "20";
/// How long the first test's traffic runs: several lifetimes.
const ROTATION_TRAFFIC: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let dir = TestDir::new("mtls-rotation-under-load");
    dir.check(rotate_under_load(&dir).await);
}

async fn rotate_under_load(dir: &TestDir) -> Result<()> {
    let (topology, web) = start(dir, &["--leaf-ttl", SHORT_TTL]).await?;
    let root = TestCa::of_control_plane(dir)?;
    let mut renewals_before = Vec::new();
    for proxy in topology.proxies() {
        renewals_before.push(renewals(proxy).await?);
    }
    // 6 workers, one request each per 20 ms: up to 300 requests a second.
    let load = paced_load(&topology, 6, Duration::from_millis(20));
    let started = Instant::now();
    load.wait_for_more(PROGRESS, PROGRESS_TIMEOUT).await?;
    let first = web_leaf(
        &topology,
        root.valid_leaf(CLIENT_IDENTITY)?,
        root.cert_pem(),
    )
    .await?;

    // The traffic's duration, not a wait for some state: renewals happen
    // on their own schedule meanwhile.
    tokio::time::sleep_until((started + ROTATION_TRAFFIC).into()).await;
    load.wait_for_more(PROGRESS, PROGRESS_TIMEOUT).await?;
    let last = web_leaf(
        &topology,
        root.valid_leaf(CLIENT_IDENTITY)?,
        root.cert_pem(),
    )
    .await?;
    let report = load.stop().await?;
    report.expect_no_failures()?;
    let rate = report.sent as f64 / report.elapsed.as_secs_f64();
    ensure!(
        rate >= 100.0,
        "the load made only {rate:.0} requests a second ({} in {:?}); \
         the test wants a few hundred",
        report.sent,
        report.elapsed
    );
    ensure!(
        web.requests() >= report.ok,
        "web answered {} requests, the client got {} answers",
        web.requests(),
        report.ok
    );

    for (proxy, before) in topology.proxies().into_iter().zip(renewals_before) {
        let after = renewals(proxy).await?;
        ensure!(
            after - before >= 3.0,
            "proxy {} renewed its certificate {} times in {:?} with a {SHORT_TTL} s lifetime \
             (remora_proxy_certificate_renewals_total {before} -> {after}); expected at least 3",
            proxy.name(),
            after - before,
            started.elapsed()
        );
        let left = expiry_seconds(proxy).await?;
        ensure!(
            left > 0.0,
            "proxy {}'s certificate expired ({left} s) although it renews",
            proxy.name()
        );
    }
    ensure!(
        first.der != last.der && first.serial != last.serial,
        "web's sidecar presented the same certificate (serial {}) {:?} apart",
        first.serial,
        ROTATION_TRAFFIC
    );
    ensure!(
        last.not_before > first.not_before,
        "the later certificate (serial {}, notBefore {}) is not newer than the first \
         (serial {}, notBefore {})",
        last.serial,
        last.not_before,
        first.serial,
        first.not_before
    );
    ensure!(
        first.issuer == last.issuer,
        "the issuer changed without a root rotation: {} then {}",
        first.issuer_text,
        last.issuer_text
    );
    expect_no_handshake_failures(&topology, "while certificates rotated").await?;
    Ok(())
}

/// The control plane's identity on its TLS listener.
const CONTROL_PLANE_ID: &str = "spiffe://cluster.local/ns/remora-system/sa/remora-control-plane";

/// The control plane's own serving certificate also lives `--leaf-ttl`
/// and is documented as renewed at half its lifetime: with 20 s, a window
/// of 4 s sees at most one renewal (two certificates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_renews_its_own_certificate_at_half_life() {
    let dir = TestDir::new("mtls-rotation-control-plane-cert");
    dir.check(control_plane_half_life(&dir).await);
}

async fn control_plane_half_life(dir: &TestDir) -> Result<()> {
    let mesh = dir.file("mesh.yaml");
    MeshFile::parse(MESH)?.write(&mesh)?;
    let control_plane =
        ControlPlane::start_with(dir, &mesh, "127.0.0.1:0", &args(&["--leaf-ttl", SHORT_TTL]))
            .await?;
    let root = TestCa::of_control_plane(dir)?;
    let addr = control_plane.tls_addr()?;
    let mut seen: Vec<Leaf> = Vec::new();
    for i in 0..5 {
        if i > 0 {
            // Sampling what the listener presents over time, once a
            // second; not a wait for some state.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let stream = mtls::handshake(
            addr,
            None,
            root.cert_pem(),
            CONTROL_PLANE_ID,
            &[&rustls::version::TLS13],
        )
        .await
        .with_context(|| format!("a TLS handshake with the control plane at {addr}"))?;
        let der =
            mtls::server_leaf(&stream).context("the control plane presented no certificate")?;
        seen.push(Leaf::parse(&der)?);
    }
    let mut serials: Vec<&str> = seen.iter().map(|l| l.serial.as_str()).collect();
    serials.dedup();
    ensure!(
        serials.len() <= 2,
        "in 4 s the control plane's TLS listener presented {} different certificates, \
         although with --leaf-ttl {SHORT_TTL} it should renew its own every {} s \
         (half-life); (serial, notBefore, notAfter, seconds left) seen: {:?}",
        serials.len(),
        SHORT_TTL.parse::<u64>()? / 2,
        seen.iter()
            .map(|l| (
                l.serial.clone(),
                l.not_before,
                l.not_after,
                l.not_after - time::OffsetDateTime::now_utc().unix_timestamp()
            ))
            .collect::<Vec<_>>()
    );
    Ok(())
}

// === 2. The control plane away ===

/// Leaf lifetime of the second test. Renewal is due at 40–60% of it, and
/// the test restarts the control plane once every sidecar's renewal point
/// has passed; a sidecar that has been failing since the earliest point
/// may then sleep nearly as long again in its backoff before it tries.
/// 60 s leaves that worst case over 10 s short of expiry (40 s would
/// leave a few seconds).
const AWAY_TTL: u64 = 60;
/// The restart must leave at least this long before the first expiry.
const AWAY_MARGIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_the_control_plane_being_away_and_renewal_resumes() {
    let dir = TestDir::new("mtls-rotation-control-plane-away");
    dir.check(control_plane_away(&dir).await);
}

/// A sidecar's certificate state when the control plane was killed.
struct Before {
    renewals: f64,
    failures: f64,
    expires_at: String,
    expires: Instant,
}

async fn control_plane_away(dir: &TestDir) -> Result<()> {
    let ttl = AWAY_TTL.to_string();
    let (mut topology, _web) = start(dir, &["--leaf-ttl", &ttl]).await?;
    let load = paced_load(&topology, 2, Duration::from_millis(20));
    load.wait_for_more(PROGRESS, PROGRESS_TIMEOUT).await?;

    topology.control_plane_mut().kill();
    let mut before = Vec::new();
    for proxy in topology.proxies() {
        let left = expiry_seconds(proxy).await?;
        before.push(Before {
            renewals: renewals(proxy).await?,
            failures: renewal_failures(proxy).await?,
            expires_at: expires_at(proxy).await?,
            expires: Instant::now() + Duration::from_secs_f64(left.max(0.0)),
        });
    }

    // Away past every sidecar's renewal point (at most 60% of the
    // lifetime): each counts failed renewals and keeps its certificate.
    for (proxy, b) in topology.proxies().into_iter().zip(&before) {
        eventually(
            &format!(
                "proxy {} counts a failed renewal while the control plane is away",
                proxy.name()
            ),
            Duration::from_secs(AWAY_TTL),
            async || {
                let failures = renewal_failures(proxy).await?;
                ensure!(
                    failures > b.failures,
                    "remora_proxy_certificate_renewal_failures_total is still {failures}"
                );
                Ok(())
            },
        )
        .await?;
    }
    load.wait_for_more(PROGRESS, PROGRESS_TIMEOUT).await?;
    for (proxy, b) in topology.proxies().into_iter().zip(&before) {
        let now_expires = expires_at(proxy).await?;
        ensure!(
            now_expires == b.expires_at,
            "proxy {}'s certificate changed (expires {} -> {now_expires}) \
             with no control plane",
            proxy.name(),
            b.expires_at
        );
        let renewed = renewals(proxy).await?;
        ensure!(
            renewed == b.renewals,
            "proxy {} counted a renewal ({} -> {renewed}) with no control plane",
            proxy.name(),
            b.renewals
        );
        let left = expiry_seconds(proxy).await?;
        ensure!(
            left > 0.0,
            "proxy {}'s certificate expired ({left} s) while the control plane was away",
            proxy.name()
        );
    }
    let first_expiry = before
        .iter()
        .map(|b| b.expires)
        .min()
        .context("no sidecar")?;
    ensure!(
        Instant::now() + AWAY_MARGIN < first_expiry,
        "the test's timing: every renewal point has passed but a certificate expires in {:?}, \
         less than the {AWAY_MARGIN:?} the restart needs",
        first_expiry.saturating_duration_since(Instant::now())
    );

    // Back on the same addresses and CA directory (the same root).
    start_again(dir, &mut topology, &["--leaf-ttl", &ttl]).await?;
    for (proxy, b) in topology.proxies().into_iter().zip(&before) {
        eventually_until(
            &format!(
                "proxy {} renews from the restarted control plane before its certificate \
                 (expires_at {}) expires",
                proxy.name(),
                b.expires_at
            ),
            b.expires,
            Duration::from_millis(100),
            async || {
                let renewed = renewals(proxy).await?;
                ensure!(
                    renewed > b.renewals,
                    "remora_proxy_certificate_renewals_total is still {renewed}; \
                     renewal failures by reason: {}",
                    renewal_failure_reasons(proxy).await?
                );
                Ok(())
            },
        )
        .await?;
        let now_expires = expires_at(proxy).await?;
        ensure!(
            now_expires != b.expires_at,
            "proxy {} counted a renewal but /config_dump still shows the certificate \
             expiring at {now_expires}",
            proxy.name()
        );
    }
    load.wait_for_more(PROGRESS, PROGRESS_TIMEOUT).await?;
    let report = load.stop().await?;
    report.expect_no_failures()?;
    expect_no_handshake_failures(&topology, "while the control plane was away").await?;
    Ok(())
}

// === 3. Root rotation ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_by_the_documented_procedure_without_a_failed_request() {
    let dir = TestDir::new("mtls-rotation-root");
    dir.check(rotate_root(&dir).await);
}

/// Follows "Rotating the mesh's root CA without downtime" in
/// `docs/operations.md`, step by step.
async fn rotate_root(dir: &TestDir) -> Result<()> {
    // (0) The mesh runs on the embedded root A (`--ca-dir`).
    let (mut topology, _web) = start(dir, &["--leaf-ttl", SHORT_TTL]).await?;
    let ca_dir = dir.file("control-plane-ca");
    let a = TestCa::of_control_plane(dir)?;
    let a_cert = ca_dir.join("root-cert.pem");
    ensure!(
        control_plane_roots(&topology).await? == 1,
        "before the rotation the trust bundle should hold root A only"
    );
    let load = paced_load(&topology, 2, Duration::from_millis(20));
    load.wait_for_more(PROGRESS, PROGRESS_TIMEOUT).await?;

    // (1) Make root B and trust it next to A; A still signs.
    let b = TestCa::new_root("Remora root B")?;
    let b_cert = write(dir.file("root-b.pem"), b.cert_pem())?;
    let b_key = write(dir.file("root-b-key.pem"), b.key_pem())?;
    restart(
        dir,
        &mut topology,
        &[
            "--ca-dir",
            arg(&ca_dir)?,
            "--ca-extra-roots",
            arg(&b_cert)?,
            "--leaf-ttl",
            SHORT_TTL,
        ],
    )
    .await?;
    let roots = control_plane_roots(&topology).await?;
    ensure!(
        roots == 2,
        "step 1: /debug/trust-bundle holds {roots} roots"
    );
    wait_trust_bundle_roots(&topology, 2, "after step 1 (A signs, A and B trusted)").await?;
    load.wait_for_more(PROGRESS, PROGRESS_TIMEOUT).await?;

    // (2) B signs; A stays trusted for the certificates it signed.
    topology.control_plane_mut().kill();
    let mut renewals_before = Vec::new();
    for proxy in topology.proxies() {
        renewals_before.push(renewals(proxy).await?);
    }
    start_again(
        dir,
        &mut topology,
        &[
            "--ca-cert",
            arg(&b_cert)?,
            "--ca-key",
            arg(&b_key)?,
            "--ca-extra-roots",
            arg(&a_cert)?,
            "--leaf-ttl",
            SHORT_TTL,
        ],
    )
    .await?;
    let roots = control_plane_roots(&topology).await?;
    ensure!(
        roots == 2,
        "step 2: /debug/trust-bundle holds {roots} roots"
    );
    for (proxy, before) in topology.proxies().into_iter().zip(renewals_before) {
        eventually(
            &format!(
                "proxy {} renews its certificate from the control plane signing with root B",
                proxy.name()
            ),
            RECONNECT_TIMEOUT,
            async || {
                let now = renewals(proxy).await?;
                ensure!(
                    now > before,
                    "remora_proxy_certificate_renewals_total is still {now}; \
                     renewal failures by reason: {}; see its log",
                    renewal_failure_reasons(proxy).await?
                );
                Ok(())
            },
        )
        .await?;
    }
    // Checked against B alone: web's certificate chains to B.
    let leaf = web_leaf(&topology, a.valid_leaf(CLIENT_IDENTITY)?, b.cert_pem()).await?;
    ensure!(
        leaf.issuer == subject_of(b.cert_pem())?,
        "step 2: web's certificate is issued by {}, not root B",
        leaf.issuer_text
    );
    wait_trust_bundle_roots(&topology, 2, "in step 2 (B signs, A and B trusted)").await?;
    load.wait_for_more(PROGRESS, PROGRESS_TIMEOUT).await?;

    // (3) Every certificate chains to B: drop A.
    restart(
        dir,
        &mut topology,
        &[
            "--ca-cert",
            arg(&b_cert)?,
            "--ca-key",
            arg(&b_key)?,
            "--leaf-ttl",
            SHORT_TTL,
        ],
    )
    .await?;
    let roots = control_plane_roots(&topology).await?;
    ensure!(
        roots == 1,
        "step 3: /debug/trust-bundle holds {roots} roots"
    );
    wait_trust_bundle_roots(&topology, 1, "after step 3 (B alone)").await?;
    load.wait_for_more(PROGRESS, PROGRESS_TIMEOUT).await?;
    let report = load.stop().await?;
    report.expect_no_failures()?;
    expect_no_handshake_failures(&topology, "during the root rotation").await?;

    // Afterwards new handshakes verify against B only: with a B client
    // certificate and B as the only root it works; A's certificates are
    // refused, and the sidecar does not present one that chains to A.
    let leaf = web_leaf(&topology, b.valid_leaf(CLIENT_IDENTITY)?, b.cert_pem()).await?;
    ensure!(
        leaf.issuer == subject_of(b.cert_pem())?,
        "after the rotation web's certificate is issued by {}, not root B",
        leaf.issuer_text
    );
    let web = topology.sidecar("web")?;
    let unknown_ca = [("direction", "inbound"), ("reason", "unknown_ca")];
    let refused_before = web
        .counter("remora_proxy_tls_handshake_failures_total", &unknown_ca)
        .await?;
    if let Ok(leaf) = web_leaf(&topology, a.valid_leaf(CLIENT_IDENTITY)?, b.cert_pem()).await {
        bail!(
            "web's sidecar still accepts a client certificate from root A after step 3 \
             (it answered with serial {})",
            leaf.serial
        );
    }
    eventually(
        "web's sidecar counts the root-A client certificate as unknown_ca",
        Duration::from_secs(5),
        async || {
            let now = web
                .counter("remora_proxy_tls_handshake_failures_total", &unknown_ca)
                .await?;
            ensure!(
                now > refused_before,
                "remora_proxy_tls_handshake_failures_total{{direction=\"inbound\",\
                 reason=\"unknown_ca\"}} is still {now}"
            );
            Ok(())
        },
    )
    .await?;
    if let Ok(leaf) = web_leaf(&topology, b.valid_leaf(CLIENT_IDENTITY)?, a.cert_pem()).await {
        bail!(
            "web's certificate (serial {}, issuer {}) verifies against root A after step 3",
            leaf.serial,
            leaf.issuer_text
        );
    }
    Ok(())
}
