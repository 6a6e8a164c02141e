//! One chat completion request, top to bottom:
//!
//! 1. parse and validate the body; the asked model must be served; a task
//!    that loops or is over its call cap is stopped (natively, no plugin);
//! 2. budget: the budget-rule plugin sees the spend so far and allows,
//!    denies or downgrades;
//! 3. compressors rewrite the prompt (validated, applied, tokens saved counted);
//! 4. cache policy: bypass, or look up in the tenant (or tenant+user) scope:
//!    the exact request, then (when the policy asks) the closest reworded
//!    question of the same context that passes the near-miss guard
//!    ([`lookup`]); a hit is answered from the cache;
//! 5. router: a model, a fallback ladder, a fixed answer, or a rejection;
//! 6. reserve the worst-case cost, call upstream along the ladder;
//! 7. account: usage, cost, spend settled, answer admitted to the cache,
//!    metrics; respond with `x-tollgate-*` headers.
//!
//! Each plugin call is contained: on failure the slot's mode either skips the
//! plugin (fail-open) or rejects the request (fail-closed).

mod account;
pub mod deferred;
mod detach;
pub mod identity;
mod lookup;
pub mod resilience;
mod shadow;
mod stream;
mod task_guard;
pub mod view;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use http::StatusCode;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::api::{self, ApiError, ChatRequest};
use crate::budget::{Scopes, SpendCounters};
use crate::cache::{self, CachedAnswer, MemoryStore};
use crate::clock::{Clock, utc_day};
use crate::config::{Config, FailMode};
use crate::headers;
use crate::ledger::{self, Decision, Ledger, LedgerOptions, Row};
use crate::metrics::Metrics;
use crate::plugins::types::{
    CacheDecision, Compression, ModelInfo, RequestView, RouteDecision, SpendSnapshot, Verdict,
};
use crate::plugins::{Kind, LoadError, PluginError, PluginSet, Runtime, Slot, SlotId};
use crate::pricing::{Catalog, Usage};
use crate::providers::{ProviderError, ProviderSetupError, Providers, UpstreamCall, UpstreamReply};
use crate::tokens;
pub use identity::Identity;

use account::Accounting;

/// The embedding model, or why there is none; None when not configured.
/// A missing or broken model is logged and leaves the gateway serving:
/// plugins that embed get the reason as an error.
pub(crate) async fn load_embedder(
    cfg: &crate::config::EmbeddingsConfig,
) -> Option<crate::plugins::EmbedSource> {
    let dir = cfg.model_dir.clone()?;
    let memo = cfg.memo_entries;
    let started = Instant::now();
    let loaded = tokio::task::spawn_blocking(move || crate::embed::Embedder::load(&dir, memo))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    Some(match loaded {
        Ok(m) => {
            tracing::info!(dir = %m.dir().display(), ms = started.elapsed().as_millis(), "embedding model loaded");
            Ok(Arc::new(m))
        }
        Err(why) => {
            tracing::error!("embeddings off: {why}");
            Err(Arc::from(why))
        }
    })
}

/// Output tokens assumed for the worst case when a request sets no `max_tokens`.
const DEFAULT_MAX_OUTPUT: u32 = 4096;

/// A response ready for the HTTP layer.
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(http::HeaderName, String)>,
    pub body: ReplyBody,
}

