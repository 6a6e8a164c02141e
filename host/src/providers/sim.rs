//! The built-in simulator: an OpenAI-compatible upstream that is
//! deterministic, free and offline, so every feature can be tested and
//! benchmarked without an API key.
//!
//! * models and tiers come from the price catalog (tier 1..3 chat models);
//! * usage is characters / 4 (rounded half to even) of what a provider bills
//!   as input: message contents, tool-call names and arguments, and the tool
//!   schemas as compact JSON — the rule of the workload scorer, so a replay's
//!   costs are comparable with its baseline; the completion has
//!   `x-tollgate-sim-output-tokens` tokens (or the configured default),
//!   capped by `max_tokens` with `finish_reason: "length"`;
//! * provider prompt caching: a prompt whose first 1,024+ tokens (in steps of
//!   128) were sent to the same model before, and not idle longer than
//!   `prompt_cache_ttl_ms` on the gateway's clock, reports them as cached;
//! * latency: `latency_ms` before the first token, `ms_per_token` after;
//! * faults on request, `x-tollgate-sim-fault: KIND[xN][@MODEL]` with KIND
//!   `429` (with `Retry-After: 1`), `500`, `503`, `timeout`, `drop` (a stream
//!   cut halfway, or a reset connection), `slow:MS` (answer MS later) or
//!   `no-usage`; `xN` limits it to the first N attempts at a model (then it
//!   recovers: retries can be tested), `@MODEL` to one model (ladders);
//! * faults at random, from the provider's config: `error_rate` (500),
//!   `rate_limit_rate` (429 with `retry_after_s`), `drop_rate`, `slow_rate`
//!   with `slow_ms`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;

use std::sync::Arc;

use super::{ProviderError, UpstreamCall, UpstreamReply};
use crate::api;
use crate::clock::Clock;
use crate::config::SimConfig;
use crate::pricing::{Catalog, Usage};

/// Tokens before the first cacheable prefix, and the step after it (OpenAI's rule).
const CACHE_MIN_TOKENS: usize = 1024;
const CACHE_STEP_TOKENS: usize = 128;

pub struct SimProvider {
    cfg: SimConfig,
    catalog: Catalog,
    /// Prefix hashes seen per model, with when each was last sent (gateway
    /// clock), for prompt caching.
    prefixes: moka::sync::Cache<[u8; 32], u64>,
    clock: Arc<dyn Clock>,
}

/// A simulated completion.
pub struct SimAnswer {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub content: String,
    pub finish: &'static str,
    pub usage: Usage,
}

const WORDS: [&str; 32] = [
    "the",
    "answer",
    "depends",
    "on",
    "your",
    "plan",
    "and",
    "settings",
    "first",
    "check",
    "that",
    "account",
    "is",
    "active",
    "then",
    "open",
    "billing",
    "page",
    "select",
    "option",
    "you",
    "need",
    "confirm",
    "change",
    "it",
    "takes",
    "effect",
    "immediately",
    "for",
    "all",
    "users",
    "team",
];

impl SimProvider {
    pub fn new(cfg: SimConfig, catalog: Catalog, clock: Arc<dyn Clock>) -> Self {
        Self {
            cfg,
            catalog,
            prefixes: moka::sync::Cache::builder().max_capacity(500_000).build(),
            clock,
        }
    }

