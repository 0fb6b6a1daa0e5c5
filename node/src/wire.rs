//! The wire protocol spoken between nodes on authenticated QUIC streams.
//!
//! # Framing
//!
//! Every frame is a 4-byte big-endian length `n` followed by `n` bytes: the
//! [postcard](https://docs.rs/postcard) encoding of one [`Frame`]. The length is checked
//! against [`MAX_FRAME_LEN`] (and against zero) *before* anything is allocated or decoded,
//! so a peer cannot make us buffer more than one bounded frame.
//!
//! [`decode`] is the one pure function that turns a frame payload into a validated
//! [`Frame`]; everything that reads frames goes through it and the fuzzer drives it. It
//! rejects trailing bytes, unknown variant tags, invalid UTF-8 and over-long text, and it
//! never panics.
//!
//! # Who sent it
//!
//! There is deliberately no sender field anywhere in a frame: the sender of a message is
//! always the NodeId authenticated by the TLS handshake of the connection that carried it.
//! Likewise a 1:1 conversation is identified by that peer; [`Conversation::Direct`] says
//! "the conversation between the two ends of this connection" and leaves room for other
//! kinds (groups) later.
//!
//! # Compatibility
//!
//! Postcard is not self-describing: enum variants are encoded by index and struct fields
//! by position. New frame kinds, body kinds and conversation kinds are therefore only ever
//! *appended*; an older node answers an unknown one with a decode error (and the
//! connection is closed), never with a misinterpretation. Incompatible changes bump the
//! version in [`ALPN`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The ALPN protocol id (with version) negotiated on every node-to-node connection.
pub const ALPN: &[u8] = b"p2p-chat/1";

/// Maximum length in bytes of one frame payload (the bytes after the length prefix).
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Maximum length in bytes (of UTF-8) of the text of one message.
///
/// Chosen well below [`MAX_FRAME_LEN`] so any valid text message always fits in a frame.
pub const MAX_TEXT_LEN: usize = 16 * 1024;

/// Length of the frame header: a big-endian `u32` payload length.
pub const HEADER_LEN: usize = 4;

// ---------------------------------------------------------------------------------------
// Message id
// ---------------------------------------------------------------------------------------

/// A 128-bit message id, chosen by the sender.
///
/// The receiver deduplicates by this id, which makes resending always safe. Its text form
/// is exactly 32 lowercase hex characters. Receivers treat it as opaque bytes; this node
/// makes its ids with [`MessageId::generate`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// A fresh id: the current time in milliseconds since the Unix epoch in the first
    /// [`MessageId::TIME_BYTES`] bytes (big-endian), then ten bytes from the operating
    /// system's CSPRNG.
    ///
    /// Ids made later sort later (to the millisecond), so a receiver's id index, keyed by
    /// them, grows at its end instead of at a random place for every message: a commit of
    /// many messages writes a few index pages instead of one per message. The 80 random
    /// bits keep ids unique and unguessable; the time they reveal is the one the message
    /// carries anyway (`sent_at_ms`).
    pub fn generate() -> Self {
        Self::at(crate::node::now_ms(), rand::random())
    }

    /// Bytes of the time prefix of a generated id.
    pub const TIME_BYTES: usize = 6;

    /// The id generated at `now_ms` with `random` as its last ten bytes.
    fn at(now_ms: u64, random: [u8; 10]) -> Self {
        let mut id = [0u8; 16];
        // 48 bits of milliseconds last until the year 10889; later times wrap.
        id[..Self::TIME_BYTES].copy_from_slice(&now_ms.to_be_bytes()[2..]);
        id[Self::TIME_BYTES..].copy_from_slice(&random);
        Self(id)
    }

    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// The text is not a valid [`MessageId`] (exactly 32 lowercase hex characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message id: expected 32 lowercase hex characters")]
pub struct ParseMessageIdError;

impl FromStr for MessageId {
    type Err = ParseMessageIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        fn nibble(c: u8) -> Result<u8, ParseMessageIdError> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                _ => Err(ParseMessageIdError),
            }
        }
        let bytes = s.as_bytes();
        if bytes.len() != 32 {
            return Err(ParseMessageIdError);
        }
        let mut out = [0u8; 16];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Ok(Self(out))
    }
}

// ---------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------

/// One frame on a node-to-node stream.
///
/// New kinds are appended at the end (postcard encodes the variant index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// A chat message from the authenticated peer of the connection.
    Message(ChatMessage),
    /// The receiver's answer to a [`Frame::Message`].
    Ack(Ack),
}

/// A chat message as it travels on the wire.
///
/// There is no sender field: the sender is the authenticated NodeId of the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Random id chosen by the sender; the receiver deduplicates by it.
    pub id: MessageId,
    /// Which conversation the message belongs to.
    pub conversation: Conversation,
    /// The sender's wall clock when the message was written, in ms since the Unix epoch.
    /// Informational only: it comes from the peer and is not trusted for ordering.
    pub sent_at_ms: u64,
    /// The content.
    pub body: Body,
}

