//! End-to-end tests: the real `tollgate` binary on a free loopback port,
//! the simulator upstream, real plugins from `target/plugins` (`make plugins`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::gateway::*;
use common::{read_jsonl, tollgate_ok};

const FULL: &str = r#"
[plugins.router]
path = "{plugins}/rules_router.wasm"
[plugins.router.config]
default = "gpt-4o-mini"
[[plugins.router.config.rules]]
regex = "(?i)^(hi|hello)!*$"
respond = "Hello there!"
[[plugins.router.config.rules]]
keywords = ["step by step"]
fallback = ["gpt-4o", "gpt-4.1-mini"]
[[plugins.router.config.rules]]
keywords = ["forbidden"]
reject = "this topic is not allowed"

[plugins.compressor]
path = "{plugins}/trim_compressor.wasm"
# The tests check what reaches the upstream, not deadlines: on a loaded
# machine the default 5 ms would let a long prompt through uncompressed.
timeout_ms = 1000

[plugins.cache_policy]
path = "{plugins}/default_cache_policy.wasm"
config = { ttl_seconds = 600, personal_features = ["account"] }

[plugins.budget_rule]
path = "{plugins}/daily_budget.wasm"
on_error = "closed"
config = { daily_usd = 5.0, downgrade_model = "gpt-4o-mini", tenants = { tiny = 0.0004 } }
"#;

