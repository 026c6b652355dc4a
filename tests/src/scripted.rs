//! An HTTP/1.1 application that answers each path with bytes written
//! exactly as given: framings and peculiarities a hyper application never
//! produces (chunk extensions, trailers, 1xx before the answer, HTTP/1.0,
//! a body ended by the close, a server that closes kept-alive connections)
//! for the sidecar's own HTTP/1.1 client to meet.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the server does after writing an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Reads the next request on the connection.
    KeepOpen,
    /// Closes the connection (whatever the answer said).
    Close,
    /// Reads the next request on the connection and closes it unanswered:
    /// a server that gave up on an idle connection just as a request was
    /// sent on it.
    DropNext,
}

/// A running scripted server; stops when dropped.
#[derive(Debug)]
pub struct ScriptedServer {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedServer {
    /// Serves `script` (path to raw answer and what follows it) on
    /// `127.0.0.1:0`. Other paths get a 404 with a body.
    pub async fn start(script: Vec<(&str, Vec<u8>, After)>) -> Result<ScriptedServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let script: Arc<HashMap<String, (Vec<u8>, After)>> = Arc::new(
            script
                .into_iter()
                .map(|(path, answer, after)| (path.to_string(), (answer, after)))
                .collect(),
        );
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(stream, Arc::clone(&script)));
            }
        });
        Ok(ScriptedServer {
            addr,
            accepted,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Answers the requests of one connection (bodiless requests only).
async fn serve(mut stream: TcpStream, script: Arc<HashMap<String, (Vec<u8>, After)>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (answer, after) = match script.get(&path) {
            Some((answer, after)) => (answer.clone(), *after),
            None => (
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nno script".to_vec(),
                After::KeepOpen,
            ),
        };
        if stream.write_all(&answer).await.is_err() {
            return;
        }
        match after {
            After::KeepOpen => {}
            After::Close => {
                let _ = stream.shutdown().await;
                return;
            }
            After::DropNext => {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                return;
            }
        }
    }
}
