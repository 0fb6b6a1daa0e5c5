//! The full-screen chat of the real `p2p-node` binary, driven in a pseudo-terminal and read
//! back with a terminal emulator: what a user types and sees.

use std::ffi::{OsStr, OsString};

use p2p_tests::{
    discovery_server, message_event, p2p_node_bin,
    pty::{rows_of, Tty},
    User, T,
};

const COLS: u16 = 100;
const ROWS: u16 = 30;

const ENTER: &str = "\r";
const TAB: &str = "\t";
const UP: &str = "\x1b[A";
const CTRL_C: &str = "\x03";
const CTRL_P: &str = "\x10";
const CTRL_U: &str = "\x15";

/// Runs `p2p-node ARGS` under `sh`, which afterwards prints the exit code and the
/// terminal's modes (`stty -a`), as the user's shell would find them.
fn chat_in_shell(args: Vec<OsString>, env: &[(&str, &str)]) -> Tty {
    let script = r#""$0" "$@"; echo "exit=$?"; stty -a"#;
    let mut all: Vec<OsString> = vec!["-c".into(), script.into(), p2p_node_bin().into()];
    all.extend(args);
    Tty::spawn(OsStr::new("sh"), &all, env, COLS, ROWS)
}

/// Waits for the shell's report after the chat and checks the terminal is as it was:
/// cooked mode with echo, the main screen, the cursor shown, no bracketed paste.
fn assert_terminal_restored(tty: &mut Tty) {
    let rows = tty.wait_for(T, "the shell after the chat", |s| {
        rows_of(s).iter().any(|r| r.contains("isig"))
    });
    assert!(row_of(&rows, "logged out").is_some(), "{rows:#?}");
    assert!(row_of(&rows, "exit=0").is_some(), "{rows:#?}");
    let modes = stty_modes(&rows);
    for mode in ["icanon", "echo", "isig", "icrnl", "opost"] {
        assert!(modes.iter().any(|m| m == mode), "{mode} is on: {rows:#?}");
    }
    tty.with_screen(|s| {
        assert!(!s.alternate_screen(), "back on the main screen");
        assert!(!s.hide_cursor(), "the cursor shows");
        assert!(!s.bracketed_paste(), "bracketed paste is off");
    });
    assert!(tty.wait_exit(T).success());
}

/// The input line: the last row.
fn input(rows: &[String]) -> &str {
    rows.last().map_or("", String::as_str)
}

/// The tabs: the row above the input line.
fn tabs(rows: &[String]) -> &str {
    rows.len()
        .checked_sub(2)
        .and_then(|i| rows.get(i))
        .map_or("", String::as_str)
}

/// Where `text` is on the screen (its row), if it is.
fn row_of(rows: &[String], text: &str) -> Option<usize> {
    rows.iter().position(|r| r.contains(text))
}

