//! Drawing the full-screen chat: the status line on top, the conversation pane, the tabs of
//! the open conversations, and the input line at the bottom, where the cursor is. Every
//! frame is drawn whole from the [`App`], so nothing else ever writes into the input line.

use ratatui::{
    layout::Rect,
    style::{Color, Modifier, Style},
    text::{Line, Span},
    Frame,
};
use unicode_width::UnicodeWidthStr;

use super::{
    app::{App, Login, CHROME_ROWS},
    pane::{wrap, MarkKind, Part, Pieces, Tone},
};

/// The prompt before the input line.
const PROMPT: &str = "> ";

/// Colours, or none when `NO_COLOR` is set (then only bold and reverse video).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Theme {
    color: bool,
}

impl Theme {
    /// Colours unless the environment has a non-empty `NO_COLOR`.
    pub fn from_env() -> Theme {
        Theme::new(std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()))
    }

    /// With or without colours.
    pub fn new(color: bool) -> Theme {
        Theme { color }
    }

    fn pick(&self, color: Style, plain: Style) -> Style {
        if self.color {
            color
        } else {
            plain
        }
    }

    fn part(&self, part: Part) -> Style {
        let s = Style::default();
        let bold = s.add_modifier(Modifier::BOLD);
        match part {
            Part::Time => s.add_modifier(Modifier::DIM),
            Part::Me => self.pick(bold.fg(Color::Green), bold),
            Part::Peer => self.pick(bold.fg(Color::Cyan), bold),
            Part::Plain | Part::Text | Part::Notice(Tone::Info) => s,
            Part::Mark(MarkKind::Pending) => self.pick(s.fg(Color::Yellow), s),
            Part::Mark(MarkKind::Done) => self.pick(s.fg(Color::Green), s),
            Part::Mark(MarkKind::Bad) => self.pick(bold.fg(Color::Red), bold),
            Part::Mark(MarkKind::Other) => s.add_modifier(Modifier::DIM),
            Part::Notice(Tone::Arrival) => self.pick(bold.fg(Color::Magenta), bold),
            Part::Notice(Tone::Warning) => self.pick(bold.fg(Color::Yellow), bold),
        }
    }

    fn bar(&self) -> Style {
        self.pick(
            Style::default().fg(Color::White).bg(Color::Blue),
            Style::default().add_modifier(Modifier::REVERSED),
        )
    }

    fn tab(&self, current: bool, unread: bool) -> Style {
        let s = Style::default();
        match (current, unread) {
            (true, _) => s.add_modifier(Modifier::REVERSED | Modifier::BOLD),
            (false, true) => self.pick(
                s.fg(Color::Yellow).add_modifier(Modifier::BOLD),
                s.add_modifier(Modifier::BOLD),
            ),
            (false, false) => s,
        }
    }

    fn prompt(&self) -> Style {
        let bold = Style::default().add_modifier(Modifier::BOLD);
        self.pick(bold.fg(Color::Blue), bold)
    }
}

fn line(pieces: &Pieces, theme: &Theme) -> Line<'static> {
    Line::from(
        pieces
            .iter()
            .map(|(part, text)| Span::styled(text.clone(), theme.part(*part)))
            .collect::<Vec<_>>(),
    )
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame<'_>, app: &App, theme: &Theme) {
    let area = frame.area();
    if area.width == 0 || area.height == 0 {
        return;
    }
    let input = Rect::new(area.x, area.bottom() - 1, area.width, 1);
    if area.height > CHROME_ROWS {
        let pane_rows = area.height - CHROME_ROWS;
        status(frame, app, theme, Rect::new(area.x, area.y, area.width, 1));
        pane(
            frame,
            app,
            theme,
            Rect::new(area.x, area.y + 1, area.width, pane_rows),
        );
        tabs(
            frame,
            app,
            theme,
            Rect::new(area.x, area.bottom() - 2, area.width, 1),
        );
    }
    input_line(frame, app, theme, input);
}

