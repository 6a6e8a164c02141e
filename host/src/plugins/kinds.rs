//! The four plugin kinds: how each is instantiated and called, and the
//! checks the host applies to each kind's decisions before acting on them.

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::bindings::v0_1_0;
use super::bindings::v0_2_0::{budget_rule, cache_policy, compressor, router};
use super::runtime::Plugin;
use super::state::StoreState;
use super::types::{
    CacheDecision, Compression, ModelInfo, RequestView, ResponseMeta, RouteDecision, SpendSnapshot,
    Verdict,
};
use super::{PluginError, PluginKind};

/// What differs between plugin kinds for the runtime.
pub trait Kind: Send + Sync + 'static {
    const KIND: PluginKind;
    type Pre: Send + Sync;
    type Bindings: Send;

    fn pre(instance_pre: InstancePre<StoreState>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<StoreState>,
    ) -> impl Future<Output = wasmtime::Result<Self::Bindings>> + Send;
    fn init(
        b: &Self::Bindings,
        store: &mut Store<StoreState>,
        config: &str,
    ) -> impl Future<Output = wasmtime::Result<Result<(), String>>> + Send;
}

macro_rules! kind {
    ($kind:ident, $variant:ident, $module:ident, $world:ident, $pre:ident) => {
        pub struct $kind;

        impl Kind for $kind {
            const KIND: PluginKind = PluginKind::$variant;
            type Pre = $module::$pre<StoreState>;
            type Bindings = $module::$world;

            fn pre(instance_pre: InstancePre<StoreState>) -> wasmtime::Result<Self::Pre> {
                $module::$pre::new(instance_pre)
            }
            async fn instantiate(
                pre: &Self::Pre,
                store: &mut Store<StoreState>,
            ) -> wasmtime::Result<Self::Bindings> {
                pre.instantiate_async(store).await
            }
            async fn init(
                b: &Self::Bindings,
                store: &mut Store<StoreState>,
                config: &str,
            ) -> wasmtime::Result<Result<(), String>> {
                b.call_init(store, config).await
            }
        }
    };
}

kind!(RouterKind, Router, router, Router, RouterPre);
kind!(
    CompressorKind,
    Compressor,
    compressor,
    Compressor,
    CompressorPre
);
/// Cache policies come in two interface versions (see `bindings`).
pub struct CachePolicyKind;

pub enum CachePolicyPre {
    V2(cache_policy::CachePolicyPre<StoreState>),
    V1(InstancePre<StoreState>),
}

pub enum CachePolicyBindings {
    V2(cache_policy::CachePolicy),
    V1(v0_1_0::CachePolicy),
}

/// One call per export, whichever version the plugin speaks.
impl CachePolicyBindings {
    async fn call_init(
        &self,
        store: &mut Store<StoreState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Self::V2(b) => b.call_init(store, config).await,
            Self::V1(b) => b.call_init(store, config).await,
        }
    }

    async fn call_lookup(
        &self,
        store: &mut Store<StoreState>,
        req: &RequestView,
    ) -> wasmtime::Result<CacheDecision> {
        match self {
            Self::V2(b) => b.call_lookup(store, req).await,
            Self::V1(b) => b.call_lookup(store, req).await,
        }
    }

    async fn call_admit(
        &self,
        store: &mut Store<StoreState>,
        req: &RequestView,
        response: &ResponseMeta,
    ) -> wasmtime::Result<bool> {
        match self {
            Self::V2(b) => b.call_admit(store, req, response).await,
            Self::V1(b) => b.call_admit(store, req, response).await,
        }
    }
}

impl Kind for CachePolicyKind {
    const KIND: PluginKind = PluginKind::CachePolicy;
    type Pre = CachePolicyPre;
    type Bindings = CachePolicyBindings;

