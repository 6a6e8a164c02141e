//! Kill switches: an operator stops traffic by tenant, feature, model or
//! prompt version (or a combination) through the admin API, effective for
//! the next request — no plugin, no cache, no upstream call — and lifts it
//! the same way. A switch refuses with HTTP 403 `killed` (a client should not
//! retry), is counted in `tollgate_killed_total`, and every set and
//! lift is written to the ledger's change log, from which the active
//! switches are restored at start: a restart does not silently lift one.
//!
//! A switch naming a model takes that model out of every route (of the
//! tenant/feature it names, if any): a fallback ladder skips it; a request
//! left with no model is refused.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::api::ApiError;

/// Change-log rows of kill switches carry this slot.
pub const CHANGE_SLOT: &str = "kill-switch";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillSwitch {
    #[serde(default)]
    pub id: String,
    /// Every field given must match; at least one is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `x-tollgate-prompt-version`, or the first 16 hex of BLAKE3 over the
    /// request's system messages (answers carry it as a header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_version: Option<String>,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub actor: String,
    #[serde(default)]
    pub since_ms: u64,
}

impl KillSwitch {
    fn matches_request(&self, tenant: &str, feature: &str, prompt_version: &str) -> bool {
        let ok = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        ok(&self.tenant, tenant)
            && ok(&self.feature, feature)
            && ok(&self.prompt_version, prompt_version)
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("tenant", &self.tenant),
            ("feature", &self.feature),
            ("model", &self.model),
            ("prompt version", &self.prompt_version),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k} {v}"));
            }
        }
        parts.join(", ")
    }

    fn refusal(&self) -> ApiError {
        let reason = if self.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", self.reason)
        };
        ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "killed",
            format!(
                "stopped by kill switch {} ({}){reason}",
                self.id,
                self.describe()
            ),
        )
    }
}

#[derive(Default)]
pub struct KillSwitches {
    active: ArcSwap<Vec<KillSwitch>>,
}

impl KillSwitches {
    pub fn list(&self) -> Arc<Vec<KillSwitch>> {
        self.active.load_full()
    }

    pub fn set(&self, mut s: KillSwitch, actor: &str, now_ms: u64) -> Result<KillSwitch, String> {
        if s.tenant.is_none()
            && s.feature.is_none()
            && s.model.is_none()
            && s.prompt_version.is_none()
        {
            return Err(
                "a kill switch names at least one of tenant, feature, model, prompt_version".into(),
            );
        }
        // The random tail of a v7 UUID (its head is the time: two switches
        // set in the same millisecond would share it).
        s.id = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
        s.actor = actor.to_string();
        s.since_ms = now_ms;
        self.active.rcu(|cur| {
            let mut next = (**cur).clone();
            next.push(s.clone());
            next
        });
        Ok(s)
    }

    pub fn lift(&self, id: &str) -> Option<KillSwitch> {
        let mut lifted = None;
        self.active.rcu(|cur| {
            let mut next = (**cur).clone();
            lifted = next.iter().position(|s| s.id == id).map(|i| next.remove(i));
            next
        });
        lifted
    }

    /// Puts back switches found active in the change log.
    pub fn restore(&self, switches: Vec<KillSwitch>) {
        self.active.store(Arc::new(switches));
    }

    /// The switch stopping this request outright (one that names no model).
    pub fn stops(&self, tenant: &str, feature: &str, prompt_version: &str) -> Option<ApiError> {
        let list = self.active.load();
        list.iter()
            .find(|s| s.model.is_none() && s.matches_request(tenant, feature, prompt_version))
            .map(|s| s.refusal())
    }

    /// Takes killed models out of a route; refuses when none is left.
    /// Returns the ids of the switches that removed a model.
    pub fn filter_ladder(
        &self,
        ladder: &mut Vec<String>,
        tenant: &str,
        feature: &str,
        prompt_version: &str,
    ) -> Result<Vec<String>, ApiError> {
        let list = self.active.load();
        let mut used = Vec::new();
        let mut last = None;
        ladder.retain(|m| {
            let hit = list.iter().find(|s| {
                s.model.as_deref() == Some(m.as_str())
                    && s.matches_request(tenant, feature, prompt_version)
            });
            if let Some(s) = hit {
                used.push(s.id.clone());
                last = Some(s.clone());
            }
            hit.is_none()
        });
        match (ladder.is_empty(), last) {
            (true, Some(s)) => Err(s.refusal()),
            _ => Ok(used),
        }
    }
}

