//! Upstream clients behind one trait: an OpenAI-compatible HTTP API and the
//! built-in simulator. The pipeline never knows which one it talks to.

mod anthropic;
mod client;
mod openai;
mod openai_batch;
pub mod sim;
pub mod sim_anthropic;
pub mod sim_batch;
pub mod sse;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use serde_json::{Map, Value};

pub use anthropic::AnthropicProvider;
pub use openai::OpenAiProvider;
pub use sim::SimProvider;

use crate::clock::Clock;
use crate::config::{Config, ProviderConfig};
use crate::pricing::Catalog;

/// One call to an upstream.
#[derive(Debug, Clone)]
pub struct UpstreamCall {
    /// The request body with `model` set to the upstream's model name.
    pub body: Map<String, Value>,
    pub stream: bool,
    /// Expected completion length, for the simulator only.
    pub sim_output_tokens: Option<u32>,
    /// A fault to inject (see the simulator), for the simulator only.
    pub sim_fault: Option<String>,
    /// 1 for the first try at this model, 2 for its first retry, ...
    pub attempt: u32,
}

pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, ProviderError>> + Send>>;

pub enum UpstreamReply {
    /// A complete JSON chat completion.
    Complete(Bytes),
    /// Server-sent events, passed through as they arrive.
    Stream(ByteStream),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("upstream returned HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after_s: Option<u64>,
    },
    #[error("upstream did not answer within {0} ms")]
    Timeout(u64),
    #[error("cannot reach upstream: {0}")]
    Connect(String),
    #[error("upstream sent an invalid response: {0}")]
    Protocol(String),
}

impl ProviderError {
    /// Worth trying the next model of a fallback ladder.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => true,
        }
    }
}

#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// `sim` or `openai`, for the ledger and headers.
    fn kind(&self) -> &'static str;
    async fn chat(&self, call: &UpstreamCall) -> Result<UpstreamReply, ProviderError>;
    /// Answers non-streamed calls through the provider's batch API, in
    /// order; None when the provider has none.
    async fn batch(&self, _calls: Vec<UpstreamCall>) -> Option<BatchAnswers> {
        None
    }
}

/// A call that must answer with a complete JSON chat completion (batches,
/// deferred requests): never streamed.
pub async fn complete(
    provider: &dyn Provider,
    mut call: UpstreamCall,
) -> Result<Bytes, ProviderError> {
    call.stream = false;
    match provider.chat(&call).await? {
        UpstreamReply::Complete(b) => Ok(b),
        UpstreamReply::Stream(_) => Err(ProviderError::Protocol(
            "a stream where a complete answer was asked for".into(),
        )),
    }
}

/// One answer (a complete JSON chat completion) per call of a batch, or why
/// the whole batch failed.
pub type BatchAnswers = Result<Vec<Result<Bytes, ProviderError>>, ProviderError>;

/// A model the gateway serves and where it goes.
#[derive(Clone)]
pub struct ModelTarget {
    pub provider_name: String,
    pub provider: Arc<dyn Provider>,
    pub upstream_model: String,
}

/// Every configured model with its provider.
#[derive(Clone, Default)]
pub struct Providers {
    models: HashMap<String, ModelTarget>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderSetupError {
    #[error(
        "provider {name}: environment variable {var} is not set (set it, or set sim_when_no_key = true)"
    )]
    MissingKey { name: String, var: String },
    #[error("provider {name}: {message}")]
    Client { name: String, message: String },
}

