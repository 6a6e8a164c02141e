//! Budget alerts: when what a budget holds in its window (spent plus the
//! worst case of calls in flight) crosses 50%, 80% or 100% of its limit
//! (`[alerts] thresholds`), the gateway logs it and POSTs a JSON event to
//! `[alerts] webhook_url`. A request refused by the budget counts as 100%.
//!
//! Hysteresis: a threshold fires once per crossing; it fires again only
//! after the level has gone back below `threshold - rearm_margin` (a new
//! window is a fresh start). Reservations make the level dip and rise as
//! calls settle below their worst case; without the margin an alert would
//! flap around its threshold.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Where events are POSTed (JSON); unset: log lines only.
    pub webhook_url: Option<String>,
    /// Fractions of a budget's limit that raise an alert.
    pub thresholds: Vec<f64>,
    /// How far below a threshold the level must fall before it can fire again.
    pub rearm_margin: f64,
    /// Per delivery attempt.
    pub timeout_ms: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            webhook_url: None,
            thresholds: vec![0.5, 0.8, 1.0],
            rearm_margin: 0.05,
            timeout_ms: 2_000,
        }
    }
}

/// What a webhook receives.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertEvent {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub budget: String,
    pub scope: crate::budget::BudgetScope,
    pub window: crate::budget::BudgetWindow,
    /// Who the budget counts, e.g. "tenant acme".
    pub entity: String,
    pub threshold: f64,
    pub ratio: f64,
    pub held_usd: f64,
    pub limit_usd: f64,
    pub request_id: String,
    pub ts_ms: u64,
}

/// A budget's level after a reservation (or a refusal, at 1.0).
#[derive(Debug, Clone)]
pub struct Level {
    pub budget: crate::budget::BudgetConfig,
    /// The budget's counter for this entity and window.
    pub key: String,
    pub entity: String,
    pub held_usd: f64,
    pub ratio: f64,
}

pub struct Alerts {
    cfg: AlertsConfig,
    /// Counter key -> thresholds that have fired and not re-armed.
    fired: moka::sync::Cache<String, Arc<std::sync::Mutex<Vec<bool>>>>,
    webhook: crate::webhook::Webhook,
    sent: prometheus::IntCounterVec,
}

impl Alerts {
    pub fn new(cfg: AlertsConfig, sent: prometheus::IntCounterVec) -> Self {
        let webhook = crate::webhook::Webhook::new(
            "alert webhook",
            Duration::from_millis(cfg.timeout_ms.max(1)),
            Duration::from_millis(200),
        );
        Self {
            cfg,
            fired: moka::sync::Cache::builder().max_capacity(200_000).build(),
            webhook,
            sent,
        }
    }

    /// The thresholds this level newly crosses (and re-arms the ones it fell below).
    pub fn crossings(&self, level: &Level) -> Vec<f64> {
        let n = self.cfg.thresholds.len();
        let state = self.fired.get_with(level.key.clone(), || {
            Arc::new(std::sync::Mutex::new(vec![false; n]))
        });
        let Ok(mut fired) = state.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, &t) in self.cfg.thresholds.iter().enumerate() {
            if level.ratio >= t && !fired[i] {
                fired[i] = true;
                out.push(t);
            } else if level.ratio < t - self.cfg.rearm_margin {
                fired[i] = false;
            }
        }
        out
    }

    /// Logs and delivers every threshold `level` crosses.
    pub fn observe(self: &Arc<Self>, level: &Level, request_id: &str, now_ms: u64) {
        for threshold in self.crossings(level) {
            let event = AlertEvent {
                kind: "budget_alert",
                budget: level.budget.display_name(),
                scope: level.budget.scope,
                window: level.budget.window,
                entity: level.entity.clone(),
                threshold,
                ratio: (level.ratio * 1e4).round() / 1e4,
                held_usd: level.held_usd,
                limit_usd: level.budget.limit_usd,
                request_id: request_id.to_string(),
                ts_ms: now_ms,
            };
            tracing::warn!(
                budget = %event.budget, entity = %event.entity, threshold, held_usd = event.held_usd,
                limit_usd = event.limit_usd, "budget alert: {:.0}% of the limit reached", threshold * 100.0
            );
            self.sent
                .with_label_values(&[&format!("{threshold}")])
                .inc();
            if let Some(url) = self.cfg.webhook_url.clone() {
                let me = self.clone();
                tokio::spawn(async move { me.deliver(&url, &event).await });
            }
        }
    }

    async fn deliver(&self, url: &str, event: &AlertEvent) {
        let body = bytes::Bytes::from(serde_json::to_vec(event).unwrap_or_default());
        if !self.webhook.post(url, body).await {
            tracing::error!(url, budget = %event.budget, "alert lost after {} attempts", crate::webhook::ATTEMPTS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{BudgetConfig, BudgetScope, BudgetWindow, OnExceed};

    fn level(ratio: f64) -> Level {
        Level {
            budget: BudgetConfig {
                name: Some("b".into()),
                scope: BudgetScope::Tenant,
                window: BudgetWindow::Day,
                limit_usd: 1.0,
                tenant: None,
                feature: None,
                user: None,
                on_exceed: OnExceed::Reject,
                downgrade_to: None,
            },
            key: "k".into(),
            entity: "tenant acme".into(),
            held_usd: ratio,
            ratio,
        }
    }

    #[test]
    fn each_crossing_fires_once_and_flapping_does_not_repeat_it() {
        let counter =
            prometheus::IntCounterVec::new(prometheus::Opts::new("t", "t"), &["threshold"])
                .unwrap_or_else(|e| panic!("{e}"));
        let a = Alerts::new(AlertsConfig::default(), counter);
        let fired: Vec<Vec<f64>> = [0.2, 0.51, 0.49, 0.52, 0.47, 0.9, 1.0, 1.0, 0.99]
            .iter()
            .map(|&r| a.crossings(&level(r)))
            .collect();
        assert_eq!(
            fired,
            vec![
                vec![],
                vec![0.5],
                vec![],
                vec![],
                vec![],
                vec![0.8],
                vec![1.0],
                vec![],
                vec![]
            ]
        );
        // Below the margin (a raised limit, a new day...) it re-arms.
        assert!(a.crossings(&level(0.3)).is_empty());
        assert_eq!(a.crossings(&level(0.6)), vec![0.5]);
        // A jump across several thresholds fires each.
        let mut other = level(1.2);
        other.key = "k2".into();
        assert_eq!(a.crossings(&other), vec![0.5, 0.8, 1.0]);
    }
}
