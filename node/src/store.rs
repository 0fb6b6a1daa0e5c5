//! Durable history, outbox and contacts in one redb file.
//!
//! # Layout
//!
//! All tables are declared in [`tables`]. A message is named by `(peer, stored_at_ms,
//! id)` ([`tables::MessageKey`]) and stored in [`tables::HISTORY`] under
//! `(stored_at_ms, id)`: in storage order, so a commit of many messages to many
//! conversations appends to the end of the table instead of rewriting a page of each
//! conversation. Each row links to the previous row of its conversation, and
//! [`tables::CONVERSATIONS`] names the newest one: the last N messages of a conversation
//! are N point reads down that chain. `stored_at_ms` is the *local* clock when the row was
//! written (for incoming messages, when it arrived), never the sender's clock, so a peer
//! cannot reorder or pin messages in our history by lying about time; the sender's
//! timestamp is kept in the row as [`StoredMessage::sent_at_ms`]. Within a conversation it
//! never goes back: a row written while the clock is behind the conversation's newest row
//! takes that row's time (plus one millisecond where the id would not sort after it).
//!
//! A message-id index (`id -> (peer, stored_at_ms)`) makes deduplication and status
//! updates a point lookup. Deduplication is global by id: however a message arrives
//! (direct, mailbox, resend after a lost ack) it is stored once.
//!
//! # Durability and transactions
//!
//! Message writes ([`Store::write_batch`], and the calls built on it:
//! [`Store::insert_incoming`], [`Store::insert_outgoing`], the delivery marks) are
//! durable when the call returns, so a message may be acknowledged right after. They
//! join one redb write transaction that stays open across calls and are appended to the
//! write log beside the database (`node.redb-log`, see `store/log.rs`), which is synced:
//! one small in-place write and one `fdatasync`, where a commit would write every page a
//! batch touched. The open transaction *folds* (one durable commit) after
//! [`FOLD_WRITES`] writes, when the log is full, on [`Store::flush`] and when the store
//! is dropped; a batch too large for the log is folded at once. A store opened after a
//! crash applies the log's records again, in order (every write is idempotent), and
//! folds. Every other call first commits the open transaction without waiting for the
//! disk, so reads see every acknowledged write; the other writes (contacts, outbox
//! bookkeeping) are short transactions committed durably.
//!
//! All methods are synchronous and may block on disk I/O (and on another thread's write
//! transaction); call them from `spawn_blocking` or a dedicated thread. The open
//! transaction of message writes lives inside the store, behind a mutex that no call
//! holds when it returns, so none is ever held across an `.await`.
//!
//! # Encryption at rest
//!
//! A database is clear (schema 3) or encrypted (schema 4; schemas 1 and 2 are their
//! older layouts, moved forward on open, see `tables`). In an encrypted one every
//! message row's value (direction, the sender's timestamp, the body and the status) is
//! sealed under a key derived from the identity (`cipher`, `p2p_crypto::history`), bound
//! to its row key (and every write-log record is sealed under the same key, bound to its
//! epoch and offset); the keys, the message-id index, the outbox bookkeeping and the
//! contacts stay clear, so range scans and lookups work unchanged. [`Store::open_with_key`]
//! with `encrypt` turns a clear database into an encrypted one by writing a sealed copy
//! beside it and renaming it over the original, so a crash at any point leaves either the
//! old file or the new one, both complete. Because the key comes from the identity seed,
//! not from the passphrase, changing the passphrase changes nothing here.
//!
//! # Files
//!
//! The database file and its write log are created with mode 0600 in the call that
//! creates them; an existing one that group or others may access is refused
//! ([`StoreError::Access`]). The log is emptied when the database opens and removed when
//! it closes cleanly.
//!
//! # Robustness
//!
//! Decoding a stored value never panics: a value that does not decode is
//! [`StoreError::CorruptRecord`] naming the table. A file that is not a redb database is
//! [`StoreError::Corrupt`], and one written by a newer schema is
//! [`StoreError::NewerSchema`]; both name the path.

mod cipher;
mod format;
mod log;
mod memory;
mod opened;
pub mod tables;

pub use format::LOG_TARGET as FORMAT_LOG_TARGET;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use p2p_crypto::{
    history::{HistoryKey, OpenError},
    owner_only::{self, OwnerOnlyError},
    NodeId,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableHandle, WriteTransaction};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::wire::{
    AckStatus, Body, ChatMessage, Conversation, InvalidMessage, MessageId, RejectCode,
};
use cipher::RowCipher;
use opened::OpenedRows;
use tables::{
    row_key, MessageKey, OutboxKeyRef, RowKeyRef, RowValueRef, CONTACTS, CONVERSATIONS, HISTORY,
    HISTORY_KEY_CHECK_KEY, LOG_EPOCH_KEY, MESSAGES_BY_CONVERSATION, MESSAGE_IDS, META,
    MIN_SCHEMA_VERSION, OUTBOX, SCHEMA_CLEAR, SCHEMA_CLEAR_BY_CONVERSATION, SCHEMA_SEALED,
    SCHEMA_SEALED_BY_CONVERSATION, SCHEMA_VERSION, SCHEMA_VERSION_KEY, WRITE_CHECK_KEY,
};

// ---------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------

/// Whether a message was sent or received by this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Received from the peer.
    Incoming,
    /// Sent by this node to the peer.
    Outgoing,
}

/// Delivery state of a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MessageStatus {
    /// An incoming message, durably stored (and acknowledgeable).
    Received,
    /// An outgoing message not yet acknowledged; it is in the outbox.
    Queued,
    /// An outgoing message the recipient acknowledged as stored.
    Delivered,
    /// An outgoing message the recipient refused for good.
    Rejected(RejectCode),
}

/// One message of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The message id (chosen by the sender).
    pub id: MessageId,
    /// The other end of the conversation: the sender of an incoming message (the
    /// authenticated NodeId it arrived from), the recipient of an outgoing one.
    pub peer: NodeId,
    /// Sent or received.
    pub direction: Direction,
    /// The sender's clock when the message was written (untrusted for incoming messages).
    pub sent_at_ms: u64,
    /// The local clock when the row was written; orders the history.
    pub stored_at_ms: u64,
    /// The content.
    pub body: Body,
    /// Delivery state.
    pub status: MessageStatus,
}

impl StoredMessage {
    /// The pagination cursor of this message: pass it as `before` to
    /// [`Store::history`] to get the messages older than this one.
    pub fn cursor(&self) -> (u64, MessageId) {
        (self.stored_at_ms, self.id)
    }

    /// The wire message this row was made from (for resending).
    pub fn to_chat_message(&self) -> ChatMessage {
        ChatMessage {
            id: self.id,
            conversation: Conversation::Direct,
            sent_at_ms: self.sent_at_ms,
            body: self.body.clone(),
        }
    }
}

/// An outgoing message not yet acknowledged by its recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The recipient.
    pub to: NodeId,
    /// The message, exactly as it is (re)sent.
    pub message: ChatMessage,
    /// Direct delivery attempts so far.
    pub attempts: u32,
    /// Do not try direct delivery again before this local time (ms since the epoch).
    pub next_attempt_ms: u64,
    /// When the message was queued (local ms since the epoch).
    pub created_ms: u64,
    /// Whether a sealed copy was deposited in the recipient's mailbox.
    pub mailbox_deposited: bool,
}

/// The delivery bookkeeping of an outbox entry, without its message: what a retry
/// round needs to decide which queues are due (see [`Store::outbox_schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxSlot {
    /// The recipient.
    pub to: NodeId,
    /// The message's id.
    pub id: MessageId,
    /// Direct delivery attempts so far.
    pub attempts: u32,
    /// Do not try direct delivery again before this local time (ms since the epoch).
    pub next_attempt_ms: u64,
    /// When the message was queued (local ms since the epoch).
    pub created_ms: u64,
    /// Whether a sealed copy was deposited in the recipient's mailbox.
    pub mailbox_deposited: bool,
}

/// A known name and the NodeId pinned for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The NodeId first seen for this name (or later accepted by the user).
    pub node_id: NodeId,
    /// When this name was first seen (local ms since the epoch).
    pub first_seen_ms: u64,
    /// The contact's x25519 mailbox key, once known.
    pub mailbox_key: Option<[u8; 32]>,
}

/// What [`Store::insert_incoming`] / [`Store::insert_outgoing`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Newly stored.
    New,
    /// The same message (same id, same peer, same direction) was already stored; nothing
    /// changed. For an incoming message this still means "durably stored": acknowledge it.
    Duplicate,
    /// The id is already used by a different message (another peer or the other
    /// direction). Nothing was stored.
    Conflict,
}

impl Inserted {
    /// The acknowledgement to send for an incoming message with this outcome.
    pub fn ack_status(self) -> AckStatus {
        match self {
            Inserted::New => AckStatus::Stored,
            Inserted::Duplicate => AckStatus::Duplicate,
            Inserted::Conflict => AckStatus::Rejected(RejectCode::ID_CONFLICT),
        }
    }
}

/// One write of a batch; see [`Store::write_batch`]. Also the content of the write log's
/// records (`store/log.rs`): its serialized form is part of the log's format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    /// A message received from `peer`, the authenticated sender
    /// ([`Store::insert_incoming`]).
    Incoming {
        /// The sender.
        peer: NodeId,
        /// The message.
        msg: ChatMessage,
        /// The local time that orders it in the history.
        now_ms: u64,
    },
    /// A message to `to`, into the history and the outbox ([`Store::insert_outgoing`]).
    Outgoing {
        /// The recipient.
        to: NodeId,
        /// The message.
        msg: ChatMessage,
        /// The local time that orders it in the history.
        now_ms: u64,
    },
    /// The recipient's final answer to an outgoing message ([`Store::mark_delivered`],
    /// [`Store::mark_rejected`]).
    Finish {
        /// The peer that answered; only the message's recipient counts.
        peer: NodeId,
        /// The message.
        id: MessageId,
        /// [`MessageStatus::Delivered`] or [`MessageStatus::Rejected`].
        status: MessageStatus,
    },
}

