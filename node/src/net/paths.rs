//! The paths to each peer: which way every packet to a peer goes, which address every
//! packet from a peer is labelled with, and when to probe. A plain state machine: every
//! method takes `now`, nothing here touches a socket or a clock, so the whole policy is
//! unit-tested without a network (the socket and the driver in [`super`] carry out the
//! `Action`s it returns).
//!
//! # Policy
//!
//! - **Direct when proven.** A direct path is an address the peer answered a signed ping
//!   from. While its last pong is younger than [`PathConfig::trust`], packets go there
//!   alone; when that lapses they go both there and through the relay (nothing is lost
//!   while we find out), and a path with no pong for [`PathConfig::dead`] is dropped:
//!   traffic is back on the relay.
//! - **Relay otherwise**, when the peer has a relay and we are connected to it.
//! - **Spray** when there is neither: every candidate address at once (a dial on a LAN
//!   without a relay); the first to answer a ping becomes the direct path.
//! - **Hole punching.** While packets flow to a peer with no direct path, a punch round
//!   starts: a `CallMeMaybe` with our candidates goes through the relay and we ping all
//!   the peer's candidates in a few waves; the peer, on the `CallMeMaybe`, pings ours at
//!   the same time. (Knowing none of the peer's addresses, the `CallMeMaybe` alone
//!   starts it: the peer's pings tell us where it is.) A round that finds nothing is retried after a growing delay
//!   ([`PathConfig::retry_min`] .. [`PathConfig::retry_max`]).
//! - **Heartbeat.** While packets flow on a direct path it is pinged every
//!   [`PathConfig::heartbeat`], which keeps it trusted and keeps NAT mappings open.
//!
//! # Labels
//!
//! quinn sees a peer at its mapped address (`mapped`). A packet from a relay is
//! labelled with its (relay-authenticated) sender's mapped address. A UDP datagram is
//! labelled only when its source address is *claimed* by one peer: by a verified ping or
//! pong from that address (kept while it is in use), or because we just sent that peer
//! packets or pings there (kept `SENT_CLAIM`). Anything else reaches quinn with its
//! real address, exactly like a plain UDP socket: a connection dialed to a real address,
//! or a caller who dialed ours. An address that just delivered the handshake of such a
//! connection is not claimed for `HANDSHAKE_GUARD`, so a connection is never
//! relabelled in the middle of its handshake (quinn would drop its packets).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use p2p_crypto::NodeId;
use p2p_discovery::RelayRef;

use super::{
    mapped,
    probe::{Probe, ProbeKind, TxId, MAX_CANDIDATES},
};

/// A node key as raw bytes (how relays name nodes).
pub(crate) type Key = [u8; 32];

/// Timers and bounds of the path layer. The defaults suit people; tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathConfig {
    /// Whether direct paths are used at all. `false` sends everything through the relay
    /// (and answers no pings). Default `true`.
    pub direct: bool,
    /// How often a direct path in use is pinged. Default 2 s.
    pub heartbeat: Duration,
    /// How long after its last pong a direct path is used alone. Default 5 s.
    pub trust: Duration,
    /// How long without a pong before a direct path is given up. Default 12 s.
    pub dead: Duration,
    /// A peer we sent to within this long is active: only active peers are probed.
    /// Default 15 s.
    pub active: Duration,
    /// How long packets flow to a peer before the first punch round. Default 0 (at
    /// once); a delay saves the probes for exchanges that end quickly. At once, a
    /// sprayed dial's first pings go ahead of its handshake, so the peer labels that
    /// handshake as ours (see the module documentation, "Labels"); with a delay it
    /// arrives unlabelled, and the peer cannot dial our address back for 10 s.
    pub punch_delay: Duration,
    /// Length of one punch round (its ping waves go out at 0, 0.3, 1 and 2 s). Default 3 s.
    pub round: Duration,
    /// Delay before the first retry after a failed punch round; doubles per failure.
    /// Default 5 s.
    pub retry_min: Duration,
    /// Longest delay between punch rounds. Default 60 s.
    pub retry_max: Duration,
    /// Most peers tracked; the least recently active idle one is forgotten past it.
    /// Default 4096.
    pub max_peers: usize,
}

impl Default for PathConfig {
    fn default() -> Self {
        Self {
            direct: true,
            heartbeat: Duration::from_secs(2),
            trust: Duration::from_secs(5),
            dead: Duration::from_secs(12),
            active: Duration::from_secs(15),
            punch_delay: Duration::ZERO,
            round: Duration::from_secs(3),
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(60),
            max_peers: 4096,
        }
    }
}

