//! Every redb table of the node database, in one place.
//!
//! Changing a key or value type, or the encoding of a stored record in a way that is not
//! a pure append of enum variants, requires bumping [`SCHEMA_VERSION`] and a migration in
//! `Store::open`. The [`META`] table's types are fixed forever, because it is read to find
//! out which schema the rest of the file uses.

use redb::TableDefinition;

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u64 = 1;

/// The oldest schema version this build can open (migrating it forward).
pub const MIN_SCHEMA_VERSION: u64 = 1;

/// Key of the schema version in [`META`].
pub const SCHEMA_VERSION_KEY: &str = "schema_version";

/// Database-wide settings: `name -> u64`. Holds [`SCHEMA_VERSION_KEY`].
pub const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");

/// Key of a message row: `(peer NodeId bytes, stored_at_ms, message id)`.
///
/// Sorting by peer first makes one conversation a contiguous range, and by local storage
/// time then id inside it makes "the last N" a reverse range scan.
pub type MessageKey = ([u8; 32], u64, [u8; 16]);

/// History: [`MessageKey`] -> postcard `MessageRecord` (direction, sender's timestamp,
/// body, status).
pub const MESSAGES: TableDefinition<'static, MessageKey, &[u8]> = TableDefinition::new("messages");

/// Message-id index: `id -> (peer, stored_at_ms)`, the rest of its [`MessageKey`]. Used to
/// deduplicate by id and to find a message for a status update.
pub const MESSAGE_IDS: TableDefinition<'static, [u8; 16], ([u8; 32], u64)> =
    TableDefinition::new("message_ids");

/// Outbox: `(recipient NodeId bytes, message id) -> postcard OutboxRecord`. Keyed by
/// recipient so that "everything waiting for this peer" is a range scan.
pub const OUTBOX: TableDefinition<'static, ([u8; 32], [u8; 16]), &[u8]> =
    TableDefinition::new("outbox");

/// Contacts: `name -> postcard ContactRecord` (pinned NodeId, first seen, mailbox key).
pub const CONTACTS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("contacts");
