//! The interactive chat: the default command. Reads commands and messages line by line
//! from stdin (a terminal or a pipe) and prints messages and notices as they arrive.

use std::collections::HashSet;

use anyhow::Result;
use p2p_crypto::NodeId;
use p2p_node::{
    store::{Direction, MessageStatus, StoredMessage},
    wire::MessageId,
    Node, NodeEvent, PathKind, SendStatus, Via,
};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{
    commands::open_node,
    identity::Paths,
    output::{clock, sanitize},
    Global,
};

const HELP: &str = "\
commands:
  /peers               who is online
  /chat NAME           open a chat room with NAME (recent history, then live messages)
  /history NAME [N]    the last N messages with NAME (default 20)
  /leave               close the chat room
  /register NAME       claim NAME for this node
  /help                this help
  /quit                log out and exit
in a chat room, any other line is sent to the other side.";

/// The open chat room.
struct Room {
    node_id: NodeId,
    label: String,
}

/// What the chat has already told the user, so events do not repeat it.
#[derive(Default)]
struct Shown {
    /// Peers listed as online (a "is online" notice for them would repeat the list).
    online: HashSet<NodeId>,
    /// Messages whose send already printed "delivered".
    delivered: HashSet<MessageId>,
}

pub async fn run(g: &Global, paths: &Paths) -> Result<()> {
    let node = open_node(g, paths, true).await?;
    let mut events = node.subscribe();
    crate::commands::warn_if_not_announced(&node).await;
    let me = paths.registered_name()?;
    println!(
        "logged in as {} ({}), discovery {}",
        me.as_deref()
            .map(sanitize)
            .unwrap_or_else(|| "<no name yet: /register NAME>".into()),
        node.node_id().fingerprint(),
        node.discovery_url().unwrap_or_else(|| "none".into()),
    );
    crate::commands::print_embedded_hint(&node);
    println!("type /help for commands");
    let mut shown = Shown::default();
    show_peers(&node, &mut shown).await;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut room: Option<Room> = None;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if !handle_line(&node, paths, &mut room, &mut shown, line.trim()).await {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("cannot read input: {e}");
                    break;
                }
            },
            ev = events.recv() => match ev {
                Ok(ev) => show_event(&node, room.as_ref(), &mut shown, &ev),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    println!("(missed {n} notices)");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    node.shutdown().await?;
    println!("logged out");
    Ok(())
}

/// Handles one input line; false means quit.
async fn handle_line(
    node: &Node,
    paths: &Paths,
    room: &mut Option<Room>,
    shown: &mut Shown,
    line: &str,
) -> bool {
    if line.is_empty() {
        return true;
    }
    let (cmd, rest) = match line.split_once(char::is_whitespace) {
        Some((c, r)) => (c, r.trim()),
        None => (line, ""),
    };
    match cmd {
        "/quit" | "/exit" => return false,
        "/help" => println!("{HELP}"),
        "/peers" => show_peers(node, shown).await,
        "/leave" => match room.take() {
            Some(r) => println!("left the chat with {}", r.label),
            None => println!("no chat room is open"),
        },
        "/register" if !rest.is_empty() => match node.register(rest).await {
            Ok(()) => match paths.set_registered_name(rest) {
                Ok(()) => println!("registered {}", sanitize(rest)),
                Err(e) => println!("error: {}", crate::output::one_line(&e)),
            },
            Err(e) => println!("error: {}", sanitize(&e.to_string())),
        },
        "/chat" if !rest.is_empty() => match node.resolve(rest).await {
            Ok(resolved) => {
                let label = sanitize(resolved.name.as_deref().unwrap_or(rest));
                println!(
                    "--- chat with {label} ({}); /leave to close ---",
                    resolved.node_id.fingerprint()
                );
                match node.history(&resolved.node_id.to_string(), 20).await {
                    Ok(msgs) => {
                        for m in &msgs {
                            println!("{}", history_line(m, &label));
                        }
                    }
                    Err(e) => println!("error: {}", sanitize(&e.to_string())),
                }
                *room = Some(Room {
                    node_id: resolved.node_id,
                    label,
                });
            }
            Err(e) => println!("error: {}", sanitize(&e.to_string())),
        },
        "/history" if !rest.is_empty() => {
            let mut parts = rest.split_whitespace();
            let who = parts.next().unwrap_or(rest);
            let n = parts.next().and_then(|n| n.parse().ok()).unwrap_or(20);
            match node.history(who, n).await {
                Ok(msgs) if msgs.is_empty() => println!("no messages with {}", sanitize(who)),
                Ok(msgs) => {
                    let label = sanitize(who);
                    for m in &msgs {
                        println!("{}", history_line(m, &label));
                    }
                }
                Err(e) => println!("error: {}", sanitize(&e.to_string())),
            }
        }
        c if c.starts_with('/') => println!(
            "unknown or incomplete command {}; /help lists them",
            sanitize(c)
        ),
        _ => match room {
            Some(r) => match node.send(&r.node_id.to_string(), line).await {
                Ok(outcome) => {
                    if outcome.status == SendStatus::Delivered {
                        shown.delivered.insert(outcome.id);
                    }
                    println!(
                        "[{}] me: {}  ({})",
                        clock(now_ms()),
                        sanitize(line),
                        send_status(outcome.status, outcome.path)
                    );
                }
                Err(e) => println!("error: {}", sanitize(&e.to_string())),
            },
            None => println!("no chat room is open: /chat NAME first (/help for commands)"),
        },
    }
    true
}