fn status(frame: &mut Frame<'_>, app: &App, theme: &Theme, area: Rect) {
    let me = &app.me;
    // The longest part, the discovery URL, goes last: a narrow terminal cuts it first.
    let mut text = format!(
        " {} ({}) │ {} │ {} online",
        me.name
            .as_deref()
            .map(crate::output::sanitize)
            .unwrap_or_else(|| "<no name>".into()),
        me.id.fingerprint(),
        match app.login {
            Login::Connecting => "logging in…",
            Login::LoggedIn => "logged in",
            Login::Retrying => "not logged in, retrying",
            Login::LoggingOut => "logging out…",
        },
        app.online.len(),
    );
    if let Some(c) = app.conversation() {
        let state = if app.online.contains_key(&c.peer) {
            "online"
        } else {
            "offline"
        };
        text.push_str(&format!(" │ {} {state}", c.label));
    }
    text.push_str(&format!(
        " │ discovery {}",
        me.discovery.as_deref().unwrap_or("none")
    ));
    let buf = frame.buffer_mut();
    buf.set_style(area, theme.bar());
    buf.set_line(area.x, area.y, &Line::styled(text, theme.bar()), area.width);
}

fn pane(frame: &mut Frame<'_>, app: &App, theme: &Theme, area: Rect) {
    let pane = app.pane();
    let (w, h) = (usize::from(area.width), usize::from(area.height));
    // Rows from the newest up, as many as the view reaches.
    let need = h + pane.scroll;
    let mut rows: Vec<Pieces> = Vec::with_capacity(need);
    for entry in pane.entries.iter().rev() {
        let mut wrapped = wrap(&entry.pieces(), w);
        while let Some(row) = wrapped.pop() {
            rows.push(row);
        }
        if rows.len() >= need {
            break;
        }
    }
    let skip = pane.scroll.min(rows.len().saturating_sub(h));
    let buf = frame.buffer_mut();
    for (i, row) in rows.iter().skip(skip).take(h).enumerate() {
        // `i` counts up from the bottom row of the pane.
        let y = area.bottom() - 1 - i as u16;
        buf.set_line(area.x, y, &line(row, theme), area.width);
    }
}

fn tabs(frame: &mut Frame<'_>, app: &App, theme: &Theme, area: Rect) {
    let mut spans = Vec::new();
    let names = std::iter::once(("home".to_string(), 0))
        .chain(app.convs.iter().map(|c| (c.label.clone(), c.unread)));
    for (i, (name, unread)) in names.enumerate() {
        let label = if unread > 0 {
            format!(" {} {name} ({unread}) ", i + 1)
        } else {
            format!(" {} {name} ", i + 1)
        };
        spans.push(Span::styled(label, theme.tab(i == app.view, unread > 0)));
        spans.push(Span::raw(" "));
    }
    let pane = app.pane();
    let note = match (&app.hint, pane.scroll > 0, pane.loading) {
        (Some(hint), _, _) => Some(crate::output::sanitize(hint)),
        (None, _, true) => Some("loading older messages…".to_string()),
        (None, true, false) => Some("scrolled back · PgDn for newer".to_string()),
        (None, false, false) => None,
    };
    let tabs = Line::from(spans);
    let used = tabs.width();
    let buf = frame.buffer_mut();
    buf.set_line(area.x, area.y, &tabs, area.width);
    if let Some(note) = note {
        let nw = note.width();
        if used + nw < usize::from(area.width) {
            let x = area.right() - nw as u16;
            buf.set_line(
                x,
                area.y,
                &Line::styled(note, theme.part(Part::Mark(MarkKind::Other))),
                nw as u16,
            );
        }
    }
}

fn input_line(frame: &mut Frame<'_>, app: &App, theme: &Theme, area: Rect) {
    let prompt_w = PROMPT.width() as u16;
    let room = area.width.saturating_sub(prompt_w);
    let (shown, col) = app.editor.view(usize::from(room.max(1)));
    let text = Line::from(vec![Span::styled(PROMPT, theme.prompt()), Span::raw(shown)]);
    frame
        .buffer_mut()
        .set_line(area.x, area.y, &text, area.width);
    let x = (area.x + prompt_w + col as u16).min(area.right().saturating_sub(1));
    frame.set_cursor_position((x, area.y));
}

#[cfg(test)]
mod tests {
    use ratatui::{backend::TestBackend, Terminal};

    use super::{
        super::{
            app::{Done, Me},
            pane::{test_support::peer, Entry},
        },
        *,
    };

    fn screen(app: &App, theme: Theme) -> (Vec<String>, (u16, u16), Terminal<TestBackend>) {
        let mut term =
            Terminal::new(TestBackend::new(app.size.0, app.size.1)).expect("test terminal");
        term.draw(|f| draw(f, app, &theme)).expect("draw");
        let buf = term.backend().buffer().clone();
        // A wide character covers the cell after it.
        let rows = (0..buf.area.height)
            .map(|y| {
                let mut row = String::new();
                let mut x = 0;
                while x < buf.area.width {
                    let symbol = buf[(x, y)].symbol();
                    row.push_str(symbol);
                    x += symbol.width().max(1) as u16;
                }
                row.trim_end().to_string()
            })
            .collect();
        let pos = term.backend_mut().get_cursor_position().expect("cursor");
        (rows, (pos.x, pos.y), term)
    }

