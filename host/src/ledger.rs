//! The cost ledger: one row per request, in SQLite (WAL) by default.
//!
//! Requests never wait on the disk: they hand their row to a channel and a
//! single writer thread batches rows into one transaction every flush
//! interval (or sooner when a batch fills up). On shutdown the writer drains
//! the channel and commits before the process exits, so every request that
//! was answered has its row. After a crash (SIGKILL) the WAL keeps the
//! database intact; at most the last flush interval is lost.
//!
//! The backlog is bounded without dropping rows: when more than
//! `max_pending` rows wait for the writer (the disk or the writer's share of
//! the CPU cannot keep up with the request rate), new requests wait for room
//! before they start ([`Ledger::room`]). Throughput then settles at what the
//! ledger can record instead of memory growing until the process is killed,
//! which would lose the whole backlog.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use serde::Serialize;
use tokio::sync::Notify;

/// Bumped when the schema changes; older files are migrated on open.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    request_id        TEXT PRIMARY KEY,
    request_hash      TEXT NOT NULL,
    ts_ms             INTEGER NOT NULL,
    tenant            TEXT NOT NULL,
    user              TEXT NOT NULL,
    feature           TEXT NOT NULL,
    task              TEXT NOT NULL,
    step              INTEGER NOT NULL,
    model_asked       TEXT NOT NULL,
    model_served      TEXT,
    provider          TEXT,
    decisions         TEXT NOT NULL,
    cache             TEXT NOT NULL,
    stream            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    tokens_saved      INTEGER NOT NULL,
    chars_before      INTEGER NOT NULL,
    chars_after       INTEGER NOT NULL,
    latency_ms        REAL NOT NULL,
    upstream_ms       REAL,
    status            INTEGER NOT NULL,
    error_code        TEXT,
    cost_usd          REAL,
    estimated         INTEGER NOT NULL,
    unpriced          INTEGER NOT NULL,
    cache_origin      TEXT,
    calls             TEXT NOT NULL DEFAULT '[]',
    request_body      TEXT,
    shadow            TEXT NOT NULL DEFAULT '[]',
    prompt_version    TEXT,
    batch_discount    REAL,
    embed_ms          REAL,
    cache_similarity  REAL,
    cache_saved_usd   REAL,
    cache_stored_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts_ms);
CREATE INDEX IF NOT EXISTS requests_tenant_ts ON requests (tenant, ts_ms);
CREATE INDEX IF NOT EXISTS requests_task ON requests (tenant, task);
CREATE TABLE IF NOT EXISTS feedback (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms       INTEGER NOT NULL,
    tenant      TEXT NOT NULL,
    request_id  TEXT,
    task_id     TEXT,
    success     INTEGER NOT NULL,
    score       REAL
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id);
CREATE TABLE IF NOT EXISTS plugin_changes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms       INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    slot        TEXT NOT NULL,
    plugin      TEXT,
    sha256      TEXT,
    detail      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_task ON feedback (tenant, task_id);
";

/// Columns added to `requests` since version 1, with their definitions.
const ADDED_COLUMNS: [(&str, &str); 10] = [
    ("cache_origin", "TEXT"),
    ("calls", "TEXT NOT NULL DEFAULT '[]'"),
    ("request_body", "TEXT"),
    ("shadow", "TEXT NOT NULL DEFAULT '[]'"),
    ("prompt_version", "TEXT"),
    ("batch_discount", "REAL"),
    ("embed_ms", "REAL"),
    ("cache_similarity", "REAL"),
    ("cache_saved_usd", "REAL"),
    ("cache_stored_bytes", "INTEGER"),
];

/// One plugin's part in a request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decision {
    pub kind: &'static str,
    /// Shared with the loaded plugin: a request records up to five
    /// decisions, and copying both strings for each was a tenth of its
    /// allocations.
    pub plugin: Arc<str>,
    /// sha256 of the plugin's component, the version that decided.
    pub digest: Arc<str>,
    pub decision: String,
}

