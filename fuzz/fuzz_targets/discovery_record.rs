//! `p2p_discovery` records: `Signed::verify` / `Signed::from_wire` on raw bytes, records
//! signed by the target itself, structured records, and the JSON bodies the client parses
//! (`verify_entry` on peer entries).
//!
//! Invariants:
//! - nothing panics;
//! - a record that verifies is valid, is signed by its own node, and re-encodes to
//!   exactly the bytes that were signed (one encoding per record);
//! - a structured record signs iff it is within bounds and signed by its own key, and
//!   then `from_wire(to_wire(x)) == x`; any changed byte or signature fails, and the
//!   signature does not verify under another record kind's domain;
//! - `verify_entry` returns only what verified records say, for the node asked about,
//!   and a node is online only with a live presence record.

#![no_main]

use std::fmt::Debug;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use p2p_crypto::Signature;
use p2p_discovery::api::{
    AnnounceResponse, ClaimResponse, DeleteResponse, DepositResponse, ErrorBody, MailboxResponse,
    OnlineResponse, PeerEntry, WithdrawResponse,
};
use p2p_discovery::{
    validate_name, verify_entry_at, NameClaim, PresenceRecord, Record, RecordError, Signed,
    SignedWire, Withdrawal, MAX_ADDRS, MAX_RECORD_BYTES,
};
use p2p_fuzz::{
    arbitrary_claim, arbitrary_presence, arbitrary_withdrawal, fixed_key, json_kind, record_mode,
};

/// The clock `verify_entry_at` is given: the time the seed records were made at.
const NOW_MS: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % record_mode::COUNT {
        record_mode::RAW => {
            let (sig, bytes) = rest.split_at(rest.len().min(64));
            let mut s = [0u8; 64];
            s[..sig.len()].copy_from_slice(sig);
            check_raw::<PresenceRecord>(bytes, Signature(s));
            check_raw::<NameClaim>(bytes, Signature(s));
            check_raw::<Withdrawal>(bytes, Signature(s));
        }
        record_mode::SELF_SIGNED => {
            check_self_signed::<PresenceRecord>(rest);
            check_self_signed::<NameClaim>(rest);
            check_self_signed::<Withdrawal>(rest);
        }
        record_mode::STRUCTURED => {
            let _ = check_structured(&mut Unstructured::new(rest));
        }
        _ => check_json(rest),
    }
});

/// A record that verified: the invariants every accepted record keeps.
fn check_verified<R: Record + PartialEq + Debug>(signed: &Signed<R>, signed_bytes: &[u8]) {
    assert_eq!(signed.bytes(), signed_bytes);
    assert!(signed.bytes().len() <= MAX_RECORD_BYTES);
    signed
        .record()
        .validate()
        .expect("a verified record is valid");
    let canonical = postcard::to_stdvec(signed.record()).expect("re-encodes");
    assert_eq!(
        canonical, signed_bytes,
        "a verified record re-encodes to exactly the signed bytes"
    );
    let wire = signed.to_wire();
    let back = Signed::<R>::from_wire(&wire).expect("the wire form verifies again");
    assert_eq!(&back, signed);
}

fn check_raw<R: Record + PartialEq + Debug>(bytes: &[u8], sig: Signature) {
    match Signed::<R>::verify(bytes.to_vec(), sig) {
        Ok(signed) => check_verified(&signed, bytes),
        Err(RecordError::TooLarge { len, max }) => {
            assert_eq!(max, MAX_RECORD_BYTES);
            assert!(len > max && bytes.len() > max);
        }
        Err(_) => {}
    }
    // The same bytes as JSON wire text.
    let wire = SignedWire {
        record: data_encoding::BASE64URL_NOPAD.encode(bytes),
        signature: sig,
    };
    let _ = Signed::<R>::from_wire(&wire);
}

/// Signs the raw bytes with the fixed key, so only the decoder stands between them and
/// acceptance: whatever it accepts must be the one encoding of its record.
fn check_self_signed<R: Record + PartialEq + Debug>(bytes: &[u8]) {
    let sig = fixed_key().sign(R::DOMAIN, bytes);
    match Signed::<R>::verify(bytes.to_vec(), sig) {
        Ok(signed) => {
            assert_eq!(signed.record().signer(), fixed_key().public());
            check_verified(&signed, bytes);
        }
        Err(RecordError::BadSignature { node_id }) => {
            assert_ne!(node_id, fixed_key().public(), "own signature refused");
        }
        Err(_) => {}
    }
}

fn check_structured(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let flip_at = u.arbitrary::<usize>()?;
    let flip = u.arbitrary::<u8>()? | 1;
    match u.int_in_range(0..=2)? {
        0 => check_signing(arbitrary_presence(u)?, flip_at, flip),
        1 => check_signing(arbitrary_claim(u)?, flip_at, flip),
        _ => check_signing(arbitrary_withdrawal(u)?, flip_at, flip),
    }
    Ok(())
}

