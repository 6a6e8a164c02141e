//! The semantic index: embeddings of the questions whose answers are in
//! the answer store, so a differently worded question can find them.
//!
//! Vectors are grouped by context — the scope (tenant, or tenant+user), the
//! prompt version and everything in the request except the text compared
//! (see [`context_key`]) — and a search only ever looks inside one group.
//! Two tenants, two users' private answers, or the same question with
//! different injected data (an account snapshot, a status page) never meet.
//!
//! Search is exact — a scan of one group's vectors, stored contiguously —
//! until a group holds `cache.semantic_ann_from` entries; from then on an
//! HNSW graph (hnsw_rs) answers it, built on a background thread while the
//! scan goes on serving, then kept up to date on every insert. Removed
//! entries stay in the graph as tombstones, filtered out of every search,
//! until they are half of it and the graph is rebuilt. The graph is
//! approximate: it may miss the closest stored question (a miss, one more
//! upstream call), never serve a farther one below the threshold, since
//! every candidate is rescored exactly and the guard still applies.
//!
//! Groups are bounded (`cache.semantic_max_entries_per_scope`); at the
//! bound the oldest entry makes room. The answers themselves live in the
//! [`super::AnswerStore`]: an index entry whose answer expired or was
//! invalidated is dropped when a search meets it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use hnsw_rs::prelude::{Distance, FilterT, Hnsw};

use serde_json::{Map, Value};

use super::CacheKey;
use crate::embed::cosine;
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
    let mut body = super::canonical(body);
    if let Some(Value::Array(messages)) = body.get_mut("messages")
        && let Some(last) = messages
            .iter_mut()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        && let Some(m) = last.as_object_mut()
    {
        m.insert("content".into(), Value::String("\u{0}compared".into()));
    }
    super::key_of_canonical(scope, tenant, user, prompt_version, body)
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

/// 1 - cosine of unit vectors, never negative (rounding can put a dot
/// product of a vector with itself just above 1).
struct CosineDistance;

impl Distance<f32> for CosineDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - cosine(a, b)).max(0.0)
    }
}

/// Graph width and effort: 16 links per node, 64 candidates explored when
/// inserting and 4 x k (at least 64) when searching.
const ANN_LINKS: usize = 16;
const ANN_EF_CONSTRUCTION: usize = 64;
const ANN_EF_SEARCH: usize = 64;

/// A group's HNSW graph. Nodes are labelled with the entries' `seq`.
struct Ann {
    graph: Hnsw<'static, f32, CosineDistance>,
    /// Nodes in the graph, removed entries included.
    nodes: usize,
}

impl Ann {
    fn build(points: &[(Vec<f32>, u64)], capacity: usize) -> Self {
        let graph = Hnsw::new(
            ANN_LINKS,
            capacity.max(points.len()),
            16,
            ANN_EF_CONSTRUCTION,
            CosineDistance,
        );
        let data: Vec<(&[f32], usize)> = points
            .iter()
            .map(|(v, seq)| (v.as_slice(), *seq as usize))
            .collect();
        graph.parallel_insert_slice(&data);
        Self {
            graph,
            nodes: points.len(),
        }
    }
}

#[derive(Default)]
struct Group {
    /// `metas.len() * DIMS` floats, entry `i` at `i * DIMS`.
    vectors: Vec<f32>,
    metas: Vec<Meta>,
    /// Where each live entry is in `metas`, by `seq` (kept only with a graph).
    position: HashMap<u64, usize>,
    ann: Option<Ann>,
    /// A graph is being built on a background thread.
    building: Arc<AtomicBool>,
}

impl Group {
    fn remove(&mut self, i: usize) {
        let last = self.metas.len() - 1;
        if i != last {
            let (head, tail) = self.vectors.split_at_mut(last * DIMS);
            head[i * DIMS..(i + 1) * DIMS].copy_from_slice(&tail[..DIMS]);
        }
        self.vectors.truncate(last * DIMS);
        let gone = self.metas.swap_remove(i);
        if self.ann.is_some() {
            self.position.remove(&gone.seq);
            if let Some(moved) = self.metas.get(i) {
                self.position.insert(moved.seq, i);
            }
        }
    }

