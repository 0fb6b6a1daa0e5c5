//! The messaging runtime: a [`Node`] ties the QUIC [`Endpoint`], the wire protocol, the
//! redb [`Store`] and a discovery server together into a chat node.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let secret = p2p_crypto::SecretKey::generate();
//! let node = p2p_node::Node::builder(secret)
//!     .data_dir("/tmp/alice".into())
//!     .discovery_url("http://127.0.0.1:7117")
//!     .bind()
//!     .await?;
//! let outcome = node.send("bob", "hello").await?;
//! println!("{:?}", outcome.status);
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Delivery
//!
//! [`Node::send`] writes the message to the history *and* the outbox in one transaction,
//! and meanwhile tries direct delivery: on a cached connection to the peer, or by dialing
//! the addresses discovery publishes for it (and the address it last connected to us
//! from). The receiver writes the message durably, then answers with an
//! [`Ack`](crate::wire::Ack); only a `Stored`/`Duplicate` ack marks the message
//! delivered. `send` returns once both are done, so whatever it reports (delivered or
//! queued) is on disk, and a message queued by a process that then dies is retried by
//! the next one. The delivery mark is queued after the write, so it never overtakes it.
//! A process killed during `send` may leave a message its recipient has but its own
//! history does not, never the reverse of an ack: the ack is the recipient's disk.
//!
//! When direct delivery fails the message stays in the outbox, and a copy sealed to the
//! recipient's x25519 mailbox key is deposited in its mailbox on the discovery server.
//! The outbox task retries direct delivery with exponential backoff, and at once when
//! the peer appears in the online list or connects to us. The recipient drains its
//! mailbox at start and periodically, stores what it finds (deduplicating by id), sends
//! a sealed receipt (an `Ack` frame) back to the sender's mailbox, and only then deletes
//! the envelopes. Whichever path arrives first wins; the other is a duplicate.
//!
//! # Streams
//!
//! A message travels as a `Message` frame on a bidirectional QUIC stream, and its `Ack`
//! comes back on the same stream. The sender pipelines: it writes each message on one of
//! the connection's lanes (`endpoint::lanes`, a few streams it keeps) without waiting for
//! the acks of the messages ahead of it, and the acks, which the receiver sends in
//! order, are handed back in order. So a busy peer is sent to on a few streams, while:
//! - the receiver needs nothing new: it has always served frame after frame on a stream,
//!   each acknowledged in order; it now takes the frames that have arrived together,
//!   stores them in one writer batch and acknowledges them in one write, within its
//!   limits on streams per connection ([`TransportSettings::max_concurrent_bidi_streams`]),
//!   on the frame bytes it holds, and on the wait for each frame (a stall or trickle is
//!   reset after the read timeout);
//! - a lane the receiver ended or reset fails every message waiting on it, and each that
//!   was not the lane's first goes once more on another lane: the receiver deduplicates
//!   by id. A receiver that ends each stream after one ack gets one message per stream.
//!
//! The receiver reports each message after its ack, from a task of the stream, in
//! order: a name lookup delays neither the ack nor the next message.
//!
//! # Group commit
//!
//! Every message write (incoming from connections and the mailbox, outgoing, and
//! delivery marks) goes to one dedicated writer thread: it takes the first queued
//! request, drains whatever else is queued (up to [`MAX_WRITE_BATCH`]), applies all of
//! them with one [`Store::write_batch`] transaction (one fsync), and answers each
//! request. Every ack is still sent only after the write that contains its message
//! committed.
//!
//! # Errors on the wire
//!
//! A frame that is oversized, truncated or does not decode closes the connection it came
//! on with [`CLOSE_BAD_FRAME`]; an `Ack` where a `Message` is expected closes it with
//! [`CLOSE_UNEXPECTED_FRAME`]. Nothing from such a frame is stored, and other
//! connections are not affected.

mod deliver;
pub(crate) mod dht;
mod error;
mod inbound;
mod mailbox;
mod outbox;
mod peers;
mod pool;
mod presence;
mod relaying;
mod storage;
mod tracker;
mod writer;

use std::{
    collections::HashMap,
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use p2p_crypto::{MailboxPublicKey, NodeId, SecretKey, NODE_ID_TEXT_LEN};
use p2p_discovery::RelayRef;
use tokio::sync::{broadcast, watch, Notify, Semaphore};
use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::TaskTracker,
};

use crate::{
    discovery::{
        Discovery, DiscoveryContext, DiscoveryStatus, DiscoveryUrl, EmbeddedDiscovery,
        IntoDiscovery, LanConfig, LanDiscovery, Serving,
    },
    endpoint::{Endpoint, TransportSettings},
    net::{PathConfig, PathKind},
    store::{Contact, OutboxEntry, OutboxSlot, PinOutcome, Store, StoreError, StoredMessage},
    wire::{ChatMessage, MessageId, RejectCode},
};

pub use crate::discovery::DiscoveryError;
pub use deliver::{NotThePeerCause, QueueReason};
pub use dht::{DhtConfig, DhtError, DhtRecord};
pub use error::{
    BindError, HistoryError, MailboxError, PeersError, RegisterError, ResolveError, SendError,
    StorageError,
};
/// A node found on discovery, its records verified by the client.
pub use p2p_discovery::PeerInfo;

/// Application close code: this node is shutting down. Sent with the reason
/// [`SHUTDOWN_REASON`], it tells the peer this node quit: the peer stops dialing it until
/// it announces itself again.
pub const CLOSE_SHUTDOWN: quinn::VarInt = quinn::VarInt::from_u32(0x00);
/// The reason sent with [`CLOSE_SHUTDOWN`]. QUIC stacks close a connection that they
/// drop with code 0 and no reason, which says nothing of the peer's process.
pub const SHUTDOWN_REASON: &[u8] = b"shutdown";
/// Application close code: the peer sent a frame that is oversized, truncated or does
/// not decode. Nothing of it was stored.
pub const CLOSE_BAD_FRAME: quinn::VarInt = quinn::VarInt::from_u32(0x20);
/// Application close code: the peer sent a frame kind that is not valid at that point
/// (e.g. an `Ack` opening a stream).
pub const CLOSE_UNEXPECTED_FRAME: quinn::VarInt = quinn::VarInt::from_u32(0x21);
/// Application close code: the peer already has [`MAX_CONNECTIONS_PER_PEER`]
/// connections to this node.
pub const CLOSE_TOO_MANY_CONNECTIONS: quinn::VarInt = quinn::VarInt::from_u32(0x22);
/// Stream reset code: the peer did not send a complete frame within the read timeout.
pub const STREAM_TIMEOUT: quinn::VarInt = quinn::VarInt::from_u32(0x30);
/// Stream reset code: the message could not be stored right now (e.g. disk error); it
/// was not acknowledged and the sender should retry later.
pub const STREAM_NOT_STORED: quinn::VarInt = quinn::VarInt::from_u32(0x31);

/// Most connections one peer (one NodeId) may have with this node at once; more are
/// closed with [`CLOSE_TOO_MANY_CONNECTIONS`]. Two are normal (both sides dialed at
/// once); the rest leaves room for reconnects.
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;

/// Bytes of incoming frames one connection may hold in memory at once (read but not
/// yet acknowledged), across all its streams: 16 frames of the maximum size. A stream
/// whose frame does not fit waits (within its read timeout) until others are done.
pub const CONNECTION_FRAME_BUDGET: usize = 16 * crate::wire::MAX_FRAME_LEN;

