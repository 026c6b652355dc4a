//! Draining on SIGTERM: the outbound listener closes at once, idle
//! keep-alive connections are closed, requests in flight (from HTTP/1.1
//! and HTTP/2 callers, who keep their connections) still get their
//! answers, and the proxy exits cleanly once they are done, well before
//! its grace period.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use remora_tests::app_client::AppClient;
use remora_tests::echo::{DELAY_HEADER, EchoServer};
use remora_tests::mesh::MeshFile;
use remora_tests::proxy::AppProtocol;
use remora_tests::topology::{App, Topology};
use remora_tests::{TestDir, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MESH: &str = r#"
services:
  - name: slow
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
    routes:
      - name: all
        backends: [{service: slow}]
        timeout: 30s
"#;

/// How long the application takes to answer the requests in flight.
const ANSWER_AFTER_MS: &str = "3000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_listener_and_lets_requests_in_flight_finish() {
    let dir = TestDir::new("proxy-drain");
    dir.check(drain(&dir).await);
}

async fn drain(dir: &TestDir) -> Result<()> {
    let slow = EchoServer::start("slow").await?;
    let mut topology = Topology::start(
        dir,
        MeshFile::parse(MESH)?,
        vec![App::new("slow", "slow.test", slow.addr())],
    )
    .await?;
    let outbound = topology.client().outbound_addr();

    let mut idle = idle_keep_alive(outbound).await?;
    let protocols = [AppProtocol::Http1, AppProtocol::Http2];
    let mut in_flight = Vec::new();
    for protocol in protocols {
        let client = AppClient::new(outbound, protocol);
        in_flight.push(tokio::spawn(async move {
            let reply = client
                .get("slow.test:8080", "/", &[(DELAY_HEADER, ANSWER_AFTER_MS)])
                .await;
            // The client goes back with its connection (HTTP/2: still open).
            (client, reply)
        }));
    }
    eventually(
        "both requests reach the application",
        Duration::from_secs(10),
        async || {
            let seen = slow.requests();
            ensure!(seen >= 3, "the application has seen {seen} requests");
            Ok(())
        },
    )
    .await?;

    let pid = topology.client().pid().to_string();
    let termed = Command::new("kill").args(["-TERM", &pid]).status()?;
    ensure!(termed.success(), "kill -TERM {pid} failed: {termed}");

    eventually(
        "the outbound listener refuses new connections",
        Duration::from_secs(5),
        async || match TcpStream::connect(outbound).await {
            Err(_) => Ok(()),
            Ok(_) => bail!("{outbound} still accepts connections after SIGTERM"),
        },
    )
    .await?;
    ensure!(
        in_flight.iter().all(|task| !task.is_finished()),
        "the listener must close at SIGTERM, not once the requests in flight are answered"
    );
    eventually(
        "the idle keep-alive connection is closed",
        Duration::from_secs(5),
        async || {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(50), idle.read(&mut byte)).await {
                Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
                Ok(Ok(_)) => bail!("unexpected bytes on the idle connection"),
                Err(_) => bail!("still open"),
            }
        },
    )
    .await?;
    let mut callers = Vec::new();
    for (task, protocol) in in_flight.into_iter().zip(protocols) {
        let (caller, reply) = task.await.context("the caller task")?;
        callers.push(caller);
        let reply =
            reply.with_context(|| format!("the {protocol:?} request in flight at SIGTERM"))?;
        reply.echoed().with_context(|| {
            format!(
                "the {protocol:?} request in flight at SIGTERM must get its answer: {}",
                reply.describe()
            )
        })?;
    }

    let client = topology.client_mut();
    let status = eventually(
        "the proxy exits once they are answered (well before its 10 s grace)",
        Duration::from_secs(5),
        async || match client.exit_status() {
            Some(status) => Ok(status),
            None => bail!("still running"),
        },
    )
    .await?;
    ensure!(
        status.success(),
        "the proxy exited with {status} after draining; log:\n{}",
        client.log_tail(20)
    );
    Ok(())
}

/// An HTTP/1.1 connection to `outbound` that has had one exchange and is
/// kept open, idle.
async fn idle_keep_alive(outbound: std::net::SocketAddr) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(outbound).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: slow.test:8080\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    let read_whole = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            ensure!(
                n > 0,
                "the connection closed after {} bytes",
                response.len()
            );
            response.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&response);
            let Some(head_end) = text.find("\r\n\r\n") else {
                continue;
            };
            let head = text[..head_end].to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .context("no content-length in the response")?
                .trim()
                .parse()?;
            if response.len() >= head_end + 4 + length {
                ensure!(head.starts_with("http/1.1 200"), "answered {head}");
                return Ok(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_whole)
        .await
        .context("no whole response within 10 s")??;
    Ok(stream)
}
