//! The data directory and the identity key in it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use p2p_crypto::{keyfile, owner_only, SecretKey};
use p2p_node::datadir::{self, identity as transfer};
use zeroize::Zeroizing;

/// Where this node keeps its files.
#[derive(Debug, Clone)]
pub struct Paths {
    pub data_dir: PathBuf,
}

impl Paths {
    pub fn new(data_dir: Option<PathBuf>) -> Result<Self> {
        let data_dir = match data_dir {
            Some(d) => d,
            None => dirs::data_dir()
                .ok_or_else(|| {
                    anyhow!("no per-user data directory on this platform; pass --data-dir DIR")
                })?
                .join("p2p-node"),
        };
        Ok(Self { data_dir })
    }

    pub fn key_file(&self) -> PathBuf {
        self.data_dir.join(datadir::KEY_FILE)
    }

    /// The name this node registered, remembered for later announces.
    pub fn name_file(&self) -> PathBuf {
        self.data_dir.join(datadir::NAME_FILE)
    }

    /// Default database of a discovery server run from this data directory.
    pub fn discovery_db(&self) -> PathBuf {
        self.data_dir.join(datadir::DISCOVERY_DB_FILE)
    }

    /// Creates the data directory with mode 0700, or checks that it and its files are
    /// owner-only; done before anything in it is read or written.
    pub fn prepare(&self) -> Result<()> {
        Ok(datadir::prepare(&self.data_dir)?)
    }

