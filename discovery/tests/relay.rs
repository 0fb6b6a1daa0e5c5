//! The relay server, driven by raw QUIC clients on loopback.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use p2p_crypto::{
    tls::{self, ServerVerifier},
    NodeId, SecretKey,
};
use p2p_discovery::relay::{
    proto::{Frame, ALPN},
    Relay, RelayConfig, RelayMetrics, CLOSE_PROTOCOL, CLOSE_REPLACED,
};
use quinn::crypto::rustls::QuicClientConfig;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

struct Running {
    addr: SocketAddr,
    id: NodeId,
    metrics: Arc<RelayMetrics>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(config: RelayConfig) -> Self {
        let key = SecretKey::generate();
        let relay = Relay::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), &key, config)
            .expect("relay binds");
        let addr = relay.local_addr().expect("addr");
        let metrics = relay.metrics();
        let stop = CancellationToken::new();
        let task = tokio::spawn(relay.serve(stop.clone().cancelled_owned()));
        Self {
            addr,
            id: key.public(),
            metrics,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

/// A node's side of a relay connection, speaking the frames by hand.
struct Client {
    key: SecretKey,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
    _endpoint: quinn::Endpoint,
}

fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("client endpoint")
}

fn client_config(key: &SecretKey, relay: NodeId, alpn: &[u8]) -> quinn::ClientConfig {
    let certified = tls::certify(key).expect("certificate");
    let mut tls = tls::client_config(&certified, ServerVerifier::new(relay)).expect("tls");
    tls.alpn_protocols = vec![alpn.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).expect("quic config"),
    ))
}

impl Client {
    async fn connect(relay: &Running) -> Client {
        Self::connect_as(relay, SecretKey::generate()).await
    }

    async fn connect_as(relay: &Running, key: SecretKey) -> Client {
        let endpoint = client_endpoint();
        let conn = endpoint
            .connect_with(
                client_config(&key, relay.id, ALPN),
                relay.addr,
                tls::SERVER_NAME,
            )
            .expect("connect")
            .await
            .expect("handshake");
        let (send, recv) = conn.open_bi().await.expect("stream");
        let mut c = Client {
            key,
            conn,
            send,
            recv,
            buf: BytesMut::new(),
            _endpoint: endpoint,
        };
        // The relay learns of the stream from its first bytes.
        c.write(Frame::PunchReport {
            attempts: 0,
            successes: 0,
        })
        .await;
        c
    }

    fn id(&self) -> [u8; 32] {
        *self.key.public().as_bytes()
    }

