//! Counters exported at `/metrics` in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::plugins::PluginSet;

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub errors_client: AtomicU64,
    pub errors_server: AtomicU64,
    pub cache_hit: AtomicU64,
    pub cache_miss: AtomicU64,
    pub cache_bypass: AtomicU64,
    pub upstream_calls: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub budget_denied: AtomicU64,
    pub budget_downgraded: AtomicU64,
    pub budget_alerts: AtomicU64,
    pub tokens_saved: AtomicU64,
    /// Spend in nano-USD.
    pub cost_nanos: AtomicU64,
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn render(&self, plugins: &PluginSet) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let mut counter = |name: &str, help: &str, rows: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in rows {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        };
        counter(
            "tollgate_requests_total",
            "Chat completion requests received.",
            &[("", g(&self.requests))],
        );
        counter(
            "tollgate_request_errors_total",
            "Requests answered with an error.",
            &[
                ("class=\"4xx\"", g(&self.errors_client)),
                ("class=\"5xx\"", g(&self.errors_server)),
            ],
        );
        counter(
            "tollgate_cache_total",
            "Cache outcomes.",
            &[
                ("outcome=\"hit\"", g(&self.cache_hit)),
                ("outcome=\"miss\"", g(&self.cache_miss)),
                ("outcome=\"bypass\"", g(&self.cache_bypass)),
            ],
        );
        counter(
            "tollgate_upstream_calls_total",
            "Calls made to upstream providers.",
            &[("", g(&self.upstream_calls))],
        );
        counter(
            "tollgate_upstream_errors_total",
            "Upstream calls that failed.",
            &[("", g(&self.upstream_errors))],
        );
        counter(
            "tollgate_budget_verdicts_total",
            "Budget verdicts other than allow.",
            &[
                ("verdict=\"deny\"", g(&self.budget_denied)),
                ("verdict=\"downgrade\"", g(&self.budget_downgraded)),
                ("verdict=\"alert\"", g(&self.budget_alerts)),
            ],
        );
        counter(
            "tollgate_tokens_saved_total",
            "Prompt tokens removed by compressors.",
            &[("", g(&self.tokens_saved))],
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_cost_usd_total Upstream spend.\n# TYPE tollgate_cost_usd_total counter\ntollgate_cost_usd_total {:.9}",
            g(&self.cost_nanos) as f64 / 1e9
        );

        let _ = writeln!(
            out,
            "# HELP tollgate_plugin_calls_total Plugin calls.\n# TYPE tollgate_plugin_calls_total counter"
        );
        let summaries = plugins.summaries();
        for p in &summaries {
            let _ = writeln!(
                out,
                "tollgate_plugin_calls_total{{kind=\"{}\",plugin=\"{}\"}} {}",
                p.kind,
                escape(p.name),
                g(&p.stats.calls)
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_plugin_failures_total Plugin calls that failed and were contained.\n# TYPE tollgate_plugin_failures_total counter"
        );
        for p in &summaries {
            for (reason, v) in p.stats.failures() {
                let _ = writeln!(
                    out,
                    "tollgate_plugin_failures_total{{kind=\"{}\",plugin=\"{}\",reason=\"{reason}\"}} {v}",
                    p.kind,
                    escape(p.name)
                );
            }
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
