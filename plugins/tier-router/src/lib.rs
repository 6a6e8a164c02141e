//! Routes each request to the cheapest model tier that can answer it, from
//! what the request itself shows: its structure (tools, JSON mode,
//! conversation depth, whether an agent is mid-task), its size, and what the
//! last user message asks for (see [`features`]). Two logistic models give
//! the probability that the request needs at least a mid-size model and at
//! least a premium one; the router takes the premium tier when that
//! probability reaches `threshold3`, the mid tier at `threshold2`, and the
//! small tier otherwise. A wrong cheap answer costs a failed task, so the
//! thresholds are low: when the router is unsure it pays for the bigger model.
//!
//! The weights are plugin data, trained offline on a labeled trace with
//! `cargo run -p tier-router --example train -- TRACE` (which prints this
//! config); the labels are never seen at run time. The feature tag is not
//! a feature, so the router carries over to applications it was not trained on.
//!
//! ```toml
//! [plugins.router.config]
//! features = ["has_tools", ...]        # must match this build's features
//! threshold2 = 0.3
//! threshold3 = 0.2
//! tier2 = { bias = -1.2, weights = [...] }
//! tier3 = { bias = -3.4, weights = [...] }
//! ```
//!
//! The model of each tier is the cheapest candidate of that tier (by list
//! price); if that call fails the next tier up is tried.

pub mod features;

use serde::Deserialize;
use tollgate_sdk::{ModelInfo, RequestView, RouteDecision, Router};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    features: Vec<String>,
    tier2: Option<Linear>,
    tier3: Option<Linear>,
    #[serde(default = "default_threshold")]
    threshold2: f64,
    #[serde(default = "default_threshold")]
    threshold3: f64,
}

fn default_threshold() -> f64 {
    0.5
}

/// A logistic model over the feature vector.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Linear {
    pub bias: f64,
    pub weights: Vec<f64>,
}

impl Linear {
    pub fn probability(&self, x: &[f64; features::N]) -> f64 {
        let z = self.bias + self.weights.iter().zip(x).map(|(w, v)| w * v).sum::<f64>();
        1.0 / (1.0 + (-z).exp())
    }
}

pub struct TierRouter {
    tier2: Linear,
    tier3: Linear,
    threshold2: f64,
    threshold3: f64,
}

impl TierRouter {
    pub fn from_config(config: &str) -> Result<Self, String> {
        let cfg: Config = tollgate_sdk::config(config)?;
        let (Some(tier2), Some(tier3)) = (cfg.tier2, cfg.tier3) else {
            return Err("needs a trained model: `tier2` and `tier3` \
                 (print one with `cargo run -p tier-router --example train -- TRACE`)"
                .into());
        };
        if cfg.features != features::NAMES {
            return Err(format!(
                "the model was trained on features {:?}, this build computes {:?}; retrain it",
                cfg.features,
                features::NAMES
            ));
        }
        for (name, m) in [("tier2", &tier2), ("tier3", &tier3)] {
            if m.weights.len() != features::N {
                return Err(format!(
                    "`{name}.weights` has {} values, expected {}",
                    m.weights.len(),
                    features::N
                ));
            }
            if !m.bias.is_finite() || m.weights.iter().any(|w| !w.is_finite()) {
                return Err(format!("`{name}` has a weight that is not a finite number"));
            }
        }
        for (name, t) in [
            ("threshold2", cfg.threshold2),
            ("threshold3", cfg.threshold3),
        ] {
            if !(0.0..=1.0).contains(&t) {
                return Err(format!("`{name}` must be between 0 and 1, not {t}"));
            }
        }
        Ok(Self {
            tier2,
            tier3,
            threshold2: cfg.threshold2,
            threshold3: cfg.threshold3,
        })
    }

    /// The tier this request needs, 1 to 3.
    pub fn tier(&self, x: &[f64; features::N]) -> u8 {
        if self.tier3.probability(x) >= self.threshold3 {
            3
        } else if self.tier2.probability(x) >= self.threshold2 {
            2
        } else {
            1
        }
    }
}

/// The cheapest candidate of each tier from `tier` up, cheapest first.
fn ladder(tier: u8, candidates: &[ModelInfo]) -> Vec<String> {
    let price = |m: &ModelInfo| m.input_per_mtok + m.output_per_mtok;
    (tier..=3)
        .filter_map(|t| {
            candidates
                .iter()
                .filter(|m| m.tier == t && price(m).is_finite())
                .min_by(|a, b| price(a).total_cmp(&price(b)))
                .map(|m| m.name.clone())
        })
        .take(2)
        .collect()
}

