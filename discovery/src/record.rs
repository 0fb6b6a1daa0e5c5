//! Signed discovery records and their validation.
//!
//! A record is a plain struct, encoded with postcard; the postcard bytes are signed with
//! the node's ed25519 key under a per-kind [`Domain`] tag. Those exact bytes travel (in
//! base64url) beside the signature, so a verifier checks the signature over what it
//! received and only then decodes it. Nothing outside the signed bytes is trusted.

use std::net::SocketAddr;

use p2p_crypto::{Domain, MailboxPublicKey, NodeId, SecretKey, Signature};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Largest encoded record accepted, in bytes (a presence record with 16 IPv6
/// addresses and a 32-character name is well under 1 KiB).
pub const MAX_RECORD_BYTES: usize = 2048;
/// Most addresses one presence record may carry.
pub const MAX_ADDRS: usize = 16;
/// Longest name, in characters (names are ASCII).
pub const MAX_NAME_LEN: usize = 32;
/// Smallest presence TTL accepted, in seconds.
pub const MIN_TTL_SECS: u32 = 10;
/// Largest presence TTL accepted, in seconds.
pub const MAX_TTL_SECS: u32 = 3600;

/// Why a record (or a name) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("record is {len} bytes, more than the {max} allowed")]
    TooLarge { len: usize, max: usize },
    #[error("record is not valid base64url: {0}")]
    Encoding(String),
    #[error("record does not decode: {0}")]
    Decode(String),
    #[error("record has {0} trailing bytes after its encoding")]
    TrailingBytes(usize),
    #[error("invalid name {name:?}: names are 1 to 32 characters of a-z, 0-9, '_' and '-'")]
    InvalidName { name: String },
    #[error("record carries {count} addresses, more than the {max} allowed")]
    TooManyAddrs { count: usize, max: usize },
    #[error("TTL of {ttl_secs} s is outside {min}..={max} s")]
    TtlOutOfRange { ttl_secs: u32, min: u32, max: u32 },
    #[error("signature does not verify for node {node_id}")]
    BadSignature { node_id: NodeId },
    #[error("record is for node {got}, expected {expected}")]
    NodeMismatch { expected: NodeId, got: NodeId },
    #[error("record is for name {got:?}, expected {expected:?}")]
    NameMismatch { expected: String, got: String },
    #[error("the response carries no {0} record")]
    Missing(&'static str),
}

/// Checks a name: 1 to [`MAX_NAME_LEN`] characters of `[a-z0-9_-]`.
///
/// Names are compared byte for byte, so only the lowercase form is valid; callers that
/// accept user input may lowercase it first.
pub fn validate_name(name: &str) -> Result<(), RecordError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(RecordError::InvalidName {
            name: name.chars().take(MAX_NAME_LEN + 8).collect(),
        })
    }
}

/// A kind of signed record.
pub trait Record: Serialize + DeserializeOwned + Clone {
    /// The signature domain of this kind.
    const DOMAIN: Domain;
    /// The node whose key must have signed the record.
    fn signer(&self) -> NodeId;
    /// Checks the record's own bounds (name syntax, address count, TTL).
    fn validate(&self) -> Result<(), RecordError>;
}

/// "This node is online at these addresses": published by announce (login) and renew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub node_id: NodeId,
    /// The name the node claimed, if any (the server only accepts a name the same key
    /// has claimed).
    pub name: Option<String>,
    /// QUIC addresses. An unspecified IP (`0.0.0.0` / `::`) means "the address you see
    /// me at": the server returns the source IP it observed beside the record, and the
    /// client substitutes it (keeping the signed port). See [`crate::PeerInfo`].
    pub addrs: Vec<SocketAddr>,
    /// x25519 key to which mailbox envelopes for this node are sealed.
    pub mailbox_key: MailboxPublicKey,
    /// Milliseconds since the Unix epoch; strictly increasing per node (newer wins).
    pub timestamp_ms: u64,
    /// Seconds the record stays live unless renewed.
    pub ttl_secs: u32,
}

impl Record for PresenceRecord {
    const DOMAIN: Domain = Domain::PeerRecord;
    fn signer(&self) -> NodeId {
        self.node_id
    }
    fn validate(&self) -> Result<(), RecordError> {
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        if self.addrs.len() > MAX_ADDRS {
            return Err(RecordError::TooManyAddrs {
                count: self.addrs.len(),
                max: MAX_ADDRS,
            });
        }
        if !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(&self.ttl_secs) {
            return Err(RecordError::TtlOutOfRange {
                ttl_secs: self.ttl_secs,
                min: MIN_TTL_SECS,
                max: MAX_TTL_SECS,
            });
        }
        Ok(())
    }
}

/// "This name is mine": binds a name to a NodeId, first come first served. Kept
/// persistently by the server, so it also publishes the node's mailbox key while the
/// node is offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameClaim {
    pub name: String,
    pub node_id: NodeId,
    pub mailbox_key: MailboxPublicKey,
    /// Milliseconds since the Unix epoch; a re-claim must be newer to replace it.
    pub timestamp_ms: u64,
}

impl Record for NameClaim {
    const DOMAIN: Domain = Domain::NameClaim;
    fn signer(&self) -> NodeId {
        self.node_id
    }
    fn validate(&self) -> Result<(), RecordError> {
        validate_name(&self.name)
    }
}

/// "I am going offline" (logout). Timestamped like any record, so a captured one
/// cannot log the node out after its next announce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawal {
    pub node_id: NodeId,
    pub timestamp_ms: u64,
}

