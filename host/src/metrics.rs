//! Prometheus metrics at `/metrics`.
//!
//! Label values that come from clients (tenant, feature) are capped: after
//! [`MAX_LABEL_VALUES`] distinct values of one label, new ones are counted
//! under `_other`, so a client sending random tenant headers cannot blow up
//! the series count. Users and request ids are never labels.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::ledger::LedgerStats;
use crate::plugins::PluginSet;

/// Distinct values one client-controlled label may take.
pub const MAX_LABEL_VALUES: usize = 1000;

/// Keeps a label's distinct values bounded.
#[derive(Default)]
struct Capped(Mutex<HashSet<String>>);

impl Capped {
    fn value<'a>(&self, v: &'a str) -> &'a str {
        let Ok(mut seen) = self.0.lock() else {
            return "_other";
        };
        if seen.contains(v) {
            return v;
        }
        if seen.len() < MAX_LABEL_VALUES {
            seen.insert(v.to_string());
            return v;
        }
        "_other"
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: Histogram,
    pub upstream_seconds: HistogramVec,
    pub upstream_calls: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub cache: IntCounterVec,
    /// Semantic matches above the threshold that the near-miss guard refused.
    pub cache_near_miss: IntCounter,
    pub budget: IntCounterVec,
    pub tokens: IntCounterVec,
    pub cost_usd: prometheus::CounterVec,
    pub unpriced: IntCounterVec,
    pub plugin_seconds: HistogramVec,
    plugin_calls: IntGaugeVec,
    plugin_failures: IntGaugeVec,
    plugin_logs_dropped: IntGaugeVec,
    ledger_rows: IntGaugeVec,
    ledger_throttled: IntGaugeVec,
    embeddings: IntGaugeVec,
    config_reloads: IntCounterVec,
    killed: IntCounter,
    /// `requests` (held now), `limit`, `refused_total`: see [`crate::in_flight`].
    in_flight: IntGaugeVec,
    pub retries: IntCounter,
    breaker_state: IntGaugeVec,
    pub budget_alerts: IntCounterVec,
    embedding_seconds: prometheus::Gauge,
    pub tokens_saved: IntCounter,
    tenants: Capped,
    features: Capped,
}

/// A new metric, registered.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let m = metric.unwrap_or_else(|_| unreachable_metric());
    let _ = r.register(Box::new(m.clone()));
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help))
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    register(
        r,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels),
    )
}

