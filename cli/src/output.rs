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
    fn escapes_control_characters() {
        assert_eq!(sanitize("hi\u{1b}[2Jthere\n"), "hi\\u{1b}[2Jthere\\n");
        assert_eq!(sanitize("héllo 👋"), "héllo 👋");
    }
}