impl ChatMessage {
    /// A new direct text message with a fresh id ([`MessageId::generate`]).
    ///
    /// Fails if the text is longer than [`MAX_TEXT_LEN`] bytes.
    pub fn text(text: impl Into<String>, sent_at_ms: u64) -> Result<Self, InvalidMessage> {
        let msg = Self {
            id: MessageId::generate(),
            conversation: Conversation::Direct,
            sent_at_ms,
            body: Body::Text(text.into()),
        };
        msg.validate()?;
        Ok(msg)
    }

    /// Checks the limits a receiver enforces (text length).
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        self.body.validate()
    }
}

/// The conversation a message belongs to.
///
/// Appended to, never reordered (postcard encodes the variant index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Conversation {
    /// The 1:1 conversation between the two authenticated ends of the connection. Its
    /// identity on each side is the *other* node's NodeId, so it needs no payload (and so
    /// cannot be spoofed).
    Direct,
}

/// The content of a message.
///
/// Appended to, never reordered (postcard encodes the variant index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Body {
    /// Plain UTF-8 text, at most [`MAX_TEXT_LEN`] bytes.
    Text(String),
}

impl Body {
    /// Checks the limits a receiver enforces.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Body::Text(t) if t.len() > MAX_TEXT_LEN => Err(InvalidMessage::TextTooLong {
                len: t.len(),
                max: MAX_TEXT_LEN,
            }),
            Body::Text(_) => Ok(()),
        }
    }

    /// The text of a text body.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Body::Text(t) => Some(t),
        }
    }
}

/// The receiver's answer to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The id of the message being answered.
    pub id: MessageId,
    /// What the receiver did with it.
    pub status: AckStatus,
}

/// What the receiver did with a message.
///
/// Transient failures (e.g. the receiver's disk is full) are *not* acknowledged at all:
/// the stream is reset and the sender retries later. `Rejected` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckStatus {
    /// Newly written durably to the receiver's history.
    Stored,
    /// Already in the receiver's history (a resend, or it came via the mailbox first).
    /// Means the same as [`AckStatus::Stored`] for the sender.
    Duplicate,
    /// Refused for good; the sender should not retry.
    Rejected(RejectCode),
}

impl AckStatus {
    /// Whether the message is durably in the receiver's history (the sender may mark it
    /// delivered and drop it from its outbox).
    pub fn is_delivered(&self) -> bool {
        matches!(self, AckStatus::Stored | AckStatus::Duplicate)
    }
}

/// Why a message was rejected: an open set of numeric codes, so a newer node can send a
/// code an older node does not know without breaking decoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RejectCode(pub u16);

impl RejectCode {
    /// Unspecified reason.
    pub const OTHER: Self = Self(0);
    /// The body kind is not supported by the receiver.
    pub const UNSUPPORTED_BODY: Self = Self(1);
    /// The conversation kind is not supported by the receiver.
    pub const UNSUPPORTED_CONVERSATION: Self = Self(2);
    /// The message exceeds the receiver's limits.
    pub const TOO_LARGE: Self = Self(3);
    /// The id is already used by a different message (another conversation or direction).
    pub const ID_CONFLICT: Self = Self(4);
    /// The receiver refuses messages from this sender.
    pub const BLOCKED: Self = Self(5);

    /// A short stable name for known codes.
    pub fn name(&self) -> Option<&'static str> {
        Some(match *self {
            Self::OTHER => "other",
            Self::UNSUPPORTED_BODY => "unsupported-body",
            Self::UNSUPPORTED_CONVERSATION => "unsupported-conversation",
            Self::TOO_LARGE => "too-large",
            Self::ID_CONFLICT => "id-conflict",
            Self::BLOCKED => "blocked",
            _ => return None,
        })
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n} ({})", self.0),
            None => write!(f, "unknown ({})", self.0),
        }
    }
}

impl fmt::Debug for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RejectCode({self})")
    }
}

impl Frame {
    /// Checks the limits a receiver enforces on the frame's content.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Frame::Message(m) => m.validate(),
            Frame::Ack(_) => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// A frame is well-formed but breaks a content limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    /// The text is longer than [`MAX_TEXT_LEN`].
    #[error("message text is {len} bytes, more than the maximum of {max}")]
    TextTooLong {
        /// Actual length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A frame could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The content breaks a limit the receiver would enforce.
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
    /// The encoded frame is larger than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Encoded payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Postcard serialization failed.
    #[error("serializing frame: {0}")]
    Postcard(#[source] postcard::Error),
}

/// A frame payload (or header) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The header announces an empty frame.
    #[error("empty frame")]
    Empty,
    /// The frame is larger than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Announced or actual payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload is not a valid postcard `Frame` (truncated, unknown variant tag, invalid
    /// UTF-8, ...).
    #[error("malformed frame: {0}")]
    Malformed(#[source] postcard::Error),
    /// Bytes were left over after a complete frame.
    #[error("{count} trailing bytes after the frame")]
    TrailingBytes {
        /// Number of left-over bytes.
        count: usize,
    },
    /// The frame decoded but breaks a content limit.
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
}

/// Reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes needed for the header or payload being read.
        expected: usize,
        /// Bytes that arrived before the end.
        got: usize,
    },
    /// The header or payload was refused.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The underlying stream failed.
    #[error("reading frame: {0}")]
    Io(#[source] std::io::Error),
}

/// Writing a frame to a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteFrameError {
    /// The frame could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The underlying stream failed.
    #[error("writing frame: {0}")]
    Io(#[source] std::io::Error),
}

// ---------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------

/// Encodes `frame` with its length prefix into a new buffer.
///
/// Refuses frames a receiver would refuse: over-long text or a payload larger than
/// [`MAX_FRAME_LEN`].
pub fn encode(frame: &Frame) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(frame, &mut out)?;
    Ok(out)
}