/// The outcome of one [`WriteOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Of an insert.
    Inserted(Inserted),
    /// Of a status mark.
    Marked(MarkOutcome),
}

impl WriteOutcome {
    /// Whether the write changed the database.
    pub fn changed(self) -> bool {
        matches!(
            self,
            WriteOutcome::Inserted(Inserted::New) | WriteOutcome::Marked(MarkOutcome::Updated)
        )
    }

    /// The outcome of an insert.
    pub fn inserted(self) -> Inserted {
        match self {
            WriteOutcome::Inserted(i) => i,
            // An insert always yields `Inserted`.
            WriteOutcome::Marked(_) => Inserted::Conflict,
        }
    }

    /// The outcome of a status mark.
    pub fn marked(self) -> MarkOutcome {
        match self {
            WriteOutcome::Marked(m) => m,
            // A mark always yields `Marked`.
            WriteOutcome::Inserted(_) => MarkOutcome::Unknown,
        }
    }
}

/// The tables a message write touches, opened once per transaction.
struct MessageTables<'t> {
    history: redb::Table<'t, RowKeyRef, RowValueRef>,
    conversations: redb::Table<'t, &'static [u8; 32], RowKeyRef>,
    ids: redb::Table<'t, &'static [u8; 16], ([u8; 32], u64)>,
    outbox: redb::Table<'t, OutboxKeyRef, &'static [u8]>,
    /// The newest row of each conversation this transaction read or wrote, and whether
    /// it moved: [`tables::CONVERSATIONS`] is read once and written once per
    /// conversation of a batch (`Store::save_heads`), not once per message.
    heads: HashMap<[u8; 32], (Option<RowKey>, bool)>,
}

/// What [`Store::mark_delivered`] / [`Store::mark_rejected`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkOutcome {
    /// The status changed (and the message left the outbox).
    Updated,
    /// It already had that status; nothing changed.
    Unchanged,
    /// No outgoing message with this id was sent to this peer.
    Unknown,
}

/// What [`Store::pin_contact`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// The name was unknown; it is now pinned to the given NodeId.
    New,
    /// The name is pinned to the same NodeId.
    Same,
    /// The name is pinned to another NodeId. Nothing was changed: the caller decides
    /// (warn the user, and [`Store::set_contact`] if they accept the new key).
    Changed {
        /// The NodeId pinned so far.
        old: NodeId,
    },
}

/// One conversation and its latest message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    /// The other end of the conversation.
    pub peer: NodeId,
    /// Its most recent message.
    pub last: StoredMessage,
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file is not a redb database or is damaged.
    #[error("database {} is corrupt or not a p2p-node database: {source}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        #[source]
        source: redb::DatabaseError,
    },
    /// The database is already open (in this or another process).
    #[error("database {} is already in use by another process", path.display())]
    AlreadyOpen {
        /// The database file.
        path: PathBuf,
    },
    /// The database was written by a newer version of p2p-node.
    #[error(
        "database {} uses schema version {found}, newer than the {supported} this build \
         supports; upgrade p2p-node",
        path.display()
    )]
    NewerSchema {
        /// The version found in the file.
        found: u64,
        /// The newest version this build supports.
        supported: u64,
        /// The database file.
        path: PathBuf,
    },
    /// The database has a schema version this build cannot migrate from.
    #[error("database {} has unsupported schema version {found}", path.display())]
    UnsupportedSchema {
        /// The version found in the file.
        found: u64,
        /// The database file.
        path: PathBuf,
    },
    /// The database file may be accessed by group or others (the message names the
    /// `chmod` that fixes it).
    #[error(transparent)]
    Access(OwnerOnlyError),
    /// The database is encrypted and was opened without a key.
    #[error(
        "database {} is encrypted; it opens only with the identity that encrypted it",
        path.display()
    )]
    KeyRequired {
        /// The database file.
        path: PathBuf,
    },
    /// The database is encrypted under another identity's key.
    #[error(
        "database {} was encrypted by another identity and cannot be read with this one; \
         move it away to start a new history",
        path.display()
    )]
    WrongKey {
        /// The database file.
        path: PathBuf,
    },
    /// Rewriting the database (to encrypt it, or into an export) failed on a file
    /// operation; the original is unchanged.
    #[error("rewriting database {}: {source}", path.display())]
    Rewrite {
        /// The file being written or renamed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Opening the database failed for another reason (I/O, permissions, ...).
    #[error("opening database {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        #[source]
        source: redb::DatabaseError,
    },
    /// A database written by an earlier version (redb 2) could not be read to move it to
    /// the current storage format; it is unchanged.
    #[error(
        "database {} is in the storage format of an earlier version and could not be \
         moved to the current one (it is unchanged): {source}",
        path.display()
    )]
    OldFormat {
        /// The database file.
        path: PathBuf,
        /// What redb 2 reported.
        #[source]
        source: Box<redb2::Error>,
    },
    /// A transaction, table access or commit failed.
    #[error("database {}: {source}", path.display())]
    Db {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        #[source]
        source: Box<redb::Error>,
    },
    /// A message breaks the limits of the wire protocol (e.g. over-long text); nothing
    /// was stored.
    #[error(transparent)]
    InvalidMessage(#[from] InvalidMessage),
    /// A record could not be serialized (not expected to happen).
    #[error("serializing a record for table {table}: {source}")]
    Encode {
        /// The table it was meant for.
        table: &'static str,
        /// What postcard reported.
        #[source]
        source: postcard::Error,
    },
    /// A stored key or value does not decode.
    #[error("database {}: corrupt record in table {table}: {reason}", path.display())]
    CorruptRecord {
        /// The database file.
        path: PathBuf,
        /// The table holding it.
        table: &'static str,
        /// What is wrong with it.
        #[source]
        reason: RecordError,
    },
    /// The database was closed after an I/O error and could not be opened again yet
    /// (see [`Store::reopen`]).
    #[error("database {} is closed after an I/O error and not open again yet", path.display())]
    Closed {
        /// The database file.
        path: PathBuf,
    },
    /// Writing or reading the write log failed (see `store/log.rs`).
    #[error("write log {}: {source}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A record of the write log passed its checksum but does not open or decode: the
    /// log was damaged or written by something else. Nothing was applied from it.
    #[error(
        "write log {}: the record at byte {offset} is damaged ({reason}); move the file \
         away to open the database without the writes it holds",
        path.display()
    )]
    CorruptLog {
        /// The log file.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// What is wrong with it.
        #[source]
        reason: RecordError,
    },
    /// A bug: the store broke one of its own invariants.
    #[error("internal store error: {0}")]
    Internal(&'static str),
}

impl StoreError {
    /// Whether this is an I/O failure of the file (a full disk, a file system turned
    /// read-only, a previous such error redb remembers, or the database closed after
    /// one), which [`Store::reopen`] may heal once the cause is gone; as opposed to bad
    /// data or a bad request.
    pub fn is_io(&self) -> bool {
        use redb::{DatabaseError, StorageError};
        match self {
            StoreError::Closed { .. } | StoreError::Rewrite { .. } | StoreError::Log { .. } => true,
            StoreError::Db { source, .. } => {
                matches!(**source, redb::Error::Io(_) | redb::Error::PreviousIo)
            }
            StoreError::Open { source, .. } => matches!(
                source,
                DatabaseError::Storage(StorageError::Io(_) | StorageError::PreviousIo)
                    | DatabaseError::RepairAborted
            ),
            _ => false,
        }
    }
}

/// Why a stored record is corrupt.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The value is not valid postcard for its type.
    #[error("undecodable value: {0}")]
    Postcard(#[source] postcard::Error),
    /// Bytes are left over after the value.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
    /// A stored NodeId is not a valid ed25519 public key.
    #[error("invalid NodeId")]
    InvalidNodeId,
    /// An index entry points at a row that does not exist.
    #[error("dangling index entry for message {0}")]
    DanglingIndex(MessageId),
    /// The message id in a value does not match its key.
    #[error("message id in value does not match its key")]
    IdMismatch,
    /// A sealed value does not decrypt: altered, moved to another row, or sealed under
    /// another key.
    #[error("sealed value: {0}")]
    Decrypt(#[source] OpenError),
    /// A stored value has a format this build does not know.
    #[error("unknown value format {0}")]
    UnknownFormat(u8),
    /// A history row links to a row of another conversation, or to one that is not older.
    #[error("broken link from the history row of message {0}")]
    BrokenLink(MessageId),
}

/// Attaches the database path to redb errors.
trait Ctx<T> {
    fn ctx(self, path: &Path) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Db {
            path: path.to_owned(),
            source: Box::new(e.into()),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Stored records (postcard values)
// ---------------------------------------------------------------------------------------

/// The record of a [`tables::HISTORY`] row; time and id live in the key, the peer and
/// the link beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MessageRecord {
    direction: Direction,
    sent_at_ms: u64,
    body: Body,
    status: MessageStatus,
}

/// A [`MessageRecord`] to write, borrowing the message's body (postcard writes a
/// reference as what it refers to, so the bytes are the same): an inserted body is
/// copied once, into the encoded row.
#[derive(Serialize)]
struct MessageRecordRef<'a> {
    direction: Direction,
    sent_at_ms: u64,
    body: &'a Body,
    status: MessageStatus,
}

impl zeroize::Zeroize for MessageRecord {
    fn zeroize(&mut self) {
        match &mut self.body {
            Body::Text(text) => text.zeroize(),
        }
    }
}

/// Value of a [`tables::OUTBOX`] row; the recipient and the message id live in the
/// key, the message itself in its history row at `(created_ms, id)`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutboxRecord {
    attempts: u32,
    next_attempt_ms: u64,
    created_ms: u64,
    mailbox_deposited: bool,
}

fn to_bytes<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|source| StoreError::Encode { table, source })
}

fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(RecordError::Postcard)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(RecordError::TrailingBytes(rest.len()))
    }
}

/// The path an in-memory store reports.
const MEMORY_PATH: &str = ":memory:";

