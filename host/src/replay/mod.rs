//! `tollgate replay`: what a policy set would have cost on a recorded day,
//! and what it would have broken, before it goes live.
//!
//! The replay starts a real gateway in this process on a loopback port, with
//! the policy set's config, every provider replaced by the simulator, and a
//! manual clock that follows the trace's time (budget days, cache TTLs and
//! the simulator's prompt cache all expire in trace time, so a day replays
//! in seconds). Each trace request goes over HTTP with its identity in the
//! `x-tollgate-*` headers, exactly as an application would send it. What
//! happened to it — served by a model, from the cache (and whose answer),
//! blocked or failed, and every upstream call with its tokens — is then read
//! back from the gateway's own ledger, the same record production keeps.

pub mod export;
mod summary;
pub mod trace;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::clock::ManualClock;
use crate::config::{Config, ProviderConfig, SimConfig};
use crate::ledger::CallRecord;
use crate::pipeline::Gateway;
use crate::server;
pub use summary::{Summary, compare_table};
pub use trace::TraceRequest;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    Trace {
        path: String,
        line: usize,
        message: String,
    },
    #[error("cannot start the gateway: {0}")]
    Gateway(#[from] crate::pipeline::GatewayError),
    #[error("ledger: {0}")]
    Ledger(String),
    #[error("{0}")]
    Client(String),
}

/// How the trace is replayed.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Trace time per wall time (60 = an hour a minute); None = as fast as
    /// the gateway answers.
    pub speed: Option<f64>,
    /// Epoch milliseconds of the trace's midnight.
    pub day_start_ms: u64,
    /// The replay's ledger (replaced if it exists).
    pub ledger_path: PathBuf,
    /// Shown beside the progress bar.
    pub label: String,
    pub progress: bool,
}

/// How one trace request was served, in the scorer's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Served {
    Model,
    Cache,
    Blocked,
    Error,
}

/// The outcome of one trace request.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: String,
    pub feature: String,
    pub served: Served,
    /// The model that produced the answer (for a cache hit: the origin's model).
    pub model: Option<String>,
    /// For a cache hit: the trace id of the request whose answer was served.
    pub origin: Option<String>,
    pub calls: Vec<CallRecord>,
    pub prompt_chars_in: u64,
    pub prompt_chars_sent: u64,
    pub status: u16,
    pub error_code: Option<String>,
}

impl RunRecord {
    pub fn cost_usd(&self) -> f64 {
        self.calls.iter().filter_map(|c| c.cost_usd).sum()
    }

    /// The line `score.py` reads.
    pub fn to_json(&self) -> Value {
        let mut o = serde_json::Map::new();
        o.insert("id".into(), self.id.clone().into());
        o.insert(
            "served".into(),
            serde_json::to_value(self.served).unwrap_or(Value::Null),
        );
        if self.served == Served::Model
            && let Some(m) = &self.model
        {
            o.insert("model".into(), m.clone().into());
        }
        if let Some(origin) = &self.origin {
            o.insert("origin".into(), origin.clone().into());
        }
        let calls = self
            .calls
            .iter()
            .map(|c| {
                serde_json::json!({
                    "model": c.model,
                    "prompt_tokens": c.prompt_tokens,
                    "cached_prompt_tokens": c.cached_tokens,
                    "completion_tokens": c.completion_tokens,
                })
            })
            .collect();
        o.insert("calls".into(), Value::Array(calls));
        o.insert("prompt_chars_in".into(), self.prompt_chars_in.into());
        if self.served == Served::Model {
            o.insert("prompt_chars_sent".into(), self.prompt_chars_sent.into());
        }
        Value::Object(o)
    }
}

/// A finished replay.
pub struct ReplayRun {
    pub records: Vec<RunRecord>,
    pub wall: Duration,
}

