//! The OpenAI wire format: request validation, error bodies, and responses
//! the gateway writes itself (cache hits, fixed answers).

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Map, Value, json};

use crate::pricing::Usage;

/// An error in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code,
            param: None,
        }
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn body(&self) -> Bytes {
        let v = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        Bytes::from(v.to_string())
    }
}

/// A validated chat completion request. The body is kept as JSON so fields
/// the gateway does not know about reach the upstream untouched.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// The client asked for the final usage chunk of a stream.
    pub include_usage: bool,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub has_tools: bool,
    pub json_mode: bool,
}

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

impl ChatRequest {
    /// Parses and validates a request body.
    pub fn parse(raw: &[u8]) -> Result<Self, ApiError> {
        let body = parse_object(raw)?;
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) | None => {
                return Err(ApiError::invalid(
                    "missing_required_parameter",
                    "you must provide a model parameter",
                )
                .param("model"));
            }
            Some(other) => {
                return Err(type_error("model", "a string", other));
            }
        };
        let messages = match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => m,
            Some(Value::Array(_)) => {
                return Err(ApiError::invalid(
                    "empty_array",
                    "`messages` must contain at least one message",
                )
                .param("messages"));
            }
            None => {
                return Err(ApiError::invalid(
                    "missing_required_parameter",
                    "missing required parameter: `messages`",
                )
                .param("messages"));
            }
            Some(other) => return Err(type_error("messages", "an array", other)),
        };
        for (i, m) in messages.iter().enumerate() {
            validate_message(i, m)?;
        }
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(type_error("stream", "a boolean", other)),
        };
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let max_tokens = match body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
        {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
                _ => return Err(type_error("max_tokens", "a positive integer", v)),
            },
        };
        let temperature = match body.get("temperature") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(t) if (0.0..=2.0).contains(&t) => Some(t as f32),
                _ => return Err(type_error("temperature", "a number between 0 and 2", v)),
            },
        };
        let has_tools = matches!(body.get("tools"), Some(Value::Array(t)) if !t.is_empty())
            || matches!(body.get("functions"), Some(Value::Array(f)) if !f.is_empty());
        let json_mode = matches!(
            body.get("response_format")
                .and_then(|f| f.get("type"))
                .and_then(Value::as_str),
            Some("json_object" | "json_schema")
        );
        Ok(Self {
            body,
            model,
            stream,
            include_usage,
            max_tokens,
            temperature,
            has_tools,
            json_mode,
        })
    }

    pub fn messages(&self) -> &[Value] {
        match self.body.get("messages") {
            Some(Value::Array(m)) => m,
            _ => &[],
        }
    }
}

/// A request body that must be a JSON object, with OpenAI-style errors for
/// bytes that are not UTF-8, not JSON, or not an object.
pub fn parse_object(raw: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(raw).map_err(|e| {
        ApiError::invalid(
            "invalid_encoding",
            format!("request body is not valid UTF-8: {e}"),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })?;
    match value {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::invalid(
            "invalid_json",
            "request body must be a JSON object",
        )),
    }
}

fn type_error(param: &str, expected: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::invalid(
        "invalid_type",
        format!("`{param}` must be {expected}, got {got}"),
    )
    .param(param)
}

fn validate_message(i: usize, m: &Value) -> Result<(), ApiError> {
    let at = |f: &str| format!("messages[{i}].{f}");
    let Value::Object(obj) = m else {
        return Err(type_error(&format!("messages[{i}]"), "an object", m));
    };
    let role = match obj.get("role") {
        Some(Value::String(r)) => r.as_str(),
        Some(other) => return Err(type_error(&at("role"), "a string", other)),
        None => {
            return Err(ApiError::invalid(
                "missing_required_parameter",
                format!("missing required parameter: `{}`", at("role")),
            )
            .param(at("role")));
        }
    };
    if !ROLES.contains(&role) {
        return Err(ApiError::invalid(
            "invalid_value",
            format!(
                "`{}` must be one of {}, got {role:?}",
                at("role"),
                ROLES.join(", ")
            ),
        )
        .param(at("role")));
    }
    match obj.get("content") {
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(parts)) => {
            for (j, p) in parts.iter().enumerate() {
                if !p.get("type").is_some_and(Value::is_string) {
                    return Err(ApiError::invalid(
                        "invalid_value",
                        format!("`{}[{j}]` must be an object with a `type`", at("content")),
                    )
                    .param(at("content")));
                }
            }
            Ok(())
        }
        None | Some(Value::Null) if role == "assistant" => Ok(()),
        None => Err(ApiError::invalid(
            "missing_required_parameter",
            format!("missing required parameter: `{}`", at("content")),
        )
        .param(at("content"))),
        Some(other) => Err(type_error(
            &at("content"),
            "a string or an array of content parts",
            other,
        )),
    }
}

