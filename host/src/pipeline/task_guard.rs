//! Step 1b of the pipeline: stops runaway tasks before they spend anything.
//!
//! Two checks, both native and cheap:
//! * a loop detector that reads the request itself: an agent whose history
//!   holds the same tool call (function and arguments) again and again is
//!   looping, whatever its task id says. It needs no state, so it holds
//!   across replicas;
//! * a cap on the calls of one task (`x-tollgate-task` within a tenant),
//!   counted in this gateway and reset after the task has been idle.

use std::collections::HashMap;

use http::StatusCode;
use serde_json::{Map, Value};

use crate::api::ApiError;
use crate::config::TasksConfig;

pub struct TaskGuard {
    /// Replaced by a config reload; counts survive it.
    cfg: arc_swap::ArcSwap<TasksConfig>,
    /// (tenant, task) -> (calls, last call on the gateway clock)
    calls: moka::sync::Cache<(String, String), (u32, u64)>,
    /// (tenant, task) -> (retries, last retry on the gateway clock)
    retries: moka::sync::Cache<(String, String), (u32, u64)>,
}

impl TaskGuard {
    pub fn new(cfg: TasksConfig) -> Self {
        Self {
            cfg: arc_swap::ArcSwap::from_pointee(cfg),
            calls: moka::sync::Cache::builder().max_capacity(1_000_000).build(),
            retries: moka::sync::Cache::builder().max_capacity(1_000_000).build(),
        }
    }

    /// Whether the task may retry an upstream call once more (and counts
    /// it). Requests outside a task are bounded per request only.
    pub fn take_retry(&self, tenant: &str, task: &str, now_ms: u64) -> bool {
        let cfg = self.cfg.load();
        if cfg.max_retries == 0 || task.is_empty() {
            return true;
        }
        count(&self.retries, tenant, task, now_ms, cfg.idle_reset_seconds) <= cfg.max_retries
    }

    pub fn set_config(&self, cfg: TasksConfig) {
        self.cfg.store(std::sync::Arc::new(cfg));
    }

    /// Refuses the request if its task is looping or over its call cap;
    /// otherwise counts the call.
    pub fn check(
        &self,
        tenant: &str,
        task: &str,
        body: &Map<String, Value>,
        now_ms: u64,
    ) -> Result<(), ApiError> {
        let limit = self.cfg.load().max_identical_tool_calls;
        if limit > 0 {
            let (repeats, name) = most_repeated_tool_call(body);
            if repeats >= limit {
                return Err(ApiError::invalid(
                    "loop_detected",
                    format!(
                        "task stopped: the conversation repeats the same `{name}` tool call with the same arguments {repeats} times (limit {limit}); the agent is looping"
                    ),
                ));
            }
        }
        let cfg = self.cfg.load();
        let max = cfg.max_calls;
        if max == 0 || task.is_empty() {
            return Ok(());
        }
        let calls = count(&self.calls, tenant, task, now_ms, cfg.idle_reset_seconds);
        if calls > max {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "task_call_limit",
                format!("task {task:?} has made {max} calls, its limit (tasks.max_calls)"),
            ));
        }
        Ok(())
    }
}

/// Adds one to a task's counter (restarted after the task was idle) and
/// returns it.
fn count(
    cache: &moka::sync::Cache<(String, String), (u32, u64)>,
    tenant: &str,
    task: &str,
    now_ms: u64,
    idle_reset_seconds: u64,
) -> u32 {
    let idle_ms = idle_reset_seconds.saturating_mul(1000);
    let key = (tenant.to_string(), task.to_string());
    let entry = cache.entry(key).and_compute_with(|old| {
        let n = match old.map(|e| e.into_value()) {
            Some((n, last)) if now_ms.saturating_sub(last) <= idle_ms => n,
            _ => 0,
        };
        moka::ops::compute::Op::Put((n.saturating_add(1), now_ms))
    });
    entry.into_entry().map_or(0, |e| e.into_value().0)
}

/// How often the most repeated tool call of the history occurs, and its name.
/// Arguments are compared as JSON values, so key order and spacing do not
/// hide a repeat.
fn most_repeated_tool_call(body: &Map<String, Value>) -> (u32, String) {
    let mut seen: HashMap<(String, String), u32> = HashMap::new();
    let Some(Value::Array(messages)) = body.get("messages") else {
        return (0, String::new());
    };
    for m in messages {
        let Some(Value::Array(calls)) = m.get("tool_calls") else {
            continue;
        };
        for c in calls {
            let f = c.get("function");
            let name = f
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let args = f
                .and_then(|f| f.get("arguments"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let canonical = serde_json::from_str::<Value>(args)
                .map(|v| v.to_string())
                .unwrap_or_else(|_| args.trim().to_string());
            *seen.entry((name.to_string(), canonical)).or_default() += 1;
        }
    }
    seen.into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|((name, _), n)| (n, name))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(repeats: usize) -> Map<String, Value> {
        let mut messages = vec![json!({"role": "user", "content": "find failed payments"})];
        for i in 0..repeats {
            // Same call, arguments spelled differently, results differ.
            let args = if i % 2 == 0 {
                r#"{"cursor": "c1", "n": 50}"#
            } else {
                r#"{"n":50,"cursor":"c1"}"#
            };
            messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": format!("call_{i}"), "type": "function",
                 "function": {"name": "list_failed_payments", "arguments": args}}]}));
            messages.push(json!({"role": "tool", "tool_call_id": format!("call_{i}"), "content": format!("page (request {i})")}));
        }
        json!({"model": "gpt-4o", "messages": messages})
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn a_repeated_tool_call_stops_the_task() {
        let g = TaskGuard::new(TasksConfig::default());
        assert!(g.check("t", "k", &agent(2), 0).is_ok());
        let e = g.check("t", "k", &agent(3), 0).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "loop_detected")
        );
        assert!(e.message.contains("list_failed_payments"), "{}", e.message);
    }

    #[test]
    fn calls_per_task_are_capped_and_reset_after_idle_time() {
        let g = TaskGuard::new(TasksConfig {
            max_calls: 2,
            idle_reset_seconds: 60,
            max_identical_tool_calls: 0,
            max_retries: 3,
        });
        // Retries: 3 per task, counted apart from calls; no task, no cap.
        assert!((0..3).all(|i| g.take_retry("t", "r", i)));
        assert!(!g.take_retry("t", "r", 4));
        assert!(g.take_retry("t", "", 5));
        assert!(g.take_retry("t", "r", 4 + 61_000), "idle: counting again");
        let b = agent(0);
        assert!(g.check("t", "k", &b, 0).is_ok());
        assert!(g.check("t", "k", &b, 1_000).is_ok());
        let e = g.check("t", "k", &b, 2_000).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::TOO_MANY_REQUESTS, "task_call_limit")
        );
        assert!(
            g.check("other-tenant", "k", &b, 2_000).is_ok(),
            "tasks are per tenant"
        );
        assert!(g.check("t", "", &b, 2_000).is_ok(), "no task id, no cap");
        assert!(
            g.check("t", "k", &b, 70_000).is_ok(),
            "idle task starts over"
        );
    }
}
