//! What plugins see of a request, and how a compressor's rewrite is applied
//! to the body that goes upstream.

use serde_json::Value;

use super::identity::Identity;
use crate::api::{ChatRequest, message_text};
use crate::plugins::types::{Message, RequestView, Rewrite, Tag};
use crate::tokens;

/// Builds the read-only view plugins get; prompt tokens are counted here,
/// natively, with the asked model's tokenizer.
pub fn build(request_id: &str, id: &Identity, req: &ChatRequest) -> RequestView {
    let messages: Vec<Message> = req
        .messages()
        .iter()
        .map(|m| {
            let (content, text_only) = message_text(m);
            Message {
                role: m
                    .get("role")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                content,
                text_only,
            }
        })
        .collect();
    let prompt_tokens = tokens::count_messages(
        &req.model,
        messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str())),
    );
    RequestView {
        request_id: request_id.to_string(),
        tenant: id.tenant.clone(),
        user: id.user.clone(),
        feature: id.feature.clone(),
        task: id.task.clone(),
        step: id.step,
        model: req.model.clone(),
        messages,
        prompt_tokens,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        stream: req.stream,
        has_tools: req.has_tools,
        json_mode: req.json_mode,
        tags: id
            .tags
            .iter()
            .map(|(k, v)| Tag {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
    }
}

/// Applies a validated rewrite: keeps the listed messages in order and
/// replaces the text of those with new content. Every other field of a kept
/// message (name, tool_call_id, ...) is preserved.
pub fn apply_rewrite(req: &mut ChatRequest, rw: &Rewrite) {
    let Some(Value::Array(old)) = req.body.remove("messages") else {
        return;
    };
    let mut new = Vec::with_capacity(rw.messages.len());
    for k in &rw.messages {
        let Some(orig) = old.get(k.source as usize) else {
            continue;
        };
        let mut m = orig.clone();
        if let (Some(text), Value::Object(obj)) = (&k.content, &mut m) {
            obj.insert("content".into(), Value::String(text.clone()));
        }
        new.push(m);
    }
    req.body.insert("messages".into(), Value::Array(new));
}

/// Characters of message text in a request (for the compression record).
pub fn prompt_chars(view: &RequestView) -> usize {
    view.messages
        .iter()
        .map(|m| m.content.chars().count())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::types::KeptMessage;

    #[test]
    fn rewrite_keeps_other_fields_and_drops_unlisted_messages() {
        let mut req = ChatRequest::parse(
            br#"{"model":"gpt-4o","messages":[
                {"role":"system","content":"be  brief"},
                {"role":"user","content":"dup","name":"ann"},
                {"role":"user","content":"q"}]}"#,
        )
        .unwrap();
        let rw = Rewrite {
            messages: vec![
                KeptMessage {
                    source: 0,
                    content: Some("be brief".into()),
                },
                KeptMessage {
                    source: 2,
                    content: None,
                },
            ],
            note: String::new(),
        };
        apply_rewrite(&mut req, &rw);
        let msgs = req.messages();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0]["content"], "be brief");
        assert_eq!(msgs[1]["content"], "q");
        let view = build("r", &Identity::default(), &req);
        assert_eq!(view.messages[0].content, "be brief");
        assert!(view.prompt_tokens > 0);
    }
}
