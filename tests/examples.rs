//! The example plugins in Python, JavaScript and C (`make examples`) serving
//! real requests through the real gateway, and `tollgate plugin test`
//! running them offline on their cases files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use serde_json::{Value, json};

mod common;
use common::gateway::*;
use common::tollgate_ok;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Python and JavaScript components take seconds to compile; every test
/// shares the compiled artifacts instead of compiling them again.
fn compiled_cache() -> String {
    root()
        .join("target/test-plugin-cache")
        .display()
        .to_string()
}

fn example(file: &str) -> String {
    let p = plugin_dir().join(file);
    assert!(
        p.exists(),
        "{} is missing: run `make examples`",
        p.display()
    );
    p.display().to_string()
}

fn three_languages() -> String {
    format!(
        r#"
[runtime]
cache_dir = "{cache}"

[admin]
listen = "127.0.0.1:0"

[plugins.router]
path = "{router}"

[plugins.compressor]
path = "{squeeze}"
config = {{ min_chars = 200 }}

[plugins.cache_policy]
path = "{cache_policy}"
config = {{ ttl_by_feature = {{ docs = 60 }} }}
"#,
        cache = compiled_cache(),
        router = example("python_router.wasm"),
        squeeze = example("c_squeeze.wasm"),
        cache_policy = example("js_cache_policy.wasm"),
    )
}

