//! How well semantic matching and the near-miss guard separate paraphrases
//! from different questions, measured on a labeled trace.
//!
//! ```sh
//! cargo run --release -p tollgate --example semantic_calibration -- target/trace.jsonl [max_chars] [kinds]
//! ```
//!
//! Requests are grouped by context as the gateway groups them (the model and
//! every message but the last user message); within a context every
//! distinct last user message (up to `max_chars`, default 400) is embedded
//! and matched against the others, as if all of them were cached. For each
//! text the closest other text is a would-be hit; the trace's labels say
//! whether it answers the same question (same group), a different one, or
//! a near miss (the other group is in `near_miss_of`). The table shows, per
//! threshold, how many would-be hits are right and wrong without and with
//! the guard, and which guard rules fired on paraphrases.

#![allow(clippy::print_stdout, clippy::print_stderr)] // the report is the output

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;
use tollgate::cache::near_miss;
use tollgate::embed::{Embedder, cosine};

/// A text's group, kind and near-miss groups, from the trace's labels.
type Labels = (String, String, Vec<String>);

struct Text {
    text: String,
    group: String,
    kind: String,
    near: Vec<String>,
    vector: Vec<f32>,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let trace = args
        .get(1)
        .map_or("target/trace.jsonl", String::as_str)
        .to_string();
    let max_chars: usize = args.get(2).map_or(Ok(400), |s| s.parse())?;
    // Only these kinds of request (comma-separated), e.g. `faq,personal`.
    let kinds: Option<Vec<String>> = args
        .get(3)
        .map(|k| k.split(',').map(String::from).collect());
    let model_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/models/all-MiniLM-L6-v2");
    let embedder = Embedder::load(&model_dir, 100_000)?;

    let mut contexts: HashMap<String, BTreeMap<String, Labels>> = HashMap::new();
    for line in std::fs::read_to_string(&trace)?.lines() {
        let r: Value = serde_json::from_str(line)?;
        let msgs = r["request"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let Some(last) = msgs.iter().rposition(|m| m["role"] == "user") else {
            continue;
        };
        let text = msgs[last]["content"].as_str().unwrap_or("").to_string();
        if text.chars().count() > max_chars {
            continue;
        }
        let mut rest = msgs.clone();
        rest.remove(last);
        let ctx = format!("{}|{}", r["request"]["model"], Value::Array(rest));
        let label = &r["label"];
        if let Some(k) = &kinds
            && !k.iter().any(|k| label["kind"] == k.as_str())
        {
            continue;
        }
        let near = label["near_miss_of"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        contexts.entry(ctx).or_default().insert(
            text,
            (
                label["group"].as_str().unwrap_or("").to_string(),
                label["kind"].as_str().unwrap_or("").to_string(),
                near,
            ),
        );
    }
    let mut groups: Vec<Vec<Text>> = Vec::new();
    let total: usize = contexts
        .values()
        .filter(|c| c.len() > 1)
        .map(BTreeMap::len)
        .sum();
    eprintln!("embedding {total} texts in {} contexts", contexts.len());
    let started = std::time::Instant::now();
    for texts in contexts.into_values().filter(|c| c.len() > 1) {
        let mut g = Vec::new();
        for (text, (group, kind, near)) in texts {
            let vector = embedder.embed(&text)?.to_vec();
            g.push(Text {
                text,
                group,
                kind,
                near,
                vector,
            });
        }
        groups.push(g);
    }
    eprintln!("embedded in {:.1} s", started.elapsed().as_secs_f64());

    // For every text: the other texts of its context, closest first.
    struct Match<'a> {
        q: &'a Text,
        ranked: Vec<(f32, &'a Text)>,
    }
    let mut matches = Vec::new();
    for g in &groups {
        for q in g {
            let mut ranked: Vec<(f32, &Text)> = g
                .iter()
                .filter(|o| !std::ptr::eq(*o, q))
                .map(|o| (cosine(&q.vector, &o.vector), o))
                .collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            ranked.truncate(4);
            matches.push(Match { q, ranked });
        }
    }
    println!("texts: {}", matches.len());
    println!(
        "{:>5} | {:>28} | {:>28} | guard refused (right / wrong)",
        "min", "no guard: right/wrong/near", "guard: right/wrong/near"
    );
    let mut fired_right: BTreeMap<(u32, String), usize> = BTreeMap::new();
    let mut wrong_examples: Vec<String> = Vec::new();
    let mut refused_examples: Vec<String> = Vec::new();
    for t in [0.70f32, 0.75, 0.80, 0.85, 0.88, 0.90, 0.92, 0.95] {
        let (mut r0, mut w0, mut n0, mut r1, mut w1, mut n1) = (0, 0, 0, 0, 0, 0);
        let (mut refused_r, mut refused_w) = (0, 0);
        for m in &matches {
            let above: Vec<&(f32, &Text)> = m.ranked.iter().filter(|(s, _)| *s >= t).collect();
            if let Some((_, o)) = above.first() {
                if o.group == m.q.group {
                    r0 += 1;
                } else {
                    w0 += 1;
                    n0 += usize::from(m.q.near.contains(&o.group));
                }
            }
            // The gateway tries the candidates in order and serves the first
            // the guard lets through.
            for (s, o) in &above {
                match near_miss::check(&m.q.text, &o.text, &[]) {
                    Some(why) => {
                        if o.group == m.q.group {
                            refused_r += 1;
                            if (t - 0.85).abs() < 1e-6 && refused_examples.len() < 40 {
                                refused_examples
                                    .push(format!("{s:.3} {why}: {:?} -> {:?}", m.q.text, o.text));
                            }
                            let rule = format!("{why}");
                            let rule = rule.split(':').next().unwrap_or("").to_string();
                            *fired_right.entry(((t * 100.0) as u32, rule)).or_default() += 1;
                        } else {
                            refused_w += 1;
                        }
                    }
                    None => {
                        if o.group == m.q.group {
                            r1 += 1;
                        } else {
                            w1 += 1;
                            n1 += usize::from(m.q.near.contains(&o.group));
                            if (t - 0.85).abs() < 1e-6 && wrong_examples.len() < 40 {
                                wrong_examples.push(format!(
                                    "{s:.3} [{}] {:?} ({}) -> {:?} ({})",
                                    m.q.kind, m.q.text, m.q.group, o.text, o.group
                                ));
                            }
                        }
                        break;
                    }
                }
            }
        }
        println!(
            "{t:>5.2} | {r0:>10} / {w0:>6} / {n0:>6} | {r1:>10} / {w1:>6} / {n1:>6} | {refused_r} / {refused_w}"
        );
    }
    println!("\nguard rules that refused a right match (threshold, rule): count");
    for ((t, rule), n) in fired_right {
        println!("  0.{t:02} {rule}: {n}");
    }
    println!("\nright matches the guard refused at 0.85 (first 40):");
    for w in refused_examples {
        println!("  {w}");
    }
    println!("\nwrong matches the guard let through at 0.85 (first 40):");
    for w in wrong_examples {
        println!("  {w}");
    }
    Ok(())
}
