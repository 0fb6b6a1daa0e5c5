//! Delivery on a connection: connection reuse, dialing with per-peer backoff, and one
//! message per stream (see the module documentation of [`crate::node`] for why).
//!
//! A peer is dialed through the path layer ([`crate::net`]): one connection attempt to
//! its mapped address, whose packets go over a proven direct path, through its relay,
//! or to every address discovery published, whichever answers first. The path may then
//! change under the connection (relay to direct, direct back to relay) without the
//! messaging layer noticing.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use p2p_crypto::NodeId;
use p2p_discovery::RelayRef;

use super::{inbound, Inner, NodeError, NodeEvent};
use crate::{
    endpoint::{ConnectError, Connection},
    net::PathKind,
    store::{MarkOutcome, MessageStatus, WriteOutcome},
    wire::{read_frame, write_frame, AckStatus, ChatMessage, Frame, MessageId},
};

/// Longest a dial waits for the home relay link (a node that just started).
const RELAY_WAIT: Duration = Duration::from_secs(2);

/// A peer whose connection to us closed this recently is tried once even when discovery
/// says it is offline: the server may have restarted and not heard from it yet.
pub(crate) const RECENT_CONNECTION: Duration = Duration::from_secs(120);

/// Longest that one try of a peer discovery calls offline may take.
pub(crate) const QUICK_DIAL: Duration = Duration::from_secs(1);

/// Why a message could not be delivered directly (it stays queued).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeliverError {
    #[error("no known address or relay for the peer")]
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

/// An acknowledgement and the path the message went on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Acked {
    pub status: AckStatus,
    pub path: Option<PathKind>,
}

