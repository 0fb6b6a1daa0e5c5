//! The relay as `p2p-node discovery` runs it: on by default beside the HTTP server,
//! announced on `GET /v1/relay`, and off with `--no-relay`.

use p2p_tests::{p2p_node, private_tempdir, Proc, T};

/// Starts `p2p-node discovery` on loopback with `extra` options; returns it, its URL, the
/// relay line it printed, and its data directory (removed when dropped).
fn server(extra: &[&str]) -> (Proc, String, String, tempfile::TempDir) {
    let dir = private_tempdir();
    let mut cmd = p2p_node();
    cmd.args(["discovery", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.path().join("d.redb"))
        .args(extra);
    let mut p = Proc::spawn(cmd);
    let line = p.expect_line(T, |l| l.contains("http://"));
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("url")
        .to_owned();
    let relay = p.expect_line(T, |l| l.contains("relay"));
    (p, url, relay, dir)
}

fn get(url: &str) -> (u16, serde_json::Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let resp = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .get(url)
            .send()
            .await
            .expect("answer");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    })
}

#[test]
fn the_relay_runs_beside_the_server_on_its_port_number() {
    let (mut p, url, line, _dir) = server(&[]);
    let port = url.rsplit(':').next().expect("port");
    assert!(
        line.starts_with(&format!(
            "relay listening on udp 127.0.0.1:{port} (relay id "
        )),
        "{line}"
    );
    let id = line
        .split("relay id ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("id");
    let (status, body) = get(&format!("{url}/v1/relay"));
    assert_eq!(status, 200);
    assert_eq!(body["node_id"], id);
    assert_eq!(body["port"].to_string(), port);
    let (status, _) = get(&format!("{url}/metrics"));
    assert_eq!(status, 200);
    p.terminate(T);
}

#[test]
fn no_relay_turns_it_off() {
    let (mut p, url, line, _dir) = server(&["--no-relay"]);
    assert!(line.starts_with("no relay (--no-relay)"), "{line}");
    let (status, body) = get(&format!("{url}/v1/relay"));
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
    p.terminate(T);
}