impl ReplayRun {
    /// Writes the run in the scorer's format, in trace order.
    pub fn write_jsonl(&self, path: &Path) -> Result<(), ReplayError> {
        let io = |source| ReplayError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut text = String::new();
        for r in &self.records {
            text.push_str(&r.to_json().to_string());
            text.push('\n');
        }
        std::fs::write(path, text).map_err(io)
    }
}

/// The config a replay runs: the policy set as given, every provider
/// replaced by the simulator answering at once, the ledger at the replay's
/// own path.
pub fn replay_config(mut config: Config, ledger_path: &Path) -> Config {
    for p in config.providers.values_mut() {
        let prompt_cache_ttl_ms = match p {
            ProviderConfig::Sim(s) => s.prompt_cache_ttl_ms,
            ProviderConfig::Openai(o) => o.sim.prompt_cache_ttl_ms,
            ProviderConfig::Anthropic(a) => a.sim.prompt_cache_ttl_ms,
        };
        *p = ProviderConfig::Sim(SimConfig {
            latency_ms: 0,
            ms_per_token: 0,
            prompt_cache_ttl_ms,
            ..SimConfig::default()
        });
    }
    config.ledger.enabled = true;
    config.ledger.path = ledger_path.to_path_buf();
    config
}

/// Replays `trace` through a gateway running `config`.
pub async fn run(
    config: Config,
    trace: &[TraceRequest],
    opts: &ReplayOptions,
) -> Result<ReplayRun, ReplayError> {
    remove_ledger(&opts.ledger_path)?;
    let config = replay_config(config, &opts.ledger_path);
    let t0 = trace.first().map_or(0, |r| r.t_ms);
    let clock = Arc::new(ManualClock::new(opts.day_start_ms + t0));
    let gw = Gateway::new(config, clock.clone()).await?;
    let listener = server::bind("127.0.0.1:0")
        .await
        .map_err(|e| ReplayError::Client(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ReplayError::Client(e.to_string()))?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(server::serve(
        listener,
        server::gateway_handler(gw.clone()),
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
        Duration::from_secs(30),
    ));

    let client = crate::providers::http_client()
        .no_proxy()
        .pool_max_idle_per_host(opts.concurrency.max(1))
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| ReplayError::Client(e.to_string()))?;
    let url = format!("http://{addr}/v1/chat/completions");
    let bar = progress_bar(trace.len(), &opts.label, opts.progress);
    let permits = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let mut steps: HashMap<&str, u32> = HashMap::new();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(trace.len());
    for (i, r) in trace.iter().enumerate() {
        if let Some(speed) = opts.speed.filter(|s| *s > 0.0) {
            let due = Duration::from_secs_f64((r.t_ms - t0) as f64 / 1000.0 / speed);
            tokio::time::sleep_until((started + due).into()).await;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        clock.advance_to(opts.day_start_ms + r.t_ms);
        let step = if r.task.is_empty() {
            0
        } else {
            let s = steps.entry(r.task.as_str()).or_insert(0);
            *s += 1;
            *s
        };
        let request = client
            .post(&url)
            .headers(headers(r, step))
            .body(serde_json::to_vec(&r.body).unwrap_or_default());
        let bar = bar.clone();
        tasks.push(tokio::spawn(async move {
            let sent = send(request).await;
            drop(permit);
            bar.inc(1);
            (i, sent)
        }));
    }
    let mut sent: Vec<Sent> = vec![Sent::default(); trace.len()];
    for t in tasks {
        if let Ok((i, s)) = t.await {
            sent[i] = s;
        }
    }
    let wall = started.elapsed();
    bar.finish_and_clear();
    let _ = stop_tx.send(true);
    let _ = server.await;
    let ledger = gw
        .ledger
        .as_ref()
        .ok_or_else(|| ReplayError::Ledger("the replay needs the ledger".into()))?;
    ledger.flush();
    let rows = read_rows(ledger.path())?;
    let records = assemble(trace, &sent, &rows);
    Ok(ReplayRun { records, wall })
}

fn progress_bar(len: usize, label: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:32}] {pos}/{len} requests, {per_sec}, {elapsed} elapsed, eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_string());
    bar
}

