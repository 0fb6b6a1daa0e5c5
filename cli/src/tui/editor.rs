//! The input line: one line of text with a cursor, edited with the usual keys, and the
//! history of lines entered. Positions are byte offsets that always sit on a grapheme
//! boundary, so a wide or combined character moves and deletes as one.

use std::collections::VecDeque;

use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

use crate::output::sanitize;

/// The text being typed.
#[derive(Debug, Clone)]
pub struct Editor {
    text: String,
    cursor: usize,
    limit: usize,
}

impl Editor {
    /// An empty line that holds at most `limit` bytes.
    pub fn new(limit: usize) -> Editor {
        Editor {
            text: String::new(),
            cursor: 0,
            limit,
        }
    }

    /// The text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The cursor, a byte offset into [`Editor::text`].
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Whether the line is empty.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Inserts `s` at the cursor (line breaks of any kind become `\n`). Returns false when
    /// it did not all fit in the limit; as much as fits is inserted.
    pub fn insert(&mut self, s: &str) -> bool {
        let s = s.replace("\r\n", "\n").replace('\r', "\n");
        let room = self.limit.saturating_sub(self.text.len());
        let mut end = s.len().min(room);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.text.insert_str(self.cursor, &s[..end]);
        self.cursor += end;
        end == s.len()
    }

    /// Replaces the bytes `start..end` with `with` and puts the cursor after it.
    pub fn replace(&mut self, start: usize, end: usize, with: &str) {
        let (start, end) = (start.min(end), end.min(self.text.len()));
        if !self.text.is_char_boundary(start) || !self.text.is_char_boundary(end) {
            return;
        }
        self.text.replace_range(start..end, "");
        self.cursor = start;
        self.insert(with);
    }

    /// Replaces the whole line; the cursor goes to its end.
    pub fn set(&mut self, text: &str) {
        self.text.clear();
        self.cursor = 0;
        self.insert(text);
    }

