//! The o200k and cl100k pre-tokenisers, written out by hand for ASCII.
//!
//! The encodings' regexes (tiktoken's, run by regex-automata) took ~45% of
//! counting time. On ASCII every class in them is a fixed set of bytes, so
//! the leftmost-first match at a position follows from a few byte runs;
//! this walks them directly. A piece whose match depends on any other byte
//! (one was read while deciding it) is taken from the regex instead,
//! anchored at the same position, so mixed text splits exactly as before.
//! The tests compare every split with the regex's on random and real text:
//! the pieces must be the same, not just the counts.
//!
//! How each alternative resolves on ASCII, in the regexes' priority order
//! (U = A-Z, L = a-z, N = 0-9, W = `\s` = `\t\n\x0b\x0c\r `, O = every other
//! byte, P = any byte but `\r`, `\n`, letters and digits):
//! * o200k `P?[U]*[L]+'x?` and `P?[U]+[L]*'x?`: an optional P, then the
//!   uppercase run and the lowercase run after it, then a contraction (`'s`,
//!   `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`, any case); one of the two always
//!   matches when a letter follows.
//! * cl100k: a contraction first, then `P?[A-Za-z]+`.
//! * `N{1,3}`, then ` ?O+[\r\n/]*` (cl100k: `[\r\n]*`).
//! * `\s*[\r\n]+`: through the last `\r` or `\n` of the whitespace run;
//!   `\s+$`: the whole run at the end of the text; `\s+(?!\S)`: the run but
//!   its last byte when that is not the last byte of the text; `\s+`: a
//!   single whitespace byte.

use bpe_openai::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavor {
    O200k,
    Cl100k,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

fn is_letter(b: u8) -> bool {
    b.is_ascii_alphabetic()
}

/// Neither whitespace, letter nor digit.
fn is_other(b: u8) -> bool {
    !is_ws(b) && !b.is_ascii_alphanumeric()
}

/// The pieces of `text`: those that ASCII bytes alone decide by hand, the
/// others by `regex` (the same encoding's pre-tokeniser).
pub(super) fn pieces<'a>(text: &'a str, flavor: Flavor, regex: &'a Tokenizer) -> Pieces<'a> {
    Pieces {
        text,
        pos: 0,
        next_non_ascii: None,
        flavor,
        regex,
    }
}

pub(super) struct Pieces<'a> {
    text: &'a str,
    pos: usize,
    /// The first byte at or after `pos` that is not ASCII (the length if
    /// none); None until first needed.
    next_non_ascii: Option<usize>,
    flavor: Flavor,
    regex: &'a Tokenizer,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.text.as_bytes();
        let start = self.pos;
        if start >= s.len() {
            return None;
        }
        let limit = match self.next_non_ascii {
            Some(n) if n >= start => n,
            _ => {
                let n = s[start..]
                    .iter()
                    .position(|b| !b.is_ascii())
                    .map_or(s.len(), |k| start + k);
                self.next_non_ascii = Some(n);
                n
            }
        };
        let by_hand = (limit > start)
            .then(|| piece_end(s, start, self.flavor))
            .filter(|&(_, read_to)| read_to.min(s.len()) <= limit);
        let end = match by_hand {
            Some((end, _)) => end.clamp(start + 1, s.len()),
            None => {
                // The regex's own piece at `start`: its split runs anchored
                // at each position, so the first piece of the rest is it.
                let rest = self.text.get(start..)?;
                start + self.regex.split(rest).next()?.len()
            }
        };
        self.pos = end;
        self.text.get(start..end)
    }
}

fn run(s: &[u8], mut i: usize, f: impl Fn(u8) -> bool) -> usize {
    while i < s.len() && f(s[i]) {
        i += 1;
    }
    i
}

