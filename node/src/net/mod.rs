//! The connection layer: how packets reach a peer. Its own state, apart from messaging.
//!
//! ```text
//!                       quinn (one endpoint, every connection end-to-end TLS 1.3)
//!                                      │  mapped address per peer
//!                              ┌───────┴────────┐
//!                              │   PathSocket   │  Paths: per-peer route, labels, probes
//!                              └───┬────────┬───┘
//!             direct UDP (proven   │        │  relay link: QUIC to the relay,
//!             by signed pings)     │        │  (destination, packet) frames
//!                                  ▼        ▼
//!                               peer      relay (in the discovery server) ──► peer
//! ```
//!
//! - `mapped`: the stand-in address quinn sees for each peer.
//! - [`paths`]: the policy (a state machine taking `now`): route per packet, labels of
//!   arriving datagrams, hole punching, heartbeats.
//! - [`probe`]: the signed ping / pong / call-me-maybe packets.
//! - `socket`: the `AsyncUdpSocket` quinn runs on, which carries out the policy.
//! - `relay`: relay links, one QUIC connection per relay (the home relay, and the
//!   relays of peers that use another one).
//!
//! The driver task ticks the policy's timers and keeps the relay links up.

mod mapped;
pub mod paths;
pub mod probe;
mod relay;
mod socket;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, RwLock,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{ratelimit::TokenBucket, RelayRef};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use paths::{Action, Paths, ProbeSource};
pub use paths::{PathConfig, PathKind};
pub(crate) use socket::PathSocket;

use crate::endpoint::Endpoint;

/// Packets (from relays) waiting for quinn, at most.
const INBOUND_QUEUE: usize = 1024;
/// Packets waiting for one relay link, at most.
const LINK_QUEUE: usize = 1024;
/// Probe signatures verified per second at most (a flood of fake probes costs no more).
const PROBE_VERIFY_RATE: f64 = 2000.0;
/// Probes waiting for the driver, at most (more are dropped, as a full socket would).
const DEFERRED_PROBES: usize = 256;
/// Actions decided for probes handled at once (their answers), waiting for the driver,
/// at most.
const DEFERRED_ACTIONS: usize = 1024;
/// Relay links besides the home one, at most.
const MAX_OTHER_RELAYS: usize = 8;
/// How often hole-punching counts are reported to the home relay.
const REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Whether `addr` is a mapped address of the path layer (a stand-in naming a peer), not
/// a real one.
pub(crate) fn is_mapped(addr: SocketAddr) -> bool {
    mapped::index(addr).is_some()
}

/// The mapped address of peer `index` on an IPv4 socket, for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn mapped_addr_for_test(index: u32) -> SocketAddr {
    mapped::addr(index, false)
}

/// Locks a std mutex, recovering from poisoning (the data is plain bookkeeping).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Probe work left to the driver, so that signing and verifying never hold up the QUIC
/// packets read with a probe (see `Shared::on_probe_datagram`).
#[derive(Debug, Default)]
struct Deferred {
    /// Probes to verify and handle, with where they came from.
    probes: VecDeque<(Vec<u8>, ProbeSource)>,
    /// What the path table decided for probes handled at once (their answers, to sign
    /// and send), in order.
    actions: Vec<Action>,
}

/// A packet a relay delivered.
#[derive(Debug)]
struct Inbound {
    src: NodeId,
    relay: RelayRef,
    packet: Bytes,
}

/// What goes to a relay link.
#[derive(Debug)]
enum Outgoing {
    Packet([u8; 32], Bytes),
    Report(paths::PunchStats),
}

/// The home relay as this node knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HomeRelay {
    /// The relay (from the discovery server), if any.
    pub relay: Option<RelayRef>,
    /// Whether the link to it is up.
    pub connected: bool,
    /// Our UDP address as the relay sees it (our reflexive address).
    pub reflexive: Option<SocketAddr>,
}

/// A change of the path to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathEvent {
    /// The peer.
    pub peer: NodeId,
    /// The path packets take now (`None`: neither a direct path nor a relay).
    pub path: Option<PathKind>,
    /// The direct address, for a direct path.
    pub addr: Option<SocketAddr>,
    /// The round-trip time measured by the probe that proved it.
    pub rtt: Option<Duration>,
}

