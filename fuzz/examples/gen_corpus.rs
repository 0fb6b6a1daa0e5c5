//! Writes the seed corpus: real encoded frames, records, API bodies, envelopes and key
//! files, each prefixed with the mode byte of the target that reads it.
//!
//! Run from `fuzz/`: `cargo run --example gen_corpus` (rewrites `corpus/<target>/seed-*`).

use std::fs;
use std::path::Path;

use p2p_crypto::{keyfile, seal, SecretKey};
use p2p_discovery::api::{
    ClaimEntry, ClaimResponse, ErrorBody, OnlineResponse, PeerEntry, PresenceEntry,
};
use p2p_discovery::{NameClaim, PresenceRecord, RelayRef, Signed, Withdrawal};
use p2p_fuzz::{
    fixed_key, frame_mode, json_kind, keyfile_mode, keyfile_plain, keyfile_sealed, record_mode,
    seal_mode, Sealing,
};
use p2p_node::wire::{
    encode, Ack, AckStatus, Body, ChatMessage, Conversation, Frame, MessageId, RejectCode,
    HEADER_LEN,
};

type Seeds = Vec<(String, Vec<u8>)>;
type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in [
        ("frame_decode", frame_seeds()?),
        ("discovery_record", record_seeds()?),
        ("seal_open", seal_seeds()?),
        ("keyfile_decode", keyfile_seeds()?),
        ("relay_frame", relay_seeds()?),
        ("path_probe", probe_seeds()?),
        ("write_log", write_log_seeds()),
    ] {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        for old in fs::read_dir(&dir)? {
            let old = old?.path();
            if old
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            {
                fs::remove_file(old)?;
            }
        }
        for (name, bytes) in &seeds {
            fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
        println!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

/// Three seeds of deterministic filler bytes for a structured mode.
/// Arbitrary payloads framed as records (mode 1) and arbitrary batches of message writes
/// (mode 2): the target builds the log from them.
fn write_log_seeds() -> Seeds {
    let mut seeds = Seeds::new();
    for (mode, kind) in [(1u8, "payloads"), (2, "writes")] {
        for (i, len) in [64usize, 160, 400].into_iter().enumerate() {
            seeds.push((
                format!("{kind}-{i}"),
                with_mode(mode, &filler(91 + u32::from(mode) * 7 + i as u32, len)),
            ));
        }
    }
    seeds
}

fn structured_seeds(seeds: &mut Seeds, mode: u8, salt: u32, first: usize, step: usize) {
    for i in 0..3u32 {
        let len = first + step * i as usize;
        seeds.push((
            format!("structured-{i}"),
            with_mode(mode, &filler(salt + i, len)),
        ));
    }
}

/// Deterministic filler bytes for the structured modes.
fn filler(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn frames() -> Vec<(&'static str, Frame)> {
    let msg = |text: &str| {
        Frame::Message(ChatMessage {
            id: MessageId([0x11; 16]),
            conversation: Conversation::Direct,
            sent_at_ms: 1_700_000_000_000,
            body: Body::Text(text.to_owned()),
        })
    };
    let ack = |status| {
        Frame::Ack(Ack {
            id: MessageId([0x22; 16]),
            status,
        })
    };
    vec![
        ("msg-hello", msg("hello")),
        ("msg-empty", msg("")),
        ("msg-unicode", msg("ünïcödé ✓ 🎉")),
        ("msg-long", msg(&"x".repeat(300))),
        ("ack-stored", ack(AckStatus::Stored)),
        ("ack-duplicate", ack(AckStatus::Duplicate)),
        (
            "ack-rejected",
            ack(AckStatus::Rejected(RejectCode::ID_CONFLICT)),
        ),
        (
            "ack-rejected-unknown",
            ack(AckStatus::Rejected(RejectCode(65535))),
        ),
    ]
}

fn frame_seeds() -> Result<Seeds> {
    let mut seeds = Seeds::new();
    let mut stream = Vec::new();
    for (name, f) in frames() {
        let bytes = encode(&f)?;
        seeds.push((
            format!("payload-{name}"),
            with_mode(frame_mode::PAYLOAD, &bytes[HEADER_LEN..]),
        ));
        stream.extend_from_slice(&bytes);
    }
    seeds.push(("stream-all".into(), with_mode(frame_mode::STREAM, &stream)));
    let two = encode(&frames()[0].1)?;
    seeds.push((
        "stream-truncated".into(),
        with_mode(
            frame_mode::STREAM,
            &[&two[..], &two[..two.len() - 3]].concat(),
        ),
    ));
    seeds.push((
        "stream-oversize-header".into(),
        with_mode(frame_mode::STREAM, &[0, 1, 0, 1, 0, 0]),
    ));
    structured_seeds(&mut seeds, frame_mode::STRUCTURED, 0, 64, 64);
    Ok(seeds)
}

fn signed_records() -> Result<(
    Signed<PresenceRecord>,
    Signed<NameClaim>,
    Signed<Withdrawal>,
)> {
    let sk = fixed_key();
    let presence = Signed::sign(
        &sk,
        PresenceRecord {
            node_id: sk.public(),
            name: Some("alice".into()),
            addrs: vec![
                "0.0.0.0:4000".parse()?,
                "[2001:db8::1]:4001".parse()?,
                "192.0.2.7:4002".parse()?,
            ],
            mailbox_key: sk.mailbox_secret().public(),
            timestamp_ms: 1_700_000_000_000,
            ttl_secs: 60,
            relay: Some(RelayRef {
                node_id: SecretKey::from_bytes(&[9; 32]).public(),
                addr: "198.51.100.9:7117".parse()?,
            }),
        },
    )?;
    let claim = Signed::sign(
        &sk,
        NameClaim {
            name: "alice".into(),
            node_id: sk.public(),
            mailbox_key: sk.mailbox_secret().public(),
            timestamp_ms: 1_700_000_000_000,
        },
    )?;
    let withdrawal = Signed::sign(
        &sk,
        Withdrawal {
            node_id: sk.public(),
            timestamp_ms: 1_700_000_000_001,
        },
    )?;
    Ok((presence, claim, withdrawal))
}

fn record_seeds() -> Result<Seeds> {
    let (presence, claim, withdrawal) = signed_records()?;
    let mut seeds = Seeds::new();
    for (name, sig, bytes) in [
        (
            "presence",
            presence.signature().to_bytes(),
            presence.bytes(),
        ),
        ("claim", claim.signature().to_bytes(), claim.bytes()),
        (
            "withdrawal",
            withdrawal.signature().to_bytes(),
            withdrawal.bytes(),
        ),
    ] {
        seeds.push((
            format!("raw-{name}"),
            with_mode(record_mode::RAW, &[&sig[..], bytes].concat()),
        ));
        seeds.push((
            format!("self-signed-{name}"),
            with_mode(record_mode::SELF_SIGNED, bytes),
        ));
    }
    structured_seeds(&mut seeds, record_mode::STRUCTURED, 100, 96, 64);

    let claim_entry = ClaimEntry {
        record: claim.to_wire().record,
        signature: *claim.signature(),
        decoded: Some(claim.record().clone()),
    };
    let presence_entry = PresenceEntry {
        record: presence.to_wire().record,
        signature: *presence.signature(),
        observed_ip: Some("198.51.100.9".parse()?),
        expires_in_secs: 60,
        decoded: None,
    };
    let entry = PeerEntry {
        node_id: fixed_key().public(),
        claim: Some(claim_entry.clone()),
        presence: Some(presence_entry.clone()),
    };
    let offline = PeerEntry {
        presence: None,
        ..entry.clone()
    };
    // The seeds must verify, or the target's checks on verified entries never run.
    p2p_discovery::verify_entry(&entry, Some(&fixed_key().public()), Some("alice"))?;
    p2p_discovery::verify_entry(&offline, None, None)?;
    let json =
        |kind: u8, v: &dyn erased::Json| -> std::result::Result<Vec<u8>, serde_json::Error> {
            Ok(with_mode(
                record_mode::JSON,
                &with_mode(kind, &v.to_json()?),
            ))
        };
    seeds.push((
        "json-peer-entry".into(),
        json(json_kind::PEER_ENTRY, &entry)?,
    ));
    seeds.push((
        "json-peer-entry-offline".into(),
        json(json_kind::PEER_ENTRY, &offline)?,
    ));
    seeds.push((
        "json-online".into(),
        json(
            json_kind::ONLINE,
            &OnlineResponse {
                peers: vec![entry, offline],
                next_cursor: Some("abc".into()),
            },
        )?,
    ));
    seeds.push((
        "json-signed-wire".into(),
        json(json_kind::SIGNED_WIRE, &withdrawal.to_wire())?,
    ));
    seeds.push((
        "json-claim-response".into(),
        json(
            json_kind::CLAIM_RESPONSE,
            &ClaimResponse {
                changed: true,
                claim: claim_entry,
            },
        )?,
    ));
    seeds.push((
        "json-error".into(),
        json(
            json_kind::OTHER,
            &ErrorBody {
                error: "rate_limited".into(),
                message: "slow down".into(),
            },
        )?,
    ));
    seeds.push((
        "json-mailbox".into(),
        with_mode(
            record_mode::JSON,
            &with_mode(
                json_kind::OTHER,
                br#"{"items":[{"id":1,"envelope":"AQID"}],"more":false}"#,
            ),
        ),
    ));
    Ok(seeds)
}

/// `serde_json::to_vec` behind a trait object, so the seeds above can share one helper.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Result<Vec<u8>, serde_json::Error>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
            serde_json::to_vec(self)
        }
    }
}

