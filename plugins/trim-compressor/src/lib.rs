//! Lossless-in-meaning prompt clean-up.
//!
//! * trailing whitespace is removed from every line and runs of blank lines
//!   become one blank line;
//! * outside fenced code blocks, runs of spaces and tabs inside a line become
//!   one space (leading indentation is kept: it can carry meaning, e.g. in
//!   YAML or Python pasted without a fence);
//! * a line repeated more than `max_repeats` times in a row (log spam) is
//!   kept `max_repeats` times followed by a note of how many copies were
//!   folded;
//! * a text message that repeats an earlier message with the same role and
//!   at least `min_duplicate_chars` characters (a document pasted twice) is
//!   dropped. The last message and tool messages are never dropped.
//!
//! ```toml
//! [plugins.compressor.config]
//! max_repeats = 3             # consecutive copies of a line kept
//! min_duplicate_chars = 200   # shorter repeated messages ("yes", "ok") are kept
//! ```

use std::borrow::Cow;

use serde::Deserialize;
use tollgate_sdk::{Compression, Compressor, KeptMessage, Message, RequestView, Rewrite};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    max_repeats: usize,
    min_duplicate_chars: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_repeats: 3,
            min_duplicate_chars: 200,
        }
    }
}

pub struct TrimCompressor {
    max_repeats: usize,
    min_duplicate_chars: usize,
}

#[derive(Default, Debug, PartialEq)]
pub struct Stats {
    pub folded_lines: usize,
    pub dropped_messages: usize,
    pub whitespace_chars: usize,
}

impl TrimCompressor {
    pub fn from_config(config: &str) -> Result<Self, String> {
        let cfg: Config = tollgate_sdk::config(config)?;
        if cfg.max_repeats == 0 {
            return Err("max_repeats must be at least 1".into());
        }
        Ok(Self {
            max_repeats: cfg.max_repeats,
            min_duplicate_chars: cfg.min_duplicate_chars,
        })
    }

    /// Cleans one message's text; `stats` collects what was done.
    pub fn clean_text(&self, text: &str, stats: &mut Stats) -> String {
        let mut out = String::with_capacity(text.len());
        let mut in_fence = false;
        let mut prev_line: Option<Cow<'_, str>> = None;
        let mut repeats = 0usize;
        let mut folded = 0usize;
        let mut blank_run = 0usize;

        let flush_folded = |out: &mut String, folded: &mut usize, stats: &mut Stats| {
            if *folded > 0 {
                out.push_str(&format!("[previous line repeated {folded} more times]\n"));
                stats.folded_lines += *folded;
                *folded = 0;
            }
        };

        for raw in text.split('\n') {
            let trimmed_end = raw.trim_end();
            let is_fence = trimmed_end.trim_start().starts_with("```");
            let line = if in_fence || is_fence {
                Cow::Borrowed(trimmed_end)
            } else {
                collapse_inner_spaces(trimmed_end)
            };
            stats.whitespace_chars += raw.len() - line.len();
            if is_fence {
                in_fence = !in_fence;
            }

            if line.is_empty() {
                flush_folded(&mut out, &mut folded, stats);
                prev_line = None;
                repeats = 0;
                blank_run += 1;
                if blank_run > 1 {
                    // The newline of a dropped blank line.
                    stats.whitespace_chars += 1;
                    continue;
                }
                out.push('\n');
                continue;
            }
            blank_run = 0;

            if prev_line.as_deref() == Some(&*line) {
                repeats += 1;
                if repeats >= self.max_repeats {
                    folded += 1;
                    continue;
                }
            } else {
                flush_folded(&mut out, &mut folded, stats);
                repeats = 0;
            }
            out.push_str(&line);
            out.push('\n');
            prev_line = Some(line);
        }
        flush_folded(&mut out, &mut folded, stats);
        // `split` yields one more piece than there are newlines.
        if out.ends_with('\n') {
            out.pop();
        }
        let end = out.trim_end_matches('\n').len();
        out.truncate(end);
        out
    }

    /// Decides what to keep for a list of messages.
    pub fn plan(&self, messages: &[Message]) -> (Vec<KeptMessage>, Stats) {
        let mut stats = Stats::default();
        let mut kept = Vec::with_capacity(messages.len());
        let last = messages.len().saturating_sub(1);
        for (i, m) in messages.iter().enumerate() {
            let droppable = i != last
                && m.text_only
                && m.role != "tool"
                && m.content.len() >= self.min_duplicate_chars
                && messages[..i]
                    .iter()
                    .any(|p| p.role == m.role && p.content == m.content);
            if droppable {
                stats.dropped_messages += 1;
                continue;
            }
            let content = if m.text_only && !already_clean(&m.content) {
                let cleaned = self.clean_text(&m.content, &mut stats);
                (cleaned != m.content).then_some(cleaned)
            } else {
                None
            };
            kept.push(KeptMessage {
                source: i as u32,
                content,
            });
        }
        (kept, stats)
    }
}

/// True when [`TrimCompressor::clean_text`] has nothing to do: no line
/// ends in whitespace, none has a tab or a run of spaces after its
/// indentation, no blank line follows a blank line, no line repeats the one
/// before it and the text does not end with a newline. Most messages are
/// like this, and one pass over them is much cheaper than building the
/// cleaned copy to compare. It may refuse a text the clean-up leaves as it
/// was (spaces inside a code fence); never the other way round.
fn already_clean(text: &str) -> bool {
    if text.ends_with('\n') {
        return false;
    }
    let mut prev: Option<&str> = None;
    for line in text.split('\n') {
        if line.is_empty() {
            if prev == Some("") {
                return false;
            }
        } else if prev == Some(line)
            || line.ends_with(char::is_whitespace)
            || has_inner_run(line.trim_start_matches([' ', '\t']))
        {
            return false;
        }
        prev = Some(line);
    }
    true
}

