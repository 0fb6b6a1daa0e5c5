//! The full-screen chat, used when standard input and output are a terminal.
//!
//! [`app`] holds the state and decides; [`render`] draws it; this module is the thin driver
//! between them, the terminal and the node. Its loop waits on terminal input
//! ([`EventStream`]), node events, finished background work and signals, and never blocks
//! on the network: every call into the node runs as a task whose result comes back as a
//! [`Done`]. The terminal is restored on every way out: return, error, signal and panic.

pub mod app;
pub mod complete;
pub mod editor;
pub mod pane;
pub mod render;

use std::{
    io::{self, Stdout, Write},
    sync::{
        atomic::{AtomicBool, Ordering},
        LazyLock, Once,
    },
};

use anyhow::{Context, Result};
use crossterm::{
    cursor::Show,
    event::{DisableBracketedPaste, EnableBracketedPaste, EventStream},
    execute,
    terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen},
};
use futures::StreamExt;
use p2p_node::Node;
use ratatui::{backend::CrosstermBackend, Terminal};
use tokio::{
    sync::{broadcast::error::RecvError, mpsc, Notify},
    task::JoinSet,
};

use self::{
    app::{Action, App, Done, Login, Me, Work, MAX_CONVERSATIONS, PAGE},
    render::Theme,
};
use crate::{
    discovery::{self, Need},
    identity::Paths,
    output::{one_line, sanitize},
    running::{open_node, StopSignals, LOGIN_WAIT},
    session::now_ms,
    Global,
};

/// Tasks running at once: a send and a page read per conversation, and a few commands.
const MAX_TASKS: usize = 2 * MAX_CONVERSATIONS + 16;
/// Log lines waiting for the screen; more are dropped.
const LOG_BACKLOG: usize = 256;

/// Runs the full-screen chat until the user quits, then logs out.
pub async fn run(g: &Global, paths: &Paths, logs: mpsc::Receiver<String>) -> Result<()> {
    let name = paths.registered_name()?;
    let node = open_node(g, paths, Need::Serve).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let control = crate::running::serve_control(&node, paths, crate::control::Kind::Chat, &stop);
    let status = node.discovery_status().map(|s| s.borrow().clone());
    let mut app = App::new(Me {
        name,
        id: node.node_id(),
        discovery: status.as_ref().and_then(discovery::short_label),
    });
    if let Some(status) = &status {
        for line in discovery::status_text(status).lines() {
            app.notice(line.to_owned(), pane::Tone::Info);
        }
    }
    app.notice(
        "type /help for commands and keys; Ctrl+N/Ctrl+P switch conversations, PgUp/PgDn scroll",
        pane::Tone::Info,
    );
    let mut screen = match Screen::enter() {
        Ok(screen) => screen,
        Err(e) => {
            let _ = node.shutdown().await;
            return Err(e).context("cannot set up the terminal");
        }
    };
    let result = drive(&node, paths, &mut app, &mut screen, logs).await;
    app.login = Login::LoggingOut;
    let _ = screen.draw(&app);
    drop(control);
    node.shutdown().await;
    drop(screen);
    result?;
    println!("logged out");
    Ok(())
}

