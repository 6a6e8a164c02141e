//! Any OpenAI-compatible `/chat/completions` API (OpenAI itself, Azure-style
//! proxies, vLLM, llama.cpp's server, a `tollgate sim` process).

use std::time::Duration;

use http::{HeaderValue, header};

use super::client::{self as upstream, UpstreamHttp};
use super::{ProviderError, UpstreamCall, UpstreamReply};
use crate::config::OpenAiConfig;
use crate::headers::{SIM_ATTEMPT, SIM_FAULT, SIM_OUTPUT_TOKENS};

pub struct OpenAiProvider {
    /// Chat calls.
    http: UpstreamHttp,
    /// Batch and file calls.
    pub(super) client: reqwest::Client,
    /// `Bearer <key>`, made once; batch calls send it too.
    pub(super) auth: Option<HeaderValue>,
    /// The API root (`.../v1`), for the files and batches endpoints.
    pub(super) base: String,
    pub(super) timeout: Duration,
    forward_sim_headers: bool,
    /// Deferred requests go through `/batches` (else one by one).
    batch: bool,
    pub(super) batch_poll: Duration,
}

impl OpenAiProvider {
    pub fn new(cfg: &OpenAiConfig, key: Option<String>) -> Result<Self, String> {
        let client =
            super::upstream_client(cfg.connect_timeout_ms, cfg.max_idle_connections, None)?;
        let auth = key
            .map(|k| upstream::key_header(&format!("Bearer {k}")))
            .transpose()?;
        let http = UpstreamHttp::to(
            &cfg.base_url,
            "chat/completions",
            cfg.connect_timeout_ms,
            cfg.max_idle_connections,
            cfg.timeout_ms,
        )?;
        Ok(Self {
            http,
            client,
            auth,
            base: cfg.base_url.trim_end_matches('/').to_string(),
            batch: cfg.batch_api,
            batch_poll: Duration::from_millis(cfg.batch_poll_ms.max(1)),
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

    async fn chat(&self, call: &UpstreamCall) -> Result<UpstreamReply, ProviderError> {
        let body =
            serde_json::to_vec(&call.body).map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let mut headers = Vec::with_capacity(4);
        if let Some(a) = &self.auth {
            headers.push((header::AUTHORIZATION, a.clone()));
        }
        if self.forward_sim_headers {
            if let Some(n) = call.sim_output_tokens {
                headers.push((SIM_OUTPUT_TOKENS, HeaderValue::from(n)));
            }
            if let Some(f) = call
                .sim_fault
                .as_deref()
                .and_then(|f| HeaderValue::from_str(f).ok())
            {
                headers.push((SIM_FAULT, f));
                headers.push((SIM_ATTEMPT, HeaderValue::from(call.attempt)));
            }
        }
        let resp = self.http.post_json(&headers, body).await?;
        if call.stream {
            return Ok(UpstreamReply::Stream(upstream::stream(resp)));
        }
        Ok(UpstreamReply::Complete(self.http.body(resp).await?))
    }
}