fn headers(r: &TraceRequest, step: u32) -> reqwest::header::HeaderMap {
    use crate::headers as th;
    use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let mut put = |name: HeaderName, value: &str| {
        if !value.is_empty()
            && let Ok(v) = HeaderValue::from_str(value)
        {
            h.insert(name, v);
        }
    };
    put(th::TENANT, &r.tenant);
    put(th::USER, &r.user);
    put(th::FEATURE, &r.feature);
    put(th::TASK, &r.task);
    if step > 0 {
        put(th::STEP, &step.to_string());
    }
    if let Some(n) = r.output_tokens {
        put(th::SIM_OUTPUT_TOKENS, &n.to_string());
    }
    h
}

/// What the client saw.
#[derive(Debug, Clone, Default)]
struct Sent {
    /// The gateway's id for the request (`x-tollgate-request-id`).
    gateway_id: Option<String>,
    status: u16,
    error: Option<String>,
}

async fn send(request: reqwest::RequestBuilder) -> Sent {
    match request.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let gateway_id = resp
                .headers()
                .get(crate::headers::REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.bytes().await.unwrap_or_default();
            let error = (status != 200).then(|| crate::providers::error_message(&body));
            Sent {
                gateway_id,
                status,
                error,
            }
        }
        Err(e) => Sent {
            gateway_id: None,
            status: 0,
            error: Some(e.to_string()),
        },
    }
}

/// What the ledger recorded for one request.
#[derive(Debug, Default)]
struct LedgerRow {
    model_served: Option<String>,
    cache: String,
    cache_origin: Option<String>,
    calls: Vec<CallRecord>,
    chars_before: u64,
    chars_after: u64,
    error_code: Option<String>,
}

fn read_rows(path: &Path) -> Result<HashMap<String, LedgerRow>, ReplayError> {
    let err = |e: rusqlite::Error| ReplayError::Ledger(format!("{}: {e}", path.display()));
    let conn = crate::ledger::open_db(path).map_err(|e| ReplayError::Ledger(e.to_string()))?;
    let mut st = conn
        .prepare(
            "SELECT request_id, model_served, cache, cache_origin, calls, chars_before,
                    chars_after, error_code FROM requests",
        )
        .map_err(err)?;
    let rows = st
        .query_map([], |r| {
            let calls: String = r.get(4)?;
            Ok((
                r.get::<_, String>(0)?,
                LedgerRow {
                    model_served: r.get(1)?,
                    cache: r.get(2)?,
                    cache_origin: r.get(3)?,
                    calls: serde_json::from_str(&calls).unwrap_or_default(),
                    chars_before: r.get::<_, i64>(5)?.max(0) as u64,
                    chars_after: r.get::<_, i64>(6)?.max(0) as u64,
                    error_code: r.get(7)?,
                },
            ))
        })
        .map_err(err)?;
    rows.collect::<Result<_, _>>().map_err(err)
}

/// Error codes of requests a policy stopped on purpose (not failures of
/// the gateway or the upstream).
const POLICY_CODES: [&str; 5] = [
    "budget_exceeded",
    "rejected_by_policy",
    "task_call_limit",
    "loop_detected",
    "kill_switch",
];

