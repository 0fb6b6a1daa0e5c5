//! The LAN's discovery server: found with mDNS, or served (and advertised) by this node
//! when there is none, following the LAN as servers come and go.
//!
//! Every node of a LAN runs the same rule, so all of them end up on one server:
//!
//! - Look for servers for [`LanConfig::wait`]; use the one with the lowest NodeId that
//!   answers. With none, serve discovery here and advertise it.
//! - A server that sees a server with a lower NodeId stops serving: it says goodbye on
//!   mDNS, stops its HTTP server and relay, moves to the other server, and hands its
//!   names and mailboxes over there ([`p2p_discovery::handover`]). So two nodes started at
//!   the same moment end on one server.
//! - A node checks the server it uses every [`LanConfig::check_every`] (and at once when
//!   a request finds it unreachable); after [`DEAD_AFTER`] failed checks in a row, or an
//!   mDNS goodbye, it moves to the next server, or serves itself when none is left.
//!
//! After every move, the node announces itself, claims its name, asks for the relay and
//! drains its mailbox on the new server at once (it watches [`Discovery::status`]).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::future::BoxFuture;
use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{
    handover::{HandoverError, HandoverReport},
    Announcement, AppState, Client, MailboxBatch, PeerInfo, RelayRef,
};
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{
    embedded::{EmbeddedError, Server},
    mdns::{Advertisement, Browser, LanError, LanEvent, LanServer, Mdns},
    Discovery, DiscoveryContext, DiscoveryError, DiscoveryStartError, DiscoveryStatus,
    EmbeddedDiscovery, HttpDiscovery, IntoDiscovery, Source,
};

/// Failed checks in a row after which the server in use counts as gone.
pub const DEAD_AFTER: u32 = 2;

/// How long one health check of a server may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long to wait for more servers once one answered, when looking.
const SETTLE: Duration = Duration::from_millis(300);

/// How often an unfinished hand-over is tried again.
const HANDOVER_RETRY: Duration = Duration::from_secs(30);

/// How a node finds (or becomes) the LAN's discovery server.
#[derive(Debug, Clone)]
pub struct LanConfig {
    /// Where to serve when this node serves; another port when this one is taken.
    /// Default `0.0.0.0:7117`.
    pub listen: SocketAddr,
    /// How long to look for a server at start before serving. Default 1.5 s.
    pub wait: Duration,
    /// How often the server in use is checked. Default 2 s.
    pub check_every: Duration,
}

impl Default for LanConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7117)),
            wait: Duration::from_millis(1500),
            check_every: Duration::from_secs(2),
        }
    }
}

/// A LAN discovery server found and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundServer {
    /// What its advertisement says.
    pub server: LanServer,
    /// The URL that answered.
    pub url: String,
}

/// Looks for the LAN's discovery servers for up to `wait` and returns the one with the
/// lowest NodeId that answers, if any (for commands that do not serve).
pub async fn find_lan_server(wait: Duration) -> Result<Option<FoundServer>, LanError> {
    let mdns = Mdns::start()?;
    let servers = mdns.find(wait, SETTLE).await?;
    for server in servers {
        if let Some(url) = healthy_url(&server).await {
            return Ok(Some(FoundServer { server, url }));
        }
    }
    Ok(None)
}

/// The first of `server`'s URLs that answers a health check.
async fn healthy_url(server: &LanServer) -> Option<String> {
    for url in server.urls() {
        if check_url(&url).await {
            return Some(url);
        }
    }
    None
}

/// The LAN's discovery server, whichever it is at the moment; see the module docs.
#[derive(Debug)]
pub struct LanDiscovery {
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    current: Mutex<Option<Arc<HttpDiscovery>>>,
    status: watch::Sender<DiscoveryStatus>,
    /// A request found the server unreachable: check it now.
    nudge: Notify,
}

impl LanDiscovery {
    /// How a node is built with LAN discovery.
    pub fn config(config: LanConfig) -> LanDiscoveryConfig {
        LanDiscoveryConfig(config)
    }

    fn current(&self) -> Result<Arc<HttpDiscovery>, DiscoveryError> {
        self.shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(DiscoveryError::NoServer(
                "the LAN's discovery server left; finding the next one",
            ))
    }

