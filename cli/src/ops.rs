//! What the node-using commands do, on whichever node runs them: the one a command
//! starts itself, or the one already running on the data directory (asked through the
//! control socket). Each returns what to print ([`Output`]).

use std::time::Duration;

use anyhow::{anyhow, Result};
use futures::future::BoxFuture;
use p2p_node::{Node, NodeEvent, PathKind, Queued, SendStatus};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    control::{self, Kind, Output, Request},
    discovery::{self, Need},
    identity::Paths,
    output::{datetime, sanitize},
    Global,
};

/// How long a one-shot command gives the outbox before it exits.
pub const FLUSH_WITHIN: Duration = Duration::from_secs(2);

/// Runs `request` on the node running on this data directory, or else on a node of its
/// own (with the discovery `need` says), which also moves the outbox on before it exits.
pub async fn run(g: &Global, paths: &Paths, request: Request, need: Need) -> Result<Output> {
    if let Some(output) = control::ask(&paths.data_dir, &request).await? {
        return Ok(output);
    }
    let mut node = crate::running::open_node(g, paths, need).await?;
    let mut events = node.subscribe();
    let mut result = on(&node, paths, &request, None).await;
    // `history` of a peer this node does not know yet: look it up on discovery.
    let history = matches!(request, Request::History { .. });
    if history && result.is_err() && node.discovery_url().is_none() {
        node.shutdown().await;
        node = crate::running::open_node(g, paths, Need::Use).await?;
        events = node.subscribe();
        result = on(&node, paths, &request, None).await;
    }
    let flushed = node.flush_outbox(FLUSH_WITHIN).await;
    node.shutdown().await;
    let mut output = result?;
    output.notes.extend(key_warnings(&mut events));
    match flushed {
        Ok(report) if report.only_here > 0 => output.notes.push(outbox_note(report.only_here)),
        Ok(_) => {}
        Err(e) => output.notes.push(format!("cannot read the outbox: {e}")),
    }
    Ok(output)
}

/// "2 messages still only in your outbox: ...".
pub fn outbox_note(only_here: usize) -> String {
    let what = if only_here == 1 {
        "1 message is".to_owned()
    } else {
        format!("{only_here} messages are")
    };
    format!(
        "{what} still only in your outbox: they travel when a node runs on this data \
         directory (the chat, listen, or p2p-node daemon in the background)"
    )
}

/// The control socket's handler for a running node of `kind`; `stop` is cancelled when
/// `p2p-node stop` asks a daemon or `listen` to exit.
pub fn handler(
    node: Node,
    paths: Paths,
    kind: Kind,
    stop: CancellationToken,
) -> impl Fn(Request) -> BoxFuture<'static, Result<Output>> + Send + Sync + 'static {
    move |request| {
        let (node, paths, stop) = (node.clone(), paths.clone(), stop.clone());
        Box::pin(async move {
            if request == Request::Stop {
                if kind == Kind::Chat {
                    return Err(anyhow!(
                        "the interactive chat runs on this data directory: quit it there"
                    ));
                }
                stop.cancel();
                return Ok(Output {
                    text: vec![format!("stopping the {} node", kind.as_str())],
                    ..Output::default()
                });
            }
            on(&node, &paths, &request, Some(kind)).await
        })
    }
}

/// Runs `request` on `node`; `running` is the kind of the long-running node it is, or
/// `None` for a node started for this one command.
async fn on(
    node: &Node,
    paths: &Paths,
    request: &Request,
    running: Option<Kind>,
) -> Result<Output> {
    match request {
        Request::Status => status(node, running).await,
        Request::Send { to, text } => send(node, to, text, running.is_some()).await,
        Request::History { peer, limit } => history(node, peer, *limit).await,
        Request::Peers => peers(node).await,
        Request::Register { name } => register(node, paths, name).await,
        Request::Stop => Err(anyhow!("no node is running on this data directory")),
    }
}

async fn register(node: &Node, paths: &Paths, name: &str) -> Result<Output> {
    node.register(name).await?;
    paths.set_registered_name(name)?;
    let line = format!("registered {name} as {}", node.node_id());
    Ok(Output {
        json: vec![json!({ "registered": name, "node_id": node.node_id().to_string() })],
        text: vec![line],
        notes: Vec::new(),
    })
}

async fn peers(node: &Node) -> Result<Output> {
    let peers = node.peers().await?;
    let mut out = Output::default();
    for p in &peers {
        // The path to each peer this node is connected to (a one-shot node is connected
        // to nobody: `null` unless a peer connected to it meanwhile).
        out.json.push(json!({
            "name": p.name,
            "node_id": p.node_id.to_string(),
            "addrs": p.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "relay": p.relay.map(|r| json!({
                "node_id": r.node_id.to_string(),
                "addr": r.addr.to_string(),
            })),
            "path": node.path_of(&p.node_id).map(PathKind::as_str),
        }));
        let addrs: Vec<String> = p.addrs.iter().map(|a| a.to_string()).collect();
        out.text.push(format!(
            "{:<20} {}  {}",
            sanitize(p.name.as_deref().unwrap_or("-")),
            p.node_id,
            addrs.join(",")
        ));
    }
    if peers.is_empty() {
        out.text.push("nobody is online".into());
    }
    Ok(out)
}

