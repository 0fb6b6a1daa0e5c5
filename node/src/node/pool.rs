//! The connection pool: one reusable connection per peer, one dial per peer at a time,
//! per-peer dial backoff, and the per-peer connection count.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use p2p_crypto::NodeId;

use super::{bounded_insert, QueueReason, MAX_CONNECTIONS_PER_PEER};
use crate::endpoint::Connection;

/// Per-peer dial backoff.
#[derive(Debug, Clone, Copy)]
struct DialBackoff {
    failures: u32,
    until: Instant,
    /// What the last failed dial tells the user, if it tells more than "unreachable".
    cause: Option<QueueReason>,
}

/// Connections to peers and the bookkeeping around dialing them.
#[derive(Debug, Default)]
pub(super) struct ConnectionPool {
    /// One reusable connection per peer (dialed or accepted).
    conns: HashMap<NodeId, Connection>,
    /// Per-peer dial locks (present while someone dials or waits for a dial).
    dialing: HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>,
    /// Peers not to dial before a time.
    backoff: HashMap<NodeId, DialBackoff>,
    /// The real address each peer last connected to us from, or was last reached at on
    /// a connection that closed.
    last_addr: HashMap<NodeId, SocketAddr>,
    /// Live connections per peer.
    peer_conns: HashMap<NodeId, usize>,
    /// When the cached connection of each peer was last forgotten (it closed).
    closed_at: HashMap<NodeId, Instant>,
}

impl ConnectionPool {
    /// The cached connection to `peer`, if it is still open.
    pub(super) fn live(&self, peer: &NodeId) -> Option<Connection> {
        self.conns
            .get(peer)
            .filter(|c| c.quic().close_reason().is_none())
            .cloned()
    }