/// State shared by the socket, the driver and the relay links.
pub(crate) struct Shared {
    me: NodeId,
    secret: SecretKey,
    v6: bool,
    io: tokio::net::UdpSocket,
    udp: quinn::udp::UdpSocketState,
    paths: Mutex<Paths>,
    relays: RwLock<HashMap<NodeId, mpsc::Sender<Outgoing>>>,
    links: Mutex<HashMap<NodeId, (u64, CancellationToken)>>,
    wanted: Mutex<Vec<RelayRef>>,
    inbound_tx: mpsc::Sender<Inbound>,
    inbound_rx: Mutex<mpsc::Receiver<Inbound>>,
    probe_budget: Mutex<TokenBucket>,
    deferred: Mutex<Deferred>,
    /// Whether a driver runs (a node's endpoint; a bare one handles probes at once).
    driven: AtomicBool,
    wake: Notify,
    events: broadcast::Sender<PathEvent>,
    home: watch::Sender<HomeRelay>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("me", &self.me)
            .field("local", &self.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Binds the node's UDP socket.
    pub(crate) fn bind(
        addr: SocketAddr,
        secret: &SecretKey,
        config: PathConfig,
    ) -> std::io::Result<Arc<Self>> {
        let std_socket = std::net::UdpSocket::bind(addr)?;
        let udp = quinn::udp::UdpSocketState::new((&std_socket).into())?;
        std_socket.set_nonblocking(true)?;
        let io = tokio::net::UdpSocket::from_std(std_socket)?;
        let v6 = io.local_addr()?.is_ipv6();
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let me = secret.public();
        Ok(Arc::new(Self {
            me,
            secret: secret.clone(),
            v6,
            io,
            udp,
            paths: Mutex::new(Paths::new(me, config, v6)),
            relays: RwLock::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            wanted: Mutex::new(Vec::new()),
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            probe_budget: Mutex::new(TokenBucket::new(
                PROBE_VERIFY_RATE,
                PROBE_VERIFY_RATE / 4.0,
                Instant::now(),
            )),
            deferred: Mutex::new(Deferred::default()),
            driven: AtomicBool::new(false),
            wake: Notify::new(),
            events: broadcast::channel(256).0,
            home: watch::channel(HomeRelay::default()).0,
        }))
    }

    fn paths(&self) -> MutexGuard<'_, Paths> {
        lock(&self.paths)
    }

    /// The mapped address to dial `peer` at (`None` when the table is full).
    pub(crate) fn mapped_addr(&self, peer: NodeId) -> Option<SocketAddr> {
        self.paths().mapped_addr(peer, Instant::now())
    }

    /// The peer a mapped address stands for (`None` for real addresses).
    pub(crate) fn node_of(&self, addr: SocketAddr) -> Option<NodeId> {
        self.paths().node_of(addr)
    }

    /// What discovery says of `peer`: direct addresses and home relay.
    pub(crate) fn set_peer_info(
        &self,
        peer: NodeId,
        addrs: &[SocketAddr],
        relay: Option<RelayRef>,
    ) {
        self.paths()
            .set_peer_info(peer, addrs, relay, Instant::now());
    }

    /// Like [`Shared::set_peer_info`], only for a peer the path layer tracks already.
    pub(crate) fn update_peer_info(
        &self,
        peer: NodeId,
        addrs: &[SocketAddr],
        relay: Option<RelayRef>,
    ) {
        self.paths()
            .update_peer_info(peer, addrs, relay, Instant::now());
    }

    /// Our direct addresses, offered to peers when punching.
    pub(crate) fn set_own_candidates(&self, addrs: Vec<SocketAddr>) {
        self.paths().set_own_candidates(addrs);
    }

    /// The path packets to `peer` take now.
    pub(crate) fn path_of(&self, peer: &NodeId) -> Option<PathKind> {
        self.paths().path_of(peer, Instant::now())
    }

    /// The path the last packet from `peer` arrived on.
    pub(crate) fn recv_path(&self, peer: &NodeId) -> Option<PathKind> {
        self.paths().recv_path(peer)
    }

    /// The direct address in use for `peer`, and its round-trip time.
    pub(crate) fn direct_of(&self, peer: &NodeId) -> Option<(SocketAddr, Option<Duration>)> {
        self.paths().direct_of(peer)
    }