/// Delivers `msg` to `peer` on a connection and returns its ack. Reuses the cached
/// connection, else dials; a connection that turns out dead is replaced once.
pub(crate) async fn deliver(
    inner: &Arc<Inner>,
    peer: NodeId,
    msg: &ChatMessage,
) -> Result<Acked, DeliverError> {
    if inner.cancel.is_cancelled() {
        return Err(DeliverError::Shutdown);
    }
    let cached = inner.pool().cached(&peer);
    if let Some(conn) = cached {
        if conn.quic().close_reason().is_none() {
            match send_on(inner, &conn, msg).await {
                Ok(acked) => return Ok(acked),
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
) -> Result<Acked, DeliverError> {
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
            // The path our packets to the peer take as the ack arrives: the one the
            // message went on (unless it changed during this very exchange).
            Ok(Some(Frame::Ack(ack))) if ack.id == msg.id => Ok(Acked {
                status: ack.status,
                path: conn.path(),
            }),
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

/// Tells the path layer how to reach `peer`: the addresses and relay it announced, and
/// the address it last connected to us from. Asks discovery when the online list does
/// not have the peer. Returns how long a dial may take, or `None` when there is nothing
/// to try: no address, no relay, or discovery answered that the peer is offline (its
/// last address is not tried then: its process is most likely gone, and a dial to a dead
/// UDP port only ends at the dial timeout), so a send to an offline peer is queued at
/// once. The exception is a peer whose connection with us closed within
/// [`RECENT_CONNECTION`]: the server may have restarted and not heard from it yet, so
/// its last paths are tried once, for at most [`QUICK_DIAL`].
async fn learn_paths(inner: &Arc<Inner>, peer: NodeId) -> Option<Duration> {
    let online = inner.peers().online_paths(&peer);
    let last = inner.pool().last_addr(&peer);
    let mut timeout = inner.timings.dial_timeout;
    let (mut addrs, relay) = match (online, &inner.disco) {
        (Some(paths), _) => paths,
        (None, Some(d)) => {
            match tokio::time::timeout(inner.timings.dial_timeout, d.lookup_id(&peer)).await {
                Ok(Ok(Some(info))) if info.online => {
                    inner.learn_peers(std::slice::from_ref(&info));
                    (info.addrs, info.relay)
                }
                // Discovery knows the peer and says it is offline: nothing to try, unless
                // we were connected to it a moment ago.
                Ok(Ok(Some(_))) => {
                    let recent =
                        inner
                            .pool()
                            .take_recently_closed(&peer, Instant::now(), RECENT_CONNECTION);
                    if !recent {
                        return None;
                    }
                    tracing::debug!(%peer, "offline on discovery but connected recently; trying it once");
                    timeout = QUICK_DIAL.min(timeout);
                    inner.peers().last_paths(&peer).unwrap_or_default()
                }
                // Discovery does not know the peer.
                Ok(Ok(None)) => dht_paths(inner, peer).await,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "lookup failed");
                    dht_paths(inner, peer).await
                }
                Err(_) => {
                    tracing::debug!(%peer, "lookup timed out");
                    dht_paths(inner, peer).await
                }
            }
        }
        (None, None) => dht_paths(inner, peer).await,
    };
    if let Some(a) = last {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    if addrs.is_empty() && relay.is_none() {
        return None;
    }
    inner.endpoint.learn_peer(peer, &addrs, relay);
    Some(timeout)
}

/// The addresses and relay `peer` published on the DHT, when this node uses it and the
/// record verifies (see [`super::dht`]); nothing otherwise.
async fn dht_paths(inner: &Inner, peer: NodeId) -> (Vec<SocketAddr>, Option<RelayRef>) {
    let Some(dht) = inner.dht.as_ref() else {
        return (Vec::new(), None);
    };
    match dht.lookup(&peer).await {
        Ok(record) => {
            tracing::debug!(%peer, addrs = record.addrs.len(), relay = record.relay.is_some(), "found on the DHT");
            (record.addrs, record.relay)
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "not found on the DHT");
            (Vec::new(), None)
        }
    }
}

/// Makes sure there is a connection to `peer` (dialing if needed), so a message can go
/// out as soon as it is durably stored: [`Node::send`](super::Node::send) runs this
/// beside the store write. A failure is only logged (and sets the dial backoff);
/// [`deliver`] reports it.
pub(crate) async fn prepare(inner: &Arc<Inner>, peer: NodeId) {
    let live = inner.pool().live(&peer).is_some();
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
    let dial_lock = inner.pool().dial_lock(peer);
    let result = {
        let _one_dial = dial_lock.lock().await;
        dial(inner, peer).await
    };
    inner.pool().release_dial_lock(&peer, dial_lock);
    result
}

async fn dial(inner: &Arc<Inner>, peer: NodeId) -> Result<Connection, DeliverError> {
    if let Some(conn) = inner.pool().live(&peer) {
        return Ok(conn);
    }
    if let Some(left) = inner.pool().backoff_left(&peer, Instant::now()) {
        return Err(DeliverError::Backoff(left));
    }
    let Some(timeout) = learn_paths(inner, peer).await else {
        note_failure(inner, peer);
        return Err(DeliverError::NoAddress);
    };
    let Ok(permit) = inner.conn_limit.clone().try_acquire_owned() else {
        return Err(DeliverError::ConnectionLimit);
    };
    inner.relay_ready(RELAY_WAIT.min(timeout)).await;
    let attempt = tokio::time::timeout(timeout, inner.endpoint.connect_peer(peer));
    let result = tokio::select! {
        _ = inner.cancel.cancelled() => return Err(DeliverError::Shutdown),
        r = attempt => r,
    };
    match result {
        Ok(Ok(conn)) => {
            tracing::debug!(%peer, path = ?conn.path(), "connected");
            inner.pool().take_slot(peer, true);
            inner.register_connection(&conn, false);
            inner.tracker.spawn(inbound::serve_connection(
                inner.clone(),
                conn.clone(),
                permit,
            ));
            Ok(conn)
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "dial failed");
            note_failure(inner, peer);
            Err(DeliverError::Dial(e))
        }
        Err(_) => {
            tracing::debug!(%peer, "dial timed out");
            note_failure(inner, peer);
            Err(DeliverError::DialTimeout)
        }
    }
}

fn note_failure(inner: &Inner, peer: NodeId) {
    let timings = &inner.timings;
    inner
        .pool()
        .note_failure(peer, Instant::now(), |n| timings.backoff(n));
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
    path: Option<PathKind>,
) -> Result<(), NodeError> {
    let status = match status {
        AckStatus::Stored | AckStatus::Duplicate => MessageStatus::Delivered,
        AckStatus::Rejected(code) => {
            tracing::warn!(%peer, message = %id, %code, "message rejected by the recipient");
            MessageStatus::Rejected(code)
        }
    };
    inner.delivery().settling(id);
    let written = match inner.writer.finish(peer, id, status).await {
        Ok(rx) => rx,
        Err(e) => {
            inner.delivery().settled(&id);
            return Err(e);
        }
    };
    let inner2 = inner.clone();
    inner.tracker.spawn(async move {
        let outcome = written.await;
        inner2.delivery().settled(&id);
        match outcome {
            Ok(Ok((WriteOutcome::Marked(MarkOutcome::Updated), _)))
                if status == MessageStatus::Delivered =>
            {
                inner2.emit(NodeEvent::MessageDelivered { to: peer, id, path });
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
