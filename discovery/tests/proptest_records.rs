//! Properties of signed discovery records and of the client's entry verification.

use std::net::{IpAddr, SocketAddr};

use p2p_crypto::{Domain, MailboxPublicKey, SecretKey};
use p2p_discovery::api::{ClaimEntry, PeerEntry, PresenceEntry};
use p2p_discovery::{
    resolve_addrs, verify_entry, verify_entry_at, NameClaim, PresenceRecord, Record, RecordError,
    RelayRef, Signed, SignedWire, Withdrawal, CLOCK_SKEW, MAX_ADDRS, MAX_TTL_SECS, MIN_TTL_SECS,
};
use proptest::prelude::*;

fn key() -> impl Strategy<Value = SecretKey> {
    any::<[u8; 32]>().prop_map(|s| SecretKey::from_bytes(&s))
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9_-]{1,32}"
}

/// The address as a verifier decodes it: IPv6 scope id and flow label are not encoded.
fn as_encoded(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip(), a.port())
}

fn presence(k: &SecretKey) -> impl Strategy<Value = PresenceRecord> {
    let node_id = k.public();
    (
        proptest::option::of(name()),
        proptest::collection::vec(any::<SocketAddr>(), 0..=MAX_ADDRS),
        any::<[u8; 32]>(),
        any::<u64>(),
        MIN_TTL_SECS..=MAX_TTL_SECS,
        proptest::option::of((any::<[u8; 32]>(), any::<SocketAddr>())),
    )
        .prop_map(
            move |(name, addrs, mk, timestamp_ms, ttl_secs, relay)| PresenceRecord {
                node_id,
                name,
                addrs,
                mailbox_key: MailboxPublicKey(mk),
                timestamp_ms,
                ttl_secs,
                relay: relay.map(|(seed, addr)| RelayRef {
                    node_id: SecretKey::from_bytes(&seed).public(),
                    addr,
                }),
            },
        )
}

fn claim(k: &SecretKey) -> impl Strategy<Value = NameClaim> {
    let node_id = k.public();
    (name(), any::<[u8; 32]>(), any::<u64>()).prop_map(move |(name, mk, timestamp_ms)| NameClaim {
        name,
        node_id,
        mailbox_key: MailboxPublicKey(mk),
        timestamp_ms,
    })
}

/// Signs and checks what every valid record must satisfy.
fn check_round_trip<R: Record + PartialEq + std::fmt::Debug>(
    k: &SecretKey,
    record: R,
) -> Result<Signed<R>, TestCaseError> {
    let signed = Signed::sign(k, record).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(
        postcard::to_stdvec(signed.record()).expect("encodes"),
        signed.bytes()
    );
    let back = Signed::<R>::from_wire(&signed.to_wire()).expect("verifies");
    prop_assert_eq!(&back, &signed);
    Ok(signed)
}