    /// Runs `op` on the server in use; nudges the supervisor when it is unreachable.
    async fn on_current<'a, T, F>(&'a self, op: F) -> Result<T, DiscoveryError>
    where
        F: FnOnce(Arc<HttpDiscovery>) -> BoxFuture<'a, Result<T, DiscoveryError>>,
    {
        let http = self.current()?;
        let result = op(http).await;
        if let Err(e) = &result {
            if e.is_unreachable() {
                self.shared.nudge.notify_one();
            }
        }
        result
    }
}

/// LAN discovery as a node is built with it; see [`LanDiscovery::config`].
#[derive(Debug, Clone)]
pub struct LanDiscoveryConfig(LanConfig);

impl IntoDiscovery for LanDiscoveryConfig {
    fn into_discovery(
        self: Box<Self>,
        ctx: DiscoveryContext,
    ) -> BoxFuture<'static, Result<Arc<dyn Discovery>, DiscoveryStartError>> {
        Box::pin(start(self.0, ctx))
    }
}

async fn start(
    config: LanConfig,
    ctx: DiscoveryContext,
) -> Result<Arc<dyn Discovery>, DiscoveryStartError> {
    let mdns = match Mdns::start().and_then(|m| m.browse().map(|b| (m, b))) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(
                "{e}: no LAN discovery with mDNS; serving discovery here, and others on the LAN need --discovery URL"
            );
            return local_fallback(config.listen, ctx).await;
        }
    };
    tracing::info!(interfaces = ?mdns.0.interfaces(), "looking for the LAN's discovery server with mDNS");
    let shared = Arc::new(Shared {
        current: Mutex::new(None),
        status: watch::channel(DiscoveryStatus {
            generation: 0,
            url: None,
            server: None,
            source: Source::Mdns,
            serving: None,
        })
        .0,
        nudge: Notify::new(),
    });
    // Not tied to the node's tasks: the server keeps serving until the node has
    // withdrawn its presence, then `close` stops it.
    let stop = CancellationToken::new();
    let mut supervisor = Supervisor {
        mdns: mdns.0,
        browser: mdns.1,
        shared: shared.clone(),
        ctx,
        config,
        candidates: BTreeMap::new(),
        using: None,
        handover: None,
        stop: stop.clone(),
    };
    supervisor.look().await?;
    let task = tokio::spawn(supervisor.run());
    Ok(Arc::new(LanDiscovery {
        shared,
        stop,
        task: Mutex::new(Some(task)),
    }))
}

/// Without mDNS: serve discovery on `listen`, or use the server already on that port of
/// this machine.
async fn local_fallback(
    listen: SocketAddr,
    ctx: DiscoveryContext,
) -> Result<Arc<dyn Discovery>, DiscoveryStartError> {
    match Box::new(EmbeddedDiscovery::config(listen))
        .into_discovery(ctx.clone())
        .await
    {
        Err(DiscoveryStartError::Embedded(e)) if addr_in_use(&e) => {
            let url = format!("http://{}", super::embedded::loopback_for(listen));
            tracing::info!(
                url,
                "a discovery server already runs on this machine; using it"
            );
            Ok(Arc::new(HttpDiscovery::new(&url, ctx.timeout)?))
        }
        r => r,
    }
}

fn addr_in_use(e: &EmbeddedError) -> bool {
    e.reason
        .downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
}

/// A server seen on the LAN.
#[derive(Debug)]
struct Candidate {
    server: LanServer,
    /// The URL that last answered; `None` while it does not answer.
    url: Option<String>,
    /// Failed checks in a row.
    failures: u32,
}

/// What this node uses now.
#[derive(Debug)]
enum Using {
    /// Another node's server.
    Remote { id: NodeId },
    /// Its own server, advertised (unless advertising failed).
    Own {
        server: Server,
        advert: Option<Advertisement>,
    },
}

/// A hand-over of this node's store to the server it moved to, running or to retry.
#[derive(Debug)]
struct Handover {
    state: AppState,
    task: Option<JoinHandle<Result<HandoverReport, HandoverError>>>,
    retry_at: tokio::time::Instant,
}

struct Supervisor {
    mdns: Mdns,
    browser: Browser,
    shared: Arc<Shared>,
    ctx: DiscoveryContext,
    config: LanConfig,
    candidates: BTreeMap<NodeId, Candidate>,
    using: Option<Using>,
    handover: Option<Handover>,
    stop: CancellationToken,
}