    async fn write(&mut self, frame: Frame) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).expect("encodes");
        self.send.write_all(&buf).await.expect("write");
    }

    async fn send_to(&mut self, dst: [u8; 32], packet: &'static [u8]) {
        self.write(Frame::Send {
            dst,
            packet: Bytes::from_static(packet),
        })
        .await;
    }

    /// The next frame, within [`WAIT`]; `None` if the stream ends.
    async fn next(&mut self) -> Option<Frame> {
        let read = async {
            loop {
                if let Some(f) = Frame::decode(&mut self.buf).expect("valid frames") {
                    return Some(f);
                }
                match self.recv.read_chunk(65536, true).await {
                    Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("a frame in time")
    }

    /// The next packet received (skipping address reports).
    async fn next_packet(&mut self) -> ([u8; 32], Bytes) {
        loop {
            match self.next().await.expect("stream open") {
                Frame::Recv { src, packet } => return (src, packet),
                Frame::Observed { .. } => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn packets_reach_only_their_destination_with_the_authenticated_source() {
    let relay = Running::start(RelayConfig::default());
    let mut alice = Client::connect(&relay).await;
    let mut bob = Client::connect(&relay).await;
    let mut mallory = Client::connect(&relay).await;
    // Every node first learns the address the relay sees it at.
    for c in [&mut alice, &mut bob, &mut mallory] {
        let local = c._endpoint.local_addr().expect("local");
        assert_eq!(c.next().await, Some(Frame::Observed { addr: local }));
    }
    alice.send_to(bob.id(), b"for bob").await;
    alice.send_to(mallory.id(), b"for mallory").await;
    // Bob gets his packet, stamped with alice's key (from her TLS handshake).
    assert_eq!(
        bob.next_packet().await,
        (alice.id(), Bytes::from_static(b"for bob"))
    );
    // Mallory gets only what was addressed to her.
    assert_eq!(
        mallory.next_packet().await,
        (alice.id(), Bytes::from_static(b"for mallory"))
    );
    // Mallory cannot make a packet look like someone else's: the relay stamps hers.
    mallory.send_to(bob.id(), b"i am alice").await;
    assert_eq!(
        bob.next_packet().await,
        (mallory.id(), Bytes::from_static(b"i am alice"))
    );
    assert_eq!(relay.metrics.forwarded_packets(), 3);
    assert_eq!(relay.metrics.clients(), 3);
    relay.stop().await;
}

#[tokio::test]
async fn a_destination_that_is_not_here_is_reported_gone() {
    let relay = Running::start(RelayConfig::default());
    let mut alice = Client::connect(&relay).await;
    let nobody = *SecretKey::generate().public().as_bytes();
    alice.send_to(nobody, b"hello?").await;
    alice.send_to(nobody, b"hello again?").await;
    loop {
        match alice.next().await.expect("open") {
            Frame::Observed { .. } => {}
            Frame::PeerGone { node } => {
                assert_eq!(node, nobody);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(relay.metrics.dropped_no_peer() >= 1);
    relay.stop().await;
}

#[tokio::test]
async fn clients_without_a_node_certificate_or_the_protocol_are_refused() {
    let relay = Running::start(RelayConfig::default());
    let endpoint = client_endpoint();
    // No client certificate at all.
    let no_cert = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(ServerVerifier::new(relay.id))
        .with_no_client_auth();
    let mut no_cert = no_cert;
    no_cert.alpn_protocols = vec![ALPN.to_vec()];
    let config =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(no_cert).expect("quic")));
    let refused = endpoint
        .connect_with(config, relay.addr, tls::SERVER_NAME)
        .expect("connect")
        .await;
    let refused = match refused {
        // The server may only refuse once the client's (missing) certificate arrives.
        Ok(conn) => conn.accept_bi().await.map(|_| ()).is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate is refused");
    // A certificate whose key is not ed25519.
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let cert = rcgen::CertificateParams::new(vec!["x".into()])
        .expect("params")
        .self_signed(&kp)
        .expect("cert");
    let mut ecdsa = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(ServerVerifier::new(relay.id))
        .with_client_auth_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(kp.serialize_der().into()),
        )
        .expect("client auth");
    ecdsa.alpn_protocols = vec![ALPN.to_vec()];
    let config =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(ecdsa).expect("quic")));
    let conn = endpoint
        .connect_with(config, relay.addr, tls::SERVER_NAME)
        .expect("connect")
        .await;
    let refused = match conn {
        Ok(conn) => conn.accept_bi().await.map(|_| ()).is_err(),
        Err(_) => true,
    };
    assert!(refused, "a non-ed25519 certificate is refused");
    // A node certificate, but the node-to-node protocol instead of the relay's.
    let wrong_alpn = endpoint
        .connect_with(
            client_config(&SecretKey::generate(), relay.id, b"p2p-chat/1"),
            relay.addr,
            tls::SERVER_NAME,
        )
        .expect("connect")
        .await;
    assert!(wrong_alpn.is_err(), "another ALPN is refused");
    // A relay that is not the one expected is refused by the client.
    let impostor = endpoint
        .connect_with(
            client_config(&SecretKey::generate(), SecretKey::generate().public(), ALPN),
            relay.addr,
            tls::SERVER_NAME,
        )
        .expect("connect")
        .await;
    assert!(impostor.is_err(), "the client checks the relay's key");
    // Nobody was registered.
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.metrics.refused_handshakes() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(relay.metrics.refused_handshakes() >= 2);
    assert_eq!(relay.metrics.clients(), 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_one() {
    let relay = Running::start(RelayConfig::default());
    let key = SecretKey::generate();
    let old = Client::connect_as(&relay, key.clone()).await;
    let mut old_observed = old;
    assert!(matches!(
        old_observed.next().await,
        Some(Frame::Observed { .. })
    ));
    let mut new = Client::connect_as(&relay, key).await;
    let reason = tokio::time::timeout(WAIT, old_observed.conn.closed())
        .await
        .expect("old connection closed");
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == CLOSE_REPLACED.into()),
        "{reason:?}"
    );
    let mut other = Client::connect(&relay).await;
    other.send_to(new.id(), b"to the new one").await;
    assert_eq!(
        new.next_packet().await,
        (other.id(), Bytes::from_static(b"to the new one"))
    );
    assert_eq!(relay.metrics.clients(), 2);
    relay.stop().await;
}

#[tokio::test]
async fn packets_over_the_rate_are_dropped() {
    let relay = Running::start(RelayConfig {
        packets_per_sec: 20,
        burst_secs: 1,
        ..RelayConfig::default()
    });
    let mut alice = Client::connect(&relay).await;
    let mut bob = Client::connect(&relay).await;
    for _ in 0..200 {
        alice.send_to(bob.id(), b"flood").await;
    }
    alice.send_to(bob.id(), b"flood").await;
    // Wait until the relay has read everything alice sent.
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.metrics.forwarded_packets() + relay.metrics.dropped_rate_limited() < 201
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let forwarded = relay.metrics.forwarded_packets();
    assert!(
        (20..=40).contains(&forwarded),
        "the burst and a little refill pass: {forwarded}"
    );
    assert_eq!(relay.metrics.dropped_rate_limited(), 201 - forwarded);
    // Bob gets exactly what was forwarded.
    for _ in 0..forwarded {
        bob.next_packet().await;
    }
    relay.stop().await;
}

#[tokio::test]
async fn the_relay_refuses_nodes_past_its_cap() {
    let relay = Running::start(RelayConfig {
        max_clients: 1,
        ..RelayConfig::default()
    });
    let mut first = Client::connect(&relay).await;
    assert!(matches!(first.next().await, Some(Frame::Observed { .. })));
    let endpoint = client_endpoint();
    let second = endpoint
        .connect_with(
            client_config(&SecretKey::generate(), relay.id, ALPN),
            relay.addr,
            tls::SERVER_NAME,
        )
        .expect("connect")
        .await;
    assert!(second.is_err(), "refused before the handshake");
    assert_eq!(relay.metrics.clients(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn idle_nodes_are_dropped_and_punch_reports_are_counted() {
    let relay = Running::start(RelayConfig {
        idle_timeout: Duration::from_millis(500),
        ..RelayConfig::default()
    });
    // This client sends no keep-alives: it goes silent after its first frame.
    let mut idle = Client::connect(&relay).await;
    idle.write(Frame::PunchReport {
        attempts: 3,
        successes: 1,
    })
    .await;
    assert!(matches!(idle.next().await, Some(Frame::Observed { .. })));
    tokio::time::timeout(WAIT, idle.conn.closed())
        .await
        .expect("the idle connection is closed");
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.metrics.clients() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(relay.metrics.clients(), 0);
    assert_eq!(relay.metrics.punch_successes(), 1);
    let mut text = String::new();
    relay.metrics.render(&mut text);
    assert!(text.contains("relay_punch_attempts_total 3"), "{text}");
    assert!(text.contains("relay_clients 0"), "{text}");
    relay.stop().await;
}

#[tokio::test]
async fn a_node_sending_relay_frames_is_disconnected() {
    let relay = Running::start(RelayConfig::default());
    let mut mallory = Client::connect(&relay).await;
    let victim = *SecretKey::generate().public().as_bytes();
    mallory
        .write(Frame::Recv {
            src: victim,
            packet: Bytes::from_static(b"forged"),
        })
        .await;
    let reason = tokio::time::timeout(WAIT, mallory.conn.closed())
        .await
        .expect("closed");
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == CLOSE_PROTOCOL.into()),
        "{reason:?}"
    );
    relay.stop().await;
}