fn assemble(
    trace: &[TraceRequest],
    sent: &[Sent],
    rows: &HashMap<String, LedgerRow>,
) -> Vec<RunRecord> {
    let trace_id: HashMap<&str, &str> = trace
        .iter()
        .zip(sent)
        .filter_map(|(r, s)| Some((s.gateway_id.as_deref()?, r.id.as_str())))
        .collect();
    let empty = LedgerRow::default();
    trace
        .iter()
        .zip(sent)
        .map(|(r, s)| {
            let row = s
                .gateway_id
                .as_deref()
                .and_then(|g| rows.get(g))
                .unwrap_or(&empty);
            let mut served = match s.status {
                200 if row.cache == "hit" => Served::Cache,
                200 if row.model_served.as_deref() == Some("fixed-response") => Served::Blocked,
                200 if row.model_served.is_some() => Served::Model,
                _ if row
                    .error_code
                    .as_deref()
                    .is_some_and(|c| POLICY_CODES.contains(&c)) =>
                {
                    Served::Blocked
                }
                _ => Served::Error,
            };
            let origin = if served == Served::Cache {
                let o = row
                    .cache_origin
                    .as_deref()
                    .and_then(|g| trace_id.get(g))
                    .map(|t| t.to_string());
                if o.is_none() {
                    tracing::warn!(id = %r.id, "cache hit whose origin is not in the trace");
                    served = Served::Error;
                }
                o
            } else {
                None
            };
            RunRecord {
                id: r.id.clone(),
                feature: r.feature.clone(),
                served,
                model: row.model_served.clone(),
                origin,
                calls: row.calls.clone(),
                prompt_chars_in: row.chars_before,
                prompt_chars_sent: row.chars_after,
                status: s.status,
                error_code: row.error_code.clone().or_else(|| s.error.clone()),
            }
        })
        .collect()
}

/// Removes a previous replay's ledger and its WAL files.
fn remove_ledger(path: &Path) -> Result<(), ReplayError> {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ReplayError::Io {
                    path: PathBuf::from(p).display().to_string(),
                    source,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str) -> TraceRequest {
        TraceRequest {
            id: id.into(),
            t_ms: 0,
            tenant: "t".into(),
            user: "u".into(),
            feature: "f".into(),
            task: String::new(),
            body: serde_json::Map::new(),
            output_tokens: None,
        }
    }

    fn sent(gw: &str, status: u16) -> Sent {
        Sent {
            gateway_id: Some(gw.into()),
            status,
            error: None,
        }
    }

    fn row(
        model: Option<&str>,
        cache: &str,
        origin: Option<&str>,
        code: Option<&str>,
    ) -> LedgerRow {
        LedgerRow {
            model_served: model.map(Into::into),
            cache: cache.into(),
            cache_origin: origin.map(Into::into),
            error_code: code.map(Into::into),
            ..LedgerRow::default()
        }
    }

    #[test]
    fn outcomes_map_to_the_scorers_terms() {
        let trace: Vec<TraceRequest> = ["a", "b", "c", "d", "e", "f", "g"].map(req).into();
        let sent = vec![
            sent("g1", 200),
            sent("g2", 200),
            sent("g3", 200),
            sent("g4", 429),
            sent("g5", 502),
            Sent {
                gateway_id: None,
                status: 0,
                error: Some("connection refused".into()),
            },
            sent("g7", 200),
        ];
        let rows: HashMap<String, LedgerRow> = [
            ("g1", row(Some("gpt-4o-mini"), "miss", None, None)),
            ("g2", row(Some("gpt-4o-mini"), "hit", Some("g1"), None)),
            ("g3", row(Some("fixed-response"), "bypass", None, None)),
            ("g4", row(None, "none", None, Some("budget_exceeded"))),
            ("g5", row(None, "miss", None, Some("upstream_error"))),
            (
                "g7",
                row(Some("gpt-4o"), "hit", Some("req_from_yesterday"), None),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let r = assemble(&trace, &sent, &rows);
        let served: Vec<Served> = r.iter().map(|x| x.served).collect();
        assert_eq!(
            served,
            [
                Served::Model,
                Served::Cache,
                Served::Blocked,
                Served::Blocked,
                Served::Error,
                Served::Error,
                Served::Error, // a hit whose origin is not in the trace cannot be scored
            ]
        );
        assert_eq!(r[1].origin.as_deref(), Some("a"));
        assert_eq!(r[5].error_code.as_deref(), Some("connection refused"));
        let line = r[1].to_json();
        assert_eq!(line["origin"], "a");
        assert!(
            line.get("model").is_none(),
            "only served=model names a model"
        );
        assert_eq!(r[0].to_json()["prompt_chars_sent"], 0);
    }
}
