//! What a replay shows without labels: cost, how requests were served,
//! cache and compression effects, per-feature and per-model spend. These are
//! the numbers the gateway itself can know; success against ground truth is
//! `score.py`'s job when a trace has labels.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{ReplayRun, Served};

#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub label: String,
    pub requests: usize,
    pub by_model: usize,
    pub from_cache: usize,
    pub blocked: usize,
    pub errors: usize,
    pub cost_usd: f64,
    pub upstream_calls: usize,
    pub failed_calls: usize,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub chars_in: u64,
    pub chars_sent: u64,
    /// Requests answered per model (cache hits count for the origin's model).
    pub answered_by: BTreeMap<String, usize>,
    pub cost_by_feature: BTreeMap<String, f64>,
    pub wall_seconds: f64,
}

impl Summary {
    pub fn of(label: &str, run: &ReplayRun) -> Self {
        let mut s = Summary {
            label: label.to_string(),
            requests: run.records.len(),
            wall_seconds: run.wall.as_secs_f64(),
            ..Summary::default()
        };
        for r in &run.records {
            match r.served {
                Served::Model => s.by_model += 1,
                Served::Cache => s.from_cache += 1,
                Served::Blocked => s.blocked += 1,
                Served::Error => s.errors += 1,
            }
            if matches!(r.served, Served::Model | Served::Cache)
                && let Some(m) = &r.model
            {
                *s.answered_by.entry(m.clone()).or_default() += 1;
            }
            let cost = r.cost_usd();
            s.cost_usd += cost;
            *s.cost_by_feature.entry(r.feature.clone()).or_default() += cost;
            for c in &r.calls {
                s.upstream_calls += 1;
                s.failed_calls += usize::from(c.status != 200);
                s.prompt_tokens += u64::from(c.prompt_tokens);
                s.cached_prompt_tokens += u64::from(c.cached_tokens);
                s.completion_tokens += u64::from(c.completion_tokens);
            }
            if r.served == Served::Model {
                s.chars_in += r.prompt_chars_in;
                s.chars_sent += r.prompt_chars_sent;
            }
        }
        s
    }

    fn answered(&self) -> usize {
        self.by_model + self.from_cache
    }

    /// Rows of (name, value) shown for one run, in display order; a model or
    /// feature of `also` (the other run of a comparison) gets a row too.
    fn rows(&self, also: Option<&Summary>) -> Vec<(String, Cell)> {
        let pct = |a: usize| Cell::Pct(ratio(a as f64, self.requests as f64));
        let mut rows = vec![
            ("requests".to_string(), Cell::Count(self.requests as f64)),
            ("answered (model or cache)".into(), pct(self.answered())),
            ("  by a model".into(), pct(self.by_model)),
            ("  from the cache".into(), pct(self.from_cache)),
            ("blocked by policy".into(), pct(self.blocked)),
            ("failed".into(), pct(self.errors)),
            ("total cost".into(), Cell::Usd(self.cost_usd)),
            (
                "cost per answered request".into(),
                Cell::Usd(ratio(self.cost_usd, self.answered() as f64)),
            ),
            (
                "upstream calls (failed)".into(),
                Cell::Text(format!("{} ({})", self.upstream_calls, self.failed_calls)),
            ),
            (
                "prompt tokens".into(),
                Cell::Count(self.prompt_tokens as f64),
            ),
            (
                "  served from provider cache".into(),
                Cell::Pct(ratio(
                    self.cached_prompt_tokens as f64,
                    self.prompt_tokens as f64,
                )),
            ),
            (
                "completion tokens".into(),
                Cell::Count(self.completion_tokens as f64),
            ),
            (
                "prompt characters kept by compression".into(),
                Cell::Pct(ratio(self.chars_sent as f64, self.chars_in as f64)),
            ),
        ];
        let models: std::collections::BTreeSet<&String> = self
            .answered_by
            .keys()
            .chain(also.iter().flat_map(|o| o.answered_by.keys()))
            .collect();
        for model in models {
            let n = self.answered_by.get(model).copied().unwrap_or(0);
            rows.push((format!("answered by {model}"), pct(n)));
        }
        let features: std::collections::BTreeSet<&String> = self
            .cost_by_feature
            .keys()
            .chain(also.iter().flat_map(|o| o.cost_by_feature.keys()))
            .collect();
        for feature in features {
            let cost = self.cost_by_feature.get(feature).copied().unwrap_or(0.0);
            rows.push((format!("cost of feature {feature}"), Cell::Usd(cost)));
        }
        rows.push((
            "replay wall time".into(),
            Cell::Text(format!(
                "{:.1} s ({:.0} requests/s)",
                self.wall_seconds,
                ratio(self.requests as f64, self.wall_seconds)
            )),
        ));
        rows
    }