impl Record for Withdrawal {
    const DOMAIN: Domain = Domain::Withdraw;
    fn signer(&self) -> NodeId {
        self.node_id
    }
    fn validate(&self) -> Result<(), RecordError> {
        Ok(())
    }
}

/// A record together with the exact bytes that were signed and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<R> {
    record: R,
    bytes: Vec<u8>,
    signature: Signature,
}

impl<R: Record> Signed<R> {
    /// Validates, encodes and signs `record` with `secret`, which must be the key of
    /// the record's node.
    pub fn sign(secret: &SecretKey, record: R) -> Result<Self, RecordError> {
        record.validate()?;
        if secret.public() != record.signer() {
            return Err(RecordError::NodeMismatch {
                expected: record.signer(),
                got: secret.public(),
            });
        }
        let bytes = postcard::to_stdvec(&record).map_err(|e| RecordError::Decode(e.to_string()))?;
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge {
                len: bytes.len(),
                max: MAX_RECORD_BYTES,
            });
        }
        let signature = secret.sign(R::DOMAIN, &bytes);
        Ok(Self {
            record,
            bytes,
            signature,
        })
    }

    /// Checks size, decodes, validates and verifies signed bytes received from anyone.
    pub fn verify(bytes: Vec<u8>, signature: Signature) -> Result<Self, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge {
                len: bytes.len(),
                max: MAX_RECORD_BYTES,
            });
        }
        let (record, rest) = postcard::take_from_bytes::<R>(&bytes)
            .map_err(|e| RecordError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(RecordError::TrailingBytes(rest.len()));
        }
        record.validate()?;
        let node_id = record.signer();
        node_id
            .verify(R::DOMAIN, &bytes, &signature)
            .map_err(|_| RecordError::BadSignature { node_id })?;
        Ok(Self {
            record,
            bytes,
            signature,
        })
    }

    /// Verifies the JSON wire form.
    pub fn from_wire(wire: &SignedWire) -> Result<Self, RecordError> {
        if wire.record.len() > MAX_RECORD_BYTES * 4 / 3 + 4 {
            return Err(RecordError::TooLarge {
                len: wire.record.len() * 3 / 4,
                max: MAX_RECORD_BYTES,
            });
        }
        let bytes = b64_decode(&wire.record).map_err(RecordError::Encoding)?;
        Self::verify(bytes, wire.signature)
    }

    /// The JSON wire form.
    pub fn to_wire(&self) -> SignedWire {
        SignedWire {
            record: b64_encode(&self.bytes),
            signature: self.signature,
        }
    }

    /// The verified record.
    pub fn record(&self) -> &R {
        &self.record
    }

    /// The signed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }
}

/// The JSON form of a signed record: the base64url (no padding) postcard bytes and the
/// base32 signature over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedWire {
    pub record: String,
    pub signature: Signature,
}

/// Base64url without padding: the text form of binary blobs in the JSON API.
pub(crate) fn b64_encode(bytes: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(bytes)
}

pub(crate) fn b64_decode(text: &str) -> Result<Vec<u8>, String> {
    data_encoding::BASE64URL_NOPAD
        .decode(text.as_bytes())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(sk: &SecretKey) -> PresenceRecord {
        PresenceRecord {
            node_id: sk.public(),
            name: Some("alice".into()),
            addrs: vec!["0.0.0.0:4000".parse().expect("addr")],
            mailbox_key: sk.mailbox_secret().public(),
            timestamp_ms: 1,
            ttl_secs: 60,
        }
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let sk = SecretKey::generate();
        let signed = Signed::sign(&sk, presence(&sk)).expect("sign");
        let back = Signed::<PresenceRecord>::from_wire(&signed.to_wire()).expect("verify");
        assert_eq!(back.record(), signed.record());
    }

    #[test]
    fn wrong_domain_wrong_key_and_tamper_fail() {
        let sk = SecretKey::generate();
        let signed = Signed::sign(&sk, presence(&sk)).expect("sign");
        // Same bytes under another domain.
        let err = Signed::<Withdrawal>::verify(signed.bytes().to_vec(), *signed.signature());
        assert!(err.is_err());
        // Signed by another key.
        let other = SecretKey::generate();
        let sig = other.sign(Domain::PeerRecord, signed.bytes());
        assert!(matches!(
            Signed::<PresenceRecord>::verify(signed.bytes().to_vec(), sig),
            Err(RecordError::BadSignature { .. })
        ));
        // Trailing garbage.
        let mut bytes = signed.bytes().to_vec();
        bytes.push(0);
        assert!(matches!(
            Signed::<PresenceRecord>::verify(bytes, *signed.signature()),
            Err(RecordError::TrailingBytes(1))
        ));
    }

    #[test]
    fn bounds() {
        let sk = SecretKey::generate();
        let mut r = presence(&sk);
        r.addrs = vec!["1.2.3.4:5".parse().expect("addr"); MAX_ADDRS + 1];
        assert!(matches!(
            Signed::sign(&sk, r),
            Err(RecordError::TooManyAddrs { .. })
        ));
        let mut r = presence(&sk);
        r.ttl_secs = MAX_TTL_SECS + 1;
        assert!(Signed::sign(&sk, r).is_err());
        for bad in ["", "Alice", "a b", "é", &"x".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "bob_2", "x-y", &"z".repeat(32)] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
    }
}
