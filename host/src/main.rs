//! `tollgate`: the gateway binary.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tollgate::clock::SystemClock;
use tollgate::config::{Config, SimConfig};
use tollgate::pipeline::Gateway;
use tollgate::pricing::Catalog;
use tollgate::providers::SimProvider;
use tollgate::server;

mod bench;
mod bench_fixtures;

/// glibc's per-thread arenas grow and shrink their heaps with mprotect on
/// nearly every request (seen with strace), and each mprotect interrupts the
/// other core; with mimalloc the gateway's added latency in `tollgate bench`
/// went from about 185 to 160 µs p50 without plugins on this machine.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "LLM cost-control gateway with WebAssembly policy plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve(ServeArgs),
    /// Run the simulator alone as an OpenAI-compatible upstream.
    Sim {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: String,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        #[arg(long, default_value_t = 0)]
        ms_per_token: u64,
    },
    /// Measure plugin call cost and gateway overhead; prints JSON.
    Bench(bench::BenchArgs),
    /// Spend from the ledger, grouped, with cost per successful task.
    Report(ReportArgs),
    /// Replay a day of traffic through a policy set on the simulator: what it
    /// would cost and how requests would be served, before it goes live.
    Replay(ReplayArgs),
    /// Turn recorded traffic (ledger rows kept with `ledger.record_bodies`)
    /// into a trace that `tollgate replay` can run.
    ExportTrace(ExportArgs),
    /// Work with plugin files.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// What a plugin is and may do: world, imports, exports, size, sha256 and
    /// the capabilities its imports ask for. Exits 1 if the gateway would refuse it.
    Inspect {
        file: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a plugin offline on recorded requests (a trace, an exported
    /// trace or a ledger file): each decision, agreement with the expected
    /// decisions, and the time of each call.
    Test(TestArgs),
}

#[derive(clap::Args)]
struct TestArgs {
    /// The plugin component.
    file: PathBuf,
    /// The slot it is written for.
    #[arg(long, value_enum)]
    kind: KindArg,
    /// Cases: JSON Lines in the trace format (optionally with `expect`,
    /// `spend`, `response`), or a ledger file (.db, .sqlite) that kept bodies.
    #[arg(long)]
    cases: PathBuf,
    /// A gateway config (the slot of this kind gives limits, capabilities and
    /// config; providers and prices give the candidates), or the plugin's
    /// own config (TOML, or JSON with a .json name).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
    /// List every case, not only disagreements and errors.
    #[arg(long)]
    all: bool,
    /// Exit 1 when fewer cases than this share (0 to 1) get their expected decision.
    #[arg(long)]
    min_agreement: Option<f64>,
    /// Run the cases this many times for steadier timings.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Router,
    Compressor,
    CachePolicy,
    BudgetRule,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    range: LedgerRange,
    /// The trace to write (JSON Lines).
    #[arg(long, short)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// Trace to replay (JSON Lines: id, t_ms, tenant, user, feature, task, request).
    #[arg(long)]
    trace: PathBuf,
    /// Policy set (gateway config) to replay.
    #[arg(
        long,
        short,
        required_unless_present = "compare",
        conflicts_with = "compare"
    )]
    config: Option<PathBuf>,
    /// Replay two policy sets on the same trace and show them side by side.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    compare: Option<Vec<PathBuf>>,
    /// Run file for score.py; with --compare, a directory for both runs.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// The replay's ledger (default: next to the run file); read it with `tollgate report`.
    #[arg(long, conflicts_with = "compare")]
    ledger: Option<PathBuf>,
    /// Trace time per wall time, e.g. 60 replays an hour per minute.
    #[arg(long, conflicts_with = "max_speed")]
    speed: Option<f64>,
    /// As fast as the gateway answers (the default).
    #[arg(long)]
    max_speed: bool,
    /// Requests in flight at once. Above 1, requests close in time may be
    /// answered out of trace order (a cache hit can come from a request
    /// that arrives later in the trace), and runs stop being repeatable.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// The UTC day the trace's t_ms count from (YYYY-MM-DD; default today).
    #[arg(long)]
    day: Option<String>,
    /// Price table replacing the built-in catalog (same format as host/pricing.toml).
    #[arg(long)]
    prices: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ReportArgs {
    #[command(flatten)]
    range: LedgerRange,
    /// Comma-separated: tenant, user, feature, model, route, provider, day.
    #[arg(long, default_value = "feature")]
    group_by: String,
    /// Only the N most expensive groups.
    #[arg(long)]
    top: Option<usize>,
    #[arg(long, value_enum, default_value = "table")]
    format: ReportFormat,
    /// Shadow plugins instead: agreement with the active plugin and the cost
    /// difference they would have made.
    #[arg(long)]
    shadow: bool,
    /// The answer cache instead: lookups, hits (semantic among them), hit
    /// rate, what the hits saved, answers stored and their bytes, embedding
    /// time, net saving.
    #[arg(long, conflicts_with = "shadow")]
    cache: bool,
}

