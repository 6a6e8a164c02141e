//! Decides when an answer may come from the cache and who may share it.
//!
//! * bypass: tools offered (answers depend on tool results), sampling
//!   temperature above `max_temperature`, a feature listed in
//!   `dynamic_features`, or a last user message asking about "now"
//!   (`dynamic_markers`: today, latest, current ...);
//! * private to one user (`tenant-user` scope): a feature in
//!   `personal_features`, a `personal` tag, context the application
//!   injected as a second system message (account data, say), or a last
//!   user message that speaks about the user (`personal_markers`: my, me,
//!   I ...) unless it asks how to do something (`how_to_markers`: "how do
//!   I", "can I" ... — "how do I reset my password" has one answer for
//!   everyone);
//! * otherwise shared by the tenant (`tenant` scope). Answers are never
//!   shared across tenants: the host always keys the cache by tenant.
//!
//! Only answers that finished normally and are not empty are admitted.
//!
//! With a `semantic` table, a differently worded question may be served a
//! stored answer (the host compares embeddings inside the same scope and
//! context and applies its near-miss guard). Only short questions qualify:
//! one or two lines up to `max_chars` characters, sampled at most at
//! `max_temperature`; a message longer than that is a document or a ticket
//! to process, where "similar" is not "the same answer".
//!
//! ```toml
//! [plugins.cache_policy.config]
//! ttl_seconds = 3600
//! feature_ttl_seconds = { pricing = 600 }   # TTL per route (feature)
//! max_temperature = 0.5          # absent temperature counts as cacheable
//! personal_features = ["account"]
//! dynamic_features = ["status"]
//! semantic = { min_similarity = 0.88, max_chars = 200, max_temperature = 0.5, features = [], contrasts = [["gold", "silver"]] }
//! ```

use std::collections::HashMap;

