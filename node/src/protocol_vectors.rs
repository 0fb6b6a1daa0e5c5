//! The test vectors of PROTOCOL.md, computed from the code: every `name = value` line in
//! a `vectors` block of PROTOCOL.md must be here with the same value, and every vector
//! here must be in PROTOCOL.md, so the specification cannot drift from the code.

#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use bytes::BytesMut;
use p2p_crypto::{seal, Domain, SecretKey};
use p2p_discovery::{
    api::request_signing_bytes,
    relay::{self, proto},
    NameClaim, PresenceRecord, RelayRef, Signed, Withdrawal,
};

use crate::{
    endpoint,
    net::probe::{Probe, ProbeKind},
    node,
    wire::{self, Ack, AckStatus, Body, ChatMessage, Conversation, Frame, MessageId, RejectCode},
};

const SPEC: &str = include_str!("../../PROTOCOL.md");

/// The instant every record below is stamped with: 2023-11-14T22:13:20Z.
const T: u64 = 1_700_000_000_000;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn alice() -> SecretKey {
    SecretKey::from_bytes(&[0x01; 32])
}

fn bob() -> SecretKey {
    SecretKey::from_bytes(&[0x02; 32])
}

/// The vectors as the code computes them.
fn computed() -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let mut put = |k: &str, val: String| {
        assert!(
            v.insert(k.to_owned(), val).is_none(),
            "duplicate vector {k}"
        );
    };

    // Keys, ids, the mailbox key.
    for (who, key) in [("alice", alice()), ("bob", bob())] {
        let seed = key.to_bytes();
        put(&format!("{who}.seed"), hex(seed.as_ref()));
        put(&format!("{who}.public_key"), hex(key.public().as_bytes()));
        put(&format!("{who}.node_id"), key.public().to_string());
        put(&format!("{who}.fingerprint"), key.public().fingerprint());
        // HKDF-SHA256(salt = "p2p-node/v1/mailbox-key", ikm = seed, info = "x25519").
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"p2p-node/v1/mailbox-key"), seed.as_ref());
        let mut mailbox_secret = [0u8; 32];
        hk.expand(b"x25519", &mut mailbox_secret).unwrap();
        let public =
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(mailbox_secret));
        assert_eq!(public.to_bytes(), key.mailbox_secret().public().0);
        put(&format!("{who}.mailbox_secret"), hex(&mailbox_secret));
        put(&format!("{who}.mailbox_public"), hex(public.as_bytes()));
        put(
            &format!("{who}.mailbox_public_text"),
            key.mailbox_secret().public().to_string(),
        );
    }

    // A domain-separated signature: ed25519 over len(tag) || tag || bytes.
    let signed = alice().sign(Domain::Request, b"hello");
    let tag = Domain::Request.tag();
    let mut message = vec![u8::try_from(tag.len()).unwrap()];
    message.extend_from_slice(tag);
    message.extend_from_slice(b"hello");
    let vk = ed25519_dalek::VerifyingKey::from_bytes(alice().public().as_bytes()).unwrap();
    vk.verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&signed.0))
        .unwrap();
    put("sign.request_hello.message", hex(&message));
    put("sign.request_hello.signature", hex(&signed.0));
    put("sign.request_hello.signature_text", signed.to_string());

    // Discovery records.
    let claim = Signed::sign(
        &alice(),
        NameClaim {
            name: "alice".into(),
            node_id: alice().public(),
            mailbox_key: alice().mailbox_secret().public(),
            timestamp_ms: T,
        },
    )
    .unwrap();
    put("record.name_claim.bytes", hex(claim.bytes()));
    put("record.name_claim.signature", claim.signature().to_string());
    put(
        "record.name_claim.wire",
        serde_json::to_string(&claim.to_wire()).unwrap(),
    );
    let presence = Signed::sign(
        &alice(),
        PresenceRecord {
            node_id: alice().public(),
            name: Some("alice".into()),
            addrs: vec![
                "0.0.0.0:7000".parse().unwrap(),
                "192.0.2.10:7000".parse().unwrap(),
                "[2001:db8::10]:7000".parse().unwrap(),
            ],
            mailbox_key: alice().mailbox_secret().public(),
            timestamp_ms: T,
            ttl_secs: 300,
            relay: Some(RelayRef {
                node_id: bob().public(),
                addr: "198.51.100.1:7117".parse().unwrap(),
            }),
        },
    )
    .unwrap();
    put("record.presence.bytes", hex(presence.bytes()));
    put(
        "record.presence.signature",
        presence.signature().to_string(),
    );
    let bare = Signed::sign(
        &bob(),
        PresenceRecord {
            node_id: bob().public(),
            name: None,
            addrs: vec![],
            mailbox_key: bob().mailbox_secret().public(),
            timestamp_ms: T,
            ttl_secs: 60,
            relay: None,
        },
    )
    .unwrap();
    put("record.presence_bare.bytes", hex(bare.bytes()));
    put(
        "record.presence_bare.signature",
        bare.signature().to_string(),
    );
    let withdrawal = Signed::sign(
        &alice(),
        Withdrawal {
            node_id: alice().public(),
            timestamp_ms: T + 1,
        },
    )
    .unwrap();
    put("record.withdrawal.bytes", hex(withdrawal.bytes()));
    put(
        "record.withdrawal.signature",
        withdrawal.signature().to_string(),
    );

    // A signed mailbox request: GET /v1/mailbox/{bob} (fetch), and a delete.
    let path = format!("/v1/mailbox/{}", bob().public());
    let fetch = request_signing_bytes("GET", &path, b"", T);
    put("request.fetch.path", path.clone());
    put("request.fetch.signed_bytes", hex(&fetch));
    put(
        "request.fetch.signature",
        bob().sign(Domain::Request, &fetch).to_string(),
    );
    let body = br#"{"ids":[1,2]}"#;
    let delete_path = format!("{path}/delete");
    let delete = request_signing_bytes("POST", &delete_path, body, T);
    put(
        "request.delete.body",
        String::from_utf8_lossy(body).into_owned(),
    );
    put("request.delete.signed_bytes", hex(&delete));
    put(
        "request.delete.signature",
        bob().sign(Domain::Request, &delete).to_string(),
    );

    // Node-to-node frames.
    let msg = ChatMessage {
        id: MessageId(*b"0123456789abcdef"),
        conversation: Conversation::Direct,
        sent_at_ms: T,
        body: Body::Text("hi bob".into()),
    };
    put(
        "frame.message",
        hex(&wire::encode(&Frame::Message(msg.clone())).unwrap()),
    );
    for (name, status) in [
        ("stored", AckStatus::Stored),
        ("duplicate", AckStatus::Duplicate),
        (
            "rejected_id_conflict",
            AckStatus::Rejected(RejectCode::ID_CONFLICT),
        ),
        ("rejected_300", AckStatus::Rejected(RejectCode(300))),
    ] {
        put(
            &format!("frame.ack.{name}"),
            hex(&wire::encode(&Frame::Ack(Ack { id: msg.id, status })).unwrap()),
        );
    }

    // A sealed envelope from alice to bob carrying that message frame.
    let ephemeral = [0x03; 32];
    let payload = wire::encode(&Frame::Message(msg)).unwrap();
    let envelope = seal::seal_with_ephemeral(
        &alice(),
        &bob().public(),
        &bob().mailbox_secret().public(),
        &payload,
        &ephemeral,
    );
    let opened = seal::open(&bob(), &envelope).unwrap();
    assert_eq!(
        (opened.sender, &opened.payload),
        (alice().public(), &payload)
    );
    put("seal.ephemeral_secret", hex(&ephemeral));
    put("seal.envelope", hex(&envelope));

    // Relay frames.
    let relay_frames = [
        (
            "send",
            proto::Frame::Send {
                dst: *bob().public().as_bytes(),
                packet: bytes::Bytes::from_static(b"\x40quic"),
            },
        ),
        (
            "recv",
            proto::Frame::Recv {
                src: *alice().public().as_bytes(),
                packet: bytes::Bytes::from_static(b"\x40quic"),
            },
        ),
        (
            "observed_v4",
            proto::Frame::Observed {
                addr: "203.0.113.7:4242".parse().unwrap(),
            },
        ),
        (
            "observed_v6",
            proto::Frame::Observed {
                addr: "[2001:db8::1]:7117".parse().unwrap(),
            },
        ),
        (
            "peer_gone",
            proto::Frame::PeerGone {
                node: *bob().public().as_bytes(),
            },
        ),
        (
            "punch_report",
            proto::Frame::PunchReport {
                attempts: 3,
                successes: 1,
            },
        ),
    ];
    for (name, frame) in relay_frames {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        put(&format!("relay.{name}"), hex(&buf));
    }

    // Path probes from alice to bob.
    let probe = |kind| {
        Probe {
            from: alice().public(),
            to: bob().public(),
            tx: *b"transaction1",
            kind,
        }
        .encode(&alice())
    };
    let observed: SocketAddr = "198.51.100.4:4000".parse().unwrap();
    put("probe.ping", hex(&probe(ProbeKind::Ping)));
    put("probe.pong", hex(&probe(ProbeKind::Pong { observed })));
    put(
        "probe.call_me_maybe",
        hex(&probe(ProbeKind::CallMeMaybe {
            candidates: vec![observed, "[2001:db8::2]:4000".parse().unwrap()],
        })),
    );

    // Alice's record on the DHT, signed at T: the address above and bob as her relay.
    let relay_ref = RelayRef {
        node_id: bob().public(),
        addr: "192.0.2.1:7117".parse().unwrap(),
    };
    let keypair = pkarr::Keypair::from_secret_key(&alice().to_bytes());
    let packet = node::dht::build_packet(&keypair, &[observed], Some(relay_ref), T).unwrap();
    put("dht.alice", hex(packet.as_bytes()));
    let read = node::dht::verify(&alice().public(), packet.as_bytes(), T).unwrap();
    assert_eq!(
        (read.addrs, read.relay, read.timestamp_ms),
        (vec![observed], Some(relay_ref), T)
    );

    // Codes and limits.
    let codes: [(&str, u64); 12] = [
        ("code.close.shutdown", node::CLOSE_SHUTDOWN.into_inner()),
        (
            "code.close.bad_identity",
            endpoint::CLOSE_BAD_IDENTITY.into_inner(),
        ),
        ("code.close.protocol", endpoint::CLOSE_PROTOCOL.into_inner()),
        ("code.close.bad_frame", node::CLOSE_BAD_FRAME.into_inner()),
        (
            "code.close.unexpected_frame",
            node::CLOSE_UNEXPECTED_FRAME.into_inner(),
        ),
        (
            "code.close.too_many_connections",
            node::CLOSE_TOO_MANY_CONNECTIONS.into_inner(),
        ),
        ("code.stream.timeout", node::STREAM_TIMEOUT.into_inner()),
        (
            "code.stream.not_stored",
            node::STREAM_NOT_STORED.into_inner(),
        ),
        ("code.relay.replaced", relay::CLOSE_REPLACED.into()),
        ("code.relay.full", relay::CLOSE_FULL.into()),
        ("code.relay.protocol", relay::CLOSE_PROTOCOL.into()),
        ("code.relay.shutdown", relay::CLOSE_SHUTDOWN.into()),
    ];
    for (name, code) in codes {
        put(name, format!("0x{code:02x}"));
    }
    for (name, code) in [
        ("other", RejectCode::OTHER),
        ("unsupported_body", RejectCode::UNSUPPORTED_BODY),
        (
            "unsupported_conversation",
            RejectCode::UNSUPPORTED_CONVERSATION,
        ),
        ("too_large", RejectCode::TOO_LARGE),
        ("id_conflict", RejectCode::ID_CONFLICT),
        ("blocked", RejectCode::BLOCKED),
    ] {
        put(&format!("code.reject.{name}"), code.0.to_string());
    }
    put(
        "alpn.chat",
        String::from_utf8_lossy(wire::ALPN).into_owned(),
    );
    put(
        "alpn.relay",
        String::from_utf8_lossy(proto::ALPN).into_owned(),
    );
    // The LAN advertisement of alice serving on port 7117 (§10).
    let body = crate::discovery::mdns::AdvertBody {
        node_id: alice().public(),
        port: 7117,
        started_ms: T,
    };
    put("lan.alice_7117.body", hex(&body.bytes()));
    for (key, value) in crate::discovery::mdns::advert_txt(&alice(), 7117, T) {
        put(&format!("lan.alice_7117.txt.{key}"), value);
    }
    put("limit.max_frame_len", wire::MAX_FRAME_LEN.to_string());
    put("limit.max_text_len", wire::MAX_TEXT_LEN.to_string());
    put(
        "limit.max_record_bytes",
        p2p_discovery::MAX_RECORD_BYTES.to_string(),
    );
    put("limit.max_relay_packet", proto::MAX_PACKET_LEN.to_string());
    put(
        "limit.max_connections_per_peer",
        node::MAX_CONNECTIONS_PER_PEER.to_string(),
    );
    v
}

/// The `name = value` lines of every fenced `vectors` block of PROTOCOL.md.
fn documented() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in SPEC.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            inside = trimmed == "```vectors";
            continue;
        }
        if !inside || trimmed.is_empty() {
            continue;
        }
        let (k, v) = trimmed
            .split_once(" = ")
            .unwrap_or_else(|| panic!("not a vector line: {trimmed}"));
        assert!(
            out.insert(k.to_owned(), v.to_owned()).is_none(),
            "vector {k} is in PROTOCOL.md twice"
        );
    }
    out
}

#[test]
fn protocol_md_vectors_match_the_code() {
    let computed = computed();
    let documented = documented();
    let listing: String = computed.iter().fold(String::new(), |mut s, (k, v)| {
        let _ = writeln!(s, "{k} = {v}");
        s
    });
    for (k, v) in &computed {
        assert_eq!(
            documented.get(k),
            Some(v),
            "vector {k}: PROTOCOL.md differs from the code; the code says:\n{listing}"
        );
    }
    for k in documented.keys() {
        assert!(
            computed.contains_key(k),
            "PROTOCOL.md has a vector {k} that nothing checks"
        );
    }
}
