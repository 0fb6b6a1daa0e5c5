//! The QUIC endpoint: one UDP socket that both listens and dials, whose every connection
//! carries the authenticated NodeId of its peer.
//!
//! Built by value and bound last:
//!
//! ```no_run
//! # async fn f() -> Result<(), p2p_node::endpoint::BindError> {
//! let secret = p2p_crypto::SecretKey::generate();
//! let ep = p2p_node::Endpoint::builder(secret)
//!     .bind_addr("127.0.0.1:0".parse().expect("literal"))
//!     .bind()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Identity: the TLS layer ([`p2p_crypto::tls`]) binds each handshake to the peer's ed25519
//! key. A dialer names the NodeId it expects and gets [`ConnectError::UnexpectedPeer`],
//! naming both ids, if the peer is anyone else. An acceptor learns the caller's NodeId
//! from the handshake. Application protocol negotiation (ALPN) must select
//! [`crate::wire::ALPN`]; any other peer is refused.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use p2p_crypto::{
    tls::{self, Certified, PeerCertError, ServerVerifier, TlsError},
    NodeId, SecretKey,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::{
    net::{self, PathConfig, PathKind, PathSocket},
    wire::ALPN,
};

pub mod lanes;

pub use lanes::{Lane, LaneError, Sent, LANE_DEPTH, MAX_LANES};

/// Transport settings applied to every connection, both directions.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// A connection with no traffic for this long is closed. Default 30 s.
    pub idle_timeout: Duration,
    /// Keep-alive pings so idle but wanted connections (and NAT bindings) stay up.
    /// Must be below `idle_timeout`. Default 10 s.
    pub keep_alive: Duration,
    /// Bidirectional streams a peer may have open at once. Default 256. A node pipelines
    /// its messages on a few of them ([`lanes`]); a peer that sends one message per
    /// stream at a time is bounded by it in the messages it has in flight to us. The bytes
    /// these streams hold are bounded per connection apart from it
    /// (`node::CONNECTION_FRAME_BUDGET`).
    pub max_concurrent_bidi_streams: u32,
    /// Unidirectional streams a peer may have open at once. Default 0 (unused).
    pub max_concurrent_uni_streams: u32,
    /// Bytes a peer may send on one stream before we read them. Default 256 KiB.
    pub stream_receive_window: u32,
    /// Bytes a peer may send on all streams of a connection before we read them.
    /// Default 2 MiB.
    pub receive_window: u32,
}

/// Bidirectional streams a peer may have open at once, by default.
const DEFAULT_BIDI_STREAMS: u32 = 256;

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
            max_concurrent_bidi_streams: DEFAULT_BIDI_STREAMS,
            max_concurrent_uni_streams: 0,
            stream_receive_window: 256 * 1024,
            receive_window: 2 * 1024 * 1024,
        }
    }
}

impl TransportSettings {
    /// The quinn transport configuration these settings describe.
    pub fn to_quinn(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(self.idle_timeout)
                .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))),
        ))
        .keep_alive_interval(Some(self.keep_alive))
        .max_concurrent_bidi_streams(self.max_concurrent_bidi_streams.into())
        .max_concurrent_uni_streams(self.max_concurrent_uni_streams.into())
        .stream_receive_window(self.stream_receive_window.into())
        .receive_window(self.receive_window.into());
        t
    }
}

/// Errors binding an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("building TLS configuration failed: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Errors dialing a peer.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("peer at {addr} is not {expected}: it authenticated as {actual}")]
    UnexpectedPeer {
        addr: SocketAddr,
        expected: NodeId,
        actual: NodeId,
    },
    #[error("cannot dial {addr}: {source}")]
    Start {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("connection to {addr} failed: {source}")]
    Connection {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("peer at {addr} presented no valid node certificate: {source}")]
    PeerCert {
        addr: SocketAddr,
        source: PeerCertError,
    },
    #[error("peer at {addr} does not speak {}", String::from_utf8_lossy(alpn))]
    Protocol {
        addr: SocketAddr,
        alpn: &'static [u8],
    },
    #[error("building TLS configuration failed: {0}")]
    Tls(#[from] TlsError),
    #[error("too many peers tracked to dial {peer}")]
    NoRoom { peer: NodeId },
}

