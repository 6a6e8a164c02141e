//! Host bindings of the plugin interface, one module per released WIT
//! version. The pipeline works in the newest version's types (0.2.0).
//!
//! Older plugins load too. Component exports are checked by structure, not
//! by package version, so a 0.1.0 router, compressor or budget rule is
//! called through the 0.2.0 bindings unchanged (those worlds did not
//! change); its imports are the 0.1.0 interfaces, linked beside the 0.2.0
//! ones. Only the cache policy's `lookup` changed shape: a 0.1.0 cache
//! policy is called through [`v0_1_0::CachePolicy`] and its decision
//! converted here, at the boundary.

pub mod v0_2_0 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2.0",
        world: "imports",
        additional_derives: [PartialEq],
        // A forward pass of the embedding model takes milliseconds: it runs
        // on the blocking pool while the plugin's fiber waits.
        imports: { "tollgate:policy/embed.embed": async },
    });

    pub mod router {
        wasmtime::component::bindgen!({
            path: "../wit/v0.2.0",
            world: "router",
            exports: { default: async },
            with: {
                "tollgate:policy/types@0.2.0": super::tollgate::policy::types,
                "tollgate:policy/host@0.2.0": super::tollgate::policy::host,
            },
        });
    }

    pub mod compressor {
        wasmtime::component::bindgen!({
            path: "../wit/v0.2.0",
            world: "compressor",
            exports: { default: async },
            with: {
                "tollgate:policy/types@0.2.0": super::tollgate::policy::types,
                "tollgate:policy/host@0.2.0": super::tollgate::policy::host,
            },
        });
    }

    pub mod cache_policy {
        wasmtime::component::bindgen!({
            path: "../wit/v0.2.0",
            world: "cache-policy",
            exports: { default: async },
            with: {
                "tollgate:policy/types@0.2.0": super::tollgate::policy::types,
                "tollgate:policy/host@0.2.0": super::tollgate::policy::host,
            },
        });
    }

    pub mod budget_rule {
        wasmtime::component::bindgen!({
            path: "../wit/v0.2.0",
            world: "budget-rule",
            exports: { default: async },
            with: {
                "tollgate:policy/types@0.2.0": super::tollgate::policy::types,
                "tollgate:policy/host@0.2.0": super::tollgate::policy::host,
            },
        });
    }
}

pub mod v0_1_0 {
    use wasmtime::Store;
    use wasmtime::component::{Func, Instance, InstancePre};

    use super::types::{CacheDecision, CacheLookup, RequestView, ResponseMeta};
    use crate::plugins::state::StoreState;

    // The 0.1.0 imports, linked for plugins built against 0.1.0.
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "imports",
        additional_derives: [PartialEq],
        imports: { "tollgate:policy/embed.embed": async },
    });

    use self::tollgate::policy::types as old;

    impl From<old::CacheDecision> for CacheDecision {
        fn from(d: old::CacheDecision) -> Self {
            match d {
                old::CacheDecision::Bypass(why) => CacheDecision::Bypass(why),
                old::CacheDecision::Lookup(l) => CacheDecision::Lookup(CacheLookup {
                    scope: match l.scope {
                        old::CacheScope::Tenant => super::types::CacheScope::Tenant,
                        old::CacheScope::TenantUser => super::types::CacheScope::TenantUser,
                    },
                    ttl_seconds: l.ttl_seconds,
                    semantic: None,
                    tags: Vec::new(),
                }),
            }
        }
    }

    /// Whether `component` exports the 0.1.0 cache-policy world: its
    /// `lookup` answers a decision whose `lookup` case has the two fields of
    /// 0.1.0 (scope and TTL). Used only after the 0.2.0 check failed, to
    /// tell an older plugin from a wrong one.
    pub fn is_cache_policy(pre: &InstancePre<StoreState>) -> bool {
        use wasmtime::component::types::{ComponentItem, Type};
        let engine = pre.engine();
        let ty = pre.component().component_type();
        let Some(ComponentItem::ComponentFunc(f)) = ty.get_export(engine, "lookup").map(|e| e.ty)
        else {
            return false;
        };
        let Some(Type::Variant(v)) = f.results().next() else {
            return false;
        };
        v.cases().any(|c| match (c.name, c.ty) {
            ("lookup", Some(Type::Record(r))) => {
                r.fields().map(|f| f.name).eq(["scope", "ttl-seconds"])
            }
            _ => false,
        })
    }

    /// A 0.1.0 cache policy's exports. `init` and `admit` have the same
    /// types as in 0.2.0; `lookup` answers the old decision. Each call
    /// checks the function's type (a few string comparisons): the price of
    /// calling an older plugin without copying the request into old types.
    pub struct CachePolicy {
        init: Func,
        lookup: Func,
        admit: Func,
    }

    impl CachePolicy {
        pub async fn instantiate(
            pre: &InstancePre<StoreState>,
            store: &mut Store<StoreState>,
        ) -> wasmtime::Result<Self> {
            let instance: Instance = pre.instantiate_async(&mut *store).await?;
            let func = |store: &mut Store<StoreState>, name: &str| {
                instance
                    .get_func(&mut *store, name)
                    .ok_or_else(|| wasmtime::format_err!("no exported function `{name}`"))
            };
            let b = Self {
                init: func(store, "init")?,
                lookup: func(store, "lookup")?,
                admit: func(store, "admit")?,
            };
            // Type errors surface at load, not on the first request.
            b.init.typed::<(&str,), (Result<(), String>,)>(&*store)?;
            b.lookup
                .typed::<(&RequestView,), (old::CacheDecision,)>(&*store)?;
            b.admit
                .typed::<(&RequestView, &ResponseMeta), (bool,)>(&*store)?;
            Ok(b)
        }

        pub async fn call_init(
            &self,
            store: &mut Store<StoreState>,
            config: &str,
        ) -> wasmtime::Result<Result<(), String>> {
            let f = self.init.typed::<(&str,), (Result<(), String>,)>(&*store)?;
            let (r,) = f.call_async(store, (config,)).await?;
            Ok(r)
        }

        pub async fn call_lookup(
            &self,
            store: &mut Store<StoreState>,
            req: &RequestView,
        ) -> wasmtime::Result<CacheDecision> {
            let f = self
                .lookup
                .typed::<(&RequestView,), (old::CacheDecision,)>(&*store)?;
            let (r,) = f.call_async(store, (req,)).await?;
            Ok(r.into())
        }

        pub async fn call_admit(
            &self,
            store: &mut Store<StoreState>,
            req: &RequestView,
            response: &ResponseMeta,
        ) -> wasmtime::Result<bool> {
            let f = self
                .admit
                .typed::<(&RequestView, &ResponseMeta), (bool,)>(&*store)?;
            let (r,) = f.call_async(store, (req, response)).await?;
            Ok(r)
        }
    }
}

/// The plugin-facing types of the newest interface version.
pub use v0_2_0::tollgate::policy::types;
