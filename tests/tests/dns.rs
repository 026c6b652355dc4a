//! A service outside the mesh, declared by hostname, reached through a
//! client sidecar that resolves it with a real DNS server (dnsmasq from
//! Debian, on 127.0.0.1 and an ephemeral port, answering from a hosts file
//! the test rewrites and reloads with SIGHUP; TTL 2 s).
//!
//! DNS gives only addresses, so the instances are test servers on other
//! loopback addresses with one port: 127.0.0.2 and 127.0.0.3 answer,
//! nothing listens on 127.0.0.4, and 127.0.0.5 accepts but never answers.
//!
//! In order: 503 `no_endpoint` before the first answer; the answer
//! followed, by every name of the service (hostname included); a changed
//! answer followed within TTL + 1 s; a dead address in the answer hidden
//! by the route's retry; a hanging one cut by the route's timeout; dnsmasq
//! stopped: traffic keeps going to the last answer and failures are
//! counted.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use http::StatusCode;
use remora_tests::TestDir;
use remora_tests::client::HttpClient;
use remora_tests::control_plane::ControlPlane;
use remora_tests::eventually::{eventually, eventually_until};
use remora_tests::metrics::Metrics;
use remora_tests::process::Child;
use remora_tests::upstream::HttpServer;
use remora_tests::workspace;
use serde::Deserialize;
use tokio::net::TcpListener;

const HOST: &str = "api.example.test";
/// The TTL dnsmasq gives its answers.
const TTL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_service_follows_its_dns_answers() {
    let dir = TestDir::new("dns");
    dir.check(run(&dir).await);
}

async fn run(dir: &TestDir) -> Result<()> {
    // The instances: one port, several loopback addresses.
    let first = HttpServer::start_on("first", ([127, 0, 0, 2], 0).into()).await?;
    let port = first.port();
    let second = HttpServer::start_on("second", ([127, 0, 0, 3], port).into()).await?;
    let hanging = TcpListener::bind(("127.0.0.5", port))
        .await
        .with_context(|| format!("binding 127.0.0.5:{port}"))?;
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hanging.accept().await {
            held.push(stream);
        }
    });

    let mut dns = Dnsmasq::start(dir)?;
    let mesh = dir.file("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "services:
  - name: api
    namespace: ext
    hostname: {HOST}
    ports: [{{name: http, port: 8080, protocol: http, target_port: {port}}}]
    routes:
      - name: all
        backends: [{{service: api}}]
        timeout: 1s
        retry: {{on: [connect-failure], attempts: 2}}
"
        ),
    )?;
    let control_plane = ControlPlane::start(dir, &mesh).await?;
    let mut proxy = ClientProxy::start(dir, control_plane.xds_addr(), dns.addr).await?;
    proxy.wait_ready().await?;

    // Before any answer: 503 no_endpoint.
    let reply = proxy.get(HOST).await?;
    ensure!(
        reply.status == StatusCode::SERVICE_UNAVAILABLE
            && reply
                .headers
                .get("x-remora-error")
                .is_some_and(|v| v == "no_endpoint"),
        "before the first answer: {}",
        reply.outcome()
    );

    dns.answer(&["127.0.0.2"])?;
    eventually(
        "the first answer is followed",
        Duration::from_secs(15),
        async || proxy.expect_backend(HOST, "first").await,
    )
    .await?;
    for authority in [
        "api.example.test:8080",
        "api.ext",
        "api.ext:8080",
        "api.ext.svc.cluster.local:8080",
    ] {
        proxy.expect_backend(authority, "first").await?;
    }
    ensure!(
        proxy.counter("remora_proxy_dns_resolutions_total").await? >= 1.0,
        "resolutions are counted"
    );

    // A changed answer is followed within TTL + 1 s of the change.
    dns.answer(&["127.0.0.3"])?;
    let changed = Instant::now();
    eventually_until(
        "the changed answer is followed within TTL + 1 s",
        changed + TTL + Duration::from_secs(1),
        Duration::from_millis(50),
        async || proxy.expect_backend(HOST, "second").await,
    )
    .await?;
    let followed = changed.elapsed();
    for _ in 0..10 {
        proxy.expect_backend(HOST, "second").await?;
    }

    // A dead address in the answer: the route's retry on connect-failure
    // hides it.
    let retries_before = proxy.counter("remora_proxy_retries_total").await?;
    dns.answer(&["127.0.0.3", "127.0.0.4"])?;
    eventually(
        "both addresses are members",
        Duration::from_secs(5),
        async || {
            let members = proxy.dns_addresses().await?;
            ensure!(members.len() == 2, "members {members:?}");
            Ok(())
        },
    )
    .await?;
    for _ in 0..10 {
        proxy.expect_backend(HOST, "second").await?;
    }
    let retries = proxy.counter("remora_proxy_retries_total").await? - retries_before;
    ensure!(
        retries >= 1.0,
        "retries to 127.0.0.4 were counted: {retries}"
    );

    // A hanging instance: the route's 1 s timeout answers 504.
    dns.answer(&["127.0.0.5"])?;
    eventually(
        "the hanging address is the only member",
        Duration::from_secs(5),
        async || {
            let members = proxy.dns_addresses().await?;
            ensure!(
                members == [format!("127.0.0.5:{port}")],
                "members {members:?}"
            );
            Ok(())
        },
    )
    .await?;
    let started = Instant::now();
    let reply = proxy.get(HOST).await?;
    ensure!(
        reply.status == StatusCode::GATEWAY_TIMEOUT
            && reply
                .headers
                .get("x-remora-error")
                .is_some_and(|v| v == "route_timeout"),
        "a hanging instance: {}",
        reply.outcome()
    );
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "the route timeout (1 s) cut it: {:?}",
        started.elapsed()
    );

    // The DNS server goes away: the last answer stays and failures count.
    dns.answer(&["127.0.0.3"])?;
    eventually(
        "back to the second server",
        Duration::from_secs(5),
        async || proxy.expect_backend(HOST, "second").await,
    )
    .await?;
    let failures_before = proxy.counter("remora_proxy_dns_failures_total").await?;
    dns.stop();
    eventually(
        "failed resolutions are counted",
        Duration::from_secs(20),
        async || {
            let failures = proxy.counter("remora_proxy_dns_failures_total").await?;
            ensure!(failures > failures_before, "failures {failures}");
            Ok(())
        },
    )
    .await?;
    for _ in 0..10 {
        proxy.expect_backend(HOST, "second").await?;
    }
    ensure!(first.requests() > 0 && second.requests() > 0);
    eprintln!("dns: a changed answer was followed in {followed:?} (TTL {TTL:?})");
    proxy.child.check_running()?;
    Ok(())
}

