//! Shared pieces of the fuzz targets: the input layout of each target (a mode byte, then
//! the mode's bytes), builders of structured values from `arbitrary` primitives, an
//! independent model of the key-file format, and the seed corpus.
//!
//! Every target reads its first byte as a mode (`byte % MODES`) and the rest as that
//! mode's input, so one target covers both raw bytes and structured values and the seed
//! files (written by `examples/gen_corpus.rs`) start with the mode they are meant for.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use arbitrary::{Arbitrary, Unstructured};
use chacha20poly1305::{aead::Aead, ChaCha20Poly1305, KeyInit};
use p2p_crypto::{MailboxPublicKey, NodeId, SecretKey};
use p2p_discovery::{NameClaim, PresenceRecord, Withdrawal};
use p2p_node::wire::{
    Ack, AckStatus, Body, ChatMessage, Conversation, Frame, MessageId, RejectCode, MAX_TEXT_LEN,
};
use sha2::{Digest, Sha256};

/// The fixed key of the targets: the recipient of envelopes, the signer of records.
pub fn fixed_key() -> SecretKey {
    SecretKey::from_bytes(&[0x5a; 32])
}

/// Another fixed key, for "wrong recipient / wrong signer" checks.
pub fn other_key() -> SecretKey {
    SecretKey::from_bytes(&[0xa5; 32])
}

/// Polls a future that never waits (readers over byte slices) to completion.
///
/// # Panics
/// If the future is pending, which a reader over a slice never is.
pub fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a reader over a byte slice never waits"),
    }
}

// ---------------------------------------------------------------------------------------
// frame_decode
// ---------------------------------------------------------------------------------------

/// Modes of `frame_decode`.
pub mod frame_mode {
    /// The rest is one frame payload for `wire::decode`.
    pub const PAYLOAD: u8 = 0;
    /// The rest is a byte stream of length-prefixed frames for `wire::read_frame`.
    pub const STREAM: u8 = 1;
    /// The rest drives `arbitrary` to build a `Frame`.
    pub const STRUCTURED: u8 = 2;
    pub const COUNT: u8 = 3;
}

/// A text that is sometimes longer than [`MAX_TEXT_LEN`] (to reach the limit checks).
fn text(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    let s = String::arbitrary(u)?;
    if u.ratio(1, 16)? {
        let n = u.int_in_range(MAX_TEXT_LEN - 2..=MAX_TEXT_LEN + 2)?;
        let fill = s.chars().next().unwrap_or('x');
        return Ok(std::iter::repeat_n(fill, n / fill.len_utf8().max(1)).collect());
    }
    Ok(s)
}

/// Builds a frame from arbitrary primitives (any text length, so some are invalid).
pub fn arbitrary_frame(u: &mut Unstructured<'_>) -> arbitrary::Result<Frame> {
    let id = MessageId(<[u8; 16]>::arbitrary(u)?);
    Ok(if bool::arbitrary(u)? {
        Frame::Message(ChatMessage {
            id,
            conversation: Conversation::Direct,
            sent_at_ms: u64::arbitrary(u)?,
            body: Body::Text(text(u)?),
        })
    } else {
        let status = match u.int_in_range(0..=2)? {
            0 => AckStatus::Stored,
            1 => AckStatus::Duplicate,
            _ => AckStatus::Rejected(RejectCode(u16::arbitrary(u)?)),
        };
        Frame::Ack(Ack { id, status })
    })
}

// ---------------------------------------------------------------------------------------
// discovery_record
// ---------------------------------------------------------------------------------------

/// Modes of `discovery_record`.
pub mod record_mode {
    /// The rest is a 64-byte signature then record bytes, verified as each record kind.
    pub const RAW: u8 = 0;
    /// The rest is record bytes that the target signs with the fixed key under each
    /// kind's domain before verifying, so decoding runs to the end.
    pub const SELF_SIGNED: u8 = 1;
    /// The rest drives `arbitrary` to build and sign a record.
    pub const STRUCTURED: u8 = 2;
    /// The rest is a JSON body the client parses; the first byte picks which.
    pub const JSON: u8 = 3;
    pub const COUNT: u8 = 4;
}

/// JSON bodies of `record_mode::JSON` (the byte after the mode).
pub mod json_kind {
    pub const PEER_ENTRY: u8 = 0;
    pub const ONLINE: u8 = 1;
    pub const SIGNED_WIRE: u8 = 2;
    pub const CLAIM_RESPONSE: u8 = 3;
    pub const OTHER: u8 = 4;
    pub const COUNT: u8 = 5;
}

/// A name that is valid most of the time.
fn name(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    if u.ratio(1, 8)? {
        return String::arbitrary(u);
    }
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_-";
    let len = u.int_in_range(1..=33)?;
    (0..len)
        .map(|_| u.choose(ALPHABET).map(|&b| b as char))
        .collect()
}

/// The signer of a structured record: usually the fixed key, sometimes another one (so
/// `Signed::sign` must refuse it).
fn signer(u: &mut Unstructured<'_>) -> arbitrary::Result<NodeId> {
    Ok(if u.ratio(1, 16)? {
        other_key().public()
    } else {
        fixed_key().public()
    })
}

