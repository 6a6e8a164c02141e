//! Native fast paths offered to the pipeline and to plugins: token counting
//! and hashing. Both run in the host because they are hot, and because every
//! plugin would otherwise carry its own multi-megabyte tokenizer tables.

use bpe_openai::Tokenizer;

/// The tokenizer OpenAI uses for `model`: o200k for the gpt-4o family, the
/// o-series and gpt-4.1/gpt-5; cl100k for older and unknown models (the
/// closer estimate for most non-OpenAI models too).
pub fn tokenizer_for(model: &str) -> &'static Tokenizer {
    let m = model.rsplit('/').next().unwrap_or(model);
    let o200k = m.starts_with("gpt-4o")
        || m.starts_with("gpt-4.1")
        || m.starts_with("gpt-4.5")
        || m.starts_with("gpt-5")
        || m.starts_with("chatgpt-4o")
        || m.starts_with("o1")
        || m.starts_with("o3")
        || m.starts_with("o4");
    if o200k {
        bpe_openai::o200k_base()
    } else {
        bpe_openai::cl100k_base()
    }
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

/// The same count as `Tokenizer::count` (pre-tokenize, then byte-pair
/// encode each piece), with each short piece's count memoised.
fn count_with(tok: &'static Tokenizer, text: &str) -> usize {
    let text = tok.normalize(text);
    // The memo is shared by both tokenizers; the key's first byte holds the
    // piece length and which tokenizer counted it.
    let which: u8 = if std::ptr::eq(tok, bpe_openai::o200k_base()) {
        0x80
    } else {
        0
    };
    MEMO.with(|memo| {
        let mut memo = memo.borrow_mut();
        tok.split(text.as_str())
            .map(|piece| {
                let bytes = piece.as_bytes();
                if bytes.len() > MEMO_PIECE {
                    return tok.bpe.count(bytes);
                }
                let mut key = [0u8; MEMO_PIECE + 1];
                key[0] = which | bytes.len() as u8;
                key[1..=bytes.len()].copy_from_slice(bytes);
                if let Some(&n) = memo.get(&key) {
                    return n as usize;
                }
                let n = tok.bpe.count(bytes);
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

    #[test]
    fn picks_the_right_tokenizer() {
        assert!(std::ptr::eq(
            tokenizer_for("gpt-4o-mini"),
            bpe_openai::o200k_base()
        ));
        assert!(std::ptr::eq(
            tokenizer_for("openai/gpt-4.1"),
            bpe_openai::o200k_base()
        ));
        assert!(std::ptr::eq(
            tokenizer_for("gpt-3.5-turbo"),
            bpe_openai::cl100k_base()
        ));
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
            let want = tokenizer_for(model).count(text);
            for _ in 0..3 {
                assert_eq!(count(text, model) as usize, want, "{model}");
            }
        }
        // Pieces differing only in trailing NULs or tokenizer never share a count.
        assert_eq!(count("a", "gpt-4o"), 1);
        assert_eq!(
            count("a\u{0}", "gpt-4o") as usize,
            tokenizer_for("gpt-4o").count("a\u{0}")
        );
    }

    #[test]
    fn hash_is_blake3_hex() {
        assert_eq!(
            hash_hex(b"abc"),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }
}
