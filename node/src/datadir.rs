//! The data directory: what it holds, who may read it, and who may use it.
//!
//! The directory is created with mode 0700 and every file in it with mode 0600, each in
//! the system call that creates it. At start, the directory and every file the node keeps
//! in it ([`FILES`]) must be owner-only: one that group or others may access is refused
//! with the `chmod` command that fixes it (as ssh and gpg do), before anything is read.
//! One process at a time uses a directory: it holds an exclusive lock on [`LOCK_FILE`].
//!
//! [`identity`] changes the passphrase of the identity in a directory, and exports and
//! imports it.

pub mod identity;

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use p2p_crypto::owner_only::{self, OwnerOnlyError};

pub use crate::node::{DB_FILE, DISCOVERY_DB_FILE, LOCK_FILE};

/// The identity key file (`p2p_crypto::keyfile`).
pub const KEY_FILE: &str = "identity.key";
/// The name this node registered on discovery, one line.
pub const NAME_FILE: &str = "name";

/// Every file a node keeps in its data directory.
pub const FILES: [&str; 5] = [KEY_FILE, DB_FILE, DISCOVERY_DB_FILE, NAME_FILE, LOCK_FILE];

/// Why the data directory cannot be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The directory or one of its files is open to group or others, or cannot be
    /// created.
    #[error(transparent)]
    Access(#[from] OwnerOnlyError),
    /// Another process (or another node in this process) holds the lock.
    #[error("data directory {} is in use by another p2p-node process", dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// The lock file cannot be locked.
    #[error("data directory {}: {source}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Creates `dir` with mode 0700 if it is missing, and checks that it and every file of
/// [`FILES`] in it are owner-only.
pub fn prepare(dir: &Path) -> Result<(), OwnerOnlyError> {
    owner_only::create_dir(dir)?;
    for name in FILES {
        owner_only::check(&dir.join(name))?;
    }
    Ok(())
}

/// [`prepare`]s `dir` and takes its lock (the [`LOCK_FILE`], created 0600), held until
/// the returned file is dropped.
pub fn lock(dir: &Path) -> Result<File, LockError> {
    prepare(dir)?;
    let file = owner_only::open_file(&dir.join(LOCK_FILE))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Locked {
            dir: dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(LockError::Io {
            dir: dir.to_owned(),
            source,
        }),
    }
}

/// Environment variable naming a step at which a debug build aborts, as if killed there
/// (see [`crash_point`]).
pub const CRASH_AT_ENV: &str = "P2P_NODE_CRASH_AT";

/// A step of a multi-file change (a passphrase change, a history rewrite) at which the
/// crash-safety tests stop the process: in a debug build whose [`CRASH_AT_ENV`] names
/// `step`, the process aborts here, running no destructor and flushing nothing, as a
/// kill would. Release builds ignore it.
#[doc(hidden)]
pub fn crash_point(step: &str) {
    #[cfg(debug_assertions)]
    if std::env::var(CRASH_AT_ENV).is_ok_and(|v| v == step) {
        eprintln!("p2p-node: aborting at {step} ({CRASH_AT_ENV})");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = step;
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt};

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn creates_the_directory_0700_and_the_lock_0600() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("data");
        let lock = lock(&dir).expect("locks");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        assert!(matches!(super::lock(&dir), Err(LockError::Locked { .. })));
        drop(lock);
        super::lock(&dir).expect("free again");
    }

    #[test]
    fn a_too_open_directory_or_file_is_refused_with_the_fix() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("data");
        prepare(&dir).expect("creates");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let text = prepare(&dir).expect_err("refused").to_string();
        assert!(
            text.contains(&format!("chmod 700 {}", dir.display())),
            "{text}"
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        for name in FILES {
            let path = dir.join(name);
            fs::write(&path, b"x").expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
            let text = lock(&dir).expect_err("refused").to_string();
            assert!(
                text.contains(&format!("chmod 600 {}", path.display())),
                "{text}"
            );
            fs::remove_file(&path).expect("remove");
        }
        lock(&dir).expect("fine again");
    }
}
