//! Tab completion: commands at the start of the line, names everywhere else.

use crate::session::COMMANDS;

/// What Tab can complete at the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Where the word being completed starts (a byte offset).
    pub start: usize,
    /// The word typed so far.
    pub word: String,
    /// What it may become, sorted, without repeats.
    pub candidates: Vec<String>,
}

impl Completion {
    /// The longest beginning that every candidate shares.
    pub fn common_prefix(&self) -> &str {
        let Some(first) = self.candidates.first() else {
            return "";
        };
        let mut end = first.len();
        for c in &self.candidates[1..] {
            end = first
                .char_indices()
                .zip(c.chars())
                .find(|((_, a), b)| a != b)
                .map_or(end.min(c.len()), |((i, _), _)| i.min(end));
        }
        &first[..end]
    }
}

/// The completions of the word before the cursor in `before_cursor` (the line up to the
/// cursor): a command when it is the first word and starts with `/`, else one of `names`
/// (matched without regard to case). A bare cursor completes only a command's argument.
pub fn complete<'a>(
    before_cursor: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Option<Completion> {
    let start = before_cursor.rfind(char::is_whitespace).map_or(0, |i| {
        i + before_cursor[i..].chars().next().map_or(1, char::len_utf8)
    });
    let word = &before_cursor[start..];
    let mut candidates: Vec<String> = if start == 0 && word.starts_with('/') {
        COMMANDS
            .iter()
            .filter(|c| c.starts_with(word))
            .map(|c| c.to_string())
            .collect()
    } else if word.starts_with('/') || (word.is_empty() && !after_command(before_cursor)) {
        return None;
    } else {
        let lower = word.to_lowercase();
        names
            .into_iter()
            .filter(|n| n.to_lowercase().starts_with(&lower))
            .map(str::to_string)
            .collect()
    };
    candidates.sort();
    candidates.dedup();
    if candidates.is_empty() {
        return None;
    }
    Some(Completion {
        start,
        word: word.to_string(),
        candidates,
    })
}

/// Whether the cursor is on the first argument of a command that takes a name.
fn after_command(before_cursor: &str) -> bool {
    let mut words = before_cursor.split_whitespace();
    matches!(words.next(), Some("/chat" | "/history")) && words.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 3] = ["bob", "bobby", "carol"];

    fn candidates(before: &str) -> Vec<String> {
        complete(before, NAMES)
            .map(|c| c.candidates)
            .unwrap_or_default()
    }

    #[test]
    fn commands_then_names() {
        assert_eq!(candidates("/h"), ["/help", "/history"]);
        assert_eq!(candidates("/cha"), ["/chat"]);
        assert_eq!(candidates("/chat "), ["bob", "bobby", "carol"]);
        assert_eq!(candidates("/chat C"), ["carol"]);
        assert_eq!(candidates("hi ca"), ["carol"]);
        assert!(candidates("hi ").is_empty(), "no name without a word");
        assert!(candidates("x /h").is_empty(), "commands only come first");
        let c = complete("/chat bo", NAMES).expect("completes");
        assert_eq!((c.start, c.word.as_str()), (6, "bo"));
        assert_eq!(c.common_prefix(), "bob");
    }

    #[test]
    fn common_prefix_of_one_and_of_none() {
        let c = complete("/his", NAMES).expect("completes");
        assert_eq!(c.common_prefix(), "/history");
        let c = complete("/", NAMES).expect("completes");
        assert_eq!(c.common_prefix(), "/");
    }
}
