//! `p2p_discovery::relay::proto`: the relay's frame decoder on arbitrary byte streams,
//! fed in arbitrary chunks, and the encoder on structured frames.
//!
//! Invariants:
//! - `Frame::decode` never panics; when it answers "need more", what is left is the end
//!   of what it was given (skipped frames of unknown kinds gone) and holds less than a
//!   whole frame; whatever it returns re-encodes and decodes to itself;
//! - feeding the same stream in any chunking yields the same frames and the same error;
//! - a structured frame encodes iff its packet is at most `MAX_PACKET_LEN`, and then
//!   decodes to itself with nothing left over.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use p2p_discovery::relay::proto::{Frame, FrameError, MAX_PACKET_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        check_stream(rest);
    } else {
        let _ = check_structured(&mut Unstructured::new(rest));
    }
});

/// Decodes `stream` fed all at once, then fed in chunks of the sizes the first bytes
/// say; both must agree.
fn check_stream(input: &[u8]) {
    let Some((&chunk, stream)) = input.split_first() else {
        return;
    };
    let whole = decode_all(stream, stream.len().max(1));
    let chunked = decode_all(stream, usize::from(chunk % 17) + 1);
    assert_eq!(whole, chunked, "chunking changed the result");
    for f in &whole.0 {
        let mut buf = BytesMut::new();
        f.encode(&mut buf).expect("a decoded frame re-encodes");
        let again = Frame::decode(&mut buf).expect("re-encoded decodes");
        assert_eq!(again.as_ref(), Some(f));
        assert!(buf.is_empty(), "one frame, nothing left");
    }
}

/// Every frame of `stream`, and the error that ended it, if any.
fn decode_all(stream: &[u8], chunk: usize) -> (Vec<Frame>, Option<FrameError>) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.put_slice(piece);
        loop {
            let before = buf.clone();
            match Frame::decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {
                    assert!(before.ends_with(&buf), "need-more consumed a partial frame");
                    let whole = buf.len() >= 3
                        && buf.len() >= 3 + usize::from(u16::from_be_bytes([buf[1], buf[2]]));
                    assert!(!whole, "need-more left a whole frame");
                    break;
                }
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

fn check_structured(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let key = <[u8; 32]>::arbitrary(u)?;
    let len = u.int_in_range(0..=MAX_PACKET_LEN + 2)?;
    let packet = Bytes::from(u.bytes(len.min(u.len()))?.to_vec());
    let frame = match u.int_in_range(0..=4)? {
        0 => Frame::Send { dst: key, packet },
        1 => Frame::Recv { src: key, packet },
        2 => Frame::Observed {
            addr: std::net::SocketAddr::arbitrary(u)?,
        },
        3 => Frame::PeerGone { node: key },
        _ => Frame::PunchReport {
            attempts: u32::arbitrary(u)?,
            successes: u32::arbitrary(u)?,
        },
    };
    let too_big = matches!(&frame, Frame::Send { packet, .. } | Frame::Recv { packet, .. } if packet.len() > MAX_PACKET_LEN);
    let mut buf = BytesMut::new();
    match frame.encode(&mut buf) {
        Ok(()) => {
            assert!(!too_big);
            let back = Frame::decode(&mut buf).expect("decodes");
            // Addresses lose their IPv6 scope id and flow label on the wire.
            let want = match frame {
                Frame::Observed { addr } => Frame::Observed {
                    addr: std::net::SocketAddr::new(addr.ip(), addr.port()),
                },
                f => f,
            };
            assert_eq!(back, Some(want));
            assert!(buf.is_empty());
        }
        Err(FrameError::PacketTooLarge { .. }) => assert!(too_big),
        Err(e) => panic!("unexpected encode error {e}"),
    }
    Ok(())
}
