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

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use p2p_crypto::NodeId;
use tokio::{sync::oneshot, task::JoinSet};

use super::{deliver, duration_ms, mailbox, now_ms, Inner};
use crate::{
    endpoint::{lanes::AckResult, Connection, Lane},
    net::PathKind,
    store::{OutboxEntry, OutboxSlot},
    wire::{AckStatus, MessageId},
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

/// Messages of one queue on their way at once: written one after the other on one
/// lane, ahead of their acks, so they arrive in order and the receiver stores them in
/// shared writes; they are also read from the store this many at a time. One at a time,
/// a queue drained at one round trip and one receiver's fsync per message (a thousand
/// messages over a 100 ms round trip: 100 s). With 32 the drain ran at about half the
/// rate of live sends on loopback, with 128 at about the same (BENCHMARKS.md, item 28).
const DRAIN_WINDOW: usize = 128;

/// Tries the queue of one peer in order; after a failure to reach the peer, the rest
/// only gets rescheduled (and deposited). Returns the earliest next attempt.
async fn work_peer(inner: Arc<Inner>, peer: NodeId, queue: Vec<OutboxSlot>) -> Option<u64> {
    let mut drain = Drain::new(inner.clone(), peer);
    for chunk in queue.chunks(DRAIN_WINDOW) {
        if inner.cancel.is_cancelled() {
            break;
        }
        let ids: Vec<MessageId> = chunk
            .iter()
            .map(|slot| slot.id)
            .filter(|id| inner.delivery().try_start(*id))
            .collect();
        // The round read the outbox before these attempts: a message's own send may have
        // been acknowledged and settled since. Only what is still queued goes again, and
        // the messages are read now, a window at a time.
        let read = {
            let ids = ids.clone();
            inner.blocking(move |s| s.outbox_entries(&peer, &ids)).await
        };
        let entries = match read {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot read the outbox");
                ids.iter().for_each(|id| inner.delivery().finish(id));
                continue;
            }
        };
        for (id, entry) in ids.iter().zip(entries) {
            match entry {
                Ok(Some(entry)) if !inner.cancel.is_cancelled() => drain.push(entry).await,
                Ok(_) => inner.delivery().finish(id),
                Err(e) => {
                    tracing::warn!(%peer, message = %id, error = %e, "cannot read the outbox");
                    inner.delivery().finish(id);
                }
            }
        }
    }
    drain.finish().await
}

/// A message of a [`Drain`] written on its lane, waiting for its ack.
struct Waiting {
    entry: OutboxEntry,
    ack: oneshot::Receiver<AckResult>,
    deadline: tokio::time::Instant,
}

/// One peer's queue on its way, in order: pipelined on one lane ([`DRAIN_WINDOW`]
/// messages at most waiting for their acks) while that lane works; one message at a
/// time ([`deliver::deliver`], which dials again and tries another stream) for the rest
/// of the round once it failed, or to a peer that serves one message per stream. Each
/// entry it takes ends settled or rescheduled, and no longer in flight.
struct Drain {
    inner: Arc<Inner>,
    peer: NodeId,
    /// The lane of the pipelined messages, once opened.
    lane: Option<(Connection, Arc<Lane>)>,
    /// Whether messages still go on a lane.
    pipelined: bool,
    waiting: VecDeque<Waiting>,
    /// The peer could not be reached: the rest is only rescheduled.
    unreachable: bool,
    next_due: Option<u64>,
}

impl Drain {
    fn new(inner: Arc<Inner>, peer: NodeId) -> Self {
        Self {
            inner,
            peer,
            lane: None,
            pipelined: true,
            waiting: VecDeque::new(),
            unreachable: false,
            next_due: None,
        }
    }

    /// Sends `entry` behind the ones before it.
    async fn push(&mut self, entry: OutboxEntry) {
        if self.pipelined && !self.unreachable {
            if let Err(entry) = self.pipeline(entry).await {
                self.one(entry).await;
            }
        } else {
            self.one(entry).await;
        }
    }

