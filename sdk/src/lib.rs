//! Write Tollgate policy plugins in Rust.
//!
//! A policy plugin is a WebAssembly component that the gateway loads at run
//! time and asks for one kind of decision on every request. Implement the
//! trait for your kind, call its export macro once, and build for
//! `wasm32-wasip2`:
//!
//! | kind | trait | macro | decides |
//! |---|---|---|---|
//! | router | [`Router`] | [`export_router!`] | which model answers (or a fixed answer, or a rejection) |
//! | compressor | [`Compressor`] | [`export_compressor!`] | how the prompt is shortened |
//! | cache policy | [`CachePolicy`] | [`export_cache_policy!`] | whether and in which scope the cache is used, and whether a reworded question may match ([`SemanticMatch`]) |
//! | budget rule | [`BudgetRule`] | [`export_budget_rule!`] | allow, deny or downgrade given what was spent |
//!
//! # A complete router
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "short-is-cheap"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! tollgate-sdk = { path = "../../sdk" }
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```no_run
//! use tollgate_sdk::{ModelInfo, RequestView, RouteDecision, Router};
//!
//! #[derive(serde::Deserialize, Default)]
//! struct ShortIsCheap {
//!     cheap_model: String,
//!     max_prompt_tokens: u32,
//! }
//!
//! impl Router for ShortIsCheap {
//!     fn init(config: &str) -> Result<Self, String> {
//!         tollgate_sdk::config(config)
//!     }
//!
//!     fn route(&self, req: &RequestView, _candidates: &[ModelInfo]) -> RouteDecision {
//!         if req.prompt_tokens <= self.max_prompt_tokens && !req.has_tools {
//!             RouteDecision::UseModel(self.cheap_model.clone())
//!         } else {
//!             RouteDecision::Keep
//!         }
//!     }
//! }
//!
//! tollgate_sdk::export_router!(ShortIsCheap);
//! ```
//!
//! Build it and point a router slot of the gateway config at the file:
//!
//! ```sh
//! cargo build --release --target wasm32-wasip2
//! ```
//!
//! ```toml
//! [plugins.router]
//! path = "target/wasm32-wasip2/release/short_is_cheap.wasm"
//! config = { cheap_model = "gpt-4o-mini", max_prompt_tokens = 400 }
//! ```
//!
//! The plugin's `config` table reaches [`Router::init`] as JSON; [`config`]
//! parses it into your type (an absent table gives `Default`).
//!
//! # What a plugin may do
//!
//! Only what the [`host`] functions offer: count tokens, hash, read the
//! gateway's clock and log. There is no filesystem, network or environment.
//! Each call has a wall-clock deadline, a fuel budget and a memory cap; a
//! plugin that panics, loops or grows past its cap is stopped and its slot's
//! failure mode (skip the plugin, or reject the request) applies. An instance
//! is reused for many requests, so keep per-request state on the stack, not
//! in statics.

extern crate self as tollgate_sdk;

/// Generated bindings; use the re-exports at the crate root instead.
#[doc(hidden)]
pub mod bindings {
    pub mod imports {
        wit_bindgen::generate!({
            path: "../wit/v0.2.0",
            world: "imports",
            additional_derives: [PartialEq],
        });
    }
    pub mod router {
        wit_bindgen::generate!({
            path: "../wit/v0.2.0",
            world: "router",
            with: {
                "tollgate:policy/types@0.2.0": tollgate_sdk::bindings::imports::tollgate::policy::types,
                "tollgate:policy/host@0.2.0": tollgate_sdk::bindings::imports::tollgate::policy::host,
            },
            pub_export_macro: true,
            export_macro_name: "__export_router_world",
            default_bindings_module: "tollgate_sdk::bindings::router",
        });
    }
    pub mod compressor {
        wit_bindgen::generate!({
            path: "../wit/v0.2.0",
            world: "compressor",
            with: {
                "tollgate:policy/types@0.2.0": tollgate_sdk::bindings::imports::tollgate::policy::types,
                "tollgate:policy/host@0.2.0": tollgate_sdk::bindings::imports::tollgate::policy::host,
            },
            pub_export_macro: true,
            export_macro_name: "__export_compressor_world",
            default_bindings_module: "tollgate_sdk::bindings::compressor",
        });
    }
    pub mod cache_policy {
        wit_bindgen::generate!({
            path: "../wit/v0.2.0",
            world: "cache-policy",
            with: {
                "tollgate:policy/types@0.2.0": tollgate_sdk::bindings::imports::tollgate::policy::types,
                "tollgate:policy/host@0.2.0": tollgate_sdk::bindings::imports::tollgate::policy::host,
            },
            pub_export_macro: true,
            export_macro_name: "__export_cache_policy_world",
            default_bindings_module: "tollgate_sdk::bindings::cache_policy",
        });
    }
    pub mod budget_rule {
        wit_bindgen::generate!({
            path: "../wit/v0.2.0",
            world: "budget-rule",
            with: {
                "tollgate:policy/types@0.2.0": tollgate_sdk::bindings::imports::tollgate::policy::types,
                "tollgate:policy/host@0.2.0": tollgate_sdk::bindings::imports::tollgate::policy::host,
            },
            pub_export_macro: true,
            export_macro_name: "__export_budget_rule_world",
            default_bindings_module: "tollgate_sdk::bindings::budget_rule",
        });
    }
}

