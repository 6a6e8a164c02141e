//! Decides when an answer may come from the cache and who may share it.
//!
//! * bypass: tools offered (answers depend on tool results), sampling
//!   temperature above `max_temperature`, a feature listed in
//!   `dynamic_features`, or a last user message asking about "now"
//!   (`dynamic_markers`: today, latest, current ...);
//! * private to one user (`tenant-user` scope): a feature in
//!   `personal_features`, a `personal` tag, or a last user message that
//!   speaks about the user (`personal_markers`: my, me, I ...);
//! * otherwise shared by the tenant (`tenant` scope). Answers are never
//!   shared across tenants: the host always keys the cache by tenant.
//!
//! Only answers that finished normally and are not empty are admitted.
//!
//! ```toml
//! [plugins.cache_policy.config]
//! ttl_seconds = 3600
//! max_temperature = 0.5          # absent temperature counts as cacheable
//! personal_features = ["account"]
//! dynamic_features = ["status"]
//! ```

use serde::Deserialize;
use tollgate_sdk::{
    CacheDecision, CacheLookup, CachePolicy, CacheScope, RequestView, ResponseMeta,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    ttl_seconds: u32,
    max_temperature: f32,
    personal_features: Vec<String>,
    dynamic_features: Vec<String>,
    personal_markers: Vec<String>,
    dynamic_markers: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect();
        Self {
            ttl_seconds: 3600,
            max_temperature: 0.5,
            personal_features: Vec::new(),
            dynamic_features: Vec::new(),
            personal_markers: words(&[
                "i", "i'm", "i've", "i'd", "me", "my", "mine", "myself", "our", "ours", "we",
            ]),
            dynamic_markers: words(&[
                "today",
                "tonight",
                "now",
                "currently",
                "current",
                "latest",
                "yesterday",
                "tomorrow",
                "this week",
                "right now",
            ]),
        }
    }
}

pub struct DefaultCachePolicy {
    cfg: Config,
    /// Markers split into lowercase words once, at init.
    personal: Vec<Vec<String>>,
    dynamic: Vec<Vec<String>>,
}

/// Lowercase `text` once; words are slices of it, split on anything that is
/// not a letter, a digit or an apostrophe (typographic ones normalised).
fn lowered(text: &str) -> String {
    text.to_lowercase().replace('’', "'")
}

fn words(lowered: &str) -> Vec<&str> {
    lowered
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .collect()
}

fn split_markers(markers: &[String]) -> Vec<Vec<String>> {
    markers
        .iter()
        .map(|m| m.split_whitespace().map(lowered).collect::<Vec<_>>())
        .filter(|parts| !parts.is_empty())
        .collect()
}

/// True when one of `markers` (a word, or several in a row) occurs in `ws`.
fn has_marker(ws: &[&str], markers: &[Vec<String>]) -> bool {
    markers.iter().any(|parts| {
        ws.windows(parts.len())
            .any(|win| win.iter().zip(parts).all(|(w, p)| w == p))
    })
}

impl DefaultCachePolicy {
    pub fn from_config(config: &str) -> Result<Self, String> {
        let cfg: Config = tollgate_sdk::config(config)?;
        if cfg.ttl_seconds == 0 {
            return Err("ttl_seconds must be at least 1".into());
        }
        Ok(Self {
            personal: split_markers(&cfg.personal_markers),
            dynamic: split_markers(&cfg.dynamic_markers),
            cfg,
        })
    }

    pub fn decide(
        &self,
        feature: &str,
        last_user: &str,
        temperature: Option<f32>,
        has_tools: bool,
        personal_tag: bool,
    ) -> CacheDecision {
        if has_tools {
            return CacheDecision::Bypass("tools offered".into());
        }
        if let Some(t) = temperature
            && t > self.cfg.max_temperature
        {
            return CacheDecision::Bypass(format!(
                "temperature {t} above {}",
                self.cfg.max_temperature
            ));
        }
        if self.cfg.dynamic_features.iter().any(|f| f == feature) {
            return CacheDecision::Bypass(format!("feature {feature} is dynamic"));
        }
        let lower = lowered(last_user);
        let ws = words(&lower);
        if has_marker(&ws, &self.dynamic) {
            return CacheDecision::Bypass("question about the present".into());
        }
        let personal = personal_tag
            || self.cfg.personal_features.iter().any(|f| f == feature)
            || has_marker(&ws, &self.personal);
        CacheDecision::Lookup(CacheLookup {
            scope: if personal {
                CacheScope::TenantUser
            } else {
                CacheScope::Tenant
            },
            ttl_seconds: self.cfg.ttl_seconds,
        })
    }
}

impl CachePolicy for DefaultCachePolicy {
    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn lookup(&self, req: &RequestView) -> CacheDecision {
        let personal_tag = matches!(req.tag("personal"), Some("1" | "true" | "yes"));
        self.decide(
            &req.feature,
            req.last_user_message().unwrap_or(""),
            req.temperature,
            req.has_tools,
            personal_tag,
        )
    }

    fn admit(&self, _req: &RequestView, response: &ResponseMeta) -> bool {
        response.finish_reason == "stop"
            && response.completion_tokens > 0
            && !response.content.trim().is_empty()
    }
}

tollgate_sdk::export_cache_policy!(DefaultCachePolicy);

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(d: CacheDecision) -> Option<CacheScope> {
        match d {
            CacheDecision::Lookup(l) => Some(l.scope),
            CacheDecision::Bypass(_) => None,
        }
    }

    #[test]
    fn impersonal_questions_share_the_tenant_scope() {
        let p = DefaultCachePolicy::from_config("").unwrap();
        let d = p.decide("faq", "How do I reset a password?", None, false, false);
        // "I" makes it personal: the safe side.
        assert_eq!(scope(d), Some(CacheScope::TenantUser));
        let d = p.decide("faq", "What is the refund window?", Some(0.0), false, false);
        assert_eq!(scope(d), Some(CacheScope::Tenant));
    }

    #[test]
    fn personal_and_dynamic_and_tools_and_hot_sampling() {
        let p = DefaultCachePolicy::from_config(
            r#"{"personal_features": ["account"], "dynamic_features": ["status"]}"#,
        )
        .unwrap();
        assert_eq!(
            scope(p.decide("account", "Show the plan", None, false, false)),
            Some(CacheScope::TenantUser)
        );
        assert_eq!(
            scope(p.decide("faq", "What's my balance?", None, false, false)),
            Some(CacheScope::TenantUser)
        );
        assert_eq!(
            scope(p.decide("faq", "Any plan", None, false, true)),
            Some(CacheScope::TenantUser)
        );
        assert_eq!(
            scope(p.decide("status", "Is it up", None, false, false)),
            None
        );
        assert_eq!(
            scope(p.decide("faq", "What is the latest release", None, false, false)),
            None
        );
        assert_eq!(scope(p.decide("faq", "Define X", None, true, false)), None);
        assert_eq!(
            scope(p.decide("faq", "Define X", Some(0.9), false, false)),
            None
        );
    }

    #[test]
    fn multi_word_markers_match_whole_words() {
        let p = DefaultCachePolicy::from_config(r#"{"dynamic_markers": ["right now"]}"#).unwrap();
        assert_eq!(
            scope(p.decide("faq", "what is happening right now?", None, false, false)),
            None
        );
        // "nowhere" is not "now".
        assert!(scope(p.decide("faq", "rightly nowhere", None, false, false)).is_some());
    }
}