/// A ledger and the part of it a command reads.
#[derive(clap::Args)]
struct LedgerRange {
    /// Gateway config: where the ledger is (and the prices, for reports).
    #[arg(long, short, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Ledger file; overrides the config's `ledger.path`.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// First day included (YYYY-MM-DD, UTC).
    #[arg(long)]
    since: Option<String>,
    /// Last day included (YYYY-MM-DD, UTC).
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
}

impl LedgerRange {
    /// The config and its ledger, which must exist.
    fn open(&self) -> Result<(Config, rusqlite::Connection)> {
        let config = load_config(self.config.as_deref())?;
        let path = self
            .ledger
            .clone()
            .unwrap_or_else(|| config.ledger.path.clone());
        anyhow::ensure!(path.exists(), "no ledger at {}", path.display());
        let conn = tollgate::ledger::open_db(&path)?;
        Ok((config, conn))
    }

    /// `--since` and `--until` in epoch milliseconds (until: exclusive).
    fn days(&self) -> Result<(Option<u64>, Option<u64>)> {
        let day = |s: &Option<String>, what: &str, parse: fn(&str) -> Option<u64>| {
            s.as_deref()
                .map(|d| {
                    parse(d)
                        .with_context(|| format!("--{what} {d:?}: expected a day as YYYY-MM-DD"))
                })
                .transpose()
        };
        Ok((
            day(&self.since, "since", tollgate::clock::parse_day)?,
            day(&self.until, "until", tollgate::clock::parse_day_end)?,
        ))
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Table,
    Csv,
    Json,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Config file (TOML); without one every default applies.
    #[arg(long, short, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `server.listen`.
    #[arg(long)]
    listen: Option<String>,
}

/// mimalloc's `purge_delay` option (its index in mimalloc v3's option enum).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the OS at once instead of after a delay that
/// only expires when the freeing thread allocates again: the threads that
/// compile plugins at start-up never do, and kept ~80 MB resident. Measured
/// at saturation, the CPU per request did not change. MIMALLOC_PURGE_DELAY
/// in the environment still wins.
#[allow(unsafe_code)]
fn release_freed_memory_promptly() {
    // SAFETY: called first thing in main, before any other thread exists;
    // the option is a plain integer mimalloc reads on each purge.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, 0) };
}

/// Logs to stderr. `serve` writes a line per request through a buffer a
/// background thread writes out (see `log_writer`); if the log sink stalls,
/// lines are dropped rather than stall requests (the ledger keeps every
/// request). Other commands write directly.
fn init_logging(level: &str, serving: bool) -> Option<tollgate::log_writer::FlushGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    if serving {
        use tollgate::log_writer::{BatchedWriter, FLUSH_EVERY, MAX_PENDING_BYTES};
        match BatchedWriter::new(std::io::stderr(), FLUSH_EVERY, MAX_PENDING_BYTES) {
            Ok((writer, guard)) => {
                fmt.with_writer(writer).init();
                return Some(guard);
            }
            Err(e) => eprintln!("tollgate: cannot start the log writer ({e}): logging directly"),
        }
    }
    fmt.with_writer(std::io::stderr).init();
    None
}

