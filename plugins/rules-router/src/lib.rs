//! Routes each request by ordered rules: the first rule whose conditions all
//! hold decides; otherwise the default applies.
//!
//! ```toml
//! [plugins.router.config]
//! default = "gpt-4o-mini"          # a model name, or "keep" for the model asked
//!
//! [[plugins.router.config.rules]]
//! name = "hard questions"
//! keywords = ["prove", "step by step", "analyze"]   # any of, case-insensitive, last user message
//! model = "gpt-4o"
//!
//! [[plugins.router.config.rules]]
//! name = "long context"
//! min_prompt_tokens = 3000
//! model = "gpt-4.1-mini"
//!
//! [[plugins.router.config.rules]]
//! name = "greeting"
//! regex = "^(hi|hello|thanks)[.!]*$"
//! respond = "Hello! How can I help?"
//! ```
//!
//! Conditions: `features`, `tenants` (any of), `keywords`, `regex` (on the
//! last user message), `min_prompt_tokens`, `max_prompt_tokens`,
//! `has_tools`, `json_mode`. Outcomes: `model`, `fallback` (a list),
//! `respond` (a fixed answer, no upstream call) or `reject` (a reason).

use regex_lite::Regex;
use serde::Deserialize;
use tollgate_sdk::{ModelInfo, RequestView, RouteDecision, Router};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    rules: Vec<RuleConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    min_prompt_tokens: Option<u32>,
    #[serde(default)]
    max_prompt_tokens: Option<u32>,
    #[serde(default)]
    has_tools: Option<bool>,
    #[serde(default)]
    json_mode: Option<bool>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    fallback: Option<Vec<String>>,
    #[serde(default)]
    respond: Option<String>,
    #[serde(default)]
    reject: Option<String>,
}

enum Outcome {
    Model(String),
    Fallback(Vec<String>),
    Respond(String),
    Reject(String),
}

impl Outcome {
    fn decision(&self) -> RouteDecision {
        match self {
            Outcome::Model(m) if m == "keep" => RouteDecision::Keep,
            Outcome::Model(m) => RouteDecision::UseModel(m.clone()),
            Outcome::Fallback(list) => RouteDecision::Fallback(list.clone()),
            Outcome::Respond(text) => RouteDecision::Respond(text.clone()),
            Outcome::Reject(reason) => RouteDecision::Reject(reason.clone()),
        }
    }
}

struct Rule {
    features: Vec<String>,
    tenants: Vec<String>,
    /// Lowercased once at init so matching is a plain substring search.
    keywords: Vec<String>,
    regex: Option<Regex>,
    min_prompt_tokens: Option<u32>,
    max_prompt_tokens: Option<u32>,
    has_tools: Option<bool>,
    json_mode: Option<bool>,
    outcome: Outcome,
}

/// The facts about a request that rules look at.
pub struct Facts<'a> {
    pub feature: &'a str,
    pub tenant: &'a str,
    pub last_user: &'a str,
    pub prompt_tokens: u32,
    pub has_tools: bool,
    pub json_mode: bool,
}

impl Rule {
    fn matches(&self, f: &Facts<'_>, last_user_lower: &str) -> bool {
        (self.features.is_empty() || self.features.iter().any(|x| x == f.feature))
            && (self.tenants.is_empty() || self.tenants.iter().any(|x| x == f.tenant))
            && (self.keywords.is_empty()
                || self.keywords.iter().any(|k| last_user_lower.contains(k)))
            && self.regex.as_ref().is_none_or(|r| r.is_match(f.last_user))
            && self.min_prompt_tokens.is_none_or(|n| f.prompt_tokens >= n)
            && self.max_prompt_tokens.is_none_or(|n| f.prompt_tokens <= n)
            && self.has_tools.is_none_or(|b| b == f.has_tools)
            && self.json_mode.is_none_or(|b| b == f.json_mode)
    }
}

pub struct RulesRouter {
    rules: Vec<Rule>,
    default: Outcome,
}

