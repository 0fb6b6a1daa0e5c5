//! Formatting for people and for scripts: errors on one line, escaped peer text, the
//! message and event lines that the chat, `listen` and the full-screen chat share, and
//! their JSON forms.

use p2p_crypto::NodeId;
use p2p_node::{
    store::{Direction, MessageStatus, StoredMessage},
    wire::{Body, MessageId},
    NodeEvent, NotThePeerCause, PathKind, PeerInfo, QueueReason, SendStatus, Via,
};
use serde_json::json;

/// The error and its causes on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    sanitize(&s.replace('\n', " "))
}

/// Text from peers may hold anything: escape control characters so it cannot move the
/// cursor, change colours or forge lines on the terminal.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// One chat message for people: `[HH:MM:SS] who: text`, then each mark as `  (mark)`.
///
/// Every message line is made here, in the line-by-line chat, in `listen` and in the
/// full-screen chat, so a mark (delivery state, how a message travelled) added in one place
/// shows everywhere. `who` and `text` are escaped on the way in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatLine {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who wrote it (`me`, or the peer's label).
    pub who: String,
    /// The text, control characters escaped.
    pub text: String,
    /// Delivery state and the like, each shown as `  (mark)`.
    pub marks: Vec<String>,
}

impl ChatLine {
    /// A line without marks.
    pub fn new(at_ms: u64, who: &str, text: &str) -> ChatLine {
        ChatLine {
            at_ms,
            who: sanitize(who),
            text: sanitize(text),
            marks: Vec::new(),
        }
    }

    /// Adds a mark, shown after the text.
    pub fn mark(mut self, mark: impl AsRef<str>) -> ChatLine {
        self.marks.push(sanitize(mark.as_ref()));
        self
    }

    /// The `[HH:MM:SS]` part.
    pub fn stamp(&self) -> String {
        format!("[{}]", clock(self.at_ms))
    }

    /// The marks as they follow the text: `  (a)  (b)`.
    pub fn marks_text(&self) -> String {
        self.marks.iter().map(|m| format!("  ({m})")).collect()
    }
}

impl std::fmt::Display for ChatLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}{}",
            self.stamp(),
            self.who,
            self.text,
            self.marks_text()
        )
    }
}

