//! Properties of the wire codec on streams of frames and inside sealed envelopes (the
//! mailbox path). Single-frame round trips are in `wire.rs`'s own tests.

use p2p_crypto::{seal, SecretKey};
use p2p_node::wire::{
    decode, encode, read_frame, Ack, AckStatus, Body, ChatMessage, Conversation, Frame, MessageId,
    ReadFrameError, RejectCode, HEADER_LEN, MAX_TEXT_LEN,
};
use proptest::prelude::*;

fn frame() -> impl Strategy<Value = Frame> {
    let id = any::<[u8; 16]>().prop_map(MessageId);
    let msg = (id.clone(), any::<u64>(), ".{0,40}").prop_map(|(id, sent_at_ms, text)| {
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

/// Reads frames from `bytes` until the end or an error.
fn read_all(bytes: &[u8]) -> (Vec<Frame>, Option<ReadFrameError>) {
    runtime().block_on(async {
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
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn a_stream_of_frames_reads_back_in_order(
        frames in proptest::collection::vec(frame(), 0..8),
        cut in any::<usize>(),
    ) {
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for f in &frames {
            stream.extend_from_slice(&encode(f).expect("encodes"));
            ends.push(stream.len());
        }
        let (got, err) = read_all(&stream);
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(&got, &frames);

        // Cut anywhere: the whole frames before the cut read back, then the stream ends
        // cleanly at a frame boundary or is reported truncated.
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
    fn a_sealed_frame_opens_to_the_same_frame(
        f in frame(),
        sender in any::<[u8; 32]>(),
        recipient in any::<[u8; 32]>(),
    ) {
        let (sender, recipient) = (SecretKey::from_bytes(&sender), SecretKey::from_bytes(&recipient));
        let bytes = encode(&f).expect("encodes");
        let env = seal::seal(
            &sender,
            &recipient.public(),
            &recipient.mailbox_secret().public(),
            &bytes[HEADER_LEN..],
        );
        let opened = seal::open(&recipient, &env).expect("opens");
        prop_assert_eq!(opened.sender, sender.public());
        prop_assert_eq!(decode(&opened.payload).expect("decodes"), f);
    }

    #[test]
    fn text_at_the_limit_round_trips_and_past_it_is_refused(extra in 0usize..3, c in any::<char>()) {
        let n = MAX_TEXT_LEN / c.len_utf8();
        let text: String = std::iter::repeat_n(c, n + extra).collect();
        let f = Frame::Message(ChatMessage {
            id: MessageId([1; 16]),
            conversation: Conversation::Direct,
            sent_at_ms: 0,
            body: Body::Text(text.clone()),
        });
        match encode(&f) {
            Ok(bytes) => {
                prop_assert!(text.len() <= MAX_TEXT_LEN);
                prop_assert_eq!(decode(&bytes[HEADER_LEN..]).expect("decodes"), f);
            }
            Err(_) => prop_assert!(text.len() > MAX_TEXT_LEN),
        }
    }
}
