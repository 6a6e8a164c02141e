//! From raw runs to what a reader wants: per contender and rate the median
//! and best of each figure over the repeats, the latency each adds over
//! calling the upstream directly (computed within a repeat, so both sides
//! saw the same machine), and the targets as ratios.

use std::fmt::Write as _;

use serde_json::{Map, Value, json};

const LATENCIES: [&str; 4] = ["p50_ms", "p90_ms", "p99_ms", "p999_ms"];
pub const FULL: &str = "tollgate+4 plugins+ledger";
pub const FLOOR: &str = "floor";
const DIRECT: &str = "direct";

fn load_key(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other
            .as_f64()
            .map_or_else(|| other.to_string(), |r| format!("{r}")),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `{median, best}` of `values`; best is the lowest unless `higher_is_better`.
fn stat(values: Vec<f64>, higher_is_better: bool) -> Value {
    let best = values
        .iter()
        .copied()
        .reduce(|a, b| if higher_is_better { a.max(b) } else { a.min(b) });
    json!({"median": round3(median(values)), "best": best.map(round3)})
}

fn num(run: &Value, key: &str) -> f64 {
    run[key].as_f64().unwrap_or(f64::NAN)
}

/// Contenders in the order they first appear.
fn contenders(runs: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in runs {
        let c = r["contender"].as_str().unwrap_or_default();
        if !out.iter().any(|x| x == c) {
            out.push(c.to_string());
        }
    }
    out
}

pub fn summarise(runs: &[Value], rates: &[f64]) -> Value {
    let names = contenders(runs);
    let mut loads: Vec<String> = rates.iter().map(|r| format!("{r}")).collect();
    loads.push("max".into());
    let mut by_load = Map::new();
    for load in &loads {
        let mut row = Map::new();
        for name in &names {
            let mine: Vec<&Value> = runs
                .iter()
                .filter(|r| r["contender"] == name.as_str() && load_key(&r["load"]) == *load)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let col = |k: &str| mine.iter().map(|r| num(r, k)).collect::<Vec<_>>();
            let mut s = Map::new();
            s.insert("repeats".into(), json!(mine.len()));
            s.insert(
                "error_rate".into(),
                json!(round3(median(col("error_rate")))),
            );
            let overloaded = median(col("error_rate")) >= 0.01;
            s.insert("overloaded".into(), json!(overloaded));
            s.insert(
                "answered_per_second".into(),
                stat(col("answered_per_second"), true),
            );
            for k in LATENCIES {
                s.insert(k.into(), stat(col(k), false));
            }
            if name != DIRECT {
                for k in LATENCIES {
                    let added: Vec<f64> = mine
                        .iter()
                        .filter_map(|r| {
                            let d = runs.iter().find(|d| {
                                d["contender"] == DIRECT
                                    && d["repeat"] == r["repeat"]
                                    && load_key(&d["load"]) == *load
                            })?;
                            Some(num(r, k) - num(d, k))
                        })
                        .collect();
                    if !added.is_empty() && load != "max" {
                        s.insert(format!("added_{k}"), stat(added, false));
                    }
                }
            }
            s.insert(
                "server_cpu_us_per_request".into(),
                stat(col("server_cpu_us_per_request"), false),
            );
            s.insert(
                "rss_mib".into(),
                json!(col("rss_mib").into_iter().fold(0.0, f64::max)),
            );
            s.insert("steal_percent".into(), json!(col("steal_percent")));
            row.insert(name.clone(), Value::Object(s));
        }
        by_load.insert(load.clone(), Value::Object(row));
    }
    json!({"contenders": names, "by_load": by_load})
}

fn at<'a>(summary: &'a Value, load: &str, contender: &str) -> &'a Value {
    &summary["by_load"][load][contender]
}

fn target(name: &str, value: f64, op: &str, limit: f64, detail: String) -> Value {
    let met = match op {
        "<=" => value <= limit,
        _ => value >= limit,
    };
    json!({"target": name, "value": round3(value), "limit": format!("{op} {limit}"), "met": value.is_finite() && met, "detail": detail})
}

