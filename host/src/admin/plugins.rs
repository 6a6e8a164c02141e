//! Hot-swapping plugins through the admin API.
//!
//! * `POST /v1/plugins/{slot}/load` — JSON: exactly one of `path` (relative
//!   to `admin.plugin_dir`) or `wasm_base64`; the slot keys of the config
//!   (`name`, `on_error`, `timeout_ms`, `init_timeout_ms`, `memory_mib`,
//!   `fuel`, `reuse_instances`, `sha256`, `config`); optional `self_test`
//!   cases; `"activate": true` to activate at once. The version is compiled,
//!   checked against the slot's world and pin, initialised with its config
//!   and run through its self-tests before it is kept; anything else is
//!   refused with the reason, and the active version is untouched.
//! * `POST /v1/plugins/{slot}/activate` — `{"sha256": "..."}` of a loaded version;
//! * `POST /v1/plugins/{slot}/rollback` — back to what the slot held before;
//! * `DELETE /v1/plugins/{slot}` — empty the slot;
//! * `GET /v1/plugins/changes?limit=N` — the change record, newest first.
//!
//! Every change (and every refusal) is logged and written to the ledger's
//! `plugin_changes` table with who (`x-tollgate-actor`), when and which digest.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use http::StatusCode;
use serde_json::{Map, Value, json};

use crate::api::{ApiError, ChatRequest};
use crate::config::PluginSlotConfig;
use crate::ledger::PluginChange;
use crate::pipeline::{Gateway, Identity, attach_metrics, view};
use crate::plugins::manager::Staged;
use crate::plugins::types::{
    CacheDecision, CacheScope, Compression, RouteDecision, SpendSnapshot, Verdict,
};
use crate::plugins::{
    AnySlot, BudgetRuleKind, CachePolicyKind, CompressorKind, Kind, LoadError, RouterKind, Slot,
    SlotId,
};

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(code, message)
}

fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(status, "invalid_request_error", code, message)
}

/// Who made a change: `x-tollgate-actor`, or "admin".
pub fn actor(headers: &http::HeaderMap) -> String {
    headers
        .get(crate::headers::ACTOR)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .unwrap_or("admin")
        .to_string()
}

/// Logs a change and waits until the ledger has it on disk (off the async
/// workers: the ledger's flush blocks).
pub(crate) async fn record(gw: &Gateway, c: PluginChange) {
    tracing::info!(
        actor = %c.actor, action = %c.action, slot = %c.slot,
        plugin = c.plugin.as_deref().unwrap_or("-"), sha256 = c.sha256.as_deref().unwrap_or("-"),
        "plugin change: {}", c.detail
    );
    if let Some(l) = gw.ledger.clone() {
        let _ = tokio::task::spawn_blocking(move || l.record_change(c)).await;
    }
}

async fn change(
    gw: &Gateway,
    actor: &str,
    action: &str,
    slot: SlotId,
    p: Option<&AnySlot>,
    detail: String,
) {
    record(
        gw,
        PluginChange {
            ts_ms: gw.clock.now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            slot: slot.to_string(),
            plugin: p.map(|p| p.name().to_string()),
            sha256: p.map(|p| p.digest().to_string()),
            detail,
        },
    )
    .await;
}

/// A path under the plugin directory; `..`, absolute paths and symlinks
/// that lead outside it are refused.
fn resolve(dir: Option<&Path>, rel: &str) -> Result<PathBuf, ApiError> {
    let dir = dir.ok_or_else(|| {
        refused(
            StatusCode::FORBIDDEN,
            "plugin_dir_not_configured",
            "loading by path needs admin.plugin_dir in the config; upload the bytes as wasm_base64 instead",
        )
    })?;
    let p = Path::new(rel);
    if rel.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "path_outside_plugin_dir",
            format!("{rel:?}: give a plain relative path inside the plugin directory"),
        ));
    }
    let root = dir.canonicalize().map_err(|e| {
        refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_dir_unreadable",
            format!("{}: {e}", dir.display()),
        )
    })?;
    let full = root.join(p).canonicalize().map_err(|e| {
        refused(
            StatusCode::NOT_FOUND,
            "plugin_not_found",
            format!("{rel}: {e}"),
        )
    })?;
    if !full.starts_with(&root) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "path_outside_plugin_dir",
            format!("{rel:?} leads outside the plugin directory"),
        ));
    }
    Ok(full)
}

