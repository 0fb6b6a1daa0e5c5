//! Incoming connections and streams.
//!
//! The accept loop refuses connections past the limit, completes each handshake in a
//! task of its own, and then serves the connection: a task per connection accepts
//! streams, and a task per stream reads frames (quinn bounds the streams a peer may have
//! open at once, so tasks per connection are bounded too).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    writer, Inner, NodeEvent, Via, CLOSE_BAD_FRAME, CLOSE_SHUTDOWN, CLOSE_TOO_MANY_CONNECTIONS,
    CLOSE_UNEXPECTED_FRAME, CONNECTION_FRAME_BUDGET, SHUTDOWN_REASON, STREAM_NOT_STORED,
    STREAM_TIMEOUT,
};
use crate::{
    endpoint::Connection,
    store::{Direction, Inserted, MessageStatus, StoredMessage},
    wire::{self, Ack, ChatMessage, Frame, ReadFrameError},
};

mod frames;

use frames::{FrameReader, Next};

/// Accepts connections until the node stops.
pub(super) async fn accept_loop(inner: Arc<Inner>) {
    loop {
        let incoming = tokio::select! {
            _ = inner.cancel.cancelled() => break,
            i = inner.endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let Ok(permit) = inner.conn_limit.clone().try_acquire_owned() else {
            tracing::warn!(from = %incoming.remote_addr(), "connection limit reached; refusing");
            incoming.refuse();
            continue;
        };
        let inner2 = inner.clone();
        inner.tracker.spawn(async move {
            let addr = incoming.remote_addr();
            let accepted = tokio::select! {
                _ = inner2.cancel.cancelled() => return,
                r = tokio::time::timeout(inner2.timings.dial_timeout, incoming.accept()) => r,
            };
            let conn = match accepted {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "incoming handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "incoming handshake timed out");
                    return;
                }
            };
            let peer = conn.remote_node_id();
            if !inner2.pool().take_slot(peer, false) {
                tracing::warn!(%peer, %addr, "too many connections from one peer; closing");
                conn.quic()
                    .close(CLOSE_TOO_MANY_CONNECTIONS, b"too many connections");
                return;
            }
            tracing::debug!(%peer, %addr, "accepted connection");
            inner2.register_connection(&conn, true);
            serve_connection(inner2, conn, permit).await;
        });
    }
}

impl Inner {
    /// Remembers a fresh connection for reuse. For an incoming one, also remembers the
    /// real address the peer came from ([`Connection::real_addr`]) and retries its
    /// outbox at once.
    pub(super) fn register_connection(&self, conn: &Connection, incoming: bool) {
        let peer = conn.remote_node_id();
        let from = incoming.then(|| conn.real_addr()).flatten();
        self.pool().register(conn, from);
        self.peers().note_back(&peer);
        if incoming {
            self.wake_outbox_for(peer);
        }
    }

    /// Forgets `conn` if it is the cached connection of its peer, remembering when it
    /// closed and where the peer was last reached directly: a peer that was connected a
    /// moment ago is tried there once even while discovery calls it offline. A peer
    /// that closed it because it quit is not dialed until it announces itself again.
    pub(super) fn forget_connection(&self, conn: &Connection) {
        self.note_if_quit(conn);
        self.pool().forget(conn, conn.real_addr());
    }

    /// Notes that the peer of `conn` quit, if it closed `conn` saying so: it goes
    /// offline at once.
    pub(super) fn note_if_quit(&self, conn: &Connection) {
        if !peer_quit(conn.quic()) {
            return;
        }
        let peer = conn.remote_node_id();
        let gone = self.peers().note_quit(peer, p2p_discovery::now_ms());
        if let Some(p) = gone {
            tracing::debug!(%peer, "peer offline (it quit)");
            self.emit(NodeEvent::PeerOffline {
                node_id: p.node_id,
                name: p.name,
            });
        }
    }
}

/// Whether the peer closed `conn` because it shuts down: [`CLOSE_SHUTDOWN`] with
/// [`SHUTDOWN_REASON`].
fn peer_quit(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == CLOSE_SHUTDOWN && c.reason.as_ref() == SHUTDOWN_REASON
    )
}

