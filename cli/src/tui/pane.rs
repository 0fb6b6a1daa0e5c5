//! What a conversation pane holds (messages and notices), how each entry reads as a line,
//! and how lines wrap into screen rows. Plain data: no terminal.

use std::collections::VecDeque;

use p2p_node::{
    store::{Direction, MessageStatus, StoredMessage},
    wire::MessageId,
    Via,
};
use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

use crate::{
    output::{body_text, status_word, via_mark},
    output::{sanitize, ChatLine},
};

/// At most this many entries stay in a pane; older messages are read from the store again
/// when the user scrolls back to them.
pub const MAX_ENTRIES: usize = 5000;

/// The delivery state of one of our messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutState {
    /// Handed to the node; no answer yet.
    Sending,
    /// As stored: queued, delivered or rejected.
    Stored(MessageStatus),
    /// The node refused it (nothing was stored).
    Failed(String),
}

impl OutState {
    fn mark(&self) -> String {
        match self {
            OutState::Sending => "sending".into(),
            OutState::Stored(s) => status_word(s),
            OutState::Failed(e) => format!("not sent: {e}"),
        }
    }
}

/// A chat message in a pane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Its id, once known (ours get it when the node has stored them).
    pub id: Option<MessageId>,
    /// The number the user interface gave one of ours before it had an id.
    pub local: Option<u64>,
    /// Its place in the store's order, once known.
    pub cursor: Option<(u64, MessageId)>,
    /// When it was stored (or typed).
    pub at_ms: u64,
    /// `me`, or the peer's label.
    pub who: String,
    /// The text as written (escaped when shown).
    pub text: String,
    /// Ours: the delivery state. Theirs: `None`.
    pub out: Option<OutState>,
    /// Theirs: how it arrived, when known.
    pub via: Option<Via>,
}

impl Msg {
    /// A message from the store or from a node event.
    pub fn stored(m: &StoredMessage, peer_label: &str, via: Option<Via>) -> Msg {
        let outgoing = m.direction == Direction::Outgoing;
        Msg {
            id: Some(m.id),
            local: None,
            cursor: Some(m.cursor()),
            at_ms: m.stored_at_ms,
            who: if outgoing { "me" } else { peer_label }.to_string(),
            text: body_text(&m.body).to_string(),
            out: outgoing.then_some(OutState::Stored(m.status)),
            via,
        }
    }

    /// One of ours, just typed.
    pub fn typed(local: u64, at_ms: u64, text: &str) -> Msg {
        Msg {
            id: None,
            local: Some(local),
            cursor: None,
            at_ms,
            who: "me".into(),
            text: text.to_string(),
            out: Some(OutState::Sending),
            via: None,
        }
    }

    /// The message as a line, with its delivery state or how it arrived as marks.
    pub fn line(&self) -> ChatLine {
        let mut line = ChatLine::new(self.at_ms, &self.who, &self.text);
        if let Some(out) = &self.out {
            line = line.mark(out.mark());
        }
        if let Some(mark) = self.via.and_then(via_mark) {
            line = line.mark(mark);
        }
        line
    }
}

/// How a notice reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Information, command output.
    Info,
    /// A message arrived in a conversation not in view.
    Arrival,
    /// Something is wrong.
    Warning,
}

/// One entry of a pane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A chat message.
    Message(Msg),
    /// A line of information (escaped when shown).
    Notice(String, Tone),
}

/// What a piece of a line is, for its style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `[HH:MM:SS]`.
    Time,
    /// `me`.
    Me,
    /// A peer's label.
    Peer,
    /// `: ` and spaces.
    Plain,
    /// Message text.
    Text,
    /// A delivery-state or path mark; the state decides the colour.
    Mark(MarkKind),
    /// A notice.
    Notice(Tone),
}

/// The kind of a mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkKind {
    /// Sending or queued: not there yet.
    Pending,
    /// Delivered.
    Done,
    /// Failed or rejected.
    Bad,
    /// Anything else (e.g. how it travelled).
    Other,
}

/// A line as styled pieces of text (already escaped).
pub type Pieces = Vec<(Part, String)>;

