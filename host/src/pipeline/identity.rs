//! Who a request is for, from the `x-tollgate-*` headers.

use http::HeaderMap;

use crate::api::ApiError;
use crate::config::IdentityConfig;

const MAX_LEN: usize = 256;
const MAX_TAGS: usize = 32;

#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub tenant: String,
    pub user: String,
    pub feature: String,
    pub task: String,
    pub step: u32,
    /// From `x-tollgate-tag-<key>` headers.
    pub tags: Vec<(String, String)>,
    /// Simulator controls; they reach the simulator only, never a plugin.
    pub sim_output_tokens: Option<u32>,
    pub sim_fault: Option<String>,
    /// `x-tollgate-prompt-version`: names the prompt for kill switches and
    /// the ledger (else a hash of the system messages is used).
    pub prompt_version: Option<String>,
    /// `x-tollgate-deferrable: true`: answer through a batch API, later.
    pub deferrable: bool,
    /// `x-tollgate-callback-url`: where a deferred result is POSTed.
    pub callback_url: Option<String>,
}

fn value(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    let s = v.to_str().map_err(|_| {
        ApiError::invalid(
            "invalid_header",
            format!("header {name} must be visible ASCII"),
        )
    })?;
    if s.len() > MAX_LEN {
        return Err(ApiError::invalid(
            "invalid_header",
            format!("header {name} is longer than {MAX_LEN} characters"),
        ));
    }
    let s = s.trim();
    Ok((!s.is_empty()).then(|| s.to_string()))
}

impl Identity {
    /// The identity of a request that sent no identity headers.
    pub fn defaults(cfg: &IdentityConfig) -> Self {
        Self {
            tenant: cfg.default_tenant.clone(),
            user: cfg.default_user.clone(),
            feature: cfg.default_feature.clone(),
            ..Self::default()
        }
    }

    pub fn from_headers(headers: &HeaderMap, defaults: &IdentityConfig) -> Result<Self, ApiError> {
        let step = match value(headers, "x-tollgate-step")? {
            Some(s) => s.parse().map_err(|_| {
                ApiError::invalid(
                    "invalid_header",
                    "header x-tollgate-step must be a non-negative integer",
                )
            })?,
            None => 0,
        };
        let sim_output_tokens = match value(headers, "x-tollgate-sim-output-tokens")? {
            Some(s) => Some(s.parse().map_err(|_| {
                ApiError::invalid(
                    "invalid_header",
                    "header x-tollgate-sim-output-tokens must be a non-negative integer",
                )
            })?),
            None => None,
        };
        let mut tags = Vec::new();
        for (name, _) in headers.iter() {
            if let Some(key) = name.as_str().strip_prefix("x-tollgate-tag-")
                && let Some(v) = value(headers, name.as_str())?
            {
                if tags.len() == MAX_TAGS {
                    return Err(ApiError::invalid(
                        "invalid_header",
                        format!("at most {MAX_TAGS} x-tollgate-tag-* headers"),
                    ));
                }
                tags.push((key.to_string(), v));
            }
        }
        let d = Self::defaults(defaults);
        Ok(Self {
            tenant: value(headers, "x-tollgate-tenant")?.unwrap_or(d.tenant),
            user: value(headers, "x-tollgate-user")?.unwrap_or(d.user),
            feature: value(headers, "x-tollgate-feature")?.unwrap_or(d.feature),
            task: value(headers, "x-tollgate-task")?.unwrap_or_default(),
            step,
            tags,
            sim_output_tokens,
            sim_fault: value(headers, "x-tollgate-sim-fault")?,
            prompt_version: value(headers, "x-tollgate-prompt-version")?,
            deferrable: match value(headers, "x-tollgate-deferrable")?.as_deref() {
                None | Some("false") | Some("0") => false,
                Some("true") | Some("1") => true,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "invalid_header",
                        "header x-tollgate-deferrable must be true or false",
                    ));
                }
            },
            callback_url: value(headers, "x-tollgate-callback-url")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_headers_with_defaults() {
        let mut h = HeaderMap::new();
        h.insert("x-tollgate-tenant", "acme".parse().unwrap());
        h.insert("x-tollgate-step", "3".parse().unwrap());
        h.insert("x-tollgate-tag-personal", "true".parse().unwrap());
        let id = Identity::from_headers(&h, &IdentityConfig::default()).unwrap();
        assert_eq!(
            (id.tenant.as_str(), id.user.as_str(), id.step),
            ("acme", "anonymous", 3)
        );
        assert_eq!(id.tags, vec![("personal".to_string(), "true".to_string())]);
        h.insert("x-tollgate-step", "x".parse().unwrap());
        assert_eq!(
            Identity::from_headers(&h, &IdentityConfig::default())
                .unwrap_err()
                .code,
            "invalid_header"
        );
    }
}
