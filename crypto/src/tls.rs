//! The TLS binding between a node's key and its QUIC connections.
//!
//! A node presents a self-signed certificate whose SubjectPublicKeyInfo is its own ed25519
//! key. Nothing else in the certificate is trusted. Both verifiers enforce:
//!
//! - exactly one certificate (no chain);
//! - its key is ed25519 (32 bytes, a valid point);
//! - the TLS 1.3 CertificateVerify signature verifies with that key (so the peer holds the
//!   secret key), and only TLS 1.3 with the ed25519 signature scheme is accepted;
//! - the peer's NodeId is that key. The dialer's verifier also checks it equals the NodeId
//!   the dialer expects, and records the mismatch so the dialer can report both ids.

use std::sync::{Arc, LazyLock, Mutex};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    sign::{CertifiedKey, SingleCertAndKey},
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::{NodeId, PublicKey, SecretKey};

/// The TLS server name a dialer sends. Identity comes from the key, not from the name.
pub const SERVER_NAME: &str = "p2p-node.invalid";

/// Errors building TLS configuration from a node key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("encoding the node key as PKCS#8 failed")]
    Pkcs8,
    #[error("building the self-signed certificate failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("building the TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a peer's certificate does not identify a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCertError {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("peer presented a chain of {0} certificates; exactly one is allowed")]
    Chain(usize),
    #[error("peer certificate is not valid DER X.509")]
    Malformed,
    #[error("peer certificate key is not ed25519")]
    NotEd25519,
    #[error("peer certificate key is not a valid ed25519 key")]
    InvalidKey,
}

/// The dialed peer authenticated as another node than the one expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected peer {expected} but it authenticated as {actual}")]
pub struct UnexpectedPeer {
    pub expected: NodeId,
    pub actual: NodeId,
}

/// The ring crypto provider, shared by every configuration.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

/// The node's certificate and private key, ready for rustls.
#[derive(Debug)]
pub struct Certified {
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The certificate with its key loaded and checked against it, once: every
    /// configuration presents this, so a dial does not parse the key and the certificate
    /// again (tens of microseconds on a connection's critical path).
    loaded: Arc<SingleCertAndKey>,
}

impl Clone for Certified {
    fn clone(&self) -> Self {
        Self {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            loaded: self.loaded.clone(),
        }
    }
}

/// Makes the self-signed certificate for `secret`.
pub fn certify(secret: &SecretKey) -> Result<Certified, TlsError> {
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let doc = secret
        .signing_key()
        .to_pkcs8_der()
        .map_err(|_| TlsError::Pkcs8)?;
    let key = PrivatePkcs8KeyDer::from(doc.as_bytes().to_vec());
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, secret.public().to_string());
    let cert = params.self_signed(&key_pair)?;
    let cert = cert.der().clone();
    let loaded = CertifiedKey::from_der(
        vec![cert.clone()],
        PrivateKeyDer::Pkcs8(key.clone_key()),
        &crypto_provider(),
    )?;
    Ok(Certified {
        cert,
        key,
        loaded: Arc::new(SingleCertAndKey::from(loaded)),
    })
}

/// The NodeId a single certificate binds: its ed25519 SubjectPublicKeyInfo.
pub fn node_id_from_cert(cert: &CertificateDer<'_>) -> Result<NodeId, PeerCertError> {
    let (rest, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| PeerCertError::Malformed)?;
    if !rest.is_empty() {
        return Err(PeerCertError::Malformed);
    }
    let spki = &parsed.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519
        || spki.algorithm.parameters.is_some()
    {
        return Err(PeerCertError::NotEd25519);
    }
    PublicKey::try_from_slice(&spki.subject_public_key.data).map_err(|_| PeerCertError::InvalidKey)
}

