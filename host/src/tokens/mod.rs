//! Native fast paths offered to the pipeline and to plugins: token counting
//! and hashing. Both run in the host because they are hot, and because every
//! plugin would otherwise carry its own multi-megabyte tokenizer tables.

mod ascii;
mod vocab;

use std::sync::LazyLock;

use bpe_openai::Tokenizer;
use bpe_openai::byte_pair_encoding::BytePairEncoding;
use vocab::Vocab;

/// One of OpenAI's encodings: its pre-tokenizer and its vocabulary.
pub struct Encoding {
    /// bpe-openai's pre-tokenizer, built over a 256-byte vocabulary: only
    /// its `split` is used, so its large tables are never built.
    pre: Tokenizer,
    vocab: Vocab,
    /// Tells the two encodings apart in the per-thread memo's keys.
    memo_tag: u8,
    /// The same split, by hand where ASCII decides it (the pieces tokens
    /// never cross).
    ascii: ascii::Flavor,
}

impl Encoding {
    fn new(
        vocab: &'static [u8],
        patterns: &[(&str, bool)],
        memo_tag: u8,
        ascii: ascii::Flavor,
    ) -> Self {
        let bytes = BytePairEncoding::from_dictionary((0..=255u8).map(|b| vec![b]), None);
        // The patterns are constants, tested below; a failure here is a
        // build defect, not something a request can cause.
        #[allow(clippy::expect_used)]
        let pre = Tokenizer::new_lookahead(bytes, patterns, false).expect("valid patterns");
        Encoding {
            pre,
            vocab: Vocab::parse(vocab),
            memo_tag,
            ascii,
        }
    }
}

// The pre-tokenizer patterns are tiktoken's, as bpe-openai rewrites them
// (a negative look-ahead becomes a one-character positive one that `split`
// drops again).
static O200K: LazyLock<Encoding> = LazyLock::new(|| {
    let pat1 = [
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        "\\p{N}{1,3}",
        " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*",
        "\\s*[\\r\\n]+",
        "\\s+$",
    ]
    .join("|");
    Encoding::new(
        include_bytes!(concat!(env!("OUT_DIR"), "/o200k.vocab")),
        &[(&pat1, false), ("\\s+\\s", true), ("\\s+", false)],
        0x80,
        ascii::Flavor::O200k,
    )
});

static CL100K: LazyLock<Encoding> = LazyLock::new(|| {
    let pat1 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+$";
    Encoding::new(
        include_bytes!(concat!(env!("OUT_DIR"), "/cl100k.vocab")),
        &[(pat1, false), ("\\s+\\s", true), ("\\s+", false)],
        0,
        ascii::Flavor::Cl100k,
    )
});

/// The encoding OpenAI uses for `model`: o200k for the gpt-4o family, the
/// o-series and gpt-4.1/gpt-5; cl100k for older and unknown models (the
/// closer estimate for most non-OpenAI models too).
pub fn tokenizer_for(model: &str) -> &'static Encoding {
    let m = model.rsplit('/').next().unwrap_or(model);
    let o200k = m.starts_with("gpt-4o")
        || m.starts_with("gpt-4.1")
        || m.starts_with("gpt-4.5")
        || m.starts_with("gpt-5")
        || m.starts_with("chatgpt-4o")
        || m.starts_with("o1")
        || m.starts_with("o3")
        || m.starts_with("o4");
    if o200k { &O200K } else { &CL100K }
}

/// Tokens in `text` for `model`.
pub fn count(text: &str, model: &str) -> u32 {
    u32::try_from(count_with(tokenizer_for(model), text)).unwrap_or(u32::MAX)
}

/// Pieces of at most this many bytes are remembered with their count.
const MEMO_PIECE: usize = 23;
/// Entries per thread before the memo starts over, which bounds it at
/// about 1 MiB per thread.
const MEMO_ENTRIES: usize = 1 << 15;

thread_local! {
    /// Token counts of recently seen pre-tokenizer pieces. Text is Zipfian:
    /// most pieces are common words already counted, and a hash lookup is
    /// several times cheaper than running the byte-pair encoder again.
    static MEMO: std::cell::RefCell<rustc_hash::FxHashMap<[u8; MEMO_PIECE + 1], u32>> =
        std::cell::RefCell::new(rustc_hash::FxHashMap::default());
}

/// Empties this thread's memo, so a benchmark can measure text counted for
/// the first time next to text seen before.
pub fn forget_memo() {
    MEMO.with(|m| m.borrow_mut().clear());
}

/// Tokens in `text`: pre-tokenize, then byte-pair merge each piece, with
/// each short piece's count memoised.
fn count_with(enc: &'static Encoding, text: &str) -> usize {
    count_pieces(enc, ascii::pieces(text, enc.ascii, &enc.pre))
}

fn count_pieces<'a>(enc: &'static Encoding, pieces: impl Iterator<Item = &'a str>) -> usize {
    MEMO.with(|memo| {
        let mut memo = memo.borrow_mut();
        pieces
            .map(|piece| {
                let bytes = piece.as_bytes();
                if bytes.len() > MEMO_PIECE {
                    return enc.vocab.count(bytes);
                }
                // The key's first byte holds the piece length and which
                // encoding counted it.
                let mut key = [0u8; MEMO_PIECE + 1];
                key[0] = enc.memo_tag | bytes.len() as u8;
                key[1..=bytes.len()].copy_from_slice(bytes);
                if let Some(&n) = memo.get(&key) {
                    return n as usize;
                }
                let n = enc.vocab.count(bytes);
                if memo.len() >= MEMO_ENTRIES {
                    memo.clear();
                }
                memo.insert(key, u32::try_from(n).unwrap_or(u32::MAX));
                n
            })
            .sum()
    })
}