/// Accepts streams on `conn` (dialed or accepted, its peer slot taken) until it
/// closes, a task per stream. The streams share the connection's frame budget
/// ([`CONNECTION_FRAME_BUDGET`]).
pub(super) async fn serve_connection(
    inner: Arc<Inner>,
    conn: Connection,
    _permit: OwnedSemaphorePermit,
) {
    let budget = Arc::new(Semaphore::new(CONNECTION_FRAME_BUDGET));
    let reports = report_received(&inner, conn.remote_node_id());
    loop {
        let stream = tokio::select! {
            _ = inner.cancel.cancelled() => {
                // The node shuts down. Said here, before the last handle goes: a
                // connection dropped unclosed closes with code 0 and no reason, and the
                // endpoint's own close may reach its driver only after that.
                conn.quic().close(CLOSE_SHUTDOWN, SHUTDOWN_REASON);
                break;
            }
            s = conn.quic().accept_bi() => s,
        };
        let (send, recv) = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %conn.remote_node_id(), error = %e, "connection ended");
                break;
            }
        };
        let inner2 = inner.clone();
        let conn2 = conn.clone();
        let (budget, reports) = (budget.clone(), reports.clone());
        inner.tracker.spawn(async move {
            serve_stream(inner2, conn2, budget, reports, send, recv).await;
        });
    }
    inner.forget_connection(&conn);
    inner.pool().release_slot(&conn.remote_node_id());
}

/// Frames stored and acknowledged together, at most.
const BATCH: usize = 64;

/// Handles a frame that could not be read: a failed or timed-out stream ends it, a bad
/// frame closes the connection.
fn read_failed(inner: &Inner, conn: &Connection, e: ReadFrameError) {
    let peer = conn.remote_node_id();
    match e {
        ReadFrameError::Io(e) => tracing::debug!(%peer, error = %e, "stream failed"),
        e => {
            tracing::warn!(%peer, error = %e, "bad frame; closing the connection");
            conn.quic().close(CLOSE_BAD_FRAME, b"bad frame");
            inner.forget_connection(conn);
        }
    }
}

/// Reads message frames from one stream and acknowledges each after storing it, in
/// order; then hands each new message to the connection's `reports`. The frames a
/// pipelining sender has sent already (whole as they arrived) are taken with the first:
/// queued to the writer together, so they share its commit, and acknowledged in one
/// write.
async fn serve_stream(
    inner: Arc<Inner>,
    conn: Connection,
    budget: Arc<Semaphore>,
    reports: Reports,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    // The sender is whoever authenticated this connection; nothing in the frame says so.
    let peer = conn.remote_node_id();
    let mut frames = FrameReader::new(recv, budget);
    let mut batch = Vec::new();
    let mut acks = Vec::new();
    loop {
        let read = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = tokio::time::timeout(inner.timings.read_timeout, frames.next(true)) => r,
        };
        let mut next = match read {
            Err(_) => {
                tracing::debug!(%peer, "stream read timed out");
                let _ = frames.get_mut().stop(STREAM_TIMEOUT);
                let _ = send.reset(STREAM_TIMEOUT);
                return;
            }
            Ok(next) => next,
        };
        // The first frame waited for, then every frame whole already.
        loop {
            let (frame, permit) = match next {
                Ok(Next::Frame(frame, permit)) => (frame, permit),
                Ok(Next::NotYet) => break,
                Ok(Next::End) if batch.is_empty() => {
                    let _ = send.finish();
                    return;
                }
                // The batch is acknowledged first; the next read finds the end again.
                Ok(Next::End) => break,
                Err(e) => {
                    read_failed(&inner, &conn, e);
                    return;
                }
            };
            let msg = match frame {
                Frame::Message(msg) => msg,
                Frame::Ack(_) => {
                    tracing::warn!(%peer, "unexpected ack on an incoming stream; closing the connection");
                    conn.quic()
                        .close(CLOSE_UNEXPECTED_FRAME, b"unexpected frame");
                    inner.forget_connection(&conn);
                    return;
                }
            };
            batch.push((msg, permit));
            if batch.len() >= BATCH {
                break;
            }
            next = frames.next(false).await;
        }
        if !store_and_ack(&inner, &conn, &mut send, &reports, &mut batch, &mut acks).await {
            return;
        }
    }
}

