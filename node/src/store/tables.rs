//! Every redb table of the node database, in one place.
//!
//! Changing a key or value type, or the encoding of a stored record in a way that is not
//! a pure append of enum variants, requires bumping [`SCHEMA_VERSION`] and a migration in
//! `Store::open`. The [`META`] table's types are fixed forever, because it is read to find
//! out which schema the rest of the file uses.

use redb::TableDefinition;

/// The newest schema version this build reads and writes.
///
/// - 1: every value in clear.
/// - 2: the same tables, [`MESSAGES`] values sealed under the history key
///   (`store/cipher.rs`), and [`HISTORY_KEY_CHECK_KEY`] in [`META`].
///
/// A clear database stays at version 1, so an older build still opens it; it refuses an
/// encrypted one as newer instead of misreading it.
pub const SCHEMA_VERSION: u64 = SCHEMA_SEALED;

/// Schema of a clear database.
pub const SCHEMA_CLEAR: u64 = 1;

/// Schema of an encrypted database.
pub const SCHEMA_SEALED: u64 = 2;

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

/// Database-wide settings: `name -> u64`. Holds [`SCHEMA_VERSION_KEY`] and, when
/// encrypted, [`HISTORY_KEY_CHECK_KEY`]; [`WRITE_CHECK_KEY`] once a write was checked.
pub const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");

/// Key of a message row: `(peer NodeId bytes, stored_at_ms, message id)`.
///
/// Sorting by peer first makes one conversation a contiguous range, and by local storage
/// time then id inside it makes "the last N" a reverse range scan.
pub type MessageKey = ([u8; 32], u64, [u8; 16]);

/// [`MessageKey`] as the [`MESSAGES`] table is typed: its byte arrays borrowed. redb
/// compares a `&[u8; N]` with one `memcmp` and a `[u8; N]` byte by byte, through a call
/// per byte; both have the type name `[u8;N]` and the same bytes on disk, so a file
/// written with either opens with the other.
pub type MessageKeyRef = (&'static [u8; 32], u64, &'static [u8; 16]);

/// Key of an [`OUTBOX`] row: `(recipient NodeId bytes, message id)`, borrowed like
/// [`MessageKeyRef`].
pub type OutboxKeyRef = (&'static [u8; 32], &'static [u8; 16]);

/// The key of a message row as its table takes it.
pub fn row_key(key: &MessageKey) -> (&[u8; 32], u64, &[u8; 16]) {
    (&key.0, key.1, &key.2)
}

/// The key of a message row as read from its table, copied out.
pub fn owned_key((peer, at, id): (&[u8; 32], u64, &[u8; 16])) -> MessageKey {
    (*peer, at, *id)
}

/// History: [`MessageKey`] -> postcard `MessageRecord` (direction, sender's timestamp,
/// body, status), sealed in an encrypted database.
pub const MESSAGES: TableDefinition<'static, MessageKeyRef, &[u8]> =
    TableDefinition::new("messages");

/// Message-id index: `id -> (peer, stored_at_ms)`, the rest of its [`MessageKey`]. Used to
/// deduplicate by id and to find a message for a status update.
pub const MESSAGE_IDS: TableDefinition<'static, &'static [u8; 16], ([u8; 32], u64)> =
    TableDefinition::new("message_ids");

/// Outbox: `(recipient NodeId bytes, message id) -> postcard OutboxRecord`. Keyed by
/// recipient so that "everything waiting for this peer" is a range scan.
pub const OUTBOX: TableDefinition<'static, OutboxKeyRef, &[u8]> = TableDefinition::new("outbox");

/// Contacts: `name -> postcard ContactRecord` (pinned NodeId, first seen, mailbox key).
pub const CONTACTS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("contacts");