impl Router for TierRouter {
    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn route(&self, req: &RequestView, candidates: &[ModelInfo]) -> RouteDecision {
        let tier = self.tier(&features::extract(req));
        match ladder(tier, candidates).as_slice() {
            [] => RouteDecision::Keep,
            [one] => RouteDecision::UseModel(one.clone()),
            list => RouteDecision::Fallback(list.to_vec()),
        }
    }
}

tollgate_sdk::export_router!(TierRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_sdk::Message;

    fn view(messages: &[(&str, &str)], tools: bool) -> RequestView {
        RequestView {
            request_id: "r".into(),
            tenant: "t".into(),
            user: "u".into(),
            feature: "f".into(),
            task: String::new(),
            step: 0,
            model: "gpt-4o".into(),
            messages: messages
                .iter()
                .map(|(role, content)| Message {
                    role: role.to_string(),
                    content: content.to_string(),
                    text_only: true,
                })
                .collect(),
            prompt_tokens: 0,
            max_tokens: None,
            temperature: None,
            stream: false,
            has_tools: tools,
            json_mode: false,
            tags: vec![],
        }
    }

    fn model(name: &str, tier: u8, input: f64) -> ModelInfo {
        ModelInfo {
            name: name.into(),
            provider: "p".into(),
            tier,
            input_per_mtok: input,
            cached_input_per_mtok: input / 2.0,
            output_per_mtok: input * 4.0,
        }
    }

    /// A model that only looks at the reasoning and brevity cues.
    fn config() -> String {
        let mut w2 = vec![0.0; features::N];
        let mut w3 = vec![0.0; features::N];
        let at = |name: &str| features::NAMES.iter().position(|n| *n == name).unwrap();
        w2[at("cue_brevity")] = -4.0;
        w3[at("cue_reasoning")] = 3.0;
        serde_json::json!({
            "features": features::NAMES,
            "threshold2": 0.3, "threshold3": 0.2,
            "tier2": {"bias": 1.0, "weights": w2},
            "tier3": {"bias": -3.0, "weights": w3},
        })
        .to_string()
    }

    #[test]
    fn picks_the_cheapest_model_of_the_needed_tier_with_a_step_up() {
        let r = TierRouter::from_config(&config()).unwrap();
        let c = [
            model("big", 3, 2.5),
            model("mid", 2, 0.4),
            model("mid-dear", 2, 0.9),
            model("small", 1, 0.15),
        ];
        let ask = |text: &str| r.route(&view(&[("user", text)], false), &c);
        assert_eq!(
            ask("Why did revenue drop? Explain and recommend a fix."),
            RouteDecision::UseModel("big".into())
        );
        assert_eq!(
            ask("Summarize the notes"),
            RouteDecision::Fallback(vec!["mid".into(), "big".into()])
        );
        assert_eq!(
            ask("tl;dr in three bullets, short"),
            RouteDecision::Fallback(vec!["small".into(), "mid".into()])
        );
    }

    #[test]
    fn features_read_structure_and_cues() {
        let v = view(
            &[
                ("system", "You are an agent."),
                ("user", "Find failed payments and fix them. Why 3 times?"),
                ("assistant", ""),
                ("tool", "{\"ok\": true}"),
            ],
            true,
        );
        let x = features::extract(&v);
        let f = |name: &str| x[features::NAMES.iter().position(|n| *n == name).unwrap()];
        assert_eq!(f("has_tools"), 1.0);
        assert_eq!(f("first_turn"), 0.0);
        assert_eq!(f("last_is_tool"), 1.0);
        assert_eq!(f("questions"), 1.0);
        assert_eq!(f("cue_reasoning"), 1.0);
        assert_eq!(f("cue_trouble"), 1.0); // "failed"
        assert_eq!(f("cue_making"), 1.0); // "fix"
        assert_eq!(f("numbers"), 2f64.ln());
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(
            TierRouter::from_config("")
                .err()
                .unwrap()
                .contains("trained model")
        );
        let stale = config().replace("has_tools", "uses_tools");
        assert!(
            TierRouter::from_config(&stale)
                .err()
                .unwrap()
                .contains("retrain")
        );
        let bad = config().replace("\"threshold2\":0.3", "\"threshold2\":3.0");
        assert!(
            TierRouter::from_config(&bad)
                .err()
                .unwrap()
                .contains("between 0 and 1")
        );
    }
}
