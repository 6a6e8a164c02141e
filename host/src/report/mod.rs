//! Reports over the ledger: spend grouped by any of tenant, user, feature,
//! model, route, provider and day, with what caching and compression saved
//! and the headline number, **cost per successful task**: all the spend of a
//! group divided by the tasks in it that feedback marked successful.
//!
//! A request without `x-tollgate-task` is its own task. Feedback on a
//! request id counts for the request's task; the latest feedback wins.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::str::FromStr;

use rusqlite::Connection;
use serde::Serialize;

use crate::clock::utc_day;

pub mod cache;
use crate::pricing::Catalog;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    Tenant,
    User,
    Feature,
    Model,
    Route,
    Provider,
    Day,
}

impl Dim {
    pub fn name(self) -> &'static str {
        match self {
            Dim::Tenant => "tenant",
            Dim::User => "user",
            Dim::Feature => "feature",
            Dim::Model => "model",
            Dim::Route => "route",
            Dim::Provider => "provider",
            Dim::Day => "day",
        }
    }
}

impl FromStr for Dim {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim() {
            "tenant" => Dim::Tenant,
            "user" => Dim::User,
            "feature" => Dim::Feature,
            "model" => Dim::Model,
            "route" => Dim::Route,
            "provider" => Dim::Provider,
            "day" => Dim::Day,
            other => {
                return Err(format!(
                    "cannot group by {other:?}: use tenant, user, feature, model, route, provider or day"
                ));
            }
        })
    }
}

/// Parses `a,b,c` into dimensions.
pub fn parse_dims(s: &str) -> Result<Vec<Dim>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(Dim::from_str)
        .collect()
}

#[derive(Debug, Clone, Default)]
pub struct Query {
    pub group_by: Vec<Dim>,
    /// Inclusive lower bound, ms since the epoch.
    pub since_ms: Option<u64>,
    /// Exclusive upper bound, ms since the epoch.
    pub until_ms: Option<u64>,
    pub tenant: Option<String>,
    /// Keep only the most expensive groups.
    pub top: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Line {
    pub group: BTreeMap<String, String>,
    pub requests: u64,
    pub errors: u64,
    pub unpriced: u64,
    pub estimated: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub tokens_saved: u64,
    pub cost_usd: f64,
    /// What cached prompt tokens saved against the full input price.
    pub cache_savings_usd: f64,
    /// What compression saved: removed tokens at the input price.
    pub compression_savings_usd: f64,
    pub tasks: u64,
    pub successful_tasks: u64,
    pub cost_per_successful_task: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub group_by: Vec<&'static str>,
    pub lines: Vec<Line>,
    pub total: Line,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("reading the ledger: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

#[derive(Default)]
struct Acc {
    line: Line,
    tasks: HashSet<String>,
    successful: HashSet<String>,
}

impl Acc {
    fn finish(mut self) -> Line {
        self.line.tasks = self.tasks.len() as u64;
        self.line.successful_tasks = self.successful.len() as u64;
        self.line.cost_per_successful_task = (self.line.successful_tasks > 0)
            .then(|| self.line.cost_usd / self.line.successful_tasks as f64);
        self.line
    }
}

fn task_key(tenant: &str, task: &str, request_id: &str) -> String {
    if task.is_empty() {
        format!("req\0{request_id}")
    } else {
        format!("task\0{tenant}\0{task}")
    }
}

/// The latest verdict per task key.
fn feedback(conn: &Connection) -> Result<HashMap<String, bool>, ReportError> {
    let mut st = conn.prepare(
        "SELECT f.tenant, f.request_id, f.task_id, f.success, r.task, r.tenant
         FROM feedback f LEFT JOIN requests r ON r.request_id = f.request_id
         ORDER BY f.id",
    )?;
    let mut out = HashMap::new();
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, bool>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, Option<String>>(5)?,
        ))
    })?;
    for row in rows {
        let (tenant, request_id, task_id, success, req_task, req_tenant) = row?;
        let key = match (task_id, request_id) {
            (Some(t), _) => task_key(&tenant, &t, ""),
            (None, Some(rid)) => task_key(
                req_tenant.as_deref().unwrap_or(&tenant),
                req_task.as_deref().unwrap_or(""),
                &rid,
            ),
            (None, None) => continue,
        };
        out.insert(key, success);
    }
    Ok(out)
}

