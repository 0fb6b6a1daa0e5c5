//! Cryptographic base of p2p-node.
//!
//! - [`SecretKey`] / [`PublicKey`] (a.k.a. [`NodeId`]): the ed25519 node identity and its
//!   canonical text form.
//! - [`keyfile`]: the on-disk identity file (mode 0600, atomic writes, optional passphrase).
//! - [`owner_only`]: files created 0600 and directories 0700, too-open ones refused.
//! - [`history`]: the key derived from the identity that encrypts the stored history.
//! - [`tls`]: the self-signed certificate made from the node key and the rustls verifiers
//!   that bind a QUIC/TLS peer to exactly that key.
//! - [`Domain`]: domain-separated signatures for records.
//! - [`seal`]: x25519 sealed envelopes for the offline mailbox.
//! - [`memo`]: the bounded memo behind the caches of checked keys and verified records.

pub mod history;
pub mod keyfile;
mod keys;
pub mod memo;
pub mod owner_only;
pub mod seal;
mod sign;
pub mod tls;

pub use keys::{
    MailboxPublicKey, MailboxSecretKey, NodeId, ParseKeyError, PublicKey, SecretKey, Signature,
    NODE_ID_TEXT_LEN,
};
pub use sign::{Domain, SignatureError};
