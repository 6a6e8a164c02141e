//! Any OpenAI-compatible `/chat/completions` API (OpenAI itself, Azure-style
//! proxies, vLLM, llama.cpp's server, a `tollgate sim` process).

use std::time::Duration;

use futures_util::StreamExt;

use super::{ProviderError, UpstreamCall, UpstreamReply};
use crate::config::OpenAiConfig;

pub struct OpenAiProvider {
    pub(super) client: reqwest::Client,
    /// Parsed once: parsing it per request showed in profiles.
    url: reqwest::Url,
    /// The API root (`.../v1`), for the files and batches endpoints.
    pub(super) base: String,
    pub(super) key: Option<String>,
    pub(super) timeout: Duration,
    forward_sim_headers: bool,
    /// Deferred requests go through `/batches` (else one by one).
    batch: bool,
    pub(super) batch_poll: Duration,
}

impl OpenAiProvider {
    pub fn new(cfg: &OpenAiConfig, key: Option<String>) -> Result<Self, String> {
        let client = super::upstream_client(cfg.connect_timeout_ms, cfg.max_idle_connections)?;
        Ok(Self {
            client,
            url: reqwest::Url::parse(&format!(
                "{}/chat/completions",
                cfg.base_url.trim_end_matches('/')
            ))
            .map_err(|e| format!("base_url {:?}: {e}", cfg.base_url))?,
            base: cfg.base_url.trim_end_matches('/').to_string(),
            batch: cfg.batch_api,
            batch_poll: Duration::from_millis(cfg.batch_poll_ms.max(1)),
            key,
            timeout: Duration::from_millis(cfg.timeout_ms),
            forward_sim_headers: cfg.forward_sim_headers,
        })
    }

    pub(super) fn classify(&self, e: reqwest::Error) -> ProviderError {
        super::classify(e, self.timeout)
    }
}

#[async_trait::async_trait]
impl super::Provider for OpenAiProvider {
    fn kind(&self) -> &'static str {
        "openai"
    }

    async fn batch(&self, calls: Vec<UpstreamCall>) -> Option<super::BatchAnswers> {
        if !self.batch {
            return None;
        }
        Some(self.run_batch(calls).await)
    }

    async fn chat(&self, call: UpstreamCall) -> Result<UpstreamReply, ProviderError> {
        let body =
            serde_json::to_vec(&call.body).map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let mut req = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        if self.forward_sim_headers {
            if let Some(n) = call.sim_output_tokens {
                req = req.header("x-tollgate-sim-output-tokens", n.to_string());
            }
            if let Some(f) = &call.sim_fault {
                req = req
                    .header("x-tollgate-sim-fault", f.as_str())
                    .header("x-tollgate-sim-attempt", call.attempt.to_string());
            }
        }
        // For streams the deadline covers the response head; the body may
        // take as long as the model needs.
        let resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| ProviderError::Timeout(self.timeout.as_millis() as u64))?
            .map_err(|e| self.classify(e))?;
        if !resp.status().is_success() {
            return Err(super::status_error(resp).await);
        }
        if call.stream {
            let stream = resp
                .bytes_stream()
                .map(|r| r.map_err(|e| ProviderError::Protocol(format!("stream broke: {e}"))));
            return Ok(UpstreamReply::Stream(Box::pin(stream)));
        }
        let body = tokio::time::timeout(self.timeout, resp.bytes())
            .await
            .map_err(|_| ProviderError::Timeout(self.timeout.as_millis() as u64))?
            .map_err(|e| self.classify(e))?;
        Ok(UpstreamReply::Complete(body))
    }
}
