//! The outbox task: retries direct delivery of queued messages.
//!
//! Each entry carries its own schedule (`attempts`, `next_attempt_ms`, in the database,
//! so it survives restarts). A round takes the entries that are due, plus every entry
//! of a peer that just appeared online or connected to us, and tries them peer by peer
//! (a few peers at a time). A failed attempt doubles the entry's delay, from
//! [`Timings::retry_min`](super::Timings::retry_min) up to
//! [`Timings::retry_max`](super::Timings::retry_max), and deposits a sealed copy in the
//! recipient's mailbox if none was deposited yet. Between rounds the task sleeps until
//! the earliest due entry or until it is woken.

use std::{collections::HashSet, sync::Arc, time::Duration};

use p2p_crypto::NodeId;
use tokio::task::JoinSet;

use super::{deliver, duration_ms, mailbox, now_ms, Inner};
use crate::{
    store::{OutboxEntry, OutboxSlot},
    wire::MessageId,
};

/// Peers whose queues are worked on at once.
const PARALLEL_PEERS: usize = 8;

pub(super) async fn run(inner: Arc<Inner>) {
    loop {
        let next_due = match round(&inner).await {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e, "outbox round failed");
                Some(now_ms().saturating_add(duration_ms(inner.timings.retry_min)))
            }
        };
        let wait = match next_due {
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => inner.timings.retry_max,
        }
        .clamp(Duration::from_millis(10), inner.timings.retry_max);
        tokio::select! {
            _ = inner.cancel.cancelled() => break,
            _ = inner.outbox_wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One pass over the outbox. Returns when the next entry is due, if any remain.
async fn round(inner: &Arc<Inner>) -> Result<Option<u64>, super::StorageError> {
    round_of(inner, false).await
}

/// One pass over every entry not yet in its recipient's mailbox, due or not (see
/// [`Node::flush_outbox`]).
///
/// [`Node::flush_outbox`]: super::Node::flush_outbox
pub(super) async fn flush(inner: Arc<Inner>) -> Result<Option<u64>, super::StorageError> {
    round_of(&inner, true).await
}

/// One pass over the entries that are due (all of them with `all`).
async fn round_of(inner: &Arc<Inner>, all: bool) -> Result<Option<u64>, super::StorageError> {
    let now = now_ms();
    let (woken, in_flight) = inner.delivery().take_round();
    let kept = woken.clone();
    let plan = inner
        .blocking(move |s| {
            let mut plan = Plan::default();
            s.outbox_schedule(|peer, slots| {
                plan.add(peer, slots, now, all, &woken, &in_flight);
            })?;
            Ok(plan)
        })
        .await;
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => {
            // Nothing was tried: the peers woken for this round wait for the next.
            inner.delivery().rewake(kept);
            return Err(e);
        }
    };
    if !plan.queued {
        inner.delivery().clear_wakes();
        return Ok(None);
    }
    if !plan.busy_woken.is_empty() {
        inner.delivery().rewake(plan.busy_woken);
    }
    let mut next_due = plan.next_due;
    let mut tasks = JoinSet::new();
    for (peer, queue) in plan.due {
        while tasks.len() >= PARALLEL_PEERS {
            collect(&mut tasks, &mut next_due).await;
        }
        tasks.spawn(work_peer(inner.clone(), peer, queue));
    }
    while !tasks.is_empty() {
        collect(&mut tasks, &mut next_due).await;
    }
    Ok(next_due)
}

/// What one round does, decided from the outbox's bookkeeping alone.
#[derive(Debug, Default)]
struct Plan {
    /// Whether the outbox holds anything.
    queued: bool,
    /// The queues to try now, each in the order its messages were sent.
    due: Vec<(NodeId, Vec<OutboxSlot>)>,
    /// When the earliest queue not tried now is due.
    next_due: Option<u64>,
    /// Woken peers with a message being sent right now (see [`Plan::add`]).
    busy_woken: HashSet<NodeId>,
}

