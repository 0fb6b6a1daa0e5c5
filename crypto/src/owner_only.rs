//! Files and directories that only their owner may use.
//!
//! Everything a node keeps (its key, its history, its discovery database) is private: a
//! directory is created with mode 0700 and a file with mode 0600 in the same system call
//! that creates it (never a `chmod` afterwards, which would leave a window), and an
//! existing one that group or others may read, write or enter is refused with the
//! `chmod` command that fixes it, as ssh and gpg do.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use rand::RngCore;

/// Mode of a new file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of a new directory.
pub const DIR_MODE: u32 = 0o700;

/// A file or directory is not owner-only, or cannot be created or checked.
#[derive(Debug, thiserror::Error)]
pub enum OwnerOnlyError {
    /// Group or others have some access to it.
    #[error(
        "{path} may be read or written by group or others (mode {mode:03o}); run `chmod {fix:o} {path}`",
        path = path.display()
    )]
    TooOpen {
        /// The file or directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// The mode to set: 600 for a file, 700 for a directory.
        fix: u32,
    },
    /// A directory was expected.
    #[error("{} is not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Its metadata cannot be read.
    #[error("cannot read the permissions of {}: {source}", path.display())]
    Stat {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// It cannot be created or opened.
    #[error("cannot create {}: {source}", path.display())]
    Create {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Checks that `path`, if it exists, is accessible to its owner only. Returns whether it
/// exists. Follows symbolic links, so what is checked is what would be opened.
pub fn check(path: &Path) -> Result<bool, OwnerOnlyError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(OwnerOnlyError::Stat {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mode = permission_bits(&meta);
    if mode & 0o077 != 0 {
        return Err(OwnerOnlyError::TooOpen {
            path: path.to_owned(),
            mode,
            fix: if meta.is_dir() { DIR_MODE } else { FILE_MODE },
        });
    }
    Ok(true)
}

#[cfg(unix)]
fn permission_bits(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o777
}

#[cfg(not(unix))]
fn permission_bits(_meta: &fs::Metadata) -> u32 {
    0o600
}

/// Creates `dir` (and missing parents) with mode 0700, or checks the existing one.
pub fn create_dir(dir: &Path) -> Result<(), OwnerOnlyError> {
    if check(dir)? {
        return if dir.is_dir() {
            Ok(())
        } else {
            Err(OwnerOnlyError::NotADirectory {
                path: dir.to_owned(),
            })
        };
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(DIR_MODE);
    }
    builder
        .create(dir)
        .map_err(|source| OwnerOnlyError::Create {
            path: dir.to_owned(),
            source,
        })
}

/// Options that create a file with mode 0600 (the mode applies only when the file is
/// created).
pub fn open_options() -> fs::OpenOptions {
    let mut opts = fs::OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(FILE_MODE);
    }
    opts
}

/// Opens `path` for reading and writing, creating it with mode 0600 if it does not
/// exist; an existing file must already be owner-only.
pub fn open_file(path: &Path) -> Result<fs::File, OwnerOnlyError> {
    check(path)?;
    open_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| OwnerOnlyError::Create {
            path: path.to_owned(),
            source,
        })
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Makes a rename or a new file in `dir` durable. Best effort: not every file system
/// can sync a directory.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A fresh name for a temporary file beside `path`: `.NAME.tmp-RANDOM`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut suffix = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    parent_dir(path).join(format!(".{file_name}.tmp-{hex}"))
}

/// Writes `bytes` to `path` with mode 0600, atomically: a temporary file in the same
/// directory (created 0600), fsync, then rename (or, when not overwriting, a hard link,
/// which fails with [`io::ErrorKind::AlreadyExists`] if `path` exists), then fsync of
/// the directory. A missing directory is created with mode 0700. At every point `path`
/// is either absent, the old file, or the new one, complete.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> io::Result<()> {
    let dir = parent_dir(path);
    if !dir.exists() {
        create_dir(&dir).map_err(|e| io::Error::other(e.to_string()))?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = open_options().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        if overwrite {
            fs::rename(&tmp, path)?;
        } else {
            fs::hard_link(&tmp, path)?;
            fs::remove_file(&tmp)?;
        }
        sync_dir(&dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn creates_directories_0700_and_files_0600() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("a").join("b");
        create_dir(&dir).expect("creates");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        let file = dir.join("f");
        open_file(&file).expect("creates");
        assert_eq!(mode(&file), 0o600);
        let atomic = dir.join("g");
        write_atomic(&atomic, b"x", false).expect("writes");
        assert_eq!(mode(&atomic), 0o600);
        let err = write_atomic(&atomic, b"y", false).expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        write_atomic(&atomic, b"y", true).expect("overwrites");
        assert_eq!(fs::read(&atomic).expect("read"), b"y");
        let names: Vec<_> = fs::read_dir(&dir).expect("list").collect();
        assert_eq!(names.len(), 2, "no temporary file is left: {names:?}");
    }

    #[test]
    fn too_open_paths_are_refused_with_the_fix() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("d");
        create_dir(&dir).expect("creates");
        let file = dir.join("f");
        open_file(&file).expect("creates");
        for (path, bad, fix) in [(&dir, 0o755, "700"), (&file, 0o640, "600")] {
            let good = mode(path);
            fs::set_permissions(path, fs::Permissions::from_mode(bad)).expect("chmod");
            let err = check(path).expect_err("refused");
            assert!(
                matches!(err, OwnerOnlyError::TooOpen { mode, .. } if mode == bad),
                "{err}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&format!("chmod {fix} {}", path.display())),
                "{text}"
            );
            fs::set_permissions(path, fs::Permissions::from_mode(good)).expect("chmod");
        }
        fs::set_permissions(&file, fs::Permissions::from_mode(0o604)).expect("chmod");
        assert!(open_file(&file).is_err(), "an open file is not opened");
        assert!(matches!(
            create_dir(&file),
            Err(OwnerOnlyError::TooOpen { .. })
        ));
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            create_dir(&file),
            Err(OwnerOnlyError::NotADirectory { .. })
        ));
    }
}
