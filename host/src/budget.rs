//! Spend counters and hard budgets, kept by the host.
//!
//! Every answered call is counted per tenant, feature and user and UTC day
//! (what budget-rule plugins and the `spend` import read), and against each
//! configured budget — a scope (tenant, feature, user, task) × a window
//! (the task, an hour, a day, a month of the gateway's clock) with a USD
//! limit. Before an upstream call the host reserves its worst-case cost
//! against every counter it touches, in one step under one lock: if any
//! budget would go over its limit, nothing is reserved and the call does not
//! happen. So concurrent requests cannot race past a cap; afterwards the
//! reservation is replaced by the real cost. The counters sit behind
//! [`SpendStore`], so a store shared by several replicas can replace the
//! in-memory one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// USD are counted in nano-dollars so sums are exact.
const NANOS: f64 = 1e9;

pub fn to_nanos(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * NANOS).round() as u64
    } else {
        0
    }
}

fn to_usd(nanos: u64) -> f64 {
    nanos as f64 / NANOS
}

/// Who a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetScope {
    /// Each tenant (account).
    Tenant,
    /// Each feature (team, route) within its tenant.
    Feature,
    /// Each user within its tenant.
    User,
    /// Each task (agent run, conversation) within its tenant.
    Task,
}

/// Over what time a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetWindow {
    /// The whole life of a task (only for `scope = "task"`).
    Task,
    Hour,
    Day,
    Month,
}

/// What happens to a request that would take a budget over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnExceed {
    /// HTTP 429 naming the budget, its scope and window.
    #[default]
    Reject,
    /// Answer with `downgrade_to` instead, if that fits; else reject.
    Downgrade,
}

/// One hard budget (`[[budgets]]` in the config, or `PUT /v1/budgets`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Shown in errors, alerts and the admin API; defaults to scope/window.
    #[serde(default)]
    pub name: Option<String>,
    pub scope: BudgetScope,
    pub window: BudgetWindow,
    pub limit_usd: f64,
    /// Only requests of this tenant count (default: every tenant has its own).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Only requests of this feature count.
    #[serde(default)]
    pub feature: Option<String>,
    /// Only requests of this user count.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub on_exceed: OnExceed,
    /// The model answering instead when `on_exceed = "downgrade"`.
    #[serde(default)]
    pub downgrade_to: Option<String>,
}

impl BudgetConfig {
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            format!(
                "{}-per-{}",
                scope_word(self.scope),
                window_word(self.window)
            )
        })
    }

    /// Why this budget cannot be used, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if !(self.limit_usd.is_finite() && self.limit_usd >= 0.0) {
            return Some(format!(
                "limit_usd must be a number of USD ≥ 0, got {}",
                self.limit_usd
            ));
        }
        if self.window == BudgetWindow::Task && self.scope != BudgetScope::Task {
            return Some("window = \"task\" only goes with scope = \"task\"".into());
        }
        if self.on_exceed == OnExceed::Downgrade && self.downgrade_to.is_none() {
            return Some("on_exceed = \"downgrade\" needs downgrade_to (a model)".into());
        }
        None
    }

    fn applies(&self, who: &Who) -> bool {
        let ok = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        ok(&self.tenant, &who.tenant)
            && ok(&self.feature, &who.feature)
            && ok(&self.user, &who.user)
    }

    /// The counter this request is counted under for this budget.
    fn key(&self, who: &Who, now_ms: u64) -> String {
        let window = match self.window {
            BudgetWindow::Task => "task".to_string(),
            BudgetWindow::Hour => crate::clock::utc_hour(now_ms),
            BudgetWindow::Day => crate::clock::utc_day(now_ms),
            BudgetWindow::Month => crate::clock::utc_day(now_ms)[..7].to_string(),
        };
        let entity = match self.scope {
            BudgetScope::Tenant => who.tenant.clone(),
            BudgetScope::Feature => format!("{}\0{}", who.tenant, who.feature),
            BudgetScope::User => format!("{}\0{}", who.tenant, who.user),
            BudgetScope::Task => format!("{}\0{}", who.tenant, who.task),
        };
        format!("budget\0{}\0{window}\0{entity}", self.display_name())
    }

    /// The entity a budget counts, as a person reads it.
    fn entity(&self, who: &Who) -> String {
        match self.scope {
            BudgetScope::Tenant => format!("tenant {}", who.tenant),
            BudgetScope::Feature => format!("feature {} of tenant {}", who.feature, who.tenant),
            BudgetScope::User => format!("user {} of tenant {}", who.user, who.tenant),
            BudgetScope::Task => format!("task {} of tenant {}", who.task, who.tenant),
        }
    }
}

