//! `tollgate bench`: what a plugin call costs on the warm path, and what the
//! gateway adds to a request, measured side by side in one run. Prints JSON.
//!
//! * plugins: each first-party plugin loaded from its `.wasm` and called
//!   many times with a realistic request; also the whole chain of one
//!   request (budget, compressor, cache lookup, router, cache admit) and a
//!   router call on a fresh instance (no reuse);
//! * languages: the same kinds of policy in Rust and in Python, JavaScript
//!   and C (the examples): call cost warm and on a fresh instance, compile
//!   time, fuel per call and memory;
//! * HTTP: a simulator upstream on loopback, called directly, through the
//!   gateway without plugins, and through the gateway with all four plugins;
//!   the three are interleaved in rounds so machine noise hits them alike.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tollgate::clock::SystemClock;
use tollgate::config::{Config, PluginSlotConfig, RuntimeConfig, SimConfig};

use crate::bench_fixtures::{
    BUDGET_CFG, CACHE_CFG, ROUTER_CFG, bench_candidates, sample_meta, sample_row, sample_spend,
    sample_view, slot,
};
use tollgate::pipeline::Gateway;
use tollgate::plugins::{
    BudgetRuleKind, CachePolicyKind, CompressorKind, Kind, Plugin, RouterKind, Runtime,
};
use tollgate::pricing::Catalog;
use tollgate::providers::SimProvider;
use tollgate::server;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Directory with the built plugins (`make plugins` puts them in target/plugins).
    #[arg(long, default_value = "target/plugins")]
    plugins: PathBuf,
    /// Calls per plugin measurement.
    #[arg(long, default_value_t = 20_000)]
    plugin_calls: usize,
    /// HTTP requests per configuration (direct, gateway, gateway + plugins).
    #[arg(long, default_value_t = 3_000)]
    requests: usize,
    /// Fuel per plugin call in the plugin measurement (0 turns fuel off).
    #[arg(long)]
    fuel: Option<u64>,
    /// Run only one part: `plugins`, `languages`, `http`, `ledger`, `load`,
    /// `embed`, `semantic` or `tokens`.
    #[arg(long)]
    only: Option<String>,
    /// Text for the token-counting part: counted whole and as chat
    /// messages (one per paragraph).
    #[arg(long, default_value = "README.md")]
    text: PathBuf,
    /// The embedding model (`make model` installs it here).
    #[arg(long, default_value = tollgate::embed::DEFAULT_MODEL_DIR)]
    model_dir: PathBuf,
}

/// Latencies, and how many calls failed (a wall-clock deadline can fire
/// when the machine steals the CPU mid-call; that is counted, not fatal).
#[derive(Default)]
struct Samples(Vec<f64>, usize);

