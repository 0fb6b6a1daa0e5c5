//! p2p-node: the node library.
//!
//! - [`endpoint`]: the QUIC endpoint whose connections carry the peer's authenticated NodeId.
//! - [`net`]: the connection layer under it: direct paths, relays, hole punching.
//! - [`wire`]: the frame codec spoken on those connections.
//! - [`store`]: history, outbox and contacts in redb, encrypted when asked.
//! - [`datadir`]: the data directory: its files, their modes (0700/0600) and its lock.
//! - [`node`]: the messaging runtime ([`Node`]) that ties them together with discovery.

pub mod datadir;
pub mod discovery;
pub mod endpoint;
pub mod net;
pub mod node;
pub mod store;
pub mod wire;

#[cfg(test)]
mod protocol_vectors;

pub use endpoint::{Connection, Endpoint, TransportSettings};
pub use net::{HomeRelay, PathConfig, PathEvent, PathKind};
pub use node::{
    BindError, DhtConfig, DhtError, DhtRecord, DiscoveryError, HistoryError, MailboxError, Node,
    NodeBuilder, NodeEvent, NotThePeerCause, OutboxReport, PeerInfo, PeersError, QueueReason,
    Queued, RegisterError, ResolveError, Resolved, SendError, SendOutcome, SendStatus,
    StorageError, Timings, Via,
};
