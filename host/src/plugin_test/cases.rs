//! Cases for `tollgate plugin test`: recorded requests in the trace format
//! (what the workload generator and `tollgate export-trace` write), or a
//! ledger file read directly, each with the decision it is expected to get
//! when the case says so.
//!
//! A case may carry, beyond the trace fields:
//! * `expect`: the expected decision — for a router a model name, `tier N`
//!   (a number N means the same) or a decision kind (`keep`, `use-model`,
//!   `fallback`, `respond`, `reject`); for a cache policy `bypass`,
//!   `tenant` or `tenant-user`; for a compressor `unchanged` or
//!   `rewritten`; for a budget rule `allow`, `deny`, `downgrade` or `alert`;
//! * `spend` (budget rules): `tenant_today_usd`, `feature_today_usd`,
//!   `user_today_usd`, the spend the rule is shown;
//! * `response` (cache policies): `content` and `finish_reason` of an
//!   answer to offer to `admit`.
//!
//! Without `expect`, a trace label gives the expectation where it names
//! one: a router is expected to pick a model of `label.tier_needed`; a cache
//! policy to keep personal answers private (`tenant-user`), share cacheable
//! ones (`tenant`) and bypass the rest.

use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use super::HarnessError;
use crate::api::ChatRequest;
use crate::pipeline::Identity;
use crate::plugins::PluginKind;

/// One recorded request and what the plugin is expected to decide.
pub struct Case {
    pub id: String,
    pub identity: Identity,
    pub request: ChatRequest,
    pub expect: Option<String>,
    pub spend: [f64; 3],
    /// (content, finish_reason) offered to a cache policy's `admit`.
    pub response: Option<(String, String)>,
}

/// Reads cases from a JSON Lines file, or from a ledger (`.db`, `.sqlite`,
/// `.sqlite3`) whose rows kept their request bodies.
pub fn read(path: &Path, kind: PluginKind) -> Result<Vec<Case>, HarnessError> {
    let is_ledger = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("db" | "sqlite" | "sqlite3")
    );
    let cases = if is_ledger {
        from_ledger(path)?
    } else {
        from_lines(path, kind)?
    };
    if cases.is_empty() {
        return Err(HarnessError::Cases(format!(
            "{}: no cases (a ledger needs `ledger.record_bodies = true` to keep requests)",
            path.display()
        )));
    }
    Ok(cases)
}

