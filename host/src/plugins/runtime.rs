use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use super::bindings::{v0_1_0, v0_2_0};
use super::kinds::Kind;
use super::state::StoreState;
use super::{LoadError, PluginError, PluginStats};
use crate::clock::Clock;
use crate::config::{PluginSlotConfig, RuntimeConfig};

/// The process-wide wasmtime engine, linker and epoch ticker.
pub struct Runtime {
    pub(super) engine: Engine,
    pub(super) linker: Linker<StoreState>,
    tick_ms: u64,
    idle_instances: usize,
    clock: Arc<dyn Clock>,
    ticker: super::epoch::Ticker,
    /// Where compiled artifacts are kept, and the engine-settings part of their key.
    cache: Option<(std::path::PathBuf, u64)>,
    /// What the `spend` import reads, once the gateway has its counters.
    spend: std::sync::OnceLock<Arc<dyn super::state::SpendSource>>,
    /// What the `embed` import answers with, once the gateway has looked
    /// for its model.
    embed: std::sync::OnceLock<super::state::EmbedSource>,
}

impl Runtime {
    pub fn new(cfg: &RuntimeConfig, clock: Arc<dyn Clock>) -> Result<Arc<Self>, LoadError> {
        let engine_err = |e: wasmtime::Error| LoadError::Engine(format!("{e:#}"));
        let max_memory = usize::try_from(cfg.max_memory_mib.saturating_mul(1 << 20))
            .map_err(|_| LoadError::Engine("runtime.max_memory_mib too large".into()))?;

        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(cfg.max_instances)
            .total_core_instances(cfg.max_instances.saturating_mul(8))
            .total_memories(cfg.max_instances.saturating_mul(2))
            .total_tables(cfg.max_instances.saturating_mul(4))
            .max_memories_per_module(2)
            .max_tables_per_module(4)
            .max_memory_size(max_memory)
            .max_component_instance_size(4 << 20)
            .max_core_instance_size(4 << 20)
            .total_stacks(cfg.max_instances)
            // Every call runs on a pooled fiber stack; keeping its hot top
            // resident avoids page faults on each call.
            .async_stack_keep_resident(256 << 10);

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(engine_err)?;

        let mut linker = Linker::<StoreState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_err)?;
        v0_2_0::Imports::add_to_linker::<_, HasSelf<StoreState>>(&mut linker, |s| s)
            .map_err(engine_err)?;
        v0_1_0::Imports::add_to_linker::<_, HasSelf<StoreState>>(&mut linker, |s| s)
            .map_err(engine_err)?;

        let ticker =
            super::epoch::Ticker::start(&engine, Duration::from_millis(cfg.epoch_tick_ms.max(1)))
                .map_err(|e| LoadError::Engine(format!("cannot start epoch thread: {e}")))?;