/// Appends `frame` with its length prefix to `out`.
///
/// On error `out` is left as it was.
pub fn encode_into(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    frame.validate()?;
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    if let Err(e) = postcard::to_io(frame, &mut *out) {
        out.truncate(start);
        return Err(EncodeError::Postcard(e));
    }
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(EncodeError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // `len <= MAX_FRAME_LEN`, so it fits in a u32.
    let header = (len as u32).to_be_bytes();
    out[start..start + HEADER_LEN].copy_from_slice(&header);
    Ok(())
}

/// Reads the payload length from a frame header, refusing zero and anything above
/// [`MAX_FRAME_LEN`]. Call this before allocating the payload buffer.
pub fn frame_len(header: [u8; HEADER_LEN]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        Err(DecodeError::Empty)
    } else if len > MAX_FRAME_LEN {
        Err(DecodeError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        })
    } else {
        Ok(len)
    }
}

/// Decodes and validates one frame payload (the bytes after the length prefix).
///
/// Pure and total: any input gives a `Frame` or a `DecodeError`, never a panic.
pub fn decode(payload: &[u8]) -> Result<Frame, DecodeError> {
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    if payload.len() > MAX_FRAME_LEN {
        return Err(DecodeError::FrameTooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let (frame, rest): (Frame, &[u8]) =
        postcard::take_from_bytes(payload).map_err(DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { count: rest.len() });
    }
    frame.validate()?;
    Ok(frame)
}

/// Reads one frame from `r`, using `buf` as the (reusable) payload buffer.
///
/// Returns `Ok(None)` when the stream ends cleanly at a frame boundary. The header is
/// checked before `buf` grows, so at most [`MAX_FRAME_LEN`] bytes are ever allocated.
pub async fn read_frame<R>(r: &mut R, buf: &mut Vec<u8>) -> Result<Option<Frame>, ReadFrameError>
where
    R: AsyncRead + Unpin,
{
    match read_frame_header(r).await? {
        None => Ok(None),
        Some(len) => read_frame_body(r, len, buf).await.map(Some),
    }
}

/// Reads and checks a frame's length prefix: the payload length (at most
/// [`MAX_FRAME_LEN`]), or `None` when the stream ends cleanly before it. With
/// [`read_frame_body`], lets a reader reserve memory for the payload before reading it.
pub async fn read_frame_header<R>(r: &mut R) -> Result<Option<usize>, ReadFrameError>
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(ReadFrameError::Truncated {
            expected: HEADER_LEN,
            got,
        });
    }
    Ok(Some(frame_len(header)?))
}

/// Reads a payload of `len` bytes (from [`read_frame_header`]) into `buf` and decodes it.
pub async fn read_frame_body<R>(
    r: &mut R,
    len: usize,
    buf: &mut Vec<u8>,
) -> Result<Frame, ReadFrameError>
where
    R: AsyncRead + Unpin,
{
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        }
        .into());
    }
    buf.clear();
    // Exactly `len`: `resize` alone may double a reused buffer past `MAX_FRAME_LEN`.
    buf.reserve_exact(len);
    buf.resize(len, 0);
    let got = read_full(r, buf).await?;
    if got < len {
        return Err(ReadFrameError::Truncated { expected: len, got });
    }
    Ok(decode(buf)?)
}

/// Reads until `dst` is full or the stream ends; returns the number of bytes read.
async fn read_full<R>(r: &mut R, dst: &mut [u8]) -> Result<usize, ReadFrameError>
where
    R: AsyncRead + Unpin,
{
    let mut filled = 0;
    while filled < dst.len() {
        match r.read(&mut dst[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadFrameError::Io(e)),
        }
    }
    Ok(filled)
}

