//! The state of the full-screen chat: the conversations, the input line, who is online, and
//! what the user sees. Plain data, as a state machine: key presses, node events and the
//! results of background work go in, [`Action`]s for the driver come out. No terminal, no
//! network, no clock of its own.

use std::collections::{BTreeMap, HashSet, VecDeque};

use crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use p2p_crypto::NodeId;
use p2p_node::{
    store::{MessageStatus, StoredMessage},
    wire::{MessageId, MAX_TEXT_LEN},
    NodeEvent, Resolved, SendOutcome, SendStatus,
};

use super::{
    complete::complete,
    editor::{Editor, InputHistory},
    pane::{Entry, Msg, OutState, Pane, Tone},
};
use crate::{
    output::{delivered_notice, event_line, online_lines, peer_label, sanitize, stored_line},
    session::{self, Input, COMMAND_HELP},
};

/// Messages read from the store at a time, when a conversation opens and when the user
/// scrolls back past what is loaded.
pub const PAGE: usize = 50;
/// Conversations open at once; messages from further peers only get a notice.
pub const MAX_CONVERSATIONS: usize = 50;
/// Our messages waiting for their turn to be sent (one at a time per peer, in order).
pub const MAX_WAITING: usize = 200;
/// Rows of the screen that are not the conversation pane: status, tabs, input.
pub const CHROME_ROWS: u16 = 3;
/// Lines kept for Up/Down.
const INPUT_HISTORY: usize = 500;
/// Delivery receipts kept for messages whose send has not answered yet.
const EARLY_RECEIPTS: usize = 256;

const KEY_HELP: &str = "\
keys:
  Enter                      send the line, or run the command
  Up, Down                   lines typed before
  Tab                        complete a command or a name
  PgUp, PgDn                 scroll (older messages load as you go)
  Ctrl+N, Ctrl+P, Alt+1..9   next, previous, or Nth conversation (1 is home)
  Ctrl+A/E/W/U/K, arrows     edit the line (Ctrl+Left/Right: by word)
  Ctrl+L                     redraw the screen
  Ctrl+C, Ctrl+D, /quit      log out and exit
in a conversation, any other line is sent to the other side.";

/// What the driver is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Work with the node, in the background.
    Do(Work),
    /// Clear and redraw the whole screen.
    Redraw,
    /// Log out and exit.
    Quit,
}

/// Work with the node; each answers with a [`Done`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Send `text` to `peer`; answer with [`Done::Sent`].
    Send {
        /// The recipient.
        peer: NodeId,
        /// The number of the message's line.
        local: u64,
        /// The text.
        text: String,
    },
    /// Read a page of the conversation older than `before`; answer with [`Done::Page`].
    LoadPage {
        /// The peer.
        peer: NodeId,
        /// The cursor of the oldest message loaded, or `None` for the newest page.
        before: Option<(u64, MessageId)>,
    },
    /// Resolve a name for `/chat`; answer with [`Done::Opened`].
    Open(String),
    /// List who is online; answer with [`Done::Peers`].
    Peers,
    /// `/history`; answer with [`Done::History`].
    History {
        /// The peer's name or NodeId.
        who: String,
        /// How many messages.
        n: usize,
    },
    /// `/register`; answer with [`Done::Registered`].
    Register(String),
    /// Wait for the login; answer with [`Done::LoggedIn`].
    WatchLogin,
}

/// The result of a piece of [`Work`], back from the driver.
#[derive(Debug, Clone)]
pub enum Done {
    /// A send finished.
    Sent {
        /// The recipient.
        peer: NodeId,
        /// The number of the message's line.
        local: u64,
        /// What the node said, or why it refused.
        result: Result<SendOutcome, String>,
    },
    /// A page of the conversation.
    Page {
        /// The peer.
        peer: NodeId,
        /// The messages, oldest first, or why they could not be read.
        result: Result<Vec<StoredMessage>, String>,
    },
    /// A `/chat` name resolved.
    Opened {
        /// What the user typed.
        query: String,
        /// Who it is.
        result: Result<Resolved, String>,
    },
    /// The online list.
    Peers(Result<Vec<(NodeId, Option<String>)>, String>),
    /// `/history`'s messages.
    History {
        /// What the user typed.
        who: String,
        /// The messages.
        result: Result<Vec<StoredMessage>, String>,
    },
    /// `/register` finished.
    Registered {
        /// The name.
        name: String,
        /// Whether it worked.
        result: Result<(), String>,
    },
    /// Whether the node is announced ("logged in") on discovery.
    LoggedIn(bool),
}

/// Who this node is, for the status line.
#[derive(Debug, Clone)]
pub struct Me {
    /// The registered name, if any.
    pub name: Option<String>,
    /// The NodeId.
    pub id: NodeId,
    /// The discovery server in use.
    pub discovery: Option<String>,
}

/// The node's standing with discovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// Announcing for the first time.
    Connecting,
    /// Announced.
    LoggedIn,
    /// The first announcement is late; the node keeps trying.
    Retrying,
    /// Withdrawing the presence.
    LoggingOut,
}

/// A conversation with one peer.
#[derive(Debug, Clone)]
pub struct Conversation {
    /// The peer.
    pub peer: NodeId,
    /// How it is shown (escaped).
    pub label: String,
    /// Its messages.
    pub pane: Pane,
    /// Messages that arrived while it was not in view.
    pub unread: usize,
}