async fn show_peers(node: &Node, shown: &mut Shown) {
    match node.peers().await {
        Ok(peers) => {
            let others: Vec<_> = peers
                .iter()
                .filter(|p| p.node_id != node.node_id())
                .collect();
            shown.online = others.iter().map(|p| p.node_id).collect();
            if others.is_empty() {
                println!("online: nobody else");
            } else {
                println!("online:");
                for p in others {
                    let path = match node.path_of(&p.node_id) {
                        Some(PathKind::Direct) => "  (connected, direct)",
                        Some(PathKind::Relay) => "  (connected, via relay)",
                        None => "",
                    };
                    println!(
                        "  {:<20} {}{path}",
                        sanitize(p.name.as_deref().unwrap_or("-")),
                        p.node_id.fingerprint()
                    );
                }
            }
        }
        Err(e) => println!("cannot list peers: {}", sanitize(&e.to_string())),
    }
}

fn show_event(node: &Node, room: Option<&Room>, shown: &mut Shown, ev: &NodeEvent) {
    match ev {
        NodeEvent::PeerOnline { node_id, .. } if !shown.online.insert(*node_id) => {}
        NodeEvent::PeerOffline { node_id, .. } if !shown.online.remove(node_id) => {}
        NodeEvent::MessageDelivered { id, .. } if shown.delivered.remove(id) => {}
        NodeEvent::MessageDelivered { to, id, .. } => {
            let label = sanitize(&node.name_of(to).unwrap_or_else(|| to.fingerprint()));
            println!("* your queued message {id} to {label} was delivered");
        }
        NodeEvent::MessageReceived {
            from,
            from_name,
            message,
            via,
        } => {
            let label = sanitize(
                &from_name
                    .clone()
                    .or_else(|| node.name_of(from))
                    .unwrap_or_else(|| from.fingerprint()),
            );
            if room.is_some_and(|r| r.node_id == *from) {
                println!(
                    "[{}] {label}: {}{}",
                    clock(message.stored_at_ms),
                    sanitize(
                        message
                            .body
                            .as_text()
                            .unwrap_or("<unsupported message kind>")
                    ),
                    via_mark(*via)
                );
            } else {
                println!("New message from {label}");
            }
        }
        other => {
            if let Some(line) = event_line(other) {
                println!("{line}");
            }
        }
    }
}

fn history_line(m: &StoredMessage, peer_label: &str) -> String {
    let who = match m.direction {
        Direction::Incoming => peer_label,
        Direction::Outgoing => "me",
    };
    let mut line = format!(
        "[{}] {who}: {}",
        clock(m.stored_at_ms),
        sanitize(m.body.as_text().unwrap_or("<unsupported message kind>"))
    );
    if m.direction == Direction::Outgoing {
        line.push_str(&format!("  ({})", status_word(&m.status)));
    }
    line
}

/// How a sent message fared, for people: `delivered`, `delivered via relay`, `queued`.
pub fn send_status(status: SendStatus, path: Option<PathKind>) -> &'static str {
    match (status, path) {
        (SendStatus::Delivered, Some(PathKind::Relay)) => "delivered via relay",
        (SendStatus::Delivered, _) => "delivered",
        (SendStatus::Queued, _) => "queued",
    }
}

/// The mark after a received line that did not come over a direct path.
pub fn via_mark(via: Via) -> &'static str {
    match via {
        Via::Direct => "",
        Via::Relay => "  (via relay)",
        Via::Mailbox => "  (via mailbox)",
    }
}

pub fn status_word(s: &MessageStatus) -> String {
    match s {
        MessageStatus::Received => "received".into(),
        MessageStatus::Queued => "queued".into(),
        MessageStatus::Delivered => "delivered".into(),
        MessageStatus::Rejected(code) => format!("rejected: {code}"),
    }
}

