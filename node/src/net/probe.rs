//! Path probes: the signed packets two nodes exchange to find and keep a direct path
//! (hole punching).
//!
//! A probe travels as a UDP datagram on the node's QUIC socket (or inside a relay frame)
//! and is told apart from QUIC by its first bytes:
//!
//! ```text
//! probe = MAGIC (8 bytes: 00 "p2p-prb") || body || signature (64 bytes)
//! body  = postcard(Probe { from, to, tx, kind })
//! signature = ed25519 by `from` over body, domain "p2p-node/v1/path-probe"
//! ```
//!
//! QUIC packets always have the fixed bit (0x40) set in their first byte (the node never
//! negotiates greasing it), so a datagram starting with 0x00 is never QUIC. Kinds:
//!
//! - `Ping`: "are you there, at the address this reaches?" Answered by a `Pong` with the
//!   same `tx`, sent back to the address the ping came from.
//! - `Pong { observed }`: the answer, carrying the address the ping came from (the
//!   pinger's address as the peer sees it). A pong from the address that was pinged
//!   validates that address as a direct path in both directions.
//! - `CallMeMaybe { candidates }`: sent through the relay: "ping me at these addresses
//!   now". Both sides then ping each other's candidates at the same time, which opens
//!   their NATs' mappings for each other (hole punching).
//!
//! Every probe names its sender and its recipient and is signed, so a probe can neither
//! be forged nor redirected to another node, and only the peer itself can validate a
//! path to it.

use std::net::SocketAddr;

use p2p_crypto::{Domain, NodeId, SecretKey, Signature};
use serde::{Deserialize, Serialize};

/// First bytes of every probe.
pub const MAGIC: [u8; 8] = *b"\x00p2p-prb";

/// Largest probe accepted.
pub const MAX_PROBE_LEN: usize = 1024;

/// Most candidate addresses in one `CallMeMaybe`.
pub const MAX_CANDIDATES: usize = 16;

const SIG_LEN: usize = 64;

/// A transaction id, echoed by the pong.
pub type TxId = [u8; 12];

/// What a probe says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeKind {
    /// Are you there, at the address this reaches?
    Ping,
    /// Yes: the answer to the ping with the same `tx`.
    Pong {
        /// The address the ping came from.
        observed: SocketAddr,
    },
    /// Ping me at these addresses now (sent through the relay).
    CallMeMaybe {
        /// The sender's candidate addresses (at most [`MAX_CANDIDATES`]).
        candidates: Vec<SocketAddr>,
    },
}

/// One probe, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// The sender, whose key signs the probe.
    pub from: NodeId,
    /// The node it is for; others ignore it.
    pub to: NodeId,
    /// Chosen by the pinger, echoed by the pong.
    pub tx: TxId,
    /// What it says.
    pub kind: ProbeKind,
}

/// Why a datagram is not a valid probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)]
pub enum ProbeError {
    #[error("not a probe")]
    NotProbe,
    #[error("probe of {0} bytes is outside the allowed size")]
    Size(usize),
    #[error("probe does not decode")]
    Decode,
    #[error("probe carries {0} candidates, more than allowed")]
    TooManyCandidates(usize),
    #[error("probe signature does not verify")]
    BadSignature,
}

/// Whether a datagram is a probe (by its magic; not yet verified).
pub fn is_probe(datagram: &[u8]) -> bool {
    datagram.starts_with(&MAGIC)
}

/// The sender a datagram names, read without checking its signature: a hint for where
/// the probe is handled (see `Shared::on_probe_datagram`), never trusted.
pub fn named_sender(datagram: &[u8]) -> Option<NodeId> {
    let (probe, _, _) = Probe::parse(datagram).ok()?;
    Some(probe.from)
}

