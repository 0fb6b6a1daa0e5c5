//! The one-shot commands and the headless `listen`.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use p2p_node::{Node, NodeEvent, SendStatus};
use serde_json::json;

use crate::{
    identity::{self, Paths},
    output::{datetime, sanitize},
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
        .announce(announce);
    if let Some(listen) = g.listen {
        builder = builder.listen(listen);
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

/// `p2p-node register NAME`.
pub async fn register(g: &Global, paths: &Paths, name: &str) -> Result<()> {
    let node = open_node(g, paths, false).await?;
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
    let node = open_node(g, paths, false).await?;
    let result = node.peers().await;
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

/// `p2p-node send TO TEXT`.
pub async fn send(g: &Global, paths: &Paths, to: &str, text: &str) -> Result<()> {
    let node = open_node(g, paths, false).await?;
    let mut events = node.subscribe();
    let result = node.send(to, text).await;
    node.shutdown().await?;
    print_key_warnings(&mut events);
    let outcome = result?;
    match outcome.status {
        SendStatus::Delivered => println!("delivered"),
        SendStatus::Queued => println!("queued"),
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
    let node = open_node(g, paths, false).await?;
    let mut events = node.subscribe();
    let result = match node.resolve(peer).await {
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
        let text = m.body.as_text().unwrap_or("<unsupported message kind>");
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
    let node = open_node(g, paths, true).await?;
    let mut events = node.subscribe();
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
        println!(
            "listening as {} on {quic} (discovery {}); Ctrl-C to stop",
            node.node_id(),
            node.discovery_url().unwrap_or_else(|| "none".into())
        );
        print_embedded_hint(&node);
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

/// Tells the user how others reach the discovery server this node runs, if any.
pub fn print_embedded_hint(node: &Node) {
    if let (Some(addr), Some(url)) = (
        node.embedded_discovery_addr(),
        node.embedded_discovery_lan_url(),
    ) {
        println!("serving discovery on {addr}; others on the LAN use: p2p-node --discovery {url}");
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

/// `p2p-node discovery --listen ADDR [--db PATH]`: a standalone discovery server. Its
/// database is created with mode 0600 (and a missing directory for it with mode 0700),
/// and refused if group or others may access it; without `--db` it is in the data
/// directory, whose rules apply.
pub async fn discovery(paths: &Paths, listen: SocketAddr, db: Option<PathBuf>) -> Result<()> {
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
    let state = p2p_discovery::AppState::open(p2p_discovery::ServerConfig {
        db_path: Some(db.clone()),
        ..Default::default()
    })
    .with_context(|| format!("cannot open discovery database {}", db.display()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    println!(
        "discovery server listening on http://{addr} (database {})",
        db.display()
    );
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    p2p_discovery::serve(listener, state, shutdown).await?;
    println!("discovery server stopped");
    Ok(())
}