/// Longest [`Node::shutdown`] waits for closed connections to finish draining once their
/// close frames are out: well under a second, however slow or lossy the path.
pub const CLOSE_GRACE: Duration = Duration::from_millis(150);

/// Most incoming messages written in one group commit.
pub const MAX_WRITE_BATCH: usize = 1024;

/// How often [`Node::flush_outbox`] looks again at entries another task is sending.
const FLUSH_POLL: Duration = Duration::from_millis(20);

/// Capacity of the event channel; a subscriber that falls further behind gets
/// [`broadcast::error::RecvError::Lagged`].
pub const EVENT_CAPACITY: usize = 1024;

/// File name of the node database in the data directory.
pub const DB_FILE: &str = "node.redb";
/// File name of the embedded discovery server's database in the data directory.
pub const DISCOVERY_DB_FILE: &str = "discovery.redb";
/// File name of the lock that keeps a second process off the data directory.
pub const LOCK_FILE: &str = "LOCK";
/// File name of the embedded relay's identity key in the data directory.
pub const RELAY_KEY_FILE: &str = "relay.key";

// ---------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------

/// Timers of the node. Tests shorten them; the defaults suit people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timings {
    /// How often the online list is fetched from discovery (peer online/offline events,
    /// and the trigger for outbox retries). Default 5 s.
    pub presence_poll: Duration,
    /// How often the mailbox is drained (it is also drained at start). Default 30 s.
    pub mailbox_poll: Duration,
    /// First delay before retrying direct delivery of a queued message (and before
    /// dialing a peer again after a failed dial). Doubles per failure. Default 1 s.
    pub retry_min: Duration,
    /// Longest delay between retries. Default 5 min.
    pub retry_max: Duration,
    /// Longest wait for a QUIC handshake, and for one discovery request made on the
    /// caller's behalf (e.g. a name lookup). Default 5 s.
    pub dial_timeout: Duration,
    /// Longest that one try of a peer discovery calls offline may take: a peer whose
    /// connection with us closed a moment ago is tried once at its last address (the
    /// server may have restarted and not heard from it yet). Default 1 s.
    pub quick_dial: Duration,
    /// Longest wait for the acknowledgement of a sent message. Default 10 s.
    pub ack_timeout: Duration,
    /// Longest wait for the next frame on an incoming stream before it is reset.
    /// Default 10 s.
    pub read_timeout: Duration,
    /// Time-to-live requested for our presence record; it is renewed before it runs out,
    /// when the server says so. Default 120 s.
    pub announce_ttl: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            presence_poll: Duration::from_secs(5),
            mailbox_poll: Duration::from_secs(30),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            dial_timeout: Duration::from_secs(5),
            quick_dial: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(10),
            announce_ttl: Duration::from_secs(120),
        }
    }
}

impl Timings {
    /// The retry delay after `failures` consecutive failures (at least 1).
    pub fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(30);
        self.retry_min
            .saturating_mul(1u32 << shift)
            .min(self.retry_max)
            .max(self.retry_min.min(self.retry_max))
    }
}

/// How a message reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// On a QUIC connection from the sender, over a direct path.
    Direct,
    /// On a QUIC connection from the sender, through a relay (end-to-end encrypted; the
    /// relay saw only ciphertext).
    Relay,
    /// Sealed, from our mailbox on the discovery server.
    Mailbox,
}

impl Via {
    /// `"direct"`, `"relay"` or `"mailbox"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Relay => "relay",
            Via::Mailbox => "mailbox",
        }
    }

    /// The path of a message that came on a connection (`None` from the mailbox).
    pub fn path(self) -> Option<PathKind> {
        match self {
            Via::Direct => Some(PathKind::Direct),
            Via::Relay => Some(PathKind::Relay),
            Via::Mailbox => None,
        }
    }
}

/// Something that happened in the node. Delivered on [`Node::subscribe`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A new message was stored in the history (duplicates are not reported).
    MessageReceived {
        /// The authenticated sender.
        from: NodeId,
        /// The sender's name, if known (pinned contact or online list).
        from_name: Option<String>,
        /// The message as stored.
        message: StoredMessage,
        /// How it arrived.
        via: Via,
    },
    /// The recipient acknowledged one of our messages as durably stored.
    MessageDelivered {
        /// The recipient.
        to: NodeId,
        /// The message.
        id: MessageId,
        /// The path the message went on (`None`: acknowledged by a receipt in the
        /// mailbox).
        path: Option<PathKind>,
    },
    /// The path to a peer changed: a direct path was found (hole punching), or lost
    /// (packets go through the relay again).
    PathChanged {
        /// The peer.
        node_id: NodeId,
        /// Its name, if known.
        name: Option<String>,
        /// The path packets take now.
        path: Option<PathKind>,
        /// The direct address, for a direct path.
        addr: Option<SocketAddr>,
        /// The round-trip time of the probe that proved a direct path.
        rtt: Option<Duration>,
    },
    /// A node appeared in the online list.
    PeerOnline {
        /// Its id.
        node_id: NodeId,
        /// Its name, if it has one.
        name: Option<String>,
    },
    /// A node left the online list (logged out or expired).
    PeerOffline {
        /// Its id.
        node_id: NodeId,
        /// Its name, if it had one.
        name: Option<String>,
    },
    /// Discovery says `name` belongs to `announced`, but we pinned `pinned` for it the
    /// first time we saw it. The node keeps using `pinned`.
    KeyChanged {
        /// The name.
        name: String,
        /// The NodeId pinned for the name.
        pinned: NodeId,
        /// The NodeId discovery now returns for it.
        announced: NodeId,
    },
    /// The discovery server in use changed (the LAN's server moved, this node started or
    /// stopped serving it), or there is none for now (`url` is `None`).
    DiscoveryChanged(DiscoveryStatus),
    /// The database cannot be written (a full disk, a file system turned read-only):
    /// incoming messages are refused, not acknowledged (their senders keep them and
    /// retry), and sends fail, until [`NodeEvent::StorageRecovered`]. The node opens
    /// the database again by itself, with backoff.
    StorageFailing {
        /// What the database reported.
        error: String,
    },
    /// The database takes writes again after [`NodeEvent::StorageFailing`].
    StorageRecovered,
}

/// The result of [`Node::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The peer's id.
    pub node_id: NodeId,
    /// Its name, if known.
    pub name: Option<String>,
}

/// Whether a sent message already reached the recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SendStatus {
    /// The recipient acknowledged it as durably stored.
    Delivered,
    /// It is in the outbox (and, where possible, sealed in the recipient's mailbox); it
    /// will be delivered when either of us can reach the other.
    Queued,
}

/// The result of [`Node::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendOutcome {
    /// The id of the new message.
    pub id: MessageId,
    /// The recipient.
    pub to: NodeId,
    /// Delivered or queued.
    pub status: SendStatus,
    /// For a delivered message, the path it went on: direct, or through a relay.
    pub path: Option<PathKind>,
    /// For a queued message, why it could not be delivered at once.
    pub queued_because: Option<QueueReason>,
    /// For a queued message, where it waits.
    pub queued: Option<Queued>,
}