/// The text of a message's content and whether the message is text only
/// (no image/audio parts, no tool calls).
pub fn message_text(m: &Value) -> (String, bool) {
    let has_calls = m.get("tool_calls").is_some_and(|c| !c.is_null())
        || m.get("function_call").is_some_and(|c| !c.is_null());
    match m.get("content") {
        Some(Value::String(s)) => (s.clone(), !has_calls),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            let mut only_text = !has_calls;
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(t);
                    }
                    _ => only_text = false,
                }
            }
            // All-text parts may be rewritten: they become one string.
            (text, only_text)
        }
        _ => (String::new(), false),
    }
}

/// `usage` object in OpenAI's shape; prompt-cache writes (an Anthropic
/// upstream's) as `cache_creation_input_tokens`, when there were any.
pub fn usage_json(u: &Usage) -> Value {
    let mut v = json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    });
    if u.cache_write_tokens > 0 {
        v["cache_creation_input_tokens"] = json!(u.cache_write_tokens);
    }
    v
}

/// A complete (non-streamed) chat completion written by the gateway.
pub fn completion_json(
    id: &str,
    created: u64,
    model: &str,
    content: &str,
    finish: &str,
    usage: &Usage,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish,
            "logprobs": null,
        }],
        "usage": usage_json(usage),
    })
}

/// The same answer as server-sent events: a role chunk, the content in
/// word-sized pieces, the finish chunk, the usage chunk if asked, `[DONE]`.
pub fn completion_sse(
    id: &str,
    created: u64,
    model: &str,
    content: &str,
    finish: &str,
    usage: &Usage,
    include_usage: bool,
) -> Vec<Bytes> {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for piece in split_keep_spaces(content, 16) {
        events.push(chunk(json!({"content": piece}), Value::Null));
    }
    events.push(chunk(json!({}), json!(finish)));
    if include_usage {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage_json(usage),
        }));
    }
    let mut out: Vec<Bytes> = events
        .into_iter()
        .map(|e| sse_data(&e.to_string()))
        .collect();
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