    fn push(&mut self, vector: &[f32], meta: Meta) {
        if let Some(ann) = &mut self.ann {
            // The graph library asserts its invariants; should one fail,
            // the group goes back to scanning rather than failing a request.
            let inserted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ann.graph.insert_slice((vector, meta.seq as usize));
            }));
            if inserted.is_ok() {
                ann.nodes += 1;
                self.position.insert(meta.seq, self.metas.len());
            } else {
                tracing::error!("semantic index: graph insert failed; the group is scanned");
                self.ann = None;
                self.position.clear();
            }
        }
        self.vectors.extend_from_slice(vector);
        self.metas.push(meta);
    }

    /// Takes a graph built from a snapshot: entries added since are
    /// inserted into it, entries removed since are tombstones.
    fn attach(&mut self, ann: Ann, snapshot_seq: u64) {
        let mut ann = ann;
        self.position = self
            .metas
            .iter()
            .enumerate()
            .map(|(i, m)| (m.seq, i))
            .collect();
        for (i, m) in self.metas.iter().enumerate() {
            if m.seq > snapshot_seq {
                ann.graph
                    .insert_slice((&self.vectors[i * DIMS..(i + 1) * DIMS], m.seq as usize));
                ann.nodes += 1;
            }
        }
        self.ann = Some(ann);
    }

    /// Candidates (similarity, position) at least `min` close, from the
    /// graph when there is one, else from a scan.
    fn search(&self, query: &[f32], min: f32, k: usize, now_ms: u64) -> Vec<(f32, usize)> {
        let keep = |s: f32, i: usize| s >= min && self.metas[i].expires_at_ms > now_ms;
        let from_graph = self.ann.as_ref().and_then(|ann| {
            let live = |seq: &usize| self.position.contains_key(&(*seq as u64));
            let filter: &dyn FilterT = &live;
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ann.graph
                    .search_filter(query, k, ANN_EF_SEARCH.max(4 * k), Some(filter))
            }))
            .inspect_err(|_| tracing::error!("semantic index: graph search failed; scanning"))
            .ok()
        });
        let mut found: Vec<(f32, usize)> = match from_graph {
            Some(neighbours) => neighbours
                .into_iter()
                .filter_map(|n| self.position.get(&(n.d_id as u64)).copied())
                .map(|i| (cosine(&self.vectors[i * DIMS..(i + 1) * DIMS], query), i))
                .filter(|&(s, i)| keep(s, i))
                .collect(),
            None => self
                .vectors
                .chunks_exact(DIMS)
                .enumerate()
                .map(|(i, v)| (cosine(v, query), i))
                .filter(|&(s, i)| keep(s, i))
                .collect(),
        };
        found.sort_by(|a, b| b.0.total_cmp(&a.0));
        found.truncate(k);
        found
    }
}

pub struct SemanticIndex {
    groups: RwLock<HashMap<ContextKey, Arc<RwLock<Group>>>>,
    max_per_group: usize,
    /// Groups this large are searched through a graph.
    ann_from: usize,
    seq: std::sync::atomic::AtomicU64,
}

/// The dimension of the gateway's embedding model.
pub const DIMS: usize = 384;