/// The terminal modes `stty -a` printed: the tokens naming them.
fn stty_modes(rows: &[String]) -> Vec<String> {
    rows.iter()
        .flat_map(|r| r.split([' ', ';']))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_full_screen_chat_as_a_user_sees_it() {
    let dir = p2p_tests::private_tempdir();
    let (mut server, url) = discovery_server(&dir.path().join("discovery.redb"));
    let (alice, bob, carol) = (User::new(&url), User::new(&url), User::new(&url));
    alice.ok(&["register", "alice"]);
    bob.ok(&["register", "bob"]);
    carol.ok(&["register", "carol"]);
    let mut b_listen = bob.listen_json();

    let mut tty = chat_in_shell(alice.args(), &[("NO_COLOR", "1")]);
    let rows = tty.wait_for(T, "the status line, logged in, bob online", |s| {
        let top = s.rows(0, COLS).next().unwrap_or_default();
        top.contains(" alice (") && top.contains("logged in") && top.contains("1 online")
    });
    assert!(tty.with_screen(|s| s.alternate_screen()), "full screen");
    assert_eq!(input(&rows), ">");

    // Tab completes a peer's name.
    tty.send("/chat b");
    tty.send(TAB);
    tty.wait_for(T, "/chat bob on the input line", |s| {
        input(&rows_of(s)) == "> /chat bob"
    });
    tty.send(ENTER);
    tty.wait_for(T, "the conversation with bob", |s| {
        tabs(&rows_of(s)).contains("2 bob")
    });

    // A message: its delivery state changes in place.
    tty.send("hi bob");
    tty.send(ENTER);
    tty.wait_for(T, "delivered", |s| {
        row_of(&rows_of(s), "me: hi bob  (delivered)").is_some()
    });
    message_event(&mut b_listen, "hi bob");

    // Up recalls the last line; Ctrl+U clears it.
    tty.send(UP);
    tty.wait_for(T, "the recalled line", |s| input(&rows_of(s)) == "> hi bob");
    tty.send(CTRL_U);
    tty.wait_for(T, "an empty input line", |s| input(&rows_of(s)) == ">");

    // A long paste goes into the input line whole, line breaks and all; the line scrolls
    // to keep the cursor in view.
    let long = format!("{}\nthe end", "pasted ".repeat(40));
    tty.send(&format!("\x1b[200~{long}\x1b[201~"));
    tty.wait_for(T, "the end of the paste at the cursor", |s| {
        input(&rows_of(s)).ends_with("pasted \\nthe end")
    });
    assert_eq!(
        tty.with_screen(|s| s.cursor_position()),
        (ROWS - 1, COLS - 1)
    );
    tty.send(CTRL_U);
    tty.wait_for(T, "an empty input line", |s| input(&rows_of(s)) == ">");

    // A half-typed line stays on the input line while two messages arrive above it.
    tty.send("/chat carol");
    tty.send(ENTER);
    tty.wait_for(T, "the conversation with carol", |s| {
        tabs(&rows_of(s)).contains("3 carol")
    });
    let half = "half-typed, 日本 ✓";
    tty.send(half);
    tty.wait_for(T, "the half-typed line", |s| {
        input(&rows_of(s)) == format!("> {half}")
    });
    for text in ["first from carol", "second from carol \x1b[2J"] {
        assert_eq!(carol.ok(&["send", "alice", text]).trim(), "delivered");
    }
    let rows = tty.wait_for(T, "both of carol's messages", |s| {
        let rows = rows_of(s);
        row_of(&rows, "carol: first from carol").is_some()
            && row_of(&rows, "carol: second from carol \\u{1b}[2J").is_some()
    });
    let first = row_of(&rows, "carol: first from carol").expect("shown");
    let second = row_of(&rows, "carol: second from carol").expect("shown");
    assert!(first < second && second < rows.len() - 2, "{rows:#?}");
    assert_eq!(input(&rows), format!("> {half}"), "{rows:#?}");
    // "> half-typed, " is 14 columns, the two wide characters 4, a space and the check 2.
    assert_eq!(tty.with_screen(|s| s.cursor_position()), (ROWS - 1, 20));

    // Bob writes while carol's conversation is in view: a notice and an unread counter.
    assert!(b_listen.terminate(T).success());
    assert_eq!(
        bob.ok(&["send", "alice", "ping from bob"]).trim(),
        "delivered"
    );
    let rows = tty.wait_for(T, "the unread counter", |s| {
        tabs(&rows_of(s)).contains("2 bob (1)")
    });
    assert!(row_of(&rows, "New message from bob").is_some(), "{rows:#?}");
    assert!(row_of(&rows, "ping from bob").is_none(), "not in view yet");
    // Switching to bob's conversation shows his message and clears the counter.
    tty.send(CTRL_P);
    let rows = tty.wait_for(T, "bob's conversation", |s| {
        let rows = rows_of(s);
        row_of(&rows, "bob: ping from bob").is_some()
    });
    assert!(tabs(&rows).contains("2 bob"), "{rows:#?}");
    assert!(!tabs(&rows).contains("(1)"), "{rows:#?}");
    assert_eq!(input(&rows), format!("> {half}"));

    // A resize draws everything again at the new size, the input line intact.
    tty.resize(72, 20);
    let rows = tty.wait_for(T, "the screen at 72x20", |s| {
        let rows = rows_of(s);
        rows.len() == 20
            && input(&rows) == format!("> {half}")
            && rows[0].starts_with(" alice (")
            && row_of(&rows, "bob: ping from bob").is_some()
    });
    assert!(rows.iter().all(|r| r.chars().count() <= 72), "{rows:#?}");

    // NO_COLOR: not one coloured cell.
    tty.with_screen(|s| {
        let (rows, cols) = s.size();
        for r in 0..rows.get() {
            for c in 0..cols.get() {
                let cell = s.cell(r, c).expect("a cell");
                assert_eq!(
                    (cell.fgcolor(), cell.bgcolor()),
                    (vt100::Color::Default, vt100::Color::Default),
                    "row {r} column {c}"
                );
            }
        }
    });

    // Ctrl+C logs out and leaves the terminal as it found it.
    tty.send(CTRL_C);
    assert_terminal_restored(&mut tty);
    assert!(server.terminate(T).success());
}

#[test]
fn sigterm_logs_out_and_restores_the_terminal() {
    let dir = p2p_tests::private_tempdir();
    let args: Vec<OsString> = vec![
        "--data-dir".into(),
        dir.path().into(),
        "--embedded-discovery".into(),
        "127.0.0.1:0".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    let mut tty = chat_in_shell(args, &[]);
    tty.wait_for(T, "logged in", |s| {
        s.alternate_screen() && rows_of(s)[0].contains("logged in")
    });
    tty.send("typed, not sent");
    tty.wait_for(T, "the input line", |s| {
        input(&rows_of(s)) == "> typed, not sent"
    });
    // The chat is the shell's only child.
    let shell = tty.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).expect("children");
    let chat = children.split_whitespace().next().expect("the chat's pid");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", chat])
        .status()
        .expect("kill");
    assert!(killed.success());
    assert_terminal_restored(&mut tty);
}
