//! Node identity keys and their text forms.

use std::{
    fmt,
    str::FromStr,
    sync::{LazyLock, Mutex},
};

use data_encoding::{Encoding, Specification};
use ed25519_dalek::{SigningKey, VerifyingKey};
use hkdf::Hkdf;
use rand::rngs::OsRng;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::memo::Memo;

/// Lowercase RFC 4648 base32 without padding: the one text form of keys and ids.
static BASE32: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.encoding()
        .expect("static base32 specification is valid")
});

/// Number of characters in the text form of a [`NodeId`].
pub const NODE_ID_TEXT_LEN: usize = 52;

/// Error parsing the text or byte form of a key or id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseKeyError {
    #[error("expected {expected} characters of lowercase base32, got {got}")]
    Length { expected: usize, got: usize },
    #[error("not canonical lowercase base32 (a-z, 2-7, no padding)")]
    Encoding,
    #[error("not a valid ed25519 public key")]
    InvalidKey,
    #[error("expected {expected} bytes, got {got}")]
    ByteLength { expected: usize, got: usize },
}

fn decode_fixed<const N: usize>(s: &str) -> Result<[u8; N], ParseKeyError> {
    let expected = BASE32.encode_len(N);
    if s.len() != expected {
        return Err(ParseKeyError::Length {
            expected,
            got: s.len(),
        });
    }
    let bytes = BASE32
        .decode(s.as_bytes())
        .map_err(|_| ParseKeyError::Encoding)?;
    bytes.try_into().map_err(|_| ParseKeyError::Encoding)
}

/// Keys a [`ValidKeys`] remembers per generation (two generations): every record of a
/// discovery server at its default presence cap, with room to spare; the two together
/// are 7/8 of a power of two, so the full table has no empty half.
const VALID_KEYS_PER_GENERATION: usize = 57_344;

/// Keys that passed the point check before, so a key parsed again (the id of every
/// lookup, of every record that names it) is not checked again: checking a point takes
/// a field square root, about 15 µs here, a hash lookup well under one. A hit needs the
/// exact bytes that passed. Bounded: a [`Memo`] of two generations; when the newer is
/// full the older is dropped (at most about 5.5 MiB, used only as keys are seen: a node
/// that talks to a few peers holds a few entries).
struct ValidKeys {
    inner: Mutex<Memo<[u8; 32], ()>>,
}

/// The process's [`ValidKeys`], used by [`PublicKey::from_bytes`].
static VALID_KEYS: LazyLock<ValidKeys> =
    LazyLock::new(|| ValidKeys::with_capacity(VALID_KEYS_PER_GENERATION));

