//! The identity key file.
//!
//! Layout (all integers little-endian), followed by a SHA-256 checksum of everything
//! before it, so that corruption is told apart from a wrong passphrase:
//!
//! ```text
//! magic    8  "P2PKEY\0\x01"   (format version 1)
//! kind     1  0 = plain, 1 = argon2id + ChaCha20-Poly1305
//! public  32  the NodeId, checked against the secret on load
//! plain:  seed 32
//! sealed: m_cost 4 | t_cost 4 | p_cost 4 | salt 16 | nonce 12 | ciphertext 48
//! sum     32  SHA-256 of all of the above
//! ```
//!
//! Files are written atomically (temporary file, fsync, rename) with mode 0600, and a file
//! that group or others may read is refused.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use chacha20poly1305::{aead::Aead, ChaCha20Poly1305, KeyInit};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{
    owner_only::{self, OwnerOnlyError},
    PublicKey, SecretKey,
};

const MAGIC: &[u8; 8] = b"P2PKEY\0\x01";
const KIND_PLAIN: u8 = 0;
const KIND_SEALED: u8 = 1;
const HEADER_LEN: usize = 8 + 1 + 32;
const PLAIN_BODY: usize = 32;
const SEALED_BODY: usize = 12 + 16 + 12 + 48;
const SUM_LEN: usize = 32;

/// Argon2id parameters used for new passphrase-protected files: 64 MiB, 3 passes.
pub const KDF_M_COST_KIB: u32 = 64 * 1024;
pub const KDF_T_COST: u32 = 3;
pub const KDF_P_COST: u32 = 1;
/// Upper bounds accepted on load, so a hostile file cannot demand unbounded memory or time.
const KDF_MAX_M_COST_KIB: u32 = 1024 * 1024;
const KDF_MAX_T_COST: u32 = 16;
const KDF_MAX_P_COST: u32 = 16;

/// Errors reading or writing a key file. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write key file {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("key file {} already exists", path.display())]
    Exists { path: PathBuf },
    #[error("key file {path} may be read by group or others (mode {mode:03o}); run `chmod 600 {path}`", path = path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is corrupt: {reason}", path = path.display())]
    Corrupt { path: PathBuf, reason: &'static str },
    #[error("key file {path} is protected by a passphrase; none was given", path = path.display())]
    PassphraseRequired { path: PathBuf },
    #[error("wrong passphrase for key file {path}", path = path.display())]
    WrongPassphrase { path: PathBuf },
}

impl KeyFileError {
    fn corrupt(path: &Path, reason: &'static str) -> Self {
        Self::Corrupt {
            path: path.to_owned(),
            reason,
        }
    }
}

/// Loads the key at `path`. `passphrase` is needed only for protected files.
pub fn load(path: &Path, passphrase: Option<&[u8]>) -> Result<SecretKey, KeyFileError> {
    check_permissions(path)?;
    let bytes = Zeroizing::new(fs::read(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?);
    decode(path, &bytes, passphrase)
}

/// Tells whether the file at `path` is passphrase-protected, without reading the secret.
pub fn is_encrypted(path: &Path) -> Result<bool, KeyFileError> {
    let bytes = fs::read(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    match bytes.get(8) {
        Some(&KIND_SEALED) if bytes.starts_with(MAGIC) => Ok(true),
        Some(&KIND_PLAIN) if bytes.starts_with(MAGIC) => Ok(false),
        _ => Err(KeyFileError::corrupt(path, "not a p2p-node key file")),
    }
}

/// Writes `key` to `path` atomically with mode 0600. Fails with [`KeyFileError::Exists`]
/// if the file exists and `overwrite` is false.
pub fn store(
    path: &Path,
    key: &SecretKey,
    passphrase: Option<&[u8]>,
    overwrite: bool,
) -> Result<(), KeyFileError> {
    let bytes = encode(key, passphrase);
    write_atomic(path, &bytes, overwrite)
}

/// Loads the key at `path`, creating a new random one first if there is none.
/// Returns the key and whether it was created.
pub fn load_or_create(
    path: &Path,
    passphrase: Option<&[u8]>,
) -> Result<(SecretKey, bool), KeyFileError> {
    match fs::symlink_metadata(path) {
        Ok(_) => load(path, passphrase).map(|k| (k, false)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = SecretKey::generate();
            match store(path, &key, passphrase, false) {
                Ok(()) => Ok((key, true)),
                // Another process created it first: use theirs.
                Err(KeyFileError::Exists { .. }) => load(path, passphrase).map(|k| (k, false)),
                Err(e) => Err(e),
            }
        }
        Err(source) => Err(KeyFileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn check_permissions(path: &Path) -> Result<(), KeyFileError> {
    match owner_only::check(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(KeyFileError::Read {
            path: path.to_owned(),
            source: io::ErrorKind::NotFound.into(),
        }),
        Err(OwnerOnlyError::TooOpen { mode, .. }) => Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        }),
        Err(OwnerOnlyError::Stat { source, .. } | OwnerOnlyError::Create { source, .. }) => {
            Err(KeyFileError::Read {
                path: path.to_owned(),
                source,
            })
        }
        Err(OwnerOnlyError::NotADirectory { .. }) => Err(KeyFileError::Read {
            path: path.to_owned(),
            source: io::ErrorKind::InvalidInput.into(),
        }),
    }
}

/// The bytes of a key file holding `key`, sealed with `passphrase` if given.
pub fn encode(key: &SecretKey, passphrase: Option<&[u8]>) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(HEADER_LEN + SEALED_BODY + SUM_LEN));
    out.extend_from_slice(MAGIC);
    let seed = key.to_bytes();
    match passphrase {
        None => {
            out.push(KIND_PLAIN);
            out.extend_from_slice(key.public().as_bytes());
            out.extend_from_slice(seed.as_ref());
        }
        Some(pass) => {
            out.push(KIND_SEALED);
            out.extend_from_slice(key.public().as_bytes());
            let mut salt = [0u8; 16];
            let mut nonce = [0u8; 12];
            rand::rngs::OsRng.fill_bytes(&mut salt);
            rand::rngs::OsRng.fill_bytes(&mut nonce);
            let kek = derive_kek(pass, &salt, KDF_M_COST_KIB, KDF_T_COST, KDF_P_COST)
                .expect("built-in KDF parameters are valid");
            let cipher = ChaCha20Poly1305::new(kek.as_ref().into());
            let ct = cipher
                .encrypt(&nonce.into(), seed.as_ref())
                .expect("encrypting 32 bytes cannot fail");
            for v in [KDF_M_COST_KIB, KDF_T_COST, KDF_P_COST] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&salt);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&ct);
        }
    }
    let sum = Sha256::digest(&out[..]);
    out.extend_from_slice(&sum);
    out
}

