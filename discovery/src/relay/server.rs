//! The relay server: a QUIC endpoint that forwards opaque packets between nodes that
//! authenticated with their node certificates.

use std::{
    collections::HashMap,
    fmt::{self, Write as _},
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use p2p_crypto::{
    tls::{self, TlsError},
    NodeId, SecretKey,
};
use quinn::crypto::rustls::QuicServerConfig;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::proto::{Frame, FrameError, Key, ALPN, MAX_PACKET_LEN};
use crate::ratelimit::TokenBucket;

/// Close code: the node connected again; this older connection is replaced.
pub const CLOSE_REPLACED: u32 = 0x01;
/// Close code: the relay serves its maximum number of nodes.
pub const CLOSE_FULL: u32 = 0x02;
/// Close code: the node broke the relay protocol.
pub const CLOSE_PROTOCOL: u32 = 0x03;
/// Close code: the relay is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 0x05;

/// Limits of a relay. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Most nodes connected at once; more are refused. Default 10 000.
    pub max_clients: usize,
    /// Frames queued for one node before further packets to it are dropped. Default 1024.
    pub queue_len: usize,
    /// Sustained bytes per second one node may send through the relay. Default 8 MiB/s.
    pub bytes_per_sec: u64,
    /// Sustained packets per second one node may send through the relay. Default 8192.
    pub packets_per_sec: u64,
    /// How many seconds of the sustained rates a node may send at once. Default 2.
    pub burst_secs: u32,
    /// A connection with no packets (a node's keep-alives count) for this long is closed.
    /// Default 30 s.
    pub idle_timeout: Duration,
    /// Longest time from the first packet of a connection to its open relay stream.
    /// Default 10 s.
    pub handshake_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_clients: 10_000,
            queue_len: 1024,
            bytes_per_sec: 8 * 1024 * 1024,
            packets_per_sec: 8192,
            burst_secs: 2,
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Errors starting a relay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error("cannot bind the relay on udp {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("relay TLS configuration: {0}")]
    Tls(#[from] TlsError),
}

/// Why a packet was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drop {
    NoPeer,
    QueueFull,
    RateLimited,
}

/// Counters of a relay, rendered in the discovery server's `/metrics`.
#[derive(Debug, Default)]
pub struct RelayMetrics {
    clients: AtomicU64,
    accepted: AtomicU64,
    refused_full: AtomicU64,
    refused_handshake: AtomicU64,
    replaced: AtomicU64,
    protocol_errors: AtomicU64,
    packets: AtomicU64,
    bytes: AtomicU64,
    drop_no_peer: AtomicU64,
    drop_queue_full: AtomicU64,
    drop_rate_limited: AtomicU64,
    punch_attempts: AtomicU64,
    punch_successes: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl RelayMetrics {
    /// Nodes connected now.
    pub fn clients(&self) -> u64 {
        get(&self.clients)
    }

    /// Packets forwarded so far.
    pub fn forwarded_packets(&self) -> u64 {
        get(&self.packets)
    }

    /// Packets dropped because their destination is not connected.
    pub fn dropped_no_peer(&self) -> u64 {
        get(&self.drop_no_peer)
    }

    /// Packets dropped by the per-node rate limits.
    pub fn dropped_rate_limited(&self) -> u64 {
        get(&self.drop_rate_limited)
    }

    /// Connections refused because their TLS handshake failed (e.g. no valid node
    /// certificate) or they did not open their stream in time.
    pub fn refused_handshakes(&self) -> u64 {
        get(&self.refused_handshake)
    }

    /// Hole-punching successes reported by nodes.
    pub fn punch_successes(&self) -> u64 {
        get(&self.punch_successes)
    }

    fn dropped(&self, why: Drop) {
        add(
            match why {
                Drop::NoPeer => &self.drop_no_peer,
                Drop::QueueFull => &self.drop_queue_full,
                Drop::RateLimited => &self.drop_rate_limited,
            },
            1,
        );
    }

    /// Appends the metrics in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        family(
            "relay_clients",
            "gauge",
            "Nodes connected to the relay.",
            &[("", get(&self.clients))],
        );
        family(
            "relay_connections_total",
            "counter",
            "Relay connections by outcome.",
            &[
                ("{result=\"accepted\"}", get(&self.accepted)),
                ("{result=\"refused_full\"}", get(&self.refused_full)),
                (
                    "{result=\"refused_handshake\"}",
                    get(&self.refused_handshake),
                ),
                ("{result=\"replaced\"}", get(&self.replaced)),
                ("{result=\"protocol_error\"}", get(&self.protocol_errors)),
            ],
        );
        family(
            "relay_packets_total",
            "counter",
            "Packets forwarded between nodes.",
            &[("", get(&self.packets))],
        );
        family(
            "relay_bytes_total",
            "counter",
            "Packet bytes forwarded between nodes.",
            &[("", get(&self.bytes))],
        );
        family(
            "relay_dropped_packets_total",
            "counter",
            "Packets not forwarded, by reason.",
            &[
                ("{reason=\"no_peer\"}", get(&self.drop_no_peer)),
                ("{reason=\"queue_full\"}", get(&self.drop_queue_full)),
                ("{reason=\"rate_limited\"}", get(&self.drop_rate_limited)),
            ],
        );
        family(
            "relay_punch_attempts_total",
            "counter",
            "Hole-punching rounds reported by nodes.",
            &[("", get(&self.punch_attempts))],
        );
        family(
            "relay_punch_successes_total",
            "counter",
            "Direct paths found by hole punching, reported by nodes.",
            &[("", get(&self.punch_successes))],
        );
    }
}