pub enum ReplyBody {
    Json(Bytes),
    /// Server-sent events, produced by a task that also does the accounting.
    Sse(mpsc::Receiver<Bytes>),
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Plugin(#[from] LoadError),
    #[error(transparent)]
    Provider(#[from] ProviderSetupError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
}

/// What a request reads from start to finish: the config, prices, routes
/// and plugins. Replaced as a whole (a config reload, a plugin swap), never
/// mutated, so a request in flight finishes on the snapshot it started with.
pub struct Live {
    pub config: Arc<Config>,
    pub catalog: Arc<Catalog>,
    pub providers: Arc<Providers>,
    pub plugins: Arc<PluginSet>,
}

impl Live {
    /// The same snapshot with another config (same prices, routes, plugins).
    pub fn with_config(&self, config: Config) -> Self {
        Self {
            config: Arc::new(config),
            catalog: self.catalog.clone(),
            providers: self.providers.clone(),
            plugins: self.plugins.clone(),
        }
    }

    /// The same snapshot with another plugin set.
    pub fn with_plugins(&self, plugins: PluginSet) -> Self {
        Self {
            config: self.config.clone(),
            catalog: self.catalog.clone(),
            providers: self.providers.clone(),
            plugins: Arc::new(plugins),
        }
    }

    /// Worst-case cost of the request on `model` (0 when the model has no price).
    pub(crate) fn worst_case(&self, model: &str, view: &RequestView) -> f64 {
        self.catalog
            .worst_case(
                model,
                view.prompt_tokens,
                view.max_tokens.unwrap_or(DEFAULT_MAX_OUTPUT),
            )
            .unwrap_or(0.0)
    }

    /// The dearest worst case along a fallback ladder: any rung may answer.
    fn worst_case_of_ladder(&self, ladder: &[String], view: &RequestView) -> f64 {
        ladder
            .iter()
            .map(|m| self.worst_case(m, view))
            .fold(0.0, f64::max)
    }

    /// Served models with prices, limited to the ceiling's tier after a downgrade.
    pub fn candidates(&self, ceiling: Option<&str>) -> Vec<ModelInfo> {
        let max_tier = ceiling.and_then(|m| self.catalog.get(m)).map(|p| p.tier);
        self.providers
            .model_names()
            .into_iter()
            .filter_map(|name| {
                let target = self.providers.get(name)?;
                let price = self.catalog.get(name);
                let tier = price.map_or(0, |p| p.tier);
                if max_tier.is_some_and(|max| tier > max) {
                    return None;
                }
                Some(ModelInfo {
                    name: name.to_string(),
                    provider: target.provider_name.clone(),
                    tier,
                    input_per_mtok: price.map_or(f64::NAN, |p| p.input),
                    cached_input_per_mtok: price.map_or(f64::NAN, |p| p.cached_input()),
                    output_per_mtok: price.map_or(f64::NAN, |p| p.output),
                })
            })
            .collect()
    }
}

/// Everything a request needs, shared by all requests.
pub struct Gateway {
    /// The config the gateway started with: listeners, ledger, runtime and
    /// other settings a reload cannot change. Requests read [`Gateway::live`].
    pub config: Config,
    pub live: ArcSwap<Live>,
    pub runtime: Arc<Runtime>,
    pub cache: MemoryStore,
    /// Questions of cached answers, for semantic matching.
    pub semantic: cache::semantic::SemanticIndex,
    /// The embedding model semantic lookups use (also the plugins' `embed`).
    pub embedder: Option<crate::plugins::EmbedSource>,
    semantic_off_warned: std::sync::atomic::AtomicBool,
    /// Chat requests in flight, bounded by `server.max_in_flight`.
    pub in_flight: crate::in_flight::InFlight,
    pub spend: Arc<SpendCounters>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Metrics,
    /// The cost ledger; None when `ledger.enabled = false`.
    pub ledger: Option<Ledger>,
    pub tasks: task_guard::TaskGuard,
    pub kills: crate::kill::KillSwitches,
    /// One circuit breaker per provider+model.
    pub breakers: resilience::Breakers,
    /// Deferred requests waiting for, or answered by, a batch.
    pub deferred: deferred::Deferred,
    pub alerts: Arc<crate::alerts::Alerts>,
    /// Plugin versions loaded through the admin API, and what rollbacks restore.
    pub versions: tokio::sync::Mutex<crate::plugins::manager::Versions>,
    /// Reloads the config file on request (SIGHUP, the admin API); set when
    /// the gateway serves from a file.
    pub reloader: std::sync::OnceLock<Arc<crate::reload::Reloader>>,
    /// Models already warned about for having no price.
    unpriced_warned: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Gateway {
    /// Builds the gateway: price catalog, providers, plugin runtime, and
    /// every configured plugin loaded and initialised (a bad plugin or
    /// plugin config stops the start with a precise error).
    pub async fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Arc<Self>, GatewayError> {
        let catalog = config.catalog()?;
        let providers = Providers::from_config(&config, &catalog, &clock)?;
        let runtime = Runtime::new(&config.runtime, clock.clone())?;
        let spend = Arc::new(SpendCounters::default());
        runtime.set_spend_source(spend.clone());
        let embedder = load_embedder(&config.embeddings).await;
        if let Some(src) = &embedder {
            runtime.set_embed_source(src.clone());
        }
        let p = &config.plugins;
        let metrics = Metrics::new();
        let mut set = PluginSet::default();
        if let Some(s) = &p.router {
            set.router = Some(load_slot(&runtime, s, &metrics).await?);
        }
        for s in &p.compressor {
            set.compressors
                .push(load_slot(&runtime, s, &metrics).await?);
        }
        if let Some(s) = &p.cache_policy {
            set.cache_policy = Some(load_slot(&runtime, s, &metrics).await?);
        }
        if let Some(s) = &p.budget_rule {
            set.budget_rule = Some(load_slot(&runtime, s, &metrics).await?);
        }
        for s in set.summaries() {
            tracing::info!(kind = %s.kind, plugin = s.name, sha256 = s.digest, fail_mode = ?s.fail_mode, "plugin loaded");
        }
        let ledger = if config.ledger.enabled {
            let l = Ledger::open(
                &config.ledger.path,
                LedgerOptions {
                    flush_interval: Duration::from_millis(config.ledger.flush_interval_ms),
                    batch_rows: config.ledger.batch_rows,
                    max_pending: config.ledger.max_pending_rows,
                },
            )?;
            tracing::info!(path = %l.path().display(), "ledger open");
            Some(l)
        } else {
            tracing::warn!("ledger disabled: requests leave no cost record");
            None
        };
        let kills = crate::kill::KillSwitches::default();
        if let Some(l) = &ledger {
            let rows = ledger::open_db(l.path()).and_then(|c| {
                ledger::changes_of(&c, crate::kill::CHANGE_SLOT)
                    .map_err(ledger::sqlite_err(l.path()))
            })?;
            let active = crate::kill::replay(&rows);
            if !active.is_empty() {
                tracing::warn!(
                    count = active.len(),
                    "kill switches restored from the change log"
                );
            }
            kills.restore(active);
        }
        let versions = crate::plugins::manager::Versions::new(pins(&config));
        Ok(Arc::new(Self {
            versions: tokio::sync::Mutex::new(versions),
            ledger,
            unpriced_warned: Default::default(),
            reloader: Default::default(),
            cache: MemoryStore::new(config.cache.max_bytes, clock.clone()),
            semantic: cache::semantic::SemanticIndex::new(
                config.cache.semantic_max_entries_per_scope,
                config.cache.semantic_ann_from,
            ),
            embedder,
            semantic_off_warned: Default::default(),
            in_flight: crate::in_flight::InFlight::new(config.server.max_in_flight),
            runtime,
            live: ArcSwap::from_pointee(Live {
                config: Arc::new(config.clone()),
                catalog: Arc::new(catalog),
                providers: Arc::new(providers),
                plugins: Arc::new(set),
            }),
            spend,
            tasks: task_guard::TaskGuard::new(config.tasks.clone()),
            kills,
            breakers: Default::default(),
            deferred: deferred::Deferred::new(&config.batch),
            alerts: Arc::new(crate::alerts::Alerts::new(
                config.alerts.clone(),
                metrics.budget_alerts.clone(),
            )),
            clock,
            metrics,
            config,
        }))
    }

    /// Answers one chat completion request; never fails: errors become
    /// OpenAI-style error replies.
    ///
    /// If the client disconnects while the upstream is answering, the call
    /// still completes and is accounted (the upstream bills it either way):
    /// see [`detach::Completing`].
    pub async fn chat(self: &Arc<Self>, id: Identity, raw: Bytes) -> Reply {
        let started = Instant::now();
        let reply = self.chat_inner(id, raw).await;
        self.metrics
            .request(reply.status.as_u16(), started.elapsed().as_secs_f64());
        reply
    }

    async fn chat_inner(self: &Arc<Self>, id: Identity, raw: Bytes) -> Reply {
        if let Some(l) = &self.ledger {
            l.room().await;
        }
        let request_id = new_request_id();
        let gw = self.clone();
        let rid = request_id.clone();
        let task = detach::Completing::new(
            AssertUnwindSafe(async move {
                let started = Instant::now();
                let mut rec = gw.new_row(&rid, &id);
                let result = gw.handle(&rid, id, &raw, &mut rec).await;
                if let Err(e) = &result {
                    gw.record_error(rec, e, started);
                }
                result
            })
            .catch_unwind(),
        );
        match task.await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => self.error_reply(&request_id, &e),
            Err(panic) => {
                // Unreachable by design (no panics on the request path); if
                // it happens anyway the client still gets a proper error.
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(request_id, "request failed with a panic: {what}");
                let e = ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "api_error",
                    "internal_error",
                    "the gateway failed to process the request",
                );
                self.error_reply(&request_id, &e)
            }
        }
    }

    /// Records an application's verdict on a request or a task
    /// (`POST /v1/feedback`); reports turn it into cost per successful task.
    pub fn feedback(&self, id: &Identity, raw: &[u8]) -> Result<(), ApiError> {
        let o = api::parse_object(raw)?;
        let text = |k: &str| -> Result<Option<String>, ApiError> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(_) => Err(ApiError::invalid(
                    "invalid_type",
                    format!("`{k}` must be a non-empty string"),
                )
                .param(k)),
            }
        };
        let request_id = text("request_id")?;
        let task_id = text("task_id")?;
        if request_id.is_some() == task_id.is_some() {
            return Err(ApiError::invalid(
                "missing_required_parameter",
                "give exactly one of `request_id` and `task_id`",
            ));
        }
        let success = match o.get("success") {
            Some(Value::Bool(b)) => *b,
            None => {
                return Err(ApiError::invalid(
                    "missing_required_parameter",
                    "missing required parameter: `success`",
                )
                .param("success"));
            }
            Some(_) => {
                return Err(
                    ApiError::invalid("invalid_type", "`success` must be a boolean")
                        .param("success"),
                );
            }
        };
        let score = match o.get("score") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Some(x),
                _ => {
                    return Err(
                        ApiError::invalid("invalid_type", "`score` must be a number")
                            .param("score"),
                    );
                }
            },
        };
        let Some(ledger) = &self.ledger else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "ledger_disabled",
                "feedback needs the ledger, which is disabled (ledger.enabled = false)",
            ));
        };
        ledger.record_feedback(ledger::Feedback {
            ts_ms: self.clock.now_ms(),
            tenant: id.tenant.clone(),
            request_id,
            task_id,
            success,
            score,
        });
        Ok(())
    }

    /// Logs once per model that its calls are recorded without a cost.
    pub fn warn_unpriced(&self, model: &str) {
        if let Ok(mut seen) = self.unpriced_warned.lock()
            && seen.insert(model.to_string())
        {
            tracing::warn!(
                model,
                "model has no price: its calls are recorded as unpriced (cost null); add it under [pricing.models]"
            );
        }
    }

    /// A ledger row with what is known before the body is read.
    fn new_row(&self, request_id: &str, id: &Identity) -> Row {
        Row {
            request_id: request_id.to_string(),
            ts_ms: self.clock.now_ms(),
            tenant: id.tenant.clone(),
            user: id.user.clone(),
            feature: id.feature.clone(),
            task: id.task.clone(),
            step: id.step,
            cache: "none",
            ..Row::default()
        }
    }

    fn record(&self, row: Row) {
        if let Some(l) = &self.ledger {
            l.record(row);
        }
    }

    /// Records a request answered without an upstream call (cache hit, fixed answer).
    fn record_answered(&self, rec: &mut Row, started: Instant) {
        let mut row = std::mem::take(rec);
        row.status = 200;
        row.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.record(row);
    }

    fn record_error(&self, mut row: Row, e: &ApiError, started: Instant) {
        row.status = e.status.as_u16();
        row.error_code = Some(e.code.to_string());
        row.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.record(row);
    }

    /// Answers (and records) a request refused before the pipeline could
    /// read it: unreadable body, bad identity headers.
    pub fn reject(&self, headers_identity: Option<&Identity>, e: &ApiError) -> Reply {
        let request_id = new_request_id();
        let fallback = Identity::defaults(&self.live.load().config.identity);
        let row = self.new_row(&request_id, headers_identity.unwrap_or(&fallback));
        self.metrics.request(e.status.as_u16(), 0.0);
        self.record_error(row, e, Instant::now());
        self.error_reply(&request_id, e)
    }

    pub fn error_reply(&self, request_id: &str, e: &ApiError) -> Reply {
        if e.status.is_server_error() {
            tracing::warn!(
                request_id,
                status = e.status.as_u16(),
                code = e.code,
                "{}",
                e.message
            );
        } else {
            tracing::info!(
                request_id,
                status = e.status.as_u16(),
                code = e.code,
                "{}",
                e.message
            );
        }
        Reply {
            status: e.status,
            headers: vec![(headers::REQUEST_ID, request_id.to_string())],
            body: ReplyBody::Json(e.body()),
        }
    }

    /// The pipeline. `rec` is the request's ledger row, filled in as the
    /// request goes; every path that answers records it (errors are recorded
    /// by the caller).
    async fn handle(
        self: &Arc<Self>,
        rid: &str,
        mut id: Identity,
        raw: &[u8],
        rec: &mut Row,
    ) -> Result<Reply, ApiError> {
        let started = Instant::now();

        // Everything below reads this one snapshot.
        let live = self.live.load_full();
        let plugins = live.plugins.clone();

        // 1. Parse and validate.
        let mut req = ChatRequest::parse(raw)?;
        rec.model_asked = req.model.clone();
        rec.stream = req.stream;
        if self.ledger.is_some() {
            if live.config.ledger.record_bodies {
                let canonical = serde_json::to_string(&req.body).unwrap_or_default();
                rec.request_hash = ledger::request_hash(&canonical);
                rec.request_body = Some(canonical);
            } else {
                rec.request_hash = ledger::request_hash_of(&req.body);
            }
        }
        if live.providers.get(&req.model).is_none() {
            return Err(model_not_found(&req.model, &live.providers));
        }
        if live.config.batch.deferrable_features.contains(&id.feature) {
            id.deferrable = true;
        }
        if id.deferrable {
            if req.stream {
                return Err(ApiError::invalid(
                    "deferred_stream",
                    "a deferrable request cannot stream: its answer comes later",
                ));
            }
            if let Some(url) = &id.callback_url
                && !deferred::callback_allowed(&live.config.batch, url)
            {
                return Err(ApiError::invalid(
                    "callback_not_allowed",
                    format!("x-tollgate-callback-url {url:?} is not under batch.callback_allow"),
                ));
            }
        }
        let prompt_version = crate::kill::prompt_version(id.prompt_version.as_deref(), &req.body);
        if !prompt_version.is_empty() {
            rec.prompt_version = Some(prompt_version.clone());
        }
        if let Some(e) = self.kills.stops(&id.tenant, &id.feature, &prompt_version) {
            self.metrics.killed();
            return Err(e);
        }
        if let Err(e) = self
            .tasks
            .check(&id.tenant, &id.task, &req.body, self.clock.now_ms())
        {
            self.metrics.budget(e.code);
            return Err(e);
        }
        let mut view = view::build(rid, &id, &req);
        rec.chars_before = view::prompt_chars(&view) as u64;
        let scopes = Scopes {
            day: utc_day(self.clock.now_ms()),
            tenant: id.tenant.clone(),
            feature: id.feature.clone(),
            user: id.user.clone(),
        };

        // 2. Budget.
        let mut ceiling: Option<String> = None;
        if let Some(slot) = &plugins.budget_rule {
            let snap = self.spend.snapshot(&scopes);
            let spend = SpendSnapshot {
                day: scopes.day.clone(),
                tenant_today_usd: snap.tenant,
                feature_today_usd: snap.feature,
                user_today_usd: snap.user,
                estimated_cost_usd: live.worst_case(&req.model, &view),
            };
            let verdict = contain(slot, slot.plugin.check(&view, &spend).await, rec)?;
            if let Some(v) = &verdict {
                decided(rec, slot, format!("{v:?}"));
            }
            shadow::budget(&plugins, &view, &spend, verdict.as_ref(), rec).await;
            match verdict {
                None | Some(Verdict::Allow) => {}
                Some(Verdict::Deny(reason)) => {
                    self.metrics.budget("deny");
                    return Err(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "insufficient_quota",
                        "budget_exceeded",
                        format!("{reason} (budget rule {})", slot.plugin.name()),
                    ));
                }
                Some(Verdict::Downgrade(model)) => {
                    if live.providers.get(&model).is_some() {
                        self.metrics.budget("downgrade");
                        ceiling = Some(model);
                    } else {
                        let e = slot_invalid(
                            slot,
                            format!("downgrade to {model:?}, which is not served"),
                        );
                        contain::<_, ()>(slot, Err(e), rec)?;
                    }
                }
                Some(Verdict::Alert(message)) => {
                    self.metrics.budget("alert");
                    tracing::warn!(request_id = rid, tenant = %id.tenant, plugin = slot.plugin.name(), "budget alert: {message}");
                }
            }
        }

        // 3. Compress.
        let tokens_before = view.prompt_tokens;
        for slot in &plugins.compressors {
            match contain(slot, slot.plugin.compress(&view).await, rec)? {
                Some(Compression::Rewritten(rw)) => {
                    view::apply_rewrite(&mut req, &rw);
                    view = view::build(rid, &id, &req);
                    decided(rec, slot, format!("rewritten: {}", rw.note));
                }
                Some(Compression::Unchanged) => decided(rec, slot, "unchanged".into()),
                None => {}
            }
        }
        rec.tokens_saved = tokens_before.saturating_sub(view.prompt_tokens);
        rec.chars_after = view::prompt_chars(&view) as u64;

        // 4. Cache lookup.
        let mut cache_plan = None;
        let mut cache_outcome = "bypass";
        if let Some(slot) = &plugins.cache_policy {
            let decision = contain(slot, slot.plugin.lookup(&view).await, rec)?;
            shadow::cache(&plugins, &view, decision.as_ref(), rec).await;
            match decision {
                Some(CacheDecision::Lookup(mut l)) => {
                    decided(
                        rec,
                        slot,
                        match &l.semantic {
                            Some(s) => format!(
                                "lookup {:?} ttl {}s semantic >= {}",
                                l.scope, l.ttl_seconds, s.min_similarity
                            ),
                            None => format!("lookup {:?} ttl {}s", l.scope, l.ttl_seconds),
                        },
                    );
                    l.ttl_seconds = l.ttl_seconds.min(live.config.cache.max_ttl_seconds);
                    match self
                        .lookup(&l, &id, &prompt_version, &req, &view, rec)
                        .await
                    {
                        lookup::Lookup::Hit { answer, similarity } => {
                            self.metrics.cache(if similarity.is_some() {
                                "semantic_hit"
                            } else {
                                "hit"
                            });
                            tracing::info!(request_id = rid, tenant = %id.tenant, model = %answer.model, similarity, "cache hit");
                            rec.cache = "hit";
                            rec.model_served = Some(answer.model.clone());
                            rec.cache_origin = Some(answer.origin.clone());
                            rec.cache_similarity = similarity.map(f64::from);
                            rec.cache_saved_usd = Some(answer.cost_usd);
                            rec.cost_usd = Some(0.0);
                            self.record_answered(rec, started);
                            return Ok(self.reply_cached(rid, &req, &answer, similarity));
                        }
                        lookup::Lookup::Miss(plan) => cache_plan = Some(plan),
                    }
                    cache_outcome = "miss";
                }
                Some(CacheDecision::Bypass(reason)) => {
                    decided(rec, slot, format!("bypass: {reason}"));
                }
                None => {}
            }
        }
        rec.cache = cache_outcome;
        self.metrics.cache(cache_outcome);

        // 5. Route. A router shadow runs even when the slot is empty: it is
        // then compared with keeping the asked model.
        let default_model = ceiling.clone().unwrap_or_else(|| req.model.clone());
        let mut ladder = vec![default_model.clone()];
        let candidates = if plugins.router.is_some() || plugins.shadow.router.is_some() {
            live.candidates(ceiling.as_deref())
        } else {
            Vec::new()
        };
        let decision = match &plugins.router {
            Some(slot) => {
                let d = contain(slot, slot.plugin.route(&view, &candidates).await, rec)?;
                if let Some(d) = &d {
                    decided(rec, slot, format!("{d:?}"));
                }
                d
            }
            None => Some(RouteDecision::Keep),
        };
        shadow::route(
            &plugins,
            &view,
            &candidates,
            decision.as_ref(),
            &default_model,
            rec,
        )
        .await;
        if let Some(slot) = &plugins.router {
            match decision {
                None | Some(RouteDecision::Keep) => {}
                Some(RouteDecision::UseModel(m)) => ladder = vec![m],
                Some(RouteDecision::Fallback(list)) => ladder = list,
                Some(RouteDecision::Respond(text)) => {
                    rec.model_served = Some("fixed-response".into());
                    rec.cost_usd = Some(0.0);
                    self.record_answered(rec, started);
                    tracing::info!(request_id = rid, tenant = %view.tenant, "answered by the router without an upstream call");
                    return Ok(self.reply_fixed(rid, &req, &view, &text, "fixed-response"));
                }
                Some(RouteDecision::Reject(reason)) => {
                    return Err(ApiError::invalid(
                        "rejected_by_policy",
                        format!("{reason} (router {})", slot.plugin.name()),
                    ));
                }
            }
        }

        // 6. Reserve the worst case against every budget (or downgrade, or
        // refuse) and call upstream along the ladder.
        self.kills
            .filter_ladder(&mut ladder, &id.tenant, &id.feature, &prompt_version)
            .inspect_err(|_| self.metrics.killed())?;
        let reservation = self.reserve(&live, &scopes, &id, &mut ladder, &view, rec)?;
        if id.deferrable {
            return self.defer(
                &live,
                rid,
                &id,
                &req,
                ladder,
                view,
                cache_plan,
                reservation,
                started,
                rec,
            );
        }
        // The parsed body is not read again: it goes upstream as it is.
        let mut body = std::mem::take(&mut req.body);
        if req.stream {
            // Always ask for usage, so streamed calls are billed exactly.
            let mut opts = match body.remove("stream_options") {
                Some(Value::Object(o)) => o,
                _ => serde_json::Map::new(),
            };
            opts.insert("include_usage".into(), Value::Bool(true));
            body.insert("stream_options".into(), Value::Object(opts));
        }
        let upstream_started = Instant::now();
        let answered = self
            .call_ladder(&live, &ladder, body, req.stream, &id, &mut rec.calls)
            .await;
        let (model, provider_name, reply) =
            match (answered, &live.config.resilience.fallback_answer) {
                (Ok(a), _) => a,
                // Every rung failed: the route's deterministic answer, if it has one.
                (Err(e), Some(text)) if e.code == "upstream_unavailable" => {
                    tracing::warn!(
                        request_id = rid,
                        "answering with the fallback answer: {}",
                        e.message
                    );
                    drop(reservation);
                    rec.model_served = Some("fallback-answer".into());
                    rec.cost_usd = Some(0.0);
                    rec.error_code = Some("upstream_unavailable".into());
                    self.record_answered(rec, started);
                    let mut reply = self.reply_fixed(rid, &req, &view, text, "fallback-answer");
                    reply.headers.push((headers::FALLBACK, "answer".into()));
                    return Ok(reply);
                }
                (Err(e), _) => return Err(e),
            };
        rec.model_served = Some(model.clone());
        rec.provider = Some(provider_name);

        // 7. Account and respond.
        let acct = Accounting {
            gateway: self.clone(),
            live: live.clone(),
            view,
            model: model.clone(),
            cache_plan,
            reservation: Some(reservation),
            started,
            upstream_started,
            row: std::mem::take(rec),
            batch_discount: None,
        };
        let headers = vec![
            (headers::REQUEST_ID, rid.to_string()),
            (headers::MODEL, model),
            (headers::CACHE, cache_outcome.to_string()),
        ];
        match reply {
            UpstreamReply::Complete(body) => {
                let cost = acct.complete_json(&body).await;
                let mut headers = headers;
                headers.push((headers::COST_USD, format_cost(cost)));
                Ok(Reply {
                    status: StatusCode::OK,
                    headers,
                    body: ReplyBody::Json(body),
                })
            }
            UpstreamReply::Stream(upstream) => Ok(Reply {
                status: StatusCode::OK,
                headers,
                body: ReplyBody::Sse(stream::relay(upstream, acct, req.include_usage)),
            }),
        }
    }

    /// Queues a deferrable request for its provider's batch API (first
    /// served model of the ladder) and answers 202 with where to poll.
    #[allow(clippy::too_many_arguments)]
    fn defer(
        self: &Arc<Self>,
        live: &Arc<Live>,
        rid: &str,
        id: &Identity,
        req: &ChatRequest,
        ladder: Vec<String>,
        view: RequestView,
        cache_plan: Option<cache::Plan>,
        reservation: crate::budget::Reservation,
        started: Instant,
        rec: &mut Row,
    ) -> Result<Reply, ApiError> {
        let Some((model, target)) = ladder
            .iter()
            .find_map(|m| live.providers.get(m).map(|t| (m.clone(), t.clone())))
        else {
            return Err(no_upstream());
        };
        let mut body = req.body.clone();
        body.insert("model".into(), Value::String(target.upstream_model.clone()));
        rec.model_served = Some(model.clone());
        rec.provider = Some(target.provider_name.clone());
        let acct = Accounting {
            gateway: self.clone(),
            live: live.clone(),
            view,
            model: model.clone(),
            cache_plan,
            reservation: Some(reservation),
            started,
            upstream_started: Instant::now(),
            row: std::mem::take(rec),
            batch_discount: None,
        };
        let queued = deferred::submit(
            self,
            deferred::Job {
                call: UpstreamCall {
                    body,
                    stream: false,
                    sim_output_tokens: id.sim_output_tokens,
                    sim_fault: id.sim_fault.clone(),
                    attempt: 1,
                },
                target,
                acct,
                callback: id.callback_url.clone(),
            },
        );
        Ok(Reply {
            status: StatusCode::ACCEPTED,
            headers: vec![
                (headers::REQUEST_ID, rid.to_string()),
                (headers::MODEL, model),
                (headers::DEFERRED, "queued".into()),
            ],
            body: ReplyBody::Json(Bytes::from(queued.to_string())),
        })
    }

    /// Reserves the ladder's worst-case cost against the daily counters and
    /// every budget that applies, in one atomic step. A budget that would go
    /// over its limit refuses the request (429 naming it), unless it says
    /// to downgrade and its model's worst case fits.
    fn reserve(
        &self,
        live: &Live,
        scopes: &Scopes,
        id: &Identity,
        ladder: &mut Vec<String>,
        view: &RequestView,
        rec: &mut Row,
    ) -> Result<crate::budget::Reservation, ApiError> {
        let who = crate::budget::Who {
            tenant: id.tenant.clone(),
            feature: id.feature.clone(),
            user: id.user.clone(),
            task: id.task.clone(),
        };
        let budgets = &live.config.budgets;
        let now = self.clock.now_ms();
        let try_ladder = |ladder: &[String]| {
            self.spend.try_reserve(
                scopes,
                &who,
                budgets,
                now,
                live.worst_case_of_ladder(ladder, view),
            )
        };
        let rec_id = rec.request_id.clone();
        let observed = |r: crate::budget::Reservation| {
            for l in &r.levels {
                self.alerts.observe(l, &rec_id, now);
            }
            r
        };
        let exceeded = match try_ladder(ladder) {
            Ok(r) => return Ok(observed(r)),
            Err(e) => e,
        };
        self.alerts.observe(&exceeded.level(), &rec_id, now);
        let downgrade = exceeded
            .budget
            .downgrade_to
            .clone()
            .filter(|_| exceeded.budget.on_exceed == crate::budget::OnExceed::Downgrade)
            .filter(|m| live.providers.get(m).is_some() && ladder.as_slice() != [m.clone()]);
        if let Some(model) = downgrade
            && let Ok(r) = try_ladder(std::slice::from_ref(&model))
        {
            self.metrics.budget("downgrade");
            rec.decisions.push(Decision {
                kind: "budget",
                plugin: "host".into(),
                digest: "".into(),
                decision: format!("downgrade to {model}: {}", exceeded.message()),
            });
            *ladder = vec![model];
            return Ok(observed(r));
        }
        self.metrics.budget("budget_exceeded");
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "budget_exceeded",
            exceeded.message(),
        ))
    }

    /// Calls each model of the ladder in turn until one answers; errors a
    /// next model could fix (429, 5xx, timeouts, connection) move down the
    /// ladder. Each failed attempt is added to `calls` (the answering call is
    /// added once its usage is known).
    async fn call_ladder(
        &self,
        live: &Live,
        ladder: &[String],
        mut body: serde_json::Map<String, Value>,
        stream: bool,
        id: &Identity,
        calls: &mut Vec<ledger::CallRecord>,
    ) -> Result<(String, String, UpstreamReply), ApiError> {
        let policy = &live.config.resilience;
        let mut failed: Vec<String> = Vec::new();
        for model in ladder {
            let Some(target) = live.providers.get(model) else {
                continue;
            };
            let key = format!("{}/{model}", target.provider_name);
            let labels = [target.provider_name.as_str(), model.as_str()];
            if !self.breakers.allow(&key, policy, self.clock.now_ms()) {
                calls.push(ledger::CallRecord {
                    model: model.clone(),
                    provider: target.provider_name.clone(),
                    error: Some("circuit open: not called".into()),
                    cost_usd: Some(0.0),
                    ..ledger::CallRecord::default()
                });
                failed.push(format!("{model}: circuit open"));
                continue;
            }
            // One body goes down the ladder: each rung sets its model.
            body.insert("model".into(), Value::String(target.upstream_model.clone()));
            let mut call = UpstreamCall {
                body,
                stream,
                sim_output_tokens: id.sim_output_tokens,
                sim_fault: id.sim_fault.clone(),
                attempt: 0,
            };
            for n in 0..=policy.max_retries {
                call.attempt = n + 1;
                self.metrics.upstream_calls.with_label_values(&labels).inc();
                let result = target.provider.chat(&call).await;
                let ok = result.is_ok();
                if let Some(state) = self.breakers.record(&key, ok, policy, self.clock.now_ms()) {
                    tracing::warn!(provider = %target.provider_name, model = %model, "circuit breaker {state:?}");
                    self.metrics.breaker(&labels, state);
                }
                let e = match result {
                    Ok(reply) => {
                        return Ok((model.clone(), target.provider_name.clone(), reply));
                    }
                    Err(e) => e,
                };
                self.metrics
                    .upstream_errors
                    .with_label_values(&labels)
                    .inc();
                tracing::warn!(model = %model, provider = %target.provider_name, attempt = n + 1, "upstream failed: {e}");
                calls.push(ledger::CallRecord {
                    model: model.clone(),
                    provider: target.provider_name.clone(),
                    status: match &e {
                        ProviderError::Status { status, .. } => *status,
                        _ => 0,
                    },
                    error: Some(e.to_string()),
                    cost_usd: Some(0.0),
                    ..ledger::CallRecord::default()
                });
                if !e.is_retryable() {
                    // The request itself is wrong: another try or model won't fix it.
                    return Err(upstream_error(&e));
                }
                let retry_after = match &e {
                    ProviderError::Status { retry_after_s, .. } => *retry_after_s,
                    _ => None,
                };
                let wait = (n < policy.max_retries)
                    .then(|| policy.backoff(n, retry_after, resilience::jitter()))
                    .flatten()
                    .filter(|_| self.breakers.allow(&key, policy, self.clock.now_ms()))
                    .filter(|_| {
                        self.tasks
                            .take_retry(&id.tenant, &id.task, self.clock.now_ms())
                    });
                match wait {
                    Some(w) => {
                        self.metrics.retries.inc();
                        tokio::time::sleep(w).await;
                    }
                    None => {
                        failed.push(format!("{model}: {e} ({} attempts)", n + 1));
                        break;
                    }
                }
            }
            body = call.body;
        }
        if failed.is_empty() {
            return Err(no_upstream());
        }
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "upstream_unavailable",
            format!("no model of the route answered: {}", failed.join("; ")),
        ))
    }

    fn reply_cached(
        &self,
        rid: &str,
        req: &ChatRequest,
        hit: &CachedAnswer,
        similarity: Option<f32>,
    ) -> Reply {
        let headers = vec![
            (headers::REQUEST_ID, rid.to_string()),
            (headers::MODEL, hit.model.clone()),
            (headers::CACHE, "hit".to_string()),
            (headers::CACHE_ORIGIN, hit.origin.clone()),
            (
                headers::CACHE_MATCH,
                match similarity {
                    Some(s) => format!("semantic; similarity={s:.3}"),
                    None => "exact".to_string(),
                },
            ),
            (headers::COST_USD, format_cost(Some(0.0))),
        ];
        let body = if req.stream {
            let events = api::completion_sse(
                &format!("chatcmpl-{}", rid.trim_start_matches("req_")),
                self.clock.now_ms() / 1000,
                &hit.model,
                &hit.content,
                &hit.finish,
                &hit.usage,
                req.include_usage,
            );
            ReplyBody::Sse(channel_of(events))
        } else {
            ReplyBody::Json(hit.body.clone())
        };
        Reply {
            status: StatusCode::OK,
            headers,
            body,
        }
    }

    /// A router's fixed answer: no upstream call, no cost.
    /// An answer the gateway writes itself (a router's fixed answer, a
    /// route's fallback answer), shown as model `served_as`.
    fn reply_fixed(
        &self,
        rid: &str,
        req: &ChatRequest,
        view: &RequestView,
        text: &str,
        served_as: &str,
    ) -> Reply {
        let usage = Usage {
            prompt_tokens: view.prompt_tokens,
            cached_tokens: 0,
            cache_write_tokens: 0,
            completion_tokens: tokens::count(text, &req.model),
        };
        let id = format!("chatcmpl-{}", rid.trim_start_matches("req_"));
        let created = self.clock.now_ms() / 1000;
        let body = if req.stream {
            ReplyBody::Sse(channel_of(api::completion_sse(
                &id,
                created,
                &req.model,
                text,
                "stop",
                &usage,
                req.include_usage,
            )))
        } else {
            ReplyBody::Json(Bytes::from(
                api::completion_json(&id, created, &req.model, text, "stop", &usage).to_string(),
            ))
        };
        Reply {
            status: StatusCode::OK,
            headers: vec![
                (headers::REQUEST_ID, rid.to_string()),
                (headers::MODEL, served_as.to_string()),
                (headers::CACHE, "bypass".to_string()),
                (headers::COST_USD, format_cost(Some(0.0))),
            ],
            body,
        }
    }
}

