//! WebSocket for the proxy's HTTP/1.1 upgrade path: an echo application
//! (text `m` is answered `NAME:m`, binary is echoed unchanged) that keeps
//! the headers of every handshake it accepted, and a client that opens a
//! WebSocket through a sidecar's outbound listener, addressed to a service.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{Message, http};

/// Headers of one accepted handshake, in order, names in lower case.
pub type Handshake = Vec<(String, String)>;

/// A WebSocket echo application on `127.0.0.1:0`; stops on drop.
pub struct WsEchoServer {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    task: JoinHandle<()>,
}

impl WsEchoServer {
    /// Starts a server named `name`.
    pub async fn start(name: &str) -> Result<WsEchoServer> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a WebSocket server on 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(serve(listener, name.to_string(), handshakes.clone()));
        Ok(WsEchoServer {
            addr,
            handshakes,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The headers of every handshake accepted so far.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for WsEchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// The handshake callback's error type is tungstenite's (a whole HTTP
// response), not ours to make smaller.
#[allow(clippy::result_large_err)]
async fn serve(listener: TcpListener, name: String, handshakes: Arc<Mutex<Vec<Handshake>>>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        let handshakes = handshakes.clone();
        connections.spawn(async move {
            let record = |req: &Request, res: Response| {
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                handshakes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(headers);
                Ok(res)
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                let answer = match message {
                    Message::Text(t) => Message::text(format!("{name}:{}", t.as_str())),
                    Message::Binary(b) => Message::Binary(b),
                    // Pings, and the peer's close: tungstenite answers them
                    // itself, the close on the next read, which then ends
                    // the stream.
                    _ => continue,
                };
                if ws.send(answer).await.is_err() {
                    return;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

/// Opens `ws://authority/path` through the sidecar listening on `outbound`:
/// the TCP connection goes to the sidecar, the handshake names the service.
/// Returns the socket and the handshake response.
pub async fn connect(
    outbound: SocketAddr,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(WebSocketStream<TcpStream>, http::Response<Option<Vec<u8>>>)> {
    let mut request = format!("ws://{authority}{path}")
        .into_client_request()
        .with_context(|| format!("building a WebSocket request for {authority}{path}"))?;
    for (k, v) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes())?,
            http::HeaderValue::from_str(v)?,
        );
    }
    let stream = TcpStream::connect(outbound)
        .await
        .with_context(|| format!("connecting to the sidecar at {outbound}"))?;
    tokio_tungstenite::client_async(request, stream)
        .await
        .with_context(|| format!("WebSocket handshake with {authority}{path} through {outbound}"))
}
