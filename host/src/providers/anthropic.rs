//! Anthropic's Messages API (`/v1/messages`). Clients keep speaking the
//! OpenAI chat format; this provider translates each call to a Messages
//! request and the answer (JSON or stream) back to a chat completion, so
//! the rest of the gateway never sees the difference.
//!
//! Provider prompt caching: Anthropic caches only up to explicit
//! `cache_control` breakpoints. With `prompt_caching = true` the request
//! gets one on the last tool schema and one on the last system block — the
//! stable prefix, which the gateway keeps first and byte-identical (tools,
//! then system, then the conversation). The answer's
//! `cache_creation_input_tokens` and `cache_read_input_tokens` are passed
//! on in the usage, so the ledger bills writes at the cache-write price and
//! reads at the cached-input price.

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderName, HeaderValue};
use serde_json::{Map, Value, json};

use super::client::{self as upstream, UpstreamHttp};
use super::sse::{SseSplitter, event_data};
use super::{ProviderError, UpstreamCall, UpstreamReply};
use crate::config::AnthropicConfig;
use crate::headers::SIM_OUTPUT_TOKENS;

/// `max_tokens` is required by the Messages API; used when the client set none.
const DEFAULT_MAX_TOKENS: u64 = 4096;
const API_VERSION: &str = "2023-06-01";

const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");

pub struct AnthropicProvider {
    http: UpstreamHttp,
    key: Option<HeaderValue>,
    prompt_caching: bool,
}

impl AnthropicProvider {
    pub fn new(cfg: &AnthropicConfig, key: Option<String>) -> Result<Self, String> {
        Ok(Self {
            http: UpstreamHttp::to(
                &cfg.base_url,
                "messages",
                cfg.connect_timeout_ms,
                cfg.max_idle_connections,
                cfg.timeout_ms,
            )?,
            key: key.as_deref().map(upstream::key_header).transpose()?,
            prompt_caching: cfg.prompt_caching,
        })
    }
}