/// One upstream call made for a request: the one that answered, and every
/// failed attempt before it (fallbacks), each with what it cost.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Default)]
pub struct CallRecord {
    pub model: String,
    pub provider: String,
    /// HTTP status of the upstream's answer; 0 when none came (timeout, connection).
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub cache_write_tokens: u32,
    pub completion_tokens: u32,
    /// None when the model has no price.
    pub cost_usd: Option<f64>,
}

/// What a shadow plugin decided for a request, beside the active decision.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Default)]
pub struct ShadowRecord {
    pub slot: String,
    pub plugin: String,
    pub digest: String,
    pub decision: String,
    /// The same decision as the active plugin's.
    pub agrees: bool,
    /// Router shadows: the model it would have sent the request to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Router shadows: the answering call's usage priced at that model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// Everything the ledger keeps about one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub request_id: String,
    /// 24 hex characters of BLAKE3 over the canonical request body.
    pub request_hash: String,
    pub ts_ms: u64,
    pub tenant: String,
    pub user: String,
    pub feature: String,
    pub task: String,
    pub step: u32,
    pub model_asked: String,
    pub model_served: Option<String>,
    pub provider: Option<String>,
    pub decisions: Vec<Decision>,
    /// `hit`, `miss`, `bypass`, or `none` when the request ended before the cache step.
    pub cache: &'static str,
    pub stream: bool,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub cache_write_tokens: u32,
    pub completion_tokens: u32,
    pub tokens_saved: u32,
    pub chars_before: u64,
    pub chars_after: u64,
    pub latency_ms: f64,
    pub upstream_ms: Option<f64>,
    pub status: u16,
    pub error_code: Option<String>,
    /// None when the model has no price (never recorded as zero).
    pub cost_usd: Option<f64>,
    /// Usage counted by the gateway because the upstream reported none.
    pub estimated: bool,
    pub unpriced: bool,
    /// For a cache hit: the request whose upstream answer was served.
    pub cache_origin: Option<String>,
    /// Every upstream call, in order.
    pub calls: Vec<CallRecord>,
    /// The request body as received, when `ledger.record_bodies` is on.
    pub request_body: Option<String>,
    /// Decisions of shadow plugins.
    pub shadow: Vec<ShadowRecord>,
    /// `x-tollgate-prompt-version`, or a hash of the system messages (what
    /// a kill switch by prompt version matches).
    pub prompt_version: Option<String>,
    /// Fraction off the price when the call went through a batch API.
    pub batch_discount: Option<f64>,
    /// Time spent embedding the question for a semantic cache lookup.
    pub embed_ms: Option<f64>,
    /// For a semantic cache hit: how close the stored question was (cosine).
    pub cache_similarity: Option<f64>,
    /// For a cache hit: what the origin's upstream call cost, i.e. what
    /// serving it from the cache saved.
    pub cache_saved_usd: Option<f64>,
    /// For an answer admitted to the cache: the bytes stored.
    pub cache_stored_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("ledger {path}: cannot create its directory: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("ledger writer thread: {0}")]
    Thread(String),
}

/// An application's verdict on a request or a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub ts_ms: u64,
    pub tenant: String,
    pub request_id: Option<String>,
    pub task_id: Option<String>,
    pub success: bool,
    pub score: Option<f64>,
}

/// A change to the active plugins, made through the admin API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PluginChange {
    pub ts_ms: u64,
    /// Who made it (the admin call's `x-tollgate-actor`, or "admin").
    pub actor: String,
    /// load, activate, rollback, remove, refuse.
    pub action: String,
    pub slot: String,
    pub plugin: Option<String>,
    pub sha256: Option<String>,
    pub detail: String,
}

/// SQL bounds on `ts_ms` for an optional `[since, until)` range in epoch ms.
pub fn ts_range(since_ms: Option<u64>, until_ms: Option<u64>) -> (i64, i64) {
    let clamp = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);
    (since_ms.map_or(0, clamp), until_ms.map_or(i64::MAX, clamp))
}

