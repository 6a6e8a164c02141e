//! The standalone simulator's Batch API (`tollgate sim`), shaped like
//! OpenAI's so the OpenAI provider's batch client is tested end to end:
//! `POST /v1/files` (multipart, purpose `batch`), `POST /v1/batches`,
//! `GET /v1/batches/{id}`, `GET /v1/files/{id}/content`. A batch answers
//! every line as the simulator would alone, and is `completed` once its
//! `batch_latency_ms` has passed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{Value, json};

use super::sim::SimProvider;
use super::{Provider, UpstreamCall};

#[derive(Default)]
pub struct SimBatches {
    files: Mutex<HashMap<String, String>>,
    /// Batch id -> its status object.
    batches: Mutex<HashMap<String, Value>>,
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// The `file` part of a `multipart/form-data` body.
pub fn multipart_file(content_type: &str, body: &[u8]) -> Option<String> {
    let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
    let text = String::from_utf8_lossy(body);
    let delimiter = format!("--{boundary}");
    text.split(delimiter.as_str()).find_map(|part| {
        let (headers, content) = part.split_once("\r\n\r\n")?;
        headers
            .contains("name=\"file\"")
            .then(|| content.strip_suffix("\r\n").unwrap_or(content).to_string())
    })
}

impl SimBatches {
    pub fn upload(&self, text: String) -> Value {
        let id = new_id("file");
        let bytes = text.len();
        if let Ok(mut f) = self.files.lock() {
            f.insert(id.clone(), text);
        }
        json!({"id": id, "object": "file", "bytes": bytes, "purpose": "batch"})
    }

    pub fn content(&self, id: &str) -> Option<String> {
        self.files.lock().ok()?.get(id).cloned()
    }

    pub fn status(&self, id: &str) -> Option<Value> {
        self.batches.lock().ok()?.get(id).cloned()
    }

    /// Creates a batch from an uploaded file and runs it in the background
    /// through the simulator's own batch API.
    pub fn create(self: &Arc<Self>, sim: Arc<SimProvider>, req: &Value) -> Option<Value> {
        let input = self.content(req["input_file_id"].as_str()?)?;
        let id = new_id("batch");
        let status = json!({"id": id, "object": "batch", "status": "in_progress",
            "endpoint": req["endpoint"], "input_file_id": req["input_file_id"]});
        self.batches.lock().ok()?.insert(id.clone(), status.clone());
        let lines: Vec<Value> = input
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let calls = lines
            .iter()
            .map(|l| UpstreamCall {
                body: l["body"].as_object().cloned().unwrap_or_default(),
                stream: false,
                sim_output_tokens: None,
                sim_fault: None,
                attempt: 1,
            })
            .collect();
        let me = self.clone();
        tokio::spawn(async move {
            let answers = match sim.batch(calls).await {
                Some(Ok(a)) => a,
                _ => Vec::new(),
            };
            let (mut out, mut errs) = (String::new(), String::new());
            for (i, l) in lines.iter().enumerate() {
                match answers.get(i) {
                    Some(Ok(b)) => {
                        let body: Value = serde_json::from_slice(b).unwrap_or(Value::Null);
                        out.push_str(
                            &json!({"id": new_id("batch_req"), "custom_id": l["custom_id"],
                            "response": {"status_code": 200, "body": body}, "error": null})
                            .to_string(),
                        );
                        out.push('\n');
                    }
                    _ => {
                        errs.push_str(&json!({"id": new_id("batch_req"), "custom_id": l["custom_id"],
                            "response": null, "error": {"code": "server_error", "message": "simulated failure"}}).to_string());
                        errs.push('\n');
                    }
                }
            }
            let out_id = me.upload(out)["id"].clone();
            let err_id = me.upload(errs)["id"].clone();
            if let Ok(mut b) = me.batches.lock()
                && let Some(s) = b.get_mut(&id)
            {
                s["status"] = json!("completed");
                s["output_file_id"] = out_id;
                s["error_file_id"] = err_id;
            }
        });
        Some(status)
    }
}

/// Answers one Batch API request of the standalone simulator, if `path` is one.
pub async fn route(
    batches: &Arc<SimBatches>,
    sim: &Arc<SimProvider>,
    method: &http::Method,
    path: &str,
    content_type: &str,
    body: &Bytes,
) -> Option<Result<Value, String>> {
    let not_found = |what: &str| Some(Err(format!("no such {what}")));
    match (method.as_str(), path) {
        ("POST", "/v1/files") => Some(
            multipart_file(content_type, body)
                .map(|t| batches.upload(t))
                .ok_or_else(|| "expected a multipart body with a file part".to_string()),
        ),
        ("POST", "/v1/batches") => {
            let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            match batches.create(sim.clone(), &req) {
                Some(v) => Some(Ok(v)),
                None => not_found("input file"),
            }
        }
        ("GET", p) if p.starts_with("/v1/batches/") => {
            match batches.status(&p["/v1/batches/".len()..]) {
                Some(v) => Some(Ok(v)),
                None => not_found("batch"),
            }
        }
        ("GET", p) if p.starts_with("/v1/files/") && p.ends_with("/content") => {
            let id = &p["/v1/files/".len()..p.len() - "/content".len()];
            match batches.content(id) {
                Some(t) => Some(Ok(Value::String(t))),
                None => not_found("file"),
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_part_of_a_multipart_body_is_found() {
        let body = "--XYZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
                    --XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n\
                    Content-Type: application/jsonl\r\n\r\n{\"a\":1}\n{\"a\":2}\n\r\n--XYZ--\r\n";
        assert_eq!(
            multipart_file("multipart/form-data; boundary=XYZ", body.as_bytes()).as_deref(),
            Some("{\"a\":1}\n{\"a\":2}\n")
        );
        assert_eq!(multipart_file("application/json", body.as_bytes()), None);
    }
}
