//! `p2p_node::wire`: the pure frame decoder, the length-prefixed stream reader, and the
//! encoder on structured frames.
//!
//! Invariants:
//! - `decode` never panics; what it accepts is valid, re-encodes, and decodes to the same
//!   frame, and re-encoding is a fixed point (the encoder's bytes are canonical);
//! - `read_frame` over a byte stream gives exactly what a model built from `frame_len`
//!   and `decode` gives, and never grows its buffer past `MAX_FRAME_LEN`;
//! - for any structured frame, `encode` fails exactly when the text is over
//!   `MAX_TEXT_LEN`, and otherwise `decode(encode(f)) == f`.

#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use p2p_fuzz::{arbitrary_frame, frame_mode, ready};
use p2p_node::wire::{
    decode, encode, frame_len, DecodeError, EncodeError, Frame, ReadFrameError, HEADER_LEN,
    MAX_FRAME_LEN, MAX_TEXT_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % frame_mode::COUNT {
        frame_mode::PAYLOAD => check_payload(rest),
        frame_mode::STREAM => check_stream(rest),
        _ => {
            let _ = check_structured(&mut Unstructured::new(rest));
        }
    }
});

fn check_payload(payload: &[u8]) {
    match decode(payload) {
        Ok(frame) => check_round_trip(&frame),
        Err(DecodeError::Empty) => assert!(payload.is_empty()),
        Err(DecodeError::FrameTooLarge { len, max }) => {
            assert_eq!((len, max), (payload.len(), MAX_FRAME_LEN));
        }
        Err(_) => {}
    }
}

/// `frame` decoded from somewhere: it must re-encode, and decode to itself.
fn check_round_trip(frame: &Frame) {
    frame.validate().expect("decode returned an invalid frame");
    let bytes = encode(frame).expect("a decoded frame re-encodes");
    let header: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("header");
    assert_eq!(frame_len(header), Ok(bytes.len() - HEADER_LEN));
    let again = decode(&bytes[HEADER_LEN..]).expect("a re-encoded frame decodes");
    assert_eq!(&again, frame);
    assert_eq!(
        encode(&again).expect("re-encodes"),
        bytes,
        "encoding is canonical"
    );
}

/// What `read_frame` must return for the next frame of `stream`, and how many bytes it
/// consumes (`None` at a clean end).
enum Expected {
    End,
    Frame(Frame),
    Truncated { expected: usize, got: usize },
    Decode(DecodeError),
}

fn model_next(stream: &mut &[u8]) -> Expected {
    if stream.is_empty() {
        return Expected::End;
    }
    if stream.len() < HEADER_LEN {
        let got = stream.len();
        *stream = &[];
        return Expected::Truncated {
            expected: HEADER_LEN,
            got,
        };
    }
    let (header, rest) = stream.split_at(HEADER_LEN);
    let len = match frame_len(header.try_into().expect("4 bytes")) {
        Ok(len) => len,
        Err(e) => return Expected::Decode(e),
    };
    if rest.len() < len {
        *stream = &[];
        return Expected::Truncated {
            expected: len,
            got: rest.len(),
        };
    }
    let (payload, rest) = rest.split_at(len);
    *stream = rest;
    match decode(payload) {
        Ok(f) => Expected::Frame(f),
        Err(e) => Expected::Decode(e),
    }
}

fn check_stream(data: &[u8]) {
    let mut reader = data;
    let mut model = data;
    let mut buf = Vec::new();
    loop {
        let got = ready(p2p_node::wire::read_frame(&mut reader, &mut buf));
        assert!(
            buf.capacity() <= MAX_FRAME_LEN,
            "read_frame buffered {} bytes",
            buf.capacity()
        );
        match (model_next(&mut model), got) {
            (Expected::End, Ok(None)) => return,
            (Expected::Frame(want), Ok(Some(f))) => {
                assert_eq!(f, want);
                check_round_trip(&f);
                assert_eq!(reader.len(), model.len(), "consumed exactly one frame");
            }
            (
                Expected::Truncated { expected, got },
                Err(ReadFrameError::Truncated {
                    expected: e,
                    got: g,
                }),
            ) => {
                assert_eq!((e, g), (expected, got));
                return;
            }
            (Expected::Decode(want), Err(ReadFrameError::Decode(e))) => {
                assert_eq!(e, want);
                return;
            }
            (_, got) => panic!("read_frame disagrees with the model: {got:?}"),
        }
    }
}

fn check_structured(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let frame = arbitrary_frame(u)?;
    let too_long = match &frame {
        Frame::Message(m) => m.body.as_text().map_or(0, str::len) > MAX_TEXT_LEN,
        Frame::Ack(_) => false,
    };
    match encode(&frame) {
        Ok(bytes) => {
            assert!(!too_long, "encoded an over-long text");
            assert!(bytes.len() - HEADER_LEN <= MAX_FRAME_LEN);
            assert_eq!(decode(&bytes[HEADER_LEN..]).expect("decodes"), frame);
            check_round_trip(&frame);
        }
        Err(EncodeError::Invalid(_)) => assert!(too_long, "refused a valid frame"),
        Err(e) => panic!("encoding a valid frame failed: {e}"),
    }
    Ok(())
}
