//! Helpers shared by the node integration tests: an in-process discovery server on
//! loopback, users with data directories that outlive restarts, event waits with
//! deadlines, and bare endpoints that write whatever frames they like.

#![allow(dead_code)]

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{
    relay::{Relay, RelayConfig, RelayMetrics},
    AppState, MemoryStore, ServerConfig, Store, SystemClock,
};
use p2p_node::{
    wire::{self, Frame, MessageId},
    Endpoint, Node, NodeBuilder, NodeEvent, Timings,
};
use tempfile::TempDir;
use tokio::sync::{broadcast, oneshot};

pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A discovery server on 127.0.0.1:0, in this process, optionally with its relay.
pub struct Discovery {
    pub url: String,
    /// The HTTP address.
    pub addr: SocketAddr,
    /// The relay's UDP address, when one runs.
    pub relay_addr: Option<SocketAddr>,
    /// The relay's counters, when one runs.
    pub relay_metrics: Option<Arc<RelayMetrics>>,
    relay_key: Option<SecretKey>,
    state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Discovery {
    /// A server without a relay.
    pub async fn start() -> Result<Discovery> {
        Self::start_at(loopback(), None).await
    }

    /// A server with a relay on the same port number (UDP), like `p2p-node discovery`.
    pub async fn start_with_relay() -> Result<Discovery> {
        Self::start_at(loopback(), Some(SecretKey::generate())).await
    }

    /// A server that names a relay running elsewhere (a test's own) as its relay.
    pub async fn start_advertising(relay: NodeId, relay_port: u16) -> Result<Discovery> {
        let d = Self::start_at(loopback(), None).await?;
        d.state
            .advertise_relay(relay, relay_port, Arc::new(RelayMetrics::default()));
        Ok(d)
    }

    /// A server with its own relay (its own key) on `store`: several of them on one
    /// PostgreSQL database are instances of one discovery service.
    pub async fn start_with_relay_on(store: Arc<dyn Store>) -> Result<Discovery> {
        Self::start_on(loopback(), Some(SecretKey::generate()), store).await
    }

    async fn start_at(http: SocketAddr, relay_key: Option<SecretKey>) -> Result<Discovery> {
        Self::start_on(http, relay_key, Arc::new(MemoryStore::new())).await
    }

    /// A server without a relay, with `config` (its per-IP write rate limit lifted).
    pub async fn start_with_config(config: ServerConfig) -> Result<Discovery> {
        Self::start_configured(loopback(), None, Arc::new(MemoryStore::new()), config).await
    }

    async fn start_on(
        http: SocketAddr,
        relay_key: Option<SecretKey>,
        store: Arc<dyn Store>,
    ) -> Result<Discovery> {
        Self::start_configured(http, relay_key, store, ServerConfig::default()).await
    }

    async fn start_configured(
        http: SocketAddr,
        relay_key: Option<SecretKey>,
        store: Arc<dyn Store>,
        config: ServerConfig,
    ) -> Result<Discovery> {
        init_tracing();
        // Every test node shares 127.0.0.1: lift the per-IP write rate limit.
        let config = ServerConfig {
            write_rate_per_sec: 100_000.0,
            write_burst: 100_000,
            ..config
        };
        let state = AppState::new(config, store, Arc::new(SystemClock));
        let served = state.clone();
        let listener = tokio::net::TcpListener::bind(http).await?;
        let addr = listener.local_addr()?;
        let relay = match &relay_key {
            Some(key) => {
                let relay = Relay::bind(addr, key, RelayConfig::default())?;
                state.set_relay(&relay)?;
                Some(relay)
            }
            None => None,
        };
        let relay_addr = relay.as_ref().map(|r| r.local_addr()).transpose()?;
        let relay_metrics = relay.as_ref().map(|r| r.metrics());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let (relay_stop, relay_stopped) = oneshot::channel::<()>();
            let http = async move {
                let _ = p2p_discovery::serve(listener, served, async {
                    let _ = stopped.await;
                })
                .await;
                let _ = relay_stop.send(());
            };
            let relay = async move {
                if let Some(relay) = relay {
                    relay
                        .serve(async {
                            let _ = relay_stopped.await;
                        })
                        .await;
                }
            };
            tokio::join!(http, relay);
        });
        Ok(Discovery {
            url: format!("http://{addr}"),
            addr,
            relay_addr,
            relay_metrics,
            relay_key,
            state,
            stop: Some(stop),
            task,
        })
    }

    pub fn client(&self) -> Result<p2p_discovery::Client> {
        Ok(p2p_discovery::Client::new(&self.url)?)
    }

    /// Packets the relay forwarded so far.
    pub fn relayed_packets(&self) -> u64 {
        self.relay_metrics
            .as_ref()
            .map_or(0, |m| m.forwarded_packets())
    }

    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// Stops the server (its in-memory state is lost, as in a crash); see
    /// [`Discovery::start_again`].
    pub async fn halt(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(DEADLINE, &mut self.task).await;
    }

    /// Starts a new server on the ports of this (halted) one, with the same relay key.
    pub async fn start_again(&self) -> Result<Discovery> {
        Self::start_at(self.addr, self.relay_key.clone()).await
    }
}