const KEY_MIN_ID: [u8; 16] = [0; 16];
const KEY_MAX_ID: [u8; 16] = [0xff; 16];

/// The [`tables::HISTORY`] key of a row, owned.
type RowKey = (u64, [u8; 16]);

/// A [`tables::HISTORY`] key as read, copied out.
fn owned_row_key((at, id): (u64, &[u8; 16])) -> RowKey {
    (at, *id)
}

/// The peer of a [`tables::HISTORY`] row and its link to the previous row.
type RowLink = ([u8; 32], Option<RowKey>);

/// One [`tables::HISTORY`] row, decoded.
struct Row {
    key: MessageKey,
    /// The previous row of its conversation.
    prev: Option<RowKey>,
    rec: MessageRecord,
}

/// The time a new row of a conversation is stored at: `now_ms`, unless the clock is
/// behind the conversation's newest row `head`; then the head's time, plus one
/// millisecond if `id` would not sort after the head's. Keys then grow along every
/// conversation.
fn row_time(now_ms: u64, id: &[u8; 16], head: Option<RowKey>) -> u64 {
    match head {
        Some((at, head_id)) => now_ms.max(at.saturating_add(u64::from(*id <= head_id))),
        None => now_ms,
    }
}

// ---------------------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------------------

/// The node's database: history, outbox and contacts.
///
/// Cheap to share behind an `Arc`; every method takes `&self`. redb serializes write
/// transactions, so concurrent writers wait for each other.
pub struct Store {
    /// `None` between closing the file and opening it again ([`Store::reopen`]).
    db: RwLock<Option<Database>>,
    path: PathBuf,
    cipher: RowCipher,
    /// Rows of an encrypted database opened already ([`opened`]).
    opened: OpenedRows<MessageKey, MessageRecord>,
    /// Whether the database is a file that [`Store::reopen`] can open again.
    reopenable: bool,
    /// Message writes applied but not committed yet, and the log that holds them.
    pending: Mutex<Pending>,
}

/// The open transaction of message writes ([`Store::write_batch`]) and the write log
/// ([`log`]). Taken after the database's read lock, never before it.
#[derive(Default)]
struct Pending {
    /// Message writes applied and acknowledged, not committed yet; each of them is in
    /// the log. Readers commit it without waiting for the disk before they read.
    txn: Option<WriteTransaction>,
    /// Writes since the last fold.
    writes: usize,
    /// `None` in memory.
    log: Option<log::Log>,
    /// An open transaction was lost (a database error): the log holds writes the
    /// database does not; they are applied again before anything else.
    stale: bool,
}

impl Pending {
    /// Whether writes wait for a fold: in the open transaction or in the log.
    fn unfolded(&self) -> bool {
        self.txn.is_some() || self.log.as_ref().is_some_and(|l| !l.is_empty())
    }

    /// The open transaction was dropped (so aborted) without a commit.
    fn lost(&mut self) {
        self.txn = None;
        self.stale = self.log.as_ref().is_some_and(|l| !l.is_empty());
    }
}

/// Writes after which the open transaction folds (commits durably and starts a new log
/// epoch). A fold stalls the writer for one commit: about 1.1 ms at 1024 writes against
/// 3.4 ms at 4096, for the same CPU per message, so figure 8's p99 no longer carries a
/// long stall every 90 ms (BENCHMARKS.md, item 19).
pub const FOLD_WRITES: usize = 1024;

