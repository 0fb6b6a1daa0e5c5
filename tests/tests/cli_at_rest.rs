//! The data directory at rest, with the real `p2p-node` binary: file modes, refusal of
//! too-open files, the encrypted history, passphrase changes that are interrupted, and
//! moving an identity with export / import.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use p2p_node::{datadir::FILES, store::Store};
use p2p_tests::{p2p_node, p2p_node_alone, run_with_deadline, Proc};

const T: Duration = Duration::from_secs(30);
const PASS: &str = "correct horse battery";
const NEW_PASS: &str = "staple of the new one";

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

/// The file's inode: a rewrite renames a new file over the old one.
fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("metadata").ino()
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// [`p2p_node_alone`], with NEW_PASS as the passphrase a rekey or an encryption asks for.
fn cmd(dir: &Path, pass: Option<&str>, args: &[&str]) -> Command {
    let mut c = p2p_node_alone(dir, pass, args);
    c.env("P2P_NEW_PASSPHRASE", NEW_PASS);
    c
}

fn run(dir: &Path, pass: Option<&str>, args: &[&str]) -> Output {
    run_with_deadline(cmd(dir, pass, args), T)
}

fn ok(dir: &Path, pass: Option<&str>, args: &[&str]) -> String {
    let out = run(dir, pass, args);
    assert!(
        out.status.success(),
        "p2p-node {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs a command that must fail, and returns its one-line error.
fn fails(dir: &Path, pass: Option<&str>, args: &[&str]) -> String {
    let out = run(dir, pass, args);
    assert!(!out.status.success(), "p2p-node {args:?} succeeded");
    let stderr = String::from_utf8(out.stderr).expect("utf-8");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    stderr
}

fn passphrase_change(dir: &Path, old: Option<&str>, new: &str, crash_at: Option<&str>) -> Output {
    let mut c = cmd(dir, old, &["passphrase"]);
    c.env("P2P_NEW_PASSPHRASE", new);
    if let Some(step) = crash_at {
        c.env(p2p_node::datadir::CRASH_AT_ENV, step);
    }
    run_with_deadline(c, T)
}

/// Every file below `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push((path.clone(), fs::read(&path).expect("read")));
            }
        }
    }
    out.sort();
    out
}

/// The files below `dir` whose raw bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|(_, bytes)| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .map(|(p, _)| p)
        .collect()
}

/// A NodeId nobody runs: messages to it stay queued in the sender's history.
fn nobody() -> String {
    p2p_crypto::SecretKey::generate().public().to_string()
}

#[test]
fn every_file_and_directory_is_created_owner_only() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("new").join("data");
    ok(&dir, None, &["register", "alice"]);
    ok(&dir, None, &["send", &nobody(), "hello"]);
    for d in [root.path().join("new"), dir.clone()] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    let names: Vec<String> = fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    for name in FILES {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }
    for (path, _) in files(&dir) {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }

    // A standalone discovery server's database, and the directory made for it.
    let db = root.path().join("srv").join("discovery.redb");
    let mut server = p2p_node();
    server
        .args(["discovery", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db);
    let mut server = Proc::spawn(server);
    server.expect_line(T, |l| l.contains("http://"));
    assert!(server.terminate(T).success());
    assert_eq!(mode(&db), 0o600);
    assert_eq!(mode(&root.path().join("srv")), 0o700);
}

#[test]
fn a_too_open_directory_or_file_is_refused_with_the_chmod_fix() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("data");
    let id = ok(&dir, None, &["register", "alice"]);
    ok(&dir, None, &["send", &nobody(), "hello"]);
    let before = files(&dir);

    chmod(&dir, 0o755);
    let err = fails(&dir, None, &["id"]);
    assert!(
        err.contains(&format!("chmod 700 {}", dir.display())),
        "{err}"
    );
    chmod(&dir, 0o700);

    for name in FILES {
        let path = dir.join(name);
        for bad in [0o644, 0o640, 0o620, 0o606] {
            chmod(&path, bad);
            for args in [&["id"][..], &["history", "alice"], &["passphrase"]] {
                let err = fails(&dir, None, args);
                assert!(
                    err.contains(&format!("chmod 600 {}", path.display())),
                    "{name} {bad:o} {args:?}: {err}"
                );
            }
            chmod(&path, 0o600);
        }
    }
    assert_eq!(files(&dir), before, "nothing was read into or changed");
    assert!(ok(&dir, None, &["id"]).contains(id.split_whitespace().last().expect("id")));
}

