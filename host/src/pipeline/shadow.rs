//! Shadow plugins: beside the active plugin of a slot, a shadow gets the
//! same view and its decision is recorded next to the active one (agreed or
//! not, and for routers what the shadow's model would have cost), never
//! applied. A failing shadow changes nothing for the request.

use crate::ledger::{Row, ShadowRecord};
use crate::plugins::types::{
    CacheDecision, ModelInfo, RequestView, RouteDecision, SpendSnapshot, Verdict,
};
use crate::plugins::{Kind, PluginError, PluginSet, Slot};

fn record<K: Kind, T: PartialEq + std::fmt::Debug>(
    rec: &mut Row,
    slot: &Slot<K>,
    got: &Result<T, PluginError>,
    agrees: impl Fn(&T) -> bool,
    model: Option<String>,
) {
    let (decision, agrees) = match got {
        Ok(d) => (format!("{d:?}"), agrees(d)),
        Err(e) => (format!("failed ({}): {e}", e.reason()), false),
    };
    rec.shadow.push(ShadowRecord {
        slot: K::KIND.world().to_string(),
        plugin: slot.plugin.name().to_string(),
        digest: slot.plugin.digest().to_string(),
        decision,
        agrees,
        model,
        cost_usd: None,
    });
}

pub async fn budget(
    plugins: &PluginSet,
    view: &RequestView,
    spend: &SpendSnapshot,
    active: Option<&Verdict>,
    rec: &mut Row,
) {
    if let Some(s) = &plugins.shadow.budget_rule {
        let got = s.plugin.check(view, spend).await;
        record(rec, s, &got, |d| active == Some(d), None);
    }
}

pub async fn cache(
    plugins: &PluginSet,
    view: &RequestView,
    active: Option<&CacheDecision>,
    rec: &mut Row,
) {
    if let Some(s) = &plugins.shadow.cache_policy {
        let got = s.plugin.lookup(view).await;
        record(rec, s, &got, |d| active == Some(d), None);
    }
}

/// The model a routing decision sends the request to first.
fn first_model(d: &RouteDecision, default_model: &str) -> Option<String> {
    match d {
        RouteDecision::Keep => Some(default_model.to_string()),
        RouteDecision::UseModel(m) => Some(m.clone()),
        RouteDecision::Fallback(l) => l.first().cloned(),
        _ => None,
    }
}

/// `default_model` is what `keep` means for this request. Two routers
/// agree when they send the request to the same model first (a fallback
/// list behind it does not count), or make the same other decision.
pub async fn route(
    plugins: &PluginSet,
    view: &RequestView,
    candidates: &[ModelInfo],
    active: Option<&RouteDecision>,
    default_model: &str,
    rec: &mut Row,
) {
    if let Some(s) = &plugins.shadow.router {
        let got = s.plugin.route(view, candidates).await;
        let model = got
            .as_ref()
            .ok()
            .and_then(|d| first_model(d, default_model));
        let active_model = active.and_then(|d| first_model(d, default_model));
        let agrees = |d: &RouteDecision| match (&model, &active_model) {
            (Some(a), Some(b)) => a == b,
            _ => active == Some(d),
        };
        record(rec, s, &got, agrees, model.clone());
    }
}
