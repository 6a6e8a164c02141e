//! The near-miss guard. Embeddings place "how do I add a seat" and "how do I
//! remove a seat" close together: they share every word but the one that
//! decides the answer. Before a semantic match is served, the two texts are
//! compared word by word and the match is refused when they differ in
//!
//! - a negation (one says not / never / without / can't, the other does not),
//! - a number (digits or number words: "2 seats" vs "5 seats"),
//! - a contrast: each side uses a different sense of one contrast group
//!   (add vs remove, enable vs disable, upgrade vs downgrade, monthly vs
//!   annual ...), from the built-in groups or the ones a cache policy adds,
//! - a direction: "from team to business" vs "from business to team",
//! - a swapped key word: both texts are the same content words except one
//!   word each ("billing email" vs "login email"); typing slips and
//!   inflections count as the same word, greetings and sign-offs not at all.
//!
//! It errs on the side of a miss: a refused paraphrase costs one upstream
//! call, a served near miss is a wrong answer. How often each rule fires on
//! paraphrases and on real near misses is measured by
//! `cargo run --release -p tollgate --example semantic_calibration`.

/// Why two texts are different questions.
#[derive(Debug, Clone, PartialEq)]
pub enum NearMiss {
    Negation,
    Number { a: Vec<String>, b: Vec<String> },
    Contrast { a: String, b: String },
    Swapped { a: String, b: String },
    Direction { a: String, b: String },
}

impl std::fmt::Display for NearMiss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NearMiss::Negation => write!(f, "one side is negated"),
            NearMiss::Number { a, b } => write!(f, "numbers differ: {a:?} vs {b:?}"),
            NearMiss::Contrast { a, b } => write!(f, "contrast: {a} vs {b}"),
            NearMiss::Swapped { a, b } => write!(f, "key word swapped: {a} vs {b}"),
            NearMiss::Direction { a, b } => write!(f, "direction: {a} vs {b}"),
        }
    }
}

/// Built-in contrast groups: within a group, each entry is one sense
/// (words separated by `|`, a space joins words that must follow each
/// other). Two texts using different senses of one group are different
/// questions. Inflections (-s, -es, -ed, -ing, doubled consonants, a dropped
/// final e) are matched automatically; nouns are listed.
const CONTRASTS: &[&[&str]] = &[
    &[
        "add|addition|insert|attach",
        "remove|removal|delete|deletion|detach|drop",
    ],
    &[
        "create|creation|generate|issue|make",
        "revoke|revocation|delete|deletion|invalidate|rotate|rotation",
    ],
    &[
        "enable|activate|activation|turn on|switch on",
        "disable|deactivate|deactivation|turn off|switch off",
        "clear|purge|flush|wipe|empty",
        "reset|recover|regenerate",
    ],
    &["upgrade", "downgrade"],
    &[
        "cancel|cancellation|terminate|termination|close",
        "pause|suspend|suspension|freeze|hold",
        "resume|unpause|reactivate|reactivation|restart|renew|renewal",
    ],
    &["import", "export"],
    &["upload", "download"],
    &[
        "increase|raise|extend|extension|grow|more|higher",
        "decrease|reduce|reduction|lower|shorten|shrink|less|fewer",
    ],
    &["start|begin|launch|trigger", "stop|halt|abort"],
    &["up|upward|upwards", "down|downward|downwards"],
    &[
        "retry|rerun|re-run|restart|redeliver|resend",
        "cancel|abort|stop",
    ],
    &["open|opening", "close|closing"],
    &["lock", "unlock"],
    &["show|display|unhide", "hide"],
    &[
        "allow|permit|whitelist|allowlist",
        "block|deny|forbid|blacklist|blocklist",
    ],
    &["accept|approve|approval", "reject|rejection|decline"],
    &["subscribe|subscription", "unsubscribe"],
    &["join", "leave"],
    &[
        "install|installation|setup|set up",
        "uninstall|uninstallation",
    ],
    &["encrypt|encryption", "decrypt|decryption"],
    &["archive", "unarchive|restore"],
    &["grant", "revoke|revocation"],
    &["charge|bill", "refund|reimburse|credit"],
    &["buy|purchase", "sell"],
    &[
        "send|sent|outgoing|outbound",
        "receive|received|incoming|inbound",
    ],
    &["public", "private"],
    &["internal", "external"],
    &["before", "after"],
    &["minimum|min|least", "maximum|max|most"],
    &["first|earliest|oldest", "last|latest|newest"],
    &[
        "daily|day",
        "weekly|week",
        "monthly|month",
        "annual|annually|yearly|year",
    ],
    &[
        "login|log in|sign in|signin|logon|log on",
        "logout|log out|sign out|signout",
    ],
    &[
        "password|passphrase",
        "two-factor|2fa|mfa|authenticator|otp",
    ],
    &["billing|invoice|invoices", "login|sign-in"],
    &["email|e-mail", "phone|sms"],
    &["account|profile", "workspace|organization|organisation|org"],
    &["project|repository|repo", "organization|organisation|org"],
    &[
        "included|include|includes|free",
        "overage|extra|additional|exceed|exceeded",
    ],
    &["used|spent|consumed", "left|remaining|remain"],
];

