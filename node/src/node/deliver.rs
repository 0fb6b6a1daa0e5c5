//! Delivery on a connection: connection reuse, dialing with per-peer backoff, and streams
//! kept open from one message to the next (see the module documentation of
//! [`crate::node`]).
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

use super::{inbound, Inner, NodeEvent, StorageError};
use crate::{
    endpoint::{ConnectError, Connection, Lane, LaneError, Sent},
    net::PathKind,
    store::{MarkOutcome, MessageStatus, WriteOutcome},
    wire::{AckStatus, ChatMessage, EncodeError, Frame, MessageId},
};

/// Longest a dial waits for the home relay link (a node that just started).
const RELAY_WAIT: Duration = Duration::from_secs(2);

/// A peer whose connection to us closed this recently is tried once even when discovery
/// says it is offline: the server may have restarted and not heard from it yet.
pub(crate) const RECENT_CONNECTION: Duration = Duration::from_secs(120);

/// Why a message could not be delivered directly (it stays queued).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeliverError {
    #[error("no known address or relay for the peer")]
    NoAddress,
    #[error("not dialing the peer again before {left:?} from now{}", cause.map_or(String::new(), |c| format!(" (last dial: {})", c.as_str())))]
    Backoff {
        left: Duration,
        /// Why the dial that set the backoff failed, if known.
        cause: Option<QueueReason>,
    },
    #[error("too many connections")]
    ConnectionLimit,
    #[error("dial failed: {source}")]
    Dial {
        #[source]
        source: ConnectError,
        /// The direct addresses discovery published for the peer (what was dialed).
        published: Vec<SocketAddr>,
    },
    #[error("dial timed out")]
    DialTimeout,
    #[error("stream failed: {0}")]
    Stream(#[source] StreamError),
    #[error("no acknowledgement in time")]
    AckTimeout,
    #[error("the peer answered with something other than the ack of this message")]
    BadAck,
    #[error("the node is shutting down")]
    Shutdown,
}

/// What went wrong on the stream of one message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error("cannot open a stream: {0}")]
    Open(#[source] quinn::ConnectionError),
    #[error("cannot encode the message: {0}")]
    Encode(#[source] EncodeError),
    #[error(transparent)]
    Lane(LaneError),
}

/// Why a message was queued instead of delivered at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueReason {
    /// Nothing to try: discovery knows the peer offline (or not at all), and it has no
    /// relay or last address.
    Offline,
    /// The node at the peer's published address is not the peer: it authenticated as
    /// another key, presented no valid node certificate, or does not speak the chat
    /// protocol. A possible impersonation, or a stale discovery record.
    NotThePeer {
        /// The first direct address discovery published for the peer, if any.
        addr: Option<SocketAddr>,
        /// The NodeId the message is for (the key discovery names).
        expected: NodeId,
        /// The NodeId the node there authenticated as, if it did.
        actual: Option<NodeId>,
        /// What it did instead of authenticating as the peer.
        cause: NotThePeerCause,
    },
    /// The peer did not answer, or did not acknowledge, in time; or the node is at its
    /// connection limit or shutting down.
    Unreachable,
}

/// How a node at the peer's address failed to be the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotThePeerCause {
    /// It authenticated as another key.
    OtherKey,
    /// Its certificate is not a valid node certificate (e.g. not ed25519).
    BadCertificate,
    /// It does not speak the chat protocol (no common ALPN).
    NoCommonProtocol,
}

impl QueueReason {
    /// A short stable name, for JSON output.
    pub fn as_str(&self) -> &'static str {
        match self {
            QueueReason::Offline => "offline",
            QueueReason::NotThePeer { .. } => "not_the_peer",
            QueueReason::Unreachable => "unreachable",
        }
    }
}

impl NotThePeerCause {
    /// A short stable name, for JSON output.
    pub fn as_str(&self) -> &'static str {
        match self {
            NotThePeerCause::OtherKey => "other_key",
            NotThePeerCause::BadCertificate => "bad_certificate",
            NotThePeerCause::NoCommonProtocol => "no_common_protocol",
        }
    }
}