    /// Computes the answer to a call (no waiting, no faults).
    pub fn answer(&self, call: &UpstreamCall) -> Result<SimAnswer, ProviderError> {
        let model = call
            .body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if self.catalog.get(&model).is_none_or(|p| p.tier < 1) {
            return Err(ProviderError::Status {
                status: 404,
                message: format!(
                    "The model `{model}` does not exist or you do not have access to it."
                ),
                retry_after_s: None,
            });
        }
        let (prompt, billed_chars) = billed_input(&call.body);
        let prompt_tokens = u32::try_from(chars_to_tokens(billed_chars)).unwrap_or(u32::MAX);
        let cached_tokens = self.prompt_cache(&model, prompt.as_bytes());

        let wanted = call
            .sim_output_tokens
            .unwrap_or(self.cfg.default_output_tokens);
        let max = call
            .body
            .get("max_completion_tokens")
            .or_else(|| call.body.get("max_tokens"))
            .and_then(Value::as_u64)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        let (completion_tokens, finish) = match max {
            Some(m) if m < wanted => (m, "length"),
            _ => (wanted, "stop"),
        };

        let mut seed_hasher = blake3::Hasher::new();
        seed_hasher.update(model.as_bytes());
        seed_hasher.update(&[0]);
        seed_hasher.update(prompt.as_bytes());
        let seed = seed_hasher.finalize();
        let content = generate_text(seed.as_bytes(), completion_tokens as usize * 4);
        Ok(SimAnswer {
            id: format!("chatcmpl-sim-{}", &seed.to_hex()[..24]),
            created: 1_700_000_000,
            model,
            content,
            finish,
            usage: Usage {
                prompt_tokens,
                cached_tokens: cached_tokens.min(prompt_tokens),
                cache_write_tokens: 0,
                completion_tokens,
            },
        })
    }

    /// Whether `key` (a prompt prefix) was sent within the prompt cache's
    /// idle time; records it as just used.
    pub fn seen_prefix(&self, key: &[u8]) -> bool {
        let now = self.clock.now_ms();
        let k = *blake3::hash(key).as_bytes();
        let hit = self
            .prefixes
            .get(&k)
            .is_some_and(|last| now.saturating_sub(last) <= self.cfg.prompt_cache_ttl_ms);
        self.prefixes.insert(k, now);
        hit
    }

    /// Tokens of the longest prefix (≥ 1,024 tokens, in 128 token steps) of
    /// this prompt sent to this model within the cache's idle time; records
    /// this prompt's prefixes as just used.
    fn prompt_cache(&self, model: &str, prompt: &[u8]) -> u32 {
        let now = self.clock.now_ms();
        let mut hasher = blake3::Hasher::new();
        hasher.update(model.as_bytes());
        hasher.update(&[0]);
        let mut cached = 0usize;
        let mut done = 0usize;
        let mut tokens = CACHE_MIN_TOKENS;
        while tokens * 4 <= prompt.len() {
            hasher.update(&prompt[done..tokens * 4]);
            done = tokens * 4;
            let key = *hasher.finalize().as_bytes();
            if self
                .prefixes
                .get(&key)
                .is_some_and(|last| now.saturating_sub(last) <= self.cfg.prompt_cache_ttl_ms)
            {
                cached = tokens;
            }
            self.prefixes.insert(key, now);
            tokens += CACHE_STEP_TOKENS;
        }
        u32::try_from(cached).unwrap_or(u32::MAX)
    }

    /// The injected fault of a call: `CODE` for every model, `CODE@MODEL`
    /// for one model only (to exercise fallback ladders).
    fn fault(call: &UpstreamCall) -> Option<ProviderError> {
        match Self::fault_kind(call)? {
            "429" => Some(ProviderError::Status {
                status: 429,
                message: "Rate limit reached (simulated)".into(),
                retry_after_s: Some(1),
            }),
            "500" => Some(ProviderError::Status {
                status: 500,
                message: "The server had an error while processing your request (simulated)".into(),
                retry_after_s: None,
            }),
            "503" => Some(ProviderError::Status {
                status: 503,
                message: "The engine is currently overloaded (simulated)".into(),
                retry_after_s: None,
            }),
            "timeout" => Some(ProviderError::Timeout(0)),
            "drop" if !call.stream => Some(ProviderError::Connect(
                "connection reset by peer (simulated)".into(),
            )),
            _ => None,
        }
    }

