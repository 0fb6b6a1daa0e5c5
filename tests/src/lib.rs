//! Helpers for the integration tests in tests/: finding the real `p2p-node` binary,
//! running it with a deadline, users with their own data directories, a discovery server
//! process, and a pseudo-terminal with a terminal emulator to read the screen ([`pty`]).

pub mod pty;
mod users;

pub use users::{discovery_server, json_lines, message_event, User, T};

pub mod netns;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

/// A temporary directory with mode 0700, usable as a data directory (a node refuses one
/// that group or others may enter).
pub fn private_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .expect("temporary directory")
}

/// Path of the `p2p-node` binary built beside the running test.
///
/// `cargo test --workspace` builds it (the cli package has integration tests of its own).
/// When only this package is tested, build it first with `cargo build -p p2p-node-cli`.
pub fn p2p_node_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/p2p-node
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(format!("p2p-node{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not found: run `cargo test --workspace`, or `cargo build -p p2p-node-cli` first",
        bin.display()
    );
    bin
}

/// Environment variables that change what `p2p-node` does; the tests clear them.
pub const NODE_ENV: [&str; 8] = [
    "P2P_DHT",
    "P2P_DISCOVERY_STORE",
    "P2P_DATA_DIR",
    "P2P_DISCOVERY",
    "P2P_NO_MDNS",
    "P2P_PASSPHRASE",
    "P2P_PASSPHRASE_FILE",
    "RUST_LOG",
];

/// A `p2p-node` command with a fresh environment for the node settings.
pub fn p2p_node() -> Command {
    let mut cmd = Command::new(p2p_node_bin());
    clean_env(&mut cmd);
    cmd.stdin(Stdio::null());
    cmd
}

/// `p2p-node --data-dir DIR [args]` with `pass` as P2P_PASSPHRASE, and a discovery server
/// of its own on a free loopback port (kept in DIR/discovery.redb), so that nothing
/// outside the test is involved.
pub fn p2p_node_alone(dir: &Path, pass: Option<&str>, args: &[&str]) -> Command {
    let mut c = p2p_node();
    c.arg("--data-dir")
        .arg(dir)
        .args([
            "--embedded-discovery",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(args);
    if let Some(p) = pass {
        c.env("P2P_PASSPHRASE", p);
    }
    c
}

/// Removes the node settings the test's own environment may hold from `cmd`'s, and keeps
/// the node off the LAN: no mDNS on the test machine's own network (the LAN tests, in
/// namespaces of their own, use [`lan_env`]).
pub fn clean_env(cmd: &mut Command) {
    for var in NODE_ENV {
        cmd.env_remove(var);
    }
    cmd.env("P2P_NO_MDNS", "1");
}

/// Like [`clean_env`], but the node looks for (and advertises) discovery on the LAN.
pub fn lan_env(cmd: &mut Command) {
    clean_env(cmd);
    cmd.env_remove("P2P_NO_MDNS");
}

/// Runs `cmd` to completion, killing it if it outlives `deadline`.
pub fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn p2p-node");
    let start = Instant::now();
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if start.elapsed() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "p2p-node did not finish within {deadline:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A running `p2p-node` process whose stdout lines are read as they come.
#[derive(Debug)]
pub struct Proc {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    stdin: Option<std::process::ChildStdin>,
    /// Every stdout line seen so far.
    pub seen: Vec<String>,
}

impl Proc {
    /// Starts `cmd` with piped stdin, stdout and stderr.
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn p2p-node");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err_pipe = child.stderr.take().expect("stderr piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            let mut pipe = err_pipe;
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let stdin = child.stdin.take();
        Proc {
            child,
            lines,
            stderr,
            stdin,
            seen: Vec::new(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits up to `deadline` for a stdout line matching `pred` and returns it.
    pub fn expect_line(&mut self, deadline: Duration, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no matching line within {deadline:?}; stdout so far: {:#?}; stderr: {}",
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// Takes the stdout lines that arrived so far into `seen`, without waiting.
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// Writes one line to the process's stdin.
    pub fn send_line(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to stdin");
        stdin.flush().expect("flush stdin");
    }

    /// Closes stdin (end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Sends SIGTERM to this process (by its pid) and waits for it to exit.
    pub fn terminate(&mut self, deadline: Duration) -> std::process::ExitStatus {
        self.signal("TERM", deadline)
    }

    /// Sends SIGKILL to this process (by its pid): it ends at once, with no chance to
    /// clean up, as in a crash. Waits for it to exit.
    pub fn kill_9(&mut self, deadline: Duration) -> std::process::ExitStatus {
        self.signal("KILL", deadline)
    }

    fn signal(&mut self, name: &str, deadline: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status();
        self.wait(deadline)
    }

    /// Waits for the process to exit on its own, draining stdout into `seen`.
    pub fn wait(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Collect what is left of stdout.
                let drain_end = Instant::now() + Duration::from_secs(2);
                while let Ok(line) = self
                    .lines
                    .recv_timeout(drain_end.saturating_duration_since(Instant::now()))
                {
                    self.seen.push(line);
                }
                return status;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "process {} did not exit within {deadline:?}; stderr: {}",
                    self.pid(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub mod dht;
pub mod lan;
pub mod postgres;