impl Entry {
    /// The entry as pieces; joined, they are the line the line-by-line chat would print.
    pub fn pieces(&self) -> Pieces {
        match self {
            Entry::Notice(text, tone) => vec![(Part::Notice(*tone), sanitize(text))],
            Entry::Message(m) => {
                let line = m.line();
                let who = if m.out.is_some() {
                    Part::Me
                } else {
                    Part::Peer
                };
                let mut out = vec![
                    (Part::Time, line.stamp()),
                    (Part::Plain, " ".into()),
                    (who, line.who.clone()),
                    (Part::Plain, ": ".into()),
                    (Part::Text, line.text.clone()),
                ];
                for (i, mark) in line.marks.iter().enumerate() {
                    let kind = match (i, &m.out) {
                        (0, Some(OutState::Sending | OutState::Stored(MessageStatus::Queued))) => {
                            MarkKind::Pending
                        }
                        (0, Some(OutState::Stored(MessageStatus::Delivered))) => MarkKind::Done,
                        (0, Some(OutState::Failed(_) | OutState::Stored(_))) => MarkKind::Bad,
                        _ => MarkKind::Other,
                    };
                    out.push((Part::Plain, "  ".into()));
                    out.push((Part::Mark(kind), format!("({mark})")));
                }
                out
            }
        }
    }
}

/// Wraps a line into rows of at most `width` columns, breaking between characters.
pub fn wrap(pieces: &Pieces, width: usize) -> Vec<Pieces> {
    let width = width.max(1);
    let mut rows: Vec<Pieces> = Vec::new();
    let mut row: Pieces = Vec::new();
    let mut used = 0;
    for (part, text) in pieces {
        let mut run = String::new();
        for g in text.graphemes(true) {
            let w = g.width();
            if used + w > width && used > 0 {
                if !run.is_empty() {
                    row.push((*part, std::mem::take(&mut run)));
                }
                rows.push(std::mem::take(&mut row));
                used = 0;
            }
            run.push_str(g);
            used += w;
        }
        if !run.is_empty() {
            row.push((*part, run));
        }
    }
    rows.push(row);
    rows
}

/// How many rows an entry takes at `width` columns.
pub fn rows(entry: &Entry, width: usize) -> usize {
    wrap(&entry.pieces(), width).len()
}

/// A scrollable list of entries: a conversation, or the home pane of notices.
#[derive(Debug, Clone, Default)]
pub struct Pane {
    /// Oldest first.
    pub entries: VecDeque<Entry>,
    /// How many rows the view is scrolled up from the newest (0: following the newest).
    pub scroll: usize,
    /// The store cursor of the oldest message loaded, for the next older page.
    pub oldest: Option<(u64, MessageId)>,
    /// Whether the store may hold older messages than those loaded.
    pub more: bool,
    /// Whether a page of older messages is being read.
    pub loading: bool,
}

impl Pane {
    /// Whether a message with this id is in the pane.
    pub fn has(&self, id: &MessageId) -> bool {
        self.find(id).is_some()
    }

    /// The message with this id.
    pub fn find(&self, id: &MessageId) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| matches!(e, Entry::Message(m) if m.id.as_ref() == Some(id)))
    }

    /// Our message with this local number.
    pub fn find_local(&mut self, local: u64) -> Option<&mut Msg> {
        self.entries.iter_mut().find_map(|e| match e {
            Entry::Message(m) if m.local == Some(local) => Some(m),
            _ => None,
        })
    }

    /// The message with this id, to change it in place.
    pub fn message_mut(&mut self, id: &MessageId) -> Option<&mut Msg> {
        self.entries.iter_mut().find_map(|e| match e {
            Entry::Message(m) if m.id.as_ref() == Some(id) => Some(m),
            _ => None,
        })
    }

    /// Appends an entry. A view scrolled back stays where it is (it moves up by the new
    /// rows at `width`). The oldest entries go when there are too many.
    pub fn push(&mut self, entry: Entry, width: usize) {
        if self.scroll > 0 {
            self.scroll += rows(&entry, width);
        }
        self.entries.push_back(entry);
        while self.entries.len() > MAX_ENTRIES {
            self.entries.pop_front();
            self.more = true;
            self.oldest = self.entries.iter().find_map(|e| match e {
                Entry::Message(m) => m.cursor,
                _ => None,
            });
        }
    }

    /// Puts a page of older messages from the store above what is loaded, skipping those
    /// already shown. `full` says the page was as long as asked for (there may be more).
    pub fn prepend(&mut self, page: &[StoredMessage], peer_label: &str, full: bool) {
        self.loading = false;
        self.more = full;
        if let Some(first) = page.first() {
            let c = first.cursor();
            if self.oldest.is_none_or(|o| c < o) {
                self.oldest = Some(c);
            }
        }
        let fresh: Vec<Entry> = page
            .iter()
            .filter(|m| !self.has(&m.id))
            .map(|m| Entry::Message(Msg::stored(m, peer_label, None)))
            .collect();
        for e in fresh.into_iter().rev() {
            if self.entries.len() >= MAX_ENTRIES {
                self.more = true;
                break;
            }
            self.entries.push_front(e);
        }
    }

    /// How many rows every entry takes at `width`.
    pub fn total_rows(&self, width: usize) -> usize {
        self.entries.iter().map(|e| rows(e, width)).sum()
    }
}

