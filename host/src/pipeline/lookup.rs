//! Step 4 after the cache policy said `lookup`: the exact key first, then,
//! when the policy asked for it, the closest stored question of the same
//! scope and context that passes the near-miss guard.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::ChatRequest;
use crate::cache::{self, AnswerStore, CachedAnswer, near_miss, semantic};
use crate::ledger::Row;
use crate::plugins::types::{CacheLookup, RequestView};

use super::{Gateway, Identity, entry_labels};

/// Stored questions tried per lookup, closest first, until one passes the guard.
const CANDIDATES: usize = 4;

pub(super) enum Lookup {
    Hit {
        answer: Arc<CachedAnswer>,
        /// None for the exact request; the cosine similarity of a semantic match.
        similarity: Option<f32>,
    },
    Miss(cache::Plan),
}

impl Gateway {
    pub(super) async fn lookup(
        &self,
        l: &CacheLookup,
        id: &Identity,
        prompt_version: &str,
        req: &ChatRequest,
        view: &RequestView,
        rec: &mut Row,
    ) -> Lookup {
        let key = cache::key(l.scope, &id.tenant, &id.user, prompt_version, &req.body);
        if let Some(answer) = self.cache.get(&key) {
            return Lookup::Hit {
                answer,
                similarity: None,
            };
        }
        let mut labels = entry_labels(id, l.scope, &req.model, prompt_version);
        labels.tags.extend(l.tags.iter().cloned());
        let mut plan = cache::Plan {
            key,
            ttl: Duration::from_secs(u64::from(l.ttl_seconds)),
            labels,
            semantic: None,
        };
        let Some(s) = &l.semantic else {
            return Lookup::Miss(plan);
        };
        let text = match &s.text {
            Some(t) => t.clone(),
            None => last_user(view).to_string(),
        };
        if text.trim().is_empty() {
            return Lookup::Miss(plan);
        }
        let Some(vector) = self.embed_question(&text, rec).await else {
            return Lookup::Miss(plan);
        };
        let ctx = semantic::context_key(l.scope, &id.tenant, &id.user, prompt_version, &req.body);
        let now = self.clock.now_ms();
        for c in self
            .semantic
            .nearest(&ctx, &vector, s.min_similarity, CANDIDATES, now)
        {
            if let Some(why) = near_miss::check(&text, &c.text, &s.contrasts) {
                self.metrics.cache_near_miss.inc();
                tracing::debug!(request_id = %rec.request_id, similarity = c.similarity, stored = %c.text, "semantic match refused: {why}");
                continue;
            }
            match self.cache.get(&c.key) {
                Some(answer) => {
                    return Lookup::Hit {
                        answer,
                        similarity: Some(c.similarity),
                    };
                }
                // Expired or invalidated since it was indexed.
                None => self.semantic.forget(&ctx, &c.key),
            }
        }
        plan.semantic = Some(cache::SemanticPlan {
            context: ctx,
            vector,
            text: Arc::from(text),
        });
        Lookup::Miss(plan)
    }

    /// The question's embedding, its time on the ledger row; None (exact
    /// matching only) when the gateway has no model or embedding failed.
    async fn embed_question(&self, text: &str, rec: &mut Row) -> Option<Arc<[f32]>> {
        let model = match &self.embedder {
            Some(Ok(m)) => m,
            Some(Err(why)) => {
                self.warn_no_embeddings(why);
                return None;
            }
            None => {
                self.warn_no_embeddings("embeddings.model_dir is not set");
                return None;
            }
        };
        let started = Instant::now();
        let r = model
            .embed_async(text.to_string(), Duration::from_millis(EMBED_TIMEOUT_MS))
            .await;
        rec.embed_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(request_id = %rec.request_id, "semantic lookup skipped: {e}");
                None
            }
        }
    }

    fn warn_no_embeddings(&self, why: &str) {
        if !self
            .semantic_off_warned
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "a cache policy asked for semantic matching but the gateway has no embedding model ({why}): exact matching only"
            );
        }
    }
}

/// Longest a question's embedding may take before the lookup goes on
/// without it (a forward pass takes ~5-20 ms; this covers a queue).
const EMBED_TIMEOUT_MS: u64 = 500;

fn last_user(view: &RequestView) -> &str {
    view.messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| m.content.as_str())
}