/// Errors accepting a connection.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("handshake with {addr} failed: {source}")]
    Connection {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("caller at {addr} presented no valid node certificate: {source}")]
    PeerCert {
        addr: SocketAddr,
        source: PeerCertError,
    },
    #[error("caller at {addr} does not speak {}", String::from_utf8_lossy(ALPN))]
    Protocol { addr: SocketAddr },
    /// A connection that arrived through the path layer as `claimed` (its relay named
    /// that sender, or its address is proven to be that peer's) authenticated as
    /// another node.
    #[error("caller arriving as {claimed} authenticated as {actual}")]
    IdentityMismatch { claimed: NodeId, actual: NodeId },
}

/// Builder for [`Endpoint`].
#[derive(Debug)]
pub struct Builder {
    secret: SecretKey,
    bind_addr: SocketAddr,
    transport: TransportSettings,
    paths: PathConfig,
}

impl Builder {
    /// The UDP address to listen and dial on. Default `0.0.0.0:0` (all IPv4 interfaces,
    /// any free port).
    pub fn bind_addr(mut self, addr: SocketAddr) -> Self {
        self.bind_addr = addr;
        self
    }

    /// Transport settings for every connection.
    pub fn transport(mut self, transport: TransportSettings) -> Self {
        self.transport = transport;
        self
    }

    /// Path settings (direct paths, hole punching); see [`PathConfig`].
    pub fn paths(mut self, paths: PathConfig) -> Self {
        self.paths = paths;
        self
    }

    /// Binds the UDP socket and starts the endpoint. Must run inside a tokio runtime.
    pub async fn bind(self) -> Result<Endpoint, BindError> {
        let certified = tls::certify(&self.secret)?;
        let mut server_tls = tls::server_config(&certified)?;
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic_server = QuicServerConfig::try_from(server_tls).map_err(|e| {
            TlsError::Rustls(rustls::Error::General(format!("QUIC server config: {e}")))
        })?;
        let transport = Arc::new(self.transport.to_quinn());
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
        server_config.transport_config(transport.clone());
        let bind_err = |source| BindError::Bind {
            addr: self.bind_addr,
            source,
        };
        let net = net::Shared::bind(self.bind_addr, &self.secret, self.paths).map_err(bind_err)?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        // Path probes share the socket and are told apart by a clear fixed bit.
        endpoint_config.grease_quic_bit(false);
        let socket = Arc::new(PathSocket {
            shared: net.clone(),
        });
        let inner = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        Ok(Endpoint {
            inner,
            node_id: self.secret.public(),
            certified: Arc::new(certified),
            transport,
            net,
        })
    }
}

/// A bound QUIC endpoint of this node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    node_id: NodeId,
    certified: Arc<Certified>,
    transport: Arc<quinn::TransportConfig>,
    net: Arc<net::Shared>,
}