/// Decodes the bytes of a key file. Never panics, whatever the bytes.
pub fn decode(
    path: &Path,
    bytes: &[u8],
    passphrase: Option<&[u8]>,
) -> Result<SecretKey, KeyFileError> {
    let corrupt = |reason| KeyFileError::corrupt(path, reason);
    if bytes.len() < HEADER_LEN + SUM_LEN || &bytes[..8] != MAGIC {
        return Err(corrupt(if bytes.starts_with(MAGIC) {
            "truncated"
        } else {
            "not a p2p-node key file (bad magic)"
        }));
    }
    let kind = bytes[8];
    let body_len = match kind {
        KIND_PLAIN => PLAIN_BODY,
        KIND_SEALED => SEALED_BODY,
        _ => return Err(corrupt("unknown key kind")),
    };
    let total = HEADER_LEN + body_len + SUM_LEN;
    if bytes.len() < total {
        return Err(corrupt("truncated"));
    }
    if bytes.len() > total {
        return Err(corrupt("trailing bytes"));
    }
    let (content, sum) = bytes.split_at(HEADER_LEN + body_len);
    if Sha256::digest(content).as_slice() != sum {
        return Err(corrupt("checksum mismatch"));
    }
    let public = PublicKey::try_from_slice(&content[9..HEADER_LEN])
        .map_err(|_| corrupt("invalid public key"))?;
    let body = &content[HEADER_LEN..];
    let seed: Zeroizing<[u8; 32]> = if kind == KIND_PLAIN {
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(body);
        seed
    } else {
        let Some(pass) = passphrase else {
            return Err(KeyFileError::PassphraseRequired {
                path: path.to_owned(),
            });
        };
        let u32_at = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&body[i..i + 4]);
            u32::from_le_bytes(b)
        };
        let (m, t, p) = (u32_at(0), u32_at(4), u32_at(8));
        if m > KDF_MAX_M_COST_KIB || t > KDF_MAX_T_COST || p > KDF_MAX_P_COST {
            return Err(corrupt("key derivation parameters out of range"));
        }
        let salt = &body[12..28];
        let nonce: [u8; 12] = body[28..40].try_into().map_err(|_| corrupt("nonce"))?;
        let kek = derive_kek(pass, salt, m, t, p)
            .ok_or_else(|| corrupt("invalid key derivation parameters"))?;
        let cipher = ChaCha20Poly1305::new(kek.as_ref().into());
        let plain = Zeroizing::new(cipher.decrypt(&nonce.into(), &body[40..]).map_err(|_| {
            KeyFileError::WrongPassphrase {
                path: path.to_owned(),
            }
        })?);
        let mut seed = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return Err(corrupt("bad secret length"));
        }
        seed.copy_from_slice(&plain);
        seed
    };
    let key = SecretKey::from_bytes(&seed);
    if key.public() != public {
        return Err(corrupt("secret key does not match the stored public key"));
    }
    Ok(key)
}

fn derive_kek(pass: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Option<Zeroizing<[u8; 32]>> {
    let params = argon2::Params::new(m, t, p, Some(32)).ok()?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon.hash_password_into(pass, salt, out.as_mut()).ok()?;
    Some(out)
}

/// Writes `bytes` to `path` atomically with mode 0600 ([`owner_only::write_atomic`]).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<(), KeyFileError> {
    owner_only::write_atomic(path, bytes, overwrite).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyFileError::Exists {
                path: path.to_owned(),
            }
        } else {
            KeyFileError::Write {
                path: path.to_owned(),
                source,
            }
        }
    })
}
