//! `DELETE /v1/cache`: removes cached answers by tag, tenant or user, e.g.
//! after a help-centre article changes (`?tag=feature:docs`), when a
//! tenant's data must go (`?tenant=acme`), or for one user's private
//! answers (`?tenant=acme&user=ann`). Every removal is in the change log.

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;

use crate::api::ApiError;
use crate::cache::{AnswerStore, Invalidation};
use crate::pipeline::Gateway;

/// The change log's slot for cache invalidations.
const CHANGE_SLOT: &str = "cache";

pub async fn invalidate(gw: &Gateway, actor: &str, query: Option<&str>) -> Result<Bytes, ApiError> {
    let bad = |m: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_invalidation",
            m,
        )
    };
    let mut which = Invalidation::default();
    let mut all = false;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let v = v.into_owned();
        if v.is_empty() {
            return Err(bad(format!("`{k}` is empty")));
        }
        match &*k {
            "tag" => which.tag = Some(v),
            "tenant" => which.tenant = Some(v),
            "user" => which.user = Some(v),
            "all" if v == "true" => all = true,
            _ => {
                return Err(bad(format!(
                    "unknown parameter `{k}` (expected tag, tenant, user, or all=true)"
                )));
            }
        }
    }
    if which == Invalidation::default() && !all {
        return Err(bad(
            "name what to remove: tag, tenant and/or user (all=true empties the cache)".into(),
        ));
    }
    if which.user.is_some() && which.tenant.is_none() {
        return Err(bad(
            "`user` needs its `tenant`: users are named within a tenant".into(),
        ));
    }
    let removed = gw.cache.invalidate(&which);
    // Their questions leave the semantic index too.
    gw.semantic.retain(|k| gw.cache.get(k).is_some());
    tracing::info!(actor, ?which, removed, "cache entries invalidated");
    let detail = json!({
        "tag": which.tag, "tenant": which.tenant, "user": which.user, "all": all, "removed": removed,
    });
    super::record_change(
        gw,
        crate::ledger::PluginChange {
            ts_ms: gw.clock.now_ms(),
            actor: actor.to_string(),
            action: "invalidate".into(),
            slot: CHANGE_SLOT.to_string(),
            plugin: None,
            sha256: None,
            detail: detail.to_string(),
        },
    )
    .await;
    Ok(Bytes::from(json!({ "removed": removed }).to_string()))
}