        let cache = cfg.cache_dir.clone().map(|dir| {
            use std::hash::{Hash, Hasher};
            // Artifacts only load into an engine built with the same
            // settings and wasmtime version; the key says which.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            env!("CARGO_PKG_VERSION").hash(&mut h);
            (dir, h.finish())
        });
        Ok(Arc::new(Self {
            spend: std::sync::OnceLock::new(),
            embed: std::sync::OnceLock::new(),
            cache,
            engine,
            linker,
            tick_ms: cfg.epoch_tick_ms.max(1),
            idle_instances: cfg.idle_instances,
            clock,
            ticker,
        }))
    }

    /// Connects the `spend` import (for plugins granted it) to the gateway's counters.
    pub fn set_spend_source(&self, src: Arc<dyn super::state::SpendSource>) {
        let _ = self.spend.set(src);
    }

    /// The embedding model, when the gateway has one.
    pub fn embedder(&self) -> Option<&Arc<crate::embed::Embedder>> {
        self.embed.get().and_then(|r| r.as_ref().ok())
    }

    /// Connects the `embed` import (for plugins granted it) to the gateway's
    /// embedding model, or to the reason it has none.
    pub fn set_embed_source(&self, src: super::state::EmbedSource) {
        let _ = self.embed.set(src);
    }

    /// Loads, checks and initialises a plugin for one slot: reads the file,
    /// checks a pinned digest, compiles it, checks it implements the slot's
    /// world with only the imports we offer, and runs its `init` with its
    /// config once. Nothing is active until all of that passed.
    pub async fn load<K: Kind>(
        self: &Arc<Self>,
        slot: &PluginSlotConfig,
    ) -> Result<Plugin<K>, LoadError> {
        let path = slot.path.display().to_string();
        let bytes = std::fs::read(&slot.path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        self.load_bytes::<K>(&bytes, &path, slot).await
    }

    pub async fn load_bytes<K: Kind>(
        self: &Arc<Self>,
        bytes: &[u8],
        path: &str,
        slot: &PluginSlotConfig,
    ) -> Result<Plugin<K>, LoadError> {
        let digest = super::sha256_hex(bytes);
        if let Some(expected) = &slot.sha256
            && !expected.eq_ignore_ascii_case(&digest)
        {
            return Err(LoadError::DigestMismatch {
                path: path.into(),
                expected: expected.clone(),
                actual: digest,
            });
        }
        let started = std::time::Instant::now();
        let (component, cached) = self
            .compile(bytes, &digest)
            .map_err(|e| LoadError::Compile {
                path: path.into(),
                message: format!("{e:#}"),
            })?;
        let compile_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(plugin = path, sha256 = %digest, from_cache = cached, ms = compile_ms, "plugin compiled");
        // Deny by default: an import the slot does not grant refuses the
        // plugin here, by name, before any of its code runs.
        for (name, _) in component.component_type().imports(&self.engine) {
            if let Some(message) = super::inspect::refusal(name, &slot.capabilities) {
                return Err(LoadError::NotGranted {
                    path: path.into(),
                    import: name.to_string(),
                    message,
                });
            }
        }
        let instance_pre =
            self.linker
                .instantiate_pre(&component)
                .map_err(|e| LoadError::Imports {
                    path: path.into(),
                    message: format!("{e:#}"),
                })?;
        let pre = K::pre(instance_pre).map_err(|e| LoadError::WrongWorld {
            path: path.into(),
            world: K::KIND.world(),
            message: format!("{e:#}"),
        })?;
        let language = super::language::detect(bytes);
        let limits = Limits {
            deadline_ms: slot
                .timeout_ms
                .unwrap_or_else(|| language.default_timeout_ms()),
            init_deadline_ms: slot
                .init_timeout_ms
                .unwrap_or_else(|| language.default_init_timeout_ms()),
            memory_bytes: usize::try_from(slot.memory_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            memory_mib: slot.memory_mib,
            fuel: slot.fuel.unwrap_or_else(|| language.default_fuel()),
        };
        let plugin = Plugin {
            language,
            name: Arc::from(slot.display_name()),
            digest: digest.into(),
            compiled: Compiled {
                from_cache: cached,
                ms: compile_ms,
            },
            runtime: self.clone(),
            pre,
            config_json: slot.config_json(),
            limits,
            reuse: slot.reuse_instances,
            idle: Mutex::new(Vec::new()),
            busy: slot.max_instances.map(|n| {
                (
                    Arc::new(tokio::sync::Semaphore::new(n.max(1) as usize)),
                    n.max(1),
                )
            }),
            data_dir: slot.capabilities.data_dir.clone(),
            spend: slot.capabilities.spend,
            embed: slot.capabilities.embed,
            stats: PluginStats::default(),
        };
        // One real instantiation and `init` now, so a bad config is refused at
        // load time rather than on the first request. The instance is kept warm.
        let warm = plugin.fresh().await.map_err(|e| match e {
            PluginError::Invalid { message, .. } => LoadError::Init {
                path: path.into(),
                message,
            },
            other => LoadError::Init {
                path: path.into(),
                message: other.to_string(),
            },
        })?;
        plugin.put_back(warm);
        Ok(plugin)
    }
}

impl Runtime {
    /// The compiled component: from the artifact cache when it holds this
    /// digest for this engine, else compiled (and stored there). Returns
    /// whether it came from the cache.
    fn compile(&self, bytes: &[u8], digest: &str) -> wasmtime::Result<(Component, bool)> {
        let Some((dir, engine_key)) = &self.cache else {
            return Ok((Component::new(&self.engine, bytes)?, false));
        };
        let path = dir.join(format!("{digest}-{engine_key:016x}.cwasm"));
        if path.exists() {
            match load_artifact(&self.engine, &path) {
                Ok(c) => return Ok((c, true)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "compiled plugin unusable, compiling again: {e:#}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let artifact = self.engine.precompile_component(bytes)?;
        let component = load_artifact_bytes(&self.engine, &artifact)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let stored = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, &artifact))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = stored {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(dir = %dir.display(), "cannot keep the compiled plugin: {e}");
        }
        Ok((component, false))
    }
}

/// Loads a compiled artifact from the cache directory.
///
/// The file is read into memory rather than mapped: a mapped file that
/// someone truncates or rewrites in place would crash the process (SIGBUS)
/// the next time the plugin runs.
fn load_artifact(engine: &Engine, path: &std::path::Path) -> wasmtime::Result<Component> {
    let bytes = std::fs::read(path)?;
    load_artifact_bytes(engine, &bytes)
}

/// Turns a compiled artifact into a component.
///
/// `unsafe` because wasmtime runs the machine code in it as is. Artifacts
/// are trusted the way the gateway binary is: they come from this engine's
/// `precompile_component`, either just now or through `runtime.cache_dir`,
/// which only the gateway writes to (atomically, named by the sha256 of the
/// component it compiled); wasmtime still checks that the artifact was made
/// by this wasmtime version with these engine settings.
#[allow(unsafe_code)]
fn load_artifact_bytes(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: see above.
    unsafe { Component::deserialize(engine, artifact) }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    deadline_ms: u64,
    init_deadline_ms: u64,
    memory_bytes: usize,
    memory_mib: u64,
    fuel: u64,
}

/// An instance ready for calls: its store and the typed exports.
pub(super) struct Warm<K: Kind> {
    pub(super) store: Store<StoreState>,
    pub(super) bindings: K::Bindings,
    /// When the current call was armed.
    started: Option<std::time::Instant>,
    /// The call's place under the plugin's `max_instances`.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Fuel the current call started with.
    armed_fuel: u64,
}

/// How a plugin's machine code was obtained.
#[derive(Debug, Clone, Copy)]
pub struct Compiled {
    /// Read from `runtime.cache_dir` instead of compiled.
    pub from_cache: bool,
    pub ms: f64,
}

/// One loaded plugin: compiled once, instantiated on demand, kept warm.
pub struct Plugin<K: Kind> {
    name: Arc<str>,
    /// What the plugin was written in; sets the limits the slot left unset.
    language: super::language::Language,
    digest: Arc<str>,
    compiled: Compiled,
    runtime: Arc<Runtime>,
    pre: K::Pre,
    config_json: String,
    limits: Limits,
    reuse: bool,
    idle: Mutex<Vec<Warm<K>>>,
    /// Calls running at once, when the slot sets `max_instances`.
    busy: Option<(Arc<tokio::sync::Semaphore>, u32)>,
    /// The granted data directory, mounted read-only as `/data`.
    data_dir: Option<std::path::PathBuf>,
    /// Granted the `spend` import.
    spend: bool,
    /// Granted the `embed` import.
    embed: bool,
    stats: PluginStats,
}

impl<K: Kind> Plugin<K> {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// sha256 of the component bytes, hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The name, shared (for records that outlive a call).
    pub fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }

    /// The digest, shared.
    pub fn shared_digest(&self) -> Arc<str> {
        self.digest.clone()
    }

    pub fn stats(&self) -> &PluginStats {
        &self.stats
    }

    pub fn compiled(&self) -> Compiled {
        self.compiled
    }

    /// What a reviewer needs to know about a loaded plugin: identity,
    /// limits and counters.
    pub fn describe(&self) -> serde_json::Value {
        let failures: serde_json::Map<String, serde_json::Value> = self
            .stats
            .failures()
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        serde_json::json!({
            "kind": K::KIND.world(),
            "name": &*self.name,
            "language": self.language.name(),
            "sha256": self.digest,
            "limits": {
                "timeout_ms": self.limits.deadline_ms,
                "init_timeout_ms": self.limits.init_deadline_ms,
                "memory_mib": self.limits.memory_mib,
                "fuel": self.limits.fuel,
                "reuse_instances": self.reuse,
                "max_instances": self.busy.as_ref().map(|(_, n)| *n),
            },
            "capabilities": {
                "filesystem": self.data_dir.as_ref().map_or(
                    serde_json::Value::Bool(false),
                    |d| serde_json::json!({"read_only": d.display().to_string(), "seen_as": "/data"}),
                ),
                "network": false,
                "environment": false,
                "host_imports": ["count-tokens", "hash", "now-ms", "log"],
                "spend": self.spend,
                "embed": self.embed,
            },
            "compiled": {
                "from_cache": self.compiled.from_cache,
                "ms": (self.compiled.ms * 10.0).round() / 10.0,
            },
            "calls": self.stats.calls.load(Ordering::Relaxed),
            "instantiations": self.stats.instantiations.load(Ordering::Relaxed),
            "fuel_per_call": {
                "mean": self.stats.fuel_used.load(Ordering::Relaxed)
                    / self.stats.calls_returned.load(Ordering::Relaxed).max(1),
                "max": self.stats.fuel_max.load(Ordering::Relaxed),
            },
            "memory_peak_mib": (self.stats.memory_peak.load(Ordering::Relaxed) as f64
                / f64::from(1u32 << 20)
                * 10.0)
                .round()
                / 10.0,
            "failures": failures,
        })
    }

    /// Ticks until the epoch callback first looks at the clock. The first
    /// tick can come right after arming, so this alone could stop a call
    /// early: [`past_deadline`] decides, and lets it go on to the next tick
    /// while its deadline is ahead.
    fn ticks(&self, ms: u64) -> u64 {
        ms.div_ceil(self.runtime.tick_ms).max(1)
    }

    /// A new instance with `init` run on it.
    async fn fresh(&self) -> Result<Warm<K>, PluginError> {
        self.stats.instantiations.fetch_add(1, Ordering::Relaxed);
        let mut state = StoreState::new(
            self.name.clone(),
            self.runtime.clock.clone(),
            self.limits.memory_bytes,
            self.data_dir.as_deref(),
        )
        .map_err(|message| PluginError::Instantiate {
            plugin: self.name.to_string(),
            message,
        })?;
        if self.spend {
            state.spend = self.runtime.spend.get().cloned();
        }
        if self.embed {
            state.embed = Some(
                self.runtime
                    .embed
                    .get()
                    .cloned()
                    .unwrap_or_else(|| Err("embeddings are not configured".into())),
            );
        }
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|ctx| past_deadline(ctx.data()));
        let armed_fuel = self.arm(
            &mut store,
            self.limits.init_deadline_ms,
            self.limits.fuel.saturating_mul(20),
        );
        let bindings = match K::instantiate(&self.pre, &mut store).await {
            Ok(b) => b,
            Err(e) => {
                let err = self.classify(e, &store, self.limits.init_deadline_ms);
                let err = match err {
                    PluginError::Trap { plugin, message } => {
                        PluginError::Instantiate { plugin, message }
                    }
                    other => other,
                };
                self.stats.record_failure(&err);
                return Err(err);
            }
        };
        match K::init(&bindings, &mut store, &self.config_json).await {
            Ok(Ok(())) => Ok(Warm {
                store,
                bindings,
                started: None,
                permit: None,
                armed_fuel,
            }),
            Ok(Err(message)) => {
                let err = PluginError::Invalid {
                    plugin: self.name.to_string(),
                    message: format!("init refused its config: {message}"),
                };
                self.stats.record_failure(&err);
                Err(err)
            }
            Err(e) => {
                let err = self.classify(e, &store, self.limits.init_deadline_ms);
                self.stats.record_failure(&err);
                Err(err)
            }
        }
    }

    /// Sets the call's deadline and fuel; returns the fuel it starts with.
    fn arm(&self, store: &mut Store<StoreState>, deadline_ms: u64, fuel: u64) -> u64 {
        let ticks = self.ticks(deadline_ms);
        // The clock keeps ticking one tick past the first look, the one at
        // which a call armed just before a tick finds its deadline passed.
        self.runtime.ticker.arming(ticks + 1);
        store.set_epoch_deadline(ticks);
        let fuel = if self.limits.fuel == 0 {
            u64::MAX
        } else {
            fuel
        };
        // Fails only when fuel is off in the engine config, which it never is.
        let _ = store.set_fuel(fuel);
        let state = store.data_mut();
        state.limiter.denied = false;
        state.stderr.clear();
        state.logged = 0;
        state.logs_dropped = 0;
        state.last_error = None;
        state.embeds = 0;
        state.deadline = Some(std::time::Instant::now() + Duration::from_millis(deadline_ms));
        fuel
    }

    fn take(&self) -> Option<Warm<K>> {
        if !self.reuse {
            return None;
        }
        self.idle.lock().ok()?.pop()
    }

    fn put_back(&self, mut warm: Warm<K>) {
        warm.permit = None;
        if !self.reuse {
            return;
        }
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.runtime.idle_instances.max(1)
        {
            idle.push(warm);
        }
    }

    /// An instance armed for one call deciding on `req`: warm if one is
    /// idle, else fresh. Host imports that answer about the request (spend)
    /// read it from the store. Pair with [`Plugin::release`].
    pub(super) async fn acquire(
        &self,
        req: &super::types::RequestView,
    ) -> Result<Warm<K>, PluginError> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let permit = match &self.busy {
            Some((sem, max)) => {
                let wait = Duration::from_millis(self.limits.deadline_ms);
                match tokio::time::timeout(wait, sem.clone().acquire_owned()).await {
                    Ok(Ok(p)) => Some(p),
                    _ => {
                        let e = PluginError::Busy {
                            plugin: self.name.to_string(),
                            max: *max,
                        };
                        self.stats.record_failure(&e);
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let mut warm = match self.take() {
            Some(w) => w,
            None => self.fresh().await?,
        };
        warm.armed_fuel = self.arm(&mut warm.store, self.limits.deadline_ms, self.limits.fuel);
        if self.spend {
            warm.store.data_mut().scope = super::state::CallScope {
                tenant: req.tenant.clone(),
                feature: req.feature.clone(),
                user: req.user.clone(),
            };
        }
        warm.started = Some(std::time::Instant::now());
        warm.permit = permit;
        Ok(warm)
    }

    /// Ends a call: a good instance goes back to the pool; on failure the
    /// error is classified and counted and the instance is dropped, so a
    /// bad call cannot poison the next.
    pub(super) fn release<R>(
        &self,
        warm: Warm<K>,
        result: wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        if let (Some(h), Some(t)) = (self.stats.call_seconds.get(), warm.started) {
            h.observe(t.elapsed().as_secs_f64());
        }
        let dropped = warm.store.data().logs_dropped;
        if dropped > 0 {
            self.stats
                .logs_dropped
                .fetch_add(u64::from(dropped), Ordering::Relaxed);
            tracing::warn!(
                plugin = &*self.name,
                dropped,
                "plugin wrote more than {} log lines in one call; the rest were dropped",
                super::state::MAX_LOG_LINES_PER_CALL
            );
        }
        match result {
            Ok(r) => {
                let used = warm
                    .armed_fuel
                    .saturating_sub(warm.store.get_fuel().unwrap_or(0));
                let s = &self.stats;
                s.fuel_used.fetch_add(used, Ordering::Relaxed);
                s.fuel_max.fetch_max(used, Ordering::Relaxed);
                s.calls_returned.fetch_add(1, Ordering::Relaxed);
                let peak = warm.store.data().limiter.peak_bytes as u64;
                s.memory_peak.fetch_max(peak, Ordering::Relaxed);
                self.put_back(warm);
                Ok(r)
            }
            Err(e) => {
                let err = self.classify(e, &warm.store, self.limits.deadline_ms);
                self.stats.record_failure(&err);
                Err(err)
            }
        }
    }

    /// Records a decision the host refused after a successful call.
    pub(super) fn invalid(&self, message: String) -> PluginError {
        let err = PluginError::Invalid {
            plugin: self.name.to_string(),
            message,
        };
        self.stats.record_failure(&err);
        err
    }

    fn classify(
        &self,
        e: wasmtime::Error,
        store: &Store<StoreState>,
        deadline_ms: u64,
    ) -> PluginError {
        let plugin = self.name.to_string();
        if store.data().limiter.denied {
            return PluginError::Memory {
                plugin,
                cap_mib: self.limits.memory_mib,
            };
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PluginError::Timeout {
                plugin,
                deadline_ms,
            },
            Some(Trap::OutOfFuel) => PluginError::OutOfFuel {
                plugin,
                fuel: self.limits.fuel,
            },
            _ => {
                // The root cause is the trap itself ("wasm `unreachable`
                // instruction executed"); the context around it is a backtrace.
                let mut message = first_line(&e.root_cause().to_string());
                if let Some(said) = store.data().stderr.last_message() {
                    message.push_str(&format!(" (plugin stderr: {said})"));
                }
                if let Some(logged) = &store.data().last_error {
                    message.push_str(&format!(" (plugin log: {logged})"));
                }
                PluginError::Trap { plugin, message }
            }
        }
    }
}

/// At an epoch deadline: stop the call (as a timeout) if its wall-clock
/// deadline has passed, else look again at the next tick. Deadlines are
/// exact to the tick this way, never early, whatever the tick's phase.
fn past_deadline(state: &StoreState) -> wasmtime::Result<wasmtime::UpdateDeadline> {
    match state.deadline {
        Some(d) if std::time::Instant::now() < d => Ok(wasmtime::UpdateDeadline::Continue(1)),
        _ => Err(Trap::Interrupt.into()),
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s);
    line.chars().take(300).collect()
}
