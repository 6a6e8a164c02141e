//! Deferrable work through provider batch APIs, at their discount.
//!
//! A request marked `x-tollgate-deferrable: true` goes through the whole
//! pipeline (budgets, compressors, cache, router, worst-case reservation)
//! and is then queued instead of called: the client gets HTTP 202 with an
//! id, polls `GET /v1/deferred/{id}` (same tenant only), or names an
//! allowed `x-tollgate-callback-url` that receives the result. Queued
//! requests go out per provider as one batch when `batch.max_requests` are
//! waiting or `batch.flush_ms` after the first; each answer is accounted at
//! the model's `batch_discount`, and the ledger row records the discount.
//! A provider without a batch API answers them one by one at full price.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Gateway;
use super::account::Accounting;
use crate::api::ApiError;
use crate::providers::{ModelTarget, UpstreamCall};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A provider's queue goes out when this many requests wait…
    pub max_requests: usize,
    /// …or this long after the first one arrived.
    pub flush_ms: u64,
    /// Results are kept this long for polling.
    pub results_ttl_seconds: u64,
    /// URL prefixes a client may name in `x-tollgate-callback-url`; empty:
    /// callbacks are refused (the gateway must not POST wherever a client says).
    pub callback_allow: Vec<String>,
    /// Features (`x-tollgate-feature`) whose requests are always deferred,
    /// header or not (a stream among them is refused).
    pub deferrable_features: Vec<String>,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_requests: 100,
            flush_ms: 1_000,
            results_ttl_seconds: 86_400,
            callback_allow: Vec::new(),
            deferrable_features: Vec::new(),
        }
    }
}

/// One queued request; its id, tenant and model are its accounting's.
pub struct Job {
    pub target: ModelTarget,
    pub call: UpstreamCall,
    pub acct: Accounting,
    pub callback: Option<String>,
}

#[derive(Clone)]
struct Outcome {
    tenant: String,
    body: Value,
}

pub struct Deferred {
    /// Provider name -> waiting jobs.
    queues: Mutex<HashMap<String, Vec<Job>>>,
    /// Request id -> what a poll answers, for `results_ttl_seconds`.
    results: moka::sync::Cache<String, Outcome>,
    callbacks: crate::webhook::Webhook,
}

impl Deferred {
    pub fn new(cfg: &BatchConfig) -> Self {
        Self {
            queues: Mutex::default(),
            results: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_secs(cfg.results_ttl_seconds.max(1)))
                .build(),
            callbacks: crate::webhook::Webhook::new(
                "deferred callback",
                Duration::from_secs(10),
                Duration::from_millis(500),
            ),
        }
    }

    /// What `GET /v1/deferred/{id}` answers for `tenant`.
    pub fn poll(&self, id: &str, tenant: &str) -> Result<Value, ApiError> {
        match self.results.get(id) {
            Some(o) if o.tenant == tenant => Ok(o.body),
            _ => Err(not_found(id)),
        }
    }

    fn set(&self, id: &str, tenant: &str, body: Value) {
        self.results.insert(
            id.to_string(),
            Outcome {
                tenant: tenant.to_string(),
                body,
            },
        );
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        http::StatusCode::NOT_FOUND,
        "invalid_request_error",
        "deferred_not_found",
        format!("no deferred request {id:?} for this tenant"),
    )
}

/// Whether a callback URL is allowed by the config: same scheme, host and
/// port as an allowed entry and under its path, no credentials. Compared
/// parsed, not as text: `http://hooks.acme.com.evil.net/` or
/// `http://hooks.acme.com@evil.net/` must not pass for `http://hooks.acme.com/`.
pub fn callback_allowed(cfg: &BatchConfig, url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    if !matches!(u.scheme(), "http" | "https") || !u.username().is_empty() || u.password().is_some()
    {
        return false;
    }
    cfg.callback_allow.iter().any(|allowed| {
        reqwest::Url::parse(allowed).is_ok_and(|a| {
            a.scheme() == u.scheme()
                && a.host_str() == u.host_str()
                && a.port_or_known_default() == u.port_or_known_default()
                && u.path().starts_with(a.path())
        })
    })
}