/// Required digests per slot: `admin.pins`, and the `sha256` of each
/// plugin slot in the config (it binds the slot, not only the first load).
fn pins(config: &Config) -> std::collections::HashMap<SlotId, String> {
    let p = &config.plugins;
    let mut pins: std::collections::HashMap<SlotId, String> = config
        .admin
        .pins
        .iter()
        .filter_map(|(k, v)| Some((SlotId::parse(k).ok()?, v.to_ascii_lowercase())))
        .collect();
    let configured = p
        .router
        .iter()
        .map(|s| (SlotId::Router, s))
        .chain(
            p.compressor
                .iter()
                .enumerate()
                .map(|(i, s)| (SlotId::Compressor(i), s)),
        )
        .chain(p.cache_policy.iter().map(|s| (SlotId::CachePolicy, s)))
        .chain(p.budget_rule.iter().map(|s| (SlotId::BudgetRule, s)));
    for (slot, s) in configured {
        if let Some(d) = &s.sha256 {
            pins.entry(slot).or_insert_with(|| d.to_ascii_lowercase());
        }
    }
    pins
}

/// Attaches a freshly loaded plugin to the gateway's metrics.
pub fn attach_metrics<K: Kind>(plugin: &crate::plugins::Plugin<K>, metrics: &Metrics) {
    let _ = plugin.stats().call_seconds.set(
        metrics
            .plugin_seconds
            .with_label_values(&[K::KIND.world(), plugin.name()]),
    );
}

