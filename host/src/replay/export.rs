//! Recorded traffic as a replayable trace: the ledger rows that kept their
//! request body (`ledger.record_bodies = true`), in arrival order.
//!
//! `t_ms` counts from midnight (UTC) of the first exported request's day;
//! the expected output length handed to the simulator is what the real
//! model answered (for a cache hit, what its origin's model answered).

use rusqlite::Connection;
use serde_json::Value;

use super::{ReplayError, TraceRequest};
use crate::clock::DAY_MS;

/// Which rows to export.
#[derive(Debug, Default, Clone)]
pub struct ExportQuery {
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub tenant: Option<String>,
}

/// The exported requests, and how many rows in range had no body.
pub fn from_ledger(
    conn: &Connection,
    q: &ExportQuery,
) -> Result<(Vec<TraceRequest>, usize), ReplayError> {
    let err = |e: rusqlite::Error| ReplayError::Ledger(e.to_string());
    let mut st = conn
        .prepare(
            "SELECT r.request_id, r.ts_ms, r.tenant, r.user, r.feature, r.task, r.request_body,
                    CASE WHEN r.cache = 'hit' THEN o.completion_tokens ELSE r.completion_tokens END,
                    r.status
             FROM requests r LEFT JOIN requests o ON o.request_id = r.cache_origin
             WHERE r.ts_ms >= ?1 AND r.ts_ms < ?2 AND (?3 IS NULL OR r.tenant = ?3)
             ORDER BY r.ts_ms, r.request_id",
        )
        .map_err(err)?;
    let (since, until) = crate::ledger::ts_range(q.since_ms, q.until_ms);
    let rows = st
        .query_map(rusqlite::params![since, until, q.tenant], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<i64>>(7)?,
                r.get::<_, i64>(8)?,
            ))
        })
        .map_err(err)?;
    let mut out = Vec::new();
    let mut without_body = 0usize;
    let mut day_start: Option<u64> = None;
    for row in rows {
        let (id, ts, tenant, user, feature, task, body, completion, status) = row.map_err(err)?;
        let Some(Ok(Value::Object(body))) = body.map(|b| serde_json::from_str::<Value>(&b)) else {
            without_body += 1;
            continue;
        };
        let ts = ts.max(0) as u64;
        let start = *day_start.get_or_insert(ts - ts % DAY_MS);
        out.push(TraceRequest {
            id,
            t_ms: ts - start,
            tenant,
            user,
            feature,
            task,
            body,
            output_tokens: completion
                .filter(|n| status == 200 && *n > 0)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        });
    }
    Ok((out, without_body))
}
