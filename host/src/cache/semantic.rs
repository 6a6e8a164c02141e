//! The semantic index: embeddings of the questions whose answers are in
//! the answer store, so a differently worded question can find them.
//!
//! Vectors are grouped by context — the scope (tenant, or tenant+user), the
//! prompt version and everything in the request except the text compared
//! (see [`context_key`]) — and a search only ever looks inside one group.
//! Two tenants, two users' private answers, or the same question with
//! different injected data (an account snapshot, a status page) never meet.
//!
//! Search is exact: a scan of one group's vectors, stored contiguously.
//! Groups are bounded (`cache.semantic_max_entries_per_scope`); at the
//! bound the oldest entry makes room. The answers themselves live in the
//! [`super::AnswerStore`]: an index entry whose answer expired or was
//! invalidated is dropped when a search meets it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use super::CacheKey;
use crate::plugins::types::CacheScope;

pub type ContextKey = [u8; 32];

/// The group a request's question is compared in: the exact cache key of
/// the request with the last user message left out (its text is what the
/// embedding stands for).
pub fn context_key(
    scope: CacheScope,
    tenant: &str,
    user: &str,
    prompt_version: &str,
    body: &Map<String, Value>,
) -> ContextKey {
    let mut body = body.clone();
    if let Some(Value::Array(messages)) = body.get_mut("messages")
        && let Some(last) = messages
            .iter_mut()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        && let Some(m) = last.as_object_mut()
    {
        m.insert("content".into(), Value::String("\u{0}compared".into()));
    }
    super::key(scope, tenant, user, prompt_version, &body)
}

/// A stored question close enough to be considered.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub key: CacheKey,
    pub similarity: f32,
    pub text: Arc<str>,
}

struct Meta {
    key: CacheKey,
    text: Arc<str>,
    expires_at_ms: u64,
    /// Insertion order, to find the oldest entry at the bound.
    seq: u64,
}

#[derive(Default)]
struct Group {
    /// `metas.len() * dims` floats, entry `i` at `i * dims`.
    vectors: Vec<f32>,
    metas: Vec<Meta>,
}

impl Group {
    fn remove(&mut self, i: usize, dims: usize) {
        let last = self.metas.len() - 1;
        if i != last {
            let (head, tail) = self.vectors.split_at_mut(last * dims);
            head[i * dims..(i + 1) * dims].copy_from_slice(&tail[..dims]);
        }
        self.vectors.truncate(last * dims);
        self.metas.swap_remove(i);
    }
}

pub struct SemanticIndex {
    groups: RwLock<HashMap<ContextKey, Arc<RwLock<Group>>>>,
    max_per_group: usize,
    seq: std::sync::atomic::AtomicU64,
}

/// The dimension of the gateway's embedding model.
pub const DIMS: usize = 384;

impl SemanticIndex {
    pub fn new(max_per_group: usize) -> Self {
        Self {
            groups: RwLock::default(),
            max_per_group: max_per_group.max(1),
            seq: Default::default(),
        }
    }

    fn group(&self, ctx: &ContextKey) -> Option<Arc<RwLock<Group>>> {
        let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
        groups.get(ctx).cloned()
    }

