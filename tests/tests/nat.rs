//! Nodes behind NATs, with the real binary in network namespaces (see
//! `p2p_tests::netns`): a public host with the discovery server and its relay, two NAT
//! routers, a home behind each, no port forwarding.
//!
//! Needs root (CI runs as root); elsewhere each test says it skipped, unless
//! `P2P_REQUIRE_NETNS=1`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use p2p_tests::{
    clean_env,
    netns::{Host, Nat, NatLab, PUBLIC_IP},
    p2p_node_bin, run_with_deadline, Proc,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// A user on a host of the lab.
struct User {
    ns: String,
    dir: tempfile::TempDir,
    discovery: String,
}

impl User {
    fn cmd(&self) -> Command {
        let mut cmd = in_ns(&self.ns);
        cmd.arg("--data-dir")
            .arg(self.dir.path())
            .arg("--discovery")
            .arg(&self.discovery);
        cmd
    }

    fn ok(&self, args: &[&str]) -> String {
        let mut cmd = self.cmd();
        cmd.args(args);
        let out = run_with_deadline(cmd, T);
        assert!(
            out.status.success(),
            "p2p-node {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// A one-shot `send --json`, parsed.
    fn send_json(&self, to: &str, text: &str) -> Value {
        let out = self.ok(&["send", to, text, "--json"]);
        serde_json::from_str(out.trim()).expect("one JSON object")
    }
}

/// `p2p-node` inside namespace `ns`, with a clean environment.
fn in_ns(ns: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(p2p_node_bin());
    clean_env(&mut cmd);
    cmd
}

/// `p2p-node discovery` on the public host (HTTP and relay on one port the system
/// picks, or on `port`); returns it with its URL.
fn discovery(ns: &str, db: &Path, port: u16) -> (Proc, String) {
    let mut cmd = in_ns(ns);
    cmd.arg("discovery")
        .arg("--listen")
        .arg(format!("{PUBLIC_IP}:{port}"))
        .arg("--db")
        .arg(db);
    let mut p = Proc::spawn(cmd);
    let line = p.expect_line(T, |l| l.contains("http://"));
    p.expect_line(T, |l| l.contains("relay listening on udp"));
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("url in line")
        .to_owned();
    (p, url)
}

/// Alice in the first home, in the chat with bob; bob in the second, listening; the
/// discovery server on the public host. Fields drop in order: the processes before
/// the lab they run in.
struct Scene {
    chat: Proc,
    listen: Proc,
    server: Proc,
    alice: User,
    _bob: User,
    db: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
    lab: NatLab,
}

impl Scene {
    /// `None` when this machine cannot build the lab (see `NatLab::build`).
    fn start(nat1: Nat, nat2: Nat, block_direct: bool) -> Option<Scene> {
        let lab = NatLab::build(nat1, nat2)?;
        if block_direct {
            lab.block_udp_between_homes(true);
        }
        let dir = p2p_tests::private_tempdir();
        let db = dir.path().join("d.redb");
        let (server, url) = discovery(&lab.ns(Host::Public), &db, 0);
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .expect("port in url");
        let user = |host| User {
            ns: lab.ns(host),
            dir: p2p_tests::private_tempdir(),
            discovery: url.clone(),
        };
        let (alice, bob) = (user(Host::Home1), user(Host::Home2));
        bob.ok(&["register", "bob"]);
        alice.ok(&["register", "alice"]);
        let mut cmd = bob.cmd();
        cmd.args(["listen", "--json"]);
        let mut listen = Proc::spawn(cmd);
        listen.expect_line(T, |l| l.contains(r#""event":"ready""#));
        let mut chat = Proc::spawn(alice.cmd());
        chat.expect_line(T, |l| l.contains("type /help"));
        chat.send_line("/chat bob");
        chat.expect_line(T, |l| l.contains("--- chat with bob"));
        Some(Scene {
            chat,
            listen,
            server,
            alice,
            _bob: bob,
            db,
            port,
            _dir: dir,
            lab,
        })
    }

    /// Sends `text` in alice's chat and returns how it fared ("delivered", "delivered
    /// via relay", "queued").
    fn say(&mut self, text: &str) -> String {
        self.chat.send_line(text);
        let mine = format!("me: {text}  (");
        let line = self.chat.expect_line(T, |l| l.contains(&mine));
        line.rsplit_once("  (")
            .map(|(_, s)| s.trim_end_matches(')').to_owned())
            .expect("a status")
    }

    /// Ends alice's chat (so her data directory is free for one-shot commands).
    fn quit_chat(&mut self) {
        self.chat.send_line("/quit");
        self.chat.wait(T);
    }

    /// Stops the processes in order.
    fn stop(mut self) {
        self.listen.terminate(T);
        self.server.terminate(T);
    }
}

/// The message events `listen --json` printed so far.
fn message_events(p: &Proc) -> Vec<Value> {
    p.seen
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "message")
        .collect()
}

/// Waits for a line matching `pred`, or finds it among those seen already.
fn saw(p: &mut Proc, pred: impl Fn(&str) -> bool) {
    if !p.seen.iter().any(|l| pred(l)) {
        p.expect_line(T, pred);
    }
}

/// Waits until bob's `listen --json` printed the message events for `texts`, and
/// checks each arrived exactly once.
fn arrived_once(listen: &mut Proc, texts: &[String]) {
    for t in texts {
        let needle = format!(r#""text":"{t}""#);
        saw(listen, |l| l.contains(&needle));
    }
    let events = message_events(listen);
    for t in texts {
        let n = events.iter().filter(|e| e["text"] == t.as_str()).count();
        assert_eq!(n, 1, "{t:?} arrived {n} times");
    }
}

#[test]
fn behind_two_nats_messages_go_through_the_relay_then_direct_then_back() {
    let Some(mut s) = Scene::start(Nat::PortPreserving, Nat::PortPreserving, false) else {
        return;
    };
    // Messages flow at once; the path becomes direct by hole punching.
    let start = Instant::now();
    let mut outcomes = Vec::new();
    let mut texts = Vec::new();
    let mut direct_at = None;
    // Until the path is direct (bounded by T: a failed punch round is retried after 5 s,
    // then 10 s), however many messages that takes.
    for i in 0..10_000 {
        let text = format!("m{i}");
        outcomes.push(s.say(&text));
        texts.push(text);
        if direct_at.is_none()
            && s.chat
                .seen
                .iter()
                .any(|l| l.contains("* direct path to bob"))
        {
            direct_at = Some(start.elapsed());
        }
        let direct = outcomes.iter().filter(|o| *o == "delivered").count();
        if direct_at.is_some() && direct >= 3 {
            break;
        }
        assert!(start.elapsed() < T, "no direct path in {T:?}: {outcomes:?}");
    }
    let direct_at = direct_at.expect("a direct path");
    eprintln!("direct path after {direct_at:?}; outcomes {outcomes:?}");
    assert!(
        outcomes.iter().all(|o| o.starts_with("delivered")),
        "every message delivered at once: {outcomes:?}"
    );
    let first_direct = outcomes
        .iter()
        .position(|o| o == "delivered")
        .expect("a direct delivery");
    assert!(
        outcomes[first_direct..].iter().all(|o| o == "delivered"),
        "once direct, direct: {outcomes:?}"
    );
    arrived_once(&mut s.listen, &texts);
    // Bob saw the direct path appear too, and messages say how they came.
    saw(&mut s.listen, |l| {
        l.contains(r#""event":"path""#) && l.contains(r#""path":"direct""#)
    });
    let last = message_events(&s.listen)
        .into_iter()
        .find(|e| e["text"] == texts[texts.len() - 1].as_str())
        .expect("last message");
    assert_eq!(last["path"], "direct");

    // The direct path dies (the routers now drop UDP between the homes): traffic falls
    // back to the relay, nothing is lost.
    s.lab.block_udp_between_homes(true);
    let cut = Instant::now();
    let mut after = Vec::new();
    for i in 0..50 {
        let text = format!("after the cut {i}");
        let sent = Instant::now();
        let outcome = s.say(&text);
        eprintln!("{text}: {outcome} in {:?}", sent.elapsed());
        after.push(outcome);
        texts.push(text);
        if after.iter().filter(|o| *o == "delivered via relay").count() >= 3 {
            break;
        }
    }
    assert!(
        after.iter().all(|o| o.starts_with("delivered")),
        "delivered despite the cut: {after:?}"
    );
    assert_eq!(
        after.last().map(String::as_str),
        Some("delivered via relay")
    );
    eprintln!("back on the relay within {:?}", cut.elapsed());
    saw(&mut s.chat, |l| l.contains("* direct path to bob lost"));
    arrived_once(&mut s.listen, &texts);

    // Later one-shot sends (a fresh node each) punch through as well, and say so.
    s.lab.block_udp_between_homes(false);
    s.quit_chat();
    for i in 0..3 {
        let text = format!("one-shot {i}");
        let v = s.alice.send_json("bob", &text);
        eprintln!("one-shot send: {v}");
        assert_eq!(v["status"], "delivered", "{v}");
        assert!(v["path"] == "direct" || v["path"] == "relay", "{v}");
        texts.push(text);
    }
    arrived_once(&mut s.listen, &texts);
    s.stop();
}

#[test]
fn behind_a_symmetric_nat_everything_goes_through_the_relay_in_real_time() {
    let Some(mut s) = Scene::start(Nat::Symmetric, Nat::PortPreserving, true) else {
        return;
    };
    let mut texts = Vec::new();
    for i in 0..10 {
        let text = format!("relayed {i}");
        assert_eq!(s.say(&text), "delivered via relay");
        texts.push(text);
    }
    arrived_once(&mut s.listen, &texts);
    assert!(message_events(&s.listen)
        .iter()
        .all(|e| e["path"] == "relay" && e["via"] == "relay"));
    assert!(!s
        .chat
        .seen
        .iter()
        .any(|l| l.contains("* direct path to bob (")));
    // A one-shot send says so too.
    s.quit_chat();
    let v = s.alice.send_json("bob", "one-shot");
    assert_eq!(
        (v["status"].as_str(), v["path"].as_str()),
        (Some("delivered"), Some("relay"))
    );
    s.stop();
}

#[test]
fn a_relay_restart_loses_nothing_and_connections_come_back() {
    let Some(mut s) = Scene::start(Nat::Symmetric, Nat::PortPreserving, true) else {
        return;
    };
    let mut texts = vec!["before".to_owned()];
    assert_eq!(s.say("before"), "delivered via relay");

    // The discovery server and its relay die (killed, no goodbye).
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(s.server.pid().to_string())
        .status();
    s.server.wait(T);
    let during: Vec<String> = (0..2).map(|i| format!("during the outage {i}")).collect();
    for t in &during {
        assert_eq!(s.say(t), "queued");
    }
    texts.extend(during);

    // Back on the same port, with its database and relay key: the queued messages
    // arrive once, with nobody sending them again, and the relay carries new ones.
    let (server, _) = discovery(&s.lab.ns(Host::Public), &s.db, s.port);
    s.server = server;
    arrived_once(&mut s.listen, &texts);
    assert_eq!(s.say("after"), "delivered via relay");
    texts.push("after".into());
    arrived_once(&mut s.listen, &texts);
    s.quit_chat();
    s.stop();
}
