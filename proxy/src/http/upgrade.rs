//! HTTP/1.1 upgrades (WebSocket): once both sides answered 101, the two
//! upgraded connections are joined byte for byte, half-closes honoured.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// Joins the downstream and upstream connections after a 101 response.
pub fn splice(downstream: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut down = TokioIo::new(down);
        let mut up = TokioIo::new(up);
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}