/// Metric names and labels here are constants that are valid; the
/// constructors only fail on invalid ones.
#[allow(clippy::panic)]
fn unreachable_metric() -> ! {
    panic!("invalid metric definition")
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const PLUGIN_BUCKETS: [f64; 10] = [
    0.000_001, 0.000_002, 0.000_005, 0.000_01, 0.000_02, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let request_seconds = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_request_duration_seconds",
                    "Time to answer a chat completion (head of a stream).",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            ),
        );
        let cost_usd = register(
            &r,
            prometheus::CounterVec::new(
                Opts::new(
                    "tollgate_cost_usd_total",
                    "Upstream spend in USD (priced models only).",
                ),
                &["tenant", "feature", "model"],
            ),
        );
        let tokens_saved = counter(
            &r,
            "tollgate_compression_tokens_saved_total",
            "Prompt tokens removed by compressors.",
        );
        Self {
            requests: counter_vec(
                &r,
                "tollgate_requests_total",
                "Chat completion requests by HTTP status class.",
                &["status"],
            ),
            request_seconds,
            upstream_seconds: histogram_vec(
                &r,
                "tollgate_upstream_duration_seconds",
                "Upstream time of answered calls.",
                &["provider", "model"],
                LATENCY_BUCKETS.to_vec(),
            ),
            upstream_calls: counter_vec(
                &r,
                "tollgate_upstream_calls_total",
                "Calls made to upstream providers.",
                &["provider", "model"],
            ),
            upstream_errors: counter_vec(
                &r,
                "tollgate_upstream_errors_total",
                "Upstream calls that failed.",
                &["provider", "model"],
            ),
            cache: counter_vec(&r, "tollgate_cache_total", "Cache outcomes.", &["outcome"]),
            cache_near_miss: counter(
                &r,
                "tollgate_cache_near_miss_refused_total",
                "Semantic cache matches refused by the near-miss guard.",
            ),
            budget: counter_vec(
                &r,
                "tollgate_budget_verdicts_total",
                "Budget verdicts other than allow.",
                &["verdict"],
            ),
            tokens: counter_vec(
                &r,
                "tollgate_tokens_total",
                "Tokens billed by upstreams.",
                &["tenant", "feature", "model", "type"],
            ),
            cost_usd,
            unpriced: counter_vec(
                &r,
                "tollgate_unpriced_requests_total",
                "Answered calls on a model with no price (cost unknown).",
                &["model"],
            ),
            plugin_seconds: histogram_vec(
                &r,
                "tollgate_plugin_call_duration_seconds",
                "Time of one plugin call.",
                &["kind", "plugin"],
                PLUGIN_BUCKETS.to_vec(),
            ),
            plugin_calls: gauge_vec(
                &r,
                "tollgate_plugin_calls_total",
                "Plugin calls.",
                &["kind", "plugin"],
            ),
            plugin_failures: gauge_vec(
                &r,
                "tollgate_plugin_failures_total",
                "Plugin calls that failed and were contained.",
                &["kind", "plugin", "reason"],
            ),
            plugin_logs_dropped: gauge_vec(
                &r,
                "tollgate_plugin_log_lines_dropped_total",
                "Plugin log lines dropped by the per-call cap.",
                &["kind", "plugin"],
            ),
            ledger_rows: gauge_vec(
                &r,
                "tollgate_ledger_rows_total",
                "Ledger rows by state.",
                &["state"],
            ),
            ledger_throttled: gauge_vec(
                &r,
                "tollgate_ledger_throttled_requests_total",
                "Requests that waited for room because the ledger's backlog was full.",
                &[],
            ),
            retries: counter(
                &r,
                "tollgate_upstream_retries_total",
                "Upstream calls retried after a retryable error.",
            ),
            breaker_state: gauge_vec(
                &r,
                "tollgate_circuit_breaker_open",
                "1 while a provider+model's breaker is open or half-open.",
                &["provider", "model"],
            ),
            in_flight: gauge_vec(
                &r,
                "tollgate_in_flight",
                "Chat requests in flight under server.max_in_flight (requests, limit), and those refused with 503 overloaded (refused_total).",
                &["value"],
            ),
            killed: counter(
                &r,
                "tollgate_killed_total",
                "Requests stopped by a kill switch.",
            ),
            budget_alerts: counter_vec(
                &r,
                "tollgate_budget_alerts_total",
                "Budget alerts raised, by threshold.",
                &["threshold"],
            ),
            config_reloads: counter_vec(
                &r,
                "tollgate_config_reloads_total",
                "Config reloads by result (applied, refused).",
                &["result"],
            ),
            embeddings: gauge_vec(
                &r,
                "tollgate_embeddings_total",
                "Embeddings asked of the native model by outcome (computed, memo, error).",
                &["outcome"],
            ),
            embedding_seconds: register(
                &r,
                prometheus::Gauge::new(
                    "tollgate_embedding_seconds_total",
                    "Time spent computing embeddings.",
                ),
            ),
            tokens_saved,
            tenants: Capped::default(),
            features: Capped::default(),
            registry: r,
        }
    }

    pub fn request(&self, status: u16, seconds: f64) {
        let class = match status {
            200..=299 => "2xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests.with_label_values(&[class]).inc();
        self.request_seconds.observe(seconds);
    }

    pub fn cache(&self, outcome: &str) {
        self.cache.with_label_values(&[outcome]).inc();
    }

    pub fn budget(&self, verdict: &str) {
        self.budget.with_label_values(&[verdict]).inc();
    }

    /// Usage and cost of one answered call.
    #[allow(clippy::too_many_arguments)]
    pub fn usage(
        &self,
        tenant: &str,
        feature: &str,
        model: &str,
        usage: &crate::pricing::Usage,
        cost: Option<f64>,
        tokens_saved: u32,
    ) {
        let tenant = self.tenants.value(tenant);
        let feature = self.features.value(feature);
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("cached", usage.cached_tokens),
            ("cache_write", usage.cache_write_tokens),
            ("completion", usage.completion_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .with_label_values(&[tenant, feature, model, kind])
                    .inc_by(u64::from(n));
            }
        }
        self.tokens_saved.inc_by(u64::from(tokens_saved));
        match cost {
            Some(c) => self
                .cost_usd
                .with_label_values(&[tenant, feature, model])
                .inc_by(c),
            None => self.unpriced.with_label_values(&[model]).inc(),
        }
    }

    pub fn breaker(&self, labels: &[&str; 2], state: crate::pipeline::resilience::BreakerState) {
        let open = state != crate::pipeline::resilience::BreakerState::Closed;
        self.breaker_state
            .with_label_values(labels)
            .set(i64::from(open));
    }

    pub fn killed(&self) {
        self.killed.inc();
    }

    pub fn config_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.config_reloads.with_label_values(&[result]).inc();
    }

    /// Brings the in-flight bound's numbers up to date before a scrape.
    pub fn in_flight(&self, f: &crate::in_flight::InFlight) {
        for (value, n) in [
            ("requests", f.current() as i64),
            ("limit", f.limit() as i64),
            ("refused_total", f.refused() as i64),
        ] {
            self.in_flight.with_label_values(&[value]).set(n);
        }
    }

    /// Brings the embedding counters up to date before a scrape.
    pub fn embeddings(&self, s: &crate::embed::EmbedStats) {
        for (outcome, c) in [
            ("computed", &s.computed),
            ("memo", &s.memo_hits),
            ("error", &s.errors),
        ] {
            self.embeddings
                .with_label_values(&[outcome])
                .set(c.load(Ordering::Relaxed) as i64);
        }
        self.embedding_seconds
            .set(s.compute_us.load(Ordering::Relaxed) as f64 / 1e6);
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self, plugins: &PluginSet, ledger: Option<&LedgerStats>) -> String {
        for p in plugins.summaries() {
            let kind = p.kind.world();
            self.plugin_calls
                .with_label_values(&[kind, p.name])
                .set(p.stats.calls.load(Ordering::Relaxed) as i64);
            self.plugin_logs_dropped
                .with_label_values(&[kind, p.name])
                .set(p.stats.logs_dropped.load(Ordering::Relaxed) as i64);
            for (reason, v) in p.stats.failures() {
                self.plugin_failures
                    .with_label_values(&[kind, p.name, reason])
                    .set(v as i64);
            }
        }
        if let Some(l) = ledger {
            for (state, c) in [
                ("queued", &l.queued),
                ("written", &l.written),
                ("failed", &l.failed),
            ] {
                self.ledger_rows
                    .with_label_values(&[state])
                    .set(c.load(Ordering::Relaxed) as i64);
            }
            self.ledger_throttled
                .with_label_values(&[] as &[&str])
                .set(l.throttled.load(Ordering::Relaxed) as i64);
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_controlled_labels_are_capped() {
        let c = Capped::default();
        for i in 0..MAX_LABEL_VALUES {
            assert_eq!(c.value(&format!("t{i}")), format!("t{i}"));
        }
        assert_eq!(c.value("one-too-many"), "_other");
        assert_eq!(c.value("t7"), "t7");
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.request(200, 0.01);
        m.cache("hit");
        let u = crate::pricing::Usage {
            prompt_tokens: 10,
            cached_tokens: 0,
            cache_write_tokens: 0,
            completion_tokens: 5,
        };
        m.usage("acme", "faq", "gpt-4o", &u, Some(0.5), 3);
        m.usage("acme", "faq", "mystery", &u, None, 0);
        let text = m.render(&PluginSet::default(), None);
        assert!(
            text.contains("tollgate_requests_total{status=\"2xx\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "tollgate_cost_usd_total{feature=\"faq\",model=\"gpt-4o\",tenant=\"acme\"} 0.5"
            ),
            "{text}"
        );
        assert!(
            text.contains("tollgate_unpriced_requests_total{model=\"mystery\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tollgate_request_duration_seconds_bucket"),
            "{text}"
        );
    }
}
