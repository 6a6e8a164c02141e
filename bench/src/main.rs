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
    /// Load one URL (for profiling a server by hand): fixed rate, or closed
    /// loop with `--connections`. Prints what it saw.
    Load {
        url: String,
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Closed loop with this many connections instead of a fixed rate.
        #[arg(long)]
        connections: Option<usize>,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// `name: value`, repeatable.
        #[arg(long)]
        header: Vec<String>,
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
        Cmd::Load {
            url,
            rate,
            connections,
            seconds,
            header,
        } => load_one(rt.handle(), &url, rate, connections, seconds, &header),
        Cmd::Chart { results, out } => {
            let text =
                std::fs::read_to_string(&results).with_context(|| results.display().to_string())?;
            chart::draw(&serde_json::from_str(&text)?, &out)
        }
    }
}

fn load_one(
    rt: &tokio::runtime::Handle,
    url: &str,
    rate: f64,
    connections: Option<usize>,
    seconds: f64,
    headers: &[String],
) -> Result<()> {
    let headers = headers
        .iter()
        .map(|h| {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("{h}: want `name: value`"))?;
            Ok((k.trim().parse()?, v.trim().parse()?))
        })
        .collect::<Result<_>>()?;
    let target = std::sync::Arc::new(load::Target {
        uri: url.parse()?,
        headers,
    });
    let client = load::client();
    let (d, timeout) = (
        std::time::Duration::from_secs_f64(seconds),
        std::time::Duration::from_secs(5),
    );
    let o = match connections {
        Some(c) => load::closed_loop(rt, &client, &target, c, d, timeout),
        None => load::open_loop(rt, &client, &target, rate, d, timeout, 4096),
    };
    let l = &o.latencies_us;
    eprintln!(
        "{:.0} answered/s, errors {} ({}), p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} ms",
        o.answered_per_second(),
        o.errors,
        o.first_error.as_deref().unwrap_or("-"),
        load::percentile(l, 0.5) / 1e3,
        load::percentile(l, 0.9) / 1e3,
        load::percentile(l, 0.99) / 1e3,
        load::percentile(l, 0.999) / 1e3,
    );
    Ok(())
}
