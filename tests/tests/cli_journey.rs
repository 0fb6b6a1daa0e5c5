//! The whole user journey with the real `p2p-node` binary: a discovery server process and
//! node processes with their own data directories, all on loopback.

use std::path::Path;

use p2p_tests::{
    discovery_server, json_lines, message_event, p2p_node, private_tempdir, run_with_deadline,
    Proc, User, T,
};
use serde_json::Value;

/// Writes a file of the data directory as the node would: mode 0600.
fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Both register; B listens; A's send is delivered and B prints it; B stops; A's send is
/// queued; B listens again and gets it; history on both sides; a taken name fails.
fn journey(discovery: &str, alice: &User, bob: &User) {
    let _ = discovery;
    let a_id = alice.id();
    let b_id = bob.id();
    assert!(alice.ok(&["register", "alice"]).contains("alice"));
    assert!(bob.ok(&["register", "bob"]).contains("bob"));

    let mut b_listen = bob.listen_json();
    let peers = alice.ok(&["peers", "--json"]);
    let peers = json_lines(&peers);
    assert!(
        peers
            .iter()
            .any(|p| p["name"] == "bob" && p["node_id"] == b_id.as_str()),
        "bob is online: {peers:?}"
    );

    assert_eq!(alice.ok(&["send", "bob", "hello bob"]).trim(), "delivered");
    let ev = message_event(&mut b_listen, "hello bob");
    assert_eq!(ev["from"], a_id.as_str());
    assert_eq!(ev["from_name"], "alice");
    assert!(ev["id"].as_str().is_some_and(|s| s.len() == 32));
    assert!(ev["sent_at_ms"].as_u64().is_some());
    assert!(ev["received_at_ms"].as_u64().is_some());

    assert!(b_listen.terminate(T).success(), "listen exits 0 on SIGTERM");

    assert!(alice
        .ok(&["send", "bob", "are you there?"])
        .starts_with("queued in the recipient's mailbox"));

    let mut b_listen = bob.listen_json();
    let ev = message_event(&mut b_listen, "are you there?");
    assert_eq!(ev["from"], a_id.as_str());
    assert!(b_listen.terminate(T).success());

    for (user, peer) in [(alice, "bob"), (bob, "alice")] {
        let hist = json_lines(&user.ok(&["history", peer, "--json"]));
        let texts: Vec<&str> = hist.iter().filter_map(|m| m["text"].as_str()).collect();
        assert_eq!(texts, ["hello bob", "are you there?"], "{peer}'s view");
    }
    let hist = json_lines(&alice.ok(&["history", &b_id, "--json"]));
    assert_eq!(hist[0]["status"], "delivered");

    let out = alice.run(&["register", "bob"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bob") && err.contains("taken"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn journey_with_a_discovery_server_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut server, url) = discovery_server(&dir.path().join("discovery.redb"));
    let alice = User::new(&url);
    let bob = User::new(&url);
    journey(&url, &alice, &bob);
    assert!(server.terminate(T).success());
}

#[test]
fn journey_with_embedded_discovery() {
    // A serves discovery inside its own node; B and C use A's URL.
    let a_dir = private_tempdir();
    let mut cmd = p2p_node();
    cmd.arg("--data-dir")
        .arg(a_dir.path())
        .arg("--embedded-discovery")
        .arg("127.0.0.1:0")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .args(["listen", "--json"]);
    let mut host = Proc::spawn(cmd);
    let ready = host.expect_line(T, |l| l.contains(r#""event":"ready""#));
    let ready: Value = serde_json::from_str(&ready).expect("json");
    let url = ready["discovery"]
        .as_str()
        .expect("discovery url")
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let bob = User::new(&url);
    let carol = User::new(&url);
    journey(&url, &bob, &carol);

    // The host node itself receives too.
    let host_id = ready["node_id"].as_str().expect("id").to_string();
    assert_eq!(bob.ok(&["send", &host_id, "hi host"]).trim(), "delivered");
    message_event(&mut host, "hi host");
    assert!(host.terminate(T).success());
}

#[test]
fn interactive_chat_through_a_pipe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut server, url) = discovery_server(&dir.path().join("discovery.redb"));
    let alice = User::new(&url);
    let bob = User::new(&url);
    let carol = User::new(&url);
    alice.ok(&["register", "alice"]);
    bob.ok(&["register", "bob"]);
    carol.ok(&["register", "carol"]);
    let mut b_listen = bob.listen_json();

    let mut chat = Proc::spawn(alice.cmd());
    chat.expect_line(T, |l| l.contains("type /help"));
    chat.send_line("/peers");
    chat.expect_line(T, |l| l.contains("bob"));
    chat.send_line("/chat bob");
    chat.expect_line(T, |l| l.contains("chat with bob"));
    chat.send_line("hi bob, from the room");
    chat.expect_line(T, |l| {
        l.contains("hi bob, from the room") && l.contains("(delivered)")
    });
    message_event(&mut b_listen, "hi bob, from the room");

    // Bob answers: it shows in the open room.
    assert_eq!(
        bob_send(&bob, &mut b_listen, "alice", "hello alice"),
        "delivered"
    );
    chat.expect_line(T, |l| l.contains("bob: hello alice"));

    // Carol writes while the room with bob is open: a notice.
    assert_eq!(carol.ok(&["send", "alice", "psst"]).trim(), "delivered");
    chat.expect_line(T, |l| l.contains("New message from carol"));

    chat.send_line("/quit");
    assert!(chat.wait(T).success());
    assert!(chat.seen.iter().any(|l| l.contains("logged out")));
    assert!(b_listen.terminate(T).success());
    assert!(server.terminate(T).success());
}

/// Bob's `listen` holds his data directory, so he sends from a second process only after
/// stopping it; restart it afterwards.
fn bob_send(bob: &User, listen: &mut Proc, to: &str, text: &str) -> String {
    assert!(listen.terminate(T).success());
    let out = bob.ok(&["send", to, text]).trim().to_string();
    *listen = bob.listen_json();
    out
}

#[test]
fn error_paths_are_one_line_and_non_zero() {
    let dir = private_tempdir();
    // An address where nothing listens: bind a port, then free it.
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}", free.local_addr().expect("addr"));
    drop(free);

    let check = |args: &[&str], url: &str, needle: &str| {
        let mut cmd = p2p_node();
        cmd.arg("--data-dir")
            .arg(dir.path())
            .arg("--discovery")
            .arg(url)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(args);
        let out = run_with_deadline(cmd, T);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.to_lowercase().contains(needle),
            "{args:?}: stderr lacks {needle:?}: {err}"
        );
        assert_eq!(
            err.trim().lines().filter(|l| l.contains("error")).count(),
            1,
            "{args:?}: {err}"
        );
    };
    check(&["peers"], &dead_url, "discovery");
    check(&["register", "dave"], &dead_url, "discovery");
    check(&["send", "dave", "hi"], &dead_url, "discovery");
    check(&["peers"], "not a url", "url");

    let (mut server, url) = discovery_server(&dir.path().join("discovery.redb"));
    check(&["send", "nobody-here", "hi"], &url, "nobody-here");

    // Sending to a NodeId while discovery is down keeps the message in the outbox.
    let someone = private_tempdir();
    let mut cmd = p2p_node();
    cmd.arg("--data-dir").arg(someone.path()).arg("id");
    let other_id = String::from_utf8(run_with_deadline(cmd, T).stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    let mut cmd = p2p_node();
    cmd.arg("--data-dir")
        .arg(dir.path())
        .arg("--discovery")
        .arg(&dead_url)
        .args(["send", &other_id, "kept for later"]);
    let out = run_with_deadline(cmd, T);
    let mut cmd = p2p_node();
    cmd.arg("--data-dir")
        .arg(dir.path())
        .arg("--discovery")
        .arg(&dead_url)
        .args(["history", &other_id, "--json"]);
    let hist = run_with_deadline(cmd, T);
    assert!(
        String::from_utf8_lossy(&hist.stdout).contains("kept for later"),
        "send exit {:?} stderr {}; history: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&hist.stdout)
    );

    // A second process on the same data directory: commands go through the running
    // node (its errors are theirs); what needs the directory itself is refused.
    let user = User::new(&url);
    let mut listening = user.listen_json();
    let out = user.run(&["send", "anyone", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("anyone"), "the running node's answer: {err}");
    let mut cmd = user.cmd();
    cmd.arg("passphrase")
        .env("P2P_NEW_PASSPHRASE", "a new passphrase");
    let out = run_with_deadline(cmd, T);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&user.dir.path().display().to_string()),
        "names the dir: {err}"
    );
    assert!(listening.terminate(T).success());

    // A corrupt history database.
    let corrupt = User::new(&url);
    corrupt.id();
    write_private(&corrupt.dir.path().join("node.redb"), b"not a database");
    let out = corrupt.run(&["history", "bob"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node.redb"), "names the file: {err}");
    assert_eq!(
        std::fs::read(corrupt.dir.path().join("node.redb")).expect("read"),
        b"not a database",
        "nothing is overwritten"
    );

    // A damaged registered-name file.
    let bad_name = User::new(&url);
    bad_name.id();
    write_private(&bad_name.dir.path().join("name"), b"Not A Name!\n");
    let out = bad_name.run(&["peers"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("name") && err.contains("register again"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(server.terminate(T).success());
}