fn route_of(decisions: &str) -> String {
    serde_json::from_str::<serde_json::Value>(decisions)
        .ok()
        .and_then(|v| {
            v.as_array()?
                .iter()
                .find(|d| d["kind"] == "router")
                .and_then(|d| d["decision"].as_str().map(str::to_string))
        })
        .unwrap_or_else(|| "-".into())
}

/// The ledger columns a group key is made of.
pub(crate) struct Grouping<'a> {
    pub tenant: &'a str,
    pub user: &'a str,
    pub feature: &'a str,
    pub asked: &'a str,
    pub served: Option<&'a str>,
    pub decisions: &'a str,
    pub provider: Option<&'a str>,
    pub ts: i64,
}

impl Grouping<'_> {
    pub fn key(&self, dims: &[Dim]) -> Vec<String> {
        // Requests refused before their body was read have no model.
        let model = || {
            self.served
                .filter(|m| !m.is_empty())
                .or((!self.asked.is_empty()).then_some(self.asked))
                .unwrap_or("-")
                .to_string()
        };
        dims.iter()
            .map(|d| match d {
                Dim::Tenant => self.tenant.to_string(),
                Dim::User => self.user.to_string(),
                Dim::Feature => self.feature.to_string(),
                Dim::Model => model(),
                Dim::Route => route_of(self.decisions),
                Dim::Provider => self.provider.unwrap_or("-").to_string(),
                Dim::Day => utc_day(self.ts.max(0) as u64),
            })
            .collect()
    }
}

/// Runs a report over the ledger.
pub fn run(conn: &Connection, catalog: &Catalog, q: &Query) -> Result<Report, ReportError> {
    let verdicts = feedback(conn)?;
    let mut st = conn.prepare(
        "SELECT request_id, ts_ms, tenant, user, feature, task, model_asked, model_served, provider,
                decisions, status, cost_usd, unpriced, estimated, prompt_tokens, cached_tokens,
                completion_tokens, tokens_saved
         FROM requests
         WHERE ts_ms >= ?1 AND ts_ms < ?2 AND (?3 IS NULL OR tenant = ?3)",
    )?;
    let (since, until) = crate::ledger::ts_range(q.since_ms, q.until_ms);
    let mut groups: HashMap<Vec<String>, Acc> = HashMap::new();
    let mut total = Acc::default();
    let mut rows = st.query(rusqlite::params![since, until, q.tenant])?;
    while let Some(r) = rows.next()? {
        let request_id: String = r.get(0)?;
        let ts: i64 = r.get(1)?;
        let tenant: String = r.get(2)?;
        let user: String = r.get(3)?;
        let feature: String = r.get(4)?;
        let task: String = r.get(5)?;
        let asked: String = r.get(6)?;
        let served: Option<String> = r.get(7)?;
        let provider: Option<String> = r.get(8)?;
        let decisions: String = r.get(9)?;
        let status: u16 = r.get(10)?;
        let cost: Option<f64> = r.get(11)?;
        let unpriced: bool = r.get(12)?;
        let estimated: bool = r.get(13)?;
        let prompt = r.get::<_, i64>(14)?.max(0) as u64;
        let cached = r.get::<_, i64>(15)?.max(0) as u64;
        let completion = r.get::<_, i64>(16)?.max(0) as u64;
        let saved = r.get::<_, i64>(17)?.max(0) as u64;

        let key = Grouping {
            tenant: &tenant,
            user: &user,
            feature: &feature,
            asked: &asked,
            served: served.as_deref(),
            decisions: &decisions,
            provider: provider.as_deref(),
            ts,
        }
        .key(&q.group_by);
        let price = served.as_deref().and_then(|m| catalog.get(m));
        let cache_savings = price.map_or(0.0, |p| {
            cached as f64 * (p.input - p.cached_input()).max(0.0) / 1e6
        });
        let compression_savings = price.map_or(0.0, |p| saved as f64 * p.input / 1e6);
        let tk = task_key(&tenant, &task, &request_id);
        let ok = verdicts.get(&tk).copied().unwrap_or(false);
        for acc in [groups.entry(key).or_default(), &mut total] {
            let l = &mut acc.line;
            l.requests += 1;
            l.errors += u64::from(status >= 400);
            l.unpriced += u64::from(unpriced);
            l.estimated += u64::from(estimated);
            l.prompt_tokens += prompt;
            l.cached_tokens += cached;
            l.completion_tokens += completion;
            l.tokens_saved += saved;
            l.cost_usd += cost.unwrap_or(0.0);
            l.cache_savings_usd += cache_savings;
            l.compression_savings_usd += compression_savings;
            acc.tasks.insert(tk.clone());
            if ok {
                acc.successful.insert(tk.clone());
            }
        }
    }
    let mut lines: Vec<Line> = groups
        .into_iter()
        .map(|(key, acc)| {
            let mut line = acc.finish();
            line.group = q
                .group_by
                .iter()
                .map(|d| d.name().to_string())
                .zip(key)
                .collect();
            line
        })
        .collect();
    lines.sort_by(|a, b| {
        b.cost_usd
            .total_cmp(&a.cost_usd)
            .then_with(|| a.group.cmp(&b.group))
    });
    if let Some(n) = q.top {
        lines.truncate(n);
    }
    Ok(Report {
        group_by: q.group_by.iter().map(|d| d.name()).collect(),
        lines,
        total: total.finish(),
    })
}