fn load_error(e: &LoadError) -> ApiError {
    let code = match e {
        LoadError::DigestMismatch { .. } => "digest_mismatch",
        LoadError::Read { .. } => "plugin_unreadable",
        LoadError::Compile { .. } => "not_a_component",
        LoadError::Imports { .. } => "imports_not_offered",
        LoadError::NotGranted { .. } => "capability_not_granted",
        LoadError::WrongWorld { .. } => "wrong_world",
        LoadError::Init { .. } => "init_refused",
        LoadError::Engine(_) => "runtime_error",
    };
    refused(StatusCode::UNPROCESSABLE_ENTITY, code, e.to_string())
}

async fn load_as<K: Kind>(
    gw: &Gateway,
    bytes: &[u8],
    source: &str,
    cfg: &PluginSlotConfig,
    wrap: fn(Slot<K>) -> AnySlot,
) -> Result<AnySlot, ApiError> {
    let plugin = gw
        .runtime
        .load_bytes::<K>(bytes, source, cfg)
        .await
        .map_err(|e| load_error(&e))?;
    attach_metrics(&plugin, &gw.metrics);
    Ok(wrap(Slot {
        plugin: Arc::new(plugin),
        fail_mode: cfg.on_error,
    }))
}

/// `POST /v1/plugins/{slot}/load`. A refusal is recorded like a change.
pub async fn load(
    gw: &Arc<Gateway>,
    slot: SlotId,
    actor: &str,
    raw: &[u8],
) -> Result<Value, ApiError> {
    let result = load_version(gw, slot, actor, raw).await;
    if let Err(e) = &result {
        change(gw, actor, "refuse", slot, None, e.message.clone()).await;
    }
    result
}

async fn load_version(
    gw: &Arc<Gateway>,
    slot: SlotId,
    actor: &str,
    raw: &[u8],
) -> Result<Value, ApiError> {
    let mut o = crate::api::parse_object(raw)?;
    let activate = match o.remove("activate") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(bad("invalid_type", "`activate` must be a boolean").param("activate"));
        }
    };
    let cases = match o.remove("self_test") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(
                bad("invalid_type", "`self_test` must be a list of cases").param("self_test")
            );
        }
    };
    let upload = o.remove("wasm_base64");
    let rel = o.get("path").and_then(Value::as_str).map(str::to_string);
    let (bytes, source) = match (upload, rel) {
        (Some(Value::String(b64)), None) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| {
                    bad("invalid_value", format!("`wasm_base64` is not base64: {e}"))
                        .param("wasm_base64")
                })?;
            o.insert("path".into(), json!("upload"));
            (bytes, "upload".to_string())
        }
        (None, Some(rel)) => {
            let full = resolve(gw.config.admin.plugin_dir.as_deref(), &rel)?;
            let bytes = tokio::fs::read(&full).await.map_err(|e| {
                refused(
                    StatusCode::NOT_FOUND,
                    "plugin_not_found",
                    format!("{rel}: {e}"),
                )
            })?;
            o.insert("path".into(), json!(full));
            (bytes, rel)
        }
        _ => {
            return Err(bad(
                "missing_required_parameter",
                "give exactly one of `path` (relative to admin.plugin_dir) and `wasm_base64`",
            ));
        }
    };
    let mut cfg: PluginSlotConfig = serde_json::from_value(Value::Object(o))
        .map_err(|e| bad("invalid_value", format!("plugin settings: {e}")))?;
    if cfg.name.is_none() && source == "upload" {
        cfg.name = Some(format!("{}-upload", slot.kind().world()));
    }
    let digest = crate::plugins::sha256_hex(&bytes);
    if let Some(pin) = gw.versions.lock().await.pin(slot)
        && pin != digest
    {
        return Err(refused(
            StatusCode::CONFLICT,
            "digest_not_pinned",
            format!("slot {slot} is pinned to sha256 {pin}; {source} is {digest}"),
        ));
    }
    let loaded = match slot.kind() {
        crate::plugins::PluginKind::Router => {
            load_as::<RouterKind>(gw, &bytes, &source, &cfg, AnySlot::Router).await
        }
        crate::plugins::PluginKind::Compressor => {
            load_as::<CompressorKind>(gw, &bytes, &source, &cfg, AnySlot::Compressor).await
        }
        crate::plugins::PluginKind::CachePolicy => {
            load_as::<CachePolicyKind>(gw, &bytes, &source, &cfg, AnySlot::CachePolicy).await
        }
        crate::plugins::PluginKind::BudgetRule => {
            load_as::<BudgetRuleKind>(gw, &bytes, &source, &cfg, AnySlot::BudgetRule).await
        }
    };
    let with_source = |mut e: ApiError| {
        e.message = format!("{} ({source}, sha256 {digest})", e.message);
        e
    };
    let plugin = loaded.map_err(with_source)?;
    let passed = self_test(gw, &plugin, &cases).await.map_err(with_source)?;
    // Everything that makes this version behave as it does.
    let settings = json!({
        "sha256": digest, "config": cfg.config_json(), "on_error": format!("{:?}", cfg.on_error),
        "timeout_ms": cfg.timeout_ms, "init_timeout_ms": cfg.init_timeout_ms,
        "memory_mib": cfg.memory_mib, "fuel": cfg.fuel, "reuse_instances": cfg.reuse_instances,
        "max_instances": cfg.max_instances, "data_dir": cfg.capabilities.data_dir,
        "spend": cfg.capabilities.spend, "embed": cfg.capabilities.embed,
    });
    let version = crate::plugins::sha256_hex(settings.to_string().as_bytes())[..16].to_string();
    gw.versions.lock().await.stage(
        slot,
        Staged {
            version: version.clone(),
            plugin: plugin.clone(),
            loaded_at_ms: gw.clock.now_ms(),
            loaded_by: actor.to_string(),
            source: source.clone(),
        },
    );
    change(
        gw,
        actor,
        "load",
        slot,
        Some(&plugin),
        format!("from {source}; {passed} self-test cases passed"),
    )
    .await;
    if activate {
        put(gw, slot, Some(plugin.clone()), actor, "activate").await?;
    }
    Ok(json!({
        "slot": slot.to_string(), "version": version, "name": plugin.name(), "sha256": plugin.digest(),
        "kind": plugin.kind().world(), "self_tests_passed": passed, "active": activate,
    }))
}