fn main() -> Result<()> {
    release_freed_memory_promptly();
    let cli = Cli::parse();
    // A replay logs only what goes wrong: thousands of per-request lines
    // would bury the summary.
    let level = match cli.command {
        Some(Command::Replay(_) | Command::Plugin(PluginCommand::Test(_))) => "warn",
        _ => "info",
    };
    let serving = matches!(cli.command, None | Some(Command::Serve(_)));
    // Flushed (on drop) when main returns.
    let _log_flush = init_logging(level, serving);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Sim {
            listen,
            latency_ms,
            ms_per_token,
        } => rt.block_on(sim(listen, latency_ms, ms_per_token)),
        Command::Bench(args) => rt.block_on(bench::run(args)),
        Command::Report(args) => report(args),
        Command::Replay(args) => rt.block_on(replay(args)),
        Command::ExportTrace(args) => export_trace(args),
        Command::Plugin(PluginCommand::Inspect { file, json }) => inspect(&file, json),
        Command::Plugin(PluginCommand::Test(args)) => rt.block_on(plugin_test(args)),
    }
}

#[allow(clippy::print_stdout)] // the summary is the output
async fn replay(args: ReplayArgs) -> Result<()> {
    use tollgate::replay::{self, ReplayOptions, Summary};
    let trace = replay::trace::read(&args.trace)?;
    let day_start_ms = match &args.day {
        Some(d) => tollgate::clock::parse_day(d)
            .with_context(|| format!("--day {d:?}: expected a day as YYYY-MM-DD"))?,
        None => {
            let now = tollgate::clock::Clock::now_ms(&SystemClock);
            now - now % tollgate::clock::DAY_MS
        }
    };
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    if let Some(s) = args.speed {
        anyhow::ensure!(
            s > 0.0 && s.is_finite(),
            "--speed must be a positive number"
        );
    }
    let load = |path: &std::path::Path| -> Result<Config> {
        let mut c = Config::load(path)?;
        if let Some(p) = &args.prices {
            c.pricing.catalog = Some(p.clone());
            c.catalog()?;
        }
        Ok(c)
    };
    let opts = |ledger_path: PathBuf, label: String| ReplayOptions {
        concurrency: args.concurrency,
        speed: args.speed,
        day_start_ms,
        ledger_path,
        label,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    // A policy set's name: its file's stem, or its directory's name for a
    // `tollgate.toml` inside a policy-set directory (examples/cost-saver).
    let stem = |p: &std::path::Path| {
        let name = |s: Option<&std::ffi::OsStr>| s.map(|s| s.to_string_lossy().into_owned());
        match name(p.file_stem()) {
            Some(s) if s == "tollgate" => name(p.parent().and_then(|d| d.file_name())).unwrap_or(s),
            Some(s) => s,
            None => "run".to_string(),
        }
    };
    if let Some(pair) = &args.compare {
        let dir = args.out.clone().unwrap_or_else(|| PathBuf::from("replay"));
        let (mut na, mut nb) = (stem(&pair[0]), stem(&pair[1]));
        if na == nb {
            na.push_str("-a");
            nb.push_str("-b");
        }
        let mut summaries = Vec::new();
        for (path, name) in [(&pair[0], na), (&pair[1], nb)] {
            let config = load(path)?;
            let run_path = dir.join(format!("{name}.jsonl"));
            let o = opts(dir.join(format!("{name}.ledger.sqlite")), name.clone());
            let run = replay::run(config, &trace, &o).await?;
            run.write_jsonl(&run_path)?;
            eprintln!("{name}: run written to {}", run_path.display());
            summaries.push(Summary::of(&name, &run));
        }
        print!("{}", replay::compare_table(&summaries[0], &summaries[1]));
        return Ok(());
    }
    let config_path = args.config.as_deref().context("--config is required")?;
    let config = load(config_path)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("run.jsonl"));
    let ledger = args
        .ledger
        .clone()
        .unwrap_or_else(|| out.with_extension("ledger.sqlite"));
    let run = replay::run(config, &trace, &opts(ledger.clone(), stem(config_path))).await?;
    run.write_jsonl(&out)?;
    print!("{}", Summary::of(&stem(config_path), &run).table());
    println!(
        "run: {}  ledger: {}\nscore it: python3 score.py --trace {} --run {}",
        out.display(),
        ledger.display(),
        args.trace.display(),
        out.display()
    );
    Ok(())
}