pub use bindings::imports::tollgate::policy::types::{
    CacheDecision, CacheLookup, CacheScope, Compression, KeptMessage, Message, ModelInfo,
    RequestView, ResponseMeta, Rewrite, RouteDecision, SemanticMatch, SpendSnapshot, Tag, Verdict,
};

/// Functions the gateway offers every plugin.
pub mod host {
    pub use crate::bindings::imports::tollgate::policy::host::{
        Level, count_tokens, hash, log, now_ms,
    };

    /// Log at info level in the gateway's log, tagged with the plugin's name.
    pub fn info(message: &str) {
        log(Level::Info, message);
    }

    /// Log at warn level in the gateway's log, tagged with the plugin's name.
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }
}

/// Spend so far, for plugins whose slot grants `capabilities.spend = true`
/// (a plugin that calls this without the grant is refused at load).
pub mod spend {
    pub use crate::bindings::imports::tollgate::policy::spend::{SpendScope, today_usd};
}

/// Sentence embeddings computed natively by the gateway, for plugins whose
/// slot grants `capabilities.embed = true` (a plugin that calls this without
/// the grant is refused at load). Each new text costs a forward pass (about
/// 15 ms for a short question) of the call's deadline; at most 8 per call.
pub mod embed {
    pub use crate::bindings::imports::tollgate::policy::embed::embed;

    /// Cosine similarity of two embeddings from [`embed`] (unit length, so
    /// their dot product): about 1 for the same meaning, near 0 for unrelated texts.
    pub fn similarity(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
}

/// Chooses the model for a request.
pub trait Router: Sized + Send + 'static {
    /// Build the router from its configuration (JSON; empty when none is given).
    fn init(config: &str) -> Result<Self, String>;
    /// `candidates` are the models the gateway is configured to reach, with prices.
    fn route(&self, req: &RequestView, candidates: &[ModelInfo]) -> RouteDecision;
}

/// Shortens a prompt without changing its meaning.
pub trait Compressor: Sized + Send + 'static {
    fn init(config: &str) -> Result<Self, String>;
    fn compress(&self, req: &RequestView) -> Compression;
}

/// Decides cache use for a request and whether an answer may be stored.
pub trait CachePolicy: Sized + Send + 'static {
    fn init(config: &str) -> Result<Self, String>;
    fn lookup(&self, req: &RequestView) -> CacheDecision;
    /// Whether this upstream answer may be stored. By default any answer that
    /// finished normally (`stop`) is stored.
    fn admit(&self, _req: &RequestView, response: &ResponseMeta) -> bool {
        response.finish_reason == "stop"
    }
}

/// Allows, denies or downgrades a request given the spend so far.
pub trait BudgetRule: Sized + Send + 'static {
    fn init(config: &str) -> Result<Self, String>;
    fn check(&self, req: &RequestView, spend: &SpendSnapshot) -> Verdict;
}

/// Parse a plugin's configuration (JSON) into `T`; an empty string gives
/// `T::default()`. The error names the offending field, for the gateway's log.
pub fn config<T: serde::de::DeserializeOwned + Default>(config: &str) -> Result<T, String> {
    if config.trim().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(config).map_err(|e| format!("invalid plugin config: {e}"))
}

impl RequestView {
    /// Text of the last message with role `user`, if any.
    pub fn last_user_message(&self) -> Option<&str> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.as_str())
    }

    /// Value of the `x-tollgate-tag-<key>` header, if the client sent one.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.value.as_str())
    }
}