use serde::Deserialize;
use tollgate_sdk::{
    CacheDecision, CacheLookup, CachePolicy, CacheScope, RequestView, ResponseMeta, SemanticMatch,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    ttl_seconds: u32,
    feature_ttl_seconds: HashMap<String, u32>,
    semantic: Option<Semantic>,
    max_temperature: f32,
    personal_features: Vec<String>,
    dynamic_features: Vec<String>,
    personal_markers: Vec<String>,
    how_to_markers: Vec<String>,
    dynamic_markers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Semantic {
    min_similarity: f32,
    max_chars: usize,
    max_temperature: f32,
    /// Only these features (routes); empty: every feature.
    features: Vec<String>,
    /// Extra word groups for the host's near-miss guard.
    contrasts: Vec<Vec<String>>,
}

impl Default for Semantic {
    fn default() -> Self {
        Self {
            min_similarity: 0.88,
            max_chars: 200,
            max_temperature: 0.5,
            features: Vec::new(),
            contrasts: Vec::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect();
        Self {
            ttl_seconds: 3600,
            feature_ttl_seconds: HashMap::new(),
            semantic: None,
            max_temperature: 0.5,
            personal_features: Vec::new(),
            dynamic_features: Vec::new(),
            personal_markers: words(&[
                "i", "i'm", "i've", "i'd", "me", "my", "mine", "myself", "our", "ours", "we",
            ]),
            how_to_markers: words(&[
                "how do i",
                "how can i",
                "how should i",
                "how to",
                "how does",
                "where do i",
                "where can i",
                "where is",
                "can i",
                "is it possible",
                "is there a way",
                "what do i do",
                "what happens if",
                "do i need",
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
    markers: Markers,
}

/// The kinds of marker a question can contain, as bits of one mask.
const DYNAMIC: u8 = 1;
const PERSONAL: u8 = 2;
const HOW_TO: u8 = 4;

/// One marker split into lowercase words.
struct Marker {
    first: String,
    rest: Vec<String>,
    kind: u8,
}

/// Every marker of every kind, grouped by the length of its first word:
/// each word of a question is compared only with the few markers whose
/// first word is as long (string equality checks the length first, so these
/// comparisons are cheap), not with every marker of every kind. Grouping
/// by length beats a sorted list with binary search here: ordering strings
/// compares bytes, which in WebAssembly is a loop per byte.
struct Markers(Vec<Vec<Marker>>);

impl Markers {
    fn new(kinds: [(&[String], u8); 3]) -> Self {
        let mut by_len: Vec<Vec<Marker>> = Vec::new();
        for (markers, kind) in kinds {
            for m in markers {
                let mut words = m.split_whitespace().map(lowered);
                if let Some(first) = words.next() {
                    let len = first.len();
                    if by_len.len() <= len {
                        by_len.resize_with(len + 1, Vec::new);
                    }
                    by_len[len].push(Marker {
                        first,
                        rest: words.collect(),
                        kind,
                    });
                }
            }
        }
        Self(by_len)
    }

    /// The kinds of marker (a word, or several in a row) found in `ws`.
    fn found(&self, ws: &[&str]) -> u8 {
        let mut kinds = 0;
        for (i, w) in ws.iter().enumerate() {
            let Some(same_len) = self.0.get(w.len()) else {
                continue;
            };
            let following = &ws[i + 1..];
            // The first byte first: a whole-string comparison is a call.
            let first_byte = w.as_bytes().first();
            for m in same_len
                .iter()
                .filter(|m| m.first.as_bytes().first() == first_byte && m.first == *w)
            {
                if following.len() >= m.rest.len()
                    && following.iter().zip(&m.rest).all(|(a, b)| a == b)
                {
                    kinds |= m.kind;
                }
            }
        }
        kinds
    }
}

/// Lowercase `text` once; words are slices of it, split on anything that is
/// not a letter, a digit or an apostrophe (typographic ones normalised).
///
/// Most messages are ASCII, and handled byte by byte: compiled to
/// WebAssembly, Unicode case mapping and character classes cost several
/// times more per character than the byte tests.
fn lowered(text: &str) -> String {
    if text.is_ascii() {
        return text.to_ascii_lowercase();
    }
    let lower = text.to_lowercase();
    if lower.contains('’') {
        lower.replace('’', "'")
    } else {
        lower
    }
}

fn words(lowered: &str) -> Vec<&str> {
    if !lowered.is_ascii() {
        return unicode_words(lowered);
    }
    let mut out = Vec::new();
    let mut start = None;
    for (i, b) in lowered.bytes().enumerate() {
        match (b.is_ascii_alphanumeric() || b == b'\'', start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(&lowered[s..i]);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(&lowered[s..]);
    }
    out
}

fn unicode_words(lowered: &str) -> Vec<&str> {
    lowered
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .collect()
}

impl DefaultCachePolicy {
    pub fn from_config(config: &str) -> Result<Self, String> {
        let cfg: Config = tollgate_sdk::config(config)?;
        if cfg.ttl_seconds == 0 || cfg.feature_ttl_seconds.values().any(|t| *t == 0) {
            return Err("TTLs must be at least 1 second".into());
        }
        if let Some(s) = &cfg.semantic
            && !(s.min_similarity > 0.0 && s.min_similarity <= 1.0)
        {
            return Err("semantic.min_similarity must be in (0, 1]".into());
        }
        Ok(Self {
            markers: Markers::new([
                (&cfg.personal_markers, PERSONAL),
                (&cfg.how_to_markers, HOW_TO),
                (&cfg.dynamic_markers, DYNAMIC),
            ]),
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
        let found = self.markers.found(&ws);
        if found & DYNAMIC != 0 {
            return CacheDecision::Bypass("question about the present".into());
        }
        let personal = personal_tag
            || self.cfg.personal_features.iter().any(|f| f == feature)
            || (found & PERSONAL != 0 && found & HOW_TO == 0);
        CacheDecision::Lookup(CacheLookup {
            scope: if personal {
                CacheScope::TenantUser
            } else {
                CacheScope::Tenant
            },
            ttl_seconds: self
                .cfg
                .feature_ttl_seconds
                .get(feature)
                .copied()
                .unwrap_or(self.cfg.ttl_seconds),
            semantic: self.semantic(feature, last_user, &lower, temperature),
            tags: Vec::new(),
        })
    }

    /// Semantic matching for short questions on the routes it is on for.
    /// `lower` is `last_user` lowercased ([`lowered`]).
    fn semantic(
        &self,
        feature: &str,
        last_user: &str,
        lower: &str,
        temperature: Option<f32>,
    ) -> Option<SemanticMatch> {
        let s = self.cfg.semantic.as_ref()?;
        let question = last_user.trim();
        let short = !question.is_empty()
            && question.chars().count() <= s.max_chars
            && question.lines().filter(|l| !l.trim().is_empty()).count() <= 2;
        let cool = temperature.is_none_or(|t| t <= s.max_temperature);
        let on_route = s.features.is_empty() || s.features.iter().any(|f| f == feature);
        (short && cool && on_route).then(|| SemanticMatch {
            min_similarity: s.min_similarity,
            text: Some(question_text(lower)),
            contrasts: s.contrasts.clone(),
        })
    }
}

/// Words that only greet, thank or sign off.
const PLEASANTRIES: &[&str] = &[
    "hi",
    "hello",
    "hey",
    "hiya",
    "dear",
    "team",
    "there",
    "all",
    "folks",
    "guys",
    "support",
    "good",
    "morning",
    "afternoon",
    "evening",
    "thanks",
    "thank",
    "thx",
    "ty",
    "you",
    "so",
    "much",
    "a",
    "lot",
    "in",
    "advance",
    "cheers",
    "regards",
    "best",
    "appreciate",
    "appreciated",
    "the",
    "help",
    "please",
    "pls",
    "asap",
    "quick",
    "question",
    "i",
    "have",
    "kind",
    "kindly",
];

/// The question as the semantic cache compares it: lowercase, single
/// spaces, without greetings and sign-offs ("Hi team, ... Thanks a lot!"),
/// which move an embedding without changing what is asked. Sentences that
/// say something (context such as "I'm on the annual plan.") are kept.
/// `lower` is the message lowercased ([`lowered`]).
fn question_text(lower: &str) -> String {
    let only_pleasantries = |part: &str| {
        let ws = words(part);
        !ws.is_empty() && ws.iter().all(|w| PLEASANTRIES.contains(w))
    };
    let mut kept = Vec::new();
    for sentence in lower.split_inclusive(['.', '!', '?', '\n']) {
        // "Hi team, how do I ..." : a greeting clause before the first comma.
        let sentence = match sentence.split_once(',') {
            Some((head, rest)) if only_pleasantries(head) => rest,
            _ => sentence,
        };
        let bare = sentence.trim_matches(|c: char| !c.is_alphanumeric());
        if !bare.is_empty() && !only_pleasantries(bare) {
            kept.push(bare.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    if kept.is_empty() {
        return lower.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    kept.join(". ")
}

impl CachePolicy for DefaultCachePolicy {
    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn lookup(&self, req: &RequestView) -> CacheDecision {
        // Injected context (a second system message) is part of the cache
        // key already; the answer is kept private too, since it is about
        // whoever that context describes.
        let injected = req.messages.iter().filter(|m| m.role == "system").count() > 1;
        let personal_tag = injected || matches!(req.tag("personal"), Some("1" | "true" | "yes"));
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
    fn ascii_text_is_split_and_lowercased_like_any_other() {
        for text in [
            "",
            "How do I reset my password?",
            "  it's   MY account's key,please!! 42x ",
            "a",
            "'quoted' end'",
            "tabs\tand\nnew-lines_and_underscores",
        ] {
            assert_eq!(lowered(text), text.to_lowercase(), "{text:?}");
            assert_eq!(words(text), unicode_words(text), "{text:?}");
        }
        assert_eq!(lowered("Ünïcode’s"), "ünïcode's");
        assert_eq!(words("ünïcode's café"), vec!["ünïcode's", "café"]);
    }

    #[test]
    fn markers_of_one_or_several_words_are_found_wherever_they_start() {
        let p = DefaultCachePolicy::from_config("").unwrap();
        let found = |q: &str| {
            let lower = lowered(q);
            p.markers.found(&words(&lower))
        };
        assert_eq!(
            found("Is there a way to export my invoices?"),
            HOW_TO | PERSONAL
        );
        assert_eq!(found("how to rotate keys"), HOW_TO);
        assert_eq!(
            found("How can they rotate keys"),
            0,
            "\"how can\" alone is no marker"
        );
        assert_eq!(found("what changed right now"), DYNAMIC);
        assert_eq!(found("I’m locked out"), PERSONAL, "typographic apostrophe");
        assert_eq!(found("where is the billing page"), HOW_TO);
        assert_eq!(found("where"), 0, "a marker's first word at the end");
        assert_eq!(found(""), 0);
    }

    #[test]
    fn impersonal_questions_share_the_tenant_scope() {
        let p = DefaultCachePolicy::from_config("").unwrap();
        let d = p.decide("faq", "How do I reset my password?", None, false, false);
        assert_eq!(
            scope(d),
            Some(CacheScope::Tenant),
            "a how-to has one answer"
        );
        let d = p.decide("faq", "When does my plan renew?", None, false, false);
        assert_eq!(
            scope(d),
            Some(CacheScope::TenantUser),
            "about the user's own plan"
        );
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
    fn semantic_matching_only_for_short_cool_questions_on_its_routes() {
        let p = DefaultCachePolicy::from_config(
            r#"{"semantic": {"min_similarity": 0.9, "features": ["faq"]}, "feature_ttl_seconds": {"faq": 60}}"#,
        )
        .unwrap();
        let semantic = |feature: &str, text: &str, t: Option<f32>| match p
            .decide(feature, text, t, false, false)
        {
            CacheDecision::Lookup(l) => l.semantic.map(|s| (s.min_similarity, l.ttl_seconds)),
            CacheDecision::Bypass(_) => None,
        };
        assert_eq!(
            semantic("faq", "How is a seat billed?", None),
            Some((0.9, 60))
        );
        assert_eq!(semantic("docs", "How is a seat billed?", None), None);
        assert!(matches!(
            p.decide("faq", "Hi! How is a seat billed?", None, false, false),
            CacheDecision::Lookup(CacheLookup { semantic: Some(SemanticMatch { text: Some(t), .. }), .. })
                if t == "how is a seat billed"
        ));
        assert_eq!(semantic("faq", "How is a seat billed?", Some(0.7)), None);
        assert_eq!(semantic("faq", &"long ".repeat(60), None), None);
        assert_eq!(semantic("faq", "Ticket:\nline one\nline two", None), None);
        assert!(
            DefaultCachePolicy::from_config(r#"{"semantic": {"min_similarity": 1.5}}"#).is_err()
        );
        let exact_only = DefaultCachePolicy::from_config("").unwrap();
        assert!(matches!(
            exact_only.decide("faq", "How is a seat billed?", None, false, false),
            CacheDecision::Lookup(CacheLookup {
                semantic: None,
                ttl_seconds: 3600,
                ..
            })
        ));
    }

    #[test]
    fn the_compared_question_drops_greetings_and_sign_offs() {
        assert_eq!(
            question_text(&lowered(
                "Hi team, How do I reset my password?  Thanks a lot!"
            )),
            "how do i reset my password"
        );
        assert_eq!(
            question_text(&lowered(
                "Good morning, I'm on the annual plan. Can I get a refund? Cheers"
            )),
            "i'm on the annual plan. can i get a refund"
        );
        assert_eq!(question_text(&lowered("Thanks!")), "thanks!");
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
