//! OpenAI's Batch API for deferred requests: the calls are written as a
//! JSONL file (`custom_id`, `method`, `url`, `body`), uploaded to
//! `/files` with purpose `batch`, a batch is created on
//! `/chat/completions` with a 24 h window, polled every `batch_poll_ms`
//! until it ends, and the output (and error) files are read back and
//! matched to the calls by `custom_id`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};

use super::openai::OpenAiProvider;
use super::{BatchAnswers, ProviderError, UpstreamCall, error_message};

/// The JSONL input of a batch: one line per call, `custom_id` = its index.
pub fn input_file(calls: &[UpstreamCall]) -> String {
    let mut out = String::new();
    for (i, c) in calls.iter().enumerate() {
        let line = json!({
            "custom_id": format!("call-{i}"),
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": c.body,
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// Matches the output and error files' lines to the calls.
pub fn answers(n: usize, output: &str, errors: &str) -> Vec<Result<Bytes, ProviderError>> {
    let mut by_id: HashMap<String, Result<Bytes, ProviderError>> = HashMap::new();
    for line in output.lines().chain(errors.lines()) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(id) = v["custom_id"].as_str() else {
            continue;
        };
        let status = v["response"]["status_code"].as_u64().unwrap_or(0);
        let answer = if status == 200 {
            Ok(Bytes::from(v["response"]["body"].to_string()))
        } else {
            let message = v["error"]["message"]
                .as_str()
                .or_else(|| v["response"]["body"]["error"]["message"].as_str())
                .unwrap_or("the batch did not answer this request")
                .to_string();
            Err(ProviderError::Status {
                status: u16::try_from(status).unwrap_or(0).max(500),
                message,
                retry_after_s: None,
            })
        };
        by_id.insert(id.to_string(), answer);
    }
    (0..n)
        .map(|i| {
            by_id.remove(&format!("call-{i}")).unwrap_or_else(|| {
                Err(ProviderError::Protocol(
                    "the batch output has no answer for this request".into(),
                ))
            })
        })
        .collect()
}

impl OpenAiProvider {
    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some(a) => req.header(http::header::AUTHORIZATION, a.clone()),
            None => req,
        }
    }

    async fn json_of(&self, req: reqwest::RequestBuilder) -> Result<Value, ProviderError> {
        let resp = self
            .authed(req)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| self.classify(e))?;
        if !status.is_success() {
            return Err(ProviderError::Status {
                status: status.as_u16(),
                message: error_message(&body),
                retry_after_s: None,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ProviderError::Protocol(e.to_string()))
    }

    async fn file_text(&self, id: &str) -> Result<String, ProviderError> {
        let resp = self
            .authed(self.client.get(format!("{}/files/{id}/content", self.base)))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        if !resp.status().is_success() {
            return Err(ProviderError::Status {
                status: resp.status().as_u16(),
                message: format!("cannot read batch file {id}"),
                retry_after_s: None,
            });
        }
        resp.text().await.map_err(|e| self.classify(e))
    }

    pub(super) async fn run_batch(&self, calls: Vec<UpstreamCall>) -> BatchAnswers {
        let n = calls.len();
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::bytes(input_file(&calls).into_bytes())
                    .file_name("tollgate-batch.jsonl")
                    .mime_str("application/jsonl")
                    .map_err(|e| ProviderError::Protocol(e.to_string()))?,
            );
        let file = self
            .json_of(
                self.client
                    .post(format!("{}/files", self.base))
                    .multipart(form),
            )
            .await?;
        let file_id = file["id"].as_str().unwrap_or_default().to_string();
        let batch = self
            .json_of(
                self.client
                    .post(format!("{}/batches", self.base))
                    .json(&json!({
                        "input_file_id": file_id,
                        "endpoint": "/v1/chat/completions",
                        "completion_window": "24h",
                    })),
            )
            .await?;
        let batch_id = batch["id"].as_str().unwrap_or_default().to_string();
        tracing::info!(batch_id, requests = n, "batch created");
        let started = Instant::now();
        let batch = loop {
            let b = self
                .json_of(self.client.get(format!("{}/batches/{batch_id}", self.base)))
                .await?;
            match b["status"].as_str().unwrap_or("") {
                "completed" => break b,
                s @ ("failed" | "expired" | "cancelled") => {
                    return Err(ProviderError::Status {
                        status: 502,
                        message: format!("batch {batch_id} ended {s}: {}", b["errors"]),
                        retry_after_s: None,
                    });
                }
                _ if started.elapsed() > Duration::from_secs(25 * 3600) => {
                    return Err(ProviderError::Timeout(started.elapsed().as_millis() as u64));
                }
                _ => tokio::time::sleep(self.batch_poll).await,
            }
        };
        let output = match batch["output_file_id"].as_str() {
            Some(id) => self.file_text(id).await?,
            None => String::new(),
        };
        let errors = match batch["error_file_id"].as_str() {
            Some(id) => self.file_text(id).await?,
            None => String::new(),
        };
        Ok(answers(n, &output, &errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_are_matched_to_calls_by_custom_id() {
        let call = |c: &str| UpstreamCall {
            body: json!({"model": "gpt-4o", "messages": [{"role": "user", "content": c}]})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            stream: false,
            sim_output_tokens: None,
            sim_fault: None,
            attempt: 1,
        };
        let input = input_file(&[call("a"), call("b"), call("c")]);
        let lines: Vec<Value> = input
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or(Value::Null))
            .collect();
        assert_eq!(lines[1]["custom_id"], "call-1");
        assert_eq!(lines[1]["url"], "/v1/chat/completions");
        assert_eq!(lines[1]["body"]["messages"][0]["content"], "b");
        // Out of order, one in the error file, one missing.
        let output = r#"{"custom_id":"call-2","response":{"status_code":200,"body":{"id":"x2"}}}
{"custom_id":"call-0","response":{"status_code":200,"body":{"id":"x0"}}}"#;
        let errors =
            r#"{"custom_id":"call-1","response":null,"error":{"code":"bad","message":"nope"}}"#;
        let a = answers(4, output, errors);
        assert_eq!(a[0].as_ref().ok(), Some(&Bytes::from(r#"{"id":"x0"}"#)));
        assert_eq!(a[2].as_ref().ok(), Some(&Bytes::from(r#"{"id":"x2"}"#)));
        assert!(
            a[1].as_ref()
                .err()
                .is_some_and(|e| e.to_string().contains("nope"))
        );
        assert!(a[3].is_err());
    }
}