#[async_trait::async_trait]
impl super::Provider for AnthropicProvider {
    fn kind(&self) -> &'static str {
        "anthropic"
    }

    async fn chat(&self, call: &UpstreamCall) -> Result<UpstreamReply, ProviderError> {
        let body = messages_request(&call.body, call.stream, self.prompt_caching)?;
        let bytes =
            serde_json::to_vec(&body).map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let mut headers = Vec::with_capacity(3);
        headers.push((ANTHROPIC_VERSION, HeaderValue::from_static(API_VERSION)));
        if let Some(k) = &self.key {
            headers.push((API_KEY, k.clone()));
        }
        if let Some(n) = call.sim_output_tokens {
            headers.push((SIM_OUTPUT_TOKENS, HeaderValue::from(n)));
        }
        let resp = self.http.post_json(&headers, bytes).await?;
        if call.stream {
            let mut translate = StreamTranslator::default();
            let mut upstream = upstream::stream(resp);
            let stream = async_stream(move |tx| async move {
                while let Some(item) = upstream.next().await {
                    match item {
                        Ok(b) => {
                            for e in translate.push(&b) {
                                if tx.send(Ok(e)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            });
            return Ok(UpstreamReply::Stream(stream));
        }
        let body = self.http.body(resp).await?;
        let msg: Value = serde_json::from_slice(&body)
            .map_err(|e| ProviderError::Protocol(format!("not JSON: {e}")))?;
        Ok(UpstreamReply::Complete(Bytes::from(
            chat_completion(&msg).to_string(),
        )))
    }
}

/// A stream fed by a task, so a translation can hold state across chunks.
fn async_stream<F, Fut>(f: F) -> super::ByteStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, ProviderError>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(32);
    tokio::spawn(f(tx));
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

fn bad(msg: impl Into<String>) -> ProviderError {
    ProviderError::Status {
        status: 400,
        message: msg.into(),
        retry_after_s: None,
    }
}

/// The text of an OpenAI message (its content string, or its text parts).
fn text_of(m: &Value) -> String {
    crate::api::message_text(m).0
}

/// An OpenAI chat request as a Messages request. System messages become the
/// `system` blocks (in order), tool results `tool_result` blocks, assistant
/// tool calls `tool_use` blocks; consecutive messages of one role merge, as
/// the API wants user and assistant turns to alternate.
pub fn messages_request(
    body: &Map<String, Value>,
    stream: bool,
    prompt_caching: bool,
) -> Result<Map<String, Value>, ProviderError> {
    let mut out = Map::new();
    out.insert(
        "model".into(),
        body.get("model").cloned().unwrap_or(Value::Null),
    );
    let max = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max));
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages must be an array"))?;
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let (role, blocks) = match role {
            "system" | "developer" => {
                system.push(json!({"type": "text", "text": text_of(m)}));
                continue;
            }
            "user" => ("user", vec![json!({"type": "text", "text": text_of(m)})]),
            "assistant" => {
                let mut blocks = Vec::new();
                let text = text_of(m);
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                for c in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let f = c.get("function").cloned().unwrap_or(Value::Null);
                    let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": c.get("id").cloned().unwrap_or(Value::Null),
                        "name": f.get("name").cloned().unwrap_or(Value::Null),
                        "input": serde_json::from_str::<Value>(args).unwrap_or_else(|_| json!({})),
                    }));
                }
                ("assistant", blocks)
            }
            "tool" => (
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": m.get("tool_call_id").cloned().unwrap_or(Value::Null),
                    "content": text_of(m),
                })],
            ),
            other => return Err(bad(format!("message role {other:?} is not supported"))),
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((r, b)) if r == role => b.extend(blocks),
            _ => turns.push((role.to_string(), blocks)),
        }
    }
    let mut tools: Vec<Value> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|ts| {
            ts.iter()
                .filter_map(|t| t.get("function"))
                .map(|f| {
                    json!({
                        "name": f.get("name").cloned().unwrap_or(Value::Null),
                        "description": f.get("description").cloned().unwrap_or(json!("")),
                        "input_schema": f.get("parameters").cloned().unwrap_or(json!({"type": "object"})),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if prompt_caching {
        if let Some(Value::Object(last)) = tools.last_mut() {
            last.insert("cache_control".into(), json!({"type": "ephemeral"}));
        }
        if let Some(Value::Object(last)) = system.last_mut() {
            last.insert("cache_control".into(), json!({"type": "ephemeral"}));
        }
    }
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
        if let Some(choice) = body.get("tool_choice") {
            let c = match choice {
                Value::String(s) if s == "required" => json!({"type": "any"}),
                Value::String(s) if s == "none" => json!({"type": "none"}),
                Value::Object(o) => {
                    json!({"type": "tool", "name": o.get("function").and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null)})
                }
                _ => json!({"type": "auto"}),
            };
            out.insert("tool_choice".into(), c);
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert(
        "messages".into(),
        Value::Array(
            turns
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect(),
        ),
    );
    for (from, to) in [("temperature", "temperature"), ("top_p", "top_p")] {
        if let Some(v) = body.get(from) {
            out.insert(to.into(), v.clone());
        }
    }
    match body.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if stream {
        out.insert("stream".into(), Value::Bool(true));
    }
    Ok(out)
}

fn finish_reason(stop: Option<&str>) -> &'static str {
    match stop {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Anthropic's usage as an OpenAI usage object, through the gateway's own
/// reading of Anthropic's shape (`input_tokens` leaves out cache reads and
/// writes; `prompt_tokens` counts them all): reads become `cached_tokens`,
/// writes stay in `cache_creation_input_tokens` for the write price.
fn usage(u: &Value) -> Value {
    let wire = serde_json::from_value::<crate::api::WireUsage>(u.clone()).unwrap_or_default();
    crate::api::usage_json(&wire.into())
}

/// A Messages answer as a chat completion.
pub fn chat_completion(msg: &Value) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in msg
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": b.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": b.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into()),
                },
            })),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({
        "id": msg.get("id").cloned().unwrap_or(json!("msg")),
        "object": "chat.completion",
        "created": 0,
        "model": msg.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(msg.get("stop_reason").and_then(Value::as_str)),
        }],
        "usage": usage(msg.get("usage").unwrap_or(&Value::Null)),
    })
}

/// Turns Anthropic stream events into chat-completion chunks: a role chunk
/// at `message_start`, one content chunk per text delta, the finish reason
/// at `message_delta`, then a usage-only chunk and `[DONE]` at
/// `message_stop` (the gateway reads usage from it and drops it for
/// clients that did not ask for usage).
#[derive(Default)]
pub struct StreamTranslator {
    splitter: SseSplitter,
    id: String,
    model: String,
    usage: Map<String, Value>,
    finish: Option<&'static str>,
}

