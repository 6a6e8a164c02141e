//! Helpers shared by the end-to-end test binaries (each uses part of them).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

pub mod gateway;

/// Runs the `tollgate` binary to completion; it must succeed.
pub fn tollgate_ok<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env_remove("OPENAI_API_KEY")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tollgate {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every line of a JSON Lines file.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