/// Prompt tokens of a chat request the way OpenAI bills them: each message
/// costs its content plus a few framing tokens, and every reply is primed
/// with three more.
pub fn count_messages<'a>(
    model: &str,
    messages: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> u32 {
    const PER_MESSAGE: u32 = 3;
    const REPLY_PRIMING: u32 = 3;
    let tok = tokenizer_for(model);
    let mut total: u32 = REPLY_PRIMING;
    for (role, content) in messages {
        let n = count_with(tok, role) + count_with(tok, content);
        total = total
            .saturating_add(PER_MESSAGE)
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }
    total
}

/// BLAKE3 of `data` as 64 lowercase hex characters.
pub fn hash_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bpe-openai's full tokenizer, checked against tiktoken upstream, is
    /// the reference every count here must equal.
    fn reference(model: &str) -> &'static bpe_openai::Tokenizer {
        if std::ptr::eq(tokenizer_for(model), &*O200K) {
            bpe_openai::o200k_base()
        } else {
            bpe_openai::cl100k_base()
        }
    }

    #[test]
    fn picks_the_right_tokenizer() {
        assert!(std::ptr::eq(tokenizer_for("gpt-4o-mini"), &*O200K));
        assert!(std::ptr::eq(tokenizer_for("openai/gpt-4.1"), &*O200K));
        assert!(std::ptr::eq(tokenizer_for("gpt-3.5-turbo"), &*CL100K));
        assert_eq!(O200K.vocab.len(), 199_998);
        assert_eq!(CL100K.vocab.len(), 100_256);
    }

    #[test]
    fn counts_are_plausible() {
        assert_eq!(count("hello world", "gpt-4o"), 2);
        assert_eq!(count("", "gpt-4o"), 0);
        let n = count_messages("gpt-4o", [("user", "hello world")]);
        assert_eq!(n, 3 + 1 + 2 + 3);
    }

    #[test]
    fn memoised_counts_match_the_tokenizer() {
        let text = "The quick brown fox, the QUICK brown fox!  Ünïcödé 12345 \
                    and\u{0}nul, emoji 🦀🦀 and a veryveryveryveryverylongword \n\n\t done";
        for model in ["gpt-4o", "gpt-3.5-turbo"] {
            let want = reference(model).count(text);
            for _ in 0..3 {
                assert_eq!(count(text, model) as usize, want, "{model}");
            }
        }
        // Pieces differing only in trailing NULs or tokenizer never share a count.
        assert_eq!(count("a", "gpt-4o"), 1);
        assert_eq!(
            count("a\u{0}", "gpt-4o") as usize,
            reference("gpt-4o").count("a\u{0}")
        );
    }

    /// Text of every kind a prompt holds: prose, code, JSON, numbers,
    /// several scripts, emoji, odd whitespace, and runs long enough that the
    /// merge order decides the count.
    fn varied_text(seed: u64, len: usize) -> String {
        const PARTS: &[&str] = &[
            "the ",
            "The ",
            "quick",
            " brown",
            "fox",
            "'s ",
            "don't ",
            "I'LL ",
            "12345",
            "3.14159",
            " 2026-12-01",
            "{\"key\": [1, 2, 3]}",
            "fn main() { }",
            "\n",
            "\r\n",
            "\t",
            "   ",
            "  \n\n ",
            "Ünïcödé",
            "naïve café",
            "日本語のテキスト",
            "Привет мир",
            "مرحبا",
            "🦀",
            "👩‍👩‍👧",
            "e\u{301}",
            "\u{0}",
            "https://example.com/a?b=c",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "abababababababababab",
            "ThisIsCamelCaseIdentifier",
            "SCREAMING_SNAKE_CASE",
            "--==**!!",
            "////",
            "...",
            "0000000000",
            "xXxXxXxX",
            "supercalifragilisticexpialidocious",
        ];
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut s = String::new();
        while s.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push_str(PARTS[(x % PARTS.len() as u64) as usize]);
        }
        s
    }

    #[test]
    fn counts_equal_the_reference_tokenizer() {
        let readme = include_str!("../../../README.md");
        for model in ["gpt-4o", "gpt-3.5-turbo"] {
            let reference = reference(model);
            assert_eq!(count(readme, model) as usize, reference.count(readme));
            for seed in 0..300 {
                let text = varied_text(seed, 10 + seed as usize * 7);
                assert_eq!(
                    count(&text, model) as usize,
                    reference.count(text.as_str()),
                    "{model}: {text:?}"
                );
            }
            // One piece far longer than any word: the merge stays exact
            // (and near-linear).
            let long = "ab".repeat(20_000) + &"z".repeat(30_000);
            assert_eq!(count(&long, model) as usize, reference.count(long.as_str()));
        }
    }

    #[test]
    fn hash_is_blake3_hex() {
        assert_eq!(
            hash_hex(b"abc"),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }
}