    pub fn table(&self) -> String {
        let rows = self.rows(None);
        let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        let mut out = format!("== replay: {}\n", self.label);
        for (name, cell) in rows {
            let _ = writeln!(out, "{name:<width$}  {}", cell.show());
        }
        out
    }
}

/// Two runs side by side, with B relative to A.
pub fn compare_table(a: &Summary, b: &Summary) -> String {
    let (ra, rb) = (a.rows(Some(b)), b.rows(Some(a)));
    let cols: Vec<(String, String, String)> = ra
        .iter()
        .zip(&rb)
        .map(|((_, x), (_, y))| (x.show(), y.show(), x.change_to(y)))
        .collect();
    let width = ra.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let wa = cols
        .iter()
        .map(|c| c.0.len())
        .chain([a.label.len()])
        .max()
        .unwrap_or(0);
    let wb = cols
        .iter()
        .map(|c| c.1.len())
        .chain([b.label.len()])
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "{:<width$}  {:>wa$}  {:>wb$}  B vs A\n",
        "", a.label, b.label
    );
    for ((n, _), (x, y, d)) in ra.iter().zip(cols) {
        let _ = writeln!(out, "{n:<width$}  {x:>wa$}  {y:>wb$}  {d}");
    }
    out
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

#[derive(Debug, Clone)]
enum Cell {
    Count(f64),
    Usd(f64),
    Pct(f64),
    Text(String),
}

impl Cell {
    fn show(&self) -> String {
        match self {
            Cell::Count(n) => format!("{n:.0}"),
            Cell::Usd(x) if *x != 0.0 && x.abs() < 0.01 => format!("${x:.6}"),
            Cell::Usd(x) => format!("${x:.4}"),
            Cell::Pct(x) => format!("{:.2}%", x * 100.0),
            Cell::Text(t) => t.clone(),
        }
    }

    /// B relative to A: a ratio for amounts, a difference in points for shares.
    fn change_to(&self, b: &Cell) -> String {
        match (self, b) {
            (Cell::Count(x), Cell::Count(y)) | (Cell::Usd(x), Cell::Usd(y)) if *x > 0.0 => {
                format!("x{:.3}", y / x)
            }
            (Cell::Pct(x), Cell::Pct(y)) => format!("{:+.2} pt", (y - x) * 100.0),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::CallRecord;
    use crate::replay::RunRecord;

    fn rec(id: &str, served: Served, model: &str, cost: f64) -> RunRecord {
        RunRecord {
            id: id.into(),
            feature: "faq".into(),
            served,
            model: Some(model.into()),
            origin: None,
            calls: if served == Served::Model {
                vec![CallRecord {
                    model: model.into(),
                    status: 200,
                    prompt_tokens: 100,
                    cost_usd: Some(cost),
                    ..CallRecord::default()
                }]
            } else {
                vec![]
            },
            prompt_chars_in: 400,
            prompt_chars_sent: 300,
            status: 200,
            error_code: None,
        }
    }

    #[test]
    fn summary_and_comparison() {
        let a = ReplayRun {
            records: vec![
                rec("1", Served::Model, "gpt-4o", 0.02),
                rec("2", Served::Model, "gpt-4o", 0.02),
            ],
            wall: std::time::Duration::from_secs(1),
        };
        let b = ReplayRun {
            records: vec![
                rec("1", Served::Model, "gpt-4o-mini", 0.001),
                rec("2", Served::Cache, "gpt-4o-mini", 0.0),
            ],
            wall: std::time::Duration::from_secs(1),
        };
        let (sa, sb) = (Summary::of("A", &a), Summary::of("B", &b));
        assert!((sa.cost_usd - 0.04).abs() < 1e-12);
        assert_eq!((sb.by_model, sb.from_cache), (1, 1));
        assert_eq!(sb.answered_by["gpt-4o-mini"], 2);
        let t = compare_table(&sa, &sb);
        assert!(t.contains("total cost"), "{t}");
        assert!(t.contains("x0.025"), "{t}");
        assert!(t.contains("+50.00 pt"), "{t}");
        assert!(sa.table().contains("answered by gpt-4o"));
    }
}