/// UTC time of day, `HH:MM:SS`.
pub fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// UTC date and time, `YYYY-MM-DD HH:MM:SS`.
pub fn datetime(ms: u64) -> String {
    let days = (ms / 1000 / 86_400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {}", clock(ms))
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
/// connected to (`path_of`, e.g. [`p2p_node::Node::path_of`]).
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

/// How the chat names a peer: the name given, else the name `known` has for it (e.g.
/// [`p2p_node::Node::name_of`]), else its fingerprint.
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

/// The warning for a message queued because the node at the peer's address is not the
/// peer, naming both keys by fingerprint; `None` for any other reason.
pub fn not_the_peer_warning(reason: &QueueReason) -> Option<String> {
    let QueueReason::NotThePeer {
        addr,
        expected,
        actual,
        cause,
    } = reason
    else {
        return None;
    };
    let at = addr.map_or_else(|| "the peer's address".to_owned(), |a| a.to_string());
    let what = match (cause, actual) {
        (NotThePeerCause::OtherKey, Some(actual)) => {
            format!("authenticated as {}", actual.fingerprint())
        }
        (NotThePeerCause::NoCommonProtocol, _) => "does not speak the chat protocol".to_owned(),
        _ => "presented no valid node certificate".to_owned(),
    };
    Some(format!(
        "the node at {at} is not who discovery says: expected {}, it {what} \
         (possible impersonation, or a stale discovery record); the message stays queued",
        expected.fingerprint()
    ))
}

/// The JSON object `send --json` prints: status, path, id, recipient and, for a queued
/// message, where it waits and why.
pub fn send_json(outcome: &p2p_node::SendOutcome) -> serde_json::Value {
    let reason = outcome.queued_because.map(|r| match r {
        QueueReason::NotThePeer {
            addr,
            expected,
            actual,
            cause,
        } => json!({
            "code": r.as_str(),
            "cause": cause.as_str(),
            "addr": addr.map(|a| a.to_string()),
            "expected": expected.to_string(),
            "actual": actual.map(|a| a.to_string()),
            "message": not_the_peer_warning(&r),
        }),
        other => json!({ "code": other.as_str() }),
    });
    let queued = match outcome.status {
        SendStatus::Queued => Some(outcome.queued.unwrap_or(p2p_node::Queued::Outbox).as_str()),
        SendStatus::Delivered => None,
    };
    json!({
        "status": match outcome.status {
            SendStatus::Delivered => "delivered",
            SendStatus::Queued => "queued",
        },
        "queued": queued,
        "path": outcome.path.map(PathKind::as_str),
        "id": outcome.id.to_string(),
        "to": outcome.to.to_string(),
        "reason": reason,
    })
}

/// A stored message's delivery state, for people.
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
    fn a_node_that_is_not_the_peer_is_named_with_both_fingerprints() {
        let expected = p2p_crypto::SecretKey::generate().public();
        let actual = p2p_crypto::SecretKey::generate().public();
        let addr: std::net::SocketAddr = "192.0.2.7:7000".parse().expect("addr");
        let reason = QueueReason::NotThePeer {
            addr: Some(addr),
            expected,
            actual: Some(actual),
            cause: NotThePeerCause::OtherKey,
        };
        let warning = not_the_peer_warning(&reason).expect("a warning");
        assert!(warning.contains("192.0.2.7:7000"), "{warning}");
        assert!(warning.contains(&expected.fingerprint()), "{warning}");
        assert!(warning.contains(&actual.fingerprint()), "{warning}");
        assert!(warning.contains("impersonation"), "{warning}");
        assert_eq!(not_the_peer_warning(&QueueReason::Offline), None);

        let outcome = p2p_node::SendOutcome {
            id: MessageId::generate(),
            to: expected,
            status: SendStatus::Queued,
            path: None,
            queued_because: Some(reason),
            queued: Some(p2p_node::Queued::Mailbox),
        };
        let v = send_json(&outcome);
        assert_eq!(v["status"], "queued");
        assert_eq!(v["queued"], "mailbox");
        assert_eq!(v["reason"]["code"], "not_the_peer");
        assert_eq!(v["reason"]["cause"], "other_key");
        assert_eq!(v["reason"]["addr"], "192.0.2.7:7000");
        assert_eq!(v["reason"]["expected"], expected.to_string());
        assert_eq!(v["reason"]["actual"], actual.to_string());
        assert_eq!(v["reason"]["message"], warning.as_str());
        let offline = p2p_node::SendOutcome {
            queued_because: Some(QueueReason::Offline),
            ..outcome
        };
        assert_eq!(send_json(&offline)["reason"], json!({"code": "offline"}));
        let delivered = p2p_node::SendOutcome {
            status: SendStatus::Delivered,
            queued_because: None,
            ..offline
        };
        assert_eq!(send_json(&delivered)["reason"], serde_json::Value::Null);
    }

    #[test]
    fn formats_dates() {
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        assert_eq!(datetime(1_795_551_001_000), "2026-11-24 20:10:01");
        assert_eq!(datetime(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[test]
    fn chat_lines_escape_and_mark() {
        let line = ChatLine::new(3_723_000, "bob", "hi\u{1b}[2J").mark("delivered");
        assert_eq!(
            line.to_string(),
            "[01:02:03] bob: hi\\u{1b}[2J  (delivered)"
        );
        assert_eq!(ChatLine::new(0, "me", "x").to_string(), "[00:00:00] me: x");
    }

    #[test]
    fn escapes_control_characters() {
        assert_eq!(sanitize("hi\u{1b}[2Jthere\n"), "hi\\u{1b}[2Jthere\\n");
        assert_eq!(sanitize("héllo 👋"), "héllo 👋");
    }

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
