//! Kill switches through the admin API ([`crate::kill`]):
//! `GET /v1/kill` lists the active ones, `POST /v1/kill` sets one
//! (`{"tenant": ..., "feature": ..., "model": ..., "prompt_version": ...,
//! "reason": ...}`, at least one scope), `DELETE /v1/kill/{id}` lifts it.
//! A switch applies from the next request on; the answer comes once it is
//! also durable in the change log, from which a restart restores it.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;

use crate::api::ApiError;
use crate::kill::{CHANGE_SLOT, KillSwitch};
use crate::pipeline::Gateway;

pub fn list(gw: &Gateway) -> Bytes {
    Bytes::from(json!({ "active": *gw.kills.list() }).to_string())
}

async fn record(gw: &Gateway, actor: &str, action: &str, s: &KillSwitch) {
    super::record_change(
        gw,
        crate::ledger::PluginChange {
            ts_ms: gw.clock.now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            slot: CHANGE_SLOT.to_string(),
            plugin: None,
            sha256: None,
            detail: serde_json::to_string(s).unwrap_or_default(),
        },
    )
    .await;
}

pub async fn set(gw: &Arc<Gateway>, actor: &str, raw: &[u8]) -> Result<Bytes, ApiError> {
    let bad = |m: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_kill_switch",
            m,
        )
    };
    let s: KillSwitch = serde_json::from_slice(raw).map_err(|e| bad(format!("{e}")))?;
    let s = gw.kills.set(s, actor, gw.clock.now_ms()).map_err(bad)?;
    tracing::warn!(id = %s.id, actor, "kill switch set: {}", serde_json::to_string(&s).unwrap_or_default());
    record(gw, actor, "kill", &s).await;
    Ok(Bytes::from(json!(s).to_string()))
}

pub async fn lift(gw: &Arc<Gateway>, actor: &str, id: &str) -> Result<Bytes, ApiError> {
    let Some(s) = gw.kills.lift(id) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no_kill_switch",
            format!("no active kill switch {id:?}"),
        ));
    };
    tracing::warn!(id = %s.id, actor, "kill switch lifted");
    record(gw, actor, "unkill", &s).await;
    Ok(Bytes::from(json!({ "lifted": s }).to_string()))
}
