//! Properties of the TLS binding: for random keys, a certificate authenticates exactly the
//! key in its SubjectPublicKeyInfo, and a peer that does not hold that key's secret never
//! authenticates as it, whoever signed the certificate.

use std::sync::Arc;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use p2p_crypto::tls::{
    certify, client_config, crypto_provider, node_id_from_cert, node_id_from_chain, server_config,
    Certified, PeerCertError, ServerVerifier, UnexpectedPeer, SERVER_NAME,
};
use p2p_crypto::{NodeId, SecretKey};
use proptest::prelude::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConnection, ServerConnection};

/// Two or three distinct keys from random seeds.
fn distinct_keys(n: usize) -> impl Strategy<Value = Vec<SecretKey>> {
    proptest::collection::vec(any::<[u8; 32]>(), n)
        .prop_filter("distinct keys", |seeds| {
            let mut ids: Vec<NodeId> = seeds
                .iter()
                .map(|s| SecretKey::from_bytes(s).public())
                .collect();
            ids.sort();
            ids.dedup();
            ids.len() == seeds.len()
        })
        .prop_map(|seeds| seeds.iter().map(SecretKey::from_bytes).collect())
}

fn pkcs8(key: &SecretKey) -> PrivatePkcs8KeyDer<'static> {
    let signing = ed25519_dalek::SigningKey::from_bytes(&key.to_bytes());
    let doc = signing.to_pkcs8_der().expect("pkcs8");
    PrivatePkcs8KeyDer::from(doc.as_bytes().to_vec())
}

/// `holder`'s certificate with the 32 key bytes in its SubjectPublicKeyInfo replaced by
/// `claimed`'s (the certificate's own signature no longer verifies, and nothing checks it).
fn swap_spki(
    cert: &CertificateDer<'_>,
    holder: &NodeId,
    claimed: &NodeId,
) -> CertificateDer<'static> {
    let der = cert.as_ref();
    let at = der
        .windows(32)
        .position(|w| w == holder.as_bytes())
        .expect("the certificate holds the key");
    let mut out = der.to_vec();
    out[at..at + 32].copy_from_slice(claimed.as_bytes());
    CertificateDer::from(out)
}

/// A well-formed certificate for `claimed`'s public key, issued and signed by `issuer`.
fn issued_by(issuer: &SecretKey, claimed: &SecretKey) -> CertificateDer<'static> {
    let alg = &rcgen::PKCS_ED25519;
    let issuer_key =
        rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8(issuer), alg).expect("issuer");
    let subject_key =
        rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8(claimed), alg).expect("subject");
    let issuer_cert = rcgen::CertificateParams::new(vec!["issuer.invalid".into()])
        .expect("params")
        .self_signed(&issuer_key)
        .expect("issuer cert");
    rcgen::CertificateParams::new(vec![SERVER_NAME.into()])
        .expect("params")
        .signed_by(&subject_key, &issuer_cert, &issuer_key)
        .expect("cert")
        .der()
        .clone()
}

/// A server presenting `chain` while signing the handshake with `key`'s secret (which
/// need not match the certificate).
fn server_presenting(
    chain: Vec<CertificateDer<'static>>,
    key: &SecretKey,
    base: &Certified,
) -> ServerConnection {
    let signer = crypto_provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(pkcs8(key)))
        .expect("signing key");
    let mut config = server_config(base).expect("server config");
    config.cert_resolver = Arc::new(SingleCertAndKey::from(CertifiedKey::new(chain, signer)));
    ServerConnection::new(Arc::new(config)).expect("server")
}

/// Runs a TLS 1.3 handshake in memory; the first error either side raises.
fn handshake(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
) -> Result<(), rustls::Error> {
    for _ in 0..32 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).expect("write to memory");
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).expect("read from memory");
            server.process_new_packets()?;
        }
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).expect("write to memory");
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("read from memory");
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

fn client_expecting(expected: NodeId, me: &Certified) -> (ClientConnection, Arc<ServerVerifier>) {
    let verifier = ServerVerifier::new(expected);
    let config = client_config(me, verifier.clone()).expect("client config");
    let name = ServerName::try_from(SERVER_NAME).expect("name");
    (
        ClientConnection::new(Arc::new(config), name).expect("client"),
        verifier,
    )
}

