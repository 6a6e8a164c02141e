//! The request, answer, spend and ledger row the benchmarks use: shared by
//! `tollgate bench` and the criterion micro-benchmarks (host/benches), so
//! both measure the same work.

use anyhow::Result;
use tollgate::config::PluginSlotConfig;
use tollgate::ledger::{Decision, Row};
use tollgate::plugins::types::{Message, ModelInfo, RequestView, ResponseMeta, SpendSnapshot};

pub const ROUTER_CFG: &str = r#"
default = "gpt-4o-mini"
[[rules]]
regex = "(?i)^(hi|hello)!*$"
respond = "Hello!"
[[rules]]
keywords = ["step by step", "prove", "analyze"]
model = "gpt-4o"
[[rules]]
min_prompt_tokens = 3000
model = "gpt-4.1-mini"
"#;
pub const CACHE_CFG: &str = "ttl_seconds = 600\npersonal_features = [\"account\"]";
pub const BUDGET_CFG: &str = "daily_usd = 1000000.0\ndowngrade_model = \"gpt-4o-mini\"";

pub fn slot(
    dir: &std::path::Path,
    file: &str,
    config: &str,
    fuel: Option<u64>,
) -> Result<PluginSlotConfig> {
    let mut s = PluginSlotConfig::new(dir.join(file));
    if let Some(f) = fuel {
        s.fuel = Some(f);
    }
    if !config.is_empty() {
        s.config = Some(toml::from_str(config)?);
    }
    Ok(s)
}

/// A support-chat request: system prompt, one earlier turn, a question.
pub fn sample_view() -> RequestView {
    let msgs = [
        (
            "system",
            "You are the support assistant of Acme Cloud. Answer briefly and precisely; cite the help centre article when one applies.",
        ),
        ("user", "My invoices page shows two charges for November."),
        (
            "assistant",
            "One is the monthly plan and one is the storage add-on; they are billed separately.",
        ),
        (
            "user",
            "How do I download a PDF copy of the storage invoice for my accountant?",
        ),
    ];
    let messages: Vec<Message> = msgs
        .iter()
        .map(|(r, c)| Message {
            role: r.to_string(),
            content: c.to_string(),
            text_only: true,
        })
        .collect();
    let prompt_tokens = tollgate::tokens::count_messages(
        "gpt-4o",
        messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str())),
    );
    RequestView {
        request_id: "req_bench".into(),
        tenant: "acme".into(),
        user: "u42".into(),
        feature: "support".into(),
        task: String::new(),
        step: 0,
        model: "gpt-4o".into(),
        messages,
        prompt_tokens,
        max_tokens: Some(256),
        temperature: Some(0.0),
        stream: false,
        has_tools: false,
        json_mode: false,
        tags: vec![],
    }
}

/// The three simulator tiers as router candidates.
pub fn bench_candidates() -> Vec<ModelInfo> {
    ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"]
        .iter()
        .enumerate()
        .map(|(i, m)| ModelInfo {
            name: m.to_string(),
            provider: "sim".into(),
            tier: i as u8 + 1,
            input_per_mtok: 1.0,
            cached_input_per_mtok: 0.5,
            output_per_mtok: 4.0,
        })
        .collect()
}

/// An upstream answer to the sample request, for a cache policy's `admit`.
pub fn sample_meta(view: &RequestView) -> ResponseMeta {
    ResponseMeta {
        model: "gpt-4o-mini".into(),
        prompt_tokens: view.prompt_tokens,
        completion_tokens: 60,
        finish_reason: "stop".into(),
        content: "Open Billing, select the storage invoice and choose Download PDF.".into(),
    }
}

/// The spend a budget rule sees: well under the limit.
pub fn sample_spend() -> SpendSnapshot {
    SpendSnapshot {
        day: "2026-11-23".into(),
        tenant_today_usd: 12.5,
        feature_today_usd: 3.0,
        user_today_usd: 0.2,
        estimated_cost_usd: 0.003,
    }
}

/// A ledger row as the pipeline writes it for a routed, uncached request.
pub fn sample_row() -> Row {
    Row {
        request_hash: "0123456789abcdef01234567".into(),
        ts_ms: 1_795_449_600_000,
        tenant: "acme".into(),
        user: "u42".into(),
        feature: "support".into(),
        task: "t-1".into(),
        model_asked: "gpt-4o".into(),
        model_served: Some("gpt-4o-mini".into()),
        provider: Some("sim".into()),
        decisions: vec![Decision {
            kind: "router",
            plugin: "rules_router".into(),
            digest: "b8b71c637c21cc1aff284e15f823fde90e5c039afa21a145b0dddfd15774a44c".into(),
            decision: "UseModel(\"gpt-4o-mini\")".into(),
        }],
        cache: "miss",
        prompt_tokens: 85,
        completion_tokens: 40,
        latency_ms: 0.3,
        upstream_ms: Some(0.1),
        status: 200,
        cost_usd: Some(0.0000367),
        ..Row::default()
    }
}