/// Puts `plugin` (or nothing) into `slot` of a new active set; the old
/// occupant is kept for rollback.
async fn put(
    gw: &Arc<Gateway>,
    slot: SlotId,
    plugin: Option<AnySlot>,
    actor: &str,
    action: &str,
) -> Result<Value, ApiError> {
    let mut versions = gw.versions.lock().await;
    // The swap itself, from the lock to the store (the change record
    // written after it is not part of it).
    let swap = std::time::Instant::now();
    let live = gw.live.load_full();
    let before = live.plugins.get(slot);
    let next = live
        .plugins
        .with(slot, plugin.clone())
        .map_err(|m| refused(StatusCode::CONFLICT, "slot_mismatch", m))?;
    gw.live.store(Arc::new(live.with_plugins(next)));
    let swap_us = swap.elapsed().as_secs_f64() * 1e6;
    versions.replaced(slot, before.clone());
    drop(versions);
    let detail = match &before {
        Some(b) => format!("replaced {} ({})", b.name(), &b.digest()[..12]),
        None => "slot was empty".to_string(),
    };
    change(gw, actor, action, slot, plugin.as_ref(), detail).await;
    Ok(json!({
        "slot": slot.to_string(),
        "active": plugin.as_ref().map(|p| json!({"name": p.name(), "sha256": p.digest()})),
        "replaced": before.as_ref().map(|p| json!({"name": p.name(), "sha256": p.digest()})),
        "swap_us": (swap_us * 10.0).round() / 10.0,
    }))
}

/// `POST /v1/plugins/{slot}/activate`.
pub async fn activate(
    gw: &Arc<Gateway>,
    slot: SlotId,
    actor: &str,
    raw: &[u8],
) -> Result<Value, ApiError> {
    let plugin = loaded_version(gw, slot, raw).await?;
    put(gw, slot, Some(plugin), actor, "activate").await
}

/// The loaded version a call's body names: `version`, or `sha256` when only
/// one version of those bytes is loaded.
async fn loaded_version(gw: &Gateway, slot: SlotId, raw: &[u8]) -> Result<AnySlot, ApiError> {
    let o = crate::api::parse_object(raw)?;
    let id = o
        .get("version")
        .or_else(|| o.get("sha256"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad(
                "missing_required_parameter",
                "give the `version` (or the `sha256`) of a loaded version",
            )
            .param("version")
        })?;
    gw.versions
        .lock()
        .await
        .find(slot, id)
        .map(|s| s.plugin.clone())
        .map_err(|m| refused(StatusCode::NOT_FOUND, "version_not_loaded", m))
}

