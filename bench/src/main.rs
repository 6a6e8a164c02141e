//! `tollgate-bench`: the harness behind `make bench-compare`.
//!
//! * `compare` runs every contender (the upstream called directly, a bare
//!   forwarder, Tollgate without and with its plugins, LiteLLM's proxy)
//!   against one simulator upstream on loopback and writes the results;
//! * `floor` is the bare forwarder itself, started by `compare` as its own
//!   process;
//! * `chart` redraws the chart of an earlier results file.

mod chart;
mod compare;
mod contenders;
mod floor;
mod load;
mod procfs;
mod summary;
mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Tollgate side by side with a bare forwarder and LiteLLM"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure every contender in one run.
    Compare(compare::CompareArgs),
    /// Serve the bare forwarder.
    Floor {
        #[arg(long)]
        listen: SocketAddr,
        /// Scheme and authority of the upstream, e.g. http://127.0.0.1:9090.
        #[arg(long)]
        upstream: hyper::Uri,
    },
    /// Draw the chart of a results file.
    Chart {
        results: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Compare(args) => compare::run(rt.handle(), &args),
        Cmd::Floor { listen, upstream } => rt.block_on(floor::serve(listen, upstream)),
        Cmd::Chart { results, out } => {
            let text =
                std::fs::read_to_string(&results).with_context(|| results.display().to_string())?;
            chart::draw(&serde_json::from_str(&text)?, &out)
        }
    }
}
