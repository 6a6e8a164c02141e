//! The simulator behind Anthropic's Messages API (`POST /v1/messages` on
//! `tollgate sim`), for testing the Anthropic provider offline. Answers come
//! from the same simulator as the chat endpoint; prompt caching follows
//! Anthropic's rules rather than OpenAI's: only the prefix up to the last
//! `cache_control` breakpoint (tools, then system, then messages) is cached,
//! if it is at least 1,024 tokens; the first request writes it
//! (`cache_creation_input_tokens`), repeats within the TTL read it
//! (`cache_read_input_tokens`), and `input_tokens` counts the rest.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::sim::SimProvider;
use super::{ProviderError, UpstreamCall};

const CACHE_MIN_TOKENS: usize = 1024;

fn bad(msg: impl Into<String>) -> ProviderError {
    ProviderError::Status {
        status: 400,
        message: msg.into(),
        retry_after_s: None,
    }
}

fn block_text(b: &Value) -> String {
    match b {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("text") => o.get("text").and_then(Value::as_str).unwrap_or("").into(),
            Some("tool_result") => block_text(o.get("content").unwrap_or(&Value::Null)),
            Some("tool_use") => o.get("input").map(Value::to_string).unwrap_or_default(),
            _ => String::new(),
        },
        Value::Array(a) => a.iter().map(block_text).collect::<Vec<_>>().join("\n"),
        _ => String::new(),
    }
}

fn has_breakpoint(v: &Value) -> bool {
    v.get("cache_control").is_some()
}

/// The answer to a Messages request: (the JSON message, the request asked to stream).
pub fn answer(
    sim: &SimProvider,
    body: &[u8],
    output_tokens: Option<u32>,
) -> Result<(Value, bool), ProviderError> {
    let req: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| bad(format!("request body is not a JSON object: {e}")))?;
    let model = req.get("model").and_then(Value::as_str).unwrap_or("");
    if req.get("max_tokens").and_then(Value::as_u64).is_none() {
        return Err(bad("max_tokens: Field required"));
    }
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages: Field required"))?;
    // The prompt in Anthropic's order, and where its last breakpoint ends.
    let mut prefix = String::new();
    let mut cached_upto = 0usize;
    let mut chat_messages = Vec::new();
    let mut push = |text: String, breakpoint: bool, prefix: &mut String| {
        prefix.push_str(&text);
        prefix.push('\u{1e}');
        if breakpoint {
            cached_upto = prefix.len();
        }
    };
    for t in req
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        push(t.to_string(), has_breakpoint(t), &mut prefix);
    }
    let mut system_text = Vec::new();
    match req.get("system") {
        Some(Value::Array(blocks)) => {
            for b in blocks {
                let text = block_text(b);
                system_text.push(text.clone());
                push(text, has_breakpoint(b), &mut prefix);
            }
        }
        Some(s @ Value::String(_)) => {
            system_text.push(block_text(s));
            push(block_text(s), false, &mut prefix);
        }
        _ => {}
    }
    if !system_text.is_empty() {
        chat_messages.push(json!({"role": "system", "content": system_text.join("\n")}));
    }
    for m in messages {
        let content = m.get("content").unwrap_or(&Value::Null);
        let breakpoint = content
            .as_array()
            .is_some_and(|blocks| blocks.iter().any(has_breakpoint));
        let text = block_text(content);
        chat_messages
            .push(json!({"role": m.get("role").cloned().unwrap_or(Value::Null), "content": text}));
        push(text, breakpoint, &mut prefix);
    }
    let mut chat = Map::new();
    chat.insert("model".into(), json!(model));
    chat.insert("messages".into(), Value::Array(chat_messages));
    chat.insert("max_tokens".into(), req["max_tokens"].clone());
    let a = sim.answer(&UpstreamCall {
        body: chat,
        stream: false,
        sim_output_tokens: output_tokens,
        sim_fault: None,
        attempt: 1,
    })?;
    let prompt = a.usage.prompt_tokens as usize;
    let cacheable = (cached_upto / 4).min(prompt);
    let (read, written) = if cacheable >= CACHE_MIN_TOKENS {
        let key = format!("anthropic\u{0}{model}\u{0}{}", &prefix[..cached_upto]);
        if sim.seen_prefix(key.as_bytes()) {
            (cacheable, 0)
        } else {
            (0, cacheable)
        }
    } else {
        (0, 0)
    };
    let msg = json!({
        "id": a.id.replace("chatcmpl-", "msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": a.content}],
        "stop_reason": if a.finish == "length" { "max_tokens" } else { "end_turn" },
        "stop_sequence": null,
        "usage": {
            "input_tokens": prompt - read - written,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "output_tokens": a.usage.completion_tokens,
        },
    });
    Ok((
        msg,
        req.get("stream").and_then(Value::as_bool) == Some(true),
    ))
}

fn event(kind: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// A message as Anthropic streams it.
pub fn stream_events(msg: &Value) -> Vec<Bytes> {
    let mut start = msg.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["usage"]["output_tokens"] = json!(1);
    let text = msg["content"][0]["text"].as_str().unwrap_or("");
    let mut out = vec![
        event(
            "message_start",
            &json!({"type": "message_start", "message": start}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    let chars: Vec<char> = text.chars().collect();
    for piece in chars.chunks(16) {
        let t: String = piece.iter().collect();
        out.push(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}),
        ));
    }
    out.push(event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    out.push(event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": null},
                "usage": {"output_tokens": msg["usage"]["output_tokens"]}}),
    ));
    out.push(event("message_stop", &json!({"type": "message_stop"})));
    out
}
