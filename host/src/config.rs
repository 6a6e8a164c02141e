//! The gateway's configuration: one TOML file, every key optional.
//! `examples/quickstart.toml` documents each key. Relative paths are resolved
//! against the directory of the config file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::pricing::{Catalog, ModelPrice, PricingError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: `{key}`: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
    #[error("config file {path}: {source}")]
    Pricing { path: String, source: PricingError },
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub identity: IdentityConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub models: BTreeMap<String, ModelRoute>,
    pub pricing: PricingConfig,
    pub runtime: RuntimeConfig,
    pub plugins: PluginsConfig,
    pub cache: CacheConfig,
    pub ledger: LedgerConfig,
    pub admin: AdminConfig,
    pub tasks: TasksConfig,
    pub embeddings: EmbeddingsConfig,
    /// Hard spend limits (`[[budgets]]`), enforced with reservations.
    pub budgets: Vec<crate::budget::BudgetConfig>,
    /// Budget alerts at 50/80/100% (webhook and log).
    pub alerts: crate::alerts::AlertsConfig,
    /// Retries, circuit breakers and the last resort of a failed route.
    pub resilience: crate::pipeline::resilience::ResilienceConfig,
    /// Deferrable requests through provider batch APIs.
    pub batch: crate::pipeline::deferred::BatchConfig,
    /// Where the file was read from (for messages); not a key.
    #[serde(skip)]
    pub origin: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    /// How long a shutdown waits for requests in flight.
    pub drain_timeout_ms: u64,
    /// Apply edits of the config file without a restart (SIGHUP and the
    /// admin API's `POST /v1/config/reload` work either way).
    pub watch_config: bool,
    /// Chat requests in flight at most; past it new ones are refused at
    /// once with 503 `overloaded` (0: no bound). See [`crate::in_flight`].
    pub max_in_flight: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 10 * 1024 * 1024,
            drain_timeout_ms: 30_000,
            watch_config: true,
            max_in_flight: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    pub default_tenant: String,
    pub default_user: String,
    pub default_feature: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            default_tenant: "default".into(),
            default_user: "anonymous".into(),
            default_feature: "default".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderConfig {
    /// The built-in deterministic simulator.
    Sim(SimConfig),
    /// Any OpenAI-compatible `/chat/completions` API.
    Openai(OpenAiConfig),
    /// Anthropic's Messages API; clients still speak the OpenAI format.
    Anthropic(AnthropicConfig),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnthropicConfig {
    pub base_url: String,
    /// Environment variable holding the API key; empty sends no key.
    pub api_key_env: Option<String>,
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Idle connections kept open to this upstream for reuse; those beyond
    /// it are closed when a call ends. A burst opens as many connections
    /// as calls in flight, and each holds buffers until it is closed.
    pub max_idle_connections: usize,
    /// Mark the stable prefix (tool schemas, system prompt) with
    /// `cache_control` breakpoints, so repeats of it are read from
    /// Anthropic's prompt cache at a tenth of the input price (the first
    /// request writes it at 1.25x).
    pub prompt_caching: bool,
    /// Serve from the built-in simulator when the key variable is unset.
    pub sim_when_no_key: bool,
    /// Simulator settings used when `sim_when_no_key` applies.
    pub sim: SimConfig,
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.anthropic.com/v1".into(),
            api_key_env: Some("ANTHROPIC_API_KEY".into()),
            timeout_ms: 120_000,
            connect_timeout_ms: 5_000,
            max_idle_connections: 256,
            prompt_caching: true,
            sim_when_no_key: false,
            sim: SimConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Time to the first token.
    pub latency_ms: u64,
    /// Time between streamed tokens.
    pub ms_per_token: u64,
    /// Completion length when the request has no `x-tollgate-sim-output-tokens` header.
    pub default_output_tokens: u32,
    /// A cached prompt prefix idle longer than this (gateway clock) is evicted,
    /// as providers do after 5-10 minutes without use.
    pub prompt_cache_ttl_ms: u64,
    /// Fraction of calls failing with HTTP 500.
    pub error_rate: f64,
    /// Fraction of calls failing with HTTP 429 and `Retry-After: retry_after_s`.
    pub rate_limit_rate: f64,
    pub retry_after_s: u64,
    /// Fraction of calls answered `slow_ms` late.
    pub slow_rate: f64,
    pub slow_ms: u64,
    /// Fraction of calls whose connection drops (a stream halfway through).
    pub drop_rate: f64,
    /// A batch's answers arrive this long after it was sent.
    pub batch_latency_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            rate_limit_rate: 0.0,
            retry_after_s: 1,
            slow_rate: 0.0,
            slow_ms: 0,
            drop_rate: 0.0,
            batch_latency_ms: 200,
            latency_ms: 0,
            ms_per_token: 0,
            default_output_tokens: 16,
            prompt_cache_ttl_ms: 600_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    pub base_url: String,
    /// Environment variable holding the API key; empty sends no key.
    pub api_key_env: Option<String>,
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Idle connections kept open to this upstream for reuse; those beyond
    /// it are closed when a call ends. A burst opens as many connections
    /// as calls in flight, and each holds buffers until it is closed.
    pub max_idle_connections: usize,
    /// Serve from the built-in simulator when the key variable is unset
    /// (the quickstart's behaviour) instead of failing at start.
    pub sim_when_no_key: bool,
    /// Pass `x-tollgate-sim-*` headers upstream (for a `tollgate sim` upstream).
    pub forward_sim_headers: bool,
    /// Simulator settings used when `sim_when_no_key` applies.
    pub sim: SimConfig,
    /// Send deferred requests through the Batch API (`/files` + `/batches`);
    /// false: one by one at full price (servers without it).
    pub batch_api: bool,
    /// How often a running batch is polled.
    pub batch_poll_ms: u64,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            api_key_env: Some("OPENAI_API_KEY".into()),
            timeout_ms: 120_000,
            connect_timeout_ms: 5_000,
            max_idle_connections: 256,
            sim_when_no_key: false,
            forward_sim_headers: false,
            sim: SimConfig::default(),
            batch_api: true,
            batch_poll_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelRoute {
    pub provider: String,
    /// The name the upstream knows the model by, when it differs.
    #[serde(default)]
    pub upstream_model: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// A catalog file replacing the built-in one.
    pub catalog: Option<PathBuf>,
    /// Models added to or overriding the catalog.
    pub models: BTreeMap<String, ModelPrice>,
}

/// The native embedding model offered to plugins granted
/// `capabilities.embed`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingsConfig {
    /// Directory holding all-MiniLM-L6-v2's `config.json`, `tokenizer.json`
    /// and `model.safetensors` (`make model` installs them in
    /// `target/models/all-MiniLM-L6-v2`). Unset: no embeddings. Set but
    /// unreadable: the gateway starts, logs why, and `embed` calls fail
    /// with that reason.
    pub model_dir: Option<PathBuf>,
    /// Embeddings remembered by text, so a text seen again costs no forward pass.
    pub memo_entries: u64,
}

impl Default for EmbeddingsConfig {
    fn default() -> Self {
        Self {
            model_dir: None,
            memo_entries: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// How often the clock of plugin deadlines ticks while a call may be
    /// running: a call past its deadline is stopped within a tick of it.
    pub epoch_tick_ms: u64,
    /// The largest memory cap any plugin may be given; sizes the instance pool.
    pub max_memory_mib: u64,
    /// Plugin instances that may exist at once across all plugins.
    pub max_instances: u32,
    /// Warm instances kept per plugin.
    pub idle_instances: usize,
    /// Compiled plugins are kept here (by digest and engine settings), so a
    /// restart or a swap back skips compilation. Only the gateway may write
    /// to it: a compiled artifact is machine code the gateway will run.
    pub cache_dir: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            epoch_tick_ms: 2,
            max_memory_mib: 256,
            max_instances: 256,
            idle_instances: 8,
            cache_dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    pub router: Option<PluginSlotConfig>,
    /// One compressor, or a list applied in order.
    #[serde(deserialize_with = "one_or_many")]
    pub compressor: Vec<PluginSlotConfig>,
    pub cache_policy: Option<PluginSlotConfig>,
    pub budget_rule: Option<PluginSlotConfig>,
}

fn one_or_many<'de, D>(d: D) -> Result<Vec<PluginSlotConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    // Dispatch on the shape by hand: an untagged enum would hide which key was wrong.
    let value = toml::Value::deserialize(d)?;
    match value {
        toml::Value::Array(_) => {
            Vec::<PluginSlotConfig>::deserialize(value).map_err(serde::de::Error::custom)
        }
        other => PluginSlotConfig::deserialize(other)
            .map(|one| vec![one])
            .map_err(serde::de::Error::custom),
    }
}

/// What happens to a request when its plugin fails (trap, timeout, memory,
/// invalid decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Go on without the plugin's decision.
    #[default]
    Open,
    /// Reject the request with an error naming the plugin.
    Closed,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSlotConfig {
    pub path: PathBuf,
    /// Name in logs and metrics; the file stem by default.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub on_error: FailMode,
    /// Wall-clock deadline of one call. Unset: 5 ms for compiled languages
    /// (Rust, C), 25 ms for Python and JavaScript (see `plugins::language`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Deadline of `init` (instantiation and configuration). Unset: 1 s,
    /// 5 s for Python and JavaScript.
    #[serde(default)]
    pub init_timeout_ms: Option<u64>,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// WebAssembly instructions (roughly) one call may run; 0 turns fuel
    /// off. Unset: 50 million, 500 million for Python and JavaScript.
    #[serde(default)]
    pub fuel: Option<u64>,
    /// Reuse warm instances between requests (fast); false gives every call
    /// a fresh instance, so nothing a plugin keeps in memory survives a call.
    #[serde(default = "default_true")]
    pub reuse_instances: bool,
    /// Calls of this plugin running at once (each on its own instance); a
    /// call waits up to its deadline for a free one, then fails as `busy`.
    /// Unset: only the runtime-wide `runtime.max_instances` bounds it.
    #[serde(default)]
    pub max_instances: Option<u32>,
    /// What the plugin may touch beyond computing; nothing by default.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Required sha256 of the file (hex); a file that does not match is refused.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Passed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: Option<toml::Value>,
}

/// Capabilities a slot grants its plugin. A plugin whose component imports
/// a capability that is not granted is refused at load, naming the import.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// A directory the plugin may read (never write) as `/data`: model
    /// weights, word lists. Without it, a plugin importing the WASI
    /// filesystem is refused.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// The `tollgate:policy/spend` import: what the request's tenant,
    /// feature and user have spent today.
    #[serde(default)]
    pub spend: bool,
    /// The `tollgate:policy/embed` import: sentence embeddings from the
    /// gateway's model (`[embeddings]`).
    #[serde(default)]
    pub embed: bool,
}

fn default_memory_mib() -> u64 {
    64
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Upper bound of the memory cached answers hold: their bytes plus
    /// ~600 bytes of bookkeeping per entry.
    pub max_bytes: u64,
    /// Upper bound of any TTL a cache policy asks for.
    pub max_ttl_seconds: u32,
    /// Questions indexed for semantic matching per scope and context; at
    /// the bound the oldest makes room.
    pub semantic_max_entries_per_scope: usize,
    /// From this many entries a scope is searched through an HNSW graph
    /// (approximate, ~constant time) instead of a scan (exact, ~0.11 ms per
    /// 1,000 entries).
    pub semantic_ann_from: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            max_ttl_seconds: 86_400,
            semantic_max_entries_per_scope: 200_000,
            semantic_ann_from: 20_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Record one row per request. Turning it off loses the cost record.
    pub enabled: bool,
    /// SQLite file (WAL mode); created with its directory if missing.
    pub path: PathBuf,
    /// Longest time a row waits in memory before it is committed.
    pub flush_interval_ms: u64,
    /// Rows per transaction at most.
    pub batch_rows: usize,
    /// Rows waiting for the writer beyond which new requests wait for room
    /// (the gateway slows to what the ledger can record rather than buffer
    /// without bound or drop rows).
    pub max_pending_rows: usize,
    /// Keep each request body (as the client sent it) in the ledger, so
    /// `tollgate export-trace` can turn recorded traffic into a replayable
    /// trace. Off by default: prompts can hold personal data.
    pub record_bodies: bool,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: PathBuf::from("tollgate-ledger.sqlite"),
            flush_interval_ms: 100,
            batch_rows: 1000,
            max_pending_rows: 20_000,
            record_bodies: false,
        }
    }
}