/// A connected node: where to queue frames for it.
struct Client {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    conn: quinn::Connection,
}

struct Shared {
    config: RelayConfig,
    clients: Mutex<HashMap<Key, Client>>,
    next_id: AtomicU64,
    metrics: Arc<RelayMetrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under this lock is one map operation: a poisoned map is consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A bound relay. Serve it with [`Relay::serve`].
pub struct Relay {
    endpoint: quinn::Endpoint,
    node_id: NodeId,
    shared: Arc<Shared>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("node_id", &self.node_id)
            .field("addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Binds the relay's UDP socket. `secret` is the relay's own identity, presented to
    /// nodes in its certificate; they check it against the key the discovery server
    /// publishes (`GET /v1/relay`) and their peers name in signed presence records.
    pub fn bind(
        addr: SocketAddr,
        secret: &SecretKey,
        config: RelayConfig,
    ) -> Result<Self, RelayError> {
        let certified = tls::certify(secret)?;
        let mut server_tls = tls::server_config(&certified)?;
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(server_tls).map_err(|e| {
            TlsError::Rustls(rustls::Error::General(format!("QUIC server config: {e}")))
        })?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(quinn::IdleTimeout::try_from(config.idle_timeout).ok())
            .max_concurrent_bidi_streams(1u32.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window((1024u32 * 1024).into())
            .receive_window((2u32 * 1024 * 1024).into())
            .datagram_receive_buffer_size(None);
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server.transport_config(Arc::new(transport));
        let socket =
            std::net::UdpSocket::bind(addr).map_err(|source| RelayError::Bind { addr, source })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| RelayError::Bind { addr, source })?;
        Ok(Self {
            endpoint,
            node_id: secret.public(),
            shared: Arc::new(Shared {
                config,
                clients: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                metrics: Arc::new(RelayMetrics::default()),
            }),
        })
    }

    /// The UDP address the relay listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The relay's identity.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The relay's counters (shared with the running relay).
    pub fn metrics(&self) -> Arc<RelayMetrics> {
        self.shared.metrics.clone()
    }

    /// Serves until `shutdown` completes, then closes every connection.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) {
        let tracker = TaskTracker::new();
        tokio::pin!(shutdown);
        loop {
            let incoming = tokio::select! {
                _ = &mut shutdown => break,
                i = self.endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let shared = self.shared.clone();
            tracker.spawn(serve_client(shared, incoming));
        }
        self.endpoint
            .close(CLOSE_SHUTDOWN.into(), b"relay shutting down");
        tracker.close();
        // Connection tasks end once their connections are closed.
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Handshakes, registers and serves one node until its connection ends.
async fn serve_client(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let metrics = shared.metrics.clone();
    let timeout = shared.config.handshake_timeout;
    let remote = incoming.remote_address();
    if lock(&shared.clients).len() >= shared.config.max_clients {
        add(&metrics.refused_full, 1);
        tracing::warn!(%remote, "relay is full; refusing a node");
        incoming.refuse();
        return;
    }
    let setup = async {
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let key = peer_key(&conn).inspect_err(|_| {
            conn.close(CLOSE_PROTOCOL.into(), b"bad identity");
        })?;
        let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((conn, key, send, recv))
    };
    let (conn, key, send, recv) = match tokio::time::timeout(timeout, setup).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            add(&metrics.refused_handshake, 1);
            tracing::debug!(%remote, error = %e, "relay handshake failed");
            return;
        }
        Err(_) => {
            add(&metrics.refused_handshake, 1);
            tracing::debug!(%remote, "relay handshake timed out");
            return;
        }
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(shared.config.queue_len.max(1));
    {
        let mut clients = lock(&shared.clients);
        if clients.len() >= shared.config.max_clients && !clients.contains_key(&key) {
            drop(clients);
            add(&metrics.refused_full, 1);
            conn.close(CLOSE_FULL.into(), b"relay full");
            return;
        }
        let old = clients.insert(
            key,
            Client {
                id,
                tx: tx.clone(),
                conn: conn.clone(),
            },
        );
        if let Some(old) = old {
            add(&metrics.replaced, 1);
            old.conn.close(CLOSE_REPLACED.into(), b"replaced");
        } else {
            add(&metrics.clients, 1);
        }
    }
    add(&metrics.accepted, 1);
    tracing::debug!(%remote, node = %data_key(&key), "node connected to the relay");
    let writer = tokio::spawn(write_frames(send, rx));
    if let Err(e) = read_frames(&shared, &conn, key, &tx, recv).await {
        add(&metrics.protocol_errors, 1);
        tracing::debug!(%remote, error = %e, "relay protocol error; closing");
        conn.close(CLOSE_PROTOCOL.into(), b"protocol error");
    }
    {
        let mut clients = lock(&shared.clients);
        if clients.get(&key).is_some_and(|c| c.id == id) {
            clients.remove(&key);
            metrics.clients.fetch_sub(1, Ordering::Relaxed);
        }
    }
    drop(tx);
    writer.abort();
    let _ = writer.await;
    tracing::debug!(%remote, "node left the relay");
}

/// The node key a connection authenticated with.
fn peer_key(conn: &quinn::Connection) -> Result<Key, String> {
    let chain = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or("no client certificate")?;
    let node = tls::node_id_from_chain(&chain).map_err(|e| e.to_string())?;
    let alpn_ok = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN);
    if !alpn_ok {
        return Err("wrong application protocol".into());
    }
    Ok(*node.as_bytes())
}

/// A key for logs (the relay never needs the curve point itself).
fn data_key(key: &Key) -> String {
    NodeId::from_bytes(key).map_or_else(|_| "<invalid key>".into(), |n| n.fingerprint())
}

/// Writes queued frames to the node, several per write when they queue up.
async fn write_frames(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Bytes>) {
    let mut batch = BytesMut::new();
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if send.write_all(&batch).await.is_err() {
            break;
        }
    }
    let _ = send.finish();
}

fn encode(frame: &Frame) -> Option<Bytes> {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).ok()?;
    Some(buf.freeze())
}

