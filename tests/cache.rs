//! The answer cache end to end: semantic matching with the native
//! embedding model, the near-miss guard, scope isolation across tenants and
//! users, SSE replay of a semantic hit, read/write accounting on the ledger,
//! and what happens without the model files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

mod common;
use common::gateway::*;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/models/all-MiniLM-L6-v2")
}

fn config(model_dir: &std::path::Path) -> String {
    format!(
        r#"
[embeddings]
model_dir = {model:?}

[ledger]
flush_interval_ms = 20

# These tests are about what the cache answers, not about deadlines: the
# default 5 ms deadline fails the lookup open ("bypass") when the parallel
# gateways here load their embedding models on the same two cores.
[plugins.cache_policy]
path = "{{plugins}}/default_cache_policy.wasm"
timeout_ms = 1000
config = {{ ttl_seconds = 600, semantic = {{ min_similarity = 0.85 }} }}
"#,
        model = model_dir.display().to_string()
    )
}

struct Asked {
    id: String,
    cache: String,
    matched: String,
    origin: String,
    content: String,
}

async fn ask_as(gw: &Proc, tenant: &str, user: &str, q: &str) -> Asked {
    let r = chat(
        &gw.base,
        &[("x-tollgate-tenant", tenant), ("x-tollgate-user", user)],
        ask(q),
    )
    .await;
    assert_eq!(r.status, 200, "{q}: {}", r.text);
    if r.header("x-tollgate-cache") == "bypass" {
        // Never expected here: the policy failed open. Say why (the log is
        // written in batches, so give it a moment).
        std::thread::sleep(Duration::from_millis(200));
        let log = gw.log.lock().unwrap();
        let failed: Vec<_> = log.iter().filter(|l| l.contains("plugin failed")).collect();
        panic!("{q}: the cache policy was bypassed: {failed:?}");
    }
    Asked {
        id: r.header("x-tollgate-request-id").to_string(),
        cache: r.header("x-tollgate-cache").to_string(),
        matched: r.header("x-tollgate-cache-match").to_string(),
        origin: r.header("x-tollgate-cache-origin").to_string(),
        content: content(&r),
    }
}