fn seal_seeds() -> Result<Seeds> {
    let to = fixed_key();
    let from = SecretKey::from_bytes(&[3; 32]);
    let mut seeds = Seeds::new();
    let frame = encode(&frames()[0].1)?;
    for (name, payload) in [
        ("empty", &b""[..]),
        ("text", b"hello offline world"),
        ("frame", &frame[HEADER_LEN..]),
    ] {
        let env = seal::seal(&from, &to.public(), &to.mailbox_secret().public(), payload);
        assert_eq!(
            seal::open(&to, &env)?.payload,
            payload,
            "seed envelope opens"
        );
        seeds.push((format!("raw-{name}"), with_mode(seal_mode::RAW, &env)));
    }
    structured_seeds(&mut seeds, seal_mode::STRUCTURED, 200, 80, 40);
    Ok(seeds)
}

fn keyfile_seeds() -> Result<Seeds> {
    let mut seeds = Seeds::new();
    let dir = tempfile::tempdir()?;
    // Files written by the production code (the protected one with production KDF
    // parameters: the target decodes it without a passphrase only).
    let key = SecretKey::from_bytes(&[9; 32]);
    for (name, pass) in [("plain", None), ("protected", Some(&b"correct horse"[..]))] {
        let path = dir.path().join(name);
        keyfile::store(&path, &key, pass, false)?;
        let bytes = fs::read(&path)?;
        seeds.push((
            format!("raw-store-{name}"),
            with_mode(keyfile_mode::RAW, &bytes),
        ));
    }
    let model_plain = keyfile_plain(&[7; 32]);
    let model_sealed = keyfile_sealed(
        &[7; 32],
        &Sealing {
            passphrase: b"fuzz passphrase",
            m_cost: 8,
            t_cost: 1,
            p_cost: 1,
            salt: [1; 16],
            nonce: [2; 12],
        },
    )
    .ok_or("model sealing failed")?;
    for (name, bytes) in [("plain", &model_plain), ("sealed-tiny", &model_sealed)] {
        seeds.push((
            format!("raw-model-{name}"),
            with_mode(keyfile_mode::RAW, bytes),
        ));
        seeds.push((
            format!("fix-checksum-{name}"),
            with_mode(keyfile_mode::FIX_CHECKSUM, &bytes[..bytes.len() - 32]),
        ));
    }
    structured_seeds(&mut seeds, keyfile_mode::STRUCTURED, 300, 96, 32);
    Ok(seeds)
}