impl Endpoint {
    /// Starts building an endpoint for the node with this secret key.
    pub fn builder(secret: SecretKey) -> Builder {
        Builder {
            secret,
            bind_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            transport: TransportSettings::default(),
            paths: PathConfig::default(),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The path layer under this endpoint.
    pub(crate) fn net(&self) -> &Arc<net::Shared> {
        &self.net
    }

    /// Dials `addr`, succeeding only if the peer there authenticates as `expected`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: NodeId,
    ) -> Result<Connection, ConnectError> {
        self.connect_alpn(addr, expected, ALPN).await
    }

    /// Dials `peer` through the path layer: over a proven direct path, through its
    /// relay, or at every address discovery published for it (tell the path layer with
    /// [`Endpoint::learn_peer`] first), whichever answers; the path may change later
    /// without disturbing the connection. Succeeds only if the peer authenticates as
    /// `peer`.
    pub async fn connect_peer(&self, peer: NodeId) -> Result<Connection, ConnectError> {
        let addr = self
            .net
            .mapped_addr(peer)
            .ok_or(ConnectError::NoRoom { peer })?;
        self.connect(addr, peer).await
    }

    /// Tells the path layer what discovery says of `peer`: its direct addresses and
    /// its home relay.
    pub fn learn_peer(
        &self,
        peer: NodeId,
        addrs: &[SocketAddr],
        relay: Option<p2p_discovery::RelayRef>,
    ) {
        self.net.set_peer_info(peer, addrs, relay);
    }

    /// Dials `addr` speaking application protocol `alpn`, succeeding only if the peer
    /// there authenticates as `expected`.
    pub async fn connect_alpn(
        &self,
        addr: SocketAddr,
        expected: NodeId,
        alpn: &'static [u8],
    ) -> Result<Connection, ConnectError> {
        let verifier = ServerVerifier::new(expected);
        let mut client_tls = tls::client_config(&self.certified, verifier.clone())?;
        client_tls.alpn_protocols = vec![alpn.to_vec()];
        let quic_client = QuicClientConfig::try_from(client_tls).map_err(|e| {
            TlsError::Rustls(rustls::Error::General(format!("QUIC client config: {e}")))
        })?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client));
        client_config.transport_config(self.transport.clone());
        let connecting = self
            .inner
            .connect_with(client_config, addr, tls::SERVER_NAME)
            .map_err(|source| ConnectError::Start { addr, source })?;
        let conn = match connecting.await {
            Ok(conn) => conn,
            Err(source) => {
                return Err(match verifier.mismatch() {
                    Some(m) => ConnectError::UnexpectedPeer {
                        addr,
                        expected: m.expected,
                        actual: m.actual,
                    },
                    None => ConnectError::Connection { addr, source },
                })
            }
        };
        let remote = peer_node_id(&conn).map_err(|source| {
            conn.close(CLOSE_BAD_IDENTITY, b"bad identity");
            ConnectError::PeerCert { addr, source }
        })?;
        if remote != expected {
            // Unreachable with the verifier above; kept as a second line of defence.
            conn.close(CLOSE_BAD_IDENTITY, b"unexpected peer");
            return Err(ConnectError::UnexpectedPeer {
                addr,
                expected,
                actual: remote,
            });
        }
        if !alpn_is(&conn, alpn) {
            conn.close(CLOSE_PROTOCOL, b"alpn");
            return Err(ConnectError::Protocol { addr, alpn });
        }
        Ok(Connection::new(conn, remote, self.net.clone()))
    }

    /// Waits for the next incoming connection attempt. `None` once the endpoint is closed.
    /// Complete the handshake with [`Incoming::accept`], typically in a task of its own so a
    /// slow caller cannot hold up others.
    pub async fn accept(&self) -> Option<Incoming> {
        self.inner.accept().await.map(|inner| Incoming {
            inner,
            net: self.net.clone(),
        })
    }

    /// Closes every connection with `code` and stops accepting.
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.inner.close(code.into(), reason);
    }

    /// Waits until every connection is closed and its close frames sent.
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await;
    }
}

/// Application close code: the peer's identity is not acceptable.
pub const CLOSE_BAD_IDENTITY: quinn::VarInt = quinn::VarInt::from_u32(0x10);
/// Application close code: wrong application protocol.
pub const CLOSE_PROTOCOL: quinn::VarInt = quinn::VarInt::from_u32(0x11);

fn alpn_is(conn: &quinn::Connection, alpn: &[u8]) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == alpn)
}

fn peer_node_id(conn: &quinn::Connection) -> Result<NodeId, PeerCertError> {
    let chain = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or(PeerCertError::NoCertificate)?;
    tls::node_id_from_chain(&chain)
}

/// An incoming connection attempt, before its handshake.
#[derive(Debug)]
pub struct Incoming {
    inner: quinn::Incoming,
    net: Arc<net::Shared>,
}