fn from_lines(path: &Path, kind: PluginKind) -> Result<Vec<Case>, HarnessError> {
    let file = std::fs::File::open(path)
        .map_err(|e| HarnessError::Cases(format!("cannot read {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line =
            line.map_err(|e| HarnessError::Cases(format!("cannot read {}: {e}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let case = parse(&line, kind, n + 1).map_err(|message| {
            HarnessError::Cases(format!("{} line {}: {message}", path.display(), n + 1))
        })?;
        out.push(case);
    }
    Ok(out)
}

fn from_ledger(path: &Path) -> Result<Vec<Case>, HarnessError> {
    let conn = crate::ledger::open_db(path).map_err(|e| HarnessError::Cases(e.to_string()))?;
    let (requests, _) =
        crate::replay::export::from_ledger(&conn, &crate::replay::export::ExportQuery::default())
            .map_err(|e| HarnessError::Cases(e.to_string()))?;
    requests
        .into_iter()
        .map(|r| {
            let body = serde_json::to_vec(&Value::Object(r.body))
                .map_err(|e| HarnessError::Cases(e.to_string()))?;
            let request = ChatRequest::parse(&body)
                .map_err(|e| HarnessError::Cases(format!("ledger row {}: {}", r.id, e.message)))?;
            Ok(Case {
                identity: identity(&r.tenant, &r.user, &r.feature, &r.task, 0),
                id: r.id,
                request,
                expect: None,
                spend: [0.0; 3],
                response: None,
            })
        })
        .collect()
}

fn identity(tenant: &str, user: &str, feature: &str, task: &str, step: u32) -> Identity {
    let or = |s: &str, d: &str| {
        if s.is_empty() {
            d.to_string()
        } else {
            s.to_string()
        }
    };
    Identity {
        tenant: or(tenant, "default"),
        user: or(user, "anonymous"),
        feature: or(feature, "default"),
        task: task.to_string(),
        step,
        ..Identity::default()
    }
}

fn parse(line: &str, kind: PluginKind, n: usize) -> Result<Case, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let o = v.as_object().ok_or("a case must be a JSON object")?;
    let text = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("");
    let body = o
        .get("request")
        .filter(|b| b.is_object())
        .ok_or("`request` must be a chat-completions body (an object)")?;
    let raw = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    let request = ChatRequest::parse(&raw).map_err(|e| format!("request: {}", e.message))?;
    let step = o.get("step").and_then(Value::as_u64).unwrap_or(0);
    let expect = match o.get("expect") {
        None | Some(Value::Null) => from_label(o.get("label"), kind),
        Some(Value::String(s)) => Some(s.trim().to_string()),
        Some(Value::Number(t)) if kind == PluginKind::Router => Some(format!("tier {t}")),
        Some(_) => return Err("`expect` must be a string (or a tier number for a router)".into()),
    };
    let spend = match o.get("spend") {
        None | Some(Value::Null) => [0.0; 3],
        Some(s) => {
            let usd = |k: &str| -> Result<f64, String> {
                match s.get(k) {
                    None => Ok(0.0),
                    Some(x) => x
                        .as_f64()
                        .filter(|x| x.is_finite() && *x >= 0.0)
                        .ok_or_else(|| format!("`spend.{k}` must be a non-negative number")),
                }
            };
            [
                usd("tenant_today_usd")?,
                usd("feature_today_usd")?,
                usd("user_today_usd")?,
            ]
        }
    };
    let response = o.get("response").map(|r| {
        (
            r.get("content")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            r.get("finish_reason")
                .and_then(Value::as_str)
                .unwrap_or("stop")
                .to_string(),
        )
    });
    Ok(Case {
        id: match text("id") {
            "" => format!("line {n}"),
            id => id.to_string(),
        },
        identity: identity(
            text("tenant"),
            text("user"),
            text("feature"),
            text("task"),
            u32::try_from(step).unwrap_or(u32::MAX),
        ),
        request,
        expect,
        spend,
        response,
    })
}

/// The expectation a workload label implies for this kind of plugin.
fn from_label(label: Option<&Value>, kind: PluginKind) -> Option<String> {
    let label = label?;
    match kind {
        PluginKind::Router => label
            .get("tier_needed")
            .and_then(Value::as_u64)
            .map(|t| format!("tier {t}")),
        PluginKind::CachePolicy => {
            let flag = |k: &str| label.get(k).and_then(Value::as_bool);
            match (flag("personal")?, flag("cacheable")?) {
                (true, _) => Some("tenant-user".into()),
                (false, true) => Some("tenant".into()),
                (false, false) => Some("bypass".into()),
            }
        }
        PluginKind::Compressor | PluginKind::BudgetRule => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_come_from_the_case_or_its_label() {
        let req = r#""request":{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let c = parse(
            &format!(r#"{{"id":"a",{req},"label":{{"tier_needed":2}}}}"#),
            PluginKind::Router,
            1,
        )
        .unwrap();
        assert_eq!(c.expect.as_deref(), Some("tier 2"));
        assert_eq!(c.identity.tenant, "default");
        let c = parse(&format!(r#"{{{req},"expect":3}}"#), PluginKind::Router, 7).unwrap();
        assert_eq!(
            (c.id.as_str(), c.expect.as_deref()),
            ("line 7", Some("tier 3"))
        );
        let label = r#""label":{"personal":false,"cacheable":false}"#;
        let c = parse(&format!("{{{req},{label}}}"), PluginKind::CachePolicy, 1).unwrap();
        assert_eq!(c.expect.as_deref(), Some("bypass"));
        let c = parse(&format!("{{{req},{label}}}"), PluginKind::Compressor, 1).unwrap();
        assert_eq!(c.expect, None);
        let e = parse(
            r#"{"request":{"model":"m","messages":[]}}"#,
            PluginKind::Router,
            1,
        )
        .err()
        .unwrap();
        assert!(e.contains("messages"), "{e}");
        let e = parse(
            &format!(r#"{{{req},"spend":{{"tenant_today_usd":-1}}}}"#),
            PluginKind::BudgetRule,
            1,
        )
        .err()
        .unwrap();
        assert!(e.contains("spend.tenant_today_usd"), "{e}");
    }
}
