//! Nothing stalls in the outbox, and one identity serves many commands: `queued` says
//! where a message waits, one-shot commands move the outbox on, a background node
//! (`p2p-node daemon`) keeps it moving and answers the other commands through its
//! control socket, which no other user may use.

use std::{
    os::unix::process::CommandExt,
    process::Command,
    time::{Duration, Instant},
};

use p2p_tests::{
    discovery_server, json_lines, message_event, p2p_node_bin, private_tempdir, run_with_deadline,
    User, T,
};

/// The same data directory as `user`, with another discovery URL.
fn with_discovery(user: User, url: &str) -> User {
    User {
        dir: user.dir,
        discovery: url.to_owned(),
    }
}

/// A URL nobody listens on.
fn dead_url() -> String {
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", free.local_addr().expect("addr"));
    drop(free);
    url
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn queued_says_where_it_waits_and_one_shot_commands_move_the_outbox_on() {
    let server_dir = private_tempdir();
    let db = server_dir.path().join("discovery.redb");
    let (mut server, url) = discovery_server(&db);
    let alice = User::new(&url);
    let bob = User::new(&url);
    let bob_id = bob.id();
    alice.ok(&["register", "alice"]);
    bob.ok(&["register", "bob"]);

    // Bob is offline, discovery is up: sealed in his mailbox.
    let out = alice.run(&["send", "bob", "in the mailbox", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sent = &json_lines(&stdout(&out))[0];
    assert_eq!(sent["status"], "queued");
    assert_eq!(sent["queued"], "mailbox");
    let text = alice.ok(&["send", "bob", "in the mailbox too"]);
    assert!(
        text.trim()
            .starts_with("queued in the recipient's mailbox (it arrives even if"),
        "{text}"
    );

    // Discovery is down: only in the outbox, and the command says so.
    assert!(server.terminate(T).success());
    let alice = with_discovery(alice, &dead_url());
    let out = alice.run(&["send", &bob_id, "only here", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&stdout(&out))[0]["queued"], "outbox");
    assert!(
        stderr(&out).contains("1 message is still only in your outbox"),
        "{}",
        stderr(&out)
    );
    let out = alice.run(&["send", &bob_id, "only here too"]);
    assert!(
        stdout(&out).starts_with("queued in your outbox only"),
        "{out:?}"
    );
    assert!(
        stderr(&out).contains("2 messages are still only in your outbox"),
        "{}",
        stderr(&out)
    );

    // Discovery is back (same database, another port): any one-shot command of Alice's
    // deposits what waited; then Bob gets everything without Alice running.
    let (mut server, url) = discovery_server(&db);
    let alice = with_discovery(alice, &url);
    let bob = with_discovery(bob, &url);
    let out = alice.run(&["history", "bob"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("outbox"), "{}", stderr(&out));
    let status = alice.ok(&["status", "--json"]);
    let status = &json_lines(&status)[0];
    assert_eq!(status["running"], serde_json::Value::Null);
    assert_eq!(status["outbox_only_here"], 0, "{status}");

    let mut listening = bob.listen_json();
    for text in [
        "in the mailbox",
        "in the mailbox too",
        "only here",
        "only here too",
    ] {
        message_event(&mut listening, text);
    }
    assert!(listening.terminate(T).success());
    assert!(server.terminate(T).success());
}

/// Stops the background node of a test, also when the test fails.
struct Background<'a> {
    user: &'a User,
    pid: u32,
}

impl Drop for Background<'_> {
    fn drop(&mut self) {
        if self.user.run(&["stop"]).status.success() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
    }
}

/// Starts `p2p-node daemon` for `user`; returns its guard.
fn start_daemon(user: &User) -> Background<'_> {
    let out = user.run(&["daemon"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let pid = text
        .split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {text:?}"));
    Background { user, pid }
}

#[test]
fn a_background_node_moves_the_outbox_and_answers_the_other_commands() {
    let server_dir = private_tempdir();
    let db = server_dir.path().join("discovery.redb");
    let (mut server, url) = discovery_server(&db);
    let alice = User::new(&url);
    let bob = User::new(&url);
    let bob_id = bob.id();
    bob.ok(&["register", "bob"]);
    assert!(server.terminate(T).success());

    // Queued while discovery is down: only in Alice's outbox.
    let alice = with_discovery(alice, &dead_url());
    let out = alice.run(&["send", &bob_id, "carried by the daemon", "--json"]);
    assert_eq!(json_lines(&stdout(&out))[0]["queued"], "outbox", "{out:?}");

    // Discovery is back; Alice's node runs in the background.
    let (mut server, url) = discovery_server(&db);
    let alice = with_discovery(alice, &url);
    let bob = with_discovery(bob, &url);
    let daemon = start_daemon(&alice);
    let again = alice.run(&["daemon"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already running"),
        "{}",
        stderr(&again)
    );

    // The daemon deposits the message by itself.
    let end = Instant::now() + T;
    loop {
        let status = json_lines(&alice.ok(&["status", "--json"]))[0].clone();
        assert_eq!(status["running"], "daemon", "{status}");
        assert_eq!(status["pid"], daemon.pid, "{status}");
        if status["outbox_only_here"] == 0 {
            break;
        }
        assert!(Instant::now() < end, "still only in the outbox: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Commands on Alice's data directory go through the daemon.
    let mut listening = bob.listen_json();
    message_event(&mut listening, "carried by the daemon");
    let end = Instant::now() + T;
    while !alice.ok(&["peers"]).contains(&bob_id) {
        assert!(Instant::now() < end, "bob is not listed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = alice.run(&["send", &bob_id, "sent beside the daemon", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Delivered now, or by the daemon's outbox (not by this command, which is gone).
    let status = json_lines(&stdout(&out))[0]["status"].clone();
    assert!(status == "delivered" || status == "queued", "{status}");
    message_event(&mut listening, "sent beside the daemon");
    let history = alice.ok(&["history", &bob_id]);
    assert!(history.contains("sent beside the daemon"), "{history}");
    let status = alice.ok(&["status"]);
    assert!(status.contains("daemon (pid"), "{status}");
    assert!(status.contains("connections: 1"), "{status}");

    // `stop` logs it out; then nothing runs.
    let stopped = alice.ok(&["stop"]);
    assert!(stopped.contains("stopped"), "{stopped}");
    let status = json_lines(&alice.ok(&["status", "--json"]))[0].clone();
    assert_eq!(status["running"], serde_json::Value::Null);
    let log = std::fs::read_to_string(alice.dir.path().join("daemon.log")).expect("log");
    assert!(log.contains("logged out"), "{log}");
    drop(daemon);
    assert!(listening.terminate(T).success());
    assert!(server.terminate(T).success());
}

#[test]
fn a_chat_answers_one_shot_commands_but_is_not_stopped_by_them() {
    let server_dir = private_tempdir();
    let (mut server, url) = discovery_server(&server_dir.path().join("discovery.redb"));
    let alice = User::new(&url);
    let bob = User::new(&url);
    bob.ok(&["register", "bob"]);
    let mut chat = {
        let mut cmd = alice.cmd();
        cmd.arg("--plain");
        p2p_tests::Proc::spawn(cmd)
    };
    chat.expect_line(T, |l| l.starts_with("logged in as"));
    let mut listening = bob.listen_json();
    let out = alice.ok(&["send", "bob", "from a script beside the chat"]);
    assert_eq!(out.trim(), "delivered");
    message_event(&mut listening, "from a script beside the chat");
    let out = alice.run(&["stop"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("quit it there"), "{}", stderr(&out));
    chat.send_line("/quit");
    assert!(chat.wait(T).success());
    assert!(listening.terminate(T).success());
    assert!(server.terminate(T).success());
}

#[test]
fn the_control_socket_is_the_owners_alone() {
    if !nix_is_root() {
        eprintln!("skipping: needs root to run a command as another user");
        return;
    }
    let server_dir = private_tempdir();
    let (mut server, url) = discovery_server(&server_dir.path().join("discovery.redb"));
    let alice = User::new(&url);
    let mut listening = alice.listen_json();
    let socket = alice.dir.path().join("control.sock");
    let meta = std::fs::metadata(&socket).expect("the socket exists");
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.uid(), 0, "owned by the node's user");
    }

    // Another user: a copy of the program it may run, and the same command.
    let bin_dir = tempfile::tempdir().expect("temp dir");
    let bin = bin_dir.path().join("p2p-node");
    std::fs::copy(p2p_node_bin(), &bin).expect("copy the program");
    set_mode(bin_dir.path(), 0o755);
    let as_nobody = || {
        let mut cmd = Command::new(&bin);
        p2p_tests::clean_env(&mut cmd);
        cmd.arg("--data-dir")
            .arg(alice.dir.path())
            .args(["--discovery", &url, "status"])
            .uid(65534)
            .gid(65534)
            .env("HOME", "/nonexistent");
        run_with_deadline(cmd, T)
    };
    // The directory (0700) and the socket (0600) keep it out...
    let out = as_nobody();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ermission denied"),
        "{}",
        stderr(&out)
    );
    // ...and with both opened up by mistake, the node still refuses it.
    set_mode(alice.dir.path(), 0o711);
    set_mode(&socket, 0o666);
    let out = as_nobody();
    set_mode(alice.dir.path(), 0o700);
    set_mode(&socket, 0o600);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("answers only the user running the node"),
        "{}",
        stderr(&out)
    );
    assert!(listening.terminate(T).success());
    assert!(server.terminate(T).success());
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[test]
fn acknowledged_messages_survive_a_kill_9_of_the_receiver() {
    let server_dir = private_tempdir();
    let (mut server, url) = discovery_server(&server_dir.path().join("discovery.redb"));
    let alice = User::new(&url);
    let bob = User::new(&url);
    alice.ok(&["register", "alice"]);
    bob.ok(&["register", "bob"]);
    let mut listening = bob.listen_json();
    // Each send is acknowledged only once Bob's node has it on disk: a crash right after
    // loses none of them.
    let texts: Vec<String> = (0..5).map(|i| format!("durable {i}")).collect();
    for text in &texts {
        let out = alice.ok(&["send", "bob", text]);
        assert!(out.trim().starts_with("delivered"), "{out}");
        message_event(&mut listening, text);
    }
    assert!(!listening.kill_9(T).success());
    let history = bob.ok(&["history", "alice", "--json"]);
    let got: Vec<String> = json_lines(&history)
        .iter()
        .filter_map(|m| m["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(got, texts, "every acknowledged message is in history");
    assert!(server.terminate(T).success());
}