    /// The fault kind asked for this call, if it applies to this model and attempt.
    fn fault_kind(call: &UpstreamCall) -> Option<&str> {
        let spec = call.sim_fault.as_deref()?;
        let (spec, only) = match spec.split_once('@') {
            Some((c, m)) => (c, Some(m)),
            None => (spec, None),
        };
        let model = call.body.get("model").and_then(Value::as_str).unwrap_or("");
        if only.is_some_and(|m| m != model) {
            return None;
        }
        let limited = spec
            .rsplit_once('x')
            .and_then(|(kind, n)| Some((kind, n.parse::<u32>().ok()?)));
        match limited {
            Some((kind, attempts)) => (call.attempt <= attempts).then_some(kind),
            None => Some(spec),
        }
    }

    /// A fault drawn at the configured rates.
    fn random_fault(&self) -> Option<ProviderError> {
        let r = crate::pipeline::resilience::jitter();
        if r < self.cfg.error_rate {
            return Some(ProviderError::Status {
                status: 500,
                message: "The server had an error while processing your request (simulated)".into(),
                retry_after_s: None,
            });
        }
        if r < self.cfg.error_rate + self.cfg.rate_limit_rate {
            return Some(ProviderError::Status {
                status: 429,
                message: "Rate limit reached (simulated)".into(),
                retry_after_s: Some(self.cfg.retry_after_s),
            });
        }
        None
    }

    fn delay(&self, tokens: u32) -> Duration {
        Duration::from_millis(self.cfg.latency_ms + self.cfg.ms_per_token * u64::from(tokens))
    }

    /// Events of a streamed answer, each with the wait before it.
    pub fn stream_events(&self, a: &SimAnswer, include_usage: bool) -> Vec<(Duration, Bytes)> {
        let events = api::completion_sse(
            &a.id,
            a.created,
            &a.model,
            &a.content,
            a.finish,
            &a.usage,
            include_usage,
        );
        let per_event = if events.len() > 4 {
            let content_events = (events.len() - 3).max(1) as u64;
            Duration::from_millis(
                self.cfg.ms_per_token * u64::from(a.usage.completion_tokens) / content_events,
            )
        } else {
            Duration::ZERO
        };
        events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let wait = if i == 0 {
                    Duration::from_millis(self.cfg.latency_ms)
                } else {
                    per_event
                };
                (wait, e)
            })
            .collect()
    }
}

/// The prompt as the provider sees it (for prefix caching) and the number of
/// characters billed as input: message contents, tool-call names and
/// arguments, and the tool schemas serialized as Python's `json.dumps` does.
fn billed_input(body: &serde_json::Map<String, Value>) -> (String, usize) {
    let mut prompt = String::new();
    let mut chars = 0usize;
    if let Some(Value::Array(messages)) = body.get("messages") {
        for m in messages {
            let (text, _) = api::message_text(m);
            chars += text.chars().count();
            prompt.push_str(&text);
            prompt.push('\u{1e}');
            if let Some(Value::Array(calls)) = m.get("tool_calls") {
                for c in calls {
                    for k in ["name", "arguments"] {
                        if let Some(s) = c
                            .get("function")
                            .and_then(|f| f.get(k))
                            .and_then(Value::as_str)
                        {
                            chars += s.chars().count();
                            prompt.push_str(s);
                        }
                    }
                }
            }
        }
    }
    if let Some(tools) = body.get("tools") {
        chars += py_json_len(tools);
        prompt.push_str(&tools.to_string());
    }
    (prompt, chars)
}

/// Characters / 4, rounded half to even.
fn chars_to_tokens(chars: usize) -> usize {
    let (q, r) = (chars / 4, chars % 4);
    match r {
        0 | 1 => q,
        3 => q + 1,
        _ => q + (q % 2),
    }
}

/// Length of `json.dumps(v)` with Python's defaults (", " and ": "
/// separators, non-ASCII escaped as \uXXXX).
fn py_json_len(v: &Value) -> usize {
    fn str_len(s: &str) -> usize {
        2 + s
            .chars()
            .map(|c| match c {
                '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
                c if (c as u32) < 0x20 => 6,
                c if (c as u32) > 0xFFFF => 12,
                c if (c as u32) > 0x7F => 6,
                _ => 1,
            })
            .sum::<usize>()
    }
    let sep = |n: usize| 2 * n.saturating_sub(1);
    match v {
        Value::Null => 4,
        Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        Value::Number(n) => n.to_string().len(),
        Value::String(s) => str_len(s),
        Value::Array(a) => 2 + a.iter().map(py_json_len).sum::<usize>() + sep(a.len()),
        Value::Object(o) => {
            2 + o
                .iter()
                .map(|(k, v)| str_len(k) + 2 + py_json_len(v))
                .sum::<usize>()
                + sep(o.len())
        }
    }
}