    /// Empties the line and returns what it held.
    pub fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.text)
    }

    fn prev(&self, from: usize) -> usize {
        self.text[..from]
            .grapheme_indices(true)
            .next_back()
            .map_or(0, |(i, _)| i)
    }

    fn next(&self, from: usize) -> usize {
        self.text[from..]
            .graphemes(true)
            .next()
            .map_or(self.text.len(), |g| from + g.len())
    }

    /// The start of the word before `from` (skipping whitespace first).
    fn word_start(&self, from: usize) -> usize {
        let before = &self.text[..from];
        let trimmed = before.trim_end();
        trimmed.rfind(char::is_whitespace).map_or(0, |i| {
            i + trimmed[i..].chars().next().map_or(1, char::len_utf8)
        })
    }

    /// The end of the word after `from` (skipping whitespace first).
    fn word_end(&self, from: usize) -> usize {
        let after = &self.text[from..];
        let skip = after.len() - after.trim_start().len();
        after[skip..]
            .find(char::is_whitespace)
            .map_or(self.text.len(), |i| from + skip + i)
    }

    /// One character left (Left, Ctrl+B).
    pub fn left(&mut self) {
        self.cursor = self.prev(self.cursor);
    }

    /// One character right (Right, Ctrl+F).
    pub fn right(&mut self) {
        self.cursor = self.next(self.cursor);
    }

    /// One word left (Ctrl+Left, Alt+B).
    pub fn word_left(&mut self) {
        self.cursor = self.word_start(self.cursor);
    }

    /// One word right (Ctrl+Right, Alt+F).
    pub fn word_right(&mut self) {
        self.cursor = self.word_end(self.cursor);
    }

    /// To the start (Home, Ctrl+A).
    pub fn home(&mut self) {
        self.cursor = 0;
    }

    /// To the end (End, Ctrl+E).
    pub fn end(&mut self) {
        self.cursor = self.text.len();
    }

    /// Deletes the character before the cursor (Backspace).
    pub fn backspace(&mut self) {
        let start = self.prev(self.cursor);
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    /// Deletes the character under the cursor (Delete, Ctrl+D on a non-empty line).
    pub fn delete(&mut self) {
        let end = self.next(self.cursor);
        self.text.replace_range(self.cursor..end, "");
    }

    /// Deletes the word before the cursor (Ctrl+W).
    pub fn delete_word(&mut self) {
        let start = self.word_start(self.cursor);
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    /// Deletes from the start of the line to the cursor (Ctrl+U).
    pub fn delete_to_start(&mut self) {
        self.text.replace_range(..self.cursor, "");
        self.cursor = 0;
    }

    /// Deletes from the cursor to the end of the line (Ctrl+K).
    pub fn delete_to_end(&mut self) {
        self.text.truncate(self.cursor);
    }

    /// What fits in `width` columns around the cursor, and the cursor's column in it.
    ///
    /// Characters show as they will in the conversation: control characters escaped (a
    /// pasted line break shows as `\n`), wide characters taking two columns. When the line
    /// is longer than the width, the view scrolls to keep the cursor in it.
    pub fn view(&self, width: usize) -> (String, usize) {
        let width = width.max(1);
        let cells: Vec<(usize, String, usize)> = self
            .text
            .grapheme_indices(true)
            .map(|(i, g)| {
                let shown = if g.chars().any(char::is_control) {
                    sanitize(g)
                } else {
                    g.to_string()
                };
                let w = shown.width();
                (i, shown, w)
            })
            .collect();
        let at = cells
            .iter()
            .position(|(i, _, _)| *i >= self.cursor)
            .unwrap_or(cells.len());
        // The cursor needs one column of its own: start far enough right that the
        // characters before it and the cursor fit.
        let mut first = at;
        let mut used = 1;
        while first > 0 && used + cells[first - 1].2 <= width {
            first -= 1;
            used += cells[first].2;
        }
        let col: usize = cells[first..at].iter().map(|c| c.2).sum();
        let mut shown = String::new();
        let mut total = 0;
        for (_, s, w) in &cells[first..] {
            if total + w > width {
                break;
            }
            shown.push_str(s);
            total += w;
        }
        (shown, col)
    }
}

/// The lines entered, for Up and Down.
#[derive(Debug, Clone)]
pub struct InputHistory {
    lines: VecDeque<String>,
    cap: usize,
    /// Where Up/Down is in `lines`, while recalling.
    at: Option<usize>,
    /// The line being typed when recalling started.
    draft: String,
}

impl InputHistory {
    /// A history of at most `cap` lines.
    pub fn new(cap: usize) -> InputHistory {
        InputHistory {
            lines: VecDeque::new(),
            cap,
            at: None,
            draft: String::new(),
        }
    }

    /// Remembers an entered line (not a blank one, nor the same line twice in a row).
    pub fn push(&mut self, line: &str) {
        self.at = None;
        if line.trim().is_empty() || self.lines.back().is_some_and(|l| l == line) {
            return;
        }
        self.lines.push_back(line.to_string());
        while self.lines.len() > self.cap {
            self.lines.pop_front();
        }
    }

    /// The line before the one shown (Up); `current` is kept to come back to.
    pub fn up(&mut self, current: &str) -> Option<&str> {
        let at = match self.at {
            None if self.lines.is_empty() => return None,
            None => {
                self.draft = current.to_string();
                self.lines.len() - 1
            }
            Some(0) => 0,
            Some(i) => i - 1,
        };
        self.at = Some(at);
        self.lines.get(at).map(String::as_str)
    }

    /// The line after the one shown (Down), and at the end the line being typed before.
    pub fn down(&mut self) -> Option<&str> {
        let at = self.at?;
        if at + 1 < self.lines.len() {
            self.at = Some(at + 1);
            self.lines.get(at + 1).map(String::as_str)
        } else {
            self.at = None;
            Some(&self.draft)
        }
    }

    /// Stops recalling (the user edited the line).
    pub fn reset(&mut self) {
        self.at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(s: &str) -> Editor {
        let mut e = Editor::new(1000);
        e.insert(s);
        e
    }

    #[test]
    fn cooked_keys() {
        let mut e = typed("hello big world");
        e.delete_word();
        assert_eq!(e.text(), "hello big ");
        e.word_left();
        assert_eq!(e.cursor(), 6);
        e.delete_to_end();
        assert_eq!(e.text(), "hello ");
        e.home();
        e.insert(">> ");
        assert_eq!(e.text(), ">> hello ");
        e.end();
        e.left();
        e.backspace();
        assert_eq!(e.text(), ">> hell ");
        e.delete_to_start();
        assert_eq!((e.text(), e.cursor()), (" ", 0));
        e.delete();
        assert!(e.is_empty());
        let mut e = typed("one two");
        e.home();
        e.word_right();
        assert_eq!(e.cursor(), 3);
        e.word_right();
        assert_eq!(e.cursor(), 7);
    }

    #[test]
    fn wide_and_combined_characters_move_as_one() {
        let mut e = typed("a日e\u{301}👍🏽");
        e.left();
        assert_eq!(&e.text()[e.cursor()..], "👍🏽");
        e.left();
        assert_eq!(&e.text()[e.cursor()..], "e\u{301}👍🏽");
        e.backspace();
        assert_eq!(e.text(), "ae\u{301}👍🏽");
        // Columns: a=1, é=1, the thumb=2.
        e.end();
        assert_eq!(e.view(20), ("ae\u{301}👍🏽".to_string(), 4));
    }

    #[test]
    fn the_view_scrolls_to_the_cursor_and_escapes_control_characters() {
        let mut e = typed("0123456789abcdef");
        let (shown, col) = e.view(8);
        assert_eq!((shown.as_str(), col), ("9abcdef", 7));
        e.home();
        assert_eq!(e.view(8), ("01234567".to_string(), 0));
        let e = typed("a\nb");
        assert_eq!(e.view(10), ("a\\nb".to_string(), 4));
        // A wide character is never cut in half at the edge.
        let e = typed("日本語");
        assert_eq!(e.view(4), ("語".to_string(), 2));
    }

    #[test]
    fn paste_is_limited_and_keeps_line_breaks() {
        let mut e = Editor::new(8);
        assert!(e.insert("ab\r\ncd"));
        assert_eq!(e.text(), "ab\ncd");
        assert!(!e.insert("é日本"));
        assert_eq!(e.text(), "ab\ncdé");
        assert!(e.text().len() <= 8);
    }

    #[test]
    fn history_recalls_and_returns_to_the_draft() {
        let mut h = InputHistory::new(2);
        assert_eq!(h.up("x"), None);
        h.push("one");
        h.push("two");
        h.push("two");
        h.push("three");
        assert_eq!(h.up("draft"), Some("three"));
        assert_eq!(h.up(""), Some("two"));
        assert_eq!(h.up(""), Some("two"), "the oldest kept line stays");
        assert_eq!(h.down(), Some("three"));
        assert_eq!(h.down(), Some("draft"));
        assert_eq!(h.down(), None);
    }
}