#[test]
fn the_acceptor_refuses_a_client_without_a_certificate() {
    let server_key = SecretKey::generate();
    let server_cert = certify(&server_key).expect("certifies");
    let server = || {
        ServerConnection::new(Arc::new(
            server_config(&server_cert).expect("server config"),
        ))
        .expect("server")
    };
    let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(ServerVerifier::new(server_key.public()))
        .with_no_client_auth();
    let name = ServerName::try_from(SERVER_NAME).expect("name");
    let mut client = ClientConnection::new(Arc::new(config), name).expect("client");
    let mut refusing = server();
    assert_eq!(
        handshake(&mut client, &mut refusing),
        Err(rustls::Error::NoCertificatesPresented)
    );
    assert!(refusing.peer_certificates().is_none());

    // With its certificate, the same client gets through.
    let client_key = SecretKey::generate();
    let (mut client, _) = client_expecting(
        server_key.public(),
        &certify(&client_key).expect("certifies"),
    );
    let mut accepting = server();
    assert_eq!(handshake(&mut client, &mut accepting), Ok(()));
    let chain = accepting.peer_certificates().expect("client certificate");
    assert_eq!(node_id_from_chain(chain), Ok(client_key.public()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn certificate_binds_exactly_its_key(keys in distinct_keys(2)) {
        let (a, b) = (&keys[0], &keys[1]);
        let cert = certify(a).expect("certify").cert;
        prop_assert_eq!(node_id_from_cert(&cert), Ok(a.public()));
        prop_assert_ne!(node_id_from_cert(&cert), Ok(b.public()));
        prop_assert_eq!(node_id_from_chain(std::slice::from_ref(&cert)), Ok(a.public()));
        let other = certify(b).expect("certify").cert;
        prop_assert_eq!(node_id_from_chain(&[cert, other]), Err(PeerCertError::Chain(2)));
        // Whoever signs it, a certificate names the key in its SubjectPublicKeyInfo.
        prop_assert_eq!(node_id_from_cert(&issued_by(a, b)), Ok(b.public()));
    }

    #[test]
    fn handshake_authenticates_both_ends(keys in distinct_keys(3)) {
        let (server_key, client_key, other) = (&keys[0], &keys[1], &keys[2]);
        let server_cert = certify(server_key).expect("certify");
        let client_cert = certify(client_key).expect("certify");

        let (mut client, verifier) = client_expecting(server_key.public(), &client_cert);
        let mut server = ServerConnection::new(Arc::new(server_config(&server_cert).expect("config")))
            .expect("server");
        prop_assert!(handshake(&mut client, &mut server).is_ok());
        prop_assert_eq!(verifier.mismatch(), None);
        let seen = node_id_from_chain(server.peer_certificates().expect("client cert"));
        prop_assert_eq!(seen, Ok(client_key.public()));

        // Expecting anyone else fails, naming both.
        let (mut client, verifier) = client_expecting(other.public(), &client_cert);
        let mut server = ServerConnection::new(Arc::new(server_config(&server_cert).expect("config")))
            .expect("server");
        prop_assert!(handshake(&mut client, &mut server).is_err());
        prop_assert_eq!(
            verifier.mismatch(),
            Some(UnexpectedPeer { expected: other.public(), actual: server_key.public() })
        );
    }

    #[test]
    fn a_certificate_for_another_key_never_authenticates(keys in distinct_keys(3)) {
        // The server holds `holder`'s secret but presents a certificate for `victim`'s
        // key: byte-swapped into its own certificate, or properly issued by itself.
        let (holder, victim, client_key) = (&keys[0], &keys[1], &keys[2]);
        let base = certify(holder).expect("certify");
        let client_cert = certify(client_key).expect("certify");
        // Control: the same server set-up with its own certificate does authenticate.
        let (mut client, _) = client_expecting(holder.public(), &client_cert);
        let mut server = server_presenting(vec![base.cert.clone()], holder, &base);
        prop_assert!(handshake(&mut client, &mut server).is_ok());
        for forged in [swap_spki(&base.cert, &holder.public(), &victim.public()), issued_by(holder, victim)] {
            prop_assert_eq!(node_id_from_cert(&forged), Ok(victim.public()));
            for expected in [victim.public(), holder.public()] {
                let (mut client, _) = client_expecting(expected, &client_cert);
                let mut server = server_presenting(vec![forged.clone()], holder, &base);
                prop_assert!(
                    handshake(&mut client, &mut server).is_err(),
                    "a server holding another key authenticated as {}", expected
                );
            }
        }
    }
}
