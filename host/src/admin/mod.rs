//! The admin API, on its own listener (default 127.0.0.1:8081) so it can be
//! kept off the network applications reach. Every call needs
//! `Authorization: Bearer <token>`; the token comes from an environment
//! variable or a file, and without one the admin API does not start.
//!
//! * `GET /v1/spend?group_by=feature,model&since=YYYY-MM-DD&until=YYYY-MM-DD&tenant=T&top=N`:
//!   the `tollgate report` of the ledger, as JSON;
//! * `GET /v1/plugins`: every slot's plugin with its sha256, limits,
//!   capabilities, failure mode and counters, the versions loaded beside
//!   them and the slots' digest pins;
//! * loading, activating, rolling back and removing plugins: [`plugins`].
//! * `GET /v1/budgets`, `PUT /v1/budgets`: hard budgets at run time ([`budgets`]);
//! * `GET|POST /v1/kill`, `DELETE /v1/kill/{id}`: kill switches ([`kill`]);
//! * `POST /v1/config/reload`: re-reads the config file now
//!   ([`crate::reload`]); the answer says what was applied and what needs a
//!   restart, or why the edit was refused.

mod budgets;
mod cache;
mod kill;
mod plugins;
pub(crate) use plugins::record as record_change;
pub mod watch;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use crate::api::ApiError;
use crate::clock::{parse_day, parse_day_end};
use crate::config::AdminConfig;
use crate::pipeline::Gateway;
use crate::report;
use crate::server::{Body, error_response, json_response};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("admin token from {origin} is shorter than 16 characters")]
    WeakToken { origin: String },
}

/// The admin token, if one is configured: the file wins over the variable.
pub fn load_token(cfg: &AdminConfig) -> Result<Option<String>, AdminError> {
    let (token, origin) = if let Some(path) = &cfg.token_file {
        let t = std::fs::read_to_string(path).map_err(|source| AdminError::TokenFile {
            path: path.display().to_string(),
            source,
        })?;
        (Some(t.trim().to_string()), path.display().to_string())
    } else {
        (
            std::env::var(&cfg.token_env)
                .ok()
                .map(|t| t.trim().to_string()),
            format!("${}", cfg.token_env),
        )
    };
    match token {
        Some(t) if t.is_empty() => Ok(None),
        Some(t) if t.len() < 16 => Err(AdminError::WeakToken { origin }),
        other => Ok(other),
    }
}

fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Constant time, so the comparison leaks nothing about the token.
    bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

fn spend_query(query: Option<&str>) -> Result<report::Query, ApiError> {
    let mut q = report::Query {
        group_by: vec![report::Dim::Feature],
        ..report::Query::default()
    };
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let bad = |what: &str| {
            ApiError::invalid("invalid_value", format!("`{k}`: {what}")).param(k.to_string())
        };
        match k.as_ref() {
            "group_by" => q.group_by = report::parse_dims(&v).map_err(|e| bad(&e))?,
            "since" => q.since_ms = Some(parse_day(&v).ok_or_else(|| bad("expected YYYY-MM-DD"))?),
            "until" => {
                q.until_ms = Some(parse_day_end(&v).ok_or_else(|| bad("expected YYYY-MM-DD"))?)
            }
            "tenant" => q.tenant = Some(v.into_owned()),
            "top" => q.top = Some(v.parse().map_err(|_| bad("expected a whole number"))?),
            _ => {
                return Err(bad(
                    "unknown parameter (group_by, since, until, tenant, top)",
                ));
            }
        }
    }
    Ok(q)
}

/// Re-reads the config file now; refused edits answer 400 with the reason
/// and leave the running config as it was.
async fn reload_config(gw: &Arc<Gateway>, actor: &str) -> Result<Bytes, ApiError> {
    let Some(r) = gw.reloader.get() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "no_config_file",
            "the gateway was started without a config file; there is nothing to reload",
        ));
    };
    match r.reload(actor).await {
        Ok(report) => Ok(Bytes::from(
            serde_json::to_string(&report).unwrap_or_default(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "config_refused",
            format!("{e}; the running config stays"),
        )),
    }
}

async fn spend(gw: Arc<Gateway>, query: Option<String>) -> Result<Bytes, ApiError> {
    let q = spend_query(query.as_deref())?;
    let catalog = gw.live.load().catalog.clone();
    read_ledger(&gw, move |conn| {
        let rep = report::run(conn, &catalog, &q).map_err(|e| e.to_string())?;
        Ok(Bytes::from(rep.json()))
    })
    .await
}