impl Providers {
    pub fn from_config(
        cfg: &Config,
        catalog: &Catalog,
        clock: &Arc<dyn Clock>,
    ) -> Result<Self, ProviderSetupError> {
        let mut built: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        for (name, p) in &cfg.providers {
            let provider: Arc<dyn Provider> = match p {
                ProviderConfig::Sim(s) => {
                    Arc::new(SimProvider::new(s.clone(), catalog.clone(), clock.clone()))
                }
                ProviderConfig::Openai(o) => {
                    match api_key(name, o.api_key_env.as_deref(), o.sim_when_no_key)? {
                        None if o.sim_when_no_key => Arc::new(SimProvider::new(
                            o.sim.clone(),
                            catalog.clone(),
                            clock.clone(),
                        )),
                        key => Arc::new(OpenAiProvider::new(o, key).map_err(|message| {
                            ProviderSetupError::Client {
                                name: name.clone(),
                                message,
                            }
                        })?),
                    }
                }
                ProviderConfig::Anthropic(a) => {
                    match api_key(name, a.api_key_env.as_deref(), a.sim_when_no_key)? {
                        None if a.sim_when_no_key => Arc::new(SimProvider::new(
                            a.sim.clone(),
                            catalog.clone(),
                            clock.clone(),
                        )),
                        key => Arc::new(AnthropicProvider::new(a, key).map_err(|message| {
                            ProviderSetupError::Client {
                                name: name.clone(),
                                message,
                            }
                        })?),
                    }
                }
            };
            built.insert(name.clone(), provider);
        }
        let mut models = HashMap::new();
        for (model, route) in &cfg.models {
            if let Some(provider) = built.get(&route.provider) {
                models.insert(
                    model.clone(),
                    ModelTarget {
                        provider_name: route.provider.clone(),
                        provider: provider.clone(),
                        upstream_model: route
                            .upstream_model
                            .clone()
                            .unwrap_or_else(|| model.clone()),
                    },
                );
            }
        }
        Ok(Self { models })
    }

    pub fn get(&self, model: &str) -> Option<&ModelTarget> {
        self.models.get(model)
    }

    pub fn model_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.models.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

/// The API key from the environment variable `var`; None when no variable
/// is configured, or when it is unset and the provider may fall back to the
/// simulator (logged). Unset otherwise is an error at start.
fn api_key(
    name: &str,
    var: Option<&str>,
    sim_when_no_key: bool,
) -> Result<Option<String>, ProviderSetupError> {
    let Some(var) = var.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(k) if !k.is_empty() => Ok(Some(k)),
        _ if sim_when_no_key => {
            tracing::warn!(
                provider = %name,
                "{var} is not set: provider {name} answers from the built-in simulator"
            );
            Ok(None)
        }
        _ => Err(ProviderSetupError::MissingKey {
            name: name.to_string(),
            var: var.to_string(),
        }),
    }
}

/// A reqwest client builder. reqwest is built without a default TLS
/// backend (it would pull in a second crypto library); ring is installed
/// once, before the first client is built.
pub fn http_client() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// A reqwest client with the chat client's settings (see
/// `client::UpstreamHttp`): at most `max_idle` idle connections, no Nagle
/// delay, no redirects. It serves an upstream API's rare calls (batches,
/// files) and, through `proxy`, chat calls the environment sends through a
/// proxy; without `proxy` it follows the proxy environment variables.
pub(crate) fn upstream_client(
    connect_timeout_ms: u64,
    max_idle: usize,
    proxy: Option<reqwest::Proxy>,
) -> Result<reqwest::Client, String> {
    let mut b = http_client()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_millis(connect_timeout_ms))
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(max_idle)
        .tcp_nodelay(true);
    if let Some(p) = proxy {
        b = b.proxy(p);
    }
    b.build().map_err(|e| e.to_string())
}

/// A transport error as the pipeline sees it: a timeout (after `timeout`),
/// no connection, or a broken exchange.
pub(crate) fn classify(e: reqwest::Error, timeout: std::time::Duration) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout(timeout.as_millis() as u64)
    } else if e.is_connect() {
        ProviderError::Connect(e.to_string())
    } else {
        ProviderError::Protocol(e.to_string())
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by LLM APIs).
fn retry_after(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The message of an OpenAI-style error body, or the body itself.
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned())
}
