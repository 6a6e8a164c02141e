//! Trains the tier router offline on a labeled trace and prints its config.
//!
//!     cargo run -p tier-router --example train -- TRACE.jsonl [MAX_UNDER_ROUTED]
//!
//! Reads each request and its `label.tier_needed` (labels are read here,
//! offline, and never by the plugin), computes the plugin's own features,
//! fits two L2-regularised logistic models (needs tier >= 2, needs tier 3)
//! by Newton's method, and picks the two thresholds that minimise the
//! estimated cost (with providers' prompt caching of the system prompt, and
//! each under-routed request charged what a premium call costs on average,
//! since it loses a success) while sending at most MAX_UNDER_ROUTED
//! (default 1%) of the requests to a tier below the one they need. Thresholds are chosen on
//! out-of-fold predictions (two folds split by task), so they are not fitted
//! to requests the model has already seen. Prints the TOML for
//! `[plugins.router.config]` on stdout and the evaluation on stderr.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_range_loop // matrix code reads best with indices
)]

use std::io::BufRead;

use serde_json::Value;
use tier_router::features::{self, N};
use tier_router::{Linear, TierRouter};
use tollgate_sdk::{Message, RequestView};

/// USD per million tokens (input, cached input, output) of the cheapest
/// model per tier, for the cost estimate that picks thresholds.
const PRICES: [(f64, f64, f64); 3] = [(0.15, 0.075, 0.60), (0.40, 0.10, 1.60), (2.50, 1.25, 10.0)];
/// Providers cache a prompt prefix of at least this many tokens.
const PROMPT_CACHE_MIN_TOKENS: f64 = 1024.0;
const L2: f64 = 1.0;

struct Example {
    x: [f64; N],
    tier: u8,
    task: String,
    tokens_in: f64,
    /// Leading system prompt tokens, billed as cached input once warm.
    tokens_static: f64,
    tokens_out: f64,
}

fn view_of(body: &Value) -> RequestView {
    let messages = body["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let content = match &m["content"] {
                        Value::String(s) => s.clone(),
                        Value::Array(parts) => parts
                            .iter()
                            .filter_map(|p| p["text"].as_str())
                            .collect::<Vec<_>>()
                            .join("\n"),
                        _ => String::new(),
                    };
                    Message {
                        role: m["role"].as_str().unwrap_or("").into(),
                        content,
                        text_only: m.get("tool_calls").is_none(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let format = body["response_format"]["type"].as_str().unwrap_or("");
    RequestView {
        request_id: String::new(),
        tenant: String::new(),
        user: String::new(),
        feature: String::new(),
        task: String::new(),
        step: 0,
        model: body["model"].as_str().unwrap_or("").into(),
        messages,
        prompt_tokens: 0,
        max_tokens: None,
        temperature: None,
        stream: false,
        has_tools: body["tools"].as_array().is_some_and(|t| !t.is_empty()),
        json_mode: format == "json_object" || format == "json_schema",
        tags: vec![],
    }
}

fn read(path: &str) -> Vec<Example> {
    let file = std::fs::File::open(path).expect("cannot open the trace");
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let r: Value = serde_json::from_str(&line).expect("a trace line is not JSON");
            let body = &r["request"];
            let chars: usize = body["messages"]
                .as_array()
                .map(|ms| {
                    ms.iter()
                        .map(|m| m["content"].as_str().map_or(0, str::len))
                        .sum()
                })
                .unwrap_or(0);
            let system: usize = body["messages"]
                .as_array()
                .map(|ms| {
                    ms.iter()
                        .take_while(|m| m["role"] == "system")
                        .map(|m| m["content"].as_str().map_or(0, str::len))
                        .sum()
                })
                .unwrap_or(0);
            let static_tokens = system as f64 / 4.0;
            Example {
                x: features::extract(&view_of(body)),
                tier: r["label"]["tier_needed"]
                    .as_u64()
                    .expect("label.tier_needed") as u8,
                task: r["task"].as_str().unwrap_or("").into(),
                tokens_in: chars as f64 / 4.0,
                tokens_static: if static_tokens >= PROMPT_CACHE_MIN_TOKENS {
                    static_tokens
                } else {
                    0.0
                },
                tokens_out: r["label"]["expected_output_tokens"]
                    .as_f64()
                    .unwrap_or(100.0),
            }
        })
        .collect()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Solves A x = b (A symmetric positive definite) by Gaussian elimination.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for i in 0..n {
        let p = (i..n)
            .max_by(|&r, &s| a[r][i].abs().total_cmp(&a[s][i].abs()))
            .unwrap();
        a.swap(i, p);
        b.swap(i, p);
        for r in i + 1..n {
            let f = a[r][i] / a[i][i];
            for c in i..n {
                a[r][c] -= f * a[i][c];
            }
            b[r] -= f * b[i];
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|c| a[i][c] * x[c]).sum();
        x[i] = (b[i] - s) / a[i][i];
    }
    x
}