/// Offsets of the ping waves within a punch round.
const WAVES: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(300),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// How long a claim made by sending to an address lasts.
pub(crate) const SENT_CLAIM: Duration = Duration::from_secs(30);
/// How long a claim made by a verified probe lasts without being renewed.
const VERIFIED_CLAIM: Duration = Duration::from_secs(600);
/// How long an address that delivered an unlabelled handshake is not claimed.
pub(crate) const HANDSHAKE_GUARD: Duration = Duration::from_secs(10);
/// How long a relay's "not connected here" answer keeps us off that relay for a peer.
const GONE_HOLD: Duration = Duration::from_secs(5);
/// A direct path on which packets went out this long without anything coming back is
/// suspect: packets go both ways (direct and relay) until it answers again.
const SUSPECT: Duration = Duration::from_secs(1);
/// Least time between two pings sent back to one address in answer to its pings.
const PING_BACK_GAP: Duration = Duration::from_millis(100);
/// Pings remembered per candidate (their tx ids, to match pongs).
const MAX_PINGS: usize = 4;
/// Addresses claimed at most (about 16 candidates per tracked peer).
const MAX_CLAIMS_PER_PEER: usize = 16;
/// A peer is idle (and may be forgotten) after this long without traffic.
const IDLE: Duration = Duration::from_secs(60);

/// Which way packets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// Straight over UDP to the peer.
    Direct,
    /// Through a relay.
    Relay,
}

impl PathKind {
    /// `"direct"` or `"relay"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Relay => "relay",
        }
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one packet to a peer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Direct(SocketAddr),
    Relay {
        relay: NodeId,
        peer: Key,
    },
    Both {
        addr: SocketAddr,
        relay: NodeId,
        peer: Key,
    },
    Spray(Vec<SocketAddr>),
    Drop,
}

/// Where a probe came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeSource {
    Udp(SocketAddr),
    Relay(NodeId),
}

/// Something for the socket or the node to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send `probe` over UDP to `addr`.
    SendUdp { addr: SocketAddr, probe: Probe },
    /// Send `probe` through `relay` to `peer`.
    SendRelay {
        relay: NodeId,
        peer: NodeId,
        probe: Probe,
    },
    /// The path to `peer` changed (for events and logs).
    PathChanged {
        peer: NodeId,
        path: Option<PathKind>,
        addr: Option<SocketAddr>,
        rtt: Option<Duration>,
    },
    /// Connect to this relay: a peer is reachable only through it.
    WantRelay(RelayRef),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Published on discovery.
    Discovery,
    /// Named by the peer in a `CallMeMaybe`, or the source of its ping.
    Peer,
}

#[derive(Debug, Clone)]
struct Candidate {
    addr: SocketAddr,
    source: Source,
    pings: VecDeque<(TxId, Instant)>,
    last_ping: Option<Instant>,
    last_ping_back: Option<Instant>,
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
}

