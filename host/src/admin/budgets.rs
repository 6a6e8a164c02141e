//! Budgets at run time: `GET /v1/budgets` lists them (with `?tenant=`,
//! `feature=`, `user=`, `task=`: what that entity holds in each budget's
//! current window), `PUT /v1/budgets` replaces the list. A new list is
//! checked as a whole, swapped in atomically, and recorded in the change
//! log; it holds until the config file's `[[budgets]]` change.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};

use crate::api::ApiError;
use crate::budget::{BudgetConfig, Who};
use crate::pipeline::Gateway;

fn bad(code: &'static str, message: String) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        code,
        message,
    )
}

pub fn list(gw: &Gateway, query: Option<&str>) -> Bytes {
    let live = gw.live.load();
    let mut who = Who::default();
    let mut asked = false;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        asked = true;
        match &*k {
            "tenant" => who.tenant = v.into_owned(),
            "feature" => who.feature = v.into_owned(),
            "user" => who.user = v.into_owned(),
            "task" => who.task = v.into_owned(),
            _ => {}
        }
    }
    let now = gw.clock.now_ms();
    let budgets: Vec<Value> = live
        .config
        .budgets
        .iter()
        .map(|b| {
            let mut v = json!(b);
            v["name"] = json!(b.display_name());
            if asked {
                v["held_usd"] = json!(gw.spend.budget_spend(b, &who, now));
            }
            v
        })
        .collect();
    Bytes::from(json!({ "budgets": budgets }).to_string())
}

pub async fn replace(gw: &Arc<Gateway>, actor: &str, raw: &[u8]) -> Result<Bytes, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        budgets: Vec<BudgetConfig>,
    }
    let body: Body = serde_json::from_slice(raw).map_err(|e| {
        bad(
            "invalid_budgets",
            format!("expected {{\"budgets\": [...]}}: {e}"),
        )
    })?;
    crate::budget::check_budgets(&body.budgets)
        .map_err(|(i, m)| bad("invalid_budgets", format!("budgets[{i}]: {m}")))?;
    {
        // Plugin swaps, reloads and budget changes take turns.
        let _turn = gw.versions.lock().await;
        let live = gw.live.load_full();
        let mut config = (*live.config).clone();
        config.budgets = body.budgets.clone();
        gw.live.store(Arc::new(live.with_config(config)));
    }
    let names: Vec<String> = body.budgets.iter().map(|b| b.display_name()).collect();
    super::record_change(
        gw,
        crate::ledger::PluginChange {
            ts_ms: gw.clock.now_ms(),
            actor: actor.to_string(),
            action: "budgets".into(),
            slot: "budgets".into(),
            plugin: None,
            sha256: None,
            detail: format!("{} budgets: {}", names.len(), names.join(", ")),
        },
    )
    .await;
    Ok(list(gw, None))
}