    /// Changes of paths, as they happen.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<PathEvent> {
        self.events.subscribe()
    }

    /// The home relay's state, and its changes.
    pub(crate) fn home(&self) -> watch::Receiver<HomeRelay> {
        self.home.subscribe()
    }

    /// Carries out what the path table decided.
    fn execute(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendUdp { addr, probe } => {
                    tracing::trace!(to = %probe.to, %addr, kind = ?probe.kind, "probe out");
                    self.send_datagram(addr, &probe.encode(&self.secret));
                }
                Action::SendRelay { relay, peer, probe } => {
                    tracing::trace!(to = %probe.to, relay = %relay.fingerprint(), kind = ?probe.kind, "probe out");
                    let bytes = Bytes::from(probe.encode(&self.secret));
                    let links = self.relays.read().unwrap_or_else(|e| e.into_inner());
                    if let Some(link) = links.get(&relay) {
                        let _ = link.try_send(Outgoing::Packet(*peer.as_bytes(), bytes));
                    }
                }
                Action::PathChanged {
                    peer,
                    path,
                    addr,
                    rtt,
                } => {
                    match (path, addr) {
                        (Some(PathKind::Direct), Some(addr)) => {
                            tracing::info!(%peer, %addr, ?rtt, "direct path to peer")
                        }
                        _ => tracing::info!(%peer, ?path, "direct path to peer lost"),
                    }
                    let _ = self.events.send(PathEvent {
                        peer,
                        path,
                        addr,
                        rtt,
                    });
                }
                Action::WantRelay(relay) => {
                    let mut wanted = lock(&self.wanted);
                    if !wanted.contains(&relay) && wanted.len() < MAX_OTHER_RELAYS {
                        wanted.push(relay);
                    }
                }
            }
        }
    }
}