impl Candidate {
    fn new(addr: SocketAddr, source: Source) -> Self {
        Self {
            addr,
            source,
            pings: VecDeque::new(),
            last_ping: None,
            last_ping_back: None,
            last_pong: None,
            rtt: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Punch {
    /// When the running round started.
    round_start: Option<Instant>,
    /// Waves of the running round sent so far.
    waves: usize,
    /// Rounds failed in a row.
    failures: u32,
    /// Earliest start of the next round.
    next_round: Option<Instant>,
}

impl Punch {
    /// Starts a round now, its first wave sent (the failures before it are kept).
    fn start(&mut self, now: Instant) {
        self.round_start = Some(now);
        self.waves = 1;
        self.next_round = None;
    }
}

#[derive(Debug, Clone)]
struct Peer {
    node: NodeId,
    index: u32,
    relay: Option<RelayRef>,
    relay_gone_until: Option<Instant>,
    candidates: Vec<Candidate>,
    best: Option<SocketAddr>,
    last_send: Option<Instant>,
    /// The first packet sent on the direct path since the last one received on it.
    unanswered_since: Option<Instant>,
    /// When the peer last asked us to punch (a `CallMeMaybe`).
    punch_asked: Option<Instant>,
    /// Since when packets flow to the peer without a pause longer than `active`.
    active_since: Option<Instant>,
    last_recv: Option<(Instant, PathKind)>,
    punch: Punch,
    touched: Instant,
}

impl Peer {
    fn candidate(&self, addr: SocketAddr) -> Option<&Candidate> {
        self.candidates.iter().find(|c| c.addr == addr)
    }

    fn candidate_mut(&mut self, addr: SocketAddr) -> Option<&mut Candidate> {
        self.candidates.iter_mut().find(|c| c.addr == addr)
    }

    /// Adds a candidate (or upgrades its source); the oldest unproven one makes room.
    fn add_candidate(&mut self, addr: SocketAddr, source: Source) -> bool {
        if let Some(c) = self.candidate_mut(addr) {
            if source == Source::Peer {
                c.source = Source::Peer;
            }
            return false;
        }
        if self.candidates.len() >= MAX_CANDIDATES {
            let best = self.best;
            let victim = self
                .candidates
                .iter()
                .position(|c| Some(c.addr) != best && c.last_pong.is_none())
                .unwrap_or(0);
            if Some(self.candidates[victim].addr) == best {
                return false;
            }
            self.candidates.remove(victim);
        }
        self.candidates.push(Candidate::new(addr, source));
        true
    }

    fn active(&self, now: Instant, config: &PathConfig) -> bool {
        self.last_send
            .is_some_and(|t| now.saturating_duration_since(t) < config.active)
    }

    /// Whether the direct path `addr` is used alone: a pong within `trust`, packets
    /// sent there answered (the peer's QUIC acks) within [`SUSPECT`], and no request to
    /// punch from the peer since that pong (it would not ask if it had a direct path to
    /// us: it may have restarted at another address).
    fn trusted(&self, addr: SocketAddr, now: Instant, config: &PathConfig) -> bool {
        let last_pong = self.candidate(addr).and_then(|c| c.last_pong);
        let ponged = last_pong.is_some_and(|t| now.saturating_duration_since(t) < config.trust);
        let silent = self
            .unanswered_since
            .is_some_and(|t| now.saturating_duration_since(t) >= SUSPECT);
        let asked_since = self
            .punch_asked
            .is_some_and(|asked| last_pong.is_none_or(|pong| asked > pong));
        ponged && !silent && !asked_since
    }

    fn pong_age(&self, addr: SocketAddr, now: Instant) -> Option<Duration> {
        self.candidate(addr)
            .and_then(|c| c.last_pong)
            .map(|t| now.saturating_duration_since(t))
    }
}

#[derive(Debug, Clone, Copy)]
struct Claim {
    key: Key,
    verified: bool,
    until: Instant,
}

/// Hole-punching counts since they were last taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PunchStats {
    pub attempts: u32,
    pub successes: u32,
}

/// The path state of every peer.
#[derive(Debug)]
pub(crate) struct Paths {
    me: NodeId,
    config: PathConfig,
    v6: bool,
    peers: HashMap<Key, Peer>,
    by_index: HashMap<u32, Key>,
    next_index: u32,
    claims: HashMap<SocketAddr, Claim>,
    unlabelled: HashMap<SocketAddr, Instant>,
    relays_up: HashSet<NodeId>,
    home: Option<RelayRef>,
    own: Vec<SocketAddr>,
    reflexive: Option<SocketAddr>,
    stats: PunchStats,
    tx_counter: u64,
    tx_seed: [u8; 4],
    /// Set when something needs the driver before its next tick.
    poll_requested: bool,
    /// Probes decided while routing (see [`Paths::take_actions`]).
    pending: Vec<Action>,
}

impl Paths {
    pub(crate) fn new(me: NodeId, config: PathConfig, v6: bool) -> Self {
        Self {
            me,
            config,
            v6,
            peers: HashMap::new(),
            by_index: HashMap::new(),
            next_index: 1,
            claims: HashMap::new(),
            unlabelled: HashMap::new(),
            relays_up: HashSet::new(),
            home: None,
            own: Vec::new(),
            reflexive: None,
            stats: PunchStats::default(),
            tx_counter: 0,
            tx_seed: rand::random(),
            poll_requested: false,
            pending: Vec::new(),
        }
    }

    fn next_tx(&mut self) -> TxId {
        self.tx_counter = self.tx_counter.wrapping_add(1);
        let mut tx = [0u8; 12];
        tx[..4].copy_from_slice(&self.tx_seed);
        tx[4..].copy_from_slice(&self.tx_counter.to_be_bytes());
        tx
    }

    /// The mapped address of `node`, tracking it if it is new. `None` when the table is
    /// full of active peers.
    pub(crate) fn mapped_addr(&mut self, node: NodeId, now: Instant) -> Option<SocketAddr> {
        let index = self.ensure_peer(node, now)?.index;
        Some(mapped::addr(index, self.v6))
    }

    /// The peer behind a mapped address.
    pub(crate) fn node_of(&self, addr: SocketAddr) -> Option<NodeId> {
        let index = mapped::index(addr)?;
        let key = self.by_index.get(&index)?;
        self.peers.get(key).map(|p| p.node)
    }

    fn ensure_peer(&mut self, node: NodeId, now: Instant) -> Option<&mut Peer> {
        let key = *node.as_bytes();
        if !self.peers.contains_key(&key) {
            if self.peers.len() >= self.config.max_peers && !self.evict_one(now) {
                return None;
            }
            if self.next_index > mapped::MAX_INDEX {
                return None;
            }
            let index = self.next_index;
            self.next_index += 1;
            self.by_index.insert(index, key);
            self.peers.insert(
                key,
                Peer {
                    node,
                    index,
                    relay: None,
                    relay_gone_until: None,
                    candidates: Vec::new(),
                    best: None,
                    last_send: None,
                    unanswered_since: None,
                    punch_asked: None,
                    active_since: None,
                    last_recv: None,
                    punch: Punch::default(),
                    touched: now,
                },
            );
        }
        let peer = self.peers.get_mut(&key)?;
        peer.touched = now;
        Some(peer)
    }

    /// Forgets the least recently touched peer that has been idle for [`IDLE`].
    fn evict_one(&mut self, now: Instant) -> bool {
        let victim = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.touched) >= IDLE)
            .min_by_key(|(_, p)| p.touched)
            .map(|(k, _)| *k);
        let Some(key) = victim else {
            return false;
        };
        if let Some(p) = self.peers.remove(&key) {
            self.by_index.remove(&p.index);
        }
        self.claims.retain(|_, c| c.key != key);
        true
    }