/// The latest plugin changes, newest first.
pub fn plugin_changes(conn: &Connection, limit: u32) -> rusqlite::Result<Vec<PluginChange>> {
    let mut st = conn.prepare(
        "SELECT ts_ms, actor, action, slot, plugin, sha256, detail FROM plugin_changes
         ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = st.query_map([limit], |r| {
        Ok(PluginChange {
            ts_ms: r.get::<_, i64>(0)?.max(0) as u64,
            actor: r.get(1)?,
            action: r.get(2)?,
            slot: r.get(3)?,
            plugin: r.get(4)?,
            sha256: r.get(5)?,
            detail: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// (action, detail) of every change recorded for `slot`, oldest first.
pub fn changes_of(conn: &Connection, slot: &str) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st =
        conn.prepare("SELECT action, detail FROM plugin_changes WHERE slot = ?1 ORDER BY id")?;
    let rows = st.query_map([slot], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

enum Msg {
    Row(Box<Row>),
    Feedback(Feedback),
    Change(PluginChange),
    /// Commit everything received so far, then answer.
    Flush(mpsc::Sender<()>),
}

/// Counters of the writer, for `/metrics`.
#[derive(Default, Debug)]
pub struct LedgerStats {
    pub queued: AtomicU64,
    pub written: AtomicU64,
    pub failed: AtomicU64,
    /// Requests that waited for room in a full backlog before starting.
    pub throttled: AtomicU64,
}

impl LedgerStats {
    /// Rows queued and not yet committed (or failed).
    pub fn pending(&self) -> u64 {
        let done = self.written.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        self.queued.load(Ordering::Relaxed).saturating_sub(done)
    }
}

/// Handle to the ledger; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Msg>,
    stats: Arc<LedgerStats>,
    /// The writer thread, unparked for flushes and full batches.
    writer: std::thread::Thread,
    /// Signalled by the writer after each commit, for requests waiting for room.
    drained: Arc<Notify>,
    wake_rows: u64,
    max_pending: u64,
    path: PathBuf,
}

pub struct LedgerOptions {
    pub flush_interval: Duration,
    /// Rows per transaction at most (a backlog is written in several).
    pub batch_rows: usize,
    /// Rows waiting for the writer beyond which new requests wait for room.
    pub max_pending: usize,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(100),
            batch_rows: 1000,
            max_pending: 20_000,
        }
    }
}

pub(crate) fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
    move |source| LedgerError::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

/// Opens (creating or migrating) a ledger database.
pub fn open_db(path: &Path) -> Result<Connection, LedgerError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|source| LedgerError::Dir {
            path: path.display().to_string(),
            source,
        })?;
    }
    let err = sqlite_err(path);
    let conn = Connection::open(path).map_err(&err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(&err)?;
    // NORMAL in WAL mode survives a crash of the process (not of the OS).
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(&err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(&err)?;
    conn.execute_batch(SCHEMA).map_err(&err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(&err)?;
    // Columns added after version 1: every file gets the ones it lacks,
    // whatever its recorded version (a file is never left half migrated).
    let has = |col: &str| -> Result<bool, LedgerError> {
        conn.prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = ?1")
            .and_then(|mut st| st.exists([col]))
            .map_err(&err)
    };
    for (col, ddl) in ADDED_COLUMNS {
        if !has(col)? {
            conn.execute_batch(&format!("ALTER TABLE requests ADD COLUMN {col} {ddl}"))
                .map_err(&err)?;
        }
    }
    if version < SCHEMA_VERSION {
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(&err)?;
    }
    Ok(conn)
}

fn insert_change(conn: &Connection, c: &PluginChange) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO plugin_changes (ts_ms, actor, action, slot, plugin, sha256, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            c.ts_ms as i64,
            c.actor,
            c.action,
            c.slot,
            c.plugin,
            c.sha256,
            c.detail
        ],
    )?;
    Ok(())
}

/// The `decisions` column: the JSON `serde_json` writes for the list, byte
/// for byte (tested), written without its serializer. Through serde every
/// key and value went through the string escaper, ~40 strings a row and a
/// fifth of the writer's work; here the keys are literals and a value is
/// escaped only when it holds a character JSON escapes.
fn decisions_json(decisions: &[Decision]) -> String {
    let mut out = String::with_capacity(2 + decisions.len() * 160);
    out.push('[');
    for (i, d) in decisions.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"kind\":");
        push_json_str(&mut out, d.kind);
        out.push_str(",\"plugin\":");
        push_json_str(&mut out, &d.plugin);
        out.push_str(",\"digest\":");
        push_json_str(&mut out, &d.digest);
        out.push_str(",\"decision\":");
        push_json_str(&mut out, &d.decision);
        out.push('}');
    }
    out.push(']');
    out
}

