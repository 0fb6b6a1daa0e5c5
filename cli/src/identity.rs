//! The data directory and the identity key in it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use p2p_crypto::{keyfile, SecretKey};
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
        self.data_dir.join("identity.key")
    }

    /// The name this node registered, remembered for later announces.
    pub fn name_file(&self) -> PathBuf {
        self.data_dir.join("name")
    }

    /// Default database of a discovery server run from this data directory.
    pub fn discovery_db(&self) -> PathBuf {
        self.data_dir.join("discovery.redb")
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

    /// Remembers the registered name.
    pub fn set_registered_name(&self, name: &str) -> Result<()> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("cannot create {}", self.data_dir.display()))?;
        std::fs::write(self.name_file(), format!("{name}\n"))
            .with_context(|| format!("cannot write {}", self.name_file().display()))
    }
}

/// The passphrase from --passphrase-file or P2P_PASSPHRASE, if any.
pub fn passphrase(file: Option<&Path>) -> Result<Option<Zeroizing<Vec<u8>>>> {
    if let Some(file) = file {
        let text = Zeroizing::new(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read passphrase file {}", file.display()))?,
        );
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            bail!("passphrase file {} is empty", file.display());
        }
        return Ok(Some(Zeroizing::new(line.as_bytes().to_vec())));
    }
    match std::env::var("P2P_PASSPHRASE") {
        Ok(p) if !p.is_empty() => Ok(Some(Zeroizing::new(p.into_bytes()))),
        _ => Ok(None),
    }
}

/// `p2p-node init`: creates the identity, refusing to replace one unless `force`.
pub fn init(paths: &Paths, passphrase: Option<&[u8]>, force: bool) -> Result<()> {
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

/// Loads the identity, creating it on first use.
pub fn load_or_create(paths: &Paths, passphrase: Option<&[u8]>) -> Result<SecretKey> {
    let path = paths.key_file();
    let (key, created) = keyfile::load_or_create(&path, passphrase)?;
    if created {
        eprintln!("created identity {} in {}", key.public(), path.display());
    }
    Ok(key)
}