/// The NodeId of a peer from the chain it presented, enforcing "exactly one certificate".
pub fn node_id_from_chain(chain: &[CertificateDer<'_>]) -> Result<NodeId, PeerCertError> {
    match chain {
        [] => Err(PeerCertError::NoCertificate),
        [cert] => node_id_from_cert(cert),
        more => Err(PeerCertError::Chain(more.len())),
    }
}

fn to_rustls(e: PeerCertError) -> rustls::Error {
    let ce = match e {
        PeerCertError::NoCertificate => return rustls::Error::NoCertificatesPresented,
        PeerCertError::Malformed => CertificateError::BadEncoding,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

fn verify_ed25519(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let id = node_id_from_cert(cert).map_err(to_rustls)?;
    if id.verify_raw(message, dss.signature()) {
        Ok(HandshakeSignatureValid::assertion())
    } else {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::BadSignature,
        ))
    }
}

fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

/// Dialer side: verifies that the server is exactly the node `expected`.
#[derive(Debug)]
pub struct ServerVerifier {
    expected: NodeId,
    mismatch: Mutex<Option<NodeId>>,
}

impl ServerVerifier {
    pub fn new(expected: NodeId) -> Arc<Self> {
        Arc::new(Self {
            expected,
            mismatch: Mutex::new(None),
        })
    }

    /// The NodeId the server authenticated as, when it was not the expected one.
    pub fn mismatch(&self) -> Option<UnexpectedPeer> {
        let actual = (*self.mismatch.lock().unwrap_or_else(|e| e.into_inner()))?;
        Some(UnexpectedPeer {
            expected: self.expected,
            actual,
        })
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(to_rustls(PeerCertError::Chain(1 + intermediates.len())));
        }
        let actual = node_id_from_cert(end_entity).map_err(to_rustls)?;
        if actual != self.expected {
            *self.mismatch.lock().unwrap_or_else(|e| e.into_inner()) = Some(actual);
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(UnexpectedPeer {
                    expected: self.expected,
                    actual,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Acceptor side: requires a client certificate and checks its binding. The caller's
/// NodeId is then read from the connection with [`node_id_from_chain`].
#[derive(Debug, Default)]
pub struct ClientVerifier;

impl ClientVerifier {
    pub fn new() -> Arc<Self> {
        Arc::new(Self)
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(to_rustls(PeerCertError::Chain(1 + intermediates.len())));
        }
        node_id_from_cert(end_entity).map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// A rustls server configuration (TLS 1.3 only) presenting `certified` and requiring a
/// client certificate bound to the client's NodeId.
pub fn server_config(certified: &Certified) -> Result<rustls::ServerConfig, TlsError> {
    Ok(
        rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(ClientVerifier::new())
            .with_cert_resolver(certified.loaded.clone()),
    )
}

/// A rustls client configuration (TLS 1.3 only) presenting `certified` and accepting only
/// the server node the given verifier expects.
pub fn client_config(
    certified: &Certified,
    verifier: Arc<ServerVerifier>,
) -> Result<rustls::ClientConfig, TlsError> {
    Ok(
        rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(certified.loaded.clone()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_binds_the_node_key() {
        let sk = SecretKey::generate();
        let c = certify(&sk).expect("certifies");
        assert_eq!(node_id_from_cert(&c.cert).expect("parses"), sk.public());
        assert_eq!(
            node_id_from_chain(&[c.cert.clone(), c.cert.clone()]),
            Err(PeerCertError::Chain(2))
        );
        assert_eq!(node_id_from_chain(&[]), Err(PeerCertError::NoCertificate));
    }

    #[test]
    fn non_ed25519_certificate_is_refused() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .expect("params")
            .self_signed(&kp)
            .expect("cert");
        assert_eq!(
            node_id_from_cert(cert.der()),
            Err(PeerCertError::NotEd25519)
        );
        assert_eq!(
            node_id_from_cert(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            Err(PeerCertError::Malformed)
        );
    }

    /// The `PeerCertError` inside a verifier's refusal.
    fn peer_cert_error(e: rustls::Error) -> PeerCertError {
        match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner
                .downcast_ref::<PeerCertError>()
                .cloned()
                .expect("a PeerCertError"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn both_verifiers_refuse_a_chain_and_count_it() {
        let sk = SecretKey::generate();
        let cert = certify(&sk).expect("certifies").cert;
        let now = UnixTime::now();
        let name = ServerName::try_from(SERVER_NAME).expect("name");
        for extra in 1..=2usize {
            let intermediates = vec![cert.clone(); extra];
            let server = ServerVerifier::new(sk.public())
                .verify_server_cert(&cert, &intermediates, &name, &[], now)
                .expect_err("a chain");
            assert_eq!(peer_cert_error(server), PeerCertError::Chain(1 + extra));
            let client = ClientVerifier::new()
                .verify_client_cert(&cert, &intermediates, now)
                .expect_err("a chain");
            assert_eq!(peer_cert_error(client), PeerCertError::Chain(1 + extra));
        }
        // A single certificate passes both.
        assert!(ServerVerifier::new(sk.public())
            .verify_server_cert(&cert, &[], &name, &[], now)
            .is_ok());
        assert!(ClientVerifier::new()
            .verify_client_cert(&cert, &[], now)
            .is_ok());
    }

    /// The node's certificate with its SubjectPublicKeyInfo's algorithm identifier (the
    /// ed25519 OID, no parameters) replaced by `algorithm` (the DER of an
    /// AlgorithmIdentifier's contents), the lengths around it fixed up.
    fn with_spki_algorithm(algorithm: &[u8]) -> (CertificateDer<'static>, NodeId) {
        let sk = SecretKey::from_bytes(&[42; 32]);
        let der = certify(&sk).expect("certifies").cert.to_vec();
        let spki_head = [
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21,
        ];
        let at = der
            .windows(spki_head.len())
            .position(|w| w == spki_head)
            .expect("the certificate holds an ed25519 SubjectPublicKeyInfo");
        let grow = algorithm.len() - 5;
        let mut out = der[..at].to_vec();
        out.extend_from_slice(&[0x30, 0x2a + grow as u8, 0x30, algorithm.len() as u8]);
        out.extend_from_slice(algorithm);
        out.extend_from_slice(&der[at + 9..]);
        // Certificate and TBSCertificate are SEQUENCEs with two-byte long-form lengths.
        for len_at in [2, 6] {
            assert_eq!(out[len_at - 1], 0x82);
            let len = u16::from_be_bytes([out[len_at], out[len_at + 1]]) + grow as u16;
            out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
        }
        (CertificateDer::from(out), sk.public())
    }

    #[test]
    fn only_the_bare_ed25519_algorithm_identifier_is_accepted() {
        // The fix-up itself: the unchanged identifier gives back the node's key.
        let (same, id) = with_spki_algorithm(&[0x06, 0x03, 0x2b, 0x65, 0x70]);
        assert_eq!(node_id_from_cert(&same), Ok(id));
        // The ed25519 OID with (NULL) parameters.
        let (with_params, _) = with_spki_algorithm(&[0x06, 0x03, 0x2b, 0x65, 0x70, 0x05, 0x00]);
        assert_eq!(
            node_id_from_cert(&with_params),
            Err(PeerCertError::NotEd25519)
        );
        // An X25519 key (OID 1.3.101.110) of the same 32 bytes, without parameters.
        let (x25519, _) = with_spki_algorithm(&[0x06, 0x03, 0x2b, 0x65, 0x6e]);
        assert_eq!(node_id_from_cert(&x25519), Err(PeerCertError::NotEd25519));
    }
}