/// `s` as a JSON string. serde_json escapes only quotes, backslashes and
/// control characters (not `/`, not non-ASCII), so any other string is
/// written as it is between quotes.
fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        // Serialising a string cannot fail.
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

fn insert_batch(
    conn: &mut Connection,
    rows: &[Box<Row>],
    feedback: &[Feedback],
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO feedback (ts_ms, tenant, request_id, task_id, success, score)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for f in feedback {
            st.execute(params![
                f.ts_ms as i64,
                f.tenant,
                f.request_id,
                f.task_id,
                f.success,
                f.score
            ])?;
        }
    }
    {
        let mut st = tx.prepare_cached(
            "INSERT OR REPLACE INTO requests (request_id, request_hash, ts_ms, tenant, user, feature, task, step,
             model_asked, model_served, provider, decisions, cache, stream, prompt_tokens, cached_tokens,
             cache_write_tokens, completion_tokens, tokens_saved, chars_before, chars_after, latency_ms,
             upstream_ms, status, error_code, cost_usd, estimated, unpriced, cache_origin, calls, request_body, shadow,
             prompt_version, batch_discount, embed_ms, cache_similarity, cache_saved_usd, cache_stored_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
                     ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33, ?34, ?35, ?36,
                     ?37, ?38)",
        )?;
        for r in rows {
            let decisions = decisions_json(&r.decisions);
            let calls = serde_json::to_string(&r.calls).unwrap_or_else(|_| "[]".into());
            let shadow = serde_json::to_string(&r.shadow).unwrap_or_else(|_| "[]".into());
            st.execute(params![
                r.request_id,
                r.request_hash,
                r.ts_ms as i64,
                r.tenant,
                r.user,
                r.feature,
                r.task,
                r.step,
                r.model_asked,
                r.model_served,
                r.provider,
                decisions,
                r.cache,
                r.stream,
                r.prompt_tokens,
                r.cached_tokens,
                r.cache_write_tokens,
                r.completion_tokens,
                r.tokens_saved,
                r.chars_before as i64,
                r.chars_after as i64,
                r.latency_ms,
                r.upstream_ms,
                r.status,
                r.error_code,
                r.cost_usd,
                r.estimated,
                r.unpriced,
                r.cache_origin,
                calls,
                r.request_body,
                shadow,
                r.prompt_version,
                r.batch_discount,
                r.embed_ms,
                r.cache_similarity,
                r.cache_saved_usd,
                r.cache_stored_bytes.map(|b| b as i64),
            ])?;
        }
    }
    tx.commit()
}

