//! Process plumbing shared by Remora's binaries (the control plane, the
//! sidecar, the CLI): waiting for a shutdown signal, announcing bound
//! addresses in a file, serving a small HTTP/1.1 admin endpoint, and
//! rendering Prometheus metrics.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Waits for SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this process");
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("shutting down");
}

/// Why the address file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {} (--address-file): {source}", path.display())]
pub struct AddressFileError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Writes `addresses` as JSON to `path`, atomically (a reader sees the
/// whole file or none), for callers that started the process on port 0.
pub fn write_address_file(
    path: &Path,
    addresses: &serde_json::Value,
) -> Result<(), AddressFileError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, addresses.to_string()).map_err(|source| AddressFileError {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| AddressFileError {
        path: path.to_path_buf(),
        source,
    })
}

/// A response for the admin server.
pub type AdminResponse = Response<Full<Bytes>>;

/// Serves HTTP/1.1 on `listener` with `handler` until the task is dropped.
/// Meant for low-traffic admin and monitoring endpoints.
pub async fn serve_admin<H>(listener: TcpListener, handler: Arc<H>)
where
    H: Fn(&Request<Incoming>) -> AdminResponse + Send + Sync + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin listener accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(&req)) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// A JSON response, or a 500 naming why the value could not be encoded.
pub fn json_response(value: &impl serde::Serialize) -> AdminResponse {
    match serde_json::to_string_pretty(value) {
        Ok(body) => {
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// The Prometheus text exposition of `registry`, as a response.
pub fn metrics_response(registry: &prometheus::Registry) -> AdminResponse {
    use prometheus::Encoder;
    let mut out = Vec::new();
    // Encoding into a Vec fails only for malformed families, which the
    // registry does not accept in the first place.
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut out);
    let mut response = text(StatusCode::OK, out);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_file_appears_whole() {
        let dir = std::env::temp_dir().join(format!("remora-runtime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("addr.json");
        write_address_file(&path, &serde_json::json!({"xds": "127.0.0.1:1"})).expect("written");
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(back["xds"], "127.0.0.1:1");
        assert!(!path.with_extension("tmp").exists());
        let err = write_address_file(&dir.join("missing/addr.json"), &serde_json::json!({}))
            .expect_err("no such directory");
        assert!(err.to_string().contains("--address-file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
