//! Surviving provider trouble (step 6): retries with exponential backoff and
//! jitter that honour `Retry-After`, a circuit breaker per provider and
//! model, and what is left when every rung of a route has failed — the
//! route's configured deterministic answer, else a clear 503.
//!
//! Breakers follow the gateway's clock, so tests (and replays) drive them
//! with a manual clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    /// Extra attempts on the same model after a retryable error (429,
    /// 5xx, timeout, connection), before moving down the ladder.
    pub max_retries: u32,
    /// Backoff before retry n (0-based): base × 2ⁿ, capped, times a random
    /// factor in [0.5, 1) (jitter), unless the upstream said `Retry-After`.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// A `Retry-After` longer than this is not waited for: the next model is
    /// tried instead.
    pub max_retry_after_ms: u64,
    /// The breaker of a provider+model opens after this many failures…
    pub breaker_failures: u32,
    /// …within this long,
    pub breaker_window_ms: u64,
    /// and stays open this long; then one probe call is let through
    /// (half-open): success closes it, failure opens it again.
    pub breaker_open_ms: u64,
    /// Answered (HTTP 200, model `fallback-answer`, no cost) when every
    /// model of a route failed; unset: HTTP 503 `upstream_unavailable`.
    pub fallback_answer: Option<String>,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            backoff_base_ms: 100,
            backoff_max_ms: 2_000,
            max_retry_after_ms: 5_000,
            breaker_failures: 5,
            breaker_window_ms: 30_000,
            breaker_open_ms: 10_000,
            fallback_answer: None,
        }
    }
}

impl ResilienceConfig {
    /// How long to wait before retry `n` (0-based), or None when the
    /// upstream asks for longer than we are willing to wait. `jitter` is a
    /// random number in [0, 1).
    pub fn backoff(&self, n: u32, retry_after_s: Option<u64>, jitter: f64) -> Option<Duration> {
        if let Some(s) = retry_after_s {
            let ms = s.saturating_mul(1000);
            return (ms <= self.max_retry_after_ms).then(|| Duration::from_millis(ms));
        }
        let exp = self
            .backoff_base_ms
            .saturating_mul(1u64.checked_shl(n.min(30)).unwrap_or(u64::MAX))
            .min(self.backoff_max_ms);
        let factor = 0.5 + 0.5 * jitter.clamp(0.0, 1.0);
        Some(Duration::from_millis((exp as f64 * factor) as u64))
    }
}

/// A number in [0, 1) for jitter; not for anything secret.
pub fn jitter() -> f64 {
    let n = uuid::Uuid::new_v4().as_u128() as u64;
    (n >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug, Default)]
struct Breaker {
    /// Failure times (gateway clock) within the window.
    failures: Vec<u64>,
    opened_at: Option<u64>,
    /// A half-open probe is in flight.
    probing: bool,
}

/// One circuit breaker per provider+model.
#[derive(Default)]
pub struct Breakers {
    map: Mutex<HashMap<String, Breaker>>,
}

impl Breakers {
    pub fn state(&self, key: &str, cfg: &ResilienceConfig, now: u64) -> BreakerState {
        let Ok(map) = self.map.lock() else {
            return BreakerState::Closed;
        };
        match map.get(key).and_then(|b| b.opened_at) {
            None => BreakerState::Closed,
            Some(t) if now.saturating_sub(t) < cfg.breaker_open_ms => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// May a call go to `key` now? Open: no. Half-open: one probe at a time.
    pub fn allow(&self, key: &str, cfg: &ResilienceConfig, now: u64) -> bool {
        let Ok(mut map) = self.map.lock() else {
            return true;
        };
        let Some(b) = map.get_mut(key) else {
            return true;
        };
        match b.opened_at {
            None => true,
            Some(t) if now.saturating_sub(t) < cfg.breaker_open_ms => false,
            Some(_) if b.probing => false,
            Some(_) => {
                b.probing = true;
                true
            }
        }
    }

    /// Records a call's outcome; returns the new state when it changed.
    pub fn record(
        &self,
        key: &str,
        ok: bool,
        cfg: &ResilienceConfig,
        now: u64,
    ) -> Option<BreakerState> {
        let Ok(mut map) = self.map.lock() else {
            return None;
        };
        let b = map.entry(key.to_string()).or_default();
        let was_open = b.opened_at.is_some();
        if ok {
            *b = Breaker::default();
            return was_open.then_some(BreakerState::Closed);
        }
        if b.probing {
            // The half-open probe failed: open again for a full period.
            b.probing = false;
            b.opened_at = Some(now);
            return Some(BreakerState::Open);
        }
        b.failures
            .retain(|&t| now.saturating_sub(t) < cfg.breaker_window_ms);
        b.failures.push(now);
        if !was_open && b.failures.len() >= cfg.breaker_failures.max(1) as usize {
            b.opened_at = Some(now);
            b.failures.clear();
            return Some(BreakerState::Open);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_jittered_and_honours_retry_after() {
        let c = ResilienceConfig::default();
        let ms = |n, ra, j| c.backoff(n, ra, j).map(|d| d.as_millis() as u64);
        assert_eq!(ms(0, None, 0.0), Some(50));
        assert_eq!(ms(0, None, 0.999_999), Some(99));
        assert_eq!(ms(1, None, 0.0), Some(100));
        assert_eq!(ms(3, None, 0.0), Some(400));
        assert_eq!(
            ms(10, None, 0.0),
            Some(1_000),
            "capped at backoff_max_ms, then jittered"
        );
        assert_eq!(ms(40, None, 0.0), Some(1_000));
        assert_eq!(
            ms(0, Some(2), 0.3),
            Some(2_000),
            "Retry-After wins, without jitter"
        );
        assert_eq!(ms(0, Some(60), 0.3), None, "too long: try the next model");
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }

    #[test]
    fn a_breaker_opens_after_failures_in_its_window_and_probes_half_open() {
        let c = ResilienceConfig::default();
        let b = Breakers::default();
        let k = "sim/gpt-4o";
        // Failures spread wider than the window never open it.
        for i in 0..10 {
            assert_eq!(b.record(k, false, &c, i * 10_000), None);
        }
        let t0 = 1_000_000;
        for i in 0..4 {
            assert_eq!(b.record(k, false, &c, t0 + i), None);
        }
        assert_eq!(b.record(k, false, &c, t0 + 4), Some(BreakerState::Open));
        assert!(!b.allow(k, &c, t0 + 5));
        assert_eq!(b.state(k, &c, t0 + 9_999), BreakerState::Open);
        // After breaker_open_ms: one probe, not two.
        let t1 = t0 + 4 + c.breaker_open_ms;
        assert_eq!(b.state(k, &c, t1), BreakerState::HalfOpen);
        assert!(b.allow(k, &c, t1));
        assert!(!b.allow(k, &c, t1));
        // The probe fails: open for another period.
        assert_eq!(b.record(k, false, &c, t1), Some(BreakerState::Open));
        assert!(!b.allow(k, &c, t1 + 1));
        // Next probe succeeds: closed, counting from zero.
        let t2 = t1 + c.breaker_open_ms;
        assert!(b.allow(k, &c, t2));
        assert_eq!(b.record(k, true, &c, t2), Some(BreakerState::Closed));
        assert_eq!(b.state(k, &c, t2), BreakerState::Closed);
        assert_eq!(b.record(k, false, &c, t2 + 1), None);
        // Other models are unaffected.
        assert!(b.allow("sim/gpt-4o-mini", &c, t0 + 5));
    }
}