/// Encodes `frame` and writes it (prefix and payload) to `w`, then flushes.
pub async fn write_frame<W>(w: &mut W, frame: &Frame) -> Result<(), WriteFrameError>
where
    W: AsyncWrite + Unpin,
{
    let bytes = encode(frame)?;
    w.write_all(&bytes).await.map_err(WriteFrameError::Io)?;
    w.flush().await.map_err(WriteFrameError::Io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    fn text_msg(text: &str) -> Frame {
        Frame::Message(ChatMessage {
            id: MessageId([7; 16]),
            conversation: Conversation::Direct,
            sent_at_ms: 1_700_000_000_000,
            body: Body::Text(text.to_owned()),
        })
    }

    fn ack(status: AckStatus) -> Frame {
        Frame::Ack(Ack {
            id: MessageId([9; 16]),
            status,
        })
    }

    /// The payload of an encoded frame, after checking its header.
    fn payload(bytes: &[u8]) -> &[u8] {
        let header: [u8; 4] = bytes[..4].try_into().unwrap();
        assert_eq!(frame_len(header).unwrap(), bytes.len() - 4);
        &bytes[4..]
    }

    #[test]
    fn a_message_id_gives_its_own_bytes() {
        let bytes: [u8; 16] = std::array::from_fn(|i| i as u8);
        let id = MessageId(bytes);
        assert_eq!(id.as_bytes(), &bytes);
        assert_eq!(MessageId([0xa5; 16]).as_bytes(), &[0xa5; 16]);
        let random = MessageId::generate();
        assert_eq!(
            random.to_string().parse::<MessageId>().unwrap().as_bytes(),
            random.as_bytes()
        );
    }

    #[test]
    fn generated_ids_start_with_their_time_and_sort_by_it() {
        let id = MessageId::at(0x0102_0304_0506, [0xee; 10]);
        assert_eq!(
            id.as_bytes(),
            &[1, 2, 3, 4, 5, 6, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee]
        );
        // A later millisecond sorts later whatever the random bytes.
        assert!(MessageId::at(1_000, [0xff; 10]) < MessageId::at(1_001, [0; 10]));
        let before = crate::node::now_ms();
        let id = MessageId::generate();
        let mut time = [0u8; 8];
        time[2..].copy_from_slice(&id.as_bytes()[..MessageId::TIME_BYTES]);
        let t = u64::from_be_bytes(time);
        assert!(t >= before && t < before + 60_000, "{t} vs {before}");
        // The rest is random: two ids of the same millisecond differ there.
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| MessageId::generate()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn round_trips() {
        let frames = [
            text_msg("hello"),
            text_msg(""),
            text_msg("ünïcödé ✓ 🎉"),
            text_msg(&"x".repeat(MAX_TEXT_LEN)),
            ack(AckStatus::Stored),
            ack(AckStatus::Duplicate),
            ack(AckStatus::Rejected(RejectCode::ID_CONFLICT)),
            ack(AckStatus::Rejected(RejectCode(65535))),
        ];
        for f in frames {
            let bytes = encode(&f).unwrap();
            assert_eq!(decode(payload(&bytes)).unwrap(), f);
        }
    }

    #[test]
    fn reject_codes_have_stable_names() {
        // The names are what the CLI prints and PROTOCOL.md lists: each code keeps its own.
        let known = [
            (RejectCode::OTHER, "other", 0),
            (RejectCode::UNSUPPORTED_BODY, "unsupported-body", 1),
            (
                RejectCode::UNSUPPORTED_CONVERSATION,
                "unsupported-conversation",
                2,
            ),
            (RejectCode::TOO_LARGE, "too-large", 3),
            (RejectCode::ID_CONFLICT, "id-conflict", 4),
            (RejectCode::BLOCKED, "blocked", 5),
        ];
        for (code, name, n) in known {
            assert_eq!(code, RejectCode(n));
            assert_eq!(code.name(), Some(name));
            assert_eq!(code.to_string(), format!("{name} ({n})"));
            assert_eq!(format!("{code:?}"), format!("RejectCode({name} ({n}))"));
        }
        assert_eq!(RejectCode(6).name(), None);
        assert_eq!(RejectCode(300).to_string(), "unknown (300)");
        assert_eq!(
            format!("{:?}", RejectCode(300)),
            "RejectCode(unknown (300))"
        );
    }

    #[test]
    fn encoding_is_stable() {
        // Pin the wire format: changing it needs an ALPN version bump.
        let bytes = encode(&ack(AckStatus::Rejected(RejectCode(300)))).unwrap();
        let mut expected = vec![0, 0, 0, 20, 1];
        expected.extend_from_slice(&[9; 16]);
        expected.extend_from_slice(&[2, 0xac, 0x02]);
        assert_eq!(bytes, expected);

        let bytes = encode(&text_msg("hi")).unwrap();
        assert_eq!(bytes[4], 0, "Frame::Message tag");
        assert_eq!(&bytes[5..21], &[7; 16], "id is 16 raw bytes");
        assert_eq!(bytes[21], 0, "Conversation::Direct tag");
        assert_eq!(&bytes[bytes.len() - 4..], &[0, 2, b'h', b'i'], "Body::Text");
    }

    #[test]
    fn encode_into_appends_and_keeps_buffer_on_error() {
        let mut out = b"prefix".to_vec();
        encode_into(&ack(AckStatus::Stored), &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(decode(payload(&out[6..])).unwrap(), ack(AckStatus::Stored));

        let before = out.clone();
        let err = encode_into(&text_msg(&"x".repeat(MAX_TEXT_LEN + 1)), &mut out).unwrap_err();
        assert!(matches!(
            err,
            EncodeError::Invalid(InvalidMessage::TextTooLong { len, max })
                if len == MAX_TEXT_LEN + 1 && max == MAX_TEXT_LEN
        ));
        assert_eq!(out, before);
    }

    #[test]
    fn constructor_checks_text_length() {
        let m = ChatMessage::text("hello", 5).unwrap();
        assert_eq!(m.body.as_text(), Some("hello"));
        assert_eq!(m.sent_at_ms, 5);
        assert_ne!(m.id, ChatMessage::text("hello", 5).unwrap().id);
        assert!(ChatMessage::text("x".repeat(MAX_TEXT_LEN + 1), 0).is_err());
    }

    #[test]
    fn frame_len_bounds() {
        assert_eq!(frame_len([0, 0, 0, 0]), Err(DecodeError::Empty));
        assert_eq!(frame_len([0, 0, 0, 1]), Ok(1));
        assert_eq!(
            frame_len((MAX_FRAME_LEN as u32).to_be_bytes()),
            Ok(MAX_FRAME_LEN)
        );
        assert!(matches!(
            frame_len((MAX_FRAME_LEN as u32 + 1).to_be_bytes()),
            Err(DecodeError::FrameTooLarge { .. })
        ));
        assert!(matches!(
            frame_len([0xff; 4]),
            Err(DecodeError::FrameTooLarge { len, .. }) if len == u32::MAX as usize
        ));
    }

    #[test]
    fn decode_rejects_oversize_payload() {
        let big = vec![0u8; MAX_FRAME_LEN + 1];
        assert!(matches!(
            decode(&big),
            Err(DecodeError::FrameTooLarge { .. })
        ));
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn decode_rejects_truncated() {
        let bytes = encode(&text_msg("hello world")).unwrap();
        let p = payload(&bytes);
        for cut in 1..p.len() {
            assert!(
                matches!(decode(&p[..cut]), Err(DecodeError::Malformed(_))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn decode_rejects_trailing_bytes() {
        let bytes = encode(&ack(AckStatus::Stored)).unwrap();
        let mut p = payload(&bytes).to_vec();
        p.extend_from_slice(&[0, 1]);
        assert_eq!(decode(&p), Err(DecodeError::TrailingBytes { count: 2 }));
    }

    #[test]
    fn decode_rejects_unknown_tags() {
        // Unknown Frame variant.
        assert!(matches!(decode(&[2]), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode(&[0xff; 8]), Err(DecodeError::Malformed(_))));

        let bytes = encode(&text_msg("hi")).unwrap();
        let p = payload(&bytes);
        // Unknown Conversation variant (byte right after the 16-byte id).
        let mut q = p.to_vec();
        q[17] = 1;
        assert!(matches!(decode(&q), Err(DecodeError::Malformed(_))));
        // Unknown Body variant (byte before the text length).
        let mut q = p.to_vec();
        let body_tag = q.len() - 4;
        q[body_tag] = 1;
        assert!(matches!(decode(&q), Err(DecodeError::Malformed(_))));
        // Unknown AckStatus variant.
        let bytes = encode(&ack(AckStatus::Stored)).unwrap();
        let mut q = payload(&bytes).to_vec();
        q[17] = 3;
        assert!(matches!(decode(&q), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn decode_rejects_invalid_utf8() {
        let bytes = encode(&text_msg("ab")).unwrap();
        let mut p = payload(&bytes).to_vec();
        let n = p.len();
        p[n - 2] = 0xff;
        p[n - 1] = 0xfe;
        assert!(matches!(decode(&p), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn decode_rejects_overlong_text_and_huge_length_claims() {
        // A text of MAX_TEXT_LEN + 1 bytes fits in a frame but breaks the text limit.
        let mut p = vec![0u8];
        p.extend_from_slice(&[7; 16]);
        p.push(0); // Direct
        p.push(1); // sent_at_ms varint
        p.push(0); // Body::Text
        let len = MAX_TEXT_LEN + 1;
        let mut v = len;
        while v >= 0x80 {
            p.push((v as u8) | 0x80);
            v >>= 7;
        }
        p.push(v as u8);
        p.extend(std::iter::repeat_n(b'a', len));
        assert!(matches!(
            decode(&p),
            Err(DecodeError::Invalid(InvalidMessage::TextTooLong { .. }))
        ));

        // A string length claiming far more than the payload holds.
        let mut q = p[..p.len() - len].to_vec();
        let lenpos = q.len() - 3;
        q.truncate(lenpos);
        q.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        q.extend_from_slice(b"abc");
        assert!(matches!(decode(&q), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn decode_rejects_garbage() {
        for g in [
            &b"\x00"[..],
            b"\x01",
            b"GET / HTTP/1.1\r\n\r\n",
            &[0x80; 40],
            &[0x00, 0x01, 0x02, 0x03],
        ] {
            assert!(decode(g).is_err(), "{g:?}");
        }
    }

    #[test]
    fn message_id_text_form() {
        let id = MessageId([
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ]);
        let s = id.to_string();
        assert_eq!(s, "00112233445566778899aabbccddeeff");
        assert_eq!(s.parse::<MessageId>(), Ok(id));
        assert_eq!(format!("{id:?}"), format!("MessageId({s})"));
        for bad in [
            "",
            "00112233445566778899aabbccddeef",
            "00112233445566778899aabbccddeeff0",
            "00112233445566778899AABBCCDDEEFF",
            "0011223344556677889 aabbccddeeff",
            "g0112233445566778899aabbccddeeff",
            "+0112233445566778899aabbccddeeff",
            "ü0112233445566778899aabbccddeef",
        ] {
            assert_eq!(
                bad.parse::<MessageId>(),
                Err(ParseMessageIdError),
                "{bad:?}"
            );
        }
        let r = MessageId::generate();
        assert_eq!(r.to_string().parse::<MessageId>(), Ok(r));
    }

    #[test]
    fn reject_code_display() {
        assert_eq!(RejectCode::TOO_LARGE.to_string(), "too-large (3)");
        assert_eq!(RejectCode(999).to_string(), "unknown (999)");
        assert!(AckStatus::Stored.is_delivered());
        assert!(AckStatus::Duplicate.is_delivered());
        assert!(!AckStatus::Rejected(RejectCode::OTHER).is_delivered());
    }

    // --- async stream helpers -----------------------------------------------------------

    /// Runs a test's body with a deadline of its own, so a reader that never finishes
    /// fails the test instead of hanging it.
    async fn within<F: std::future::Future<Output = ()>>(body: F) {
        tokio::time::timeout(std::time::Duration::from_secs(10), body)
            .await
            .expect("the test finishes within 10 s");
    }

    /// A reader that fails every read with `kind`, after `interrupts` reads that fail
    /// with `Interrupted`; counts its reads.
    struct Failing {
        kind: std::io::ErrorKind,
        interrupts: usize,
        reads: usize,
    }

    impl AsyncRead for Failing {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads += 1;
            assert!(
                self.reads < 1000,
                "a failing reader is read again and again"
            );
            if self.reads <= self.interrupts {
                return Poll::Ready(Err(std::io::ErrorKind::Interrupted.into()));
            }
            Poll::Ready(Err(self.kind.into()))
        }
    }

    #[tokio::test]
    async fn a_failing_reader_is_an_io_error_after_interruptions_are_retried() {
        within(async {
            let mut r = Failing {
                kind: std::io::ErrorKind::ConnectionReset,
                interrupts: 3,
                reads: 0,
            };
            let mut buf = Vec::new();
            match read_frame(&mut r, &mut buf).await {
                Err(ReadFrameError::Io(e)) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset)
                }
                other => panic!("unexpected {other:?}"),
            }
            assert_eq!(
                r.reads, 4,
                "three interrupted reads retried, then the error"
            );
            // The same in the middle of a payload.
            let mut r = Failing {
                kind: std::io::ErrorKind::BrokenPipe,
                interrupts: 0,
                reads: 0,
            };
            assert!(matches!(
                read_frame_body(&mut r, 10, &mut buf).await,
                Err(ReadFrameError::Io(_))
            ));
        })
        .await;
    }

    #[tokio::test]
    async fn read_frame_body_refuses_a_length_over_the_limit_before_allocating() {
        within(async {
            // The reader would hand out a whole oversize payload if asked.
            let data = vec![0u8; MAX_FRAME_LEN + 1];
            let mut r: &[u8] = &data;
            let mut buf = Vec::new();
            assert!(matches!(
                read_frame_body(&mut r, MAX_FRAME_LEN + 1, &mut buf).await,
                Err(ReadFrameError::Decode(DecodeError::FrameTooLarge { len, max }))
                    if len == MAX_FRAME_LEN + 1 && max == MAX_FRAME_LEN
            ));
            assert_eq!(buf.capacity(), 0);
            assert_eq!(r.len(), MAX_FRAME_LEN + 1, "nothing was read");
        })
        .await;
    }

    #[tokio::test]
    async fn read_frame_body_reads_a_length_at_the_limit() {
        within(async {
            // Not a valid frame, but not too large either: it is read, then refused by
            // the decoder.
            let data = vec![0u8; MAX_FRAME_LEN];
            let mut r: &[u8] = &data;
            let mut buf = Vec::new();
            let res = read_frame_body(&mut r, MAX_FRAME_LEN, &mut buf).await;
            assert!(
                !matches!(
                    res,
                    Err(ReadFrameError::Decode(DecodeError::FrameTooLarge { .. }))
                ),
                "{res:?}"
            );
            assert!(r.is_empty(), "the whole payload was read");
        })
        .await;
    }

    #[test]
    fn the_limits_have_their_documented_values() {
        // PROTOCOL.md and the peers of this node rely on these numbers.
        assert_eq!(MAX_FRAME_LEN, 65_536);
        assert_eq!(MAX_TEXT_LEN, 16_384);
        assert_eq!(HEADER_LEN, 4);
        assert_eq!(ALPN, b"p2p-chat/1");
    }

    /// Yields its data one byte per read, then EOF; panics if read past `max_reads`.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        max_reads: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            assert!(self.pos <= self.max_reads, "read past the allowed point");
            if let Some(&b) = self.data.get(self.pos) {
                buf.put_slice(&[b]);
            }
            self.pos += 1;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn read_write_frames_over_a_stream() {
        within(async {
            let (mut a, mut b) = tokio::io::duplex(1024);
            let frames = vec![
                text_msg("one"),
                ack(AckStatus::Stored),
                text_msg(&"y".repeat(MAX_TEXT_LEN)),
            ];
            let sent = frames.clone();
            let writer = tokio::spawn(async move {
                for f in &sent {
                    write_frame(&mut a, f).await.unwrap();
                }
                // Dropping `a` closes the stream cleanly at a frame boundary.
            });
            let mut buf = Vec::new();
            let mut got = Vec::new();
            while let Some(f) = read_frame(&mut b, &mut buf).await.unwrap() {
                got.push(f);
            }
            writer.await.unwrap();
            assert_eq!(got, frames);
        })
        .await;
    }

    #[tokio::test]
    async fn read_frame_byte_by_byte() {
        within(async {
            let mut data = encode(&text_msg("trickle")).unwrap();
            encode_into(&ack(AckStatus::Duplicate), &mut data).unwrap();
            let mut r = Trickle {
                max_reads: data.len(),
                data,
                pos: 0,
            };
            let mut buf = Vec::new();
            assert_eq!(
                read_frame(&mut r, &mut buf).await.unwrap(),
                Some(text_msg("trickle"))
            );
            assert_eq!(
                read_frame(&mut r, &mut buf).await.unwrap(),
                Some(ack(AckStatus::Duplicate))
            );
            assert_eq!(read_frame(&mut r, &mut buf).await.unwrap(), None);
        })
        .await;
    }

    #[tokio::test]
    async fn read_frame_refuses_oversize_before_allocating() {
        within(async {
            let mut data = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
            data.extend_from_slice(&[0; 16]);
            // The reader panics if asked for anything beyond the 4 header bytes.
            let mut r = Trickle {
                data,
                pos: 0,
                max_reads: 3,
            };
            let mut buf = Vec::new();
            let err = read_frame(&mut r, &mut buf).await.unwrap_err();
            assert!(matches!(
                err,
                ReadFrameError::Decode(DecodeError::FrameTooLarge { .. })
            ));
            assert_eq!(buf.capacity(), 0);

            let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
            let err = read_frame(&mut r, &mut buf).await.unwrap_err();
            assert!(matches!(
                err,
                ReadFrameError::Decode(DecodeError::FrameTooLarge { .. })
            ));
            assert_eq!(buf.capacity(), 0);

            let mut r: &[u8] = &[0, 0, 0, 0];
            let err = read_frame(&mut r, &mut buf).await.unwrap_err();
            assert!(matches!(err, ReadFrameError::Decode(DecodeError::Empty)));
        })
        .await;
    }

    #[tokio::test]
    async fn reused_buffer_stays_within_max_frame_len() {
        within(async {
            // A large garbage frame, then a larger one, through the same buffer: growing it
            // by `resize` alone doubled the capacity (to 80 000 bytes) past MAX_FRAME_LEN.
            let mut data = 40_000u32.to_be_bytes().to_vec();
            data.extend(std::iter::repeat_n(0xff, 40_000));
            data.extend_from_slice(&60_000u32.to_be_bytes());
            data.extend(std::iter::repeat_n(0xff, 60_000));
            let mut r: &[u8] = &data;
            let mut buf = Vec::new();
            for _ in 0..2 {
                assert!(matches!(
                    read_frame(&mut r, &mut buf).await,
                    Err(ReadFrameError::Decode(DecodeError::Malformed(_)))
                ));
                assert!(buf.capacity() <= MAX_FRAME_LEN, "{}", buf.capacity());
            }
            assert!(r.is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn read_frame_truncated() {
        within(async {
            let data = encode(&text_msg("cut short")).unwrap();
            let mut buf = Vec::new();
            // Inside the header.
            let mut r: &[u8] = &data[..2];
            assert!(matches!(
                read_frame(&mut r, &mut buf).await,
                Err(ReadFrameError::Truncated {
                    expected: 4,
                    got: 2
                })
            ));
            // Inside the payload.
            let mut r: &[u8] = &data[..data.len() - 1];
            match read_frame(&mut r, &mut buf).await {
                Err(ReadFrameError::Truncated { expected, got }) => {
                    assert_eq!(expected, data.len() - 4);
                    assert_eq!(got, data.len() - 5);
                }
                other => panic!("unexpected {other:?}"),
            }
            // Clean EOF.
            let mut r: &[u8] = &[];
            assert!(read_frame(&mut r, &mut buf).await.unwrap().is_none());
        })
        .await;
    }

    #[tokio::test]
    async fn read_frame_garbage_payload() {
        within(async {
            let mut r: &[u8] = &[0, 0, 0, 3, 9, 9, 9];
            let mut buf = Vec::new();
            assert!(matches!(
                read_frame(&mut r, &mut buf).await,
                Err(ReadFrameError::Decode(DecodeError::Malformed(_)))
            ));
        })
        .await;
    }

    #[tokio::test]
    async fn write_frame_refuses_invalid() {
        within(async {
            let mut out = Vec::new();
            let err = write_frame(&mut out, &text_msg(&"z".repeat(MAX_TEXT_LEN + 1)))
                .await
                .unwrap_err();
            assert!(matches!(err, WriteFrameError::Encode(_)));
            assert!(out.is_empty());
        })
        .await;
    }

    // --- properties ---------------------------------------------------------------------

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let id = any::<[u8; 16]>().prop_map(MessageId);
        let msg = (
            id.clone(),
            any::<u64>(),
            prop_oneof![
                ".{0,64}",
                proptest::collection::vec(any::<char>(), 0..2000)
                    .prop_map(|cs| cs.into_iter().collect::<String>())
                    .prop_filter("fits", |s| s.len() <= MAX_TEXT_LEN),
            ],
        )
            .prop_map(|(id, sent_at_ms, text)| {
                Frame::Message(ChatMessage {
                    id,
                    conversation: Conversation::Direct,
                    sent_at_ms,
                    body: Body::Text(text),
                })
            });
        let status = prop_oneof![
            Just(AckStatus::Stored),
            Just(AckStatus::Duplicate),
            any::<u16>().prop_map(|c| AckStatus::Rejected(RejectCode(c))),
        ];
        let ack = (id, status).prop_map(|(id, status)| Frame::Ack(Ack { id, status }));
        prop_oneof![msg, ack]
    }

    proptest! {
        #[test]
        fn prop_round_trip(f in arb_frame()) {
            let bytes = encode(&f).unwrap();
            let header: [u8; 4] = bytes[..4].try_into().unwrap();
            prop_assert_eq!(frame_len(header).unwrap(), bytes.len() - 4);
            prop_assert_eq!(decode(&bytes[4..]).unwrap(), f);
        }

        #[test]
        fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(f) = decode(&bytes) {
                // Whatever decodes is valid, so it can be re-encoded and decodes the same.
                let again = encode(&f).unwrap();
                prop_assert_eq!(decode(&again[4..]).unwrap(), f);
            }
        }

        #[test]
        fn prop_decode_mutated_frames(f in arb_frame(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
            let bytes = encode(&f).unwrap();
            let mut p = bytes[4..].to_vec();
            for (i, x) in flips {
                let n = p.len();
                p[i % n] ^= x;
            }
            let _ = decode(&p);
        }
    }

    /// Reads frames from `bytes` until the end or an error.
    fn read_all(bytes: &[u8]) -> (Vec<Frame>, Option<ReadFrameError>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = bytes;
            let mut buf = Vec::new();
            let mut frames = Vec::new();
            loop {
                match read_frame(&mut r, &mut buf).await {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => return (frames, None),
                    Err(e) => return (frames, Some(e)),
                }
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn prop_stream_reads_back_in_order(
            frames in proptest::collection::vec(arb_frame(), 0..8),
            cut in any::<usize>(),
        ) {
            let mut stream = Vec::new();
            let mut ends = Vec::new();
            for f in &frames {
                encode_into(f, &mut stream).unwrap();
                ends.push(stream.len());
            }
            let (got, err) = read_all(&stream);
            prop_assert!(err.is_none(), "{:?}", err);
            prop_assert_eq!(&got, &frames);

            // Cut anywhere: the whole frames before the cut read back, then the stream
            // ends cleanly at a frame boundary or is reported truncated.
            if stream.is_empty() {
                return Ok(());
            }
            let cut = cut % stream.len();
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            let (got, err) = read_all(&stream[..cut]);
            prop_assert_eq!(&got[..], &frames[..whole]);
            let at_boundary = cut == 0 || ends.contains(&cut);
            match err {
                None => prop_assert!(at_boundary),
                Some(ReadFrameError::Truncated { expected, got }) => {
                    prop_assert!(!at_boundary);
                    prop_assert!(got < expected);
                }
                Some(e) => prop_assert!(false, "unexpected {:?}", e),
            }
        }

        #[test]
        fn prop_sealed_frame_opens_to_the_same_frame(
            f in arb_frame(),
            sender in any::<[u8; 32]>(),
            recipient in any::<[u8; 32]>(),
        ) {
            // The mailbox path: a frame payload sealed to the recipient and opened again.
            use p2p_crypto::{seal, SecretKey};
            let sender = SecretKey::from_bytes(&sender);
            let recipient = SecretKey::from_bytes(&recipient);
            let bytes = encode(&f).unwrap();
            let env = seal::seal(
                &sender,
                &recipient.public(),
                &recipient.mailbox_secret().public(),
                &bytes[HEADER_LEN..],
            );
            let opened = seal::open(&recipient, &env).unwrap();
            prop_assert_eq!(opened.sender, sender.public());
            prop_assert_eq!(decode(&opened.payload).unwrap(), f);
        }

        #[test]
        fn prop_text_limit_is_exact(extra in 0usize..3, c in any::<char>()) {
            let text: String = std::iter::repeat_n(c, MAX_TEXT_LEN / c.len_utf8() + extra).collect();
            let f = text_msg(&text);
            match encode(&f) {
                Ok(bytes) => {
                    prop_assert!(text.len() <= MAX_TEXT_LEN);
                    prop_assert_eq!(decode(payload(&bytes)).unwrap(), f);
                }
                Err(_) => prop_assert!(text.len() > MAX_TEXT_LEN),
            }
        }
    }
}
