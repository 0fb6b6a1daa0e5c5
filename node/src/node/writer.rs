//! The group-commit writer: one thread owns every write of incoming messages.
//!
//! It takes the first queued request, drains whatever else is queued (up to
//! [`MAX_WRITE_BATCH`]), writes all of them with one [`Store::insert_incoming_batch`]
//! transaction (one fsync), and only then answers each request. A requester sends its
//! acknowledgement after that answer, so every ack follows a durable write, and under
//! load many messages share one fsync.

use std::sync::{Arc, Mutex};

use p2p_crypto::NodeId;
use tokio::sync::{mpsc, oneshot};

use super::{lock, stamp_ms, NodeError, MAX_WRITE_BATCH};
use crate::{
    store::{Inserted, Store, StoreError},
    wire::ChatMessage,
};

/// Requests that may wait for the writer; senders wait when it is full (backpressure).
const QUEUE: usize = 1024;

/// The outcome of one write: what happened, and the local time it was written at.
pub(crate) type WriteResult = Result<(Inserted, u64), Arc<StoreError>>;

struct WriteReq {
    peer: NodeId,
    msg: ChatMessage,
    reply: oneshot::Sender<WriteResult>,
}

/// Handle for submitting writes.
pub(crate) struct Writer {
    tx: Mutex<Option<mpsc::Sender<WriteReq>>>,
}

/// Starts the writer thread.
pub(crate) fn spawn(store: Arc<Store>) -> std::io::Result<(Writer, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let handle = std::thread::Builder::new()
        .name("p2p-node-writer".into())
        .spawn(move || run(store, rx))?;
    Ok((
        Writer {
            tx: Mutex::new(Some(tx)),
        },
        handle,
    ))
}

impl Writer {
    /// Durably stores a message from `peer` (deduplicating by id). Returns after the
    /// commit, with the outcome and the `stored_at_ms` used.
    pub(crate) async fn persist(
        &self,
        peer: NodeId,
        msg: ChatMessage,
    ) -> Result<(Inserted, u64), NodeError> {
        let rx = self.submit(peer, msg).await?;
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(NodeError::Store(e)),
            Err(_) => Err(NodeError::Shutdown),
        }
    }

    /// Queues a write and returns the receiver of its outcome, so a caller with many
    /// messages can queue them all before waiting (they then share commits).
    pub(crate) async fn submit(
        &self,
        peer: NodeId,
        msg: ChatMessage,
    ) -> Result<oneshot::Receiver<WriteResult>, NodeError> {
        let tx = lock(&self.tx).clone().ok_or(NodeError::Shutdown)?;
        let (reply, rx) = oneshot::channel();
        tx.send(WriteReq { peer, msg, reply })
            .await
            .map_err(|_| NodeError::Shutdown)?;
        Ok(rx)
    }

    /// Stops accepting writes; the thread ends once the queued ones are done.
    pub(crate) fn close(&self) {
        lock(&self.tx).take();
    }
}

fn run(store: Arc<Store>, mut rx: mpsc::Receiver<WriteReq>) {
    let mut batch: Vec<WriteReq> = Vec::with_capacity(MAX_WRITE_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_WRITE_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        write_batch(&store, &mut batch);
    }
}

fn write_batch(store: &Store, batch: &mut Vec<WriteReq>) {
    let now = stamp_ms();
    let items: Vec<(NodeId, ChatMessage)> = batch.iter().map(|r| (r.peer, r.msg.clone())).collect();
    match store.insert_incoming_batch(&items, now) {
        Ok(results) if results.len() == batch.len() => {
            for (req, res) in batch.drain(..).zip(results) {
                let _ = req.reply.send(Ok((res, now)));
            }
        }
        Ok(_) | Err(_) if batch.len() > 1 => {
            // One bad message must not fail the others: write them one by one.
            tracing::warn!(
                count = batch.len(),
                "group commit failed; writing messages one by one"
            );
            for req in batch.drain(..) {
                let res = store
                    .insert_incoming(&req.peer, &req.msg, now)
                    .map(|i| (i, now))
                    .map_err(Arc::new);
                let _ = req.reply.send(res);
            }
        }
        Ok(_) => {
            // A single message whose batch returned no result: not expected.
            for req in batch.drain(..) {
                let res = store
                    .insert_incoming(&req.peer, &req.msg, now)
                    .map(|i| (i, now))
                    .map_err(Arc::new);
                let _ = req.reply.send(res);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store an incoming message");
            let e = Arc::new(e);
            for req in batch.drain(..) {
                let _ = req.reply.send(Err(e.clone()));
            }
        }
    }
}