impl Samples {
    fn summary(&mut self) -> Value {
        self.0.sort_by(f64::total_cmp);
        let n = self.0.len();
        if n == 0 {
            return json!(null);
        }
        let q = |p: f64| self.0[((n as f64 - 1.0) * p).round() as usize];
        let mean = self.0.iter().sum::<f64>() / n as f64;
        json!({
            "n": n,
            "failed": self.1,
            "mean": round1(mean),
            "p50": round1(q(0.50)),
            "p90": round1(q(0.90)),
            "p99": round1(q(0.99)),
        })
    }
    fn p(&mut self, p: f64) -> f64 {
        self.0.sort_by(f64::total_cmp);
        let n = self.0.len();
        self.0[((n as f64 - 1.0) * p).round() as usize]
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

async fn time_calls<F, Fut>(n: usize, mut f: F) -> Result<Samples>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    // Warm up: instances, caches, branch predictors.
    for _ in 0..(n / 20).max(10) {
        let _ = f().await;
    }
    let mut s = Samples(Vec::with_capacity(n), 0);
    for _ in 0..n {
        let t = Instant::now();
        match f().await {
            Ok(()) => s.0.push(t.elapsed().as_nanos() as f64),
            Err(_) => s.1 += 1,
        }
    }
    anyhow::ensure!(s.1 < n / 10 + 1, "most calls failed");
    Ok(s)
}

async fn load<K: Kind>(rt: &Arc<Runtime>, s: &PluginSlotConfig) -> Result<Plugin<K>> {
    rt.load::<K>(s)
        .await
        .with_context(|| format!("loading {} (run `make plugins`)", s.path.display()))
}

async fn bench_plugins(args: &BenchArgs) -> Result<Value> {
    let rt = Runtime::new(&RuntimeConfig::default(), Arc::new(SystemClock))?;
    let dir = &args.plugins;
    let router: Plugin<RouterKind> =
        load(&rt, &slot(dir, "rules_router.wasm", ROUTER_CFG, args.fuel)?).await?;
    let compressor: Plugin<CompressorKind> =
        load(&rt, &slot(dir, "trim_compressor.wasm", "", args.fuel)?).await?;
    let cache: Plugin<CachePolicyKind> = load(
        &rt,
        &slot(dir, "default_cache_policy.wasm", CACHE_CFG, args.fuel)?,
    )
    .await?;
    let budget: Plugin<BudgetRuleKind> =
        load(&rt, &slot(dir, "daily_budget.wasm", BUDGET_CFG, args.fuel)?).await?;
    let mut fresh_slot = slot(dir, "rules_router.wasm", ROUTER_CFG, args.fuel)?;
    fresh_slot.reuse_instances = false;
    let router_fresh: Plugin<RouterKind> = load(&rt, &fresh_slot).await?;

    let view = sample_view();
    let candidates = bench_candidates();
    let spend = sample_spend();
    let meta = sample_meta(&view);
    let n = args.plugin_calls;
    let err = |e: tollgate::plugins::PluginError| anyhow::anyhow!(e);
    let mut r = time_calls(n, || async {
        router
            .route(&view, &candidates)
            .await
            .map(|_| ())
            .map_err(err)
    })
    .await?;
    let mut c = time_calls(n, || async {
        compressor.compress(&view).await.map(|_| ()).map_err(err)
    })
    .await?;
    let mut l = time_calls(n, || async {
        cache.lookup(&view).await.map(|_| ()).map_err(err)
    })
    .await?;
    let mut a = time_calls(n, || async {
        cache.admit(&view, &meta).await.map(|_| ()).map_err(err)
    })
    .await?;
    let mut b = time_calls(n, || async {
        budget.check(&view, &spend).await.map(|_| ()).map_err(err)
    })
    .await?;
    let mut chain = time_calls(n, || async {
        budget.check(&view, &spend).await.map_err(err)?;
        compressor.compress(&view).await.map_err(err)?;
        cache.lookup(&view).await.map_err(err)?;
        router.route(&view, &candidates).await.map_err(err)?;
        cache.admit(&view, &meta).await.map_err(err)?;
        Ok(())
    })
    .await?;
    let mut fresh = time_calls((n / 20).max(200), || async {
        router_fresh
            .route(&view, &candidates)
            .await
            .map(|_| ())
            .map_err(err)
    })
    .await?;
    Ok(json!({
        "unit": "ns per call, warm instance",
        "request_prompt_tokens": view.prompt_tokens,
        "router": r.summary(),
        "compressor": c.summary(),
        "cache_policy_lookup": l.summary(),
        "cache_policy_admit": a.summary(),
        "budget_rule": b.summary(),
        "chain_of_five_calls": chain.summary(),
        "router_fresh_instance_per_call": fresh.summary(),
    }))
}

/// One closed-loop request; returns its latency in µs.
async fn one(client: &reqwest::Client, url: &str, i: usize) -> Result<f64> {
    // A new question each time, so the gateway's cache always misses and
    // every plugin runs (the cache policy's admit included).
    let body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are the support assistant of Acme Cloud."},
            {"role": "user", "content": format!("How do I download invoice number {i} as a PDF?")}
        ],
        "temperature": 0,
    });
    let t = Instant::now();
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .header(tollgate::headers::TENANT, "bench")
        .header(tollgate::headers::SIM_OUTPUT_TOKENS, "40")
        .body(body.to_string())
        .send()
        .await?;
    let status = r.status();
    let bytes = r.bytes().await?;
    let us = t.elapsed().as_nanos() as f64 / 1000.0;
    anyhow::ensure!(
        status.is_success(),
        "{url}: HTTP {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(us)
}

