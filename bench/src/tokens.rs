//! Token counting, Tollgate's native counter against Python tiktoken (what a
//! Python gateway counts with) on the same text, the same way: both must
//! find the same number of tokens, and the ratio of their speeds is reported.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

fn run_json(cmd: &mut Command) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("output of {cmd:?}"))
}

pub fn compare(tollgate: &Path, venv: &Path, text: &Path) -> Result<Value> {
    let ours = run_json(
        Command::new(tollgate)
            .args(["bench", "--only", "tokens", "--text"])
            .arg(text),
    )?["token_counting"]
        .clone();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tiktoken_throughput.py");
    let theirs = run_json(
        Command::new(venv.join("bin/python"))
            .arg(script)
            .arg(text)
            .env("TIKTOKEN_CACHE_DIR", crate::compare::tiktoken_cache(venv)),
    )?;
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    ensure!(
        ours["tokens"] == theirs["tokens"]
            && ours["whole_text_tokens"] == theirs["whole_text_tokens"],
        "the two counters disagree: Tollgate {} / {}, tiktoken {} / {}",
        ours["tokens"],
        ours["whole_text_tokens"],
        theirs["tokens"],
        theirs["whole_text_tokens"]
    );
    Ok(json!({
        "text": text.display().to_string(),
        "encoding": "o200k_base",
        "tiktoken_version": theirs["tiktoken"],
        "messages": ours["messages"],
        "tokens": ours["tokens"],
        "tollgate_mb_per_s": f(&ours, "messages_mb_per_s"),
        "tiktoken_mb_per_s": f(&theirs, "messages_mb_per_s"),
        "ratio_messages": (f(&ours, "messages_mb_per_s") / f(&theirs, "messages_mb_per_s") * 100.0).round() / 100.0,
        // Tollgate memoises the counts of short pieces (words); this is the
        // speed with the memo emptied before every pass over the text.
        "tollgate_first_sight_mb_per_s": f(&ours, "messages_first_sight_mb_per_s"),
        "ratio_first_sight": (f(&ours, "messages_first_sight_mb_per_s") / f(&theirs, "messages_mb_per_s") * 100.0).round() / 100.0,
        "whole_text": {
            "bytes": ours["whole_text_bytes"],
            "tokens": ours["whole_text_tokens"],
            "tollgate_mb_per_s": f(&ours, "whole_text_mb_per_s"),
            "tiktoken_mb_per_s": f(&theirs, "whole_text_mb_per_s"),
            "ratio": (f(&ours, "whole_text_mb_per_s") / f(&theirs, "whole_text_mb_per_s") * 100.0).round() / 100.0,
        },
    }))
}
