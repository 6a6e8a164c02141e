//! `tollgate-bench compare`: every contender against the same upstream, at
//! the same request rates, in one run, repeated. Writes the raw runs and a
//! summary to `<out>/<date>.json`, a chart to `<out>/<date>.png`, and prints
//! the table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use tokio::runtime::Handle;

use crate::contenders::{Server, free_port};
use crate::load::{self, Http, Outcome, Target, percentile};
use crate::procfs::{self, CpuTicks};

#[derive(clap::Args, Clone)]
pub struct CompareArgs {
    /// Fixed request rates (requests per second), open loop.
    #[arg(long, value_delimiter = ',', default_values_t = [50.0, 500.0, 1000.0, 2000.0, 5000.0])]
    pub rates: Vec<f64>,
    /// Seconds per fixed-rate run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Each measurement is repeated this often; the summary gives median and best.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Connections of the closed-loop maximum-throughput run.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds of the maximum-throughput run.
    #[arg(long, default_value_t = 5.0)]
    pub max_seconds: f64,
    /// A request unanswered this long is an error.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
    /// The upstream's time to first token.
    #[arg(long, default_value_t = 0)]
    pub upstream_latency_ms: u64,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/tollgate")]
    pub tollgate: PathBuf,
    /// The first-party plugins (`make plugins`).
    #[arg(long, default_value = "target/plugins")]
    pub plugins: PathBuf,
    /// LiteLLM's virtualenv; without it LiteLLM is left out (`--litellm-workers` empty does too).
    #[arg(long, default_value = "target/bench-venv")]
    pub venv: PathBuf,
    /// LiteLLM configurations to try: number of worker processes each.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
    pub litellm_workers: Vec<usize>,
    /// Text whose tokens are counted by Tollgate and by Python tiktoken.
    #[arg(long, default_value = "README.md")]
    pub token_text: PathBuf,
    /// Where the JSON and the chart go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Scratch space: configs, ledgers, server logs.
    #[arg(long, default_value = "target/bench")]
    pub work: PathBuf,
}

/// One contender, ready to take load.
struct Contender {
    name: String,
    /// None for the upstream itself (direct).
    server: Option<Server>,
    target: Arc<Target>,
}

/// Everything the runs share.
struct Bench<'a> {
    rt: &'a Handle,
    client: Http,
    args: &'a CompareArgs,
    sim_pids: Vec<u32>,
    runs: Vec<Value>,
}

/// Polls the resident memory of a process tree while a run lasts.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !s.load(Ordering::Relaxed) {
                peak = peak.max(procfs::rss_mib(&pids));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak.max(procfs::rss_mib(&pids))
        });
        Self { stop, thread }
    }

    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0.0)
    }
}

enum Load {
    Rate(f64),
    Max,
}

fn ms(us: f64) -> f64 {
    (us / 1000.0 * 1000.0).round() / 1000.0
}

impl Bench<'_> {
    fn measure(&mut self, c: &Contender, load: &Load, repeat: usize) -> Value {
        let pids = c
            .server
            .as_ref()
            .map_or(self.sim_pids.clone(), Server::pids);
        let (cpu0, sim0, ticks0) = (
            procfs::cpu_seconds(&pids),
            procfs::cpu_seconds(&self.sim_pids),
            CpuTicks::now(),
        );
        let rss = RssSampler::start(pids.clone());
        let timeout = Duration::from_millis(self.args.timeout_ms);
        let o: Outcome = match load {
            Load::Rate(r) => load::open_loop(
                self.rt,
                &self.client,
                &c.target,
                *r,
                Duration::from_secs_f64(self.args.seconds),
                timeout,
                4096,
            ),
            Load::Max => load::closed_loop(
                self.rt,
                &self.client,
                &c.target,
                self.args.connections,
                Duration::from_secs_f64(self.args.max_seconds),
                timeout,
            ),
        };
        let rss_mib = rss.finish();
        let answered = o.latencies_us.len().max(1) as f64;
        let cpu_us = (procfs::cpu_seconds(&pids) - cpu0) * 1e6 / answered;
        let sim_us = (procfs::cpu_seconds(&self.sim_pids) - sim0) * 1e6 / answered;
        let l = &o.latencies_us;
        let run = json!({
            "contender": c.name,
            "repeat": repeat,
            "load": match load { Load::Rate(r) => json!(r), Load::Max => json!("max") },
            "requests": o.requests(),
            "errors": o.errors,
            "error_rate": o.error_rate(),
            "first_error": o.first_error,
            "answered_per_second": o.answered_per_second().round(),
            "p50_ms": ms(percentile(l, 0.5)),
            "p90_ms": ms(percentile(l, 0.9)),
            "p99_ms": ms(percentile(l, 0.99)),
            "p999_ms": ms(percentile(l, 0.999)),
            "server_cpu_us_per_request": cpu_us.round(),
            "upstream_cpu_us_per_request": sim_us.round(),
            "rss_mib": rss_mib.round(),
            "peak_rss_mib": procfs::peak_rss_mib(&pids).round(),
            "steal_percent": (CpuTicks::now().steal_percent_since(&ticks0) * 10.0).round() / 10.0,
            "pacer_lag_p99_us": o.pacer_lag_p99_us.round(),
        });
        eprintln!(
            "  {:<26} {:>6} rep {}: {:>7} rps  p50 {:>8.3}  p99 {:>8.3} ms  err {:.2}%  cpu {:>6} µs/req  rss {:>4} MiB  steal {}%",
            c.name,
            run["load"].to_string().trim_matches('"'),
            repeat,
            run["answered_per_second"],
            run["p50_ms"].as_f64().unwrap_or(0.0),
            run["p99_ms"].as_f64().unwrap_or(0.0),
            o.error_rate() * 100.0,
            run["server_cpu_us_per_request"],
            run["rss_mib"],
            run["steal_percent"],
        );
        self.runs.push(run.clone());
        run
    }

    /// A short run at a low rate: connections opened, plugin instances warm.
    fn warm_up(&self, c: &Contender) {
        load::open_loop(
            self.rt,
            &self.client,
            &c.target,
            200.0,
            Duration::from_secs(1),
            Duration::from_millis(self.args.timeout_ms),
            4096,
        );
    }
}