pub fn fast() -> Timings {
    Timings {
        presence_poll: Duration::from_millis(100),
        mailbox_poll: Duration::from_millis(300),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        // Only reached when something is wrong; generous so a loaded machine is not.
        dial_timeout: Duration::from_secs(5),
        quick_dial: Duration::from_secs(1),
        ack_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(10),
        announce_ttl: Duration::from_secs(30),
    }
}

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A user: an identity and a data directory that outlive node restarts.
pub struct User {
    pub sk: SecretKey,
    pub dir: TempDir,
}

impl User {
    pub fn new() -> Result<User> {
        Ok(User {
            sk: SecretKey::generate(),
            dir: tempfile::tempdir()?,
        })
    }

    pub fn id(&self) -> NodeId {
        self.sk.public()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("node")
    }

    pub fn builder(&self, url: &str) -> NodeBuilder {
        Node::builder(self.sk.clone())
            .data_dir(self.data_dir())
            .discovery_url(url)
            .listen(loopback())
            .timings(fast())
    }

    pub async fn start(&self, url: &str) -> Result<Node> {
        Ok(self.builder(url).bind().await?)
    }
}

/// The next event matching `pred`, within [`DEADLINE`].
pub async fn next_event(
    rx: &mut broadcast::Receiver<NodeEvent>,
    what: &str,
    pred: impl Fn(&NodeEvent) -> bool,
) -> Result<NodeEvent> {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return Ok(ev),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => bail!("event channel closed"),
            }
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .with_context(|| format!("no {what} within {DEADLINE:?}"))?
}

/// Events already queued on `rx`, without waiting.
pub fn queued_events(rx: &mut broadcast::Receiver<NodeEvent>) -> Vec<NodeEvent> {
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(ev) => out.push(ev),
            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return out,
        }
    }
}

/// Polls `check` until it returns true, within [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn is_received(ev: &NodeEvent) -> bool {
    matches!(ev, NodeEvent::MessageReceived { .. })
}

pub fn is_delivered(id: MessageId) -> impl Fn(&NodeEvent) -> bool {
    move |ev| matches!(ev, NodeEvent::MessageDelivered { id: got, .. } if *got == id)
}

/// A bare endpoint that writes whatever frames it likes.
pub async fn raw_endpoint(sk: &SecretKey) -> Result<Endpoint> {
    Ok(Endpoint::builder(sk.clone())
        .bind_addr(loopback())
        .bind()
        .await?)
}

/// Sends one frame on a new stream and reads the answer.
pub async fn raw_exchange(conn: &p2p_node::Connection, frame: &Frame) -> Result<Option<Frame>> {
    let (mut send, mut recv) = conn.quic().open_bi().await?;
    wire::write_frame(&mut send, frame).await?;
    send.finish()?;
    let mut buf = Vec::new();
    Ok(tokio::time::timeout(DEADLINE, wire::read_frame(&mut recv, &mut buf)).await??)
}

pub fn text(m: &p2p_node::store::StoredMessage) -> &str {
    m.body.as_text().unwrap_or("")
}

/// Binds `builder`'s node on a runtime of its own and runs `work` with it there; when
/// `work` gives the node back, stops that runtime under it: the node ends as a killed
/// process does, closing nothing and saying no goodbye to its peers. Returns the address
/// it was bound to. Give the builder a data directory of its own: the dead node's
/// database is let go only as its writer thread ends.
pub async fn run_then_die<W, Fut>(builder: NodeBuilder, work: W) -> Result<SocketAddr>
where
    W: FnOnce(Node) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Node>>,
{
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let ran = (|| -> Result<(Node, tokio::runtime::Runtime)> {
            let rt = tokio::runtime::Runtime::new()?;
            let node = rt.block_on(builder.bind())?;
            let node = rt.block_on(work(node))?;
            Ok((node, rt))
        })();
        let died = ran.and_then(|(node, rt)| {
            let addr = node.local_addr()?;
            // Its tasks and connection drivers go first, then the node.
            rt.shutdown_background();
            drop(node);
            Ok(addr)
        });
        let _ = tx.send(died);
    });
    rx.await.context("the dying node's thread")?
}

/// Transport settings under which a connection whose peer died is found gone within
/// about two seconds.
pub fn notices_loss_soon() -> p2p_node::TransportSettings {
    p2p_node::TransportSettings {
        idle_timeout: Duration::from_secs(2),
        keep_alive: Duration::from_millis(200),
        ..p2p_node::TransportSettings::default()
    }
}
