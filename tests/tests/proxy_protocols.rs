//! HTTP/1.1, HTTP/2 and gRPC through a pair of `remora-proxy` sidecars:
//! each application sees exactly the protocol it speaks whatever its caller
//! spoke; methods, paths, end-to-end headers and bodies (streamed ones too)
//! arrive as sent; hop-by-hop headers and a caller's `x-remora-*` headers
//! do not; trailers and gRPC statuses come back intact.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use remora_tests::TestDir;
use remora_tests::app_client::{AppClient, full};
use remora_tests::echo::{
    EARLY_HEADER, EchoServer, Echoed, RESPONSE_HEADER, TRAILER, TRAILERS_HEADER,
};
use remora_tests::grpc::{GrpcServer, Method as Rpcm, Rpc};
use remora_tests::mesh::MeshFile;
use remora_tests::pattern::PatternBody;
use remora_tests::proxy::AppProtocol;
use remora_tests::topology::{App, CLIENT_IDENTITY, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Three services: an HTTP/1.1 application, an h2c one and a gRPC one.
const MESH: &str = r#"
services:
  - name: web
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
  - name: h2app
    namespace: test
    ports: [{name: http2, port: 8081, protocol: http2}]
  - name: greeter
    namespace: test
    ports: [{name: grpc, port: 9090, protocol: grpc}]
  - name: h2quiet
    namespace: test
    ports: [{name: http2, port: 8082, protocol: http2}]
"#;

const WEB: &str = "web.test:8080";
const H2APP: &str = "h2app.test.svc.cluster.local:8081";
const GREETER: &str = "greeter.test:9090";
/// An h2c application whose sidecar was not told so (no `--app-protocol`):
/// it learns the protocol from the calling sidecar.
const H2QUIET: &str = "h2quiet.test:8082";

async fn http_topology(dir: &TestDir) -> Result<(Topology, EchoServer, EchoServer, EchoServer)> {
    let web = EchoServer::start("web").await?;
    let h2app = EchoServer::start("h2app").await?;
    let h2quiet = EchoServer::start("h2quiet").await?;
    let mut mesh = MeshFile::parse(MESH)?;
    remora_tests::topology::keep_services(&mut mesh, &["web.test", "h2app.test", "h2quiet.test"])?;
    let topology = Topology::start(
        dir,
        mesh,
        vec![
            App::new("web", "web.test", web.addr()),
            App::new("h2app", "h2app.test", h2app.addr()).protocol(AppProtocol::Http2),
            App::new("h2quiet", "h2quiet.test", h2quiet.addr())
                .protocol(AppProtocol::Http2)
                .without_protocol_flag(),
        ],
    )
    .await?;
    Ok((topology, web, h2app, h2quiet))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_application_sees_its_own_protocol_whatever_the_caller_speaks() {
    let dir = TestDir::new("proxy-protocols");
    dir.check(own_protocol(&dir).await);
}

async fn own_protocol(dir: &TestDir) -> Result<()> {
    let (topology, web, h2app, h2quiet) = http_topology(dir).await?;
    let outbound = topology.client().outbound_addr();
    for caller in [AppProtocol::Http1, AppProtocol::Http2] {
        let client = AppClient::new(outbound, caller);
        for (authority, expected) in [(WEB, "HTTP/1.1"), (H2APP, "HTTP/2"), (H2QUIET, "HTTP/2")] {
            let reply = client.get(authority, "/who", &[]).await?;
            let echoed = reply
                .echoed()
                .with_context(|| format!("{caller:?} caller to {authority}"))?;
            ensure!(
                echoed.version == expected,
                "a {caller:?} caller reached {authority}'s application over {}, expected \
                 {expected}: {echoed:?}",
                echoed.version
            );
            ensure!(
                echoed.authority.as_deref() == Some(authority),
                "the application saw authority {:?}, the caller used {authority}",
                echoed.authority
            );
        }
    }
    ensure!(
        web.versions() == (2, 0),
        "the HTTP/1.1 application saw (HTTP/1.1, HTTP/2) requests {:?}",
        web.versions()
    );
    ensure!(
        h2app.versions() == (0, 2),
        "the h2c application saw (HTTP/1.1, HTTP/2) requests {:?}",
        h2app.versions()
    );
    ensure!(
        h2quiet.versions() == (0, 2),
        "the h2c application whose sidecar has no --app-protocol saw (HTTP/1.1, HTTP/2) \
         requests {:?}: the calling sidecar names the protocol",
        h2quiet.versions()
    );

    // Trailers from an h2c application reach an h2c caller.
    let client = AppClient::new(outbound, AppProtocol::Http2);
    let reply = client
        .get(H2APP, "/trailers", &[(TRAILERS_HEADER, "1")])
        .await?;
    ensure!(reply.status == StatusCode::OK, "{}", reply.describe());
    let trailer = reply
        .trailers
        .as_ref()
        .and_then(|t| t.get(TRAILER))
        .and_then(|v| v.to_str().ok());
    ensure!(
        trailer == Some("done"),
        "the trailer {TRAILER}: done did not arrive: trailers {:?}, {}",
        reply.trailers,
        reply.describe()
    );
    Ok(())
}

/// Concurrent requests in each burst (HTTP/2 streams on one connection
/// from the caller, so HTTP/1.1 connections to the application).
const BURST: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connections_to_the_application_are_kept_for_the_next_burst() {
    let dir = TestDir::new("proxy-app-connections");
    dir.check(app_connections(&dir).await);
}

/// Three bursts of [`BURST`] concurrent requests to an HTTP/1.1
/// application: the first opens a connection per request, the next two
/// reuse them instead of opening and closing connections per request.
async fn app_connections(dir: &TestDir) -> Result<()> {
    let (topology, web, _h2app, _h2quiet) = http_topology(dir).await?;
    // Long enough that every request of a burst is in flight at once.
    web.set_delay(Duration::from_millis(200));
    let client = AppClient::new(topology.client().outbound_addr(), AppProtocol::Http2);
    for burst in 1..=3 {
        let replies =
            futures::future::join_all((0..BURST).map(|_| client.get(WEB, "/burst", &[]))).await;
        for reply in replies {
            let reply = reply.with_context(|| format!("burst {burst}"))?;
            ensure!(
                reply.status == StatusCode::OK,
                "burst {burst}: {}",
                reply.describe()
            );
        }
        let opened = web.connections();
        println!("after burst {burst}: the application accepted {opened} connections");
        ensure!(
            opened >= BURST as u64,
            "{BURST} concurrent requests reached the HTTP/1.1 application over only {opened} \
             connections: were they concurrent?"
        );
    }
    // A few may be opened while the previous burst's connections are still
    // being returned to the pool; a pool that keeps fewer than BURST idle
    // connections opens BURST - kept in each later burst.
    let opened = web.connections();
    ensure!(
        opened <= BURST as u64 + 10,
        "three bursts of {BURST} concurrent requests opened {opened} connections to the \
         application: idle connections were closed instead of kept for reuse"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http1_framing_an_application_may_answer_with_reaches_the_caller() {
    let dir = TestDir::new("proxy-app-framings");
    dir.check(app_framings(&dir).await);
}

/// The sidecar's HTTP/1.1 client meets an application that writes its
/// answers byte by byte: chunk extensions and trailers, interim 1xx
/// answers, HTTP/1.0, a body ended by the close, large heads; a broken
/// answer is a 502 and a truncated body an error, never a hang; and a
/// server that closes kept-alive connections costs no failed request.
async fn app_framings(dir: &TestDir) -> Result<()> {
    use remora_tests::scripted::{After, ScriptedServer};
    let ok = |body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // Past the 4 KiB read buffer, within the 16 KiB a hyper HTTP/2 client
    // accepts.
    let big = "b".repeat(12 << 10);
    let huge = "h".repeat(70 << 10);
    let app = ScriptedServer::start(vec![
        (
            "/chunked",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n\
              5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: done\r\n\r\n"
                .to_vec(),
            After::KeepOpen,
        ),
        (
            "/interim",
            format!(
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n{}",
                ok("ok")
            )
            .into_bytes(),
            After::KeepOpen,
        ),
        (
            "/close-delimited",
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nread until the close".to_vec(),
            After::Close,
        ),
        (
            "/http10",
            b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nold".to_vec(),
            After::Close,
        ),
        (
            "/big-head",
            format!("HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 2\r\n\r\nok").into_bytes(),
            After::KeepOpen,
        ),
        (
            "/huge-head",
            format!("HTTP/1.1 200 OK\r\nx-huge: {huge}\r\ncontent-length: 2\r\n\r\nok")
                .into_bytes(),
            After::Close,
        ),
        (
            "/garbage",
            b"HTTP/1.1 2x0 Nope\r\n\r\n".to_vec(),
            After::Close,
        ),
        (
            "/short",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec(),
            After::Close,
        ),
        ("/kept", ok("kept").into_bytes(), After::KeepOpen),
        ("/dropped", ok("dropped").into_bytes(), After::Close),
        ("/drop-next", ok("next").into_bytes(), After::DropNext),
    ])
    .await?;
    let mut mesh = MeshFile::parse(MESH)?;
    remora_tests::topology::keep_services(&mut mesh, &["web.test"])?;
    let topology =
        Topology::start(dir, mesh, vec![App::new("web", "web.test", app.addr())]).await?;
    let client = AppClient::new(topology.client().outbound_addr(), AppProtocol::Http2);
    let get = |path: &'static str| client.get(WEB, path, &[]);

    let reply = get("/chunked").await?;
    ensure!(
        reply.status == StatusCode::OK && reply.body == "hello world",
        "chunked: {}",
        reply.describe()
    );
    let trailer = reply.trailers.as_ref().and_then(|t| t.get("x-t"));
    ensure!(
        trailer.is_some_and(|v| v == "done"),
        "chunked: the trailer x-t: done did not arrive: {:?}",
        reply.trailers
    );
    for (path, body) in [
        ("/interim", "ok"),
        ("/close-delimited", "read until the close"),
        ("/http10", "old"),
        ("/big-head", "ok"),
    ] {
        let reply = get(path).await?;
        ensure!(
            reply.status == StatusCode::OK && reply.body == body,
            "{path}: {}",
            reply.describe()
        );
    }
    for path in ["/huge-head", "/garbage"] {
        let reply = get(path).await?;
        ensure!(
            reply.status == StatusCode::BAD_GATEWAY
                && reply.remora_error() == Some("upstream_reset"),
            "{path}: expected 502 upstream_reset, got {}",
            reply.describe()
        );
    }
    // The caller sees the stream fail, or a 502 if the reset overtook the
    // response head between the sidecars; never a whole-looking 200.
    let short = tokio::time::timeout(Duration::from_secs(10), get("/short")).await;
    ensure!(
        match &short {
            Ok(Err(_)) => true,
            Ok(Ok(reply)) => reply.status == StatusCode::BAD_GATEWAY,
            Err(_) => false,
        },
        "/short: a body the application cut short must end in an error within 10 s, got {:?}",
        short.map(|r| r.map(|r| r.describe()))
    );

    let before = app.connections();
    for i in 0..20 {
        let reply = get("/kept").await?;
        ensure!(
            reply.status == StatusCode::OK,
            "/kept #{i}: {}",
            reply.describe()
        );
    }
    let opened = app.connections() - before;
    ensure!(
        opened <= 1,
        "20 requests one after another opened {opened} connections: the kept-alive one was \
         not reused"
    );
    // The application drops a kept-alive connection as the next request
    // arrives on it (the most recently used idle connection is taken
    // first): a GET without a body cannot have been acted on and is sent
    // again on a new connection; a POST is not (RFC 9112 section 9.3.1.1).
    for i in 0..5 {
        let reply = get("/drop-next").await?;
        ensure!(
            reply.status == StatusCode::OK,
            "/drop-next #{i}: {}",
            reply.describe()
        );
        let reply = get("/kept").await?;
        ensure!(
            reply.status == StatusCode::OK && reply.body == "kept",
            "a GET on a connection the application dropped #{i}: {}",
            reply.describe()
        );
    }
    let reply = get("/drop-next").await?;
    ensure!(
        reply.status == StatusCode::OK,
        "/drop-next: {}",
        reply.describe()
    );
    let post = client
        .exchange(client.request(Method::POST, WEB, "/kept").body(full(""))?)
        .await?;
    ensure!(
        post.status == StatusCode::BAD_GATEWAY,
        "a POST on a connection the application dropped must not be sent twice: {}",
        post.describe()
    );
    // The server closes each connection after answering, without saying
    // so; the next request must not be sent on (or fail with) it.
    for i in 0..50 {
        let reply = get("/dropped").await?;
        ensure!(
            reply.status == StatusCode::OK && reply.body == "dropped",
            "/dropped #{i}: {}",
            reply.describe()
        );
    }
    Ok(())
}

/// Requests with a body to an application that answers before reading it.
const EARLY: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_early_answered_requests_shares_one_connection_between_sidecars() {
    let dir = TestDir::new("proxy-early-answers");
    dir.check(early_answers(&dir).await);
}

/// 128 concurrent requests from the start: they wait for the one mTLS
/// connection the first of them opens, instead of each opening its own.
/// And an h2c application that answers before reading the request body
/// resets the rest of each request (RST_STREAM NO_ERROR, RFC 9113 section
/// 8.1): the server sidecar must not pass that on as resets of streams
/// whose data is already on its way, as h2 counts the frames that then
/// arrive on closed streams as the peer's errors and, after 1,024, closes
/// the whole connection (ENHANCE_YOUR_CALM). Either costs handshakes and
/// fails the requests in flight.
async fn early_answers(dir: &TestDir) -> Result<()> {
    use futures::StreamExt;

    let (topology, _web, h2app, _h2quiet) = http_topology(dir).await?;
    let client = AppClient::new(topology.client().outbound_addr(), AppProtocol::Http2);
    let statuses: Vec<Result<StatusCode>> = futures::stream::iter(0..EARLY)
        .map(|_| async {
            let request = client
                .request(Method::POST, H2APP, "/early")
                .header(EARLY_HEADER, "1")
                .body(full(vec![7u8; 2048]))?;
            Ok(client.exchange(request).await?.status)
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let mut failed = 0;
    for status in statuses {
        if status? != StatusCode::OK {
            failed += 1;
        }
    }
    let seen = h2app.requests();
    let server = topology.sidecar("h2app")?;
    let handshakes = server
        .metric_value(
            "remora_proxy_tls_handshakes_total",
            &[("direction", "inbound")],
        )
        .await?
        .unwrap_or(0.0);
    ensure!(
        failed == 0 && seen >= EARLY as u64 && handshakes == 1.0,
        "{EARLY} requests answered before their bodies were read: {failed} not answered 200, \
         {seen} reached the application, and the server sidecar accepted {handshakes} mTLS \
         connections (1 expected: the connection between the sidecars must survive)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_still_arriving_after_an_early_answer_is_read_not_reset() {
    let dir = TestDir::new("proxy-late-body");
    dir.check(late_body(&dir).await);
}

/// The frame-level view of the case above: a raw HTTP/2 client
/// (`tests/peers/h2_late_body.py`) sends a request's HEADERS, waits for the
/// early answer, then sends the body. The sidecars read it to its end (the
/// stream ends normally) rather than resetting the stream.
async fn late_body(dir: &TestDir) -> Result<()> {
    remora_tests::workspace::check_python_h2()?;
    let (topology, _web, h2app, _h2quiet) = http_topology(dir).await?;
    let script = remora_tests::workspace::peer_script("h2_late_body.py");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(remora_tests::workspace::python())
            .arg(&script)
            .args(["--addr", &topology.client().outbound_addr().to_string()])
            .args(["--authority", H2APP, "--path", "/early"])
            .args(["--header", &format!("{EARLY_HEADER}:1")])
            .args(["--requests", "5"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("h2_late_body.py did not finish within 30 s")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "h2_late_body.py failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("h2_late_body.py printed {stdout:?}"))?;
    let requests = report["requests"].as_array().cloned().unwrap_or_default();
    ensure!(requests.len() == 5, "h2_late_body.py reported {report}");
    for (n, r) in requests.iter().enumerate() {
        ensure!(
            r["status"] == 200 && r["reset"].is_null(),
            "request {n}: {r} (expected status 200 and no RST_STREAM: the rest of a request \
             answered early is read, not reset); all: {report}"
        );
    }
    ensure!(
        h2app.requests() >= 5,
        "the application saw {} of 5 requests",
        h2app.requests()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_headers_and_bodies_arrive_as_sent_without_hop_by_hop_or_internal_headers() {
    let dir = TestDir::new("proxy-headers");
    dir.check(headers_and_methods(&dir).await);
}

/// Checks what an application received against what the caller sent.
fn check_forwarded(echoed: &Echoed, what: &str) -> Result<()> {
    ensure!(
        echoed.header_values("x-custom") == ["one", "two"],
        "{what}: x-custom arrived as {:?}, sent as one, two",
        echoed.header_values("x-custom")
    );
    ensure!(
        echoed.header_values("x-forwarded-for") == ["10.1.2.3"]
            && echoed.header_values("forwarded") == ["for=10.1.2.3"],
        "{what}: x-forwarded-for / forwarded must pass untouched: {:?}",
        echoed.headers
    );
    let added: Vec<_> = echoed
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-forwarded-") && k != "x-forwarded-for")
        .collect();
    ensure!(
        added.is_empty(),
        "{what}: a sidecar added {added:?}; it adds nothing"
    );
    // The one x-remora-* header the application sees is the caller's
    // identity, proved over mTLS; the caller's own x-remora-* are gone.
    let internal: Vec<_> = echoed
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-remora-"))
        .collect();
    ensure!(
        internal.len() == 1 && echoed.header_values("x-remora-peer-identity") == [CLIENT_IDENTITY],
        "{what}: the application should see exactly x-remora-peer-identity: {CLIENT_IDENTITY}, \
         saw {internal:?}"
    );
    for hop in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "x-hop",
        "transfer-encoding",
    ] {
        ensure!(
            !echoed.has_header(hop),
            "{what}: the hop-by-hop header {hop} was forwarded: {:?}",
            echoed.headers
        );
    }
    if echoed.has_header("te") {
        ensure!(
            echoed.header_values("te") == ["trailers"],
            "{what}: only `te: trailers` may cross a hop, got {:?}",
            echoed.header_values("te")
        );
    }
    Ok(())
}

async fn headers_and_methods(dir: &TestDir) -> Result<()> {
    let (topology, _web, _h2app, _h2quiet) = http_topology(dir).await?;
    let outbound = topology.client().outbound_addr();
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::from_bytes(b"PURGE")?,
    ];
    for caller in [AppProtocol::Http1, AppProtocol::Http2] {
        let client = AppClient::new(outbound, caller);
        for authority in [WEB, H2APP] {
            for method in &methods {
                let what = format!("{caller:?} {method} to {authority}");
                let path = "/items/42?q=a%20b&x=1";
                let mut req = client
                    .request(method.clone(), authority, path)
                    .header("x-custom", "one")
                    .header("x-custom", "two")
                    .header("x-forwarded-for", "10.1.2.3")
                    .header("forwarded", "for=10.1.2.3")
                    .header("x-remora-app-protocol", "http2")
                    .header("x-remora-peer-identity", "spiffe://evil/ns/x/sa/y")
                    .header("te", "trailers");
                if caller == AppProtocol::Http1 {
                    // Connection-specific headers exist only in HTTP/1.1.
                    req = req
                        .header("connection", "keep-alive, x-hop")
                        .header("x-hop", "secret")
                        .header("keep-alive", "timeout=5")
                        .header("proxy-connection", "keep-alive")
                        .header("upgrade", "something-else");
                }
                let body = if *method == Method::GET || *method == Method::OPTIONS {
                    full("")
                } else {
                    full(format!("body of {method}"))
                };
                let reply = client.exchange(req.body(body)?).await?;
                let echoed = reply.echoed().with_context(|| what.clone())?;
                ensure!(
                    echoed.method == method.as_str(),
                    "{what}: the application saw method {}",
                    echoed.method
                );
                ensure!(
                    echoed.path == path,
                    "{what}: the application saw path {:?}",
                    echoed.path
                );
                // The caller's spoofed x-remora-app-protocol changes nothing.
                let version = if authority == WEB {
                    "HTTP/1.1"
                } else {
                    "HTTP/2"
                };
                ensure!(
                    echoed.version == version,
                    "{what}: the application saw {}, it speaks {version}",
                    echoed.version
                );
                if *method != Method::GET && *method != Method::OPTIONS {
                    ensure!(
                        echoed.body.as_deref() == Some(&*format!("body of {method}")),
                        "{what}: the body arrived as {:?}",
                        echoed.body
                    );
                }
                check_forwarded(&echoed, &what)?;
                ensure!(
                    reply.remora_error().is_none(),
                    "{what}: {}",
                    reply.describe()
                );
            }
        }
    }

    // Bodiless answers: HEAD, 204, 304; and an application's 500 passes
    // as it is (no retry on this route).
    for caller in [AppProtocol::Http1, AppProtocol::Http2] {
        let client = AppClient::new(outbound, caller);
        for authority in [WEB, H2APP] {
            let what = format!("{caller:?} to {authority}");
            let reply = client
                .exchange(
                    client
                        .request(Method::HEAD, authority, "/head")
                        .body(full(""))?,
                )
                .await?;
            ensure!(
                reply.status == StatusCode::OK
                    && reply.header("x-backend").is_some()
                    && reply.body.is_empty(),
                "{what}: HEAD: {}",
                reply.describe()
            );
            for status in ["204", "304", "500"] {
                let reply = client
                    .get(authority, "/status", &[("x-echo-status", status)])
                    .await?;
                ensure!(
                    reply.status.as_str() == status
                        && reply.remora_error().is_none()
                        && reply.header("x-backend").is_some(),
                    "{what}: the application answered {status}, the caller got {}",
                    reply.describe()
                );
            }
        }
    }

    // Hop-by-hop headers of a response are not forwarded either; an h2c
    // caller would see its stream reset if they were.
    for caller in [AppProtocol::Http1, AppProtocol::Http2] {
        let client = AppClient::new(outbound, caller);
        let reply = client
            .get(
                WEB,
                "/response-headers",
                &[
                    (RESPONSE_HEADER, "connection: x-resp-hop"),
                    (RESPONSE_HEADER, "x-resp-hop: secret"),
                    (RESPONSE_HEADER, "keep-alive: timeout=5"),
                    (RESPONSE_HEADER, "proxy-connection: keep-alive"),
                    (RESPONSE_HEADER, "x-end-to-end: kept"),
                ],
            )
            .await?;
        ensure!(
            reply.status == StatusCode::OK && reply.header("x-end-to-end") == Some("kept"),
            "{caller:?}: the application's response did not arrive whole: {}",
            reply.describe()
        );
        for hop in ["x-resp-hop", "keep-alive", "proxy-connection"] {
            ensure!(
                reply.header(hop).is_none(),
                "{caller:?}: the response's hop-by-hop header {hop} was forwarded: {}",
                reply.describe()
            );
        }
        ensure!(
            reply
                .header("connection")
                .is_none_or(|c| !c.contains("x-resp-hop")),
            "{caller:?}: the application's Connection header was forwarded: {}",
            reply.describe()
        );
    }

    // What an HTTP/1.1 client such as curl does: an absolute-form target
    // (as sent to an HTTP proxy), and `Expect: 100-continue` before a body.
    let raw = raw_exchange(
        outbound,
        "GET http://web.test:8080/absolute?x=1 HTTP/1.1\r\nHost: web.test:8080\r\n\
         Connection: close\r\n\r\n",
        None,
    )
    .await?;
    ensure!(
        raw.starts_with("HTTP/1.1 200") && raw.contains("\"path\":\"/absolute?x=1\""),
        "an absolute-form request through the pair: {raw}"
    );
    let raw = raw_exchange(
        outbound,
        "PUT /expect HTTP/1.1\r\nHost: web.test:8080\r\nContent-Length: 11\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n",
        Some(b"hello world"),
    )
    .await?;
    ensure!(
        raw.starts_with("HTTP/1.1 200") && raw.contains("\"body\":\"hello world\""),
        "an upload with Expect: 100-continue through the pair: {raw}"
    );

    // A streamed (chunked) upload of 8 MiB in 16 KiB chunks arrives whole
    // and in order, from either kind of caller to either application.
    const LEN: u64 = 8 << 20;
    for caller in [AppProtocol::Http1, AppProtocol::Http2] {
        let client = AppClient::new(outbound, caller);
        for authority in [WEB, H2APP] {
            let req = client
                .request(Method::PUT, authority, "/upload")
                .body(PatternBody::new(LEN, 16 << 10).boxed())?;
            let reply = client.exchange_within(req, Duration::from_secs(30)).await?;
            let echoed = reply
                .echoed()
                .with_context(|| format!("{caller:?} upload to {authority}"))?;
            ensure!(
                echoed.body_len == LEN && echoed.body_is_pattern,
                "{caller:?} upload to {authority}: the application received {} bytes (pattern \
                 intact: {}), {LEN} were sent",
                echoed.body_len,
                echoed.body_is_pattern
            );
            if caller == AppProtocol::Http1 && authority == WEB {
                // Streamed end to end: no length was announced, so the
                // HTTP/1.1 application got it chunked.
                ensure!(
                    echoed.header_values("content-length").is_empty(),
                    "the chunked upload reached the application with a content-length: {:?}",
                    echoed.headers
                );
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_streaming_and_statuses_travel_through_the_pair() {
    let dir = TestDir::new("proxy-grpc");
    dir.check(grpc(&dir).await);
}

async fn grpc(dir: &TestDir) -> Result<()> {
    let server = GrpcServer::start(dir, "greeter-1").await?;
    let mut mesh = MeshFile::parse(MESH)?;
    remora_tests::topology::keep_services(&mut mesh, &["greeter.test"])?;
    let app_addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.port()));
    let topology = Topology::start(
        dir,
        mesh,
        vec![App::new("greeter-1", "greeter.test", app_addr).protocol(AppProtocol::Http2)],
    )
    .await?;
    let outbound = topology.client().outbound_addr();

    let peer_trailer = |o: &remora_tests::grpc::RpcOutcome| {
        o.trailing_metadata.get("x-peer-name").cloned() == Some(vec!["greeter-1".to_string()])
    };

    // Unary, with request metadata: custom metadata reaches the server, a
    // caller's x-remora-* does not.
    let who = Rpc::new(outbound, GREETER, Rpcm::Who)
        .metadata("x-custom", "kept")
        .metadata("x-remora-peer-identity", "spoofed")
        .run(dir)
        .await?;
    ensure!(
        who.code == "OK" && who.replies == ["greeter-1"] && peer_trailer(&who),
        "unary Who through the pair: {who:?}"
    );
    ensure!(
        who.trailing_metadata.get("x-seen-x-custom").cloned() == Some(vec!["kept".to_string()]),
        "the server did not see the caller's x-custom metadata: {who:?}"
    );
    let internal: Vec<&String> = who
        .trailing_metadata
        .keys()
        .filter(|k| k.starts_with("x-seen-x-remora-") && *k != "x-seen-x-remora-peer-identity")
        .collect();
    ensure!(
        internal.is_empty()
            && who
                .trailing_metadata
                .get("x-seen-x-remora-peer-identity")
                .cloned()
                == Some(vec![CLIENT_IDENTITY.to_string()]),
        "the server should see only x-remora-peer-identity: {CLIENT_IDENTITY}: {who:?}"
    );

    // Server streaming, long enough to need flow control on every hop.
    let count = Rpc::new(outbound, GREETER, Rpcm::Count)
        .arg("3000")
        .run(dir)
        .await?;
    let expected: Vec<String> = (0..3000).map(|i| format!("greeter-1:{i}")).collect();
    ensure!(
        count.code == "OK" && count.replies == expected && peer_trailer(&count),
        "server-streaming Count(3000) through the pair: {} replies, code {} {}, trailers {:?}",
        count.replies.len(),
        count.code,
        count.details,
        count.trailing_metadata
    );

    // Bidirectional: each message is sent only once the previous answer
    // arrived, so this completes only if both directions stream.
    let echo = Rpc::new(outbound, GREETER, Rpcm::Echo)
        .messages(&["a", "b", "c", "d"])
        .run(dir)
        .await?;
    ensure!(
        echo.code == "OK"
            && echo.replies == ["greeter-1:a", "greeter-1:b", "greeter-1:c", "greeter-1:d"]
            && peer_trailer(&echo),
        "bidirectional Echo through the pair: {echo:?}"
    );

    // A non-OK status with its message, from the application's trailers.
    let fail = Rpc::new(outbound, GREETER, Rpcm::Fail)
        .arg("NOT_FOUND:no item 42 (checked twice)")
        .run(dir)
        .await?;
    ensure!(
        fail.code == "NOT_FOUND"
            && fail.details == "no item 42 (checked twice)"
            && peer_trailer(&fail),
        "Fail(NOT_FOUND) through the pair: {fail:?}"
    );
    let fail = Rpc::new(outbound, GREETER, Rpcm::Fail)
        .arg("RESOURCE_EXHAUSTED:quota: 0% left")
        .run(dir)
        .await?;
    ensure!(
        fail.code == "RESOURCE_EXHAUSTED" && fail.details == "quota: 0% left",
        "Fail(RESOURCE_EXHAUSTED) through the pair: {fail:?}"
    );

    // A gRPC caller of a service the mesh does not have gets a gRPC status,
    // not an HTTP error page.
    let unknown = Rpc::new(outbound, "nothing.test:9090", Rpcm::Who)
        .run(dir)
        .await?;
    ensure!(
        unknown.code == "UNIMPLEMENTED",
        "a call to an unknown service: {unknown:?}"
    );
    ensure!(
        unknown.initial_metadata.get("x-remora-error").cloned()
            == Some(vec!["no_route".to_string()])
            || unknown.trailing_metadata.get("x-remora-error").cloned()
                == Some(vec!["no_route".to_string()]),
        "a call to an unknown service carries no x-remora-error: no_route: {unknown:?}"
    );
    Ok(())
}

/// Sends a hand-written HTTP/1.1 request head to `addr`. With a body, the
/// head must carry `Expect: 100-continue`: the body goes only after the
/// interim `100 Continue` arrived. Returns the final response as text
/// (the head asks for `Connection: close`, so it ends with the connection).
async fn raw_exchange(addr: SocketAddr, head: &str, body: Option<&[u8]>) -> Result<String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(head.as_bytes()).await?;
        let mut buf = Vec::new();
        if let Some(body) = body {
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut chunk).await?;
                ensure!(n > 0, "the connection closed before 100 Continue: {buf:?}");
                buf.extend_from_slice(&chunk[..n]);
            }
            let interim = String::from_utf8_lossy(&buf).into_owned();
            ensure!(
                interim.starts_with("HTTP/1.1 100"),
                "expected `HTTP/1.1 100 Continue` before sending the body, got {interim:?}"
            );
            let end = buf
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |i| i + 4);
            buf.drain(..end);
            stream.write_all(body).await?;
        }
        stream.read_to_end(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })
    .await
    .with_context(|| format!("no whole answer within 10 s to {head:?}"))?
}
