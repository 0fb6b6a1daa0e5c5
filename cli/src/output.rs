//! Formatting for people and for scripts.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