    fn app(cols: u16, rows: u16) -> App {
        let mut app = App::new(Me {
            name: Some("alice".into()),
            id: peer(1),
            discovery: Some("http://127.0.0.1:7117".into()),
        });
        app.resize(cols, rows);
        app.on_done(Done::LoggedIn(true));
        app.on_done(Done::Peers(Ok(vec![(peer(2), Some("bob".into()))])));
        app
    }

    use ratatui::backend::Backend;

    #[test]
    fn the_screen_has_status_pane_tabs_and_input() {
        let mut app = app(80, 8);
        app.editor.insert("half 日本");
        let (rows, cursor, _) = screen(&app, Theme::new(true));
        let fp = peer(1).fingerprint();
        assert_eq!(
            rows[0],
            format!(" alice ({fp}) │ logged in │ 1 online │ discovery http://127.0.0.1:7117")
        );
        assert!(rows[3].starts_with("logged in as alice"), "{rows:#?}");
        assert_eq!(rows[4], "online:");
        assert!(rows[5].starts_with("  bob "), "{rows:#?}");
        assert_eq!(rows[6], " 1 home");
        assert_eq!(rows[7], "> half 日本");
        // "> half " is 7 columns, each of the two wide characters 2.
        assert_eq!(cursor, (11, 7));
    }

    #[test]
    fn long_lines_wrap_and_the_newest_row_is_at_the_bottom() {
        let mut app = app(20, 7);
        app.notice("x".repeat(30), Tone::Info);
        let (rows, _, _) = screen(&app, Theme::new(false));
        assert_eq!(rows[3], "x".repeat(20));
        assert_eq!(rows[4], "x".repeat(10));
    }

    #[test]
    fn no_color_means_no_colours() {
        let mut app = app(60, 10);
        app.notice("New message from carol", Tone::Arrival);
        let (_, _, term) = screen(&app, Theme::new(false));
        let buf = term.backend().buffer();
        for cell in buf.content() {
            assert_eq!((cell.fg, cell.bg), (Color::Reset, Color::Reset));
        }
        let (_, _, term) = screen(&app, Theme::new(true));
        assert!(term
            .backend()
            .buffer()
            .content()
            .iter()
            .any(|c| c.fg != Color::Reset));
    }

    #[test]
    fn a_resize_redraws_everything_and_keeps_the_input() {
        let mut app = app(60, 10);
        app.editor.insert("still here");
        app.on_terminal(crossterm::event::Event::Resize(30, 6), 0);
        let (rows, cursor, _) = screen(&app, Theme::new(true));
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[5], "> still here");
        assert_eq!(cursor, (12, 5));
        assert!(rows[0].starts_with(" alice ("));
    }

    #[test]
    fn any_size_draws_without_panicking() {
        for (cols, rows) in [(1, 1), (2, 1), (1, 5), (3, 4), (5, 2), (12, 4)] {
            let mut app = app(cols, rows);
            app.editor.insert("日本語 and more text than fits");
            app.notice(
                "a notice with 日本 in it, long enough to wrap",
                Tone::Warning,
            );
            app.on_key(
                crossterm::event::KeyEvent::new(
                    crossterm::event::KeyCode::PageUp,
                    crossterm::event::KeyModifiers::NONE,
                ),
                0,
            );
            let (screen_rows, (x, y), _) = screen(&app, Theme::new(true));
            assert_eq!(screen_rows.len(), usize::from(rows));
            assert!(
                x < cols && y == rows - 1,
                "cursor ({x}, {y}) in {cols}x{rows}"
            );
        }
    }

    #[test]
    fn tabs_show_unread_counters() {
        let mut app = app(60, 10);
        app.convs.push(super::super::app::Conversation {
            peer: peer(3),
            label: "carol".into(),
            pane: Default::default(),
            unread: 2,
        });
        app.home.push(Entry::Notice("hello".into(), Tone::Info), 60);
        let (rows, _, _) = screen(&app, Theme::new(true));
        assert_eq!(rows[8], " 1 home   2 carol (2)");
        app.show(1);
        let (rows, _, _) = screen(&app, Theme::new(true));
        assert_eq!(rows[8], " 1 home   2 carol");
        assert!(rows[0].contains("│ carol offline │"), "{}", rows[0]);
    }
}