/// Bob listens (serving discovery himself) and Alice sends him a marker text; both
/// identities are protected when `pass` is given. Returns the data directories.
fn send_and_receive(root: &Path, pass: Option<&str>, marker: &str) -> (PathBuf, PathBuf) {
    let (alice, bob) = (root.join("alice"), root.join("bob"));
    for d in [&alice, &bob] {
        ok(d, pass, &["init"]);
    }
    let bob_id = ok(&bob, pass, &["id"]).trim().to_string();
    let mut listen = Proc::spawn(cmd(&bob, pass, &["listen", "--json"]));
    let ready = listen.expect_line(T, |l| l.contains(r#""event":"ready""#));
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("json");
    let url = ready["discovery"]
        .as_str()
        .expect("discovery url")
        .to_string();
    let mut send = p2p_node();
    send.arg("--data-dir").arg(&alice).args([
        "--discovery",
        &url,
        "--listen",
        "127.0.0.1:0",
        "send",
        &bob_id,
        marker,
    ]);
    if let Some(p) = pass {
        send.env("P2P_PASSPHRASE", p);
    }
    let out = run_with_deadline(send, T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "delivered");
    listen.expect_line(T, |l| {
        l.contains(r#""event":"message""#) && l.contains(marker)
    });
    assert!(listen.terminate(T).success());
    (alice, bob)
}

#[test]
fn with_a_passphrase_the_text_is_in_no_file_and_history_shows_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let marker = "MARKER-d41d8cd98f00b204";
    let (alice, bob) = send_and_receive(root.path(), Some(PASS), marker);
    let alice_id = ok(&alice, Some(PASS), &["id"]).trim().to_string();
    let bob_id = ok(&bob, Some(PASS), &["id"]).trim().to_string();
    assert!(bob.join("discovery.redb").exists(), "bob served discovery");
    for dir in [&alice, &bob] {
        assert_eq!(files_containing(dir, marker), Vec::<PathBuf>::new());
    }
    let sent = ok(&alice, Some(PASS), &["history", &bob_id]);
    assert!(
        sent.contains(&format!("me -> {bob_id}: {marker}")),
        "{sent}"
    );
    let got = ok(&bob, Some(PASS), &["history", &alice_id]);
    assert!(got.contains(&format!("-> me: {marker}")), "{got}");

    // The same without a passphrase: the text is in the database in clear, so the check
    // above can fail.
    let clear = tempfile::tempdir().expect("tempdir");
    let (alice, bob) = send_and_receive(clear.path(), None, marker);
    assert_eq!(files_containing(&alice, marker), [alice.join("node.redb")]);
    assert_eq!(files_containing(&bob, marker), [bob.join("node.redb")]);
}

#[test]
fn a_wrong_passphrase_is_a_clear_error_and_changes_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("data");
    ok(&dir, None, &["send", &nobody(), "before the passphrase"]);
    let out = passphrase_change(&dir, None, PASS, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = files(&dir);
    for (pass, args) in [
        (Some("wrong"), &["history", "someone"][..]),
        (Some("wrong"), &["id"]),
        (Some("wrong"), &["passphrase"]),
        (Some("wrong"), &["export", "out.p2p"]),
        (None, &["id"]),
    ] {
        let mut c = cmd(&dir, pass, args);
        c.env("P2P_NEW_PASSPHRASE", NEW_PASS)
            .current_dir(root.path());
        let out = run_with_deadline(c, T);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        let expected = if pass.is_some() {
            "wrong passphrase for key file"
        } else {
            "protected by a passphrase; none was given"
        };
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(files(&dir), before, "{args:?} changed nothing");
    }
    assert!(!root.path().join("out.p2p").exists());
}

/// A data directory with an unprotected identity and `n` messages in its clear history,
/// written with the library (fast); returns the peer they were sent to.
fn seed(dir: &Path, n: usize, text: &str) -> p2p_crypto::NodeId {
    p2p_node::datadir::prepare(dir).expect("prepare");
    let (key, _) =
        p2p_crypto::keyfile::load_or_create(&dir.join("identity.key"), None).expect("identity");
    let peer = p2p_crypto::SecretKey::generate().public();
    let store =
        Store::open_with_key(dir.join("node.redb"), key.history_key(), false).expect("store");
    let ops: Vec<_> = (0..n)
        .map(|i| p2p_node::store::WriteOp::Outgoing {
            to: peer,
            msg: p2p_node::wire::ChatMessage::text(format!("{text} {i}"), i as u64)
                .expect("message"),
            now_ms: 1_000 + i as u64,
        })
        .collect();
    for chunk in ops.chunks(1024) {
        for r in store.write_batch(chunk).expect("batch") {
            r.expect("write");
        }
    }
    peer
}

/// The data directory opens with the passphrase its key file has now (none, the old
/// state, or the new one) and shows every seeded message; after the change is done (again,
/// if it was stopped before the key file was replaced), no file holds clear text.
fn opens_with_old_or_new(dir: &Path, peer: &str, n: usize, text: &str) {
    let protected =
        p2p_crypto::keyfile::is_encrypted(&dir.join("identity.key")).expect("a whole key file");
    let pass = protected.then_some(NEW_PASS);
    let out = run(dir, pass, &["history", peer, "--limit", "3"]);
    assert!(
        out.status.success(),
        "does not open (protected: {protected}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).matches(text).count(),
        3
    );
    if !protected {
        let again = passphrase_change(dir, None, NEW_PASS, None);
        assert!(
            again.status.success(),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );
    }
    // Every message is there (read with the library: the whole history is too long for
    // the terminal).
    let key = p2p_crypto::keyfile::load(&dir.join("identity.key"), Some(NEW_PASS.as_bytes()))
        .expect("the new passphrase opens it");
    let store =
        Store::open_with_key(dir.join("node.redb"), key.history_key(), true).expect("store opens");
    assert!(store.is_encrypted());
    let all = store
        .history(&peer.parse().expect("NodeId"), n + 1, None)
        .expect("history");
    assert_eq!(all.len(), n, "every message is there");
    assert!(all
        .iter()
        .all(|m| m.body.as_text().is_some_and(|t| t.starts_with(text))));
    drop(store);
    assert_eq!(
        files_containing(dir, text),
        Vec::<PathBuf>::new(),
        "no clear text left"
    );
}

#[test]
fn a_passphrase_change_stopped_at_any_step_leaves_a_store_that_opens() {
    let text = "MARKER-6f1ed002ab5595859014";
    let root = tempfile::tempdir().expect("tempdir");
    let base = root.path().join("base");
    let peer = seed(&base, 50, text).to_string();
    for step in [
        Some("key-written"),
        Some("history-copying"),
        Some("history-copied"),
        Some("history-renamed"),
        None,
    ] {
        let dir = root.path().join(step.unwrap_or("none"));
        copy_dir(&base, &dir);
        let out = passphrase_change(&dir, None, NEW_PASS, step);
        assert_eq!(out.status.success(), step.is_none(), "{step:?}");
        opens_with_old_or_new(&dir, &peer, 50, text);
        // Changing it again rewrites the key file only: the database is not rewritten.
        let db = inode(&dir.join("node.redb"));
        let out = passphrase_change(&dir, Some(NEW_PASS), PASS, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("already encrypted, unchanged"));
        assert_eq!(
            inode(&dir.join("node.redb")),
            db,
            "{step:?}: the database was rewritten"
        );
        let shown = ok(&dir, Some(PASS), &["history", &peer, "--limit", "100"]);
        assert_eq!(shown.matches(text).count(), 50);
    }
}

/// Tells, from the files of a data directory, that a moment to kill has come.
type Moment<'a> = Box<dyn Fn(&Path) -> bool + 'a>;

#[test]
fn a_passphrase_change_killed_by_a_signal_leaves_a_store_that_opens() {
    let text = "MARKER-killed-b6d767d2f8ed";
    let n = 5_000;
    let root = tempfile::tempdir().expect("tempdir");
    let base = root.path().join("base");
    let peer = seed(&base, n, text).to_string();
    let key = base.join("identity.key");
    let key_bytes = fs::read(&key).expect("read");
    // Kill it as soon as it starts, once the key file changed, and once the encrypted
    // copy is being written.
    let moments: [(&str, Moment<'_>); 3] = [
        ("at once", Box::new(|_: &Path| true)),
        (
            "key written",
            Box::new(|d: &Path| fs::read(d.join("identity.key")).is_ok_and(|b| b != key_bytes)),
        ),
        (
            "copying",
            Box::new(|d: &Path| d.join("node.redb.rewrite").exists()),
        ),
    ];
    for (name, moment) in moments {
        let dir = root.path().join(name.replace(' ', "-"));
        copy_dir(&base, &dir);
        let mut c = cmd(&dir, None, &["passphrase"]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = c.spawn().expect("spawn");
        let deadline = Instant::now() + T;
        while !moment(&dir) && Instant::now() < deadline {
            if child.try_wait().expect("try_wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Kills only the child started here (by its pid), and reaps it.
        let _ = child.kill();
        let _ = child.wait();
        opens_with_old_or_new(&dir, &peer, n, text);
    }
}

/// Copies a data directory (flat) with its modes.
fn copy_dir(from: &Path, to: &Path) {
    p2p_node::datadir::prepare(to).expect("prepare");
    for entry in fs::read_dir(from).expect("list") {
        let path = entry.expect("entry").path();
        let dest = to.join(path.file_name().expect("name"));
        fs::copy(&path, &dest).expect("copy");
        chmod(&dest, 0o600);
    }
}

#[test]
fn export_then_import_gives_the_same_identity_and_history() {
    let text = "MARKER-export-9e107d9d372bb";
    let root = tempfile::tempdir().expect("tempdir");
    let old = root.path().join("old");
    let peer = seed(&old, 30, text).to_string();
    ok(&old, None, &["register", "alice"]);
    let id = ok(&old, None, &["id"]);
    let history = ok(&old, None, &["history", &peer, "--limit", "100"]);
    assert_eq!(history.matches(text).count(), 30);

    // Export needs a passphrase: it protects the file.
    let file = root.path().join("alice.p2p");
    let err = fails(
        &old,
        None,
        &["export", file.to_str().expect("utf-8"), "--history"],
    );
    assert!(err.contains("needs a passphrase"), "{err}");
    let said = ok(
        &old,
        Some(PASS),
        &["export", file.to_str().expect("utf-8"), "--history"],
    );
    assert!(said.contains("30 messages"), "{said}");
    assert_eq!(mode(&file), 0o600);
    assert_eq!(
        files_containing(root.path(), text),
        [old.join("node.redb")],
        "not in the file"
    );
    let err = fails(&old, Some(PASS), &["export", file.to_str().expect("utf-8")]);
    assert!(err.contains("already exists"), "{err}");

    // Import on a fresh machine: same NodeId, same history, protected by the passphrase.
    let new = root.path().join("new");
    let import = |dir: &Path, file: &Path, pass: &str, extra: &[&str]| {
        let mut args = vec!["init", "--import", file.to_str().expect("utf-8")];
        args.extend_from_slice(extra);
        run(dir, Some(pass), &args)
    };
    let out = import(&new, &file, "wrong", &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    assert!(!new.join("identity.key").exists() && !new.join("node.redb").exists());
    let out = import(&new, &file, PASS, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), id);
    assert_eq!(ok(&new, Some(PASS), &["id"]), id);
    assert!(fails(&new, None, &["id"]).contains("protected by a passphrase"));
    assert_eq!(
        ok(&new, Some(PASS), &["history", &peer, "--limit", "100"]),
        history
    );
    assert_eq!(files_containing(&new, text), Vec::<PathBuf>::new());
    for (path, _) in files(&new) {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    assert_eq!(mode(&new), 0o700);

    // An identity already there is replaced only with --force.
    let err = String::from_utf8_lossy(&import(&new, &file, PASS, &[]).stderr).into_owned();
    assert!(err.contains("--force"), "{err}");
    assert!(import(&new, &file, PASS, &["--force"]).status.success());

    // Without --history: the identity alone.
    let bare = root.path().join("bare.p2p");
    ok(&old, Some(PASS), &["export", bare.to_str().expect("utf-8")]);
    let other = root.path().join("other");
    assert!(import(&other, &bare, PASS, &[]).status.success());
    assert_eq!(ok(&other, Some(PASS), &["id"]), id);
    assert!(ok(&other, Some(PASS), &["history", &peer]).contains("no messages"));

    // A damaged file is refused before anything is written.
    let mut bytes = fs::read(&file).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    let damaged = root.path().join("damaged.p2p");
    fs::write(&damaged, &bytes).expect("write");
    let fresh = root.path().join("fresh");
    let out = import(&fresh, &damaged, PASS, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    assert_eq!(files(&fresh).len(), 1, "only the lock: {:?}", files(&fresh));
}