fn lock_pending(m: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The open database, held for the length of one store operation (so
/// [`Store::reopen`] waits for operations in progress).
struct DbRef<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for DbRef<'_> {
    type Target = Database;

    fn deref(&self) -> &Database {
        match self.0.as_ref() {
            Some(db) => db,
            // `Store::db` hands out a `DbRef` only for an open database.
            None => unreachable!("DbRef of a closed database"),
        }
    }
}

impl Drop for Store {
    /// Folds, and removes the write log: a log on disk means an unclean stop.
    fn drop(&mut self) {
        if lock_pending(&self.pending).log.is_none() {
            return;
        }
        match self.flush() {
            Ok(()) => {
                if let Some(log) = lock_pending(&self.pending).log.take() {
                    let path = log.path().to_owned();
                    drop(log);
                    let _ = std::fs::remove_file(path);
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "the write log was not folded into the database; it is applied when the database opens again"
            ),
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("encrypted", &self.cipher.is_sealed())
            .finish()
    }
}

impl Store {
    /// Opens the clear database at `path`, creating it (and its tables) if it does not
    /// exist.
    ///
    /// The parent directory must exist. Fails with [`StoreError::NewerSchema`] on a file
    /// written by a newer version (without modifying it), [`StoreError::Corrupt`] on a file
    /// that is not a valid database, [`StoreError::AlreadyOpen`] if it is in use,
    /// [`StoreError::Access`] if group or others may access it, and
    /// [`StoreError::KeyRequired`] if it is encrypted.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::open_file(path.as_ref(), None, false)
    }

    /// Opens the database at `path` with the history key of this node's identity,
    /// creating it if it does not exist: encrypted when `encrypt`, else clear.
    ///
    /// An encrypted database is read and written encrypted whatever `encrypt` says (it
    /// never goes back to clear); [`StoreError::WrongKey`] if another identity encrypted
    /// it. A clear database opened with `encrypt` is rewritten encrypted first (see the
    /// module documentation): call this with the data directory locked, since it replaces
    /// the file. Other errors as [`Store::open`].
    pub fn open_with_key(
        path: impl AsRef<Path>,
        key: HistoryKey,
        encrypt: bool,
    ) -> Result<Store, StoreError> {
        let path = path.as_ref();
        let store = Self::open_file(path, Some(key.clone()), encrypt)?;
        remove_leftover(&rewrite_path(path))?;
        if encrypt && !store.cipher.is_sealed() {
            return store.seal_in_place(key);
        }
        Ok(store)
    }

    fn open_file(path: &Path, key: Option<HistoryKey>, encrypt: bool) -> Result<Store, StoreError> {
        let db = match Self::open_db(path)? {
            Err(redb::DatabaseError::UpgradeRequired(_)) => {
                format::upgrade(path)?;
                Self::open_db(path)?
            }
            db => db,
        }
        .map_err(|e| classify_open_error(path, e))?;
        let store = Self::init(db, path.to_owned(), key, encrypt)?;
        store.attach_log()?;
        Ok(store)
    }

    /// The database file at `path` (created if missing) as redb opens it: the inner
    /// error is redb's verdict on the file.
    fn open_db(path: &Path) -> Result<Result<Database, redb::DatabaseError>, StoreError> {
        let file = owner_only::open_file(path).map_err(|e| match e {
            OwnerOnlyError::Create { source, .. } | OwnerOnlyError::Stat { source, .. } => {
                classify_open_error(path, source.into())
            }
            e => StoreError::Access(e),
        })?;
        Ok(redb::backends::FileBackend::new(file)
            .and_then(|backend| redb::Builder::new().create_with_backend(backend)))
    }

    /// Whether message rows are stored encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_sealed()
    }

    /// How many messages the history holds.
    pub fn message_count(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata;
        let db = self.db()?;
        let txn = db.begin_read().ctx(&self.path)?;
        let history = txn.open_table(HISTORY).ctx(&self.path)?;
        history.len().ctx(&self.path)
    }

    /// Replaces this clear database by an encrypted copy: the copy is written beside it,
    /// made durable, and renamed over it; then it is opened.
    fn seal_in_place(self, key: HistoryKey) -> Result<Store, StoreError> {
        let path = self.path.clone();
        let tmp = rewrite_path(&path);
        let rows = self.copy_to(&tmp, &key)?;
        crate::datadir::crash_point("history-copied");
        drop(self);
        std::fs::rename(&tmp, &path).map_err(|source| StoreError::Rewrite {
            path: path.clone(),
            source,
        })?;
        owner_only::sync_dir(&owner_only::parent_dir(&path));
        crate::datadir::crash_point("history-renamed");
        tracing::info!(rows, path = %path.display(), "history encrypted");
        Self::open_file(&path, Some(key), true)
    }

    /// Writes a copy of this database, every message row sealed under `key`, to the new
    /// file `dest` (created with mode 0600; it must not exist), durably. Returns the
    /// number of messages. This database is not changed.
    pub fn copy_to(&self, dest: &Path, key: &HistoryKey) -> Result<u64, StoreError> {
        let rewrite = |source| StoreError::Rewrite {
            path: dest.to_owned(),
            source,
        };
        let file = owner_only::open_options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dest)
            .map_err(rewrite)?;
        let result = self.copy_into(file, dest, key);
        if result.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        result
    }

    fn copy_into(
        &self,
        file: std::fs::File,
        dest: &Path,
        key: &HistoryKey,
    ) -> Result<u64, StoreError> {
        let out = redb::Builder::new()
            .create_with_backend(
                redb::backends::FileBackend::new(file).map_err(|e| classify_open_error(dest, e))?,
            )
            .map_err(|e| classify_open_error(dest, e))?;
        let to = RowCipher::Sealed(key.clone());
        let db = self.db()?;
        let read = db.begin_read().ctx(&self.path)?;
        let write = out.begin_write().ctx(dest)?;
        let mut rows = 0u64;
        {
            let mut meta = write.open_table(META).ctx(dest)?;
            meta.insert(SCHEMA_VERSION_KEY, SCHEMA_SEALED).ctx(dest)?;
            meta.insert(HISTORY_KEY_CHECK_KEY, key.check_value())
                .ctx(dest)?;
            let mut history = write.open_table(HISTORY).ctx(dest)?;
            for row in read
                .open_table(HISTORY)
                .ctx(&self.path)?
                .iter()
                .ctx(&self.path)?
            {
                let (k, v) = row.ctx(&self.path)?;
                let (at, id) = k.value();
                let (peer, prev, value) = v.value();
                let key = (*peer, at, *id);
                let plain = self
                    .cipher
                    .open(&key, value)
                    .map_err(|e| self.corrupt(HISTORY.name(), e))?;
                let sealed = to.seal(&key, plain.to_vec());
                history
                    .insert(row_key(&key), (peer, prev, sealed.as_slice()))
                    .ctx(dest)?;
                rows += 1;
                if rows == 1 {
                    crate::datadir::crash_point("history-copying");
                }
            }
            self.copy_table(&read, &write, CONVERSATIONS, dest)?;
            self.copy_table(&read, &write, MESSAGE_IDS, dest)?;
            self.copy_table(&read, &write, OUTBOX, dest)?;
            self.copy_table(&read, &write, CONTACTS, dest)?;
        }
        write.commit().ctx(dest)?;
        Ok(rows)
    }

    /// A store that lives in memory only: nothing survives the process. For benchmarks
    /// that measure the node without disk writes, and for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let path = PathBuf::from(MEMORY_PATH);
        let db = redb::Builder::new()
            .create_with_backend(memory::ChunkedMemory::default())
            .ctx(&path)?;
        Self::init(db, path, None, false)
    }

    /// Checks the schema version and the key, and creates the tables. A new database is
    /// encrypted when `encrypt` (which needs `key`).
    fn init(
        db: Database,
        path: PathBuf,
        key: Option<HistoryKey>,
        encrypt: bool,
    ) -> Result<Store, StoreError> {
        let txn = db.begin_write().ctx(&path)?;
        let tables: Vec<String> = txn
            .list_tables()
            .ctx(&path)?
            .map(|t| t.name().to_owned())
            .collect();
        let complete = [
            HISTORY.name(),
            CONVERSATIONS.name(),
            MESSAGE_IDS.name(),
            OUTBOX.name(),
            CONTACTS.name(),
        ]
        .iter()
        .all(|name| tables.iter().any(|t| t == name));
        let fresh;
        let mut migrate = false;
        let cipher = {
            let mut meta = txn.open_table(META).ctx(&path)?;
            let found = meta.get(SCHEMA_VERSION_KEY).ctx(&path)?.map(|g| g.value());
            fresh = found.is_none();
            let check = meta
                .get(HISTORY_KEY_CHECK_KEY)
                .ctx(&path)?
                .map(|g| g.value());
            match found {
                None => match key {
                    Some(key) if encrypt => {
                        meta.insert(SCHEMA_VERSION_KEY, SCHEMA_SEALED).ctx(&path)?;
                        meta.insert(HISTORY_KEY_CHECK_KEY, key.check_value())
                            .ctx(&path)?;
                        RowCipher::Sealed(key)
                    }
                    _ => {
                        meta.insert(SCHEMA_VERSION_KEY, SCHEMA_CLEAR).ctx(&path)?;
                        RowCipher::Clear
                    }
                },
                Some(v) if v > SCHEMA_VERSION => {
                    // Dropping `txn` aborts it: a newer database is never touched.
                    return Err(StoreError::NewerSchema {
                        found: v,
                        supported: SCHEMA_VERSION,
                        path,
                    });
                }
                Some(v) if v < MIN_SCHEMA_VERSION => {
                    return Err(StoreError::UnsupportedSchema { found: v, path });
                }
                Some(v) => {
                    let sealed = v == SCHEMA_SEALED || v == SCHEMA_SEALED_BY_CONVERSATION;
                    migrate =
                        v == SCHEMA_CLEAR_BY_CONVERSATION || v == SCHEMA_SEALED_BY_CONVERSATION;
                    if migrate {
                        let to = if sealed { SCHEMA_SEALED } else { SCHEMA_CLEAR };
                        meta.insert(SCHEMA_VERSION_KEY, to).ctx(&path)?;
                    }
                    match key {
                        _ if !sealed => RowCipher::Clear,
                        None => return Err(StoreError::KeyRequired { path }),
                        Some(key) if check == Some(key.check_value()) => RowCipher::Sealed(key),
                        Some(_) => return Err(StoreError::WrongKey { path }),
                    }
                }
            }
        };
        if migrate {
            let start = std::time::Instant::now();
            tracing::info!(path = %path.display(), "moving the history to storage order, once");
            let rows = migrate_by_conversation(&txn, &path)?;
            tracing::info!(rows, took = ?start.elapsed(), "history moved to storage order");
        }
        if fresh || !complete || migrate {
            // Create every table so read transactions can always open them.
            txn.open_table(HISTORY).ctx(&path)?;
            txn.open_table(CONVERSATIONS).ctx(&path)?;
            txn.open_table(MESSAGE_IDS).ctx(&path)?;
            txn.open_table(OUTBOX).ctx(&path)?;
            txn.open_table(CONTACTS).ctx(&path)?;
            txn.commit().ctx(&path)?;
        } else {
            // Opening a complete database writes nothing.
            txn.abort().ctx(&path)?;
        }
        Ok(Store {
            db: RwLock::new(Some(db)),
            reopenable: path != Path::new(MEMORY_PATH),
            path,
            cipher,
            opened: OpenedRows::new(),
            pending: Mutex::new(Pending::default()),
        })
    }

    /// The open database for a read or a write outside [`Store::write_batch`], with
    /// every acknowledged message write committed (without waiting for the disk: the
    /// log holds them), so what was acknowledged is seen. Or [`StoreError::Closed`]
    /// while [`Store::reopen`] could not open it again.
    fn db(&self) -> Result<DbRef<'_>, StoreError> {
        let db = self.db_as_is()?;
        let mut p = lock_pending(&self.pending);
        if let Err(e) = self.restore_if_stale(&db, &mut p) {
            // Reads go on meanwhile (without the writes the log holds); the next write
            // tries again, and `Store::reopen` applies the log when it opens the file.
            tracing::warn!(error = %e, "cannot apply the write log again yet");
        }
        if let Some(mut txn) = p.txn.take() {
            if p.log.is_some() {
                txn.set_durability(redb::Durability::None).ctx(&self.path)?;
            }
            if let Err(e) = txn.commit().ctx(&self.path) {
                p.lost();
                return Err(e);
            }
        }
        drop(p);
        Ok(db)
    }

    /// The open database as it is (the open transaction not committed).
    fn db_as_is(&self) -> Result<DbRef<'_>, StoreError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            return Err(StoreError::Closed {
                path: self.path.clone(),
            });
        }
        Ok(DbRef(guard))
    }

    /// Closes the database file and opens it again, with the same key.
    ///
    /// After an I/O error (a full disk, a file system turned read-only) redb refuses
    /// every further write ("Previous I/O error occurred") until the database is opened
    /// again; opening it also repairs what the failed commit left behind. Waits for the
    /// operations in progress. Until an open succeeds every operation fails with
    /// [`StoreError::Closed`]; nothing committed before is lost. An in-memory store is
    /// left as it is.
    pub fn reopen(&self) -> Result<(), StoreError> {
        if !self.reopenable {
            return Ok(());
        }
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        // The open transaction is dropped (aborted): every write in it is in the log,
        // which the open below applies again. The old handles must be gone (the file
        // lock released) before the files open again.
        *lock_pending(&self.pending) = Pending::default();
        drop(db.take());
        let key = match &self.cipher {
            RowCipher::Sealed(key) => Some(key.clone()),
            RowCipher::Clear => None,
        };
        let fresh = Self::open_file(&self.path, key, self.cipher.is_sealed())?;
        *db = fresh.db.write().unwrap_or_else(|e| e.into_inner()).take();
        std::mem::swap(
            &mut *lock_pending(&self.pending),
            &mut *lock_pending(&fresh.pending),
        );
        drop(db);
        // The open emptied the log: ready it as the writer does when it starts, so the
        // first write after the heal costs what every other does.
        if let Err(e) = self.prepare_log() {
            tracing::debug!(error = %e, "cannot ready the write log; the first write grows it");
        }
        Ok(())
    }

    /// Checks that a durable commit gets to the disk now (after [`Store::reopen`]).
    pub fn check_writable(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write().ctx(&self.path)?;
        txn.set_durability(redb::Durability::Immediate)
            .ctx(&self.path)?;
        {
            let mut meta = txn.open_table(META).ctx(&self.path)?;
            meta.insert(WRITE_CHECK_KEY, crate::node::now_ms())
                .ctx(&self.path)?;
        }
        txn.commit().ctx(&self.path)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, table: &'static str, reason: RecordError) -> StoreError {
        StoreError::CorruptRecord {
            path: self.path.clone(),
            table,
            reason,
        }
    }

    fn node_id(&self, table: &'static str, bytes: &[u8; 32]) -> Result<NodeId, StoreError> {
        NodeId::from_bytes(bytes).map_err(|_| self.corrupt(table, RecordError::InvalidNodeId))
    }

    fn decode<T: DeserializeOwned>(
        &self,
        table: &'static str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        from_bytes(bytes).map_err(|e| self.corrupt(table, e))
    }

    /// Copies every row of `table` as it is from `read` (this database) to `write` (the
    /// database at `dest`).
    fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        read: &redb::ReadTransaction,
        write: &WriteTransaction,
        table: redb::TableDefinition<'_, K, V>,
        dest: &Path,
    ) -> Result<(), StoreError> {
        let mut out = write.open_table(table).ctx(dest)?;
        for row in read
            .open_table(table)
            .ctx(&self.path)?
            .iter()
            .ctx(&self.path)?
        {
            let (k, v) = row.ctx(&self.path)?;
            out.insert(k.value(), v.value()).ctx(dest)?;
        }
        Ok(())
    }

    /// The record of the message row `key` stored as `value`.
    ///
    /// A sealed row opened before is taken from [`Store::opened`] while its stored value
    /// is the one it was opened from.
    fn decode_message(&self, key: &MessageKey, value: &[u8]) -> Result<MessageRecord, StoreError> {
        let seal = self.sealed_id(value);
        if let Some(rec) = seal.as_ref().and_then(|s| self.opened.get(key, s)) {
            return Ok(rec);
        }
        let plain = self
            .cipher
            .open(key, value)
            .map_err(|e| self.corrupt(HISTORY.name(), e))?;
        let rec: MessageRecord = self.decode(HISTORY.name(), &plain)?;
        if let Some(seal) = seal {
            self.opened.insert(*key, seal, rec.clone(), plain.len());
        }
        Ok(rec)
    }

    /// The seal of a stored message value, in an encrypted database.
    fn sealed_id(&self, stored: &[u8]) -> Option<opened::SealId> {
        if self.cipher.is_sealed() {
            cipher::seal_id(stored)
        } else {
            None
        }
    }

    /// The stored value of the message row `key` holding `rec`.
    fn encode_message<R: Serialize>(
        &self,
        key: &MessageKey,
        rec: &R,
    ) -> Result<Vec<u8>, StoreError> {
        Ok(self.cipher.seal(key, to_bytes(HISTORY.name(), rec)?))
    }

    /// The NodeId in a key: `known` when it is those bytes (a range scan of one peer
    /// does not decompress the same curve point for every row), else decoded and checked.
    fn key_node_id(
        &self,
        table: &'static str,
        bytes: &[u8; 32],
        known: Option<&NodeId>,
    ) -> Result<NodeId, StoreError> {
        match known {
            Some(id) if id.as_bytes() == bytes => Ok(*id),
            _ => self.node_id(table, bytes),
        }
    }

    /// The [`tables::HISTORY`] row `(at, id)`, decoded, if there is one.
    fn read_row(
        &self,
        history: &impl ReadableTable<RowKeyRef, RowValueRef>,
        (at, id): RowKey,
    ) -> Result<Option<Row>, StoreError> {
        let Some(guard) = history.get((at, &id)).ctx(&self.path)? else {
            return Ok(None);
        };
        let (peer, prev, value) = guard.value();
        let key = (*peer, at, id);
        let prev = self.checked_link((at, id), prev)?;
        let rec = self.decode_message(&key, value)?;
        Ok(Some(Row { key, prev, rec }))
    }

    /// The peer of the [`tables::HISTORY`] row `(at, id)` and its link, if there is such
    /// a row; its record is not decoded.
    fn read_link(
        &self,
        history: &impl ReadableTable<RowKeyRef, RowValueRef>,
        (at, id): RowKey,
    ) -> Result<Option<RowLink>, StoreError> {
        let Some(guard) = history.get((at, &id)).ctx(&self.path)? else {
            return Ok(None);
        };
        let (peer, prev, _) = guard.value();
        Ok(Some((*peer, self.checked_link((at, id), prev)?)))
    }

    /// The link of row `key`, which must point to an older row.
    fn checked_link(
        &self,
        key: RowKey,
        prev: Option<(u64, &[u8; 16])>,
    ) -> Result<Option<RowKey>, StoreError> {
        let prev = prev.map(owned_row_key);
        if prev.is_some_and(|p| p >= key) {
            return Err(self.corrupt(HISTORY.name(), RecordError::BrokenLink(MessageId(key.1))));
        }
        Ok(prev)
    }

    /// The row of message `(peer, at, id)`, which an entry of table `index` says is
    /// there.
    fn indexed_row(
        &self,
        history: &impl ReadableTable<RowKeyRef, RowValueRef>,
        index: &'static str,
        (peer, at, id): MessageKey,
    ) -> Result<Row, StoreError> {
        match self.read_row(history, (at, id))? {
            Some(row) if row.key.0 == peer => Ok(row),
            _ => Err(self.corrupt(index, RecordError::DanglingIndex(MessageId(id)))),
        }
    }

    /// The rows of the conversation with `peer`, newest first, from row `from` on down
    /// the links. Each link must point to an older row of the same conversation, so a
    /// walk always ends.
    fn walk<'h>(
        &'h self,
        history: &'h impl ReadableTable<RowKeyRef, RowValueRef>,
        peer: [u8; 32],
        from: Option<RowKey>,
    ) -> impl Iterator<Item = Result<Row, StoreError>> + 'h {
        let mut next = from;
        std::iter::from_fn(move || {
            let key = next.take()?;
            let row = match self.read_row(history, key) {
                Ok(Some(row)) if row.key.0 == peer => row,
                Ok(_) => {
                    let broken = RecordError::BrokenLink(MessageId(key.1));
                    return Some(Err(self.corrupt(HISTORY.name(), broken)));
                }
                Err(e) => return Some(Err(e)),
            };
            next = row.prev;
            Some(Ok(row))
        })
    }

    /// A history row as a message. An outgoing message whose row still says `Queued`
    /// is delivered once it has left the outbox (see [`Store::mark_delivered`]), so
    /// `outbox` is consulted for those.
    fn message_from_row(
        &self,
        row: Row,
        known: Option<&NodeId>,
        outbox: &impl ReadableTable<OutboxKeyRef, &'static [u8]>,
    ) -> Result<StoredMessage, StoreError> {
        let Row { key, mut rec, .. } = row;
        let (peer, stored_at_ms, id) = key;
        if rec.direction == Direction::Outgoing
            && rec.status == MessageStatus::Queued
            && outbox.get((&peer, &id)).ctx(&self.path)?.is_none()
        {
            rec.status = MessageStatus::Delivered;
        }
        Ok(StoredMessage {
            id: MessageId(id),
            peer: self.key_node_id(HISTORY.name(), &peer, known)?,
            direction: rec.direction,
            sent_at_ms: rec.sent_at_ms,
            stored_at_ms,
            body: rec.body,
            status: rec.status,
        })
    }

    fn outbox_from_row(
        &self,
        key: (&[u8; 32], &[u8; 16]),
        value: &[u8],
        known: Option<&NodeId>,
        history: &impl ReadableTable<RowKeyRef, RowValueRef>,
    ) -> Result<OutboxEntry, StoreError> {
        let rec: OutboxRecord = self.decode("outbox", value)?;
        let id = MessageId(*key.1);
        let msg = self
            .indexed_row(history, "outbox", (*key.0, rec.created_ms, *key.1))?
            .rec;
        Ok(OutboxEntry {
            to: self.key_node_id("outbox", key.0, known)?,
            message: ChatMessage {
                id,
                conversation: Conversation::Direct,
                sent_at_ms: msg.sent_at_ms,
                body: msg.body,
            },
            attempts: rec.attempts,
            next_attempt_ms: rec.next_attempt_ms,
            created_ms: rec.created_ms,
            mailbox_deposited: rec.mailbox_deposited,
        })
    }

    /// Opens the tables message writes touch, once per transaction.
    fn message_tables<'t>(
        &self,
        txn: &'t WriteTransaction,
    ) -> Result<MessageTables<'t>, StoreError> {
        Ok(MessageTables {
            history: txn.open_table(HISTORY).ctx(&self.path)?,
            conversations: txn.open_table(CONVERSATIONS).ctx(&self.path)?,
            ids: txn.open_table(MESSAGE_IDS).ctx(&self.path)?,
            outbox: txn.open_table(OUTBOX).ctx(&self.path)?,
            heads: HashMap::new(),
        })
    }

    /// The newest row of the conversation with `peer`, as of this transaction.
    fn head_in(
        &self,
        t: &mut MessageTables<'_>,
        peer: &[u8; 32],
    ) -> Result<Option<RowKey>, StoreError> {
        if let Some((head, _)) = t.heads.get(peer) {
            return Ok(*head);
        }
        let head = t
            .conversations
            .get(peer)
            .ctx(&self.path)?
            .map(|g| owned_row_key(g.value()));
        t.heads.insert(*peer, (head, false));
        Ok(head)
    }

    /// Writes the conversation heads a batch moved.
    fn save_heads(&self, t: &mut MessageTables<'_>) -> Result<(), StoreError> {
        for (peer, (head, moved)) in &t.heads {
            if let (Some((at, id)), true) = (head, moved) {
                t.conversations.insert(peer, (*at, id)).ctx(&self.path)?;
            }
        }
        Ok(())
    }

    /// Finds the row of message `id`.
    fn find_in(&self, t: &MessageTables<'_>, id: &MessageId) -> Result<Option<Row>, StoreError> {
        let Some((peer, at)) = t.ids.get(&id.0).ctx(&self.path)?.map(|g| g.value()) else {
            return Ok(None);
        };
        self.indexed_row(&t.history, MESSAGE_IDS.name(), (peer, at, id.0))
            .map(Some)
    }

    /// Inserts one message row and its index entry unless the id is taken. With
    /// `outbox`, also queues it for delivery. Every check and encoding happens before the
    /// first write, so an error other than a database error leaves nothing behind.
    fn insert_message_in(
        &self,
        t: &mut MessageTables<'_>,
        peer: &NodeId,
        msg: &ChatMessage,
        direction: Direction,
        now_ms: u64,
    ) -> Result<Inserted, StoreError> {
        msg.validate()?;
        let p = *peer.as_bytes();
        let head = self.head_in(t, &p)?;
        let key = (p, row_time(now_ms, &msg.id.0, head), msg.id.0);
        let rec = MessageRecordRef {
            direction,
            sent_at_ms: msg.sent_at_ms,
            body: &msg.body,
            status: match direction {
                Direction::Incoming => MessageStatus::Received,
                Direction::Outgoing => MessageStatus::Queued,
            },
        };
        let row = self.encode_message(&key, &rec)?;
        let queued = match direction {
            Direction::Incoming => None,
            Direction::Outgoing => Some(to_bytes(
                "outbox",
                &OutboxRecord {
                    attempts: 0,
                    next_attempt_ms: now_ms,
                    created_ms: key.1,
                    mailbox_deposited: false,
                },
            )?),
        };
        // Claim the id: one index operation both checks and takes it. If it was taken,
        // put the old entry back and tell a duplicate from a conflict.
        let taken = t
            .ids
            .insert(&msg.id.0, (key.0, key.1))
            .ctx(&self.path)?
            .map(|g| g.value());
        if let Some(old) = taken {
            t.ids.insert(&msg.id.0, old).ctx(&self.path)?;
            let existing =
                self.indexed_row(&t.history, MESSAGE_IDS.name(), (old.0, old.1, msg.id.0))?;
            let same = old.0 == key.0 && existing.rec.direction == direction;
            return Ok(if same {
                Inserted::Duplicate
            } else {
                Inserted::Conflict
            });
        }
        let prev = head.as_ref().map(|(at, id)| (*at, id));
        t.history
            .insert(row_key(&key), (&p, prev, row.as_slice()))
            .ctx(&self.path)?;
        t.heads.insert(p, (Some((key.1, key.2)), true));
        if let Some(queued) = queued {
            t.outbox
                .insert((&key.0, &msg.id.0), queued.as_slice())
                .ctx(&self.path)?;
        }
        Ok(Inserted::New)
    }

    /// Sets the final status of outgoing message `id` to `peer` (see
    /// [`Store::mark_delivered`]). Delivery is one operation: the entry leaves the outbox
    /// (its key names the recipient, so only the recipient's answer finds it) and the
    /// history row, still `Queued`, then reads as delivered. A rejection is written into
    /// the row.
    fn finish_in(
        &self,
        t: &mut MessageTables<'_>,
        peer: &NodeId,
        id: &MessageId,
        status: MessageStatus,
    ) -> Result<MarkOutcome, StoreError> {
        let queued_key = (peer.as_bytes(), &id.0);
        if status == MessageStatus::Delivered {
            if t.outbox.remove(queued_key).ctx(&self.path)?.is_some() {
                return Ok(MarkOutcome::Updated);
            }
            return Ok(match self.find_in(t, id)? {
                Some(row)
                    if row.key.0 == *queued_key.0 && row.rec.direction == Direction::Outgoing =>
                {
                    MarkOutcome::Unchanged
                }
                _ => MarkOutcome::Unknown,
            });
        }
        let Some(Row { key, prev, mut rec }) = self.find_in(t, id)? else {
            return Ok(MarkOutcome::Unknown);
        };
        if key.0 != *queued_key.0 || rec.direction != Direction::Outgoing {
            return Ok(MarkOutcome::Unknown);
        }
        // Only a message still queued can be rejected: a delivered one stays delivered.
        if t.outbox.get(queued_key).ctx(&self.path)?.is_none() {
            return Ok(MarkOutcome::Unchanged);
        }
        rec.status = status;
        let row = self.encode_message(&key, &rec)?;
        t.outbox.remove(queued_key).ctx(&self.path)?;
        let prev = prev.as_ref().map(|(at, id)| (*at, id));
        t.history
            .insert(row_key(&key), (&key.0, prev, row.as_slice()))
            .ctx(&self.path)?;
        Ok(MarkOutcome::Updated)
    }

    /// Applies many writes, in order, and makes them durable together (group commit).
    ///
    /// Each write gets its own outcome: a message that breaks the protocol's limits or
    /// a damaged row fails only its own write. A database error fails the whole batch
    /// and writes nothing.
    ///
    /// The writes join the open transaction, and those that changed something are
    /// appended to the write log as one record ([`log`]). When the batch stored a
    /// message, the log is synced before this returns: the messages are on disk and may
    /// be acknowledged. A batch of status marks only is not synced: if it is lost in a
    /// crash, the message is still in the outbox, is sent again, and the recipient
    /// acknowledges it as a duplicate, which marks it again. The open transaction folds
    /// (one durable commit, and the log starts a new epoch) after [`FOLD_WRITES`]
    /// writes, when the log is full, when a batch is too large for it (bulk messages are
    /// then written once, by the commit), on [`Store::flush`], and when the store is
    /// dropped. A read commits it without waiting for the disk first, so what was
    /// acknowledged is read back.
    pub fn write_batch(
        &self,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        let db = self.db_as_is()?;
        let mut guard = lock_pending(&self.pending);
        let p = &mut *guard;
        self.restore_if_stale(&db, p)?;
        let txn = match p.txn.take() {
            Some(txn) => txn,
            None => db.begin_write().ctx(&self.path)?,
        };
        let applied = self
            .apply(&txn, ops)
            .and_then(|out| Ok((self.log_batch(p, ops, &out)?, out)));
        let (fold, out) = match applied {
            Ok(done) => done,
            Err(e) => {
                drop(txn);
                p.lost();
                return Err(e);
            }
        };
        if fold {
            self.fold(&db, p, Some(txn))?;
        } else {
            p.txn = Some(txn);
        }
        Ok(out)
    }

    /// Appends the writes of `ops` that changed something (`out`) to the log, synced when
    /// the batch stored a message; returns whether the open transaction must fold
    /// instead (the batch too large for the log, the log full, or [`FOLD_WRITES`]
    /// reached; in memory only the last).
    fn log_batch(
        &self,
        p: &mut Pending,
        ops: &[WriteOp],
        out: &[Result<WriteOutcome, StoreError>],
    ) -> Result<bool, StoreError> {
        let changed: Vec<&WriteOp> = ops
            .iter()
            .zip(out)
            .filter(|(_, o)| o.as_ref().is_ok_and(|o| o.changed()))
            .map(|(op, _)| op)
            .collect();
        p.writes += changed.len();
        let Some(log) = p.log.as_mut().filter(|_| !changed.is_empty()) else {
            return Ok(p.writes >= FOLD_WRITES);
        };
        let payload = self.log_payload(log, &changed)?;
        if !log.fits(payload.len()) || p.writes >= FOLD_WRITES {
            // The fold's commit makes the batch durable.
            return Ok(true);
        }
        let stored = out
            .iter()
            .any(|o| matches!(o, Ok(WriteOutcome::Inserted(Inserted::New))));
        log.append(&payload, stored)
            .map_err(|source| StoreError::Log {
                path: log.path().to_owned(),
                source,
            })?;
        Ok(false)
    }

    /// Applies `ops` in `txn`, each with its outcome; a database error fails them all.
    fn apply(
        &self,
        txn: &WriteTransaction,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        let mut out = Vec::with_capacity(ops.len());
        let mut t = self.message_tables(txn)?;
        for op in ops {
            let res = match op {
                WriteOp::Incoming { peer, msg, now_ms } => self
                    .insert_message_in(&mut t, peer, msg, Direction::Incoming, *now_ms)
                    .map(WriteOutcome::Inserted),
                WriteOp::Outgoing { to, msg, now_ms } => self
                    .insert_message_in(&mut t, to, msg, Direction::Outgoing, *now_ms)
                    .map(WriteOutcome::Inserted),
                WriteOp::Finish { peer, id, status } => self
                    .finish_in(&mut t, peer, id, *status)
                    .map(WriteOutcome::Marked),
            };
            match res {
                Err(e @ StoreError::Db { .. }) => return Err(e),
                res => out.push(res),
            }
        }
        self.save_heads(&mut t)?;
        Ok(out)
    }

    /// The payload of the log record of `ops`, at the log's end.
    fn log_payload(&self, log: &log::Log, ops: &[&WriteOp]) -> Result<Vec<u8>, StoreError> {
        let plain = to_bytes("write log", &ops)?;
        Ok(self.cipher.seal_log(log.epoch(), log.end(), plain))
    }

    /// Commits the open transaction (or, without one, an empty one) durably, with the
    /// log's next epoch: every write so far is in the database, the log starts again.
    fn fold(
        &self,
        db: &Database,
        p: &mut Pending,
        txn: Option<WriteTransaction>,
    ) -> Result<(), StoreError> {
        let mut txn = match txn {
            Some(txn) => txn,
            None => db.begin_write().ctx(&self.path)?,
        };
        txn.set_durability(redb::Durability::Immediate)
            .ctx(&self.path)?;
        let next = p.log.as_ref().map(|l| l.epoch().wrapping_add(1));
        let committed = (|| {
            if let Some(next) = next {
                let mut meta = txn.open_table(META).ctx(&self.path)?;
                meta.insert(LOG_EPOCH_KEY, next).ctx(&self.path)?;
            }
            txn.commit().ctx(&self.path)
        })();
        if let Err(e) = committed {
            p.lost();
            return Err(e);
        }
        if let (Some(log), Some(next)) = (&mut p.log, next) {
            log.next_epoch(next);
        }
        p.writes = 0;
        Ok(())
    }

    /// Applies the log's records of its epoch (written but perhaps not in the database)
    /// to the open transaction, in order. Returns how many writes they held.
    fn replay(&self, db: &Database, p: &mut Pending) -> Result<usize, StoreError> {
        let Some(log) = &p.log else {
            return Ok(0);
        };
        let bytes = log.read_all().map_err(|source| StoreError::Log {
            path: log.path().to_owned(),
            source,
        })?;
        let mut batches = Vec::new();
        for record in log::records(&bytes, log.epoch()) {
            let corrupt = |reason| StoreError::CorruptLog {
                path: log.path().to_owned(),
                offset: record.offset,
                reason,
            };
            let plain = self
                .cipher
                .open_log(log.epoch(), record.offset, record.payload)
                .map_err(corrupt)?;
            batches.push(from_bytes::<Vec<WriteOp>>(&plain).map_err(corrupt)?);
        }
        if batches.is_empty() {
            return Ok(0);
        }
        let txn = match p.txn.take() {
            Some(txn) => txn,
            None => db.begin_write().ctx(&self.path)?,
        };
        let mut writes = 0;
        for ops in &batches {
            writes += ops.len();
            if let Err(e) = self.apply(&txn, ops) {
                drop(txn);
                p.lost();
                return Err(e);
            }
        }
        p.txn = Some(txn);
        Ok(writes)
    }

    /// After a lost transaction, applies the log again and folds.
    fn restore_if_stale(&self, db: &Database, p: &mut Pending) -> Result<(), StoreError> {
        if !p.stale {
            return Ok(());
        }
        let writes = self.replay(db, p)?;
        let txn = p.txn.take();
        self.fold(db, p, txn)?;
        p.stale = false;
        tracing::info!(writes, path = %self.path.display(), "applied the write log again after a failed write");
        Ok(())
    }

    /// Opens the write log beside the database file, applies what an unclean stop left
    /// in it, folds, and empties it.
    fn attach_log(&self) -> Result<(), StoreError> {
        let db = self.db_as_is()?;
        let found = {
            let txn = db.begin_read().ctx(&self.path)?;
            let meta = txn.open_table(META).ctx(&self.path)?;
            let epoch = meta.get(LOG_EPOCH_KEY).ctx(&self.path)?.map(|g| g.value());
            epoch
        };
        let path = log::path_of(&self.path);
        let log = log::Log::open(&path, found.unwrap_or_else(rand::random))?;
        let mut p = lock_pending(&self.pending);
        p.log = Some(log);
        let applied = (|| {
            let writes = self.replay(&db, &mut p)?;
            if writes > 0 || found.is_none() {
                let txn = p.txn.take();
                self.fold(&db, &mut p, txn)?;
            }
            Ok(writes)
        })();
        let writes = match applied {
            Ok(writes) => writes,
            Err(e) => {
                // The log stays on disk as it is (dropping the store must not remove it).
                *p = Pending::default();
                return Err(e);
            }
        };
        if writes > 0 {
            tracing::info!(writes, path = %path.display(), "applied the write log left by an unclean stop");
        }
        if let Some(log) = &mut p.log {
            log.truncate()
                .map_err(|source| StoreError::Log { path, source })?;
        }
        Ok(())
    }

    /// Readies the write log for the first write after the open ([`log::Log::reserve`]),
    /// so that write costs what every other does. The writer does this when it starts,
    /// before any message waits for it.
    pub(crate) fn prepare_log(&self) -> Result<(), StoreError> {
        let mut p = lock_pending(&self.pending);
        if let Some(log) = &mut p.log {
            let path = log.path().to_owned();
            log.reserve()
                .map_err(|source| StoreError::Log { path, source })?;
        }
        Ok(())
    }

    /// Makes every acknowledged write part of the database, durably (a fold), so the
    /// write log is empty.
    pub fn flush(&self) -> Result<(), StoreError> {
        let db = self.db_as_is()?;
        let mut p = lock_pending(&self.pending);
        self.restore_if_stale(&db, &mut p)?;
        if p.unfolded() {
            let txn = p.txn.take();
            self.fold(&db, &mut p, txn)?;
        }
        Ok(())
    }

    /// Whether acknowledged writes wait for a fold ([`Store::flush`]).
    pub fn unfolded(&self) -> bool {
        lock_pending(&self.pending).unfolded()
    }

    /// One write, as a batch of its own.
    fn write_one(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        self.write_batch(std::slice::from_ref(&op))?
            .pop()
            .unwrap_or(Err(StoreError::Internal("a batch of one gave no outcome")))
    }

    /// Durably stores a message received from `peer` (the authenticated sender), unless a
    /// message with the same id is already stored.
    ///
    /// Returns once the write is on disk (in the write log, see [`Store::write_batch`]),
    /// so the caller may acknowledge with [`Inserted::ack_status`]. `now_ms` (the local clock) orders it in the history.
    pub fn insert_incoming(
        &self,
        peer: &NodeId,
        msg: &ChatMessage,
        now_ms: u64,
    ) -> Result<Inserted, StoreError> {
        self.write_one(WriteOp::Incoming {
            peer: *peer,
            msg: msg.clone(),
            now_ms,
        })
        .map(WriteOutcome::inserted)
    }

    /// Atomically stores an outgoing message to `to` in the history (status
    /// [`MessageStatus::Queued`]) and in the outbox, due for delivery at `now_ms`.
    ///
    /// Call before the first send attempt: if the process dies at any point after this
    /// returns, the outbox still has the message. Storing the same message again is
    /// [`Inserted::Duplicate`] and changes nothing.
    pub fn insert_outgoing(
        &self,
        to: &NodeId,
        msg: &ChatMessage,
        now_ms: u64,
    ) -> Result<Inserted, StoreError> {
        self.write_one(WriteOp::Outgoing {
            to: *to,
            msg: msg.clone(),
            now_ms,
        })
        .map(WriteOutcome::inserted)
    }

    /// Records that `peer` acknowledged outgoing message `id` as stored: removes it from
    /// the outbox and sets its status to [`MessageStatus::Delivered`], atomically.
    ///
    /// Idempotent ([`MarkOutcome::Unchanged`] the second time). An acknowledgement from a
    /// peer the message was not sent to is [`MarkOutcome::Unknown`] and changes nothing.
    /// Not durable on its own (see [`Store::write_batch`]).
    pub fn mark_delivered(&self, peer: &NodeId, id: &MessageId) -> Result<MarkOutcome, StoreError> {
        self.write_one(WriteOp::Finish {
            peer: *peer,
            id: *id,
            status: MessageStatus::Delivered,
        })
        .map(WriteOutcome::marked)
    }

    /// Records that `peer` refused outgoing message `id` for good: removes it from the
    /// outbox and sets its status to [`MessageStatus::Rejected`]. A message already
    /// delivered stays delivered.
    pub fn mark_rejected(
        &self,
        peer: &NodeId,
        id: &MessageId,
        code: RejectCode,
    ) -> Result<MarkOutcome, StoreError> {
        self.write_one(WriteOp::Finish {
            peer: *peer,
            id: *id,
            status: MessageStatus::Rejected(code),
        })
        .map(WriteOutcome::marked)
    }

    /// Updates the delivery bookkeeping of an outbox entry (attempts, next attempt,
    /// mailbox deposit), identified by `entry.to` and `entry.message.id`.
    ///
    /// Returns `false`, writing nothing, if the entry is no longer in the outbox (it was
    /// delivered meanwhile), so a late update can never resurrect it. The message itself
    /// is not changed.
    pub fn update_outbox(&self, entry: &OutboxEntry) -> Result<bool, StoreError> {
        let db = self.db()?;
        let txn = db.begin_write().ctx(&self.path)?;
        let key = (entry.to.as_bytes(), &entry.message.id.0);
        {
            let mut outbox = txn.open_table(OUTBOX).ctx(&self.path)?;
            let Some(old) = outbox.get(key).ctx(&self.path)?.map(|g| g.value().to_vec()) else {
                return Ok(false);
            };
            let mut rec: OutboxRecord = self.decode("outbox", &old)?;
            rec.attempts = entry.attempts;
            rec.next_attempt_ms = entry.next_attempt_ms;
            rec.mailbox_deposited = entry.mailbox_deposited;
            outbox
                .insert(key, to_bytes("outbox", &rec)?.as_slice())
                .ctx(&self.path)?;
        }
        txn.commit().ctx(&self.path)?;
        Ok(true)
    }

    /// Every outbox entry, ordered by recipient then id.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().ctx(&self.path)?;
        let outbox = txn.open_table(OUTBOX).ctx(&self.path)?;
        let history = txn.open_table(HISTORY).ctx(&self.path)?;
        let mut out: Vec<OutboxEntry> = Vec::new();
        for row in outbox.iter().ctx(&self.path)? {
            let (k, v) = row.ctx(&self.path)?;
            // Rows are sorted by recipient: reuse the previous row's checked NodeId.
            let known = out.last().map(|e| e.to);
            out.push(self.outbox_from_row(k.value(), v.value(), known.as_ref(), &history)?);
        }
        Ok(out)
    }

    /// The outbox entries waiting for `peer`, oldest first.
    pub fn outbox_for(&self, peer: &NodeId) -> Result<Vec<OutboxEntry>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().ctx(&self.path)?;
        let outbox = txn.open_table(OUTBOX).ctx(&self.path)?;
        let history = txn.open_table(HISTORY).ctx(&self.path)?;
        let p = *peer.as_bytes();
        let mut out = Vec::new();
        for row in outbox
            .range((&p, &KEY_MIN_ID)..=(&p, &KEY_MAX_ID))
            .ctx(&self.path)?
        {
            let (k, v) = row.ctx(&self.path)?;
            out.push(self.outbox_from_row(k.value(), v.value(), Some(peer), &history)?);
        }
        out.sort_by_key(|e| (e.created_ms, e.message.sent_at_ms));
        Ok(out)
    }

    /// Visits the outbox one recipient at a time, each with its entries' bookkeeping
    /// and not their messages: only the outbox table is read, so a retry round costs one
    /// small row per queued message however large the messages are. A round keeps what
    /// is due and reads each message as it sends it ([`Store::outbox_entry`]).
    pub fn outbox_schedule(
        &self,
        mut visit: impl FnMut(NodeId, Vec<OutboxSlot>),
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().ctx(&self.path)?;
        let outbox = txn.open_table(OUTBOX).ctx(&self.path)?;
        let mut group: Vec<OutboxSlot> = Vec::new();
        for row in outbox.iter().ctx(&self.path)? {
            let (k, v) = row.ctx(&self.path)?;
            let (peer, id) = k.value();
            // Rows are sorted by recipient: a new one closes the group before it.
            let same = group
                .first()
                .map(|s| s.to)
                .filter(|to| to.as_bytes() == peer);
            if same.is_none() && !group.is_empty() {
                let done = std::mem::take(&mut group);
                visit(done[0].to, done);
            }
            let rec: OutboxRecord = self.decode("outbox", v.value())?;
            group.push(OutboxSlot {
                to: self.key_node_id("outbox", peer, same.as_ref())?,
                id: MessageId(*id),
                attempts: rec.attempts,
                next_attempt_ms: rec.next_attempt_ms,
                created_ms: rec.created_ms,
                mailbox_deposited: rec.mailbox_deposited,
            });
        }
        if let Some(first) = group.first() {
            let to = first.to;
            visit(to, group);
        }
        Ok(())
    }

    /// The outbox entry of message `id` to `peer`, with its message; `None` once it has
    /// left the outbox (delivered or rejected).
    pub fn outbox_entry(
        &self,
        peer: &NodeId,
        id: &MessageId,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        self.outbox_entries(peer, std::slice::from_ref(id))?
            .pop()
            .unwrap_or(Ok(None))
    }

    /// [`Store::outbox_entry`] of each of `ids`, in one read: the answers in the order
    /// of `ids`, each entry's own error apart (a row that no longer reads fails only its
    /// own entry).
    pub fn outbox_entries(
        &self,
        peer: &NodeId,
        ids: &[MessageId],
    ) -> Result<Vec<Result<Option<OutboxEntry>, StoreError>>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().ctx(&self.path)?;
        let outbox = txn.open_table(OUTBOX).ctx(&self.path)?;
        let history = txn.open_table(HISTORY).ctx(&self.path)?;
        Ok(ids
            .iter()
            .map(|id| {
                let key = (peer.as_bytes(), &id.0);
                let Some(row) = outbox.get(key).ctx(&self.path)? else {
                    return Ok(None);
                };
                self.outbox_from_row(key, row.value(), Some(peer), &history)
                    .map(Some)
            })
            .collect())
    }

    /// The message with this id, if stored.
    pub fn message(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().ctx(&self.path)?;
        let ids = txn.open_table(MESSAGE_IDS).ctx(&self.path)?;
        let Some((peer, at)) = ids.get(&id.0).ctx(&self.path)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let history = txn.open_table(HISTORY).ctx(&self.path)?;
        let outbox = txn.open_table(OUTBOX).ctx(&self.path)?;
        let row = self.indexed_row(&history, MESSAGE_IDS.name(), (peer, at, id.0))?;
        self.message_from_row(row, None, &outbox).map(Some)
    }

    /// The last `limit` messages of the conversation with `peer`, in chronological order.
    ///
    /// With `before = Some(cursor)` (see [`StoredMessage::cursor`]) only messages strictly
    /// older than the cursor are considered: pass the cursor of the first message of one
    /// page to get the page before it.
    pub fn history(
        &self,
        peer: &NodeId,
        limit: usize,
        before: Option<(u64, MessageId)>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let db = self.db()?;
        let txn = db.begin_read().ctx(&self.path)?;
        let history = txn.open_table(HISTORY).ctx(&self.path)?;
        let outbox = txn.open_table(OUTBOX).ctx(&self.path)?;
        let p = *peer.as_bytes();
        let head = || -> Result<Option<RowKey>, StoreError> {
            let conversations = txn.open_table(CONVERSATIONS).ctx(&self.path)?;
            let head = conversations.get(&p).ctx(&self.path)?;
            Ok(head.map(|g| owned_row_key(g.value())))
        };
        let mut skip = None;
        let from = match before {
            None => head()?,
            Some((at, id)) => match self.read_link(&history, (at, id.0))? {
                // The cursor's own row: the page starts at the row before it.
                Some((peer, prev)) if peer == p => prev,
                // A cursor that names no row of this conversation: from the newest row,
                // passing over those not older than it.
                _ => {
                    skip = Some((at, id.0));
                    head()?
                }
            },
        };
        let mut out = Vec::new();
        for row in self.walk(&history, p, from) {
            let row = row?;
            if skip.is_some_and(|cursor| (row.key.1, row.key.2) >= cursor) {
                continue;
            }
            out.push(self.message_from_row(row, Some(peer), &outbox)?);
            if out.len() == limit {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Every conversation with its latest message, most recently active first: one read
    /// of [`tables::CONVERSATIONS`] and one row per conversation.
    pub fn conversations(&self) -> Result<Vec<ConversationSummary>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().ctx(&self.path)?;
        let conversations = txn.open_table(CONVERSATIONS).ctx(&self.path)?;
        let history = txn.open_table(HISTORY).ctx(&self.path)?;
        let outbox = txn.open_table(OUTBOX).ctx(&self.path)?;
        let mut out = Vec::new();
        for entry in conversations.iter().ctx(&self.path)? {
            let (peer, newest) = entry.ctx(&self.path)?;
            let (at, id) = newest.value();
            let row = self.indexed_row(&history, CONVERSATIONS.name(), (*peer.value(), at, *id))?;
            let last = self.message_from_row(row, None, &outbox)?;
            out.push(ConversationSummary {
                peer: last.peer,
                last,
            });
        }
        out.sort_by(|a, b| {
            b.last
                .stored_at_ms
                .cmp(&a.last.stored_at_ms)
                .then(a.peer.cmp(&b.peer))
        });
        Ok(out)
    }

    /// The contact pinned for `name`, if any.
    pub fn contact(&self, name: &str) -> Result<Option<Contact>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().ctx(&self.path)?;
        let contacts = txn.open_table(CONTACTS).ctx(&self.path)?;
        let value = contacts.get(name).ctx(&self.path)?;
        value
            .map(|v| self.decode("contacts", v.value()))
            .transpose()
    }

    /// Every contact, ordered by name.
    pub fn contacts(&self) -> Result<Vec<(String, Contact)>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().ctx(&self.path)?;
        let contacts = txn.open_table(CONTACTS).ctx(&self.path)?;
        let mut out = Vec::new();
        for row in contacts.iter().ctx(&self.path)? {
            let (k, v) = row.ctx(&self.path)?;
            out.push((k.value().to_owned(), self.decode("contacts", v.value())?));
        }
        Ok(out)
    }

    /// Pins `node_id` for `name` if the name is new (trust on first use).
    ///
    /// A name already pinned to another NodeId is *not* overwritten: the result is
    /// [`PinOutcome::Changed`] and the caller decides (warn; [`Store::set_contact`] to
    /// accept).
    pub fn pin_contact(
        &self,
        name: &str,
        node_id: &NodeId,
        now_ms: u64,
    ) -> Result<PinOutcome, StoreError> {
        let db = self.db()?;
        let txn = db.begin_write().ctx(&self.path)?;
        {
            let mut contacts = txn.open_table(CONTACTS).ctx(&self.path)?;
            let existing = contacts
                .get(name)
                .ctx(&self.path)?
                .map(|v| self.decode::<Contact>("contacts", v.value()))
                .transpose()?;
            if let Some(c) = existing {
                return Ok(if c.node_id == *node_id {
                    PinOutcome::Same
                } else {
                    PinOutcome::Changed { old: c.node_id }
                });
            }
            let c = Contact {
                node_id: *node_id,
                first_seen_ms: now_ms,
                mailbox_key: None,
            };
            contacts
                .insert(name, to_bytes("contacts", &c)?.as_slice())
                .ctx(&self.path)?;
        }
        txn.commit().ctx(&self.path)?;
        Ok(PinOutcome::New)
    }

    /// Stores `contact` for `name`, replacing whatever was pinned (e.g. after the user
    /// accepted a changed key, or to record the mailbox key).
    pub fn set_contact(&self, name: &str, contact: &Contact) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_write().ctx(&self.path)?;
        {
            let mut contacts = txn.open_table(CONTACTS).ctx(&self.path)?;
            contacts
                .insert(name, to_bytes("contacts", contact)?.as_slice())
                .ctx(&self.path)?;
        }
        txn.commit().ctx(&self.path)?;
        Ok(())
    }

    /// Forgets the contact `name`; returns whether it existed.
    pub fn remove_contact(&self, name: &str) -> Result<bool, StoreError> {
        let db = self.db()?;
        let txn = db.begin_write().ctx(&self.path)?;
        let existed = {
            let mut contacts = txn.open_table(CONTACTS).ctx(&self.path)?;
            let existed = contacts.remove(name).ctx(&self.path)?.is_some();
            existed
        };
        if existed {
            txn.commit().ctx(&self.path)?;
        }
        Ok(existed)
    }
}

