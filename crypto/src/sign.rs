//! Domain-separated signatures.
//!
//! Every signed message is `len(tag) || tag || bytes`, with one fixed tag per kind of
//! record, so a signature made for one purpose can never be replayed as another.

use ed25519_dalek::Signer;

use crate::{PublicKey, SecretKey, Signature};

/// The kinds of signed data; each has its own fixed tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Domain {
    /// A discovery presence record (announce / renew).
    PeerRecord,
    /// A name claim.
    NameClaim,
    /// A presence withdrawal (logout).
    Withdraw,
    /// An authenticated HTTP request (mailbox fetch / delete).
    Request,
    /// The sender's signature inside a sealed mailbox envelope.
    SealedEnvelope,
    /// A path probe between two nodes (ping, pong, call-me-maybe) for hole punching.
    PathProbe,
    /// A discovery server's advertisement on the LAN (the DNS-SD TXT record).
    LanAdvert,
}

impl Domain {
    /// The fixed tag prepended to the signed bytes.
    pub const fn tag(self) -> &'static [u8] {
        match self {
            Domain::PeerRecord => b"p2p-node/v1/peer-record",
            Domain::NameClaim => b"p2p-node/v1/name-claim",
            Domain::Withdraw => b"p2p-node/v1/withdraw",
            Domain::Request => b"p2p-node/v1/request",
            Domain::SealedEnvelope => b"p2p-node/v1/sealed-envelope",
            Domain::PathProbe => b"p2p-node/v1/path-probe",
            Domain::LanAdvert => b"p2p-node/v1/lan-advert",
        }
    }

    fn message(self, bytes: &[u8]) -> Vec<u8> {
        let tag = self.tag();
        let mut msg = Vec::with_capacity(1 + tag.len() + bytes.len());
        msg.push(u8::try_from(tag.len()).expect("tags are short"));
        msg.extend_from_slice(tag);
        msg.extend_from_slice(bytes);
        msg
    }
}

/// A signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signature does not verify for {signer}")]
pub struct SignatureError {
    pub signer: PublicKey,
}

impl SecretKey {
    /// Signs `bytes` in the given domain.
    pub fn sign(&self, domain: Domain, bytes: &[u8]) -> Signature {
        Signature(self.signing_key().sign(&domain.message(bytes)).to_bytes())
    }
}

impl PublicKey {
    /// Verifies a signature made by [`SecretKey::sign`] in the same domain (strict ed25519
    /// verification: no malleable or small-order forms).
    pub fn verify(
        &self,
        domain: Domain,
        bytes: &[u8],
        signature: &Signature,
    ) -> Result<(), SignatureError> {
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.verifying_key()
            .and_then(|k| k.verify_strict(&domain.message(bytes), &sig).ok())
            .ok_or(SignatureError { signer: *self })
    }

    /// Verifies a plain (not domain-separated) ed25519 signature, as TLS 1.3 uses.
    pub(crate) fn verify_raw(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        self.verifying_key()
            .is_some_and(|k| k.verify_strict(message, &sig).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_domain_separation() {
        let sk = SecretKey::generate();
        let sig = sk.sign(Domain::PeerRecord, b"hello");
        sk.public()
            .verify(Domain::PeerRecord, b"hello", &sig)
            .expect("verifies");
        assert!(sk
            .public()
            .verify(Domain::Withdraw, b"hello", &sig)
            .is_err());
        assert!(sk
            .public()
            .verify(Domain::PeerRecord, b"hellO", &sig)
            .is_err());
        let other = SecretKey::generate().public();
        assert_eq!(
            other.verify(Domain::PeerRecord, b"hello", &sig),
            Err(SignatureError { signer: other })
        );
    }
}
