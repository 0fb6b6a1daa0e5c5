//! Direct delivery: connection reuse, dialing with per-peer backoff, and one message per
//! stream (see the module documentation of [`crate::node`] for why).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use p2p_crypto::NodeId;

use super::{bounded_insert, inbound, DialBackoff, Inner, NodeError, NodeEvent};
use crate::{
    endpoint::{ConnectError, Connection},
    store::{MarkOutcome, MessageStatus, WriteOutcome},
    wire::{read_frame, write_frame, AckStatus, ChatMessage, Frame, MessageId},
};

/// Why a message could not be delivered directly (it stays queued).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeliverError {
    #[error("no known address for the peer")]
    NoAddress,
    #[error("not dialing the peer again before {0:?} from now")]
    Backoff(Duration),
    #[error("too many connections")]
    ConnectionLimit,
    #[error("dial failed: {0}")]
    Dial(#[source] ConnectError),
    #[error("dial timed out")]
    DialTimeout,
    #[error("stream failed: {0}")]
    Stream(String),
    #[error("no acknowledgement in time")]
    AckTimeout,
    #[error("the peer answered with something other than the ack of this message")]
    BadAck,
    #[error("the node is shutting down")]
    Shutdown,
}

/// Delivers `msg` to `peer` directly and returns its ack status. Reuses the cached
/// connection, else dials; a connection that turns out dead is replaced once.
pub(crate) async fn deliver(
    inner: &Arc<Inner>,
    peer: NodeId,
    msg: &ChatMessage,
) -> Result<AckStatus, DeliverError> {
    if inner.cancel.is_cancelled() {
        return Err(DeliverError::Shutdown);
    }
    let cached = inner.state().conns.get(&peer).cloned();
    if let Some(conn) = cached {
        if conn.quic().close_reason().is_none() {
            match send_on(inner, &conn, msg).await {
                Ok(status) => return Ok(status),
                // The peer is there but did not acknowledge: a new connection would not
                // help; the outbox retries later.
                Err(e) if conn.quic().close_reason().is_none() => return Err(e),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "cached connection is gone; dialing");
                }
            }
        }
        inner.forget_connection(&conn);
    }
    let conn = connect(inner, peer).await?;
    send_on(inner, &conn, msg).await
}

/// Sends one message on a new stream of `conn` and waits for its ack.
async fn send_on(
    inner: &Arc<Inner>,
    conn: &Connection,
    msg: &ChatMessage,
) -> Result<AckStatus, DeliverError> {
    let exchange = async {
        let (mut send, mut recv) = conn
            .quic()
            .open_bi()
            .await
            .map_err(|e| DeliverError::Stream(e.to_string()))?;
        write_frame(&mut send, &Frame::Message(msg.clone()))
            .await
            .map_err(|e| DeliverError::Stream(e.to_string()))?;
        send.finish()
            .map_err(|e| DeliverError::Stream(e.to_string()))?;
        let mut buf = Vec::new();
        match read_frame(&mut recv, &mut buf).await {
            Ok(Some(Frame::Ack(ack))) if ack.id == msg.id => Ok(ack.status),
            Ok(Some(_)) => Err(DeliverError::BadAck),
            Ok(None) => Err(DeliverError::Stream("stream ended without an ack".into())),
            Err(e) => Err(DeliverError::Stream(e.to_string())),
        }
    };
    tokio::select! {
        _ = inner.cancel.cancelled() => Err(DeliverError::Shutdown),
        r = tokio::time::timeout(inner.timings.ack_timeout, exchange) => {
            r.unwrap_or(Err(DeliverError::AckTimeout))
        }
    }
}

/// The addresses to dial `peer` at: those it announced, then the one it last connected
/// from. Asks discovery when the online list does not have the peer; when discovery
/// answers that the peer is offline, the last address is not tried either (its process
/// is gone, and a dial to a dead UDP port only ends at the dial timeout), so a send to
/// an offline peer is queued at once.
async fn addresses(inner: &Arc<Inner>, peer: NodeId) -> Vec<SocketAddr> {
    let (mut addrs, last) = {
        let st = inner.state();
        (
            st.online
                .get(&peer)
                .map(|p| p.addrs.clone())
                .unwrap_or_default(),
            st.last_addr.get(&peer).copied(),
        )
    };
    let mut known_offline = false;
    if addrs.is_empty() {
        if let Some(d) = &inner.disco {
            match tokio::time::timeout(inner.timings.dial_timeout, d.lookup_id(&peer)).await {
                Ok(Ok(Some(info))) => {
                    inner.learn_peers(std::slice::from_ref(&info));
                    known_offline = !info.online;
                    addrs = info.addrs;
                }
                Ok(Ok(None)) => known_offline = true,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "lookup failed"),
                Err(_) => tracing::debug!(%peer, "lookup timed out"),
            }
        }
    }
    if let Some(a) = last.filter(|_| !known_offline) {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    addrs
}

/// Makes sure there is a connection to `peer` (dialing if needed), so a message can go
/// out as soon as it is durably stored: [`Node::send`](super::Node::send) runs this
/// beside the store write. A failure is only logged (and sets the dial backoff);
/// [`deliver`] reports it.
pub(crate) async fn prepare(inner: &Arc<Inner>, peer: NodeId) {
    let live = inner
        .state()
        .conns
        .get(&peer)
        .is_some_and(|c| c.quic().close_reason().is_none());
    if !live {
        if let Err(e) = connect(inner, peer).await {
            tracing::debug!(%peer, error = %e, "cannot connect ahead of the send");
        }
    }
}

