//! The answer cache. Keys are BLAKE3 hashes of the canonical request inside a
//! scope the cache policy chose: the tenant always, plus the user for
//! personal answers. Two tenants can never share an entry, because the
//! tenant is part of every key.

pub mod near_miss;
pub mod semantic;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::clock::Clock;
use crate::plugins::types::CacheScope;
use crate::pricing::Usage;

/// Request fields that change the answer. Everything else (stream,
/// stream_options, user, metadata) does not take part in the key.
const KEY_FIELDS: [&str; 21] = [
    "model",
    "messages",
    "temperature",
    "top_p",
    "n",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "parallel_tool_calls",
    "reasoning_effort",
];

pub type CacheKey = [u8; 32];

/// Where an admitted answer goes: its key, how long it is served, and
/// what it can be invalidated by.
#[derive(Debug, Clone)]
pub struct Plan {
    pub key: CacheKey,
    pub ttl: Duration,
    pub labels: EntryLabels,
    /// Set when the lookup was semantic: the answer, once admitted, is
    /// indexed under this question so rewordings can find it.
    pub semantic: Option<SemanticPlan>,
}

/// The question a semantic lookup embedded, to index with the answer.
#[derive(Debug, Clone)]
pub struct SemanticPlan {
    pub context: semantic::ContextKey,
    pub vector: Arc<[f32]>,
    pub text: Arc<str>,
}

/// The cache key of a request body within a scope. The prompt version
/// (`x-tollgate-prompt-version`, else a hash of the system messages) is
/// part of it: a new version of a prompt never gets the old one's answers.
pub fn key(
    scope: CacheScope,
    tenant: &str,
    user: &str,
    prompt_version: &str,
    body: &Map<String, Value>,
) -> CacheKey {
    key_of_json(
        scope,
        tenant,
        user,
        prompt_version,
        &canonical_json(&Canonical(body)),
    )
}

/// The fields of a request body that change the answer, borrowed: it
/// serialises as the JSON object of those fields in key order, with
/// nothing copied. (A body is a sorted map, so its order is the key order.)
struct Canonical<'a>(&'a Map<String, Value>);

impl Canonical<'_> {
    fn fields(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0
            .iter()
            .filter(|(k, _)| KEY_FIELDS.contains(&k.as_str()))
    }
}

impl serde::Serialize for Canonical<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.fields())
    }
}

/// The fields of `body` that change the answer, as an owned object (for a
/// key that leaves something out, see `semantic::context_key`).
fn canonical(body: &Map<String, Value>) -> Map<String, Value> {
    Canonical(body)
        .fields()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Compact JSON, as `Value::to_string` writes it; serialising plain JSON
/// values into memory cannot fail.
fn canonical_json(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn key_of_canonical(
    scope: CacheScope,
    tenant: &str,
    user: &str,
    prompt_version: &str,
    canonical: Map<String, Value>,
) -> CacheKey {
    let json = canonical_json(&Value::Object(canonical));
    key_of_json(scope, tenant, user, prompt_version, &json)
}

fn key_of_json(
    scope: CacheScope,
    tenant: &str,
    user: &str,
    prompt_version: &str,
    json: &[u8],
) -> CacheKey {
    // Length-prefixed parts in one buffer, hashed once (cheaper than many
    // small updates).
    let mut buf = Vec::with_capacity(json.len() + tenant.len() + user.len() + 96);
    let mut part = |bytes: &[u8]| {
        buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        buf.extend_from_slice(bytes);
    };
    part(b"tollgate-cache-v1");
    part(tenant.as_bytes());
    part(prompt_version.as_bytes());
    match scope {
        CacheScope::Tenant => part(b"tenant"),
        CacheScope::TenantUser => {
            part(b"tenant-user");
            part(user.as_bytes());
        }
    }
    part(json);
    *blake3::hash(&buf).as_bytes()
}

/// A stored answer, enough to replay it as JSON or as a stream.
#[derive(Debug)]
pub struct CachedAnswer {
    pub model: String,
    pub content: String,
    pub finish: String,
    pub usage: Usage,
    /// The original JSON response, replayed as-is to non-streaming clients.
    pub body: Bytes,
    pub ttl: Duration,
    /// Gateway-clock time after which the answer is no longer served; the
    /// TTL follows the gateway's clock, so a replayed day expires answers
    /// on the trace's time.
    pub expires_at_ms: u64,
    /// The request whose upstream answer this is (audit, replay scoring).
    pub origin: String,
    /// What the upstream call cost: what each hit saves.
    pub cost_usd: f64,
    /// What the entry can be invalidated by.
    pub labels: EntryLabels,
}

impl CachedAnswer {
    /// What the entry keeps resident, so `[cache] max_bytes` bounds memory
    /// rather than only answer text: its strings, plus the struct, the
    /// allocator's rounding and moka's per-entry bookkeeping (key, queue
    /// nodes, expiry timer), which measured about 600 bytes per entry.
    fn resident_bytes(&self) -> usize {
        const FIXED: usize = 600;
        FIXED
            + self.body.len()
            + self.content.len()
            + self.model.len()
            + self.finish.len()
            + self.origin.len()
            + self.labels.tenant.len()
            + self.labels.user.as_ref().map_or(0, String::len)
            + self.labels.tags.iter().map(|t| t.len() + 24).sum::<usize>()
    }
}

/// Who an entry belongs to and its tags, for invalidation: `tenant:`,
/// `feature:`, `model:` (the model asked), `prompt:` (the prompt version)
/// and one `key:value` tag per `x-tollgate-tag-<key>` header of the request
/// that stored it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntryLabels {
    pub tenant: String,
    /// Set for answers private to one user (the tenant-user scope).
    pub user: Option<String>,
    pub tags: Vec<String>,
}

/// Which entries an invalidation removes: those matching every field given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Invalidation {
    pub tenant: Option<String>,
    pub user: Option<String>,
    pub tag: Option<String>,
}