    /// What discovery says of a peer: its direct addresses and home relay.
    pub(crate) fn set_peer_info(
        &mut self,
        node: NodeId,
        addrs: &[SocketAddr],
        relay: Option<RelayRef>,
        now: Instant,
    ) {
        if self.ensure_peer(node, now).is_some() {
            self.update_peer_info(node, addrs, relay, now);
        }
    }

    /// Like [`Paths::set_peer_info`] for a peer already tracked; others are left out
    /// (an online list of thousands must not fill the table).
    pub(crate) fn update_peer_info(
        &mut self,
        node: NodeId,
        addrs: &[SocketAddr],
        relay: Option<RelayRef>,
        now: Instant,
    ) {
        let direct = self.config.direct;
        let Some(peer) = self.peers.get_mut(node.as_bytes()) else {
            return;
        };
        peer.touched = peer.touched.max(now);
        let mut changed = false;
        if relay.is_some() && peer.relay != relay {
            peer.relay = relay;
            peer.relay_gone_until = None;
            changed = true;
        }
        // Discovery's list replaces what discovery said before; what the peer told us
        // itself, and any proven path, stay.
        let keep: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(usable)
            .take(MAX_CANDIDATES)
            .collect();
        let best = peer.best;
        let before = peer.candidates.len();
        peer.candidates
            .retain(|c| c.source == Source::Peer || keep.contains(&c.addr) || Some(c.addr) == best);
        changed |= peer.candidates.len() != before;
        for a in keep {
            changed |= peer.add_candidate(a, Source::Discovery);
        }
        if changed && direct && peer.best.is_none() {
            // New information: a punch round may find something now.
            peer.punch.next_round = Some(now);
            peer.punch.failures = 0;
        }
    }

    /// Our own candidate addresses, for `CallMeMaybe`.
    pub(crate) fn set_own_candidates(&mut self, addrs: Vec<SocketAddr>) {
        self.own = addrs
            .into_iter()
            .filter(usable)
            .take(MAX_CANDIDATES)
            .collect();
    }

    /// Our address as the home relay sees it (the public side of our NAT): offered to
    /// peers first.
    pub(crate) fn set_reflexive(&mut self, addr: Option<SocketAddr>) {
        self.reflexive = addr.filter(usable);
    }

    /// What we offer a peer to ping: our reflexive address, then our own addresses.
    fn offer(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.reflexive.into_iter().collect();
        for a in &self.own {
            if !out.contains(a) && out.len() < MAX_CANDIDATES {
                out.push(*a);
            }
        }
        out
    }

    /// Our home relay (reached without being named by a peer).
    pub(crate) fn set_home(&mut self, relay: Option<RelayRef>) {
        self.home = relay;
    }

    /// Whether the relay connection to `relay` is up.
    pub(crate) fn set_relay_up(&mut self, relay: NodeId, up: bool) {
        if up {
            self.relays_up.insert(relay);
        } else {
            self.relays_up.remove(&relay);
        }
    }

    fn relay_usable(&self, peer: &Peer, now: Instant) -> Option<NodeId> {
        let relay = peer.relay?;
        if peer.relay_gone_until.is_some_and(|t| now < t) {
            return None;
        }
        self.relays_up
            .contains(&relay.node_id)
            .then_some(relay.node_id)
    }

