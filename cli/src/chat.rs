//! The line-by-line chat: the default command when standard input or output is not a
//! terminal, or with `--plain`. Reads commands and messages line by line from stdin and
//! prints messages and notices as they arrive (lines made by [`crate::output`]).

use std::collections::HashSet;

use anyhow::Result;
use p2p_crypto::NodeId;
use p2p_node::{wire::MessageId, Node, NodeEvent, SendStatus};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{
    discovery::Need,
    identity::Paths,
    output::{
        delivered_notice, event_line, marked, online_lines, others_online, peer_label,
        received_line, sanitize, send_status, stored_line, ChatLine,
    },
    running::{open_node, print_discovery, warn_if_not_announced, StopSignals},
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
    let control = crate::running::serve_control(&node, paths, crate::control::Kind::Chat, &stop);
    print_discovery(&node);
    warn_if_not_announced(&node).await;
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
    let mut stop = StopSignals::new()?;
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
            () = stop.recv() => break,
        }
    }
    drop(control);
    node.shutdown().await;
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
