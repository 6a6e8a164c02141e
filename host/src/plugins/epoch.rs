//! The clock of plugin deadlines: a thread that advances the engine's
//! epoch every tick while some call's deadline is still ahead.
//!
//! A plugin call's deadline is a number of ticks (wasmtime's epoch
//! interruption), so something must tick while calls run. Ticking all the
//! time woke a thread a thousand times a second even in an idle gateway (on
//! this VM ~18 µs of CPU a wake, ~2% of a core). The ticker instead sleeps
//! once every armed deadline has passed and a grace period after it, and
//! the next call to be armed wakes it before it runs. Under steady traffic
//! it never sleeps, so calls pay one atomic update and no wake-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::{Engine, EngineWeak};

/// Ticks the ticker keeps going after the last deadline passed. Under
/// steady traffic (a request every millisecond or so) the next call comes
/// first and it never sleeps; slower traffic wakes it once per request and
/// it ticks only through that request's deadlines (measured at 10 requests
/// a second: a grace of 200 ticks cost 5.3 ms of CPU per request, 20 ticks
/// 2.5 ms).
const GRACE_TICKS: u64 = 2;

struct Shared {
    /// Ticks so far: the engine's epoch (nothing else advances it).
    ticks: AtomicU64,
    /// The tick by which every deadline armed so far has passed.
    needed_until: AtomicU64,
    sleeping: AtomicBool,
    stop: AtomicBool,
}

pub(super) struct Ticker {
    shared: Arc<Shared>,
    thread: Thread,
}

impl Ticker {
    pub(super) fn start(engine: &Engine, tick: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            ticks: AtomicU64::new(0),
            needed_until: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let handle = std::thread::Builder::new()
            .name("tollgate-epoch".into())
            .spawn({
                let shared = shared.clone();
                let engine = engine.weak();
                move || run(&shared, &engine, tick)
            })?;
        Ok(Self {
            shared,
            thread: handle.thread().clone(),
        })
    }

    /// Says a call with a deadline `ticks` from now is about to run, and
    /// wakes the ticker if it sleeps. Call before setting the deadline.
    pub(super) fn arming(&self, ticks: u64) {
        let s = &self.shared;
        s.needed_until
            .fetch_max(s.ticks.load(SeqCst).saturating_add(ticks), SeqCst);
        // Either the ticker sees the new `needed_until` before it sleeps,
        // or this sees `sleeping` and wakes it (both sides are SeqCst).
        if s.sleeping.load(SeqCst) {
            self.thread.unpark();
        }
    }

    /// Ticks so far.
    #[cfg(test)]
    fn ticks(&self) -> u64 {
        self.shared.ticks.load(SeqCst)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.thread.unpark();
    }
}

fn run(s: &Shared, engine: &EngineWeak, tick: Duration) {
    while !s.stop.load(SeqCst) {
        std::thread::sleep(tick);
        let Some(e) = engine.upgrade() else { return };
        e.increment_epoch();
        drop(e);
        let now = s.ticks.fetch_add(1, SeqCst) + 1;
        if now < s.needed_until.load(SeqCst).saturating_add(GRACE_TICKS) {
            continue;
        }
        s.sleeping.store(true, SeqCst);
        // Re-checked after announcing the sleep: a call armed in between
        // either moved `needed_until` or will see `sleeping` and unpark.
        while !s.stop.load(SeqCst)
            && s.ticks.load(SeqCst) >= s.needed_until.load(SeqCst).saturating_add(GRACE_TICKS)
        {
            std::thread::park();
        }
        s.sleeping.store(false, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn it_sleeps_when_no_deadline_is_ahead_and_an_armed_call_wakes_it() {
        let engine = Engine::default();
        let t = Ticker::start(&engine, Duration::from_millis(1)).unwrap();
        // Nothing armed: it stops after the grace period.
        wait_until("sleeps", || t.shared.sleeping.load(SeqCst));
        let asleep_at = t.ticks();
        assert!(asleep_at >= GRACE_TICKS, "{asleep_at}");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(t.ticks(), asleep_at, "no ticks while asleep");

        // A call armed with a deadline of 50 ticks: ticking resumes and goes
        // on past the deadline and the grace period, then stops again.
        t.arming(50);
        wait_until("wakes", || t.ticks() > asleep_at + 50);
        wait_until("sleeps again", || {
            t.shared.sleeping.load(SeqCst) && t.ticks() >= asleep_at + 50 + GRACE_TICKS
        });
    }

    #[test]
    fn dropping_it_ends_a_sleeping_thread() {
        let engine = Engine::default();
        let t = Ticker::start(&engine, Duration::from_millis(1)).unwrap();
        wait_until("sleeps", || t.shared.sleeping.load(SeqCst));
        let shared = t.shared.clone();
        drop(t);
        wait_until("ends", || Arc::strong_count(&shared) == 1);
    }
}
