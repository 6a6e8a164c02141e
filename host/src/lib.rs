//! Tollgate: an OpenAI-compatible LLM gateway whose cost decisions (routing,
//! prompt compression, caching, budgets) are sandboxed WebAssembly plugins.
//!
//! Follow one request by reading [`pipeline`] top to bottom.

pub mod admin;
pub mod alerts;
pub mod api;
pub mod budget;
pub mod cache;
pub mod clock;
pub mod config;
pub mod embed;
pub mod headers;
pub mod in_flight;
pub mod kill;
pub mod ledger;
pub mod log_writer;
pub mod metrics;
pub mod pipeline;
pub mod plugin_test;
pub mod plugins;
pub mod pricing;
pub mod providers;
pub mod reload;
pub mod replay;
pub mod report;
pub mod server;
pub mod tokens;
pub mod webhook;
