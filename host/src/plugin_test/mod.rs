//! `tollgate plugin test`: a plugin run offline on recorded requests, the
//! way it would run in the gateway (same runtime, limits, request view and
//! candidate models), printing each decision, agreement with the expected
//! decisions and the time of each call. Policy authors run it in their CI:
//! `--min-agreement` turns a regression into a failing exit status.

pub mod cases;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, PluginSlotConfig};
use crate::pipeline::{Live, view};
use crate::plugins::types::{
    CacheDecision, CacheScope, Compression, ModelInfo, ResponseMeta, RouteDecision, SpendSnapshot,
    Verdict,
};
use crate::plugins::{
    BudgetRuleKind, CachePolicyKind, CompressorKind, Kind, Plugin, PluginKind, PluginSet,
    RouterKind, Runtime,
};
use crate::pricing::Catalog;

pub use report::{Outcome, Report};

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cases: {0}")]
    Cases(String),
    #[error("--config {path}: {message}")]
    Config { path: String, message: String },
    #[error(transparent)]
    GatewayConfig(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Load(#[from] crate::plugins::LoadError),
    #[error(transparent)]
    Gateway(#[from] crate::pipeline::GatewayError),
}

/// What to run.
pub struct Options {
    pub file: PathBuf,
    pub kind: PluginKind,
    pub cases: PathBuf,
    /// A gateway config (its slot of this kind gives limits, capabilities
    /// and config; its providers and prices give the router's candidates),
    /// or the plugin's own config (TOML or JSON).
    pub config: Option<PathBuf>,
    /// Runs over all cases; decisions are taken from the first, timings from all.
    pub repeat: u32,
}

/// Top-level tables of a gateway config: a `--config` file with any of them
/// is a gateway config, else it is the plugin's own config.
const GATEWAY_TABLES: [&str; 16] = [
    "server",
    "identity",
    "providers",
    "models",
    "pricing",
    "runtime",
    "plugins",
    "cache",
    "ledger",
    "admin",
    "tasks",
    "embeddings",
    "budgets",
    "alerts",
    "resilience",
    "batch",
];

/// The slot settings and the gateway config the plugin runs under.
fn settings(opts: &Options) -> Result<(PluginSlotConfig, Config), HarnessError> {
    let mut slot = PluginSlotConfig::new(&opts.file);
    let defaults = || Config::parse("", "defaults", std::path::Path::new("."));
    let Some(path) = &opts.config else {
        return Ok((slot, defaults()?));
    };
    let bad = |message: String| HarnessError::Config {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let is_json = path.extension().and_then(|e| e.to_str()) == Some("json");
    let value: toml::Value = if is_json {
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
    } else {
        toml::from_str(&text).map_err(|e| bad(e.to_string()))?
    };
    let is_gateway = !is_json
        && value
            .as_table()
            .is_some_and(|t| t.keys().any(|k| GATEWAY_TABLES.contains(&k.as_str())));
    if !is_gateway {
        slot.config = Some(value);
        return Ok((slot, defaults()?));
    }
    let gateway = Config::load(path)?;
    let p = &gateway.plugins;
    let configured = match opts.kind {
        PluginKind::Router => p.router.clone(),
        PluginKind::Compressor => p.compressor.first().cloned(),
        PluginKind::CachePolicy => p.cache_policy.clone(),
        PluginKind::BudgetRule => p.budget_rule.clone(),
    };
    // Without a slot of this kind the plugin gets every slot default.
    let mut configured = configured.unwrap_or(slot);
    configured.path = opts.file.clone();
    configured.sha256 = None;
    Ok((configured, gateway))
}

/// Loads the plugin and runs every case through it.
pub async fn run(opts: &Options) -> Result<Report, HarnessError> {
    let (slot, config) = settings(opts)?;
    let cases = cases::read(&opts.cases, opts.kind)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let runtime = Runtime::new(&config.runtime, clock.clone())?;
    if slot.capabilities.embed
        && let Some(src) = crate::pipeline::load_embedder(&config.embeddings).await
    {
        runtime.set_embed_source(src);
    }
    let catalog = config
        .catalog()
        .map_err(crate::pipeline::GatewayError::from)?;
    let providers = crate::providers::Providers::from_config(&config, &catalog, &clock)
        .map_err(crate::pipeline::GatewayError::from)?;
    let live = Live {
        config: Arc::new(config.clone()),
        catalog: Arc::new(catalog),
        providers: Arc::new(providers),
        plugins: Arc::new(PluginSet::default()),
    };
    let started = Instant::now();
    let mut report = match opts.kind {
        PluginKind::Router => {
            let p: Plugin<RouterKind> = runtime.load(&slot).await?;
            let load_ms = ms(started);
            let candidates = live.candidates(None);
            let (candidates, catalog) = (&candidates, &live.catalog);
            exercise(&p, load_ms, &cases, opts.repeat, |p, _, v| async move {
                let d = p.route(&v, candidates).await;
                d.map(|d| route_outcome(&d, &v.model, catalog, candidates))
            })
            .await
        }
        PluginKind::Compressor => {
            let p: Plugin<CompressorKind> = runtime.load(&slot).await?;
            let load_ms = ms(started);
            exercise(&p, load_ms, &cases, opts.repeat, |p, c, v| async move {
                p.compress(&v).await.map(|d| compress_outcome(&d, c, &v))
            })
            .await
        }
        PluginKind::CachePolicy => {
            let p: Plugin<CachePolicyKind> = runtime.load(&slot).await?;
            let load_ms = ms(started);
            exercise(&p, load_ms, &cases, opts.repeat, |p, c, v| async move {
                let d = p.lookup(&v).await?;
                let mut o = cache_outcome(&d);
                if let (Some((content, finish)), CacheDecision::Lookup(_)) = (&c.response, &d) {
                    let meta = ResponseMeta {
                        model: v.model.clone(),
                        prompt_tokens: v.prompt_tokens,
                        completion_tokens: crate::tokens::count(content, &v.model),
                        finish_reason: finish.clone(),
                        content: content.clone(),
                    };
                    let stored = p.admit(&v, &meta).await?;
                    o.detail.push_str(if stored {
                        ", answer stored"
                    } else {
                        ", answer not stored"
                    });
                }
                Ok(o)
            })
            .await
        }
        PluginKind::BudgetRule => {
            let p: Plugin<BudgetRuleKind> = runtime.load(&slot).await?;
            let load_ms = ms(started);
            let day = crate::clock::utc_day(clock.now_ms());
            exercise(&p, load_ms, &cases, opts.repeat, |p, c, v| {
                let spend = SpendSnapshot {
                    day: day.clone(),
                    tenant_today_usd: c.spend[0],
                    feature_today_usd: c.spend[1],
                    user_today_usd: c.spend[2],
                    estimated_cost_usd: live.worst_case(&v.model, &v),
                };
                async move { p.check(&v, &spend).await.map(|d| verdict_outcome(&d)) }
            })
            .await
        }
    };
    report.file = opts.file.display().to_string();
    report.cases_file = opts.cases.display().to_string();
    Ok(report)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Runs the cases `repeat` times through `call`, timing each call.
async fn exercise<'a, K, F, Fut>(
    plugin: &'a Plugin<K>,
    load_ms: f64,
    cases: &'a [cases::Case],
    repeat: u32,
    call: F,
) -> Report
where
    K: Kind,
    F: Fn(&'a Plugin<K>, &'a cases::Case, crate::plugins::types::RequestView) -> Fut,
    Fut: Future<Output = Result<Outcome, crate::plugins::PluginError>>,
{
    let mut results = Vec::with_capacity(cases.len());
    let mut micros = Vec::with_capacity(cases.len() * repeat.max(1) as usize);
    // Built once (prompt tokens are counted here), handed out as copies.
    let views: Vec<_> = cases
        .iter()
        .map(|c| view::build(&c.id, &c.identity, &c.request))
        .collect();
    for round in 0..repeat.max(1) {
        for (c, v) in cases.iter().zip(&views) {
            let v = v.clone();
            let t = Instant::now();
            let out = call(plugin, c, v).await;
            micros.push(t.elapsed().as_secs_f64() * 1e6);
            if round == 0 {
                let outcome = out.unwrap_or_else(|e| Outcome::plain("error", e.to_string()));
                results.push((
                    c.id.clone(),
                    c.expect.clone(),
                    outcome,
                    *micros.last().unwrap_or(&0.0),
                ));
            }
        }
    }
    Report::new(
        K::KIND,
        plugin.describe(),
        (plugin.compiled().ms, load_ms),
        results,
        micros,
    )
}

fn route_outcome(
    d: &RouteDecision,
    asked: &str,
    catalog: &Catalog,
    candidates: &[ModelInfo],
) -> Outcome {
    let tier = |m: &str| {
        candidates
            .iter()
            .find(|c| c.name == m)
            .map(|c| c.tier)
            .or_else(|| catalog.get(m).map(|p| p.tier))
    };
    let (decision, model, detail) = match d {
        RouteDecision::Keep => ("keep", Some(asked.to_string()), format!("keep {asked}")),
        RouteDecision::UseModel(m) => ("use-model", Some(m.clone()), format!("use {m}")),
        RouteDecision::Fallback(list) => (
            "fallback",
            list.first().cloned(),
            format!("fallback {}", list.join(" > ")),
        ),
        RouteDecision::Respond(text) => ("respond", None, format!("respond {:?}", clip(text))),
        RouteDecision::Reject(why) => ("reject", None, format!("reject: {why}")),
    };
    Outcome {
        decision: decision.into(),
        tier: model.as_deref().and_then(tier),
        model,
        detail,
    }
}

fn compress_outcome(
    d: &Compression,
    case: &cases::Case,
    before: &crate::plugins::types::RequestView,
) -> Outcome {
    match d {
        Compression::Unchanged => Outcome::plain("unchanged", "unchanged".into()),
        Compression::Rewritten(rw) => {
            let mut after = case.request.clone();
            view::apply_rewrite(&mut after, rw);
            let tokens = view::build("", &case.identity, &after).prompt_tokens;
            Outcome::plain(
                "rewritten",
                format!(
                    "{} -> {} prompt tokens ({})",
                    before.prompt_tokens,
                    tokens,
                    clip(&rw.note)
                ),
            )
        }
    }
}

fn cache_outcome(d: &CacheDecision) -> Outcome {
    match d {
        CacheDecision::Bypass(why) => Outcome::plain("bypass", format!("bypass: {}", clip(why))),
        CacheDecision::Lookup(l) => {
            let scope = match l.scope {
                CacheScope::Tenant => "tenant",
                CacheScope::TenantUser => "tenant-user",
            };
            Outcome::plain(scope, format!("{scope}, ttl {} s", l.ttl_seconds))
        }
    }
}

fn verdict_outcome(d: &Verdict) -> Outcome {
    match d {
        Verdict::Allow => Outcome::plain("allow", "allow".into()),
        Verdict::Deny(why) => Outcome::plain("deny", format!("deny: {}", clip(why))),
        Verdict::Downgrade(m) => Outcome::plain("downgrade", format!("downgrade to {m}")),
        Verdict::Alert(why) => Outcome::plain("alert", format!("alert: {}", clip(why))),
    }
}

/// At most 80 characters of a plugin's text, on one line.
fn clip(s: &str) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() <= 80 {
        one
    } else {
        format!("{}...", one.chars().take(77).collect::<String>())
    }
}