async fn start_gateway(cfg: &str) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let config = Config::parse(cfg, "(bench)", std::path::Path::new("."))?;
    let gw = Gateway::new(config, Arc::new(SystemClock)).await?;
    let listener = server::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let handle = tokio::spawn(server::serve(
        listener,
        server::gateway_handler(gw),
        std::future::pending(),
        Duration::from_secs(1),
    ));
    Ok((format!("http://{addr}/v1/chat/completions"), handle))
}

/// A fresh directory for the benchmark's files.
fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-bench-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn bench_http(args: &BenchArgs) -> Result<Value> {
    let sim = Arc::new(SimProvider::new(
        SimConfig::default(),
        Catalog::builtin()?,
        Arc::new(tollgate::clock::SystemClock),
    ));
    let listener = server::bind("127.0.0.1:0").await?;
    let sim_addr = listener.local_addr()?;
    let sim_task = tokio::spawn(server::serve(
        listener,
        server::sim_handler(sim),
        std::future::pending(),
        Duration::from_secs(1),
    ));
    let upstream = format!(
        "[providers.sim]\nkind = \"openai\"\nbase_url = \"http://{sim_addr}/v1\"\napi_key_env = \"\"\nforward_sim_headers = true\n"
    );
    let dir = args
        .plugins
        .canonicalize()
        .context("plugin directory (run `make plugins`)")?;
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let plugins = format!(
        "[plugins.router]\npath = {}\nconfig = {{ default = \"gpt-4o-mini\", rules = [{{ keywords = [\"step by step\"], model = \"gpt-4o\" }}] }}\n\
         [plugins.compressor]\npath = {}\n\
         [plugins.cache_policy]\npath = {}\nconfig = {{ ttl_seconds = 600 }}\n\
         [plugins.budget_rule]\npath = {}\nconfig = {{ daily_usd = 1000000.0 }}\n",
        q(&dir.join("rules_router.wasm").display().to_string()),
        q(&dir.join("trim_compressor.wasm").display().to_string()),
        q(&dir.join("default_cache_policy.wasm").display().to_string()),
        q(&dir.join("daily_budget.wasm").display().to_string()),
    );
    let no_ledger = "[ledger]\nenabled = false\n";
    let ledger_dir = tempfile_dir()?;
    let with_ledger = format!(
        "[ledger]\npath = {}\n",
        q(&ledger_dir.join("bench-ledger.sqlite").display().to_string())
    );
    let (bare_url, bare_task) = start_gateway(&format!("{upstream}{no_ledger}")).await?;
    let (full_url, full_task) = start_gateway(&format!("{upstream}{no_ledger}{plugins}")).await?;
    let (ledger_url, ledger_task) =
        start_gateway(&format!("{upstream}{with_ledger}{plugins}")).await?;
    let direct_url = format!("http://{sim_addr}/v1/chat/completions");

    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4)
        .build()?;
    let targets = [
        direct_url.as_str(),
        bare_url.as_str(),
        full_url.as_str(),
        ledger_url.as_str(),
    ];
    let mut samples: [Samples; 4] = Default::default();
    // HTTP errors are real failures of the gateway: they abort the run.
    let rounds = 10;
    let per_round = (args.requests / rounds).max(1);
    let mut i = 0usize;
    // Warm-up: connections, plugin instances.
    for t in targets {
        for _ in 0..50 {
            one(&client, t, i).await?;
            i += 1;
        }
    }
    for _ in 0..rounds {
        for (k, t) in targets.iter().enumerate() {
            for _ in 0..per_round {
                samples[k].0.push(one(&client, t, i).await?);
                i += 1;
            }
        }
    }
    let [mut direct, mut bare, mut full, mut ledgered] = samples;
    let added = |s: &mut Samples, d: &mut Samples| {
        json!({
            "p50": round1(s.p(0.5) - d.p(0.5)),
            "p90": round1(s.p(0.9) - d.p(0.9)),
            "p99": round1(s.p(0.99) - d.p(0.99)),
        })
    };
    let out = json!({
        "unit": "µs per request, closed loop, one client, loopback",
        "upstream": "tollgate sim (0 ms latency, 40 output tokens)",
        "direct": direct.summary(),
        "gateway_no_plugins": bare.summary(),
        "gateway_all_four_plugins": full.summary(),
        "added_by_gateway_no_plugins": added(&mut bare, &mut direct),
        "added_by_gateway_all_four_plugins": added(&mut full, &mut direct),
        "gateway_all_four_plugins_and_ledger": ledgered.summary(),
        "added_by_ledger": added(&mut ledgered, &mut full),
    });
    for t in [sim_task, bare_task, full_task, ledger_task] {
        t.abort();
    }
    let _ = std::fs::remove_dir_all(&ledger_dir);
    Ok(out)
}

