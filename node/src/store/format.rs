//! Moving a database written by an earlier version (redb 2, file format 2) to the format
//! this build reads (redb 4, file format 3), once, when it opens.
//!
//! redb 4 reads only file format 3, and it encodes a tuple with a variable-width element
//! differently from redb 2: the values of [`HISTORY`] are such tuples. redb's own
//! in-place upgrade changes the file format but not the rows, so the database is copied
//! instead: the old file is read with redb 2 and every table is written, row by row
//! through the types both versions share, to a new file beside it
//! (`node.redb.rewrite`), committed durably and renamed over the original. A crash at any
//! point leaves the old file whole (the next open starts again, the partial copy removed)
//! or the new one whole. Sealed rows are copied as they are: their values, not the
//! tuples around them, are what the key seals. The write log beside the database
//! (`node.redb-log`) is left as it is and applied after the copy, which keeps the log's
//! epoch in [`META`].

use std::path::Path;

use p2p_crypto::owner_only;
use redb::TableHandle as _;
use redb2::{ReadableTable as _, TableHandle as _};

use super::tables::{
    ConversationKeyRef, OutboxKeyRef, RowKeyRef, RowValueRef, CONTACTS, CONVERSATIONS, HISTORY,
    MESSAGES_BY_CONVERSATION, MESSAGE_IDS, META, OUTBOX,
};
use super::{remove_leftover, rewrite_path, Ctx, StoreError};

/// The target of the log lines that announce a move, which a program may show by
/// default (it takes seconds for a large history, once).
pub const LOG_TARGET: &str = "p2p_node::format";

/// Rows written per transaction of the copy, so that memory stays bounded on a large
/// history.
const ROWS_PER_COMMIT: u64 = 50_000;

/// The page cache of each of the two databases during the copy (redb's default is
/// 1 GiB): every page is read once and written once, so a cache buys nothing.
const COPY_CACHE_BYTES: usize = 64 << 20;

/// Copies the redb 2 database at `path` into the current format and renames the copy over
/// it. Returns the number of rows copied.
pub(super) fn upgrade(path: &Path) -> Result<u64, StoreError> {
    let start = std::time::Instant::now();
    tracing::info!(target: LOG_TARGET, path = %path.display(), "moving the database to the current storage format, once");
    let tmp = rewrite_path(path);
    remove_leftover(&tmp)?;
    let old = redb2::Builder::new()
        .set_cache_size(COPY_CACHE_BYTES)
        .open(path)
        .map_err(|e| old_error(path, e))?;
    let file = owner_only::open_options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|source| StoreError::Rewrite {
            path: tmp.clone(),
            source,
        })?;
    let copied = copy_all(&old, file, path, &tmp);
    let rows = match copied {
        Ok(rows) => rows,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    crate::datadir::crash_point("format-copied");
    drop(old);
    std::fs::rename(&tmp, path).map_err(|source| StoreError::Rewrite {
        path: path.to_owned(),
        source,
    })?;
    owner_only::sync_dir(&owner_only::parent_dir(path));
    tracing::info!(target: LOG_TARGET, rows, took = ?start.elapsed(), "database moved to the current storage format");
    Ok(rows)
}

/// Writes every table of `old` into a new database in `file` (at `tmp`), durably.
fn copy_all(
    old: &redb2::Database,
    file: std::fs::File,
    path: &Path,
    tmp: &Path,
) -> Result<u64, StoreError> {
    let backend = redb::backends::FileBackend::new(file).ctx(tmp)?;
    let new = redb::Builder::new()
        .set_cache_size(COPY_CACHE_BYTES)
        .create_with_backend(backend)
        .ctx(tmp)?;
    let read = old.begin_read().map_err(|e| old_error(path, e))?;
    if read
        .list_multimap_tables()
        .map_err(|e| old_error(path, e))?
        .next()
        .is_some()
    {
        return Err(unknown_table(path, "a multimap table"));
    }
    let names: Vec<String> = read
        .list_tables()
        .map_err(|e| old_error(path, e))?
        .map(|t| t.name().to_owned())
        .collect();
    let copy = Copy {
        from: &read,
        to: &new,
        path,
        tmp,
    };
    let mut rows = 0;
    for name in &names {
        rows += match name.as_str() {
            n if n == META.name() => copy.table::<&str, u64>(n)?,
            n if n == HISTORY.name() => copy.table::<RowKeyRef, RowValueRef>(n)?,
            n if n == CONVERSATIONS.name() => copy.table::<&[u8; 32], RowKeyRef>(n)?,
            n if n == MESSAGES_BY_CONVERSATION.name() => {
                copy.table::<ConversationKeyRef, &[u8]>(n)?
            }
            n if n == MESSAGE_IDS.name() => copy.table::<&[u8; 16], ([u8; 32], u64)>(n)?,
            n if n == OUTBOX.name() => copy.table::<OutboxKeyRef, &[u8]>(n)?,
            n if n == CONTACTS.name() => copy.table::<&str, &[u8]>(n)?,
            n => return Err(unknown_table(path, n)),
        };
        if rows > 0 {
            crate::datadir::crash_point("format-copying");
        }
    }
    Ok(rows)
}

/// One copy: from the old database's read transaction to the new database.
struct Copy<'a> {
    from: &'a redb2::ReadTransaction,
    to: &'a redb::Database,
    path: &'a Path,
    tmp: &'a Path,
}

impl Copy<'_> {
    /// Copies the table `name`, whose key and value types are `K` and `V` in both
    /// versions, in key order. Returns the number of rows.
    fn table<K, V>(&self, name: &str) -> Result<u64, StoreError>
    where
        K: redb::Key + redb2::Key + 'static,
        V: redb::Value + redb2::Value + 'static,
        for<'x> K: redb2::Value<SelfType<'x> = <K as redb::Value>::SelfType<'x>>,
        for<'x> V: redb2::Value<SelfType<'x> = <V as redb::Value>::SelfType<'x>>,
    {
        let old = self
            .from
            .open_table(redb2::TableDefinition::<K, V>::new(name))
            .map_err(|e| old_error(self.path, e))?;
        let mut rows = old.iter().map_err(|e| old_error(self.path, e))?;
        let mut copied = 0;
        loop {
            let txn = self.to.begin_write().ctx(self.tmp)?;
            let mut more = true;
            {
                let mut table = txn
                    .open_table(redb::TableDefinition::<K, V>::new(name))
                    .ctx(self.tmp)?;
                for _ in 0..ROWS_PER_COMMIT {
                    let Some(row) = rows.next() else {
                        more = false;
                        break;
                    };
                    let (k, v) = row.map_err(|e| old_error(self.path, e))?;
                    table.insert(k.value(), v.value()).ctx(self.tmp)?;
                    copied += 1;
                }
            }
            txn.commit().ctx(self.tmp)?;
            if !more {
                return Ok(copied);
            }
        }
    }
}

fn old_error(path: &Path, e: impl Into<redb2::Error>) -> StoreError {
    StoreError::OldFormat {
        path: path.to_owned(),
        source: Box::new(e.into()),
    }
}

fn unknown_table(path: &Path, name: &str) -> StoreError {
    StoreError::OldFormat {
        path: path.to_owned(),
        source: Box::new(redb2::Error::Corrupted(format!(
            "{name} that no version of p2p-node writes"
        ))),
    }
}