const COLUMNS: [&str; 13] = [
    "requests",
    "errors",
    "cost_usd",
    "cost_per_successful_task",
    "tasks",
    "successful_tasks",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "tokens_saved",
    "cache_savings_usd",
    "compression_savings_usd",
    "unpriced",
];

fn cells(l: &Line) -> [String; 13] {
    let usd = |x: f64| format!("{x:.6}");
    [
        l.requests.to_string(),
        l.errors.to_string(),
        usd(l.cost_usd),
        l.cost_per_successful_task.map_or("-".into(), usd),
        l.tasks.to_string(),
        l.successful_tasks.to_string(),
        l.prompt_tokens.to_string(),
        l.cached_tokens.to_string(),
        l.completion_tokens.to_string(),
        l.tokens_saved.to_string(),
        usd(l.cache_savings_usd),
        usd(l.compression_savings_usd),
        l.unpriced.to_string(),
    ]
}

impl Report {
    fn rows(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for l in &self.lines {
            let mut row: Vec<String> = self
                .group_by
                .iter()
                .map(|d| l.group.get(*d).cloned().unwrap_or_default())
                .collect();
            row.extend(cells(l));
            out.push(row);
        }
        let mut total: Vec<String> = self.group_by.iter().map(|_| String::new()).collect();
        if let Some(first) = total.first_mut() {
            *first = "TOTAL".into();
        } else {
            total.push("TOTAL".into());
        }
        total.extend(cells(&self.total));
        out.push(total);
        out
    }

    fn header(&self) -> Vec<String> {
        let mut h: Vec<String> = self.group_by.iter().map(|d| d.to_string()).collect();
        if h.is_empty() {
            h.push(String::new());
        }
        h.extend(COLUMNS.iter().map(|c| c.to_string()));
        h
    }