    /// The registered name, if any.
    pub fn registered_name(&self) -> Result<Option<String>> {
        match std::fs::read_to_string(self.name_file()) {
            Ok(s) => {
                let name = s.trim();
                if name.is_empty() {
                    return Ok(None);
                }
                p2p_discovery::validate_name(name).with_context(|| {
                    format!(
                        "{} does not hold a valid name; fix it or register again",
                        self.name_file().display()
                    )
                })?;
                Ok(Some(name.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", self.name_file().display())),
        }
    }

    /// Remembers the registered name (written atomically, mode 0600).
    pub fn set_registered_name(&self, name: &str) -> Result<()> {
        self.prepare()?;
        owner_only::write_atomic(&self.name_file(), format!("{name}\n").as_bytes(), true)
            .with_context(|| format!("cannot write {}", self.name_file().display()))
    }
}

/// The passphrase from --passphrase-file or P2P_PASSPHRASE, if any.
pub fn passphrase(file: Option<&Path>) -> Result<Option<Zeroizing<Vec<u8>>>> {
    if let Some(file) = file {
        return read_passphrase_file(file).map(Some);
    }
    match std::env::var("P2P_PASSPHRASE") {
        Ok(p) if !p.is_empty() => Ok(Some(Zeroizing::new(p.into_bytes()))),
        _ => Ok(None),
    }
}

/// "1 message", "2 messages".
fn count(n: u64) -> String {
    format!("{n} message{}", if n == 1 { "" } else { "s" })
}

/// The first line of a passphrase file.
fn read_passphrase_file(file: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(file)
            .with_context(|| format!("cannot read passphrase file {}", file.display()))?,
    );
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        bail!("passphrase file {} is empty", file.display());
    }
    Ok(Zeroizing::new(line.as_bytes().to_vec()))
}

/// `p2p-node init`: creates the identity, refusing to replace one unless `force`.
pub fn init(paths: &Paths, passphrase: Option<&[u8]>, force: bool) -> Result<()> {
    paths.prepare()?;
    let path = paths.key_file();
    let key = SecretKey::generate();
    match keyfile::store(&path, &key, passphrase, force) {
        Ok(()) => {}
        Err(keyfile::KeyFileError::Exists { .. }) => bail!(
            "an identity already exists at {}; use --force to replace it (this cannot be undone)",
            path.display()
        ),
        Err(e) => return Err(e.into()),
    }
    eprintln!(
        "created identity {} in {}{}",
        key.public(),
        path.display(),
        if passphrase.is_some() {
            " (passphrase-protected)"
        } else {
            ""
        }
    );
    println!("{}", key.public());
    Ok(())
}

/// Loads the identity, creating it on first use. Returns it and whether the key file is
/// passphrase-protected.
pub fn load_or_create(paths: &Paths, passphrase: Option<&[u8]>) -> Result<(SecretKey, bool)> {
    paths.prepare()?;
    let path = paths.key_file();
    let (key, created) = keyfile::load_or_create(&path, passphrase)?;
    if created {
        eprintln!("created identity {} in {}", key.public(), path.display());
    }
    Ok((key, keyfile::is_encrypted(&path)?))
}

/// The new passphrase from --new-passphrase-file or P2P_NEW_PASSPHRASE.
pub fn new_passphrase(file: Option<&Path>) -> Result<Zeroizing<Vec<u8>>> {
    match file {
        Some(file) => read_passphrase_file(file),
        None => match std::env::var("P2P_NEW_PASSPHRASE") {
            Ok(p) if !p.is_empty() => Ok(Zeroizing::new(p.into_bytes())),
            _ => bail!(
                "no new passphrase given: use --new-passphrase-file FILE or P2P_NEW_PASSPHRASE"
            ),
        },
    }
}

/// `p2p-node passphrase`: protects the identity with a new passphrase and encrypts the
/// history if it is still clear.
pub fn change_passphrase(paths: &Paths, old: Option<&[u8]>, new: &[u8]) -> Result<()> {
    // Only for the wording: the change itself reads the key file under the lock.
    let had_one = keyfile::is_encrypted(&paths.key_file()).unwrap_or(false);
    let done = transfer::change_passphrase(&paths.data_dir, old, new)?;
    println!(
        "passphrase {} for {}; {}",
        if had_one { "changed" } else { "set" },
        done.node_id,
        match (done.messages, done.encrypted) {
            (Some(n), true) => format!("history encrypted ({})", count(n)),
            (Some(n), false) => format!("history already encrypted, unchanged ({})", count(n)),
            (None, _) => "no history yet (it will be encrypted)".into(),
        }
    );
    Ok(())
}

/// `p2p-node export FILE [--history]`.
pub fn export(paths: &Paths, passphrase: Option<&[u8]>, file: &Path, history: bool) -> Result<()> {
    let Some(pass) = passphrase else {
        bail!(
            "export needs a passphrase to protect the file: give --passphrase-file FILE or \
             P2P_PASSPHRASE (the identity's own, if it has one)"
        );
    };
    let done = transfer::export(&paths.data_dir, pass, history, file)?;
    println!(
        "exported {} to {}{}",
        done.node_id,
        file.display(),
        match done.messages {
            Some(n) => format!(" with its history ({})", count(n)),
            None => String::new(),
        }
    );
    Ok(())
}

/// `p2p-node init --import FILE`.
pub fn import(paths: &Paths, passphrase: Option<&[u8]>, file: &Path, force: bool) -> Result<()> {
    let Some(pass) = passphrase else {
        bail!(
            "importing needs the passphrase the file was exported with: give \
             --passphrase-file FILE or P2P_PASSPHRASE"
        );
    };
    let done = match transfer::import(file, &paths.data_dir, pass, force) {
        Err(e @ transfer::ImportError::IdentityExists { .. })
        | Err(e @ transfer::ImportError::HistoryExists { .. }) => {
            bail!("{e}; use --force to replace it (this cannot be undone)")
        }
        r => r?,
    };
    eprintln!(
        "imported identity {} into {} (passphrase-protected){}",
        done.node_id,
        paths.data_dir.display(),
        match done.messages {
            Some(n) => format!(" with its history ({})", count(n)),
            None => String::new(),
        }
    );
    println!("{}", done.node_id);
    Ok(())
}