/// A presence record from arbitrary primitives (bounds sometimes broken on purpose).
pub fn arbitrary_presence(u: &mut Unstructured<'_>) -> arbitrary::Result<PresenceRecord> {
    let naddrs = u.int_in_range(0..=p2p_discovery::MAX_ADDRS + 1)?;
    Ok(PresenceRecord {
        node_id: signer(u)?,
        name: if bool::arbitrary(u)? {
            Some(name(u)?)
        } else {
            None
        },
        addrs: (0..naddrs)
            .map(|_| SocketAddr::arbitrary(u))
            .collect::<arbitrary::Result<_>>()?,
        mailbox_key: MailboxPublicKey(<[u8; 32]>::arbitrary(u)?),
        timestamp_ms: u64::arbitrary(u)?,
        ttl_secs: if u.ratio(1, 8)? {
            u32::arbitrary(u)?
        } else {
            u.int_in_range(p2p_discovery::MIN_TTL_SECS..=p2p_discovery::MAX_TTL_SECS)?
        },
        relay: if bool::arbitrary(u)? {
            Some(p2p_discovery::RelayRef {
                node_id: signer(u)?,
                addr: SocketAddr::arbitrary(u)?,
            })
        } else {
            None
        },
    })
}

/// A name claim from arbitrary primitives.
pub fn arbitrary_claim(u: &mut Unstructured<'_>) -> arbitrary::Result<NameClaim> {
    Ok(NameClaim {
        name: name(u)?,
        node_id: signer(u)?,
        mailbox_key: MailboxPublicKey(<[u8; 32]>::arbitrary(u)?),
        timestamp_ms: u64::arbitrary(u)?,
    })
}

/// A withdrawal from arbitrary primitives.
pub fn arbitrary_withdrawal(u: &mut Unstructured<'_>) -> arbitrary::Result<Withdrawal> {
    Ok(Withdrawal {
        node_id: signer(u)?,
        timestamp_ms: u64::arbitrary(u)?,
    })
}

// ---------------------------------------------------------------------------------------
// seal_open
// ---------------------------------------------------------------------------------------

/// Modes of `seal_open`.
pub mod seal_mode {
    /// The rest is an envelope opened with the fixed recipient key.
    pub const RAW: u8 = 0;
    /// The rest drives `arbitrary`: sender seed, payload, a byte flip and a cut.
    pub const STRUCTURED: u8 = 1;
    pub const COUNT: u8 = 2;
}

// ---------------------------------------------------------------------------------------
// keyfile_decode: an independent model of the format in crypto/src/keyfile.rs
// ---------------------------------------------------------------------------------------

/// Modes of `keyfile_decode`.
pub mod keyfile_mode {
    /// The rest is a whole key file.
    pub const RAW: u8 = 0;
    /// The rest is a key file without its checksum: the target appends a correct one,
    /// so the fuzzer gets past it to the fields.
    pub const FIX_CHECKSUM: u8 = 1;
    /// The rest drives `arbitrary` to build a valid file with tiny KDF parameters.
    pub const STRUCTURED: u8 = 2;
    pub const COUNT: u8 = 3;
}

pub const KEYFILE_MAGIC: &[u8; 8] = b"P2PKEY\0\x01";
/// Offset of the KDF parameters (`m_cost`, `t_cost`, `p_cost`, little-endian u32) in a
/// passphrase-protected file.
pub const KEYFILE_PARAMS_AT: usize = 8 + 1 + 32;

/// KDF parameters cheap enough to run on every fuzz iteration (the production bounds
/// are 1 GiB / 16 passes; a file above them must be refused before any work).
pub fn cheap_kdf(m: u32, t: u32, p: u32) -> bool {
    m <= 256 && t <= 2 && p <= 2
}

/// The KDF parameters a passphrase-protected file carries, if it is long enough.
pub fn keyfile_params(bytes: &[u8]) -> Option<(u32, u32, u32)> {
    let at = |i: usize| -> Option<u32> {
        let b = bytes.get(KEYFILE_PARAMS_AT + i..KEYFILE_PARAMS_AT + i + 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    };
    Some((at(0)?, at(4)?, at(8)?))
}

/// Appends the SHA-256 checksum of `content`.
pub fn with_checksum(mut content: Vec<u8>) -> Vec<u8> {
    let sum = Sha256::digest(&content);
    content.extend_from_slice(&sum);
    content
}

/// A plain key file for `seed`.
pub fn keyfile_plain(seed: &[u8; 32]) -> Vec<u8> {
    let key = SecretKey::from_bytes(seed);
    let mut out = KEYFILE_MAGIC.to_vec();
    out.push(0);
    out.extend_from_slice(key.public().as_bytes());
    out.extend_from_slice(seed);
    with_checksum(out)
}

/// Parameters of a passphrase-protected key file.
#[derive(Debug, Clone, Copy)]
pub struct Sealing<'a> {
    pub passphrase: &'a [u8],
    pub m_cost: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    pub salt: [u8; 16],
    pub nonce: [u8; 12],
}

/// A passphrase-protected key file for `seed`, or `None` if argon2 refuses the
/// parameters.
pub fn keyfile_sealed(seed: &[u8; 32], s: &Sealing<'_>) -> Option<Vec<u8>> {
    let key = SecretKey::from_bytes(seed);
    let params = argon2::Params::new(s.m_cost, s.t_cost, s.p_cost, Some(32)).ok()?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = [0u8; 32];
    argon
        .hash_password_into(s.passphrase, &s.salt, &mut kek)
        .ok()?;
    let ct = ChaCha20Poly1305::new(&kek.into())
        .encrypt(&s.nonce.into(), seed.as_slice())
        .ok()?;
    let mut out = KEYFILE_MAGIC.to_vec();
    out.push(1);
    out.extend_from_slice(key.public().as_bytes());
    for v in [s.m_cost, s.t_cost, s.p_cost] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&s.salt);
    out.extend_from_slice(&s.nonce);
    out.extend_from_slice(&ct);
    Some(with_checksum(out))
}
