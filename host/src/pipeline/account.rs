//! Step 7 of the pipeline: what an answered call cost, and everything that
//! follows from it (spend settled, cache admission, metrics, the log line).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{Gateway, contain, decided};
use crate::api::{self, WireCompletion};
use crate::budget::Reservation;
use crate::cache::{AnswerStore, CachedAnswer};
use crate::ledger::{CallRecord, Row};
use crate::plugins::types::{RequestView, ResponseMeta};
use crate::pricing::Usage;
use crate::tokens;

pub struct Accounting {
    pub gateway: Arc<Gateway>,
    /// The snapshot the request started with (a swap mid-request does not change it).
    pub live: Arc<super::Live>,
    pub view: RequestView,
    pub model: String,
    pub cache_plan: Option<crate::cache::Plan>,
    pub reservation: Option<Reservation>,
    pub started: Instant,
    pub upstream_started: Instant,
    /// The ledger row, complete but for usage, cost and timing.
    pub row: Row,
    /// Fraction off the price: the call went through a batch API.
    pub batch_discount: Option<f64>,
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

    /// Records a call that failed after it was accepted (a deferred request
    /// whose batch failed); the reservation is released.
    pub fn fail(&mut self, e: &crate::api::ApiError) {
        self.reservation.take();
        let mut row = std::mem::take(&mut self.row);
        row.status = e.status.as_u16();
        row.error_code = Some(e.code.to_string());
        row.batch_discount = self.batch_discount;
        row.latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.gateway.record(row);
    }

    /// Usage counted natively when the upstream reported none.
    pub fn estimate(&self, content: &str) -> Usage {
        Usage {
            prompt_tokens: self.view.prompt_tokens,
            cached_tokens: 0,
            cache_write_tokens: 0,
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
        let gw = self.gateway.clone();
        let discount = self.batch_discount.unwrap_or(0.0);
        let cost = self
            .live
            .catalog
            .cost(&self.model, &usage)
            .map(|c| c * (1.0 - discount));
        if cost.is_none() {
            gw.warn_unpriced(&self.model);
        }
        if let Some(r) = self.reservation.take() {
            r.settle(cost.unwrap_or(0.0));
        }
        gw.metrics.usage(
            &self.row.tenant,
            &self.row.feature,
            &self.model,
            &usage,
            cost,
            self.row.tokens_saved,
        );
        if let Some(p) = &self.row.provider {
            gw.metrics
                .upstream_seconds
                .with_label_values(&[p.as_str(), self.model.as_str()])
                .observe(self.upstream_started.elapsed().as_secs_f64());
        }
        let mut admitted = false;
        if let (Some(plan), Some(slot)) = (self.cache_plan.take(), &self.live.plugins.cache_policy)
            && !estimated
        {
            let meta = ResponseMeta {
                model: self.model.clone(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                finish_reason: finish.to_string(),
                content: content.to_string(),
            };
            let admit = contain(
                slot,
                slot.plugin.admit(&self.view, &meta).await,
                &mut self.row,
            );
            if let Ok(Some(a)) = &admit {
                decided(&mut self.row, slot, format!("admit: {a}"));
            }
            if let Ok(Some(true)) = admit {
                // A copy, not the upstream's `Bytes`: that one is a slice of
                // the connection's read buffer, and holding it would keep the
                // whole buffer (8 KiB and more) alive per entry, ten times
                // what the cache's byte bound counts.
                let body = body.map(|b| Bytes::copy_from_slice(&b)).unwrap_or_else(|| {
                    let id = format!(
                        "chatcmpl-{}",
                        self.row.request_id.trim_start_matches("req_")
                    );
                    let created = gw.clock.now_ms() / 1000;
                    Bytes::from(
                        api::completion_json(&id, created, &self.model, content, finish, &usage)
                            .to_string(),
                    )
                });
                let ttl = plan.ttl;
                let expires_at_ms = gw
                    .clock
                    .now_ms()
                    .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
                self.row.cache_stored_bytes = Some((body.len() + content.len()) as u64);
                gw.cache.put(
                    plan.key,
                    Arc::new(CachedAnswer {
                        model: self.model.clone(),
                        content: content.to_string(),
                        finish: finish.to_string(),
                        usage,
                        body,
                        ttl,
                        expires_at_ms,
                        origin: self.row.request_id.clone(),
                        cost_usd: cost.unwrap_or(0.0),
                        labels: plan.labels,
                    }),
                );
                // Indexed after the answer is stored, so a search never
                // finds a question without its answer.
                if let Some(s) = plan.semantic {
                    gw.semantic.insert(
                        s.context,
                        plan.key,
                        &s.vector,
                        s.text,
                        expires_at_ms,
                        gw.clock.now_ms(),
                    );
                }
                admitted = true;
            }
        }
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let upstream_ms = self.upstream_started.elapsed().as_secs_f64() * 1000.0;
        let mut row = std::mem::take(&mut self.row);
        row.batch_discount = self.batch_discount;
        // What a router shadow's model would have cost for the same usage.
        for s in row.shadow.iter_mut().filter(|s| s.slot == "router") {
            s.cost_usd = s
                .model
                .as_deref()
                .and_then(|m| self.live.catalog.cost(m, &usage));
        }
        row.calls.push(CallRecord {
            model: self.model.clone(),
            provider: row.provider.clone().unwrap_or_default(),
            status: 200,
            error: None,
            prompt_tokens: usage.prompt_tokens,
            cached_tokens: usage.cached_tokens,
            cache_write_tokens: usage.cache_write_tokens,
            completion_tokens: usage.completion_tokens,
            cost_usd: cost,
        });
        row.prompt_tokens = usage.prompt_tokens;
        row.cached_tokens = usage.cached_tokens;
        row.cache_write_tokens = usage.cache_write_tokens;
        row.completion_tokens = usage.completion_tokens;
        row.cost_usd = cost;
        row.unpriced = cost.is_none();
        row.estimated = estimated;
        row.latency_ms = latency_ms;
        row.upstream_ms = Some(upstream_ms);
        if row.status == 0 {
            row.status = 200;
        }
        tracing::info!(
            request_id = %row.request_id,
            tenant = %row.tenant,
            feature = %row.feature,
            model = %self.model,
            prompt_tokens = usage.prompt_tokens,
            cached_tokens = usage.cached_tokens,
            completion_tokens = usage.completion_tokens,
            tokens_saved = row.tokens_saved,
            cost_usd = cost,
            estimated,
            admitted_to_cache = admitted,
            latency_ms = latency_ms as u64,
            "request done"
        );
        if let Some(l) = &gw.ledger {
            l.record(row);
        }
        cost
    }
}
