//! The plugin runtime: every cost decision is a WebAssembly component run
//! here under hard limits.
//!
//! One [`Runtime`] (wasmtime `Engine`, linker, epoch ticker) serves the
//! process. Each plugin is compiled once into an `InstancePre`; warm
//! instances are kept in a small pool so a call costs about a microsecond
//! instead of an instantiation. Every call runs with a wall-clock deadline
//! (epoch interruption), a fuel budget and a memory cap; an instance that
//! fails is thrown away, never reused, so a bad call cannot poison the next.

mod bindings;
mod epoch;
pub mod inspect;
mod kinds;
pub mod language;
pub mod manager;
mod runtime;
mod slots;
mod state;
mod stderr;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use bindings::types;
pub use kinds::{BudgetRuleKind, CachePolicyKind, CompressorKind, Kind, RouterKind};
pub use runtime::{Plugin, Runtime};
pub use slots::{AnySlot, SlotId};
pub use state::EmbedSource;

use crate::config::FailMode;

/// sha256 of plugin bytes, lowercase hex (the digest pins and records use).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginKind {
    Router,
    Compressor,
    CachePolicy,
    BudgetRule,
}

impl PluginKind {
    /// The WIT world a plugin of this kind must implement.
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::Router => "router",
            PluginKind::Compressor => "compressor",
            PluginKind::CachePolicy => "cache-policy",
            PluginKind::BudgetRule => "budget-rule",
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.world())
    }
}

/// Why loading a plugin was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("plugin {path}: sha256 is {actual}, the config requires {expected}")]
    DigestMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("plugin {path} is not a valid WebAssembly component: {message}")]
    Compile { path: String, message: String },
    #[error("plugin {path} imports something the gateway does not offer: {message}")]
    Imports { path: String, message: String },
    #[error("plugin {path} does not implement the `{world}` world: {message}")]
    WrongWorld {
        path: String,
        world: &'static str,
        message: String,
    },
    #[error("plugin {path} imports {import}: {message}")]
    NotGranted {
        path: String,
        import: String,
        message: String,
    },
    #[error("plugin {path} failed to start: {message}")]
    Init { path: String, message: String },
    #[error("plugin runtime: {0}")]
    Engine(String),
}

/// Why one plugin call produced no decision.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {plugin} ran past its {deadline_ms} ms deadline")]
    Timeout { plugin: String, deadline_ms: u64 },
    #[error("plugin {plugin} ran out of fuel ({fuel} units)")]
    OutOfFuel { plugin: String, fuel: u64 },
    #[error("plugin {plugin} exceeded its memory cap of {cap_mib} MiB")]
    Memory { plugin: String, cap_mib: u64 },
    #[error("plugin {plugin} trapped: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin {plugin} returned an invalid decision: {message}")]
    Invalid { plugin: String, message: String },
    #[error("plugin {plugin} could not be instantiated: {message}")]
    Instantiate { plugin: String, message: String },
    #[error("plugin {plugin}: all {max} instances stayed busy for the call's deadline")]
    Busy { plugin: String, max: u32 },
}

impl PluginError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PluginError::Timeout { .. } => "timeout",
            PluginError::OutOfFuel { .. } => "fuel",
            PluginError::Memory { .. } => "memory",
            PluginError::Trap { .. } => "trap",
            PluginError::Invalid { .. } => "invalid",
            PluginError::Instantiate { .. } => "instantiate",
            PluginError::Busy { .. } => "busy",
        }
    }
}

/// Counters of one plugin, read by `/metrics`.
#[derive(Default)]
pub struct PluginStats {
    /// Time of each call, when the gateway's metrics are attached.
    pub call_seconds: std::sync::OnceLock<prometheus::Histogram>,
    pub calls: AtomicU64,
    pub instantiations: AtomicU64,
    /// Log lines dropped by the per-call cap.
    pub logs_dropped: AtomicU64,
    /// Fuel burnt by calls that returned, in total and by the dearest one:
    /// what to base a slot's `fuel` limit on.
    pub fuel_used: AtomicU64,
    pub fuel_max: AtomicU64,
    pub calls_returned: AtomicU64,
    /// The largest linear memory any instance reached, in bytes.
    pub memory_peak: AtomicU64,
    pub timeout: AtomicU64,
    pub fuel: AtomicU64,
    pub memory: AtomicU64,
    pub trap: AtomicU64,
    pub invalid: AtomicU64,
    pub instantiate: AtomicU64,
    pub busy: AtomicU64,
}

