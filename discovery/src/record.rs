//! Signed discovery records and their validation.
//!
//! A record is a plain struct, encoded with postcard; the postcard bytes are signed with
//! the node's ed25519 key under a per-kind [`Domain`] tag. Those exact bytes travel (in
//! base64url) beside the signature, so a verifier checks the signature over what it
//! received and only then decodes it. Nothing outside the signed bytes is trusted.

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use p2p_crypto::{memo::Memo, Domain, MailboxPublicKey, NodeId, SecretKey, Signature};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    #[error("record is not in its canonical encoding")]
    NonCanonical,
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

/// A relay a node can be reached through: the relay's identity (the key its certificate
/// presents) and the UDP address the node reaches it at.
///
/// Peers that share the relay (the same `node_id`) use their own connection to it and
/// ignore `addr`; others connect to `addr` and check that the relay there presents
/// `node_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelayRef {
    pub node_id: NodeId,
    pub addr: SocketAddr,
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
    /// The node's home relay, through which nodes that cannot reach `addrs` reach it.
    pub relay: Option<RelayRef>,
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
///
/// Immutable once verified, and shared by its clones: a clone is a reference count, so
/// a discovery server hands the same record to every lookup without copying (or even
/// reading) its fields.
pub struct Signed<R>(Arc<SignedParts<R>>);

struct SignedParts<R> {
    record: R,
    bytes: Vec<u8>,
    signature: Signature,
    /// Its JSON, made the first time it is asked for and shared by every clone: a
    /// discovery server answers each lookup of a record with the same text.
    json: OnceLock<Option<SignedJson>>,
}

impl<R> Clone for Signed<R> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

/// A signed record as JSON, in the two parts every entry that carries it is made of.
#[derive(Debug)]
pub(crate) struct SignedJson {
    /// `"record":"…","signature":"…"`: the wire form's fields, without its braces.
    pub(crate) wire_fields: Box<str>,
    /// The decoded record, a JSON object.
    pub(crate) decoded: Box<str>,
}

impl<R: fmt::Debug> fmt::Debug for Signed<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("record", &self.0.record)
            .field("bytes", &self.0.bytes)
            .field("signature", &self.0.signature)
            .finish_non_exhaustive()
    }
}

impl<R: PartialEq> PartialEq for Signed<R> {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.0, &other.0);
        a.record == b.record && a.bytes == b.bytes && a.signature == b.signature
    }
}

impl<R: Eq> Eq for Signed<R> {}