impl Supervisor {
    fn own_id(&self) -> NodeId {
        self.ctx.secret.public()
    }

    /// The first look: servers found within [`LanConfig::wait`], then a choice.
    async fn look(&mut self) -> Result<(), DiscoveryStartError> {
        let start = tokio::time::Instant::now();
        let mut deadline = start + self.config.wait;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.browser.next()).await {
            let found = matches!(event, LanEvent::Found(_));
            self.seen(event);
            if found && !self.candidates.is_empty() {
                deadline = deadline.min(tokio::time::Instant::now() + SETTLE);
            }
        }
        self.choose().await
    }

    /// Takes in what the browser saw.
    fn seen(&mut self, event: LanEvent) {
        match event {
            LanEvent::Found(server) if server.node_id != self.own_id() => {
                tracing::debug!(%server, "LAN discovery server found");
                self.candidates.insert(
                    server.node_id,
                    Candidate {
                        server,
                        url: None,
                        failures: 0,
                    },
                );
            }
            LanEvent::Found(_) => {}
            LanEvent::Lost(id) => {
                if self.candidates.remove(&id).is_some() {
                    tracing::info!(server = %id.fingerprint(), "the LAN discovery server said goodbye");
                }
            }
        }
    }

    /// The lowest candidate that answers (checking those not known to answer).
    async fn best_remote(&mut self) -> Option<(NodeId, String)> {
        let ids: Vec<NodeId> = self.candidates.keys().copied().collect();
        for id in ids {
            let Some(c) = self.candidates.get_mut(&id) else {
                continue;
            };
            if c.url.is_none() && c.failures < DEAD_AFTER {
                match healthy_url(&c.server).await {
                    Some(url) => c.url = Some(url),
                    None => c.failures = DEAD_AFTER,
                }
            }
            if let (Some(url), true) = (&c.url, c.failures < DEAD_AFTER) {
                return Some((id, url.clone()));
            }
        }
        None
    }

    /// Applies the rule: the lowest server that answers; this node's own when it is the
    /// lowest; serve when there is none.
    async fn choose(&mut self) -> Result<(), DiscoveryStartError> {
        let own = self.own_id();
        let best = self.best_remote().await;
        match (&self.using, best) {
            (Some(Using::Own { .. }), Some((id, url))) if id < own => {
                self.yield_to(id, url).await;
            }
            (Some(Using::Own { .. }), _) => {}
            (Some(Using::Remote { id: current }), Some((id, url))) => {
                if *current != id {
                    self.switch(id, url);
                }
            }
            (None, Some((id, url))) => self.switch(id, url),
            (Some(Using::Remote { .. }) | None, None) => self.serve().await?,
        }
        Ok(())
    }

    /// Publishes a new server in use.
    fn publish(
        &self,
        http: Option<HttpDiscovery>,
        server: Option<NodeId>,
        source: Source,
        serving: Option<super::Serving>,
    ) {
        let url = http.as_ref().map(|h| h.url());
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = http.map(Arc::new);
        self.shared.status.send_modify(|s| {
            s.generation += 1;
            s.url = url;
            s.server = server;
            s.source = source;
            s.serving = serving;
        });
    }

    /// Moves to the server of `id` at `url`.
    fn switch(&mut self, id: NodeId, url: String) {
        match HttpDiscovery::new(&url, self.ctx.timeout) {
            Ok(http) => {
                tracing::info!(
                    url,
                    server = %id.fingerprint(),
                    "using LAN discovery at {url} (found via mDNS; server {})",
                    id.fingerprint()
                );
                self.using = Some(Using::Remote { id });
                self.publish(Some(http), Some(id), Source::Mdns, None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "LAN discovery server advertised an unusable URL");
                self.candidates.remove(&id);
            }
        }
    }

    /// Serves discovery here and advertises it.
    async fn serve(&mut self) -> Result<(), DiscoveryStartError> {
        // The store is ours again: what was not handed over is served from here.
        if let Some(h) = self.handover.take() {
            if let Some(task) = h.task {
                task.abort();
            }
        }
        let server =
            match Server::start(self.config.listen, &self.ctx.data_dir, self.ctx.relay).await {
                Err(e) if addr_in_use(&e) && self.config.listen.port() != 0 => {
                    tracing::info!(
                        port = self.config.listen.port(),
                        "the discovery port is taken on this machine; serving on another"
                    );
                    let any = SocketAddr::new(self.config.listen.ip(), 0);
                    Server::start(any, &self.ctx.data_dir, self.ctx.relay).await?
                }
                r => r?,
            };
        let advert = match self.mdns.advertise(
            &self.ctx.secret,
            server.addr.port(),
            p2p_discovery::now_ms(),
        ) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "cannot advertise the discovery server with mDNS");
                None
            }
        };
        let serving = server.serving(advert.is_some());
        let url = server.loopback_url();
        let http = HttpDiscovery::new(&url, self.ctx.timeout)?;
        tracing::info!(
            urls = ?serving.urls,
            "serving discovery for the LAN at {} (advertised with mDNS)",
            serving.urls.join(", ")
        );
        self.publish(
            Some(http),
            Some(self.own_id()),
            Source::Serving,
            Some(serving),
        );
        self.using = Some(Using::Own { server, advert });
        Ok(())
    }

    /// Stops serving for the server of `id` (lower than ours) and hands the store over.
    async fn yield_to(&mut self, id: NodeId, url: String) {
        let Some(Using::Own { server, advert }) = self.using.take() else {
            return;
        };
        tracing::info!(
            server = %id.fingerprint(),
            "another LAN discovery server ({}) takes over; moving there with this server's names and mailboxes",
            id.fingerprint()
        );
        if let Some(advert) = advert {
            advert.withdraw().await;
        }
        let state = server.state.clone();
        server.stop().await;
        self.switch(id, url.clone());
        self.start_handover(state, &url);
    }

    fn start_handover(&mut self, state: AppState, url: &str) {
        let task = match Client::new(url) {
            Ok(client) => {
                let s = state.clone();
                Some(tokio::spawn(async move { s.hand_over(&client).await }))
            }
            Err(_) => None,
        };
        self.handover = Some(Handover {
            state,
            task,
            retry_at: tokio::time::Instant::now() + HANDOVER_RETRY,
        });
    }

    /// Looks after a running hand-over: reports it when done, retries what it left.
    async fn check_handover(&mut self) {
        let Some(h) = &mut self.handover else { return };
        if let Some(task) = &h.task {
            if !task.is_finished() {
                return;
            }
        }
        let done = match h.task.take() {
            Some(task) => match task.await {
                Ok(Ok(report)) => {
                    tracing::info!(
                        names = report.names,
                        envelopes = report.envelopes,
                        kept = report.envelopes_kept,
                        "handed this server's names and mailboxes over"
                    );
                    for (name, node) in &report.names_taken {
                        tracing::warn!(name, node = %node.fingerprint(),
                            "name {name} is held by another key on the LAN's server; its owner keeps it only on this node's server");
                    }
                    report.envelopes_kept == 0
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "handing this server's names and mailboxes over stopped; trying again later");
                    false
                }
                Err(_) => false,
            },
            None => false,
        };
        if done {
            self.handover = None;
            return;
        }
        let Some(h) = &mut self.handover else { return };
        if tokio::time::Instant::now() < h.retry_at {
            return;
        }
        let url = match &self.using {
            Some(Using::Remote { id }) => self.candidates.get(id).and_then(|c| c.url.clone()),
            _ => None,
        };
        if let Some(url) = url {
            let state = h.state.clone();
            self.start_handover(state, &url);
        }
    }

    /// One periodic check: the server in use, servers that did not answer, the
    /// hand-over.
    async fn check(&mut self) -> Result<(), DiscoveryStartError> {
        let mut changed = false;
        if let Some(Using::Remote { id }) = &self.using {
            let id = *id;
            let ok = match self.candidates.get(&id).and_then(|c| c.url.clone()) {
                Some(url) => check_url(&url).await,
                None => false,
            };
            match self.candidates.get_mut(&id) {
                Some(c) if ok => c.failures = 0,
                Some(c) => {
                    c.failures += 1;
                    if c.failures >= DEAD_AFTER {
                        tracing::warn!(server = %id.fingerprint(), "the LAN discovery server stopped answering");
                        c.url = None;
                        changed = true;
                    }
                }
                None => changed = true,
            }
        }
        // Servers that stopped answering may be back; one lower than ours matters now.
        for c in self.candidates.values_mut() {
            if c.failures >= DEAD_AFTER {
                if let Some(url) = healthy_url(&c.server).await {
                    c.url = Some(url);
                    c.failures = 0;
                    changed = true;
                }
            }
        }
        if changed {
            self.choose().await?;
        }
        self.check_handover().await;
        Ok(())
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.config.check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.shared.clone();
        loop {
            let result = tokio::select! {
                _ = self.stop.cancelled() => break,
                event = self.browser.next() => match event {
                    Some(event) => {
                        self.seen(event);
                        self.choose().await
                    }
                    None => {
                        tracing::warn!("mDNS stopped; keeping the current discovery server");
                        self.stop.cancelled().await;
                        break;
                    }
                },
                _ = tick.tick() => self.check().await,
                _ = shared.nudge.notified() => self.check().await,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot serve discovery here; looking again shortly");
            }
        }
        if let Some(Using::Own { server, advert }) = self.using.take() {
            if let Some(advert) = advert {
                advert.withdraw().await;
            }
            server.stop().await;
        }
        if let Some(h) = self.handover.take() {
            if let Some(task) = h.task {
                task.abort();
            }
        }
    }
}