pub(crate) async fn load_slot<K: Kind>(
    rt: &Arc<Runtime>,
    cfg: &crate::config::PluginSlotConfig,
    metrics: &Metrics,
) -> Result<Slot<K>, LoadError> {
    let plugin = rt.load::<K>(cfg).await?;
    attach_metrics(&plugin, metrics);
    Ok(Slot {
        plugin: Arc::new(plugin),
        fail_mode: cfg.on_error,
    })
}

/// Adds a plugin's decision to the request's ledger row.
fn decided<K: Kind>(rec: &mut Row, slot: &Slot<K>, decision: String) {
    rec.decisions.push(Decision {
        kind: K::KIND.world(),
        plugin: slot.plugin.shared_name(),
        digest: slot.plugin.shared_digest(),
        decision,
    });
}

/// Applies a slot's failure mode to a plugin result: the decision, nothing
/// (fail-open: go on without the plugin), or an error (fail-closed). A
/// failure is recorded in the request's ledger row either way.
fn contain<K: Kind, T>(
    slot: &Slot<K>,
    result: Result<T, PluginError>,
    rec: &mut Row,
) -> Result<Option<T>, ApiError> {
    if let Err(e) = &result {
        let mode = match slot.fail_mode {
            FailMode::Open => "skipped",
            FailMode::Closed => "request rejected",
        };
        decided(rec, slot, format!("failed ({}), {mode}: {e}", e.reason()));
    }
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) => match slot.fail_mode {
            FailMode::Open => {
                tracing::warn!(kind = %K::KIND, plugin = slot.plugin.name(), reason = e.reason(), "plugin failed, skipped (fail-open): {e}");
                Ok(None)
            }
            FailMode::Closed => {
                tracing::warn!(kind = %K::KIND, plugin = slot.plugin.name(), reason = e.reason(), "plugin failed, request rejected (fail-closed): {e}");
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "policy_error",
                    "policy_failed",
                    format!(
                        "the {} policy failed and is configured fail-closed: {e}",
                        K::KIND
                    ),
                ))
            }
        },
    }
}

