//! Users of the real binary: each a data directory and the discovery server they use.

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;

use crate::{p2p_node, run_with_deadline, Proc};

/// How long one step of a test of the binary may take.
pub const T: Duration = Duration::from_secs(30);

/// A user: a data directory and the discovery URL they use.
#[derive(Debug)]
pub struct User {
    /// The data directory.
    pub dir: tempfile::TempDir,
    /// The discovery server's URL.
    pub discovery: String,
}

impl User {
    /// A user with a fresh data directory.
    pub fn new(discovery: &str) -> User {
        User {
            dir: crate::private_tempdir(),
            discovery: discovery.to_string(),
        }
    }

    /// The options every command of this user takes.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--data-dir".into(),
            self.dir.path().into(),
            "--discovery".into(),
            self.discovery.clone().into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ]
    }

    /// `p2p-node` with this user's options.
    pub fn cmd(&self) -> Command {
        let mut cmd = p2p_node();
        cmd.args(self.args());
        cmd
    }

    /// Runs a command to completion.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = self.cmd();
        cmd.args(args);
        run_with_deadline(cmd, T)
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "p2p-node {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// This user's NodeId.
    pub fn id(&self) -> String {
        self.ok(&["id"]).trim().to_string()
    }

    /// `listen --json`, once it is ready.
    pub fn listen_json(&self) -> Proc {
        let mut cmd = self.cmd();
        cmd.args(["listen", "--json"]);
        let mut p = Proc::spawn(cmd);
        p.expect_line(T, |l| l.contains(r#""event":"ready""#));
        p
    }
}

/// Starts `p2p-node discovery` on a free loopback port and returns it with its URL.
pub fn discovery_server(db: &Path) -> (Proc, String) {
    let mut cmd = p2p_node();
    cmd.arg("discovery")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--db")
        .arg(db);
    let mut p = Proc::spawn(cmd);
    let line = p.expect_line(T, |l| l.contains("http://"));
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("url in line")
        .to_string();
    (p, url)
}

/// One JSON object per line.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// Waits for `listen --json` to print the message with `text`.
pub fn message_event(p: &mut Proc, text: &str) -> Value {
    let line = p.expect_line(T, |l| {
        l.contains(r#""event":"message""#) && l.contains(text)
    });
    serde_json::from_str(&line).expect("json")
}