/// The targets, each a ratio (or bound) within this run.
pub fn targets(summary: &Value, tokens: &Value) -> Value {
    let mut out = Vec::new();
    let med = |v: &Value| v["median"].as_f64().unwrap_or(f64::NAN);
    for load in ["1000", "5000"] {
        for p in ["p50_ms", "p90_ms"] {
            let full = med(&at(summary, load, FULL)[format!("added_{p}")]);
            let floor = med(&at(summary, load, FLOOR)[format!("added_{p}")]);
            out.push(target(
                &format!("added {} at {load} RPS ÷ floor's", &p[..3]),
                full / floor,
                "<=",
                1.3,
                format!("{full:.3} ms vs {floor:.3} ms (medians)"),
            ));
        }
    }
    let max_rps = |c: &str| med(&at(summary, "max", c)["answered_per_second"]);
    let (full, floor) = (max_rps(FULL), max_rps(FLOOR));
    out.push(target(
        "max RPS ÷ floor's",
        full / floor,
        ">=",
        0.8,
        format!("{full:.0} vs {floor:.0} (medians)"),
    ));
    let litellm_best = summary["by_load"]["max"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("litellm"))
        .filter_map(|(_, v)| v["answered_per_second"]["best"].as_f64())
        .fold(f64::NAN, f64::max);
    out.push(target(
        "max RPS ÷ LiteLLM's best",
        full / litellm_best,
        ">=",
        100.0,
        format!("{full:.0} vs {litellm_best:.0} (LiteLLM: best run of its best configuration)"),
    ));
    let cpu = |c: &str| med(&at(summary, "max", c)["server_cpu_us_per_request"]);
    let (cf, cl) = (cpu(FULL), cpu(FLOOR));
    out.push(target(
        "server CPU per request − floor's (µs)",
        cf - cl,
        "<=",
        15.0,
        format!("{cf:.0} µs vs {cl:.0} µs at saturation (medians)"),
    ));
    let rss = at(summary, "1000", FULL)["rss_mib"]
        .as_f64()
        .unwrap_or(f64::NAN);
    out.push(target(
        "RSS at 1000 RPS (MiB)",
        rss,
        "<=",
        100.0,
        "most seen during the 1000-RPS runs".into(),
    ));
    let ratio = tokens["ratio_messages"].as_f64().unwrap_or(f64::NAN);
    out.push(target(
        "token counting ÷ Python tiktoken",
        ratio,
        ">=",
        3.0,
        "o200k, the same text as chat messages, one thread each".into(),
    ));
    Value::Array(out)
}

fn fmt_ms(v: &Value) -> String {
    v["median"]
        .as_f64()
        .filter(|x| x.is_finite())
        .map_or_else(|| "-".into(), |x| format!("{x:.3}"))
}

