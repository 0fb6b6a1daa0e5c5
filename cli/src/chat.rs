//! The line-by-line chat: the default command when standard input or output is not a
//! terminal, or with `--plain`. Reads commands and messages line by line from stdin and
//! prints messages and notices as they arrive. Also the message and event lines that the
//! full-screen chat and `listen` share.

use std::collections::HashSet;

use anyhow::Result;
use p2p_crypto::NodeId;
use p2p_node::{
    store::{Direction, MessageStatus, StoredMessage},
    wire::{Body, MessageId},
    Node, NodeEvent, PathKind, PeerInfo, SendStatus, Via,
};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{
    commands::open_node,
    discovery::Need,
    identity::Paths,
    output::{sanitize, ChatLine},
    session::{self, now_ms, Input, COMMAND_HELP},
    Global,
};

/// `/help` in the line-by-line chat.
fn help() -> String {
    format!("commands:\n{COMMAND_HELP}\nin a chat room, any other line is sent to the other side.")
}

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
    let node = open_node(g, paths, Need::Serve).await?;
    let mut events = node.subscribe();
    let stop = tokio_util::sync::CancellationToken::new();
    let control = crate::commands::serve_control(&node, paths, crate::control::Kind::Chat, &stop);
    crate::commands::print_discovery(&node);
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
                    if !handle_line(&node, paths, &mut room, &mut shown, &line).await {
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
    drop(control);
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
    match session::parse(line) {
        Input::Empty => {}
        Input::Quit => return false,
        Input::Help => println!("{}", help()),
        Input::Peers => show_peers(node, shown).await,
        Input::Leave => match room.take() {
            Some(r) => println!("left the chat with {}", r.label),
            None => println!("no chat room is open"),
        },
        Input::Register(name) => match node.register(name).await {
            Ok(()) => match paths.set_registered_name(name) {
                Ok(()) => println!("registered {}", sanitize(name)),
                Err(e) => println!("error: {}", crate::output::one_line(&e)),
            },
            Err(e) => println!("error: {}", sanitize(&e.to_string())),
        },
        Input::Chat(who) => match node.resolve(who).await {
            Ok(resolved) => {
                let label = sanitize(resolved.name.as_deref().unwrap_or(who));
                println!(
                    "--- chat with {label} ({}); /leave to close ---",
                    resolved.node_id.fingerprint()
                );
                match node
                    .history(&resolved.node_id.to_string(), session::RECENT)
                    .await
                {
                    Ok(msgs) => {
                        for m in &msgs {
                            println!("{}", stored_line(m, &label));
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
        Input::History { who, n } => match node.history(who, n).await {
            Ok(msgs) if msgs.is_empty() => println!("no messages with {}", sanitize(who)),
            Ok(msgs) => {
                let label = sanitize(who);
                for m in &msgs {
                    println!("{}", stored_line(m, &label));
                }
            }
            Err(e) => println!("error: {}", sanitize(&e.to_string())),
        },
        Input::Unknown(c) => println!(
            "unknown or incomplete command {}; /help lists them",
            sanitize(c)
        ),
        Input::Text(text) => match room {
            Some(r) => match node.send(&r.node_id.to_string(), text).await {
                Ok(outcome) => {
                    if outcome.status == SendStatus::Delivered {
                        shown.delivered.insert(outcome.id);
                    }
                    let status = send_status(outcome.status, outcome.path);
                    println!("{}", ChatLine::new(now_ms(), "me", text).mark(status));
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
            let others = others_online(&peers, node.node_id());
            shown.online = others.iter().map(|(id, _)| *id).collect();
            for line in online_lines(&others, |id| node.path_of(id)) {
                println!("{line}");
            }
        }
        Err(e) => println!("cannot list peers: {}", sanitize(&e.to_string())),
    }
}

/// The nodes in `peers` other than `me`, with their names.
pub fn others_online(peers: &[PeerInfo], me: NodeId) -> Vec<(NodeId, Option<String>)> {
    peers
        .iter()
        .filter(|p| p.node_id != me)
        .map(|p| (p.node_id, p.name.clone()))
        .collect()
}

/// The online list as the chat shows it, with the path to each peer this node is
/// connected to (`path_of`, e.g. [`Node::path_of`]).
pub fn online_lines(
    others: &[(NodeId, Option<String>)],
    path_of: impl Fn(&NodeId) -> Option<PathKind>,
) -> Vec<String> {
    if others.is_empty() {
        return vec!["online: nobody else".into()];
    }
    let mut lines = vec!["online:".to_string()];
    for (id, name) in others {
        let path = match path_of(id) {
            Some(PathKind::Direct) => "  (connected, direct)",
            Some(PathKind::Relay) => "  (connected, via relay)",
            None => "",
        };
        lines.push(format!(
            "  {:<20} {}{path}",
            sanitize(name.as_deref().unwrap_or("-")),
            id.fingerprint()
        ));
    }
    lines
}

fn show_event(node: &Node, room: Option<&Room>, shown: &mut Shown, ev: &NodeEvent) {
    match ev {
        NodeEvent::PeerOnline { node_id, .. } if !shown.online.insert(*node_id) => {}
        NodeEvent::PeerOffline { node_id, .. } if !shown.online.remove(node_id) => {}
        NodeEvent::MessageDelivered { id, .. } if shown.delivered.remove(id) => {}
        NodeEvent::MessageDelivered { to, id, .. } => {
            println!(
                "{}",
                delivered_notice(&peer_label(to, None, |i| node.name_of(i)), id)
            );
        }
        NodeEvent::MessageReceived {
            from,
            from_name,
            message,
            via,
        } => {
            let label = peer_label(from, from_name.as_deref(), |i| node.name_of(i));
            if room.is_some_and(|r| r.node_id == *from) {
                println!("{}", marked(received_line(&label, message), *via));
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

/// How the chat names a peer: the name given, else the name `known` has for it (e.g.
/// [`Node::name_of`]), else its fingerprint.
pub fn peer_label(
    id: &NodeId,
    name: Option<&str>,
    known: impl FnOnce(&NodeId) -> Option<String>,
) -> String {
    sanitize(
        &name
            .map(str::to_string)
            .or_else(|| known(id))
            .unwrap_or_else(|| id.fingerprint()),
    )
}

/// The notice for a message of ours delivered after it was queued.
pub fn delivered_notice(to_label: &str, id: &MessageId) -> String {
    format!("* your queued message {id} to {to_label} was delivered")
}

/// The text of a message body for people.
pub fn body_text(body: &Body) -> &str {
    body.as_text().unwrap_or("<unsupported message kind>")
}

/// A message from the history: `me` or `peer_label`, and the delivery state of ours.
pub fn stored_line(m: &StoredMessage, peer_label: &str) -> ChatLine {
    match m.direction {
        Direction::Incoming => ChatLine::new(m.stored_at_ms, peer_label, body_text(&m.body)),
        Direction::Outgoing => {
            ChatLine::new(m.stored_at_ms, "me", body_text(&m.body)).mark(status_word(&m.status))
        }
    }
}

/// A message just received from `label`.
pub fn received_line(label: &str, message: &StoredMessage) -> ChatLine {
    ChatLine::new(message.stored_at_ms, label, body_text(&message.body))
}

/// How a received message travelled, when that is worth a mark.
pub fn via_mark(via: Via) -> Option<&'static str> {
    match via {
        Via::Direct => None,
        Via::Relay => Some("via relay"),
        Via::Mailbox => Some("via mailbox"),
    }
}

/// `line` with the mark of how its message travelled, if any.
pub fn marked(line: ChatLine, via: Via) -> ChatLine {
    match via_mark(via) {
        Some(mark) => line.mark(mark),
        None => line,
    }
}

/// How a sent message fared, for people: `delivered`, `delivered via relay`, `queued`.
pub fn send_status(status: SendStatus, path: Option<PathKind>) -> &'static str {
    match (status, path) {
        (SendStatus::Delivered, Some(PathKind::Relay)) => "delivered via relay",
        (SendStatus::Delivered, _) => "delivered",
        (SendStatus::Queued, _) => "queued",
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
        } => {
            let who = format!(
                "{} ({})",
                name_or_id(from_name.as_deref(), from),
                from.fingerprint()
            );
            marked(received_line(&who, message), *via).to_string()
        }
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
        NodeEvent::DiscoveryChanged(status) => {
            format!("* {}", crate::discovery::status_text(status))
        }
        NodeEvent::StorageFailing { error } => format!(
            "WARNING: cannot store messages ({}); refusing them until the disk takes \
             writes again",
            sanitize(error)
        ),
        NodeEvent::StorageRecovered => "* storing messages again".to_owned(),
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
        NodeEvent::DiscoveryChanged(status) => crate::discovery::status_json(status),
        NodeEvent::StorageFailing { error } => json!({
            "event": "storage_failing",
            "error": error,
        }),
        NodeEvent::StorageRecovered => json!({ "event": "storage_recovered" }),
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

#[cfg(test)]
mod tests {
    use p2p_node::store::{Direction, MessageStatus};

    use super::*;
    use crate::tui::pane::test_support::{peer, stored};

    #[test]
    fn message_lines_of_listen_and_the_history() {
        let m = stored(2, Direction::Incoming, MessageStatus::Received, "yo\n");
        let ev = NodeEvent::MessageReceived {
            from: peer(3),
            from_name: Some("bob".into()),
            message: m.clone(),
            via: Via::Mailbox,
        };
        let fp = peer(3).fingerprint();
        assert_eq!(
            event_line(&ev).as_deref(),
            Some(format!("[00:00:02] bob ({fp}): yo\\n  (via mailbox)").as_str())
        );
        assert_eq!(stored_line(&m, "bob").to_string(), "[00:00:02] bob: yo\\n");
        let m = stored(3, Direction::Outgoing, MessageStatus::Delivered, "hi");
        assert_eq!(
            stored_line(&m, "bob").to_string(),
            "[00:00:03] me: hi  (delivered)"
        );
    }

    #[test]
    fn relayed_messages_and_path_changes_say_so() {
        let m = stored(2, Direction::Incoming, MessageStatus::Received, "hi");
        let ev = NodeEvent::MessageReceived {
            from: peer(3),
            from_name: Some("bob".into()),
            message: m,
            via: Via::Relay,
        };
        assert!(event_line(&ev).is_some_and(|l| l.ends_with("hi  (via relay)")));
        let json = event_json(&ev);
        assert_eq!(
            (json["via"].as_str(), json["path"].as_str()),
            (Some("relay"), Some("relay"))
        );
        let found = NodeEvent::PathChanged {
            node_id: peer(3),
            name: Some("bob".into()),
            path: Some(PathKind::Direct),
            addr: Some("198.18.0.12:4000".parse().expect("addr")),
            rtt: Some(std::time::Duration::from_millis(12)),
        };
        assert_eq!(
            event_line(&found).as_deref(),
            Some("* direct path to bob (198.18.0.12:4000, round trip 12 ms)")
        );
        assert_eq!(event_json(&found)["path"], "direct");
        let lost = NodeEvent::PathChanged {
            node_id: peer(3),
            name: Some("bob".into()),
            path: Some(PathKind::Relay),
            addr: None,
            rtt: None,
        };
        assert_eq!(
            event_line(&lost).as_deref(),
            Some("* direct path to bob lost; talking through the relay")
        );
        assert_eq!(
            send_status(SendStatus::Delivered, Some(PathKind::Relay)),
            "delivered via relay"
        );
        assert_eq!(
            send_status(SendStatus::Delivered, Some(PathKind::Direct)),
            "delivered"
        );
        assert_eq!(send_status(SendStatus::Queued, None), "queued");
    }
}
