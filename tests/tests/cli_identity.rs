//! `p2p-node init` and `p2p-node id`, run as a user would.

use std::time::Duration;

use p2p_tests::{p2p_node, private_tempdir, run_with_deadline};

const DEADLINE: Duration = Duration::from_secs(30);

fn id(dir: &std::path::Path) -> String {
    let mut cmd = p2p_node();
    cmd.arg("--data-dir").arg(dir).arg("id");
    let out = run_with_deadline(cmd, DEADLINE);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "id prints exactly one line: {stdout:?}");
    lines[0].parse::<p2p_crypto::NodeId>().expect("a NodeId");
    lines[0].to_string()
}

#[test]
fn id_is_stable_per_data_dir_and_differs_between_dirs() {
    let a = private_tempdir();
    let b = private_tempdir();
    let first = id(a.path());
    assert_eq!(id(a.path()), first);
    assert_ne!(id(b.path()), first);
}

#[test]
fn data_dir_from_environment() {
    let a = private_tempdir();
    let first = id(a.path());
    let mut cmd = p2p_node();
    cmd.env("P2P_DATA_DIR", a.path()).arg("id");
    let out = run_with_deadline(cmd, DEADLINE);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), first);
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let dir = private_tempdir();
    let mut cmd = p2p_node();
    cmd.arg("--data-dir").arg(dir.path()).arg("init");
    let out = run_with_deadline(cmd, DEADLINE);
    assert!(out.status.success());
    let created = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(id(dir.path()), created);

    let mut cmd = p2p_node();
    cmd.arg("--data-dir").arg(dir.path()).arg("init");
    let out = run_with_deadline(cmd, DEADLINE);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert_eq!(id(dir.path()), created, "identity unchanged");

    let mut cmd = p2p_node();
    cmd.arg("--data-dir")
        .arg(dir.path())
        .arg("init")
        .arg("--force");
    let out = run_with_deadline(cmd, DEADLINE);
    assert!(out.status.success());
    assert_ne!(id(dir.path()), created, "replaced with --force");
}

#[test]
fn passphrase_protected_identity() {
    let dir = private_tempdir();
    let pass = dir.path().join("pass.txt");
    std::fs::write(&pass, "s3cret words\n").expect("write");
    let data = dir.path().join("data");
    let mut cmd = p2p_node();
    cmd.arg("--data-dir")
        .arg(&data)
        .arg("--passphrase-file")
        .arg(&pass)
        .arg("init");
    let out = run_with_deadline(cmd, DEADLINE);
    assert!(out.status.success());
    let created = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let mut cmd = p2p_node();
    cmd.arg("--data-dir")
        .arg(&data)
        .env("P2P_PASSPHRASE", "s3cret words")
        .arg("id");
    let out = run_with_deadline(cmd, DEADLINE);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), created);

    let mut cmd = p2p_node();
    cmd.arg("--data-dir")
        .arg(&data)
        .env("P2P_PASSPHRASE", "wrong")
        .arg("id");
    let out = run_with_deadline(cmd, DEADLINE);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
}

#[test]
fn corrupt_key_file_is_a_clear_error() {
    let dir = private_tempdir();
    id(dir.path());
    let key = dir.path().join("identity.key");
    let bytes = std::fs::read(&key).expect("read");
    std::fs::write(&key, &bytes[..20]).expect("truncate");
    let mut cmd = p2p_node();
    cmd.arg("--data-dir").arg(dir.path()).arg("id");
    let out = run_with_deadline(cmd, DEADLINE);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&key.display().to_string()), "{stderr}");
    assert!(stderr.contains("corrupt"), "{stderr}");
    assert_eq!(std::fs::read(&key).expect("read").len(), 20, "not replaced");
}