/// Support for the export macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    use std::sync::Mutex;

    /// Stores the plugin built by `init`. The gateway calls `init` once per
    /// instance before anything else; calling it again replaces the state.
    pub fn init<T>(
        slot: &Mutex<Option<T>>,
        config: &str,
        build: fn(&str) -> Result<T, String>,
    ) -> Result<(), String> {
        let plugin = build(config)?;
        match slot.lock() {
            Ok(mut guard) => *guard = Some(plugin),
            Err(poisoned) => *poisoned.into_inner() = Some(plugin),
        }
        Ok(())
    }

    /// Runs `f` on the plugin state, building it from an empty config if the
    /// host never called `init` (it always does; this keeps the SDK total).
    #[allow(clippy::panic)]
    pub fn with<T, R>(
        slot: &Mutex<Option<T>>,
        build: fn(&str) -> Result<T, String>,
        f: impl FnOnce(&T) -> R,
    ) -> R {
        let mut guard = match slot.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.is_none() {
            match build("") {
                Ok(plugin) => *guard = Some(plugin),
                // A trap is the right answer here: the host contains it and
                // applies the slot's failure mode.
                Err(e) => panic!("plugin used before init and empty config is invalid: {e}"),
            }
        }
        match guard.as_ref() {
            Some(plugin) => f(plugin),
            None => panic!("plugin state missing"),
        }
    }
}

/// Export a [`Router`] implementation as the plugin's router world.
#[macro_export]
macro_rules! export_router {
    ($ty:ty) => {
        const _: () = {
            static STATE: ::std::sync::Mutex<::std::option::Option<$ty>> =
                ::std::sync::Mutex::new(::std::option::Option::None);
            struct Export;
            impl $crate::bindings::router::Guest for Export {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init(&STATE, &config, <$ty as $crate::Router>::init)
                }
                fn route(
                    req: $crate::RequestView,
                    candidates: ::std::vec::Vec<$crate::ModelInfo>,
                ) -> $crate::RouteDecision {
                    $crate::__private::with(&STATE, <$ty as $crate::Router>::init, |p| {
                        <$ty as $crate::Router>::route(p, &req, &candidates)
                    })
                }
            }
            $crate::bindings::router::__export_router_world!(Export with_types_in $crate::bindings::router);
        };
    };
}

/// Export a [`Compressor`] implementation as the plugin's compressor world.
#[macro_export]
macro_rules! export_compressor {
    ($ty:ty) => {
        const _: () = {
            static STATE: ::std::sync::Mutex<::std::option::Option<$ty>> =
                ::std::sync::Mutex::new(::std::option::Option::None);
            struct Export;
            impl $crate::bindings::compressor::Guest for Export {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init(&STATE, &config, <$ty as $crate::Compressor>::init)
                }
                fn compress(req: $crate::RequestView) -> $crate::Compression {
                    $crate::__private::with(&STATE, <$ty as $crate::Compressor>::init, |p| {
                        <$ty as $crate::Compressor>::compress(p, &req)
                    })
                }
            }
            $crate::bindings::compressor::__export_compressor_world!(Export with_types_in $crate::bindings::compressor);
        };
    };
}

/// Export a [`CachePolicy`] implementation as the plugin's cache-policy world.
#[macro_export]
macro_rules! export_cache_policy {
    ($ty:ty) => {
        const _: () = {
            static STATE: ::std::sync::Mutex<::std::option::Option<$ty>> =
                ::std::sync::Mutex::new(::std::option::Option::None);
            struct Export;
            impl $crate::bindings::cache_policy::Guest for Export {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init(&STATE, &config, <$ty as $crate::CachePolicy>::init)
                }
                fn lookup(req: $crate::RequestView) -> $crate::CacheDecision {
                    $crate::__private::with(&STATE, <$ty as $crate::CachePolicy>::init, |p| {
                        <$ty as $crate::CachePolicy>::lookup(p, &req)
                    })
                }
                fn admit(req: $crate::RequestView, response: $crate::ResponseMeta) -> bool {
                    $crate::__private::with(&STATE, <$ty as $crate::CachePolicy>::init, |p| {
                        <$ty as $crate::CachePolicy>::admit(p, &req, &response)
                    })
                }
            }
            $crate::bindings::cache_policy::__export_cache_policy_world!(Export with_types_in $crate::bindings::cache_policy);
        };
    };
}

/// Export a [`BudgetRule`] implementation as the plugin's budget-rule world.
#[macro_export]
macro_rules! export_budget_rule {
    ($ty:ty) => {
        const _: () = {
            static STATE: ::std::sync::Mutex<::std::option::Option<$ty>> =
                ::std::sync::Mutex::new(::std::option::Option::None);
            struct Export;
            impl $crate::bindings::budget_rule::Guest for Export {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init(&STATE, &config, <$ty as $crate::BudgetRule>::init)
                }
                fn check(req: $crate::RequestView, spend: $crate::SpendSnapshot) -> $crate::Verdict {
                    $crate::__private::with(&STATE, <$ty as $crate::BudgetRule>::init, |p| {
                        <$ty as $crate::BudgetRule>::check(p, &req, &spend)
                    })
                }
            }
            $crate::bindings::budget_rule::__export_budget_rule_world!(Export with_types_in $crate::bindings::budget_rule);
        };
    };
}