    /// Adds (or replaces) the question stored under `key`.
    pub fn insert(
        &self,
        ctx: ContextKey,
        key: CacheKey,
        vector: &[f32],
        text: Arc<str>,
        expires_at_ms: u64,
        now_ms: u64,
    ) {
        if vector.len() != DIMS {
            return;
        }
        let group = {
            let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
            groups.entry(ctx).or_default().clone()
        };
        let mut g = group.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = g.metas.iter().position(|m| m.key == key) {
            g.remove(i, DIMS);
        }
        if g.metas.len() >= self.max_per_group {
            // Expired first, then the oldest.
            let mut i = 0;
            while i < g.metas.len() {
                if g.metas[i].expires_at_ms <= now_ms {
                    g.remove(i, DIMS);
                } else {
                    i += 1;
                }
            }
            while g.metas.len() >= self.max_per_group {
                let oldest = g
                    .metas
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, m)| m.seq)
                    .map(|(i, _)| i);
                match oldest {
                    Some(i) => g.remove(i, DIMS),
                    None => break,
                }
            }
        }
        g.vectors.extend_from_slice(vector);
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        g.metas.push(Meta {
            key,
            text,
            expires_at_ms,
            seq,
        });
    }

    /// Up to `k` stored questions of the group at least `min_similarity`
    /// close to `query`, closest first; expired ones are skipped.
    pub fn nearest(
        &self,
        ctx: &ContextKey,
        query: &[f32],
        min_similarity: f32,
        k: usize,
        now_ms: u64,
    ) -> Vec<Candidate> {
        if query.len() != DIMS {
            return Vec::new();
        }
        let Some(group) = self.group(ctx) else {
            return Vec::new();
        };
        let g = group.read().unwrap_or_else(|p| p.into_inner());
        let mut found: Vec<(f32, usize)> = Vec::new();
        for (i, v) in g.vectors.chunks_exact(DIMS).enumerate() {
            let s = dot(v, query);
            if s >= min_similarity && g.metas[i].expires_at_ms > now_ms {
                found.push((s, i));
            }
        }
        found.sort_by(|a, b| b.0.total_cmp(&a.0));
        found.truncate(k);
        found
            .into_iter()
            .map(|(s, i)| Candidate {
                key: g.metas[i].key,
                similarity: s,
                text: g.metas[i].text.clone(),
            })
            .collect()
    }

    /// Drops the entries whose answer is gone (`keep` says false).
    pub fn retain(&self, keep: impl Fn(&CacheKey) -> bool) -> usize {
        let groups: Vec<Arc<RwLock<Group>>> = {
            let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
            groups.values().cloned().collect()
        };
        let mut dropped = 0;
        for group in groups {
            let mut g = group.write().unwrap_or_else(|p| p.into_inner());
            let mut i = 0;
            while i < g.metas.len() {
                if keep(&g.metas[i].key) {
                    i += 1;
                } else {
                    g.remove(i, DIMS);
                    dropped += 1;
                }
            }
        }
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        groups.retain(|_, g| !g.read().unwrap_or_else(|p| p.into_inner()).metas.is_empty());
        dropped
    }

    /// Drops one entry (its answer was found gone during a search).
    pub fn forget(&self, ctx: &ContextKey, key: &CacheKey) {
        if let Some(group) = self.group(ctx) {
            let mut g = group.write().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = g.metas.iter().position(|m| m.key == *key) {
                g.remove(i, DIMS);
            }
        }
    }

    /// Entries over all groups.
    pub fn len(&self) -> usize {
        let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
        groups
            .values()
            .map(|g| g.read().unwrap_or_else(|p| p.into_inner()).metas.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Dot product in eight independent lanes, which the compiler turns into
/// SIMD multiply-adds.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn unit(seed: u32) -> Vec<f32> {
        let mut v: Vec<f32> = (0..DIMS as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 1000) as f32)
            .map(|x| x / 1000.0 - 0.5)
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    }

    #[test]
    fn context_leaves_out_only_the_last_user_message() {
        let body = |last: &str, system: &str| {
            json!({"model": "m", "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": last}]})
            .as_object()
            .unwrap()
            .clone()
        };
        let k = |b| context_key(CacheScope::Tenant, "t", "u", "", &b);
        assert_eq!(k(body("a", "s")), k(body("b", "s")));
        assert_ne!(k(body("a", "s")), k(body("a", "account: 42")));
        assert_ne!(
            k(body("a", "s")),
            context_key(CacheScope::Tenant, "t2", "u", "", &body("a", "s"))
        );
    }

    #[test]
    fn nearest_is_closest_first_within_its_group_only() {
        let idx = SemanticIndex::new(100);
        let (a, b) = ([1; 32], [2; 32]);
        idx.insert(a, [10; 32], &unit(1), "one".into(), u64::MAX, 0);
        idx.insert(a, [11; 32], &unit(2), "two".into(), u64::MAX, 0);
        idx.insert(b, [12; 32], &unit(1), "other group".into(), u64::MAX, 0);
        let hits = idx.nearest(&a, &unit(1), 0.0, 5, 0);
        assert_eq!(hits[0].key, [10; 32]);
        assert!((hits[0].similarity - 1.0).abs() < 1e-4);
        assert!(hits.iter().all(|c| c.key != [12; 32]));
        assert!(idx.nearest(&a, &unit(1), 0.9999, 5, 0).len() == 1);
        assert!(idx.nearest(&[3; 32], &unit(1), 0.0, 5, 0).is_empty());
    }

    #[test]
    fn bound_expiry_replacement_and_retain() {
        let idx = SemanticIndex::new(2);
        let g = [1; 32];
        idx.insert(g, [1; 32], &unit(1), "a".into(), 100, 0);
        idx.insert(g, [2; 32], &unit(2), "b".into(), u64::MAX, 0);
        assert!(
            idx.nearest(&g, &unit(1), 0.99, 5, 100).is_empty(),
            "expired"
        );
        idx.insert(g, [3; 32], &unit(3), "c".into(), u64::MAX, 200);
        assert_eq!(idx.len(), 2, "the expired entry made room");
        idx.insert(g, [4; 32], &unit(4), "d".into(), u64::MAX, 200);
        assert_eq!(idx.len(), 2);
        assert!(
            idx.nearest(&g, &unit(2), 0.99, 5, 200).is_empty(),
            "oldest gone"
        );
        idx.insert(g, [4; 32], &unit(5), "d again".into(), u64::MAX, 200);
        assert_eq!(idx.len(), 2, "same key replaced");
        assert_eq!(idx.retain(|k| *k != [3; 32]), 1);
        assert_eq!(idx.len(), 1);
        idx.forget(&g, &[4; 32]);
        assert!(idx.is_empty());
    }
}