/// Whether a discovery server answers its health check at `url` within a second.
pub async fn check_url(url: &str) -> bool {
    let Ok(client) = Client::with_timeout(url, CHECK_TIMEOUT) else {
        return false;
    };
    tokio::time::timeout(CHECK_TIMEOUT, client.health())
        .await
        .is_ok_and(|r| r.is_ok())
}

#[async_trait]
impl Discovery for LanDiscovery {
    fn status(&self) -> watch::Receiver<DiscoveryStatus> {
        self.shared.status.subscribe()
    }

    async fn claim_name(&self, secret: &SecretKey, name: &str) -> Result<(), DiscoveryError> {
        self.on_current(|h| Box::pin(async move { h.claim_name(secret, name).await }))
            .await
    }

    async fn announce(
        &self,
        secret: &SecretKey,
        announcement: &Announcement,
    ) -> Result<Duration, DiscoveryError> {
        self.on_current(|h| Box::pin(async move { h.announce(secret, announcement).await }))
            .await
    }

    async fn relay(&self) -> Result<Option<RelayRef>, DiscoveryError> {
        self.on_current(|h| Box::pin(async move { h.relay().await }))
            .await
    }

    async fn withdraw(&self, secret: &SecretKey) -> Result<(), DiscoveryError> {
        self.on_current(|h| Box::pin(async move { h.withdraw(secret).await }))
            .await
    }

