//! What the user types in the chat, in either mode: the commands and how a line is read.

/// The chat's commands, for `/help` and Tab completion.
pub const COMMANDS: &[&str] = &[
    "/chat",
    "/help",
    "/history",
    "/leave",
    "/peers",
    "/quit",
    "/register",
];

/// The commands, one per line, as `/help` lists them.
pub const COMMAND_HELP: &str = concat!(
    "  /peers               who is online\n",
    "  /chat NAME           open a chat room with NAME (recent history, then live messages)\n",
    "  /history NAME [N]    the last N messages with NAME (default 20)\n",
    "  /leave               close the chat room\n",
    "  /register NAME       claim NAME for this node\n",
    "  /help                this help\n",
    "  /quit                log out and exit",
);

/// How many messages `/chat` shows and `/history` lists unless told.
pub const RECENT: usize = 20;

/// One line of input, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input<'a> {
    /// Nothing (an empty or blank line).
    Empty,
    /// `/quit` or `/exit`.
    Quit,
    /// `/help`.
    Help,
    /// `/peers`.
    Peers,
    /// `/leave`.
    Leave,
    /// `/register NAME`.
    Register(&'a str),
    /// `/chat NAME`.
    Chat(&'a str),
    /// `/history NAME [N]`.
    History {
        /// The peer's name or NodeId.
        who: &'a str,
        /// How many messages.
        n: usize,
    },
    /// A line starting with `/` that is no command, or a command missing its argument.
    Unknown(&'a str),
    /// Anything else: a message for the open chat room.
    Text(&'a str),
}

/// Reads one line (surrounding whitespace is ignored).
pub fn parse(line: &str) -> Input<'_> {
    let line = line.trim();
    if line.is_empty() {
        return Input::Empty;
    }
    let (cmd, rest) = match line.split_once(char::is_whitespace) {
        Some((c, r)) => (c, r.trim()),
        None => (line, ""),
    };
    match cmd {
        "/quit" | "/exit" => Input::Quit,
        "/help" => Input::Help,
        "/peers" => Input::Peers,
        "/leave" => Input::Leave,
        "/register" if !rest.is_empty() => Input::Register(rest),
        "/chat" if !rest.is_empty() => Input::Chat(rest),
        "/history" if !rest.is_empty() => {
            let mut parts = rest.split_whitespace();
            let who = parts.next().unwrap_or(rest);
            let n = parts.next().and_then(|n| n.parse().ok()).unwrap_or(RECENT);
            Input::History { who, n }
        }
        c if c.starts_with('/') => Input::Unknown(c),
        _ => Input::Text(line),
    }
}

/// Milliseconds since the Unix epoch by the local clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_commands_and_messages() {
        assert_eq!(parse("  "), Input::Empty);
        assert_eq!(parse("/quit"), Input::Quit);
        assert_eq!(parse("/exit"), Input::Quit);
        assert_eq!(parse("/chat  bob "), Input::Chat("bob"));
        assert_eq!(parse("/chat"), Input::Unknown("/chat"));
        assert_eq!(parse("/history bob 5"), Input::History { who: "bob", n: 5 });
        assert_eq!(
            parse("/history bob x"),
            Input::History {
                who: "bob",
                n: RECENT
            }
        );
        assert_eq!(parse("/frob"), Input::Unknown("/frob"));
        assert_eq!(parse(" hello there "), Input::Text("hello there"));
    }

    #[test]
    fn every_command_has_help() {
        for c in COMMANDS {
            assert!(COMMAND_HELP.contains(c), "{c}");
        }
        for line in COMMAND_HELP.lines() {
            assert!(line.starts_with("  /"), "{line:?}");
        }
    }
}