/// Logistic regression on standardised features; returns weights for the
/// raw features.
fn fit(data: &[&Example], positive: impl Fn(&Example) -> bool) -> Linear {
    let n = data.len() as f64;
    let mean: Vec<f64> = (0..N)
        .map(|j| data.iter().map(|e| e.x[j]).sum::<f64>() / n)
        .collect();
    let sd: Vec<f64> = (0..N)
        .map(|j| {
            let v = data.iter().map(|e| (e.x[j] - mean[j]).powi(2)).sum::<f64>() / n;
            if v > 1e-12 { v.sqrt() } else { 1.0 }
        })
        .collect();
    let z = |e: &Example| -> Vec<f64> {
        std::iter::once(1.0)
            .chain((0..N).map(|j| (e.x[j] - mean[j]) / sd[j]))
            .collect()
    };
    let rows: Vec<(Vec<f64>, f64)> = data
        .iter()
        .map(|e| (z(e), f64::from(u8::from(positive(e)))))
        .collect();
    let d = N + 1;
    let mut w = vec![0.0; d];
    for _ in 0..25 {
        let mut grad = vec![0.0; d];
        let mut hess = vec![vec![0.0; d]; d];
        for (x, y) in &rows {
            let p = sigmoid(x.iter().zip(&w).map(|(a, b)| a * b).sum());
            let s = (p * (1.0 - p)).max(1e-9);
            for i in 0..d {
                grad[i] += (p - y) * x[i];
                for j in 0..d {
                    hess[i][j] += s * x[i] * x[j];
                }
            }
        }
        for i in 1..d {
            grad[i] += L2 * w[i];
            hess[i][i] += L2;
        }
        let step = solve(hess, grad);
        let mut moved = 0.0f64;
        for i in 0..d {
            w[i] -= step[i];
            moved = moved.max(step[i].abs());
        }
        if moved < 1e-9 {
            break;
        }
    }
    let weights: Vec<f64> = (0..N).map(|j| w[j + 1] / sd[j]).collect();
    let bias = w[0] - (0..N).map(|j| w[j + 1] * mean[j] / sd[j]).sum::<f64>();
    Linear { bias, weights }
}

fn cost(e: &Example, tier: u8) -> f64 {
    let (i, c, o) = PRICES[usize::from(tier - 1)];
    ((e.tokens_in - e.tokens_static) * i + e.tokens_static * c + e.tokens_out * o) / 1e6
}

fn toml(m: &Linear, name: &str) -> String {
    let w: Vec<String> = m.weights.iter().map(|w| format!("{w:.5}")).collect();
    format!(
        "{name} = {{ bias = {:.5}, weights = [{}] }}",
        m.bias,
        w.join(", ")
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: train TRACE.jsonl [MAX_UNDER_ROUTED]");
    let max_under: f64 = args
        .get(2)
        .map_or(0.01, |s| s.parse().expect("a share such as 0.01"));
    let data = read(path);
    let fold = |e: &Example| {
        e.task
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
            % 2
    };

    // Out-of-fold probabilities for every request.
    let mut oof = vec![(0.0, 0.0); data.len()];
    for k in 0..2 {
        let train: Vec<&Example> = data.iter().filter(|e| fold(e) != k).collect();
        let m2 = fit(&train, |e| e.tier >= 2);
        let m3 = fit(&train, |e| e.tier >= 3);
        for (i, e) in data.iter().enumerate() {
            if fold(e) == k {
                oof[i] = (m2.probability(&e.x), m3.probability(&e.x));
            }
        }
    }
    let premium: f64 = data.iter().map(|e| cost(e, 3)).sum();
    // A request sent below its tier fails, and so does every later request
    // served its cached answer: count each one as losing what the premium
    // model would have cost, on top of the under-routing limit.
    let penalty = premium / data.len() as f64;
    let grid: Vec<f64> = [0.001, 0.002, 0.005, 0.01]
        .into_iter()
        .chain((1..=40).map(|i| f64::from(i) * 0.02))
        .collect();
    let mut best: Option<(f64, f64, f64, usize)> = None;
    for &t2 in &grid {
        for &t3 in &grid {
            let (mut c, mut under) = (0.0, 0usize);
            for (e, (p2, p3)) in data.iter().zip(&oof) {
                let tier = if *p3 >= t3 {
                    3
                } else if *p2 >= t2 {
                    2
                } else {
                    1
                };
                c += cost(e, tier);
                under += usize::from(tier < e.tier);
            }
            let ok = (under as f64) <= max_under * data.len() as f64;
            let score = c + penalty * under as f64;
            if ok && best.is_none_or(|b| score < b.2 + penalty * b.3 as f64) {
                best = Some((t2, t3, c, under));
            }
        }
    }
    let (t2, t3, c, under) = best.expect("no thresholds meet the under-routing limit");
    eprintln!(
        "{} requests; out-of-fold at threshold2 = {t2}, threshold3 = {t3:.2}: \
         {under} under-routed ({:.2}%), estimated cost {:.1}% of all-premium",
        data.len(),
        100.0 * under as f64 / data.len() as f64,
        100.0 * c / premium
    );

    let all: Vec<&Example> = data.iter().collect();
    let m2 = fit(&all, |e| e.tier >= 2);
    let m3 = fit(&all, |e| e.tier >= 3);
    let names: Vec<String> = features::NAMES.iter().map(|n| format!("{n:?}")).collect();
    let config = format!(
        "features = [{}]\nthreshold2 = {t2}\nthreshold3 = {t3:.2}\n{}\n{}\n",
        names.join(", "),
        toml(&m2, "tier2"),
        toml(&m3, "tier3")
    );
    // The printed config must load in the plugin as is.
    let json = serde_json::json!({
        "features": features::NAMES, "threshold2": t2, "threshold3": t3,
        "tier2": {"bias": m2.bias, "weights": m2.weights},
        "tier3": {"bias": m3.bias, "weights": m3.weights},
    });
    let router = TierRouter::from_config(&json.to_string()).expect("the trained config loads");
    let mut by_tier = [[0usize; 3]; 3];
    for e in &data {
        by_tier[usize::from(e.tier - 1)][usize::from(router.tier(&e.x) - 1)] += 1;
    }
    eprintln!("in-sample, needed tier (rows) vs routed tier (columns): {by_tier:?}");
    print!("{config}");
}