#[tokio::test]
async fn answers_json_with_headers_routing_and_cost() {
    let gw = gateway(FULL);
    let r = chat(
        &gw.base,
        &[
            ("x-tollgate-tenant", "acme"),
            ("x-tollgate-sim-output-tokens", "30"),
        ],
        ask("What is the refund window for annual plans?"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini", "routed by the default rule");
    assert_eq!(r.header("x-tollgate-model"), "gpt-4o-mini");
    assert_eq!(r.header("x-tollgate-cache"), "miss");
    assert!(r.header("x-tollgate-request-id").starts_with("req_"));
    assert_eq!(v["usage"]["completion_tokens"], 30);
    let prompt = v["usage"]["prompt_tokens"].as_f64().unwrap();
    let want = (prompt * 0.15 + 30.0 * 0.60) / 1e6;
    let cost: f64 = r.header("x-tollgate-cost-usd").parse().unwrap();
    assert!((cost - want).abs() < 1e-9, "{cost} vs {want}");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn streams_pass_through_with_usage_only_when_asked() {
    let gw = gateway(FULL);
    let mut body = ask("Explain step by step how refunds are computed");
    body["stream"] = json!(true);
    let r = chat(
        &gw.base,
        &[("x-tollgate-sim-output-tokens", "40")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.header("content-type").starts_with("text/event-stream"));
    assert_eq!(
        r.header("x-tollgate-model"),
        "gpt-4o",
        "first model of the fallback rule"
    );
    let (events, done, comments) = sse_events(&r.text);
    assert!(done);
    assert!(
        events
            .iter()
            .all(|e| e["choices"].as_array().is_some_and(|c| !c.is_empty())),
        "no usage chunk unless asked"
    );
    assert_eq!(stream_content(&events).len(), 160);
    let cost = comments
        .iter()
        .find_map(|c| c.strip_prefix("x-tollgate-cost-usd="))
        .unwrap();
    assert!(cost.parse::<f64>().unwrap() > 0.0);

    body["stream_options"] = json!({"include_usage": true});
    body["messages"][0]["content"] = json!("Explain step by step how credits are computed");
    let r = chat(&gw.base, &[("x-tollgate-sim-output-tokens", "40")], body).await;
    let (events, done, _) = sse_events(&r.text);
    assert!(done);
    let usage = events
        .iter()
        .find(|e| e["usage"].is_object())
        .expect("usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 40);
}

#[tokio::test]
async fn cache_hits_are_free_scoped_by_tenant_and_user_and_replayed_as_streams() {
    let gw = gateway(FULL);
    let q = ask("What is the refund window for annual plans?");
    let a = chat(&gw.base, &[("x-tollgate-tenant", "acme")], q.clone()).await;
    assert_eq!(a.header("x-tollgate-cache"), "miss");
    let b = chat(
        &gw.base,
        &[("x-tollgate-tenant", "acme"), ("x-tollgate-user", "other")],
        q.clone(),
    )
    .await;
    assert_eq!(b.header("x-tollgate-cache"), "hit");
    assert_eq!(b.header("x-tollgate-cost-usd").parse::<f64>().unwrap(), 0.0);
    assert_eq!(a.json()["choices"], b.json()["choices"]);
    // Another tenant never sees acme's answer.
    let c = chat(&gw.base, &[("x-tollgate-tenant", "globex")], q.clone()).await;
    assert_eq!(c.header("x-tollgate-cache"), "miss");
    // The same question streamed is served from the cache as SSE.
    let mut s = q.clone();
    s["stream"] = json!(true);
    let d = chat(&gw.base, &[("x-tollgate-tenant", "acme")], s).await;
    assert_eq!(d.header("x-tollgate-cache"), "hit");
    let (events, done, _) = sse_events(&d.text);
    assert!(done);
    assert_eq!(
        stream_content(&events),
        a.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
    // Personal questions are private to their user.
    let p = ask("Which plan am I on?");
    let p = json!({"model": "gpt-4o", "messages": p["messages"], "temperature": 0});
    let mine = [
        ("x-tollgate-tenant", "acme"),
        ("x-tollgate-user", "ann"),
        ("x-tollgate-feature", "account"),
    ];
    let _ = chat(&gw.base, &mine, p.clone()).await;
    assert_eq!(
        chat(&gw.base, &mine, p.clone())
            .await
            .header("x-tollgate-cache"),
        "hit"
    );
    let bob = [
        ("x-tollgate-tenant", "acme"),
        ("x-tollgate-user", "bob"),
        ("x-tollgate-feature", "account"),
    ];
    assert_eq!(
        chat(&gw.base, &bob, p).await.header("x-tollgate-cache"),
        "miss"
    );
    // Hot sampling bypasses the cache.
    let mut hot = q;
    hot["temperature"] = json!(1.5);
    assert_eq!(
        chat(&gw.base, &[("x-tollgate-tenant", "acme")], hot)
            .await
            .header("x-tollgate-cache"),
        "bypass"
    );
    assert_eq!(
        metric(&gw.base, "tollgate_cache_total{outcome=\"hit\"}").await,
        3.0
    );
}

#[tokio::test]
async fn router_can_answer_or_reject_without_upstream() {
    let gw = gateway(FULL);
    let r = chat(&gw.base, &[], ask("hello!")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Hello there!");
    assert_eq!(r.header("x-tollgate-model"), "fixed-response");
    let r = chat(&gw.base, &[], ask("tell me the forbidden thing")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "rejected_by_policy");
    assert!(r.error_message().contains("not allowed"));
    let text = get_text(format!("{}/metrics", gw.base)).await;
    assert!(
        !text.contains("tollgate_upstream_calls_total{"),
        "no upstream call:\n{text}"
    );
}

#[tokio::test]
async fn compressor_shrinks_what_goes_upstream() {
    let gw = gateway(FULL);
    let spam = format!(
        "Why does this fail?\n{}",
        "WARN retrying connection to db-1\n".repeat(200)
    );
    let r = chat(&gw.base, &[("x-tollgate-tenant", "c")], json!({"model": "gpt-4o", "temperature": 1.0, "messages": [{"role": "user", "content": spam}]})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The simulator bills characters / 4 of what it received: the folded prompt.
    let billed = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        billed < 60,
        "upstream saw {billed} tokens; the raw prompt is ~1700"
    );
    assert!(metric(&gw.base, "tollgate_compression_tokens_saved_total").await > 1000.0);
}

#[tokio::test]
async fn budget_rule_denies_past_the_cap() {
    let gw = gateway(FULL);
    let h = [
        ("x-tollgate-tenant", "tiny"),
        ("x-tollgate-sim-output-tokens", "100"),
    ];
    let mut body = ask("Summarise the plan differences");
    body["model"] = json!("gpt-4o-mini");
    body["max_tokens"] = json!(100);
    body["temperature"] = json!(1.0);
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = chat(&gw.base, &h, body.clone()).await;
        statuses.push(r.status);
        if r.status == 429 {
            assert_eq!(r.error_code(), "budget_exceeded");
            assert!(r.error_message().contains("daily budget of tenant tiny"));
        }
    }
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
    // Another tenant is unaffected.
    assert_eq!(
        chat(&gw.base, &[("x-tollgate-tenant", "big")], body)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn bad_input_gets_openai_style_errors() {
    let gw = gateway("[server]\nmax_body_bytes = 4096\n");
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid_json"),
        (
            br#"{"model":"gpt-4o"}"#.to_vec(),
            400,
            "missing_required_parameter",
        ),
        (
            br#"{"model":"gpt-4o","messages":"hi"}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (
            br#"{"model":5,"messages":[]}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#
                .to_vec(),
            400,
            "invalid_type",
        ),
        (vec![0xff, 0xfe, 0x00], 400, "invalid_encoding"),
        (
            br#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
            "model_not_found",
        ),
        (
            format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(5000)
            )
            .into_bytes(),
            413,
            "request_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let r = post(&gw.base, &[], body).await;
        assert_eq!(r.status, status, "{}", r.text);
        let v = r.json();
        assert_eq!(v["error"]["code"], code, "{}", r.text);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(v["error"]["type"].is_string());
    }
    let r = post(
        &gw.base,
        &[("x-tollgate-step", "minus one")],
        ask("x").to_string(),
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_header"));
    let r = http()
        .get(format!("{}/v1/nothing", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http()
        .get(format!("{}/v1/chat/completions", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // Still healthy after all of that.
    let h: Value = get_json(&format!("{}/healthz", gw.base)).await;
    assert_eq!(h["status"], "ok");
    let m: Value = get_json(&format!("{}/v1/models", gw.base)).await;
    assert_eq!(m["data"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn upstream_failures_are_a_clear_503_and_fallback_ladders_recover() {
    let sim = sim_server();
    let cfg = format!(
        r#"
[resilience]
max_retries = 0
[providers.up]
kind = "openai"
base_url = "{}/v1"
api_key_env = ""
sim_when_no_key = false
timeout_ms = 400
forward_sim_headers = true
[providers.dead]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = ""
timeout_ms = 400
connect_timeout_ms = 200
[models."gpt-4o"]
provider = "up"
[models."gpt-4o-mini"]
provider = "up"
[models."gpt-4.1-mini"]
provider = "dead"
[plugins.router]
path = "{{plugins}}/rules_router.wasm"
config = {{ default = "keep", rules = [{{ keywords = ["ladder"], fallback = ["gpt-4o", "gpt-4o-mini"] }}] }}
"#,
        sim.base
    );
    let gw = gateway(&cfg);
    let ok = chat(
        &gw.base,
        &[("x-tollgate-sim-output-tokens", "7")],
        ask("plain question"),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(
        ok.json()["usage"]["completion_tokens"],
        7,
        "sim headers forwarded"
    );

    let r = chat(
        &gw.base,
        &[("x-tollgate-sim-fault", "500")],
        ask("plain question"),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "upstream_unavailable")
    );
    assert!(
        r.error_message()
            .contains("gpt-4o: upstream returned HTTP 500"),
        "{}",
        r.text
    );
    assert!(r.error_message().contains("simulated"));
    let r = chat(
        &gw.base,
        &[("x-tollgate-sim-fault", "429")],
        ask("plain question"),
    )
    .await;
    assert_eq!(r.status, 503);
    assert!(r.error_message().contains("HTTP 429"), "{}", r.text);
    let t = Instant::now();
    let r = chat(
        &gw.base,
        &[("x-tollgate-sim-fault", "timeout")],
        ask("plain question"),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "upstream_unavailable")
    );
    assert!(
        r.error_message().contains("did not answer within"),
        "{}",
        r.text
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    let mut dead = ask("plain question");
    dead["model"] = json!("gpt-4.1-mini");
    let r = chat(&gw.base, &[], dead).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "upstream_unavailable")
    );
    assert!(
        r.error_message().contains("cannot reach upstream"),
        "{}",
        r.text
    );

    // The first model of the ladder fails; the second answers.
    let r = chat(
        &gw.base,
        &[("x-tollgate-sim-fault", "500@gpt-4o")],
        ask("use the ladder"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-tollgate-model"), "gpt-4o-mini");
    // Streams through the OpenAI-compatible provider.
    let mut s = ask("stream it");
    s["stream"] = json!(true);
    let r = chat(&gw.base, &[("x-tollgate-sim-output-tokens", "12")], s).await;
    let (events, done, comments) = sse_events(&r.text);
    assert!(done && !events.is_empty());
    assert_eq!(stream_content(&events).len(), 48);
    assert!(
        comments
            .iter()
            .any(|c| c.starts_with("x-tollgate-cost-usd="))
    );
}

const HOSTILE: &str = r#"
[plugins.router]
path = "{plugins}/hostile_fixture.wasm"
on_error = "MODE_FAIL"
timeout_ms = 20
memory_mib = 32
config = { mode = "MODE" }
"#;

#[tokio::test]
async fn hostile_router_fail_open_lets_requests_through() {
    for mode in ["loop", "memory", "trap", "invalid"] {
        let gw = gateway(&HOSTILE.replace("MODE_FAIL", "open").replace("MODE", mode));
        for _ in 0..3 {
            let r = chat(&gw.base, &[], ask("hi there")).await;
            assert_eq!(r.status, 200, "{mode}: {}", r.text);
            assert_eq!(
                r.header("x-tollgate-model"),
                "gpt-4o",
                "{mode}: the asked model is kept"
            );
        }
        let mut failures = 0.0;
        for reason in ["timeout", "fuel", "memory", "trap", "invalid"] {
            let key = format!(
                "tollgate_plugin_failures_total{{kind=\"router\",plugin=\"hostile_fixture\",reason=\"{reason}\"}}"
            );
            failures += metric(&gw.base, &key).await;
        }
        assert_eq!(failures, 3.0, "{mode}");
        assert!(gw.log_contains("fail-open"), "{mode}");
    }
}

#[tokio::test]
async fn hostile_router_fail_closed_rejects_with_a_clear_error() {
    for mode in ["loop", "trap", "invalid"] {
        let gw = gateway(&HOSTILE.replace("MODE_FAIL", "closed").replace("MODE", mode));
        let r = chat(&gw.base, &[], ask("hi there")).await;
        assert_eq!(r.status, 503, "{mode}: {}", r.text);
        assert_eq!(r.error_code(), "policy_failed");
        assert!(r.error_message().contains("hostile_fixture"));
        // The gateway keeps serving.
        let h = http()
            .get(format!("{}/healthz", gw.base))
            .send()
            .await
            .unwrap();
        assert_eq!(h.status(), 200);
    }
}

#[test]
fn bad_config_stops_the_start_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = \"not-an-address\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config", &path.display().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("server.listen"),
        "{err}"
    );

    std::fs::write(&path, "[plugins.router]\npath = \"missing.wasm\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config", &path.display().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.wasm"), "{err}");
}

#[tokio::test]
async fn sigterm_drains_a_stream_in_flight_then_exits_cleanly() {
    let mut gw = gateway("[providers.sim]\nkind = \"sim\"\nms_per_token = 20\n");
    let mut body = ask("a slow answer please");
    body["stream"] = json!(true);
    let base = gw.base.clone();
    let inflight =
        tokio::spawn(
            async move { chat(&base, &[("x-tollgate-sim-output-tokens", "50")], body).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = gw.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let r = inflight.await.unwrap();
    assert_eq!(r.status, 200);
    let (events, done, _) = sse_events(&r.text);
    assert!(done, "the stream finished: {}", r.text);
    assert_eq!(stream_content(&events).len(), 200);
    let status = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        loop {
            if let Some(s) = gw.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_call_still_leaves_its_accounted_row() {
    let mut gw = gateway("[providers.sim]\nkind = \"sim\"\nlatency_ms = 600\n");
    let gone = http()
        .post(format!("{}/v1/chat/completions", gw.base))
        .header("x-tollgate-tenant", "quitter")
        .json(&ask("an answer nobody waits for"))
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up before the answer");
    // The upstream call finishes after the client left; then it is recorded.
    let db = gw.ledger();
    let t = Instant::now();
    while count_rows(&db, "WHERE tenant = 'quitter'") == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no row for the call");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.sigterm_and_wait().success());
    let (status, cost): (i64, Option<f64>) = gw
        .ledger()
        .query_row(
            "SELECT status, cost_usd FROM requests WHERE tenant = 'quitter'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(status, 200);
    assert!(cost.unwrap() > 0.0, "the billed call is priced");
}

#[tokio::test]
async fn past_max_in_flight_requests_are_refused_at_once_and_a_stream_holds_its_place_to_the_end() {
    let gw = gateway(
        "[server]\nmax_in_flight = 2\n[providers.sim]\nkind = \"sim\"\nlatency_ms = 1500\n",
    );
    let in_flight = |what: &'static str| {
        let base = gw.base.clone();
        async move { metric(&base, &format!("tollgate_in_flight{{value=\"{what}\"}}")).await }
    };
    assert_eq!(in_flight("limit").await, 2.0);
    let base = gw.base.clone();
    let plain = tokio::spawn(async move { chat(&base, &[], ask("a slow answer")).await });
    let base = gw.base.clone();
    let streamed = tokio::spawn(async move {
        let mut body = ask("a slow stream");
        body["stream"] = json!(true);
        chat(&base, &[], body).await
    });
    let t = Instant::now();
    while in_flight("requests").await < 2.0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the two calls never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let refused = chat(&gw.base, &[], ask("one too many")).await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "refused at once"
    );
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.header("retry-after"), "1");
    let e = refused.json();
    assert_eq!(e["error"]["code"], "overloaded");
    assert_eq!(e["error"]["type"], "server_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 2 requests in flight"),
        "{e}"
    );

    let plain = plain.await.unwrap();
    assert_eq!(plain.status, 200, "{}", plain.text);
    let streamed = streamed.await.unwrap();
    assert_eq!(streamed.status, 200, "{}", streamed.text);
    let (events, done, _) = sse_events(&streamed.text);
    assert!(done && !events.is_empty(), "{}", streamed.text);

    // Both places are given back once the responses are sent.
    let t = Instant::now();
    while in_flight("requests").await > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "places not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(in_flight("refused_total").await, 1.0);
    assert_eq!(
        metric(&gw.base, "tollgate_requests_total{status=\"5xx\"}").await,
        1.0
    );
    assert_eq!(chat(&gw.base, &[], ask("room again")).await.status, 200);
}

impl Proc {
    fn ledger(&self) -> rusqlite::Connection {
        tollgate::ledger::open_db(&self._dir.path().join("tollgate-ledger.sqlite")).unwrap()
    }

    fn sigterm_and_wait(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn count_rows(conn: &rusqlite::Connection, filter: &str) -> i64 {
    conn.query_row(
        &format!("SELECT COUNT(*) FROM requests {filter}"),
        [],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test]
async fn ledger_records_every_request_with_its_decisions_cost_and_flags() {
    let cfg = format!(
        "{FULL}\n[models.\"gpt-4o\"]\nprovider = \"sim\"\n[models.\"gpt-4o-mini\"]\nprovider = \"sim\"\n\
         [models.\"gpt-4.1-mini\"]\nprovider = \"sim\"\n\
         [models.\"mystery\"]\nprovider = \"sim\"\nupstream_model = \"gpt-4o-mini\"\n"
    );
    let mut gw = gateway(&cfg);
    let h = [
        ("x-tollgate-tenant", "acme"),
        ("x-tollgate-feature", "faq"),
        ("x-tollgate-task", "t1"),
    ];
    let q = ask("What is the refund window for annual plans?");
    assert_eq!(
        chat(&gw.base, &h, q.clone())
            .await
            .header("x-tollgate-cache"),
        "miss"
    );
    assert_eq!(
        chat(&gw.base, &h, q).await.header("x-tollgate-cache"),
        "hit"
    );
    assert_eq!(chat(&gw.base, &h, ask("hello")).await.status, 200);
    assert_eq!(
        chat(&gw.base, &h, ask("the forbidden thing")).await.status,
        400
    );
    let mut unknown = ask("x");
    unknown["model"] = json!("gpt-9");
    assert_eq!(chat(&gw.base, &h, unknown).await.status, 404);
    assert_eq!(post(&gw.base, &h, "{oops").await.status, 400);
    let mut mystery = ask("Tell me about the mystery plan, temperature high");
    mystery["model"] = json!("mystery");
    mystery["temperature"] = json!(1.5);
    let r = chat(&gw.base, &h, mystery).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(gw.sigterm_and_wait().success());

    let db = gw.ledger();
    assert_eq!(count_rows(&db, ""), 7);
    assert_eq!(
        count_rows(
            &db,
            "WHERE tenant = 'acme' AND feature = 'faq' AND task = 't1'"
        ),
        7
    );
    let (decisions, hash, cost, cache): (String, String, Option<f64>, String) = db
        .query_row(
            "SELECT decisions, request_hash, cost_usd, cache FROM requests WHERE status = 200 AND cache = 'miss' ORDER BY ts_ms LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(hash.len(), 24);
    assert!(cost.unwrap() > 0.0);
    assert_eq!(cache, "miss");
    let d: Value = serde_json::from_str(&decisions).unwrap();
    let kinds: Vec<&str> = d
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kind"].as_str().unwrap())
        .collect();
    for k in ["budget-rule", "compressor", "cache-policy", "router"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    assert!(d[0]["digest"].as_str().unwrap().len() == 64);
    assert_eq!(count_rows(&db, "WHERE cache = 'hit' AND cost_usd = 0"), 1);
    assert_eq!(count_rows(&db, "WHERE model_served = 'fixed-response'"), 1);
    assert_eq!(
        count_rows(
            &db,
            "WHERE status = 400 AND error_code = 'rejected_by_policy'"
        ),
        1
    );
    assert_eq!(
        count_rows(&db, "WHERE status = 404 AND error_code = 'model_not_found'"),
        1
    );
    assert_eq!(
        count_rows(&db, "WHERE status = 400 AND error_code = 'invalid_json'"),
        1
    );
}

#[tokio::test]
async fn an_unpriced_model_is_recorded_as_null_cost_never_zero() {
    let mut gw =
        gateway("[models.\"mystery\"]\nprovider = \"sim\"\nupstream_model = \"gpt-4o-mini\"\n");
    let mut body = ask("How do I export my data?");
    body["model"] = json!("mystery");
    let r = chat(&gw.base, &[], body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-tollgate-cost-usd"), "unpriced");
    assert!(gw.sigterm_and_wait().success());
    assert!(gw.log_contains("model has no price"));
    let db = gw.ledger();
    let (cost, unpriced, tokens): (Option<f64>, bool, i64) = db
        .query_row(
            "SELECT cost_usd, unpriced, prompt_tokens FROM requests",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((cost, unpriced), (None, true));
    assert!(tokens > 0);
}

#[tokio::test]
async fn sigterm_loses_no_acknowledged_row() {
    // A flush interval far beyond the test: only the shutdown flush can save the rows.
    let mut gw = gateway("[ledger]\nflush_interval_ms = 600000\nbatch_rows = 100000\n");
    let n = 200;
    let client = http();
    let mut tasks = Vec::new();
    for i in 0..n {
        let client = client.clone();
        let base = gw.base.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{base}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(ask(&format!("question {i}")).to_string())
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }));
        if tasks.len() >= 16 {
            for t in tasks.drain(..) {
                assert_eq!(t.await.unwrap(), 200);
            }
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(gw.sigterm_and_wait().success());
    assert_eq!(count_rows(&gw.ledger(), ""), n);
}

#[tokio::test]
async fn sigkill_leaves_an_intact_ledger_with_every_flushed_row() {
    let mut gw = gateway("[ledger]\nflush_interval_ms = 50\n");
    for i in 0..50 {
        assert_eq!(chat(&gw.base, &[], ask(&format!("q{i}"))).await.status, 200);
    }
    // Longer than a flush interval: every row above has been committed.
    tokio::time::sleep(Duration::from_millis(400)).await;
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    let db = gw.ledger();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    assert_eq!(count_rows(&db, ""), 50);
}

#[tokio::test]
async fn streamed_usage_is_exact_when_reported_and_estimated_when_not() {
    let mut gw = gateway("");
    let mut body = ask("Stream me an answer about invoices");
    body["stream"] = json!(true);
    let exact = chat(
        &gw.base,
        &[
            ("x-tollgate-sim-output-tokens", "40"),
            ("x-tollgate-task", "exact"),
        ],
        body.clone(),
    )
    .await;
    assert!(sse_events(&exact.text).1);
    let est = chat(
        &gw.base,
        &[
            ("x-tollgate-sim-output-tokens", "40"),
            ("x-tollgate-sim-fault", "no-usage"),
            ("x-tollgate-task", "est"),
        ],
        body.clone(),
    )
    .await;
    let (events, done, comments) = sse_events(&est.text);
    assert!(done && !events.is_empty());
    assert!(events.iter().all(|e| e["usage"].is_null()));
    assert!(
        comments
            .iter()
            .any(|c| c.starts_with("x-tollgate-cost-usd=0."))
    );
    let mut plain = ask("Answer without usage");
    plain["model"] = json!("gpt-4o-mini");
    let r = chat(
        &gw.base,
        &[
            ("x-tollgate-sim-fault", "no-usage"),
            ("x-tollgate-task", "json-est"),
        ],
        plain,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-tollgate-cost-usd").parse::<f64>().unwrap() > 0.0);
    assert!(gw.sigterm_and_wait().success());

    let db = gw.ledger();
    let row = |task: &str| -> (bool, i64, i64, f64) {
        db.query_row(
            "SELECT estimated, prompt_tokens, completion_tokens, cost_usd FROM requests WHERE task = ?1",
            [task],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
    };
    let (e, _, out, cost) = row("exact");
    assert_eq!((e, out), (false, 40));
    assert!(cost > 0.0);
    let (e, prompt, out, cost) = row("est");
    assert!(e, "no usage from upstream: estimated");
    assert!(
        prompt > 0 && out > 20 && cost > 0.0,
        "{prompt} {out} {cost}"
    );
    assert!(row("json-est").0);
}

async fn feedback(base: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    post_to(&format!("{base}/v1/feedback"), headers, body.to_string()).await
}

#[tokio::test]
async fn feedback_turns_into_cost_per_successful_task_in_the_report() {
    let mut gw = gateway("");
    let acme = [("x-tollgate-tenant", "acme")];
    let mut spent = 0.0;
    for (feature, task, n) in [
        ("support", "t-ok", 2),
        ("support", "t-bad", 1),
        ("faq", "", 1),
    ] {
        for i in 0..n {
            let h = [
                ("x-tollgate-tenant", "acme"),
                ("x-tollgate-feature", feature),
                ("x-tollgate-task", task),
                ("x-tollgate-step", if i == 0 { "0" } else { "1" }),
            ];
            let r = chat(&gw.base, &h, ask(&format!("{feature} {task} {i}"))).await;
            assert_eq!(r.status, 200);
            spent += r.header("x-tollgate-cost-usd").parse::<f64>().unwrap();
            if feature == "faq" {
                let rid = r.header("x-tollgate-request-id").to_string();
                let body = json!({"request_id": rid, "success": true, "score": 0.9}).to_string();
                assert_eq!(feedback(&gw.base, &acme, &body).await.status, 200);
            }
        }
    }
    assert_eq!(
        feedback(&gw.base, &acme, r#"{"task_id":"t-ok","success":true}"#)
            .await
            .status,
        200
    );
    assert_eq!(
        feedback(&gw.base, &acme, r#"{"task_id":"t-bad","success":false}"#)
            .await
            .status,
        200
    );
    for (bad, code) in [
        (r#"{"success":true}"#, "missing_required_parameter"),
        (
            r#"{"task_id":"a","request_id":"b","success":true}"#,
            "missing_required_parameter",
        ),
        (r#"{"task_id":"a"}"#, "missing_required_parameter"),
        (r#"{"task_id":"a","success":"yes"}"#, "invalid_type"),
        (
            r#"{"task_id":"a","success":true,"score":"high"}"#,
            "invalid_type",
        ),
        ("not json", "invalid_json"),
    ] {
        let r = feedback(&gw.base, &acme, bad).await;
        assert_eq!((r.status, r.error_code().as_str()), (400, code), "{bad}");
    }
    assert!(gw.sigterm_and_wait().success());

    let cfg = gw._dir.path().join("tollgate.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "report",
            "--config",
            &cfg.display().to_string(),
            "--group-by",
            "feature",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    let total = &rep["total"];
    assert_eq!(total["requests"], 4);
    assert_eq!(total["tasks"], 3);
    assert_eq!(total["successful_tasks"], 2);
    assert!((total["cost_usd"].as_f64().unwrap() - spent).abs() < 1e-9);
    assert!((total["cost_per_successful_task"].as_f64().unwrap() - spent / 2.0).abs() < 1e-9);
    let support = rep["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["group"]["feature"] == "support")
        .unwrap();
    assert_eq!(
        (
            support["tasks"].as_u64(),
            support["successful_tasks"].as_u64()
        ),
        (Some(2), Some(1))
    );

    let table = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "report",
            "--config",
            &cfg.display().to_string(),
            "--group-by",
            "feature,model",
            "--since",
            "2000-01-01",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("feature")
            && text.contains("cost_per_successful_task")
            && text.contains("TOTAL"),
        "{text}"
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "report",
            "--config",
            &cfg.display().to_string(),
            "--group-by",
            "colour",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot group by"));
}

/// Parses Prometheus text into (name{labels}, value) pairs.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            (
                k.to_string(),
                v.parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad value in {l:?}")),
            )
        })
        .collect()
}

#[tokio::test]
async fn metrics_are_scraped_parsed_and_bounded() {
    let gw = gateway(FULL);
    for t in ["acme", "globex"] {
        let h = [
            ("x-tollgate-tenant", t),
            ("x-tollgate-feature", "faq"),
            ("x-tollgate-user", "someone-private"),
        ];
        assert_eq!(
            chat(&gw.base, &h, ask("What is the refund window?"))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        chat(&gw.base, &[], ask("the forbidden thing")).await.status,
        400
    );
    let text = get_text(format!("{}/metrics", gw.base)).await;
    let m = parse_prometheus(&text);
    let get = |k: &str| m.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    assert_eq!(get("tollgate_requests_total{status=\"2xx\"}"), Some(2.0));
    assert_eq!(get("tollgate_requests_total{status=\"4xx\"}"), Some(1.0));
    assert_eq!(get("tollgate_request_duration_seconds_count"), Some(3.0));
    let cost =
        get("tollgate_cost_usd_total{feature=\"faq\",model=\"gpt-4o-mini\",tenant=\"acme\"}")
            .unwrap();
    assert!(cost > 0.0);
    assert!(get("tollgate_tokens_total{feature=\"faq\",model=\"gpt-4o-mini\",tenant=\"globex\",type=\"completion\"}").unwrap() > 0.0);
    assert!(
        get("tollgate_plugin_call_duration_seconds_count{kind=\"router\",plugin=\"rules_router\"}")
            .unwrap()
            >= 3.0
    );
    assert!(
        get("tollgate_upstream_duration_seconds_count{model=\"gpt-4o-mini\",provider=\"sim\"}")
            .unwrap()
            >= 1.0
    );
    // The rejected request looked up the cache before the router refused it.
    assert_eq!(get("tollgate_cache_total{outcome=\"miss\"}"), Some(3.0));
    assert!(get("tollgate_ledger_rows_total{state=\"queued\"}").unwrap() >= 3.0);
    // No user or request id ever becomes a label.
    assert!(
        !text.contains("someone-private") && !text.contains("req_"),
        "{text}"
    );
}

#[tokio::test]
async fn admin_spend_needs_the_token_and_returns_the_report() {
    let token = "test-admin-token-0123456789";
    let gw = gateway_env(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[ledger]\nflush_interval_ms = 20\n\
         [plugins.router]\npath = \"{plugins}/rules_router.wasm\"\n",
        &[("TOLLGATE_ADMIN_TOKEN", token)],
    );
    let admin = gw.admin_base();
    for f in ["faq", "faq", "billing"] {
        let r = chat(
            &gw.base,
            &[("x-tollgate-feature", f), ("x-tollgate-tenant", "acme")],
            ask(&format!("{f} question")),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let get = |auth: Option<&str>, q: &str| {
        let mut req = http().get(format!("{admin}/v1/spend{q}"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send()
    };
    let r = get(None, "").await.unwrap();
    assert_eq!(r.status(), 401);
    let r = get(Some("Bearer wrong-token-0123456789"), "")
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let bearer = format!("Bearer {token}");
    let r = get(Some(&bearer), "?group_by=feature&tenant=acme")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["total"]["requests"], 3);
    assert_eq!(v["lines"].as_array().unwrap().len(), 2);
    let r = get(Some(&bearer), "?group_by=colour").await.unwrap();
    assert_eq!(r.status(), 400);
    let plugins: Value = serde_json::from_str(
        &http()
            .get(format!("{admin}/v1/plugins"))
            .header("authorization", &bearer)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let router = &plugins["plugins"][0];
    assert_eq!(router["slot"], "router");
    assert_eq!(router["kind"], "router");
    assert_eq!(router["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(router["limits"]["timeout_ms"], 5);
    assert_eq!(router["capabilities"]["network"], false);
    assert!(router["calls"].as_u64().unwrap() >= 3);
    // The admin API is not on the application listener.
    let r = http()
        .get(format!("{}/v1/spend", gw.base))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn without_a_token_the_admin_api_does_not_start() {
    let gw = gateway("[admin]\nlisten = \"127.0.0.1:0\"\n");
    assert!(gw.log_contains("admin API disabled"));
    assert!(!gw.logged_so_far("admin API listening"));
}

#[tokio::test]
async fn recorded_traffic_exports_to_a_trace_that_replays() {
    let cfg = r#"
[ledger]
record_bodies = true
[plugins.cache_policy]
path = "{plugins}/default_cache_policy.wasm"
"#;
    let mut gw = gateway(cfg);
    let h = [
        ("x-tollgate-tenant", "acme"),
        ("x-tollgate-user", "ann"),
        ("x-tollgate-feature", "faq"),
        ("x-tollgate-task", "t1"),
        ("x-tollgate-sim-output-tokens", "30"),
    ];
    let q = ask("How do I rotate an API key?");
    assert_eq!(chat(&gw.base, &h, q.clone()).await.status, 200);
    let hit = chat(&gw.base, &h, q.clone()).await;
    assert_eq!(hit.header("x-tollgate-cache"), "hit");
    let origin = hit.header("x-tollgate-cache-origin").to_string();
    assert!(origin.starts_with("req_"), "{origin}");
    let other = ask("How do I delete a project?");
    assert_eq!(chat(&gw.base, &h, other.clone()).await.status, 200);
    assert!(gw.sigterm_and_wait().success());

    let dir = gw._dir.path();
    let trace = dir.join("recorded.jsonl");
    let ledger = dir.join("tollgate-ledger.sqlite");
    tollgate_ok(&[
        "export-trace".as_ref(),
        "--ledger".as_ref(),
        ledger.as_os_str(),
        "--out".as_ref(),
        trace.as_os_str(),
    ]);
    let lines = read_jsonl(&trace);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["id"], origin.as_str());
    assert_eq!(lines[0]["request"], q);
    assert_eq!(lines[2]["request"], other);
    assert_eq!(
        (lines[0]["tenant"].as_str(), lines[0]["user"].as_str()),
        (Some("acme"), Some("ann"))
    );
    assert!(lines[0]["t_ms"].as_u64().unwrap() < 86_400_000);
    // The cache hit keeps the output length of the answer it was served.
    assert_eq!(lines[1]["label"]["expected_output_tokens"], 30);

    // The export replays.
    let run = dir.join("run.jsonl");
    let config = dir.join("tollgate.toml");
    tollgate_ok(&[
        "replay".as_ref(),
        "--trace".as_ref(),
        trace.as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
        "--out".as_ref(),
        run.as_os_str(),
    ]);
    let served: Vec<Value> = read_jsonl(&run)
        .into_iter()
        .map(|r| r["served"].clone())
        .collect();
    assert_eq!(served, ["model", "cache", "model"]);
}

/// An OpenAI-style refusal with this status and error code.
fn assert_refused(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (want_status, Some(code)),
        "{body}"
    );
}

/// The tier router's trained config from the cost-saver policy set, as JSON.
fn tier_router_config() -> Value {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/cost-saver/tollgate.toml"),
    )
    .unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    serde_json::to_value(&v["plugins"]["router"]["config"]).unwrap()
}

#[tokio::test]
async fn plugins_are_loaded_validated_swapped_rolled_back_and_recorded() {
    let token = "test-admin-token-0123456789";
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nplugin_dir = \"{{plugins}}\"\n\
         pins = {{ \"budget_rule\" = \"{}\" }}\n\
         [plugins.router]\npath = \"{{plugins}}/rules_router.wasm\"\nconfig = {{ default = \"gpt-4o-mini\" }}\n",
        "0".repeat(64)
    );
    let gw = gateway_env(&cfg, &[("TOLLGATE_ADMIN_TOKEN", token)]);
    let admin = gw.admin_base();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        admin_call(&admin, token, method, path.to_string(), body)
    };
    let post = |path: &str, body: Value| call(reqwest::Method::POST, path, Some(body));
    let model_for = |q: &'static str| {
        let base = gw.base.clone();
        async move {
            chat(&base, &[], ask(q))
                .await
                .header("x-tollgate-model")
                .to_string()
        }
    };
    let hard =
        "Why did our churn rise? Compare both options, explain the trade-off and recommend one.";
    assert_eq!(model_for(hard).await, "gpt-4o-mini");

    // Refused versions name the reason and leave the active one alone.
    let reasoning_case = json!({"name": "reasoning goes premium",
        "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": hard}]},
        "expect": {"model": "gpt-4o"}});
    let (s, e) = post("/v1/plugins/router/load", json!({"path": "tier_router.wasm", "config": tier_router_config(),
        "self_test": [{"name": "wrong on purpose", "request": reasoning_case["request"], "expect": {"model": "gpt-4o-mini"}}]})).await;
    assert_refused(s, &e, 422, "self_test_failed");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("wrong on purpose"),
        "{e}"
    );
    for (path, body, status, code) in [
        (
            "/v1/plugins/router/load",
            json!({"path": "trim_compressor.wasm"}),
            422,
            "wrong_world",
        ),
        (
            "/v1/plugins/router/load",
            json!({"path": "../plugins/rules_router.wasm"}),
            403,
            "path_outside_plugin_dir",
        ),
        (
            "/v1/plugins/router/load",
            json!({"wasm_base64": "AGFzbQ=="}),
            422,
            "not_a_component",
        ),
        (
            "/v1/plugins/budget_rule/load",
            json!({"path": "daily_budget.wasm"}),
            409,
            "digest_not_pinned",
        ),
        (
            "/v1/plugins/router/load",
            json!({"path": "tier_router.wasm", "config": {"threshold2": 2}}),
            422,
            "init_refused",
        ),
    ] {
        let (s, e) = post(path, body).await;
        assert_refused(s, &e, status, code);
    }
    assert_eq!(model_for(hard).await, "gpt-4o-mini");

    // A good version: loaded and tested, not yet active.
    let (s, v) = post("/v1/plugins/router/load",
        json!({"path": "tier_router.wasm", "config": tier_router_config(), "self_test": [reasoning_case]})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["self_tests_passed"], 1);
    let digest = v["sha256"].as_str().unwrap().to_string();
    assert_eq!(model_for(hard).await, "gpt-4o-mini");

    // Swap back and forth under load: no request fails.
    let load = {
        let base = gw.base.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..300 {
                statuses.push(chat(&base, &[], ask(&format!("question {i}"))).await.status);
            }
            statuses
        })
    };
    for _ in 0..5 {
        let (s, v) = post(
            "/v1/plugins/router/activate",
            json!({"sha256": &digest[..12]}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = post("/v1/plugins/router/rollback", json!({})).await;
        assert_eq!(s, 200, "{v}");
    }
    let statuses = load.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let (s, _) = post("/v1/plugins/router/activate", json!({"sha256": digest})).await;
    assert_eq!(s, 200);
    assert_eq!(model_for(hard).await, "gpt-4o");
    assert_eq!(
        model_for("How do I reset my password?").await,
        "gpt-4.1-mini"
    );
    let (_, listed) = call(reqwest::Method::GET, "/v1/plugins", None).await;
    assert_eq!(listed["plugins"][0]["sha256"], digest.as_str());
    assert_eq!(listed["loaded"]["router"][0]["loaded_by"], "alice@ci");
    assert_eq!(listed["pins"]["budget_rule"], "0".repeat(64));

    let (s, _) = post("/v1/plugins/router/rollback", json!({})).await;
    assert_eq!(s, 200);
    assert_eq!(model_for(hard).await, "gpt-4o-mini");
    let (s, _) = call(reqwest::Method::DELETE, "/v1/plugins/router", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        model_for(hard).await,
        "gpt-4o",
        "no router: the asked model"
    );
    let (s, e) = call(reqwest::Method::DELETE, "/v1/plugins/router", None).await;
    assert_refused(s, &e, 404, "slot_empty");
    let (s, e) = post("/v1/plugins/routr/load", json!({})).await;
    assert_refused(s, &e, 404, "unknown_slot");

    // Every change and refusal is on record, newest first.
    let (_, c) = call(reqwest::Method::GET, "/v1/plugins/changes?limit=100", None).await;
    let actions: Vec<&str> = c["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions[0], "remove");
    assert_eq!(actions[1], "rollback");
    assert_eq!(actions.iter().filter(|a| **a == "refuse").count(), 6, "{c}");
    assert_eq!(actions.iter().filter(|a| **a == "activate").count(), 6);
    assert_eq!(actions.iter().filter(|a| **a == "load").count(), 1);
    assert!(
        c["changes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["actor"] == "alice@ci")
    );
    let loaded = c["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["action"] == "load")
        .unwrap();
    assert_eq!(loaded["sha256"], digest.as_str());
}

#[test]
fn plugin_inspect_shows_what_a_reviewer_needs() {
    let file = plugin_dir().join("rules_router.wasm");
    let out = tollgate_ok(&[
        "plugin".as_ref(),
        "inspect".as_ref(),
        file.as_os_str(),
        "--json".as_ref(),
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(v["world"], "router");
    assert_eq!(v["bytes"], bytes.len());
    assert_eq!(v["loadable"], true);
    assert_eq!(v["exports"], json!(["init", "route"]));
    let sha = v["sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    // A plugin that imports the filesystem gets an empty one unless its slot
    // grants a data directory; one that imports sockets is refused outright
    // (exit status 1).
    let fs = plugin_dir().join("fs_probe_fixture.wasm");
    let out = tollgate_ok(&[
        "plugin".as_ref(),
        "inspect".as_ref(),
        fs.as_os_str(),
        "--json".as_ref(),
    ]);
    let f: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f["imports_filesystem"], true, "{f}");
    assert_eq!(f["loadable"], true, "{f}");
    assert!(
        f["imports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["capability"] == "filesystem"
                && i["gateway"]
                    .as_str()
                    .unwrap()
                    .contains("capabilities.data_dir")),
        "{f}"
    );
    let net = plugin_dir().join("net_probe_fixture.wasm");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["plugin", "inspect", "--json"])
        .arg(&net)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let n: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n["loadable"], false);
    assert!(
        n["refused_because"]
            .as_str()
            .unwrap()
            .contains("wasi:sockets"),
        "{n}"
    );
    let h = n;
    let imports = h["imports"].as_array().unwrap();
    assert!(imports.iter().any(|i| i["capability"] == "network"), "{h}");
    let text = tollgate_ok(&["plugin".as_ref(), "inspect".as_ref(), file.as_os_str()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("world     router") && text.contains(sha),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["plugin", "inspect"])
        .arg(&junk)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid WebAssembly component"));
}

#[tokio::test]
async fn a_shadow_router_is_compared_not_applied() {
    let token = "test-admin-token-0123456789";
    let cfg = "[admin]\nlisten = \"127.0.0.1:0\"\nplugin_dir = \"{plugins}\"\n\
               [ledger]\nflush_interval_ms = 20\n\
               [plugins.router]\npath = \"{plugins}/rules_router.wasm\"\n\
               config = { default = \"gpt-4.1-mini\" }\n";
    let gw = gateway_env(cfg, &[("TOLLGATE_ADMIN_TOKEN", token)]);
    let admin = gw.admin_base();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        admin_call(&admin, token, method, path.to_string(), body)
    };
    let (s, v) = call(
        reqwest::Method::POST,
        "/v1/plugins/router/load",
        Some(json!({"path": "tier_router.wasm", "config": tier_router_config()})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let digest = v["sha256"].as_str().unwrap().to_string();
    let (s, v) = call(
        reqwest::Method::POST,
        "/v1/plugins/router/shadow",
        Some(json!({"sha256": digest})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, e) = call(
        reqwest::Method::POST,
        "/v1/plugins/compressor/shadow",
        Some(json!({"sha256": digest})),
    )
    .await;
    assert_eq!(s, 404, "{e}"); // nothing loaded for that slot

    let hard =
        "Why did our churn rise? Compare both options, explain the trade-off and recommend one.";
    for q in [hard, "How do I reset my password?"] {
        let r = chat(&gw.base, &[], ask(q)).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-tollgate-model"),
            "gpt-4.1-mini",
            "the shadow is not applied"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, rep) = call(reqwest::Method::GET, "/v1/plugins/shadow", None).await;
    assert_eq!(s, 200);
    let line = &rep["shadows"][0];
    assert_eq!(line["slot"], "router");
    assert_eq!(line["sha256"], digest.as_str());
    assert_eq!(line["requests"], 2);
    assert_eq!(line["agreement_rate"], 0.5, "{rep}");
    assert_eq!(line["priced_requests"], 2);
    assert!(
        line["cost_difference_usd"].as_f64().unwrap() > 0.0,
        "gpt-4o costs more: {rep}"
    );

    let (s, _) = call(reqwest::Method::DELETE, "/v1/plugins/router/shadow", None).await;
    assert_eq!(s, 200);
    assert_eq!(chat(&gw.base, &[], ask("one more")).await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, rep) = call(reqwest::Method::GET, "/v1/plugins/shadow", None).await;
    assert_eq!(
        rep["shadows"][0]["requests"], 2,
        "no shadow after it was removed"
    );
    let ledger = gw._dir.path().join("tollgate-ledger.sqlite");
    let out = tollgate_ok(&[
        "report".as_ref(),
        "--ledger".as_ref(),
        ledger.as_os_str(),
        "--shadow".as_ref(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("router") && text.contains("50.00%"), "{text}");
    let (_, c) = call(reqwest::Method::GET, "/v1/plugins/changes", None).await;
    let actions: Vec<&str> = c["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["action"].as_str().unwrap())
        .collect();
    assert_eq!(&actions[..2], ["unshadow", "shadow"], "{c}");

    // The same bytes with two configs are two versions; the digest alone
    // no longer says which one to activate.
    let mut versions = Vec::new();
    for default in ["gpt-4o", "gpt-4o-mini"] {
        let (s, v) = call(
            reqwest::Method::POST,
            "/v1/plugins/router/load",
            Some(json!({"path": "rules_router.wasm", "config": {"default": default}})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        versions.push((
            v["version"].as_str().unwrap().to_string(),
            v["sha256"].as_str().unwrap().to_string(),
        ));
    }
    assert_ne!(versions[0].0, versions[1].0);
    assert_eq!(versions[0].1, versions[1].1);
    let (s, e) = call(
        reqwest::Method::POST,
        "/v1/plugins/router/activate",
        Some(json!({"sha256": versions[0].1})),
    )
    .await;
    assert_eq!(s, 404);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("several"),
        "{e}"
    );
    let (s, e) = call(
        reqwest::Method::POST,
        "/v1/plugins/router/activate",
        Some(json!({"version": versions[0].0})),
    )
    .await;
    assert_eq!(s, 200, "{e}");
    assert_eq!(
        chat(&gw.base, &[], ask("hi"))
            .await
            .header("x-tollgate-model"),
        "gpt-4o"
    );
}

#[tokio::test]
async fn the_watched_plugin_directory_deploys_good_files_and_refuses_bad_ones() {
    let watched = tempfile::tempdir().unwrap();
    let dir = watched.path().display().to_string();
    let cfg = format!(
        "[admin]\nplugin_dir = \"{dir}\"\nwatch = true\n[ledger]\nflush_interval_ms = 20\n\
         [plugins.router]\npath = \"{{plugins}}/rules_router.wasm\"\nconfig = {{ default = \"gpt-4o-mini\" }}\n"
    );
    let gw = gateway(&cfg);
    let base = gw.base.clone();
    let base = base.as_str();
    let model = || async {
        chat(base, &[], ask("hello there"))
            .await
            .header("x-tollgate-model")
            .to_string()
    };
    let wait_for = |want: &'static str| async move {
        let t = Instant::now();
        loop {
            let m = chat(base, &[], ask("hello there"))
                .await
                .header("x-tollgate-model")
                .to_string();
            if m == want || t.elapsed() > Duration::from_secs(20) {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(model().await, "gpt-4o-mini");

    // Settings first, then the plugin: deployed together.
    std::fs::write(
        watched.path().join("router.toml"),
        "on_error = \"open\"\n[config]\ndefault = \"gpt-4.1-mini\"\n\
         [[self_test]]\nname = \"default model\"\nrequest = { model = \"gpt-4o\", messages = [{ role = \"user\", content = \"hi\" }] }\n\
         expect = { model = \"gpt-4.1-mini\" }\n",
    )
    .unwrap();
    std::fs::copy(
        plugin_dir().join("rules_router.wasm"),
        watched.path().join("router.wasm"),
    )
    .unwrap();
    assert_eq!(wait_for("gpt-4.1-mini").await, "gpt-4.1-mini");

    // A broken file is refused; the deployed version keeps serving.
    std::fs::write(watched.path().join("router.wasm"), b"\0asm garbage").unwrap();
    let t = Instant::now();
    while !gw.log_contains("refused, the active version keeps serving")
        && t.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gw.log_contains("not a valid WebAssembly component"));
    assert_eq!(model().await, "gpt-4.1-mini");
    // Files that are not `<slot>.wasm` / `<slot>.toml` are ignored.
    std::fs::write(watched.path().join("notes.txt"), b"hello").unwrap();

    tokio::time::sleep(Duration::from_millis(200)).await;
    let conn = tollgate::ledger::open_db(&gw._dir.path().join("tollgate-ledger.sqlite")).unwrap();
    let changes = tollgate::ledger::plugin_changes(&conn, 10).unwrap();
    let actions: Vec<(&str, &str)> = changes
        .iter()
        .map(|c| (c.actor.as_str(), c.action.as_str()))
        .collect();
    assert_eq!(
        &actions[..3],
        [
            ("watch", "refuse"),
            ("watch", "activate"),
            ("watch", "load")
        ],
        "{changes:?}"
    );
}

/// Starts the gateway with `config`, which must stop the start: its stderr.
fn start_refused(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn the_spend_import_needs_its_grant_and_reads_live_spend() {
    // Without the grant the gateway refuses to start, naming the import.
    let plugin = plugin_dir().join("spend_probe_fixture.wasm");
    let err = start_refused(&format!("[plugins.router]\npath = {:?}\n", plugin));
    assert!(
        err.contains("tollgate:policy/spend") && err.contains("capabilities.spend"),
        "{err}"
    );

    let gw = gateway(
        "[plugins.router]\npath = \"{plugins}/spend_probe_fixture.wasm\"\ncapabilities = { spend = true }\n",
    );
    let h = [
        ("x-tollgate-tenant", "acme"),
        ("x-tollgate-feature", "faq"),
        ("x-tollgate-user", "ann"),
    ];
    let r = chat(&gw.base, &h, ask("hello")).await;
    assert_eq!(r.header("x-tollgate-model"), "gpt-4o-mini");
    let cost: f64 = r.header("x-tollgate-cost-usd").parse().unwrap();
    assert!(cost > 0.0);
    let r = chat(&gw.base, &h, ask("report")).await;
    let text = r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        text,
        format!("tenant={cost:.9} feature={cost:.9} user={cost:.9}")
    );
    let other = chat(&gw.base, &[("x-tollgate-tenant", "bluefin")], ask("report")).await;
    assert!(
        other.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("tenant=0.000000000"),
        "another tenant's spend is its own"
    );
}

/// The embedding model `make model` installs.
fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/models/all-MiniLM-L6-v2")
}

#[tokio::test]
async fn the_embed_import_needs_its_grant_gives_real_similarities_and_is_bounded() {
    // Without the grant the gateway refuses to start, naming the import.
    let plugin = plugin_dir().join("embed_probe_fixture.wasm");
    let err = start_refused(&format!("[plugins.router]\npath = {:?}\n", plugin));
    assert!(
        err.contains("tollgate:policy/embed") && err.contains("capabilities.embed"),
        "{err}"
    );
    // And a reviewer sees the need before deploying.
    let inspected = tollgate_ok(&[
        "plugin".as_ref(),
        "inspect".as_ref(),
        "--json".as_ref(),
        plugin.as_os_str(),
    ]);
    let v: Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(v["needs_embed"], true, "{v}");
    assert_eq!(v["loadable"], true, "{v}");

    let config = |model: &str, timeout_ms: u32| {
        format!(
            "[embeddings]\nmodel_dir = {model:?}\n[plugins.router]\npath = \"{{plugins}}/embed_probe_fixture.wasm\"\ntimeout_ms = {timeout_ms}\ncapabilities = {{ embed = true }}\n"
        )
    };
    let model = model_dir().display().to_string();
    let gw = gateway(&config(&model, 2_000));
    assert!(gw.log_contains("embedding model loaded"));
    let similarity = |r: &Resp| -> f64 {
        let c = content(r);
        assert!(c.ends_with("dims=384"), "{c}");
        c["similarity=".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let near = chat(
        &gw.base,
        &[],
        ask("similar: How do I download my invoices? | Where can I get my recent invoices?"),
    )
    .await;
    assert!(similarity(&near) > 0.6, "{}", content(&near));
    let far = chat(
        &gw.base,
        &[],
        ask("similar: How do I download my invoices? | Will it rain in Paris tomorrow?"),
    )
    .await;
    assert!(similarity(&far) < 0.2, "{}", content(&far));
    // At most 8 per plugin call; the next call starts afresh.
    for _ in 0..2 {
        let many = chat(&gw.base, &[], ask("embed 9")).await;
        assert_eq!(
            content(&many),
            "ok=8 error=at most 8 embeddings per plugin call"
        );
    }
    let plain = chat(&gw.base, &[], ask("hello")).await;
    assert_eq!(plain.header("x-tollgate-model"), "gpt-4o-mini");
    // 3 distinct questions + 8 probe texts computed; the repeats memoised.
    let computed = metric(&gw.base, "tollgate_embeddings_total{outcome=\"computed\"}").await;
    let memo = metric(&gw.base, "tollgate_embeddings_total{outcome=\"memo\"}").await;
    assert_eq!((computed, memo), (11.0, 9.0));
    assert!(metric(&gw.base, "tollgate_embedding_seconds_total").await > 0.0);
    drop(gw);

    // Embedding time counts against the plugin's deadline: 8 new texts
    // cannot fit in 2 ms, so the call either hears "deadline" from the
    // import or is stopped as a timeout (and the request goes on, fail-open).
    let gw = gateway(&config(&model, 2));
    let r = chat(&gw.base, &[], ask("embed 8")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let metrics = get_text(format!("{}/metrics", gw.base)).await;
    let timed_out = metrics.lines().any(|l| {
        l == "tollgate_plugin_failures_total{kind=\"router\",plugin=\"embed_probe_fixture\",reason=\"timeout\"} 1"
    });
    assert!(
        content(&r).contains("deadline") || timed_out,
        "{}\n{metrics}",
        content(&r)
    );
    drop(gw);

    // A configured model that is not there: the gateway serves, says why,
    // and the plugin hears the reason.
    let gw = gateway(&config("/nonexistent/minilm", 2_000));
    assert!(gw.log_contains("embeddings off"));
    let r = chat(&gw.base, &[], ask("similar: a | b")).await;
    let c = content(&r);
    assert!(
        c.starts_with("error: the gateway has no embedding model")
            && c.contains("/nonexistent/minilm/config.json"),
        "{c}"
    );
}

/// Asks until `check` holds for a response (the file watcher settles in
/// ~300 ms); panics after 10 s with the last response.
async fn until_served(base: &str, check: impl Fn(&Resp) -> bool) -> Resp {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = chat(base, &[], ask("hello there")).await;
        if check(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not applied: {} {:?}",
            r.status,
            r.headers
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn config_edits_apply_without_a_restart_and_bad_edits_are_refused() {
    let token = "reload-token-0123456789";
    // Every version of the file keeps the admin API on a free port.
    const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let router = |default: &str| {
        format!(
            "{ADMIN}[plugins.router]\npath = \"{}/rules_router.wasm\"\nconfig = {{ default = \"{default}\" }}\n",
            plugin_dir().display()
        )
    };
    let gw = gateway_env(&router("gpt-4o-mini"), &[("TOLLGATE_ADMIN_TOKEN", token)]);
    let file = gw._dir.path().join("tollgate.toml");
    let admin = gw.admin_base();
    let r = chat(&gw.base, &[], ask("hello there")).await;
    assert_eq!(r.header("x-tollgate-model"), "gpt-4o-mini");
    let cost_before: f64 = r.header("x-tollgate-cost-usd").parse().unwrap();

    // A plugin slot and a price change, picked up from the file.
    let priced = format!(
        "{}[pricing.models.\"gpt-4.1-mini\"]\ntier = 2\ninput = 40.0\noutput = 160.0\n",
        router("gpt-4.1-mini")
    );
    std::fs::write(&file, &priced).unwrap();
    let r = until_served(&gw.base, |r| r.header("x-tollgate-model") == "gpt-4.1-mini").await;
    let cost: f64 = r.header("x-tollgate-cost-usd").parse().unwrap();
    // 100x gpt-4.1-mini's catalog price, dearer than gpt-4o-mini's answer.
    assert!(cost > cost_before * 100.0, "{cost} vs {cost_before}");

    // Bad edits: broken TOML, an unknown key, a plugin that cannot load.
    // Each is refused with the reason; the running config keeps serving.
    let missing = "[plugins.router]\npath = \"/nonexistent/router.wasm\"\n";
    for (bad, says) in [
        ("[server\nlisten = 1", "tollgate.toml"),
        ("[pricing]\ncolour = \"red\"\n", "colour"),
        (missing, "/nonexistent/router.wasm"),
    ] {
        std::fs::write(&file, format!("{ADMIN}{bad}")).unwrap();
        let (status, body) = admin_call(
            &admin,
            token,
            reqwest::Method::POST,
            "/v1/config/reload".into(),
            None,
        )
        .await;
        assert_refused(status, &body, 400, "config_refused");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(says) && msg.contains("running config stays"),
            "{msg}"
        );
        let r = chat(&gw.base, &[], ask("hello there")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-tollgate-model"), "gpt-4.1-mini", "{bad}");
    }
    assert!(gw.log_contains("config reload refused, the running config stays"));
    assert!(
        metric(
            &gw.base,
            "tollgate_config_reloads_total{result=\"refused\"}"
        )
        .await
            >= 3.0
    );

    // Through the admin API: the router removed, a listener change reported
    // as needing a restart (the running listener stays).
    // (The file watcher may apply it first; then this call finds nothing new.)
    std::fs::write(
        &file,
        format!("{ADMIN}[server]\nlisten = \"127.0.0.1:1\"\n"),
    )
    .unwrap();
    let (status, body) = admin_call(
        &admin,
        token,
        reqwest::Method::POST,
        "/v1/config/reload".into(),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let r = chat(&gw.base, &[], ask("hello there")).await;
    assert_eq!(
        r.header("x-tollgate-model"),
        "gpt-4o",
        "no router: the asked model"
    );

    // Every reload is in the change log, with what it did.
    let conn = tollgate::ledger::open_db(&gw._dir.path().join("tollgate-ledger.sqlite")).unwrap();
    let changes = tollgate::ledger::plugin_changes(&conn, 50).unwrap();
    assert!(
        changes.iter().any(|c| c.action == "config_reload"
            && c.detail.contains("pricing")
            && c.detail.contains("plugins [router]")
            && c.detail.contains("restart needed for [server.listen]")),
        "{changes:?}"
    );
    let refused = changes
        .iter()
        .filter(|c| c.action == "config_refused")
        .count();
    assert!(refused >= 3, "{changes:?}");
    assert!(
        changes
            .iter()
            .any(|c| c.action == "config_refused" && c.actor == "alice@ci"),
        "{changes:?}"
    );
}

#[tokio::test]
async fn sighup_reloads_when_the_file_is_not_watched() {
    let gw = gateway("[server]\nwatch_config = false\n");
    let file = gw._dir.path().join("tollgate.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nwatch_config = false\n[plugins.router]\npath = \"{}/rules_router.wasm\"\nconfig = {{ default = \"gpt-4o-mini\" }}\n",
            plugin_dir().display()
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = chat(&gw.base, &[], ask("hello there")).await;
    assert_eq!(
        r.header("x-tollgate-model"),
        "gpt-4o",
        "not watched: unchanged"
    );
    let pid = gw.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    until_served(&gw.base, |r| r.header("x-tollgate-model") == "gpt-4o-mini").await;
    assert!(gw.log_contains("config reloaded"));
}

/// Issue acceptance: steady open-loop load (200 requests per second for
/// 60 s; `TOLLGATE_SWAP_SECONDS` shortens it) while the router is swapped
/// 100 times between two versions through the admin API. No request may
/// fail, and answers must come from both versions. Prints the admin swap
/// latency (run with `--nocapture` to see it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_under_steady_load_fail_no_request() {
    const RPS: u64 = 200;
    const SWAPS: u32 = 100;
    let seconds: u64 = std::env::var("TOLLGATE_SWAP_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let token = "swap-load-token-0123456789";
    let cfg = "[admin]\nlisten = \"127.0.0.1:0\"\nplugin_dir = \"{plugins}\"\n\
               [plugins.router]\npath = \"{plugins}/rules_router.wasm\"\nconfig = { default = \"gpt-4o-mini\" }\ntimeout_ms = 1000\n";
    let gw = gateway_env(cfg, &[("TOLLGATE_ADMIN_TOKEN", token)]);
    let admin = gw.admin_base();
    let post = |path: &'static str, body: Value| {
        admin_call(
            &admin,
            token,
            reqwest::Method::POST,
            path.to_string(),
            Some(body),
        )
    };
    let mut versions = Vec::new();
    for model in ["gpt-4o-mini", "gpt-4.1-mini"] {
        let (s, v) = post(
            "/v1/plugins/router/load",
            // A generous deadline: on a loaded 2-core machine a 5 ms plugin
            // deadline can trip (fail-open keeps the asked model), which is
            // containment, not a swap failure.
            json!({"path": "rules_router.wasm", "config": {"default": model}, "timeout_ms": 1000}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        versions.push(v["version"].as_str().unwrap().to_string());
    }

    let client = http();
    let url = format!("{}/v1/chat/completions", gw.base);
    let body = ask("What are your opening hours?").to_string();
    let load = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RPS));
        let end = std::time::Instant::now() + Duration::from_secs(seconds);
        let mut calls = Vec::new();
        while std::time::Instant::now() < end {
            tick.tick().await;
            let req = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone());
            calls.push(tokio::spawn(async move {
                match req.send().await {
                    Ok(r) => {
                        let model = r
                            .headers()
                            .get("x-tollgate-model")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let status = r.status().as_u16();
                        let _ = r.bytes().await;
                        (status, model)
                    }
                    Err(e) => (0, e.to_string()),
                }
            }));
        }
        let mut out = Vec::with_capacity(calls.len());
        for c in calls {
            out.push(c.await.unwrap());
        }
        out
    });

    let gap = Duration::from_millis(seconds * 1000 / u64::from(SWAPS));
    let mut swap_ms = Vec::new();
    let mut swap_us = Vec::new();
    for i in 0..SWAPS {
        tokio::time::sleep(gap).await;
        let version = &versions[(i % 2) as usize];
        let t = std::time::Instant::now();
        let (s, v) = post("/v1/plugins/router/activate", json!({"version": version})).await;
        swap_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(s, 200, "{v}");
        swap_us.push(v["swap_us"].as_f64().unwrap());
    }
    let results = load.await.unwrap();

    let failed: Vec<_> = results.iter().filter(|(s, _)| *s != 200).collect();
    let by_model = |m: &str| results.iter().filter(|(_, got)| got == m).count();
    let (mini, newer) = (by_model("gpt-4o-mini"), by_model("gpt-4.1-mini"));
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p) as usize]
    };
    eprintln!(
        "swap under load: {} requests in {seconds} s, {} failed; gpt-4o-mini {mini}, gpt-4.1-mini {newer}; \
         {SWAPS} swaps: in the gateway p50 {:.1} µs, max {:.1} µs; admin round trip (incl. the durable change record) \
         p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        results.len(),
        failed.len(),
        pct(&mut swap_us, 0.5),
        pct(&mut swap_us, 1.0),
        pct(&mut swap_ms, 0.5),
        pct(&mut swap_ms, 0.99),
        pct(&mut swap_ms, 1.0),
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        results.len() as u64 >= RPS * seconds * 95 / 100,
        "the load was not steady: {} requests",
        results.len()
    );
    assert!(mini > 0 && newer > 0, "both versions answer");
    assert_eq!(mini + newer, results.len());
}

/// Issue 7 acceptance: 200 concurrent requests against a $1 tenant budget.
/// Worst-case reservations are taken atomically, so the tenant never spends
/// more than the cap (plus at most one request), the refused requests get a
/// 429 naming the budget, and the ledger, the counters and the answers agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_cannot_overspend_a_hard_budget() {
    let token = "budget-token-0123456789";
    let mut gw = gateway_env(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[budgets]]\nname = \"acme-daily\"\nscope = \"tenant\"\nwindow = \"day\"\nlimit_usd = 1.0\n",
        &[("TOLLGATE_ADMIN_TOKEN", token)],
    );
    let admin = gw.admin_base();
    let client = http();
    let url = format!("{}/v1/chat/completions", gw.base);
    let mut calls = Vec::new();
    for i in 0..200 {
        let req = client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-tollgate-tenant", "acme")
            .header("x-tollgate-sim-output-tokens", "2000")
            .body(
                json!({"model": "gpt-4o", "max_tokens": 2000,
                       "messages": [{"role": "user", "content": format!("Write report {i}")}]})
                .to_string(),
            );
        calls.push(tokio::spawn(async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let cost: f64 = r
                .headers()
                .get("x-tollgate-cost-usd")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            (status, cost, r.text().await.unwrap())
        }));
    }
    let mut answered = Vec::new();
    let mut refused = 0;
    for c in calls {
        let (status, cost, text) = c.await.unwrap();
        match status {
            200 => answered.push(cost),
            429 => {
                refused += 1;
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
                assert_eq!(v["error"]["type"], "insufficient_quota", "{v}");
                let msg = v["error"]["message"].as_str().unwrap();
                assert!(
                    msg.contains("acme-daily")
                        && msg.contains("tenant acme")
                        && msg.contains("day"),
                    "{msg}"
                );
            }
            other => panic!("unexpected status {other}: {text}"),
        }
    }
    let spent: f64 = answered.iter().sum();
    let one = answered.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "budget under concurrency: {} answered, {refused} refused, spent {spent:.6} USD of a 1 USD cap",
        answered.len()
    );
    assert!(refused > 0 && !answered.is_empty());
    assert!(spent <= 1.0 + one, "spent {spent} over the cap");
    // Worst case = real cost here, so the cap is filled, not just respected.
    assert!(spent > 1.0 - 2.0 * one, "spent {spent}");

    let (s, v) = admin_call(
        &admin,
        token,
        reqwest::Method::GET,
        "/v1/budgets?tenant=acme".into(),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let held = v["budgets"][0]["held_usd"].as_f64().unwrap();
    assert!(
        (held - spent).abs() < 1e-6,
        "counters {held} vs answers {spent}"
    );

    assert!(gw.sigterm_and_wait().success());
    let db = gw.ledger();
    let (rows, ledger_spent): (i64, f64) = db
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(cost_usd), 0) FROM requests WHERE tenant = 'acme' AND status = 200",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows as usize, answered.len());
    assert!(
        (ledger_spent - spent).abs() < 1e-6,
        "ledger {ledger_spent} vs {spent}"
    );
    assert_eq!(
        count_rows(&db, "WHERE error_code = 'budget_exceeded'"),
        refused
    );
}

#[tokio::test]
async fn budgets_downgrade_change_at_run_time_and_are_checked() {
    let token = "budget-token-0123456789";
    let gw = gateway_env(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[budgets]]\nname = \"task-cap\"\nscope = \"task\"\nwindow = \"task\"\nlimit_usd = 0.05\n\
         on_exceed = \"downgrade\"\ndowngrade_to = \"gpt-4o-mini\"\n",
        &[("TOLLGATE_ADMIN_TOKEN", token)],
    );
    let admin = gw.admin_base();
    let ask_big = |task: &'static str| {
        let base = gw.base.clone();
        async move {
            let body = json!({"model": "gpt-4o", "max_tokens": 2000,
                "messages": [{"role": "user", "content": "Write the quarterly report"}]});
            let h = [
                ("x-tollgate-task", task),
                ("x-tollgate-sim-output-tokens", "2000"),
            ];
            chat(&base, &h, body).await
        }
    };
    // Two gpt-4o calls fit in $0.05 (~$0.02 each); the third is downgraded.
    let models: Vec<String> = {
        let mut m = Vec::new();
        for _ in 0..4 {
            m.push(
                ask_big("agent-1")
                    .await
                    .header("x-tollgate-model")
                    .to_string(),
            );
        }
        m
    };
    assert_eq!(models, ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]);
    // Another task has its own budget.
    assert_eq!(
        ask_big("agent-2").await.header("x-tollgate-model"),
        "gpt-4o"
    );

    // Replaced at run time: a hard $0.01 per task, no downgrade.
    let put = |body: Value| {
        admin_call(
            &admin,
            token,
            reqwest::Method::PUT,
            "/v1/budgets".into(),
            Some(body),
        )
    };
    let (s, v) =
        put(json!({"budgets": [{"scope": "tenant", "window": "task", "limit_usd": 1}]})).await;
    assert_refused(s, &v, 400, "invalid_budgets");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("budgets[0]"),
        "{v}"
    );
    let (s, v) = put(
        json!({"budgets": [{"name": "tiny", "scope": "task", "window": "day", "limit_usd": 0.01}]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let r = ask_big("agent-3").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert!(r.error_message().contains("tiny"), "{}", r.text);
    // A request whose worst case fits still goes through (without
    // max_tokens, the worst case assumes 4,096 output tokens: $0.04).
    let h = [("x-tollgate-task", "agent-3")];
    let mut small = ask("hi");
    small["max_tokens"] = json!(50);
    assert_eq!(chat(&gw.base, &h, small).await.status, 200);
    assert_eq!(chat(&gw.base, &h, ask("hi")).await.status, 429);
}

#[tokio::test]
async fn kill_switches_stop_traffic_at_once_survive_a_restart_and_lift() {
    let token = "kill-token-0123456789";
    let envs = [("TOLLGATE_ADMIN_TOKEN", token)];
    let mut gw = gateway_env("[admin]\nlisten = \"127.0.0.1:0\"\n", &envs);
    let admin = gw.admin_base();
    let call = |admin: String, method: reqwest::Method, path: &str, body: Option<Value>| {
        let path = path.to_string();
        async move { admin_call(&admin, token, method, path, body).await }
    };
    let kill =
        |admin: String, body: Value| call(admin, reqwest::Method::POST, "/v1/kill", Some(body));
    let acme = [("x-tollgate-tenant", "acme")];
    let bluefin = [("x-tollgate-tenant", "bluefin")];
    assert_eq!(chat(&gw.base, &acme, ask("hi")).await.status, 200);

    // A tenant switch: the very next request is refused.
    let t = std::time::Instant::now();
    let (s, sw) = kill(
        admin.clone(),
        json!({"tenant": "acme", "reason": "runaway agent"}),
    )
    .await;
    assert_eq!(s, 200, "{sw}");
    let r = chat(&gw.base, &acme, ask("hi")).await;
    let took = t.elapsed();
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.error_code(), "killed");
    let id = sw["id"].as_str().unwrap().to_string();
    assert!(r.error_message().contains(&id) && r.error_message().contains("runaway agent"));
    assert!(took < Duration::from_secs(1), "{took:?}");
    eprintln!("kill switch: set and first refusal within {took:?}");
    assert_eq!(
        chat(&gw.base, &bluefin, ask("hi")).await.status,
        200,
        "other tenants go on"
    );

    // A model switch takes the model out of routes; a prompt-version switch
    // stops that prompt.
    let (s, _) = kill(admin.clone(), json!({"model": "gpt-4o"})).await;
    assert_eq!(s, 200);
    assert_eq!(
        chat(&gw.base, &bluefin, ask("hi")).await.error_code(),
        "killed"
    );
    let mut mini = ask("hi");
    mini["model"] = json!("gpt-4o-mini");
    assert_eq!(chat(&gw.base, &bluefin, mini.clone()).await.status, 200);
    let (s, _) = kill(admin.clone(), json!({"prompt_version": "support-v7"})).await;
    assert_eq!(s, 200);
    let v7 = [
        ("x-tollgate-tenant", "bluefin"),
        ("x-tollgate-prompt-version", "support-v7"),
    ];
    assert_eq!(
        chat(&gw.base, &v7, mini.clone()).await.error_code(),
        "killed"
    );
    let (s, e) = kill(admin.clone(), json!({"reason": "no scope"})).await;
    assert_refused(s, &e, 400, "invalid_kill_switch");
    assert_eq!(metric(&gw.base, "tollgate_killed_total").await, 3.0);

    // A restart restores the active switches from the change log.
    assert!(gw.sigterm_and_wait().success());
    let dir = std::mem::replace(&mut gw._dir, tempfile::tempdir().unwrap());
    drop(gw);
    let cfg = dir.path().join("tollgate.toml").display().to_string();
    let gw = spawn(
        &["serve", "--config", &cfg, "--listen", "127.0.0.1:0"],
        dir,
        "tollgate listening on http://",
        &envs,
    );
    assert!(gw.log_contains("kill switches restored"));
    assert_eq!(
        chat(&gw.base, &acme, mini.clone()).await.error_code(),
        "killed"
    );
    let admin = gw.admin_base();
    let (_, listed) = call(admin.clone(), reqwest::Method::GET, "/v1/kill", None).await;
    assert_eq!(listed["active"].as_array().unwrap().len(), 3, "{listed}");

    // Lifted: traffic flows again; an unknown id is a 404.
    let (s, _) = call(
        admin.clone(),
        reqwest::Method::DELETE,
        &format!("/v1/kill/{id}"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(chat(&gw.base, &acme, mini).await.status, 200);
    let (s, e) = call(
        admin.clone(),
        reqwest::Method::DELETE,
        &format!("/v1/kill/{id}"),
        None,
    )
    .await;
    assert_refused(s, &e, 404, "no_kill_switch");

    // The ledger shows the refusals (rows are committed within 100 ms) and
    // the prompt versions.
    let db = gw.ledger();
    let t = std::time::Instant::now();
    while count_rows(&db, "WHERE error_code = 'killed'") < 4 && t.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count_rows(&db, "WHERE error_code = 'killed'"), 4);
    assert_eq!(count_rows(&db, "WHERE prompt_version = 'support-v7'"), 1);
}

/// A local webhook receiver: the JSON bodies POSTed to it.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    let body = &buf[end + 4..end + 4 + len];
                    sink.lock()
                        .unwrap()
                        .push(serde_json::from_slice(body).unwrap());
                    let _ = sock
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                }
            });
        }
    });
    (url, got)
}

#[tokio::test]
async fn budget_alerts_fire_once_per_threshold_to_a_webhook() {
    let (url, got) = webhook_receiver().await;
    let gw = gateway(&format!(
        "[alerts]\nwebhook_url = \"{url}\"\n\
         [[budgets]]\nname = \"acme-daily\"\nscope = \"tenant\"\nwindow = \"day\"\nlimit_usd = 0.1\n"
    ));
    let h = [
        ("x-tollgate-tenant", "acme"),
        ("x-tollgate-sim-output-tokens", "2000"),
    ];
    let body = json!({"model": "gpt-4o", "max_tokens": 2000,
        "messages": [{"role": "user", "content": "Write the report"}]});
    // ~$0.02 each: 20%, 40%, 60% (alert 50%), 80% (alert 80%), then refused
    // (alert 100%); refusals after that alert nothing new.
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(chat(&gw.base, &h, body.clone()).await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429, 429, 429]);
    let t = std::time::Instant::now();
    while got.lock().unwrap().len() < 3 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = got.lock().unwrap().clone();
    let thresholds: Vec<f64> = events
        .iter()
        .map(|e| e["threshold"].as_f64().unwrap())
        .collect();
    assert_eq!(thresholds, [0.5, 0.8, 1.0], "{events:?}");
    let e = &events[1];
    assert_eq!(e["type"], "budget_alert");
    assert_eq!(e["budget"], "acme-daily");
    assert_eq!(e["entity"], "tenant acme");
    assert_eq!(
        (e["scope"].as_str(), e["window"].as_str()),
        (Some("tenant"), Some("day"))
    );
    assert!(
        e["ratio"].as_f64().unwrap() >= 0.8
            && e["request_id"].as_str().unwrap().starts_with("req_")
    );
    assert!(gw.log_contains("budget alert: 80% of the limit reached"));
    assert_eq!(
        metric(&gw.base, "tollgate_budget_alerts_total{threshold=\"0.8\"}").await,
        1.0
    );
}

#[tokio::test]
async fn retries_back_off_breakers_open_and_the_last_resort_is_clear() {
    let mut gw = gateway(
        "[resilience]\nmax_retries = 2\nbackoff_base_ms = 60\nbreaker_failures = 3\nbreaker_open_ms = 1000\n\
         [tasks]\nmax_retries = 1\n\
         [plugins.router]\npath = \"{plugins}/rules_router.wasm\"\n\
         config = { default = \"keep\", rules = [{ keywords = [\"ladder\"], fallback = [\"gpt-4o\", \"gpt-4o-mini\"] }] }\n",
    );
    // Two failures, then an answer: backoff 30-60 ms, then 60-120 ms.
    let t = Instant::now();
    let r = chat(&gw.base, &[("x-tollgate-sim-fault", "500x2")], ask("q1")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        t.elapsed() >= Duration::from_millis(90),
        "{:?}",
        t.elapsed()
    );
    // Retry-After is honoured (1 s), not the shorter backoff.
    let t = Instant::now();
    let r = chat(&gw.base, &[("x-tollgate-sim-fault", "429x1")], ask("q2")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    // A task may retry once in all: the second failure is final.
    let h = [
        ("x-tollgate-sim-fault", "500x2"),
        ("x-tollgate-task", "agent-7"),
    ];
    let r = chat(&gw.base, &h, ask("q3")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "upstream_unavailable"),
        "{}",
        r.text
    );
    assert!(r.error_message().contains("(2 attempts)"), "{}", r.text);

    // Three failures of gpt-4o open its breaker: the ladder goes straight to
    // gpt-4o-mini without calling gpt-4o, and a plain gpt-4o request is a 503.
    for i in 0..3 {
        let r = chat(
            &gw.base,
            &[("x-tollgate-sim-fault", "500@gpt-4o")],
            ask(&format!("b{i}")),
        )
        .await;
        assert_eq!(r.status, 503);
    }
    assert_eq!(
        metric(
            &gw.base,
            "tollgate_circuit_breaker_open{model=\"gpt-4o\",provider=\"sim\"}"
        )
        .await,
        1.0
    );
    let r = chat(&gw.base, &[], ask("use the ladder")).await;
    assert_eq!(r.header("x-tollgate-model"), "gpt-4o-mini", "{}", r.text);
    let r = chat(&gw.base, &[], ask("plain")).await;
    assert!(r.error_message().contains("circuit open"), "{}", r.text);
    // Half-open after 1 s: one probe, it succeeds, the breaker closes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = chat(&gw.base, &[], ask("plain again")).await;
    assert_eq!(
        (r.status, r.header("x-tollgate-model")),
        (200, "gpt-4o"),
        "{}",
        r.text
    );
    assert_eq!(
        metric(
            &gw.base,
            "tollgate_circuit_breaker_open{model=\"gpt-4o\",provider=\"sim\"}"
        )
        .await,
        0.0
    );

    // A stream dropped halfway is billed for what was produced.
    let mut s = ask("stream and drop");
    s["stream"] = json!(true);
    let r = chat(
        &gw.base,
        &[
            ("x-tollgate-sim-fault", "drop"),
            ("x-tollgate-sim-output-tokens", "40"),
        ],
        s,
    )
    .await;
    assert!(r.text.contains("upstream_stream_broken"), "{}", r.text);
    assert!(gw.sigterm_and_wait().success());
    let db = gw.ledger();
    let (calls, cost): (String, f64) = db
        .query_row(
            "SELECT calls, cost_usd FROM requests WHERE status = 200 ORDER BY ts_ms LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let calls: Vec<Value> = serde_json::from_str(&calls).unwrap();
    assert_eq!(calls.len(), 3, "every attempt is recorded: {calls:?}");
    assert_eq!(
        (calls[0]["status"].as_u64(), calls[0]["cost_usd"].as_f64()),
        (Some(500), Some(0.0))
    );
    assert!(cost > 0.0);
    let (estimated, dropped_cost): (bool, f64) = db
        .query_row(
            "SELECT estimated, cost_usd FROM requests WHERE error_code = 'upstream_stream_broken'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(estimated && dropped_cost > 0.0);
}

#[tokio::test]
async fn a_route_with_a_fallback_answer_answers_when_every_model_fails() {
    let gw = gateway(
        "[resilience]\nmax_retries = 1\nbackoff_base_ms = 1\nfallback_answer = \"We are busy; please try again in a minute.\"\n",
    );
    let r = chat(&gw.base, &[("x-tollgate-sim-fault", "503")], ask("hello")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(content(&r), "We are busy; please try again in a minute.");
    assert_eq!(r.header("x-tollgate-model"), "fallback-answer");
    assert_eq!(r.header("x-tollgate-fallback"), "answer");
    assert_eq!(r.header("x-tollgate-cost-usd"), "0.000000000");
}

#[tokio::test]
async fn deferrable_requests_go_through_a_batch_at_its_discount() {
    let (hook, got) = webhook_receiver().await;
    let allow = hook.rsplit_once('/').unwrap().0.to_string();
    let mut gw = gateway(&format!(
        "[batch]\nmax_requests = 3\nflush_ms = 5000\ncallback_allow = [\"{allow}/\"]\n\
         deferrable_features = [\"nightly\"]\n"
    ));
    let body = json!({"model": "gpt-4o", "max_tokens": 100,
        "messages": [{"role": "user", "content": "Summarise last quarter"}]});
    // Refused up front: a stream cannot be deferred; a callback must be allowed.
    let mut s = body.clone();
    s["stream"] = json!(true);
    let r = chat(&gw.base, &[("x-tollgate-deferrable", "true")], s).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "deferred_stream")
    );
    let h = [
        ("x-tollgate-deferrable", "true"),
        ("x-tollgate-callback-url", "http://169.254.169.254/x"),
    ];
    let r = chat(&gw.base, &h, body.clone()).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "callback_not_allowed")
    );

    // Three deferred requests fill a batch (max_requests = 3): it goes out
    // at once. The third is deferred by rule: its feature is deferrable.
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut h = vec![
            ("x-tollgate-tenant", "acme"),
            ("x-tollgate-sim-output-tokens", "50"),
        ];
        h.push(match i {
            2 => ("x-tollgate-feature", "nightly"),
            _ => ("x-tollgate-deferrable", "true"),
        });
        if i == 0 {
            h.push(("x-tollgate-callback-url", hook.as_str()));
        }
        let r = chat(&gw.base, &h, body.clone()).await;
        assert_eq!(r.status, 202, "{}", r.text);
        assert_eq!(r.json()["status"], "queued");
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let poll = |id: String, tenant: &'static str| {
        let base = gw.base.clone();
        async move {
            let r = http()
                .get(format!("{base}/v1/deferred/{id}"))
                .header("x-tollgate-tenant", tenant)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (
                status,
                serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap(),
            )
        }
    };
    let t = Instant::now();
    let done = loop {
        let (s, v) = poll(ids[2].clone(), "acme").await;
        assert_eq!(s, 200, "{v}");
        if v["status"] == "completed" {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "batch not sent when full: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["batch_discount"], 0.5);
    assert_eq!(done["response"]["usage"]["completion_tokens"], 50);
    let content_len = done["response"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .len();
    assert!(content_len > 0);
    // Another tenant cannot read it.
    assert_eq!(poll(ids[2].clone(), "bluefin").await.0, 404);
    // The callback got the first one.
    let t = Instant::now();
    while got.lock().unwrap().is_empty() && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = got.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["id"], ids[0].as_str());
    assert_eq!(events[0]["status"], "completed");

    // Half price in the ledger: the same request answered directly costs double.
    let direct = chat(
        &gw.base,
        &[("x-tollgate-sim-output-tokens", "50")],
        body.clone(),
    )
    .await;
    let full: f64 = direct.header("x-tollgate-cost-usd").parse().unwrap();
    let batched = done["cost_usd"].as_f64().unwrap();
    assert!((batched - full / 2.0).abs() < 1e-9, "{batched} vs {full}");
    assert!(gw.sigterm_and_wait().success());
    let db = gw.ledger();
    assert_eq!(
        count_rows(&db, "WHERE batch_discount = 0.5 AND status = 200"),
        3
    );
}

#[tokio::test]
async fn the_openai_provider_sends_deferred_requests_through_the_batch_api() {
    let sim = sim_server();
    let gw = gateway(&format!(
        "[providers.up]\nkind = \"openai\"\nbase_url = \"{}/v1\"\napi_key_env = \"\"\nsim_when_no_key = false\n\
         batch_poll_ms = 50\n[models.\"gpt-4o\"]\nprovider = \"up\"\n[batch]\nmax_requests = 2\nflush_ms = 100\n",
        sim.base
    ));
    let mut ids = Vec::new();
    for q in ["Summarise the March report", "Summarise the April report"] {
        let r = chat(&gw.base, &[("x-tollgate-deferrable", "true")], ask(q)).await;
        assert_eq!(r.status, 202, "{}", r.text);
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    for id in ids {
        let t = Instant::now();
        let done = loop {
            let v: Value =
                serde_json::from_str(&get_text(format!("{}/v1/deferred/{id}", gw.base)).await)
                    .unwrap();
            if v["status"] != "queued" {
                break v;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["batch_discount"], 0.5);
        assert!(
            done["response"]["choices"][0]["message"]["content"]
                .as_str()
                .is_some(),
            "{done}"
        );
        assert!(done["cost_usd"].as_f64().unwrap() > 0.0);
    }
    assert!(gw.log_contains("batch created"));
}

#[tokio::test]
async fn cached_answers_are_invalidated_by_tag_tenant_user_and_prompt_version() {
    let token = "cache-admin-token";
    let gw = gateway_env(
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\n[ledger]\nflush_interval_ms = 20\n{FULL}"),
        &[("TOLLGATE_ADMIN_TOKEN", token)],
    );
    let admin = gw.admin_base();
    let delete = |query: &'static str| {
        let admin = admin.clone();
        async move {
            admin_call(
                &admin,
                token,
                reqwest::Method::DELETE,
                format!("/v1/cache{query}"),
                None,
            )
            .await
        }
    };
    let ask_as = |feature: &'static str,
                  user: &'static str,
                  extra: &'static [(&'static str, &'static str)],
                  q: &'static str| {
        let base = gw.base.clone();
        async move {
            let mut h = vec![
                ("x-tollgate-tenant", "acme"),
                ("x-tollgate-feature", feature),
                ("x-tollgate-user", user),
            ];
            h.extend_from_slice(extra);
            chat(&base, &h, ask(q))
                .await
                .header("x-tollgate-cache")
                .to_string()
        }
    };
    let docs = "What file formats can invoices be exported to?";
    let billing = "Which payment methods are accepted?";
    for (feature, q) in [("docs", docs), ("billing", billing)] {
        assert_eq!(ask_as(feature, "ann", &[], q).await, "miss");
        assert_eq!(ask_as(feature, "bob", &[], q).await, "hit");
    }

    // By tag: only the docs feature's answers go.
    let (status, v) = delete("?tag=feature:docs").await;
    assert_eq!((status, &v), (200, &json!({"removed": 1})));
    assert_eq!(ask_as("docs", "ann", &[], docs).await, "miss");
    assert_eq!(ask_as("billing", "ann", &[], billing).await, "hit");

    // By user: a private answer (the `account` feature is personal).
    let mine = "Which plan is this account on?";
    assert_eq!(ask_as("account", "ann", &[], mine).await, "miss");
    assert_eq!(ask_as("account", "ann", &[], mine).await, "hit");
    let (status, v) = delete("?tenant=acme&user=ann").await;
    assert_eq!((status, v["removed"].as_u64()), (200, Some(1)));
    assert_eq!(ask_as("account", "ann", &[], mine).await, "miss");
    assert_eq!(ask_as("billing", "ann", &[], billing).await, "hit");

    // By a custom tag from x-tollgate-tag-*, then by tenant.
    let release: &[(&str, &str)] = &[("x-tollgate-tag-release", "r42")];
    let notes = "What changed in the exporter?";
    assert_eq!(ask_as("docs", "ann", release, notes).await, "miss");
    let (_, v) = delete("?tag=release:r42").await;
    assert_eq!(v["removed"], 1);
    assert_eq!(ask_as("docs", "ann", release, notes).await, "miss");
    let (_, v) = delete("?tenant=acme").await;
    assert!(v["removed"].as_u64().unwrap() >= 3, "{v}");
    assert_eq!(ask_as("billing", "ann", &[], billing).await, "miss");

    // A new prompt version never gets the old version's answers.
    let v1: &[(&str, &str)] = &[("x-tollgate-prompt-version", "support-v1")];
    let v2: &[(&str, &str)] = &[("x-tollgate-prompt-version", "support-v2")];
    let q = "How long is the refund window?";
    assert_eq!(ask_as("docs", "ann", v1, q).await, "miss");
    assert_eq!(ask_as("docs", "bob", v1, q).await, "hit");
    assert_eq!(ask_as("docs", "bob", v2, q).await, "miss");
    let (_, v) = delete("?tag=prompt:support-v1").await;
    assert_eq!(v["removed"], 1);

    // Bad requests are refused, not taken as "everything".
    for (query, needle) in [
        ("", "name what to remove"),
        ("?user=ann", "needs its `tenant`"),
        ("?colour=red", "unknown parameter `colour`"),
        ("?tag=", "`tag` is empty"),
    ] {
        let (status, v) = delete(query).await;
        assert_eq!(status, 400, "{query}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{query}: {v}"
        );
    }
    let (status, v) = delete("?all=true").await;
    assert_eq!(status, 200, "{v}");

    // Every invalidation is in the change log.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, c) = admin_call(
        &admin,
        token,
        reqwest::Method::GET,
        "/v1/plugins/changes".into(),
        None,
    )
    .await;
    let n = c["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["slot"] == "cache" && x["action"] == "invalidate")
        .count();
    assert_eq!(n, 6, "{c}");
}