/// The prompt version of a request: its header, else a hash of its system
/// messages (empty when there are none).
pub fn prompt_version(
    header: Option<&str>,
    body: &serde_json::Map<String, serde_json::Value>,
) -> String {
    if let Some(h) = header {
        return h.to_string();
    }
    let mut hasher = blake3::Hasher::new();
    let mut any = false;
    for m in body
        .get("messages")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
    {
        if m.get("role").and_then(|r| r.as_str()) == Some("system") {
            any = true;
            // The content's compact JSON (as `to_string` writes it).
            if let Some(c) = m.get("content") {
                hasher.update(&serde_json::to_vec(c).unwrap_or_default());
            }
            hasher.update(b"\0");
        }
    }
    if !any {
        return String::new();
    }
    hasher.finalize().to_hex()[..16].to_string()
}

/// The switches active after replaying the change log's kill-switch rows
/// (details are the switch as JSON; action `kill` sets, `unkill` lifts).
pub fn replay(rows: &[(String, String)]) -> Vec<KillSwitch> {
    let mut active: Vec<KillSwitch> = Vec::new();
    for (action, detail) in rows {
        let Ok(s) = serde_json::from_str::<KillSwitch>(detail) else {
            continue;
        };
        match action.as_str() {
            "kill" => active.push(s),
            "unkill" => active.retain(|a| a.id != s.id),
            _ => {}
        }
    }
    active
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch(tenant: Option<&str>, model: Option<&str>) -> KillSwitch {
        KillSwitch {
            id: String::new(),
            tenant: tenant.map(str::to_string),
            feature: None,
            model: model.map(str::to_string),
            prompt_version: None,
            reason: "runaway".into(),
            actor: String::new(),
            since_ms: 0,
        }
    }

    #[test]
    fn switches_stop_requests_and_take_models_out_of_routes() {
        let k = KillSwitches::default();
        assert!(k.set(switch(None, None), "a", 1).is_err());
        let t = k.set(switch(Some("acme"), None), "alice", 5).unwrap();
        let e = k.stops("acme", "chat", "").unwrap();
        assert_eq!((e.status, e.code), (StatusCode::FORBIDDEN, "killed"));
        assert!(e.message.contains(&t.id) && e.message.contains("runaway"));
        assert!(k.stops("bluefin", "chat", "").is_none());
        k.set(switch(None, Some("gpt-4o")), "alice", 6).unwrap();
        let mut ladder = vec!["gpt-4o".to_string(), "gpt-4o-mini".to_string()];
        let used = k.filter_ladder(&mut ladder, "bluefin", "chat", "").unwrap();
        assert_eq!(
            (ladder.as_slice(), used.len()),
            (["gpt-4o-mini".to_string()].as_slice(), 1)
        );
        let mut only = vec!["gpt-4o".to_string()];
        assert!(k.filter_ladder(&mut only, "bluefin", "chat", "").is_err());
        assert_eq!(k.lift(&t.id).map(|s| s.id), Some(t.id.clone()));
        assert!(k.stops("acme", "chat", "").is_none());
    }

    #[test]
    fn the_change_log_restores_what_is_still_active() {
        let k = KillSwitches::default();
        let a = k.set(switch(Some("a"), None), "x", 1).unwrap();
        let b = k.set(switch(Some("b"), None), "x", 2).unwrap();
        let j = |s: &KillSwitch| serde_json::to_string(s).unwrap();
        let rows = vec![
            ("kill".to_string(), j(&a)),
            ("kill".to_string(), j(&b)),
            ("unkill".to_string(), j(&a)),
        ];
        assert_eq!(replay(&rows), vec![b]);
    }

    #[test]
    fn prompt_versions_follow_the_system_prompt() {
        let body = |sys: &str| {
            serde_json::json!({"messages": [{"role": "system", "content": sys}, {"role": "user", "content": "q"}]})
                .as_object()
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(
            prompt_version(None, &body("v1")),
            prompt_version(None, &body("v1"))
        );
        assert_ne!(
            prompt_version(None, &body("v1")),
            prompt_version(None, &body("v2"))
        );
        assert_eq!(
            prompt_version(Some("support-v7"), &body("v1")),
            "support-v7"
        );
        assert_eq!(prompt_version(None, &serde_json::Map::new()), "");
    }
}