    /// Aligned columns for a terminal.
    pub fn table(&self) -> String {
        let header = self.header();
        let mut rows = self.rows();
        if self.group_by.is_empty() {
            for r in &mut rows {
                if r.len() < header.len() {
                    r.insert(0, String::new());
                }
            }
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r.get(i).map_or(0, String::len))
                    .chain([header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in std::iter::once(&header).chain(rows.iter()) {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        out
    }

    pub fn csv(&self) -> String {
        let esc = |c: &str| {
            if c.contains([',', '"', '\n']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.to_string()
            }
        };
        let mut out = String::new();
        let mut header = self.header();
        if self.group_by.is_empty() {
            header.remove(0);
        }
        let _ = writeln!(out, "{}", header.join(","));
        for mut r in self.rows() {
            if self.group_by.is_empty() {
                r.remove(0);
            }
            let _ = writeln!(
                out,
                "{}",
                r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(",")
            );
        }
        out
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Decision, Feedback, Ledger, LedgerOptions, Row, open_db};

    fn row(id: &str, feature: &str, task: &str, model: &str, cost: f64) -> Row {
        Row {
            request_id: id.into(),
            request_hash: "h".into(),
            ts_ms: 1_795_449_600_000,
            tenant: "acme".into(),
            user: "u".into(),
            feature: feature.into(),
            task: task.into(),
            model_asked: "gpt-4o".into(),
            model_served: Some(model.into()),
            provider: Some("sim".into()),
            decisions: vec![Decision {
                kind: "router",
                plugin: "r".into(),
                digest: "d".into(),
                decision: format!("UseModel({model:?})"),
            }],
            cache: "miss",
            status: 200,
            prompt_tokens: 2000,
            cached_tokens: 1024,
            completion_tokens: 100,
            tokens_saved: 100,
            cost_usd: Some(cost),
            ..Row::default()
        }
    }

    #[test]
    fn cost_per_successful_task_by_feature_and_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        // Support: task A (2 calls, success), task B (1 call, failure).
        l.record(row("r1", "support", "A", "gpt-4o", 0.010));
        l.record(row("r2", "support", "A", "gpt-4o", 0.020));
        l.record(row("r3", "support", "B", "gpt-4o-mini", 0.005));
        // FAQ: two single-call requests, one marked successful by request id.
        l.record(row("r4", "faq", "", "gpt-4o-mini", 0.001));
        l.record(row("r5", "faq", "", "gpt-4o-mini", 0.003));
        let fb = |task: Option<&str>, rid: Option<&str>, success| Feedback {
            ts_ms: 1,
            tenant: "acme".into(),
            request_id: rid.map(Into::into),
            task_id: task.map(Into::into),
            success,
            score: None,
        };
        l.record_feedback(fb(Some("A"), None, false));
        l.record_feedback(fb(Some("A"), None, true)); // the latest verdict wins
        l.record_feedback(fb(Some("B"), None, false));
        l.record_feedback(fb(None, Some("r4"), true));
        l.flush();

        let conn = open_db(&path).unwrap();
        let catalog = Catalog::builtin().unwrap();
        let q = Query {
            group_by: vec![Dim::Feature],
            ..Query::default()
        };
        let rep = run(&conn, &catalog, &q).unwrap();
        assert_eq!(rep.lines.len(), 2);
        let support = &rep.lines[0];
        assert_eq!(support.group["feature"], "support");
        assert_eq!(
            (support.requests, support.tasks, support.successful_tasks),
            (3, 2, 1)
        );
        assert!((support.cost_per_successful_task.unwrap() - 0.035).abs() < 1e-12);
        let faq = &rep.lines[1];
        assert_eq!((faq.tasks, faq.successful_tasks), (2, 1));
        assert!((faq.cost_per_successful_task.unwrap() - 0.004).abs() < 1e-12);
        assert_eq!(rep.total.successful_tasks, 2);
        assert!((rep.total.cost_usd - 0.039).abs() < 1e-12);

        // Savings: 1024 cached tokens on gpt-4o save (2.50 - 1.25) per million each.
        let q = Query {
            group_by: vec![Dim::Model, Dim::Route],
            top: Some(1),
            ..Query::default()
        };
        let rep = run(&conn, &catalog, &q).unwrap();
        assert_eq!(rep.lines.len(), 1);
        let top = &rep.lines[0];
        assert_eq!(top.group["model"], "gpt-4o");
        assert_eq!(top.group["route"], "UseModel(\"gpt-4o\")");
        assert!((top.cache_savings_usd - 2.0 * 1024.0 * 1.25 / 1e6).abs() < 1e-12);
        assert!((top.compression_savings_usd - 2.0 * 100.0 * 2.5 / 1e6).abs() < 1e-12);

        let csv = rep.csv();
        assert!(csv.starts_with("model,route,requests,"), "{csv}");
        assert!(csv.contains("\"UseModel(\"\"gpt-4o\"\")\""), "{csv}");
        assert!(rep.table().contains("TOTAL"));
        let v: serde_json::Value = serde_json::from_str(&rep.json()).unwrap();
        assert_eq!(v["lines"][0]["requests"], 2);

        // Time range and tenant filters.
        let none = Query {
            since_ms: Some(1_795_449_600_001),
            ..Query::default()
        };
        assert_eq!(run(&conn, &catalog, &none).unwrap().total.requests, 0);
        let other = Query {
            tenant: Some("globex".into()),
            ..Query::default()
        };
        assert_eq!(run(&conn, &catalog, &other).unwrap().total.requests, 0);
    }

    #[test]
    fn dims_parse_with_clear_errors() {
        assert_eq!(
            parse_dims("feature, model").unwrap(),
            vec![Dim::Feature, Dim::Model]
        );
        assert!(
            parse_dims("colour")
                .unwrap_err()
                .contains("cannot group by \"colour\"")
        );
    }
}

/// How a shadow plugin compares with the active plugin of its slot.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ShadowLine {
    pub slot: String,
    pub plugin: String,
    pub sha256: String,
    pub requests: u64,
    pub agreements: u64,
    pub agreement_rate: f64,
    /// Router shadows: requests where both costs are known.
    pub priced_requests: u64,
    pub actual_cost_usd: f64,
    /// What the same answers would have cost on the shadow's models.
    pub shadow_cost_usd: f64,
    /// shadow - actual: negative means the shadow would have saved money.
    pub cost_difference_usd: f64,
}

/// Agreement rate and cost difference of every shadow in the range.
pub fn shadows(conn: &Connection, q: &Query) -> Result<Vec<ShadowLine>, ReportError> {
    let mut st = conn.prepare(
        "SELECT shadow, cost_usd FROM requests
         WHERE shadow != '[]' AND ts_ms >= ?1 AND ts_ms < ?2 AND (?3 IS NULL OR tenant = ?3)",
    )?;
    let (since, until) = crate::ledger::ts_range(q.since_ms, q.until_ms);
    let mut acc: std::collections::BTreeMap<(String, String, String), ShadowLine> =
        std::collections::BTreeMap::new();
    let rows = st.query_map(rusqlite::params![since, until, q.tenant], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<f64>>(1)?))
    })?;
    for row in rows {
        let (json, cost) = row?;
        let records: Vec<crate::ledger::ShadowRecord> =
            serde_json::from_str(&json).unwrap_or_default();
        for s in records {
            let key = (s.slot.clone(), s.plugin.clone(), s.digest.clone());
            let l = acc.entry(key).or_insert_with(|| ShadowLine {
                slot: s.slot.clone(),
                plugin: s.plugin.clone(),
                sha256: s.digest.clone(),
                ..ShadowLine::default()
            });
            l.requests += 1;
            l.agreements += u64::from(s.agrees);
            if let (Some(actual), Some(shadow)) = (cost, s.cost_usd) {
                l.priced_requests += 1;
                l.actual_cost_usd += actual;
                l.shadow_cost_usd += shadow;
            }
        }
    }
    Ok(acc
        .into_values()
        .map(|mut l| {
            l.agreement_rate = l.agreements as f64 / l.requests.max(1) as f64;
            l.cost_difference_usd = l.shadow_cost_usd - l.actual_cost_usd;
            l
        })
        .collect())
}

/// Shadow lines as aligned text.
pub fn shadows_table(lines: &[ShadowLine]) -> String {
    let mut out = String::from(
        "slot          plugin                sha256        requests  agreement  priced  actual_usd  shadow_usd  difference_usd\n",
    );
    for l in lines {
        let _ = writeln!(
            out,
            "{:<13} {:<21} {:<13} {:>8}  {:>8.2}%  {:>6}  {:>10.6}  {:>10.6}  {:>+14.6}",
            l.slot,
            l.plugin,
            &l.sha256[..l.sha256.len().min(12)],
            l.requests,
            l.agreement_rate * 100.0,
            l.priced_requests,
            l.actual_cost_usd,
            l.shadow_cost_usd,
            l.cost_difference_usd
        );
    }
    if lines.is_empty() {
        out.push_str("(no shadow decisions in range)\n");
    }
    out
}
