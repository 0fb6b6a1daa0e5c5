//! The relay protocol: frames on the one bidirectional stream a node opens on its relay
//! connection (QUIC, ALPN [`ALPN`], mutual TLS with node certificates).
//!
//! Every frame is `kind: u8 | len: u16 big-endian | body[len]`:
//!
//! | kind | name | direction | body |
//! |---|---|---|---|
//! | 1 | `Send` | node → relay | destination key (32) · packet |
//! | 2 | `Recv` | relay → node | source key (32) · packet |
//! | 3 | `Observed` | relay → node | the node's address as the relay sees it: family (4 or 6) · IP (4 or 16) · port (u16 BE) |
//! | 4 | `PeerGone` | relay → node | key (32) of a destination that is not connected to this relay |
//! | 5 | `PunchReport` | node → relay | hole-punching attempts (u32 BE) · successes (u32 BE) since the last report |
//!
//! Packets are opaque to the relay: they are the two nodes' own end-to-end QUIC packets
//! (or their signed path probes). The relay takes the source of a `Recv` from the TLS
//! handshake of the sender's connection, never from a frame, and delivers a `Send` only
//! to the connection that authenticated as its destination. Keys travel as raw bytes: the
//! relay compares them and never needs to decode them as curve points.
//!
//! A frame of an unknown kind is skipped (its length says how far), so new kinds can be
//! added without a new ALPN; a frame longer than [`MAX_BODY_LEN`] or a known frame with a
//! malformed body is a protocol error and closes the connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Application protocol of relay connections.
pub const ALPN: &[u8] = b"p2p-relay/1";

/// Largest packet a relay forwards (QUIC packets from quinn are at most 1452 bytes).
pub const MAX_PACKET_LEN: usize = 2048;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 3;

/// Largest frame body accepted.
pub const MAX_BODY_LEN: usize = KEY_LEN + MAX_PACKET_LEN;

/// Bytes of a node key in a frame.
pub const KEY_LEN: usize = 32;

/// A node key as raw bytes (an ed25519 public key, not validated by the relay).
pub type Key = [u8; KEY_LEN];

const KIND_SEND: u8 = 1;
const KIND_RECV: u8 = 2;
const KIND_OBSERVED: u8 = 3;
const KIND_PEER_GONE: u8 = 4;
const KIND_PUNCH_REPORT: u8 = 5;

/// One frame of the relay protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Node → relay: forward `packet` to the node whose key is `dst`.
    Send { dst: Key, packet: Bytes },
    /// Relay → node: `packet` from the node that authenticated as `src`.
    Recv { src: Key, packet: Bytes },
    /// Relay → node: the UDP address the relay sees this node at (its reflexive address).
    /// The first frame the relay sends, and again whenever it changes.
    Observed { addr: SocketAddr },
    /// Relay → node: `node` is not connected to this relay; packets to it are dropped.
    PeerGone { node: Key },
    /// Node → relay: hole-punching attempts and successes since the last report.
    PunchReport { attempts: u32, successes: u32 },
}

/// A protocol violation in the byte stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("relay frame of {len} bytes exceeds the {max} allowed")]
    TooLarge { len: usize, max: usize },
    #[error("relay frame of kind {kind} has a malformed body of {len} bytes")]
    Malformed { kind: u8, len: usize },
    #[error("relay packet of {len} bytes exceeds the {max} allowed")]
    PacketTooLarge { len: usize, max: usize },
    #[error("a node sent a frame only the relay may send")]
    WrongDirection,
}