// === dnsmasq ===

struct Dnsmasq {
    child: Child,
    hosts: PathBuf,
    addr: SocketAddr,
}

impl Dnsmasq {
    /// dnsmasq on 127.0.0.1 and a free port, answering only from its
    /// hosts file (empty at first), with a TTL of [`TTL`].
    fn start(dir: &TestDir) -> Result<Dnsmasq> {
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .context(
                "dnsmasq is not installed: `apt-get install dnsmasq-base` (or dnsmasq); .ci/run does it",
            )?;
        // Free a port the kernel chose; dnsmasq binds it right after.
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .context("finding a free UDP port on 127.0.0.1")?
            .port();
        let hosts = dir.file("dns-hosts");
        std::fs::write(&hosts, "")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--keep-in-foreground")
            .arg("--conf-file=/dev/null")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg("--no-negcache")
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg("--listen-address=127.0.0.1")
            .arg("--bind-interfaces")
            .arg(format!("--port={port}"))
            .arg(format!("--local-ttl={}", TTL.as_secs()))
            .arg(format!("--pid-file={}", dir.file("dnsmasq.pid").display()))
            .arg("--log-queries")
            .arg("--log-facility=-");
        if is_root() {
            // Keep root so the hosts file in the test directory stays
            // readable after a reload.
            cmd.arg("--user=root");
        }
        let child = Child::spawn(dir, "dnsmasq", &mut cmd)?;
        Ok(Dnsmasq {
            child,
            hosts,
            addr: ([127, 0, 0, 1], port).into(),
        })
    }

    /// Answers [`HOST`] with `ips` from now on.
    fn answer(&mut self, ips: &[&str]) -> Result<()> {
        self.child.check_running()?;
        let text: String = ips.iter().map(|ip| format!("{ip} {HOST}\n")).collect();
        std::fs::write(&self.hosts, text)?;
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .context("sending SIGHUP to dnsmasq")?;
        ensure!(status.success(), "kill -HUP dnsmasq: {status}");
        Ok(())
    }

