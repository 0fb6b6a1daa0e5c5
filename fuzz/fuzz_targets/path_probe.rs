//! `p2p_node::net::probe`: the path-probe decoder (hole punching) on arbitrary datagrams,
//! and structured probes signed with a fixed key.
//!
//! Invariants:
//! - `Probe::decode` never panics; it accepts only datagrams that start with the magic,
//!   are at most `MAX_PROBE_LEN`, and carry a signature by the probe's `from` key; what
//!   it accepts never has more than `MAX_CANDIDATES` candidates;
//! - a probe signed by its sender decodes to itself; signed by anyone else, or with any
//!   byte changed after the magic, it does not decode to a probe from the fixed key with
//!   other content.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use p2p_fuzz::{fixed_key, other_key};
use p2p_node::net::probe::{is_probe, Probe, ProbeKind, MAX_CANDIDATES, MAX_PROBE_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        check_datagram(rest);
    } else {
        let _ = check_structured(&mut Unstructured::new(rest));
    }
});

fn check_datagram(datagram: &[u8]) {
    if let Ok(p) = Probe::decode(datagram) {
        assert!(is_probe(datagram));
        assert!(datagram.len() <= MAX_PROBE_LEN);
        if let ProbeKind::CallMeMaybe { candidates } = &p.kind {
            assert!(candidates.len() <= MAX_CANDIDATES);
        }
    }
}

fn addr(u: &mut Unstructured<'_>) -> arbitrary::Result<std::net::SocketAddr> {
    // The wire form has no IPv6 scope id or flow label.
    let a = std::net::SocketAddr::arbitrary(u)?;
    Ok(std::net::SocketAddr::new(a.ip(), a.port()))
}

fn check_structured(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let (me, other) = (fixed_key(), other_key());
    let kind = match u.int_in_range(0..=2)? {
        0 => ProbeKind::Ping,
        1 => ProbeKind::Pong { observed: addr(u)? },
        _ => {
            let n = u.int_in_range(0..=MAX_CANDIDATES)?;
            ProbeKind::CallMeMaybe {
                candidates: (0..n).map(|_| addr(u)).collect::<arbitrary::Result<_>>()?,
            }
        }
    };
    let probe = Probe {
        from: me.public(),
        to: other.public(),
        tx: <[u8; 12]>::arbitrary(u)?,
        kind,
    };
    let bytes = probe.encode(&me);
    assert_eq!(Probe::decode(&bytes).as_ref(), Ok(&probe));
    // Signed by another key than `from`: refused.
    assert!(Probe::decode(&probe.encode(&other)).is_err());
    // One changed byte after the magic: refused, or (never) another probe from `me`.
    let at = u.int_in_range(8..=bytes.len().saturating_sub(1))?;
    let mut changed = bytes.clone();
    changed[at] ^= u.int_in_range(1..=255)?;
    if let Ok(p) = Probe::decode(&changed) {
        assert!(
            p.from != me.public() || p == probe,
            "a forged probe decoded"
        );
    }
    Ok(())
}
