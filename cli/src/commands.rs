//! The one-shot commands and the headless `listen`.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use p2p_node::{Node, NodeEvent, PathKind, SendStatus};
use serde_json::json;

use crate::{
    discovery::{self, Choice, Need},
    identity::{self, Paths},
    output::{datetime, sanitize},
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

/// `p2p-node register NAME`.
pub async fn register(g: &Global, paths: &Paths, name: &str) -> Result<()> {
    let node = open_node(g, paths, Need::Use).await?;
    let id = node.node_id();
    let result = node.register(name).await;
    node.shutdown().await?;
    result?;
    paths.set_registered_name(name)?;
    println!("registered {name} as {id}");
    Ok(())
}

/// `p2p-node peers [--json]`.
pub async fn peers(g: &Global, paths: &Paths, json: bool) -> Result<()> {
    let node = open_node(g, paths, Need::Use).await?;
    let result = node.peers().await;
    // The path to each peer this node is connected to (a one-shot node is connected to
    // nobody: `null` unless a peer connected to it meanwhile).
    let paths_now: std::collections::HashMap<_, _> = result
        .as_ref()
        .map(|peers| {
            peers
                .iter()
                .map(|p| (p.node_id, node.path_of(&p.node_id)))
                .collect()
        })
        .unwrap_or_default();
    node.shutdown().await?;
    let peers = result?;
    if json {
        for p in &peers {
            println!(
                "{}",
                json!({
                    "name": p.name,
                    "node_id": p.node_id.to_string(),
                    "addrs": p.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "relay": p.relay.map(|r| json!({
                        "node_id": r.node_id.to_string(),
                        "addr": r.addr.to_string(),
                    })),
                    "path": paths_now.get(&p.node_id).copied().flatten().map(PathKind::as_str),
                })
            );
        }
    } else if peers.is_empty() {
        println!("nobody is online");
    } else {
        for p in &peers {
            let addrs: Vec<String> = p.addrs.iter().map(|a| a.to_string()).collect();
            println!(
                "{:<20} {}  {}",
                sanitize(p.name.as_deref().unwrap_or("-")),
                p.node_id,
                addrs.join(",")
            );
        }
    }
    Ok(())
}

/// `p2p-node send TO TEXT [--json]`.
pub async fn send(g: &Global, paths: &Paths, to: &str, text: &str, json: bool) -> Result<()> {
    let node = open_node(g, paths, Need::Use).await?;
    let mut events = node.subscribe();
    let result = node.send(to, text).await;
    node.shutdown().await?;
    print_key_warnings(&mut events);
    let outcome = result?;
    if json {
        println!(
            "{}",
            json!({
                "status": match outcome.status {
                    SendStatus::Delivered => "delivered",
                    SendStatus::Queued => "queued",
                },
                "path": outcome.path.map(PathKind::as_str),
                "id": outcome.id.to_string(),
                "to": outcome.to.to_string(),
            })
        );
    } else {
        println!("{}", crate::chat::send_status(outcome.status, outcome.path));
    }
    Ok(())
}

/// `p2p-node history PEER [--limit N] [--json]`.
pub async fn history(
    g: &Global,
    paths: &Paths,
    peer: &str,
    limit: usize,
    json: bool,
) -> Result<()> {
    // A NodeId or a name this node already knows needs no discovery; any other name is
    // looked up (and the LAN searched) only then.
    let mut node = open_node(g, paths, Need::Nothing).await?;
    let mut resolved = node.resolve(peer).await;
    if resolved.is_err() && node.discovery_url().is_none() {
        node.shutdown().await?;
        node = open_node(g, paths, Need::Use).await?;
        resolved = node.resolve(peer).await;
    }
    let mut events = node.subscribe();
    let result = match resolved {
        Ok(r) => node
            .history(&r.node_id.to_string(), limit)
            .await
            .map(|m| (m, r.name)),
        Err(e) => Err(e),
    };
    node.shutdown().await?;
    print_key_warnings(&mut events);
    let (messages, name) = result?;
    let peer_label = sanitize(name.as_deref().unwrap_or(peer));
    for m in &messages {
        let text = crate::chat::body_text(&m.body);
        if json {
            println!("{}", crate::chat::message_json(m, name.as_deref()));
        } else {
            let (from, to) = match m.direction {
                p2p_node::store::Direction::Incoming => (peer_label.as_str(), "me"),
                p2p_node::store::Direction::Outgoing => ("me", peer_label.as_str()),
            };
            println!(
                "{}  {from} -> {to}: {}  [{}]",
                datetime(m.stored_at_ms),
                sanitize(text),
                crate::chat::status_word(&m.status)
            );
        }
    }
    if messages.is_empty() && !json {
        println!("no messages with {peer_label}");
    }
    Ok(())
}

/// `p2p-node listen [--json]`: prints events until SIGINT or SIGTERM, then logs out.
pub async fn listen(g: &Global, paths: &Paths, json: bool) -> Result<()> {
    let node = open_node(g, paths, Need::Serve).await?;
    let mut events = node.subscribe();
    if json {
        if let Some(status) = node.discovery_status() {
            println!("{}", discovery::status_json(&status.borrow()));
        }
    } else {
        print_discovery(&node);
    }
    warn_if_not_announced(&node).await;
    let quic = node.local_addr()?;
    if json {
        println!(
            "{}",
            json!({
                "event": "ready",
                "node_id": node.node_id().to_string(),
                "quic_addr": quic.to_string(),
                "discovery": node.discovery_url(),
            })
        );
    } else {
        println!("listening as {} on {quic}; Ctrl-C to stop", node.node_id());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            ev = events.recv() => match ev {
                Ok(ev) => print_event(&ev, json),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("missed {n} events (output too slow)");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    node.shutdown().await?;
    if !json {
        println!("logged out");
    }
    Ok(())
}

/// Binds the relay: on `opts.listen`, where the HTTP server's own address (`http`, as
/// bound) stands in for the default (the same address as `--listen`, port 0 included).
fn bind_relay(
    opts: &RelayOptions,
    key: &std::path::Path,
    listen: SocketAddr,
    http: SocketAddr,
) -> Result<(p2p_discovery::relay::Relay, std::fs::File)> {
    let (secret, created) = p2p_crypto::keyfile::load_or_create(key, None)
        .with_context(|| format!("cannot load the relay key {}", key.display()))?;
    if created {
        println!("created relay identity in {}", key.display());
    }
    // Two relays with one key would be taken for one: peers of the other would be
    // unreachable. The lock goes when the process does.
    let lock = std::fs::File::open(key)
        .with_context(|| format!("cannot open the relay key {}", key.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "the relay key {} is in use by another discovery server; give this one its own with --relay-key",
            key.display()
        );
    }
    let relay = bind_relay_socket(opts, &secret, listen, http)?;
    Ok((relay, lock))
}

/// Binds the relay's UDP socket (see [`bind_relay`]).
fn bind_relay_socket(
    opts: &RelayOptions,
    secret: &p2p_crypto::SecretKey,
    listen: SocketAddr,
    http: SocketAddr,
) -> Result<p2p_discovery::relay::Relay> {
    let config = p2p_discovery::relay::RelayConfig::default;
    let same = opts.listen == listen;
    let first = if same { http } else { opts.listen };
    match p2p_discovery::relay::Relay::bind(first, secret, config()) {
        Ok(r) => Ok(r),
        // Any port was asked for: the HTTP port number was only a preference.
        Err(_) if same && listen.port() == 0 => Ok(p2p_discovery::relay::Relay::bind(
            SocketAddr::new(http.ip(), 0),
            secret,
            config(),
        )?),
        Err(e) => Err(anyhow::Error::new(e).context(
            "cannot start the relay; give it another address with --relay-listen, or run without one with --no-relay",
        )),
    }
}

/// Tells the user which discovery server is in use (or served), if any.
pub fn print_discovery(node: &Node) {
    if let Some(status) = node.discovery_status() {
        println!("{}", discovery::status_text(&status.borrow()));
    }
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

/// Prints the "key changed" warnings a one-shot command ran into on stderr.
fn print_key_warnings(events: &mut tokio::sync::broadcast::Receiver<NodeEvent>) {
    while let Ok(ev) = events.try_recv() {
        if matches!(ev, NodeEvent::KeyChanged { .. }) {
            if let Some(line) = crate::chat::event_line(&ev) {
                eprintln!("p2p-node: {line}");
            }
        }
    }
}

fn print_event(ev: &NodeEvent, json: bool) {
    if json {
        println!("{}", crate::chat::event_json(ev));
    } else if let Some(line) = crate::chat::event_line(ev) {
        println!("{line}");
    }
}

/// Where and as whom the standalone server's relay runs.
pub struct RelayOptions {
    /// UDP address (the HTTP address by default).
    pub listen: SocketAddr,
    /// Its identity key file (created mode 0600). Default: relay.key beside the
    /// database.
    pub key: Option<PathBuf>,
    /// The address to advertise for it, if not the server's own host.
    pub advertise: Option<SocketAddr>,
}

/// Where the standalone server keeps its state.
pub enum StoreChoice {
    /// A redb file (default: discovery.redb in the data directory).
    Redb(Option<PathBuf>),
    /// A PostgreSQL database, by URL.
    Postgres(String),
}

/// Opens the store; returns it, how to name it to the user, and the default relay key.
async fn open_discovery_store(
    paths: &Paths,
    choice: StoreChoice,
) -> Result<(Arc<dyn p2p_discovery::Store>, String, PathBuf)> {
    match choice {
        StoreChoice::Redb(db) => {
            let db = match db {
                Some(db) => {
                    let parent = p2p_crypto::owner_only::parent_dir(&db);
                    if !parent.exists() {
                        p2p_crypto::owner_only::create_dir(&parent)?;
                    }
                    db
                }
                None => {
                    paths.prepare()?;
                    paths.discovery_db()
                }
            };
            let store = p2p_discovery::open_store(&db.to_string_lossy())
                .await
                .with_context(|| format!("cannot open discovery database {}", db.display()))?;
            let key = db.with_file_name("relay.key");
            Ok((store, format!("database {}", db.display()), key))
        }
        StoreChoice::Postgres(url) => {
            let target = p2p_discovery::describe_url(&url)?;
            let store = p2p_discovery::open_store(&url)
                .await
                .with_context(|| format!("cannot use the discovery database {target}"))?;
            paths.prepare()?;
            let key = paths.data_dir.join("relay.key");
            Ok((store, format!("database {target}"), key))
        }
    }
}

/// `p2p-node discovery --listen ADDR [--db PATH | --store URL|PATH] [--relay-listen ADDR |
/// --no-relay]`: a standalone discovery server and its relay. A redb database is created
/// with mode 0600 (and a missing directory for it with mode 0700), and refused if group
/// or others may access it; without `--db` it is in the data directory, whose rules
/// apply. A PostgreSQL database gets its schema on first use; any number of servers may
/// share it.
pub async fn discovery(
    paths: &Paths,
    listen: SocketAddr,
    store: StoreChoice,
    relay: Option<RelayOptions>,
) -> Result<()> {
    // Handled from before the server says it listens: a SIGTERM right after that line
    // is a clean stop.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let (store, described, default_key) = open_discovery_store(paths, store).await?;
    let state = p2p_discovery::AppState::new(
        p2p_discovery::ServerConfig::default(),
        store,
        Arc::new(p2p_discovery::SystemClock),
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    // Held while the server runs: one instance per relay key.
    let mut _key_lock = None;
    let relay = match relay {
        Some(opts) => {
            let key = opts.key.clone().unwrap_or(default_key);
            let (relay, lock) = bind_relay(&opts, &key, listen, addr)?;
            _key_lock = Some(lock);
            match opts.advertise {
                Some(public) => state.set_relay_at(&relay, public)?,
                None => state.set_relay(&relay)?,
            }
            Some(relay)
        }
        None => None,
    };
    println!("discovery server listening on http://{addr} ({described})");
    match &relay {
        Some(r) => println!(
            "relay listening on udp {} (relay id {}); --no-relay turns it off",
            r.local_addr()?,
            r.node_id()
        ),
        None => println!(
            "no relay (--no-relay): nodes behind NATs reach each other only through the mailbox"
        ),
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let signals = {
        let stop = stop.clone();
        async move {
            let Some(mut term) = term else {
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            stop.cancel();
        }
    };
    let relay_task = {
        let stop = stop.clone();
        async move {
            if let Some(relay) = relay {
                relay.serve(stop.cancelled_owned()).await;
            }
        }
    };
    let shutdown = stop.clone().cancelled_owned();
    let (served, (), ()) = tokio::join!(
        async {
            let r = p2p_discovery::serve(listener, state, shutdown).await;
            stop.cancel();
            r
        },
        relay_task,
        async {
            tokio::select! {
                _ = signals => {}
                _ = stop.cancelled() => {}
            }
        }
    );
    served?;
    println!("discovery server stopped");
    Ok(())
}
