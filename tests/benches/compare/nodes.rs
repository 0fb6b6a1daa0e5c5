//! Nodes on loopback for the benchmark: an in-process discovery server and nodes with
//! data directories on the local disk.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{AppState, ServerConfig};
use p2p_node::{Node, NodeBuilder, NodeEvent, SendStatus};
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
        let state = AppState::open(ServerConfig {
            write_rate_per_sec: 1e9,
            write_burst: u32::MAX,
            ..ServerConfig::default()
        })?;
        let listener = tokio::net::TcpListener::bind(loopback()).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(p2p_discovery::serve(listener, state, async move {
            let _ = stopped.await;
        }));
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
}

pub fn builder(opts: Opts<'_>, dir: &tempfile::TempDir) -> NodeBuilder {
    let mut b = Node::builder(SecretKey::generate())
        .data_dir(dir.path().to_owned())
        .listen(loopback())
        .in_memory_store(opts.in_memory);
    if let Some(url) = opts.discovery {
        b = b.discovery_url(url);
    }
    if let Some(max) = opts.max_connections {
        b = b.max_connections(max);
    }
    b
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
        self.node.shutdown().await?;
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
