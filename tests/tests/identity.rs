//! The identity binding, end to end over QUIC on loopback: the NodeId authenticated in the
//! handshake is exactly the ed25519 key of the peer, and every way of faking it fails.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use p2p_crypto::{
    tls::{self, ServerVerifier},
    SecretKey,
};
use p2p_node::{
    endpoint::{AcceptError, ConnectError},
    wire::ALPN,
    Endpoint,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::{
    client::ResolvesClientCert,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::ResolvesServerCert,
    sign::CertifiedKey,
    SignatureScheme,
};

const DEADLINE: Duration = Duration::from_secs(10);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn node() -> (SecretKey, Endpoint) {
    let sk = SecretKey::generate();
    let ep = Endpoint::builder(sk.clone())
        .bind_addr(loopback())
        .bind()
        .await
        .expect("bind");
    (sk, ep)
}

#[tokio::test]
async fn two_endpoints_see_each_others_node_id() {
    let (a_sk, a) = node().await;
    let (b_sk, b) = node().await;
    let b_addr = b.local_addr().expect("addr");
    let accept = tokio::spawn(async move {
        let incoming = b.accept().await.expect("incoming");
        let conn = incoming.accept().await.expect("accepted");
        (conn, b)
    });
    let conn = tokio::time::timeout(DEADLINE, a.connect(b_addr, b_sk.public()))
        .await
        .expect("in time")
        .expect("connects");
    assert_eq!(conn.remote_node_id(), b_sk.public());
    let (server_side, _b) = tokio::time::timeout(DEADLINE, accept)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!(server_side.remote_node_id(), a_sk.public());
    assert_eq!(server_side.remote_node_id(), a.node_id());
}

#[tokio::test]
async fn dialing_with_wrong_expected_node_id_fails_naming_both() {
    let (_a_sk, a) = node().await;
    let (b_sk, b) = node().await;
    let b_addr = b.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Some(incoming) = b.accept().await {
            let _ = incoming.accept().await;
        }
    });
    let wrong = SecretKey::generate().public();
    let err = tokio::time::timeout(DEADLINE, a.connect(b_addr, wrong))
        .await
        .expect("in time")
        .expect_err("must fail");
    match &err {
        ConnectError::UnexpectedPeer {
            expected, actual, ..
        } => {
            assert_eq!(*expected, wrong);
            assert_eq!(*actual, b_sk.public());
        }
        other => panic!("wrong error: {other}"),
    }
    let text = err.to_string();
    assert!(text.contains(&wrong.to_string()), "{text}");
    assert!(text.contains(&b_sk.public().to_string()), "{text}");
}

/// A client or server certificate + signing key, possibly mismatched, for hostile peers.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn signing_key(der: &PrivatePkcs8KeyDer<'static>) -> Arc<dyn rustls::sign::SigningKey> {
    tls::crypto_provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(der.clone_key()))
        .expect("loads key")
}

/// Certificate of key 1, but the handshake is signed with key 2.
fn mismatched_identity() -> (SecretKey, CertifiedKey) {
    let claimed = SecretKey::generate();
    let actual = SecretKey::generate();
    let claimed_cert = tls::certify(&claimed).expect("cert");
    let actual_cert = tls::certify(&actual).expect("cert");
    (
        claimed,
        CertifiedKey::new(vec![claimed_cert.cert], signing_key(&actual_cert.key)),
    )
}

fn ecdsa_identity() -> CertifiedKey {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let cert = rcgen::CertificateParams::new(vec![tls::SERVER_NAME.into()])
        .expect("params")
        .self_signed(&kp)
        .expect("cert");
    let key = PrivatePkcs8KeyDer::from(kp.serialize_der());
    CertifiedKey::new(vec![cert.der().clone()], signing_key(&key))
}

fn two_cert_chain() -> CertifiedKey {
    let sk = SecretKey::generate();
    let c = tls::certify(&sk).expect("cert");
    let other = tls::certify(&SecretKey::generate()).expect("cert");
    CertifiedKey::new(vec![c.cert, other.cert], signing_key(&c.key))
}

