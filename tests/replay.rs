//! `tollgate replay` end to end: the real binary replays a trace through its
//! in-process gateway, and the workload scorer (`score.py`, a copy in
//! tests/fixtures/workloads) must accept the run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

mod common;
use common::{read_jsonl, tollgate_ok};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// 2024-06-12T00:00:00Z, the day the trace's t_ms count from.
const DAY_START_MS: u64 = 1_718_150_400_000;

fn score(trace: &Path, run: &Path) -> Value {
    let out = Command::new("python3")
        .arg(fixture("workloads/score.py"))
        .args(["--trace".as_ref(), trace.as_os_str()])
        .args(["--run".as_ref(), run.as_os_str()])
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "score.py refused the run:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_cost_saver_replay_is_scored_and_matches_its_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let trace = fixture("replay-trace.jsonl");
    let run = dir.path().join("run.jsonl");
    let ledger = dir.path().join("run.sqlite");
    let config = root().join("examples/cost-saver/tollgate.toml");
    let out = tollgate_ok(&[
        "replay",
        "--trace",
        s(&trace),
        "--config",
        s(&config),
        "--out",
        s(&run),
        "--ledger",
        s(&ledger),
        "--day",
        "2024-06-12",
    ]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("== replay: cost-saver"), "{summary}");
    assert!(summary.contains("total cost"), "{summary}");

    let rep = score(&trace, &run);
    let records = read_jsonl(&run);
    let requests = read_jsonl(&trace);
    assert_eq!(rep["missing_ids"], 0);
    assert_eq!(records.len(), requests.len());
    assert_eq!(rep["personal_leaks"], 0);
    assert_eq!(rep["wrong_cache_hits"], 0);
    assert_eq!(rep["noncausal_cache_hits"], 0);
    assert!(rep["served"]["cache"].as_u64().unwrap() >= 1, "{rep}");
    assert!(
        rep["cpst_ratio"].as_f64().unwrap() < 0.5,
        "the cost levers should at least halve CPST: {rep}"
    );
    // Every non-runaway request succeeds; the runaway agent is stopped by
    // the loop detector after five calls.
    let runaway: Vec<&Value> = requests
        .iter()
        .zip(&records)
        .filter(|(t, _)| t["label"]["runaway"] == true)
        .map(|(_, r)| r)
        .collect();
    let served: Vec<&str> = runaway
        .iter()
        .map(|r| r["served"].as_str().unwrap())
        .collect();
    assert_eq!(
        served,
        [
            "model", "model", "model", "model", "model", "blocked", "blocked", "blocked"
        ]
    );
    assert_eq!(
        rep["successes"].as_u64().unwrap() as usize,
        requests.len() - runaway.len(),
        "{rep}"
    );

    // The ledger agrees with the run, on the trace's clock.
    let conn = tollgate::ledger::open_db(&ledger).unwrap();
    let (rows, cost): (i64, f64) = conn
        .query_row("SELECT COUNT(*), TOTAL(cost_usd) FROM requests", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(rows as usize, requests.len());
    assert!(
        (cost - rep["total_cost_usd"].as_f64().unwrap()).abs() < 1e-9,
        "ledger ${cost} vs run ${}",
        rep["total_cost_usd"]
    );
    let (first, last): (i64, i64) = conn
        .query_row("SELECT MIN(ts_ms), MAX(ts_ms) FROM requests", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let t = |r: &Value| DAY_START_MS + r["t_ms"].as_u64().unwrap();
    assert_eq!(first as u64, t(&requests[0]));
    assert_eq!(last as u64, t(requests.last().unwrap()));
    let blocked: String = conn
        .query_row(
            "SELECT error_code FROM requests WHERE status = 400 LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(blocked, "loop_detected");
}

/// A trace of the same questions over three hours of trace time.
fn timed_trace(path: &Path) {
    let system = "You answer questions about the product. ".repeat(120); // ~1,200 tokens
    let ask = |id: &str, t_min: u64, question: &str| {
        json!({
            "id": id, "t_ms": t_min * 60_000, "tenant": "acme", "user": "u1",
            "feature": "faq", "task": id,
            "request": {"model": "gpt-4o", "temperature": 0.0, "max_tokens": 100, "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question}]},
            "label": {"expected_output_tokens": 40}
        })
        .to_string()
    };
    let lines = [
        ask("r1", 0, "How do I reset my password?"),
        ask("r2", 5, "How do I export invoices?"),
        ask("r3", 30, "How do I reset my password?"),
        ask("r4", 55, "How do I add a seat?"),
        ask("r5", 180, "How do I reset my password?"),
    ];
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn cache_and_prompt_cache_expire_on_the_traces_clock() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    timed_trace(&trace);
    let config = dir.path().join("policy.toml");
    std::fs::write(
        &config,
        format!(
            "[plugins.cache_policy]\npath = {:?}\nconfig = {{ ttl_seconds = 3600 }}\n",
            root().join("target/plugins/default_cache_policy.wasm")
        ),
    )
    .unwrap();
    let run = dir.path().join("run.jsonl");
    let started = std::time::Instant::now();
    tollgate_ok(&[
        "replay",
        "--trace",
        s(&trace),
        "--config",
        s(&config),
        "--out",
        s(&run),
    ]);
    assert!(
        started.elapsed().as_secs() < 30,
        "three hours of trace must not take hours"
    );
    let r = read_jsonl(&run);
    let served: Vec<&str> = r.iter().map(|x| x["served"].as_str().unwrap()).collect();
    // r3 comes 30 trace-minutes after r1: inside the 1-hour TTL, a hit.
    // r5 comes 3 trace-hours after r1: expired, answered by the model again.
    assert_eq!(served, ["model", "model", "cache", "model", "model"]);
    assert_eq!(r[2]["origin"], "r1");
    // The simulator's prompt cache: the system prompt sent at minute 0 is
    // warm at minute 5, still warm at 55 (the miss at 30 is a cache hit with
    // no call)... and cold at 180, idle for more than 10 minutes.
    let cached = |i: usize| r[i]["calls"][0]["cached_prompt_tokens"].as_u64().unwrap();
    assert_eq!(cached(0), 0);
    assert!(cached(1) >= 1024, "{}", r[1]);
    assert_eq!(cached(3), 0, "idle 50 minutes: cold again");
    assert_eq!(cached(4), 0);
    score_accepts_synthetic(&trace, &run);
}

/// score.py needs labels; give the synthetic trace complete ones.
fn score_accepts_synthetic(trace: &Path, run: &Path) {
    let labeled = trace.with_extension("labeled.jsonl");
    let text: Vec<String> = read_jsonl(trace)
        .into_iter()
        .map(|mut r| {
            let q = r["request"]["messages"][1]["content"].clone();
            r["label"] = json!({"kind": "faq", "tier_needed": 1, "group": q, "personal": false,
                "cacheable": true, "expected_output_tokens": 40, "near_miss_of": [], "runaway": false});
            r.to_string()
        })
        .collect();
    std::fs::write(&labeled, text.join("\n") + "\n").unwrap();
    let rep = score(&labeled, run);
    assert_eq!(rep["successes"], 5, "{rep}");
}

#[test]
fn compare_shows_two_policy_sets_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let trace = fixture("replay-trace.jsonl");
    let out = tollgate_ok(&[
        "replay",
        "--trace",
        s(&trace),
        "--compare",
        s(&root().join("examples/baseline.toml")),
        s(&root().join("examples/cost-saver/tollgate.toml")),
        "--out",
        s(dir.path()),
        "--day",
        "2024-06-12",
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("baseline") && header.contains("cost-saver"),
        "{table}"
    );
    let total = table.lines().find(|l| l.starts_with("total cost")).unwrap();
    let ratio: f64 = total.rsplit('x').next().unwrap().trim().parse().unwrap();
    assert!(ratio < 0.6, "{table}");
    assert!(table.contains("cost of feature support-faq"), "{table}");
    let base = score(&trace, &dir.path().join("baseline.jsonl"));
    let saver = score(&trace, &dir.path().join("cost-saver.jsonl"));
    assert!(saver["cpst_usd"].as_f64() < base["cpst_usd"].as_f64());
}

#[test]
fn a_bad_trace_line_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("bad.jsonl");
    std::fs::write(
        &trace,
        "{\"id\":\"a\",\"t_ms\":1,\"request\":{\"model\":\"gpt-4o\",\"messages\":[]}}\nnot json\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "replay",
            "--trace",
            s(&trace),
            "--config",
            s(&root().join("examples/baseline.toml")),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("not JSON"), "{err}");
}

#[test]
fn speed_paces_the_replay_in_wall_time() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    let line = |id: &str, t_ms: u64| {
        json!({"id": id, "t_ms": t_ms, "request": {"model": "gpt-4o",
            "messages": [{"role": "user", "content": format!("question {id}")}]}})
        .to_string()
    };
    // Four trace-seconds at 2x real time: about two wall seconds.
    std::fs::write(&trace, [line("a", 0), line("b", 4_000)].join("\n")).unwrap();
    let run = dir.path().join("run.jsonl");
    let started = std::time::Instant::now();
    tollgate_ok(&[
        "replay",
        "--trace",
        s(&trace),
        "--config",
        s(&root().join("examples/baseline.toml")),
        "--out",
        s(&run),
        "--speed",
        "2",
    ]);
    let wall = started.elapsed();
    assert!(wall >= std::time::Duration::from_millis(1_950), "{wall:?}");
    assert_eq!(read_jsonl(&run).len(), 2);
}
