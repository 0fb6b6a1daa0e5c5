//! p2p-node: the node library.
//!
//! - [`endpoint`]: the QUIC endpoint whose connections carry the peer's authenticated NodeId.
//! - [`wire`]: the frame codec spoken on those connections.
//! - [`store`]: history, outbox and contacts in redb.

pub mod endpoint;
pub mod store;
pub mod wire;

pub use endpoint::{Connection, Endpoint, TransportSettings};