/// Runaway-task stops, checked natively before any plugin runs. A task is
/// the `x-tollgate-task` header within a tenant.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Calls one task may make; 0 = no limit.
    pub max_calls: u32,
    /// A task idle this long (gateway clock) starts counting again.
    pub idle_reset_seconds: u64,
    /// Refuse a request whose history holds the same tool call (same
    /// function, same arguments) this many times: an agent in a loop.
    /// 0 = off.
    pub max_identical_tool_calls: u32,
    /// Upstream retries one task may use in total (a flaky provider must
    /// not multiply an agent's calls); 0 = no limit.
    pub max_retries: u32,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            max_retries: 20,
            max_calls: 0,
            idle_reset_seconds: 3600,
            max_identical_tool_calls: 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin API's own address; keep it off the application network.
    pub listen: String,
    /// Environment variable holding the bearer token.
    pub token_env: String,
    /// A file holding the bearer token (wins over the variable).
    pub token_file: Option<PathBuf>,
    /// The only directory the admin API loads plugin files from (by a path
    /// relative to it); unset = plugins can only be uploaded.
    pub plugin_dir: Option<PathBuf>,
    /// Required sha256 per slot (`router`, `compressor[0]`, ...): any plugin
    /// whose bytes do not match is refused, whoever loads it.
    pub pins: BTreeMap<String, String>,
    /// Watch `plugin_dir`: a `<slot>.wasm` (with its settings in an optional
    /// `<slot>.toml`) that appears or changes is validated and activated;
    /// a bad one is refused and the active version keeps serving.
    pub watch: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8081".into(),
            token_env: "TOLLGATE_ADMIN_TOKEN".into(),
            token_file: None,
            plugin_dir: None,
            pins: BTreeMap::new(),
            watch: false,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// Parses and validates config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        cfg.origin = origin.to_string();
        cfg.resolve_paths(base);
        cfg.apply_defaults();
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(c) = &mut self.pricing.catalog {
            fix(c);
        }
        fix(&mut self.ledger.path);
        if let Some(t) = &mut self.admin.token_file {
            fix(t);
        }
        if let Some(d) = &mut self.admin.plugin_dir {
            fix(d);
        }
        if let Some(d) = &mut self.runtime.cache_dir {
            fix(d);
        }
        if let Some(d) = &mut self.embeddings.model_dir {
            fix(d);
        }
        let slots = self
            .plugins
            .router
            .iter_mut()
            .chain(self.plugins.compressor.iter_mut())
            .chain(self.plugins.cache_policy.iter_mut())
            .chain(self.plugins.budget_rule.iter_mut());
        for slot in slots {
            fix(&mut slot.path);
            if let Some(d) = &mut slot.capabilities.data_dir {
                fix(d);
            }
        }
    }

    /// An empty file gets the simulator and its three model tiers.
    fn apply_defaults(&mut self) {
        if self.providers.is_empty() {
            self.providers
                .insert("sim".into(), ProviderConfig::Sim(SimConfig::default()));
        }
        if self.models.is_empty() && self.providers.len() == 1 {
            let provider = self.providers.keys().next().cloned().unwrap_or_default();
            for m in ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"] {
                self.models.insert(
                    m.into(),
                    ModelRoute {
                        provider: provider.clone(),
                        upstream_model: None,
                    },
                );
            }
        }
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        crate::budget::check_budgets(&self.budgets)
            .map_err(|(i, m)| self.invalid(format!("budgets[{i}]"), m))?;
        if self.admin.watch && self.admin.plugin_dir.is_none() {
            return Err(self.invalid(
                "admin.watch",
                "needs admin.plugin_dir, the directory to watch",
            ));
        }
        for (slot, digest) in &self.admin.pins {
            crate::plugins::SlotId::parse(slot)
                .map_err(|m| self.invalid(format!("admin.pins.{slot}"), m))?;
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(self.invalid(
                    format!("admin.pins.{slot}"),
                    "expected a sha256 digest (64 hex characters)",
                ));
            }
        }
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(self.invalid(
                "server.listen",
                format!(
                    "expected an address like 127.0.0.1:8080, got {:?}",
                    self.server.listen
                ),
            ));
        }
        if self.admin.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(self.invalid(
                "admin.listen",
                format!(
                    "expected an address like 127.0.0.1:8081, got {:?}",
                    self.admin.listen
                ),
            ));
        }
        if self.server.max_body_bytes == 0 {
            return Err(self.invalid("server.max_body_bytes", "must be at least 1"));
        }
        if self.models.is_empty() {
            return Err(self.invalid(
                "models",
                "with several providers, list the models each one serves",
            ));
        }
        let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
        for (name, route) in &self.models {
            if !self.providers.contains_key(&route.provider) {
                return Err(self.invalid(
                    format!("models.\"{name}\".provider"),
                    format!(
                        "unknown provider {:?} (configured: {})",
                        route.provider,
                        known.join(", ")
                    ),
                ));
            }
        }
        for (name, p) in &self.providers {
            if let ProviderConfig::Openai(o) = p
                && !(o.base_url.starts_with("http://") || o.base_url.starts_with("https://"))
            {
                return Err(self.invalid(
                    format!("providers.{name}.base_url"),
                    format!("expected an http:// or https:// URL, got {:?}", o.base_url),
                ));
            }
        }
        if self.ledger.flush_interval_ms == 0
            || self.ledger.batch_rows == 0
            || self.ledger.max_pending_rows == 0
        {
            return Err(self.invalid(
                "ledger.flush_interval_ms",
                "flush_interval_ms, batch_rows and max_pending_rows must be at least 1",
            ));
        }
        if self.runtime.epoch_tick_ms == 0 {
            return Err(self.invalid("runtime.epoch_tick_ms", "must be at least 1"));
        }
        let slots = [("plugins.router", self.plugins.router.as_ref())]
            .into_iter()
            .chain(
                self.plugins
                    .compressor
                    .iter()
                    .map(|s| ("plugins.compressor", Some(s))),
            )
            .chain([
                ("plugins.cache_policy", self.plugins.cache_policy.as_ref()),
                ("plugins.budget_rule", self.plugins.budget_rule.as_ref()),
            ]);
        for (key, slot) in slots {
            let Some(slot) = slot else { continue };
            for (name, ms) in [
                ("timeout_ms", slot.timeout_ms),
                ("init_timeout_ms", slot.init_timeout_ms),
            ] {
                if ms == Some(0) {
                    return Err(self.invalid(format!("{key}.{name}"), "must be at least 1"));
                }
            }
            if slot.memory_mib == 0 || slot.memory_mib > self.runtime.max_memory_mib {
                return Err(self.invalid(
                    format!("{key}.memory_mib"),
                    format!(
                        "must be between 1 and runtime.max_memory_mib ({})",
                        self.runtime.max_memory_mib
                    ),
                ));
            }
            if let Some(d) = &slot.sha256
                && !(d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(self.invalid(format!("{key}.sha256"), "expected 64 hex characters"));
            }
            if let Some(c) = &slot.config
                && !c.is_table()
            {
                return Err(self.invalid(format!("{key}.config"), "expected a table"));
            }
        }
        Ok(())
    }

    /// The price catalog: built in (or the configured file) plus overrides.
    pub fn catalog(&self) -> Result<Catalog, ConfigError> {
        let wrap = |source| ConfigError::Pricing {
            path: self.origin.clone(),
            source,
        };
        let mut catalog = match &self.pricing.catalog {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Catalog::parse(&text, &path.display().to_string()).map_err(wrap)?
            }
            None => Catalog::builtin().map_err(wrap)?,
        };
        for (name, price) in &self.pricing.models {
            catalog.insert(name.clone(), price.clone()).map_err(wrap)?;
        }
        Ok(catalog)
    }
}