/// Relay frames of every kind, as one stream and one by one (mode 0, a chunk byte), and
/// structured inputs (mode 1).
fn relay_seeds() -> Result<Seeds> {
    use p2p_discovery::relay::proto::Frame;
    let key = *fixed_key().public().as_bytes();
    let frames = [
        (
            "send",
            Frame::Send {
                dst: key,
                packet: bytes::Bytes::from_static(&[0xc3; 40]),
            },
        ),
        (
            "recv",
            Frame::Recv {
                src: key,
                packet: bytes::Bytes::from_static(&[0x41; 1200]),
            },
        ),
        (
            "observed",
            Frame::Observed {
                addr: "198.51.100.7:4000".parse()?,
            },
        ),
        (
            "observed6",
            Frame::Observed {
                addr: "[2001:db8::7]:4000".parse()?,
            },
        ),
        ("gone", Frame::PeerGone { node: key }),
        (
            "report",
            Frame::PunchReport {
                attempts: 3,
                successes: 1,
            },
        ),
    ];
    let mut seeds = Seeds::new();
    let mut all = bytes::BytesMut::new();
    for (name, f) in &frames {
        let mut one = bytes::BytesMut::new();
        f.encode(&mut one)?;
        f.encode(&mut all)?;
        let mut input = vec![0u8, 5];
        input.extend_from_slice(&one);
        seeds.push((format!("frame-{name}"), input));
    }
    let mut input = vec![0u8, 3];
    input.extend_from_slice(&all);
    seeds.push(("stream".into(), input));
    structured_seeds(&mut seeds, 1, 61, 48, 64);
    Ok(seeds)
}

/// Probes of every kind signed by the fixed key (mode 0), and structured inputs (mode 1).
fn probe_seeds() -> Result<Seeds> {
    use p2p_node::net::probe::{Probe, ProbeKind};
    let (me, other) = (fixed_key(), p2p_fuzz::other_key());
    let kinds = [
        ("ping", ProbeKind::Ping),
        (
            "pong",
            ProbeKind::Pong {
                observed: "198.51.100.7:4000".parse()?,
            },
        ),
        (
            "call-me-maybe",
            ProbeKind::CallMeMaybe {
                candidates: vec!["198.51.100.7:4000".parse()?, "[2001:db8::7]:4001".parse()?],
            },
        ),
    ];
    let mut seeds = Seeds::new();
    for (name, kind) in kinds {
        let p = Probe {
            from: me.public(),
            to: other.public(),
            tx: [7; 12],
            kind,
        };
        seeds.push((format!("probe-{name}"), with_mode(0, &p.encode(&me))));
    }
    structured_seeds(&mut seeds, 1, 67, 32, 48);
    Ok(seeds)
}