/// A live connection to `peer`: the one another sender just made, or a new one if the
/// peer is not in dial backoff. A new connection is cached and its incoming streams
/// are served.
async fn connect(inner: &Arc<Inner>, peer: NodeId) -> Result<Connection, DeliverError> {
    // One dial per peer at a time: concurrent senders wait and share its connection.
    let dial_lock = inner.state().dialing.entry(peer).or_default().clone();
    let result = {
        let _one_dial = dial_lock.lock().await;
        dial(inner, peer).await
    };
    let mut st = inner.state();
    // Only the map and this function hold it: nobody else waits, forget it.
    if Arc::strong_count(&dial_lock) <= 2 {
        st.dialing.remove(&peer);
    }
    result
}

async fn dial(inner: &Arc<Inner>, peer: NodeId) -> Result<Connection, DeliverError> {
    let cached = inner.state().conns.get(&peer).cloned();
    if let Some(conn) = cached {
        if conn.quic().close_reason().is_none() {
            return Ok(conn);
        }
    }
    if let Some(b) = inner.state().backoff.get(&peer) {
        let now = Instant::now();
        if b.until > now {
            return Err(DeliverError::Backoff(b.until - now));
        }
    }
    let addrs = addresses(inner, peer).await;
    if addrs.is_empty() {
        note_failure(inner, peer);
        return Err(DeliverError::NoAddress);
    }
    let Ok(permit) = inner.conn_limit.clone().try_acquire_owned() else {
        return Err(DeliverError::ConnectionLimit);
    };
    // Every address at once; the first handshake to complete wins (a peer is often
    // reachable at only one of them, and a dead one costs the whole dial timeout).
    let mut dials = tokio::task::JoinSet::new();
    for addr in addrs {
        let endpoint = inner.endpoint.clone();
        dials.spawn(async move { (addr, endpoint.connect(addr, peer).await) });
    }
    let deadline = tokio::time::Instant::now() + inner.timings.dial_timeout;
    let mut last_err = DeliverError::DialTimeout;
    loop {
        let next = tokio::select! {
            _ = inner.cancel.cancelled() => return Err(DeliverError::Shutdown),
            r = tokio::time::timeout_at(deadline, dials.join_next()) => r,
        };
        match next {
            Ok(Some(Ok((addr, Ok(conn))))) => {
                tracing::debug!(%peer, %addr, "connected");
                inner.take_peer_slot(peer, true);
                inner.register_connection(&conn, false);
                let inner2 = inner.clone();
                let conn2 = conn.clone();
                inner
                    .tracker
                    .spawn(inbound::serve_connection(inner2, conn2, permit));
                // Dropping the set aborts the other attempts.
                return Ok(conn);
            }
            Ok(Some(Ok((addr, Err(e))))) => {
                tracing::debug!(%peer, %addr, error = %e, "dial failed");
                last_err = DeliverError::Dial(e);
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(%peer, error = %e, "dial task failed");
            }
            Ok(None) => break,
            Err(_) => {
                tracing::debug!(%peer, "dial timed out");
                last_err = DeliverError::DialTimeout;
                break;
            }
        }
    }
    note_failure(inner, peer);
    Err(last_err)
}

fn note_failure(inner: &Inner, peer: NodeId) {
    let mut st = inner.state();
    let failures = st.backoff.get(&peer).map_or(0, |b| b.failures) + 1;
    let until = Instant::now() + inner.timings.backoff(failures);
    bounded_insert(&mut st.backoff, peer, DialBackoff { failures, until });
}

/// Records the recipient's answer, delivered or rejected. Returns once the mark is
/// queued to the writer: marks need no fsync (see [`crate::store::Store::write_batch`]),
/// so nobody waits for them. Until the mark is written the message counts as settling
/// (the outbox leaves it alone); [`NodeEvent::MessageDelivered`] follows the write.
pub(crate) async fn settle(
    inner: &Arc<Inner>,
    peer: NodeId,
    id: MessageId,
    status: AckStatus,
) -> Result<(), NodeError> {
    let status = match status {
        AckStatus::Stored | AckStatus::Duplicate => MessageStatus::Delivered,
        AckStatus::Rejected(code) => {
            tracing::warn!(%peer, message = %id, %code, "message rejected by the recipient");
            MessageStatus::Rejected(code)
        }
    };
    inner.state().settling.insert(id);
    let written = match inner.writer.finish(peer, id, status).await {
        Ok(rx) => rx,
        Err(e) => {
            inner.state().settling.remove(&id);
            return Err(e);
        }
    };
    let inner2 = inner.clone();
    inner.tracker.spawn(async move {
        let outcome = written.await;
        inner2.state().settling.remove(&id);
        match outcome {
            Ok(Ok((WriteOutcome::Marked(MarkOutcome::Updated), _)))
                if status == MessageStatus::Delivered =>
            {
                inner2.emit(NodeEvent::MessageDelivered { to: peer, id });
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(%peer, message = %id, error = %e, "cannot record delivery")
            }
            Err(_) => {
                tracing::debug!(message = %id, "node stopped before the delivery was recorded")
            }
        }
    });
    Ok(())
}
