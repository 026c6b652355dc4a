//! Transparent interception in a cluster on one machine
//! (`remora_tests::netns`): pods whose applications know nothing about the
//! sidecar. `remora-proxy init` redirects their TCP; the sidecars find
//! where each connection was going, detect what it speaks, and carry it
//! over mTLS. The control plane runs on the node (host) side. Needs root,
//! iptables and curl; fails (never skips) with what is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use remora_tests::TestDir;
use remora_tests::eventually;
use remora_tests::netns::{Cluster, Pod, run, run_stdout};
use remora_tests::process::Child;
use remora_tests::workspace::{control_plane_binary, proxy_binary, python};

/// The sidecars' user: `init` excludes its traffic from capture.
const PROXY_UID: u32 = 1337;
const WAIT: Duration = Duration::from_secs(20);

/// An HTTP/1.1 server (keep-alive) answering every request with a JSON
/// echo of what it got: method, path, headers, and its name.
const HTTP_ECHO: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
NAME = sys.argv[2]
class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"name": NAME, "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Echo).serve_forever()
"#;

/// The HTTP echo server over TLS: `port name cert.pem key.pem`.
const HTTPS_ECHO: &str = r#"
import json, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
NAME = sys.argv[2]
class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"name": NAME, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Echo)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[3], sys.argv[4])
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// A TCP echo server; and, with `greet`, one that speaks first (a banner,
/// as SMTP or MySQL servers do), then echoes.
const TCP_ECHO: &str = r#"
import socket, sys, threading
port, mode = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(64)
def serve(c):
    with c:
        if mode == "greet":
            c.sendall(b"220 banner\n")
        while True:
            data = c.recv(65536)
            if not data:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(data)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Connects to `host:port`, optionally reads a banner, sends a line,
/// half-closes, reads everything back; prints the connect-to-first-byte
/// time in ms (banner mode) and what came back.
const TCP_CLIENT: &str = r#"
import socket, sys, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start = time.monotonic()
c = socket.create_connection((host, port), timeout=10)
if mode == "greet":
    banner = c.recv(100)
    print("FIRST_BYTE_MS %.2f" % ((time.monotonic() - start) * 1000))
    print("BANNER " + banner.decode().strip())
c.sendall(b"hello through the mesh\n")
c.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = c.recv(65536)
    if not d:
        break
    got += d
print("ECHO " + got.decode().strip())
"#;

fn mesh(
    web: &Pod,
    db: &Pod,
    web_vip: &str,
    db_vip: &str,
    grpc_vip: &str,
    grpc_port: u16,
) -> String {
    format!(
        r#"
services:
  - name: web
    namespace: test
    vip: {web_vip}
    ports: [{{name: http, port: 80, protocol: http}}]
    endpoints:
      - {{address: {web}, port: 8080, identity: {{service_account: web}}}}
  - name: greeter
    namespace: test
    vip: {grpc_vip}
    ports: [{{name: grpc, port: 9090, protocol: grpc}}]
    endpoints:
      - {{address: {web}, port: {grpc_port}, identity: {{service_account: web}}}}
  - name: db
    namespace: test
    vip: {db_vip}
    ports:
      - {{name: echo, port: 9000, protocol: tcp}}
      - {{name: smtp, port: 25, protocol: tcp}}
      - {{name: redis, port: 6379, protocol: tcp}}
    endpoints:
      - address: {db}
        identity: {{service_account: db}}
        ports: {{echo: 9000, smtp: 25, redis: 6379}}
workload_tokens:
  - {{namespace: test, service_account: client, token: client-bootstrap-token-0123}}
  - {{namespace: test, service_account: web, token: web-bootstrap-token-0123}}
  - {{namespace: test, service_account: db, token: db-bootstrap-token-0123}}
"#,
        web = web.ip(),
        db = db.ip(),
    )
}

/// A file readable by the sidecars' user.
fn shared_file(dir: &TestDir, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.file(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

struct Sidecar {
    child: Child,
    pod: Pod,
    /// How it was started, to start it again.
    args: Vec<std::ffi::OsString>,
}

impl Sidecar {
    /// GET on the sidecar's admin port, from inside its pod.
    fn admin(&self, path: &str) -> Result<String> {
        run_stdout(self.pod.command("curl").args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:15020{path}"),
        ]))
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let text = self.admin("/metrics")?;
        let metrics = remora_tests::Metrics::parse(&text)?;
        Ok(metrics.value(name, labels).unwrap_or(0.0))
    }
}

