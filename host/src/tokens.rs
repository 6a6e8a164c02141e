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
    u32::try_from(tokenizer_for(model).count(text)).unwrap_or(u32::MAX)
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
        let n = tok.count(role) + tok.count(content);
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
    fn hash_is_blake3_hex() {
        assert_eq!(
            hash_hex(b"abc"),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }
}