fn check_signing<R: Record + PartialEq + Debug>(record: R, flip_at: usize, flip: u8) {
    let key = fixed_key();
    let signed = match Signed::sign(&key, record.clone()) {
        Ok(s) => s,
        Err(RecordError::NodeMismatch { .. }) => {
            assert_ne!(record.signer(), key.public());
            return;
        }
        Err(RecordError::TooLarge { .. }) => {
            let len = postcard::to_stdvec(&record).expect("encodes").len();
            assert!(len > MAX_RECORD_BYTES);
            return;
        }
        Err(e) => {
            assert_eq!(record.validate(), Err(e), "sign refused a valid record");
            return;
        }
    };
    assert_eq!(record.signer(), key.public());
    // The signed record is the input as encoding keeps it (an IPv6 scope id is dropped).
    let bytes = postcard::to_stdvec(&record).expect("encodes");
    let kept: R = postcard::from_bytes(&bytes).expect("decodes");
    assert_eq!(signed.record(), &kept);
    check_verified(&signed, &bytes);

    // Any changed byte of the record or of the signature fails.
    let mut bad = bytes.clone();
    let i = flip_at % bad.len();
    bad[i] ^= flip;
    assert!(Signed::<R>::verify(bad, *signed.signature()).is_err());
    let mut sig = signed.signature().to_bytes();
    sig[flip_at % 64] ^= flip;
    assert!(Signed::<R>::verify(bytes.clone(), Signature(sig)).is_err());

    // The signature is bound to this record kind.
    let sig = *signed.signature();
    assert!(
        Signed::<PresenceRecord>::verify(bytes.clone(), sig).is_err()
            || R::DOMAIN == PresenceRecord::DOMAIN
    );
    assert!(
        Signed::<NameClaim>::verify(bytes.clone(), sig).is_err() || R::DOMAIN == NameClaim::DOMAIN
    );
    assert!(Signed::<Withdrawal>::verify(bytes, sig).is_err() || R::DOMAIN == Withdrawal::DOMAIN);
}

fn check_json(data: &[u8]) {
    let Some((&kind, json)) = data.split_first() else {
        return;
    };
    match kind % json_kind::COUNT {
        json_kind::PEER_ENTRY => {
            if let Ok(entry) = serde_json::from_slice::<PeerEntry>(json) {
                check_entry(&entry);
            }
        }
        json_kind::ONLINE => {
            if let Ok(online) = serde_json::from_slice::<OnlineResponse>(json) {
                for entry in &online.peers {
                    check_entry(entry);
                }
            }
        }
        json_kind::SIGNED_WIRE => {
            if let Ok(wire) = serde_json::from_slice::<SignedWire>(json) {
                check_wire::<PresenceRecord>(&wire);
                check_wire::<NameClaim>(&wire);
                check_wire::<Withdrawal>(&wire);
            }
        }
        json_kind::CLAIM_RESPONSE => {
            if let Ok(resp) = serde_json::from_slice::<ClaimResponse>(json) {
                let wire = SignedWire {
                    record: resp.claim.record,
                    signature: resp.claim.signature,
                };
                check_wire::<NameClaim>(&wire);
            }
        }
        _ => {
            let _ = serde_json::from_slice::<AnnounceResponse>(json);
            let _ = serde_json::from_slice::<WithdrawResponse>(json);
            let _ = serde_json::from_slice::<MailboxResponse>(json);
            let _ = serde_json::from_slice::<DepositResponse>(json);
            let _ = serde_json::from_slice::<DeleteResponse>(json);
            let _ = serde_json::from_slice::<ErrorBody>(json);
        }
    }
}

fn check_wire<R: Record + PartialEq + Debug>(wire: &SignedWire) {
    if let Ok(signed) = Signed::<R>::from_wire(wire) {
        let bytes = signed.bytes().to_vec();
        check_verified(&signed, &bytes);
        assert_eq!(&signed.to_wire(), wire, "the wire form is canonical");
    }
}

fn check_entry(entry: &PeerEntry) {
    for (expect_node, expect_name) in [
        (None, None),
        (Some(entry.node_id), None),
        (Some(fixed_key().public()), Some("alice")),
    ] {
        // A fixed clock (the seeds' time), so every input replays the same way.
        let Ok(info) = verify_entry_at(entry, expect_node.as_ref(), expect_name, NOW_MS) else {
            continue;
        };
        assert_eq!(info.node_id, entry.node_id);
        if let Some(n) = expect_node {
            assert_eq!(info.node_id, n);
        }
        if let Some(name) = expect_name {
            assert_eq!(info.name.as_deref(), Some(name));
        }
        if let Some(name) = &info.name {
            validate_name(name).expect("a verified name is valid");
        }
        // Online only with a live presence record (an expired or future one is
        // ignored); an offline node has no addresses.
        assert!(!info.online || entry.presence.is_some());
        if !info.online {
            assert!(info.addrs.is_empty() && info.announced_addrs.is_empty());
        }
        assert!(info.announced_addrs.len() <= MAX_ADDRS);
        assert!(info.addrs.len() <= info.announced_addrs.len());
        for addr in &info.addrs {
            let signed_as_is = info.announced_addrs.contains(addr);
            let substituted = info.observed_ip == Some(addr.ip())
                && info
                    .announced_addrs
                    .iter()
                    .any(|a| a.ip().is_unspecified() && a.port() == addr.port());
            assert!(signed_as_is || substituted, "address {addr} from nowhere");
        }
    }
}
