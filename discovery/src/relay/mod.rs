//! The relay: forwards opaque packets between nodes that cannot reach each other
//! directly (both behind NATs, say), inside the discovery server both can reach.
//!
//! A node keeps one QUIC connection to its *home relay*, authenticated both ways with
//! the same certificates as node-to-node connections ([`p2p_crypto::tls`]): the relay
//! learns the node's NodeId from the handshake, the node checks the relay's key. Over it
//! the node sends `(destination, packet)` and receives `(source, packet)` frames
//! ([`proto`]). The packets are the two nodes' own end-to-end QUIC packets (TLS 1.3,
//! their NodeId binding, ALPN `p2p-chat/1`), so the relay sees only ciphertext and cannot
//! read, alter unnoticed, or impersonate either end. The relay also tells each node the
//! UDP address it sees it at (its reflexive address), which nodes publish as a direct
//! candidate for hole punching.
//!
//! Limits ([`RelayConfig`]): authenticated nodes only, a node receives only packets
//! addressed to its own key, per-node packet and byte rates, a cap on nodes, idle and
//! handshake timeouts. Counters ([`RelayMetrics`]) appear in the discovery server's
//! `/metrics`.

pub mod proto;
mod server;

pub use server::{
    Relay, RelayConfig, RelayError, RelayMetrics, CLOSE_FULL, CLOSE_PROTOCOL, CLOSE_REPLACED,
    CLOSE_SHUTDOWN,
};
