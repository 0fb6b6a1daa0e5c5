//! The group-commit writer: one thread owns every write of messages, incoming and
//! outgoing, and of their delivery marks.
//!
//! It takes the first queued request, drains whatever else is queued (up to
//! [`MAX_WRITE_BATCH`]), applies all of them with one [`Store::write_batch`] (one append
//! to the write log and one fsync), and only then answers each request. A receiver sends
//! its acknowledgement after that answer, so every ack follows a durable write, and
//! under load many messages share one fsync. After [`FOLD_IDLE`] without a request it
//! folds the acknowledged writes into the database ([`Store::flush`]). Each write is
//! stamped when the writer takes it, with a strictly increasing clock, so messages keep
//! the order in which they were written.
//!
//! A batch that fails with an I/O error (a full disk) marks the storage failing (see
//! [`super::storage`]); until the heal task opened the database again, every request
//! is refused at once with that error, and nothing is acknowledged.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use p2p_crypto::NodeId;
use tokio::sync::{mpsc, oneshot};

use super::{lock, stamp_ms, storage::Health, NodeEvent, StorageError, MAX_WRITE_BATCH};
use crate::{
    store::{MarkOutcome, MessageStatus, Store, StoreError, WriteOp, WriteOutcome},
    wire::{ChatMessage, MessageId},
};

/// Requests that may wait for the writer; senders wait when it is full (backpressure).
const QUEUE: usize = 4096;

/// The outcome of one write: what happened, and the local time it was stamped with.
pub(crate) type WriteResult = Result<(WriteOutcome, u64), Arc<StoreError>>;

/// A write before it is stamped.
enum Op {
    Incoming {
        peer: NodeId,
        msg: ChatMessage,
    },
    Outgoing {
        to: NodeId,
        msg: ChatMessage,
    },
    Finish {
        peer: NodeId,
        id: MessageId,
        status: MessageStatus,
    },
    /// Writes nothing; answered once every write queued before it is committed.
    Barrier,
}

struct WriteReq {
    op: Op,
    reply: oneshot::Sender<WriteResult>,
}

/// Handle for submitting writes.
pub(crate) struct Writer {
    tx: Mutex<Option<mpsc::Sender<WriteReq>>>,
}

/// Where the writer reports the health of the storage.
pub(crate) struct Report {
    pub health: Arc<Health>,
    pub events: tokio::sync::broadcast::Sender<NodeEvent>,
}

/// Starts the writer thread.
pub(crate) fn spawn(
    store: Arc<Store>,
    report: Report,
) -> std::io::Result<(Writer, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let handle = std::thread::Builder::new()
        .name("p2p-node-writer".into())
        .spawn(move || run(store, rx, report))?;
    Ok((
        Writer {
            tx: Mutex::new(Some(tx)),
        },
        handle,
    ))
}

impl Writer {
    /// Queues an incoming message and returns the receiver of its outcome, so a caller
    /// with many messages can queue them all before waiting (they then share commits).
    pub(crate) async fn submit(
        &self,
        peer: NodeId,
        msg: ChatMessage,
    ) -> Result<oneshot::Receiver<WriteResult>, StorageError> {
        self.queue(Op::Incoming { peer, msg }).await
    }

    /// Queues the durable write of an outgoing message to the history and the outbox;
    /// returns the receiver of its outcome (see [`outcome`]) without waiting for it.
    pub(crate) async fn submit_outgoing(
        &self,
        to: NodeId,
        msg: ChatMessage,
    ) -> Result<oneshot::Receiver<WriteResult>, StorageError> {
        self.queue(Op::Outgoing { to, msg }).await
    }

    /// Queues the final answer of `peer` to outgoing message `id`; returns the receiver
    /// of its outcome without waiting for the write.
    pub(crate) async fn finish(
        &self,
        peer: NodeId,
        id: MessageId,
        status: MessageStatus,
    ) -> Result<oneshot::Receiver<WriteResult>, StorageError> {
        self.queue(Op::Finish { peer, id, status }).await
    }

    /// Waits until every write queued so far is committed (reads after it see them).
    pub(crate) async fn sync(&self) -> Result<(), StorageError> {
        self.wait(Op::Barrier).await.map(|_| ())
    }

    async fn wait(&self, op: Op) -> Result<(WriteOutcome, u64), StorageError> {
        outcome(self.queue(op).await?).await
    }

    async fn queue(&self, op: Op) -> Result<oneshot::Receiver<WriteResult>, StorageError> {
        let tx = lock(&self.tx).clone().ok_or(StorageError::Shutdown)?;
        let (reply, rx) = oneshot::channel();
        tx.send(WriteReq { op, reply })
            .await
            .map_err(|_| StorageError::Shutdown)?;
        Ok(rx)
    }

    /// Stops accepting writes; the thread ends once the queued ones are done.
    pub(crate) fn close(&self) {
        lock(&self.tx).take();
    }
}

/// Waits for the outcome of a queued write.
pub(crate) async fn outcome(
    rx: oneshot::Receiver<WriteResult>,
) -> Result<(WriteOutcome, u64), StorageError> {
    match rx.await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(StorageError::Store(e)),
        Err(_) => Err(StorageError::Shutdown),
    }
}

/// How long the writer looks for the next request before it parks.
const SPIN: Duration = Duration::from_micros(50);

/// How long the writer waits without a request before it folds the acknowledged writes
/// into the database ([`Store::flush`]): under load they fold every
/// [`crate::store::FOLD_WRITES`] writes instead.
const FOLD_IDLE: Duration = Duration::from_millis(100);

/// What the writer waits for next.
enum Next {
    Request(WriteReq),
    /// No request came for [`FOLD_IDLE`].
    Idle,
    /// Every sender is gone.
    Closed,
}

