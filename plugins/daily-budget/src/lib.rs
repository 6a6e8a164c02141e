//! A per-tenant daily spend cap.
//!
//! * spend already at or over the cap, or this request's worst-case cost
//!   would take it over: deny;
//! * spend plus this request over `soft_ratio` of the cap: downgrade to
//!   `downgrade_model` (and alert), unless the request already asks for it;
//! * otherwise allow.
//!
//! ```toml
//! [plugins.budget_rule.config]
//! daily_usd = 10.0                  # cap for tenants not listed below
//! soft_ratio = 0.8
//! downgrade_model = "gpt-4o-mini"
//! tenants = { acme = 50.0, trial = 0.5 }
//! ```

use std::collections::HashMap;

use serde::Deserialize;
use tollgate_sdk::{BudgetRule, RequestView, SpendSnapshot, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    daily_usd: f64,
    soft_ratio: f64,
    downgrade_model: Option<String>,
    tenants: HashMap<String, f64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            daily_usd: 10.0,
            soft_ratio: 0.8,
            downgrade_model: None,
            tenants: HashMap::new(),
        }
    }
}

pub struct DailyBudget {
    cfg: Config,
}

impl DailyBudget {
    pub fn from_config(config: &str) -> Result<Self, String> {
        let cfg: Config = tollgate_sdk::config(config)?;
        let caps = std::iter::once(("daily_usd", cfg.daily_usd))
            .chain(cfg.tenants.iter().map(|(k, v)| (k.as_str(), *v)));
        for (name, cap) in caps {
            if !(cap.is_finite() && cap >= 0.0) {
                return Err(format!("{name}: cap must be a non-negative number"));
            }
        }
        if !(cfg.soft_ratio > 0.0 && cfg.soft_ratio <= 1.0) {
            return Err("soft_ratio must be in (0, 1]".into());
        }
        Ok(Self { cfg })
    }

    pub fn decide(&self, tenant: &str, model: &str, spend: &SpendSnapshot) -> Verdict {
        let cap = self
            .cfg
            .tenants
            .get(tenant)
            .copied()
            .unwrap_or(self.cfg.daily_usd);
        let spent = spend.tenant_today_usd;
        let projected = spent + spend.estimated_cost_usd;
        if spent >= cap || projected > cap {
            return Verdict::Deny(format!(
                "daily budget of tenant {tenant} reached: spent ${spent:.4} of ${cap:.4} on {}",
                spend.day
            ));
        }
        if projected > cap * self.cfg.soft_ratio {
            return match &self.cfg.downgrade_model {
                Some(cheap) if cheap != model => Verdict::Downgrade(cheap.clone()),
                _ => Verdict::Alert(format!(
                    "tenant {tenant} above {:.0}% of its daily budget (${spent:.4} of ${cap:.4})",
                    self.cfg.soft_ratio * 100.0
                )),
            };
        }
        Verdict::Allow
    }
}

impl BudgetRule for DailyBudget {
    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn check(&self, req: &RequestView, spend: &SpendSnapshot) -> Verdict {
        self.decide(&req.tenant, &req.model, spend)
    }
}

tollgate_sdk::export_budget_rule!(DailyBudget);

#[cfg(test)]
mod tests {
    use super::*;

    fn spend(today: f64, est: f64) -> SpendSnapshot {
        SpendSnapshot {
            day: "2026-11-23".into(),
            tenant_today_usd: today,
            feature_today_usd: 0.0,
            user_today_usd: 0.0,
            estimated_cost_usd: est,
        }
    }

    #[test]
    fn allow_downgrade_deny() {
        let b = DailyBudget::from_config(
            r#"{"daily_usd": 1.0, "downgrade_model": "gpt-4o-mini", "tenants": {"big": 100.0}}"#,
        )
        .unwrap();
        assert_eq!(b.decide("t", "gpt-4o", &spend(0.1, 0.01)), Verdict::Allow);
        assert_eq!(
            b.decide("t", "gpt-4o", &spend(0.85, 0.01)),
            Verdict::Downgrade("gpt-4o-mini".into())
        );
        assert!(matches!(
            b.decide("t", "gpt-4o-mini", &spend(0.85, 0.01)),
            Verdict::Alert(_)
        ));
        assert!(matches!(
            b.decide("t", "gpt-4o", &spend(0.99, 0.02)),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            b.decide("t", "gpt-4o", &spend(1.0, 0.0)),
            Verdict::Deny(_)
        ));
        assert_eq!(b.decide("big", "gpt-4o", &spend(5.0, 0.01)), Verdict::Allow);
    }

    #[test]
    fn rejects_nonsense_caps() {
        assert!(DailyBudget::from_config(r#"{"daily_usd": -1}"#).is_err());
        assert!(DailyBudget::from_config(r#"{"soft_ratio": 0}"#).is_err());
    }
}