/// Words that turn a statement into its opposite.
const NEGATIONS: &[&str] = &[
    "not", "no", "never", "without", "none", "nothing", "nobody", "neither", "nor", "cannot",
    "unable",
];

/// Number words, read as the number they name ("one" is left out: "which
/// one" and "one of" are not amounts).
const NUMBER_WORDS: &[(&str, &str)] = &[
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
    ("eleven", "11"),
    ("twelve", "12"),
    ("fifteen", "15"),
    ("twenty", "20"),
    ("thirty", "30"),
    ("forty", "40"),
    ("fifty", "50"),
    ("hundred", "100"),
    ("thousand", "1000"),
    ("million", "1000000"),
    ("twice", "2"),
    ("double", "2"),
    ("half", "0.5"),
];

/// Words too common to decide a question, left out of the swapped-word rule.
const STOPWORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "i",
    "me",
    "my",
    "mine",
    "we",
    "us",
    "our",
    "you",
    "your",
    "it",
    "its",
    "this",
    "that",
    "these",
    "those",
    "there",
    "here",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "am",
    "do",
    "does",
    "did",
    "doing",
    "done",
    "have",
    "has",
    "had",
    "can",
    "could",
    "will",
    "would",
    "shall",
    "should",
    "may",
    "might",
    "must",
    "to",
    "of",
    "in",
    "on",
    "at",
    "for",
    "from",
    "with",
    "by",
    "about",
    "as",
    "into",
    "onto",
    "over",
    "under",
    "up",
    "down",
    "out",
    "off",
    "and",
    "or",
    "but",
    "if",
    "so",
    "then",
    "than",
    "what",
    "which",
    "who",
    "whom",
    "whose",
    "when",
    "where",
    "why",
    "how",
    "any",
    "some",
    "all",
    "each",
    "every",
    "just",
    "also",
    "please",
    "thanks",
    "thank",
    "hi",
    "hello",
    "hey",
    "get",
    "got",
    "need",
    "want",
    "like",
    "know",
    "tell",
    "way",
    "possible",
    "able",
    "there's",
    "it's",
    "i'm",
    "i've",
    "i'd",
    "what's",
    "how's",
    "one",
    "someone",
    "anyone",
    "something",
    "anything",
    "again",
    "still",
    "now",
    "new",
    "us",
    "them",
    "they",
    "their",
    "he",
    "she",
    "his",
    "her",
    "him",
    "ok",
    "okay",
    "quick",
    "question",
    "help",
    "guys",
    "team",
    "folks",
    "go",
    "use",
    "using",
    "via",
    "per",
    "let",
    // Greetings and sign-offs around the question.
    "thx",
    "ty",
    "cheers",
    "regards",
    "best",
    "lot",
    "advance",
    "appreciate",
    "appreciated",
    "asap",
    "support",
    "morning",
    "afternoon",
    "evening",
    "dear",
    "sorry",
    "quickly",
    "kindly",
];