/// `POST /v1/plugins/{slot}/rollback`.
pub async fn rollback(gw: &Arc<Gateway>, slot: SlotId, actor: &str) -> Result<Value, ApiError> {
    let previous = gw
        .versions
        .lock()
        .await
        .previous(slot)
        .cloned()
        .ok_or_else(|| {
            refused(
                StatusCode::CONFLICT,
                "nothing_to_roll_back",
                format!("slot {slot} has not changed since the gateway started"),
            )
        })?;
    put(gw, slot, previous, actor, "rollback").await
}

/// `POST /v1/plugins/{slot}/shadow` with the `sha256` of a loaded version,
/// or `DELETE /v1/plugins/{slot}/shadow` (`raw` None) to stop shadowing.
pub async fn shadow(
    gw: &Arc<Gateway>,
    slot: SlotId,
    actor: &str,
    raw: Option<&[u8]>,
) -> Result<Value, ApiError> {
    let plugin = match raw {
        Some(raw) => Some(loaded_version(gw, slot, raw).await?),
        None => None,
    };
    let versions = gw.versions.lock().await;
    let live = gw.live.load_full();
    let before = live.plugins.shadow_of(slot);
    if plugin.is_none() && before.is_none() {
        return Err(refused(
            StatusCode::NOT_FOUND,
            "no_shadow",
            format!("slot {slot} has no shadow"),
        ));
    }
    let next = live
        .plugins
        .with_shadow(slot, plugin.clone())
        .map_err(|m| refused(StatusCode::CONFLICT, "slot_mismatch", m))?;
    gw.live.store(Arc::new(live.with_plugins(next)));
    drop(versions);
    let (action, shown) = match &plugin {
        Some(p) => ("shadow", Some(p)),
        None => ("unshadow", before.as_ref()),
    };
    change(
        gw,
        actor,
        action,
        slot,
        shown,
        format!("{action} for slot {slot}"),
    )
    .await;
    Ok(json!({
        "slot": slot.to_string(),
        "shadow": plugin.as_ref().map(|p| json!({"name": p.name(), "sha256": p.digest()})),
    }))
}

/// `DELETE /v1/plugins/{slot}`.
pub async fn remove(gw: &Arc<Gateway>, slot: SlotId, actor: &str) -> Result<Value, ApiError> {
    if gw.live.load().plugins.get(slot).is_none() {
        return Err(refused(
            StatusCode::NOT_FOUND,
            "slot_empty",
            format!("slot {slot} holds no plugin"),
        ));
    }
    put(gw, slot, None, actor, "remove").await
}

/// Runs the self-test cases of a new version; the number that passed, or
/// the first failure with what was expected and what came back.
///
/// A case is `{"name", "request": {chat body}, "tenant", "user", "feature",
/// "expect": {...}}`; `expect` must match a subset of the decision written
/// as JSON: router `{"decision": "model", "model": "gpt-4o-mini"}` (also
/// `keep`, `fallback` with `models`, `respond` with `text`, `reject` with
/// `reason`); compressor `unchanged` / `rewritten`; cache policy `bypass` /
/// `lookup` with `scope` (`tenant`, `tenant-user`); budget rule `allow`,
/// `deny`, `downgrade` with `model`, `alert`.
async fn self_test(gw: &Gateway, plugin: &AnySlot, cases: &[Value]) -> Result<usize, ApiError> {
    let fail = |m: String| refused(StatusCode::UNPROCESSABLE_ENTITY, "self_test_failed", m);
    for (i, case) in cases.iter().enumerate() {
        let label = case
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("self_test[{i}]"), str::to_string);
        let body = case.get("request").cloned().unwrap_or(Value::Null);
        let req = ChatRequest::parse(body.to_string().as_bytes())
            .map_err(|e| fail(format!("{label}: bad request: {}", e.message)))?;
        let text = |k: &str, d: &str| case.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
        let id = Identity {
            tenant: text("tenant", "default"),
            user: text("user", "anonymous"),
            feature: text("feature", "default"),
            task: text("task", ""),
            ..Identity::default()
        };
        let v = view::build("self-test", &id, &req);
        let got = match plugin {
            AnySlot::Router(s) => s
                .plugin
                .route(&v, &gw.live.load().candidates(None))
                .await
                .map(|d| route_json(&d)),
            AnySlot::Compressor(s) => s.plugin.compress(&v).await.map(|d| compression_json(&d)),
            AnySlot::CachePolicy(s) => s.plugin.lookup(&v).await.map(|d| cache_json(&d)),
            AnySlot::BudgetRule(s) => {
                let spend = SpendSnapshot {
                    day: crate::clock::utc_day(gw.clock.now_ms()),
                    tenant_today_usd: 0.0,
                    feature_today_usd: 0.0,
                    user_today_usd: 0.0,
                    estimated_cost_usd: 0.0,
                };
                s.plugin.check(&v, &spend).await.map(|d| verdict_json(&d))
            }
        }
        .map_err(|e| fail(format!("{label}: the plugin failed: {e}")))?;
        let expect = case
            .get("expect")
            .and_then(Value::as_object)
            .ok_or_else(|| fail(format!("{label}: `expect` must be an object")))?;
        if !subset(expect, &got) {
            return Err(fail(format!(
                "{label}: expected {}, got {}",
                Value::Object(expect.clone()),
                got
            )));
        }
    }
    Ok(cases.len())
}