impl Invalidation {
    pub fn matches(&self, l: &EntryLabels) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == l.tenant)
            && self
                .user
                .as_ref()
                .is_none_or(|u| l.user.as_ref() == Some(u))
            && self.tag.as_ref().is_none_or(|t| l.tags.contains(t))
    }
}

/// Where answers live. The in-memory store is the default; a shared store
/// for several replicas implements the same trait.
pub trait AnswerStore: Send + Sync {
    fn get(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>>;
    fn put(&self, key: CacheKey, answer: Arc<CachedAnswer>);
    /// Removes the entries `which` matches; returns how many.
    fn invalidate(&self, which: &Invalidation) -> usize;
}

struct PerEntryTtl;

impl moka::Expiry<CacheKey, Arc<CachedAnswer>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _k: &CacheKey,
        v: &Arc<CachedAnswer>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

/// In-process store bounded by bytes, with the TTL the policy chose per
/// entry (checked on the gateway clock; moka also drops the entry after the
/// same wall-clock time to free memory).
pub struct MemoryStore {
    inner: moka::sync::Cache<CacheKey, Arc<CachedAnswer>>,
    clock: Arc<dyn Clock>,
}

impl MemoryStore {
    pub fn new(max_bytes: u64, clock: Arc<dyn Clock>) -> Self {
        let inner = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<CachedAnswer>| {
                u32::try_from(v.resident_bytes()).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        Self { inner, clock }
    }

    pub fn entries(&self) -> u64 {
        self.inner.entry_count()
    }
}

impl AnswerStore for MemoryStore {
    fn get(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        let hit = self.inner.get(key)?;
        if hit.expires_at_ms <= self.clock.now_ms() {
            self.inner.invalidate(key);
            return None;
        }
        Some(hit)
    }

    fn put(&self, key: CacheKey, answer: Arc<CachedAnswer>) {
        self.inner.insert(key, answer);
    }