/// Deterministic filler text of about `chars` characters.
fn generate_text(seed: &[u8; 32], chars: usize) -> String {
    let mut out = String::with_capacity(chars + 16);
    let mut i = 0usize;
    while out.len() < chars {
        let b = seed[i % 32] as usize ^ (i * 7);
        let w = WORDS[b % WORDS.len()];
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(w);
        i += 1;
    }
    out.truncate(chars.max(1));
    if let Some(first) = out.get(..1) {
        let upper = first.to_uppercase();
        out.replace_range(..1, &upper);
    }
    if chars > 1 {
        out.pop();
        out.push('.');
    }
    out
}

#[async_trait::async_trait]
impl super::Provider for SimProvider {
    fn kind(&self) -> &'static str {
        "sim"
    }

    /// A batch completes `batch_latency_ms` after it was sent; each call is
    /// answered (or fails) as it would alone.
    async fn batch(&self, calls: Vec<UpstreamCall>) -> Option<super::BatchAnswers> {
        tokio::time::sleep(Duration::from_millis(self.cfg.batch_latency_ms)).await;
        let mut out = Vec::with_capacity(calls.len());
        for c in calls {
            out.push(super::complete(self, c).await);
        }
        Some(Ok(out))
    }

    async fn chat(&self, call: &UpstreamCall) -> Result<UpstreamReply, ProviderError> {
        if let Some(e) = Self::fault(call).or_else(|| self.random_fault()) {
            return Err(e);
        }
        let kind = Self::fault_kind(call);
        let slow = kind
            .and_then(|k| k.strip_prefix("slow:"))
            .and_then(|ms| ms.parse::<u64>().ok())
            .or_else(|| {
                (crate::pipeline::resilience::jitter() < self.cfg.slow_rate)
                    .then_some(self.cfg.slow_ms)
            });
        if let Some(ms) = slow {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let drop =
            kind == Some("drop") || crate::pipeline::resilience::jitter() < self.cfg.drop_rate;
        if drop && !call.stream {
            return Err(ProviderError::Connect(
                "connection reset by peer (simulated)".into(),
            ));
        }
        let a = self.answer(call)?;
        // An upstream that reports no usage at all (some OpenAI-compatible servers).
        let no_usage = call.sim_fault.as_deref() == Some("no-usage");
        if call.stream {
            let include_usage = !no_usage
                && call
                    .body
                    .get("stream_options")
                    .and_then(|o| o.get("include_usage"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
            let mut events: Vec<(Duration, Result<Bytes, ProviderError>)> = self
                .stream_events(&a, include_usage)
                .into_iter()
                .map(|(w, e)| (w, Ok(e)))
                .collect();
            if drop {
                // The connection goes halfway through: no usage, no [DONE].
                events.truncate(events.len() / 2);
                events.push((
                    Duration::ZERO,
                    Err(ProviderError::Protocol("stream dropped (simulated)".into())),
                ));
            }
            let stream = futures_util::stream::iter(events).then(|(wait, e)| async move {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                e
            });
            return Ok(UpstreamReply::Stream(Box::pin(stream)));
        }
        let wait = self.delay(a.usage.completion_tokens);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let mut body =
            api::completion_json(&a.id, a.created, &a.model, &a.content, a.finish, &a.usage);
        if no_usage && let Some(o) = body.as_object_mut() {
            o.remove("usage");
        }
        Ok(UpstreamReply::Complete(Bytes::from(body.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(content: &str, out: Option<u32>, max: Option<u32>) -> UpstreamCall {
        let mut body =
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]});
        if let Some(m) = max {
            body["max_tokens"] = json!(m);
        }
        UpstreamCall {
            body: body.as_object().unwrap().clone(),
            stream: false,
            sim_output_tokens: out,
            sim_fault: None,
            attempt: 1,
        }
    }

    fn sim() -> SimProvider {
        SimProvider::new(
            SimConfig::default(),
            Catalog::builtin().unwrap(),
            Arc::new(crate::clock::ManualClock::new(0)),
        )
    }

    #[test]
    fn usage_is_characters_over_four_and_output_follows_the_header() {
        let s = sim();
        let a = s
            .answer(&call("What is the refund window?", Some(40), None))
            .unwrap();
        // 26 characters / 4 = 6.5, rounded half to even
        assert_eq!(a.usage.prompt_tokens, 6);
        assert_eq!(a.usage.completion_tokens, 40);
        assert_eq!(a.content.len(), 160);
        assert_eq!(a.finish, "stop");
        let b = s
            .answer(&call("What is the refund window?", Some(40), None))
            .unwrap();
        assert_eq!(a.content, b.content, "deterministic");
        let c = s.answer(&call("x", Some(40), Some(10))).unwrap();
        assert_eq!((c.usage.completion_tokens, c.finish), (10, "length"));
    }

    #[test]
    fn repeated_long_prefix_is_reported_as_cached() {
        let s = sim();
        let doc = "lorem ipsum ".repeat(500); // 6000 chars, 1500 tokens
        let first = s
            .answer(&call(&format!("{doc} question one"), None, None))
            .unwrap();
        assert_eq!(first.usage.cached_tokens, 0);
        let second = s
            .answer(&call(&format!("{doc} question two"), None, None))
            .unwrap();
        assert_eq!(second.usage.cached_tokens, 1408);
        let short = s.answer(&call("short", None, None)).unwrap();
        assert_eq!(short.usage.cached_tokens, 0);
    }

    #[test]
    fn billed_characters_follow_the_scorers_rule() {
        // `len(json.dumps(v))` in Python is 137 for this value.
        let v = json!([{"type": "function", "function": {"name": "get_page", "parameters":
            {"cursor": "ab\"c", "n": 3, "ok": true, "x": null, "é": 1.5}}}]);
        assert_eq!(py_json_len(&v), 137);
        assert_eq!(
            (0..8).map(chars_to_tokens).collect::<Vec<_>>(),
            [0, 0, 0, 1, 1, 1, 2, 2]
        );
        assert_eq!(chars_to_tokens(10), 2); // 2.5 rounds to even
        assert_eq!(chars_to_tokens(14), 4); // 3.5 rounds to even
        let body = json!({"model": "m", "messages": [
            {"role": "user", "content": "abcd"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "xy"}]});
        assert_eq!(billed_input(body.as_object().unwrap()).1, 4 + 1 + 2 + 2);
    }

    #[test]
    fn prompt_cache_expires_on_the_gateways_clock() {
        let clock = Arc::new(crate::clock::ManualClock::new(0));
        let s = SimProvider::new(
            SimConfig::default(),
            Catalog::builtin().unwrap(),
            clock.clone(),
        );
        let doc = "lorem ipsum ".repeat(500);
        let ask = |q: &str| s.answer(&call(&format!("{doc}{q}"), None, None)).unwrap();
        assert_eq!(ask("one").usage.cached_tokens, 0);
        clock.advance(SimConfig::default().prompt_cache_ttl_ms);
        assert_eq!(ask("two").usage.cached_tokens, 1408, "still warm");
        clock.advance(SimConfig::default().prompt_cache_ttl_ms + 1);
        assert_eq!(ask("three").usage.cached_tokens, 0, "idle too long");
    }

    #[test]
    fn unknown_models_are_404() {
        let s = sim();
        let mut c = call("x", None, None);
        c.body.insert("model".into(), json!("gpt-9"));
        assert!(matches!(
            s.answer(&c),
            Err(ProviderError::Status { status: 404, .. })
        ));
    }
}
