//! What `tollgate plugin test` prints: each case's decision, agreement
//! with the expected decisions, and call timing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::plugins::PluginKind;

/// Cases counted by (expected, decided).
type Pairs = BTreeMap<(String, String), usize>;

/// One decision, in the words the report compares.
pub struct Outcome {
    /// The decision kind: `use-model`, `tenant-user`, `rewritten`, `deny`, `error`...
    pub decision: String,
    /// The tier of the model a router chose.
    pub tier: Option<u8>,
    /// The model a router chose (first of a fallback ladder; the asked one on keep).
    pub model: Option<String>,
    pub detail: String,
}

impl Outcome {
    pub fn plain(decision: &str, detail: String) -> Self {
        Self {
            decision: decision.into(),
            tier: None,
            model: None,
            detail,
        }
    }

    /// The decision in the terms of `expected`: a router's tier when a tier
    /// is expected, its decision kind when a kind is, else the model it chose.
    fn label(&self, kind: PluginKind, expected: Option<&str>) -> String {
        if kind != PluginKind::Router || self.decision == "error" {
            return self.decision.clone();
        }
        let kinds = ["keep", "use-model", "fallback", "respond", "reject"];
        match expected {
            Some(e) if e.starts_with("tier ") => self
                .tier
                .map_or_else(|| self.decision.clone(), |t| format!("tier {t}")),
            Some(e) if kinds.contains(&e) => self.decision.clone(),
            _ => self.model.clone().unwrap_or_else(|| self.decision.clone()),
        }
    }
}

pub struct CaseResult {
    pub id: String,
    pub expected: Option<String>,
    pub decided: String,
    pub outcome: Outcome,
    pub micros: f64,
}

pub struct Report {
    pub file: String,
    pub cases_file: String,
    pub kind: PluginKind,
    /// The loaded plugin as the admin API describes it (limits, counters).
    pub plugin: Value,
    pub compile_ms: f64,
    pub load_ms: f64,
    pub cases: Vec<CaseResult>,
    /// Every call's time, all rounds.
    pub calls_us: Vec<f64>,
}

impl Report {
    pub fn new(
        kind: PluginKind,
        plugin: Value,
        (compile_ms, load_ms): (f64, f64),
        results: Vec<(String, Option<String>, Outcome, f64)>,
        mut calls_us: Vec<f64>,
    ) -> Self {
        calls_us.sort_by(f64::total_cmp);
        let cases = results
            .into_iter()
            .map(|(id, expected, outcome, micros)| CaseResult {
                decided: outcome.label(kind, expected.as_deref()),
                id,
                expected,
                outcome,
                micros,
            })
            .collect();
        Self {
            file: String::new(),
            cases_file: String::new(),
            kind,
            plugin,
            compile_ms,
            load_ms,
            cases,
            calls_us,
        }
    }

    /// Cases with an expectation, and how many of them the plugin met.
    pub fn agreement(&self) -> (usize, usize) {
        let judged: Vec<&CaseResult> = self.cases.iter().filter(|c| c.expected.is_some()).collect();
        let met = judged
            .iter()
            .filter(|c| c.expected.as_deref() == Some(c.decided.as_str()))
            .count();
        (met, judged.len())
    }

    /// Share of judged cases that met their expectation (None when none is judged).
    pub fn agreement_ratio(&self) -> Option<f64> {
        let (met, judged) = self.agreement();
        (judged > 0).then(|| met as f64 / judged as f64)
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.calls_us.is_empty() {
            return 0.0;
        }
        let i = ((self.calls_us.len() - 1) as f64 * p).round() as usize;
        self.calls_us[i.min(self.calls_us.len() - 1)]
    }

    /// How many cases got each decision.
    fn decisions(&self) -> BTreeMap<&str, usize> {
        let mut n = BTreeMap::new();
        for c in &self.cases {
            *n.entry(c.decided.as_str()).or_insert(0) += 1;
        }
        n
    }

    /// Expected decisions (rows), decided ones (columns) and the count of each pair.
    fn matrix(&self) -> (Vec<String>, Vec<String>, Pairs) {
        let mut m = BTreeMap::new();
        let mut rows = BTreeSet::new();
        let mut cols = BTreeSet::new();
        for c in &self.cases {
            if let Some(e) = &c.expected {
                *m.entry((e.clone(), c.decided.clone())).or_insert(0) += 1;
                rows.insert(e.clone());
                cols.insert(c.decided.clone());
            }
        }
        (rows.into_iter().collect(), cols.into_iter().collect(), m)
    }

    fn timing(&self) -> Value {
        let n = self.calls_us.len();
        let mean = if n == 0 {
            0.0
        } else {
            self.calls_us.iter().sum::<f64>() / n as f64
        };
        let r = |x: f64| (x * 10.0).round() / 10.0;
        json!({
            "calls": n,
            "p50_us": r(self.percentile(0.5)),
            "p90_us": r(self.percentile(0.9)),
            "p99_us": r(self.percentile(0.99)),
            "max_us": r(self.calls_us.last().copied().unwrap_or(0.0)),
            "mean_us": r(mean),
        })
    }

