//! The errors of the node's operations: one enum per operation, each holding only what
//! that operation can run into, sources kept typed.

use std::{io, path::PathBuf, sync::Arc};

use p2p_crypto::NodeId;

use super::DiscoveryError;
use crate::{
    store::StoreError,
    wire::{EncodeError, InvalidMessage, MessageId, RejectCode},
};

/// The store, or the writer thread in front of it, failed; or the node stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The database failed.
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// A store task on the blocking pool failed unexpectedly.
    #[error("store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The node was shut down.
    #[error("the node is shut down")]
    Shutdown,
}

impl From<StoreError> for StorageError {
    fn from(e: StoreError) -> Self {
        StorageError::Store(Arc::new(e))
    }
}

impl From<Arc<StoreError>> for StorageError {
    fn from(e: Arc<StoreError>) -> Self {
        StorageError::Store(e)
    }
}

/// Errors of [`NodeBuilder::bind`](super::NodeBuilder::bind): starting a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// [`NodeBuilder::data_dir`](super::NodeBuilder::data_dir) was not called.
    #[error("no data directory given")]
    NoDataDir,
    /// Another process (or another node in this process) uses the data directory.
    #[error("data directory {} is in use by another p2p-node process", dir.display())]
    DataDirLocked {
        /// The directory.
        dir: PathBuf,
    },
    /// The data directory or one of its files may be accessed by group or others (the
    /// message names the `chmod` that fixes it), or cannot be created.
    #[error(transparent)]
    DataDirAccess(#[from] p2p_crypto::owner_only::OwnerOnlyError),
    /// The data directory or its lock file cannot be created or opened.
    #[error("data directory {}: {source}", dir.display())]
    DataDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The database cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Opening the database or its contacts failed unexpectedly.
    #[error("store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The QUIC endpoint cannot be bound.
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::BindError),
    /// The discovery URL is not usable.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The DHT client cannot start.
    #[error(transparent)]
    Dht(#[from] super::DhtError),
    /// The discovery could not start (for example the embedded server's port is taken).
    #[error(transparent)]
    DiscoveryStart(#[from] crate::discovery::DiscoveryStartError),
    /// The writer thread cannot be started.
    #[error("cannot start the writer thread: {0}")]
    Thread(#[source] io::Error),
}

impl From<crate::datadir::LockError> for BindError {
    fn from(e: crate::datadir::LockError) -> Self {
        use crate::datadir::LockError;
        match e {
            LockError::Access(e) => BindError::DataDirAccess(e),
            LockError::Locked { dir } => BindError::DataDirLocked { dir },
            LockError::Io { dir, source } => BindError::DataDir { dir, source },
        }
    }
}

/// Errors of [`Node::register`](super::Node::register): claiming a name.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The node has no discovery server.
    #[error("no discovery server is configured")]
    NoDiscovery,
    /// The name is claimed by another node.
    #[error("the name {name:?} is already taken by another node")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// The discovery server failed or refused the request.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The name could not be pinned in the store.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Errors of [`Node::resolve`](super::Node::resolve): a NodeId or a name to a NodeId.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// `peer` is not a NodeId, not a pinned contact (names this node exchanged messages
    /// with are pinned), and not a name on discovery.
    #[error("unknown peer {peer:?}: not a NodeId, a known contact or a name on discovery")]
    UnknownPeer {
        /// What was asked for.
        peer: String,
    },
    /// The name is not pinned here and discovery cannot be asked.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The contacts could not be read or written.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Errors of [`Node::send`](super::Node::send) and
/// [`Node::send_to`](super::Node::send_to). A peer that cannot be reached is not an
/// error: the message is queued ([`SendStatus::Queued`](super::SendStatus::Queued)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The recipient could not be resolved; nothing was stored.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The message cannot be sent to ourselves.
    #[error("cannot send a message to this node itself")]
    SelfMessage,
    /// The message breaks the protocol's limits (e.g. too long); nothing was stored.
    #[error(transparent)]
    InvalidMessage(#[from] InvalidMessage),
    /// The message could not be stored, or its delivery not recorded. A node whose
    /// storage is already failing sends nothing; when the write fails during the send
    /// (it goes out while it commits), the recipient may have the message.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The recipient refused the message for good.
    #[error("{to} rejected message {id}: {code}")]
    Rejected {
        /// The recipient.
        to: NodeId,
        /// The message.
        id: MessageId,
        /// Why.
        code: RejectCode,
    },
}

/// Errors of [`Node::history`](super::Node::history) and
/// [`Node::history_before`](super::Node::history_before).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// The peer could not be resolved.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The history could not be read.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Errors of [`Node::peers`](super::Node::peers): the online list.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeersError {
    /// The node has no discovery server.
    #[error("no discovery server is configured")]
    NoDiscovery,
    /// The discovery server failed or refused the request.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

/// Errors of [`Node::drain_mailbox`](super::Node::drain_mailbox) and of depositing in a
/// peer's mailbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// The node has no discovery server.
    #[error("no discovery server is configured")]
    NoDiscovery,
    /// The discovery server failed or refused the request.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// Discovery does not know the recipient's mailbox key.
    #[error("no mailbox key known for {peer}")]
    UnknownPeer {
        /// The recipient.
        peer: NodeId,
    },
    /// A frame could not be encoded (not expected for valid messages).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Messages from the mailbox could not be stored.
    #[error(transparent)]
    Storage(#[from] StorageError),
}
