//! Incoming connections and streams.
//!
//! The accept loop refuses connections past the limit, completes each handshake in a
//! task of its own, and then serves the connection: a task per connection accepts
//! streams, and a task per stream reads frames (quinn bounds the streams a peer may have
//! open at once, so tasks per connection are bounded too).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    Inner, NodeEvent, Via, CLOSE_BAD_FRAME, CLOSE_SHUTDOWN, CLOSE_TOO_MANY_CONNECTIONS,
    CLOSE_UNEXPECTED_FRAME, CONNECTION_FRAME_BUDGET, SHUTDOWN_REASON, STREAM_NOT_STORED,
    STREAM_TIMEOUT,
};
use crate::{
    endpoint::Connection,
    store::{Direction, Inserted, MessageStatus, StoredMessage},
    wire::{read_frame_body, read_frame_header, write_frame, Ack, Frame, ReadFrameError},
};

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

/// Reads the next frame of a stream, holding `len` bytes of the connection's frame
/// budget from its header until the returned permit is dropped (after the ack).
async fn read_budgeted<R: tokio::io::AsyncRead + Unpin>(
    recv: &mut R,
    budget: &Arc<Semaphore>,
    buf: &mut Vec<u8>,
) -> Result<Option<(Frame, OwnedSemaphorePermit)>, ReadFrameError> {
    let Some(len) = read_frame_header(recv).await? else {
        return Ok(None);
    };
    // `len` is at most MAX_FRAME_LEN, far below u32::MAX and the budget.
    let permits = u32::try_from(len).unwrap_or(u32::MAX);
    let Ok(permit) = budget.clone().acquire_many_owned(permits).await else {
        // Never closed; treat it like a stream that ended.
        return Ok(None);
    };
    let frame = read_frame_body(recv, len, buf).await?;
    Ok(Some((frame, permit)))
}

/// The read buffer a stream keeps between frames, at most (a larger one is freed).
const IDLE_READ_BUFFER: usize = 4096;

/// Reads message frames from one stream and acknowledges each after storing it; then
/// hands each new message to the connection's `reports`.
async fn serve_stream(
    inner: Arc<Inner>,
    conn: Connection,
    budget: Arc<Semaphore>,
    reports: Reports,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    // The sender is whoever authenticated this connection; nothing in the frame says so.
    let peer = conn.remote_node_id();
    let mut buf = Vec::new();
    loop {
        let read = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = tokio::time::timeout(inner.timings.read_timeout, read_budgeted(&mut recv, &budget, &mut buf)) => r,
        };
        let frame = match read {
            Err(_) => {
                tracing::debug!(%peer, "stream read timed out");
                let _ = recv.stop(STREAM_TIMEOUT);
                let _ = send.reset(STREAM_TIMEOUT);
                return;
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(read))) => read,
            Ok(Err(ReadFrameError::Io(e))) => {
                tracing::debug!(%peer, error = %e, "stream failed");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "bad frame; closing the connection");
                conn.quic().close(CLOSE_BAD_FRAME, b"bad frame");
                inner.forget_connection(&conn);
                return;
            }
        };
        let (frame, _budget) = frame;
        // A stream may wait idle for the sender's next message: it keeps no more than a
        // small buffer meanwhile, so the bytes held stay within the frame budget.
        if buf.capacity() > IDLE_READ_BUFFER {
            buf = Vec::new();
        }
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
        let id = msg.id;
        let (inserted, stored_at_ms) = match inner.writer.persist(peer, msg.clone()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, message = %id, error = %e, "cannot store message; not acknowledging");
                let _ = send.reset(STREAM_NOT_STORED);
                return;
            }
        };
        let received = (inserted == Inserted::New).then_some(StoredMessage {
            id,
            peer,
            direction: Direction::Incoming,
            sent_at_ms: msg.sent_at_ms,
            stored_at_ms,
            body: msg.body,
            status: MessageStatus::Received,
        });
        let acked = if inner.drop_acks {
            tracing::debug!(%peer, message = %id, "fault injection: dropping the ack");
            let _ = send.reset(STREAM_NOT_STORED);
            false
        } else {
            let ack = Frame::Ack(Ack {
                id,
                status: inserted.ack_status(),
            });
            let written = write_frame(&mut send, &ack).await;
            if let Err(e) = &written {
                tracing::debug!(%peer, message = %id, error = %e, "cannot send ack");
            }
            written.is_ok()
        };
        // Reported after the ack, by the connection's task, so a name lookup delays
        // neither this ack nor the next message on the stream; in order.
        if let Some(message) = received {
            let via = match conn.recv_path() {
                Some(crate::net::PathKind::Relay) => Via::Relay,
                _ => Via::Direct,
            };
            if reports.send((message, via)).await.is_err() {
                return;
            }
        }
        if !acked {
            return;
        }
    }
    let _ = send.finish();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, ChatMessage};

    #[tokio::test]
    async fn frames_wait_for_the_connection_budget() {
        let frame = Frame::Message(ChatMessage::text("x".repeat(100), 1).expect("valid"));
        let bytes = wire::encode(&frame).expect("encodes");
        let len = bytes.len() - wire::HEADER_LEN;
        // Room for one frame, not two.
        let budget = Arc::new(Semaphore::new(len + len / 2));
        let mut buf = Vec::new();
        let (got, held) = read_budgeted(&mut bytes.as_slice(), &budget, &mut buf)
            .await
            .expect("reads")
            .expect("a frame");
        assert_eq!(got, frame);
        assert_eq!(budget.available_permits(), len / 2);
        // A second frame must wait while the first is held...
        let budget2 = budget.clone();
        let second = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut input = bytes.as_slice();
            read_budgeted(&mut input, &budget2, &mut buf)
                .await
                .map(|r| r.map(|(f, _)| f))
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!second.is_finished(), "waits for the budget");
        // ... and goes on once the first one is acknowledged (its permit dropped).
        drop(held);
        let second = second.await.expect("joins").expect("reads");
        assert_eq!(second, Some(frame));
        assert_eq!(budget.available_permits(), len + len / 2);
    }
}
