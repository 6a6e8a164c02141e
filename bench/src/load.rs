//! The load generator. Fixed-rate runs are open loop: a pacer thread sends
//! each request at its scheduled time whether or not earlier ones have been
//! answered, so a slow server queues requests instead of slowing the
//! generator down (which would hide its slowness). Maximum throughput is
//! measured closed loop: a fixed number of connections, each sending its next
//! request as soon as the previous one is answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Uri};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::runtime::Handle;

pub type Http = Client<HttpConnector, Full<Bytes>>;

/// One keep-alive client shared by every request of a run.
pub fn client() -> Http {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(c)
}

/// Where requests go, and the headers a contender needs (a key, a tenant).
pub struct Target {
    pub uri: Uri,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Every request asks a question no earlier one asked, so an answer cache
/// never hits and every plugin runs on every request, the upstream call
/// included: the gateway's most expensive path.
static NEXT_QUESTION: AtomicU64 = AtomicU64::new(0);

fn body() -> Bytes {
    let i = NEXT_QUESTION.fetch_add(1, Ordering::Relaxed);
    let v = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are the support assistant of Acme Cloud. Answer in two sentences."},
            {"role": "user", "content": format!("How do I download invoice number {i} as a PDF from the billing page?")}
        ],
        "temperature": 0,
    });
    Bytes::from(v.to_string())
}

/// One request, answered with a 2xx and read to the end, or why not.
async fn send(client: &Http, target: &Target) -> Result<(), String> {
    let mut req = Request::post(target.uri.clone()).header("content-type", "application/json");
    for (k, v) in &target.headers {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(body())).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status.is_success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&bytes);
        Err(format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        ))
    }
}

/// What one run saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Latency of each answered request, µs.
    pub latencies_us: Vec<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the first send to the last answer.
    pub elapsed: Duration,
    /// How late the pacer sent requests (its own timer, not the server), µs, p99.
    pub pacer_lag_p99_us: f64,
}

impl Outcome {
    pub fn requests(&self) -> u64 {
        self.latencies_us.len() as u64 + self.errors
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests() == 0 {
            return 0.0;
        }
        self.errors as f64 / self.requests() as f64
    }

    pub fn answered_per_second(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn record(&mut self, r: Result<f64, String>) {
        match r {
            Ok(us) => self.latencies_us.push(us),
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

/// Nearest-rank percentile of `sorted` (ascending); 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sends `rate` requests per second for `duration`, each at its own time.
/// A request not answered within `timeout` is an error, and so is one that
/// would exceed `max_in_flight` (the server has fallen that far behind).
/// Latency runs from the moment the pacer sends the request. Blocks the
/// calling thread, which must not be one of `rt`'s workers.
pub fn open_loop(
    rt: &Handle,
    client: &Http,
    target: &Arc<Target>,
    rate: f64,
    duration: Duration,
    timeout: Duration,
    max_in_flight: usize,
) -> Outcome {
    let n = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (tx, rx) = std::sync::mpsc::channel::<Result<f64, String>>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut out = Outcome::default();
    let mut lag = Vec::with_capacity(n as usize);
    let start = Instant::now() + Duration::from_millis(10);
    for i in 0..n {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let sent = Instant::now();
        lag.push(sent.saturating_duration_since(due).as_secs_f64() * 1e6);
        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
            out.record(Err(format!(
                "more than {max_in_flight} requests unanswered"
            )));
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (client, target, tx, in_flight) = (
            client.clone(),
            target.clone(),
            tx.clone(),
            in_flight.clone(),
        );
        rt.spawn(async move {
            let r = match tokio::time::timeout(timeout, send(&client, &target)).await {
                Ok(Ok(())) => Ok(sent.elapsed().as_secs_f64() * 1e6),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(r);
        });
    }
    drop(tx);
    // Every task ends within `timeout`, so this ends too.
    for r in rx {
        out.record(r);
    }
    out.elapsed = start.elapsed();
    lag.sort_by(f64::total_cmp);
    out.pacer_lag_p99_us = percentile(&lag, 0.99);
    out.latencies_us.sort_by(f64::total_cmp);
    out
}

/// `connections` clients each sending back to back for `duration`.
pub fn closed_loop(
    rt: &Handle,
    client: &Http,
    target: &Arc<Target>,
    connections: usize,
    duration: Duration,
    timeout: Duration,
) -> Outcome {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (client, target) = (client.clone(), target.clone());
            rt.spawn(async move {
                let mut out = Outcome::default();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    out.record(
                        match tokio::time::timeout(timeout, send(&client, &target)).await {
                            Ok(Ok(())) => Ok(t.elapsed().as_secs_f64() * 1e6),
                            Ok(Err(e)) => Err(e),
                            Err(_) => Err(format!("no answer within {timeout:?}")),
                        },
                    );
                }
                out
            })
        })
        .collect();
    let mut out = Outcome::default();
    rt.block_on(async {
        for w in workers {
            if let Ok(o) = w.await {
                out.latencies_us.extend(o.latencies_us);
                out.errors += o.errors;
                if out.first_error.is_none() {
                    out.first_error = o.first_error;
                }
            }
        }
    });
    out.elapsed = start.elapsed();
    out.latencies_us.sort_by(f64::total_cmp);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&v, 0.999), 999.0);
        assert_eq!(percentile(&v, 1.0), 1000.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.001), 7.0);
    }

    #[test]
    fn questions_never_repeat() {
        let a = body();
        let b = body();
        assert_ne!(a, b);
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap_or_default();
        assert_eq!(v["model"], "gpt-4o-mini");
    }
}
