//! The identity key file: creation, permissions, corruption and passphrases.

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use p2p_crypto::{
    keyfile::{self, KeyFileError},
    SecretKey,
};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn round_trip_and_mode_0600_on_creation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub").join("identity.key");
    let (created, was_new) = keyfile::load_or_create(&path, None).expect("creates");
    assert!(was_new);
    assert_eq!(mode(&path), 0o600);
    let (loaded, was_new) = keyfile::load_or_create(&path, None).expect("loads");
    assert!(!was_new);
    assert_eq!(loaded.public(), created.public());
    assert_eq!(*loaded.to_bytes(), *created.to_bytes());
    // No temporary files are left behind.
    let names: Vec<_> = fs::read_dir(path.parent().expect("parent"))
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn store_refuses_to_overwrite_unless_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("identity.key");
    let first = SecretKey::generate();
    keyfile::store(&path, &first, None, false).expect("stores");
    let second = SecretKey::generate();
    let err = keyfile::store(&path, &second, None, false).expect_err("exists");
    assert!(matches!(err, KeyFileError::Exists { .. }), "{err}");
    assert_eq!(
        keyfile::load(&path, None).expect("loads").public(),
        first.public()
    );
    keyfile::store(&path, &second, None, true).expect("overwrites");
    assert_eq!(
        keyfile::load(&path, None).expect("loads").public(),
        second.public()
    );
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn world_or_group_readable_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("identity.key");
    keyfile::store(&path, &SecretKey::generate(), None, false).expect("stores");
    for bad in [0o644, 0o640, 0o604] {
        fs::set_permissions(&path, fs::Permissions::from_mode(bad)).expect("chmod");
        let err = keyfile::load(&path, None).expect_err("refused");
        assert!(
            matches!(err, KeyFileError::Permissions { mode, .. } if mode == bad),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("chmod 600"), "{text}");
    }
}

fn write_0600(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod");
}

#[test]
fn truncated_or_corrupt_file_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.key");
    keyfile::store(&good, &SecretKey::generate(), None, false).expect("stores");
    let bytes = fs::read(&good).expect("read");
    let bad = dir.path().join("bad.key");
    let mut cases: Vec<Vec<u8>> = (0..bytes.len()).map(|n| bytes[..n].to_vec()).collect();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x40;
        cases.push(b);
    }
    let mut longer = bytes.clone();
    longer.push(0);
    cases.push(longer);
    cases.push(b"-----BEGIN PRIVATE KEY-----\n".to_vec());
    for case in cases {
        write_0600(&bad, &case);
        let err = keyfile::load(&bad, None).expect_err("corrupt");
        assert!(matches!(err, KeyFileError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );
    }
    // The damaged file is reported, never silently replaced.
    write_0600(&bad, &bytes[..10]);
    assert!(keyfile::load_or_create(&bad, None).is_err());
    assert_eq!(fs::read(&bad).expect("read"), &bytes[..10]);
}

#[test]
fn passphrase_right_one_loads_wrong_one_is_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("identity.key");
    let sk = SecretKey::generate();
    keyfile::store(&path, &sk, Some(b"correct horse"), false).expect("stores");
    assert!(keyfile::is_encrypted(&path).expect("reads"));
    assert_eq!(
        keyfile::load(&path, Some(b"correct horse"))
            .expect("right passphrase")
            .public(),
        sk.public()
    );
    let err = keyfile::load(&path, Some(b"battery staple")).expect_err("wrong");
    assert!(matches!(err, KeyFileError::WrongPassphrase { .. }), "{err}");
    assert!(err.to_string().contains("wrong passphrase"), "{err}");
    let err = keyfile::load(&path, None).expect_err("needs one");
    assert!(
        matches!(err, KeyFileError::PassphraseRequired { .. }),
        "{err}"
    );
    // Corruption of a protected file is told apart from a wrong passphrase.
    let mut bytes = fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    write_0600(&path, &bytes);
    let err = keyfile::load(&path, Some(b"correct horse")).expect_err("corrupt");
    assert!(matches!(err, KeyFileError::Corrupt { .. }), "{err}");
}

/// Rewrites the checksum at the end of a key file after its content was changed.
fn fix_checksum(bytes: &mut [u8]) {
    use sha2::{Digest, Sha256};
    let (content, sum) = bytes.split_at_mut(bytes.len() - 32);
    sum.copy_from_slice(&Sha256::digest(content));
}

#[test]
fn hostile_key_derivation_parameters_are_refused_before_any_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("identity.key");
    keyfile::store(&path, &SecretKey::generate(), Some(b"pass"), false).expect("store");
    let good = fs::read(&path).expect("read");
    // The parameters follow magic (8), kind (1) and public key (32): m, t, p as u32 LE.
    for (what, offset, value) in [
        ("memory", 41, u32::MAX),
        ("passes", 45, 1_000),
        ("lanes", 49, 1_000),
    ] {
        let mut bytes = good.clone();
        bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        fix_checksum(&mut bytes);
        match keyfile::decode(&path, &bytes, Some(b"pass")) {
            Err(KeyFileError::Corrupt { reason, .. }) => {
                assert!(reason.contains("out of range"), "{what}: {reason}")
            }
            other => panic!("{what}: expected a corrupt-file error, got {other:?}"),
        }
    }
}
