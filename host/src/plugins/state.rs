//! What one plugin instance's store holds: its (empty) WASI context, its
//! memory limiter and what the host imports need.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::v0_1_0::tollgate::policy as v0_1_0;
use super::bindings::v0_2_0::tollgate::policy::{embed, host, spend, types};
use super::stderr::StderrTail;
use crate::clock::Clock;

/// Longest log line a plugin may write; longer ones are cut.
const MAX_LOG_BYTES: usize = 2048;
/// Log lines one call may write; the rest are dropped and counted, so a
/// plugin cannot flood the gateway's log.
pub const MAX_LOG_LINES_PER_CALL: u32 = 16;

/// Embeddings one plugin call may ask for; more would let a plugin turn one
/// request into unbounded model work.
pub const MAX_EMBEDS_PER_CALL: u32 = 8;

/// What the `embed` import answers with: the gateway's model, or why there
/// is none (embeddings not configured, model files missing).
pub type EmbedSource = Result<Arc<crate::embed::Embedder>, Arc<str>>;

/// Where the `spend` import reads from: the gateway's spend counters.
pub trait SpendSource: Send + Sync {
    /// USD spent today by (tenant, feature, user) of a request.
    fn today(&self, tenant: &str, feature: &str, user: &str, now_ms: u64) -> [f64; 3];
}

impl SpendSource for crate::budget::SpendCounters {
    fn today(&self, tenant: &str, feature: &str, user: &str, now_ms: u64) -> [f64; 3] {
        let s = self.snapshot(&crate::budget::Scopes {
            day: crate::clock::utc_day(now_ms),
            tenant: tenant.to_string(),
            feature: feature.to_string(),
            user: user.to_string(),
        });
        [s.tenant, s.feature, s.user]
    }
}

/// The request a call decides on, for host imports that answer about it.
#[derive(Debug, Clone, Default)]
pub struct CallScope {
    pub tenant: String,
    pub feature: String,
    pub user: String,
}

pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: MemoryLimiter,
    pub(super) stderr: StderrTail,
    /// Log lines written and dropped during the current call.
    pub(super) logged: u32,
    pub(super) logs_dropped: u32,
    /// The last error the plugin logged during the current call: a failed
    /// call's error names it (an interpreter's exception, say), since a trap
    /// alone says only where the machine code stopped.
    pub(super) last_error: Option<String>,
    plugin: Arc<str>,
    clock: Arc<dyn Clock>,
    /// Set only for plugins granted `capabilities.spend`.
    pub(super) spend: Option<Arc<dyn SpendSource>>,
    /// The request of the current call.
    pub(super) scope: CallScope,
    /// Set only for plugins granted `capabilities.embed`.
    pub(super) embed: Option<EmbedSource>,
    /// Embeddings asked for during the current call.
    pub(super) embeds: u32,
    /// When the current call's deadline passes; host work stops there too.
    pub(super) deadline: Option<std::time::Instant>,
}

