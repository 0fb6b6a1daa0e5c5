//! What is done to a data directory's identity while no node runs on it: changing its
//! passphrase, and moving it, with its history if asked, to another machine.
//!
//! # Passphrase change
//!
//! The history key is derived from the identity seed, not from the passphrase, so a
//! change of passphrase rewrites the key file only (atomically: temporary file, fsync,
//! rename). Adding a passphrase to an unprotected identity also encrypts its clear
//! history, after the key file is written: if the process dies in between, the next
//! open with the new passphrase finds a protected identity with a clear history and
//! encrypts it then (the encryption itself is a copy renamed over the original, see
//! [`crate::store`]). At every point the key file is the old one or the new one, and the
//! history opens with whichever it is.
//!
//! # Export file
//!
//! ```text
//! magic    8  "P2PEXP\0\x01"   (format version 1)
//! key_len  4  little-endian, at most 1024
//! key      a key file (`p2p_crypto::keyfile`), sealed with the export passphrase
//! hist_len 8  little-endian; 0 when the history was not exported
//! history  an encrypted node database (schema 4): every message sealed under the
//!          history key of the identity above
//! sum     32  SHA-256 of everything before it
//! ```
//!
//! The file is as private as a passphrase-protected data directory: without the
//! passphrase it shows the NodeId, the contacts and who was talked to when (the clear
//! parts of the database), never the message contents. It is written atomically with
//! mode 0600.

use std::{
    fs::{self, File},
    io::{self, BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
};

use p2p_crypto::{
    keyfile::{self, KeyFileError},
    owner_only, NodeId,
};
use sha2::{Digest, Sha256};

use super::{crash_point, lock, LockError, DB_FILE, KEY_FILE};
use crate::store::{rewrite_path, Store, StoreError};

const MAGIC: &[u8; 8] = b"P2PEXP\0\x01";
const MAX_KEY_LEN: u32 = 1024;

// ---------------------------------------------------------------------------------------
// Passphrase
// ---------------------------------------------------------------------------------------

/// What [`change_passphrase`], [`export`] or [`import`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The identity.
    pub node_id: NodeId,
    /// Messages in the history it handled (encrypted, exported, imported); `None` when
    /// there was no history to handle.
    pub messages: Option<u64>,
    /// Whether a clear history was encrypted.
    pub encrypted: bool,
}

/// A passphrase change failed. Unless the message says otherwise, nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum PassphraseError {
    /// The data directory is in use, too open, or cannot be locked.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The key file cannot be read (e.g. a wrong passphrase) or written.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The history cannot be encrypted. The new passphrase is in place, and the next
    /// start with it encrypts the history.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Protects the identity in `dir` with `new` (it was unprotected when `old` is `None`,
/// or is protected by `old`), and encrypts its history if it is still clear.
pub fn change_passphrase(
    dir: &Path,
    old: Option<&[u8]>,
    new: &[u8],
) -> Result<Done, PassphraseError> {
    let _lock = lock(dir)?;
    let key_path = dir.join(KEY_FILE);
    let key = keyfile::load(&key_path, old)?;
    keyfile::store(&key_path, &key, Some(new), true)?;
    crash_point("key-written");
    let db = dir.join(DB_FILE);
    let (mut messages, mut encrypted) = (None, false);
    if db.exists() {
        let mut store = Store::open_with_key(&db, key.history_key(), false)?;
        if !store.is_encrypted() {
            drop(store);
            store = Store::open_with_key(&db, key.history_key(), true)?;
            encrypted = true;
        }
        messages = Some(store.message_count()?);
    }
    Ok(Done {
        node_id: key.public(),
        messages,
        encrypted,
    })
}

// ---------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------

/// An export failed; no export file was written and the data directory is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The data directory is in use, too open, or cannot be locked.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The key file cannot be read (e.g. a wrong passphrase).
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The history cannot be read or copied.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The export file exists already.
    #[error("export file {} already exists", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Writing the export file failed.
    #[error("writing export file {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Writes the identity of `dir` (and its history when `with_history`) to the new file
