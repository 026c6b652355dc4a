//! Background traffic for tests that change something while requests flow
//! (an endpoint removed, the control plane killed): workers send requests
//! in a loop, optionally paced, until stopped, and the report counts every
//! answer and keeps the first failures whole, so a test can demand zero
//! failed requests and show the ones it got.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::task::JoinSet;

use crate::client::{HttpClient, Tally};
use crate::eventually::eventually;

/// Failures kept whole in a report.
const KEPT_FAILURES: usize = 20;

/// What a load run saw.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests completed (answered or failed).
    pub sent: u64,
    /// Answered 200.
    pub ok: u64,
    /// Which backend answered, and the failures by kind.
    pub tally: Tally,
    /// The first failures, with what came back.
    pub failures: Vec<String>,
    /// From the first request to the last answer.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Requests that did not get a 200.
    pub fn failed(&self) -> u64 {
        self.sent - self.ok
    }

    /// Fails unless every request got a 200.
    pub fn expect_no_failures(&self) -> Result<()> {
        anyhow::ensure!(
            self.failed() == 0 && self.sent > 0,
            "{} of {} requests failed over {:?}: {}; first failures:\n{}",
            self.failed(),
            self.sent,
            self.elapsed,
            self.tally,
            self.failures.join("\n")
        );
        Ok(())
    }
}

/// Shared by the workers.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    done: AtomicU64,
}

/// Running load; stop it with [`Load::stop`].
pub struct Load {
    shared: Arc<Shared>,
    workers: JoinSet<Result<LoadReport>>,
    started: Instant,
}

/// What each request looks like.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The client sidecar's outbound listener.
    pub addr: SocketAddr,
    /// `Host`.
    pub authority: String,
    /// Path.
    pub path: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Concurrent workers.
    pub workers: usize,
    /// Each worker sends at most one request per `pace` (none: back to
    /// back).
    pub pace: Option<Duration>,
}

impl LoadSpec {
    /// `GET path` on `authority` through `addr`, `workers` at a time, back
    /// to back.
    pub fn new(addr: SocketAddr, authority: &str, path: &str, workers: usize) -> LoadSpec {
        LoadSpec {
            addr,
            authority: authority.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            workers,
            pace: None,
        }
    }

    /// Paces each worker to one request per `pace`.
    pub fn paced(mut self, pace: Duration) -> LoadSpec {
        self.pace = Some(pace);
        self
    }

    /// Adds a header to every request.
    pub fn header(mut self, name: &str, value: &str) -> LoadSpec {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

impl Load {
    /// Starts the workers.
    pub fn start(spec: LoadSpec) -> Load {
        Load::start_bounded(spec, u64::MAX)
    }

    /// Starts the workers; they stop by themselves after `limit` requests
    /// in all.
    pub fn start_bounded(spec: LoadSpec, limit: u64) -> Load {
        let shared = Arc::new(Shared::default());
        let mut workers = JoinSet::new();
        let client = HttpClient::new();
        for _ in 0..spec.workers.max(1) {
            let shared = shared.clone();
            let client = client.clone();
            let spec = spec.clone();
            workers.spawn(async move {
                let headers: Vec<(&str, &str)> = spec
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let mut report = LoadReport::default();
                let mut pace = spec.pace.map(|p| {
                    let mut i = tokio::time::interval(p);
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    i
                });
                let started = Instant::now();
                while !shared.stop.load(Ordering::Relaxed) {
                    if let Some(p) = pace.as_mut() {
                        p.tick().await;
                    }
                    // Claim a slot of the limit before sending.
                    if shared.done.fetch_add(1, Ordering::Relaxed) >= limit {
                        break;
                    }
                    let at = started.elapsed();
                    let result = client
                        .get(spec.addr, &spec.authority, &spec.path, &headers)
                        .await;
                    report.sent += 1;
                    let outcome = match result {
                        Ok(reply) if reply.status == http::StatusCode::OK => {
                            report.ok += 1;
                            reply.outcome()
                        }
                        Ok(reply) => {
                            let outcome = format!(
                                "{} x-remora-error={:?}",
                                reply.outcome(),
                                reply
                                    .headers
                                    .get("x-remora-error")
                                    .and_then(|v| v.to_str().ok())
                            );
                            if report.failures.len() < KEPT_FAILURES {
                                report.failures.push(format!(
                                    "at {at:?}: {outcome}; headers {:?}",
                                    reply.headers
                                ));
                            }
                            outcome
                        }
                        Err(e) => {
                            if report.failures.len() < KEPT_FAILURES {
                                report.failures.push(format!("at {at:?}: {e:#}"));
                            }
                            "transport error".to_string()
                        }
                    };
                    report.tally.add(outcome);
                }
                report.elapsed = started.elapsed();
                Ok(report)
            });
        }
        Load {
            shared,
            workers,
            started: Instant::now(),
        }
    }

    /// Requests started so far.
    pub fn started_requests(&self) -> u64 {
        self.shared.done.load(Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until `more` requests beyond the current
    /// count have started: traffic is flowing.
    pub async fn wait_for_more(&self, more: u64, timeout: Duration) -> Result<()> {
        let target = self.started_requests() + more;
        eventually(
            &format!("{more} more requests of the load"),
            timeout,
            async || {
                let now = self.started_requests();
                anyhow::ensure!(now >= target, "{now} started, waiting for {target}");
                Ok(())
            },
        )
        .await
    }

    /// Stops the workers (each finishes its request in flight) and merges
    /// their reports.
    pub async fn stop(mut self) -> Result<LoadReport> {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.join().await
    }

    /// Waits for the workers to finish by themselves (a bounded run).
    pub async fn join(&mut self) -> Result<LoadReport> {
        let mut total = LoadReport::default();
        while let Some(part) = self.workers.join_next().await {
            let part = part.context("a load worker panicked")??;
            total.sent += part.sent;
            total.ok += part.ok;
            total.tally.merge(part.tally);
            for f in part.failures {
                if total.failures.len() < KEPT_FAILURES {
                    total.failures.push(f);
                }
            }
        }
        total.elapsed = self.started.elapsed();
        Ok(total)
    }
}