/// The next request: one that comes within [`SPIN`] is taken without parking (a parked
/// thread takes tens of microseconds to run again on a VM, and waking it costs its
/// sender a system call); then waits for one, for [`FOLD_IDLE`] when `idle` is given.
fn next_request(rx: &mut mpsc::Receiver<WriteReq>, idle: Option<&tokio::runtime::Runtime>) -> Next {
    let until = Instant::now() + SPIN;
    let next = loop {
        match rx.try_recv() {
            Ok(r) => return Next::Request(r),
            Err(mpsc::error::TryRecvError::Disconnected) => return Next::Closed,
            Err(mpsc::error::TryRecvError::Empty) if Instant::now() < until => {
                std::thread::yield_now();
            }
            Err(mpsc::error::TryRecvError::Empty) => match idle {
                Some(rt) => {
                    break rt.block_on(async { tokio::time::timeout(FOLD_IDLE, rx.recv()).await })
                }
                None => break Ok(rx.blocking_recv()),
            },
        }
    };
    match next {
        Ok(Some(r)) => Next::Request(r),
        Ok(None) => Next::Closed,
        Err(_) => Next::Idle,
    }
}

fn run(store: Arc<Store>, mut rx: mpsc::Receiver<WriteReq>, report: Report) {
    if let Err(e) = store.prepare_log() {
        // The first write grows the log instead (and reports what fails then).
        tracing::debug!(error = %e, "cannot ready the write log");
    }
    // A clock for the idle wait; without one, writes fold only under load and at the end.
    let clock = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .inspect_err(
            |e| tracing::warn!(error = %e, "the writer has no timer; idle writes fold at shutdown"),
        )
        .ok();
    let mut batch: Vec<WriteReq> = Vec::with_capacity(MAX_WRITE_BATCH);
    loop {
        let idle = clock.as_ref().filter(|_| store.unfolded());
        let first = match next_request(&mut rx, idle) {
            Next::Request(r) => r,
            Next::Closed => break,
            Next::Idle => {
                if report.health.failing().is_none() {
                    if let Err(e) = store.flush() {
                        failed(&report, &Arc::new(e));
                    }
                }
                continue;
            }
        };
        batch.push(first);
        while batch.len() < MAX_WRITE_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if let Some(e) = report.health.failing() {
            // The database is being opened again: refuse without touching it.
            for req in batch.drain(..) {
                let _ = req.reply.send(Err(e.clone()));
            }
            continue;
        }
        if let Some(e) = write_batch(&store, &mut batch) {
            failed(&report, &e);
        }
    }
    // Fold what was acknowledged into the database before the node stops (the write
    // log would keep it otherwise, until the next open).
    if let Err(e) = store.flush() {
        tracing::warn!(error = %e, "cannot flush the database at shutdown");
    }
}

/// Marks the storage failing after an I/O error (a full disk), once.
fn failed(report: &Report, e: &Arc<StoreError>) {
    if e.is_io() && report.health.fail(e.clone()) {
        tracing::error!(error = %e, "the database cannot be written; refusing messages until it can");
        let _ = report.events.send(NodeEvent::StorageFailing {
            error: e.to_string(),
        });
    }
}

/// Writes a batch and answers it; returns the error that failed the whole batch, if one
/// did.
fn write_batch(store: &Store, batch: &mut Vec<WriteReq>) -> Option<Arc<StoreError>> {
    // Barriers write nothing: they are answered after the commit of the others.
    let barriers: Vec<WriteReq> = {
        let (barriers, writes) = batch.drain(..).partition(|r| matches!(r.op, Op::Barrier));
        *batch = writes;
        barriers
    };
    let failed = write_ops(store, batch);
    for b in barriers {
        let _ = b.reply.send(match &failed {
            Some(e) => Err(e.clone()),
            None => Ok((WriteOutcome::Marked(MarkOutcome::Unchanged), 0)),
        });
    }
    failed
}

/// The store write of a request, stamped now; `None` for a barrier. Takes the message
/// over: its body is not copied on its way to the store.
fn stamped(op: Op) -> Option<WriteOp> {
    Some(match op {
        Op::Incoming { peer, msg } => WriteOp::Incoming {
            peer,
            msg,
            now_ms: stamp_ms(),
        },
        Op::Outgoing { to, msg } => WriteOp::Outgoing {
            to,
            msg,
            now_ms: stamp_ms(),
        },
        Op::Finish { peer, id, status } => WriteOp::Finish { peer, id, status },
        Op::Barrier => return None,
    })
}

fn write_ops(store: &Store, batch: &mut Vec<WriteReq>) -> Option<Arc<StoreError>> {
    if batch.is_empty() {
        return None;
    }
    // `write_batch` took the barriers out, so every request here has a write.
    let (replies, ops): (Vec<_>, Vec<WriteOp>) = batch
        .drain(..)
        .filter_map(|r| Some((r.reply, stamped(r.op)?)))
        .unzip();
    let stamp = |op: &WriteOp| match op {
        WriteOp::Incoming { now_ms, .. } | WriteOp::Outgoing { now_ms, .. } => *now_ms,
        WriteOp::Finish { .. } => 0,
    };
    match store.write_batch(&ops) {
        Ok(results) if results.len() == replies.len() => {
            for ((reply, op), res) in replies.into_iter().zip(&ops).zip(results) {
                let _ = reply.send(res.map(|o| (o, stamp(op))).map_err(Arc::new));
            }
            None
        }
        Ok(_) => {
            let e = Arc::new(StoreError::Internal(
                "a batch gave the wrong number of outcomes",
            ));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
            None
        }
        Err(e) => {
            tracing::error!(error = %e, count = replies.len(), "cannot write to the database");
            let e = Arc::new(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
            Some(e)
        }
    }
}