impl<R: Record> Signed<R> {
    /// Validates, encodes and signs `record` with `secret`, which must be the key of
    /// the record's node.
    ///
    /// The result holds the record as every verifier decodes it from the signed bytes,
    /// which is not always the record passed in: an IPv6 address's scope id and flow
    /// label are not encoded (they only mean something on the host that has them).
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
        // Decode what was signed rather than keep `record`, so the signer holds exactly
        // what others will see.
        Self::verify(bytes, signature)
    }

    /// Checks size, decodes, validates and verifies signed bytes received from anyone.
    /// The bytes must be the canonical encoding of the record they decode to.
    pub fn verify(bytes: Vec<u8>, signature: Signature) -> Result<Self, RecordError> {
        Self::verify_with(bytes, signature, None)
    }

    /// [`Signed::verify`], skipping the signature check for bytes and a signature `seen`
    /// has verified before (every other check runs), and remembering it in `seen` when
    /// it verifies.
    pub fn verify_seen(
        bytes: Vec<u8>,
        signature: Signature,
        seen: &VerifiedSignatures,
    ) -> Result<Self, RecordError> {
        Self::verify_with(bytes, signature, Some(seen))
    }

    /// [`Signed::from_wire`], skipping the signature check for bytes and a signature
    /// `seen` has verified before (every other check runs).
    pub fn from_wire_seen(
        wire: &SignedWire,
        seen: &VerifiedSignatures,
    ) -> Result<Self, RecordError> {
        Self::from_wire_with(wire, Some(seen))
    }

    fn from_wire_with(
        wire: &SignedWire,
        seen: Option<&VerifiedSignatures>,
    ) -> Result<Self, RecordError> {
        if wire.record.len() > MAX_RECORD_BYTES * 4 / 3 + 4 {
            return Err(RecordError::TooLarge {
                len: wire.record.len() * 3 / 4,
                max: MAX_RECORD_BYTES,
            });
        }
        let bytes = b64_decode(&wire.record).map_err(RecordError::Encoding)?;
        Self::verify_with(bytes, wire.signature, seen)
    }

    fn verify_with(
        bytes: Vec<u8>,
        signature: Signature,
        seen: Option<&VerifiedSignatures>,
    ) -> Result<Self, RecordError> {
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
        // One record, one byte string: postcard also accepts over-long varints, which
        // would let a signer publish the same record under different bytes.
        // (Encoded into a buffer of the largest size allowed: a longer encoding cannot
        // equal the bytes.)
        let mut canonical = [0u8; MAX_RECORD_BYTES];
        if postcard::to_slice(&record, &mut canonical).map_or(true, |c| *c != *bytes) {
            return Err(RecordError::NonCanonical);
        }
        let node_id = record.signer();
        if !seen.is_some_and(|s| s.contains(R::DOMAIN, &bytes, &signature)) {
            node_id
                .verify(R::DOMAIN, &bytes, &signature)
                .map_err(|_| RecordError::BadSignature { node_id })?;
            if let Some(s) = seen {
                s.insert(R::DOMAIN, &bytes, signature);
            }
        }
        Ok(Self(Arc::new(SignedParts {
            record,
            bytes,
            signature,
            json: OnceLock::new(),
        })))
    }

    /// Verifies the JSON wire form.
    pub fn from_wire(wire: &SignedWire) -> Result<Self, RecordError> {
        Self::from_wire_with(wire, None)
    }

    /// The JSON wire form.
    pub fn to_wire(&self) -> SignedWire {
        SignedWire {
            record: b64_encode(&self.0.bytes),
            signature: self.0.signature,
        }
    }

    /// The verified record.
    pub fn record(&self) -> &R {
        &self.0.record
    }

    /// The signed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0.bytes
    }

    /// The signature.
    pub fn signature(&self) -> &Signature {
        &self.0.signature
    }

    /// Its JSON, made once per record (`None` if it cannot be serialized, which the
    /// types here cannot fail at; callers then serialize the entry whole).
    pub(crate) fn json(&self) -> Option<&SignedJson> {
        self.0
            .json
            .get_or_init(|| {
                let wire = serde_json::to_string(&self.to_wire()).ok()?;
                let wire_fields = wire.strip_prefix('{')?.strip_suffix('}')?;
                Some(SignedJson {
                    wire_fields: wire_fields.into(),
                    decoded: serde_json::to_string(&self.0.record).ok()?.into(),
                })
            })
            .as_ref()
    }
}

/// How many verified signatures [`VerifiedSignatures::default`] keeps per generation.
pub const VERIFIED_SIGNATURES: usize = 4096;

/// Signatures this process has verified, each bound to the exact bytes and domain it
/// covers, so a record seen again (a repeated lookup's unchanged answer, a stored record
/// read back) is not verified again: an ed25519 verification costs tens of microseconds,
/// a SHA-256 of a record about one. An entry is the SHA-256 of the domain, the signature
/// and the bytes, so a hit needs the same signature over the same bytes in the same
/// domain, which is exactly what verified before, and proves as much. Bounded: a
/// [`Memo`] of two generations of the capacity given (40 bytes an entry); when the
/// newer is full the older is dropped.
#[derive(Debug)]
pub struct VerifiedSignatures {
    inner: std::sync::Mutex<Memo<[u8; 32], ()>>,
}

impl Default for VerifiedSignatures {
    fn default() -> Self {
        Self::with_capacity(VERIFIED_SIGNATURES)
    }
}