/// Rows per second the ledger writer absorbs: queue many rows, wait for the
/// commit of the last one.
fn bench_ledger_writer() -> Result<Value> {
    use tollgate::ledger::{Ledger, LedgerOptions};
    let dir = tempfile_dir()?.join("writer");
    std::fs::create_dir_all(&dir)?;
    let ledger = Ledger::open(&dir.join("ledger.sqlite"), LedgerOptions::default())?;
    let n = 100_000usize;
    let template = sample_row();
    let t = Instant::now();
    for i in 0..n {
        let mut r = template.clone();
        r.request_id = format!("req_{i:08}");
        ledger.record(r);
    }
    let queued = t.elapsed();
    ledger.flush();
    let total = t.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "rows": n,
        "queue_ns_per_row": round1(queued.as_nanos() as f64 / n as f64),
        "rows_per_second_committed": (n as f64 / total.as_secs_f64()).round(),
    }))
}

/// Plugin load time: compiled from the component (no cache), compiled and
/// stored in the artifact cache, and read back from it by a new runtime (a
/// restart or a swap back). Median of `ROUNDS` per plugin.
async fn bench_load(args: &BenchArgs) -> Result<Value> {
    const ROUNDS: usize = 5;
    let mut out = serde_json::Map::new();
    let files = [
        ("router", "rules_router.wasm"),
        ("tier_router", "tier_router.wasm"),
        ("compressor", "trim_compressor.wasm"),
        ("cache_policy", "default_cache_policy.wasm"),
        ("budget_rule", "daily_budget.wasm"),
    ];
    for (name, file) in files {
        let path = args.plugins.join(file);
        let bytes = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
        let mut none = Vec::new();
        let mut cold = Vec::new();
        let mut cached = Vec::new();
        for _ in 0..ROUNDS {
            let dir = tempfile_dir()?;
            let rt = |cache: Option<PathBuf>| {
                Runtime::new(
                    &tollgate::config::RuntimeConfig {
                        cache_dir: cache,
                        ..Default::default()
                    },
                    Arc::new(tollgate::clock::SystemClock),
                )
            };
            let slot = tollgate::config::PluginSlotConfig::new(path.clone());
            // Only compilation is timed: init needs a trained config for some plugins.
            for (times, cache) in [
                (&mut none, None),
                (&mut cold, Some(dir.clone())),
                (&mut cached, Some(dir.clone())),
            ] {
                let r = rt(cache)?;
                let t = Instant::now();
                let _ = r
                    .load_bytes::<tollgate::plugins::RouterKind>(&bytes, file, &slot)
                    .await;
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            round1(v[v.len() / 2])
        };
        out.insert(
            name.into(),
            json!({
                "bytes": bytes.len(),
                "compile_ms": med(&mut none),
                "compile_and_store_ms": med(&mut cold),
                "from_cache_ms": med(&mut cached),
            }),
        );
    }
    Ok(Value::Object(out))
}

/// One plugin as the language comparison measures it: loaded twice from
/// the same artifact cache, once reusing warm instances and once not.
struct Pair<K: Kind> {
    warm: Plugin<K>,
    fresh: Plugin<K>,
    bytes: usize,
    /// Loading the second copy: compiled code read from the artifact cache,
    /// one instantiation and `init` (what a restart with `runtime.cache_dir` costs).
    cached_load_ms: f64,
}

async fn pair<K: Kind>(
    rt: &Arc<Runtime>,
    dir: &std::path::Path,
    file: &str,
    config: &str,
) -> Result<Pair<K>> {
    let s = slot(dir, file, config, None)?;
    let bytes = std::fs::metadata(&s.path)
        .with_context(|| format!("{} (run `make plugins examples`)", s.path.display()))?
        .len() as usize;
    let warm: Plugin<K> = load(rt, &s).await?;
    let mut f = s.clone();
    f.reuse_instances = false;
    let t = Instant::now();
    let fresh: Plugin<K> = load(rt, &f).await?;
    let cached_load_ms = t.elapsed().as_secs_f64() * 1000.0;
    Ok(Pair {
        warm,
        fresh,
        bytes,
        cached_load_ms,
    })
}

/// Compile time, warm and fresh-instance call time (ns), fuel and memory of one plugin.
fn language_row<K: Kind>(
    p: &Pair<K>,
    language: &str,
    warm: &mut Samples,
    fresh: &mut Samples,
) -> Value {
    let d = p.warm.describe();
    let warm_p50 = warm.p(0.5);
    let fresh_p50 = fresh.p(0.5);
    json!({
        "plugin": p.warm.name(),
        "language": language,
        "detected_language": d["language"],
        "bytes": p.bytes,
        "compile_ms": round1(p.warm.compiled().ms),
        "load_from_cache_ms": round1(p.cached_load_ms),
        "warm_call_ns": warm.summary(),
        "fresh_instance_call_ns": fresh.summary(),
        "instantiate_and_init_us": round1((fresh_p50 - warm_p50).max(0.0) / 1000.0),
        "fuel_per_call": d["fuel_per_call"],
        "memory_peak_mib": d["memory_peak_mib"],
    })
}

/// The same kinds of policy written in Rust and in another language: a
/// router (Rust rules vs the Python example), a cache policy (Rust default
/// vs the JavaScript example) and a compressor (Rust trim vs the C
/// example), each on a warm instance and on a fresh instance per call.
async fn bench_languages(args: &BenchArgs) -> Result<Value> {
    let cache = tempfile_dir()?;
    let rt = Runtime::new(
        &RuntimeConfig {
            cache_dir: Some(cache.clone()),
            ..Default::default()
        },
        Arc::new(SystemClock),
    )?;
    let dir = &args.plugins;
    let view = sample_view();
    let candidates = bench_candidates();
    let meta = sample_meta(&view);
    let err = |e: tollgate::plugins::PluginError| anyhow::anyhow!(e);
    // Interpreted plugins are measured with fewer calls; their spread is wide enough.
    let n = (args.plugin_calls / 10).max(200);
    let nf = (n / 10).max(50);
    let mut rows = Vec::new();
    for (language, file, config) in [
        ("rust", "rules_router.wasm", ROUTER_CFG),
        ("python", "python_router.wasm", ""),
    ] {
        let p: Pair<RouterKind> = pair(&rt, dir, file, config).await?;
        let mut w = time_calls(n, || async {
            p.warm
                .route(&view, &candidates)
                .await
                .map(|_| ())
                .map_err(err)
        })
        .await?;
        let mut f = time_calls(nf, || async {
            p.fresh
                .route(&view, &candidates)
                .await
                .map(|_| ())
                .map_err(err)
        })
        .await?;
        rows.push(language_row(&p, language, &mut w, &mut f));
    }
    for (language, file, config) in [
        ("rust", "default_cache_policy.wasm", CACHE_CFG),
        ("javascript", "js_cache_policy.wasm", ""),
    ] {
        let p: Pair<CachePolicyKind> = pair(&rt, dir, file, config).await?;
        let mut w = time_calls(n, || async {
            p.warm.lookup(&view).await.map_err(err)?;
            p.warm.admit(&view, &meta).await.map(|_| ()).map_err(err)
        })
        .await?;
        let mut f = time_calls(nf, || async {
            p.fresh.lookup(&view).await.map(|_| ()).map_err(err)
        })
        .await?;
        let mut row = language_row(&p, language, &mut w, &mut f);
        row["warm_call_ns"]["calls"] = json!("lookup + admit");
        rows.push(row);
    }
    for (language, file) in [("rust", "trim_compressor.wasm"), ("c", "c_squeeze.wasm")] {
        let p: Pair<CompressorKind> = pair(&rt, dir, file, "").await?;
        let mut w = time_calls(n, || async {
            p.warm.compress(&view).await.map(|_| ()).map_err(err)
        })
        .await?;
        let mut f = time_calls(nf, || async {
            p.fresh.compress(&view).await.map(|_| ()).map_err(err)
        })
        .await?;
        rows.push(language_row(&p, language, &mut w, &mut f));
    }
    let _ = std::fs::remove_dir_all(&cache);
    Ok(json!({
        "unit": "ns per call unless named; fuel is wasm instructions (roughly) per call",
        "plugins": rows,
    }))
}

/// The native embedding model: load time, one forward pass by text length
/// (median over distinct texts, so nothing is memoised), and a memoised
/// repeat.
fn bench_embed(dir: &std::path::Path) -> Result<Value> {
    const TEXTS: usize = 30;
    let t = Instant::now();
    let m = tollgate::embed::Embedder::load(dir, 10_000)?;
    let load_ms = t.elapsed().as_secs_f64() * 1000.0;
    let sentence = "How do I download the invoices for my last three orders";
    let mut out = serde_json::Map::new();
    for (name, words) in [("words_10", 10), ("words_60", 60), ("words_200", 200)] {
        let base: Vec<&str> = sentence.split(' ').cycle().take(words).collect();
        let base = base.join(" ");
        let mut ms = Vec::with_capacity(TEXTS);
        for i in 0..TEXTS {
            let text = format!("{i} {base}");
            let t = Instant::now();
            m.embed(&text)?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        out.insert(
            name.into(),
            json!({"median_ms": round2(ms[TEXTS / 2]), "p90_ms": round2(ms[TEXTS * 9 / 10])}),
        );
    }
    let n = 100_000;
    let t = Instant::now();
    for _ in 0..n {
        m.embed(sentence)?;
    }
    out.insert(
        "memoised_ns".into(),
        json!((t.elapsed().as_nanos() as f64 / n as f64).round()),
    );
    out.insert("load_ms".into(), json!(round1(load_ms)));
    Ok(Value::Object(out))
}

/// The semantic cache: a question's embedding as a lookup pays it (distinct
/// short questions, so nothing is memoised), and a search of one scope's
/// index at 10k and 100k entries (random unit vectors: an exact scan costs
/// the same whatever the vectors hold), with the near-miss guard's check.
fn bench_semantic(dir: &std::path::Path) -> Result<Value> {
    use tollgate::cache::{near_miss, semantic};
    let m = tollgate::embed::Embedder::load(dir, 10_000)?;
    let verbs = [
        "reset", "change", "cancel", "pause", "add", "remove", "export", "find", "update",
        "download", "enable", "disable", "share", "rename", "delete", "restore", "move", "copy",
        "verify", "upgrade",
    ];
    let objects = [
        "my password",
        "the billing email",
        "a seat",
        "the workspace",
        "an invoice",
        "two-factor login",
        "the API token",
        "a webhook",
        "the build cache",
        "my plan",
        "a project",
        "the SSO settings",
        "an integration",
        "the audit log",
        "a guest account",
    ];
    let mut embed = Samples::default();
    let mut vectors = Vec::new();
    for v in verbs {
        for o in objects {
            let q = format!("How do I {v} {o}?");
            let t = Instant::now();
            vectors.push(m.embed(&q)?);
            embed.0.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let embed_ms = json!({
        "n": embed.0.len(),
        "p50": round2(embed.p(0.5)),
        "p99": round2(embed.p(0.99)),
    });
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut unit = || {
        let mut v: Vec<f32> = (0..semantic::DIMS)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        normalise(&mut v);
        v
    };
    let mut lookups = serde_json::Map::new();
    for entries in [10_000usize, 100_000] {
        // Questions come in topics: stored vectors are spread around 500
        // topic centres (unrelated random vectors in 384 dimensions would
        // be the worst case for a graph, and unlike any embeddings).
        let centres: Vec<Vec<f32>> = (0..500).map(|_| unit()).collect();
        let stored: Vec<Vec<f32>> = (0..entries)
            .map(|i| {
                let noise = unit();
                let mut v: Vec<f32> = centres[(i * 31) % centres.len()]
                    .iter()
                    .zip(&noise)
                    .map(|(a, b)| a + 0.6 * b)
                    .collect();
                normalise(&mut v);
                v
            })
            .collect();
        // Queries near stored questions, as rewordings are: a stored vector
        // plus noise of about a third of its length, renormalised.
        let queries: Vec<Vec<f32>> = (0..200)
            .map(|i| {
                let noise = unit();
                let mut q: Vec<f32> = stored[(i * 7919) % entries]
                    .iter()
                    .zip(&noise)
                    .map(|(a, b)| a + 0.35 * b)
                    .collect();
                normalise(&mut q);
                q
            })
            .collect();
        let ctx = [7u8; 32];
        let mut row = serde_json::Map::new();
        let mut exact_top = Vec::new();
        // A scan below `ann_from`, a graph from it.
        for (name, ann_from) in [("exact", usize::MAX), ("graph", entries)] {
            let idx = semantic::SemanticIndex::new(entries, ann_from);
            let t = Instant::now();
            for (i, v) in stored.iter().enumerate() {
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&(i as u64).to_le_bytes());
                idx.insert(ctx, key, v, "stored question".into(), u64::MAX, 0);
            }
            idx.wait_for_builds();
            let build_s = t.elapsed().as_secs_f64();
            let mut us = Samples::default();
            let mut agree = 0;
            for (qi, q) in queries.iter().enumerate() {
                let t = Instant::now();
                let found = idx.nearest(&ctx, q, 0.0, 4, 0);
                for c in &found {
                    std::hint::black_box(near_miss::check(
                        "How do I reset my password?",
                        &c.text,
                        &[],
                    ));
                }
                us.0.push(t.elapsed().as_secs_f64() * 1e6);
                let top = found.first().map(|c| c.key);
                if name == "exact" {
                    exact_top.push(top);
                } else {
                    agree += usize::from(exact_top.get(qi) == Some(&top));
                }
            }
            let mut r = json!({
                "p50_us": round1(us.p(0.5)),
                "p99_us": round1(us.p(0.99)),
                "index_s": round1(build_s),
            });
            if name == "graph" {
                r["recall_at_1"] = json!(agree as f64 / queries.len() as f64);
            }
            row.insert(name.into(), r);
        }
        lookups.insert(format!("entries_{entries}"), Value::Object(row));
    }
    Ok(json!({"embed_ms": embed_ms, "lookup": lookups}))
}

/// o200k token counting on one thread, the way the gateway counts a
/// request: each chat message (here, each paragraph of `path`) on its own;
/// and the whole text at once. Best of five rounds of at least 200 ms.
/// `bench/tiktoken_throughput.py` measures Python tiktoken the same way.
fn bench_tokens(path: &std::path::Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let messages: Vec<&str> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let message_bytes: usize = messages.iter().map(|m| m.len()).sum();
    let count_all = || -> u64 {
        messages
            .iter()
            .map(|m| u64::from(tollgate::tokens::count(std::hint::black_box(m), "gpt-4o")))
            .sum()
    };
    let tokens = count_all();
    let best_mb_per_s = |bytes: usize, f: &dyn Fn() -> u64| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let mut n = 0u64;
                while t.elapsed() < Duration::from_millis(200) {
                    std::hint::black_box(f());
                    n += 1;
                }
                (bytes as u64 * n) as f64 / t.elapsed().as_secs_f64() / 1e6
            })
            .fold(0.0, f64::max)
    };
    let whole = || {
        u64::from(tollgate::tokens::count(
            std::hint::black_box(&text),
            "gpt-4o",
        ))
    };
    Ok(json!({
        "encoding": "o200k_base",
        "messages": messages.len(),
        "message_bytes": message_bytes,
        "tokens": tokens,
        "messages_mb_per_s": round2(best_mb_per_s(message_bytes, &count_all)),
        // Every pass starts with an empty piece memo: only the words that
        // repeat within the text itself are found there.
        "messages_first_sight_mb_per_s": round2(best_mb_per_s(message_bytes, &|| {
            tollgate::tokens::forget_memo();
            count_all()
        })),
        "whole_text_bytes": text.len(),
        "whole_text_tokens": whole(),
        "whole_text_mb_per_s": round2(best_mb_per_s(text.len(), &whole)),
    }))
}