/// Queues a job and answers 202; the batch goes out when full or on time.
pub fn submit(gw: &Arc<Gateway>, job: Job) -> Value {
    let cfg = gw.live.load().config.batch.clone();
    let row = &job.acct.row;
    let id = &row.request_id;
    let queued = json!({
        "id": id, "object": "tollgate.deferred", "status": "queued", "model": job.acct.model,
        "poll": format!("/v1/deferred/{id}"),
    });
    gw.deferred.set(id, &row.tenant, queued.clone());
    let provider = job.target.provider_name.clone();
    let (first, full) = {
        let Ok(mut q) = gw.deferred.queues.lock() else {
            return queued;
        };
        let waiting = q.entry(provider.clone()).or_default();
        waiting.push(job);
        (waiting.len() == 1, waiting.len() >= cfg.max_requests.max(1))
    };
    if full {
        tokio::spawn(flush(gw.clone(), provider));
    } else if first {
        let gw = gw.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(cfg.flush_ms)).await;
            flush(gw, provider).await;
        });
    }
    queued
}

/// Sends a provider's waiting jobs as one batch and accounts each answer.
async fn flush(gw: Arc<Gateway>, provider: String) {
    let jobs = match gw.deferred.queues.lock() {
        Ok(mut q) => q.remove(&provider).unwrap_or_default(),
        Err(_) => return,
    };
    let Some(first) = jobs.first() else {
        return;
    };
    let target = first.target.clone();
    let calls: Vec<UpstreamCall> = jobs.iter().map(|j| j.call.clone()).collect();
    tracing::info!(provider, requests = calls.len(), "sending a batch");
    let answers = match target.provider.batch(calls.clone()).await {
        Some(Ok(a)) => a.into_iter().map(|r| (r, true)).collect::<Vec<_>>(),
        Some(Err(e)) => calls.iter().map(|_| (Err(e.clone()), true)).collect(),
        None => {
            // No batch API: one by one, at the full price.
            tracing::warn!(
                provider,
                "provider has no batch API; deferred requests are sent one by one at full price"
            );
            let mut out = Vec::new();
            for c in calls {
                out.push((
                    crate::providers::complete(target.provider.as_ref(), c).await,
                    false,
                ));
            }
            out
        }
    };
    // A batch that answers fewer requests than it was sent fails the rest.
    let missing = || {
        (
            Err(crate::providers::ProviderError::Protocol(
                "the batch returned no answer for this request".into(),
            )),
            false,
        )
    };
    let answers = answers.into_iter().chain(std::iter::repeat_with(missing));
    for (job, (answer, discounted)) in jobs.into_iter().zip(answers) {
        let Job {
            mut acct, callback, ..
        } = job;
        // Read before accounting takes the row.
        let (id, tenant, model) = (
            acct.row.request_id.clone(),
            acct.row.tenant.clone(),
            acct.model.clone(),
        );
        let body = match answer {
            Ok(bytes) => {
                let discount = discounted
                    .then(|| acct.live.catalog.get(&model).map(|p| p.batch_discount))
                    .flatten()
                    .unwrap_or(0.0);
                acct.batch_discount = Some(discount);
                let cost = acct.complete_json(&bytes).await;
                let response: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                json!({"id": id, "object": "tollgate.deferred", "status": "completed", "model": model,
                       "response": response, "cost_usd": cost, "batch_discount": discount})
            }
            Err(e) => {
                let err = super::upstream_error(&e);
                acct.fail(&err);
                json!({"id": id, "object": "tollgate.deferred", "status": "failed", "model": model,
                       "error": serde_json::from_slice::<Value>(&err.body()).unwrap_or(Value::Null)})
            }
        };
        gw.deferred.set(&id, &tenant, body.clone());
        if let Some(url) = callback {
            let gw = gw.clone();
            tokio::spawn(async move {
                let body = Bytes::from(body.to_string());
                if !gw.deferred.callbacks.post(&url, body).await {
                    tracing::error!(url, "deferred result not delivered to its callback");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_must_match_an_allowed_origin_and_path() {
        let cfg = BatchConfig {
            callback_allow: vec!["https://hooks.acme.com/tollgate/".into()],
            ..BatchConfig::default()
        };
        let ok = |u: &str| callback_allowed(&cfg, u);
        assert!(ok("https://hooks.acme.com/tollgate/done"));
        assert!(ok("https://hooks.acme.com:443/tollgate/x"));
        assert!(!ok("https://hooks.acme.com.evil.net/tollgate/x"));
        assert!(!ok("https://hooks.acme.com@evil.net/tollgate/x"));
        assert!(!ok("https://user:pw@hooks.acme.com/tollgate/x"));
        assert!(!ok("http://hooks.acme.com/tollgate/x"), "scheme");
        assert!(!ok("https://hooks.acme.com:8443/tollgate/x"), "port");
        assert!(!ok("https://hooks.acme.com/other"), "path");
        assert!(!ok("not a url"));
        assert!(!callback_allowed(
            &BatchConfig::default(),
            "https://hooks.acme.com/tollgate/x"
        ));
    }
}
