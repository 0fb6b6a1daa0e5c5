//! Nodes on loopback for the benchmark: an in-process discovery server and nodes with
//! data directories on the local disk.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{
    relay::{Relay, RelayConfig},
    AppState, ServerConfig,
};
use p2p_node::{Node, NodeBuilder, NodeEvent, PathConfig, SendStatus};
use tokio::sync::{broadcast, oneshot};

use crate::raw::loopback;

/// A discovery server on 127.0.0.1:0 on the bench's runtime, with the per-IP write rate
/// limit lifted (every node here shares one IP).
#[derive(Debug)]
pub struct Discovery {
    pub url: String,
    _stop: oneshot::Sender<()>,
}

impl Discovery {
    pub async fn start() -> Result<Discovery> {
        Self::start_with(false, ServerConfig::default()).await
    }

    /// With a relay beside it (its rate limits lifted: one machine drives it).
    pub async fn start_with_relay() -> Result<Discovery> {
        Self::start_with(true, ServerConfig::default()).await
    }

    /// One that keeps no mailbox (every deposit refused): a queued message reaches its
    /// recipient only from its sender's outbox.
    pub async fn start_without_mailbox() -> Result<Discovery> {
        let config = ServerConfig {
            max_mailbox_count: 0,
            ..ServerConfig::default()
        };
        Self::start_with(false, config).await
    }

    async fn start_with(relay: bool, config: ServerConfig) -> Result<Discovery> {
        let state = AppState::open(ServerConfig {
            write_rate_per_sec: 1e9,
            write_burst: u32::MAX,
            ..config
        })?;
        let listener = tokio::net::TcpListener::bind(loopback()).await?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let (stop, stopped) = oneshot::channel::<()>();
        let relay = if relay {
            let config = RelayConfig {
                bytes_per_sec: u64::MAX / 4,
                packets_per_sec: u64::MAX / 4,
                ..RelayConfig::default()
            };
            let relay = Relay::bind(addr, &SecretKey::generate(), config)?;
            state.set_relay(&relay)?;
            Some(relay)
        } else {
            None
        };
        tokio::spawn(async move {
            let (relay_stop, relay_stopped) = oneshot::channel::<()>();
            let http = async move {
                let _ = p2p_discovery::serve(listener, state, async move {
                    let _ = stopped.await;
                })
                .await;
                let _ = relay_stop.send(());
            };
            let relay = async move {
                if let Some(r) = relay {
                    r.serve(async move {
                        let _ = relay_stopped.await;
                    })
                    .await;
                }
            };
            tokio::join!(http, relay);
        });
        Ok(Discovery { url, _stop: stop })
    }
}

/// A node and its data directory (removed when dropped).
#[derive(Debug)]
pub struct BenchNode {
    pub node: Node,
    pub id: NodeId,
    /// The node id, as `Node::send_to` takes it.
    pub to: NodeId,
    _dir: tempfile::TempDir,
}

/// Settings of a bench node.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opts<'a> {
    pub discovery: Option<&'a str>,
    pub in_memory: bool,
    pub max_connections: Option<usize>,
    /// Everything through the relay (no direct paths).
    pub relay_only: bool,
    /// Publish no direct address: peers reach the node through its relay until a
    /// direct path is punched.
    pub hide_addrs: bool,
}

pub fn builder(opts: Opts<'_>, dir: &tempfile::TempDir) -> NodeBuilder {
    keyed_builder(SecretKey::generate(), opts, dir)
}

/// [`builder`] for the node of `key`.
pub fn keyed_builder(key: SecretKey, opts: Opts<'_>, dir: &tempfile::TempDir) -> NodeBuilder {
    let mut b = Node::builder(key)
        .data_dir(dir.path().to_owned())
        .listen(loopback())
        .in_memory_store(opts.in_memory);
    if let Some(url) = opts.discovery {
        b = b.discovery_url(url);
    }
    if let Some(max) = opts.max_connections {
        b = b.max_connections(max);
    }
    if opts.relay_only {
        b = b.paths(PathConfig {
            direct: false,
            ..PathConfig::default()
        });
    }
    b.publish_direct_addrs(!opts.hide_addrs)
}

impl BenchNode {
    pub async fn start(opts: Opts<'_>) -> Result<BenchNode> {
        let dir = p2p_tests::private_tempdir();
        let node = builder(opts, &dir).bind().await?;
        let id = node.node_id();
        Ok(BenchNode {
            node,
            id,
            to: id,
            _dir: dir,
        })
    }

    pub async fn stop(self) -> Result<()> {
        self.node.shutdown().await;
        Ok(())
    }
}

/// Sends `text` from `from` to `to` and requires `Delivered`.
pub async fn send_delivered(from: &Node, to: &NodeId, text: &str) -> Result<()> {
    let out = from.send_to(to, text).await?;
    ensure!(
        out.status == SendStatus::Delivered,
        "message queued instead of delivered"
    );
    Ok(())
}

/// Waits (at most `timeout`) for an event matching `want`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<NodeEvent>,
    timeout: Duration,
    want: impl Fn(&NodeEvent) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Err(_) => bail!("event not seen within {timeout:?}"),
            Ok(Ok(ev)) if want(&ev) => return Ok(()),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => bail!("event channel closed"),
        }
    }
}