/// Stored messages for the tests of the user interface.
#[cfg(test)]
pub(crate) mod test_support {
    use p2p_crypto::{NodeId, SecretKey};
    use p2p_node::wire::Body;

    use super::*;

    /// The NodeId of test peer `n`.
    pub fn peer(n: u8) -> NodeId {
        SecretKey::from_bytes(&[n; 32]).public()
    }

    /// Message `n` with peer 7, stored at `n` seconds.
    pub fn stored(n: u8, dir: Direction, status: MessageStatus, body: &str) -> StoredMessage {
        StoredMessage {
            id: MessageId([n; 16]),
            peer: peer(7),
            direction: dir,
            sent_at_ms: u64::from(n) * 1000,
            stored_at_ms: u64::from(n) * 1000,
            body: Body::Text(body.into()),
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::stored, *};

    fn text(p: &Pieces) -> String {
        p.iter().map(|(_, s)| s.as_str()).collect()
    }

    #[test]
    fn a_message_reads_as_in_the_line_mode() {
        let m = stored(1, Direction::Outgoing, MessageStatus::Queued, "hi\u{7}");
        let e = Entry::Message(Msg::stored(&m, "bob", None));
        assert_eq!(text(&e.pieces()), "[00:00:01] me: hi\\u{7}  (queued)");
        assert_eq!(
            text(&e.pieces()),
            crate::output::stored_line(&m, "bob").to_string()
        );
        let m = stored(2, Direction::Incoming, MessageStatus::Received, "yo");
        let e = Entry::Message(Msg::stored(&m, "bob", Some(Via::Mailbox)));
        assert_eq!(text(&e.pieces()), "[00:00:02] bob: yo  (via mailbox)");
    }

    #[test]
    fn wraps_by_columns_keeping_wide_characters_whole() {
        let pieces = vec![(Part::Text, "ab日本c".to_string())];
        let rows: Vec<String> = wrap(&pieces, 3).iter().map(text).collect();
        assert_eq!(rows, ["ab", "日", "本c"]);
        assert_eq!(wrap(&vec![(Part::Text, String::new())], 5).len(), 1);
    }

    #[test]
    fn pages_go_above_without_repeats() {
        let mut pane = Pane::default();
        let live = stored(5, Direction::Incoming, MessageStatus::Received, "new");
        pane.push(Entry::Message(Msg::stored(&live, "bob", None)), 80);
        let page: Vec<_> = (3..=5)
            .map(|n| stored(n, Direction::Incoming, MessageStatus::Received, "x"))
            .collect();
        pane.prepend(&page, "bob", true);
        let ids: Vec<u8> = pane
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::Message(m) => m.id.map(|i| i.0[0]),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [3, 4, 5]);
        assert_eq!(pane.oldest, Some(page[0].cursor()));
        assert!(pane.more);
    }

    #[test]
    fn a_pane_keeps_the_newest_entries_and_can_read_the_rest_again() {
        let mut pane = Pane::default();
        for n in 0..=MAX_ENTRIES {
            let mut m = stored(0, Direction::Incoming, MessageStatus::Received, "m");
            m.id = MessageId((n as u128).to_be_bytes());
            m.stored_at_ms = n as u64;
            pane.push(Entry::Message(Msg::stored(&m, "bob", None)), 80);
        }
        assert_eq!(pane.entries.len(), MAX_ENTRIES);
        assert!(pane.more);
        assert_eq!(pane.oldest.map(|c| c.0), Some(1), "the oldest kept");
    }

    #[test]
    fn a_scrolled_view_stays_put_when_lines_arrive() {
        let mut pane = Pane {
            scroll: 2,
            ..Pane::default()
        };
        pane.push(Entry::Notice("x".repeat(25), Tone::Info), 10);
        assert_eq!(pane.scroll, 5);
    }
}