impl DeliverError {
    /// What this failure tells the user about a message to `peer`.
    pub(crate) fn queue_reason(&self, peer: NodeId) -> QueueReason {
        let DeliverError::Dial { source, published } = self else {
            return match self {
                DeliverError::NoAddress => QueueReason::Offline,
                DeliverError::Backoff { cause: Some(c), .. } => *c,
                _ => QueueReason::Unreachable,
            };
        };
        let (actual, cause) = match source {
            ConnectError::UnexpectedPeer { actual, .. } => {
                (Some(*actual), NotThePeerCause::OtherKey)
            }
            ConnectError::PeerCert { .. } => (None, NotThePeerCause::BadCertificate),
            ConnectError::Protocol { .. } => (None, NotThePeerCause::NoCommonProtocol),
            ConnectError::Connection { source, .. } => match not_the_peer(source) {
                Some(cause) => (None, cause),
                None => return QueueReason::Unreachable,
            },
            _ => return QueueReason::Unreachable,
        };
        QueueReason::NotThePeer {
            addr: published.first().copied(),
            expected: peer,
            actual,
            cause,
        }
    }
}

/// A handshake that failed because of what the other side presented: a certificate
/// that is no node certificate, or no common application protocol.
fn not_the_peer(e: &quinn::ConnectionError) -> Option<NotThePeerCause> {
    // Raised here (our verifier refused what it saw) or sent by the other side.
    let code = match e {
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        _ => return None,
    };
    // TLS alerts are CRYPTO_ERROR (0x100 + alert): 42 bad_certificate, 43
    // unsupported_certificate, 46 certificate_unknown, 50 decode_error (a certificate
    // that does not parse), 120 no_application_protocol.
    match code.checked_sub(0x100)? {
        42 | 43 | 46 | 50 => Some(NotThePeerCause::BadCertificate),
        120 => Some(NotThePeerCause::NoCommonProtocol),
        _ => None,
    }
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

/// Longest a kept stream may have been idle and still carry a message: far below the
/// read timeout after which a receiver resets a stream it waits on (10 s by default).
const STREAM_REUSE: Duration = Duration::from_secs(2);

/// Sends one message on `conn` and waits for its ack, on one of the connection's lanes
/// (`endpoint::lanes`): behind the messages already waiting there, without waiting for
/// their acks. A lane that had carried messages before and fails before this one's ack
/// (the peer ended or reset the stream meanwhile, or ends every stream after one ack)
/// makes the message go once more on another lane; the receiver deduplicates by id, so a
/// message stored twice is acknowledged `Duplicate`. The ack timeout bounds the tries.
async fn send_on(
    inner: &Arc<Inner>,
    conn: &Connection,
    msg: &ChatMessage,
) -> Result<Acked, DeliverError> {
    let fresh = fresh_lane(inner);
    let frame = message_frame(msg)?;
    let exchange = async {
        loop {
            let lane = conn
                .lane(fresh)
                .await
                .map_err(|e| DeliverError::Stream(StreamError::Open(e)))?;
            // `None`: the lane closed before the frame went out; take another.
            let Some(sent) = lane.send(msg.id, &frame).await else {
                continue;
            };
            let answer = sent.ack.await.unwrap_or(Err(LaneError::NoAck));
            match answer {
                Ok(ack) => {
                    // The path our packets to the peer take as the ack arrives: the one
                    // the message went on (unless it changed during this very exchange).
                    return Ok(Acked {
                        status: ack.status,
                        path: conn.path(),
                    });
                }
                Err(LaneError::BadAck) => return Err(DeliverError::BadAck),
                Err(e) if sent.reused && conn.quic().close_reason().is_none() => {
                    tracing::debug!(peer = %conn.remote_node_id(), error = %e, "lane failed; sending once more");
                }
                Err(e) => return Err(DeliverError::Stream(StreamError::Lane(e))),
            }
        }
    };
    tokio::select! {
        _ = inner.cancel.cancelled() => Err(DeliverError::Shutdown),
        r = tokio::time::timeout(inner.timings.ack_timeout, exchange) => {
            r.unwrap_or(Err(DeliverError::AckTimeout))
        }
    }
}

/// How long a lane may have been idle and still carry a message.
fn fresh_lane(inner: &Inner) -> Duration {
    STREAM_REUSE.min(inner.timings.read_timeout / 4)
}

fn message_frame(msg: &ChatMessage) -> Result<Vec<u8>, DeliverError> {
    crate::wire::encode(&Frame::Message(msg.clone()))
        .map_err(|e| DeliverError::Stream(StreamError::Encode(e)))
}

/// A lane to `peer` for messages that must arrive in the order they are written (an
/// outbox queue, see [`send_ordered`]): on the live connection, else a new dial.
/// `Ok(None)` when the peer serves one message per stream, where each message must go
/// on its own ([`deliver`]).
pub(crate) async fn ordered_lane(
    inner: &Arc<Inner>,
    peer: NodeId,
) -> Result<Option<(Connection, Arc<Lane>)>, DeliverError> {
    let conn = connect(inner, peer).await?;
    if conn.one_message_per_stream() {
        return Ok(None);
    }
    let lane = conn
        .lane(fresh_lane(inner))
        .await
        .map_err(|e| DeliverError::Stream(StreamError::Open(e)))?;
    Ok(Some((conn, lane)))
}

/// Writes `msg` on `lane` (from [`ordered_lane`]) behind the messages written there
/// before it, without waiting for their acks; the receiver stores and acknowledges a
/// stream's messages in order. `Ok(None)` when the lane closed before the message went
/// out.
pub(crate) async fn send_ordered(
    lane: &Lane,
    msg: &ChatMessage,
) -> Result<Option<Sent>, DeliverError> {
    let frame = message_frame(msg)?;
    Ok(lane.send(msg.id, &frame).await)
}

/// Tells the path layer how to reach `peer`: the addresses and relay it announced, and
/// the address it last connected to us from. Asks discovery when the online list does
/// not have the peer, then the DHT when discovery does not know it. Returns `None` when
/// there is nothing to try: no address, no relay, or discovery answered that the peer
/// is offline (its last address is not tried then: its process is most likely gone, and
/// a dial to a dead UDP port only ends at the dial timeout), so a send to an offline peer
/// is queued at once. The exception is a peer whose connection with us closed within
/// [`RECENT_CONNECTION`]: the server may have restarted and not heard from it yet, so
/// its last paths are tried once, for at most [`Timings::quick_dial`](super::Timings::quick_dial).
/// A peer that quit (it closed its connection with us saying so) is not tried either,
/// until it announces itself again: discovery may list its old record for a moment after
/// it left. Otherwise returns the direct addresses the peer published and how long a
/// dial may take.
async fn learn_paths(inner: &Arc<Inner>, peer: NodeId) -> Option<(Vec<SocketAddr>, Duration)> {
    // The close may have arrived before the connection's own task noted it.
    let cached = inner.pool().cached(&peer);
    if let Some(conn) = cached {
        inner.note_if_quit(&conn);
    }
    let online = inner.peers().online_paths(&peer);
    let last = inner.pool().last_addr(&peer);
    let mut timeout = inner.timings.dial_timeout;
    let (mut addrs, relay) = match (online, &inner.disco) {
        (Some(paths), _) => paths,
        (None, Some(d)) => {
            match tokio::time::timeout(inner.timings.dial_timeout, d.lookup_id(&peer)).await {
                Ok(Ok(Some(info))) if info.online && inner.peers().announced_since_quit(&info) => {
                    inner.peers().note_back(&peer);
                    inner.learn_peers(std::slice::from_ref(&info));
                    (info.addrs, info.relay)
                }
                // The record of a peer that quit, left behind: nothing to try.
                Ok(Ok(Some(info))) if info.online => return None,
                // Discovery knows the peer and says it is offline: nothing to try, unless
                // we were connected to it a moment ago (and it did not quit).
                Ok(Ok(Some(_))) => {
                    if inner.peers().has_quit(&peer) {
                        return None;
                    }
                    let recent =
                        inner
                            .pool()
                            .take_recently_closed(&peer, Instant::now(), RECENT_CONNECTION);
                    if !recent {
                        return None;
                    }
                    tracing::debug!(%peer, "offline on discovery but connected recently; trying it once");
                    timeout = inner.timings.quick_dial.min(timeout);
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
    let published = addrs.clone();
    if let Some(a) = last {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    if addrs.is_empty() && relay.is_none() {
        return None;
    }
    inner.endpoint.learn_peer(peer, &addrs, relay);
    Some((published, timeout))
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
    let backoff = {
        let pool = inner.pool();
        pool.backoff_left(&peer, Instant::now())
            .map(|left| (left, pool.backoff_cause(&peer)))
    };
    if let Some((left, cause)) = backoff {
        return Err(DeliverError::Backoff { left, cause });
    }
    let Some((published, timeout)) = learn_paths(inner, peer).await else {
        note_failure(inner, peer, Some(QueueReason::Offline));
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
            let failed = DeliverError::Dial {
                source: e,
                published,
            };
            note_failure(inner, peer, Some(failed.queue_reason(peer)));
            Err(failed)
        }
        Err(_) => {
            tracing::debug!(%peer, "dial timed out");
            note_failure(inner, peer, None);
            Err(DeliverError::DialTimeout)
        }
    }
}

fn note_failure(inner: &Inner, peer: NodeId, cause: Option<QueueReason>) {
    let timings = &inner.timings;
    inner
        .pool()
        .note_failure(peer, Instant::now(), |n| timings.backoff(n), cause);
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
) -> Result<(), StorageError> {
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