/// Checks a list of budgets: each must make sense, and names must be
/// unique (a budget's counters are keyed by its name). Errors carry the
/// index of the offending budget.
pub fn check_budgets(budgets: &[BudgetConfig]) -> Result<(), (usize, String)> {
    let mut seen = std::collections::HashSet::new();
    for (i, b) in budgets.iter().enumerate() {
        if let Some(p) = b.problem() {
            return Err((i, p));
        }
        if !seen.insert(b.display_name()) {
            return Err((
                i,
                format!(
                    "another budget is also named {:?}; give each a distinct name",
                    b.display_name()
                ),
            ));
        }
    }
    Ok(())
}

fn scope_word(s: BudgetScope) -> &'static str {
    match s {
        BudgetScope::Tenant => "tenant",
        BudgetScope::Feature => "feature",
        BudgetScope::User => "user",
        BudgetScope::Task => "task",
    }
}

fn window_word(w: BudgetWindow) -> &'static str {
    match w {
        BudgetWindow::Task => "task",
        BudgetWindow::Hour => "hour",
        BudgetWindow::Day => "day",
        BudgetWindow::Month => "month",
    }
}

/// Who a request is, for counting.
#[derive(Debug, Clone, Default)]
pub struct Who {
    pub tenant: String,
    pub feature: String,
    pub user: String,
    pub task: String,
}

/// A counter a reservation touches, with the limit it must stay within.
#[derive(Debug, Clone)]
pub struct Hold {
    pub key: String,
    pub limit: Option<u64>,
}

/// Where spend is counted. Reservations must be checked and taken in one
/// atomic step across all their counters.
pub trait SpendStore: Send + Sync {
    /// Adds `amount` as reserved to every counter and returns what each
    /// then holds — unless that would take one with a limit over it: then
    /// nothing changes and the index of the first such counter is returned
    /// with what it holds (settled + reserved).
    fn try_reserve(&self, holds: &[Hold], amount: u64) -> Result<Vec<u64>, (usize, u64)>;
    /// Replaces a reservation of `reserved` by the real cost `actual`.
    fn settle(&self, keys: &[String], reserved: u64, actual: u64);
    /// Settled + reserved, nano-USD.
    fn held(&self, key: &str) -> u64;
}

#[derive(Default, Clone, Copy)]
struct Cell {
    settled: u64,
    reserved: u64,
}

/// The counters of one gateway process.
#[derive(Default)]
pub struct MemoryStore {
    cells: Mutex<HashMap<String, Cell>>,
}

impl MemoryStore {
    /// The counters. A panic elsewhere while they were locked cannot leave
    /// them half-updated (each update is one addition), so a poisoned lock
    /// is taken over rather than failing every request after it.
    fn cells(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cell>> {
        self.cells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl SpendStore for MemoryStore {
    fn try_reserve(&self, holds: &[Hold], amount: u64) -> Result<Vec<u64>, (usize, u64)> {
        let mut cells = self.cells();
        for (i, h) in holds.iter().enumerate() {
            let held = cells.get(&h.key).map_or(0, |c| c.settled + c.reserved);
            if h.limit.is_some_and(|l| held.saturating_add(amount) > l) {
                return Err((i, held));
            }
        }
        Ok(holds
            .iter()
            .map(|h| {
                let c = cells.entry(h.key.clone()).or_default();
                c.reserved += amount;
                c.settled + c.reserved
            })
            .collect())
    }

    fn settle(&self, keys: &[String], reserved: u64, actual: u64) {
        let mut cells = self.cells();
        for k in keys {
            let c = cells.entry(k.clone()).or_default();
            c.reserved = c.reserved.saturating_sub(reserved);
            c.settled += actual;
        }
    }

    fn held(&self, key: &str) -> u64 {
        self.cells().get(key).map_or(0, |c| c.settled + c.reserved)
    }
}

/// The keys one request is counted under for the daily spend figures.
#[derive(Debug, Clone)]
pub struct Scopes {
    pub day: String,
    pub tenant: String,
    pub feature: String,
    pub user: String,
}

impl Scopes {
    /// The counters' keys (`join` sizes each key once; `format!` grew
    /// them step by step, twice per request on the hot path).
    fn keys(&self) -> [String; 3] {
        let (day, tenant) = (self.day.as_str(), self.tenant.as_str());
        [
            ["tenant", day, tenant].join("\0"),
            ["feature", day, tenant, &self.feature].join("\0"),
            ["user", day, tenant, &self.user].join("\0"),
        ]
    }
}

/// Spend of the three daily scopes, USD, reservations included.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub tenant: f64,
    pub feature: f64,
    pub user: f64,
}

/// A request that would take a budget over its limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Exceeded {
    pub budget: Box<BudgetConfig>,
    /// The budget's counter for this entity and window.
    pub key: String,
    /// Who it counts, e.g. "tenant acme".
    pub entity: String,
    /// USD held in its window, reservations of calls in flight included.
    pub spent_usd: f64,
    /// The worst-case cost of the refused call.
    pub request_usd: f64,
}

impl Exceeded {
    /// A refusal is the budget at 100%, for alerts.
    pub fn level(&self) -> crate::alerts::Level {
        crate::alerts::Level {
            budget: (*self.budget).clone(),
            key: self.key.clone(),
            entity: self.entity.clone(),
            held_usd: self.spent_usd,
            ratio: 1.0,
        }
    }

