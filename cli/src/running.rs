//! Running a node for a command: starting it (identity, the discovery to use), waiting
//! for the login, saying which discovery it uses, and the one set of signals every
//! long-running command stops on.

use anyhow::{Context, Result};
use p2p_node::Node;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{
    control::{self, Kind},
    discovery::{self, Choice, Need},
    identity::{self, Paths},
    Global,
};

/// Loads the identity and starts a node for this data directory, with the discovery
/// the command needs (see [`discovery::choose`]); long-running commands announce.
pub async fn open_node(g: &Global, paths: &Paths, need: Need) -> Result<Node> {
    let announce = need == Need::Serve;
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
    builder = match discovery::choose(g, need).await {
        Choice::Url(url) => builder.discovery_url(url),
        Choice::Embedded(addr) => builder.embedded_discovery(addr),
        Choice::Lan(config) => builder.lan_discovery(config),
        Choice::None => builder,
    };
    Ok(builder.bind().await?)
}

/// Tells the user which discovery server is in use (or served), if any.
pub fn print_discovery(node: &Node) {
    if let Some(status) = node.discovery_status() {
        println!("{}", discovery::status_text(&status.borrow()));
    }
}

/// Serves the control socket for a running node; logs (and goes on without) when it
/// cannot.
pub fn serve_control(
    node: &Node,
    paths: &Paths,
    kind: Kind,
    stop: &CancellationToken,
) -> Option<control::Server> {
    let handler = crate::ops::handler(node.clone(), paths.clone(), kind, stop.clone());
    match control::serve(&paths.data_dir, handler) {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::warn!(
                error = %crate::output::one_line(&e),
                "other commands cannot reach this node"
            );
            None
        }
    }
}

/// How long `listen` and the chat wait for the first announcement before going on.
pub const LOGIN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for the login (announced, and linked to the server's relay when it runs one);
/// tells the user when either is late.
pub async fn warn_if_not_announced(node: &Node) {
    if !node.wait_announced(LOGIN_WAIT).await {
        eprintln!(
            "p2p-node: warning: not logged in on discovery {} yet; retrying in the background",
            node.discovery_url().unwrap_or_else(|| "none".into())
        );
        return;
    }
    let home = node.home_relay();
    if let (Some(relay), false) = (home.relay, home.connected) {
        eprintln!(
            "p2p-node: warning: the discovery server's relay (UDP {}) does not answer yet; \
             peers that cannot reach this node directly use the mailbox until it does",
            relay.addr
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