impl Frame {
    /// Appends the encoding of the frame to `buf`. Fails only for a packet over
    /// [`MAX_PACKET_LEN`].
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), FrameError> {
        match self {
            Frame::Send { dst: key, packet } | Frame::Recv { src: key, packet } => {
                if packet.len() > MAX_PACKET_LEN {
                    return Err(FrameError::PacketTooLarge {
                        len: packet.len(),
                        max: MAX_PACKET_LEN,
                    });
                }
                let kind = if matches!(self, Frame::Send { .. }) {
                    KIND_SEND
                } else {
                    KIND_RECV
                };
                put_header(buf, kind, KEY_LEN + packet.len());
                buf.put_slice(key);
                buf.put_slice(packet);
            }
            Frame::Observed { addr } => {
                let (family, ip): (u8, Vec<u8>) = match addr.ip() {
                    IpAddr::V4(ip) => (4, ip.octets().to_vec()),
                    IpAddr::V6(ip) => (6, ip.octets().to_vec()),
                };
                put_header(buf, KIND_OBSERVED, 1 + ip.len() + 2);
                buf.put_u8(family);
                buf.put_slice(&ip);
                buf.put_u16(addr.port());
            }
            Frame::PeerGone { node } => {
                put_header(buf, KIND_PEER_GONE, KEY_LEN);
                buf.put_slice(node);
            }
            Frame::PunchReport {
                attempts,
                successes,
            } => {
                put_header(buf, KIND_PUNCH_REPORT, 8);
                buf.put_u32(*attempts);
                buf.put_u32(*successes);
            }
        }
        Ok(())
    }

    /// Takes the next whole frame from the front of `buf`: `Ok(None)` when more bytes
    /// are needed (nothing of the incomplete frame is consumed then). Whole frames of
    /// unknown kinds are consumed and skipped. Never panics and never allocates beyond
    /// what `buf` holds.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            if buf.len() < HEADER_LEN {
                return Ok(None);
            }
            let kind = buf[0];
            let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
            if len > MAX_BODY_LEN {
                return Err(FrameError::TooLarge {
                    len,
                    max: MAX_BODY_LEN,
                });
            }
            if buf.len() < HEADER_LEN + len {
                return Ok(None);
            }
            buf.advance(HEADER_LEN);
            let body = buf.split_to(len).freeze();
            if let Some(frame) = Self::decode_body(kind, body)? {
                return Ok(Some(frame));
            }
        }
    }

    /// Decodes one body; `Ok(None)` for an unknown kind.
    fn decode_body(kind: u8, mut body: Bytes) -> Result<Option<Frame>, FrameError> {
        let malformed = |body: &Bytes| FrameError::Malformed {
            kind,
            len: body.len(),
        };
        let frame = match kind {
            KIND_SEND | KIND_RECV => {
                if body.len() < KEY_LEN {
                    return Err(malformed(&body));
                }
                let mut key = [0u8; KEY_LEN];
                key.copy_from_slice(&body[..KEY_LEN]);
                body.advance(KEY_LEN);
                if body.len() > MAX_PACKET_LEN {
                    return Err(FrameError::PacketTooLarge {
                        len: body.len(),
                        max: MAX_PACKET_LEN,
                    });
                }
                if kind == KIND_SEND {
                    Frame::Send {
                        dst: key,
                        packet: body,
                    }
                } else {
                    Frame::Recv {
                        src: key,
                        packet: body,
                    }
                }
            }
            KIND_OBSERVED => {
                let ip = match (body.first(), body.len()) {
                    (Some(4), 7) => {
                        let o: [u8; 4] = body[1..5].try_into().map_err(|_| malformed(&body))?;
                        IpAddr::V4(Ipv4Addr::from(o))
                    }
                    (Some(6), 19) => {
                        let o: [u8; 16] = body[1..17].try_into().map_err(|_| malformed(&body))?;
                        IpAddr::V6(Ipv6Addr::from(o))
                    }
                    _ => return Err(malformed(&body)),
                };
                let port = u16::from_be_bytes([body[body.len() - 2], body[body.len() - 1]]);
                Frame::Observed {
                    addr: SocketAddr::new(ip, port),
                }
            }
            KIND_PEER_GONE => {
                let node: Key = body[..].try_into().map_err(|_| malformed(&body))?;
                Frame::PeerGone { node }
            }
            KIND_PUNCH_REPORT => {
                if body.len() != 8 {
                    return Err(malformed(&body));
                }
                Frame::PunchReport {
                    attempts: body.get_u32(),
                    successes: body.get_u32(),
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(frame))
    }
}

fn put_header(buf: &mut BytesMut, kind: u8, len: usize) {
    buf.reserve(HEADER_LEN + len);
    buf.put_u8(kind);
    // Every body is at most MAX_BODY_LEN (checked by the callers), which fits in u16.
    buf.put_u16(u16::try_from(len).unwrap_or(u16::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).expect("encodes");
        // Byte by byte: incomplete input is "need more", never an error.
        let bytes = buf.clone();
        let mut partial = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            partial.put_u8(*b);
            let got = Frame::decode(&mut partial).expect("decodes");
            if i + 1 < bytes.len() {
                assert_eq!(got, None, "incomplete at {i}");
            } else {
                assert_eq!(got, Some(frame.clone()));
            }
        }
        assert!(partial.is_empty());
    }

    #[test]
    fn frames_round_trip() {
        round_trip(Frame::Send {
            dst: [7; 32],
            packet: Bytes::from_static(b"quic packet"),
        });
        round_trip(Frame::Recv {
            src: [9; 32],
            packet: Bytes::from(vec![0xab; MAX_PACKET_LEN]),
        });
        round_trip(Frame::Observed {
            addr: "203.0.113.7:4242".parse().expect("addr"),
        });
        round_trip(Frame::Observed {
            addr: "[2001:db8::1]:7117".parse().expect("addr"),
        });
        round_trip(Frame::PeerGone { node: [1; 32] });
        round_trip(Frame::PunchReport {
            attempts: 3,
            successes: 1,
        });
    }

    #[test]
    fn pinned_layout() {
        let mut buf = BytesMut::new();
        Frame::Observed {
            addr: "1.2.3.4:258".parse().expect("addr"),
        }
        .encode(&mut buf)
        .expect("encodes");
        assert_eq!(&buf[..], &[3, 0, 7, 4, 1, 2, 3, 4, 1, 2]);
        buf.clear();
        Frame::Send {
            dst: [0xee; 32],
            packet: Bytes::from_static(&[1, 2]),
        }
        .encode(&mut buf)
        .expect("encodes");
        assert_eq!(&buf[..3], &[1, 0, 34]);
        assert_eq!(&buf[3..35], &[0xee; 32]);
        assert_eq!(&buf[35..], &[1, 2]);
    }

    #[test]
    fn unknown_kinds_are_skipped() {
        let mut buf = BytesMut::new();
        buf.put_slice(&[0x7f, 0, 3, 1, 2, 3]);
        Frame::PeerGone { node: [2; 32] }
            .encode(&mut buf)
            .expect("encodes");
        assert_eq!(
            Frame::decode(&mut buf).expect("decodes"),
            Some(Frame::PeerGone { node: [2; 32] })
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn skipped_frames_before_a_partial_one_are_consumed_and_the_partial_one_kept() {
        // Regression (fuzz target relay_frame): two empty frames of an unknown kind,
        // then the first byte of a third.
        let mut buf = BytesMut::from(&[0, 0, 0, 0, 0, 0, 0, 0, 1][..]);
        assert_eq!(Frame::decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], &[0, 0, 1]);
        buf.put_u8(9);
        assert_eq!(Frame::decode(&mut buf), Ok(None));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut buf = BytesMut::from(&[KIND_SEND, 0xff, 0xff][..]);
        assert!(matches!(
            Frame::decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[KIND_SEND, 0, 2, 1, 2][..]);
        assert!(matches!(
            Frame::decode(&mut buf),
            Err(FrameError::Malformed { .. })
        ));
        let mut buf = BytesMut::from(&[KIND_OBSERVED, 0, 3, 5, 1, 2][..]);
        assert!(matches!(
            Frame::decode(&mut buf),
            Err(FrameError::Malformed { .. })
        ));
        let mut too_big = BytesMut::new();
        assert!(Frame::Send {
            dst: [0; 32],
            packet: Bytes::from(vec![0; MAX_PACKET_LEN + 1]),
        }
        .encode(&mut too_big)
        .is_err());
    }
}