fn subset(expect: &Map<String, Value>, got: &Value) -> bool {
    expect.iter().all(|(k, v)| got.get(k) == Some(v))
}

fn route_json(d: &RouteDecision) -> Value {
    match d {
        RouteDecision::Keep => json!({"decision": "keep"}),
        RouteDecision::UseModel(m) => json!({"decision": "model", "model": m}),
        RouteDecision::Fallback(l) => {
            json!({"decision": "fallback", "models": l, "model": l.first()})
        }
        RouteDecision::Respond(t) => json!({"decision": "respond", "text": t}),
        RouteDecision::Reject(r) => json!({"decision": "reject", "reason": r}),
    }
}

fn compression_json(d: &Compression) -> Value {
    match d {
        Compression::Unchanged => json!({"decision": "unchanged"}),
        Compression::Rewritten(r) => {
            json!({"decision": "rewritten", "note": r.note, "messages": r.messages.len()})
        }
    }
}

fn cache_json(d: &CacheDecision) -> Value {
    match d {
        CacheDecision::Bypass(r) => json!({"decision": "bypass", "reason": r}),
        CacheDecision::Lookup(l) => json!({
            "decision": "lookup",
            "scope": match l.scope { CacheScope::Tenant => "tenant", CacheScope::TenantUser => "tenant-user" },
            "ttl_seconds": l.ttl_seconds,
        }),
    }
}

fn verdict_json(d: &Verdict) -> Value {
    match d {
        Verdict::Allow => json!({"decision": "allow"}),
        Verdict::Deny(r) => json!({"decision": "deny", "reason": r}),
        Verdict::Downgrade(m) => json!({"decision": "downgrade", "model": m}),
        Verdict::Alert(m) => json!({"decision": "alert", "message": m}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_plugin_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.wasm"), b"x").unwrap();
        let ok = resolve(Some(dir.path()), "a.wasm").unwrap();
        assert!(ok.ends_with("a.wasm"));
        for bad in ["../a.wasm", "/etc/passwd", "", "./a.wasm"] {
            assert_eq!(
                resolve(Some(dir.path()), bad).unwrap_err().code,
                "path_outside_plugin_dir",
                "{bad}"
            );
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link.wasm")).unwrap();
            assert_eq!(
                resolve(Some(dir.path()), "link.wasm").unwrap_err().code,
                "path_outside_plugin_dir"
            );
        }
        assert_eq!(
            resolve(None, "a.wasm").unwrap_err().code,
            "plugin_dir_not_configured"
        );
        assert_eq!(
            resolve(Some(dir.path()), "b.wasm").unwrap_err().code,
            "plugin_not_found"
        );
    }

    #[test]
    fn expectations_match_a_subset_of_the_decision() {
        let got = route_json(&RouteDecision::Fallback(vec!["a".into(), "b".into()]));
        let e = |v: Value| v.as_object().unwrap().clone();
        assert!(subset(&e(json!({"model": "a"})), &got));
        assert!(subset(
            &e(json!({"decision": "fallback", "models": ["a", "b"]})),
            &got
        ));
        assert!(!subset(&e(json!({"decision": "model"})), &got));
    }
}
