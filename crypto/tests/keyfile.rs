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
    // Each kind of damage is told as what it is.
    let reason = |case: &[u8]| match keyfile::decode(&bad, case, None) {
        Err(KeyFileError::Corrupt { reason, .. }) => reason,
        other => panic!("expected a corrupt-file error, got {other:?}"),
    };
    for n in [9, 40, 72, 73, 80, bytes.len() - 1] {
        assert_eq!(reason(&bytes[..n]), "truncated", "{n} bytes");
    }
    let mut short_unknown = bytes[..20].to_vec();
    short_unknown[8] = 7;
    assert_eq!(reason(&short_unknown), "truncated");
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 8]);
    assert_eq!(reason(&longer), "trailing bytes");
    let mut flipped = bytes.clone();
    flipped[20] ^= 1;
    assert_eq!(reason(&flipped), "checksum mismatch");
    assert_eq!(
        reason(b"not a key at all, but long enough to hold one: ................................"),
        "not a p2p-node key file (bad magic)"
    );
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
        // Refused before any work: at once, not after a long key derivation (a deadline
        // of the test's own, so a bound that lets these through fails here).
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(keyfile::decode(&p, &bytes, Some(b"pass")));
        });
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(Err(KeyFileError::Corrupt { reason, .. })) => {
                assert!(reason.contains("out of range"), "{what}: {reason}")
            }
            Ok(other) => panic!("{what}: expected a corrupt-file error, got {other:?}"),
            Err(_) => panic!("{what}: still deriving a key after 10 s"),
        }
    }
}

#[test]
fn is_encrypted_tells_plain_from_protected_and_refuses_other_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = dir.path().join("plain.key");
    keyfile::store(&plain, &SecretKey::generate(), None, false).expect("stores");
    assert!(!keyfile::is_encrypted(&plain).expect("reads"));
    let sealed = dir.path().join("sealed.key");
    keyfile::store(&sealed, &SecretKey::generate(), Some(b"pass"), false).expect("stores");
    assert!(keyfile::is_encrypted(&sealed).expect("reads"));
    let good = fs::read(&sealed).expect("read");
    let mut no_magic = good.clone();
    no_magic[0] ^= 0xff;
    let mut plain_no_magic = fs::read(&plain).expect("read");
    plain_no_magic[0] ^= 0xff;
    let mut other_kind = good.clone();
    other_kind[8] = 7;
    for (what, bytes) in [
        ("empty", Vec::new()),
        ("magic alone", good[..8].to_vec()),
        ("sealed kind without the magic", no_magic),
        ("plain kind without the magic", plain_no_magic),
        ("unknown kind", other_kind),
    ] {
        let path = dir.path().join("other.key");
        write_0600(&path, &bytes);
        match keyfile::is_encrypted(&path) {
            Err(KeyFileError::Corrupt { path: p, .. }) => assert_eq!(p, path, "{what}"),
            other => panic!("{what}: expected a corrupt-file error, got {other:?}"),
        }
    }
    let err = keyfile::is_encrypted(&dir.path().join("missing.key")).expect_err("missing");
    assert!(matches!(err, KeyFileError::Read { .. }), "{err}");
}

#[test]
fn a_protected_file_records_the_documented_key_derivation_cost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("identity.key");
    keyfile::store(&path, &SecretKey::generate(), Some(b"pass"), false).expect("store");
    let bytes = fs::read(&path).expect("read");
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    // 64 MiB of memory, 3 passes, one lane (ARCHITECTURE.md), after magic, kind and key.
    assert_eq!(u32_at(41), 65_536);
    assert_eq!(u32_at(45), 3);
    assert_eq!(u32_at(49), 1);
    assert_eq!(
        (
            keyfile::KDF_M_COST_KIB,
            keyfile::KDF_T_COST,
            keyfile::KDF_P_COST
        ),
        (65_536, 3, 1)
    );
}

#[test]
fn a_path_that_cannot_be_looked_at_is_a_read_error_and_nothing_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    fs::write(&file, b"x").expect("write");
    // Under a regular file: not "not found", so no key is made.
    let path = file.join("identity.key");
    let err = keyfile::load_or_create(&path, None).expect_err("not a directory");
    assert!(matches!(err, KeyFileError::Read { .. }), "{err}");
    assert_eq!(fs::read(&file).expect("read"), b"x");
}

#[test]
fn the_largest_accepted_key_derivation_costs_are_tried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("identity.key");
    keyfile::store(&path, &SecretKey::generate(), Some(b"pass"), false).expect("store");
    let good = fs::read(&path).expect("read");
    // Each bound (1 GiB, 16 passes, 16 lanes) with the other two small: refused as out
    // of range only above it, so each file is tried; the cost changed, the key it
    // derives does not open the secret.
    for (m, t, p) in [(1024 * 1024, 1, 1), (64, 16, 1), (256, 1, 16)] {
        let mut bytes = good.clone();
        for (offset, v) in [(41, m), (45, t), (49, p)] {
            bytes[offset..offset + 4].copy_from_slice(&u32::to_le_bytes(v));
        }
        fix_checksum(&mut bytes);
        let err = keyfile::decode(&path, &bytes, Some(b"pass")).expect_err("another cost");
        assert!(
            matches!(err, KeyFileError::WrongPassphrase { .. }),
            "m {m} t {t} p {p}: {err}"
        );
    }
}