/// Where a queued message waits for its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queued {
    /// Sealed in the recipient's mailbox on discovery (and in the outbox): it arrives
    /// when the recipient next starts, whether this node runs or not.
    Mailbox,
    /// Only in this node's outbox (the mailbox could not take it yet): it travels only
    /// while this node runs.
    Outbox,
}

impl Queued {
    /// `"mailbox"` or `"outbox"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Queued::Mailbox => "mailbox",
            Queued::Outbox => "outbox",
        }
    }
}

/// What [`Node::flush_outbox`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxReport {
    /// Messages still in the outbox.
    pub queued: usize,
    /// Of those, messages that are only in the outbox (not in their recipient's mailbox):
    /// they travel only while this node runs.
    pub only_here: usize,
}

// ---------------------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------------------

/// Builder for [`Node`]; see [`Node::builder`].
#[derive(Debug)]
pub struct NodeBuilder {
    secret: SecretKey,
    data_dir: Option<PathBuf>,
    discovery: Option<Box<dyn IntoDiscovery>>,
    listen: SocketAddr,
    name: Option<String>,
    announce: bool,
    timings: Timings,
    transport: TransportSettings,
    max_connections: usize,
    in_memory: bool,
    encrypt_history: bool,
    drop_acks: bool,
    paths: PathConfig,
    use_relay: bool,
    publish_addrs: bool,
    dht: Option<DhtConfig>,
    events: broadcast::Sender<NodeEvent>,
}

impl NodeBuilder {
    /// The node's directory (required): it holds `node.redb`, the `LOCK` file and, with
    /// embedded discovery, `discovery.redb`. Created if missing.
    pub fn data_dir(mut self, dir: PathBuf) -> Self {
        self.data_dir = Some(dir);
        self
    }

    /// The discovery this node uses (see [`crate::discovery`]); none by default.
    pub fn discovery(mut self, discovery: impl IntoDiscovery) -> Self {
        self.discovery = Some(Box::new(discovery));
        self
    }

    /// Use the discovery server at this URL (e.g. `http://192.168.1.10:7117`).
    pub fn discovery_url(self, url: impl Into<String>) -> Self {
        self.discovery(DiscoveryUrl(url.into()))
    }

    /// Run the discovery server inside this node on this TCP address (its database is
    /// `<data-dir>/discovery.redb`) and use it. When `addr` is an unspecified address
    /// (`0.0.0.0`/`::`), the node talks to it over loopback.
    pub fn embedded_discovery(self, addr: SocketAddr) -> Self {
        self.discovery(EmbeddedDiscovery::config(addr))
    }

    /// Use the LAN's discovery server, found with mDNS, or serve one here when there is
    /// none (see [`LanDiscovery`]).
    pub fn lan_discovery(self, config: LanConfig) -> Self {
        self.discovery(LanDiscovery::config(config))
    }

    /// The UDP address for QUIC. Default `0.0.0.0:0`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The name to include in our announcements (it must be claimed, see
    /// [`Node::register`]).
    pub fn name(mut self, name: String) -> Self {
        self.name = Some(name);
        self
    }

    /// Whether to announce this node online (and withdraw at shutdown). Default `true`.
    /// One-shot commands pass `false`: they still drain the mailbox and deliver.
    pub fn announce(mut self, announce: bool) -> Self {
        self.announce = announce;
        self
    }

    /// Timers; see [`Timings`] for the defaults.
    pub fn timings(mut self, timings: Timings) -> Self {
        self.timings = timings;
        self
    }

    /// QUIC transport settings; see [`TransportSettings`] for the defaults.
    pub fn transport(mut self, transport: TransportSettings) -> Self {
        self.transport = transport;
        self
    }

    /// Most QUIC connections (incoming and outgoing, including handshakes in progress)
    /// at once; incoming attempts beyond it are refused. Default 256.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Path settings: whether direct paths are used, hole-punching timers; see
    /// [`PathConfig`] for the defaults.
    pub fn paths(mut self, paths: PathConfig) -> Self {
        self.paths = paths;
        self
    }

    /// Whether to keep a link to the discovery server's relay, so peers that cannot reach
    /// this node directly (NATs, firewalls) reach it through the relay. Default `true`.
    pub fn relay(mut self, relay: bool) -> Self {
        self.use_relay = relay;
        self
    }

    /// Uses the BitTorrent Mainline DHT: publishes this node's addresses and home relay
    /// there, signed with its key (unless [`DhtConfig::publish`] is off), and looks a
    /// peer up there by NodeId when discovery does not know it or cannot be reached.
    /// Default: off (publishing puts the addresses in a public table, and a LAN without
    /// internet cannot reach the DHT). See [`DhtConfig`].
    pub fn dht(mut self, config: DhtConfig) -> Self {
        self.dht = Some(config);
        self
    }

    /// Keeps history, outbox and contacts in memory instead of `<data-dir>/node.redb`:
    /// nothing survives the process. Default `false`. For benchmarks that measure the
    /// node without disk writes, and for tests; a chat node wants its history on disk.
    pub fn in_memory_store(mut self, in_memory: bool) -> Self {
        self.in_memory = in_memory;
        self
    }

    /// Whether our presence record lists our direct addresses. Default `true`. With
    /// `false` peers first reach this node through its relay, and a direct path appears
    /// only by hole punching (tests use it to make a loopback node look like one behind
    /// a NAT).
    #[doc(hidden)]
    pub fn publish_direct_addrs(mut self, publish: bool) -> Self {
        self.publish_addrs = publish;
        self
    }

    /// Encrypts the stored history with a key derived from the identity
    /// ([`Store::open_with_key`]); set it when the identity is passphrase-protected.
    /// Default `false`: the history is protected by file permissions only (a history
    /// already encrypted stays encrypted).
    pub fn encrypt_history(mut self, encrypt: bool) -> Self {
        self.encrypt_history = encrypt;
        self
    }

    /// Fault injection for tests: store incoming direct messages but never acknowledge
    /// them (the stream is reset right after the durable write), as if the node died
    /// between persisting and acknowledging.
    #[doc(hidden)]
    pub fn drop_acks_after_persist(mut self, drop: bool) -> Self {
        self.drop_acks = drop;
        self
    }

