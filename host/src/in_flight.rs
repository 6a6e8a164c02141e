//! A bound on chat requests in flight (`server.max_in_flight`): past it, a
//! request is refused at once with 503 `overloaded` and `Retry-After`,
//! before its body is read.
//!
//! Without a bound, a gateway offered more than it can serve accepts all of
//! it, queues it in memory and answers all of it late: measured here, a
//! gateway with four plugins offered 5,000 requests/s answered in seconds
//! and grew to 413 MiB. Refusing the excess fast keeps the requests it does
//! take quick and its memory flat, and tells clients when to come back (the
//! OpenAI SDKs retry a 503 and honour `Retry-After`). A request holds its
//! place until the last byte of its response is sent (a stream: its last
//! event) or its client goes away. LLM calls are long (a 30 s stream at
//! 200 requests/s is 6,000 in flight), so the default is high: it is a
//! guard against collapse, not a rate limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::ApiError;

/// Seconds a refused client is asked to wait before it retries.
pub const RETRY_AFTER_SECONDS: u32 = 1;

pub struct InFlight {
    /// None: unbounded (`max_in_flight = 0`).
    places: Option<Arc<Semaphore>>,
    limit: usize,
    refused: AtomicU64,
    /// When the last refusal was logged, in seconds since `started` (+1, so
    /// that 0 means never): one warning a second at most while overloaded.
    warned_at: AtomicU64,
    started: Instant,
}

/// A request's place; given back when dropped.
pub struct Place(Option<OwnedSemaphorePermit>);

impl Place {
    /// Whether dropping it gives anything back (false when unbounded).
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

impl InFlight {
    /// `limit` places; 0 for no bound.
    pub fn new(limit: usize) -> Self {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        Self {
            places: (limit > 0).then(|| Arc::new(Semaphore::new(limit))),
            limit,
            refused: AtomicU64::new(0),
            warned_at: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// A place for one more request, or the 503 to answer with.
    pub fn enter(&self) -> Result<Place, ApiError> {
        let Some(places) = &self.places else {
            return Ok(Place(None));
        };
        match places.clone().try_acquire_owned() {
            Ok(p) => Ok(Place(Some(p))),
            Err(_) => {
                let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                self.warn_once_a_second(refused);
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "overloaded",
                    format!(
                        "the gateway is at its limit of {} requests in flight; retry in {RETRY_AFTER_SECONDS} s",
                        self.limit
                    ),
                ))
            }
        }
    }

    fn warn_once_a_second(&self, refused: u64) {
        let now = self.started.elapsed().as_secs() + 1;
        let last = self.warned_at.load(Ordering::Relaxed);
        if last != now
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                limit = self.limit,
                refused,
                "overloaded: {} chat requests in flight, new ones are refused with 503 (server.max_in_flight)",
                self.limit
            );
        }
    }

    /// Requests holding a place now (0 when unbounded: nothing counts them).
    pub fn current(&self) -> usize {
        self.places
            .as_ref()
            .map_or(0, |s| self.limit - s.available_permits())
    }

    /// Requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_given_back_when_dropped_and_the_excess_is_refused() {
        let f = InFlight::new(2);
        let a = f.enter().unwrap();
        let b = f.enter().unwrap();
        assert!(a.is_held() && b.is_held());
        assert_eq!(f.current(), 2);
        let e = f.enter().err().unwrap();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, "overloaded");
        assert!(e.message.contains("limit of 2"), "{}", e.message);
        assert_eq!(f.refused(), 1);
        drop(a);
        assert_eq!(f.current(), 1);
        let _c = f.enter().unwrap();
        assert_eq!(f.refused(), 1);
    }

    #[test]
    fn zero_means_unbounded() {
        let f = InFlight::new(0);
        let places: Vec<Place> = (0..10_000).map(|_| f.enter().unwrap()).collect();
        assert!(places.iter().all(|p| !p.is_held()));
        assert_eq!((f.current(), f.refused()), (0, 0));
    }
}