/// The event loop: returns when the user quits or the terminal goes away.
async fn drive(
    node: &Node,
    paths: &Paths,
    app: &mut App,
    screen: &mut Screen,
    mut logs: mpsc::Receiver<String>,
) -> Result<()> {
    let mut events = node.subscribe();
    let mut keys = EventStream::new();
    let mut tasks: JoinSet<Done> = JoinSet::new();
    let mut stop = StopSignals::new()?;
    if let Ok((cols, rows)) = crossterm::terminal::size() {
        app.resize(cols, rows);
    }
    let mut actions = vec![Action::Do(Work::Peers), Action::Do(Work::WatchLogin)];
    loop {
        for action in actions.drain(..) {
            match action {
                Action::Quit => return Ok(()),
                Action::Redraw => screen.clear()?,
                Action::Do(work) if tasks.len() >= MAX_TASKS => {
                    app.notice(
                        format!("too much is going on; not done: {work:?}"),
                        pane::Tone::Warning,
                    );
                }
                Action::Do(work) => {
                    tasks.spawn(perform(node.clone(), paths.clone(), work));
                }
            }
        }
        screen.draw(app)?;
        actions = tokio::select! {
            ev = keys.next() => match ev {
                Some(Ok(ev)) => {
                    // For Tab: peers that registered after they came online.
                    app.learn_names(&|id| node.name_of(id));
                    app.on_terminal(ev, now_ms())
                }
                Some(Err(e)) => return Err(e).context("cannot read the terminal"),
                None => return Ok(()),
            },
            ev = events.recv() => match ev {
                Ok(ev) => app.on_node_event(&ev, &|id| node.name_of(id)),
                Err(RecvError::Lagged(n)) => {
                    app.missed(n);
                    Vec::new()
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                Ok(done) => app.on_done(done),
                Err(e) => {
                    app.notice(format!("a task failed: {e}"), pane::Tone::Warning);
                    Vec::new()
                }
            },
            Some(line) = logs.recv() => {
                app.on_log(&line);
                Vec::new()
            }
            () = stop.recv() => vec![Action::Quit],
            _ = PANICKED.notified() => vec![Action::Quit],
        };
    }
}

/// Does one piece of work with the node; the result goes back to the [`App`].
async fn perform(node: Node, paths: Paths, work: Work) -> Done {
    fn err(e: impl std::fmt::Display) -> String {
        sanitize(&e.to_string())
    }
    match work {
        Work::Send { peer, local, text } => Done::Sent {
            peer,
            local,
            result: node.send_to(&peer, &text).await.map_err(err),
        },
        Work::LoadPage { peer, before } => Done::Page {
            peer,
            result: node
                .history_before(&peer.to_string(), PAGE, before)
                .await
                .map_err(err),
        },
        Work::Open(query) => Done::Opened {
            result: node.resolve(&query).await.map_err(err),
            query,
        },
        Work::Peers => Done::Peers(
            node.peers()
                .await
                .map(|peers| crate::output::others_online(&peers, node.node_id()))
                .map_err(err),
        ),
        Work::History { who, n } => Done::History {
            result: node.history(&who, n).await.map_err(err),
            who,
        },
        Work::Register(name) => {
            let result = match node.register(&name).await {
                Ok(()) => paths.set_registered_name(&name).map_err(|e| one_line(&e)),
                Err(e) => Err(err(e)),
            };
            Done::Registered { name, result }
        }
        Work::WatchLogin => Done::LoggedIn(node.wait_announced(LOGIN_WAIT).await),
    }
}

/// Whether the terminal is in full-screen mode (raw, alternate screen, bracketed paste).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Woken by the panic hook so the loop logs out.
static PANICKED: LazyLock<Notify> = LazyLock::new(Notify::new);

/// Puts the terminal back as it was: cooked mode, main screen, cursor shown. Safe to call
/// more than once and from any thread.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let mut out = io::stdout();
        let _ = execute!(out, DisableBracketedPaste, LeaveAlternateScreen, Show);
        let _ = out.flush();
    }
}

/// Restores the terminal before a panic message is printed, on any thread, and wakes the
/// loop so it logs out.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            PANICKED.notify_one();
            previous(info);
        }));
    });
}

/// The terminal in full-screen mode; dropping it restores the terminal.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
    theme: Theme,
}

impl std::fmt::Debug for Screen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Screen").finish_non_exhaustive()
    }
}

impl Screen {
    fn enter() -> io::Result<Screen> {
        install_panic_hook();
        ACTIVE.store(true, Ordering::SeqCst);
        let setup = || -> io::Result<Terminal<CrosstermBackend<Stdout>>> {
            enable_raw_mode()?;
            execute!(io::stdout(), EnterAlternateScreen, EnableBracketedPaste)?;
            Terminal::new(CrosstermBackend::new(io::stdout()))
        };
        match setup() {
            Ok(terminal) => Ok(Screen {
                terminal,
                theme: Theme::from_env(),
            }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }

    /// Draws the whole screen (resizing first when the terminal changed size). The write
    /// may block on a stalled terminal, so it runs where the runtime allows blocking.
    fn draw(&mut self, app: &App) -> io::Result<()> {
        let Screen { terminal, theme } = self;
        tokio::task::block_in_place(|| {
            terminal
                .draw(|frame| render::draw(frame, app, theme))
                .map(|_| ())
        })
    }

    fn clear(&mut self) -> io::Result<()> {
        tokio::task::block_in_place(|| self.terminal.clear())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Where the program's log goes while the screen is full: into a channel the loop shows as
/// notices (anything written to stderr would land in the middle of the screen).
#[derive(Debug, Clone)]
pub struct LogSink(mpsc::Sender<String>);

/// A sink for the log and the receiver the loop reads.
pub fn log_sink() -> (LogSink, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel(LOG_BACKLOG);
    (LogSink(tx), rx)
}

/// One log record being written; sent when dropped.
#[derive(Debug)]
pub struct LogLine {
    tx: mpsc::Sender<String>,
    buf: Vec<u8>,
}

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            // A full backlog drops the line rather than block the logging thread.
            let _ = self
                .tx
                .try_send(String::from_utf8_lossy(&self.buf).into_owned());
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine {
            tx: self.0.clone(),
            buf: Vec::new(),
        }
    }
}