impl Incoming {
    /// The caller's address (not yet authenticated).
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Refuses the attempt (for example when at the connection limit).
    pub fn refuse(self) {
        self.inner.refuse();
    }

    /// Completes the handshake and returns the connection with the caller's NodeId.
    pub async fn accept(self) -> Result<Connection, AcceptError> {
        let addr = self.inner.remote_address();
        let conn = self
            .inner
            .await
            .map_err(|source| AcceptError::Connection { addr, source })?;
        let remote = peer_node_id(&conn).map_err(|source| {
            conn.close(CLOSE_BAD_IDENTITY, b"bad identity");
            AcceptError::PeerCert { addr, source }
        })?;
        if !alpn_is(&conn, ALPN) {
            conn.close(CLOSE_PROTOCOL, b"alpn");
            return Err(AcceptError::Protocol { addr });
        }
        // Arrived through the path layer as a given peer: it must be that peer, exactly
        // as a dialed peer must be the one expected.
        if let Some(claimed) = self.net.node_of(addr) {
            if claimed != remote {
                conn.close(CLOSE_BAD_IDENTITY, b"unexpected peer");
                return Err(AcceptError::IdentityMismatch {
                    claimed,
                    actual: remote,
                });
            }
        }
        Ok(Connection::new(conn, remote, self.net))
    }
}

/// An authenticated connection to another node.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: quinn::Connection,
    remote: NodeId,
    net: Arc<net::Shared>,
    /// The streams this side sends its messages on ([`lanes`]).
    lanes: Arc<lanes::Lanes>,
}

impl Connection {
    fn new(inner: quinn::Connection, remote: NodeId, net: Arc<net::Shared>) -> Self {
        Self {
            inner,
            remote,
            net,
            lanes: Arc::default(),
        }
    }

    /// A lane to send a message on ([`lanes`]): the least busy of this connection's,
    /// or a new one. Lanes idle for `fresh` or longer are finished first.
    pub async fn lane(&self, fresh: Duration) -> Result<Arc<Lane>, quinn::ConnectionError> {
        self.lanes.lane(&self.inner, fresh, MAX_LANES).await
    }

    /// Whether the peer ends each stream after its first ack (one message per stream):
    /// every message then goes on a stream of its own, so messages sent one after the
    /// other may overtake each other.
    pub fn one_message_per_stream(&self) -> bool {
        self.lanes.single()
    }

    /// The authenticated NodeId of the peer. The sender of everything read from this
    /// connection is this node, whatever the bytes say.
    pub fn remote_node_id(&self) -> NodeId {
        self.remote
    }

    /// The peer's address as quinn sees it: a real address, or for a connection
    /// through the path layer the peer's mapped address (see [`Connection::path`]).
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Whether the connection goes through the path layer (its remote address is the
    /// peer's mapped address) rather than to a real address.
    pub fn through_path_layer(&self) -> bool {
        self.net.node_of(self.inner.remote_address()).is_some()
    }

    /// A real address of the peer: for a connection to a real address that address,
    /// for one through the path layer the direct address the path layer proved for the
    /// peer, if any (its mapped address names the peer, it is no place to dial).
    pub fn real_addr(&self) -> Option<SocketAddr> {
        if self.through_path_layer() {
            self.net.direct_of(&self.remote).map(|(addr, _)| addr)
        } else {
            Some(self.remote_addr())
        }
    }

    /// The path this connection's packets to the peer take now: `Direct` for a
    /// connection to a real address, else what the path layer chose.
    pub fn path(&self) -> Option<PathKind> {
        if self.through_path_layer() {
            self.net.path_of(&self.remote)
        } else {
            Some(PathKind::Direct)
        }
    }

    /// The path the last packet from the peer arrived on.
    pub fn recv_path(&self) -> Option<PathKind> {
        if self.through_path_layer() {
            self.net.recv_path(&self.remote)
        } else {
            Some(PathKind::Direct)
        }
    }

    /// The underlying quinn connection, for opening and accepting streams.
    pub fn quic(&self) -> &quinn::Connection {
        &self.inner
    }
}