const DETERMINERS: &[&str] = &[
    "a", "an", "the", "my", "our", "your", "their", "his", "her", "its", "this", "that", "these",
    "those", "one",
];

/// Lowercased words of `text`: letters, digits, inner apostrophes and
/// hyphens; "don't" reads as "do not", "can't" and "cannot" as "can not".
pub fn words(text: &str) -> Vec<String> {
    let lower = text.to_lowercase().replace(['’', '‘'], "'");
    let mut out = Vec::new();
    for raw in lower.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '-')) {
        let w = raw.trim_matches(|c| c == '\'' || c == '-');
        if w.is_empty() {
            continue;
        }
        match w {
            "cannot" | "can't" => {
                out.push("can".into());
                out.push("not".into());
            }
            "won't" => {
                out.push("will".into());
                out.push("not".into());
            }
            _ => {
                if let Some(base) = w.strip_suffix("n't") {
                    out.push(base.into());
                    out.push("not".into());
                } else if let Some(base) = w.strip_suffix("'s") {
                    out.push(base.into());
                } else {
                    out.push(w.into());
                }
            }
        }
    }
    out
}

/// Every inflection of `w` the contrast words match.
fn forms(w: &str) -> Vec<String> {
    let mut f = vec![
        w.to_string(),
        format!("{w}s"),
        format!("{w}es"),
        format!("{w}ed"),
        format!("{w}d"),
        format!("{w}ing"),
    ];
    if let Some(stem) = w.strip_suffix('e') {
        f.push(format!("{stem}ing"));
    }
    if let Some(stem) = w.strip_suffix('y') {
        f.push(format!("{stem}ies"));
        f.push(format!("{stem}ied"));
    }
    if let Some(last) = w.chars().last()
        && !"aeiouywx".contains(last)
    {
        f.push(format!("{w}{last}ed"));
        f.push(format!("{w}{last}ing"));
    }
    f
}

/// Whether `phrase` (one word, or words that must follow each other)
/// occurs in `ws`, inflections of its last word included.
fn contains(ws: &[String], phrase: &str) -> bool {
    let parts: Vec<&str> = phrase.split(' ').collect();
    let Some((last, head)) = parts.split_last() else {
        return false;
    };
    let last_forms = forms(last);
    ws.windows(parts.len()).any(|win| {
        win[..head.len()].iter().zip(head).all(|(w, p)| w == p)
            && (last_forms.iter().any(|f| *f == win[head.len()])
                || (last.len() >= 5 && typo_of(&win[head.len()], last, 1)))
    })
}

/// `w` is `of` with at most `edits` typing slips (the first letter right).
fn typo_of(w: &str, of: &str, edits: usize) -> bool {
    w.chars().next() == of.chars().next()
        && w.len().abs_diff(of.len()) <= edits
        && strsim::damerau_levenshtein(w, of) <= edits
}

/// Which senses of `group` the words use.
fn senses<'a>(ws: &[String], group: &[&'a str]) -> Vec<&'a str> {
    group
        .iter()
        .filter(|sense| sense.split('|').any(|p| contains(ws, p)))
        .copied()
        .collect()
}

fn first(sense: &str) -> String {
    sense.split('|').next().unwrap_or(sense).to_string()
}

fn numbers(ws: &[String]) -> Vec<String> {
    let mut n: Vec<String> = ws
        .iter()
        .filter_map(|w| {
            if let Some((_, d)) = NUMBER_WORDS.iter().find(|(word, _)| word == w) {
                return Some((*d).to_string());
            }
            let digits: String = w.chars().filter(|c| *c != ',').collect();
            (!digits.is_empty()
                && digits.chars().any(|c| c.is_ascii_digit())
                && digits.chars().all(|c| c.is_ascii_digit() || c == '.'))
            .then(|| digits.trim_end_matches('.').to_string())
        })
        .collect();
    n.sort();
    n
}

fn negated(ws: &[String]) -> bool {
    ws.iter().any(|w| NEGATIONS.contains(&w.as_str()))
}