fn target(url: &str, headers: &[(&'static str, &str)]) -> Result<Arc<Target>> {
    Ok(Arc::new(Target {
        uri: url.parse().with_context(|| url.to_string())?,
        headers: headers
            .iter()
            .map(|(k, v)| Ok((HeaderName::from_static(k), HeaderValue::from_str(v)?)))
            .collect::<Result<_>>()?,
    }))
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// The answer cache's bound in the bench.
const CACHE_BYTES: u64 = 16 << 20;

/// The gateway's config: one OpenAI-compatible provider (the simulator),
/// and optionally the four first-party plugins and the ledger.
fn tollgate_config(port: u16, sim: u16, plugins: Option<(&Path, &Path)>) -> String {
    let mut s = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\
         [identity]\ndefault_tenant = \"bench\"\n\
         [providers.up]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{sim}/v1\"\napi_key_env = \"\"\nsim_when_no_key = false\n\
         [models.\"gpt-4o-mini\"]\nprovider = \"up\"\n[models.\"gpt-4o\"]\nprovider = \"up\"\n"
    );
    match plugins {
        None => s.push_str("[ledger]\nenabled = false\n"),
        // Every bench request is unique, so every answer is admitted: the
        // cache is bounded at 16 MiB (the default is 256 MiB) so that the
        // resident set shows the gateway, not how much answer text it was
        // allowed to keep.
        Some((dir, ledger)) => s.push_str(&format!(
            "[cache]\nmax_bytes = {CACHE_BYTES}\n\
             [ledger]\nenabled = true\npath = {}\n\
             [plugins.router]\npath = {}\nconfig = {{ default = \"gpt-4o-mini\", rules = [{{ keywords = [\"step by step\"], model = \"gpt-4o\" }}] }}\n\
             [plugins.compressor]\npath = {}\n\
             [plugins.cache_policy]\npath = {}\nconfig = {{ ttl_seconds = 600 }}\n\
             [plugins.budget_rule]\npath = {}\nconfig = {{ daily_usd = 1000000.0 }}\n",
            toml_str(ledger),
            toml_str(&dir.join("rules_router.wasm")),
            toml_str(&dir.join("trim_compressor.wasm")),
            toml_str(&dir.join("default_cache_policy.wasm")),
            toml_str(&dir.join("daily_budget.wasm")),
        )),
    }
    s
}

/// After a run with errors, waits until the server answers again: an
/// overloaded Python server keeps working through requests whose clients
/// gave up, and the next run would otherwise measure only that backlog.
fn settle(rt: &Handle, client: &load::Http, c: &mut Contender, run: &Value) {
    if run["errors"].as_u64().unwrap_or(0) == 0 {
        return;
    }
    let target = c.target.clone();
    if let Some(server) = c.server.as_mut()
        && let Err(e) = server.wait_ready(rt, client, &target, Duration::from_secs(300))
    {
        eprintln!(
            "  {} did not recover after an overloaded run: {e:#}",
            c.name
        );
    }
}

const LITELLM_KEY: &str = "sk-tollgate-bench-master-key";

fn litellm_config(sim: u16) -> String {
    format!(
        "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n      api_base: http://127.0.0.1:{sim}/v1\n      api_key: sk-upstream\n\
         general_settings:\n  master_key: {LITELLM_KEY}\n\
         litellm_settings:\n  drop_params: true\n"
    )
}

#[allow(clippy::print_stdout)] // the table is the output
pub fn run(rt: &Handle, args: &CompareArgs) -> Result<()> {
    let work = std::path::absolute(&args.work)?;
    let logs = work.join("logs");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&logs)?;
    let tollgate = std::path::absolute(&args.tollgate)?;
    let plugins = std::path::absolute(&args.plugins)?;
    anyhow::ensure!(
        tollgate.exists(),
        "{} not found (cargo build --release -p tollgate)",
        tollgate.display()
    );
    anyhow::ensure!(
        plugins.join("rules_router.wasm").exists(),
        "no plugins in {} (make plugins)",
        plugins.display()
    );
    let client = load::client();
    let ready = Duration::from_secs(90);

    let sim_port = free_port()?;
    let mut sim = Server::start(
        "upstream",
        Command::new(&tollgate).args([
            "sim",
            "--listen",
            &format!("127.0.0.1:{sim_port}"),
            "--latency-ms",
            &args.upstream_latency_ms.to_string(),
        ]),
        &logs,
    )?;
    let direct = target(
        &format!("http://127.0.0.1:{sim_port}/v1/chat/completions"),
        &[],
    )?;
    sim.wait_ready(rt, &client, &direct, ready)?;
    let mut bench = Bench {
        rt,
        client,
        args,
        sim_pids: sim.pids(),
        runs: Vec::new(),
    };

    let mut contenders = vec![Contender {
        name: "direct".into(),
        server: None,
        target: direct,
    }];
    let floor_port = free_port()?;
    let exe = std::env::current_exe()?;
    let floor = Server::start(
        "floor",
        Command::new(&exe).args([
            "floor",
            "--listen",
            &format!("127.0.0.1:{floor_port}"),
            "--upstream",
            &format!("http://127.0.0.1:{sim_port}"),
        ]),
        &logs,
    )?;
    contenders.push(Contender {
        name: "floor".into(),
        server: Some(floor),
        target: target(
            &format!("http://127.0.0.1:{floor_port}/v1/chat/completions"),
            &[],
        )?,
    });
    for (name, with_plugins) in [("tollgate", false), ("tollgate+4 plugins+ledger", true)] {
        let port = free_port()?;
        let file = work.join(format!(
            "{}.toml",
            if with_plugins { "full" } else { "bare" }
        ));
        let ledger = work.join("ledger.sqlite");
        std::fs::write(
            &file,
            tollgate_config(
                port,
                sim_port,
                with_plugins.then_some((plugins.as_path(), ledger.as_path())),
            ),
        )?;
        let server = Server::start(
            if with_plugins {
                "tollgate-full"
            } else {
                "tollgate-bare"
            },
            Command::new(&tollgate)
                .args(["serve", "--config"])
                .arg(&file)
                .env("RUST_LOG", "warn"),
            &logs,
        )?;
        contenders.push(Contender {
            name: name.into(),
            server: Some(server),
            target: target(
                &format!("http://127.0.0.1:{port}/v1/chat/completions"),
                &[("x-tollgate-tenant", "bench")],
            )?,
        });
    }
    for c in &mut contenders {
        let t = c.target.clone();
        if let Some(s) = c.server.as_mut() {
            s.wait_ready(rt, &bench.client, &t, ready)?;
        }
        bench.warm_up(c);
    }

    // The fast contenders interleaved: each rate, each contender, in a
    // rotating order, so the machine's bad moments fall on all of them.
    for repeat in 0..args.repeats {
        eprintln!("repeat {} of {}", repeat + 1, args.repeats);
        for rate in &args.rates {
            for k in 0..contenders.len() {
                let c = &contenders[(k + repeat) % contenders.len()];
                bench.measure(c, &Load::Rate(*rate), repeat);
            }
        }
        for k in 0..contenders.len() {
            let c = &contenders[(k + repeat) % contenders.len()];
            bench.measure(c, &Load::Max, repeat);
        }
    }
    let peak_rss: Vec<Value> = contenders
        .iter()
        .map(|c| {
            let pids = c
                .server
                .as_ref()
                .map_or(bench.sim_pids.clone(), Server::pids);
            json!({"contender": c.name, "peak_rss_mib": procfs::peak_rss_mib(&pids).round()})
        })
        .collect();
    drop(contenders);

    // LiteLLM, one configuration at a time (its idle workers would otherwise
    // take CPU from the others' runs).
    let litellm_bin = std::path::absolute(args.venv.join("bin/litellm"))?;
    let mut litellm_versions = None;
    if litellm_bin.exists() {
        litellm_versions = Command::new(args.venv.join("bin/python"))
            .args([
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        for &workers in &args.litellm_workers {
            let port = free_port()?;
            let file = work.join("litellm.yaml");
            std::fs::write(&file, litellm_config(sim_port))?;
            let name = format!(
                "litellm ({workers} worker{})",
                if workers == 1 { "" } else { "s" }
            );
            let mut server = Server::start(
                &format!("litellm-{workers}"),
                Command::new(&litellm_bin)
                    .args(["--config"])
                    .arg(&file)
                    .args([
                        "--host",
                        "127.0.0.1",
                        "--port",
                        &port.to_string(),
                        "--num_workers",
                        &workers.to_string(),
                    ])
                    .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
                    .env("LITELLM_LOG", "ERROR")
                    .env("TIKTOKEN_CACHE_DIR", tiktoken_cache(&args.venv)),
                &logs,
            )?;
            let t = target(
                &format!("http://127.0.0.1:{port}/v1/chat/completions"),
                &[("authorization", &format!("Bearer {LITELLM_KEY}"))],
            )?;
            server.wait_ready(rt, &bench.client, &t, ready)?;
            let mut c = Contender {
                name,
                server: Some(server),
                target: t,
            };
            bench.warm_up(&c);
            for repeat in 0..args.repeats {
                for rate in &args.rates {
                    let run = bench.measure(&c, &Load::Rate(*rate), repeat);
                    settle(rt, &bench.client, &mut c, &run);
                    // Far past what it can serve: higher rates would only
                    // pile up timeouts.
                    if run["error_rate"].as_f64().unwrap_or(1.0) > 0.1 {
                        break;
                    }
                }
                let run = bench.measure(&c, &Load::Max, repeat);
                settle(rt, &bench.client, &mut c, &run);
            }
        }
    } else {
        eprintln!(
            "LiteLLM left out: {} not found (make bench-compare installs it)",
            litellm_bin.display()
        );
    }
    drop(sim);

    let tokens = crate::tokens::compare(&tollgate, &args.venv, &args.token_text);
    if let Err(e) = &tokens {
        eprintln!("token counting comparison failed: {e:#}");
    }
    let tokens = tokens.unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    let summary = crate::summary::summarise(&bench.runs, &args.rates);
    let targets = crate::summary::targets(&summary, &tokens);
    let date = today();
    let result = json!({
        "date": date,
        "machine": machine(),
        "tollgate_commit": git_commit(),
        "litellm_version": litellm_versions,
        "settings": {
            "rates": args.rates,
            "seconds_per_rate": args.seconds,
            "repeats": args.repeats,
            "max_throughput": {"connections": args.connections, "seconds": args.max_seconds},
            "timeout_ms": args.timeout_ms,
            "upstream": format!("tollgate sim, {} ms to first token, 16 output tokens, not streamed", args.upstream_latency_ms),
            "request": "POST /v1/chat/completions, gpt-4o-mini, a system and a user message (~230 bytes), every question new (the answer cache never hits)",
        },
        "summary": summary,
        "targets": targets,
        "peak_rss_mib": peak_rss,
        "tollgate_cache_max_bytes": CACHE_BYTES,
        "token_counting": tokens,
        "runs": bench.runs,
    });
    std::fs::create_dir_all(&args.out)?;
    let json_path = args.out.join(format!("{date}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&result)?)?;
    let png = args.out.join(format!("{date}.png"));
    crate::chart::draw(&result, &png)?;
    print!("{}", crate::summary::table(&result));
    eprintln!("wrote {} and {}", json_path.display(), png.display());
    Ok(())
}

/// LiteLLM's package carries tiktoken's vocabulary files; pointing tiktoken
/// there lets it load offline.
pub fn tiktoken_cache(venv: &Path) -> PathBuf {
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .ok()
        .and_then(|d| {
            d.flatten()
                .find(|e| e.file_name().to_string_lossy().starts_with("python"))
        })
        .map(|e| {
            e.path()
                .join("site-packages/litellm/litellm_core_utils/tokenizers")
        })
        .unwrap_or(lib)
}

fn today() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "undated".into())
}

fn git_commit() -> Option<String> {
    let o = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| (kib / 1024.0 / 1024.0).round());
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "memory_gib": mem_gib,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).ok(),
        "note": "load generator, upstream and contender share these CPUs",
    })
}
