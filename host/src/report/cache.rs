//! What the answer cache did, per group: reads (lookups, hits, what the
//! hits saved) and writes (answers stored, their bytes, the embedding time
//! of semantic lookups), so the net saving and hit rate of each route show,
//! not just a hit count.
//!
//! A hit saves what its origin's upstream call cost (`cache_saved_usd`).
//! Embeddings run on the gateway's own CPU and cost no money; their time is
//! reported, as the price a semantic lookup pays on every miss.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use rusqlite::Connection;
use serde::Serialize;

use super::{Grouping, Query, ReportError};

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CacheLine {
    pub group: BTreeMap<String, String>,
    pub requests: u64,
    /// Requests the cache policy sent to the cache (hit or miss).
    pub lookups: u64,
    pub hits: u64,
    pub semantic_hits: u64,
    /// hits / lookups.
    pub hit_rate: f64,
    /// What the hits' origins cost upstream.
    pub saved_usd: f64,
    /// Answers admitted to the cache, and their bytes.
    pub stored: u64,
    pub stored_bytes: u64,
    /// Requests that embedded their question, and the time it took.
    pub embedded: u64,
    pub embed_ms: f64,
    /// Money the embeddings cost: 0 with the gateway's local model.
    pub embed_usd: f64,
    /// saved - embedding cost.
    pub net_saving_usd: f64,
}

impl CacheLine {
    fn add(&mut self, r: &CacheRow) {
        self.requests += 1;
        let hit = r.cache == "hit";
        self.lookups += u64::from(hit || r.cache == "miss");
        self.hits += u64::from(hit);
        self.semantic_hits += u64::from(hit && r.similarity.is_some());
        self.saved_usd += r.saved.unwrap_or(0.0);
        self.stored += u64::from(r.stored_bytes.is_some());
        self.stored_bytes += r.stored_bytes.unwrap_or(0).max(0) as u64;
        self.embedded += u64::from(r.embed_ms.is_some());
        self.embed_ms += r.embed_ms.unwrap_or(0.0);
    }

    fn finish(mut self) -> Self {
        self.hit_rate = self.hits as f64 / self.lookups.max(1) as f64;
        self.net_saving_usd = self.saved_usd - self.embed_usd;
        self
    }
}

struct CacheRow {
    cache: String,
    similarity: Option<f64>,
    saved: Option<f64>,
    stored_bytes: Option<i64>,
    embed_ms: Option<f64>,
}

/// Cache reads and writes grouped by `q.group_by`, most saved first, and
/// the total.
pub fn run(conn: &Connection, q: &Query) -> Result<(Vec<CacheLine>, CacheLine), ReportError> {
    let mut st = conn.prepare(
        "SELECT tenant, user, feature, model_asked, model_served, decisions, provider, ts_ms,
                cache, cache_similarity, cache_saved_usd, cache_stored_bytes, embed_ms
         FROM requests
         WHERE ts_ms >= ?1 AND ts_ms < ?2 AND (?3 IS NULL OR tenant = ?3)",
    )?;
    let (since, until) = crate::ledger::ts_range(q.since_ms, q.until_ms);
    let mut groups: HashMap<Vec<String>, CacheLine> = HashMap::new();
    let mut total = CacheLine::default();
    let mut rows = st.query(rusqlite::params![since, until, q.tenant])?;
    while let Some(r) = rows.next()? {
        let (tenant, user, feature, asked): (String, String, String, String) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        let served: Option<String> = r.get(4)?;
        let (decisions, provider): (String, Option<String>) = (r.get(5)?, r.get(6)?);
        let key = Grouping {
            tenant: &tenant,
            user: &user,
            feature: &feature,
            asked: &asked,
            served: served.as_deref(),
            decisions: &decisions,
            provider: provider.as_deref(),
            ts: r.get(7)?,
        }
        .key(&q.group_by);
        let row = CacheRow {
            cache: r.get(8)?,
            similarity: r.get(9)?,
            saved: r.get(10)?,
            stored_bytes: r.get(11)?,
            embed_ms: r.get(12)?,
        };
        let line = groups.entry(key.clone()).or_insert_with(|| CacheLine {
            group: q
                .group_by
                .iter()
                .map(|d| d.name().to_string())
                .zip(key)
                .collect(),
            ..CacheLine::default()
        });
        line.add(&row);
        total.add(&row);
    }
    let mut lines: Vec<CacheLine> = groups.into_values().map(CacheLine::finish).collect();
    lines.sort_by(|a, b| {
        b.saved_usd
            .total_cmp(&a.saved_usd)
            .then_with(|| a.group.cmp(&b.group))
    });
    if let Some(n) = q.top {
        lines.truncate(n);
    }
    Ok((lines, total.finish()))
}