/// Most destinations remembered for throttling `PeerGone` answers, per node.
const MAX_GONE_NOTES: usize = 256;

/// Reads the node's frames and forwards its packets until the stream or the connection
/// ends. Errors are protocol violations.
async fn read_frames(
    shared: &Shared,
    conn: &quinn::Connection,
    key: Key,
    own_tx: &mpsc::Sender<Bytes>,
    mut recv: quinn::RecvStream,
) -> Result<(), FrameError> {
    let config = &shared.config;
    let metrics = &shared.metrics;
    let burst = f64::from(config.burst_secs.max(1));
    let now = Instant::now();
    let mut bytes_bucket = TokenBucket::new(
        config.bytes_per_sec as f64,
        (config.bytes_per_sec as f64 * burst).max(MAX_PACKET_LEN as f64),
        now,
    );
    let mut packets_bucket = TokenBucket::new(
        config.packets_per_sec as f64,
        (config.packets_per_sec as f64 * burst).max(1.0),
        now,
    );
    let mut observed = conn.remote_address();
    if let Some(frame) = encode(&Frame::Observed { addr: observed }) {
        let _ = own_tx.try_send(frame);
    }
    let mut gone_noted: HashMap<Key, Instant> = HashMap::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let chunk = match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) | Err(_) => return Ok(()),
        };
        buf.extend_from_slice(&chunk);
        let now = Instant::now();
        while let Some(frame) = Frame::decode(&mut buf)? {
            match frame {
                Frame::Send { dst, packet } => {
                    let len = packet.len() as f64;
                    if !packets_bucket.take(1.0, now) || !bytes_bucket.take(len, now) {
                        metrics.dropped(Drop::RateLimited);
                        continue;
                    }
                    match forward(shared, key, dst, packet) {
                        Ok(()) => {}
                        Err(Drop::NoPeer) => {
                            metrics.dropped(Drop::NoPeer);
                            let due = gone_noted
                                .get(&dst)
                                .is_none_or(|at| now.duration_since(*at) >= GONE_NOTE_INTERVAL);
                            if due {
                                if gone_noted.len() >= MAX_GONE_NOTES {
                                    gone_noted.clear();
                                }
                                gone_noted.insert(dst, now);
                                if let Some(frame) = encode(&Frame::PeerGone { node: dst }) {
                                    let _ = own_tx.try_send(frame);
                                }
                            }
                        }
                        Err(why) => metrics.dropped(why),
                    }
                }
                Frame::PunchReport {
                    attempts,
                    successes,
                } => {
                    add(&metrics.punch_attempts, u64::from(attempts.min(1000)));
                    add(&metrics.punch_successes, u64::from(successes.min(1000)));
                }
                Frame::Recv { .. } | Frame::Observed { .. } | Frame::PeerGone { .. } => {
                    return Err(FrameError::WrongDirection);
                }
            }
        }
        let now_addr = conn.remote_address();
        if now_addr != observed {
            observed = now_addr;
            if let Some(frame) = encode(&Frame::Observed { addr: observed }) {
                let _ = own_tx.try_send(frame);
            }
        }
    }
}

/// How often a node is told, per destination, that the destination is not here.
const GONE_NOTE_INTERVAL: Duration = Duration::from_secs(1);

/// Queues `packet` from `src` for `dst`.
fn forward(shared: &Shared, src: Key, dst: Key, packet: Bytes) -> Result<(), Drop> {
    let len = packet.len() as u64;
    let tx = {
        let clients = lock(&shared.clients);
        clients
            .get(&dst)
            .map(|c| c.tx.clone())
            .ok_or(Drop::NoPeer)?
    };
    let frame = encode(&Frame::Recv { src, packet }).ok_or(Drop::NoPeer)?;
    match tx.try_send(frame) {
        Ok(()) => {
            add(&shared.metrics.packets, 1);
            add(&shared.metrics.bytes, len);
            Ok(())
        }
        Err(mpsc::error::TrySendError::Full(_)) => Err(Drop::QueueFull),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(Drop::NoPeer),
    }
}
