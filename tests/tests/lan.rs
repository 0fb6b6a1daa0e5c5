//! Zero-configuration LAN: `p2p-node` started with no discovery option on hosts of one
//! LAN (network namespaces on a bridge, no internet) finds the LAN's discovery server
//! with mDNS, or serves it; two servers become one; when the serving node dies another
//! takes over; a host without multicast falls back and says so.
//!
//! Needs root for the namespaces (CI runs as root with `P2P_REQUIRE_NETNS=1`).

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use p2p_tests::{lan::LanLab, lan_env, p2p_node_bin, private_tempdir, run_with_deadline, Proc};
use serde_json::Value;

/// Bound on every wait for something the LAN should do by itself.
const T: Duration = Duration::from_secs(30);

/// `p2p-node --data-dir DIR` on host `i`, looking on the LAN.
fn node(lab: &LanLab, i: usize, dir: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns(i)])
        .arg(p2p_node_bin())
        .arg("--data-dir")
        .arg(dir);
    lan_env(&mut cmd);
    cmd
}

/// Runs a one-shot command to completion.
fn one_shot(lab: &LanLab, i: usize, dir: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = node(lab, i, dir);
    cmd.args(args);
    run_with_deadline(cmd, T)
}

/// The NodeId of the identity in `dir` (created by the call).
fn id_of(lab: &LanLab, i: usize, dir: &Path) -> String {
    let out = one_shot(lab, i, dir, &["id"]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `listen --json` on host `i`.
fn listen(lab: &LanLab, i: usize, dir: &Path) -> Proc {
    let mut cmd = node(lab, i, dir);
    cmd.args(["listen", "--json"]);
    Proc::spawn(cmd)
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or(Value::Null)
}

/// Waits for a discovery event saying `p` serves the LAN itself.
fn wait_serving(p: &mut Proc) -> Value {
    json(&p.expect_line(T, |l| {
        let v = json(l);
        v["event"] == "discovery" && v["source"] == "serving" && v["serving"]["advertised"] == true
    }))
}

/// Waits for a discovery event saying `p` uses the server of `server`, found with mDNS.
fn wait_using(p: &mut Proc, server: &str) -> Value {
    json(&p.expect_line(T, |l| {
        let v = json(l);
        v["event"] == "discovery" && v["source"] == "mdns" && v["server"] == server
    }))
}

/// Polls `peers --json` on host `i` until every id of `want` is listed.
fn wait_listed(lab: &LanLab, i: usize, dir: &Path, want: &[&str]) -> String {
    let end = Instant::now() + T;
    loop {
        let out = one_shot(lab, i, dir, &["peers", "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let listed: Vec<String> = stdout
            .lines()
            .map(|l| json(l)["node_id"].as_str().unwrap_or("").to_owned())
            .collect();
        if out.status.success() && want.iter().all(|w| listed.iter().any(|l| l == w)) {
            return String::from_utf8_lossy(&out.stderr).into_owned();
        }
        assert!(
            Instant::now() < end,
            "not all of {want:?} listed within {T:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The server the chat's last word on discovery names: its own (index `me`) when it
/// serves, else the fingerprint after "server".
fn last_server(p: &Proc, me: usize, fps: &[&str]) -> Option<usize> {
    let line = p.seen.iter().rev().find(|l| {
        l.contains("serving discovery for the LAN") || l.contains("using LAN discovery at")
    })?;
    if line.contains("serving discovery for the LAN") {
        return Some(me);
    }
    let fp = line.split("server ").nth(1)?.split(')').next()?;
    fps.iter().position(|f| *f == fp)
}

/// Waits until every chat's last word on discovery names the same server; returns it.
fn wait_one_server(chats: &mut [Proc], fps: &[&str]) -> usize {
    let end = Instant::now() + T;
    loop {
        for chat in chats.iter_mut() {
            chat.drain();
        }
        let said: Vec<Option<usize>> = chats
            .iter()
            .enumerate()
            .map(|(i, c)| last_server(c, i, fps))
            .collect();
        if let Some(Some(first)) = said.first() {
            if said.iter().all(|s| *s == Some(*first)) {
                return *first;
            }
        }
        assert!(
            Instant::now() < end,
            "no single server within {T:?}: {said:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the chat `p` said each of `fps` is online (in its online list or as a
/// notice), counting what it said already.
fn wait_online(p: &mut Proc, fps: &[&str]) {
    let says_online = |l: &str, fp: &str| {
        l.contains(fp) && (l.contains("is online") || l.trim_start().starts_with('-'))
    };
    let mut left: Vec<&str> = fps
        .iter()
        .copied()
        .filter(|fp| !p.seen.iter().any(|l| says_online(l, fp)))
        .collect();
    while !left.is_empty() {
        let line = p.expect_line(T, |l| left.iter().any(|fp| says_online(l, fp)));
        left.retain(|fp| !says_online(&line, fp));
    }
}

/// Of two hosts with their ids: (the one that keeps serving, the other), by lowest id.
fn by_id(a: (usize, String), b: (usize, String)) -> ((usize, String), (usize, String)) {
    let a_key = a.1.parse::<p2p_crypto::NodeId>().expect("id");
    let b_key = b.1.parse::<p2p_crypto::NodeId>().expect("id");
    if a_key < b_key {
        (a, b)
    } else {
        (b, a)
    }
}

/// The line-by-line chat on host `i`.
fn chat(lab: &LanLab, i: usize, dir: &Path) -> Proc {
    let mut cmd = node(lab, i, dir);
    cmd.arg("--plain");
    Proc::spawn(cmd)
}

#[test]
fn three_nodes_started_together_on_a_lan_find_each_other_with_no_url() {
    let Some(lab) = LanLab::build(3) else { return };
    let dirs = [private_tempdir(), private_tempdir(), private_tempdir()];
    let ids: Vec<String> = (0..3).map(|i| id_of(&lab, i, dirs[i].path())).collect();
    let fps: Vec<&str> = ids.iter().map(|id| &id[..10]).collect();
    // All three at the same moment: each looks, finds nothing, and may serve.
    let mut chats: Vec<Proc> = (0..3).map(|i| chat(&lab, i, dirs[i].path())).collect();

    // One LAN world: one of them serves (with URLs others can use, never 0.0.0.0), the
    // others use it and name its fingerprint.
    let server = wait_one_server(&mut chats, &fps);
    let served = chats[server]
        .seen
        .iter()
        .rev()
        .find(|l| l.contains("serving discovery for the LAN"))
        .cloned()
        .expect("the server said so");
    assert!(
        served.contains(&format!("--discovery http://{}:7117", LanLab::ip(server))),
        "{served}"
    );
    assert!(!served.contains("--discovery http://0.0.0.0"), "{served}");
    let expected = format!(
        "using LAN discovery at http://{}:7117 (found via mDNS; server {})",
        LanLab::ip(server),
        fps[server]
    );
    // Each sees the other two online.
    for (i, chat) in chats.iter_mut().enumerate() {
        let others: Vec<&str> = (0..3).filter(|&j| j != i).map(|j| fps[j]).collect();
        wait_online(chat, &others);
    }
    // `peers --json` from a one-shot command lists all three.
    let other = private_tempdir();
    let stderr = wait_listed(&lab, 2, other.path(), &[&ids[0], &ids[1], &ids[2]]);
    assert!(stderr.contains(&expected), "{stderr}");

    // Each writes to the next; each reads what the previous one wrote.
    for (i, chat) in chats.iter_mut().enumerate() {
        let next = (i + 1) % 3;
        chat.send_line(&format!("/chat {}", ids[next]));
        chat.send_line(&format!("hello from host {i}"));
        chat.expect_line(T, |l| {
            l.contains(&format!("hello from host {i}")) && l.contains("(delivered")
        });
    }
    for (i, chat) in chats.iter_mut().enumerate() {
        let prev = (i + 2) % 3;
        chat.send_line(&format!("/chat {}", ids[prev]));
        chat.expect_line(T, |l| l.contains(&format!("hello from host {prev}")));
    }
    for chat in &mut chats {
        chat.send_line("/quit");
        assert!(chat.wait(T).success());
    }
}

#[test]
fn when_the_serving_node_dies_another_takes_over_and_queued_mail_arrives() {
    let Some(lab) = LanLab::build(4) else { return };
    let dirs = [
        private_tempdir(),
        private_tempdir(),
        private_tempdir(),
        private_tempdir(),
    ];
    let ids: Vec<String> = (0..4).map(|i| id_of(&lab, i, dirs[i].path())).collect();
    let mut procs = [
        Some(listen(&lab, 0, dirs[0].path())),
        Some(listen(&lab, 1, dirs[1].path())),
    ];
    let ((s, s_id), (o, o_id)) = by_id((0, ids[0].clone()), (1, ids[1].clone()));
    wait_serving(procs[s].as_mut().expect("running"));
    wait_using(procs[o].as_mut().expect("running"), &s_id);

    // Host 2 chats (line mode, a long-running node too); host 3 is offline for now.
    let mut chat = {
        let mut cmd = node(&lab, 2, dirs[2].path());
        cmd.arg("--plain");
        Proc::spawn(cmd)
    };
    chat.expect_line(T, |l| {
        l.contains("using LAN discovery") && l.contains(&s_id[..10])
    });
    chat.expect_line(T, |l| l.starts_with("logged in as"));

    // The serving node dies without a word.
    let killed = Command::new("kill")
        .args([
            "-KILL",
            &procs[s].as_ref().expect("running").pid().to_string(),
        ])
        .status()
        .expect("kill");
    assert!(killed.success());
    let _dead = procs[s].take();
    let died = Instant::now();

    // A message for the offline host, written while the LAN has no server.
    chat.send_line(&format!("/chat {}", ids[3]));
    chat.expect_line(T, |l| l.starts_with("--- chat with"));
    chat.send_line("written during the hand-over");
    chat.expect_line(T, |l| {
        l.contains("written during the hand-over") && l.contains("queued")
    });

    // One of the two left serves and the other moves to it: whichever looked first and
    // found nothing (a serving node gives way only to a lower NodeId that also serves).
    let o_proc = procs[o].as_mut().expect("running");
    let settled = json(&o_proc.expect_line(T, |l| {
        let v = json(l);
        v["event"] == "discovery"
            && (v["source"] == "serving" || (v["source"] == "mdns" && v["server"] == ids[2]))
    }));
    let next_id = if settled["source"] == "serving" {
        chat.expect_line(T, |l| {
            l.contains("using LAN discovery") && l.contains(&o_id[..10])
        });
        o_id.clone()
    } else {
        chat.expect_line(T, |l| l.contains("serving discovery for the LAN"));
        ids[2].clone()
    };
    let took_over = died.elapsed();

    // The offline host comes online: the queued message arrives, once.
    let mut late = listen(&lab, 3, dirs[3].path());
    wait_using(&mut late, &next_id);
    late.expect_line(T, |l| {
        let v = json(l);
        v["event"] == "message" && v["text"] == "written during the hand-over"
    });
    chat.expect_line(T, |l| l.contains("delivered"));
    assert!(late.terminate(T).success());
    let out = one_shot(&lab, 3, dirs[3].path(), &["history", &ids[2], "--json"]);
    let copies = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| json(l)["text"] == "written during the hand-over")
        .count();
    assert_eq!(copies, 1, "{out:?}");
    eprintln!("the LAN had a server again {took_over:?} after its server died");
    chat.close_stdin();
    assert!(chat.wait(T).success());
    if let Some(p) = procs[o].as_mut() {
        assert!(p.terminate(T).success());
    }
}

#[test]
fn two_lan_worlds_merge_into_one_and_keep_their_names() {
    let Some(lab) = LanLab::build(2) else { return };
    let dirs = [private_tempdir(), private_tempdir()];
    let named = [private_tempdir(), private_tempdir()];
    let ids: Vec<String> = (0..2).map(|i| id_of(&lab, i, dirs[i].path())).collect();
    // Two hosts apart (a pulled cable): each serves its own world.
    lab.set_connected(1, false);
    let mut procs = [
        listen(&lab, 0, dirs[0].path()),
        listen(&lab, 1, dirs[1].path()),
    ];
    wait_serving(&mut procs[0]);
    wait_serving(&mut procs[1]);
    let ((w, w_id), (l, _)) = by_id((0, ids[0].clone()), (1, ids[1].clone()));
    // A name claimed on the server that is going to give way.
    let out = one_shot(&lab, l, named[l].path(), &["register", "carol"]);
    assert!(out.status.success(), "{out:?}");
    let carol = id_of(&lab, l, named[l].path());

    // The cable is back: the higher NodeId gives way and hands its names over.
    lab.set_connected(1, true);
    wait_using(&mut procs[l], &w_id);
    let end = Instant::now() + T;
    loop {
        let out = one_shot(&lab, w, named[w].path(), &["send", "carol", "hi carol"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < end,
            "carol is not known on the merged LAN: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The message went to carol's key: the name was handed over, not re-claimed.
    let out = one_shot(&lab, w, named[w].path(), &["history", "carol", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hi carol"), "{out:?}");
    assert!(stdout.contains(&carol), "{out:?}");
    for p in &mut procs {
        assert!(p.terminate(T).success());
    }
}

#[test]
fn a_host_without_multicast_falls_back_and_says_so() {
    let Some(lab) = LanLab::build(1) else { return };
    lab.set_multicast(0, false);
    let dir = private_tempdir();
    let mut cmd = node(&lab, 0, dir.path());
    cmd.arg("listen");
    let mut p = Proc::spawn(cmd);
    let line = p.expect_line(T, |l| l.starts_with("serving discovery on"));
    assert!(
        line.contains(&format!(
            "p2p-node --discovery http://{}:7117",
            LanLab::ip(0)
        )),
        "{line}"
    );
    let end = Instant::now() + T;
    while !p.stderr().contains("multicast") {
        assert!(Instant::now() < end, "no word of multicast: {}", p.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    // A one-shot command on the same host uses that server, and says why.
    let other = private_tempdir();
    let out = one_shot(&lab, 0, other.path(), &["peers"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(stderr.contains("cannot look on the LAN"), "{stderr}");
    assert!(
        stderr.contains("using the discovery server on this machine at http://127.0.0.1:7117"),
        "{stderr}"
    );
    assert!(p.terminate(T).success());
}

#[test]
fn a_one_shot_command_with_no_server_anywhere_says_how_to_proceed() {
    let Some(lab) = LanLab::build(1) else { return };
    let dir = private_tempdir();
    let started = Instant::now();
    let out = one_shot(&lab, 0, dir.path(), &["peers"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("no discovery server found"), "{stderr}");
    assert!(stderr.contains("--discovery URL"), "{stderr}");
    // Bounded: the look on the LAN, then the node's own start and stop.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}
