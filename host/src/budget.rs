//! Spend counters kept by the host: settled spend plus reservations for
//! calls in flight, per tenant, feature and user and UTC day. Budget-rule
//! plugins read a snapshot; they never hold the counters themselves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// USD are counted in nano-dollars so sums are exact.
const NANOS: f64 = 1e9;

fn to_nanos(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * NANOS).round() as u64
    } else {
        0
    }
}

#[derive(Default, Clone, Copy)]
struct Cell {
    settled: u64,
    reserved: u64,
}

#[derive(Default)]
pub struct SpendCounters {
    cells: Mutex<HashMap<String, Cell>>,
}

/// The keys one request is counted under.
#[derive(Debug, Clone)]
pub struct Scopes {
    pub day: String,
    pub tenant: String,
    pub feature: String,
    pub user: String,
}

impl Scopes {
    fn keys(&self) -> [String; 3] {
        [
            format!("tenant\0{}\0{}", self.day, self.tenant),
            format!("feature\0{}\0{}\0{}", self.day, self.tenant, self.feature),
            format!("user\0{}\0{}\0{}", self.day, self.tenant, self.user),
        ]
    }
}

/// Spend of the three scopes, USD, reservations included.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub tenant: f64,
    pub feature: f64,
    pub user: f64,
}

impl SpendCounters {
    pub fn snapshot(&self, scopes: &Scopes) -> Snapshot {
        let Ok(cells) = self.cells.lock() else {
            return Snapshot::default();
        };
        let get = |k: &String| {
            cells
                .get(k)
                .map_or(0.0, |c| (c.settled + c.reserved) as f64 / NANOS)
        };
        let [t, f, u] = scopes.keys();
        Snapshot {
            tenant: get(&t),
            feature: get(&f),
            user: get(&u),
        }
    }

    /// Holds `usd` against every scope until the call settles or is dropped.
    pub fn reserve(self: &Arc<Self>, scopes: &Scopes, usd: f64) -> Reservation {
        let amount = to_nanos(usd);
        let keys = scopes.keys();
        if let Ok(mut cells) = self.cells.lock() {
            for k in &keys {
                cells.entry(k.clone()).or_default().reserved += amount;
            }
        }
        Reservation {
            counters: self.clone(),
            keys,
            amount,
            done: false,
        }
    }
}

/// A reservation of worst-case cost. Settling replaces it by the real cost;
/// dropping it unsettled releases it (the call never happened or failed).
pub struct Reservation {
    counters: Arc<SpendCounters>,
    keys: [String; 3],
    amount: u64,
    done: bool,
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
        if let Ok(mut cells) = self.counters.cells.lock() {
            for k in &self.keys {
                let c = cells.entry(k.clone()).or_default();
                c.reserved = c.reserved.saturating_sub(self.amount);
                c.settled += actual;
            }
        }
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

    #[test]
    fn reservations_count_until_settled_or_dropped() {
        let c = Arc::new(SpendCounters::default());
        let r = c.reserve(&scopes("u1"), 0.5);
        assert_eq!(c.snapshot(&scopes("u1")).tenant, 0.5);
        r.settle(0.125);
        let s = c.snapshot(&scopes("u1"));
        assert_eq!((s.tenant, s.feature, s.user), (0.125, 0.125, 0.125));
        drop(c.reserve(&scopes("u2"), 1.0));
        let s = c.snapshot(&scopes("u2"));
        assert_eq!((s.tenant, s.user), (0.125, 0.0));
    }
}