impl SemanticIndex {
    pub fn new(max_per_group: usize, ann_from: usize) -> Self {
        Self {
            groups: RwLock::default(),
            max_per_group: max_per_group.max(1),
            ann_from: ann_from.max(1),
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
        // Non-finite values would poison every distance (the graph panics on NaN).
        if vector.len() != DIMS || !vector.iter().all(|x| x.is_finite()) {
            return;
        }
        let group = {
            let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
            groups.entry(ctx).or_default().clone()
        };
        let mut g = group.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = g.metas.iter().position(|m| m.key == key) {
            g.remove(i);
        }
        if g.metas.len() >= self.max_per_group {
            // Expired first, then the oldest.
            let mut i = 0;
            while i < g.metas.len() {
                if g.metas[i].expires_at_ms <= now_ms {
                    g.remove(i);
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
                    Some(i) => g.remove(i),
                    None => break,
                }
            }
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        g.push(
            vector,
            Meta {
                key,
                text,
                expires_at_ms,
                seq,
            },
        );
        let stale = g
            .ann
            .as_ref()
            .is_some_and(|a| a.nodes > 2 * g.metas.len().max(self.ann_from / 2));
        let wanted = (g.ann.is_none() && g.metas.len() >= self.ann_from) || stale;
        if wanted && !g.building.swap(true, Ordering::AcqRel) {
            self.build_in_background(&group, &g);
        }
    }

    /// Builds a graph of the group's current entries on a thread of its
    /// own; the group is searched by scanning until it is attached.
    fn build_in_background(&self, group: &Arc<RwLock<Group>>, g: &Group) {
        let points: Vec<(Vec<f32>, u64)> = g
            .vectors
            .chunks_exact(DIMS)
            .zip(&g.metas)
            .map(|(v, m)| (v.to_vec(), m.seq))
            .collect();
        let snapshot_seq = g.metas.iter().map(|m| m.seq).max().unwrap_or(0);
        let capacity = self.max_per_group;
        let group = Arc::downgrade(group);
        let building = g.building.clone();
        let spawned = std::thread::Builder::new()
            .name("semantic-ann".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let built = std::panic::catch_unwind(|| Ann::build(&points, capacity));
                let Ok(ann) = built else {
                    tracing::error!("semantic index: graph build failed; searches stay exact");
                    building.store(false, Ordering::Release);
                    return;
                };
                if let Some(group) = group.upgrade() {
                    let mut g = group.write().unwrap_or_else(|p| p.into_inner());
                    g.attach(ann, snapshot_seq);
                    tracing::info!(
                        entries = g.metas.len(),
                        ms = started.elapsed().as_millis(),
                        "semantic index: graph built"
                    );
                }
                building.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!("semantic index: cannot start a graph build ({e}); searches stay exact");
            g.building.store(false, Ordering::Release);
        }
    }

    /// Waits until no graph is being built (tests and benchmarks).
    pub fn wait_for_builds(&self) {
        loop {
            let busy = {
                let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
                groups.values().any(|g| {
                    g.read()
                        .unwrap_or_else(|p| p.into_inner())
                        .building
                        .load(Ordering::Acquire)
                })
            };
            if !busy {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Whether `ctx`'s group is searched through a graph.
    pub fn uses_graph(&self, ctx: &ContextKey) -> bool {
        self.group(ctx)
            .is_some_and(|g| g.read().unwrap_or_else(|p| p.into_inner()).ann.is_some())
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
        if query.len() != DIMS || !query.iter().all(|x| x.is_finite()) {
            return Vec::new();
        }
        let Some(group) = self.group(ctx) else {
            return Vec::new();
        };
        let g = group.read().unwrap_or_else(|p| p.into_inner());
        g.search(query, min_similarity, k, now_ms)
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
                    g.remove(i);
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
                g.remove(i);
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
        let idx = SemanticIndex::new(100, 1_000_000);
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
    fn a_large_group_is_searched_through_a_graph_that_finds_the_same_neighbours() {
        let idx = SemanticIndex::new(10_000, 500);
        let g = [9; 32];
        for i in 0..1_000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            idx.insert(g, key, &unit(i), format!("q{i}").into(), u64::MAX, 0);
        }
        idx.wait_for_builds();
        assert!(idx.uses_graph(&g));
        let mut agree = 0;
        for i in (0..1_000u32).step_by(10) {
            let hits = idx.nearest(&g, &unit(i), 0.0, 1, 0);
            agree += usize::from(hits.first().is_some_and(|c| *c.text == format!("q{i}")));
        }
        assert!(
            agree >= 95,
            "the graph found {agree} of 100 exact neighbours"
        );
        // Removed entries are never returned.
        let mut gone = [0u8; 32];
        gone[..4].copy_from_slice(&7u32.to_le_bytes());
        idx.forget(&g, &gone);
        assert!(
            idx.nearest(&g, &unit(7), 0.0, 4, 0)
                .iter()
                .all(|c| c.key != gone)
        );
        // Inserts after the build are searchable at once.
        idx.insert(g, [200; 32], &unit(5_000), "late".into(), u64::MAX, 0);
        assert_eq!(&*idx.nearest(&g, &unit(5_000), 0.99, 1, 0)[0].text, "late");
    }

    #[test]
    fn bound_expiry_replacement_and_retain() {
        let idx = SemanticIndex::new(2, 1_000_000);
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