pub fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::parse("", "(defaults)", std::path::Path::new("."))?,
    })
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = load_config(args.config.as_deref())?;
    let file_config = config.clone();
    if let Some(l) = args.listen {
        config.server.listen = l;
    }
    let listen = config.server.listen.clone();
    let drain = Duration::from_millis(config.server.drain_timeout_ms);
    let gw = Gateway::new(config, Arc::new(SystemClock))
        .await
        .context("cannot start the gateway")?;
    let admin_token = tollgate::admin::load_token(&gw.config.admin)?;
    let _watcher = tollgate::admin::watch::spawn(gw.clone())?;
    let _config_watcher = match &args.config {
        Some(path) => {
            let r = tollgate::reload::Reloader::new(&gw, path.clone(), file_config);
            let _ = gw.reloader.set(r.clone());
            tokio::spawn(reload_on_sighup(r.clone()));
            if gw.config.server.watch_config {
                Some(r.watch()?)
            } else {
                None
            }
        }
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let admin = match admin_token {
        Some(token) => {
            let listener = server::bind(&gw.config.admin.listen).await?;
            tracing::info!("admin API listening on http://{}", listener.local_addr()?);
            Some(tokio::spawn(server::serve(
                listener,
                tollgate::admin::handler(gw.clone(), token),
                stopped(stop_rx.clone()),
                drain,
            )))
        }
        None => {
            tracing::info!(
                "admin API disabled: no token (set {} or admin.token_file)",
                gw.config.admin.token_env
            );
            None
        }
    };
    let listener = server::bind(&listen).await?;
    tracing::info!(
        "tollgate listening on http://{} (models: {})",
        listener.local_addr()?,
        gw.live.load().providers.model_names().join(", ")
    );
    server::serve(
        listener,
        server::gateway_handler(gw.clone()),
        stopped(stop_rx),
        drain,
    )
    .await;
    if let Some(a) = admin {
        let _ = a.await;
    }
    // Every answered request has queued its row; commit them before exiting.
    if let Some(l) = &gw.ledger {
        l.flush();
        tracing::info!(path = %l.path().display(), "ledger flushed");
    }
    tracing::info!("stopped");
    Ok(())
}

/// `kill -HUP` reloads the config file (the outcome is logged).
async fn reload_on_sighup(r: Arc<tollgate::reload::Reloader>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let _ = r.reload("sighup").await;
    }
}

async fn sim(listen: String, latency_ms: u64, ms_per_token: u64) -> Result<()> {
    let cfg = SimConfig {
        latency_ms,
        ms_per_token,
        ..SimConfig::default()
    };
    let sim = Arc::new(SimProvider::new(
        cfg,
        Catalog::builtin()?,
        Arc::new(SystemClock),
    ));
    let listener = server::bind(&listen).await?;
    tracing::info!("simulator listening on http://{}", listener.local_addr()?);
    server::serve(
        listener,
        server::sim_handler(sim),
        shutdown_signal(),
        Duration::from_secs(5),
    )
    .await;
    Ok(())
}