fn name_or_id(name: Option<&str>, id: &NodeId) -> String {
    sanitize(
        name.map(str::to_string)
            .as_deref()
            .unwrap_or(&id.fingerprint()),
    )
}

/// One line for people, for the events `listen` and the chat print.
pub fn event_line(ev: &NodeEvent) -> Option<String> {
    Some(match ev {
        NodeEvent::MessageReceived {
            from,
            from_name,
            message,
            via,
        } => format!(
            "[{}] {} ({}): {}{}",
            clock(message.stored_at_ms),
            name_or_id(from_name.as_deref(), from),
            from.fingerprint(),
            sanitize(
                message
                    .body
                    .as_text()
                    .unwrap_or("<unsupported message kind>")
            ),
            via_mark(*via)
        ),
        NodeEvent::MessageDelivered { to, id, .. } => {
            format!("delivered message {id} to {}", to.fingerprint())
        }
        NodeEvent::PathChanged {
            node_id,
            name,
            path,
            addr,
            rtt,
        } => {
            let who = name_or_id(name.as_deref(), node_id);
            match (path, addr) {
                (Some(PathKind::Direct), Some(addr)) => format!(
                    "* direct path to {who} ({addr}{})",
                    rtt.map(|r| format!(", round trip {} ms", r.as_millis()))
                        .unwrap_or_default()
                ),
                (Some(PathKind::Relay), _) => {
                    format!("* direct path to {who} lost; talking through the relay")
                }
                _ => format!("* direct path to {who} lost"),
            }
        }
        NodeEvent::PeerOnline { node_id, name } => {
            format!("* {} is online", name_or_id(name.as_deref(), node_id))
        }
        NodeEvent::PeerOffline { node_id, name } => {
            format!("* {} went offline", name_or_id(name.as_deref(), node_id))
        }
        NodeEvent::KeyChanged {
            name,
            pinned,
            announced,
        } => format!(
            "WARNING: discovery now says {} is {announced}, but you know {} as {pinned}; \
             still using the known key",
            sanitize(name),
            sanitize(name)
        ),
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

/// One JSON object per event for `listen --json`.
pub fn event_json(ev: &NodeEvent) -> serde_json::Value {
    match ev {
        NodeEvent::MessageReceived {
            from,
            from_name,
            message,
            via,
        } => json!({
            "event": "message",
            "from": from.to_string(),
            "from_name": from_name,
            "id": message.id.to_string(),
            "text": message.body.as_text(),
            "sent_at_ms": message.sent_at_ms,
            "received_at_ms": message.stored_at_ms,
            "via": via.as_str(),
            "path": via.path().map(PathKind::as_str),
        }),
        NodeEvent::MessageDelivered { to, id, path } => json!({
            "event": "delivered",
            "to": to.to_string(),
            "id": id.to_string(),
            "path": path.map(PathKind::as_str),
        }),
        NodeEvent::PathChanged {
            node_id,
            name,
            path,
            addr,
            rtt,
        } => json!({
            "event": "path",
            "node_id": node_id.to_string(),
            "name": name,
            "path": path.map(PathKind::as_str),
            "addr": addr.map(|a| a.to_string()),
            "rtt_ms": rtt.map(|r| r.as_secs_f64() * 1000.0),
        }),
        NodeEvent::PeerOnline { node_id, name } => json!({
            "event": "peer_online",
            "node_id": node_id.to_string(),
            "name": name,
        }),
        NodeEvent::PeerOffline { node_id, name } => json!({
            "event": "peer_offline",
            "node_id": node_id.to_string(),
            "name": name,
        }),
        NodeEvent::KeyChanged {
            name,
            pinned,
            announced,
        } => json!({
            "event": "key_changed",
            "name": name,
            "pinned": pinned.to_string(),
            "announced": announced.to_string(),
        }),
        #[allow(unreachable_patterns)]
        _ => json!({ "event": "other" }),
    }
}

/// One JSON object per stored message for `history --json`.
pub fn message_json(m: &StoredMessage, peer_name: Option<&str>) -> serde_json::Value {
    json!({
        "id": m.id.to_string(),
        "peer": m.peer.to_string(),
        "peer_name": peer_name,
        "direction": match m.direction { Direction::Incoming => "incoming", Direction::Outgoing => "outgoing" },
        "text": m.body.as_text(),
        "sent_at_ms": m.sent_at_ms,
        "stored_at_ms": m.stored_at_ms,
        "status": status_word(&m.status),
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