/// Content words: no stopwords, negations or numbers.
fn content(ws: &[String]) -> Vec<&str> {
    let mut c: Vec<&str> = ws
        .iter()
        .map(String::as_str)
        .filter(|w| {
            !STOPWORDS.contains(w)
                && !NEGATIONS.contains(w)
                && !w
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.' || c == ',')
        })
        .collect();
    c.sort_unstable();
    c.dedup();
    c
}

/// The same word, give or take an inflection or a typo: equal after
/// dropping a plural or verb ending, or one edit apart when both are long.
fn same_word(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let trim = |w: &'_ str| -> String {
        for suf in ["ing", "ed", "es", "s"] {
            if let Some(stem) = w.strip_suffix(suf)
                && stem.chars().count() >= 3
            {
                return stem.trim_end_matches('e').to_string();
            }
        }
        w.trim_end_matches('e').to_string()
    };
    if trim(a) == trim(b) {
        return true;
    }
    match a.chars().count().min(b.chars().count()) {
        0..4 => false,
        4..7 => typo_of(a, b, 1),
        _ => typo_of(a, b, 2),
    }
}

/// The first content word after "from" and after "to" ("move from team to
/// business"): two texts naming the same two things in opposite directions
/// ask opposite questions.
fn direction(ws: &[String]) -> Option<(&str, &str)> {
    let after = |start: usize, word: &str| {
        let at = start + ws[start..].iter().position(|w| w == word)?;
        ws[at + 1..]
            .iter()
            .map(String::as_str)
            .find(|w| {
                !DETERMINERS.contains(w)
                    && !CONTRASTS
                        .iter()
                        .any(|g| !senses(&[w.to_string()], g).is_empty())
            })
            .map(|w| (at, w))
    };
    let (at, from) = after(0, "from")?;
    let (_, to) = after(at + 1, "to")?;
    Some((from, to))
}

/// The swapped-word rule: the content words of both texts are the same but
/// for exactly one word on each side, and at least two are shared.
fn swapped(a: &[String], b: &[String]) -> Option<(String, String)> {
    let (ca, cb) = (content(a), content(b));
    let only_a: Vec<&str> = ca
        .iter()
        .filter(|w| !cb.iter().any(|v| same_word(w, v)))
        .copied()
        .collect();
    let only_b: Vec<&str> = cb
        .iter()
        .filter(|w| !ca.iter().any(|v| same_word(w, v)))
        .copied()
        .collect();
    let shared = ca.len() - only_a.len();
    (only_a.len() == 1 && only_b.len() == 1 && shared >= 2)
        .then(|| (only_a[0].to_string(), only_b[0].to_string()))
}

