//! Restarting a long-running session after it failed: the one policy every role's loop uses
//! (processor runtimes, projection writers, the cache's change listener).
//!
//! A failed session is restarted after an exponential backoff with jitter (200 ms doubling to
//! 5 s, from `backon`), so a broker or database outage is not hammered by every task at once.
//! A session that ran for a while before failing ([`HEALTHY_AFTER`]) starts the backoff over:
//! one failure a day is not a reason to wait 5 s.

use std::{
    fmt::Display,
    time::{Duration, Instant},
};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// A session that ran this long before it failed counts as healthy: the backoff starts over.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);

fn policy() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The restart policy of one task: call [`Restarts::session_started`] before each session
/// and [`Restarts::failed`] when it returns an error.
pub struct Restarts {
    /// What restarts, for the log: `processor saga`, `projection orders`.
    what: String,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    started: Instant,
}

impl Restarts {
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            delays: Box::new(policy()),
            started: Instant::now(),
        }
    }

    pub fn session_started(&mut self) {
        self.started = Instant::now();
    }

    /// The next delay after a failure of a session that ran for `ran`.
    pub fn next_delay(&mut self, ran: Duration) -> Duration {
        if ran >= HEALTHY_AFTER {
            self.delays = Box::new(policy());
        }
        self.delays.next().unwrap_or(Duration::from_secs(5))
    }

    /// Logs `error` and waits before the next session. Returns `false` if `cancel` fired
    /// meanwhile: the task should end instead.
    pub async fn failed(&mut self, error: &impl Display, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay(self.started.elapsed());
        warn!(task = %self.what, %error, retry_in = ?delay, "Session failed; restarting.");
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_grows_to_its_cap_and_starts_over_after_a_healthy_session() {
        let mut restarts = Restarts::new("test");
        let quick = Duration::from_millis(10);
        let delays: Vec<Duration> = (0..12).map(|_| restarts.next_delay(quick)).collect();
        assert!(delays[0] >= Duration::from_millis(200) && delays[0] < Duration::from_millis(450));
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(10)),
            "capped (with jitter): {delays:?}"
        );
        assert!(
            delays[11] >= Duration::from_secs(5),
            "grew to the cap: {delays:?}"
        );
        let after_healthy = restarts.next_delay(HEALTHY_AFTER);
        assert!(
            after_healthy < Duration::from_millis(450),
            "starts over: {after_healthy:?}"
        );
    }

    #[tokio::test]
    async fn a_cancelled_wait_ends_the_task() {
        let mut restarts = Restarts::new("test");
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(!restarts.failed(&"boom", &cancel).await);
    }
}