/// The table printed at the end of a run (and pasted into the README).
pub fn table(result: &Value) -> String {
    let s = &result["summary"];
    let mut out = String::new();
    let names: Vec<&str> = s["contenders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let loads: Vec<String> = result["settings"]["rates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(load_key)
        .collect();
    let _ = writeln!(
        out,
        "Latency in ms, median of {} repeats (added = minus direct, same repeat)",
        result["settings"]["repeats"]
    );
    let _ = writeln!(
        out,
        "| contender | RPS | p50 | p90 | p99 | p99.9 | added p50 | added p90 | added p99 | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for load in &loads {
        for name in &names {
            let r = at(s, load, name);
            if r.is_null() {
                continue;
            }
            let err = r["error_rate"].as_f64().unwrap_or(0.0) * 100.0;
            let _ = writeln!(
                out,
                "| {name} | {load} | {} | {} | {} | {} | {} | {} | {} | {err:.1}%{} |",
                fmt_ms(&r["p50_ms"]),
                fmt_ms(&r["p90_ms"]),
                fmt_ms(&r["p99_ms"]),
                fmt_ms(&r["p999_ms"]),
                fmt_ms(&r["added_p50_ms"]),
                fmt_ms(&r["added_p90_ms"]),
                fmt_ms(&r["added_p99_ms"]),
                if r["overloaded"] == true {
                    " overloaded"
                } else {
                    ""
                },
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| contender | max RPS (median / best) | server CPU µs per request | peak RSS MiB |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for name in &names {
        let r = at(s, "max", name);
        let rss = result["peak_rss_mib"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["contender"] == *name)
            .and_then(|p| p["peak_rss_mib"].as_f64())
            .unwrap_or_else(|| {
                result["runs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|x| x["contender"] == *name)
                    .filter_map(|x| x["peak_rss_mib"].as_f64())
                    .fold(0.0, f64::max)
            });
        let _ = writeln!(
            out,
            "| {name} | {:.0} / {:.0} | {:.0} | {rss:.0} |",
            r["answered_per_second"]["median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["answered_per_second"]["best"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["server_cpu_us_per_request"]["median"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    let t = &result["token_counting"];
    if t["ratio_messages"].is_number() {
        let _ = writeln!(
            out,
            "\nToken counting (o200k, {} chat messages, {} tokens): Tollgate {:.1} MB/s ({:.1} MB/s with its word memo emptied before each pass), Python tiktoken {:.1} MB/s: {:.1}x ({:.1}x)",
            t["messages"],
            t["tokens"],
            t["tollgate_mb_per_s"],
            t["tollgate_first_sight_mb_per_s"]
                .as_f64()
                .unwrap_or(f64::NAN),
            t["tiktoken_mb_per_s"],
            t["ratio_messages"],
            t["ratio_first_sight"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let _ = writeln!(out, "\nTargets (this run):");
    for t in result["targets"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  [{}] {}: {} (want {}) — {}",
            if t["met"] == true { "met" } else { "MISSED" },
            t["target"].as_str().unwrap_or_default(),
            t["value"],
            t["limit"].as_str().unwrap_or_default(),
            t["detail"].as_str().unwrap_or_default(),
        );
    }
    let steal: Vec<f64> = result["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["steal_percent"].as_f64())
        .collect();
    if !steal.is_empty() {
        let _ = writeln!(
            out,
            "\nCPU steal per run: median {:.1}%, worst {:.1}%",
            median(steal.clone()),
            steal.iter().copied().fold(0.0, f64::max)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(c: &str, load: Value, repeat: usize, p50: f64, err: f64) -> Value {
        json!({"contender": c, "load": load, "repeat": repeat, "p50_ms": p50, "p90_ms": p50 * 2.0,
               "p99_ms": p50 * 3.0, "p999_ms": p50 * 4.0, "error_rate": err,
               "answered_per_second": 1000.0 / p50, "server_cpu_us_per_request": 10.0 * p50,
               "rss_mib": 20.0, "steal_percent": 0.5})
    }

    #[test]
    fn added_latency_is_taken_within_a_repeat() {
        let runs = vec![
            run(DIRECT, json!(1000.0), 0, 0.10, 0.0),
            run(FLOOR, json!(1000.0), 0, 0.30, 0.0),
            run(DIRECT, json!(1000.0), 1, 1.00, 0.0),
            run(FLOOR, json!(1000.0), 1, 1.10, 0.0),
            run(DIRECT, json!(1000.0), 2, 0.20, 0.0),
            run(FLOOR, json!(1000.0), 2, 0.35, 0.2),
        ];
        let s = summarise(&runs, &[1000.0]);
        let f = at(&s, "1000", FLOOR);
        // Per repeat: 0.2, 0.1, 0.15.
        assert_eq!(f["added_p50_ms"]["median"], 0.15);
        assert_eq!(f["added_p50_ms"]["best"], 0.1);
        assert_eq!(f["p50_ms"]["median"], 0.35);
        assert_eq!(f["overloaded"], false);
        assert!(at(&s, "1000", DIRECT)["added_p50_ms"].is_null());
    }

    #[test]
    fn targets_are_ratios_of_medians() {
        let mut runs = Vec::new();
        for load in [json!(1000.0), json!(5000.0), json!("max")] {
            runs.push(run(DIRECT, load.clone(), 0, 0.1, 0.0));
            runs.push(run(FLOOR, load.clone(), 0, 0.3, 0.0));
            runs.push(run(FULL, load.clone(), 0, 0.32, 0.0));
        }
        runs.push(run("litellm (1 worker)", json!("max"), 0, 20.0, 0.0));
        let s = summarise(&runs, &[1000.0, 5000.0]);
        let t = targets(&s, &json!({"ratio_messages": 4.0}));
        let find = |n: &str| {
            t.as_array()
                .and_then(|a| a.iter().find(|x| x["target"] == n))
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(find("added p50 at 1000 RPS ÷ floor's")["value"], 1.1);
        assert_eq!(find("added p50 at 1000 RPS ÷ floor's")["met"], true);
        assert_eq!(find("max RPS ÷ LiteLLM's best")["value"], 62.5);
        assert_eq!(find("max RPS ÷ LiteLLM's best")["met"], false);
        assert_eq!(find("token counting ÷ Python tiktoken")["met"], true);
        assert!(table(&json!({"summary": s, "targets": t, "settings": {"rates": [1000.0, 5000.0], "repeats": 1}, "runs": runs})).contains("| floor | 1000 |"));
    }
}
