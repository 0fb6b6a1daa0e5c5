//! Sealed envelopes for the offline mailbox.
//!
//! An envelope is readable only by its recipient and proves its sender:
//!
//! ```text
//! envelope = version (1) | ephemeral x25519 public key (32) | ChaCha20-Poly1305 ciphertext
//! key      = HKDF-SHA256(ikm = x25519(ephemeral, recipient mailbox key),
//!                        salt = ephemeral pub | recipient mailbox pub, info = "p2p-node/v1/seal")
//! plain    = sender NodeId (32) | signature (64) | payload
//! signed   = Domain::SealedEnvelope over ephemeral pub | recipient NodeId | recipient mailbox pub | payload
//! ```
//!
//! The key is used once (fresh ephemeral secret), so a fixed nonce is safe. The signature
//! binds the payload to this envelope and this recipient: it cannot be re-sealed to
//! someone else as if sent to them, and nobody without the sender's key can forge it.

use chacha20poly1305::{aead::Aead, ChaCha20Poly1305, KeyInit};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{Domain, MailboxPublicKey, NodeId, PublicKey, SecretKey, Signature};

const VERSION: u8 = 1;
const NONCE: [u8; 12] = [0u8; 12];
const TAG_LEN: usize = 16;
/// Bytes an envelope adds to its payload.
pub const OVERHEAD: usize = 1 + 32 + TAG_LEN + 32 + 64;

/// Why an envelope could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("envelope is too short ({0} bytes)")]
    Truncated(usize),
    #[error("unsupported envelope version {0}")]
    Version(u8),
    #[error("envelope key exchange produced a non-contributory secret")]
    WeakKey,
    #[error("envelope does not decrypt for this recipient (wrong recipient or tampered)")]
    Decrypt,
    #[error("envelope names an invalid sender key")]
    InvalidSender,
    #[error("envelope sender signature does not verify")]
    BadSignature,
}

/// A successfully opened envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The authenticated sender.
    pub sender: NodeId,
    pub payload: Vec<u8>,
}

fn cipher(shared: &[u8; 32], eph: &[u8; 32], recipient_key: &MailboxPublicKey) -> ChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph);
    salt[32..].copy_from_slice(recipient_key.as_bytes());
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut key = Zeroizing::new([0u8; 32]);
    hk.expand(b"p2p-node/v1/seal", key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    ChaCha20Poly1305::new(key.as_ref().into())
}

fn signed_bytes(
    eph: &[u8; 32],
    recipient: &NodeId,
    key: &MailboxPublicKey,
    payload: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(96 + payload.len());
    m.extend_from_slice(eph);
    m.extend_from_slice(recipient.as_bytes());
    m.extend_from_slice(key.as_bytes());
    m.extend_from_slice(payload);
    m
}

/// Seals `payload` from `sender` to the node `recipient`, whose mailbox key is
/// `recipient_key` (taken from its signed discovery record).
pub fn seal(
    sender: &SecretKey,
    recipient: &NodeId,
    recipient_key: &MailboxPublicKey,
    payload: &[u8],
) -> Vec<u8> {
    let mut ephemeral = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, ephemeral.as_mut());
    seal_with_ephemeral(sender, recipient, recipient_key, payload, &ephemeral)
}

/// [`seal`] with a given ephemeral x25519 secret instead of a fresh random one: for the
/// test vectors of PROTOCOL.md. An envelope must never reuse an ephemeral secret (the
/// nonce is fixed), so everything else calls [`seal`].
#[doc(hidden)]
pub fn seal_with_ephemeral(
    sender: &SecretKey,
    recipient: &NodeId,
    recipient_key: &MailboxPublicKey,
    payload: &[u8],
    ephemeral: &[u8; 32],
) -> Vec<u8> {
    let eph_secret = x25519_dalek::StaticSecret::from(*ephemeral);
    let eph = x25519_dalek::PublicKey::from(&eph_secret).to_bytes();
    let shared = eph_secret.diffie_hellman(&x25519_dalek::PublicKey::from(recipient_key.0));
    let sig = sender.sign(
        Domain::SealedEnvelope,
        &signed_bytes(&eph, recipient, recipient_key, payload),
    );
    let mut plain = Zeroizing::new(Vec::with_capacity(96 + payload.len()));
    plain.extend_from_slice(sender.public().as_bytes());
    plain.extend_from_slice(&sig.0);
    plain.extend_from_slice(payload);
    let ct = cipher(shared.as_bytes(), &eph, recipient_key)
        .encrypt(&NONCE.into(), plain.as_slice())
        .expect("ChaCha20-Poly1305 encryption of in-memory data cannot fail");
    let mut out = Vec::with_capacity(33 + ct.len());
    out.push(VERSION);
    out.extend_from_slice(&eph);
    out.extend_from_slice(&ct);
    out
}