/// Starts `pod`'s sidecar as [`PROXY_UID`] with fixed ports (the pod is a
/// namespace of its own) and installs the interception rules.
fn start_sidecar(
    dir: &TestDir,
    pod: &Pod,
    service: &str,
    token: &Path,
    bundle: &Path,
    control_plane: &str,
    exclude: &str,
) -> Result<Sidecar> {
    let mut cmd = pod.command_as(PROXY_UID, PROXY_UID, proxy_binary()?);
    cmd.args(["--service", service, "--namespace", "test"])
        .args(["--service-account", service])
        .args(["--node-id", pod.name()])
        .args(["--control-plane", control_plane])
        .arg("--ca-bundle")
        .arg(bundle)
        .arg("--token-file")
        .arg(token)
        .args(["--outbound-addr", "127.0.0.1:15001"])
        .args(["--inbound-addr", "0.0.0.0:15006"])
        .args(["--admin-addr", "127.0.0.1:15020"])
        .args(["--workers", "1", "--log", "info,remora_proxy=debug"]);
    let args = cmd.get_args().map(ToOwned::to_owned).collect();
    let child = Child::spawn(dir, &format!("sidecar-{}", pod.name()), &mut cmd)?;
    run(pod
        .command(proxy_binary()?)
        .args(["init", "--exclude-outbound-cidrs", exclude]))
    .with_context(|| format!("remora-proxy init in pod {}", pod.name()))?;
    Ok(Sidecar {
        child,
        pod: pod.clone(),
        args,
    })
}

impl Sidecar {
    /// Kills the sidecar (SIGKILL) and starts it again, as a restarted
    /// container would be; the iptables rules stay.
    fn restart(&mut self, dir: &TestDir) -> Result<()> {
        self.child.kill();
        let mut cmd = Command::new("ip");
        cmd.args(&self.args);
        self.child = Child::spawn(dir, &format!("sidecar-{}-again", self.pod.name()), &mut cmd)?;
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let child = &mut self.child;
        let pod = self.pod.clone();
        eventually(
            &format!("the {} sidecar is ready", pod.name()),
            WAIT,
            async || {
                child.check_running()?;
                let ready = run_stdout(pod.command("curl").args([
                    "-sS",
                    "--max-time",
                    "5",
                    "http://127.0.0.1:15020/ready",
                ]))?;
                ensure!(ready.trim() == "ready", "{ready}");
                Ok(())
            },
        )
        .await
    }
}

fn start(
    dir: &TestDir,
    pod: &Pod,
    what: &str,
    program: impl AsRef<std::ffi::OsStr>,
    args: &[&str],
) -> Result<Child> {
    let mut cmd = pod.command(program);
    cmd.args(args);
    Child::spawn(dir, &format!("{what}-{}", pod.name()), &mut cmd)
}

async fn wait_listening(pod: &Pod, port: u16) -> Result<()> {
    eventually(
        &format!("pod {} listens on {port}", pod.name()),
        WAIT,
        async || {
            ensure!(pod.is_listening(port)?, "not yet");
            Ok(())
        },
    )
    .await
}