    fn invalidate(&self, which: &Invalidation) -> usize {
        // A walk over every entry: invalidation is an operator's action,
        // rare next to lookups, which stay a single hash probe.
        let doomed: Vec<Arc<CacheKey>> = self
            .inner
            .iter()
            .filter(|(_, v)| which.matches(&v.labels))
            .map(|(k, _)| k)
            .collect();
        for k in &doomed {
            self.inner.invalidate(&**k);
        }
        doomed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_borrowed_canonical_body_writes_what_the_owned_one_does() {
        let b = body(json!({
            "stream": true, "model": "m", "user": "u", "seed": 7,
            "messages": [{"role": "user", "content": "q \"quoted\" é"}],
            "temperature": 0.25, "tools": [{"type": "function"}], "metadata": {"a": 1},
        }));
        let owned = Value::Object(canonical(&b)).to_string();
        assert_eq!(canonical_json(&Canonical(&b)), owned.as_bytes());
        assert!(!owned.contains("stream") && !owned.contains("metadata"));
        assert_eq!(
            key(CacheScope::Tenant, "a", "", "v", &b),
            key_of_canonical(CacheScope::Tenant, "a", "", "v", canonical(&b))
        );
    }

    #[test]
    fn tenant_and_user_separate_keys_and_stream_does_not() {
        let b = body(json!({"model": "m", "messages": [{"role": "user", "content": "q"}]}));
        let mut streamed = b.clone();
        streamed.insert("stream".into(), json!(true));
        let k = |s, t, u, b: &Map<String, Value>| key(s, t, u, "", b);
        assert_eq!(
            k(CacheScope::Tenant, "a", "u1", &b),
            k(CacheScope::Tenant, "a", "u2", &b)
        );
        assert_eq!(
            k(CacheScope::Tenant, "a", "u1", &b),
            k(CacheScope::Tenant, "a", "u1", &streamed)
        );
        assert_ne!(
            k(CacheScope::Tenant, "a", "u1", &b),
            k(CacheScope::Tenant, "b", "u1", &b)
        );
        assert_ne!(
            k(CacheScope::TenantUser, "a", "u1", &b),
            k(CacheScope::TenantUser, "a", "u2", &b)
        );
        assert_ne!(
            k(CacheScope::Tenant, "a", "u1", &b),
            k(CacheScope::TenantUser, "a", "u1", &b)
        );
        let mut hot = b.clone();
        hot.insert("temperature".into(), json!(0.9));
        assert_ne!(
            k(CacheScope::Tenant, "a", "", &b),
            k(CacheScope::Tenant, "a", "", &hot)
        );
        // A tenant name cannot smuggle a user into another scope.
        assert_ne!(
            k(CacheScope::Tenant, "ab", "", &b),
            k(CacheScope::TenantUser, "a", "b", &b)
        );
        assert_ne!(
            key(CacheScope::Tenant, "a", "", "v1", &b),
            key(CacheScope::Tenant, "a", "", "v2", &b),
            "a new prompt version misses"
        );
    }

    fn answer(ttl: Duration, expires_at_ms: u64) -> Arc<CachedAnswer> {
        Arc::new(CachedAnswer {
            model: "m".into(),
            content: "c".into(),
            finish: "stop".into(),
            usage: Usage::default(),
            body: Bytes::from_static(b"{}"),
            ttl,
            expires_at_ms,
            origin: "req_1".into(),
            cost_usd: 0.0,
            labels: EntryLabels::default(),
        })
    }

    #[test]
    fn invalidation_removes_what_matches_every_field_given() {
        let s = MemoryStore::new(1 << 20, Arc::new(crate::clock::SystemClock));
        let put = |k: u8, tenant: &str, user: Option<&str>, tags: &[&str]| {
            let mut a = answer(Duration::from_secs(60), u64::MAX);
            Arc::get_mut(&mut a).unwrap().labels = EntryLabels {
                tenant: tenant.into(),
                user: user.map(str::to_string),
                tags: tags.iter().map(|t| t.to_string()).collect(),
            };
            s.put([k; 32], a);
        };
        put(1, "a", None, &["feature:docs"]);
        put(2, "a", Some("ann"), &["feature:docs"]);
        put(3, "a", None, &["feature:billing"]);
        put(4, "b", None, &["feature:docs"]);
        let tag = |t: &str| Invalidation {
            tag: Some(t.into()),
            ..Default::default()
        };
        assert_eq!(
            s.invalidate(&Invalidation {
                tenant: Some("a".into()),
                ..tag("feature:docs")
            }),
            2
        );
        assert!(s.get(&[1; 32]).is_none() && s.get(&[2; 32]).is_none());
        assert!(s.get(&[3; 32]).is_some() && s.get(&[4; 32]).is_some());
        assert_eq!(s.invalidate(&tag("feature:nothing")), 0);
        put(5, "b", Some("bob"), &[]);
        let bob = Invalidation {
            user: Some("bob".into()),
            ..Default::default()
        };
        assert_eq!(s.invalidate(&bob), 1);
        assert!(
            s.get(&[4; 32]).is_some(),
            "shared answers are not the user's"
        );
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let s = MemoryStore::new(1 << 20, Arc::new(crate::clock::SystemClock));
        s.put([1; 32], answer(Duration::from_millis(50), u64::MAX));
        assert!(s.get(&[1; 32]).is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert!(s.get(&[1; 32]).is_none());
    }

    #[test]
    fn entries_expire_on_the_gateway_clock() {
        let clock = Arc::new(crate::clock::ManualClock::new(1_000));
        let s = MemoryStore::new(1 << 20, clock.clone());
        s.put([1; 32], answer(Duration::from_secs(3600), 61_000));
        clock.set(60_999);
        assert!(s.get(&[1; 32]).is_some());
        clock.set(61_000);
        assert!(
            s.get(&[1; 32]).is_none(),
            "a replayed hour passes in no wall time"
        );
    }
}