/// Where a copy is prepared before it replaces the database at `path` (an encrypted
/// rewrite, an imported history). A leftover one is removed when the database is opened.
/// Moves the history of a schema 1 or 2 database (a `messages` table in conversation
/// order) into [`tables::HISTORY`] and [`tables::CONVERSATIONS`], within the caller's
/// transaction; the values move as they are (a sealed value stays bound to the same
/// [`MessageKey`]). Returns the number of messages.
fn migrate_by_conversation(txn: &WriteTransaction, path: &Path) -> Result<u64, StoreError> {
    let mut rows = 0u64;
    {
        let old = txn.open_table(MESSAGES_BY_CONVERSATION).ctx(path)?;
        let mut history = txn.open_table(HISTORY).ctx(path)?;
        let mut conversations = txn.open_table(CONVERSATIONS).ctx(path)?;
        let mut newest: Option<([u8; 32], RowKey)> = None;
        for row in old.iter().ctx(path)? {
            let (k, v) = row.ctx(path)?;
            let (peer, at, id) = k.value();
            // Rows come in key order: a conversation at a time, oldest first.
            let prev = match newest {
                Some((p, key)) if p == *peer => Some(key),
                _ => None,
            };
            history
                .insert(
                    (at, id),
                    (peer, prev.as_ref().map(|(a, i)| (*a, i)), v.value()),
                )
                .ctx(path)?;
            conversations.insert(peer, (at, id)).ctx(path)?;
            newest = Some((*peer, (at, *id)));
            rows += 1;
        }
    }
    txn.delete_table(MESSAGES_BY_CONVERSATION).ctx(path)?;
    Ok(rows)
}

pub(crate) fn rewrite_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".rewrite");
    PathBuf::from(name)
}

/// Removes what an interrupted rewrite left (the copy and its write log): the database
/// itself is still whole.
fn remove_leftover(tmp: &Path) -> Result<(), StoreError> {
    remove_file_if_there(&log::path_of(tmp))?;
    remove_file_if_there(tmp)
}

fn remove_file_if_there(tmp: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(tmp) {
        Ok(()) => {
            tracing::info!(path = %tmp.display(), "removed an interrupted rewrite");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Rewrite {
            path: tmp.to_owned(),
            source,
        }),
    }
}

fn classify_open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    use redb::{DatabaseError, StorageError};
    let path = path.to_owned();
    match e {
        DatabaseError::DatabaseAlreadyOpen => StoreError::AlreadyOpen { path },
        DatabaseError::Storage(StorageError::Corrupted(_)) => {
            StoreError::Corrupt { path, source: e }
        }
        // redb reports a file without its magic number as InvalidData.
        DatabaseError::Storage(StorageError::Io(ref io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            StoreError::Corrupt { path, source: e }
        }
        e => StoreError::Open { path, source: e },
    }
}

#[cfg(test)]
mod tests;