impl RulesRouter {
    pub fn from_config(config: &str) -> Result<Self, String> {
        let cfg: Config = tollgate_sdk::config(config)?;
        let mut rules = Vec::with_capacity(cfg.rules.len());
        for (i, r) in cfg.rules.into_iter().enumerate() {
            let label = r.name.clone().unwrap_or_else(|| format!("rules[{i}]"));
            let outcomes = [
                r.model.clone().map(Outcome::Model),
                r.fallback.clone().map(Outcome::Fallback),
                r.respond.clone().map(Outcome::Respond),
                r.reject.clone().map(Outcome::Reject),
            ];
            let mut chosen = outcomes.into_iter().flatten();
            let outcome = chosen.next().ok_or_else(|| {
                format!("{label}: needs one of `model`, `fallback`, `respond`, `reject`")
            })?;
            if chosen.next().is_some() {
                return Err(format!(
                    "{label}: give only one of `model`, `fallback`, `respond`, `reject`"
                ));
            }
            if let Outcome::Fallback(list) = &outcome
                && list.is_empty()
            {
                return Err(format!("{label}: `fallback` must name at least one model"));
            }
            let regex = match &r.regex {
                Some(src) => {
                    Some(Regex::new(src).map_err(|e| format!("{label}: bad `regex`: {e}"))?)
                }
                None => None,
            };
            rules.push(Rule {
                features: r.features,
                tenants: r.tenants,
                keywords: r.keywords.iter().map(|k| k.to_lowercase()).collect(),
                regex,
                min_prompt_tokens: r.min_prompt_tokens,
                max_prompt_tokens: r.max_prompt_tokens,
                has_tools: r.has_tools,
                json_mode: r.json_mode,
                outcome,
            });
        }
        let default = Outcome::Model(cfg.default.unwrap_or_else(|| "keep".to_string()));
        Ok(Self { rules, default })
    }

    pub fn decide(&self, facts: &Facts<'_>) -> RouteDecision {
        // Lowercased only when a rule has keywords to look for; ASCII (most
        // messages) byte by byte, which in WebAssembly costs a fraction of
        // Unicode case mapping.
        let lower = if !self.rules.iter().any(|r| !r.keywords.is_empty()) {
            String::new()
        } else if facts.last_user.is_ascii() {
            facts.last_user.to_ascii_lowercase()
        } else {
            facts.last_user.to_lowercase()
        };
        self.rules
            .iter()
            .find(|r| r.matches(facts, &lower))
            .map_or(&self.default, |r| &r.outcome)
            .decision()
    }
}

impl Router for RulesRouter {
    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn route(&self, req: &RequestView, _candidates: &[ModelInfo]) -> RouteDecision {
        self.decide(&Facts {
            feature: &req.feature,
            tenant: &req.tenant,
            last_user: req.last_user_message().unwrap_or(""),
            prompt_tokens: req.prompt_tokens,
            has_tools: req.has_tools,
            json_mode: req.json_mode,
        })
    }
}

tollgate_sdk::export_router!(RulesRouter);

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(text: &str, tokens: u32) -> Facts<'_> {
        Facts {
            feature: "chat",
            tenant: "acme",
            last_user: text,
            prompt_tokens: tokens,
            has_tools: false,
            json_mode: false,
        }
    }

    const CFG: &str = r#"{
        "default": "gpt-4o-mini",
        "rules": [
            {"name": "greeting", "regex": "(?i)^(hi|hello)[.!]*$", "respond": "Hello!"},
            {"name": "hard", "keywords": ["Step By Step", "prove"], "model": "gpt-4o"},
            {"name": "long", "min_prompt_tokens": 1000, "fallback": ["gpt-4.1-mini", "gpt-4o"]},
            {"name": "banned", "tenants": ["evil"], "reject": "tenant suspended"}
        ]
    }"#;

    #[test]
    fn first_matching_rule_wins_and_default_applies_otherwise() {
        let r = RulesRouter::from_config(CFG).unwrap();
        assert_eq!(
            r.decide(&facts("Hello!", 3)),
            RouteDecision::Respond("Hello!".into())
        );
        assert_eq!(
            r.decide(&facts("please PROVE this lemma", 2000)),
            RouteDecision::UseModel("gpt-4o".into())
        );
        assert_eq!(
            r.decide(&facts("summarise", 2000)),
            RouteDecision::Fallback(vec!["gpt-4.1-mini".into(), "gpt-4o".into()])
        );
        assert_eq!(
            r.decide(&facts("what time is it", 10)),
            RouteDecision::UseModel("gpt-4o-mini".into())
        );
        let mut f = facts("anything", 10);
        f.tenant = "evil";
        assert_eq!(
            r.decide(&f),
            RouteDecision::Reject("tenant suspended".into())
        );
    }

    #[test]
    fn bad_configs_are_refused_with_the_rule_named() {
        let err = RulesRouter::from_config(r#"{"rules":[{"name":"x","keywords":["a"]}]}"#)
            .err()
            .unwrap();
        assert!(err.contains("x: needs one of"), "{err}");
        let err = RulesRouter::from_config(r#"{"rules":[{"regex":"(","model":"m"}]}"#)
            .err()
            .unwrap();
        assert!(err.contains("rules[0]: bad `regex`"), "{err}");
        let err = RulesRouter::from_config(r#"{"rulez":[]}"#).err().unwrap();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn empty_config_keeps_the_asked_model() {
        let r = RulesRouter::from_config("").unwrap();
        assert_eq!(r.decide(&facts("x", 1)), RouteDecision::Keep);
    }
}