impl PluginStats {
    pub fn record_failure(&self, e: &PluginError) {
        let c = match e {
            PluginError::Timeout { .. } => &self.timeout,
            PluginError::OutOfFuel { .. } => &self.fuel,
            PluginError::Memory { .. } => &self.memory,
            PluginError::Trap { .. } => &self.trap,
            PluginError::Invalid { .. } => &self.invalid,
            PluginError::Instantiate { .. } => &self.instantiate,
            PluginError::Busy { .. } => &self.busy,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (reason, count) pairs of failures.
    pub fn failures(&self) -> [(&'static str, u64); 7] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("timeout", g(&self.timeout)),
            ("fuel", g(&self.fuel)),
            ("memory", g(&self.memory)),
            ("trap", g(&self.trap)),
            ("invalid", g(&self.invalid)),
            ("instantiate", g(&self.instantiate)),
            ("busy", g(&self.busy)),
        ]
    }
}

/// A loaded plugin in a slot of the pipeline, with the slot's failure mode.
pub struct Slot<K: Kind> {
    pub plugin: Arc<Plugin<K>>,
    pub fail_mode: FailMode,
}

impl<K: Kind> Clone for Slot<K> {
    fn clone(&self) -> Self {
        Self {
            plugin: self.plugin.clone(),
            fail_mode: self.fail_mode,
        }
    }
}

/// The plugins active for requests. Swapped as a whole (behind an
/// `ArcSwap`), so a request sees one consistent set from start to end.
#[derive(Default, Clone)]
pub struct PluginSet {
    pub router: Option<Slot<RouterKind>>,
    pub compressors: Vec<Slot<CompressorKind>>,
    pub cache_policy: Option<Slot<CachePolicyKind>>,
    pub budget_rule: Option<Slot<BudgetRuleKind>>,
    /// Shadows see the same requests as the active plugin of their slot;
    /// their decisions are recorded and compared, never applied.
    pub shadow: Shadows,
}

#[derive(Default, Clone)]
pub struct Shadows {
    pub router: Option<Slot<RouterKind>>,
    pub cache_policy: Option<Slot<CachePolicyKind>>,
    pub budget_rule: Option<Slot<BudgetRuleKind>>,
}

/// A reference to any plugin, for listing and metrics.
pub struct PluginSummary<'a> {
    pub kind: PluginKind,
    pub name: &'a str,
    pub digest: &'a str,
    pub stats: &'a PluginStats,
    pub fail_mode: FailMode,
}

impl PluginSet {
    /// Every slot and its plugin, for the admin API.
    pub fn describe(&self) -> serde_json::Value {
        fn one<K: Kind>(slot: &str, s: &Slot<K>) -> serde_json::Value {
            let mut v = s.plugin.describe();
            if let Some(o) = v.as_object_mut() {
                o.insert("slot".into(), serde_json::json!(slot));
                o.insert(
                    "on_error".into(),
                    serde_json::json!(match s.fail_mode {
                        FailMode::Open => "open",
                        FailMode::Closed => "closed",
                    }),
                );
            }
            v
        }
        let mut out = Vec::new();
        out.extend(self.router.iter().map(|s| one("router", s)));
        out.extend(
            self.compressors
                .iter()
                .enumerate()
                .map(|(i, s)| one(&format!("compressor[{i}]"), s)),
        );
        out.extend(self.cache_policy.iter().map(|s| one("cache_policy", s)));
        out.extend(self.budget_rule.iter().map(|s| one("budget_rule", s)));
        let shadows: Vec<serde_json::Value> = self
            .shadow
            .router
            .iter()
            .map(|s| one("router", s))
            .chain(
                self.shadow
                    .cache_policy
                    .iter()
                    .map(|s| one("cache_policy", s)),
            )
            .chain(
                self.shadow
                    .budget_rule
                    .iter()
                    .map(|s| one("budget_rule", s)),
            )
            .collect();
        serde_json::json!({ "plugins": out, "shadows": shadows })
    }

    pub fn summaries(&self) -> Vec<PluginSummary<'_>> {
        fn one<K: Kind>(s: &Slot<K>) -> PluginSummary<'_> {
            PluginSummary {
                kind: K::KIND,
                name: s.plugin.name(),
                digest: s.plugin.digest(),
                stats: s.plugin.stats(),
                fail_mode: s.fail_mode,
            }
        }
        let mut out = Vec::new();
        out.extend(self.router.iter().map(one));
        out.extend(self.compressors.iter().map(one));
        out.extend(self.cache_policy.iter().map(one));
        out.extend(self.budget_rule.iter().map(one));
        out
    }
}
