//! Retries: the per-route budget that keeps them from amplifying an
//! outage, and the decision whether a failed try may be retried.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::config::{RetryOn, RetryPolicy};
use crate::errors::ProxyError;
use crate::http::drain::Drained;
use crate::http::headers::grpc_status;
use crate::upstream::BoxError;

/// Request bodies up to this size are kept for replay; larger ones are
/// streamed once and never retried (and never truncated).
pub const REPLAY_LIMIT: usize = 64 << 10;

/// Default share of requests that may be retried.
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// Default retries per second allowed whatever the ratio says.
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
/// How long a deposit stays spendable.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// A retry budget: retries may be at most `ratio` of requests over the
/// last 10 seconds, plus `min_per_second` retries every second.
///
/// Time is passed in, so tests drive it deterministically. The lock is held
/// for a few arithmetic operations per request on one route; it never
/// crosses an await.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a retry earned per request.
    ratio_milli: u64,
    min_per_second: u32,
    inner: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    /// Deposits per second-slot over the window: (slot second, tokens).
    slots: [(u64, u64); 10],
    /// Retries spent per slot.
    spent: [(u64, u64); 10],
    /// Floor retries used in the current second: (second, count).
    floor: (u64, u32),
    origin: Instant,
}

impl RetryBudget {
    /// A budget of `ratio` of requests plus `min_per_second`.
    pub fn new(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget {
            ratio_milli: (ratio.clamp(0.0, 1000.0) * 1000.0).round() as u64,
            min_per_second,
            inner: Mutex::new(BudgetState {
                slots: [(u64::MAX, 0); 10],
                spent: [(u64::MAX, 0); 10],
                floor: (u64::MAX, 0),
                origin: Instant::now(),
            }),
        }
    }

    /// Records a request (first tries only).
    pub fn deposit(&self, now: Instant) {
        let mut s = self.lock();
        let second = s.second(now);
        add(&mut s.slots, second, self.ratio_milli);
    }

    /// Takes one retry from the budget if there is one.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut s = self.lock();
        let second = s.second(now);
        if s.floor.0 != second {
            s.floor = (second, 0);
        }
        if s.floor.1 < self.min_per_second {
            s.floor.1 += 1;
            return true;
        }
        let deposited = sum(&s.slots, second);
        let spent = sum(&s.spent, second);
        if deposited >= spent + 1000 {
            add(&mut s.spent, second, 1000);
            true
        } else {
            false
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        // The state is plain numbers, consistent after any panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(DEFAULT_BUDGET_RATIO, DEFAULT_BUDGET_MIN_PER_SECOND)
    }
}

impl BudgetState {
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }
}

fn add(slots: &mut [(u64, u64); 10], second: u64, amount: u64) {
    let slot = &mut slots[(second % 10) as usize];
    if slot.0 != second {
        *slot = (second, 0);
    }
    slot.1 += amount;
}

fn sum(slots: &[(u64, u64); 10], second: u64) -> u64 {
    let window = BUDGET_WINDOW.as_secs();
    slots
        .iter()
        .filter(|(s, _)| *s != u64::MAX && *s <= second && second - *s < window)
        .map(|(_, v)| v)
        .sum()
}

// === Whether to retry ===

/// True when the outcome of a try allows another under `policy`.
pub fn retryable<B>(policy: &RetryPolicy, outcome: Result<&Response<B>, &ProxyError>) -> bool {
    let on: &RetryOn = &policy.on;
    match outcome {
        Err(
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. } | ProxyError::Tls { .. },
        ) => on.connect_failure || on.server_error || on.gateway_error,
        Err(ProxyError::Reset { .. }) => on.reset || on.server_error,
        Err(ProxyError::PerTryTimeout(_)) => on.server_error || on.gateway_error || on.reset,
        Err(_) => false,
        Ok(response) => {
            let status = response.status().as_u16();
            (on.server_error && status >= 500)
                || (on.gateway_error && matches!(status, 502..=504))
                || (on.retriable_status_codes && policy.retriable_status_codes.contains(&status))
                || grpc_status(response.headers()).is_some_and(|code| on.grpc(code))
        }
    }
}