    /// Writes `entry` on the lane (opened first if need be), and settles the oldest
    /// waiting message once [`DRAIN_WINDOW`] wait. Gives the entry back when it must go
    /// on its own instead (no lane).
    async fn pipeline(&mut self, entry: OutboxEntry) -> Result<(), OutboxEntry> {
        let lane = match &self.lane {
            Some((_, lane)) => lane.clone(),
            None => match deliver::ordered_lane(&self.inner, self.peer).await {
                Ok(Some((conn, lane))) => {
                    self.lane = Some((conn, lane.clone()));
                    lane
                }
                // One message per stream, or the connection went as the lane opened:
                // one at a time (which dials again).
                Ok(None) | Err(deliver::DeliverError::Stream(_)) => {
                    self.pipelined = false;
                    return Err(entry);
                }
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "retry failed");
                    self.unreachable = true;
                    self.failed(entry).await;
                    return Ok(());
                }
            },
        };
        // A peer that stops reading holds the write back: bounded as an ack is.
        let write = tokio::time::timeout(
            self.inner.timings.ack_timeout,
            deliver::send_ordered(&lane, &entry.message),
        );
        let sent = match write.await {
            Ok(Ok(Some(sent))) => sent,
            // The lane closed, the peer took nothing in time (or the message does not
            // encode): the ones waiting on the lane go again one at a time, as this one
            // does.
            Ok(Ok(None) | Err(_)) | Err(_) => {
                self.break_lane(None).await;
                return Err(entry);
            }
        };
        self.waiting.push_back(Waiting {
            entry,
            ack: sent.ack,
            deadline: tokio::time::Instant::now() + self.inner.timings.ack_timeout,
        });
        while self.waiting.len() >= DRAIN_WINDOW && self.pipelined {
            self.settle_front().await;
        }
        Ok(())
    }

    /// Waits for the ack of the oldest message on the lane and settles it; if none
    /// comes, the lane is done with (see [`Drain::break_lane`]).
    async fn settle_front(&mut self) {
        let Some(Waiting {
            entry,
            ack,
            deadline,
        }) = self.waiting.pop_front()
        else {
            return;
        };
        let answer = tokio::select! {
            _ = self.inner.cancel.cancelled() => None,
            r = tokio::time::timeout_at(deadline, ack) => match r {
                Ok(Ok(Ok(ack))) => Some(ack),
                _ => None,
            },
        };
        let Some(ack) = answer else {
            self.break_lane(Some(entry)).await;
            return;
        };
        let path = self.lane.as_ref().and_then(|(conn, _)| conn.path());
        self.delivered(entry.message.id, ack.status, path).await;
    }

    /// Records the peer's answer to message `id`, no longer in flight.
    async fn delivered(&self, id: MessageId, status: AckStatus, path: Option<PathKind>) {
        if let Err(e) = deliver::settle(&self.inner, self.peer, id, status, path).await {
            tracing::warn!(peer = %self.peer, message = %id, error = %e, "cannot record delivery");
        }
        self.inner.delivery().finish(&id);
    }

    /// Stops pipelining for the rest of the round: `first` (whose ack did not come) and
    /// the messages waiting on the lane go again one at a time, in order (the receiver
    /// acknowledges one it stored already as a duplicate).
    async fn break_lane(&mut self, first: Option<OutboxEntry>) {
        tracing::debug!(peer = %self.peer, waiting = self.waiting.len(), "outbox lane failed; sending one at a time");
        self.pipelined = false;
        self.lane = None;
        if let Some(entry) = first {
            self.one(entry).await;
        }
        while let Some(w) = self.waiting.pop_front() {
            self.one(w.entry).await;
        }
    }

    /// Sends `entry` on its own and waits for its ack (or reschedules it); once the node
    /// stops, only lets it go.
    async fn one(&mut self, entry: OutboxEntry) {
        if self.inner.cancel.is_cancelled() {
            // The node stops: the entry stays queued as it is, for the next start.
            self.inner.delivery().finish(&entry.message.id);
            return;
        }
        if self.unreachable {
            self.failed(entry).await;
            return;
        }
        let id = entry.message.id;
        match deliver::deliver(&self.inner, self.peer, &entry.message).await {
            Ok(acked) => self.delivered(id, acked.status, acked.path).await,
            Err(e) => {
                tracing::debug!(peer = %self.peer, message = %id, error = %e, "retry failed");
                self.unreachable = !matches!(
                    e,
                    deliver::DeliverError::AckTimeout | deliver::DeliverError::BadAck
                );
                self.failed(entry).await;
            }
        }
    }

    /// Reschedules `entry` (and deposits it), no longer in flight.
    async fn failed(&mut self, entry: OutboxEntry) {
        let id = entry.message.id;
        let (at, _) = after_failure(&self.inner, entry).await;
        self.next_due = Some(self.next_due.map_or(at, |n| n.min(at)));
        self.inner.delivery().finish(&id);
    }

    /// Settles what still waits on the lane; returns the earliest next attempt.
    async fn finish(mut self) -> Option<u64> {
        while !self.waiting.is_empty() {
            self.settle_front().await;
        }
        self.next_due
    }
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