    /// Where the next packet for mapped peer `index` goes. Notes that the peer is active.
    pub(crate) fn route(&mut self, index: u32, now: Instant) -> Route {
        let Some(key) = self.by_index.get(&index).copied() else {
            return Route::Drop;
        };
        let Some(peer) = self.peers.get(&key) else {
            return Route::Drop;
        };
        let relay = self.relay_usable(peer, now);
        let direct = self.config.direct;
        let want_relay = peer
            .relay
            .filter(|r| relay.is_none() && !self.relays_up.contains(&r.node_id));
        let route = match (peer.best.filter(|_| direct), relay) {
            (Some(best), relay) => {
                let trusted = peer.trusted(best, now, &self.config);
                match relay {
                    Some(relay) if !trusted => Route::Both {
                        addr: best,
                        relay,
                        peer: key,
                    },
                    _ => Route::Direct(best),
                }
            }
            (None, Some(relay)) => Route::Relay { relay, peer: key },
            (None, None) if direct => {
                let addrs: Vec<SocketAddr> = peer.candidates.iter().map(|c| c.addr).collect();
                if addrs.is_empty() {
                    Route::Drop
                } else {
                    Route::Spray(addrs)
                }
            }
            (None, None) => Route::Drop,
        };
        if let (Route::Direct(_) | Route::Both { .. }, Some(peer)) =
            (&route, self.peers.get_mut(&key))
        {
            peer.unanswered_since.get_or_insert(now);
        }
        if let Route::Spray(addrs) = &route {
            for a in addrs {
                self.claim(*a, key, false, now);
            }
        }
        if let Some(peer) = self.peers.get_mut(&key) {
            if !peer.active(now, &self.config) {
                peer.active_since = Some(now);
                self.poll_requested = true;
            }
            peer.last_send = Some(now);
            peer.touched = now;
        }
        // A punch round that is due starts before this packet leaves, so the peer gets
        // our CallMeMaybe through the relay ahead of it.
        if self.punch_due(&key, now) {
            let mut out = std::mem::take(&mut self.pending);
            self.poll_peer(key, now, &mut out);
            self.pending = out;
        }
        if want_relay.is_some() {
            self.poll_requested = true;
        }
        route
    }

    /// Whether a punch round with `key` should start now.
    fn punch_due(&self, key: &Key, now: Instant) -> bool {
        let Some(peer) = self.peers.get(key) else {
            return false;
        };
        let relay = self.relay_usable(peer, now);
        let can_punch = !peer.candidates.is_empty()
            || (relay.is_some() && (!self.own.is_empty() || self.reflexive.is_some()));
        self.config.direct
            && can_punch
            && peer.best.is_none()
            && peer.punch.round_start.is_none()
            && peer.punch.next_round.is_none_or(|t| t <= now)
            && peer
                .active_since
                .is_some_and(|t| now.saturating_duration_since(t) >= self.config.punch_delay)
    }