/// The pause before retry number `retry` (1-based): exponential from
/// `base`, capped at `max`, with full jitter.
pub fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let exp = policy
        .backoff_base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(policy.backoff_max);
    let nanos = u64::try_from(exp.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

// === Replaying the request body ===

/// Makes the bodies of further tries.
#[derive(Debug)]
pub struct Replayer {
    shared: Arc<Mutex<Replay>>,
}

impl Replayer {
    /// The next try's body, or `None` when the body cannot be replayed
    /// (it outgrew the replay buffer).
    pub fn retry(&self) -> Option<ReplayBody> {
        let mut shared = lock(&self.shared);
        if shared.overflowed {
            return None;
        }
        shared.generation += 1;
        Some(ReplayBody {
            shared: self.shared.clone(),
            generation: shared.generation,
            position: 0,
            trailers_sent: false,
        })
    }
}

/// A request body that can be sent more than once: each try gets a
/// `ReplayBody`, which first replays what earlier tries read and then reads
/// on from the original body, recording as it goes until [`REPLAY_LIMIT`]
/// is passed. Only the newest try may read the original body; an abandoned
/// try's body just ends.
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Replay>>,
    generation: u64,
    position: usize,
    trailers_sent: bool,
}

#[derive(Debug)]
struct Replay {
    original: Option<Drained>,
    /// Data frames read so far, while under the limit.
    frames: Vec<Bytes>,
    length: usize,
    trailers: Option<HeaderMap>,
    /// The original body has ended.
    complete: bool,
    /// More than the limit was read: no more tries.
    overflowed: bool,
    generation: u64,
    size_hint: SizeHint,
}

impl ReplayBody {
    /// The first try's body, and what makes the next ones.
    pub fn new(original: Drained) -> (ReplayBody, Replayer) {
        let size_hint = original.size_hint();
        let shared = Arc::new(Mutex::new(Replay {
            original: Some(original),
            frames: Vec::new(),
            length: 0,
            trailers: None,
            complete: false,
            overflowed: false,
            generation: 0,
            size_hint,
        }));
        let first = ReplayBody {
            shared: shared.clone(),
            generation: 0,
            position: 0,
            trailers_sent: false,
        };
        (first, Replayer { shared })
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut shared = lock(&this.shared);
        if !shared.overflowed && this.position < shared.frames.len() {
            let data = shared.frames[this.position].clone();
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if shared.complete {
            if !this.trailers_sent
                && let Some(trailers) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        if this.generation != shared.generation {
            // An abandoned try: it must not consume the original body.
            return Poll::Ready(None);
        }
        let Some(original) = shared.original.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(original).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.complete = true;
                shared.original = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !shared.overflowed {
                        shared.length += data.len();
                        if shared.length > REPLAY_LIMIT {
                            shared.overflowed = true;
                            shared.frames = Vec::new();
                        } else {
                            shared.frames.push(data.clone());
                            this.position = shared.frames.len();
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    shared.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = lock(&self.shared);
        shared.complete
            && (shared.overflowed || self.position >= shared.frames.len())
            && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.shared).size_hint
    }
}

fn lock(m: &Mutex<Replay>) -> std::sync::MutexGuard<'_, Replay> {
    // Every update leaves the record consistent; a panic mid-poll cannot
    // leave it half-written.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_allows_a_few_retries_per_second_without_requests() {
        let b = RetryBudget::new(0.2, 3);
        let t = Instant::now();
        assert!((0..3).all(|_| b.try_withdraw(t)));
        assert!(!b.try_withdraw(t));
        assert!(b.try_withdraw(t + Duration::from_secs(1)), "a new second");
    }

    #[test]
    fn retries_are_bounded_by_the_ratio_over_the_window() {
        let b = RetryBudget::new(0.2, 0);
        let t = Instant::now();
        for _ in 0..100 {
            b.deposit(t);
        }
        let allowed = (0..100).filter(|_| b.try_withdraw(t)).count();
        assert_eq!(allowed, 20);
        // Deposits expire after the window.
        assert!(!b.try_withdraw(t + Duration::from_secs(11)));
    }
}