/// Tab pressed again: the next candidate replaces the last.
#[derive(Debug, Clone)]
struct Cycle {
    start: usize,
    end: usize,
    candidates: Vec<String>,
    index: usize,
}

/// One of our messages waiting to be sent.
#[derive(Debug, Clone)]
struct Waiting {
    peer: NodeId,
    local: u64,
    text: String,
}

/// Everything the full-screen chat shows and remembers.
#[derive(Debug)]
pub struct App {
    /// This node.
    pub me: Me,
    /// Login state.
    pub login: Login,
    /// Who else is online, with their names.
    pub online: BTreeMap<NodeId, Option<String>>,
    /// Notices and command output (view 0).
    pub home: Pane,
    /// Open conversations (views 1..).
    pub convs: Vec<Conversation>,
    /// What is in view: 0 is home, `i` is `convs[i - 1]`.
    pub view: usize,
    /// The input line.
    pub editor: Editor,
    /// A short note shown beside the tabs until the next key (e.g. Tab's candidates).
    pub hint: Option<String>,
    /// Terminal size (columns, rows).
    pub size: (u16, u16),
    history: InputHistory,
    cycle: Option<Cycle>,
    next_local: u64,
    waiting: VecDeque<Waiting>,
    in_flight: HashSet<NodeId>,
    early: VecDeque<MessageId>,
}

impl App {
    /// The chat of this node, before anything happened.
    pub fn new(me: Me) -> App {
        App {
            me,
            login: Login::Connecting,
            online: BTreeMap::new(),
            home: Pane::default(),
            convs: Vec::new(),
            view: 0,
            editor: Editor::new(MAX_TEXT_LEN),
            hint: None,
            size: (80, 24),
            history: InputHistory::new(INPUT_HISTORY),
            cycle: None,
            next_local: 0,
            waiting: VecDeque::new(),
            in_flight: HashSet::new(),
            early: VecDeque::new(),
        }
    }

    /// Columns and rows of the conversation pane.
    pub fn pane_size(&self) -> (usize, usize) {
        (
            usize::from(self.size.0.max(1)),
            usize::from(self.size.1.saturating_sub(CHROME_ROWS).max(1)),
        )
    }

    /// The pane in view.
    pub fn pane(&self) -> &Pane {
        match self.view.checked_sub(1).and_then(|i| self.convs.get(i)) {
            Some(c) => &c.pane,
            None => &self.home,
        }
    }

    fn pane_mut(&mut self) -> &mut Pane {
        match self.view.checked_sub(1) {
            Some(i) if i < self.convs.len() => &mut self.convs[i].pane,
            _ => &mut self.home,
        }
    }

    /// The conversation in view, if it is one.
    pub fn conversation(&self) -> Option<&Conversation> {
        self.view.checked_sub(1).and_then(|i| self.convs.get(i))
    }

    fn conv_index(&self, peer: &NodeId) -> Option<usize> {
        self.convs.iter().position(|c| c.peer == *peer)
    }

    /// Adds a notice to the pane in view.
    pub fn notice(&mut self, text: impl Into<String>, tone: Tone) {
        let width = self.pane_size().0;
        self.pane_mut()
            .push(Entry::Notice(text.into(), tone), width);
    }

    /// Adds a notice to the home pane, and to the pane in view too for a warning.
    pub fn notice_home(&mut self, text: impl Into<String>, tone: Tone) {
        let text = text.into();
        let width = self.pane_size().0;
        if self.view != 0 && tone == Tone::Warning {
            self.notice(text.clone(), tone);
        }
        self.home.push(Entry::Notice(text, tone), width);
    }

    /// Shows view `view` (0 is home) and clears its unread counter.
    pub fn show(&mut self, view: usize) {
        if view > self.convs.len() {
            return;
        }
        self.view = view;
        if let Some(c) = view.checked_sub(1).and_then(|i| self.convs.get_mut(i)) {
            c.unread = 0;
        }
    }

    /// Opens a conversation with `peer` unless it is open; returns its view and the page
    /// to read. `None` when too many are open.
    fn open(&mut self, peer: NodeId, label: String) -> Option<(usize, Vec<Action>)> {
        if let Some(i) = self.conv_index(&peer) {
            return Some((i + 1, Vec::new()));
        }
        if self.convs.len() >= MAX_CONVERSATIONS {
            return None;
        }
        self.convs.push(Conversation {
            peer,
            label,
            pane: Pane {
                loading: true,
                ..Pane::default()
            },
            unread: 0,
        });
        Some((
            self.convs.len(),
            vec![Action::Do(Work::LoadPage { peer, before: None })],
        ))
    }