    /// A receiver of the node's events that sees everything from the very start
    /// (including the mailbox drain at start), unlike [`Node::subscribe`] after `bind`.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// Locks the data directory, opens the database, binds the QUIC endpoint, starts the
    /// embedded discovery server if asked to, and starts the background tasks.
    ///
    /// A discovery server that cannot be reached is not an error here: the node logs a
    /// warning and keeps trying in the background.
    pub async fn bind(self) -> Result<Node, BindError> {
        let dir = self.data_dir.clone().ok_or(BindError::NoDataDir)?;
        let lock = lock_data_dir(&dir)?;
        let db_path = dir.join(DB_FILE);
        let in_memory = self.in_memory;
        let (history_key, encrypt) = (self.secret.history_key(), self.encrypt_history);
        let store = Arc::new(
            tokio::task::spawn_blocking(move || {
                if in_memory {
                    Store::open_in_memory()
                } else {
                    Store::open_with_key(db_path, history_key, encrypt)
                }
            })
            .await??,
        );
        let endpoint = Endpoint::builder(self.secret.clone())
            .bind_addr(self.listen)
            .transport(self.transport.clone())
            .paths(self.paths.clone())
            .bind()
            .await?;

        let health = Arc::new(storage::Health::default());
        let (writer, writer_thread) = writer::spawn(
            store.clone(),
            writer::Report {
                health: health.clone(),
                events: self.events.clone(),
            },
        )
        .map_err(BindError::Thread)?;
        let mut directory = peers::PeerDirectory::default();
        let contacts = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.contacts()).await??
        };
        for (name, c) in contacts {
            if let Some(k) = c.mailbox_key {
                directory.set_mailbox_key(c.node_id, MailboxPublicKey(k));
            }
            directory.set_name(c.node_id, name);
        }
        let cancel = CancellationToken::new();
        // Stops what the discovery runs if anything below fails.
        let start_guard = cancel.clone().drop_guard();
        let disco = match self.discovery {
            None => None,
            Some(d) => Some(
                d.into_discovery(DiscoveryContext {
                    secret: self.secret.clone(),
                    data_dir: dir.clone(),
                    relay: self.use_relay,
                    timeout: self.timings.dial_timeout,
                    cancel: cancel.clone(),
                })
                .await?,
            ),
        };

        let dht = match self.dht.clone() {
            Some(config) => {
                let secret = self.secret.clone();
                Some(tokio::task::spawn_blocking(move || dht::Dht::start(&secret, config)).await??)
            }
            None => None,
        };
        let (drained_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            node_id: self.secret.public(),
            secret: self.secret,
            endpoint,
            store,
            writer,
            writer_thread: Mutex::new(Some(writer_thread)),
            health,
            events: self.events,
            timings: self.timings,
            disco,
            dht,
            announce: self.announce,
            announced: watch::channel(false).0,
            announced_relay: watch::channel(None).0,
            name: Mutex::new(self.name),
            peers: Mutex::new(directory),
            pool: Mutex::new(pool::ConnectionPool::default()),
            delivery: Mutex::new(tracker::DeliveryTracker::default()),
            home_relay: watch::channel(None).0,
            relay_checked: watch::channel(false).0,
            use_relay: self.use_relay,
            publish_addrs: self.publish_addrs,
            outbox_wake: Notify::new(),
            discovery_back: Notify::new(),
            conn_limit: Arc::new(Semaphore::new(self.max_connections)),
            cancel: cancel.clone(),
            tracker: TaskTracker::new(),
            drain_lock: tokio::sync::Mutex::new(()),
            announce_lock: tokio::sync::Mutex::new(()),
            drained: drained_tx,
            drop_acks: self.drop_acks,
            _lock: lock,
        });

        start_guard.disarm();
        inner.tracker.spawn(crate::net::drive(
            inner.endpoint.net().clone(),
            inner.endpoint.clone(),
            inner.home_relay.subscribe(),
            inner.cancel.clone(),
            inner.tracker.clone(),
        ));
        inner.tracker.spawn(relaying::path_events(inner.clone()));
        inner
            .tracker
            .spawn(presence::candidates_loop(inner.clone()));
        if inner.use_relay && inner.disco.is_some() {
            inner
                .tracker
                .spawn(relaying::home_relay_loop(inner.clone()));
        }
        inner.tracker.spawn(inbound::accept_loop(inner.clone()));
        if inner.dht.is_some() {
            inner.tracker.spawn(dht::publish_loop(inner.clone()));
        }
        inner.tracker.spawn(storage::heal_loop(inner.clone()));
        inner.tracker.spawn(outbox::run(inner.clone()));
        inner.tracker.spawn(mailbox::run(inner.clone()));
        if let Some(status) = inner.discovery_status() {
            inner
                .tracker
                .spawn(report_discovery_changes(inner.clone(), status));
        }
        if inner.disco.is_some() {
            if inner.announce {
                inner.tracker.spawn(presence::announce_loop(inner.clone()));
            }
            inner.tracker.spawn(presence::poll_loop(inner.clone()));
        } else {
            tracing::info!("no discovery server configured: direct delivery only");
        }
        Ok(Node {
            inner,
            _guard: Arc::new(cancel.drop_guard()),
        })
    }
}

/// Creates the data directory 0700 (or refuses a too-open one) and locks it.
fn lock_data_dir(dir: &std::path::Path) -> Result<File, BindError> {
    Ok(crate::datadir::lock(dir)?)
}

// ---------------------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------------------