fn curl(pod: &Pod, args: &[&str]) -> Result<String> {
    run_stdout(
        pod.command("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_clients_reach_services_through_intercepting_sidecars() {
    let dir = TestDir::new("transparent");
    dir.check(transparent(&dir).await);
}

async fn transparent(dir: &TestDir) -> Result<()> {
    for (tool, package) in [
        ("curl", "curl"),
        ("redis-server", "redis-server"),
        ("redis-cli", "redis-tools"),
    ] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is not installed (apt-get install {package}): the pods run it");
        }
    }
    let cluster = Cluster::new("tp")?;
    let client = cluster.pod("client")?;
    let web = cluster.pod("web")?;
    let db = cluster.pod("db")?;
    let outside = cluster.pod("outside")?;
    let web_vip = cluster.free_ip()?;
    let db_vip = cluster.free_ip()?;
    let grpc_vip = cluster.free_ip()?;
    client.add_hosts(&[
        ("web.test", web_vip),
        ("db.test", db_vip),
        ("greeter.test", grpc_vip),
        ("outside", outside.ip()),
    ])?;
    let gw = cluster.gateway();

    // A gRPC server in the web pod, on a port of its choosing.
    let grpc_log = dir.file("grpc-web.out");
    let mut grpc = web.command(python());
    grpc.arg(remora_tests::workspace::peer_script("grpc_peer.py"))
        .args(["serve", "--name", "greeter-web", "--host", "0.0.0.0"]);
    // It serves until its stdin closes: keep that open for the test.
    let mut grpc = Child::spawn_with_stdio(
        dir,
        "grpc-web",
        &mut grpc,
        &dir.file("grpc-web.log"),
        std::process::Stdio::piped(),
        Some(std::process::Stdio::from(std::fs::File::create(&grpc_log)?)),
    )?;
    let _grpc_stdin = grpc.inner_mut().stdin.take();
    let grpc_port: u16 = eventually("the gRPC server says its port", WAIT, async || {
        let out = std::fs::read_to_string(&grpc_log)?;
        out.lines()
            .find_map(|l| l.strip_prefix("PORT "))
            .context("no PORT line yet")?
            .trim()
            .parse::<u16>()
            .context("a port")
    })
    .await?;

    // The control plane on the node side, on fixed ports of its namespace.
    let mesh_path = shared_file(
        dir,
        "mesh.yaml",
        &mesh(
            &web,
            &db,
            &web_vip.to_string(),
            &db_vip.to_string(),
            &grpc_vip.to_string(),
            grpc_port,
        ),
    )?;
    let ca_dir = dir.file("ca");
    let mut cp = cluster.node_command(control_plane_binary()?);
    cp.arg("--config")
        .arg(&mesh_path)
        .args(["--xds-addr", &format!("{gw}:15010")])
        .args(["--tls-addr", &format!("{gw}:15012")])
        .args(["--monitoring-addr", &format!("{gw}:15014")])
        .arg("--ca-dir")
        .arg(&ca_dir);
    let mut cp = Child::spawn(dir, "control-plane", &mut cp)?;
    let root = ca_dir.join("root-cert.pem");
    let bundle = eventually("the control plane creates its root", WAIT, async || {
        cp.check_running()?;
        std::fs::read_to_string(&root).with_context(|| format!("reading {}", root.display()))
    })
    .await?;
    let bundle = shared_file(dir, "bundle.pem", &bundle)?;
    let control_plane = format!("{gw}:15012");
    let exclude = format!("{gw}/32");

    // Applications, then sidecars and rules.
    let _web_app = start(
        dir,
        &web,
        "app",
        python(),
        &["-c", HTTP_ECHO, "8080", "web"],
    )?;
    let _db_echo = start(
        dir,
        &db,
        "echo",
        python(),
        &["-c", TCP_ECHO, "9000", "echo"],
    )?;
    let _db_smtp = start(dir, &db, "smtp", python(), &["-c", TCP_ECHO, "25", "greet"])?;
    let _db_redis = start(
        dir,
        &db,
        "redis",
        "redis-server",
        &[
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )?;
    let tls_ca = remora_tests::mtls::TestCa::new_root("outside")?;
    let tls_cert = shared_file(dir, "outside-cert.pem", tls_ca.cert_pem())?;
    let tls_key = shared_file(dir, "outside-key.pem", tls_ca.key_pem())?;
    let _outside_tls = start(
        dir,
        &outside,
        "tls",
        python(),
        &[
            "-c",
            HTTPS_ECHO,
            "8443",
            "outside-tls",
            &tls_cert.to_string_lossy(),
            &tls_key.to_string_lossy(),
        ],
    )?;
    let _outside_app = start(
        dir,
        &outside,
        "app",
        python(),
        &["-c", HTTP_ECHO, "7000", "outside"],
    )?;
    wait_listening(&web, 8080).await?;
    wait_listening(&db, 9000).await?;
    wait_listening(&db, 25).await?;
    wait_listening(&db, 6379).await?;
    wait_listening(&outside, 7000).await?;
    wait_listening(&outside, 8443).await?;
    // Direct, before any rule: the baseline connection setup times.
    let direct = banner_ms(&client, &db.ip().to_string())?;
    let redis_direct = redis_ms(&client, &db.ip().to_string())?;

    let mut sidecars = Vec::new();
    for (pod, service, token) in [
        (&client, "client", "client-bootstrap-token-0123"),
        (&web, "web", "web-bootstrap-token-0123"),
        (&db, "db", "db-bootstrap-token-0123"),
    ] {
        let token = shared_file(dir, &format!("{service}.token"), token)?;
        sidecars.push(start_sidecar(
            dir,
            pod,
            service,
            &token,
            &bundle,
            &control_plane,
            &exclude,
        )?);
    }
    for sidecar in &mut sidecars {
        sidecar.wait_ready().await?;
    }
    let client_sidecar = &sidecars[0];
    let web_sidecar = &sidecars[1];
    let db_sidecar = &sidecars[2];

    // HTTP/1.1 by name, twice on one kept-alive connection: through both
    // sidecars over mTLS; the application sees the caller's identity.
    let out = eventually(
        "curl in the client pod reaches web.test",
        WAIT,
        async || curl(&client, &["http://web.test/one", "http://web.test/two"]),
    )
    .await?;
    let answers: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out)
        .into_iter()
        .collect::<Result<_, _>>()
        .with_context(|| format!("two JSON echoes: {out}"))?;
    ensure!(answers.len() == 2, "{out}");
    for (answer, path) in answers.iter().zip(["/one", "/two"]) {
        ensure!(
            answer["name"] == "web"
                && answer["path"] == path
                && answer["headers"]["x-remora-peer-identity"]
                    == "spiffe://cluster.local/ns/test/sa/client",
            "web's application saw {answer}"
        );
    }
    ensure!(
        web_sidecar.metric(
            "remora_proxy_tls_handshakes_total",
            &[("direction", "inbound")]
        )? >= 1.0,
        "the web sidecar counted no mTLS handshake"
    );
    ensure!(
        client_sidecar.metric(
            "remora_proxy_intercepted_connections_total",
            &[
                ("direction", "outbound"),
                ("service", "web.test"),
                ("protocol", "http1")
            ],
        )? >= 1.0,
        "the client sidecar did not count the intercepted HTTP/1 connection"
    );

    // HTTP/2 with prior knowledge from the client; the application still
    // gets HTTP/1.1.
    let out = curl(&client, &["--http2-prior-knowledge", "http://web.test/h2"])?;
    let answer: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    ensure!(answer["path"] == "/h2", "{answer}");
    ensure!(
        client_sidecar.metric(
            "remora_proxy_intercepted_connections_total",
            &[("service", "web.test"), ("protocol", "http2")],
        )? >= 1.0,
        "no intercepted HTTP/2 connection counted"
    );

    // Opaque TCP to a service VIP: over mTLS, echoed, counted per service.
    let out = tcp_client(&client, "db.test", 9000, "echo")?;
    ensure!(out.contains("ECHO hello through the mesh"), "{out}");
    ensure!(
        db_sidecar.metric(
            "remora_proxy_tcp_service_bytes_total",
            &[("direction", "inbound")]
        )? > 0.0,
        "the db sidecar counted no TCP bytes"
    );

    // A server-speaks-first port: no detection wait.
    let meshed = banner_ms(&client, "db.test")?;
    ensure!(
        meshed < direct + 50.0,
        "the banner took {meshed:.1} ms through the mesh, {direct:.1} ms direct"
    );

    // Redis, with its own client: no detection wait either.
    let redis = redis_ms(&client, "db.test")?;
    ensure!(
        redis < redis_direct + 50.0,
        "redis-cli took {redis:.1} ms through the mesh, {redis_direct:.1} ms direct"
    );
    let out = run_stdout(
        client
            .command("redis-cli")
            .args(["-h", "db.test", "SET", "mesh", "ok"]),
    )?;
    ensure!(out.trim() == "OK", "SET: {out}");
    let out = run_stdout(
        client
            .command("redis-cli")
            .args(["-h", "db.test", "GET", "mesh"]),
    )?;
    ensure!(out.trim() == "ok", "GET: {out}");

    // gRPC by name through both sidecars (names from the hosts file, as
    // libc resolves them: gRPC's own c-ares resolver does not read it).
    let out = run_stdout(
        client
            .command(python())
            .arg(remora_tests::workspace::peer_script("grpc_peer.py"))
            .args(["rpc", "--target", "greeter.test:9090", "--method", "who"])
            .env("GRPC_DNS_RESOLVER", "native"),
    )?;
    let rpc: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    ensure!(
        rpc["code"] == "OK" && rpc["replies"][0] == "greeter-web",
        "gRPC through the mesh: {rpc}"
    );
    ensure!(
        rpc["trailing_metadata"]["x-seen-x-remora-peer-identity"][0]
            == "spiffe://cluster.local/ns/test/sa/client",
        "the gRPC server did not see the caller's identity: {rpc}"
    );

    // Outside the mesh: passed through, labelled so.
    let out = curl(&client, &["http://outside:7000/"])?;
    ensure!(out.contains("\"outside\""), "{out}");
    ensure!(
        client_sidecar.metric(
            "remora_proxy_intercepted_connections_total",
            &[("service", "passthrough")],
        )? >= 1.0,
        "no passthrough counted"
    );

    // TLS from the application passes through untouched; its SNI is counted.
    let out = curl(&client, &["-k", "https://outside:8443/tls"])?;
    ensure!(out.contains("outside-tls"), "{out}");
    ensure!(
        client_sidecar.metric("remora_proxy_tls_passthrough_total", &[("sni", "outside")])? >= 1.0,
        "the SNI of the passed-through TLS was not counted"
    );

    // With the mesh closed to unknown destinations: refused and counted.
    let closed = format!(
        "outbound_traffic: REGISTRY_ONLY\n{}",
        std::fs::read_to_string(&mesh_path)?
    );
    let staged = dir.file("mesh.yaml.new");
    std::fs::write(&staged, closed)?;
    std::fs::rename(&staged, &mesh_path)?;
    eventually(
        "the client sidecar blocks destinations outside the mesh",
        WAIT,
        async || {
            let out = curl(&client, &["http://outside:7000/"]);
            ensure!(out.is_err(), "still passed through: {out:?}");
            ensure!(
                client_sidecar.metric(
                    "remora_proxy_intercepted_connections_total",
                    &[("service", "blocked")],
                )? >= 1.0,
                "no blocked connection counted"
            );
            Ok(())
        },
    )
    .await?;

    // A connection aimed at the proxy's own inbound port would loop.
    let looped = curl(&client, &[&format!("http://{}:15006/", client.ip())]);
    ensure!(
        looped.is_err(),
        "a connection to the sidecar's own port was served: {looped:?}"
    );
    ensure!(
        client_sidecar.metric(
            "remora_proxy_intercepted_connections_total",
            &[("service", "loop")],
        )? >= 1.0,
        "no loop counted"
    );

    // The web sidecar killed: its pod is unreachable (its rules stay);
    // restarted: reachable again as soon as it is ready.
    let web_sidecar = &mut sidecars[1];
    web_sidecar.restart(dir)?;
    web_sidecar.wait_ready().await?;
    let out = eventually(
        "web answers again after its sidecar restarted",
        WAIT,
        async || curl(&client, &["http://web.test/again"]),
    )
    .await?;
    ensure!(out.contains("/again"), "{out}");
    let client_sidecar = &sidecars[0];

    // Uninstall: the client pod reaches web directly, without its sidecar.
    let intercepted = |s: &Sidecar| s.metric("remora_proxy_intercepted_connections_total", &[]);
    let before = intercepted(client_sidecar)?;
    run(client
        .command(proxy_binary()?)
        .args(["init", "--uninstall"]))?;
    let out = curl(&client, &[&format!("http://{}:8080/direct", web.ip())]);
    // web's sidecar is still STRICT: plaintext from outside is refused.
    ensure!(out.is_err(), "plaintext reached a STRICT pod: {out:?}");
    // Its sidecar would block this one (REGISTRY_ONLY): it goes direct.
    let out = curl(&client, &[&format!("http://{}:7000/direct", outside.ip())])?;
    ensure!(out.contains("\"outside\""), "{out}");
    ensure!(
        intercepted(client_sidecar)? == before,
        "after uninstall the client's traffic still went through its sidecar"
    );
    Ok(())
}

