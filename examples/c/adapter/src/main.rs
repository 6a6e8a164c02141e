//! `cargo run -p wasi-adapter -- OUT.wasm`: writes the WASI preview1
//! reactor adapter (shipped inside the crates.io crate
//! `wasi-preview1-component-adapter-provider`) to OUT.wasm. A reactor, not
//! a command: a plugin is a library the gateway calls, with no `main`.

use std::process::ExitCode;

use wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: wasi-adapter OUT.wasm");
        return ExitCode::from(2);
    };
    match std::fs::write(&out, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write {}: {e}", out.to_string_lossy());
            ExitCode::FAILURE
        }
    }
}
