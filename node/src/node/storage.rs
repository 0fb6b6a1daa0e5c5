//! Healing the database after an I/O error.
//!
//! On a full disk (or a file system turned read-only) a redb commit fails with an I/O
//! error, and redb then refuses every later write ("Previous I/O error occurred") until
//! the database is opened again. When the writer sees such an error it marks the
//! storage failing ([`Health::fail`]) and tells the user
//! ([`NodeEvent::StorageFailing`]); from then on it refuses every write at once with
//! that error, so incoming messages are not acknowledged (their senders keep them and
//! retry) and outgoing ones are not sent. The heal task closes and opens the database
//! again with backoff ([`reopen_delay`]), checks that a durable commit gets through,
//! and only then lets the writer write again ([`NodeEvent::StorageRecovered`]), wakes
//! the outbox and drains the mailbox, so what waited elsewhere meanwhile arrives
//! without a restart.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;

use super::{lock, Inner, NodeEvent};
use crate::store::StoreError;

/// First delay before the database is opened again after an I/O error.
pub(crate) const REOPEN_MIN: Duration = Duration::from_millis(200);
/// Longest delay between two attempts to open it again.
pub(crate) const REOPEN_MAX: Duration = Duration::from_secs(5);

/// The delay before attempt `attempt` (from 1) to open the database again: doubling
/// from [`REOPEN_MIN`] to [`REOPEN_MAX`].
pub(crate) fn reopen_delay(attempt: u32) -> Duration {
    let shift = attempt.saturating_sub(1).min(16);
    REOPEN_MIN.saturating_mul(1u32 << shift).min(REOPEN_MAX)
}

/// Whether the database takes writes; shared by the writer and the heal task.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// The error that made the storage fail, while it does.
    failing: Mutex<Option<Arc<StoreError>>>,
    /// Wakes the heal task when the storage starts failing.
    failed: Notify,
}

impl Health {
    /// The error to refuse writes with while the storage fails.
    pub(crate) fn failing(&self) -> Option<Arc<StoreError>> {
        lock(&self.failing).clone()
    }

    /// Marks the storage failing with `error`; `true` when it was healthy until now.
    pub(crate) fn fail(&self, error: Arc<StoreError>) -> bool {
        let was_healthy = lock(&self.failing).replace(error).is_none();
        if was_healthy {
            self.failed.notify_one();
        }
        was_healthy
    }

    /// Marks the storage healthy again; `true` when it was failing.
    fn recover(&self) -> bool {
        lock(&self.failing).take().is_some()
    }

    /// Keeps the storage failing, with a newer error.
    fn still_failing(&self, error: Arc<StoreError>) {
        if let Some(e) = lock(&self.failing).as_mut() {
            *e = error;
        }
    }
}

/// Opens the database again whenever the storage fails, until the node stops.
pub(super) async fn heal_loop(inner: Arc<Inner>) {
    loop {
        if inner.health.failing().is_none() {
            tokio::select! {
                _ = inner.cancel.cancelled() => return,
                _ = inner.health.failed.notified() => {}
            }
            continue;
        }
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(reopen_delay(attempt)) => {}
            }
            let store = inner.store.clone();
            let reopened = tokio::task::spawn_blocking(move || {
                store.reopen()?;
                store.check_writable()
            })
            .await;
            match reopened {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, attempt, "the database cannot be written yet");
                    inner.health.still_failing(Arc::new(e));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reopening the database failed");
                }
            }
        }
        if inner.health.recover() {
            tracing::info!(attempts = attempt, "the database takes writes again");
            inner.emit(NodeEvent::StorageRecovered);
            // What waited meanwhile: our own outbox, and messages senders left in our
            // mailbox while we refused them.
            inner.outbox_wake.notify_one();
            let drain = inner.clone();
            inner.tracker.spawn(async move {
                if let Err(e) = super::mailbox::drain(&drain).await {
                    tracing::debug!(error = %e, "cannot drain the mailbox after the database recovered");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_backs_off_within_bounds() {
        assert_eq!(reopen_delay(0), REOPEN_MIN);
        assert_eq!(reopen_delay(1), REOPEN_MIN);
        assert_eq!(reopen_delay(2), REOPEN_MIN * 2);
        assert_eq!(reopen_delay(5), REOPEN_MIN * 16);
        assert_eq!(reopen_delay(6), REOPEN_MAX);
        assert_eq!(reopen_delay(u32::MAX), REOPEN_MAX);
    }

    #[test]
    fn failing_is_reported_once_until_recovered() {
        let h = Health::default();
        assert!(h.failing().is_none());
        assert!(h.fail(Arc::new(StoreError::Internal("disk full"))));
        assert!(
            !h.fail(Arc::new(StoreError::Internal("again"))),
            "already failing"
        );
        assert!(h.failing().is_some());
        h.still_failing(Arc::new(StoreError::Internal("later")));
        assert!(matches!(
            h.failing().as_deref(),
            Some(StoreError::Internal("later"))
        ));
        assert!(h.recover());
        assert!(!h.recover());
        assert!(h.failing().is_none());
    }
}