/// Why `a` and `b` are different questions, or None when the guard finds no
/// difference. `extra` are a cache policy's own contrast groups (each a list
/// of words, one sense per word).
pub fn check(a: &str, b: &str, extra: &[Vec<String>]) -> Option<NearMiss> {
    let (wa, wb) = (words(a), words(b));
    if negated(&wa) != negated(&wb) {
        return Some(NearMiss::Negation);
    }
    let (na, nb) = (numbers(&wa), numbers(&wb));
    if na != nb {
        return Some(NearMiss::Number { a: na, b: nb });
    }
    let extra: Vec<Vec<&str>> = extra
        .iter()
        .map(|g| g.iter().map(String::as_str).collect())
        .collect();
    for group in CONTRASTS
        .iter()
        .copied()
        .chain(extra.iter().map(Vec::as_slice))
    {
        let (sa, sb) = (senses(&wa, group), senses(&wb, group));
        if !sa.is_empty() && !sb.is_empty() && sa != sb {
            let pick = |s: &[&str], other: &[&str]| {
                s.iter()
                    .find(|x| !other.contains(x))
                    .or(s.first())
                    .map(|x| first(x))
                    .unwrap_or_default()
            };
            return Some(NearMiss::Contrast {
                a: pick(&sa, &sb),
                b: pick(&sb, &sa),
            });
        }
    }
    if let (Some((fa, ta)), Some((fb, tb))) = (direction(&wa), direction(&wb))
        && same_word(fa, tb)
        && same_word(ta, fb)
        && !same_word(fa, ta)
    {
        return Some(NearMiss::Direction {
            a: format!("{fa} to {ta}"),
            b: format!("{fb} to {tb}"),
        });
    }
    swapped(&wa, &wb).map(|(a, b)| NearMiss::Swapped { a, b })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn miss(a: &str, b: &str) -> Option<NearMiss> {
        check(a, b, &[])
    }

    #[test]
    fn near_miss_pairs_from_the_workload_readme_are_refused() {
        for (a, b) in [
            (
                "How do I cancel my subscription?",
                "How do I pause my subscription?",
            ),
            (
                "How do I reset my password?",
                "How do I reset two-factor authentication?",
            ),
            ("How do I upgrade my plan?", "How do I downgrade my plan?"),
            ("How do I add a seat?", "How do I remove a seat?"),
            (
                "How do I create an API token?",
                "How do I revoke an API token?",
            ),
            (
                "How do I clear the build cache?",
                "How do I enable the build cache?",
            ),
            (
                "Can I get a refund on a monthly plan?",
                "Can I get a refund on an annual plan?",
            ),
            (
                "How do I change my billing email?",
                "How do I change my login email?",
            ),
            (
                "How do I install the CLI on my laptop?",
                "How do I install the CLI in a container?",
            ),
            (
                "how do i upgradde my plan",
                "hi, how do i downgrade my plan?",
            ),
            ("how to go up a plan", "how to go down a plan"),
            (
                "How do I turn on two-factor authentication?",
                "i'm new to the app. how do i reest two-factor authentication?",
            ),
            (
                "i want to move from team to business, how?",
                "I want to move from Business down to Team, how?",
            ),
        ] {
            assert!(miss(a, b).is_some(), "{a} / {b}");
            assert!(miss(b, a).is_some(), "{b} / {a}");
        }
    }

    #[test]
    fn paraphrases_pass() {
        for (a, b) in [
            ("How do I reset my password?", "how can i reset my password"),
            (
                "How do I reset my password?",
                "Password reset - how does it work?",
            ),
            (
                "What's the refund window?",
                "How long do I have to ask for a refund?",
            ),
            (
                "Hi! How do I add a seat to my team?",
                "adding a seat to our team, how?",
            ),
            (
                "How do I cancel my subscription?",
                "I'd like to cancel my subscription",
            ),
            (
                "I forgot my password, what do I do? Thanks a lot.",
                "I forgot my password, what do I do? Thank you in advance.",
            ),
            (
                "How do I change the biilling email?",
                "how do i change the billinng email?",
            ),
            (
                "Hey team, Do guests cont as paid seats?",
                "Do guests count as paid seats?",
            ),
        ] {
            assert_eq!(miss(a, b), None, "{a} / {b}");
        }
    }

    #[test]
    fn negations_numbers_and_inflections() {
        assert_eq!(
            miss("Can I export my data?", "Why can't I export my data?"),
            Some(NearMiss::Negation)
        );
        assert!(miss("What do 5 seats cost?", "What do five seats cost?").is_none());
        assert!(matches!(
            miss("What do 5 seats cost?", "What do 10 seats cost?"),
            Some(NearMiss::Number { .. })
        ));
        assert!(matches!(
            miss("Adding seats", "Removing seats"),
            Some(NearMiss::Contrast { .. })
        ));
        assert!(matches!(
            miss("cancelled builds", "paused builds"),
            Some(NearMiss::Contrast { .. })
        ));
        // "address" is not "add".
        assert!(!contains(&words("my address"), "add"));
        assert!(contains(&words("log in please"), "log in"));
    }

    #[test]
    fn a_policy_adds_its_own_contrasts() {
        let (a, b) = (
            "What does the gold tier include?",
            "What does the silver tier include?",
        );
        assert!(matches!(miss(a, b), Some(NearMiss::Swapped { .. })));
        let (a, b) = (
            "Tell me about the gold tier",
            "Tell me about the silver tier",
        );
        assert_eq!(miss(a, b), None, "one shared content word is too few");
        let extra = vec![vec!["gold".to_string(), "silver".to_string()]];
        assert!(matches!(
            check(a, b, &extra),
            Some(NearMiss::Contrast { .. })
        ));
    }
}