/// Cache lines as aligned text, the total last.
pub fn table(group_by: &[&str], lines: &[CacheLine], total: &CacheLine) -> String {
    let group_width = lines
        .iter()
        .map(|l| {
            l.group
                .values()
                .cloned()
                .collect::<Vec<_>>()
                .join("/")
                .len()
        })
        .chain([group_by.join("/").len(), 5])
        .max()
        .unwrap_or(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<group_width$}  {:>8} {:>8} {:>7} {:>8} {:>8} {:>11} {:>7} {:>12} {:>8} {:>12} {:>14}",
        group_by.join("/"),
        "requests",
        "lookups",
        "hits",
        "semantic",
        "hit_rate",
        "saved_usd",
        "stored",
        "stored_bytes",
        "embedded",
        "embed_ms_avg",
        "net_saving_usd",
    );
    let mut line = |name: String, l: &CacheLine| {
        let _ = writeln!(
            out,
            "{name:<group_width$}  {:>8} {:>8} {:>7} {:>8} {:>7.2}% {:>11.6} {:>7} {:>12} {:>8} {:>12.2} {:>14.6}",
            l.requests,
            l.lookups,
            l.hits,
            l.semantic_hits,
            l.hit_rate * 100.0,
            l.saved_usd,
            l.stored,
            l.stored_bytes,
            l.embedded,
            l.embed_ms / l.embedded.max(1) as f64,
            l.net_saving_usd,
        );
    };
    for l in lines {
        line(l.group.values().cloned().collect::<Vec<_>>().join("/"), l);
    }
    line("TOTAL".into(), total);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Dim;

    #[test]
    fn reads_and_writes_add_up_per_feature() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::ledger::open_db(&dir.path().join("l.sqlite")).unwrap();
        let put = |id: &str,
                   feature: &str,
                   cache: &str,
                   sim: Option<f64>,
                   saved: Option<f64>,
                   bytes: Option<i64>,
                   embed: Option<f64>| {
            conn.execute(
                "INSERT INTO requests (request_id, request_hash, ts_ms, tenant, user, feature, task, step,
                 model_asked, decisions, cache, stream, prompt_tokens, cached_tokens, cache_write_tokens,
                 completion_tokens, tokens_saved, chars_before, chars_after, latency_ms, status, estimated,
                 unpriced, cache_similarity, cache_saved_usd, cache_stored_bytes, embed_ms)
                 VALUES (?1, 'h', 1000, 'acme', 'u', ?2, 't', 0, 'gpt-4o', '[]', ?3, 0, 0, 0, 0, 0, 0, 0, 0,
                 1.0, 200, 0, 0, ?4, ?5, ?6, ?7)",
                rusqlite::params![id, feature, cache, sim, saved, bytes, embed],
            )
            .unwrap();
        };
        put("1", "faq", "miss", None, None, Some(900), Some(12.0));
        put("2", "faq", "hit", Some(0.93), Some(0.002), None, Some(10.0));
        put("3", "faq", "hit", None, Some(0.002), None, None);
        put("4", "faq", "bypass", None, None, None, None);
        put("5", "docs", "miss", None, None, Some(100), None);
        let q = Query {
            group_by: vec![Dim::Feature],
            ..Query::default()
        };
        let (lines, total) = run(&conn, &q).unwrap();
        let faq = &lines[0];
        assert_eq!(faq.group["feature"], "faq");
        assert_eq!(
            (faq.requests, faq.lookups, faq.hits, faq.semantic_hits),
            (4, 3, 2, 1)
        );
        assert!((faq.hit_rate - 2.0 / 3.0).abs() < 1e-9);
        assert!((faq.net_saving_usd - 0.004).abs() < 1e-12);
        assert_eq!((faq.stored, faq.stored_bytes, faq.embedded), (1, 900, 2));
        assert_eq!((total.lookups, total.stored_bytes), (4, 1000));
        let text = table(&["feature"], &lines, &total);
        assert!(text.lines().last().unwrap().starts_with("TOTAL"), "{text}");
    }
}