    async fn online(&self) -> Result<Vec<PeerInfo>, DiscoveryError> {
        self.on_current(|h| Box::pin(async move { h.online().await }))
            .await
    }

    async fn lookup_name(&self, name: &str) -> Result<Option<PeerInfo>, DiscoveryError> {
        self.on_current(|h| Box::pin(async move { h.lookup_name(name).await }))
            .await
    }

    async fn lookup_id(&self, id: &NodeId) -> Result<Option<PeerInfo>, DiscoveryError> {
        self.on_current(|h| Box::pin(async move { h.lookup_id(id).await }))
            .await
    }

    async fn deposit(&self, to: &NodeId, envelope: Vec<u8>) -> Result<(), DiscoveryError> {
        self.on_current(|h| Box::pin(async move { h.deposit(to, envelope).await }))
            .await
    }

    async fn fetch_mailbox(&self, secret: &SecretKey) -> Result<MailboxBatch, DiscoveryError> {
        self.on_current(|h| Box::pin(async move { h.fetch_mailbox(secret).await }))
            .await
    }

    async fn delete_mailbox(&self, secret: &SecretKey, ids: &[u64]) -> Result<(), DiscoveryError> {
        self.on_current(|h| Box::pin(async move { h.delete_mailbox(secret, ids).await }))
            .await
    }

    async fn close(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            if tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .is_err()
            {
                tracing::warn!("LAN discovery did not stop in time");
            }
        }
    }
}

impl Drop for LanDiscovery {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
