//! Data directories written by an earlier version of `p2p-node` open in this one with
//! everything they held: their history, outbox and contacts, and the names and mailboxes
//! of a discovery server, all in the storage format of redb 2, which the first open moves
//! to the current one (also after being stopped part way).
//!
//! The fixture (`tests/fixtures/earlier-version-datadirs.tar.gz`) was written by the
//! earlier version itself: `alice` (a clear history: three messages from bob, two to him,
//! the second still in her outbox) and `bob` (a history encrypted under the passphrase
//! [`PASS`], which had received the first of those two), both registered on the
//! discovery server `srv`, whose `discovery.redb` holds the second one in bob's mailbox.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use p2p_node::datadir::CRASH_AT_ENV;
use p2p_tests::{p2p_node_alone as cmd, private_tempdir, run_with_deadline};

const T: Duration = Duration::from_secs(30);
const PASS: &str = "fixture-pass";
const FROM_BOB: [&str; 3] = [
    "from bob 1: grüße 🌍",
    "from bob 2: grüße 🌍",
    "from bob 3: grüße 🌍",
];
const DELIVERED: &str = "from alice while bob is offline";
const IN_MAILBOX: &str = "second from alice, waiting in the mailbox";

/// The fixture unpacked into `root`: `root/alice`, `root/bob`, `root/srv`.
fn unpack(root: &Path) {
    let archive = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("earlier-version-datadirs.tar.gz");
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(root)
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The line of `shown` holding `text`.
fn line_of<'a>(shown: &'a str, text: &str) -> &'a str {
    let mut lines = shown.lines().filter(|l| l.contains(text));
    let line = lines
        .next()
        .unwrap_or_else(|| panic!("{text:?} not shown in:\n{shown}"));
    assert!(lines.next().is_none(), "{text:?} shown twice in:\n{shown}");
    line
}

/// Alice's history with bob as this version shows it, and what it said on stderr.
fn alice_history(alice: &Path) -> (String, String) {
    let out = run_with_deadline(cmd(alice, None, &["history", "bob", "--limit", "100"]), T);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    (ok(out, "history of alice"), said)
}

/// Alice's history shows every message of the fixture with its status, and her outbox
/// still holds the one bob has not acknowledged.
fn assert_alice_whole(shown: &str) {
    for text in FROM_BOB {
        assert!(line_of(shown, text).contains("bob -> me"), "{shown}");
    }
    assert!(line_of(shown, DELIVERED).contains("[delivered]"), "{shown}");
    assert!(line_of(shown, IN_MAILBOX).contains("[queued]"), "{shown}");
}

/// Whether `path` is a database in the current storage format (redb 4 opens it).
fn current_format(path: &Path) -> bool {
    redb::Database::open(path).is_ok()
}

fn rewrite_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".rewrite");
    PathBuf::from(name)
}

#[test]
fn data_written_by_the_earlier_version_opens_with_everything_it_held() {
    let root = private_tempdir();
    unpack(root.path());
    let alice = root.path().join("alice");
    let bob = root.path().join("bob");
    assert!(
        !current_format(&alice.join("node.redb")),
        "the fixture is old"
    );

    // The first open moves the file, and says so.
    let (shown, said) = alice_history(&alice);
    assert!(
        said.contains("moving the database to the current storage format")
            && said.contains("database moved to the current storage format"),
        "the move is not announced: {said}"
    );
    assert_alice_whole(&shown);
    assert!(current_format(&alice.join("node.redb")));
    assert!(!rewrite_of(&alice.join("node.redb")).exists());
    // Opening it again moves nothing, says nothing of it, and shows the same.
    let (again, said) = alice_history(&alice);
    assert!(!said.contains("storage format"), "{said}");
    assert_eq!(again, shown);

    // Bob's encrypted history, with the old discovery server (its names, and alice's
    // second message in bob's mailbox) embedded in his node: going online for `history`
    // fetches the mailbox.
    fs::copy(
        root.path().join("srv").join("discovery.redb"),
        bob.join("discovery.redb"),
    )
    .expect("copy the server's database");
    let shown = ok(
        run_with_deadline(
            cmd(&bob, Some(PASS), &["history", "alice", "--limit", "100"]),
            T,
        ),
        "history of bob",
    );
    for text in FROM_BOB {
        assert!(line_of(&shown, text).contains("me -> alice"), "{shown}");
    }
    assert!(
        line_of(&shown, DELIVERED).contains("alice -> me"),
        "{shown}"
    );
    assert!(
        line_of(&shown, IN_MAILBOX).contains("alice -> me"),
        "the mailbox kept by the old server reached bob: {shown}"
    );
    assert!(current_format(&bob.join("node.redb")));
    assert!(current_format(&bob.join("discovery.redb")));
    // Still encrypted: the new file holds no message in clear.
    let bytes = fs::read(bob.join("node.redb")).expect("read");
    for text in FROM_BOB {
        assert!(
            !bytes.windows(text.len()).any(|w| w == text.as_bytes()),
            "{text:?} in clear"
        );
    }
}

#[test]
fn moving_the_format_stopped_at_any_step_leaves_a_history_that_opens() {
    for step in ["format-copying", "format-copied"] {
        let root = private_tempdir();
        unpack(root.path());
        let alice = root.path().join("alice");
        let db = alice.join("node.redb");
        let mut c = cmd(&alice, None, &["history", "bob"]);
        c.env(CRASH_AT_ENV, step);
        let out = run_with_deadline(c, T);
        assert!(!out.status.success(), "{step}: the process was stopped");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(step),
            "{step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !current_format(&db),
            "{step}: the old file stays until the whole copy replaces it"
        );
        assert_alice_whole(&alice_history(&alice).0);
        assert!(current_format(&db), "{step}");
        assert!(
            !rewrite_of(&db).exists(),
            "{step}: the partial copy is gone"
        );
    }
}