/// A tab, or two spaces in a row.
fn has_inner_run(rest: &str) -> bool {
    let mut prev_space = false;
    for &c in rest.as_bytes() {
        if c == b'\t' || (c == b' ' && prev_space) {
            return true;
        }
        prev_space = c == b' ';
    }
    false
}

/// Collapses runs of spaces and tabs after the line's indentation; most
/// lines have none, and are returned as they are.
fn collapse_inner_spaces(line: &str) -> Cow<'_, str> {
    let indent_len = line.len() - line.trim_start_matches([' ', '\t']).len();
    let (indent, rest) = line.split_at(indent_len);
    if !has_inner_run(rest) {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    out.push_str(indent);
    let mut prev_space = false;
    for c in rest.chars() {
        if c == ' ' || c == '\t' {
            if !prev_space {
                out.push(' ');
            }
            prev_space = true;
        } else {
            out.push(c);
            prev_space = false;
        }
    }
    Cow::Owned(out)
}

impl Compressor for TrimCompressor {
    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn compress(&self, req: &RequestView) -> Compression {
        let (kept, stats) = self.plan(&req.messages);
        if stats == Stats::default() && kept.iter().all(|k| k.content.is_none()) {
            return Compression::Unchanged;
        }
        let mut parts = Vec::new();
        if stats.whitespace_chars > 0 {
            parts.push(format!("{} whitespace chars", stats.whitespace_chars));
        }
        if stats.folded_lines > 0 {
            parts.push(format!("{} repeated lines folded", stats.folded_lines));
        }
        if stats.dropped_messages > 0 {
            parts.push(format!(
                "{} duplicate messages dropped",
                stats.dropped_messages
            ));
        }
        Compression::Rewritten(Rewrite {
            messages: kept,
            note: parts.join(", "),
        })
    }
}

tollgate_sdk::export_compressor!(TrimCompressor);

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            text_only: true,
        }
    }

    #[test]
    fn collapses_spaces_but_keeps_indentation_and_code() {
        let c = TrimCompressor::from_config("").unwrap();
        let mut s = Stats::default();
        let text = "a   b\t\tc   \n    indented   here\n\n\n\nnext\n```\nx    =   1\n```";
        let out = c.clean_text(text, &mut s);
        assert_eq!(
            out,
            "a b c\n    indented here\n\nnext\n```\nx    =   1\n```"
        );
        assert!(s.whitespace_chars > 0);
    }

    #[test]
    fn folds_log_spam() {
        let c = TrimCompressor::from_config(r#"{"max_repeats": 2}"#).unwrap();
        let mut s = Stats::default();
        let text = "start\nERROR disk full\nERROR disk full\nERROR disk full\nERROR disk full\nend";
        let out = c.clean_text(text, &mut s);
        assert_eq!(
            out,
            "start\nERROR disk full\nERROR disk full\n[previous line repeated 2 more times]\nend"
        );
        assert_eq!(s.folded_lines, 2);
    }

    #[test]
    fn drops_long_duplicate_messages_but_not_short_or_last_ones() {
        let c = TrimCompressor::from_config(r#"{"min_duplicate_chars": 10}"#).unwrap();
        let doc = "a long pasted document";
        let msgs = vec![
            msg("user", doc),
            msg("assistant", "ok"),
            msg("user", doc),
            msg("assistant", "ok"),
            msg("user", doc),
        ];
        let (kept, stats) = c.plan(&msgs);
        let sources: Vec<u32> = kept.iter().map(|k| k.source).collect();
        assert_eq!(sources, vec![0, 1, 3, 4]);
        assert_eq!(stats.dropped_messages, 1);
    }

    /// Every text of up to six characters from an alphabet of the
    /// characters the clean-up treats specially: whenever the fast check
    /// says a text is clean, the full clean-up leaves it unchanged.
    #[test]
    fn the_fast_check_never_skips_a_text_the_clean_up_would_change() {
        let alphabet = [' ', '\t', '\n', 'a', 'b', '`', '\u{a0}'];
        for max_repeats in [1, 3] {
            let c = TrimCompressor::from_config(&format!(r#"{{"max_repeats": {max_repeats}}}"#))
                .unwrap();
            let mut clean = 0;
            let mut texts = vec![String::new()];
            for _ in 0..6 {
                let mut longer = Vec::new();
                for t in &texts {
                    for ch in alphabet {
                        let mut t = t.clone();
                        t.push(ch);
                        if already_clean(&t) {
                            clean += 1;
                            let mut s = Stats::default();
                            assert_eq!(c.clean_text(&t, &mut s), t, "{t:?}");
                            assert_eq!(s, Stats::default(), "{t:?}");
                        }
                        longer.push(t);
                    }
                }
                texts = longer;
            }
            assert!(clean > 1000, "{clean}");
        }
        let prose = "What is the capital of France?\n\nAnswer briefly.\n    indented line";
        assert!(already_clean(prose));
        for changed in ["a  b", "a\tb", "a \nb", "a\n\n\nb", "a\na", "a\n", "\n"] {
            assert!(!already_clean(changed), "{changed:?}");
        }
    }

    #[test]
    fn clean_text_is_identity_on_clean_text() {
        let c = TrimCompressor::from_config("").unwrap();
        let mut s = Stats::default();
        let text = "What is the capital of France?\n\nAnswer briefly.";
        assert_eq!(c.clean_text(text, &mut s), text);
        assert_eq!(s, Stats::default());
    }
}