    pub fn to_json(&self) -> Value {
        let (met, judged) = self.agreement();
        let (_, _, m) = self.matrix();
        let decisions = self.decisions();
        json!({
            "file": self.file,
            "cases_file": self.cases_file,
            "kind": self.kind.world(),
            "plugin": self.plugin,
            "compile_ms": (self.compile_ms * 10.0).round() / 10.0,
            "load_ms": (self.load_ms * 10.0).round() / 10.0,
            "cases": self.cases.iter().map(|c| json!({
                "id": c.id,
                "decided": c.decided,
                "expected": c.expected,
                "agrees": c.expected.as_ref().map(|e| *e == c.decided),
                "detail": c.outcome.detail,
                "micros": (c.micros * 10.0).round() / 10.0,
            })).collect::<Vec<_>>(),
            "decisions": decisions,
            "agreement": {
                "judged": judged,
                "agreed": met,
                "ratio": self.agreement_ratio(),
                "matrix": m.iter().map(|((e, d), n)| json!({"expected": e, "decided": d, "count": n})).collect::<Vec<_>>(),
            },
            "timing": self.timing(),
        })
    }

    /// The report for a terminal; `all` lists every case, else only the
    /// disagreements and errors.
    pub fn to_text(&self, all: bool) -> String {
        let mut out = String::new();
        let p = &self.plugin;
        let _ = writeln!(
            out,
            "plugin     {} ({}), sha256 {}",
            self.file,
            self.kind,
            p["sha256"].as_str().unwrap_or("?")
        );
        let _ = writeln!(
            out,
            "loaded     in {:.1} ms (compile {:.1} ms{}, then instantiate and init)",
            self.load_ms,
            self.compile_ms,
            if p["compiled"]["from_cache"] == true {
                " from the cache"
            } else {
                ""
            }
        );
        let l = &p["limits"];
        let _ = writeln!(
            out,
            "limits     timeout {} ms, fuel {}, memory {} MiB",
            l["timeout_ms"], l["fuel"], l["memory_mib"]
        );
        let (met, judged) = self.agreement();
        let _ = writeln!(
            out,
            "cases      {} from {}, {} with an expected decision",
            self.cases.len(),
            self.cases_file,
            judged
        );
        let shown: Vec<&CaseResult> = self
            .cases
            .iter()
            .filter(|c| {
                all || c.decided == "error" || c.expected.as_ref().is_some_and(|e| *e != c.decided)
            })
            .collect();
        if !shown.is_empty() {
            let w = |f: &dyn Fn(&CaseResult) -> usize, min: usize| {
                shown.iter().map(|c| f(c)).max().unwrap_or(0).clamp(min, 40)
            };
            let (wi, wd) = (
                w(&|c| c.id.chars().count(), 4),
                w(&|c| c.decided.chars().count(), 7),
            );
            let we = w(
                &|c| c.expected.as_deref().map_or(1, |e| e.chars().count()),
                8,
            );
            let _ = writeln!(
                out,
                "\n{:<wi$} {:<wd$} {:<we$} {:>9}  detail",
                "case", "decided", "expected", "µs"
            );
            for c in shown {
                let mark = match &c.expected {
                    Some(e) if *e == c.decided => " ",
                    Some(_) => "x",
                    None => " ",
                };
                let _ = writeln!(
                    out,
                    "{:<wi$} {:<wd$} {:<we$} {:>9.1} {mark} {}",
                    c.id,
                    c.decided,
                    c.expected.as_deref().unwrap_or("-"),
                    c.micros,
                    c.outcome.detail
                );
            }
        }
        out.push('\n');
        if judged > 0 {
            let _ = writeln!(
                out,
                "agreement  {met} of {judged} ({:.1}%)",
                100.0 * met as f64 / judged as f64
            );
            let (rows, cols, m) = self.matrix();
            let _ = write!(out, "           {:<14}", "expected \\ got");
            for c in &cols {
                let _ = write!(out, " {c:>12}");
            }
            out.push('\n');
            for r in &rows {
                let _ = write!(out, "           {r:<14}");
                for c in &cols {
                    let n = m.get(&(r.clone(), c.clone())).copied().unwrap_or(0);
                    let _ = write!(out, " {n:>12}");
                }
                out.push('\n');
            }
        } else {
            let list: Vec<String> = self
                .decisions()
                .iter()
                .map(|(d, n)| format!("{d} {n}"))
                .collect();
            let _ = writeln!(out, "decisions  {}", list.join(", "));
        }
        let t = self.timing();
        let _ = writeln!(
            out,
            "timing     {} calls: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs, mean {} µs",
            t["calls"], t["p50_us"], t["p90_us"], t["p99_us"], t["max_us"], t["mean_us"]
        );
        let failures: Vec<String> = p["failures"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "resources  fuel per call {} mean, {} max; linear memory peak {} MiB",
            p["fuel_per_call"]["mean"], p["fuel_per_call"]["max"], p["memory_peak_mib"]
        );
        let _ = writeln!(
            out,
            "instances  {} instantiated; failures: {}",
            p["instantiations"],
            if failures.is_empty() {
                "none".to_string()
            } else {
                failures.join(", ")
            }
        );
        out
    }
}