/// Runs a read of the ledger off the async workers; 503 when the ledger is
/// off, 500 when the read fails.
async fn read_ledger(
    gw: &Gateway,
    read: impl FnOnce(&rusqlite::Connection) -> Result<Bytes, String> + Send + 'static,
) -> Result<Bytes, ApiError> {
    let path = ledger_path(gw)?;
    let internal = |m: String| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "ledger_read_failed",
            m,
        )
    };
    tokio::task::spawn_blocking(move || {
        let conn = crate::ledger::open_db(&path).map_err(|e| e.to_string())?;
        read(&conn)
    })
    .await
    .map_err(|e| internal(e.to_string()))?
    .map_err(internal)
}

/// Largest admin request body: a plugin upload, base64-encoded.
const MAX_ADMIN_BODY: usize = 64 << 20;

/// `/v1/plugins/{slot}[/load|/activate|/rollback]`.
async fn plugin_call(
    gw: &Arc<Gateway>,
    rest: &str,
    req: Request<Incoming>,
) -> Result<serde_json::Value, ApiError> {
    let (slot, action) = rest.split_once('/').unwrap_or((rest, ""));
    let slot = crate::plugins::SlotId::parse(slot).map_err(|m| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_slot",
            m,
        )
    })?;
    let method = req.method().clone();
    let who = plugins::actor(req.headers());
    let (_, body) = crate::server::read_body(req, MAX_ADMIN_BODY).await?;
    match (action, method) {
        ("load", Method::POST) => plugins::load(gw, slot, &who, &body).await,
        ("activate", Method::POST) => plugins::activate(gw, slot, &who, &body).await,
        ("rollback", Method::POST) => plugins::rollback(gw, slot, &who).await,
        ("shadow", Method::POST) => plugins::shadow(gw, slot, &who, Some(&body)).await,
        ("shadow", Method::DELETE) => plugins::shadow(gw, slot, &who, None).await,
        ("", Method::DELETE) => plugins::remove(gw, slot, &who).await,
        (_, m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            format!(
                "Unknown admin URL: {m} /v1/plugins/{rest} (POST .../load, .../activate, .../rollback, .../shadow; DELETE /v1/plugins/SLOT, /v1/plugins/SLOT/shadow)"
            ),
        )),
    }
}

/// `GET /v1/plugins/shadow?since=&until=&tenant=`: each shadow's agreement
/// rate and the cost difference it would have made.
async fn shadow_report(gw: Arc<Gateway>, query: Option<String>) -> Result<Bytes, ApiError> {
    let q = spend_query(query.as_deref())?;
    read_ledger(&gw, move |conn| {
        let lines = report::shadows(conn, &q).map_err(|e| e.to_string())?;
        Ok(Bytes::from(
            serde_json::json!({ "shadows": lines }).to_string(),
        ))
    })
    .await
}

/// The ledger file, or 503 when the ledger is off.
fn ledger_path(gw: &Gateway) -> Result<std::path::PathBuf, ApiError> {
    gw.ledger
        .as_ref()
        .map(|l| l.path().to_path_buf())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "ledger_disabled",
                "the ledger is disabled (ledger.enabled = false)",
            )
        })
}

async fn changes(gw: Arc<Gateway>, query: Option<String>) -> Result<Bytes, ApiError> {
    let mut limit = 100u32;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "invalid_value",
                            "`limit`: a whole number from 1 to 10000",
                        )
                        .param("limit")
                    })?;
            }
            _ => {
                return Err(ApiError::invalid(
                    "invalid_value",
                    format!("`{k}`: unknown parameter (limit)"),
                )
                .param(k.to_string()));
            }
        }
    }
    read_ledger(&gw, move |conn| {
        let list = crate::ledger::plugin_changes(conn, limit).map_err(|e| e.to_string())?;
        Ok(Bytes::from(
            serde_json::json!({ "changes": list }).to_string(),
        ))
    })
    .await
}

