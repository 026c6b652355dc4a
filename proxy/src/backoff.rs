//! Capped exponential backoff with jitter, for whatever retries talking to
//! the control plane (the xDS stream, certificate requests).

use std::time::Duration;

/// Each delay is drawn between half and all of `initial * 2^attempt`,
/// capped at `max`, so a fleet that lost the control plane together does
/// not come back in lockstep.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// Starts at `initial`, never above `max` (at least `initial`).
    pub(crate) fn new(initial: Duration, max: Duration, rng: fastrand::Rng) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng,
        }
    }

    /// The next delay; each call doubles the ceiling until `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter = self
            .rng
            .u64(0..=u64::try_from(half.as_micros()).unwrap_or(u64::MAX));
        half + Duration::from_micros(jitter)
    }

    /// Back to `initial`, after a success.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            fastrand::Rng::with_seed(7),
        );
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = (Duration::from_millis(100) * (1 << i)).min(Duration::from_secs(5));
            assert!(*d >= ceiling / 2 && *d <= ceiling, "attempt {i}: {d:?}");
        }
        assert!(delays[9] >= Duration::from_millis(2500), "capped near 5 s");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
