//! What the router reads from a request: structure (tools, JSON mode,
//! conversation depth, where the conversation is), size, and the kind of
//! work the last user message asks for, as families of generic English cue
//! words. No feature names an application, a feature tag or a sentence, so
//! a model trained on one application's traffic carries over to another.

use tollgate_sdk::RequestView;

/// Names of the features, in vector order (the config's weights follow it).
pub const NAMES: [&str; 21] = [
    "has_tools",
    "json_mode",
    "first_turn",
    "depth",
    "last_is_tool",
    "user_after_tools",
    "system_messages",
    "user_chars",
    "history_chars",
    "long_document",
    "numbers",
    "questions",
    "sentences",
    "cue_reasoning",
    "cue_calculation",
    "cue_brevity",
    "cue_trouble",
    "cue_several",
    "cue_making",
    "cue_judgement",
    "code_symbols",
];

pub const N: usize = NAMES.len();

/// Asks for an argument, a judgement or an explanation.
const REASONING: [&str; 18] = [
    "why",
    "explain",
    "reason",
    "recommend",
    "should we",
    "should i",
    "trade-off",
    "tradeoff",
    "pros and cons",
    "compare",
    "risk",
    "evaluate",
    "assess",
    "justify",
    "propose",
    "analy",
    "strategy",
    "plan ",
];
/// Asks for numbers to be worked out.
const CALCULATION: [&str; 16] = [
    "calculat",
    "compute",
    "how many",
    "how much",
    "how long",
    "estimate",
    "forecast",
    "project",
    "break-even",
    "break even",
    "payback",
    "ratio",
    "percent",
    "%",
    "per month",
    "what date",
];
/// Asks for a short answer ("quick question" is a greeting, not an ask).
const BREVITY: [&str; 8] = [
    "tl;dr",
    "tldr",
    "bullet",
    "one sentence",
    "one line",
    "brief",
    "in a sentence",
    "one paragraph",
];
/// Describes a failure to diagnose.
const TROUBLE: [&str; 13] = [
    "error",
    "fail",
    "exit code",
    "crash",
    "timeout",
    "timed out",
    "flaky",
    "not working",
    "broken",
    "denied",
    "out of memory",
    "stuck",
    "slow",
];
/// Several things at once.
const SEVERAL: [&str; 8] = [
    " and ", " also ", "both", "another", "second", "as well", "two ", "multiple",
];
/// Asks for something to be written or changed.
const MAKING: [&str; 12] = [
    "write", "draft", "rewrite", "fix", "add ", "change", "update", "sql", "script", "code",
    "function", "query",
];
/// Asks for critical review or a decision under uncertainty.
const JUDGEMENT: [&str; 10] = [
    "critic",
    "disagree",
    "gap",
    "inconsisten",
    "missing",
    "root cause",
    "prioriti",
    "which",
    "unresolved",
    "what would you",
];

/// Characters kept from each end of a long message when looking for cues:
/// the ask sits before or after a pasted document, and cue words inside
/// the document say nothing about the work asked for (scanning it all
/// would also cost time on every request).
const EDGE_CHARS: usize = 800;

/// The start and the end of `text`, or all of it when it is short.
fn edges(text: &str) -> String {
    let n = text.chars().count();
    if n <= 2 * EDGE_CHARS {
        return text.to_string();
    }
    let head: String = text.chars().take(EDGE_CHARS).collect();
    let tail: String = text.chars().skip(n - EDGE_CHARS).collect();
    format!("{head}\n{tail}")
}

fn cues(text: &str, words: &[&str]) -> f64 {
    words.iter().map(|w| text.matches(w).count()).sum::<usize>() as f64
}

fn ln1(x: f64) -> f64 {
    (1.0 + x).ln()
}

/// The feature vector of a request.
pub fn extract(req: &RequestView) -> [f64; N] {
    let msgs = &req.messages;
    let assistants = msgs.iter().filter(|m| m.role == "assistant").count();
    let tools = msgs.iter().filter(|m| m.role == "tool").count();
    let systems = msgs.iter().filter(|m| m.role == "system").count();
    let last_role = msgs.last().map_or("", |m| m.role.as_str());
    let user = req.last_user_message().unwrap_or("");
    let lower = edges(user).to_lowercase();
    let user_chars = user.chars().count() as f64;
    // The conversation before the last message, without system prompts:
    // their size says which application sent the request, not what it needs.
    let history_chars: usize = msgs
        .iter()
        .take(msgs.len().saturating_sub(1))
        .filter(|m| m.role != "system")
        .map(|m| m.content.len())
        .sum();
    let numbers = user
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ','))
        .filter(|t| t.chars().any(|c| c.is_ascii_digit()))
        .count() as f64;
    let sentences = user
        .split(['.', '?', '!', '\n'])
        .filter(|s| s.trim().len() > 3)
        .count() as f64;
    let code = user
        .chars()
        .filter(|c| matches!(c, '{' | '}' | ';' | '=' | '(' | ')' | '<' | '>'))
        .count() as f64;
    let b = |x: bool| f64::from(u8::from(x));
    [
        b(req.has_tools),
        b(req.json_mode),
        b(assistants == 0),
        ln1(assistants as f64),
        b(last_role == "tool"),
        b(last_role == "user" && tools > 0),
        systems as f64,
        ln1(user_chars),
        ln1(history_chars as f64),
        b(user_chars > 4000.0),
        ln1(numbers),
        (user.matches('?').count() as f64).min(5.0),
        ln1(sentences),
        cues(&lower, &REASONING),
        cues(&lower, &CALCULATION),
        cues(&lower, &BREVITY),
        cues(&lower, &TROUBLE),
        cues(&lower, &SEVERAL),
        cues(&lower, &MAKING),
        cues(&lower, &JUDGEMENT),
        ln1(code),
    ]
}