    /// Probes decided while routing, for the socket to send before the packet.
    pub(crate) fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.pending)
    }

    /// Whether the driver should run now (and clears the request).
    pub(crate) fn take_poll_request(&mut self) -> bool {
        std::mem::take(&mut self.poll_requested)
    }

    /// Records that `addr` is `key`'s (see the module documentation).
    fn claim(&mut self, addr: SocketAddr, key: Key, verified: bool, now: Instant) {
        if self
            .unlabelled
            .get(&addr)
            .is_some_and(|t| now.saturating_duration_since(*t) < HANDSHAKE_GUARD)
        {
            return;
        }
        let until = now + if verified { VERIFIED_CLAIM } else { SENT_CLAIM };
        match self.claims.get_mut(&addr) {
            Some(c) if c.until > now && c.verified && !verified && c.key != key => {}
            Some(c) => {
                c.key = key;
                c.verified = verified || (c.verified && c.key == key);
                c.until = c.until.max(until);
            }
            None => {
                let max = self.config.max_peers.saturating_mul(MAX_CLAIMS_PER_PEER);
                if self.claims.len() >= max {
                    self.claims.retain(|_, c| c.until > now);
                    if self.claims.len() >= max {
                        return;
                    }
                }
                self.claims.insert(
                    addr,
                    Claim {
                        key,
                        verified,
                        until,
                    },
                );
            }
        }
    }

    /// The peer whose live claim on `addr` labels the datagrams from there, if any.
    pub(crate) fn claim_holder(&self, addr: SocketAddr, now: Instant) -> Option<NodeId> {
        let claim = self.claims.get(&addr).filter(|c| c.until > now)?;
        self.peers.get(&claim.key).map(|p| p.node)
    }

    /// The label of a UDP datagram from `addr`: the claiming peer's mapped address, or
    /// `None` to pass the real address. `long_header` says the datagram is a QUIC
    /// handshake-phase packet.
    pub(crate) fn label_udp(
        &mut self,
        addr: SocketAddr,
        long_header: bool,
        now: Instant,
    ) -> Option<SocketAddr> {
        if let Some(t) = self.unlabelled.get(&addr).copied() {
            if now.saturating_duration_since(t) < HANDSHAKE_GUARD {
                if long_header {
                    self.unlabelled.insert(addr, now);
                }
                return None;
            }
            self.unlabelled.remove(&addr);
        }
        let claimed = self
            .claims
            .get(&addr)
            .filter(|c| c.until > now)
            .map(|c| c.key);
        let Some(key) = claimed else {
            if long_header {
                let max = self.config.max_peers;
                if self.unlabelled.len() >= max {
                    self.unlabelled
                        .retain(|_, t| now.saturating_duration_since(*t) < HANDSHAKE_GUARD);
                }
                if self.unlabelled.len() < max {
                    self.unlabelled.insert(addr, now);
                }
            }
            return None;
        };
        let peer = self.peers.get_mut(&key)?;
        peer.last_recv = Some((now, PathKind::Direct));
        peer.touched = now;
        if peer.best == Some(addr) {
            peer.unanswered_since = None;
        }
        Some(mapped::addr(peer.index, self.v6))
    }

    /// The label of a packet that `relay` delivered from `src`.
    pub(crate) fn label_relay(
        &mut self,
        src: NodeId,
        relay: RelayRef,
        now: Instant,
    ) -> Option<SocketAddr> {
        let v6 = self.v6;
        self.ensure_peer(src, now)?;
        let current_ok = self
            .peers
            .get(src.as_bytes())
            .is_some_and(|p| self.relay_usable(p, now).is_some());
        let peer = self.peers.get_mut(src.as_bytes())?;
        // Answer through the relay the peer used, unless it has a working one already.
        if !current_ok || peer.relay.is_some_and(|r| r.node_id == relay.node_id) {
            peer.relay = Some(relay);
            peer.relay_gone_until = None;
        }
        peer.last_recv = Some((now, PathKind::Relay));
        Some(mapped::addr(peer.index, v6))
    }

    /// The relay says `node` is not connected to it.
    pub(crate) fn peer_gone(&mut self, node: NodeId, relay: NodeId, now: Instant) {
        if let Some(peer) = self.peers.get_mut(node.as_bytes()) {
            if peer.relay.is_some_and(|r| r.node_id == relay) {
                peer.relay_gone_until = Some(now + GONE_HOLD);
            }
        }
    }

    /// The path packets to `node` take now, if any.
    pub(crate) fn path_of(&self, node: &NodeId, now: Instant) -> Option<PathKind> {
        let peer = self.peers.get(node.as_bytes())?;
        if let Some(best) = peer.best.filter(|_| self.config.direct) {
            // A path in doubt carries copies on both: what answers is what works.
            let relay_too = self.relay_usable(peer, now).is_some();
            if !peer.trusted(best, now, &self.config) && relay_too {
                return peer.last_recv.map(|(_, k)| k).or(Some(PathKind::Direct));
            }
            return Some(PathKind::Direct);
        }
        if self.relay_usable(peer, now).is_some() {
            return Some(PathKind::Relay);
        }
        (!peer.candidates.is_empty() && self.config.direct).then_some(PathKind::Direct)
    }

    /// The path the last packet from `node` came on.
    pub(crate) fn recv_path(&self, node: &NodeId) -> Option<PathKind> {
        self.peers
            .get(node.as_bytes())
            .and_then(|p| p.last_recv)
            .map(|(_, k)| k)
    }

    /// The direct address in use for `node` and its round-trip time, if any.
    pub(crate) fn direct_of(&self, node: &NodeId) -> Option<(SocketAddr, Option<Duration>)> {
        let peer = self.peers.get(node.as_bytes())?;
        let best = peer.best?;
        Some((best, peer.candidate(best).and_then(|c| c.rtt)))
    }

    /// Hole-punching counts since the last call.
    pub(crate) fn take_stats(&mut self) -> PunchStats {
        std::mem::take(&mut self.stats)
    }

    fn ping(&mut self, key: Key, addr: SocketAddr, now: Instant, out: &mut Vec<Action>) {
        let tx = self.next_tx();
        let me = self.me;
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let node = peer.node;
        let Some(c) = peer.candidate_mut(addr) else {
            return;
        };
        if c.pings.len() >= MAX_PINGS {
            c.pings.pop_front();
        }
        c.pings.push_back((tx, now));
        c.last_ping = Some(now);
        out.push(Action::SendUdp {
            addr,
            probe: Probe {
                from: me,
                to: node,
                tx,
                kind: ProbeKind::Ping,
            },
        });
        self.claim(addr, key, false, now);
    }

    /// Handles a verified probe. Probes not addressed to us are ignored.
    pub(crate) fn on_probe(&mut self, probe: Probe, src: ProbeSource, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if probe.to != self.me || probe.from == self.me || !self.config.direct {
            return out;
        }
        let from = probe.from;
        let key = *from.as_bytes();
        match (probe.kind, src) {
            (ProbeKind::Ping, ProbeSource::Udp(addr)) => {
                let trust = self.config.trust;
                let Some(peer) = self.ensure_peer(from, now) else {
                    return out;
                };
                if usable(&addr) {
                    peer.add_candidate(addr, Source::Peer);
                }
                // Ping back unless the address is proven already: our own earlier pings
                // there were most likely dropped by the peer's NAT (sent before the peer
                // opened it), and this one will pass.
                let proven = peer
                    .candidate(addr)
                    .and_then(|c| c.last_pong)
                    .is_some_and(|t| now.saturating_duration_since(t) < trust);
                // At most one ping back per address per PING_BACK_GAP, so two nodes
                // answering each other's pings cannot keep each other busy.
                let just_pinged_back = peer
                    .candidate(addr)
                    .and_then(|c| c.last_ping_back)
                    .is_some_and(|t| now.saturating_duration_since(t) < PING_BACK_GAP);
                if let Some(c) = peer.candidate_mut(addr) {
                    if !proven && !just_pinged_back {
                        c.last_ping_back = Some(now);
                    }
                }
                self.claim(addr, key, true, now);
                out.push(Action::SendUdp {
                    addr,
                    probe: Probe {
                        from: self.me,
                        to: from,
                        tx: probe.tx,
                        kind: ProbeKind::Pong { observed: addr },
                    },
                });
                if !proven && !just_pinged_back && usable(&addr) {
                    // Validate the path in our direction too. With no direct path yet,
                    // that ping is the first wave of our round: the packets we send the
                    // peer next (the answer to its handshake) do not start another.
                    if let Some(peer) = self.peers.get_mut(&key) {
                        if peer.best.is_none() && peer.punch.round_start.is_none() {
                            peer.punch.start(now);
                            self.stats.attempts = self.stats.attempts.saturating_add(1);
                        }
                    }
                    self.ping(key, addr, now, &mut out);
                }
            }
            (ProbeKind::Pong { observed }, ProbeSource::Udp(addr)) => {
                self.on_pong(key, addr, probe.tx, observed, now, &mut out);
            }
            (ProbeKind::CallMeMaybe { candidates }, _) => {
                let Some(peer) = self.ensure_peer(from, now) else {
                    return out;
                };
                for a in candidates.into_iter().filter(usable) {
                    peer.add_candidate(a, Source::Peer);
                }
                // The peer is pinging ours now: ping its candidates at the same time.
                // (It asks because it has no direct path to us: whatever path we think we
                // have may be to an address it no longer uses, so ping even then.)
                peer.last_send = Some(now);
                peer.punch_asked = Some(now);
                if peer.best.is_none() {
                    peer.punch.start(now);
                }
                let addrs: Vec<SocketAddr> = peer.candidates.iter().map(|c| c.addr).collect();
                for a in addrs {
                    self.ping(key, a, now, &mut out);
                }
            }
            // Pings and pongs are only ever sent directly.
            (ProbeKind::Ping | ProbeKind::Pong { .. }, ProbeSource::Relay(_)) => {}
        }
        out
    }

    fn on_pong(
        &mut self,
        key: Key,
        addr: SocketAddr,
        tx: TxId,
        observed: SocketAddr,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let Some(c) = peer.candidate_mut(addr) else {
            return;
        };
        let Some(pos) = c.pings.iter().position(|(t, _)| *t == tx) else {
            return;
        };
        let (_, sent) = c.pings[pos];
        c.pings.remove(pos);
        let rtt = now.saturating_duration_since(sent);
        c.last_pong = Some(now);
        c.rtt = Some(rtt);
        let node = peer.node;
        if peer.best == Some(addr) {
            peer.unanswered_since = None;
        }
        let switch = match peer.best {
            None => true,
            Some(b) if b == addr => false,
            Some(b) => {
                let old = peer.candidate(b);
                let stale = !peer.trusted(b, now, &self.config);
                // Clearly faster only (half the round trip, and 2 ms less), so two
                // addresses of one host do not take turns on measurement noise.
                let faster = old.and_then(|o| o.rtt).is_some_and(|old_rtt| {
                    rtt.saturating_mul(2) < old_rtt
                        && old_rtt.saturating_sub(rtt) >= Duration::from_millis(2)
                });
                stale || faster
            }
        };
        if switch {
            let was_none = peer.best.is_none();
            peer.best = Some(addr);
            peer.unanswered_since = None;
            if was_none {
                if peer.punch.round_start.is_some() || peer.punch.failures > 0 {
                    self.stats.successes = self.stats.successes.saturating_add(1);
                }
                peer.punch = Punch::default();
                out.push(Action::PathChanged {
                    peer: node,
                    path: Some(PathKind::Direct),
                    addr: Some(addr),
                    rtt: Some(rtt),
                });
            } else {
                tracing::debug!(peer = %node, %addr, ?rtt, "direct path moves to another address");
            }
        }
        self.claim(addr, key, true, now);
        if usable(&observed) && !self.own.contains(&observed) && self.own.len() < MAX_CANDIDATES {
            self.own.push(observed);
        }
    }

    /// Timers: heartbeats, dead paths, punch rounds. Returns what to send (with any
    /// probes decided while routing that were not taken yet).
    pub(crate) fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = std::mem::take(&mut self.pending);
        let keys: Vec<Key> = self.peers.keys().copied().collect();
        for key in keys {
            self.poll_peer(key, now, &mut out);
        }
        if self.unlabelled.len() > 64 {
            self.unlabelled
                .retain(|_, t| now.saturating_duration_since(*t) < HANDSHAKE_GUARD);
        }
        out
    }

    fn poll_peer(&mut self, key: Key, now: Instant, out: &mut Vec<Action>) {
        let config = self.config.clone();
        let relay = match self.peers.get(&key) {
            Some(p) => self.relay_usable(p, now),
            None => return,
        };
        let home = self.home;
        let relays_up = self.relays_up.clone();
        let own = self.offer();
        let me = self.me;
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let node = peer.node;
        if config.direct {
            if let Some(best) = peer.best {
                let dead = peer
                    .pong_age(best, now)
                    .is_none_or(|age| age >= config.dead);
                if dead {
                    peer.best = None;
                    peer.punch = Punch {
                        next_round: Some(now + config.retry_min),
                        ..Punch::default()
                    };
                    out.push(Action::PathChanged {
                        peer: node,
                        path: relay.map(|_| PathKind::Relay),
                        addr: None,
                        rtt: None,
                    });
                }
            }
        }
        if !peer.active(now, &config) {
            return;
        }
        // A peer reachable only through a relay we are not connected to.
        if let Some(r) = peer.relay {
            if !relays_up.contains(&r.node_id) && home.is_none_or(|h| h.node_id != r.node_id) {
                out.push(Action::WantRelay(r));
            }
        }
        if !config.direct {
            return;
        }
        if let Some(best) = peer.best {
            let due = peer
                .candidate(best)
                .and_then(|c| c.last_ping)
                .is_none_or(|t| now.saturating_duration_since(t) >= config.heartbeat);
            if due {
                self.ping(key, best, now, out);
            }
            return;
        }
        // Nothing to ping, and nothing to offer the peer so it pings us.
        if peer.candidates.is_empty() && (relay.is_none() || own.is_empty()) {
            return;
        }
        match peer.punch.round_start {
            Some(start) => {
                let elapsed = now.saturating_duration_since(start);
                let mut waves = 0;
                while peer.punch.waves < WAVES.len() && elapsed >= WAVES[peer.punch.waves] {
                    peer.punch.waves += 1;
                    waves += 1;
                }
                if elapsed >= config.round {
                    let failures = peer.punch.failures.saturating_add(1);
                    let shift = failures.saturating_sub(1).min(16);
                    let delay = config
                        .retry_min
                        .saturating_mul(1 << shift)
                        .min(config.retry_max);
                    peer.punch = Punch {
                        round_start: None,
                        waves: 0,
                        failures,
                        next_round: Some(now + delay),
                    };
                } else if waves > 0 {
                    let addrs: Vec<SocketAddr> = peer.candidates.iter().map(|c| c.addr).collect();
                    for a in addrs {
                        self.ping(key, a, now, out);
                    }
                }
            }
            None => {
                let waited = peer
                    .active_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= config.punch_delay);
                if peer.punch.next_round.is_some_and(|t| now < t) || !waited {
                    return;
                }
                peer.punch.start(now);
                self.stats.attempts = self.stats.attempts.saturating_add(1);
                if let Some(relay) = relay {
                    out.push(Action::SendRelay {
                        relay,
                        peer: node,
                        probe: Probe {
                            from: me,
                            to: node,
                            tx: [0; 12],
                            kind: ProbeKind::CallMeMaybe { candidates: own },
                        },
                    });
                }
                let addrs: Vec<SocketAddr> = peer.candidates.iter().map(|c| c.addr).collect();
                for a in addrs {
                    self.ping(key, a, now, out);
                }
            }
        }
    }

    /// Whether any peer is active (the driver ticks only then).
    pub(crate) fn any_active(&self, now: Instant) -> bool {
        self.peers.values().any(|p| p.active(now, &self.config))
    }
}

/// Whether an address can be a direct path (not unspecified, no port 0, not mapped).
fn usable(addr: &SocketAddr) -> bool {
    !addr.ip().is_unspecified() && addr.port() != 0 && mapped::index(*addr).is_none()
}

#[cfg(test)]
mod tests;