    /// A terminal event: a key, a paste or a resize.
    pub fn on_terminal(&mut self, ev: Event, now_ms: u64) -> Vec<Action> {
        match ev {
            Event::Key(k) if k.kind != KeyEventKind::Release => self.on_key(k, now_ms),
            Event::Paste(text) => {
                self.forget_tab();
                self.history.reset();
                if !self.editor.insert(&text) {
                    self.hint = Some(format!("the line is full ({MAX_TEXT_LEN} bytes)"));
                }
                Vec::new()
            }
            Event::Resize(w, h) => {
                self.resize(w, h);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// The terminal has a new size. A scrolled-back view keeps its place from the bottom.
    pub fn resize(&mut self, cols: u16, rows: u16) {
        self.size = (cols, rows);
        let (w, h) = self.pane_size();
        for pane in
            std::iter::once(&mut self.home).chain(self.convs.iter_mut().map(|c| &mut c.pane))
        {
            if pane.scroll > 0 {
                pane.scroll = pane.scroll.min(pane.total_rows(w).saturating_sub(h));
            }
        }
    }

    fn forget_tab(&mut self) {
        self.cycle = None;
        self.hint = None;
    }

    /// A key press.
    pub fn on_key(&mut self, key: KeyEvent, now_ms: u64) -> Vec<Action> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        if key.code != KeyCode::Tab {
            self.forget_tab();
        }
        let e = &mut self.editor;
        match key.code {
            KeyCode::Char('c') if ctrl => return vec![Action::Quit],
            KeyCode::Char('d') if ctrl && e.is_empty() => return vec![Action::Quit],
            KeyCode::Char('d') if ctrl => e.delete(),
            KeyCode::Char('l') if ctrl => return vec![Action::Redraw],
            KeyCode::Char('n') if ctrl => self.show((self.view + 1) % (self.convs.len() + 1)),
            KeyCode::Char('p') if ctrl => {
                let n = self.convs.len() + 1;
                self.show((self.view + n - 1) % n);
            }
            KeyCode::Char('a') if ctrl => e.home(),
            KeyCode::Char('e') if ctrl => e.end(),
            KeyCode::Char('b') if ctrl => e.left(),
            KeyCode::Char('f') if ctrl => e.right(),
            KeyCode::Char('w') if ctrl => e.delete_word(),
            KeyCode::Char('u') if ctrl => e.delete_to_start(),
            KeyCode::Char('k') if ctrl => e.delete_to_end(),
            KeyCode::Char('h') if ctrl => e.backspace(),
            KeyCode::Char(c @ '1'..='9') if alt => {
                self.show(usize::from(c as u8 - b'1'));
            }
            KeyCode::Char('b') if alt => e.word_left(),
            KeyCode::Char('f') if alt => e.word_right(),
            KeyCode::Char(c) if !ctrl && !alt => {
                self.history.reset();
                if !e.insert(c.encode_utf8(&mut [0; 4])) {
                    self.hint = Some(format!("the line is full ({MAX_TEXT_LEN} bytes)"));
                }
            }
            KeyCode::Enter => return self.submit(now_ms),
            KeyCode::Backspace => e.backspace(),
            KeyCode::Delete => e.delete(),
            KeyCode::Left if ctrl || alt => e.word_left(),
            KeyCode::Right if ctrl || alt => e.word_right(),
            KeyCode::Left => e.left(),
            KeyCode::Right => e.right(),
            KeyCode::Home => e.home(),
            KeyCode::End => e.end(),
            KeyCode::Up => {
                if let Some(line) = self.history.up(self.editor.text()) {
                    let line = line.to_string();
                    self.editor.set(&line);
                }
            }
            KeyCode::Down => {
                if let Some(line) = self.history.down() {
                    let line = line.to_string();
                    self.editor.set(&line);
                }
            }
            KeyCode::PageUp => return self.scroll(true),
            KeyCode::PageDown => return self.scroll(false),
            KeyCode::Tab => self.tab(),
            _ => {}
        }
        Vec::new()
    }

    /// PageUp/PageDown: by a pane less one row. Near the top of what is loaded, the next
    /// older page is read.
    fn scroll(&mut self, up: bool) -> Vec<Action> {
        let (w, h) = self.pane_size();
        let step = h.saturating_sub(1).max(1);
        let peer = self.conversation().map(|c| c.peer);
        let pane = self.pane_mut();
        let total = pane.total_rows(w);
        pane.scroll = if up {
            (pane.scroll + step).min(total.saturating_sub(h))
        } else {
            pane.scroll.saturating_sub(step)
        };
        match peer {
            Some(peer) if up && pane.more && !pane.loading && pane.scroll + h + step >= total => {
                pane.loading = true;
                vec![Action::Do(Work::LoadPage {
                    peer,
                    before: pane.oldest,
                })]
            }
            _ => Vec::new(),
        }
    }

    /// Names Tab completes: who is online and the open conversations.
    fn names(&self) -> Vec<String> {
        let mine = self.me.name.as_deref();
        self.online
            .values()
            .flatten()
            .map(|n| sanitize(n))
            .chain(self.convs.iter().map(|c| c.label.clone()))
            .filter(|n| Some(n.as_str()) != mine)
            .collect()
    }

    fn tab(&mut self) {
        if let Some(c) = &mut self.cycle {
            c.index = (c.index + 1) % c.candidates.len();
            let with = c.candidates[c.index].clone();
            self.editor.replace(c.start, c.end, &with);
            c.end = c.start + with.len();
            return;
        }
        let names = self.names();
        let cursor = self.editor.cursor();
        let before = &self.editor.text()[..cursor];
        let Some(done) = complete(before, names.iter().map(String::as_str)) else {
            return;
        };
        if let [only] = done.candidates.as_slice() {
            self.editor.replace(done.start, cursor, &format!("{only} "));
            return;
        }
        self.hint = Some(done.candidates.join(" "));
        let prefix = done.common_prefix().to_string();
        if prefix.len() > done.word.len() {
            self.editor.replace(done.start, cursor, &prefix);
        } else {
            let first = done.candidates[0].clone();
            self.editor.replace(done.start, cursor, &first);
            self.cycle = Some(Cycle {
                start: done.start,
                end: done.start + first.len(),
                candidates: done.candidates,
                index: 0,
            });
        }
    }

    /// Enter: runs the command or sends the line.
    fn submit(&mut self, now_ms: u64) -> Vec<Action> {
        let line = self.editor.take();
        self.history.push(&line);
        match session::parse(&line) {
            Input::Empty => {}
            Input::Quit => return vec![Action::Quit],
            Input::Help => {
                for l in format!("commands:\n{COMMAND_HELP}\n{KEY_HELP}").lines() {
                    self.notice(l, Tone::Info);
                }
            }
            Input::Peers => return vec![Action::Do(Work::Peers)],
            Input::Leave => match self.view.checked_sub(1) {
                Some(i) if i < self.convs.len() => {
                    let c = self.convs.remove(i);
                    self.view = 0;
                    self.notice(format!("left the chat with {}", c.label), Tone::Info);
                }
                _ => self.notice("no chat room is open", Tone::Info),
            },
            Input::Register(name) => return vec![Action::Do(Work::Register(name.to_string()))],
            Input::Chat(who) => {
                match self
                    .convs
                    .iter()
                    .position(|c| c.label == who || c.peer.to_string() == who)
                {
                    Some(i) => self.show(i + 1),
                    None => return vec![Action::Do(Work::Open(who.to_string()))],
                }
            }
            Input::History { who, n } => {
                return vec![Action::Do(Work::History {
                    who: who.to_string(),
                    n,
                })]
            }
            Input::Unknown(c) => self.notice(
                format!("unknown or incomplete command {c}; /help lists them"),
                Tone::Info,
            ),
            Input::Text(text) => match self.conversation().map(|c| c.peer) {
                Some(_) if self.waiting.len() >= MAX_WAITING => {
                    self.notice(
                        "too many messages are waiting to be sent; try again in a moment",
                        Tone::Warning,
                    );
                    self.editor.set(text);
                }
                Some(peer) => {
                    let local = self.next_local;
                    self.next_local += 1;
                    let width = self.pane_size().0;
                    self.pane_mut()
                        .push(Entry::Message(Msg::typed(local, now_ms, text)), width);
                    self.pane_mut().scroll = 0;
                    self.waiting.push_back(Waiting {
                        peer,
                        local,
                        text: text.to_string(),
                    });
                    return self.next_sends();
                }
                None => self.notice(
                    "no chat room is open: /chat NAME first (/help for commands)",
                    Tone::Info,
                ),
            },
        }
        Vec::new()
    }

    /// Starts the oldest waiting message of every peer that has none in flight.
    fn next_sends(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() {
            if self.in_flight.contains(&self.waiting[i].peer) {
                i += 1;
                continue;
            }
            let Some(w) = self.waiting.remove(i) else {
                break;
            };
            self.in_flight.insert(w.peer);
            actions.push(Action::Do(Work::Send {
                peer: w.peer,
                local: w.local,
                text: w.text,
            }));
        }
        actions
    }

    /// An event of the node. `known` gives the name the node knows for a NodeId.
    pub fn on_node_event(
        &mut self,
        ev: &NodeEvent,
        known: &dyn Fn(&NodeId) -> Option<String>,
    ) -> Vec<Action> {
        match ev {
            NodeEvent::PeerOnline { node_id, name } if *node_id != self.me.id => {
                if self.online.insert(*node_id, name.clone()).is_none() {
                    self.peer_notice(node_id, ev);
                }
            }
            NodeEvent::PeerOffline { node_id, .. } => {
                if self.online.remove(node_id).is_some() {
                    self.peer_notice(node_id, ev);
                }
            }
            NodeEvent::MessageReceived {
                from,
                from_name,
                message,
                via,
            } => {
                let label = peer_label(from, from_name.as_deref(), known);
                let width = self.pane_size().0;
                let Some((view, actions)) = self.open(*from, label.clone()) else {
                    self.notice(format!("New message from {label}"), Tone::Arrival);
                    return Vec::new();
                };
                let conv = &mut self.convs[view - 1];
                if conv.pane.has(&message.id) {
                    return actions;
                }
                let msg = Msg::stored(message, &conv.label, Some(*via));
                conv.pane.push(Entry::Message(msg), width);
                if self.view != view {
                    conv.unread += 1;
                    self.notice(format!("New message from {label}"), Tone::Arrival);
                }
                return actions;
            }
            NodeEvent::MessageDelivered { to, id, .. } => {
                let shown = self
                    .conv_index(to)
                    .and_then(|i| self.convs[i].pane.message_mut(id));
                if let Some(m) = shown {
                    m.out = Some(OutState::Stored(MessageStatus::Delivered));
                } else if self.in_flight.contains(to) {
                    // Its send has not answered yet: apply the receipt when it does.
                    if self.early.len() >= EARLY_RECEIPTS {
                        self.early.pop_front();
                    }
                    self.early.push_back(*id);
                } else {
                    let label = peer_label(to, None, known);
                    self.notice(delivered_notice(&label, id), Tone::Info);
                }
            }
            NodeEvent::DiscoveryChanged(status) => {
                self.me.discovery = crate::discovery::short_label(status);
                // One notice per line: the pane shows a line break as `\n`.
                for line in crate::discovery::status_text(status).lines() {
                    self.notice_home(line.to_owned(), Tone::Info);
                }
            }
            other => {
                if let Some(line) = event_line(other) {
                    let tone = if matches!(
                        other,
                        NodeEvent::KeyChanged { .. } | NodeEvent::StorageFailing { .. }
                    ) {
                        Tone::Warning
                    } else {
                        Tone::Info
                    };
                    self.notice_home(line, tone);
                }
            }
        }
        Vec::new()
    }

    /// "is online" / "went offline": in the home pane and the peer's conversation.
    fn peer_notice(&mut self, peer: &NodeId, ev: &NodeEvent) {
        let Some(line) = event_line(ev) else { return };
        let width = self.pane_size().0;
        if let Some(i) = self.conv_index(peer) {
            self.convs[i]
                .pane
                .push(Entry::Notice(line.clone(), Tone::Info), width);
        }
        self.home.push(Entry::Notice(line, Tone::Info), width);
    }

    /// Fills in the names of online peers that had none when they came online (they
    /// registered since), from what the node knows now.
    pub fn learn_names(&mut self, known: &dyn Fn(&NodeId) -> Option<String>) {
        for (id, name) in self.online.iter_mut().filter(|(_, n)| n.is_none()) {
            *name = known(id);
        }
    }

    /// Events were lost because the screen fell behind.
    pub fn missed(&mut self, n: u64) {
        self.notice_home(format!("(missed {n} notices)"), Tone::Warning);
    }

    /// A line of the program's log (warnings and errors).
    pub fn on_log(&mut self, line: &str) {
        self.notice_home(line.trim_end(), Tone::Warning);
    }

    /// The result of background work.
    pub fn on_done(&mut self, done: Done) -> Vec<Action> {
        match done {
            Done::Sent {
                peer,
                local,
                result,
            } => {
                self.in_flight.remove(&peer);
                self.sent(peer, local, result);
                return self.next_sends();
            }
            Done::Page { peer, result } => {
                let Some(i) = self.conv_index(&peer) else {
                    return Vec::new();
                };
                let conv = &mut self.convs[i];
                match result {
                    Ok(page) => {
                        let full = page.len() >= PAGE;
                        conv.pane.prepend(&page, &conv.label, full);
                    }
                    Err(e) => {
                        conv.pane.loading = false;
                        let width = self.pane_size().0;
                        self.convs[i].pane.push(
                            Entry::Notice(format!("cannot read the history: {e}"), Tone::Warning),
                            width,
                        );
                    }
                }
            }
            Done::Opened { query, result } => match result {
                Ok(r) if r.node_id == self.me.id => {
                    self.notice("that is this node; /chat someone else", Tone::Info);
                }
                Ok(r) => {
                    let label = sanitize(r.name.as_deref().unwrap_or(&query));
                    match self.open(r.node_id, label) {
                        Some((view, actions)) => {
                            self.show(view);
                            return actions;
                        }
                        None => self.notice(
                            format!("{MAX_CONVERSATIONS} conversations are open; /leave one first"),
                            Tone::Warning,
                        ),
                    }
                }
                Err(e) => self.notice(format!("error: {e}"), Tone::Warning),
            },
            Done::Peers(Ok(others)) => {
                self.online = others
                    .iter()
                    .filter(|(id, _)| *id != self.me.id)
                    .cloned()
                    .collect();
                // Path changes show as notices as they happen; the list shows names.
                for line in online_lines(&others, |_| None) {
                    self.notice(line, Tone::Info);
                }
            }
            Done::Peers(Err(e)) => self.notice(format!("cannot list peers: {e}"), Tone::Warning),
            Done::History { who, result } => match result {
                Ok(msgs) if msgs.is_empty() => {
                    self.notice(format!("no messages with {}", sanitize(&who)), Tone::Info);
                }
                Ok(msgs) => {
                    let label = sanitize(&who);
                    for m in &msgs {
                        self.notice(stored_line(m, &label).to_string(), Tone::Info);
                    }
                }
                Err(e) => self.notice(format!("error: {e}"), Tone::Warning),
            },
            Done::Registered { name, result } => match result {
                Ok(()) => {
                    self.notice(format!("registered {}", sanitize(&name)), Tone::Info);
                    self.me.name = Some(name);
                }
                Err(e) => self.notice(format!("error: {e}"), Tone::Warning),
            },
            Done::LoggedIn(true) => {
                if self.login != Login::LoggedIn {
                    self.login = Login::LoggedIn;
                    let line = format!(
                        "logged in as {} ({}), discovery {}",
                        self.me
                            .name
                            .as_deref()
                            .map(sanitize)
                            .unwrap_or_else(|| "<no name yet: /register NAME>".into()),
                        self.me.id.fingerprint(),
                        self.me.discovery.as_deref().unwrap_or("none"),
                    );
                    self.notice_home(line, Tone::Info);
                }
            }
            Done::LoggedIn(false) => {
                if self.login == Login::Connecting {
                    self.notice_home(
                        format!(
                            "not logged in on discovery {} yet; retrying in the background",
                            self.me.discovery.as_deref().unwrap_or("none")
                        ),
                        Tone::Warning,
                    );
                }
                self.login = Login::Retrying;
                return vec![Action::Do(Work::WatchLogin)];
            }
        }
        Vec::new()
    }

    /// A send answered: the line of the message shows its state in place.
    fn sent(&mut self, peer: NodeId, local: u64, result: Result<SendOutcome, String>) {
        let Some(i) = self.conv_index(&peer) else {
            return;
        };
        let pane = &mut self.convs[i].pane;
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                if let Some(m) = pane.find_local(local) {
                    m.out = Some(OutState::Failed(e));
                }
                return;
            }
        };
        // A page read while the send ran may already show the message: keep one line.
        if let Some(dup) = pane.find(&outcome.id) {
            pane.entries.remove(dup);
        }
        let receipt = self.early.iter().position(|id| *id == outcome.id);
        if let Some(p) = receipt {
            self.early.remove(p);
        }
        let status = match outcome.status {
            SendStatus::Delivered => MessageStatus::Delivered,
            SendStatus::Queued if receipt.is_some() => MessageStatus::Delivered,
            SendStatus::Queued => MessageStatus::Queued,
        };
        if let Some(m) = pane.find_local(local) {
            m.id = Some(outcome.id);
            m.out = Some(OutState::Stored(status));
            if outcome.path == Some(p2p_node::PathKind::Relay) {
                m.via = Some(p2p_node::Via::Relay);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use p2p_node::store::Direction;

    use super::{
        super::pane::test_support::{peer, stored},
        *,
    };

    fn app() -> App {
        let mut app = App::new(Me {
            name: Some("alice".into()),
            id: peer(1),
            discovery: Some("http://127.0.0.1:1".into()),
        });
        app.resize(60, 20);
        app
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn ctrl(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
    }

    fn typed(app: &mut App, text: &str) -> Vec<Action> {
        let mut actions = Vec::new();
        for c in text.chars() {
            actions.extend(app.on_key(key(KeyCode::Char(c)), 0));
        }
        actions
    }

    fn enter(app: &mut App, text: &str) -> Vec<Action> {
        typed(app, text);
        app.on_key(key(KeyCode::Enter), 5_000)
    }

    fn no_names(_: &NodeId) -> Option<String> {
        None
    }

    fn received(app: &mut App, from: NodeId, name: &str, n: u8, text: &str) -> Vec<Action> {
        let mut message = stored(n, Direction::Incoming, MessageStatus::Received, text);
        message.peer = from;
        app.on_node_event(
            &NodeEvent::MessageReceived {
                from,
                from_name: Some(name.into()),
                message,
                via: p2p_node::Via::Direct,
            },
            &no_names,
        )
    }

    /// Opens a conversation with `peer(n)` called `name` and answers its first page.
    fn open(app: &mut App, n: u8, name: &str) {
        assert_eq!(
            enter(app, &format!("/chat {name}")),
            [Action::Do(Work::Open(name.into()))]
        );
        let actions = app.on_done(Done::Opened {
            query: name.into(),
            result: Ok(Resolved {
                node_id: peer(n),
                name: Some(name.into()),
            }),
        });
        assert_eq!(
            actions,
            [Action::Do(Work::LoadPage {
                peer: peer(n),
                before: None
            })]
        );
        app.on_done(Done::Page {
            peer: peer(n),
            result: Ok(Vec::new()),
        });
    }

    fn texts(pane: &Pane) -> Vec<String> {
        pane.entries
            .iter()
            .map(|e| e.pieces().iter().map(|(_, s)| s.as_str()).collect())
            .collect()
    }

    #[test]
    fn a_sent_line_shows_sending_then_queued_then_delivered_in_place() {
        let mut app = app();
        open(&mut app, 2, "bob");
        let actions = enter(&mut app, "hello");
        let [Action::Do(Work::Send {
            peer: to,
            local,
            text,
        })] = actions.as_slice()
        else {
            panic!("one send: {actions:?}");
        };
        assert_eq!((*to, text.as_str()), (peer(2), "hello"));
        assert_eq!(texts(app.pane()), ["[00:00:05] me: hello  (sending)"]);
        // A second line waits for the first: messages to one peer go in order.
        assert!(enter(&mut app, "again").is_empty());
        let id = MessageId([9; 16]);
        let next = app.on_done(Done::Sent {
            peer: peer(2),
            local: *local,
            result: Ok(SendOutcome {
                id,
                to: peer(2),
                status: SendStatus::Queued,
                path: None,
                queued_because: None,
                queued: Some(p2p_node::Queued::Mailbox),
            }),
        });
        assert!(
            matches!(next.as_slice(), [Action::Do(Work::Send { text, .. })] if text == "again")
        );
        assert_eq!(texts(app.pane())[0], "[00:00:05] me: hello  (queued)");
        app.on_node_event(
            &NodeEvent::MessageDelivered {
                to: peer(2),
                id,
                path: None,
            },
            &no_names,
        );
        assert_eq!(texts(app.pane())[0], "[00:00:05] me: hello  (delivered)");
        assert_eq!(app.pane().entries.len(), 2, "updated in place, no new line");
    }

    #[test]
    fn a_message_delivered_through_the_relay_says_so() {
        let mut app = app();
        open(&mut app, 2, "bob");
        let local = match enter(&mut app, "relayed").as_slice() {
            [Action::Do(Work::Send { local, .. })] => *local,
            other => panic!("unexpected {other:?}"),
        };
        app.on_done(Done::Sent {
            peer: peer(2),
            local,
            result: Ok(SendOutcome {
                id: MessageId([4; 16]),
                to: peer(2),
                status: SendStatus::Delivered,
                path: Some(p2p_node::PathKind::Relay),
                queued_because: None,
                queued: None,
            }),
        });
        assert_eq!(
            texts(app.pane()),
            ["[00:00:05] me: relayed  (delivered)  (via relay)"]
        );
    }

    #[test]
    fn a_receipt_before_the_send_answers_is_kept() {
        let mut app = app();
        open(&mut app, 2, "bob");
        enter(&mut app, "hi");
        let id = MessageId([3; 16]);
        app.on_node_event(
            &NodeEvent::MessageDelivered {
                to: peer(2),
                id,
                path: None,
            },
            &no_names,
        );
        app.on_done(Done::Sent {
            peer: peer(2),
            local: 0,
            result: Ok(SendOutcome {
                id,
                to: peer(2),
                status: SendStatus::Queued,
                path: None,
                queued_because: None,
                queued: Some(p2p_node::Queued::Mailbox),
            }),
        });
        assert_eq!(texts(app.pane()), ["[00:00:05] me: hi  (delivered)"]);
    }

    #[test]
    fn a_failed_send_says_so_on_its_line() {
        let mut app = app();
        open(&mut app, 2, "bob");
        enter(&mut app, "hi");
        app.on_done(Done::Sent {
            peer: peer(2),
            local: 0,
            result: Err("no route".into()),
        });
        assert_eq!(
            texts(app.pane()),
            ["[00:00:05] me: hi  (not sent: no route)"]
        );
    }

    #[test]
    fn unread_counters_and_notices_for_conversations_not_in_view() {
        let mut app = app();
        open(&mut app, 2, "bob");
        // Carol writes while bob's conversation is in view: a tab with a counter.
        let actions = received(&mut app, peer(3), "carol", 1, "psst");
        assert_eq!(
            actions,
            [Action::Do(Work::LoadPage {
                peer: peer(3),
                before: None
            })]
        );
        received(&mut app, peer(3), "carol", 2, "still there?");
        assert_eq!(app.convs[1].unread, 2);
        assert_eq!(
            texts(app.pane()),
            ["New message from carol", "New message from carol"]
        );
        // Bob's message shows in place without a notice.
        received(&mut app, peer(2), "bob", 3, "hi alice");
        assert_eq!(app.convs[0].unread, 0);
        assert_eq!(texts(app.pane())[2], "[00:00:03] bob: hi alice");
        // Ctrl+N shows carol's conversation and clears her counter.
        app.on_key(ctrl('n'), 0);
        assert_eq!(app.view, 2);
        assert_eq!(app.convs[1].unread, 0);
        // Her first page repeats what is shown: no line twice.
        let page: Vec<_> = (0..=2)
            .map(|n| {
                let mut m = stored(n, Direction::Incoming, MessageStatus::Received, "x");
                m.peer = peer(3);
                m
            })
            .collect();
        app.on_done(Done::Page {
            peer: peer(3),
            result: Ok(page),
        });
        assert_eq!(app.pane().entries.len(), 3);
        // Alt+1 is home; Ctrl+P wraps round to the last conversation.
        app.on_key(KeyEvent::new(KeyCode::Char('1'), KeyModifiers::ALT), 0);
        assert_eq!(app.view, 0);
        app.on_key(ctrl('p'), 0);
        assert_eq!(app.view, 2);
        // /chat NAME switches to an open conversation without asking the node.
        assert!(enter(&mut app, "/chat bob").is_empty());
        assert_eq!(app.view, 1);
        enter(&mut app, "/leave");
        assert_eq!((app.view, app.convs.len()), (0, 1));
    }

    #[test]
    fn the_input_line_survives_arrivals_and_recalls_lines() {
        let mut app = app();
        open(&mut app, 2, "bob");
        enter(&mut app, "first line");
        typed(&mut app, "half-typ");
        received(&mut app, peer(2), "bob", 1, "one");
        received(&mut app, peer(3), "carol", 2, "two");
        assert_eq!(app.editor.text(), "half-typ");
        app.on_key(key(KeyCode::Up), 0);
        assert_eq!(app.editor.text(), "first line");
        app.on_key(key(KeyCode::Down), 0);
        assert_eq!(app.editor.text(), "half-typ", "back to the draft");
        app.on_key(ctrl('w'), 0);
        assert!(app.editor.is_empty());
    }

    #[test]
    fn tab_completes_commands_and_names() {
        let mut app = app();
        app.on_done(Done::Peers(Ok(vec![
            (peer(2), Some("bob".into())),
            (peer(4), Some("bobby".into())),
            (peer(3), Some("carol".into())),
        ])));
        typed(&mut app, "/ch");
        app.on_key(key(KeyCode::Tab), 0);
        assert_eq!(app.editor.text(), "/chat ");
        typed(&mut app, "c");
        app.on_key(key(KeyCode::Tab), 0);
        assert_eq!(app.editor.text(), "/chat carol ");
        app.editor.take();
        typed(&mut app, "/chat b");
        app.on_key(key(KeyCode::Tab), 0);
        assert_eq!(app.editor.text(), "/chat bob", "the common part first");
        assert_eq!(app.hint.as_deref(), Some("bob bobby"));
        app.on_key(key(KeyCode::Tab), 0);
        assert_eq!(app.editor.text(), "/chat bob");
        app.on_key(key(KeyCode::Tab), 0);
        assert_eq!(app.editor.text(), "/chat bobby", "then each in turn");
        app.on_key(key(KeyCode::Tab), 0);
        assert_eq!(app.editor.text(), "/chat bob");
    }

    #[test]
    fn paging_back_reads_older_pages_from_the_store() {
        let mut app = app();
        open(&mut app, 2, "bob");
        let page = |from: u8| -> Vec<StoredMessage> {
            (from..from + PAGE as u8)
                .map(|n| {
                    let mut m = stored(n, Direction::Incoming, MessageStatus::Received, "m");
                    m.peer = peer(2);
                    m
                })
                .collect()
        };
        let newest = page(100);
        app.convs[0].pane = Pane::default();
        app.convs[0].pane.prepend(&newest, "bob", true);
        let actions = app.on_key(key(KeyCode::PageUp), 0);
        assert!(actions.is_empty(), "far from the top yet");
        assert!(app.pane().scroll > 0);
        let mut asked = Vec::new();
        for _ in 0..5 {
            asked.extend(app.on_key(key(KeyCode::PageUp), 0));
        }
        assert_eq!(
            asked,
            [Action::Do(Work::LoadPage {
                peer: peer(2),
                before: Some(newest[0].cursor())
            })],
            "one request at a time, from the oldest loaded"
        );
        let before = app.pane().scroll;
        app.on_done(Done::Page {
            peer: peer(2),
            result: Ok(page(50)),
        });
        assert_eq!(app.pane().entries.len(), 2 * PAGE);
        assert_eq!(app.pane().scroll, before, "the view stays where it was");
        for _ in 0..20 {
            app.on_key(key(KeyCode::PageDown), 0);
        }
        assert_eq!(app.pane().scroll, 0);
    }

    #[test]
    fn quit_keys_and_commands() {
        let mut app = app();
        assert_eq!(app.on_key(ctrl('c'), 0), [Action::Quit]);
        assert_eq!(app.on_key(ctrl('d'), 0), [Action::Quit]);
        typed(&mut app, "ab");
        app.on_key(key(KeyCode::Home), 0);
        assert!(
            app.on_key(ctrl('d'), 0).is_empty(),
            "deletes on a non-empty line"
        );
        assert_eq!(app.editor.text(), "b");
        app.editor.take();
        assert_eq!(enter(&mut app, "/quit"), [Action::Quit]);
        assert!(enter(&mut app, "text with no room").is_empty());
        assert!(texts(app.pane())
            .iter()
            .any(|l| l.starts_with("no chat room is open")));
    }

    #[test]
    fn online_and_offline_update_the_count_once() {
        let mut app = app();
        let online = NodeEvent::PeerOnline {
            node_id: peer(2),
            name: Some("bob".into()),
        };
        app.on_node_event(&online, &no_names);
        app.on_node_event(&online, &no_names);
        assert_eq!(app.online.len(), 1);
        assert_eq!(texts(&app.home), ["* bob is online"]);
        app.on_node_event(
            &NodeEvent::PeerOffline {
                node_id: peer(2),
                name: Some("bob".into()),
            },
            &no_names,
        );
        assert!(app.online.is_empty());
    }

    #[test]
    fn conversations_opened_by_peers_are_bounded() {
        let mut app = app();
        for n in 0..MAX_CONVERSATIONS as u8 + 10 {
            received(&mut app, peer(n + 10), "x", n, "hi");
        }
        assert_eq!(app.convs.len(), MAX_CONVERSATIONS);
        let notices = texts(app.pane());
        assert_eq!(notices.len(), MAX_CONVERSATIONS + 10, "each still noticed");
    }

    #[test]
    fn names_learnt_later_complete() {
        let mut app = app();
        let online = NodeEvent::PeerOnline {
            node_id: peer(2),
            name: None,
        };
        app.on_node_event(&online, &no_names);
        typed(&mut app, "/chat b");
        app.on_key(key(KeyCode::Tab), 0);
        assert_eq!(app.editor.text(), "/chat b");
        app.learn_names(&|id| (*id == peer(2)).then(|| "bob".to_string()));
        app.on_key(key(KeyCode::Tab), 0);
        assert_eq!(app.editor.text(), "/chat bob ");
    }

    #[test]
    fn a_paste_is_one_line_and_a_full_line_says_so() {
        let mut app = app();
        app.on_terminal(Event::Paste("a\nb".into()), 0);
        assert_eq!(app.editor.text(), "a\nb");
        app.on_terminal(Event::Paste("x".repeat(MAX_TEXT_LEN)), 0);
        assert_eq!(app.editor.text().len(), MAX_TEXT_LEN);
        assert!(app.hint.is_some());
    }
}