    pub fn message(&self) -> String {
        format!(
            "budget {:?} ({} per {}, {} USD): {} has {:.6} USD spent or in flight; this request could cost up to {:.6} USD",
            self.budget.display_name(),
            scope_word(self.budget.scope),
            window_word(self.budget.window),
            self.budget.limit_usd,
            self.entity,
            self.spent_usd,
            self.request_usd,
        )
    }
}

/// The spend counters and the budgets they enforce.
pub struct SpendCounters {
    store: Arc<dyn SpendStore>,
}

impl Default for SpendCounters {
    fn default() -> Self {
        Self::new(Arc::new(MemoryStore::default()))
    }
}

impl SpendCounters {
    pub fn new(store: Arc<dyn SpendStore>) -> Self {
        Self { store }
    }

    pub fn snapshot(&self, scopes: &Scopes) -> Snapshot {
        let [t, f, u] = scopes.keys().map(|k| to_usd(self.store.held(&k)));
        Snapshot {
            tenant: t,
            feature: f,
            user: u,
        }
    }

    /// USD held by `budget` for `who` in the current window.
    pub fn budget_spend(&self, budget: &BudgetConfig, who: &Who, now_ms: u64) -> f64 {
        to_usd(self.store.held(&budget.key(who, now_ms)))
    }

    /// Holds `usd` against the daily scopes and every budget that applies,
    /// or, if a budget would go over its limit, holds nothing and says which.
    pub fn try_reserve(
        self: &Arc<Self>,
        scopes: &Scopes,
        who: &Who,
        budgets: &[BudgetConfig],
        now_ms: u64,
        usd: f64,
    ) -> Result<Reservation, Exceeded> {
        let amount = to_nanos(usd);
        let applying: Vec<&BudgetConfig> = budgets.iter().filter(|b| b.applies(who)).collect();
        let mut holds: Vec<Hold> = applying
            .iter()
            .map(|b| Hold {
                key: b.key(who, now_ms),
                limit: Some(to_nanos(b.limit_usd)),
            })
            .collect();
        holds.extend(scopes.keys().map(|key| Hold { key, limit: None }));
        let helds = match self.store.try_reserve(&holds, amount) {
            Ok(h) => h,
            Err((i, held)) => return Err(self.exceeded(&applying, &holds, i, held, who, usd)),
        };
        let levels = applying
            .iter()
            .zip(&holds)
            .zip(&helds)
            .map(|((b, h), &held)| {
                let limit = h.limit.unwrap_or(0);
                crate::alerts::Level {
                    budget: (*b).clone(),
                    key: h.key.clone(),
                    entity: b.entity(who),
                    held_usd: to_usd(held),
                    ratio: if limit == 0 {
                        1.0
                    } else {
                        held as f64 / limit as f64
                    },
                }
            })
            .collect();
        Ok(Reservation {
            store: self.store.clone(),
            keys: holds.into_iter().map(|h| h.key).collect(),
            amount,
            done: false,
            levels,
        })
    }

    fn exceeded(
        &self,
        applying: &[&BudgetConfig],
        holds: &[Hold],
        i: usize,
        held: u64,
        who: &Who,
        usd: f64,
    ) -> Exceeded {
        let b = applying.get(i).copied().cloned();
        let key = holds.get(i).map(|h| h.key.clone()).unwrap_or_default();
        match b {
            Some(budget) => Exceeded {
                key,
                entity: budget.entity(who),
                budget: Box::new(budget),
                spent_usd: to_usd(held),
                request_usd: usd,
            },
            // Unreachable: only limited holds can be exceeded, and
            // those are the applying budgets'. Refuse, never panic.
            None => Exceeded {
                key,
                budget: Box::new(BudgetConfig {
                    name: Some("spend counters unavailable".into()),
                    scope: BudgetScope::Tenant,
                    window: BudgetWindow::Day,
                    limit_usd: 0.0,
                    tenant: None,
                    feature: None,
                    user: None,
                    on_exceed: OnExceed::Reject,
                    downgrade_to: None,
                }),
                entity: format!("tenant {}", who.tenant),
                spent_usd: 0.0,
                request_usd: usd,
            },
        }
    }
}

/// A reservation of worst-case cost. Settling replaces it by the real cost;
/// dropping it unsettled releases it (the call never happened or failed).
pub struct Reservation {
    store: Arc<dyn SpendStore>,
    keys: Vec<String>,
    amount: u64,
    done: bool,
    /// Each budget's level once this was reserved, for alerts.
    pub levels: Vec<crate::alerts::Level>,
}

impl Reservation {
    pub fn settle(mut self, actual_usd: f64) {
        self.apply(to_nanos(actual_usd));
    }