impl Plan {
    /// Takes the queue of one recipient: due as a whole or not at all.
    fn add(
        &mut self,
        peer: NodeId,
        slots: Vec<OutboxSlot>,
        now: u64,
        all: bool,
        woken: &HashSet<NodeId>,
        in_flight: &HashSet<MessageId>,
    ) {
        self.queued = true;
        let was_woken = woken.contains(&peer);
        let mut peer_due = false;
        let mut queue = Vec::with_capacity(slots.len());
        for slot in slots {
            if in_flight.contains(&slot.id) {
                // Being sent right now. If its peer was just woken (came online, or
                // connected to us), keep the wake-up for when that attempt is over: it
                // may have failed against the peer's old address.
                if was_woken {
                    self.busy_woken.insert(peer);
                }
                continue;
            }
            if all && slot.mailbox_deposited {
                // In the mailbox already: it arrives without us; leave the rest to the
                // schedule.
                continue;
            }
            // A peer's queue is tried as a whole, in order, once any of it is due: its
            // entries have schedules of their own (each counts its own attempts), and
            // trying only the due ones would let a later message overtake an earlier one.
            peer_due |= all || slot.next_attempt_ms <= now || was_woken;
            queue.push(slot);
        }
        if peer_due {
            // In the order they were sent (`created_ms` is a strictly increasing stamp).
            queue.sort_by_key(|s| (s.created_ms, s.id.0));
            self.due.push((peer, queue));
        } else if let Some(at) = queue.iter().map(|s| s.next_attempt_ms).min() {
            self.next_due = Some(self.next_due.map_or(at, |n| n.min(at)));
        }
    }
}

async fn collect(tasks: &mut JoinSet<Option<u64>>, next_due: &mut Option<u64>) {
    if let Some(Ok(Some(at))) = tasks.join_next().await {
        *next_due = Some(next_due.map_or(at, |n| n.min(at)));
    }
}

/// Tries the queue of one peer in order; after a failure to reach the peer, the rest
/// only gets rescheduled (and deposited). Returns the earliest next attempt.
async fn work_peer(inner: Arc<Inner>, peer: NodeId, queue: Vec<OutboxSlot>) -> Option<u64> {
    let mut next_due: Option<u64> = None;
    let mut unreachable = false;
    for slot in queue {
        if inner.cancel.is_cancelled() {
            break;
        }
        let id = slot.id;
        if !inner.delivery().try_start(id) {
            continue;
        }
        // The round read the outbox before this attempt: the message's own send may have
        // been acknowledged and settled since. Only what is still queued goes again, and
        // its message is read now, one at a time.
        let entry = match inner.blocking(move |s| s.outbox_entry(&peer, &id)).await {
            Ok(Some(entry)) => entry,
            Ok(None) => {
                inner.delivery().finish(&id);
                continue;
            }
            Err(e) => {
                tracing::warn!(%peer, message = %id, error = %e, "cannot read the outbox");
                inner.delivery().finish(&id);
                continue;
            }
        };
        let outcome = if unreachable {
            None
        } else {
            Some(deliver::deliver(&inner, peer, &entry.message).await)
        };
        match outcome {
            Some(Ok(acked)) => {
                if let Err(e) = deliver::settle(&inner, peer, id, acked.status, acked.path).await {
                    tracing::warn!(%peer, message = %id, error = %e, "cannot record delivery");
                }
            }
            Some(Err(e)) => {
                tracing::debug!(%peer, message = %id, error = %e, "retry failed");
                unreachable = !matches!(
                    e,
                    deliver::DeliverError::AckTimeout | deliver::DeliverError::BadAck
                );
                let (at, _) = after_failure(&inner, entry).await;
                next_due = Some(next_due.map_or(at, |n| n.min(at)));
            }
            None => {
                let (at, _) = after_failure(&inner, entry).await;
                next_due = Some(next_due.map_or(at, |n| n.min(at)));
            }
        }
        inner.delivery().finish(&id);
    }
    next_due
}

/// Reschedules an entry after a failed attempt, depositing it in the recipient's
/// mailbox if it is not there yet. Returns the next attempt's time and whether the entry
/// is in the mailbox now.
pub(super) async fn after_failure(inner: &Arc<Inner>, mut entry: OutboxEntry) -> (u64, bool) {
    entry.attempts = entry.attempts.saturating_add(1);
    entry.next_attempt_ms =
        now_ms().saturating_add(duration_ms(inner.timings.backoff(entry.attempts)));
    if !entry.mailbox_deposited && inner.disco.is_some() {
        match mailbox::deposit_message(inner, &entry).await {
            Ok(()) => entry.mailbox_deposited = true,
            Err(e) => tracing::info!(
                peer = %entry.to,
                message = %entry.message.id,
                error = %e,
                "cannot deposit in the mailbox yet"
            ),
        }
    }
    let (at, deposited) = (entry.next_attempt_ms, entry.mailbox_deposited);
    if let Err(e) = inner.blocking(move |s| s.update_outbox(&entry)).await {
        tracing::warn!(error = %e, "cannot update the outbox");
    }
    (at, deposited)
}
