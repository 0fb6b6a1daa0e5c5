//! A one-shot `send` exits as soon as its answer is known, also under packet loss: the
//! time from the receiver storing the message to the sender's exit is bounded well
//! below QUIC's draining period (three probe timeouts, seconds under loss).
//!
//! Two hosts of a LAN in network namespaces, 20% of the UDP packets into the receiver
//! dropped. Needs root (CI runs as root with `P2P_REQUIRE_NETNS=1`).

use std::{
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use p2p_tests::{clean_env, lan::LanLab, message_event, p2p_node_bin, private_tempdir, Proc, T};

fn node(lab: &LanLab, i: usize, dir: &std::path::Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns(i)])
        .arg(p2p_node_bin())
        .arg("--data-dir")
        .arg(dir);
    clean_env(&mut cmd);
    cmd
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[test]
fn send_exits_soon_after_the_receiver_stored_the_message_under_loss() {
    let Some(lab) = LanLab::build(2) else { return };
    let (bob_dir, alice_dir) = (private_tempdir(), private_tempdir());
    let url = format!("http://{}:7117", LanLab::ip(0));
    let mut bob = {
        let mut cmd = node(&lab, 0, bob_dir.path());
        cmd.args(["--embedded-discovery", &format!("{}:7117", LanLab::ip(0))])
            .args(["listen", "--json"]);
        Proc::spawn(cmd)
    };
    bob.expect_line(T, |l| l.contains(r#""event":"ready""#));
    let bob_id = {
        let out = node(&lab, 0, bob_dir.path())
            .arg("id")
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    lab.drop_udp(0, 0.2);

    let mut gaps = Vec::new();
    for i in 0..8 {
        let text = format!("under loss {i}");
        let mut cmd = node(&lab, 1, alice_dir.path());
        cmd.args(["--discovery", &url, "send", &bob_id, &text, "--json"]);
        let out = p2p_tests::run_with_deadline(cmd, T);
        let exited = now_ms();
        assert!(out.status.success(), "{out:?}");
        let answer: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("one JSON object");
        let event = message_event(&mut bob, &text);
        if answer["status"] == "delivered" {
            let stored = event["received_at_ms"].as_u64().expect("stored at");
            gaps.push(Duration::from_millis(exited.saturating_sub(stored)));
        }
    }
    gaps.sort();
    eprintln!("from stored to the sender's exit: {gaps:?}");
    assert!(gaps.len() >= 4, "most sends are delivered: {gaps:?}");
    let median = gaps[gaps.len() / 2];
    assert!(median < Duration::from_millis(1000), "{gaps:?}");
    assert!(
        *gaps.last().expect("some") < Duration::from_millis(2500),
        "{gaps:?}"
    );
    assert!(bob.terminate(T).success());
}
