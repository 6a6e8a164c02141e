//! Step 7 of the pipeline: what an answered call cost, and everything that
//! follows from it (spend settled, cache admission, metrics, the log line).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Gateway, contain};
use crate::api::{self, WireCompletion};
use crate::budget::Reservation;
use crate::cache::{AnswerStore, CacheKey, CachedAnswer};
use crate::plugins::PluginSet;
use crate::plugins::types::{RequestView, ResponseMeta};
use crate::pricing::Usage;
use crate::tokens;

pub struct Accounting {
    pub gateway: Arc<Gateway>,
    /// The plugin set the request started with (a swap mid-request does not change it).
    pub plugins: Arc<PluginSet>,
    pub request_id: String,
    pub view: RequestView,
    pub model: String,
    pub provider: String,
    pub cache_plan: Option<(CacheKey, Duration)>,
    pub reservation: Option<Reservation>,
    pub started: Instant,
    pub upstream_started: Instant,
    pub tokens_saved: u32,
    pub chars_before: usize,
    pub chars_after: usize,
    pub trail: Vec<String>,
}

impl Accounting {
    /// Accounts a complete JSON answer; returns its cost (None: unpriced model).
    pub async fn complete_json(mut self, body: &Bytes) -> Option<f64> {
        let wire: WireCompletion = serde_json::from_slice(body).unwrap_or_default();
        let choice = wire.choices.first();
        let content = choice
            .and_then(|c| c.message.as_ref())
            .and_then(|m| m.content.clone())
            .unwrap_or_default();
        let finish = choice
            .and_then(|c| c.finish_reason.clone())
            .unwrap_or_else(|| "stop".into());
        let (usage, estimated) = match wire.usage {
            Some(u) => (Usage::from(u), false),
            None => (self.estimate(&content), true),
        };
        self.finish(usage, estimated, &content, &finish, Some(body.clone()))
            .await
    }

    /// Usage counted natively when the upstream reported none.
    pub fn estimate(&self, content: &str) -> Usage {
        Usage {
            prompt_tokens: self.view.prompt_tokens,
            cached_tokens: 0,
            completion_tokens: tokens::count(content, &self.model),
        }
    }

    /// Settles spend, admits the answer to the cache if the policy agrees,
    /// records metrics and the request log line. Returns the cost.
    pub async fn finish(
        &mut self,
        usage: Usage,
        estimated: bool,
        content: &str,
        finish: &str,
        body: Option<Bytes>,
    ) -> Option<f64> {
        let gw = &self.gateway;
        let cost = gw.catalog.cost(&self.model, &usage);
        if let Some(r) = self.reservation.take() {
            r.settle(cost.unwrap_or(0.0));
        }
        if let Some(c) = cost {
            gw.metrics
                .cost_nanos
                .fetch_add((c * 1e9).round() as u64, Ordering::Relaxed);
        }
        gw.metrics
            .tokens_saved
            .fetch_add(u64::from(self.tokens_saved), Ordering::Relaxed);

        let mut admitted = false;
        if let (Some((key, ttl)), Some(slot)) = (self.cache_plan.take(), &self.plugins.cache_policy)
            && !estimated
        {
            let meta = ResponseMeta {
                model: self.model.clone(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                finish_reason: finish.to_string(),
                content: content.to_string(),
            };
            if let Ok(Some(true)) = contain(slot, slot.plugin.admit(&self.view, &meta).await) {
                let body = body.unwrap_or_else(|| {
                    let id = format!("chatcmpl-{}", self.request_id.trim_start_matches("req_"));
                    let created = gw.clock.now_ms() / 1000;
                    Bytes::from(
                        api::completion_json(&id, created, &self.model, content, finish, &usage)
                            .to_string(),
                    )
                });
                gw.cache.put(
                    key,
                    Arc::new(CachedAnswer {
                        model: self.model.clone(),
                        content: content.to_string(),
                        finish: finish.to_string(),
                        usage,
                        body,
                        ttl,
                        stored_at: Instant::now(),
                    }),
                );
                admitted = true;
            }
        }
        tracing::info!(
            request_id = %self.request_id,
            tenant = %self.view.tenant,
            user = %self.view.user,
            feature = %self.view.feature,
            task = %self.view.task,
            model_asked = %self.view.model,
            model = %self.model,
            provider = %self.provider,
            prompt_tokens = usage.prompt_tokens,
            cached_tokens = usage.cached_tokens,
            completion_tokens = usage.completion_tokens,
            tokens_saved = self.tokens_saved,
            chars_before = self.chars_before,
            chars_after = self.chars_after,
            cost_usd = cost,
            estimated,
            cached_answer = admitted,
            latency_ms = self.started.elapsed().as_millis() as u64,
            upstream_ms = self.upstream_started.elapsed().as_millis() as u64,
            decisions = %self.trail.join("; "),
            "request done"
        );
        cost
    }
}