/// What `send` prints for a queued message.
pub fn queued_text(queued: Option<Queued>, running: bool) -> &'static str {
    match (queued, running) {
        (Some(Queued::Mailbox), _) => {
            "queued in the recipient's mailbox (it arrives even if this node does not run)"
        }
        (_, true) => "queued in your outbox (the running node keeps trying)",
        (_, false) => {
            "queued in your outbox only (it travels when a node runs on this data directory: \
             the chat, listen, or p2p-node daemon)"
        }
    }
}

async fn send(node: &Node, to: &str, text: &str, running: bool) -> Result<Output> {
    let outcome = node.send(to, text).await?;
    let line = match outcome.status {
        SendStatus::Queued => queued_text(outcome.queued, running),
        status => crate::output::send_status(status, outcome.path),
    };
    let notes = outcome
        .queued_because
        .as_ref()
        .and_then(crate::output::not_the_peer_warning)
        .map(|w| vec![format!("warning: {w}")])
        .unwrap_or_default();
    Ok(Output {
        json: vec![crate::output::send_json(&outcome)],
        text: vec![line.to_owned()],
        notes,
    })
}

async fn history(node: &Node, peer: &str, limit: usize) -> Result<Output> {
    let resolved = node.resolve(peer).await?;
    let messages = node.history(&resolved.node_id.to_string(), limit).await?;
    let name = resolved.name;
    let peer_label = sanitize(name.as_deref().unwrap_or(peer));
    let mut out = Output::default();
    for m in &messages {
        out.json
            .push(crate::output::message_json(m, name.as_deref()));
        let (from, to) = match m.direction {
            p2p_node::store::Direction::Incoming => (peer_label.as_str(), "me"),
            p2p_node::store::Direction::Outgoing => ("me", peer_label.as_str()),
        };
        out.text.push(format!(
            "{}  {from} -> {to}: {}  [{}]",
            datetime(m.stored_at_ms),
            sanitize(crate::output::body_text(&m.body)),
            crate::output::status_word(&m.status)
        ));
    }
    if messages.is_empty() {
        out.text.push(format!("no messages with {peer_label}"));
    }
    Ok(out)
}

/// `p2p-node status` of a node: running (as `kind`) or started for the command.
async fn status(node: &Node, running: Option<Kind>) -> Result<Output> {
    let outbox = node.outbox().await?;
    let only_here = outbox.iter().filter(|e| !e.mailbox_deposited).count();
    let connections = node.connections();
    let direct = connections
        .iter()
        .filter(|(_, p)| *p == Some(PathKind::Direct))
        .count();
    let relayed = connections
        .iter()
        .filter(|(_, p)| *p == Some(PathKind::Relay))
        .count();
    let disco = node.discovery_status().map(|s| s.borrow().clone());
    let mut text = Vec::new();
    match running {
        Some(kind) => text.push(format!(
            "a node is running on this data directory: {} (pid {}), as {}",
            kind.as_str(),
            std::process::id(),
            node.node_id()
        )),
        None => text.push(format!(
            "no node is running on this data directory (p2p-node daemon starts one); \
             identity {}",
            node.node_id()
        )),
    }
    if running.is_some() {
        text.push(match &disco {
            Some(st) => format!(
                "discovery: {}",
                discovery::status_text(st).replace('\n', "; ")
            ),
            None => "discovery: none".into(),
        });
        text.push(format!(
            "connections: {} (direct {direct}, via relay {relayed})",
            connections.len()
        ));
    }
    text.push(format!(
        "outbox: {} queued, {} of them in the recipients' mailboxes, {only_here} only here",
        outbox.len(),
        outbox.len() - only_here
    ));
    Ok(Output {
        json: vec![json!({
            "running": running.map(Kind::as_str),
            "pid": running.map(|_| std::process::id()),
            "node_id": node.node_id().to_string(),
            "discovery": disco.as_ref().map(discovery::status_json),
            "connections": connections.len(),
            "connections_direct": direct,
            "connections_relay": relayed,
            "outbox": outbox.len(),
            "outbox_only_here": only_here,
        })],
        text,
        notes: Vec::new(),
    })
}

/// The "key changed" warnings a command ran into.
fn key_warnings(events: &mut tokio::sync::broadcast::Receiver<NodeEvent>) -> Vec<String> {
    let mut notes = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if matches!(ev, NodeEvent::KeyChanged { .. }) {
            if let Some(line) = crate::output::event_line(&ev) {
                notes.push(line);
            }
        }
    }
    notes
}
