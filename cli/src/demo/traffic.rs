//! The demo's traffic: `frontend` calling `catalog.shop` through its
//! sidecar's outbound listener at a steady rate, many requests at once,
//! and what it saw (the client-side view the summary reports).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;

use crate::demo::client::{Client, REQUEST_TIMEOUT};

/// The request mix, for the header.
pub(crate) const MIX: &str =
    "1 in 20 to /v2/..., 1 in 20 with x-canary: true, the rest to /items/...";

/// Requests in flight at most; beyond that a tick is skipped and counted,
/// so a stuck mesh cannot make the demo pile up tasks.
const MAX_IN_FLIGHT: usize = 200;

/// What `frontend` saw.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientTotals {
    /// Requests that got an answer or an error.
    pub(crate) sent: u64,
    /// Of those, answered 2xx.
    pub(crate) ok: u64,
    /// 2xx answers by `catalog` v1 and v2.
    pub(crate) by_v1: u64,
    pub(crate) by_v2: u64,
    /// Ticks skipped because [`MAX_IN_FLIGHT`] requests were in flight.
    pub(crate) skipped: u64,
    /// Failures by kind (`503 from catalog-v2`, `no response: ...`).
    pub(crate) failures: BTreeMap<String, u64>,
}

impl ClientTotals {
    /// Share of requests answered 2xx, in percent (100 before any).
    pub(crate) fn success_percent(&self) -> f64 {
        if self.sent == 0 {
            100.0
        } else {
            100.0 * self.ok as f64 / self.sent as f64
        }
    }
}

#[derive(Debug, Default)]
struct Live {
    sent: AtomicU64,
    ok: AtomicU64,
    by_v1: AtomicU64,
    by_v2: AtomicU64,
    skipped: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
}

impl Live {
    fn snapshot(&self) -> ClientTotals {
        ClientTotals {
            sent: self.sent.load(Ordering::Relaxed),
            ok: self.ok.load(Ordering::Relaxed),
            by_v1: self.by_v1.load(Ordering::Relaxed),
            by_v2: self.by_v2.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            failures: self
                .failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    fn fail(&self, what: String) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        *self
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(what)
            .or_default() += 1;
    }
}

/// Running traffic.
pub(crate) struct Traffic {
    live: Arc<Live>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Traffic {
    /// Starts sending `rps` requests per second for `host` to `outbound`.
    pub(crate) fn start(
        client: Client,
        outbound: SocketAddr,
        host: &'static str,
        rps: u32,
    ) -> Traffic {
        let live = Arc::new(Live::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(drive(client, outbound, host, rps, live.clone(), stopped));
        Traffic { live, stop, task }
    }

    /// What `frontend` has seen so far.
    pub(crate) fn totals(&self) -> ClientTotals {
        self.live.snapshot()
    }

    /// Stops sending, lets the requests in flight finish (each is bounded
    /// by the client's timeout), and returns the totals.
    pub(crate) async fn stop(self) -> ClientTotals {
        let _ = self.stop.send(true);
        let limit = REQUEST_TIMEOUT + Duration::from_secs(2);
        let mut task = self.task;
        if tokio::time::timeout(limit, &mut task).await.is_err() {
            task.abort();
        }
        self.live.snapshot()
    }
}

async fn drive(
    client: Client,
    outbound: SocketAddr,
    host: &'static str,
    rps: u32,
    live: Arc<Live>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps.max(1))));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut in_flight = JoinSet::new();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.wait_for(|s| *s) => break,
        }
        while in_flight.try_join_next().is_some() {}
        if in_flight.len() >= MAX_IN_FLIGHT {
            live.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        n += 1;
        let (path, headers): (String, &'static [(&'static str, &'static str)]) = match n % 20 {
            5 => (format!("/v2/items/{n}"), &[]),
            15 => (format!("/items/{n}"), &[("x-canary", "true")]),
            _ => (format!("/items/{n}"), &[]),
        };
        let client = client.clone();
        let live = live.clone();
        in_flight.spawn(async move {
            match client.get(outbound, host, &path, headers).await {
                Ok(reply) if reply.status.is_success() => {
                    live.sent.fetch_add(1, Ordering::Relaxed);
                    live.ok.fetch_add(1, Ordering::Relaxed);
                    match reply.backend.as_deref() {
                        Some("catalog-v1") => live.by_v1.fetch_add(1, Ordering::Relaxed),
                        Some("catalog-v2") => live.by_v2.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                }
                Ok(reply) => {
                    let mut what = reply.status.as_u16().to_string();
                    if let Some(b) = &reply.backend {
                        what.push_str(&format!(" from {b}"));
                    }
                    if let Some(e) = &reply.remora_error {
                        what.push_str(&format!(" (x-remora-error: {e})"));
                    }
                    live.fail(what);
                }
                Err(e) => live.fail(format!("no response: {}", e.root_cause())),
            }
        });
    }
    while in_flight.join_next().await.is_some() {}
}
