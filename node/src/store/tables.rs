//! Every redb table of the node database, in one place.
//!
//! Changing a key or value type, or the encoding of a stored record in a way that is not
//! a pure append of enum variants, requires bumping [`SCHEMA_VERSION`] and a migration in
//! `Store::open`. The [`META`] table's types are fixed forever, because it is read to find
//! out which schema the rest of the file uses.

use redb::TableDefinition;

/// The newest schema version this build reads and writes.
///
/// - 1: every value in clear, messages in a `messages` table keyed by conversation.
/// - 2: schema 1 with the message values sealed under the history key
///   (`store/cipher.rs`), and [`HISTORY_KEY_CHECK_KEY`] in [`META`].
/// - 3: schema 1 with the messages in storage order ([`HISTORY`]), each row linked to
///   the one before it in its conversation, and [`CONVERSATIONS`] naming the newest row
///   of each conversation.
/// - 4: schema 3 sealed as schema 2 is.
///
/// `Store::open` moves a database of schema 1 or 2 to 3 or 4, in one transaction. A
/// build older than schema 3 refuses the result as newer instead of misreading it.
pub const SCHEMA_VERSION: u64 = SCHEMA_SEALED;

/// Schema of a clear database.
pub const SCHEMA_CLEAR: u64 = 3;

/// Schema of an encrypted database.
pub const SCHEMA_SEALED: u64 = 4;

/// Schema 1: clear, messages by conversation.
pub const SCHEMA_CLEAR_BY_CONVERSATION: u64 = 1;

/// Schema 2: sealed, messages by conversation.
pub const SCHEMA_SEALED_BY_CONVERSATION: u64 = 2;

/// The oldest schema version this build can open (migrating it forward).
pub const MIN_SCHEMA_VERSION: u64 = 1;

/// Key of the schema version in [`META`].
pub const SCHEMA_VERSION_KEY: &str = "schema_version";

/// Key of the check value of the history key in [`META`] (encrypted databases only):
/// `p2p_crypto::history::HistoryKey::check_value`, which identifies the key without
/// revealing it.
pub const HISTORY_KEY_CHECK_KEY: &str = "history_key_check";

/// Key in [`META`] of the local time of the last write check after the database was
/// opened again following an I/O error (`Store::check_writable`).
pub const WRITE_CHECK_KEY: &str = "write_check_ms";

/// Key in [`META`] of the write log's epoch: the log's records of this epoch are not
/// folded into the database yet (see `store/log.rs`). Absent before the first open by a
/// build with the log.
pub const LOG_EPOCH_KEY: &str = "log_epoch";

/// Database-wide settings: `name -> u64`. Holds [`SCHEMA_VERSION_KEY`] and, when
/// encrypted, [`HISTORY_KEY_CHECK_KEY`]; [`WRITE_CHECK_KEY`] once a write was checked;
/// [`LOG_EPOCH_KEY`].
pub const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");

/// The logical key of a message: `(peer NodeId bytes, stored_at_ms, message id)`. Within
/// one conversation, messages are ordered by it; a sealed value is bound to it.
pub type MessageKey = ([u8; 32], u64, [u8; 16]);

/// Key of a [`HISTORY`] row: `(stored_at_ms, message id)`, the [`MessageKey`] without
/// its peer. redb compares a `&[u8; N]` with one `memcmp` and a `[u8; N]` byte by byte,
/// through a call per byte; both have the type name `[u8;N]` and the same bytes on disk.
pub type RowKeyRef = (u64, &'static [u8; 16]);

/// Value of a [`HISTORY`] row: `(peer, the previous row of the conversation, record)`.
pub type RowValueRef = (&'static [u8; 32], Option<RowKeyRef>, &'static [u8]);

/// Key of an [`OUTBOX`] row: `(recipient NodeId bytes, message id)`, borrowed like
/// [`RowKeyRef`].
pub type OutboxKeyRef = (&'static [u8; 32], &'static [u8; 16]);

/// The [`HISTORY`] key of a message.
pub fn row_key(key: &MessageKey) -> (u64, &[u8; 16]) {
    (key.1, &key.2)
}

/// History, in storage order: `(stored_at_ms, id) -> (peer, previous row of the same
/// conversation, postcard MessageRecord)`, the record sealed in an encrypted database.
///
/// A batch of messages to many conversations appends to the end of this table, so a
/// commit rewrites a few pages however many conversations it touches. A conversation is
/// read newest first by following the links from its row in [`CONVERSATIONS`]; each link
/// points to a strictly smaller key, so a walk always ends.
pub const HISTORY: TableDefinition<'static, RowKeyRef, RowValueRef> =
    TableDefinition::new("history");

/// Conversations: `peer -> (stored_at_ms, id)`, the [`HISTORY`] key of its newest message.
pub const CONVERSATIONS: TableDefinition<'static, &'static [u8; 32], RowKeyRef> =
    TableDefinition::new("conversations");

/// Key of a schema 1 or 2 history row: a [`MessageKey`], its byte arrays borrowed.
pub type ConversationKeyRef = (&'static [u8; 32], u64, &'static [u8; 16]);

/// Schema 1 and 2 history, read only to migrate: `(peer, stored_at_ms, id) -> record`.
pub const MESSAGES_BY_CONVERSATION: TableDefinition<'static, ConversationKeyRef, &[u8]> =
    TableDefinition::new("messages");

/// Message-id index: `id -> (peer, stored_at_ms)`, the rest of its [`MessageKey`]. Used to
/// deduplicate by id and to find a message for a status update. Ids start with their
/// creation time, so this table grows at its end too.
pub const MESSAGE_IDS: TableDefinition<'static, &'static [u8; 16], ([u8; 32], u64)> =
    TableDefinition::new("message_ids");

/// Outbox: `(recipient NodeId bytes, message id) -> postcard OutboxRecord`. Keyed by
/// recipient so that "everything waiting for this peer" is a range scan.
pub const OUTBOX: TableDefinition<'static, OutboxKeyRef, &[u8]> = TableDefinition::new("outbox");

/// Contacts: `name -> postcard ContactRecord` (pinned NodeId, first seen, mailbox key).
pub const CONTACTS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("contacts");