/// Stores `batch` (each message with its budget permit) and acknowledges what was
/// stored, in order and in one write; then reports the new messages. Returns whether
/// the stream goes on (`false`: it was reset, or the node stops reporting).
async fn store_and_ack(
    inner: &Arc<Inner>,
    conn: &Connection,
    send: &mut quinn::SendStream,
    reports: &Reports,
    batch: &mut Vec<(ChatMessage, OwnedSemaphorePermit)>,
    acks: &mut Vec<u8>,
) -> bool {
    let peer = conn.remote_node_id();
    let mut queued = Vec::with_capacity(batch.len());
    let mut stored_all = true;
    for (msg, _) in batch.iter() {
        match inner.writer.submit(peer, msg.clone()).await {
            Ok(rx) => queued.push(rx),
            Err(e) => {
                tracing::warn!(%peer, message = %msg.id, error = %e, "cannot store message; not acknowledging");
                stored_all = false;
                break;
            }
        }
    }
    acks.clear();
    let mut received = Vec::new();
    // Held until the acks are written, as a frame's bytes count until its ack.
    let mut held = Vec::with_capacity(batch.len());
    for ((msg, permit), rx) in batch.drain(..).zip(queued) {
        held.push(permit);
        let id = msg.id;
        let (inserted, stored_at_ms) = match writer::outcome(rx).await {
            Ok((written, at)) => (written.inserted(), at),
            Err(e) => {
                tracing::warn!(%peer, message = %id, error = %e, "cannot store message; not acknowledging");
                stored_all = false;
                break;
            }
        };
        let ack = Frame::Ack(Ack {
            id,
            status: inserted.ack_status(),
        });
        if let Err(e) = wire::encode_into(&ack, acks) {
            tracing::warn!(%peer, message = %id, error = %e, "cannot encode the ack");
            stored_all = false;
            break;
        }
        if inserted == Inserted::New {
            received.push(StoredMessage {
                id,
                peer,
                direction: Direction::Incoming,
                sent_at_ms: msg.sent_at_ms,
                stored_at_ms,
                body: msg.body,
                status: MessageStatus::Received,
            });
        }
    }
    batch.clear();
    let acked = if inner.drop_acks {
        tracing::debug!(%peer, "fault injection: dropping the acks");
        false
    } else {
        let written = send.write_all(acks).await;
        if let Err(e) = &written {
            tracing::debug!(%peer, error = %e, "cannot send acks");
        }
        written.is_ok()
    };
    drop(held);
    if !acked || !stored_all {
        let _ = send.reset(STREAM_NOT_STORED);
    }
    // Reported after the ack, by the connection's task, so a name lookup delays
    // neither this ack nor the next message on the stream; in order.
    if !received.is_empty() {
        let via = match conn.recv_path() {
            Some(crate::net::PathKind::Relay) => Via::Relay,
            _ => Via::Direct,
        };
        for message in received {
            if reports.send((message, via)).await.is_err() {
                return false;
            }
        }
    }
    acked && stored_all
}

/// Messages of one connection waiting to be reported, at most this many.
const REPORTS_QUEUED: usize = 64;

/// Where the streams of one connection hand their new messages to be reported.
type Reports = tokio::sync::mpsc::Sender<(StoredMessage, Via)>;

/// Starts the task that reports the messages of one connection from `peer`, each with
/// the sender's name (which may take a discovery lookup): a stream's messages in the
/// order it stored them. One task per connection, not per stream: a peer that opens a
/// stream per message costs no extra task per message.
fn report_received(inner: &Arc<Inner>, peer: p2p_crypto::NodeId) -> Reports {
    let (tx, mut rx) = tokio::sync::mpsc::channel(REPORTS_QUEUED);
    let inner = inner.clone();
    inner.clone().tracker.spawn(async move {
        while let Some((message, via)) = rx.recv().await {
            inner.emit(NodeEvent::MessageReceived {
                from: peer,
                from_name: inner.sender_name(&peer).await,
                message,
                via,
            });
        }
    });
    tx
}