    fn apply(&mut self, actual: u64) {
        if self.done {
            return;
        }
        self.done = true;
        self.store.settle(&self.keys, self.amount, actual);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.apply(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(user: &str) -> Scopes {
        Scopes {
            day: "2026-11-23".into(),
            tenant: "acme".into(),
            feature: "chat".into(),
            user: user.into(),
        }
    }

    fn who(task: &str) -> Who {
        Who {
            tenant: "acme".into(),
            feature: "chat".into(),
            user: "u1".into(),
            task: task.into(),
        }
    }

    fn budget(scope: BudgetScope, window: BudgetWindow, limit: f64) -> BudgetConfig {
        BudgetConfig {
            name: None,
            scope,
            window,
            limit_usd: limit,
            tenant: None,
            feature: None,
            user: None,
            on_exceed: OnExceed::Reject,
            downgrade_to: None,
        }
    }

    #[test]
    fn reservations_count_until_settled_or_dropped() {
        let c = Arc::new(SpendCounters::default());
        let reserve = |user: &str, usd: f64| {
            c.try_reserve(&scopes(user), &who(""), &[], 0, usd)
                .unwrap_or_else(|e| panic!("{}", e.message()))
        };
        let r = reserve("u1", 0.5);
        assert_eq!(c.snapshot(&scopes("u1")).tenant, 0.5);
        r.settle(0.125);
        let s = c.snapshot(&scopes("u1"));
        assert_eq!((s.tenant, s.feature, s.user), (0.125, 0.125, 0.125));
        drop(reserve("u2", 1.0));
        let s = c.snapshot(&scopes("u2"));
        assert_eq!((s.tenant, s.user), (0.125, 0.0));
    }

    #[test]
    fn a_cap_is_never_passed_and_a_refusal_holds_nothing() {
        let c = Arc::new(SpendCounters::default());
        let b = [budget(BudgetScope::Tenant, BudgetWindow::Day, 1.0)];
        let now = 1_795_449_600_000;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(
                c.try_reserve(&scopes("u1"), &who("t"), &b, now, 0.3)
                    .unwrap(),
            );
        }
        let e = c
            .try_reserve(&scopes("u1"), &who("t"), &b, now, 0.3)
            .err()
            .unwrap();
        assert!((e.spent_usd - 0.9).abs() < 1e-9);
        assert!(e.message().contains("tenant acme"), "{}", e.message());
        assert!((c.snapshot(&scopes("u1")).tenant - 0.9).abs() < 1e-9);
        // Settling below the worst case frees room.
        for r in held {
            r.settle(0.1);
        }
        assert!(
            c.try_reserve(&scopes("u1"), &who("t"), &b, now, 0.7)
                .is_ok()
        );
        // Next day, a fresh window.
        assert!(
            c.try_reserve(&scopes("u1"), &who("t"), &b, now + 86_400_000, 1.0)
                .is_ok()
        );
    }

    #[test]
    fn budgets_count_each_entity_in_its_own_window() {
        let c = Arc::new(SpendCounters::default());
        let task = [budget(BudgetScope::Task, BudgetWindow::Task, 0.5)];
        let now = 1_795_449_600_000;
        c.try_reserve(&scopes("u1"), &who("a"), &task, now, 0.5)
            .unwrap()
            .settle(0.5);
        assert!(
            c.try_reserve(&scopes("u1"), &who("a"), &task, now, 0.01)
                .is_err()
        );
        assert!(
            c.try_reserve(&scopes("u1"), &who("b"), &task, now, 0.5)
                .is_ok()
        );
        // Filters: a budget for another tenant does not apply.
        let mut other = budget(BudgetScope::Tenant, BudgetWindow::Hour, 0.0);
        other.tenant = Some("bluefin".into());
        assert!(
            c.try_reserve(&scopes("u1"), &who("c"), &[other], now, 5.0)
                .is_ok()
        );
    }

    #[test]
    fn nonsense_budgets_are_named() {
        let mut b = budget(BudgetScope::Tenant, BudgetWindow::Task, 1.0);
        assert!(b.problem().unwrap().contains("window = \"task\""));
        b.window = BudgetWindow::Day;
        assert_eq!(b.problem(), None);
        b.limit_usd = f64::NAN;
        assert!(b.problem().is_some());
        b.limit_usd = 1.0;
        b.on_exceed = OnExceed::Downgrade;
        assert!(b.problem().unwrap().contains("downgrade_to"));
    }
}