fn user(tenant: &str, user: &str) -> [(&'static str, String); 2] {
    [
        ("x-tollgate-tenant", tenant.to_string()),
        ("x-tollgate-user", user.to_string()),
    ]
}

async fn ask_as(base: &str, who: &[(&'static str, String); 2], text: &str) -> Resp {
    let headers: Vec<(&str, &str)> = who.iter().map(|(k, v)| (*k, v.as_str())).collect();
    chat(base, &headers, ask(text)).await
}

#[tokio::test]
async fn python_router_c_compressor_and_js_cache_policy_serve_through_the_gateway() {
    let token = "examples-admin-token";
    let gw = gateway_env(&three_languages(), &[("TOLLGATE_ADMIN_TOKEN", token)]);
    let ann = user("acme", "ann");
    let bob = user("acme", "bob");

    // The Python router: a plain question goes to the small tier, a request
    // for reasoning to the premium one.
    let faq = ask_as(&gw.base, &ann, "How do I export invoices as CSV?").await;
    assert_eq!(faq.status, 200, "{}", faq.text);
    assert_eq!(faq.header("x-tollgate-model"), "gpt-4o-mini");
    assert_eq!(faq.header("x-tollgate-cache"), "miss");
    let hard = ask_as(
        &gw.base,
        &ann,
        "Compare the annual and monthly plans and recommend one; explain the trade-offs.",
    )
    .await;
    assert_eq!(hard.header("x-tollgate-model"), "gpt-4o", "{}", hard.text);

    // The JavaScript cache policy: a general answer is shared by the tenant...
    let again = ask_as(&gw.base, &bob, "How do I export invoices as CSV?").await;
    assert_eq!(again.header("x-tollgate-cache"), "hit");
    assert_eq!(content(&again), content(&faq));
    // ...never across tenants...
    let other = ask_as(
        &gw.base,
        &user("globex", "bob"),
        "How do I export invoices as CSV?",
    )
    .await;
    assert_eq!(other.header("x-tollgate-cache"), "miss");
    // ...one carrying personal data is private to its user...
    let personal = "Please send the receipt to ann.lee@example.com";
    assert_eq!(
        ask_as(&gw.base, &ann, personal)
            .await
            .header("x-tollgate-cache"),
        "miss"
    );
    assert_eq!(
        ask_as(&gw.base, &ann, personal)
            .await
            .header("x-tollgate-cache"),
        "hit"
    );
    assert_eq!(
        ask_as(&gw.base, &bob, personal)
            .await
            .header("x-tollgate-cache"),
        "miss"
    );
    // ...and a secret is never cached.
    let secret = "Why does my key sk-abcdefghijklmnopqrstuvwx fail?";
    ask_as(&gw.base, &ann, secret).await;
    assert_eq!(
        ask_as(&gw.base, &ann, secret)
            .await
            .header("x-tollgate-cache"),
        "bypass"
    );

    // The C compressor: 200 repeated log lines reach the upstream as one line
    // and a count (the simulator bills characters / 4 of what it received).
    let log = format!(
        "Why does the sync fail? Log:\n{}",
        "WARN   retrying connection to db-1   \n".repeat(200)
    );
    let r = chat(
        &gw.base,
        &[("x-tollgate-tenant", "acme")],
        json!({"model": "gpt-4o", "temperature": 1.0, "messages": [{"role": "user", "content": log}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let billed = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        billed < 60,
        "upstream saw {billed} tokens; the raw prompt is ~2000"
    );

    // The admin API shows each plugin's language and the limits it got.
    let (status, v) = admin_call(
        &gw.admin_base(),
        token,
        reqwest::Method::GET,
        "/v1/plugins".into(),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let by_slot = |slot: &str| -> Value {
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["slot"] == slot)
            .cloned()
            .unwrap_or_else(|| panic!("{slot} missing in {v}"))
    };
    let router = by_slot("router");
    assert_eq!(router["language"], "python", "{router}");
    assert_eq!(router["limits"]["timeout_ms"], 25);
    assert_eq!(by_slot("cache_policy")["language"], "javascript");
    let squeeze = by_slot("compressor[0]");
    assert_eq!(squeeze["language"], "c");
    assert_eq!(squeeze["limits"]["timeout_ms"], 5);
    // Warm instances are reused: a handful of instantiations, not one per call.
    for p in [&router, &squeeze] {
        let calls = p["calls"].as_u64().unwrap();
        assert!(calls >= 8, "{p}");
        assert!(p["instantiations"].as_u64().unwrap() <= 3, "{p}");
        assert!(
            p["failures"].as_object().unwrap().values().all(|n| n == 0),
            "{p}"
        );
    }
}

/// Every case with an expectation got it.
fn assert_all_agree(v: &Value) {
    assert_eq!(
        v["agreement"]["agreed"], v["agreement"]["judged"],
        "{:#}",
        v["cases"]
    );
}

/// `tollgate plugin test FILE --kind KIND --cases CASES [--config CONFIG] --json`.
fn plugin_test(
    file: &str,
    kind: &str,
    cases: &std::path::Path,
    config: Option<&std::path::Path>,
) -> Value {
    let mut args = vec![
        "plugin",
        "test",
        file,
        "--kind",
        kind,
        "--cases",
        cases.to_str().unwrap(),
        "--json",
    ];
    if let Some(c) = config {
        args.extend(["--config", c.to_str().unwrap()]);
    }
    serde_json::from_slice(&tollgate_ok(&args).stdout).unwrap()
}

#[test]
fn plugin_test_reports_decisions_agreement_and_timing() {
    let cache = format!("[runtime]\ncache_dir = {:?}\n", compiled_cache());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!("{cache}[plugins.router]\npath = \"unused.wasm\"\ntimeout_ms = 1000\n"),
    )
    .unwrap();
    let py = example("python_router.wasm");
    let cases = root().join("examples/python/cases.jsonl");
    let cases = cases.to_str().unwrap();
    let v = plugin_test(&py, "router", cases.as_ref(), Some(&cfg));
    let judged = v["agreement"]["judged"].as_u64().unwrap();
    assert_eq!(judged, v["cases"].as_array().unwrap().len() as u64);
    assert_eq!(v["agreement"]["agreed"], judged, "{:#}", v["cases"]);
    assert_eq!(v["plugin"]["language"], "python");
    assert_eq!(
        v["plugin"]["limits"]["timeout_ms"], 1000,
        "the slot's own setting wins"
    );
    assert!(v["timing"]["p50_us"].as_f64().unwrap() > 0.0);
    assert_eq!(v["timing"]["calls"], judged);
    let matrix = v["agreement"]["matrix"].as_array().unwrap();
    assert!(
        matrix.iter().all(|c| c["expected"] == c["decided"]),
        "{matrix:?}"
    );

    let text = String::from_utf8_lossy(
        &tollgate_ok(&[
            "plugin",
            "test",
            &py,
            "--kind",
            "router",
            "--cases",
            cases,
            "--config",
            cfg.to_str().unwrap(),
        ])
        .stdout,
    )
    .to_string();
    assert!(text.contains("agreement  12 of 12 (100.0%)"), "{text}");
    assert!(text.contains("timing     12 calls"), "{text}");

    // --min-agreement fails the run below the bar, with the reason.
    let wrong = dir.path().join("wrong.jsonl");
    std::fs::write(
        &wrong,
        std::fs::read_to_string(cases).unwrap().replacen(
            "\"expect\": \"tier 1\"",
            "\"expect\": \"tier 3\"",
            1,
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["plugin", "test", &py, "--kind", "router", "--cases"])
        .arg(&wrong)
        .args(["--config", cfg.to_str().unwrap(), "--min-agreement", "0.95"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agreement 91.7% is below --min-agreement 95.0%"),
        "{err}"
    );

    // The JavaScript cache policy on its cases, with answers offered to admit.
    let js = example("js_cache_policy.wasm");
    let cases = root().join("examples/js/cases.jsonl");
    let v = plugin_test(&js, "cache-policy", &cases, None);
    assert_all_agree(&v);
    assert!(
        v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["detail"].as_str().unwrap().ends_with("answer not stored")),
        "{:#}",
        v["cases"]
    );

    // The C compressor, with its own config given as a TOML file.
    let c = example("c_squeeze.wasm");
    let cfg_c = dir.path().join("squeeze.toml");
    std::fs::write(&cfg_c, "min_chars = 100\n").unwrap();
    let cases = root().join("examples/c/cases.jsonl");
    let v = plugin_test(&c, "compressor", &cases, Some(&cfg_c));
    assert_all_agree(&v);
    assert_eq!(v["plugin"]["language"], "c");

    // A budget rule is shown each case's spend.
    let budget = dir.path().join("budget.jsonl");
    let q = r#""request": {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}"#;
    std::fs::write(
        &budget,
        format!(
            "{{\"id\": \"fresh\", \"tenant\": \"acme\", {q}, \"expect\": \"allow\"}}\n\
             {{\"id\": \"near\", \"tenant\": \"acme\", {q}, \"spend\": {{\"tenant_today_usd\": 9.0}}, \"expect\": \"downgrade\"}}\n\
             {{\"id\": \"over\", \"tenant\": \"acme\", {q}, \"spend\": {{\"tenant_today_usd\": 10.0}}, \"expect\": \"deny\"}}\n"
        ),
    )
    .unwrap();
    let budget_cfg = dir.path().join("budget.json");
    std::fs::write(
        &budget_cfg,
        r#"{"daily_usd": 10.0, "downgrade_model": "gpt-4o-mini"}"#,
    )
    .unwrap();
    let v = plugin_test(
        &example("daily_budget.wasm"),
        "budget-rule",
        &budget,
        Some(&budget_cfg),
    );
    assert_all_agree(&v);
    assert_eq!(v["agreement"]["judged"], 3);
    assert_eq!(v["plugin"]["language"], "rust");

    // A bad case line is named, and a missing plugin is a clear error.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"request\": {\"model\": \"m\", \"messages\": []}}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["plugin", "test", &c, "--kind", "compressor", "--cases"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.jsonl line 1") && err.contains("messages"),
        "{err}"
    );
    let cases = root().join("examples/c/cases.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "plugin",
            "test",
            "no-such.wasm",
            "--kind",
            "router",
            "--cases",
        ])
        .arg(&cases)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read plugin no-such.wasm"), "{err}");
}

#[tokio::test]
async fn plugin_test_reads_cases_from_a_ledger() {
    // Record a few requests with their bodies, then run a plugin on the ledger.
    let gw = gateway("[ledger]\nrecord_bodies = true\nflush_interval_ms = 20\n");
    for q in [
        "How do I export invoices?",
        "Explain and compare both plans; recommend one.",
    ] {
        assert_eq!(ask_as(&gw.base, &user("acme", "ann"), q).await.status, 200);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let ledger = gw._dir.path().join("tollgate-ledger.sqlite");
    let cache = format!("[runtime]\ncache_dir = {:?}\n", compiled_cache());
    let cfg = gw._dir.path().join("cases-gateway.toml");
    std::fs::write(
        &cfg,
        format!("{cache}[plugins.router]\npath = \"x.wasm\"\ntimeout_ms = 1000\n"),
    )
    .unwrap();
    let v = plugin_test(
        &example("python_router.wasm"),
        "router",
        &ledger,
        Some(&cfg),
    );
    let decided: Vec<&str> = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["decided"].as_str().unwrap())
        .collect();
    assert_eq!(decided, ["gpt-4o-mini", "gpt-4o"], "{v:#}");
    assert_eq!(v["agreement"]["judged"], 0);
}