async fn route(gw: Arc<Gateway>, token: Arc<str>, req: Request<Incoming>) -> Response<Body> {
    if !authorized(&req, &token) {
        tracing::warn!(
            path = req.uri().path(),
            "admin call refused: missing or wrong bearer token"
        );
        return error_response(&ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_admin_token",
            "the admin API needs `Authorization: Bearer <admin token>`",
        ));
    }
    match dispatch(gw, req).await {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => error_response(&e),
    }
}

/// Runs an authorized admin call: the JSON body of its answer, or its error.
async fn dispatch(gw: Arc<Gateway>, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/v1/plugins/")
        && rest != "changes"
        && rest != "shadow"
    {
        return plugin_call(&gw, rest, req)
            .await
            .map(|v| Bytes::from(v.to_string()));
    }
    let who = plugins::actor(req.headers());
    if let Some(id) = path.strip_prefix("/v1/kill/")
        && req.method() == Method::DELETE
    {
        return kill::lift(&gw, &who, id).await;
    }
    let query = req.uri().query().map(str::to_string);
    match (path.as_str(), req.method().clone()) {
        ("/v1/kill", Method::GET) => Ok(kill::list(&gw)),
        ("/v1/kill", Method::POST) => {
            let (_, raw) = crate::server::read_body(req, MAX_ADMIN_BODY).await?;
            kill::set(&gw, &who, &raw).await
        }
        ("/v1/plugins", Method::GET) => {
            let mut v = gw.live.load().plugins.describe();
            let versions = gw.versions.lock().await.describe();
            if let (Some(o), serde_json::Value::Object(extra)) = (v.as_object_mut(), versions) {
                o.extend(extra);
            }
            Ok(Bytes::from(v.to_string()))
        }
        ("/v1/plugins/shadow", Method::GET) => shadow_report(gw, query).await,
        ("/v1/plugins/changes", Method::GET) => changes(gw, query).await,
        ("/v1/budgets", Method::GET) => Ok(budgets::list(&gw, query.as_deref())),
        ("/v1/budgets", Method::PUT) => {
            let (_, raw) = crate::server::read_body(req, MAX_ADMIN_BODY).await?;
            budgets::replace(&gw, &who, &raw).await
        }
        ("/v1/config/reload", Method::POST) => reload_config(&gw, &who).await,
        ("/v1/spend", Method::GET) => spend(gw, query).await,
        ("/v1/cache", Method::DELETE) => cache::invalidate(&gw, &who, query.as_deref()).await,
        (_, method) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            format!("Unknown admin URL: {method} {path}"),
        )),
    }
}

/// The admin API's HTTP handler.
pub fn handler(
    gw: Arc<Gateway>,
    token: String,
) -> impl Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    let token: Arc<str> = Arc::from(token);
    move |req| Box::pin(route(gw.clone(), token.clone(), req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spend_query_parses_and_refuses_nonsense() {
        let q = spend_query(Some(
            "group_by=tenant,day&since=2026-11-01&until=2026-11-01&top=5",
        ))
        .unwrap();
        assert_eq!(q.group_by, vec![report::Dim::Tenant, report::Dim::Day]);
        assert_eq!(q.until_ms.unwrap() - q.since_ms.unwrap(), 86_400_000);
        assert_eq!(q.top, Some(5));
        assert_eq!(
            spend_query(Some("group_by=colour"))
                .unwrap_err()
                .param
                .as_deref(),
            Some("group_by")
        );
        assert_eq!(
            spend_query(Some("since=yesterday"))
                .unwrap_err()
                .param
                .as_deref(),
            Some("since")
        );
        assert_eq!(
            spend_query(Some("limit=3")).unwrap_err().param.as_deref(),
            Some("limit")
        );
    }

    #[test]
    fn tokens_come_from_the_file_or_the_variable_and_must_not_be_weak() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "0123456789abcdef-long-enough\n").unwrap();
        let cfg = AdminConfig {
            token_file: Some(f.clone()),
            ..AdminConfig::default()
        };
        assert_eq!(
            load_token(&cfg).unwrap().as_deref(),
            Some("0123456789abcdef-long-enough")
        );
        std::fs::write(&f, "short").unwrap();
        assert!(matches!(
            load_token(&cfg),
            Err(AdminError::WeakToken { .. })
        ));
        let none = AdminConfig {
            token_env: "TOLLGATE_TEST_UNSET_ADMIN_TOKEN".into(),
            ..AdminConfig::default()
        };
        assert_eq!(load_token(&none).unwrap(), None);
    }
}