/// A running chat node. Cheap to clone; every clone is the same node.
///
/// Dropping the last clone stops the background tasks, but only [`Node::shutdown`]
/// withdraws the presence and waits until everything is closed.
#[derive(Debug, Clone)]
pub struct Node {
    inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

pub(crate) struct Inner {
    secret: SecretKey,
    node_id: NodeId,
    endpoint: Endpoint,
    store: Arc<Store>,
    writer: writer::Writer,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Whether the database takes writes (see [`storage`]).
    health: Arc<storage::Health>,
    events: broadcast::Sender<NodeEvent>,
    timings: Timings,
    disco: Option<Arc<dyn Discovery>>,
    /// The DHT client, when the node uses the DHT.
    dht: Option<dht::Dht>,
    announce: bool,
    /// Whether our presence is announced on discovery (true after the first success).
    announced: watch::Sender<bool>,
    /// The home relay named by our last successful announcement.
    announced_relay: watch::Sender<Option<RelayRef>>,
    name: Mutex<Option<String>>,
    /// Names, keys and presence of other nodes.
    peers: Mutex<peers::PeerDirectory>,
    /// Connections, dials and dial backoff.
    pool: Mutex<pool::ConnectionPool>,
    /// Messages in flight and outbox wake-ups.
    delivery: Mutex<tracker::DeliveryTracker>,
    /// The relay to keep a link to (from the discovery server), for the path layer.
    home_relay: watch::Sender<Option<RelayRef>>,
    /// Whether the discovery server said which relay it runs (or that it runs none).
    relay_checked: watch::Sender<bool>,
    /// Whether to use the discovery server's relay.
    use_relay: bool,
    /// Whether presence records list our direct addresses.
    publish_addrs: bool,
    outbox_wake: Notify,
    /// The discovery server answers again after an outage (the announce task stops its
    /// backoff).
    discovery_back: Notify,
    conn_limit: Arc<Semaphore>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    drain_lock: tokio::sync::Mutex<()>,
    /// One announce at a time: a record signed later is never sent beside an earlier one,
    /// which the server would then refuse as stale.
    announce_lock: tokio::sync::Mutex<()>,
    drained: watch::Sender<bool>,
    drop_acks: bool,
    _lock: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped without `shutdown`: stop what the discovery runs too.
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.node_id)
            .field("endpoint", &self.endpoint.local_addr().ok())
            .field("discovery", &self.disco.as_ref().map(|d| d.url()))
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts building the node with this identity.
    pub fn builder(secret: SecretKey) -> NodeBuilder {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        NodeBuilder {
            secret,
            data_dir: None,
            discovery: None,
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            name: None,
            announce: true,
            timings: Timings::default(),
            transport: TransportSettings::default(),
            max_connections: 256,
            in_memory: false,
            encrypt_history: false,
            drop_acks: false,
            paths: PathConfig::default(),
            use_relay: true,
            publish_addrs: true,
            dht: None,
            events,
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The local UDP address of the QUIC endpoint.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// The URL of the discovery server in use, if any.
    pub fn discovery_url(&self) -> Option<String> {
        self.inner.disco.as_ref().map(|d| d.url().to_owned())
    }

    /// The TCP address of the embedded discovery server, if this node runs one.
    pub fn embedded_discovery_addr(&self) -> Option<SocketAddr> {
        Some(self.serving_discovery()?.addr)
    }

    /// The UDP address of the embedded discovery server's relay, if it runs one.
    pub fn embedded_relay_addr(&self) -> Option<SocketAddr> {
        self.serving_discovery()?.relay
    }

    /// This node's home relay: which one, whether the link to it is up, and the address
    /// it sees this node at.
    pub fn home_relay(&self) -> crate::net::HomeRelay {
        self.inner.endpoint.net().home().borrow().clone()
    }

    /// The path to `peer` if this node has a live connection to it: direct, or through
    /// a relay.
    pub fn path_of(&self, peer: &NodeId) -> Option<PathKind> {
        let conn = self.inner.pool().live(peer)?;
        conn.path()
    }

    /// The peers this node has an open connection with, and the path each takes.
    pub fn connections(&self) -> Vec<(NodeId, Option<PathKind>)> {
        let peers = self.inner.pool().live_peers();
        peers.into_iter().map(|p| (p, self.path_of(&p))).collect()
    }

    /// The direct address in use for `peer` and its round-trip time, if a direct path
    /// is proven.
    pub fn direct_path_of(&self, peer: &NodeId) -> Option<(SocketAddr, Option<Duration>)> {
        self.inner.endpoint.net().direct_of(peer)
    }

    /// Which discovery server this node uses, and its changes (`None` without
    /// discovery).
    pub fn discovery_status(&self) -> Option<watch::Receiver<DiscoveryStatus>> {
        self.inner.disco.as_ref().map(|d| d.status())
    }

    /// The discovery server this node runs now, if it runs one: where it listens and the
    /// URLs other machines reach it at (every address of this machine that is up and not
    /// loopback, when it listens on all of them).
    pub fn serving_discovery(&self) -> Option<Serving> {
        self.inner.disco.as_ref()?.status().borrow().serving.clone()
    }

    /// Waits until this node is announced online on discovery ("logged in"), at most
    /// `timeout`. Returns whether it is. Announcing starts at [`NodeBuilder::bind`] and is
    /// retried in the background; a node built with `.announce(false)` never announces.
    ///
    /// When the node uses the discovery server's relay, this also waits (within the
    /// same `timeout`) until the link to that relay is up and an announcement naming it
    /// went out, so that peers behind NATs can reach this node as soon as it returns.
    pub async fn wait_announced(&self, timeout: Duration) -> bool {
        let inner = &self.inner;
        if !inner.announce || inner.disco.is_none() {
            return false;
        }
        let reachable = async {
            let mut rx = inner.announced.subscribe();
            if rx.wait_for(|a| *a).await.is_err() {
                return false;
            }
            inner.relay_ready(timeout).await;
            let home = inner.endpoint.net().home().borrow().clone();
            if home.connected && home.relay.is_some() {
                let mut named = inner.announced_relay.subscribe();
                let _ = named.wait_for(|r| *r == home.relay).await;
            }
            true
        };
        match tokio::time::timeout(timeout, reachable).await {
            Ok(announced) => announced,
            // The relay part may time out after the announcement itself went out.
            Err(_) => *inner.announced.borrow(),
        }
    }

    /// A receiver of the node's events from now on. The channel is bounded
    /// ([`EVENT_CAPACITY`]); a receiver that falls behind loses the oldest events.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// Claims `name` for this node on discovery, pins it to ourselves, and announces it
    /// (when this node announces).
    pub async fn register(&self, name: &str) -> Result<(), RegisterError> {
        let inner = &self.inner;
        let disco = inner.disco.as_ref().ok_or(RegisterError::NoDiscovery)?;
        disco.claim_name(&inner.secret, name).await.map_err(|e| {
            if e.is_name_taken() {
                RegisterError::NameTaken {
                    name: name.to_owned(),
                }
            } else {
                RegisterError::Discovery(e)
            }
        })?;
        let contact = Contact {
            node_id: inner.node_id,
            first_seen_ms: now_ms(),
            mailbox_key: Some(inner.secret.mailbox_secret().public().0),
        };
        let owned = name.to_owned();
        inner
            .blocking(move |s| s.set_contact(&owned, &contact))
            .await?;
        inner.peers().set_name(inner.node_id, name.to_owned());
        *lock(&inner.name) = Some(name.to_owned());
        if inner.announce {
            presence::announce_once(inner).await?;
        }
        Ok(())
    }

    /// Resolves `peer`: a 52-character NodeId, or a name.
    ///
    /// A name is looked up in the pinned contacts first, then on discovery; the first
    /// NodeId seen for a name is pinned. When discovery later returns another NodeId
    /// for a pinned name, a [`NodeEvent::KeyChanged`] warning is sent and the pinned id
    /// is kept.
    pub async fn resolve(&self, peer: &str) -> Result<Resolved, ResolveError> {
        self.inner.resolve(peer).await
    }

    /// Sends a text message to `to` (a NodeId or a name; see [`Node::resolve`]).
    ///
    /// The message is first stored in the history and the outbox. Then it is delivered
    /// directly if the peer can be reached ([`SendStatus::Delivered`] once it
    /// acknowledged), or else kept in the outbox and deposited, sealed, in the peer's
    /// mailbox ([`SendStatus::Queued`]).
    ///
    /// Sending to a NodeId while discovery is down still succeeds with
    /// [`SendStatus::Queued`] when the peer cannot be reached: the message stays in the
    /// outbox and is delivered (or deposited) by the background task later. Sending to a
    /// name that cannot be resolved is an error ([`SendError::Resolve`]) and stores
    /// nothing.
    pub async fn send(&self, to: &str, text: &str) -> Result<SendOutcome, SendError> {
        let resolved = self.inner.resolve(to).await?;
        let peer = resolved.node_id;
        if peer == self.inner.node_id {
            return Err(SendError::SelfMessage);
        }
        let msg = ChatMessage::text(text, stamp_ms())?;
        self.inner.send_message(peer, msg).await
    }

    /// Sends a text message to the node `to`, like [`Node::send`] without resolving a
    /// name or parsing an id.
    pub async fn send_to(&self, to: &NodeId, text: &str) -> Result<SendOutcome, SendError> {
        if *to == self.inner.node_id {
            return Err(SendError::SelfMessage);
        }
        let msg = ChatMessage::text(text, stamp_ms())?;
        self.inner.send_message(*to, msg).await
    }

    /// Publishes this node's DHT record now (the node also does so by itself when it
    /// starts, when its home relay changes, and every [`DhtConfig::republish`]).
    pub async fn dht_publish(&self) -> Result<(), DhtError> {
        let inner = &self.inner;
        let dht = inner.dht.as_ref().ok_or(DhtError::NotUsed)?;
        let addrs = if inner.publish_addrs {
            presence::our_addrs(inner)
        } else {
            Vec::new()
        };
        let relay = inner.endpoint.net().home().borrow().relay;
        dht.publish(&addrs, relay).await
    }

    /// Looks `node` up on the DHT: its verified record (addresses, home relay).
    pub async fn dht_lookup(&self, node: &NodeId) -> Result<DhtRecord, DhtError> {
        let dht = self.inner.dht.as_ref().ok_or(DhtError::NotUsed)?;
        dht.lookup(node).await
    }

    /// The last `limit` messages with `peer` (a NodeId or a name), oldest first.
    ///
    /// Waits (at most [`Timings::dial_timeout`]) for the mailbox drain at start, so
    /// messages that waited in the mailbox are included.
    pub async fn history(
        &self,
        peer: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        self.history_before(peer, limit, None).await
    }

    /// A page of the conversation with `peer`: the last `limit` messages older than
    /// `before` (the [`StoredMessage::cursor`] of the first message of the page after
    /// it; `None` for the newest page), oldest first. Scrolls back through a long history
    /// without reading all of it.
    pub async fn history_before(
        &self,
        peer: &str,
        limit: usize,
        before: Option<(u64, MessageId)>,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let id = self.inner.resolve(peer).await?.node_id;
        self.inner.wait_initial_drain().await;
        // Every write queued so far (e.g. the delivery mark of a message just sent) is
        // in what we read.
        self.inner.writer.sync().await?;
        Ok(self
            .inner
            .blocking(move |s| s.history(&id, limit, before))
            .await?)
    }

    /// The messages not yet acknowledged by their recipients.
    pub async fn outbox(&self) -> Result<Vec<OutboxEntry>, StorageError> {
        self.inner.writer.sync().await?;
        self.inner.blocking(|s| s.outbox()).await
    }

    /// The outbox's bookkeeping, without the messages.
    async fn outbox_slots(&self) -> Result<Vec<OutboxSlot>, StorageError> {
        self.inner.writer.sync().await?;
        self.inner
            .blocking(|s| {
                let mut slots = Vec::new();
                s.outbox_schedule(|_, mut queue| slots.append(&mut queue))?;
                Ok(slots)
            })
            .await
    }

    /// Tries every message of the outbox that is not yet in its recipient's mailbox
    /// once, now, whatever its schedule (direct delivery, else a deposit in the mailbox),
    /// for up to `within`; says what is left. For short-lived nodes (one-shot commands), whose outbox task would
    /// not get to it: the attempts go on in the background until the node shuts down.
    pub async fn flush_outbox(&self, within: Duration) -> Result<OutboxReport, StorageError> {
        let deadline = tokio::time::Instant::now() + within;
        let round = tokio::spawn(outbox::flush(self.inner.clone()));
        if let Ok(Err(e)) = tokio::time::timeout_at(deadline, round).await {
            tracing::debug!(error = %e, "outbox flush ended early");
        }
        // The round leaves alone what another task (the outbox's own round, a send) is
        // sending right now: wait for those attempts too, within the same time.
        let mut left = self.outbox_slots().await?;
        let busy: Vec<MessageId> = left
            .iter()
            .filter(|e| !e.mailbox_deposited)
            .map(|e| e.id)
            .collect();
        let any_busy = || busy.iter().any(|id| self.inner.delivery().is_busy(id));
        if any_busy() {
            while tokio::time::Instant::now() < deadline && any_busy() {
                tokio::time::sleep(FLUSH_POLL).await;
            }
            left = self.outbox_slots().await?;
        }
        Ok(OutboxReport {
            queued: left.len(),
            only_here: left.iter().filter(|e| !e.mailbox_deposited).count(),
        })
    }

    /// The nodes online now, as listed by discovery (signatures verified).
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, PeersError> {
        let disco = self.inner.disco.as_ref().ok_or(PeersError::NoDiscovery)?;
        let peers = disco.online().await?;
        self.inner.learn_peers(&peers);
        Ok(peers)
    }

    /// The name of `id` for display: its pinned contact name, else its name in the last
    /// online list.
    pub fn name_of(&self, id: &NodeId) -> Option<String> {
        self.inner.name_of(id)
    }

    /// Fetches the mailbox now: stores the messages (deduplicating), applies receipts,
    /// sends receipts back, then deletes what was handled. Returns the number of new
    /// messages.
    pub async fn drain_mailbox(&self) -> Result<usize, MailboxError> {
        mailbox::drain(&self.inner).await
    }

    /// Stops the node: stops the background tasks, closes every connection with
    /// [`CLOSE_SHUTDOWN`], withdraws our presence if we announced it, stops the embedded
    /// discovery server, and waits until all of it is done. Everything stored is
    /// already durable. Nothing here can fail: what does not stop in time is logged and
    /// left behind.
    pub async fn shutdown(self) {
        let inner = self.inner.clone();
        let started = Instant::now();
        inner.cancel.cancel();
        inner.tracker.close();
        inner
            .endpoint
            .close(CLOSE_SHUTDOWN.into_inner() as u32, SHUTDOWN_REASON);
        let grace = inner.timings.dial_timeout.max(Duration::from_secs(1));
        if tokio::time::timeout(grace, inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop in time");
        }
        if inner.announced.send_replace(false) {
            if let Some(disco) = &inner.disco {
                match tokio::time::timeout(grace, disco.withdraw(&inner.secret)).await {
                    Ok(Ok(())) => tracing::info!("withdrew presence"),
                    // Not fatal: the presence expires at its TTL.
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot withdraw presence"),
                    Err(_) => tracing::warn!("withdrawing presence timed out"),
                }
            }
        }
        if let Some(disco) = &inner.disco {
            if tokio::time::timeout(grace, disco.close()).await.is_err() {
                tracing::warn!("discovery did not stop in time");
            }
        }
        // The close frames leave with the next run of each connection's driver; waiting
        // for the draining period (three probe timeouts: seconds for a connection whose
        // handshake never measured a round trip) would only delay the exit.
        let _ = tokio::time::timeout(CLOSE_GRACE, inner.endpoint.wait_idle()).await;
        inner.writer.close();
        let thread = lock(&inner.writer_thread).take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        tracing::debug!(ms = duration_ms(started.elapsed()), "node stopped");
        drop(self);
    }
}

// ---------------------------------------------------------------------------------------
// Shared internals
// ---------------------------------------------------------------------------------------

/// Most entries kept in each per-peer map that peers can grow (last address, dial
/// backoff, warnings given); past it an arbitrary entry is forgotten.
pub(crate) const MAX_PEER_STATE: usize = 4096;

/// Inserts into a per-peer map, forgetting an arbitrary entry when it is full.
fn bounded_insert<K: std::hash::Hash + Eq + Clone, V>(map: &mut HashMap<K, V>, k: K, v: V) {
    if map.len() >= MAX_PEER_STATE && !map.contains_key(&k) {
        if let Some(evict) = map.keys().next().cloned() {
            map.remove(&evict);
        }
    }
    map.insert(k, v);
}

/// Locks a std mutex, recovering from poisoning (the data is plain bookkeeping).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The local clock in ms since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A strictly increasing timestamp (ms since the Unix epoch) for ordering rows: the
/// local clock, or one more than the previous stamp if the clock has not moved on (or
/// went back). Two messages sent or stored one after the other keep their order.
pub(crate) fn stamp_ms() -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = now_ms();
    let prev = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now.max(last.saturating_add(1)))
        })
        .unwrap_or(now);
    now.max(prev.saturating_add(1))
}