impl StoreState {
    /// No environment, no arguments, no network: a plugin sees clocks,
    /// randomness and empty stdio — and, only when its slot grants one, its
    /// data directory, read-only, as `/data` (opened through cap-std, so no
    /// path can leave it).
    pub fn new(
        plugin: Arc<str>,
        clock: Arc<dyn Clock>,
        memory_bytes: usize,
        data_dir: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let stderr = StderrTail::default();
        let mut b = WasiCtxBuilder::new();
        b.stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        if let Some(dir) = data_dir {
            b.preopened_dir(dir, "/data", wasmtime_wasi::FsPerms::ReadOnly)
                .map_err(|e| format!("data directory {}: {e:#}", dir.display()))?;
        }
        let wasi = b.build();
        Ok(Self {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: memory_bytes,
                denied: false,
                peak_bytes: 0,
            },
            stderr,
            logged: 0,
            logs_dropped: 0,
            last_error: None,
            plugin,
            clock,
            spend: None,
            scope: CallScope::default(),
            embed: None,
            embeds: 0,
            deadline: None,
        })
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and remembers a refused growth, so a trap that
/// follows it is reported as "memory limit" rather than a generic trap.
pub struct MemoryLimiter {
    max_bytes: usize,
    pub(super) denied: bool,
    /// The largest linear memory granted so far (its initial size included).
    pub(super) peak_bytes: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.denied = true;
            return Ok(false);
        }
        self.peak_bytes = self.peak_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl types::Host for StoreState {}

impl spend::Host for StoreState {
    fn today_usd(&mut self, scope: spend::SpendScope) -> f64 {
        // Without the grant the plugin was refused at load; answer nothing anyway.
        let Some(src) = &self.spend else {
            return 0.0;
        };
        let s = &self.scope;
        let [tenant, feature, user] =
            src.today(&s.tenant, &s.feature, &s.user, self.clock.now_ms());
        match scope {
            spend::SpendScope::Tenant => tenant,
            spend::SpendScope::Feature => feature,
            spend::SpendScope::User => user,
        }
    }
}

impl embed::Host for StoreState {
    async fn embed(&mut self, text: String) -> Result<Vec<f32>, String> {
        // Without the grant the plugin was refused at load; answer nothing anyway.
        let model = match &self.embed {
            None => return Err("embeddings are not granted to this plugin".into()),
            Some(Err(why)) => return Err(format!("the gateway has no embedding model: {why}")),
            Some(Ok(m)) => m.clone(),
        };
        if self.embeds >= MAX_EMBEDS_PER_CALL {
            return Err(format!(
                "at most {MAX_EMBEDS_PER_CALL} embeddings per plugin call"
            ));
        }
        self.embeds += 1;
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or(std::time::Duration::from_secs(1));
        if left.is_zero() {
            return Err("the plugin call's deadline has passed".into());
        }
        match model.embed_async(text, left).await {
            Ok(v) => Ok(v.to_vec()),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl host::Host for StoreState {
    fn count_tokens(&mut self, text: String, model: String) -> u32 {
        crate::tokens::count(&text, &model)
    }

    fn hash(&mut self, data: Vec<u8>) -> String {
        crate::tokens::hash_hex(&data)
    }

    fn now_ms(&mut self) -> u64 {
        self.clock.now_ms()
    }

    fn log(&mut self, level: host::Level, message: String) {
        if self.logged >= MAX_LOG_LINES_PER_CALL {
            self.logs_dropped += 1;
            return;
        }
        self.logged += 1;
        let mut msg = message;
        if msg.len() > MAX_LOG_BYTES {
            let mut cut = MAX_LOG_BYTES;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
        }
        let plugin = &*self.plugin;
        match level {
            host::Level::Trace => tracing::trace!(plugin, "{msg}"),
            host::Level::Debug => tracing::debug!(plugin, "{msg}"),
            host::Level::Info => tracing::info!(plugin, "{msg}"),
            host::Level::Warn => tracing::warn!(plugin, "{msg}"),
            host::Level::Error => {
                tracing::error!(plugin, "{msg}");
                self.last_error = Some(msg.chars().take(300).collect());
            }
        }
    }
}

// The 0.1.0 imports are the same functions under the older package name.

impl v0_1_0::types::Host for StoreState {}

impl v0_1_0::spend::Host for StoreState {
    fn today_usd(&mut self, scope: v0_1_0::spend::SpendScope) -> f64 {
        use v0_1_0::spend::SpendScope as Old;
        spend::Host::today_usd(
            self,
            match scope {
                Old::Tenant => spend::SpendScope::Tenant,
                Old::Feature => spend::SpendScope::Feature,
                Old::User => spend::SpendScope::User,
            },
        )
    }
}

impl v0_1_0::embed::Host for StoreState {
    async fn embed(&mut self, text: String) -> Result<Vec<f32>, String> {
        embed::Host::embed(self, text).await
    }
}

impl v0_1_0::host::Host for StoreState {
    fn count_tokens(&mut self, text: String, model: String) -> u32 {
        host::Host::count_tokens(self, text, model)
    }

    fn hash(&mut self, data: Vec<u8>) -> String {
        host::Host::hash(self, data)
    }

    fn now_ms(&mut self) -> u64 {
        host::Host::now_ms(self)
    }

    fn log(&mut self, level: v0_1_0::host::Level, message: String) {
        use v0_1_0::host::Level as Old;
        let level = match level {
            Old::Trace => host::Level::Trace,
            Old::Debug => host::Level::Debug,
            Old::Info => host::Level::Info,
            Old::Warn => host::Level::Warn,
            Old::Error => host::Level::Error,
        };
        host::Host::log(self, level, message);
    }
}
