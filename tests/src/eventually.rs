//! Bounded polling for asynchronous state.
//!
//! Tests never sleep to wait for something: they poll a check until it holds
//! or a deadline passes, and on timeout fail with the check's last error,
//! which says what was seen instead.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

/// Time between two tries when none is given.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `check` every [`DEFAULT_INTERVAL`] until it returns `Ok`, for at
/// most `timeout`. The error names `what` and carries the last failure.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    check: impl AsyncFnMut() -> Result<T>,
) -> Result<T> {
    eventually_every(what, timeout, DEFAULT_INTERVAL, check).await
}

/// [`eventually`] with a chosen interval.
pub async fn eventually_every<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    check: impl AsyncFnMut() -> Result<T>,
) -> Result<T> {
    eventually_until(what, Instant::now() + timeout, interval, check).await
}

/// [`eventually`] with a deadline instead of a timeout, for checks timed
/// from an earlier moment (a file write, say). The check is tried at least
/// once, even if the deadline has already passed.
pub async fn eventually_until<T>(
    what: &str,
    deadline: Instant,
    interval: Duration,
    mut check: impl AsyncFnMut() -> Result<T>,
) -> Result<T> {
    let start = Instant::now();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let err = match check().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(err.context(anyhow!(
                "timed out after {:?} ({tries} tries) waiting for: {what}; last try failed",
                now - start
            )));
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
    }
}

/// Polls an async check returning `anyhow::Result<T>` until it is `Ok`,
/// panicking with the last error after the timeout. Evaluates to the `T`.
///
/// ```
/// use std::time::Duration;
///
/// # tokio::runtime::Runtime::new().expect("runtime").block_on(async {
/// let mut tries = 0;
/// let n = remora_tests::assert_eventually!(
///     Duration::from_secs(1),
///     async || {
///         tries += 1;
///         anyhow::ensure!(tries >= 3, "only {tries} tries so far");
///         Ok(tries)
///     },
///     "the check passes on try {}",
///     3
/// );
/// assert_eq!(n, 3);
/// # });
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $check:expr, $($what:tt)+) => {
        match $crate::eventually::eventually(&format!($($what)+), $timeout, $check).await {
            Ok(v) => v,
            Err(e) => panic!("{e:?}"),
        }
    };
}