/// `out`, sealed with `passphrase` (which must also open the key file, if protected).
pub fn export(
    dir: &Path,
    passphrase: &[u8],
    with_history: bool,
    out: &Path,
) -> Result<Done, ExportError> {
    let _lock = lock(dir)?;
    let key = keyfile::load(&dir.join(KEY_FILE), Some(passphrase))?;
    if out.exists() {
        return Err(ExportError::Exists {
            path: out.to_owned(),
        });
    }
    let key_bytes = keyfile::encode(&key, Some(passphrase));
    let db = dir.join(DB_FILE);
    let snapshot = owner_only::temp_path(out);
    let tmp = owner_only::temp_path(out);
    let result = (|| {
        let messages = if with_history && db.exists() {
            let store = Store::open_with_key(&db, key.history_key(), false)?;
            Some(store.copy_to(&snapshot, &key.history_key())?)
        } else {
            None
        };
        write_export(&tmp, &key_bytes, messages.map(|_| snapshot.as_path()), out)?;
        Ok(Done {
            node_id: key.public(),
            messages,
            encrypted: false,
        })
    })();
    let _ = fs::remove_file(&snapshot);
    let _ = fs::remove_file(&tmp);
    result
}

/// Writes the export to `tmp`, makes it durable and links it at `out`.
fn write_export(
    tmp: &Path,
    key: &[u8],
    history: Option<&Path>,
    out: &Path,
) -> Result<(), ExportError> {
    let werr = |source| ExportError::Write {
        path: out.to_owned(),
        source,
    };
    let file = owner_only::open_options()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(werr)?;
    let mut w = Hashing {
        inner: BufWriter::new(file),
        hash: Sha256::new(),
    };
    let key_len = u32::try_from(key.len()).map_err(|_| werr(io::ErrorKind::InvalidInput.into()))?;
    w.write_all(MAGIC).map_err(werr)?;
    w.write_all(&key_len.to_le_bytes()).map_err(werr)?;
    w.write_all(key).map_err(werr)?;
    match history {
        Some(path) => {
            let mut f = File::open(path).map_err(werr)?;
            let len = f.metadata().map_err(werr)?.len();
            w.write_all(&len.to_le_bytes()).map_err(werr)?;
            let copied = io::copy(&mut (&mut f).take(len), &mut w).map_err(werr)?;
            if copied != len {
                return Err(werr(io::ErrorKind::UnexpectedEof.into()));
            }
        }
        None => w.write_all(&0u64.to_le_bytes()).map_err(werr)?,
    }
    let sum = w.hash.finalize_reset();
    let mut file = w.inner.into_inner().map_err(|e| werr(e.into_error()))?;
    file.write_all(&sum).map_err(werr)?;
    file.sync_all().map_err(werr)?;
    drop(file);
    fs::hard_link(tmp, out).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            ExportError::Exists {
                path: out.to_owned(),
            }
        } else {
            werr(source)
        }
    })?;
    owner_only::sync_dir(&owner_only::parent_dir(out));
    Ok(())
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

// ---------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------

/// An import failed. Nothing was written unless the message says so.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The data directory is in use, too open, or cannot be locked.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The passphrase does not open the identity in the file.
    #[error("wrong passphrase for export file {}", path.display())]
    WrongPassphrase {
        /// The file.
        path: PathBuf,
    },
    /// The key file cannot be written.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The history in the file is not a history of this identity, or cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data directory has an identity already.
    #[error("an identity already exists at {}", path.display())]
    IdentityExists {
        /// The key file.
        path: PathBuf,
    },
    /// The data directory has a history already, and the file holds one.
    #[error("a history already exists at {}", path.display())]
    HistoryExists {
        /// The database file.
        path: PathBuf,
    },
    /// The file cannot be read.
    #[error("cannot read export file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not an export file, or is damaged.
    #[error("{} is not a p2p-node export file or is damaged: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// Writing the history into the data directory failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Reads `buf.len()` bytes, or tells a short file from an I/O error.
