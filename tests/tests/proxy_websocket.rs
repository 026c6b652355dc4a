//! A WebSocket through a pair of `remora-proxy` sidecars: the HTTP/1.1
//! upgrade reaches the application with its WebSocket headers (and without
//! the caller's `x-remora-*`), then text and binary messages, a 1 MiB one
//! included, are echoed both ways, and the close handshake completes.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures::{SinkExt, StreamExt};
use remora_tests::TestDir;
use remora_tests::mesh::MeshFile;
use remora_tests::pattern;
use remora_tests::topology::{App, CLIENT_IDENTITY, Topology};
use remora_tests::websocket::{WsEchoServer, connect};
use tokio_tungstenite::tungstenite::Message;

const MESH: &str = r#"
services:
  - name: chat
    namespace: test
    ports: [{name: http, port: 8080, protocol: http}]
"#;

/// Time allowed for each message's echo.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echoes_through_the_pair() {
    let dir = TestDir::new("proxy-websocket");
    dir.check(websocket(&dir).await);
}

async fn websocket(dir: &TestDir) -> Result<()> {
    let server = WsEchoServer::start("chat").await?;
    let topology = Topology::start(
        dir,
        MeshFile::parse(MESH)?,
        vec![App::new("chat", "chat.test", server.addr())],
    )
    .await?;
    let outbound = topology.client().outbound_addr();
    let (mut ws, response) = connect(
        outbound,
        "chat.test:8080",
        "/socket?room=1",
        &[("x-remora-peer-identity", "spoofed"), ("x-custom", "kept")],
    )
    .await?;
    ensure!(
        response.status() == 101,
        "the upgrade was answered {:?}",
        response
    );

    let handshakes = server.handshakes();
    let [handshake] = handshakes.as_slice() else {
        bail!(
            "the application accepted {} handshakes: {handshakes:?}",
            handshakes.len()
        );
    };
    let get = |name: &str| -> Vec<&str> {
        handshake
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    ensure!(
        get("upgrade")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("websocket"))
            && get("sec-websocket-key").len() == 1
            && get("x-custom") == ["kept"]
            && get("host") == ["chat.test:8080"],
        "the application's handshake lacks what the caller sent: {handshake:?}"
    );
    let internal: Vec<_> = handshake
        .iter()
        .filter(|(k, _)| k.starts_with("x-remora-"))
        .collect();
    ensure!(
        internal.len() == 1 && get("x-remora-peer-identity") == [CLIENT_IDENTITY],
        "the application should see exactly x-remora-peer-identity: {CLIENT_IDENTITY}: \
         {handshake:?}"
    );

    let big = pattern::bytes_at(0, 1 << 20);
    let messages = vec![
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 255]),
        Message::text("second"),
        Message::binary(big),
        Message::text("last"),
    ];
    for message in messages {
        let expected = match &message {
            Message::Text(t) => Message::text(format!("chat:{}", t.as_str())),
            other => other.clone(),
        };
        ws.send(message).await.context("sending through the pair")?;
        let answer = tokio::time::timeout(ECHO_TIMEOUT, ws.next())
            .await
            .context("no echo within 10 s")?
            .context("the WebSocket closed before the echo")?
            .context("reading the echo")?;
        ensure!(
            answer == expected,
            "sent a message of {} bytes, got back {} bytes: {:.80}",
            expected.len(),
            answer.len(),
            format!("{answer:?}")
        );
    }

    // The close handshake goes through too.
    ws.close(None).await.context("sending close")?;
    let end = tokio::time::timeout(ECHO_TIMEOUT, async {
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Close(_)) => continue,
                Ok(other) => bail!("a message after close: {other:?}"),
                Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed) => return Ok(()),
                Err(e) => bail!("closing: {e}"),
            }
        }
        Ok(())
    })
    .await
    .context("the close handshake did not complete within 10 s")?;
    end?;
    Ok(())
}
