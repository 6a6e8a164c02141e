//! Traces: a day of recorded (or generated) requests, one JSON object per
//! line, in the schema of the workload generator:
//! `{"id", "t_ms", "tenant", "user", "feature", "task", "request", "label"}`.
//!
//! The replay reads one thing from `label`, `expected_output_tokens`, and
//! hands it to the simulator only (as `x-tollgate-sim-output-tokens`), so
//! simulated answers have a realistic length. Nothing else of the label is
//! read, and nothing of it reaches the gateway's decision code.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use serde_json::{Map, Value};

use super::ReplayError;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRequest {
    pub id: String,
    /// Milliseconds since midnight of the simulated day.
    pub t_ms: u64,
    pub tenant: String,
    pub user: String,
    pub feature: String,
    pub task: String,
    /// The chat-completions body, sent as is.
    pub body: Map<String, Value>,
    /// Completion length for the simulator (`label.expected_output_tokens`).
    pub output_tokens: Option<u32>,
}

/// Reads a trace; every line is checked and a bad one is named by its number.
/// Requests are returned in arrival order (stable for equal times).
pub fn read(path: &Path) -> Result<Vec<TraceRequest>, ReplayError> {
    let file = std::fs::File::open(path).map_err(|source| ReplayError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut out = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| ReplayError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| ReplayError::Trace {
            path: path.display().to_string(),
            line: n + 1,
            message,
        };
        let r = parse_line(&line).map_err(bad)?;
        if !ids.insert(r.id.clone()) {
            return Err(bad(format!("id {:?} appears twice", r.id)));
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err(ReplayError::Trace {
            path: path.display().to_string(),
            line: 0,
            message: "the trace has no requests".into(),
        });
    }
    out.sort_by_key(|r| r.t_ms);
    Ok(out)
}

fn parse_line(line: &str) -> Result<TraceRequest, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let o = v.as_object().ok_or("a record must be a JSON object")?;
    let text = |k: &str, required: bool| -> Result<String, String> {
        match o.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) if !required => Ok(String::new()),
            _ => Err(format!("`{k}` must be a string")),
        }
    };
    let body = match o.get("request") {
        Some(Value::Object(b)) => b.clone(),
        _ => return Err("`request` must be a chat-completions body (an object)".into()),
    };
    let output_tokens = match o.get("label").and_then(|l| l.get("expected_output_tokens")) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .map(|x| x.round().min(f64::from(u32::MAX)) as u32)
                .ok_or("`label.expected_output_tokens` must be a non-negative number")?,
        ),
    };
    Ok(TraceRequest {
        id: text("id", true)?,
        t_ms: o
            .get("t_ms")
            .and_then(Value::as_u64)
            .ok_or("`t_ms` must be a non-negative integer (milliseconds since midnight)")?,
        tenant: text("tenant", false)?,
        user: text("user", false)?,
        feature: text("feature", false)?,
        task: text("task", false)?,
        body,
        output_tokens,
    })
}

/// Writes requests as a trace (the export of recorded traffic).
pub fn write(out: &mut impl Write, requests: &[TraceRequest]) -> std::io::Result<()> {
    for r in requests {
        let mut o = Map::new();
        o.insert("id".into(), r.id.clone().into());
        o.insert("t_ms".into(), r.t_ms.into());
        o.insert("tenant".into(), r.tenant.clone().into());
        o.insert("user".into(), r.user.clone().into());
        o.insert("feature".into(), r.feature.clone().into());
        o.insert("task".into(), r.task.clone().into());
        o.insert("request".into(), Value::Object(r.body.clone()));
        if let Some(n) = r.output_tokens {
            o.insert(
                "label".into(),
                serde_json::json!({ "expected_output_tokens": n }),
            );
        }
        serde_json::to_writer(&mut *out, &Value::Object(o))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_validated_and_sorted_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"id":"b","t_ms":20,"tenant":"t","user":"u","feature":"f","task":"k","request":{"model":"gpt-4o","messages":[]},"label":{"expected_output_tokens":80.6,"tier_needed":1}}"#,
                "\n\n",
                r#"{"id":"a","t_ms":10,"request":{"model":"gpt-4o","messages":[]}}"#,
                "\n"
            ),
        )
        .unwrap();
        let t = read(&p).unwrap();
        assert_eq!(t[0].id, "a");
        assert_eq!(t[1].output_tokens, Some(81));
        assert_eq!(t[0].output_tokens, None);

        let mut buf = Vec::new();
        write(&mut buf, &t).unwrap();
        std::fs::write(&p, &buf).unwrap();
        assert_eq!(
            read(&p).unwrap(),
            t,
            "an exported trace reads back the same"
        );

        std::fs::write(&p, "{\"id\":\"a\",\"t_ms\":-1,\"request\":{}}\n").unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("t_ms"), "{e}");
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"t_ms\":1,\"request\":{}}\n{\"id\":\"a\",\"t_ms\":2,\"request\":{}}\n",
        )
        .unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
    }
}