/// Waits until the discovery server in use changes to another one (the LAN's server
/// moved); never returns for a discovery that does not change, or none.
pub(crate) async fn server_changed(status: &mut Option<watch::Receiver<DiscoveryStatus>>) {
    if let Some(rx) = status {
        let before = rx.borrow_and_update().generation;
        while rx.changed().await.is_ok() {
            let now = rx.borrow_and_update();
            if now.generation != before && now.url.is_some() {
                return;
            }
        }
    }
    *status = None;
    std::future::pending().await
}

/// Emits [`NodeEvent::DiscoveryChanged`] for every change of the discovery's status after
/// `status` was subscribed (a fresh receiver has seen the status of its moment). The task
/// may first run after a change: marking the status seen here would swallow that change.
async fn report_discovery_changes(inner: Arc<Inner>, mut status: watch::Receiver<DiscoveryStatus>) {
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = status.borrow_and_update().clone();
                inner.emit(NodeEvent::DiscoveryChanged(now));
            }
        }
    }
}

impl Inner {
    /// The discovery's status, to wait on with [`server_changed`].
    pub(crate) fn discovery_status(&self) -> Option<watch::Receiver<DiscoveryStatus>> {
        self.disco.as_ref().map(|d| d.status())
    }

    fn peers(&self) -> MutexGuard<'_, peers::PeerDirectory> {
        lock(&self.peers)
    }

    fn pool(&self) -> MutexGuard<'_, pool::ConnectionPool> {
        lock(&self.pool)
    }

    fn delivery(&self) -> MutexGuard<'_, tracker::DeliveryTracker> {
        lock(&self.delivery)
    }

    fn emit(&self, ev: NodeEvent) {
        // No receivers is fine.
        let _ = self.events.send(ev);
    }

    /// Runs a store operation on a blocking thread.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || f(&store)).await??)
    }

    fn name_of(&self, id: &NodeId) -> Option<String> {
        self.peers().name_of(id)
    }

    /// The name of a message's sender: [`Inner::name_of`], else the name its key claimed
    /// on discovery (looked up by NodeId, verified by the client, bounded by
    /// [`Timings::dial_timeout`], at most once per [`NAME_LOOKUP_INTERVAL`] per sender).
    /// A name learned this way is pinned like one resolved by name (trust on first
    /// use), so `history NAME` finds the conversation later; a name already pinned to
    /// another key is not shown and raises a [`NodeEvent::KeyChanged`] warning.
    async fn sender_name(&self, id: &NodeId) -> Option<String> {
        if let Some(name) = self.name_of(id) {
            self.pin_online_name(id).await;
            return Some(name);
        }
        let disco = self.disco.as_ref()?;
        if let Some(name) = self.peers().recent_claim(id, Instant::now()) {
            return name;
        }
        let found = match tokio::time::timeout(self.timings.dial_timeout, disco.lookup_id(id)).await
        {
            Ok(Ok(Some(info))) => info.name,
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                tracing::debug!(peer = %id, error = %e, "cannot look up a sender's name");
                None
            }
            Err(_) => None,
        };
        let pinned = match found {
            Some(name) => {
                let (n, node) = (name.clone(), *id);
                match self
                    .blocking(move |s| s.pin_contact(&n, &node, now_ms()))
                    .await
                {
                    Ok(PinOutcome::New | PinOutcome::Same) => {
                        self.peers().set_name(*id, name.clone());
                        Some(name)
                    }
                    Ok(PinOutcome::Changed { old }) => {
                        self.key_changed(&name, old, *id);
                        None
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot pin a sender's name");
                        None
                    }
                }
            }
            None => None,
        };
        self.peers().note_claim(*id, pinned.clone(), Instant::now());
        pinned
    }

    /// Pins the name `id` has in the online list, if it is not pinned yet: a peer we
    /// exchange messages with keeps its name (so `history NAME` works) when discovery is
    /// down or the peer offline. The online list's names are claims the discovery client
    /// verified, as for [`Inner::resolve`].
    async fn pin_online_name(&self, id: &NodeId) {
        let Some(name) = self.peers().unpinned_online_name(id) else {
            return;
        };
        let (n, node) = (name.clone(), *id);
        match self
            .blocking(move |s| s.pin_contact(&n, &node, now_ms()))
            .await
        {
            Ok(PinOutcome::New | PinOutcome::Same) => self.peers().set_name(*id, name),
            Ok(PinOutcome::Changed { old }) => self.key_changed(&name, old, *id),
            Err(e) => tracing::warn!(error = %e, "cannot pin a peer's name"),
        }
    }

    fn current_name(&self) -> Option<String> {
        lock(&self.name).clone()
    }

    /// Records what an online list or lookup told us about peers: mailbox keys, and for
    /// the path layer the direct addresses and relays of peers it tracks (a dial tells
    /// it of the others, see `deliver::learn_paths`).
    fn learn_peers(&self, peers: &[PeerInfo]) {
        self.peers().learn(peers);
        let net = self.endpoint.net();
        for p in peers
            .iter()
            .filter(|p| p.online && p.node_id != self.node_id)
        {
            net.update_peer_info(p.node_id, &p.addrs, p.relay);
        }
    }

    /// Marks `peer` for an immediate outbox retry and clears its dial backoff.
    fn wake_outbox_for(&self, peer: NodeId) {
        self.pool().clear_backoff(&peer);
        self.delivery().wake(peer);
        self.outbox_wake.notify_one();
    }

    /// Waits (at most `max`) until the home relay link is up, when this node uses the
    /// discovery server's relay and that server runs one, so a first dial to a peer
    /// behind a NAT goes through the relay at once instead of waiting for a
    /// retransmission.
    async fn relay_ready(&self, max: Duration) {
        if !self.use_relay || self.disco.is_none() {
            return;
        }
        let mut checked = self.relay_checked.subscribe();
        let mut home = self.endpoint.net().home();
        let ready = async {
            let _ = checked.wait_for(|c| *c).await;
            if self.home_relay.borrow().is_some() {
                let _ = home.wait_for(|h| h.connected).await;
            }
        };
        let _ = tokio::time::timeout(max, ready).await;
    }

    async fn wait_initial_drain(&self) {
        if self.disco.is_none() {
            return;
        }
        let mut rx = self.drained.subscribe();
        let _ = tokio::time::timeout(self.timings.dial_timeout, rx.wait_for(|d| *d)).await;
    }

    async fn resolve(&self, peer: &str) -> Result<Resolved, ResolveError> {
        if peer.len() == NODE_ID_TEXT_LEN {
            if let Ok(id) = peer.parse::<NodeId>() {
                return Ok(Resolved {
                    node_id: id,
                    name: self.name_of(&id),
                });
            }
        }
        let name = peer.to_owned();
        if p2p_discovery::validate_name(&name).is_err() {
            return Err(ResolveError::UnknownPeer { peer: name });
        }
        let pinned = {
            let name = name.clone();
            self.blocking(move |s| s.contact(&name)).await?
        };
        // A pinned name is checked against discovery (for a changed key) at most once
        // per NAME_LOOKUP_INTERVAL, so sending many messages costs no lookups.
        let recently_checked =
            pinned.is_some() && self.peers().recently_checked(&name, Instant::now());
        let lookup = match &self.disco {
            Some(d) if !recently_checked => Some(
                tokio::time::timeout(self.timings.dial_timeout, d.lookup_name(&name))
                    .await
                    .unwrap_or_else(|_| Err(DiscoveryError::timeout(d.url()))),
            ),
            _ => None,
        };
        if let Some(Ok(found)) = &lookup {
            self.peers().note_checked(name.clone(), Instant::now());
            if let Some(info) = found {
                self.learn_peers(std::slice::from_ref(info));
            }
        }
        if let Some(contact) = pinned {
            match lookup {
                Some(Ok(Some(info))) => {
                    if info.node_id != contact.node_id {
                        self.key_changed(&name, contact.node_id, info.node_id);
                    } else {
                        self.remember_mailbox_key(&name, &contact, &info).await;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "cannot check pinned name on discovery")
                }
                _ => {}
            }
            return Ok(Resolved {
                node_id: contact.node_id,
                name: Some(name),
            });
        }
        let info = match lookup {
            None => return Err(ResolveError::UnknownPeer { peer: name }),
            Some(Err(e)) => return Err(ResolveError::Discovery(e)),
            Some(Ok(None)) => return Err(ResolveError::UnknownPeer { peer: name }),
            Some(Ok(Some(info))) => info,
        };
        let id = info.node_id;
        let now = now_ms();
        let outcome = {
            let name = name.clone();
            self.blocking(move |s| s.pin_contact(&name, &id, now))
                .await?
        };
        match outcome {
            PinOutcome::New | PinOutcome::Same => {
                let contact = Contact {
                    node_id: id,
                    first_seen_ms: now,
                    mailbox_key: None,
                };
                self.remember_mailbox_key(&name, &contact, &info).await;
                self.peers().set_name(id, name.clone());
                Ok(Resolved {
                    node_id: id,
                    name: Some(name),
                })
            }
            PinOutcome::Changed { old } => {
                // Pinned concurrently by someone else: keep the pin.
                self.key_changed(&name, old, id);
                Ok(Resolved {
                    node_id: old,
                    name: Some(name),
                })
            }
        }
    }

    /// Stores the mailbox key from a verified record in the pinned contact.
    async fn remember_mailbox_key(&self, name: &str, contact: &Contact, info: &PeerInfo) {
        self.peers().set_mailbox_key(info.node_id, info.mailbox_key);
        if contact.mailbox_key == Some(info.mailbox_key.0) {
            return;
        }
        let mut updated = contact.clone();
        updated.mailbox_key = Some(info.mailbox_key.0);
        let name = name.to_owned();
        if let Err(e) = self
            .blocking(move |s| {
                // Re-check under the write: only update a contact still pinned to this id.
                match s.contact(&name)? {
                    Some(c) if c.node_id == updated.node_id => {
                        updated.first_seen_ms = c.first_seen_ms;
                        s.set_contact(&name, &updated)
                    }
                    _ => Ok(()),
                }
            })
            .await
        {
            tracing::warn!(error = %e, "cannot store a contact's mailbox key");
        }
    }

    /// Warns that discovery returns `announced` for a name pinned to `pinned`.
    fn key_changed(&self, name: &str, pinned: NodeId, announced: NodeId) {
        tracing::warn!(
            name,
            %pinned,
            %announced,
            "discovery returns another key for a pinned name; keeping the pinned key"
        );
        self.emit(NodeEvent::KeyChanged {
            name: name.to_owned(),
            pinned,
            announced,
        });
    }

    /// Stores `msg` for `peer` and tries to deliver it (see [`Node::send`]).
    async fn send_message(
        self: &Arc<Self>,
        peer: NodeId,
        msg: ChatMessage,
    ) -> Result<SendOutcome, SendError> {
        if self.cancel.is_cancelled() {
            return Err(StorageError::Shutdown.into());
        }
        let id = msg.id;
        // A node whose storage is failing refuses at once, before anything leaves.
        if let Some(e) = self.health.failing() {
            return Err(StorageError::Store(e).into());
        }
        // In flight before it is in the outbox, so the outbox task leaves it to us.
        self.delivery().start_send(id);
        // The write is queued first, so every later write of this message (its delivery
        // mark) commits after it; the message goes out while the write commits, and the
        // outcome waits for both: the ack costs the receiver's fsync, not ours as well.
        // The first message to a peer known by name also pins that name meanwhile.
        let stored = match self.writer.submit_outgoing(peer, msg.clone()).await {
            Ok(rx) => rx,
            Err(e) => {
                self.delivery().finish(&id);
                return Err(e.into());
            }
        };
        let (stored, attempt, ()) = tokio::join!(
            writer::outcome(stored),
            deliver::deliver(self, peer, &msg),
            self.pin_online_name(&peer)
        );
        if let Err(e) = stored {
            self.delivery().finish(&id);
            if attempt.is_ok() {
                tracing::warn!(%peer, message = %id, error = %e, "the recipient has the message, but it could not be written here");
            }
            return Err(e.into());
        }
        let result = self.send_outcome(peer, &msg, attempt).await;
        self.delivery().finish(&id);
        if matches!(&result, Ok(o) if o.status == SendStatus::Queued) {
            // The outbox task takes it from here (it skipped it while it was in flight).
            self.outbox_wake.notify_one();
        }
        result
    }

    /// Settles a stored message from the outcome of its first delivery attempt, or
    /// queues it.
    async fn send_outcome(
        self: &Arc<Self>,
        peer: NodeId,
        msg: &ChatMessage,
        attempt: Result<deliver::Acked, deliver::DeliverError>,
    ) -> Result<SendOutcome, SendError> {
        let id = msg.id;
        let queued = SendOutcome {
            id,
            to: peer,
            status: SendStatus::Queued,
            path: None,
            queued_because: None,
            queued: None,
        };
        match attempt {
            Ok(acked) => {
                let status = acked.status;
                deliver::settle(self, peer, id, status, acked.path).await?;
                if status.is_delivered() {
                    return Ok(SendOutcome {
                        status: SendStatus::Delivered,
                        path: acked.path,
                        ..queued
                    });
                }
                let code = match status {
                    crate::wire::AckStatus::Rejected(code) => code,
                    _ => RejectCode::OTHER,
                };
                Err(SendError::Rejected { to: peer, id, code })
            }
            Err(e) => {
                let reason = e.queue_reason(peer);
                if let QueueReason::NotThePeer { actual, addr, .. } = reason {
                    tracing::warn!(%peer, ?addr, ?actual, error = %e, "the node at the peer's address is not the peer; queued");
                } else {
                    tracing::info!(%peer, message = %id, error = %e, "direct delivery failed; queued");
                }
                let entry = OutboxEntry {
                    to: peer,
                    message: msg.clone(),
                    attempts: 0,
                    next_attempt_ms: now_ms(),
                    created_ms: now_ms(),
                    mailbox_deposited: false,
                };
                let (_, in_mailbox) = outbox::after_failure(self, entry).await;
                Ok(SendOutcome {
                    queued_because: Some(reason),
                    queued: Some(if in_mailbox {
                        Queued::Mailbox
                    } else {
                        Queued::Outbox
                    }),
                    ..queued
                })
            }
        }
    }
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds() {
        let t = Timings {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            ..Timings::default()
        };
        assert_eq!(t.backoff(0), Duration::from_millis(100));
        assert_eq!(t.backoff(1), Duration::from_millis(100));
        assert_eq!(t.backoff(2), Duration::from_millis(200));
        assert_eq!(t.backoff(4), Duration::from_millis(800));
        assert_eq!(t.backoff(5), Duration::from_secs(1));
        assert_eq!(t.backoff(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn stamps_strictly_increase() {
        let mut last = 0;
        for _ in 0..10_000 {
            let s = stamp_ms();
            assert!(s > last);
            last = s;
        }
    }
}