impl ValidKeys {
    fn with_capacity(per_generation: usize) -> Self {
        Self {
            inner: Mutex::new(Memo::with_capacity(per_generation)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memo<[u8; 32], ()>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `bytes` are a valid ed25519 point of large order.
    fn check(&self, bytes: &[u8; 32]) -> Result<(), ParseKeyError> {
        if self.holds(bytes) {
            return Ok(());
        }
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| ParseKeyError::InvalidKey)?;
        if key.is_weak() {
            return Err(ParseKeyError::InvalidKey);
        }
        self.lock().insert(*bytes, ());
        Ok(())
    }

    fn holds(&self, bytes: &[u8; 32]) -> bool {
        self.lock().contains(bytes)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// An ed25519 public key. As a node's identity it is called [`NodeId`].
///
/// Holds the 32 compressed bytes, checked on construction to be a valid, non-weak point,
/// so it is small, `Copy` and cheap to use as a map key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

/// The identity of a node: its ed25519 public key.
pub type NodeId = PublicKey;

impl PublicKey {
    /// Parses 32 bytes, checking that they are a valid ed25519 point of large order
    /// (bytes that passed before are not checked twice; see `ValidKeys`).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, ParseKeyError> {
        VALID_KEYS.check(bytes)?;
        Ok(Self(*bytes))
    }

    /// Parses a byte slice that must be exactly 32 bytes.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, ParseKeyError> {
        let arr: &[u8; 32] = bytes.try_into().map_err(|_| ParseKeyError::ByteLength {
            expected: 32,
            got: bytes.len(),
        })?;
        Self::from_bytes(arr)
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short form for display to people (the first 10 characters of the text form).
    /// Never use it to identify a node: only the full id does that.
    pub fn fingerprint(&self) -> String {
        let mut s = self.to_string();
        s.truncate(10);
        s
    }

    /// The dalek key. The bytes were validated on construction, so this only fails if
    /// that invariant was broken; callers treat failure as "does not verify".
    pub(crate) fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32.encode(self.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for PublicKey {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_bytes(&decode_fixed::<32>(s)?)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.as_bytes().serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            s.parse().map_err(de::Error::custom)
        } else {
            let bytes = <[u8; 32]>::deserialize(d)?;
            Self::from_bytes(&bytes).map_err(de::Error::custom)
        }
    }
}

/// An ed25519 secret key: a node's long-lived identity. Zeroized on drop, hidden in Debug.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut OsRng))
    }

    /// The key from its 32-byte seed.
    pub fn from_bytes(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed. Handle with care: it is the identity.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public half: this node's id.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// The x25519 secret used to open sealed mailbox envelopes, derived from the identity
    /// seed with HKDF so it needs no storage of its own.
    pub fn mailbox_secret(&self) -> MailboxSecretKey {
        let seed = self.to_bytes();
        let hk = Hkdf::<Sha256>::new(Some(b"p2p-node/v1/mailbox-key"), seed.as_ref());
        let mut out = Zeroizing::new([0u8; 32]);
        hk.expand(b"x25519", out.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        MailboxSecretKey(x25519_dalek::StaticSecret::from(*out))
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

/// x25519 secret for opening mailbox envelopes. Zeroized on drop, hidden in Debug.
#[derive(Clone)]
pub struct MailboxSecretKey(pub(crate) x25519_dalek::StaticSecret);

impl MailboxSecretKey {
    pub fn public(&self) -> MailboxPublicKey {
        MailboxPublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }
}

impl fmt::Debug for MailboxSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailboxSecretKey")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

/// An x25519 public key to which mailbox envelopes are sealed. Published inside a signed
/// discovery record, so it is bound to the node's identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MailboxPublicKey(pub [u8; 32]);

impl MailboxPublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for MailboxPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32.encode(&self.0))
    }
}

impl fmt::Debug for MailboxPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MailboxPublicKey({self})")
    }
}

impl FromStr for MailboxPublicKey {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_fixed::<32>(s).map(Self)
    }
}

impl Serialize for MailboxPublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for MailboxPublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            s.parse().map_err(de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(Self)
        }
    }
}