/// Length of the contraction at `i`, or 0.
fn contraction(s: &[u8], i: usize) -> usize {
    if s.get(i) != Some(&b'\'') {
        return 0;
    }
    let lower = |k: usize| s.get(i + k).map(u8::to_ascii_lowercase);
    match (lower(1), lower(2)) {
        (Some(b's' | b't' | b'm' | b'd'), _) => 2,
        (Some(b'r' | b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => 3,
        _ => 0,
    }
}

/// Where the piece at `i` ends, and where the bytes read to decide it end
/// (all of them must be ASCII for the answer to hold). Besides the piece,
/// a decision reads at most its next three bytes (the byte that ends a run,
/// a contraction after letters), or the rest of a run of whitespace.
fn piece_end(s: &[u8], i: usize, flavor: Flavor) -> (usize, usize) {
    let end = |e: usize| (e, e + 3);
    let b = s[i];
    if flavor == Flavor::Cl100k {
        let c = contraction(s, i);
        if c > 0 {
            return end(i + c);
        }
    }
    if is_letter(b) {
        return end(letters(s, i, flavor));
    }
    if b.is_ascii_digit() {
        return end(run(s, i, |c| c.is_ascii_digit()).min(i + 3));
    }
    // An optional leading byte that is no newline, letter or digit.
    if b != b'\r' && b != b'\n' && s.get(i + 1).copied().is_some_and(is_letter) {
        return end(letters(s, i + 1, flavor));
    }
    if is_other(b) {
        return end(punctuation(s, i, flavor));
    }
    if b == b' ' && s.get(i + 1).copied().is_some_and(is_other) {
        return end(punctuation(s, i + 1, flavor));
    }
    whitespace(s, i)
}

/// The letters from `i` (a letter), and an o200k contraction after them.
fn letters(s: &[u8], i: usize, flavor: Flavor) -> usize {
    match flavor {
        Flavor::O200k => {
            let upper_end = run(s, i, |c| c.is_ascii_uppercase());
            let end = run(s, upper_end, |c| c.is_ascii_lowercase());
            end + contraction(s, end)
        }
        Flavor::Cl100k => run(s, i, is_letter),
    }
}

/// `O+` from `i`, then the newlines (and o200k: slashes) after it.
fn punctuation(s: &[u8], i: usize, flavor: Flavor) -> usize {
    let end = run(s, i, is_other);
    match flavor {
        Flavor::O200k => run(s, end, |c| matches!(c, b'\r' | b'\n' | b'/')),
        Flavor::Cl100k => run(s, end, |c| matches!(c, b'\r' | b'\n')),
    }
}

/// The piece a run of whitespace from `i` gives, and the end of the bytes
/// read: the whole run and the bytes after it, as for the other pieces
/// (the regex's run goes on through whitespace that is not ASCII).
fn whitespace(s: &[u8], i: usize) -> (usize, usize) {
    let end = run(s, i, is_ws);
    let read_to = end + 3;
    if let Some(k) = s[i..end].iter().rposition(|&c| c == b'\r' || c == b'\n') {
        return (i + k + 1, read_to);
    }
    if end == s.len() || end - i < 2 {
        (end, read_to)
    } else {
        (end - 1, read_to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoding(flavor: Flavor) -> &'static super::super::Encoding {
        match flavor {
            Flavor::O200k => &super::super::O200K,
            Flavor::Cl100k => &super::super::CL100K,
        }
    }

    fn same(text: &str) {
        for flavor in [Flavor::O200k, Flavor::Cl100k] {
            let enc = encoding(flavor);
            let ours: Vec<&str> = pieces(text, flavor, &enc.pre).collect();
            let regex: Vec<&str> = enc.pre.split(text).collect();
            assert_eq!(ours, regex, "{flavor:?} {text:?}");
        }
    }

    #[test]
    fn every_triple_of_interesting_characters() {
        const CHARS: &[&str] = &[
            "a", "Z", "0", " ", "\t", "\n", "\r", "\x0b", "\x0c", "'", "/", "!", ".", "_", "s",
            "S", "t", "r", "R", "e", "v", "l", "L", "m", "d", "D", "\x00", "\x1f", "\x7f",
            // Not ASCII: letters, a digit, whitespace, a mark, symbols.
            "é", "É", "ǅ", "ʰ", "\u{301}", "٣", "\u{a0}", "\u{2028}", "€", "🦀",
        ];
        same("");
        for a in CHARS {
            for b in CHARS {
                for c in CHARS {
                    same(&format!("{a}{b}{c}"));
                }
            }
        }
        for b in 0u8..128 {
            same(std::str::from_utf8(&[b, b, b'a', b, b' ', b'A', b]).unwrap());
        }
    }

    #[test]
    fn random_text_splits_as_the_regex_splits_it() {
        const ALPHABET: &[char] = &[
            'a', 'a', 'a', 'e', 'e', 'i', 'o', 'u', 's', 't', 'n', 'r', 'l', 'd', 'm', 'v', 'A',
            'E', 'T', 'S', 'L', 'Z', '0', '1', '5', '9', ' ', ' ', ' ', ' ', '\t', '\n', '\n',
            '\r', '\'', '\'', '/', ',', '.', ';', '!', '?', '-', '_', '(', '}', '"', '\x0b',
            '\x0c', '\x00', '\x1f', '\x7f', 'é', 'É', 'ß', '٣', '\u{a0}', '\u{301}', '—', '🦀',
            '日',
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..60_000 {
            let len = (next() % 40) as usize;
            let text: String = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            same(&text);
        }
    }

    #[test]
    fn real_text_splits_as_the_regex_splits_it() {
        let readme = include_str!("../../../README.md");
        same(readme);
        let ascii: String = readme.chars().filter(char::is_ascii).collect();
        same(&ascii);
        same("I'LL say it's don't WE'RE they've I'm you'd 'sup 'S '' x'");
        same("HELLOworld helloWorld ABC'S http://x.y/z?q=1&r=2 //c\n/* */ a/\n/b");
        same("  leading  and trailing  \n\n  \r\n\t \n x  ");
        same("café naïve Ünïcödé 日本語 — “quoted” 12٣4 \u{a0}\n\u{a0} x\u{301}");
    }
}
