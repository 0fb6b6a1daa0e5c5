//! Helpers for the integration tests in tests/: finding the real `p2p-node` binary and
//! running it with a deadline.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

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

/// A `p2p-node` command with a fresh environment for the node settings.
pub fn p2p_node() -> Command {
    let mut cmd = Command::new(p2p_node_bin());
    for var in [
        "P2P_DATA_DIR",
        "P2P_DISCOVERY",
        "P2P_PASSPHRASE",
        "P2P_PASSPHRASE_FILE",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
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