/// A raw quinn client, presenting `identity` (or nothing), dialing the honest node.
async fn hostile_dial(target: &Endpoint, identity: Option<CertifiedKey>) {
    let provider = tls::crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(ServerVerifier::new(target.node_id()));
    let mut cfg = match identity {
        Some(id) => builder.with_client_cert_resolver(Arc::new(Fixed(Arc::new(id)))),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let client = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(cfg).expect("quic config"),
    ));
    let mut ep = quinn::Endpoint::client(loopback()).expect("client endpoint");
    ep.set_default_client_config(client);
    let addr = target.local_addr().expect("addr");
    // From the client's side the TLS 1.3 handshake may look complete before the server
    // has judged its certificate; the verdict that matters is the acceptor's.
    if let Ok(connecting) = ep.connect(addr, tls::SERVER_NAME) {
        tokio::spawn(async move {
            let _keep = ep;
            if let Ok(conn) = connecting.await {
                let _ = conn.closed().await;
            }
        });
    }
}

async fn assert_acceptor_refuses(identity: Option<CertifiedKey>) -> AcceptError {
    let (_sk, honest) = node().await;
    hostile_dial(&honest, identity).await;
    let incoming = tokio::time::timeout(DEADLINE, honest.accept())
        .await
        .expect("an attempt arrives")
        .expect("endpoint open");
    tokio::time::timeout(DEADLINE, incoming.accept())
        .await
        .expect("handshake ends in time")
        .expect_err("the acceptor must refuse this caller")
}

#[tokio::test]
async fn client_whose_certificate_key_is_not_its_signing_key_is_refused() {
    let (_claimed, identity) = mismatched_identity();
    assert_acceptor_refuses(Some(identity)).await;
}

#[tokio::test]
async fn client_with_non_ed25519_certificate_is_refused() {
    assert_acceptor_refuses(Some(ecdsa_identity())).await;
}

#[tokio::test]
async fn client_with_chain_of_two_certificates_is_refused() {
    assert_acceptor_refuses(Some(two_cert_chain())).await;
}

#[tokio::test]
async fn client_presenting_no_certificate_is_refused() {
    assert_acceptor_refuses(None).await;
}

/// A raw quinn server presenting `identity`; returns its address.
fn hostile_server(identity: CertifiedKey) -> (quinn::Endpoint, SocketAddr) {
    let mut cfg = rustls::ServerConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(tls::ClientVerifier::new())
        .with_cert_resolver(Arc::new(Fixed(Arc::new(identity))));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let server = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(cfg).expect("quic config"),
    ));
    let ep = quinn::Endpoint::server(server, loopback()).expect("server");
    let addr = ep.local_addr().expect("addr");
    let accept_ep = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept_ep.accept().await {
            let _ = incoming.await;
        }
    });
    (ep, addr)
}

#[tokio::test]
async fn server_whose_certificate_key_is_not_its_signing_key_is_refused() {
    let (claimed, identity) = mismatched_identity();
    let (_server, addr) = hostile_server(identity);
    let (_sk, dialer) = node().await;
    // The dialer expects exactly the key in the certificate, yet the server cannot sign
    // with it: the handshake must fail.
    let err = tokio::time::timeout(DEADLINE, dialer.connect(addr, claimed.public()))
        .await
        .expect("in time")
        .expect_err("must fail");
    assert!(matches!(err, ConnectError::Connection { .. }), "{err}");
}

#[tokio::test]
async fn server_with_non_ed25519_or_chained_certificate_is_refused() {
    for identity in [ecdsa_identity(), two_cert_chain()] {
        let (_server, addr) = hostile_server(identity);
        let (_sk, dialer) = node().await;
        let err = tokio::time::timeout(
            DEADLINE,
            dialer.connect(addr, SecretKey::generate().public()),
        )
        .await
        .expect("in time")
        .expect_err("must fail");
        assert!(
            matches!(err, ConnectError::Connection { .. }),
            "unexpected error: {err}"
        );
    }
}

#[tokio::test]
async fn certificate_der_of_node_is_single_and_ed25519() {
    let sk = SecretKey::generate();
    let c = tls::certify(&sk).expect("cert");
    let chain: Vec<CertificateDer<'static>> = vec![c.cert];
    assert_eq!(tls::node_id_from_chain(&chain).expect("id"), sk.public());
}