#[tokio::test]
async fn rewordings_hit_near_misses_and_other_scopes_do_not() {
    let gw = gateway(&config(&model_dir()));
    let first = ask_as(&gw, "acme", "ann", "How do I reset my password?").await;
    assert_eq!(first.cache, "miss");

    // A rewording from another user of the tenant: a semantic hit on the
    // stored answer.
    let again = ask_as(&gw, "acme", "bob", "how can i reset my password").await;
    assert_eq!(again.cache, "hit", "{}", again.matched);
    assert!(
        again.matched.starts_with("semantic; similarity=0."),
        "{}",
        again.matched
    );
    assert_eq!(again.content, first.content);
    assert_eq!(again.origin, first.id);
    let same = ask_as(&gw, "acme", "bob", "How do I reset my password?").await;
    assert_eq!(
        (same.cache.as_str(), same.matched.as_str()),
        ("hit", "exact")
    );

    // Near misses from the workload's README: each side misses.
    for (a, b) in [
        ("How do I upgrade my plan?", "How do I downgrade my plan?"),
        (
            "How do I add a seat to the workspace?",
            "How do I remove a seat from the workspace?",
        ),
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
    ] {
        assert_eq!(ask_as(&gw, "acme", "ann", a).await.cache, "miss", "{a}");
        let other = ask_as(&gw, "acme", "ann", b).await;
        assert_eq!(other.cache, "miss", "{b} was served {a}'s answer");
    }
    assert_eq!(
        ask_as(
            &gw,
            "acme",
            "ann",
            "How do I reset two-factor authentication?"
        )
        .await
        .cache,
        "miss"
    );
    assert!(metric(&gw.base, "tollgate_cache_near_miss_refused_total").await >= 1.0);

    // Another tenant never gets acme's answers, exact or reworded.
    let theirs = ask_as(&gw, "globex", "ann", "How do I reset my password?").await;
    assert_eq!(theirs.cache, "miss", "the question crossed tenants");
    let reworded = ask_as(&gw, "globex", "ann", "how can i reset my password").await;
    assert_eq!(
        (reworded.cache.as_str(), reworded.origin.as_str()),
        ("hit", theirs.id.as_str()),
        "globex is served its own answer"
    );

    // A question about the user is private to them: "my renewal date" is
    // the personal scope; another user's rewording misses, theirs hits.
    let mine = ask_as(&gw, "acme", "ann", "When is my renewal date?").await;
    assert_eq!(mine.cache, "miss");
    let bobs = ask_as(&gw, "acme", "bob", "when is my renewal date").await;
    assert_eq!(bobs.cache, "miss", "bob got ann's personal answer");
    let anns = ask_as(&gw, "acme", "ann", "when is my renewal date").await;
    assert_eq!(
        (anns.cache.as_str(), anns.origin.as_str()),
        ("hit", mine.id.as_str())
    );

    // A semantic hit replays as SSE to a streaming client.
    let mut body = ask("how do i reset my password please");
    body["stream"] = json!(true);
    let r = chat(
        &gw.base,
        &[("x-tollgate-tenant", "acme"), ("x-tollgate-user", "cy")],
        body,
    )
    .await;
    assert_eq!(r.header("x-tollgate-cache"), "hit");
    let (events, done, _) = sse_events(&r.text);
    assert!(done);
    assert_eq!(stream_content(&events), first.content);

    // Reads and writes on the ledger: the write's bytes, each hit's saving
    // and similarity, the embedding time of every semantic lookup.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conn = tollgate::ledger::open_db(&gw._dir.path().join("tollgate-ledger.sqlite")).unwrap();
    let (bytes, embed_ms): (i64, f64) = conn
        .query_row(
            "SELECT cache_stored_bytes, embed_ms FROM requests WHERE request_id = ?1",
            [&first.id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(bytes > 100, "{bytes}");
    assert!(embed_ms > 0.0);
    let (saved, similarity, cost): (f64, f64, f64) = conn
        .query_row(
            "SELECT cache_saved_usd, cache_similarity, cost_usd FROM requests
             WHERE cache = 'hit' AND cache_similarity < 0.999 ORDER BY ts_ms LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert!(saved > 0.0 && cost == 0.0, "saved {saved}, cost {cost}");
    assert!((0.85..1.0).contains(&similarity), "{similarity}");
}

#[tokio::test]
async fn the_same_question_from_two_tenants_is_answered_twice() {
    let gw = gateway(&config(&model_dir()));
    let q = "What file formats can invoices be exported to?";
    let a = ask_as(&gw, "acme", "u1", q).await;
    let b = ask_as(&gw, "globex", "u1", q).await;
    assert_eq!((a.cache.as_str(), b.cache.as_str()), ("miss", "miss"));
    let a2 = ask_as(&gw, "acme", "u2", q).await;
    let b2 = ask_as(&gw, "globex", "u2", q).await;
    assert_eq!((a2.cache.as_str(), b2.cache.as_str()), ("hit", "hit"));
    assert_ne!(a2.origin, b2.origin, "each tenant is served its own answer");
}

#[tokio::test]
async fn without_model_files_semantic_matching_is_off_and_exact_still_works() {
    let empty = tempfile::tempdir().unwrap();
    let gw = gateway(&config(empty.path()));
    assert_eq!(
        ask_as(&gw, "acme", "ann", "How do I reset my password?")
            .await
            .cache,
        "miss"
    );
    assert_eq!(
        ask_as(&gw, "acme", "bob", "how can i reset my password")
            .await
            .cache,
        "miss"
    );
    let exact = ask_as(&gw, "acme", "bob", "How do I reset my password?").await;
    assert_eq!(
        (exact.cache.as_str(), exact.matched.as_str()),
        ("hit", "exact")
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        gw.log_contains("embeddings off"),
        "the start names the missing files"
    );
    assert!(
        gw.log_contains("exact matching only"),
        "the first semantic lookup says why it is off"
    );
}

/// Anthropic's prompt cache through the Messages API (served by `tollgate
/// sim`): with `prompt_caching` the stable prefix gets breakpoints, the
/// first request writes it (billed at the write price), later ones read it
/// (billed at the cached price), streamed or not; without, nothing is cached.
#[tokio::test]
async fn anthropic_prompt_caching_writes_then_reads_the_stable_prefix() {
    let sim = sim_server();
    let gw = gateway(&format!(
        r#"
[ledger]
flush_interval_ms = 20
[providers.claude]
kind = "anthropic"
base_url = "{base}/v1"
api_key_env = ""
[providers.claude_plain]
kind = "anthropic"
base_url = "{base}/v1"
api_key_env = ""
prompt_caching = false
[models."claude-sonnet-4-5"]
provider = "claude"
[models."claude-haiku-4-5"]
provider = "claude_plain"
"#,
        base = sim.base
    ));
    let system = "You answer questions about the Team plan. ".repeat(160);
    let body = |model: &str, q: &str, stream: bool| {
        json!({"model": model, "stream": stream, "max_tokens": 50, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": q}]})
    };
    let mut ids = Vec::new();
    for (model, q, stream) in [
        ("claude-sonnet-4-5", "How many seats?", false),
        ("claude-sonnet-4-5", "What does a seat cost?", false),
        ("claude-sonnet-4-5", "Can I pay yearly?", true),
        ("claude-haiku-4-5", "How many seats?", false),
        ("claude-haiku-4-5", "What does a seat cost?", false),
    ] {
        let r = chat(&gw.base, &[], body(model, q, stream)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if stream {
            let (events, done, _) = sse_events(&r.text);
            assert!(done && !stream_content(&events).is_empty());
        } else {
            assert!(!content(&r).is_empty());
        }
        ids.push(r.header("x-tollgate-request-id").to_string());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conn = tollgate::ledger::open_db(&gw._dir.path().join("tollgate-ledger.sqlite")).unwrap();
    let row = |id: &str| -> (i64, i64, i64, f64) {
        conn.query_row(
            "SELECT prompt_tokens, cached_tokens, cache_write_tokens, cost_usd FROM requests WHERE request_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
    };
    let (p1, read1, write1, cost1) = row(&ids[0]);
    assert!(write1 >= 1024 && read1 == 0, "first call writes: {write1}");
    assert!(p1 > write1);
    let (_, read2, write2, cost2) = row(&ids[1]);
    assert_eq!((read2, write2), (write1, 0), "second call reads the prefix");
    assert!(
        cost2 < cost1 * 0.6,
        "reads are billed at a tenth: {cost2} vs {cost1}"
    );
    // Write at 3.75 $/M, read at 0.30 $/M, the rest at 3.00 $/M, output 15 $/M.
    let (p2, ..) = row(&ids[1]);
    let expected_input = (read2 as f64 * 0.30 + (p2 - read2) as f64 * 3.00) / 1e6;
    assert!(
        cost2 > expected_input && cost2 < expected_input + 50.0 * 15.0 / 1e6 + 1e-9,
        "{cost2}"
    );
    let (_, read3, ..) = row(&ids[2]);
    assert_eq!(
        read3, write1,
        "a streamed call reads it too, and its usage is counted"
    );
    for id in &ids[3..] {
        let (_, read, write, _) = row(id);
        assert_eq!(
            (read, write),
            (0, 0),
            "without breakpoints nothing is cached"
        );
    }
}

#[tokio::test]
async fn invalidated_answers_leave_the_semantic_index_too() {
    let token = "cache-admin-token-1";
    let gw = gateway_env(
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
            config(&model_dir())
        ),
        &[("TOLLGATE_ADMIN_TOKEN", token)],
    );
    assert_eq!(
        ask_as(&gw, "acme", "ann", "How do I export my data?")
            .await
            .cache,
        "miss"
    );
    assert_eq!(
        ask_as(&gw, "acme", "bob", "how can i export my data")
            .await
            .cache,
        "hit"
    );
    let (status, v) = admin_call(
        &gw.admin_base(),
        token,
        reqwest::Method::DELETE,
        "/v1/cache?tenant=acme".to_string(),
        None,
    )
    .await;
    assert_eq!((status, v["removed"].as_u64()), (200, Some(1)));
    assert_eq!(
        ask_as(&gw, "acme", "cy", "how could i export my data")
            .await
            .cache,
        "miss",
        "a rewording does not find the removed answer"
    );
}
