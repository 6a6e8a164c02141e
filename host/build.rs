//! Writes the o200k and cl100k vocabularies as flat rank-ordered byte
//! tables into OUT_DIR. The gateway only counts tokens, and counting needs
//! nothing but each token's bytes and rank: a few megabytes, where
//! bpe-openai's full tables (automata for its encoder) take ~67 MB per
//! vocabulary once loaded. bpe-openai stays the source of the data.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("cargo sets OUT_DIR")?);
    for (name, tok) in [
        ("o200k", bpe_openai::o200k_base()),
        ("cl100k", bpe_openai::cl100k_base()),
    ] {
        let bpe = &tok.bpe;
        let n = bpe.num_tokens();
        // Layout: token count, each token's end offset, then the bytes of
        // every token in rank order; all integers u32 little-endian.
        let mut ends = Vec::with_capacity(4 * (n + 1));
        let mut bytes = Vec::new();
        ends.extend_from_slice(&u32::try_from(n)?.to_le_bytes());
        for id in 0..n {
            bytes.extend_from_slice(bpe.token_bytes(u32::try_from(id)?));
            ends.extend_from_slice(&u32::try_from(bytes.len())?.to_le_bytes());
        }
        ends.extend_from_slice(&bytes);
        std::fs::write(out.join(format!("{name}.vocab")), ends)?;
    }
    println!("cargo::rerun-if-changed=build.rs");
    Ok(())
}
