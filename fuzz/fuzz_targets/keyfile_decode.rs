//! `p2p_crypto::keyfile`: `decode` on arbitrary bytes, `load` and `is_encrypted` on the
//! same bytes in a 0600 file, and valid files built by an independent model of the
//! format.
//!
//! The passphrase KDF only runs with tiny parameters (see `cheap_kdf`): a file with
//! parameters above the production bounds must be refused before any derivation (a
//! 1 GiB derivation here would trip libFuzzer's time and memory limits), and one within
//! the bounds but expensive is decoded without a passphrase only.
//!
//! Invariants:
//! - nothing panics; `load` of a file agrees with `decode` of its bytes;
//! - an accepted file's key matches its stored public key, and a plain file decodes
//!   the same with or without a passphrase;
//! - a model-built file decodes to its key (with the right passphrase), needs a
//!   passphrase when protected, refuses a wrong one, and any changed byte fails.

#![no_main]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use p2p_crypto::keyfile::{decode, is_encrypted, load, KeyFileError};
use p2p_crypto::SecretKey;
use p2p_fuzz::{
    cheap_kdf, keyfile_mode, keyfile_params, keyfile_plain, keyfile_sealed, with_checksum, Sealing,
    KEYFILE_MAGIC,
};

/// One 0600 file, rewritten by every input that goes through `load`.
static FILE: LazyLock<(tempfile::TempDir, PathBuf)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("identity.key");
    (dir, path)
});

const PASS: &[u8] = b"fuzz passphrase";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % keyfile_mode::COUNT {
        keyfile_mode::RAW => check_bytes(rest, true),
        keyfile_mode::FIX_CHECKSUM => check_bytes(&with_checksum(rest.to_vec()), false),
        _ => {
            let _ = check_structured(&mut Unstructured::new(rest));
        }
    }
});

fn sealed_kind(bytes: &[u8]) -> bool {
    bytes.starts_with(KEYFILE_MAGIC) && bytes.get(8) == Some(&1)
}

fn check_bytes(bytes: &[u8], via_file: bool) {
    let path = Path::new("identity.key");
    let plain = decode(path, bytes, None);
    match &plain {
        Ok(key) => {
            assert_eq!(
                key.public(),
                SecretKey::from_bytes(&key.to_bytes()).public()
            );
            assert!(!sealed_kind(bytes));
        }
        Err(KeyFileError::PassphraseRequired { .. }) => assert!(sealed_kind(bytes)),
        Err(KeyFileError::Corrupt { .. }) => {}
        Err(e) => panic!("decode without a passphrase: unexpected {e}"),
    }

    // With a passphrase: the KDF runs only with tiny parameters (or parameters above the
    // production bounds, which must be refused before any derivation).
    let params = keyfile_params(bytes).unwrap_or((0, 0, 0));
    let over_bounds = params.0 > 1024 * 1024 || params.1 > 16 || params.2 > 16;
    if !sealed_kind(bytes) || cheap_kdf(params.0, params.1, params.2) || over_bounds {
        match decode(path, bytes, Some(PASS)) {
            Ok(key) => {
                if let Ok(k) = &plain {
                    assert_eq!(k.public(), key.public());
                }
            }
            Err(KeyFileError::PassphraseRequired { .. }) => panic!("a passphrase was given"),
            Err(_) => {}
        }
    }

    if via_file {
        check_load(bytes, &plain);
    }
}

/// `load` and `is_encrypted` on a 0600 file with these bytes agree with `decode`.
fn check_load(bytes: &[u8], decoded: &Result<SecretKey, KeyFileError>) {
    let (_, path) = &*FILE;
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .expect("open temp key file");
        f.write_all(bytes).expect("write temp key file");
    }
    match (load(path, None), decoded) {
        (Ok(a), Ok(b)) => assert_eq!(a.public(), b.public()),
        (Err(a), Err(b)) => assert_eq!(
            a.to_string(),
            b.to_string()
                .replace("identity.key", &path.display().to_string())
        ),
        (a, b) => panic!("load {a:?} but decode {b:?}"),
    }
    match is_encrypted(path) {
        Ok(enc) => assert_eq!(enc, sealed_kind(bytes)),
        Err(_) => assert!(!bytes.starts_with(KEYFILE_MAGIC) || bytes.len() < 9 || bytes[8] > 1),
    }
}

fn check_structured(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let seed: [u8; 32] = u.arbitrary()?;
    let flip_at: usize = u.arbitrary()?;
    let flip = u.arbitrary::<u8>()?.max(1);
    let key = SecretKey::from_bytes(&seed);
    let path = Path::new("k");

    let (file, protected) = if u.arbitrary()? {
        let pass_len = u.int_in_range(0..=32)?;
        let passphrase = u.bytes(pass_len)?.to_vec();
        let p_cost = u.int_in_range(1..=2)?;
        let s = Sealing {
            passphrase: &passphrase,
            m_cost: u.int_in_range(8 * p_cost..=64)?,
            t_cost: u.int_in_range(1..=2)?,
            p_cost,
            salt: u.arbitrary()?,
            nonce: u.arbitrary()?,
        };
        let file = keyfile_sealed(&seed, &s).expect("tiny parameters are valid");
        let back = decode(path, &file, Some(&passphrase)).expect("model file decodes");
        assert_eq!(back.to_bytes(), key.to_bytes());
        assert!(matches!(
            decode(path, &file, None),
            Err(KeyFileError::PassphraseRequired { .. })
        ));
        let mut wrong = passphrase.clone();
        wrong.push(0);
        assert!(matches!(
            decode(path, &file, Some(&wrong)),
            Err(KeyFileError::WrongPassphrase { .. })
        ));
        (file, Some(passphrase))
    } else {
        let file = keyfile_plain(&seed);
        let back = decode(path, &file, None).expect("model file decodes");
        assert_eq!(back.to_bytes(), key.to_bytes());
        (file, None)
    };

    let mut bad = file.clone();
    bad[flip_at % file.len()] ^= flip;
    assert!(
        decode(path, &bad, protected.as_deref()).is_err(),
        "a changed byte was accepted"
    );
    assert!(decode(path, &file[..flip_at % file.len()], protected.as_deref()).is_err());
    Ok(())
}