impl Probe {
    /// Splits a datagram into its decoded probe, the signed body and the signature,
    /// checking sizes and encoding only: nothing is verified.
    fn parse(datagram: &[u8]) -> Result<(Probe, &[u8], &[u8]), ProbeError> {
        let rest = datagram.strip_prefix(&MAGIC).ok_or(ProbeError::NotProbe)?;
        if datagram.len() > MAX_PROBE_LEN || rest.len() <= SIG_LEN {
            return Err(ProbeError::Size(datagram.len()));
        }
        let (body, sig) = rest.split_at(rest.len() - SIG_LEN);
        let (probe, trailing) =
            postcard::take_from_bytes::<Probe>(body).map_err(|_| ProbeError::Decode)?;
        if !trailing.is_empty() {
            return Err(ProbeError::Decode);
        }
        Ok((probe, body, sig))
    }

    /// Encodes and signs. `secret` must be the key of `self.from`.
    pub fn encode(&self, secret: &SecretKey) -> Vec<u8> {
        // A probe of bounded fields always encodes.
        let body = postcard::to_stdvec(self).unwrap_or_default();
        let sig = secret.sign(Domain::PathProbe, &body);
        let mut out = Vec::with_capacity(MAGIC.len() + body.len() + SIG_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&body);
        out.extend_from_slice(&sig.0);
        out
    }

    /// Decodes and verifies a datagram from anyone. Never panics.
    pub fn decode(datagram: &[u8]) -> Result<Probe, ProbeError> {
        let (probe, body, sig) = Self::parse(datagram)?;
        if let ProbeKind::CallMeMaybe { candidates } = &probe.kind {
            if candidates.len() > MAX_CANDIDATES {
                return Err(ProbeError::TooManyCandidates(candidates.len()));
            }
        }
        let sig: [u8; SIG_LEN] = sig.try_into().map_err(|_| ProbeError::Decode)?;
        probe
            .from
            .verify(Domain::PathProbe, body, &Signature(sig))
            .map_err(|_| ProbeError::BadSignature)?;
        Ok(probe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (SecretKey, SecretKey) {
        (
            SecretKey::from_bytes(&[1; 32]),
            SecretKey::from_bytes(&[2; 32]),
        )
    }

    #[test]
    fn probes_round_trip_and_are_not_quic() {
        let (a, b) = keys();
        for kind in [
            ProbeKind::Ping,
            ProbeKind::Pong {
                observed: "198.51.100.4:4000".parse().expect("addr"),
            },
            ProbeKind::CallMeMaybe {
                candidates: vec!["[2001:db8::2]:9".parse().expect("addr"); MAX_CANDIDATES],
            },
        ] {
            let p = Probe {
                from: a.public(),
                to: b.public(),
                tx: [7; 12],
                kind,
            };
            let bytes = p.encode(&a);
            assert!(bytes.len() <= MAX_PROBE_LEN);
            assert!(is_probe(&bytes));
            // The QUIC fixed bit is clear.
            assert_eq!(bytes[0] & 0x40, 0);
            assert_eq!(Probe::decode(&bytes), Ok(p));
        }
    }

    #[test]
    fn forged_altered_and_malformed_probes_are_refused() {
        let (a, b) = keys();
        let p = Probe {
            from: a.public(),
            to: b.public(),
            tx: [1; 12],
            kind: ProbeKind::Ping,
        };
        // Signed by someone else than `from`.
        assert_eq!(Probe::decode(&p.encode(&b)), Err(ProbeError::BadSignature));
        // Any flipped bit after the magic fails.
        let good = p.encode(&a);
        for i in MAGIC.len()..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(Probe::decode(&bad).is_err(), "bit flip at {i}");
        }
        assert_eq!(Probe::decode(b"\x40quic"), Err(ProbeError::NotProbe));
        assert!(matches!(Probe::decode(&MAGIC), Err(ProbeError::Size(_))));
        let mut huge = MAGIC.to_vec();
        huge.resize(MAX_PROBE_LEN + 1, 0);
        assert!(matches!(Probe::decode(&huge), Err(ProbeError::Size(_))));
        // Too many candidates, even when properly signed.
        let many = Probe {
            kind: ProbeKind::CallMeMaybe {
                candidates: vec!["10.0.0.1:1".parse().expect("addr"); MAX_CANDIDATES + 1],
            },
            ..p
        };
        assert_eq!(
            Probe::decode(&many.encode(&a)),
            Err(ProbeError::TooManyCandidates(MAX_CANDIDATES + 1))
        );
    }
}