impl Ledger {
    /// Opens the database and starts the writer thread.
    pub fn open(path: &Path, opts: LedgerOptions) -> Result<Self, LedgerError> {
        let mut conn = open_db(path)?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let stats = Arc::new(LedgerStats::default());
        let wstats = stats.clone();
        let drained = Arc::new(Notify::new());
        let wdrained = drained.clone();
        let ledger_path = path.display().to_string();
        // A full batch, or a full backlog with requests waiting for room,
        // is written without waiting for the flush interval.
        let wake_rows = opts.batch_rows.min(opts.max_pending).max(1);
        let writer = std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn(move || {
                let mut batch: Vec<Box<Row>> = Vec::with_capacity(opts.batch_rows);
                let mut feedback: Vec<Feedback> = Vec::new();
                let mut waiting: Vec<mpsc::Sender<()>> = Vec::new();
                let mut deadline = Instant::now() + opts.flush_interval;
                loop {
                    // Sleep until the next flush unless a flush request
                    // unparks us: a row alone never wakes this thread, so
                    // requests pay no futex wake or context switch for it.
                    std::thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
                    let mut closed = false;
                    loop {
                        match rx.try_recv() {
                            Ok(Msg::Row(r)) => batch.push(r),
                            Ok(Msg::Feedback(f)) => feedback.push(f),
                            Ok(Msg::Change(c)) => {
                                // Rare and important: written at once, alone.
                                if let Err(e) = insert_change(&conn, &c) {
                                    tracing::error!(ledger = %ledger_path, "plugin change not recorded: {e}");
                                }
                            }
                            Ok(Msg::Flush(ack)) => waiting.push(ack),
                            Err(mpsc::TryRecvError::Empty) => break,
                            Err(mpsc::TryRecvError::Disconnected) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    let due = Instant::now() >= deadline;
                    let pending = batch.len() + feedback.len();
                    if pending > 0
                        && (due || closed || !waiting.is_empty() || pending >= wake_rows)
                    {
                        let mut fb: &[Feedback] = &feedback;
                        for chunk in batch.chunks(opts.batch_rows.max(1)) {
                            let n = chunk.len() as u64;
                            match insert_batch(&mut conn, chunk, fb) {
                                Ok(()) => {
                                    wstats.written.fetch_add(n, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    wstats.failed.fetch_add(n, Ordering::Relaxed);
                                    tracing::error!(ledger = %ledger_path, rows = n, "ledger write failed: {e}");
                                }
                            }
                            fb = &[];
                            wdrained.notify_waiters();
                        }
                        if batch.is_empty()
                            && !fb.is_empty()
                            && let Err(e) = insert_batch(&mut conn, &[], fb)
                        {
                            tracing::error!(ledger = %ledger_path, "ledger feedback write failed: {e}");
                        }
                        batch.clear();
                        feedback.clear();
                    }
                    for ack in waiting.drain(..) {
                        let _ = ack.send(());
                    }
                    if due {
                        deadline = Instant::now() + opts.flush_interval;
                    }
                    if closed {
                        break;
                    }
                }
            })
            .map_err(|e| LedgerError::Thread(e.to_string()))?;
        Ok(Self {
            tx,
            stats,
            writer: writer.thread().clone(),
            drained,
            wake_rows: wake_rows as u64,
            max_pending: opts.max_pending.max(1) as u64,
            path: path.to_path_buf(),
        })
    }

    /// Returns at once while the backlog has room; otherwise waits (without
    /// holding a thread) until the writer has committed enough rows.
    pub async fn room(&self) {
        if self.stats.pending() < self.max_pending {
            return;
        }
        self.stats.throttled.fetch_add(1, Ordering::Relaxed);
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            // Registered before the check, so a commit in between is not missed.
            drained.as_mut().enable();
            if self.stats.pending() < self.max_pending {
                return;
            }
            self.writer.unpark();
            drained.await;
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }

    /// Queues a row; never blocks on the disk.
    pub fn record(&self, row: Row) {
        let queued = self.stats.queued.fetch_add(1, Ordering::Relaxed) + 1;
        if self.tx.send(Msg::Row(Box::new(row))).is_err() {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("ledger writer is gone; a row was not recorded");
            return;
        }
        // A full batch is worth writing before the flush interval ends: one
        // wake per `batch_rows` rows keeps the backlog short under load.
        if queued.is_multiple_of(self.wake_rows) {
            self.writer.unpark();
        }
    }

    /// Queues an application's feedback; never blocks on the disk.
    pub fn record_feedback(&self, f: Feedback) {
        if self.tx.send(Msg::Feedback(f)).is_err() {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("ledger writer is gone; feedback was not recorded");
        }
    }

    /// Records a plugin change and waits until it is on disk.
    pub fn record_change(&self, c: PluginChange) {
        if self.tx.send(Msg::Change(c)).is_err() {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("ledger writer is gone; a plugin change was not recorded");
            return;
        }
        self.flush();
    }

    /// Blocks until every row queued so far is committed.
    pub fn flush(&self) {
        let (ack, done) = mpsc::channel();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            self.writer.unpark();
            let _ = done.recv();
        }
    }
}

/// 24 hex characters of BLAKE3 over a canonical JSON body.
pub fn request_hash(canonical_json: &str) -> String {
    short_hex(blake3::hash(canonical_json.as_bytes()))
}

/// [`request_hash`] of `body`'s compact JSON, when the text itself is not
/// kept. (Serialised into one buffer and hashed once: writing it into the
/// hasher token by token costs more than the buffer.)
pub fn request_hash_of(body: &serde_json::Map<String, serde_json::Value>) -> String {
    short_hex(blake3::hash(&serde_json::to_vec(body).unwrap_or_default()))
}

fn short_hex(hash: blake3::Hash) -> String {
    let mut h = hash.to_hex().to_string();
    h.truncate(24);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_hashes_as_its_json_text_does() {
        let body =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "é \"q\""}]});
        let map = body.as_object().unwrap();
        assert_eq!(request_hash_of(map), request_hash(&body.to_string()));
    }

    fn row(id: &str) -> Row {
        Row {
            request_id: id.into(),
            request_hash: request_hash("{}"),
            ts_ms: 1,
            tenant: "acme".into(),
            user: "u".into(),
            feature: "f".into(),
            model_asked: "gpt-4o".into(),
            model_served: Some("gpt-4o-mini".into()),
            decisions: vec![Decision {
                kind: "router",
                plugin: "r".into(),
                digest: "d".into(),
                decision: "use gpt-4o-mini".into(),
            }],
            cache: "miss",
            status: 200,
            cost_usd: Some(0.25),
            ..Row::default()
        }
    }

    #[test]
    fn the_decisions_column_is_what_serde_json_writes() {
        let d = |kind, plugin: &str, digest: &str, decision: &str| Decision {
            kind,
            plugin: plugin.into(),
            digest: digest.into(),
            decision: decision.into(),
        };
        let cases = vec![
            vec![],
            vec![d(
                "router",
                "rules_router",
                &"ab12".repeat(16),
                "use gpt-4o-mini",
            )],
            vec![
                d(
                    "budget-rule",
                    "daily",
                    "00ff",
                    "Verdict::Deny(\"over \\ budget\")",
                ),
                d(
                    "compressor",
                    "näive/plugin",
                    "",
                    "rewritten: 3 whitespace chars\n\tand\u{1} more",
                ),
                d(
                    "cache-policy",
                    "p\"q",
                    "d",
                    "lookup ’tenant’ — 600 s \u{7f}",
                ),
            ],
        ];
        for ds in cases {
            assert_eq!(decisions_json(&ds), serde_json::to_string(&ds).unwrap());
        }
    }

    #[test]
    fn rows_are_batched_flushed_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ledger.sqlite");
        let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        for i in 0..250 {
            l.record(row(&format!("req_{i}")));
        }
        let mut unpriced = row("req_unpriced");
        unpriced.cost_usd = None;
        unpriced.unpriced = true;
        l.record(unpriced);
        l.flush();
        let conn = open_db(&path).unwrap();
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 251);
        let (cost, flag): (Option<f64>, bool) = conn
            .query_row(
                "SELECT cost_usd, unpriced FROM requests WHERE request_id = 'req_unpriced'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((cost, flag), (None, true));
        let d: String = conn
            .query_row(
                "SELECT decisions FROM requests WHERE request_id = 'req_0'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(d.contains("\"kind\":\"router\""), "{d}");
        assert_eq!(l.stats().written.load(Ordering::Relaxed), 251);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn version_1_files_gain_the_new_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            let v1 = SCHEMA
                .replace(",\n    cache_origin      TEXT", "")
                .replace(",\n    calls             TEXT NOT NULL DEFAULT '[]'", "")
                .replace(",\n    request_body      TEXT", "")
                .replace(",\n    shadow            TEXT NOT NULL DEFAULT '[]'", "")
                .replace(",\n    prompt_version    TEXT", "")
                .replace(",\n    batch_discount    REAL", "")
                .replace(",\n    embed_ms          REAL", "")
                .replace(",\n    cache_similarity  REAL", "")
                .replace(",\n    cache_saved_usd   REAL", "")
                .replace(",\n    cache_stored_bytes INTEGER", "");
            assert!(!v1.contains("calls"));
            c.execute_batch(&v1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute_batch(
                "INSERT INTO requests VALUES ('old', 'h', 1, 't', 'u', 'f', '', 0, 'm', 'm', 'p', '[]',
                 'none', 0, 1, 0, 0, 1, 0, 1, 1, 1.0, NULL, 200, NULL, 0.5, 0, 0)",
            )
            .unwrap();
        }
        let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        let mut r = row("new");
        r.cache_origin = Some("old".into());
        r.calls = vec![CallRecord {
            model: "m".into(),
            status: 500,
            ..CallRecord::default()
        }];
        l.record(r);
        l.flush();
        let conn = open_db(&path).unwrap();
        let get = |id: &str| -> (Option<String>, String) {
            conn.query_row(
                "SELECT cache_origin, calls FROM requests WHERE request_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
        };
        assert_eq!(get("old"), (None, "[]".to_string()));
        let (origin, calls) = get("new");
        assert_eq!(origin.as_deref(), Some("old"));
        let calls: Vec<CallRecord> = serde_json::from_str(&calls).unwrap();
        assert_eq!(calls[0].status, 500);
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn a_file_marked_current_but_lacking_a_column_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                &SCHEMA.replace(",\n    shadow            TEXT NOT NULL DEFAULT '[]'", ""),
            )
            .unwrap();
            c.pragma_update(None, "user_version", SCHEMA_VERSION)
                .unwrap();
        }
        let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        l.record(row("r"));
        l.flush();
        let n: i64 = open_db(&path)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM requests WHERE shadow = '[]'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn rows_reach_the_disk_within_the_flush_interval_without_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let l = Ledger::open(
            &path,
            LedgerOptions {
                flush_interval: Duration::from_millis(20),
                batch_rows: 1000,
                max_pending: 20_000,
            },
        )
        .unwrap();
        l.record(row("a"));
        let t = Instant::now();
        loop {
            let conn = open_db(&path).unwrap();
            let n: i64 = conn
                .query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
                .unwrap();
            if n == 1 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[tokio::test]
    async fn a_full_backlog_makes_new_requests_wait_until_the_writer_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let l = Ledger::open(
            &path,
            LedgerOptions {
                flush_interval: Duration::from_secs(60),
                batch_rows: 1000,
                max_pending: 5,
            },
        )
        .unwrap();
        // Another process holds the write lock: the writer cannot commit.
        let blocker = open_db(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        for i in 0..4 {
            l.record(row(&format!("r{i}")));
        }
        // Room while under the bound.
        tokio::time::timeout(Duration::from_secs(1), l.room())
            .await
            .expect("room below the bound");
        l.record(row("r4"));
        let waiting = tokio::time::timeout(Duration::from_millis(300), l.room()).await;
        assert!(waiting.is_err(), "a full backlog must hold new requests");
        assert_eq!(l.stats().throttled.load(Ordering::Relaxed), 1);
        blocker.execute_batch("ROLLBACK").unwrap();
        tokio::time::timeout(Duration::from_secs(10), l.room())
            .await
            .expect("room once the writer commits");
        // Nothing was dropped, and no flush interval had to pass.
        let n: i64 = open_db(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 5);
        assert_eq!(l.stats().pending(), 0);
    }
}
