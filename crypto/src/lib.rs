//! Cryptographic base of p2p-node.
//!
//! - [`SecretKey`] / [`PublicKey`] (a.k.a. [`NodeId`]): the ed25519 node identity and its
//!   canonical text form.
//! - [`keyfile`]: the on-disk identity file (mode 0600, atomic writes, optional passphrase).
//! - [`tls`]: the self-signed certificate made from the node key and the rustls verifiers
//!   that bind a QUIC/TLS peer to exactly that key.
//! - [`Domain`]: domain-separated signatures for records.
//! - [`seal`]: x25519 sealed envelopes for the offline mailbox.

pub mod keyfile;
mod keys;
pub mod seal;
mod sign;
pub mod tls;

pub use keys::{
    MailboxPublicKey, MailboxSecretKey, NodeId, ParseKeyError, PublicKey, SecretKey, Signature,
    NODE_ID_TEXT_LEN,
};
pub use sign::{Domain, SignatureError};