impl VerifiedSignatures {
    /// Remembers up to `per_generation` signatures per generation (two generations).
    pub fn with_capacity(per_generation: usize) -> Self {
        Self {
            inner: std::sync::Mutex::new(Memo::with_capacity(per_generation)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memo<[u8; 32], ()>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What an entry is: the domain's tag (length first, so no tag runs into the
    /// signature), the signature, then the bytes.
    fn entry(domain: Domain, bytes: &[u8], signature: &Signature) -> [u8; 32] {
        let tag = domain.tag();
        let mut h = Sha256::new();
        h.update([u8::try_from(tag.len()).unwrap_or(u8::MAX)]);
        h.update(tag);
        h.update(signature.0);
        h.update(bytes);
        h.finalize().into()
    }

    /// Whether `signature` over `bytes` in `domain` verified before.
    pub fn contains(&self, domain: Domain, bytes: &[u8], signature: &Signature) -> bool {
        let entry = Self::entry(domain, bytes, signature);
        self.lock().contains(&entry)
    }

    /// Records a verified record (one that came in and was checked on its way to be
    /// stored), so reading it back does not verify it again.
    pub fn remember<R: Record>(&self, signed: &Signed<R>) {
        self.insert(R::DOMAIN, signed.bytes(), *signed.signature());
    }

    /// Records that `signature` over `bytes` in `domain` verified.
    pub(crate) fn insert(&self, domain: Domain, bytes: &[u8], signature: Signature) {
        let entry = Self::entry(domain, bytes, &signature);
        self.lock().insert(entry, ());
    }

    /// How many signatures are remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
            relay: None,
        }
    }

    #[test]
    fn an_invalid_name_is_echoed_at_most_forty_characters_long() {
        let long = "X".repeat(100);
        match validate_name(&long) {
            Err(RecordError::InvalidName { name }) => assert_eq!(name, "X".repeat(40)),
            other => panic!("unexpected {other:?}"),
        }
        match validate_name("No") {
            Err(RecordError::InvalidName { name }) => assert_eq!(name, "No"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversized_records_are_refused_before_decoding() {
        let sig = Signature([0; 64]);
        // One byte over: refused by size, whatever the bytes.
        assert_eq!(
            Signed::<PresenceRecord>::verify(vec![0; MAX_RECORD_BYTES + 1], sig),
            Err(RecordError::TooLarge {
                len: MAX_RECORD_BYTES + 1,
                max: MAX_RECORD_BYTES
            })
        );
        // At the limit: decoded (and refused for what it is, not for its size).
        assert!(matches!(
            Signed::<PresenceRecord>::verify(vec![0; MAX_RECORD_BYTES], sig),
            Err(RecordError::Decode(_) | RecordError::TrailingBytes(_))
        ));
        // The wire form is refused by its length before base64 is decoded: text that is
        // not base64 at all gives the size error past the limit, the encoding error at it.
        let limit = MAX_RECORD_BYTES * 4 / 3 + 4;
        let over = SignedWire {
            record: "!".repeat(limit + 1),
            signature: sig,
        };
        assert_eq!(
            Signed::<PresenceRecord>::from_wire(&over),
            Err(RecordError::TooLarge {
                len: (limit + 1) * 3 / 4,
                max: MAX_RECORD_BYTES
            })
        );
        let at = SignedWire {
            record: "!".repeat(limit),
            signature: sig,
        };
        assert!(matches!(
            Signed::<PresenceRecord>::from_wire(&at),
            Err(RecordError::Encoding(_))
        ));
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let sk = SecretKey::generate();
        let signed = Signed::sign(&sk, presence(&sk)).expect("sign");
        let back = Signed::<PresenceRecord>::from_wire(&signed.to_wire()).expect("verify");
        assert_eq!(back.record(), signed.record());
    }

    #[test]
    fn a_signature_seen_before_vouches_only_for_the_same_bytes() {
        let sk = SecretKey::generate();
        let seen = VerifiedSignatures::default();
        let signed = Signed::sign(&sk, presence(&sk)).expect("sign");
        let wire = signed.to_wire();
        let first = Signed::<PresenceRecord>::from_wire_seen(&wire, &seen).expect("verifies");
        assert_eq!(first.record(), signed.record());
        assert!(seen.contains(Domain::PeerRecord, signed.bytes(), signed.signature()));
        assert!(!seen.contains(Domain::NameClaim, signed.bytes(), signed.signature()));
        let again = Signed::<PresenceRecord>::from_wire_seen(&wire, &seen).expect("seen");
        assert_eq!(again.record(), signed.record());
        assert_eq!(seen.len(), 1);
        // Other bytes (a valid record of the same key) under the remembered signature.
        let mut changed = presence(&sk);
        changed.ttl_secs += 1;
        let other = Signed::sign(&sk, changed).expect("sign");
        let forged = SignedWire {
            record: b64_encode(other.bytes()),
            signature: *signed.signature(),
        };
        assert!(matches!(
            Signed::<PresenceRecord>::from_wire_seen(&forged, &seen),
            Err(RecordError::BadSignature { .. })
        ));
        // A signature that failed is not remembered.
        assert_eq!(seen.len(), 1);
        // Bounded: two generations at most.
        for i in 0..(2 * VERIFIED_SIGNATURES + 10) {
            let mut sig = [0u8; 64];
            sig[..8].copy_from_slice(&(i as u64).to_le_bytes());
            seen.insert(Domain::PeerRecord, b"bytes", Signature(sig));
        }
        assert!(seen.len() <= 2 * VERIFIED_SIGNATURES);
        assert!(seen.len() > VERIFIED_SIGNATURES);
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
    fn signed_record_is_what_verifiers_decode() {
        // Regression (fuzz target discovery_record): a presence record with an IPv6 scope
        // id signed fine, but the scope id is not encoded, so the signer's `record()`
        // differed from what every verifier decoded from the same signed bytes.
        let sk = SecretKey::generate();
        let v4: SocketAddr = "151.27.196.63:11487".parse().expect("addr");
        let v6 = std::net::SocketAddrV6::new(
            "900c:ec91:84f1:9995:1d0d:9131:48a7:ec54"
                .parse()
                .expect("ip"),
            61251,
            0x2f3d_41a0,
            4_038_090_542,
        );
        let mut r = presence(&sk);
        r.name = None;
        r.addrs = vec![v4, SocketAddr::V6(v6)];
        r.timestamp_ms = 3_953_248_948_251_435_682;
        r.ttl_secs = 3408;
        let signed = Signed::sign(&sk, r).expect("sign");
        let verified =
            Signed::<PresenceRecord>::verify(signed.bytes().to_vec(), *signed.signature())
                .expect("verify");
        assert_eq!(signed, verified);
        let plain_v6 = std::net::SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0);
        assert_eq!(signed.record().addrs, vec![v4, SocketAddr::V6(plain_v6)]);
        assert_eq!(
            postcard::to_stdvec(signed.record()).expect("encodes"),
            signed.bytes()
        );
    }

    #[test]
    fn non_canonical_encoding_is_refused() {
        // The same withdrawal with its timestamp varint padded by a redundant 0x80 0x00:
        // postcard decodes both, so without a canonical check one record would have two
        // signed byte strings (and the store, which compares bytes, would see two claims).
        let sk = SecretKey::from_bytes(&[0x5a; 32]);
        let canonical = postcard::to_stdvec(&Withdrawal {
            node_id: sk.public(),
            timestamp_ms: 5,
        })
        .expect("encodes");
        assert_eq!(canonical.len(), 33);
        let mut overlong = canonical.clone();
        overlong[32] |= 0x80;
        overlong.push(0);
        let sig = sk.sign(Domain::Withdraw, &overlong);
        assert_eq!(
            Signed::<Withdrawal>::verify(overlong, sig),
            Err(RecordError::NonCanonical)
        );
        let sig = sk.sign(Domain::Withdraw, &canonical);
        assert!(Signed::<Withdrawal>::verify(canonical, sig).is_ok());
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