/// Opens an envelope addressed to `recipient`. Never panics, whatever the bytes.
pub fn open(recipient: &SecretKey, envelope: &[u8]) -> Result<Opened, SealError> {
    if envelope.len() < OVERHEAD {
        return Err(SealError::Truncated(envelope.len()));
    }
    if envelope[0] != VERSION {
        return Err(SealError::Version(envelope[0]));
    }
    let mut eph = [0u8; 32];
    eph.copy_from_slice(&envelope[1..33]);
    let mailbox = recipient.mailbox_secret();
    let my_key = mailbox.public();
    let shared = mailbox
        .0
        .diffie_hellman(&x25519_dalek::PublicKey::from(eph));
    if !shared.was_contributory() {
        return Err(SealError::WeakKey);
    }
    let plain = Zeroizing::new(
        cipher(shared.as_bytes(), &eph, &my_key)
            .decrypt(&NONCE.into(), &envelope[33..])
            .map_err(|_| SealError::Decrypt)?,
    );
    // Length is guaranteed by OVERHEAD, checked above.
    let sender = PublicKey::try_from_slice(&plain[..32]).map_err(|_| SealError::InvalidSender)?;
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&plain[32..96]);
    let payload = plain[96..].to_vec();
    sender
        .verify(
            Domain::SealedEnvelope,
            &signed_bytes(&eph, &recipient.public(), &my_key, &payload),
            &Signature(sig),
        )
        .map_err(|_| SealError::BadSignature)?;
    Ok(Opened { sender, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parties() -> (SecretKey, SecretKey) {
        (SecretKey::generate(), SecretKey::generate())
    }

    fn seal_to(sender: &SecretKey, to: &SecretKey, payload: &[u8]) -> Vec<u8> {
        seal(sender, &to.public(), &to.mailbox_secret().public(), payload)
    }

    #[test]
    fn round_trip() {
        let (a, b) = parties();
        let env = seal_to(&a, &b, b"hello offline world");
        let opened = open(&b, &env).expect("opens");
        assert_eq!(opened.sender, a.public());
        assert_eq!(opened.payload, b"hello offline world");
        assert_eq!(env.len(), OVERHEAD + opened.payload.len());
        assert_eq!(open(&b, &seal_to(&a, &b, b"")).expect("empty").payload, b"");
    }

    #[test]
    fn tampered_ciphertext_fails() {
        let (a, b) = parties();
        let env = seal_to(&a, &b, b"hello");
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x01;
            assert!(open(&b, &bad).is_err(), "flipping byte {i} must fail");
        }
        assert_eq!(open(&b, &env[..10]), Err(SealError::Truncated(10)));
    }

    #[test]
    fn wrong_recipient_fails() {
        let (a, b) = parties();
        let c = SecretKey::generate();
        let env = seal_to(&a, &b, b"for b only");
        assert_eq!(open(&c, &env), Err(SealError::Decrypt));
    }

    #[test]
    fn forged_sender_fails() {
        // Mallory seals a message but writes Alice's NodeId as the sender: she cannot make
        // Alice's signature, so opening fails.
        let (alice, bob) = parties();
        let mallory = SecretKey::generate();
        let bob_key = bob.mailbox_secret().public();
        let eph_secret = x25519_dalek::EphemeralSecret::random_from_rng(rand::rngs::OsRng);
        let eph = x25519_dalek::PublicKey::from(&eph_secret).to_bytes();
        let shared = eph_secret.diffie_hellman(&x25519_dalek::PublicKey::from(bob_key.0));
        let payload = b"i am alice";
        let sig = mallory.sign(
            Domain::SealedEnvelope,
            &signed_bytes(&eph, &bob.public(), &bob_key, payload),
        );
        let mut plain = alice.public().as_bytes().to_vec();
        plain.extend_from_slice(&sig.0);
        plain.extend_from_slice(payload);
        let ct = cipher(shared.as_bytes(), &eph, &bob_key)
            .encrypt(&NONCE.into(), plain.as_slice())
            .expect("encrypts");
        let mut env = vec![VERSION];
        env.extend_from_slice(&eph);
        env.extend_from_slice(&ct);
        assert_eq!(open(&bob, &env), Err(SealError::BadSignature));
    }

    #[test]
    fn envelope_for_one_recipient_cannot_be_resealed_to_another() {
        // Bob opens Alice's envelope and re-seals her signed payload to Carol: the signature
        // covers the recipient, so Carol rejects it.
        let (alice, bob) = parties();
        let carol = SecretKey::generate();
        let env = seal_to(&alice, &bob, b"secret for bob");
        let opened = open(&bob, &env).expect("bob opens");
        let carol_key = carol.mailbox_secret().public();
        let eph_secret = x25519_dalek::EphemeralSecret::random_from_rng(rand::rngs::OsRng);
        let eph = x25519_dalek::PublicKey::from(&eph_secret).to_bytes();
        let shared = eph_secret.diffie_hellman(&x25519_dalek::PublicKey::from(carol_key.0));
        let mut plain = Zeroizing::new(Vec::new());
        // Reuse Alice's signature bytes from Bob's envelope.
        let mailbox = bob.mailbox_secret();
        let bob_shared = mailbox.0.diffie_hellman(&x25519_dalek::PublicKey::from(
            <[u8; 32]>::try_from(&env[1..33]).expect("32"),
        ));
        let bob_plain = cipher(
            bob_shared.as_bytes(),
            &<[u8; 32]>::try_from(&env[1..33]).expect("32"),
            &mailbox.public(),
        )
        .decrypt(&NONCE.into(), &env[33..])
        .expect("decrypts");
        plain.extend_from_slice(&bob_plain[..96]);
        plain.extend_from_slice(&opened.payload);
        let ct = cipher(shared.as_bytes(), &eph, &carol_key)
            .encrypt(&NONCE.into(), plain.as_slice())
            .expect("encrypts");
        let mut resealed = vec![VERSION];
        resealed.extend_from_slice(&eph);
        resealed.extend_from_slice(&ct);
        assert_eq!(open(&carol, &resealed), Err(SealError::BadSignature));
    }
}
