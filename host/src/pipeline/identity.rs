//! Who a request is for, from the `x-tollgate-*` headers.

use http::{HeaderMap, HeaderName};

use crate::api::ApiError;
use crate::config::IdentityConfig;
use crate::headers as h;

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

fn value(headers: &HeaderMap, name: &HeaderName) -> Result<Option<String>, ApiError> {
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
        let step = match value(headers, &h::STEP)? {
            Some(s) => s.parse().map_err(|_| {
                ApiError::invalid(
                    "invalid_header",
                    "header x-tollgate-step must be a non-negative integer",
                )
            })?,
            None => 0,
        };
        let sim_output_tokens = match value(headers, &h::SIM_OUTPUT_TOKENS)? {
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
            if let Some(key) = name.as_str().strip_prefix(h::TAG_PREFIX)
                && let Some(v) = value(headers, name)?
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
        let or = |v: Option<String>, d: &String| v.unwrap_or_else(|| d.clone());
        Ok(Self {
            tenant: or(value(headers, &h::TENANT)?, &defaults.default_tenant),
            user: or(value(headers, &h::USER)?, &defaults.default_user),
            feature: or(value(headers, &h::FEATURE)?, &defaults.default_feature),
            task: value(headers, &h::TASK)?.unwrap_or_default(),
            step,
            tags,
            sim_output_tokens,
            sim_fault: value(headers, &h::SIM_FAULT)?,
            prompt_version: value(headers, &h::PROMPT_VERSION)?,
            deferrable: match value(headers, &h::DEFERRABLE)?.as_deref() {
                None | Some("false") | Some("0") => false,
                Some("true") | Some("1") => true,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "invalid_header",
                        "header x-tollgate-deferrable must be true or false",
                    ));
                }
            },
            callback_url: value(headers, &h::CALLBACK_URL)?,
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
