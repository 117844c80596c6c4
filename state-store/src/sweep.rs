//! A periodic background task tied to a store's lifetime: expired items are
//! already invisible to reads, this only reclaims their space.

use std::future::Future;
use std::time::Duration;

/// How often expired items are removed.
pub(crate) const PERIOD: Duration = Duration::from_secs(60);

/// Aborts the task when the store is dropped.
#[derive(Debug)]
pub(crate) struct Sweeper(tokio::task::AbortHandle);

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `pass` every `PERIOD`, first one `PERIOD` after start.
pub(crate) fn every<F, Fut>(mut pass: F) -> Sweeper
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PERIOD, PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            pass().await;
        }
    });
    Sweeper(task.abort_handle())
}