/// Milliseconds for `redis-cli -h host PING` (the best of three runs, to
/// leave process start-up noise out).
fn redis_ms(pod: &Pod, host: &str) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let out = run_stdout(pod.command("redis-cli").args(["-h", host, "PING"]))?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        ensure!(out.trim() == "PONG", "redis-cli PING to {host}: {out}");
        best = best.min(ms);
    }
    Ok(best)
}

/// Milliseconds from connect to the banner of `host`'s port 25.
fn banner_ms(pod: &Pod, host: &str) -> Result<f64> {
    let out = tcp_client(pod, host, 25, "greet")?;
    ensure!(out.contains("BANNER 220 banner"), "{out}");
    let ms = out
        .lines()
        .find_map(|l| l.strip_prefix("FIRST_BYTE_MS "))
        .context("no timing")?;
    ms.trim().parse().with_context(|| format!("timing {ms:?}"))
}

fn tcp_client(pod: &Pod, host: &str, port: u16, mode: &str) -> Result<String> {
    let start = Instant::now();
    let out =
        run_stdout(
            pod.command(python())
                .args(["-c", TCP_CLIENT, host, &port.to_string(), mode]),
        )?;
    ensure!(
        start.elapsed() < WAIT,
        "the TCP client took {:?}",
        start.elapsed()
    );
    Ok(out)
}