fn slot_invalid<K: Kind>(slot: &Slot<K>, message: String) -> PluginError {
    let e = PluginError::Invalid {
        plugin: slot.plugin.name().to_string(),
        message,
    };
    slot.plugin.stats().record_failure(&e);
    e
}

fn no_upstream() -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "api_error",
        "no_upstream",
        "no model of the route is served",
    )
}

fn model_not_found(model: &str, providers: &Providers) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "model_not_found",
        format!(
            "The model `{model}` is not served by this gateway (served: {})",
            providers.model_names().join(", ")
        ),
    )
    .param("model")
}

/// Maps an upstream failure to the client's status: the upstream's own 4xx
/// are passed on, a rate limit stays 429, other failures are 502 or 504.
fn upstream_error(e: &ProviderError) -> ApiError {
    match e {
        ProviderError::Status {
            status, message, ..
        } => {
            let msg = format!("upstream: {message}");
            match *status {
                429 => ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "upstream_rate_limited",
                    msg,
                ),
                s @ 400..=499 => ApiError::new(
                    StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST),
                    "invalid_request_error",
                    "upstream_rejected",
                    msg,
                ),
                _ => ApiError::new(StatusCode::BAD_GATEWAY, "api_error", "upstream_error", msg),
            }
        }
        ProviderError::Timeout(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "api_error",
            "upstream_timeout",
            e.to_string(),
        ),
        ProviderError::Connect(_) | ProviderError::Protocol(_) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "api_error",
            "upstream_unreachable",
            e.to_string(),
        ),
    }
}