    fn stop(&mut self) {
        self.child.stop();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

// === The client sidecar ===

/// A client-only `remora-proxy` with `--dns-server`, on plaintext xDS (the
/// external service is outside the mesh: no identity is needed to reach
/// it).
struct ClientProxy {
    child: Child,
    outbound: SocketAddr,
    admin: SocketAddr,
    client: HttpClient,
}

#[derive(Deserialize)]
struct Addresses {
    outbound: SocketAddr,
    admin: SocketAddr,
}

impl ClientProxy {
    async fn start(dir: &TestDir, xds: SocketAddr, dns: SocketAddr) -> Result<ClientProxy> {
        let address_file = dir.file("proxy-addresses.json");
        let mut cmd = Command::new(workspace::proxy_binary()?);
        cmd.args(["--service", "client", "--namespace", "ext"])
            .args(["--outbound-addr", "127.0.0.1:0"])
            .args(["--inbound-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--workers", "2", "--log", "info,remora_proxy=debug"])
            .args(["--control-plane", &xds.to_string()])
            .args(["--dns-server", &dns.to_string()])
            .arg("--address-file")
            .arg(&address_file);
        for var in [
            "REMORA_NODE_ID",
            "REMORA_CA_BUNDLE",
            "REMORA_TOKEN_FILE",
            "REMORA_LOG",
        ] {
            cmd.env_remove(var);
        }
        let mut child = Child::spawn(dir, "proxy-client", &mut cmd)?;
        let addrs: Addresses = eventually(
            "remora-proxy writes its address file",
            Duration::from_secs(10),
            async || {
                child.check_running()?;
                let text = std::fs::read_to_string(&address_file)?;
                Ok(serde_json::from_str(&text)?)
            },
        )
        .await?;
        Ok(ClientProxy {
            child,
            outbound: addrs.outbound,
            admin: addrs.admin,
            client: HttpClient::new(),
        })
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let (admin, client) = (self.admin, &self.client);
        let child = &mut self.child;
        eventually(
            "the client sidecar is ready",
            Duration::from_secs(15),
            async || {
                child.check_running()?;
                let (status, body) = client.admin_get_status(admin, "/ready").await?;
                ensure!(status == StatusCode::OK, "/ready: {status} {body}");
                Ok(())
            },
        )
        .await
    }

    async fn get(&self, authority: &str) -> Result<remora_tests::client::Reply> {
        self.client.get(self.outbound, authority, "/", &[]).await
    }

    async fn expect_backend(&self, authority: &str, backend: &str) -> Result<()> {
        let reply = self.get(authority).await?;
        if reply.backend.as_deref() != Some(backend) || reply.status != StatusCode::OK {
            bail!("{authority}: expected {backend}, got {}", reply.outcome());
        }
        Ok(())
    }

    /// The sum of a counter's samples for [`HOST`] (DNS metrics) or all
    /// samples (others); 0 when absent.
    async fn counter(&self, name: &str) -> Result<f64> {
        let text = self.client.admin_get(self.admin, "/metrics").await?;
        let metrics = Metrics::parse(&text)?;
        let labels: &[(&str, &str)] = if name.contains("_dns_") {
            &[("host", HOST)]
        } else {
            &[]
        };
        Ok(metrics.value(name, labels).unwrap_or(0.0))
    }

    /// The current addresses of the external service's DNS cluster, from
    /// `/config_dump`.
    async fn dns_addresses(&self) -> Result<Vec<String>> {
        let text = self.client.admin_get(self.admin, "/config_dump").await?;
        let dump: serde_json::Value = serde_json::from_str(&text)?;
        let cluster = dump
            .pointer("/config/clusters/outbound|8080||api.ext.svc.cluster.local")
            .or_else(|| dump.pointer("/clusters/outbound|8080||api.ext.svc.cluster.local"))
            .with_context(|| format!("no DNS cluster in /config_dump: {text}"))?;
        let addresses = cluster
            .pointer("/dns/addresses")
            .and_then(|a| a.as_array())
            .with_context(|| format!("no dns.addresses in {cluster}"))?;
        Ok(addresses
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect())
    }
}