/// A record and a second key; the strategy gives each case its own keys.
fn keyed<S: Strategy>(
    make: impl Fn(&SecretKey) -> S + Clone + 'static,
) -> impl Strategy<Value = (SecretKey, SecretKey, S::Value)> {
    (key(), key()).prop_flat_map(move |(a, b)| {
        let rec = make(&a);
        (Just(a), Just(b), rec)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn presence_round_trips((k, _other, rec) in keyed(presence)) {
        let signed = check_round_trip(&k, rec.clone())?;
        let kept: Vec<SocketAddr> = rec.addrs.iter().copied().map(as_encoded).collect();
        prop_assert_eq!(&signed.record().addrs, &kept);
        prop_assert_eq!(&signed.record().name, &rec.name);
        prop_assert_eq!(signed.record().timestamp_ms, rec.timestamp_ms);
    }

    #[test]
    fn claim_and_withdrawal_round_trip((k, _other, rec) in keyed(claim)) {
        let signed = check_round_trip(&k, rec.clone())?;
        prop_assert_eq!(signed.record(), &rec);
        let w = Withdrawal { node_id: k.public(), timestamp_ms: rec.timestamp_ms };
        let signed = check_round_trip(&k, w.clone())?;
        prop_assert_eq!(signed.record(), &w);
    }

    #[test]
    fn tampering_and_other_signers_fail(
        (k, other, rec) in keyed(presence),
        flip_at in any::<usize>(),
        flip in 1u8..,
    ) {
        prop_assume!(k.public() != other.public());
        let signed = Signed::sign(&k, rec.clone()).expect("signs");
        let bytes = signed.bytes().to_vec();
        let mut bad = bytes.clone();
        bad[flip_at % bytes.len()] ^= flip;
        prop_assert!(Signed::<PresenceRecord>::verify(bad, *signed.signature()).is_err());
        // Signed by another key, or under another record kind's domain.
        let forged = other.sign(Domain::PeerRecord, &bytes);
        prop_assert_eq!(
            Signed::<PresenceRecord>::verify(bytes.clone(), forged),
            Err(RecordError::BadSignature { node_id: k.public() })
        );
        let wrong_domain = k.sign(Domain::NameClaim, &bytes);
        prop_assert!(Signed::<PresenceRecord>::verify(bytes, wrong_domain).is_err());
        // Another key cannot sign a record naming this node.
        let refused = Signed::sign(&other, rec);
        prop_assert!(matches!(refused, Err(RecordError::NodeMismatch { .. })), "{:?}", refused);
    }

    #[test]
    fn out_of_bounds_records_are_refused(
        (k, _other, rec) in keyed(presence),
        extra in proptest::collection::vec(any::<SocketAddr>(), MAX_ADDRS + 1..MAX_ADDRS + 4),
        ttl in prop_oneof![0..MIN_TTL_SECS, MAX_TTL_SECS + 1..],
        bad_name in "[A-Z ./é]{1,4}|[a-z]{33,40}",
    ) {
        for broken in [
            PresenceRecord { addrs: extra, ..rec.clone() },
            PresenceRecord { ttl_secs: ttl, ..rec.clone() },
            PresenceRecord { name: Some(bad_name), ..rec },
        ] {
            prop_assert!(Signed::sign(&k, broken.clone()).is_err());
            // Even validly signed by the right key, a verifier refuses it.
            let bytes = postcard::to_stdvec(&broken).expect("encodes");
            let sig = k.sign(Domain::PeerRecord, &bytes);
            prop_assert!(Signed::<PresenceRecord>::verify(bytes, sig).is_err());
        }
    }

    #[test]
    fn verify_entry_reports_only_verified_data(
        (k, other, (c, p)) in keyed(|k| (claim(k), presence(k))),
        observed in proptest::option::of(any::<IpAddr>()),
    ) {
        prop_assume!(k.public() != other.public());
        let c = Signed::sign(&k, c).expect("claim");
        let p = Signed::sign(&k, p).expect("presence");
        let claim_entry = |s: &Signed<NameClaim>| ClaimEntry {
            record: s.to_wire().record,
            signature: *s.signature(),
            decoded: None,
        };
        let presence_entry = |s: &Signed<PresenceRecord>| PresenceEntry {
            record: s.to_wire().record,
            signature: *s.signature(),
            observed_ip: observed,
            expires_in_secs: 0,
            decoded: None,
        };
        let entry = PeerEntry {
            node_id: k.public(),
            claim: Some(claim_entry(&c)),
            presence: Some(presence_entry(&p)),
        };
        // Checked at the presence's own time, when it is live.
        let now = p.record().timestamp_ms;
        let info = verify_entry_at(&entry, Some(&k.public()), Some(&c.record().name), now)
            .expect("verifies");
        prop_assert_eq!(info.node_id, k.public());
        prop_assert_eq!(info.name.as_deref(), Some(c.record().name.as_str()));
        prop_assert!(info.online);
        prop_assert_eq!(&info.announced_addrs, &p.record().addrs);
        prop_assert_eq!(&info.addrs, &resolve_addrs(&p.record().addrs, observed));
        prop_assert_eq!(info.timestamp_ms, c.record().timestamp_ms.max(p.record().timestamp_ms));
        let newest_key = if p.record().timestamp_ms >= c.record().timestamp_ms {
            p.record().mailbox_key
        } else {
            c.record().mailbox_key
        };
        prop_assert_eq!(info.mailbox_key, newest_key);
        // Long after it expired, or long before it was made, the presence is ignored
        // (the node counts as offline) while the claim still verifies.
        let ttl_ms = u64::from(p.record().ttl_secs) * 1000;
        let skew = u64::try_from(CLOCK_SKEW.as_millis()).expect("small");
        for when in [
            now.checked_add(ttl_ms + skew + 1),
            now.checked_sub(skew + 1),
        ]
        .into_iter()
        .flatten()
        {
            let stale = verify_entry_at(&entry, Some(&k.public()), None, when).expect("claim verifies");
            prop_assert!(!stale.online);
            prop_assert!(stale.addrs.is_empty());
        }

        // The same records filed under another node, or asked about as another node.
        let misfiled = PeerEntry { node_id: other.public(), ..entry.clone() };
        prop_assert!(verify_entry(&misfiled, None, None).is_err());
        prop_assert!(verify_entry(&entry, Some(&other.public()), None).is_err());
        // A record with its signature swapped for another valid one fails.
        let swapped = PeerEntry {
            presence: Some(PresenceEntry { signature: *c.signature(), ..presence_entry(&p) }),
            ..entry.clone()
        };
        prop_assert!(verify_entry(&swapped, None, None).is_err());
        let wire = SignedWire { record: c.to_wire().record, signature: *p.signature() };
        prop_assert!(Signed::<NameClaim>::from_wire(&wire).is_err());
    }

    #[test]
    fn resolved_addrs_come_from_the_signed_ones(
        announced in proptest::collection::vec(any::<SocketAddr>(), 0..=MAX_ADDRS),
        observed in proptest::option::of(any::<IpAddr>()),
    ) {
        let out = resolve_addrs(&announced, observed);
        prop_assert!(out.len() <= announced.len());
        for (i, a) in out.iter().enumerate() {
            prop_assert!(!out[..i].contains(a), "duplicate {}", a);
            let as_is = announced.contains(a) && !a.ip().is_unspecified();
            let filled = observed == Some(a.ip())
                && !a.ip().is_unspecified()
                && announced.iter().any(|s| s.ip().is_unspecified() && s.port() == a.port());
            prop_assert!(as_is || filled, "{} from nowhere", a);
        }
    }
}