/// Scales `v` to unit length.
fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[allow(clippy::print_stdout)] // the report is the output
pub async fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    let want = |part: &str| args.only.as_deref().is_none_or(|o| o == part);
    let load = if want("load") {
        bench_load(&args).await?
    } else {
        Value::Null
    };
    let plugins = if want("plugins") {
        bench_plugins(&args).await?
    } else {
        Value::Null
    };
    let languages = if want("languages") {
        bench_languages(&args).await?
    } else {
        Value::Null
    };
    let http = if want("http") {
        bench_http(&args).await?
    } else {
        Value::Null
    };
    let ledger = if want("ledger") {
        tokio::task::spawn_blocking(bench_ledger_writer).await??
    } else {
        Value::Null
    };
    let embed = if want("embed") {
        let dir = args.model_dir.clone();
        tokio::task::spawn_blocking(move || bench_embed(&dir)).await??
    } else {
        Value::Null
    };
    let semantic = if want("semantic") {
        let dir = args.model_dir.clone();
        tokio::task::spawn_blocking(move || bench_semantic(&dir)).await??
    } else {
        Value::Null
    };
    let tokens = if want("tokens") {
        bench_tokens(&args.text)?
    } else {
        Value::Null
    };
    let out = json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "token_counting": tokens,
        "semantic_cache": semantic,
        "embeddings": embed,
        "plugin_load": load,
        "plugin_calls": plugins,
        "plugin_languages": languages,
        "http_overhead": http,
        "ledger_writer": ledger,
        "seconds": round1(started.elapsed().as_secs_f64()),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