#[allow(clippy::print_stdout)] // the inspection is the output
fn inspect(file: &std::path::Path, json: bool) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let rt = tollgate::plugins::Runtime::new(&Default::default(), Arc::new(SystemClock))?;
    let v = rt.inspect(&bytes, &file.display().to_string())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", tollgate::plugins::inspect::inspection_text(&v));
    }
    if v["loadable"] != serde_json::Value::Bool(true) {
        std::process::exit(1);
    }
    Ok(())
}

#[allow(clippy::print_stdout)] // the report is the output
async fn plugin_test(args: TestArgs) -> Result<()> {
    use tollgate::plugins::PluginKind;
    if let Some(m) = args.min_agreement {
        anyhow::ensure!(
            (0.0..=1.0).contains(&m),
            "--min-agreement must be between 0 and 1"
        );
    }
    let opts = tollgate::plugin_test::Options {
        file: args.file,
        kind: match args.kind {
            KindArg::Router => PluginKind::Router,
            KindArg::Compressor => PluginKind::Compressor,
            KindArg::CachePolicy => PluginKind::CachePolicy,
            KindArg::BudgetRule => PluginKind::BudgetRule,
        },
        cases: args.cases,
        config: args.config,
        repeat: args.repeat,
    };
    let report = tollgate::plugin_test::run(&opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text(args.all));
    }
    if let Some(min) = args.min_agreement {
        let ratio = report.agreement_ratio().context(
            "--min-agreement needs cases with expected decisions (`expect`, or trace labels)",
        )?;
        if ratio < min {
            eprintln!(
                "agreement {:.1}% is below --min-agreement {:.1}%",
                ratio * 100.0,
                min * 100.0
            );
            std::process::exit(1);
        }
    }
    Ok(())
}

fn export_trace(args: ExportArgs) -> Result<()> {
    use tollgate::replay::export::{ExportQuery, from_ledger};
    let (_, conn) = args.range.open()?;
    let (since_ms, until_ms) = args.range.days()?;
    let q = ExportQuery {
        since_ms,
        until_ms,
        tenant: args.range.tenant,
    };
    let (requests, without_body) = from_ledger(&conn, &q)?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out)
            .with_context(|| format!("cannot write {}", args.out.display()))?,
    );
    tollgate::replay::trace::write(&mut out, &requests)?;
    std::io::Write::flush(&mut out)?;
    eprintln!(
        "{} requests written to {}",
        requests.len(),
        args.out.display()
    );
    if without_body > 0 {
        eprintln!(
            "{without_body} requests in range were recorded without their body (ledger.record_bodies was off) and are not in the trace"
        );
    }
    Ok(())
}

#[allow(clippy::print_stdout)] // the report is the output
fn report(args: ReportArgs) -> Result<()> {
    let (config, conn) = args.range.open()?;
    let (since_ms, until_ms) = args.range.days()?;
    let query = tollgate::report::Query {
        group_by: tollgate::report::parse_dims(&args.group_by)
            .map_err(|e| anyhow::anyhow!("--group-by: {e}"))?,
        since_ms,
        until_ms,
        tenant: args.range.tenant,
        top: args.top,
    };
    if args.shadow {
        let lines = tollgate::report::shadows(&conn, &query)?;
        match args.format {
            ReportFormat::Json => println!("{}", serde_json::json!({ "shadows": lines })),
            _ => print!("{}", tollgate::report::shadows_table(&lines)),
        }
        return Ok(());
    }
    if args.cache {
        let (lines, total) = tollgate::report::cache::run(&conn, &query)?;
        match args.format {
            ReportFormat::Json => {
                println!("{}", serde_json::json!({ "cache": lines, "total": total }))
            }
            _ => {
                let dims: Vec<&str> = query.group_by.iter().map(|d| d.name()).collect();
                print!("{}", tollgate::report::cache::table(&dims, &lines, &total));
            }
        }
        return Ok(());
    }
    let rep = tollgate::report::run(&conn, &config.catalog()?, &query)?;
    let out = match args.format {
        ReportFormat::Table => rep.table(),
        ReportFormat::Csv => rep.csv(),
        ReportFormat::Json => rep.json(),
    };
    print!("{out}");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