/// An ed25519 signature (64 bytes). Text form: lowercase base32 without padding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl Signature {
    pub fn to_bytes(&self) -> [u8; 64] {
        self.0
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32.encode(&self.0))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_fixed::<64>(s).map(Self)
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl de::Visitor<'_> for BytesVisitor {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                v.try_into()
                    .map(Signature)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            s.parse().map_err(de::Error::custom)
        } else {
            d.deserialize_bytes(BytesVisitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_text_round_trip_and_strictness() {
        let id = SecretKey::generate().public();
        let text = id.to_string();
        assert_eq!(text.len(), NODE_ID_TEXT_LEN);
        assert_eq!(text.parse::<NodeId>().expect("parses"), id);
        assert!(text.to_uppercase().parse::<NodeId>().is_err());
        assert!(text[..51].parse::<NodeId>().is_err());
        assert!(format!("{text}a").parse::<NodeId>().is_err());
        assert!(format!("{}=", &text[..51]).parse::<NodeId>().is_err());
        assert_eq!(id.fingerprint(), text[..10]);
    }

    #[test]
    fn non_canonical_trailing_bits_rejected() {
        let id = SecretKey::generate().public();
        let mut text = id.to_string().into_bytes();
        // 52 chars carry 260 bits for 256: the last char has 4 unused bits that must be 0.
        let last = text[51];
        let alphabet = b"abcdefghijklmnopqrstuvwxyz234567";
        let idx = alphabet
            .iter()
            .position(|c| *c == last)
            .expect("in alphabet");
        assert_eq!(
            idx & 0b1111,
            0,
            "canonical encoding leaves the unused bits zero"
        );
        text[51] = alphabet[idx | 1];
        let s = String::from_utf8(text).expect("ascii");
        assert_eq!(s.parse::<NodeId>(), Err(ParseKeyError::Encoding));
    }

    #[test]
    fn a_key_checked_before_passes_as_itself_only() {
        let keys = ValidKeys::with_capacity(8);
        let bytes = *SecretKey::generate().public().as_bytes();
        assert_eq!(keys.check(&bytes), Ok(()));
        assert!(keys.holds(&bytes));
        assert_eq!(keys.check(&bytes), Ok(()));
        // The identity (small order) fails, and so do bytes next to a valid key that are
        // not a point; none is remembered.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(keys.check(&identity), Err(ParseKeyError::InvalidKey));
        assert!(!keys.holds(&identity));
        let mut near = bytes;
        let not_points: Vec<[u8; 32]> = (0..=255u8)
            .filter_map(|b| {
                near[31] = b;
                VerifyingKey::from_bytes(&near).is_err().then_some(near)
            })
            .collect();
        assert!(!not_points.is_empty(), "some y has no x");
        for k in &not_points {
            assert_eq!(keys.check(k), Err(ParseKeyError::InvalidKey));
            assert!(!keys.holds(k));
        }
        assert!(keys.holds(&bytes));
        assert_eq!(keys.len(), 1);
        // Through the process's memo, the same answers.
        assert_eq!(
            PublicKey::from_bytes(&identity),
            Err(ParseKeyError::InvalidKey)
        );
        assert_eq!(
            PublicKey::from_bytes(&not_points[0]),
            Err(ParseKeyError::InvalidKey)
        );
    }

    #[test]
    fn the_memo_of_valid_keys_keeps_two_generations_at_most() {
        let keys = ValidKeys::with_capacity(4);
        let all: Vec<[u8; 32]> = (0..11)
            .map(|_| *SecretKey::generate().public().as_bytes())
            .collect();
        for k in &all {
            assert_eq!(keys.check(k), Ok(()));
        }
        // 11 keys through generations of 4: the last 3 in the newer, the 4 before them
        // in the older, the first 4 dropped (and checked again when they come back).
        assert_eq!(keys.len(), 7);
        assert!(all[4..].iter().all(|k| keys.holds(k)));
        assert!(all[..4].iter().all(|k| !keys.holds(k)));
        assert_eq!(keys.check(&all[0]), Ok(()));
        assert!(keys.holds(&all[0]));
    }

    #[test]
    fn the_memo_holds_the_ids_of_a_busy_discovery_server() {
        // More ids than a few thousand slots could hold (a direct-mapped memo of 4096
        // kept almost none of a server's 100 000): every one is remembered.
        let keys = ValidKeys::with_capacity(VALID_KEYS_PER_GENERATION);
        let ids: Vec<[u8; 32]> = (0..5000)
            .map(|_| *SecretKey::generate().public().as_bytes())
            .collect();
        for k in &ids {
            assert_eq!(keys.check(k), Ok(()));
        }
        assert!(ids.iter().all(|k| keys.holds(k)));
        assert_eq!(keys.len(), ids.len());
    }

    #[test]
    fn secret_debug_hides_secret() {
        let sk = SecretKey::from_bytes(&[7u8; 32]);
        let dbg = format!("{sk:?}");
        assert!(dbg.contains(&sk.public().to_string()));
        assert!(!dbg.contains("[7, 7"));
        assert!(!format!("{:?}", sk.mailbox_secret()).contains("[7, 7"));
    }

    #[test]
    fn serde_forms() {
        let id = SecretKey::generate().public();
        let bytes = postcard::to_allocvec(&id).expect("encodes");
        assert_eq!(bytes.len(), 32);
        assert_eq!(postcard::from_bytes::<NodeId>(&bytes).expect("decodes"), id);
    }
}