/// What a stored answer can be invalidated by (see [`cache::EntryLabels`]).
fn entry_labels(
    id: &Identity,
    scope: crate::plugins::types::CacheScope,
    model: &str,
    prompt_version: &str,
) -> cache::EntryLabels {
    // Built on every cached answer: `concat` sizes each tag once.
    let mut tags = Vec::with_capacity(4 + id.tags.len());
    tags.push(["tenant:", &id.tenant].concat());
    tags.push(["feature:", &id.feature].concat());
    tags.push(["model:", model].concat());
    if !prompt_version.is_empty() {
        tags.push(["prompt:", prompt_version].concat());
    }
    tags.extend(id.tags.iter().map(|(k, v)| [k.as_str(), ":", v].concat()));
    cache::EntryLabels {
        tenant: id.tenant.clone(),
        user: (scope == crate::plugins::types::CacheScope::TenantUser).then(|| id.user.clone()),
        tags,
    }
}

/// A time-ordered id, so ids sort by arrival in logs and the ledger.
pub fn new_request_id() -> String {
    format!("req_{}", uuid::Uuid::now_v7().simple())
}

pub fn format_cost(cost: Option<f64>) -> String {
    match cost {
        Some(c) => format!("{c:.9}"),
        None => "unpriced".to_string(),
    }
}

fn channel_of(events: Vec<Bytes>) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(events.len().max(1));
    for e in events {
        // Capacity equals the number of events, so this never fails.
        let _ = tx.try_send(e);
    }
    rx
}