impl PluginSlotConfig {
    /// A slot with every default, for a plugin at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            name: None,
            on_error: FailMode::default(),
            timeout_ms: None,
            init_timeout_ms: None,
            memory_mib: default_memory_mib(),
            fuel: None,
            reuse_instances: true,
            max_instances: None,
            capabilities: Capabilities::default(),
            sha256: None,
            config: None,
        }
    }

    /// The plugin's config as the JSON string its `init` receives.
    pub fn config_json(&self) -> String {
        match &self.config {
            Some(v) => serde_json::to_string(v).unwrap_or_default(),
            None => String::new(),
        }
    }

    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "plugin".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/tollgate"))
    }

    #[test]
    fn empty_file_serves_the_simulator_tiers() {
        let c = parse("").unwrap();
        assert!(matches!(c.providers["sim"], ProviderConfig::Sim(_)));
        assert_eq!(c.models.len(), 3);
        assert_eq!(c.server.listen, "127.0.0.1:8080");
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let e = parse("[server]\nlisten = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.toml") && e.contains("server.listen"),
            "{e}"
        );
        let e = parse("[server]\nlistn = 1\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `listn`"), "{e}");
        let e = parse("[models.m]\nprovider = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("models.\"m\".provider") && e.contains("unknown provider"),
            "{e}"
        );
        let e = parse("[plugins.router]\npath = \"r.wasm\"\nmemory_mib = 100000\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("plugins.router.memory_mib"), "{e}");
    }

    #[test]
    fn plugin_paths_are_relative_to_the_config_file_and_compressors_chain() {
        let c = parse(
            "[plugins.router]\npath = \"r.wasm\"\nconfig = { default = \"gpt-4o\" }\n\
             [[plugins.compressor]]\npath = \"a.wasm\"\n[[plugins.compressor]]\npath = \"/abs/b.wasm\"\n",
        )
        .unwrap();
        let r = c.plugins.router.as_ref().unwrap();
        assert_eq!(r.path, Path::new("/etc/tollgate/r.wasm"));
        assert_eq!(r.config_json(), r#"{"default":"gpt-4o"}"#);
        assert_eq!(c.plugins.compressor.len(), 2);
        assert_eq!(c.plugins.compressor[1].path, Path::new("/abs/b.wasm"));
        let one = parse("[plugins.compressor]\npath = \"a.wasm\"\n").unwrap();
        assert_eq!(one.plugins.compressor.len(), 1);
    }
}