    /// The peers with an open connection.
    pub(super) fn live_peers(&self) -> Vec<NodeId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.quic().close_reason().is_none())
            .map(|(peer, _)| *peer)
            .collect()
    }

    /// The cached connection to `peer`, open or not.
    pub(super) fn cached(&self, peer: &NodeId) -> Option<Connection> {
        self.conns.get(peer).cloned()
    }

    /// Caches a fresh connection and clears its peer's backoff; for one the peer
    /// dialed from a real address, remembers that address.
    pub(super) fn register(&mut self, conn: &Connection, from: Option<SocketAddr>) {
        let peer = conn.remote_node_id();
        self.conns.insert(peer, conn.clone());
        self.backoff.remove(&peer);
        if let Some(addr) = from {
            self.note_came_from(peer, addr);
        }
    }

    /// Remembers that `peer` connected to us from `addr`, if that is a real address: the
    /// address of a connection through the path layer is the peer's mapped address,
    /// which names the peer, not a place to dial it at.
    fn note_came_from(&mut self, peer: NodeId, addr: SocketAddr) {
        if !crate::net::is_mapped(addr) {
            bounded_insert(&mut self.last_addr, peer, addr);
        }
    }

    /// Forgets `conn` if it is the cached connection of its peer, remembering when it
    /// closed and `reached`, a real address the peer was last reached at on it.
    pub(super) fn forget(&mut self, conn: &Connection, reached: Option<SocketAddr>) {
        let peer = conn.remote_node_id();
        if self
            .conns
            .get(&peer)
            .is_some_and(|c| c.quic().stable_id() == conn.quic().stable_id())
        {
            self.conns.remove(&peer);
            bounded_insert(&mut self.closed_at, peer, Instant::now());
            if let Some(addr) = reached {
                self.note_came_from(peer, addr);
            }
        }
    }

    /// Whether the last connection to `peer` closed within `within` of `now`; a `true`
    /// is given once per closed connection (the caller tries the peer once).
    pub(super) fn take_recently_closed(
        &mut self,
        peer: &NodeId,
        now: Instant,
        within: Duration,
    ) -> bool {
        self.closed_at
            .remove(peer)
            .is_some_and(|at| now.saturating_duration_since(at) < within)
    }

    /// The lock that makes concurrent senders to `peer` share one dial.
    pub(super) fn dial_lock(&mut self, peer: NodeId) -> Arc<tokio::sync::Mutex<()>> {
        self.dialing.entry(peer).or_default().clone()
    }

    /// Drops the dial lock of `peer` when nobody else holds it.
    pub(super) fn release_dial_lock(&mut self, peer: &NodeId, held: Arc<tokio::sync::Mutex<()>>) {
        // Only the map and `held` refer to it: nobody else waits.
        if Arc::strong_count(&held) <= 2 {
            self.dialing.remove(peer);
        }
    }

    /// How long `peer` is still in dial backoff, if it is.
    pub(super) fn backoff_left(&self, peer: &NodeId, now: Instant) -> Option<Duration> {
        self.backoff
            .get(peer)
            .filter(|b| b.until > now)
            .map(|b| b.until - now)
    }

    /// Counts a failed dial; `delay(failures)` says how long to wait, `cause` why it
    /// failed (kept for the sends that meet the backoff).
    pub(super) fn note_failure(
        &mut self,
        peer: NodeId,
        now: Instant,
        delay: impl Fn(u32) -> Duration,
        cause: Option<QueueReason>,
    ) {
        let failures = self.backoff.get(&peer).map_or(0, |b| b.failures) + 1;
        let until = now + delay(failures);
        let backoff = DialBackoff {
            failures,
            until,
            cause,
        };
        bounded_insert(&mut self.backoff, peer, backoff);
    }

    /// Why the last dial of `peer` failed, while it is in backoff.
    pub(super) fn backoff_cause(&self, peer: &NodeId) -> Option<QueueReason> {
        self.backoff.get(peer).and_then(|b| b.cause)
    }

    /// Lets `peer` be dialed at once.
    pub(super) fn clear_backoff(&mut self, peer: &NodeId) {
        self.backoff.remove(peer);
    }

    /// The real address `peer` last connected to us from.
    pub(super) fn last_addr(&self, peer: &NodeId) -> Option<SocketAddr> {
        self.last_addr.get(peer).copied()
    }

    /// Counts a connection against its peer's limit ([`MAX_CONNECTIONS_PER_PEER`]):
    /// `false` (not counted) past the limit unless `force` (one we dialed ourselves).
    pub(super) fn take_slot(&mut self, peer: NodeId, force: bool) -> bool {
        let n = self.peer_conns.entry(peer).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_PEER && !force {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives a slot back.
    pub(super) fn release_slot(&mut self, peer: &NodeId) {
        if let Some(n) = self.peer_conns.get_mut(peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.peer_conns.remove(peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use p2p_crypto::SecretKey;

    use super::*;

    #[test]
    fn only_real_addresses_are_remembered_as_where_a_peer_came_from() {
        let mut p = ConnectionPool::default();
        let peer = SecretKey::from_bytes(&[1; 32]).public();
        let mapped = crate::net::mapped_addr_for_test(3);
        assert!(crate::net::is_mapped(mapped));
        p.note_came_from(peer, mapped);
        assert_eq!(p.last_addr(&peer), None, "a mapped address is not a place");
        let real: SocketAddr = "192.0.2.7:4433".parse().expect("addr");
        p.note_came_from(peer, real);
        assert_eq!(p.last_addr(&peer), Some(real));
        p.note_came_from(peer, mapped);
        assert_eq!(p.last_addr(&peer), Some(real), "kept");
    }

    #[test]
    fn backoff_grows_and_clears() {
        let mut p = ConnectionPool::default();
        let peer = SecretKey::from_bytes(&[1; 32]).public();
        let t0 = Instant::now();
        assert_eq!(p.backoff_left(&peer, t0), None);
        let delay = |n: u32| Duration::from_secs(u64::from(n));
        p.note_failure(peer, t0, delay, None);
        assert_eq!(p.backoff_left(&peer, t0), Some(Duration::from_secs(1)));
        p.note_failure(peer, t0, delay, None);
        assert_eq!(p.backoff_left(&peer, t0), Some(Duration::from_secs(2)));
        assert_eq!(p.backoff_left(&peer, t0 + Duration::from_secs(2)), None);
        p.clear_backoff(&peer);
        assert_eq!(p.backoff_left(&peer, t0), None);
    }

    #[test]
    fn slots_are_bounded_per_peer_unless_forced() {
        let mut p = ConnectionPool::default();
        let peer = SecretKey::from_bytes(&[1; 32]).public();
        for _ in 0..MAX_CONNECTIONS_PER_PEER {
            assert!(p.take_slot(peer, false));
        }
        assert!(!p.take_slot(peer, false));
        assert!(p.take_slot(peer, true));
        for _ in 0..=MAX_CONNECTIONS_PER_PEER {
            p.release_slot(&peer);
        }
        assert!(p.peer_conns.is_empty());
    }

    #[test]
    fn a_recent_close_is_given_once_and_only_while_recent() {
        let mut p = ConnectionPool::default();
        let peer = SecretKey::from_bytes(&[1; 32]).public();
        let now = Instant::now();
        let within = Duration::from_secs(60);
        assert!(!p.take_recently_closed(&peer, now, within));
        p.closed_at.insert(peer, now);
        assert!(p.take_recently_closed(&peer, now + Duration::from_secs(1), within));
        assert!(!p.take_recently_closed(&peer, now, within), "only once");
        p.closed_at.insert(peer, now);
        assert!(
            !p.take_recently_closed(&peer, now + within, within),
            "too old"
        );
    }

    #[tokio::test]
    async fn the_dial_lock_is_dropped_by_its_last_holder() {
        let mut p = ConnectionPool::default();
        let peer = SecretKey::from_bytes(&[1; 32]).public();
        let a = p.dial_lock(peer);
        let b = p.dial_lock(peer);
        assert!(Arc::ptr_eq(&a, &b));
        p.release_dial_lock(&peer, a);
        assert!(p.dialing.contains_key(&peer), "b still holds it");
        p.release_dial_lock(&peer, b);
        assert!(p.dialing.is_empty());
    }
}
