//! Running a node for a command: starting it (identity, the discovery to use), waiting
//! for the login, telling how others reach an embedded discovery server, and the one
//! set of signals every long-running command stops on.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use p2p_node::Node;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::{
    identity::{self, Paths},
    Global, DEFAULT_EMBEDDED_DISCOVERY,
};

/// Where discovery is for this run.
enum Discovery {
    Url(String),
    Embedded(SocketAddr),
}

/// `--discovery`, `--embedded-discovery`, or the default: serve discovery ourselves on
/// [`DEFAULT_EMBEDDED_DISCOVERY`], or use the server already on that port of this machine.
fn discovery_choice(g: &Global) -> Discovery {
    if let Some(url) = &g.discovery {
        return Discovery::Url(url.clone());
    }
    if let Some(addr) = g.embedded_discovery {
        return Discovery::Embedded(addr);
    }
    let default: SocketAddr = DEFAULT_EMBEDDED_DISCOVERY
        .parse()
        .expect("constant address parses");
    match std::net::TcpListener::bind(default) {
        Ok(probe) => {
            drop(probe);
            Discovery::Embedded(default)
        }
        Err(_) => Discovery::Url(format!("http://127.0.0.1:{}", default.port())),
    }
}

/// Loads the identity and starts a node for this data directory.
pub async fn open_node(g: &Global, paths: &Paths, announce: bool) -> Result<Node> {
    let pass = identity::passphrase(g.passphrase_file.as_deref())?;
    let (key, protected) = identity::load_or_create(paths, pass.as_ref().map(|p| p.as_slice()))?;
    let mut builder = Node::builder(key)
        .data_dir(paths.data_dir.clone())
        .encrypt_history(protected)
        .announce(announce)
        .relay(!g.no_relay);
    if let Some(listen) = g.listen {
        builder = builder.listen(listen);
    }
    if g.dht {
        builder = builder.dht(p2p_node::DhtConfig::default());
    }
    if let Some(name) = paths.registered_name()? {
        builder = builder.name(name);
    }
    builder = match discovery_choice(g) {
        Discovery::Url(url) => builder.discovery_url(url),
        Discovery::Embedded(addr) => builder.embedded_discovery(addr),
    };
    Ok(builder.bind().await?)
}

/// Tells the user how others reach the discovery server this node runs, if any.
pub fn print_embedded_hint(node: &Node) {
    if let Some(hint) = embedded_hint(node) {
        println!("{hint}");
    }
}

/// How others reach the discovery server this node runs, if it runs one.
pub fn embedded_hint(node: &Node) -> Option<String> {
    let addr = node.embedded_discovery_addr()?;
    let url = node.embedded_discovery_lan_url()?;
    let mut hint =
        format!("serving discovery on {addr}; others on the LAN use: p2p-node --discovery {url}");
    if let Some(relay) = node.embedded_relay_addr() {
        hint.push_str(&format!("\nserving the relay on udp {relay}"));
    }
    Some(hint)
}

/// How long `listen` and the chat wait for the first announcement before going on.
pub const LOGIN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for the login (the first announcement); tells the user when it is late.
pub async fn warn_if_not_announced(node: &Node) {
    if !node.wait_announced(LOGIN_WAIT).await {
        eprintln!(
            "p2p-node: warning: not logged in on discovery {} yet; retrying in the background",
            node.discovery_url().unwrap_or_else(|| "none".into())
        );
    }
}

/// The signals that stop `listen`, the chats and the discovery server: SIGINT (Ctrl-C),
/// SIGTERM and SIGHUP. Each then logs out and exits cleanly.
#[derive(Debug)]
pub struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl StopSignals {
    /// Starts watching the signals.
    pub fn new() -> Result<Self> {
        let watch = |kind: SignalKind| signal(kind).context("cannot watch the stop signals");
        Ok(Self {
            interrupt: watch(SignalKind::interrupt())?,
            terminate: watch(SignalKind::terminate())?,
            hangup: watch(SignalKind::hangup())?,
        })
    }

    /// Completes when one of the signals arrives.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
            _ = self.hangup.recv() => {}
        }
    }
}