    fn pre(instance_pre: InstancePre<StoreState>) -> wasmtime::Result<Self::Pre> {
        match cache_policy::CachePolicyPre::new(instance_pre.clone()) {
            Ok(p) => Ok(CachePolicyPre::V2(p)),
            Err(_) if v0_1_0::is_cache_policy(&instance_pre) => {
                Ok(CachePolicyPre::V1(instance_pre))
            }
            Err(e) => Err(e),
        }
    }
    async fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<StoreState>,
    ) -> wasmtime::Result<Self::Bindings> {
        Ok(match pre {
            CachePolicyPre::V2(p) => CachePolicyBindings::V2(p.instantiate_async(store).await?),
            CachePolicyPre::V1(p) => {
                CachePolicyBindings::V1(v0_1_0::CachePolicy::instantiate(p, store).await?)
            }
        })
    }
    async fn init(
        b: &Self::Bindings,
        store: &mut Store<StoreState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        b.call_init(store, config).await
    }
}
kind!(
    BudgetRuleKind,
    BudgetRule,
    budget_rule,
    BudgetRule,
    BudgetRulePre
);

impl Plugin<RouterKind> {
    /// The router's decision; a model outside `candidates` is an invalid decision.
    pub async fn route(
        &self,
        req: &RequestView,
        candidates: &[ModelInfo],
    ) -> Result<RouteDecision, PluginError> {
        let mut w = self.acquire(req).await?;
        let r = w.bindings.call_route(&mut w.store, req, candidates).await;
        let d = self.release(w, r)?;
        let known = |m: &str| candidates.iter().any(|c| c.name == m);
        match &d {
            RouteDecision::UseModel(m) if !known(m) => {
                Err(self.invalid(format!("chose model {m:?}, which is not a candidate")))
            }
            RouteDecision::Fallback(list) if list.is_empty() => {
                Err(self.invalid("fallback list is empty".into()))
            }
            RouteDecision::Fallback(list) => match list.iter().find(|m| !known(m)) {
                Some(m) => {
                    Err(self.invalid(format!("fallback names {m:?}, which is not a candidate")))
                }
                None => Ok(d),
            },
            _ => Ok(d),
        }
    }
}

impl Plugin<CompressorKind> {
    /// The compressor's rewrite, checked against the request it was given:
    /// kept messages in order and in range, and only text-only messages rewritten.
    pub async fn compress(&self, req: &RequestView) -> Result<Compression, PluginError> {
        let mut w = self.acquire(req).await?;
        let r = w.bindings.call_compress(&mut w.store, req).await;
        let c = self.release(w, r)?;
        if let Compression::Rewritten(rw) = &c {
            let mut prev: Option<u32> = None;
            for k in &rw.messages {
                let Some(orig) = req.messages.get(k.source as usize) else {
                    return Err(self.invalid(format!("kept message {} does not exist", k.source)));
                };
                if prev.is_some_and(|p| k.source <= p) {
                    return Err(self.invalid("kept messages are not in increasing order".into()));
                }
                if k.content.is_some() && !orig.text_only {
                    return Err(self.invalid(format!(
                        "rewrote message {}, which carries more than text",
                        k.source
                    )));
                }
                prev = Some(k.source);
            }
            if rw.messages.is_empty() && !req.messages.is_empty() {
                return Err(self.invalid("dropped every message".into()));
            }
        }
        Ok(c)
    }
}

impl Plugin<CachePolicyKind> {
    pub async fn lookup(&self, req: &RequestView) -> Result<CacheDecision, PluginError> {
        let mut w = self.acquire(req).await?;
        let r = w.bindings.call_lookup(&mut w.store, req).await;
        let d = self.release(w, r)?;
        if let CacheDecision::Lookup(l) = &d {
            if l.ttl_seconds == 0 {
                return Err(self.invalid("lookup with a TTL of 0 seconds".into()));
            }
            if let Some(s) = &l.semantic
                && !(s.min_similarity > 0.0 && s.min_similarity <= 1.0)
            {
                return Err(self.invalid(format!(
                    "semantic min-similarity {} is not in (0, 1]",
                    s.min_similarity
                )));
            }
        }
        Ok(d)
    }

    pub async fn admit(
        &self,
        req: &RequestView,
        response: &ResponseMeta,
    ) -> Result<bool, PluginError> {
        let mut w = self.acquire(req).await?;
        let r = w.bindings.call_admit(&mut w.store, req, response).await;
        self.release(w, r)
    }
}

impl Plugin<BudgetRuleKind> {
    pub async fn check(
        &self,
        req: &RequestView,
        spend: &SpendSnapshot,
    ) -> Result<Verdict, PluginError> {
        let mut w = self.acquire(req).await?;
        let r = w.bindings.call_check(&mut w.store, req, spend).await;
        self.release(w, r)
    }
}