fn read_part(r: &mut impl Read, buf: &mut [u8], file: &Path) -> Result<(), ImportError> {
    r.read_exact(buf).map_err(|source| {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            ImportError::Corrupt {
                path: file.to_owned(),
                reason: "truncated",
            }
        } else {
            ImportError::Read {
                path: file.to_owned(),
                source,
            }
        }
    })
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Creates the identity of the export `file` in `dir`, protected by `passphrase` (the
/// one the file was exported with), and its history if the file holds one. An existing
/// identity or history is replaced only when `force`.
///
/// The whole file is checked (its checksum, the passphrase, and that the history belongs
/// to the identity) before anything is written. The key file is written first, then the
/// history is renamed into place.
pub fn import(
    file: &Path,
    dir: &Path,
    passphrase: &[u8],
    force: bool,
) -> Result<Done, ImportError> {
    let _lock = lock(dir)?;
    let key_path = dir.join(KEY_FILE);
    if !force && key_path.exists() {
        return Err(ImportError::IdentityExists { path: key_path });
    }
    let corrupt = |reason| ImportError::Corrupt {
        path: file.to_owned(),
        reason,
    };
    let f = File::open(file).map_err(|source| ImportError::Read {
        path: file.to_owned(),
        source,
    })?;
    let mut r = HashingReader {
        inner: BufReader::new(f),
        hash: Sha256::new(),
    };
    let mut magic = [0u8; 8];
    read_part(&mut r, &mut magic, file)?;
    if &magic != MAGIC {
        return Err(corrupt("bad magic"));
    }
    let mut len = [0u8; 4];
    read_part(&mut r, &mut len, file)?;
    let key_len = u32::from_le_bytes(len);
    if key_len > MAX_KEY_LEN {
        return Err(corrupt("key part too long"));
    }
    let mut key_bytes = zeroize::Zeroizing::new(vec![0u8; key_len as usize]);
    read_part(&mut r, &mut key_bytes, file)?;
    let key = keyfile::decode(file, &key_bytes, Some(passphrase)).map_err(|e| match e {
        KeyFileError::WrongPassphrase { .. } => ImportError::WrongPassphrase {
            path: file.to_owned(),
        },
        KeyFileError::Corrupt { reason, .. } => corrupt(reason),
        e => ImportError::Key(e),
    })?;
    let mut len = [0u8; 8];
    read_part(&mut r, &mut len, file)?;
    let hist_len = u64::from_le_bytes(len);
    let db = dir.join(DB_FILE);
    if hist_len > 0 && !force && db.exists() {
        return Err(ImportError::HistoryExists { path: db });
    }
    let tmp = rewrite_path(&db);
    let result = (|| {
        if hist_len > 0 {
            copy_history(&mut r, hist_len, &tmp, file)?;
        }
        let sum = r.hash.finalize_reset();
        let mut stored = [0u8; 32];
        read_part(&mut r.inner, &mut stored, file)?;
        if stored[..] != sum[..] {
            return Err(corrupt("checksum mismatch"));
        }
        let mut extra = [0u8; 1];
        if r.inner
            .read(&mut extra)
            .map_err(|source| ImportError::Read {
                path: file.to_owned(),
                source,
            })?
            != 0
        {
            return Err(corrupt("trailing bytes"));
        }
        let messages = if hist_len > 0 {
            let store = Store::open_with_key(&tmp, key.history_key(), true)?;
            Some(store.message_count()?)
        } else {
            None
        };
        keyfile::store(&key_path, &key, Some(passphrase), force)?;
        crash_point("import-key-written");
        if hist_len > 0 {
            fs::rename(&tmp, &db).map_err(|source| ImportError::Write {
                path: db.clone(),
                source,
            })?;
            owner_only::sync_dir(dir);
        }
        Ok(Done {
            node_id: key.public(),
            messages,
            encrypted: false,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies exactly `len` bytes of history from `r` to the new file `tmp` (mode 0600).
fn copy_history(r: &mut impl Read, len: u64, tmp: &Path, file: &Path) -> Result<(), ImportError> {
    let werr = |source| ImportError::Write {
        path: tmp.to_owned(),
        source,
    };
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(werr(e)),
    }
    let mut out = owner_only::open_options()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(werr)?;
    let copied = io::copy(&mut r.take(len), &mut out).map_err(|source| ImportError::Read {
        path: file.to_owned(),
        source,
    })?;
    if copied != len {
        return Err(ImportError::Corrupt {
            path: file.to_owned(),
            reason: "truncated",
        });
    }
    out.sync_all().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ChatMessage;

    const PASS: &[u8] = b"export passphrase";

    /// A data directory with an identity and `n` messages, exported with its history.
    fn exported(root: &Path, n: u64) -> PathBuf {
        let dir = root.join("from");
        super::super::prepare(&dir).expect("prepare");
        let (key, _) = keyfile::load_or_create(&dir.join(KEY_FILE), None).expect("key");
        let store = Store::open(dir.join(DB_FILE)).expect("store");
        let peer = p2p_crypto::SecretKey::generate().public();
        for i in 0..n {
            let msg = ChatMessage::text(format!("clear text {i}"), i).expect("message");
            store.insert_incoming(&peer, &msg, i).expect("insert");
        }
        drop(store);
        let file = root.join("export.p2p");
        let done = export(&dir, PASS, true, &file).expect("export");
        assert_eq!(done.node_id, key.public());
        assert_eq!(done.messages, Some(n));
        file
    }

    #[test]
    fn export_and_import_round_trip() {
        let root = tempfile::tempdir().expect("tempdir");
        let file = exported(root.path(), 3);
        let bytes = fs::read(&file).expect("read");
        assert!(!bytes.windows(10).any(|w| w == b"clear text"));
        let to = root.path().join("to");
        let done = import(&file, &to, PASS, false).expect("import");
        assert_eq!(done.messages, Some(3));
        let key = keyfile::load(&to.join(KEY_FILE), Some(PASS)).expect("protected key");
        assert_eq!(key.public(), done.node_id);
        let store =
            Store::open_with_key(to.join(DB_FILE), key.history_key(), true).expect("history");
        assert!(store.is_encrypted());
        assert_eq!(store.message_count().expect("count"), 3);
    }

    #[test]
    fn damaged_export_files_are_refused_and_write_nothing() {
        let root = tempfile::tempdir().expect("tempdir");
        let file = exported(root.path(), 2);
        let good = fs::read(&file).expect("read");
        let bad = root.path().join("bad.p2p");
        let to = root.path().join("to");
        let mut cases: Vec<Vec<u8>> = Vec::new();
        // Truncated in every part, flipped in every header field and in the history,
        // and with bytes appended.
        for n in [
            0,
            4,
            8,
            11,
            12,
            100,
            173,
            180,
            181,
            good.len() / 2,
            good.len() - 1,
        ] {
            cases.push(good[..n].to_vec());
        }
        for i in [0, 9, 12, 200, good.len() / 2, good.len() - 1] {
            let mut b = good.clone();
            b[i] ^= 0x01;
            cases.push(b);
        }
        let mut longer = good.clone();
        longer.push(0);
        cases.push(longer);
        let mut huge_key = good.clone();
        huge_key[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        cases.push(huge_key);
        let mut huge_history = good.clone();
        let at = 12 + 161;
        huge_history[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push(huge_history);
        for (i, case) in cases.iter().enumerate() {
            fs::write(&bad, case).expect("write");
            let err = import(&bad, &to, PASS, false).expect_err("refused");
            assert!(
                matches!(err, ImportError::Corrupt { .. }),
                "case {i}: {err}"
            );
            let left: Vec<_> = fs::read_dir(&to)
                .expect("list")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert_eq!(
                left,
                [std::ffi::OsString::from(super::super::LOCK_FILE)],
                "case {i}"
            );
        }
        let err = import(&file, &to, b"wrong", false).expect_err("wrong passphrase");
        assert!(matches!(err, ImportError::WrongPassphrase { .. }), "{err}");
        assert!(
            err.to_string().contains("wrong passphrase for export file"),
            "{err}"
        );
        import(&file, &to, PASS, false).expect("the good file imports");
    }
}