impl StreamTranslator {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        for event in self.splitter.push(bytes) {
            let Some(data) = event_data(&event) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            match v.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    let m = &v["message"];
                    self.id = m["id"].as_str().unwrap_or("msg").to_string();
                    self.model = m["model"].as_str().unwrap_or("").to_string();
                    if let Some(u) = m.get("usage").and_then(Value::as_object) {
                        self.usage.extend(u.clone());
                    }
                    out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
                }
                Some("content_block_delta") => {
                    if let Some(t) = v["delta"].get("text").and_then(Value::as_str) {
                        out.push(self.chunk(json!({"content": t}), None));
                    }
                }
                Some("message_delta") => {
                    self.finish = Some(finish_reason(v["delta"]["stop_reason"].as_str()));
                    if let Some(u) = v.get("usage").and_then(Value::as_object) {
                        self.usage.extend(u.clone());
                    }
                }
                Some("message_stop") => {
                    out.push(self.chunk(json!({}), Some(self.finish.unwrap_or("stop"))));
                    let usage_chunk = json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": 0,
                        "model": self.model, "choices": [],
                        "usage": usage(&Value::Object(self.usage.clone())),
                    });
                    out.push(crate::api::sse_data(&usage_chunk.to_string()));
                    out.push(crate::api::sse_data("[DONE]"));
                }
                Some("error") => {
                    let err = json!({"error": v.get("error").cloned().unwrap_or(Value::Null)});
                    out.push(crate::api::sse_data(&err.to_string()));
                }
                _ => {}
            }
        }
        out
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": 0, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        crate::api::sse_data(&c.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_request_becomes_a_messages_request_with_breakpoints_on_the_stable_prefix() {
        let body = json!({
            "model": "claude-sonnet-4-5",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "system", "content": "Account: 42"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "t1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "rain"},
                {"role": "user", "content": [{"type": "text", "text": "and tomorrow?"}]},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "temperature": 0.2, "stop": "END",
        });
        let r = messages_request(body.as_object().unwrap(), true, true).unwrap();
        assert_eq!(r["max_tokens"], 4096);
        assert_eq!(r["system"][1]["text"], "Account: 42");
        assert_eq!(r["system"][1]["cache_control"]["type"], "ephemeral");
        assert!(
            r["system"][0].get("cache_control").is_none(),
            "one breakpoint per part"
        );
        assert_eq!(r["tools"][0]["cache_control"]["type"], "ephemeral");
        assert_eq!(r["tools"][0]["input_schema"]["type"], "object");
        let m = r["messages"].as_array().unwrap();
        assert_eq!(
            m.len(),
            3,
            "the tool result and the next question merge into one user turn"
        );
        assert_eq!(m[1]["content"][0]["input"]["city"], "Oslo");
        assert_eq!(m[2]["content"][0]["type"], "tool_result");
        assert_eq!(m[2]["content"][1]["text"], "and tomorrow?");
        assert_eq!(r["stop_sequences"], json!(["END"]));
        assert_eq!(r["stream"], true);
        let plain = messages_request(body.as_object().unwrap(), false, false).unwrap();
        assert!(!Value::Object(plain).to_string().contains("cache_control"));
        let bad = json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]});
        assert!(messages_request(bad.as_object().unwrap(), false, true).is_err());
    }

    #[test]
    fn answers_and_streams_come_back_as_chat_completions_with_cache_usage() {
        let msg = json!({
            "id": "msg_1", "model": "claude-sonnet-4-5", "stop_reason": "end_turn",
            "content": [{"type": "text", "text": "Hello"}],
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 2000,
                      "cache_creation_input_tokens": 0, "output_tokens": 5},
        });
        let c = chat_completion(&msg);
        assert_eq!(c["choices"][0]["message"]["content"], "Hello");
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        let u: crate::pricing::Usage =
            serde_json::from_value::<crate::api::WireUsage>(c["usage"].clone())
                .unwrap()
                .into();
        assert_eq!(
            (
                u.prompt_tokens,
                u.cached_tokens,
                u.cache_write_tokens,
                u.completion_tokens
            ),
            (2010, 2000, 0, 5)
        );

        let events = [
            r#"{"type":"message_start","message":{"id":"msg_2","model":"claude-sonnet-4-5","usage":{"input_tokens":7,"cache_creation_input_tokens":1500,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" there"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":2}}"#,
            r#"{"type":"message_stop"}"#,
        ];
        let wire: String = events
            .iter()
            .map(|e| format!("event: x\ndata: {e}\n\n"))
            .collect();
        let mut t = StreamTranslator::default();
        let mut out = Vec::new();
        for chunk in wire.as_bytes().chunks(17) {
            out.extend(t.push(chunk));
        }
        let datas: Vec<String> = out.iter().filter_map(|e| event_data(e)).collect();
        assert_eq!(datas.last().unwrap(), "[DONE]");
        let text: String = datas
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(text, "Hi there");
        let usage_chunk: Value = serde_json::from_str(&datas[datas.len() - 2]).unwrap();
        let u: crate::pricing::Usage =
            serde_json::from_value::<crate::api::WireUsage>(usage_chunk["usage"].clone())
                .unwrap()
                .into();
        assert_eq!(
            (u.prompt_tokens, u.cache_write_tokens, u.completion_tokens),
            (1507, 1500, 2)
        );
        assert!(
            datas
                .iter()
                .any(|d| d.contains("\"finish_reason\":\"length\""))
        );
    }
}