/// Runs the path layer of a node: the timers, the relay links. `home` says which relay
/// to keep a link to (it may change, e.g. when the discovery server restarts with
/// another relay); `None` is no relay.
pub(crate) async fn drive(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    mut home: watch::Receiver<Option<RelayRef>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let mut last_report = Instant::now();
    let mut current_home: Option<RelayRef> = None;
    shared.driven.store(true, Ordering::Release);
    loop {
        let now = Instant::now();
        let active = shared.paths().any_active(now);
        let tick = if active {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = shared.wake.notified() => {}
            changed = home.changed() => {
                if changed.is_err() {
                    // The node dropped its sender: keep the current relay.
                    home.mark_unchanged();
                }
            }
            _ = tokio::time::sleep(tick) => {}
        }
        let wanted_home = *home.borrow();
        if wanted_home != current_home {
            if let Some(old) = current_home {
                relay::stop(&shared, &old.node_id);
            }
            {
                let mut paths = shared.paths();
                paths.set_home(wanted_home);
                paths.set_reflexive(None);
            }
            shared.home.send_modify(|h| {
                *h = HomeRelay {
                    relay: wanted_home,
                    connected: false,
                    reflexive: None,
                }
            });
            if let Some(r) = wanted_home {
                relay::start(&shared, &endpoint, r, true, &cancel, &tracker);
            }
            current_home = wanted_home;
        }
        shared.run_deferred();
        let now = Instant::now();
        let actions = shared.paths().poll(now);
        shared.execute(actions);
        let wanted: Vec<RelayRef> = std::mem::take(&mut *lock(&shared.wanted));
        for r in wanted {
            if current_home.is_some_and(|h| h.node_id == r.node_id) {
                continue;
            }
            let running = lock(&shared.links).len();
            if running <= MAX_OTHER_RELAYS {
                relay::start(&shared, &endpoint, r, false, &cancel, &tracker);
            }
        }
        if now.saturating_duration_since(last_report) >= REPORT_INTERVAL {
            last_report = now;
            let stats = shared.paths().take_stats();
            if stats != paths::PunchStats::default() {
                if let Some(h) = current_home {
                    let links = shared.relays.read().unwrap_or_else(|e| e.into_inner());
                    if let Some(link) = links.get(&h.node_id) {
                        let _ = link.try_send(Outgoing::Report(stats));
                    }
                }
            }
        }
    }
    // Whatever arrives from now on is handled at once again.
    shared.driven.store(false, Ordering::Release);
    shared.run_deferred();
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::{
        probe::{Probe, ProbeKind},
        *,
    };

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn ping(from: &SecretKey, to: NodeId, tx: u8) -> Vec<u8> {
        Probe {
            from: from.public(),
            to,
            tx: [tx; 12],
            kind: ProbeKind::Ping,
        }
        .encode(from)
    }

    /// A node's path layer, its socket ready to send (tokio sends only once the reactor
    /// has seen it writable).
    async fn bound(key: &SecretKey) -> Arc<Shared> {
        let shared = Shared::bind(loopback(), key, PathConfig::default()).expect("binds");
        shared.io.writable().await.expect("writable");
        shared
    }

    /// The next probe `socket` receives, within a bounded wait.
    fn next_probe(socket: &UdpSocket) -> Probe {
        let mut buf = [0u8; 2048];
        let (n, _) = socket
            .recv_from(&mut buf)
            .expect("a probe within the timeout");
        Probe::decode(&buf[..n]).expect("a valid probe")
    }

    #[tokio::test]
    async fn a_probe_that_claims_an_address_is_verified_at_once_and_its_answers_wait_for_the_driver(
    ) {
        let node_key = SecretKey::generate();
        let shared = bound(&node_key).await;
        shared.driven.store(true, Ordering::Release);
        let peer_key = SecretKey::generate();
        let peer = peer_key.public();
        let peer_socket = UdpSocket::bind(loopback()).expect("binds");
        peer_socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let from = peer_socket.local_addr().expect("addr");
        let now = Instant::now();
        assert_eq!(shared.paths().claim_holder(from, now), None);

        // The first ping from an unclaimed address: the handshake right behind it must
        // arrive labelled as the peer, so the claim is made before the call returns.
        shared.on_probe_datagram(
            &ping(&peer_key, node_key.public(), 1),
            ProbeSource::Udp(from),
        );
        let label = shared.paths().label_udp(from, true, Instant::now());
        assert_eq!(label.and_then(|l| shared.node_of(l)), Some(peer));
        {
            let deferred = lock(&shared.deferred);
            assert!(deferred.probes.is_empty(), "verified at once, not queued");
            // Its answers (a pong, and a ping of our own) are left to the driver.
            assert_eq!(deferred.actions.len(), 2, "{:?}", deferred.actions);
        }

        // A second ping from the same peer at its claimed address labels nothing new:
        // it waits for the driver whole, unverified.
        shared.on_probe_datagram(
            &ping(&peer_key, node_key.public(), 2),
            ProbeSource::Udp(from),
        );
        assert_eq!(lock(&shared.deferred).probes.len(), 1);

        // The driver's turn: the answers go out, then the queued ping is answered.
        shared.run_deferred();
        let mut pongs = Vec::new();
        for _ in 0..3 {
            let p = next_probe(&peer_socket);
            assert_eq!((p.from, p.to), (node_key.public(), peer));
            if let ProbeKind::Pong { observed } = p.kind {
                assert_eq!(observed, from);
                pongs.push(p.tx[0]);
            }
        }
        pongs.sort_unstable();
        assert_eq!(pongs, vec![1, 2], "both pings answered");
        let deferred = lock(&shared.deferred);
        assert!(deferred.probes.is_empty() && deferred.actions.is_empty());
    }

    #[tokio::test]
    async fn a_probe_naming_another_sender_than_the_claim_holder_is_verified_at_once() {
        let node_key = SecretKey::generate();
        let shared = bound(&node_key).await;
        shared.driven.store(true, Ordering::Release);
        let from = SocketAddr::from(([127, 0, 0, 1], 40_000));
        let (first, second) = (SecretKey::generate(), SecretKey::generate());
        shared.on_probe_datagram(&ping(&first, node_key.public(), 1), ProbeSource::Udp(from));
        // Another key at the same address (a NAT gave it to someone else): its claim
        // changes the label, so it is not left for later.
        shared.on_probe_datagram(&ping(&second, node_key.public(), 2), ProbeSource::Udp(from));
        assert!(lock(&shared.deferred).probes.is_empty());
        let label = shared.paths().label_udp(from, false, Instant::now());
        assert_eq!(label.and_then(|l| shared.node_of(l)), Some(second.public()));
        // A forged probe naming the claim holder is queued, and dropped when verified.
        let mut forged = ping(&second, node_key.public(), 3);
        let last = forged.len() - 1;
        forged[last] ^= 1;
        shared.on_probe_datagram(&forged, ProbeSource::Udp(from));
        assert_eq!(lock(&shared.deferred).probes.len(), 1);
        shared.run_deferred();
        let label = shared.paths().label_udp(from, false, Instant::now());
        assert_eq!(label.and_then(|l| shared.node_of(l)), Some(second.public()));
    }

    #[tokio::test]
    async fn without_a_driver_probes_are_answered_at_once() {
        let node_key = SecretKey::generate();
        let shared = bound(&node_key).await;
        let peer_key = SecretKey::generate();
        let peer_socket = UdpSocket::bind(loopback()).expect("binds");
        peer_socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let from = peer_socket.local_addr().expect("addr");
        shared.on_probe_datagram(
            &ping(&peer_key, node_key.public(), 7),
            ProbeSource::Udp(from),
        );
        let deferred = lock(&shared.deferred);
        assert!(deferred.probes.is_empty() && deferred.actions.is_empty());
        drop(deferred);
        let p = next_probe(&peer_socket);
        assert_eq!(p.from, node_key.public());
    }
}