pub fn sse_data(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// Splits text into pieces of about `n` characters at word boundaries; the
/// pieces concatenate back to exactly `text`.
fn split_keep_spaces(text: &str, n: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut last_space = None;
    for (i, c) in text.char_indices() {
        if c == ' ' {
            last_space = Some(i);
        }
        if i - start >= n
            && let Some(s) = last_space
            && s > start
        {
            out.push(&text[start..s]);
            start = s;
            last_space = None;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        ChatRequest::parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn parses_a_valid_request() {
        let r = ChatRequest::parse(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true,
                 "stream_options":{"include_usage":true},"max_tokens":5,"temperature":0.2,
                 "response_format":{"type":"json_object"}}"#,
        )
        .unwrap();
        assert_eq!(r.model, "gpt-4o");
        assert!(r.stream && r.include_usage && r.json_mode && !r.has_tools);
        assert_eq!(r.max_tokens, Some(5));
    }

    #[test]
    fn bad_requests_name_the_problem() {
        assert_eq!(err("{not json").code, "invalid_json");
        assert_eq!(err("[1]").code, "invalid_json");
        assert_eq!(
            err(r#"{"messages":[{"role":"user","content":"x"}]}"#)
                .param
                .as_deref(),
            Some("model")
        );
        assert_eq!(err(r#"{"model":"m"}"#).param.as_deref(), Some("messages"));
        assert_eq!(err(r#"{"model":"m","messages":"hi"}"#).code, "invalid_type");
        assert_eq!(err(r#"{"model":"m","messages":[]}"#).code, "empty_array");
        let e = err(r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#);
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = err(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#);
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = err(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(
            ChatRequest::parse(&[0xff, 0xfe]).unwrap_err().code,
            "invalid_encoding"
        );
        let body: Value = serde_json::from_slice(&err("{").body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn message_text_flags_non_text_content() {
        let (t, only) = message_text(&json!({"role":"user","content":"hello"}));
        assert_eq!((t.as_str(), only), ("hello", true));
        let (t, only) = message_text(
            &json!({"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{}}]}),
        );
        assert_eq!((t.as_str(), only), ("a", false));
        let (_, only) = message_text(&json!({"role":"assistant","content":null,"tool_calls":[{}]}));
        assert!(!only);
    }

    #[test]
    fn usage_in_openai_and_anthropic_shapes() {
        let openai: WireUsage = serde_json::from_value(json!({
            "prompt_tokens": 2000, "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 1024}
        }))
        .unwrap();
        assert_eq!(
            Usage::from(openai),
            Usage {
                prompt_tokens: 2000,
                cached_tokens: 1024,
                cache_write_tokens: 0,
                completion_tokens: 50
            }
        );
        let anthropic: WireUsage = serde_json::from_value(json!({
            "input_tokens": 100, "output_tokens": 50,
            "cache_read_input_tokens": 3000, "cache_creation_input_tokens": 2000
        }))
        .unwrap();
        assert_eq!(
            Usage::from(anthropic),
            Usage {
                prompt_tokens: 5100,
                cached_tokens: 3000,
                cache_write_tokens: 2000,
                completion_tokens: 50
            }
        );
    }

    #[test]
    fn sse_pieces_reassemble_the_answer() {
        let text = "The quick brown fox jumps over the lazy dog, again and again.";
        assert_eq!(split_keep_spaces(text, 8).concat(), text);
        let events = completion_sse("id", 1, "m", text, "stop", &Usage::default(), true);
        let mut got = String::new();
        for e in &events[..events.len() - 1] {
            let s = std::str::from_utf8(e).unwrap();
            let v: Value = serde_json::from_str(s.trim_start_matches("data: ").trim()).unwrap();
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                got.push_str(c);
            }
        }
        assert_eq!(got, text);
        assert_eq!(events.last().unwrap().as_ref(), b"data: [DONE]\n\n");
    }
}

/// The parts of an upstream completion (or stream chunk) the gateway reads.
#[derive(Debug, serde::Deserialize, Default)]
pub struct WireCompletion {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub choices: Vec<WireChoice>,
    #[serde(default)]
    pub usage: Option<WireUsage>,
}

#[derive(Debug, serde::Deserialize, Default)]
pub struct WireChoice {
    #[serde(default)]
    pub message: Option<WireMessage>,
    #[serde(default)]
    pub delta: Option<WireMessage>,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Debug, serde::Deserialize, Default)]
pub struct WireMessage {
    #[serde(default)]
    pub content: Option<String>,
}

/// Usage as OpenAI reports it (`prompt_tokens`, cached tokens in
/// `prompt_tokens_details`) or as Anthropic does (`input_tokens` without the
/// cache, `cache_read_input_tokens`, `cache_creation_input_tokens`).
#[derive(Debug, serde::Deserialize, Default, Clone, Copy)]
pub struct WireUsage {
    #[serde(default)]
    pub prompt_tokens: Option<u32>,
    #[serde(default)]
    pub completion_tokens: Option<u32>,
    #[serde(default)]
    pub prompt_tokens_details: Option<WireDetails>,
    #[serde(default)]
    pub input_tokens: Option<u32>,
    #[serde(default)]
    pub output_tokens: Option<u32>,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u32>,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u32>,
}

#[derive(Debug, serde::Deserialize, Default, Clone, Copy)]
pub struct WireDetails {
    #[serde(default)]
    pub cached_tokens: Option<u32>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        let read = u.cache_read_input_tokens.unwrap_or(0);
        let written = u.cache_creation_input_tokens.unwrap_or(0);
        match u.prompt_tokens {
            // OpenAI: prompt_tokens counts every prompt token, cached ones included.
            Some(prompt) => Usage {
                prompt_tokens: prompt,
                cached_tokens: u
                    .prompt_tokens_details
                    .and_then(|d| d.cached_tokens)
                    .unwrap_or(read),
                cache_write_tokens: written,
                completion_tokens: u.completion_tokens.or(u.output_tokens).unwrap_or(0),
            },
            // Anthropic: input_tokens excludes what was read from or written to the cache.
            None => Usage {
                prompt_tokens: u
                    .input_tokens
                    .unwrap_or(0)
                    .saturating_add(read)
                    .saturating_add(written),
                cached_tokens: read,
                cache_write_tokens: written,
                completion_tokens: u.output_tokens.or(u.completion_tokens).unwrap_or(0),
            },
        }
    }
}
