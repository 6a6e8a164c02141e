//! Every first-party plugin and every hostile fixture, loaded from its real
//! `.wasm` file and called through the host runtime. Build them first with
//! `make plugins` (the Makefile's test targets do).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::clock::ManualClock;
use tollgate::config::{PluginSlotConfig, RuntimeConfig};
use tollgate::plugins::types::{
    CacheDecision, CacheScope, Compression, Message, ModelInfo, RequestView, ResponseMeta,
    RouteDecision, SpendSnapshot, Verdict,
};
use tollgate::plugins::{
    BudgetRuleKind, CachePolicyKind, CompressorKind, LoadError, Plugin, PluginError, RouterKind,
    Runtime,
};

fn plugin_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("TOLLGATE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins"));
    let p = dir.join(file);
    assert!(
        p.exists(),
        "{} is missing: run `make plugins` first",
        p.display()
    );
    p
}

fn runtime() -> Arc<Runtime> {
    Runtime::new(
        &RuntimeConfig::default(),
        Arc::new(ManualClock::new(1_795_449_600_000)),
    )
    .unwrap()
}

fn slot(file: &str, config_toml: &str) -> PluginSlotConfig {
    let mut s = PluginSlotConfig::new(plugin_path(file));
    if !config_toml.is_empty() {
        s.config = Some(toml::from_str::<toml::Value>(config_toml).unwrap());
    }
    s
}

fn view(text: &str) -> RequestView {
    RequestView {
        request_id: "req_test".into(),
        tenant: "acme".into(),
        user: "u1".into(),
        feature: "faq".into(),
        task: String::new(),
        step: 0,
        model: "gpt-4o".into(),
        messages: vec![Message {
            role: "user".into(),
            content: text.into(),
            text_only: true,
        }],
        prompt_tokens: tollgate::tokens::count(text, "gpt-4o"),
        max_tokens: None,
        temperature: None,
        stream: false,
        has_tools: false,
        json_mode: false,
        tags: vec![],
    }
}

fn candidates() -> Vec<ModelInfo> {
    ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"]
        .iter()
        .enumerate()
        .map(|(i, m)| ModelInfo {
            name: m.to_string(),
            provider: "sim".into(),
            tier: i as u8 + 1,
            input_per_mtok: 1.0,
            cached_input_per_mtok: 0.5,
            output_per_mtok: 2.0,
        })
        .collect()
}

const ROUTER_CFG: &str = r#"
default = "gpt-4o-mini"
[[rules]]
name = "greeting"
regex = "(?i)^(hi|hello)!*$"
respond = "Hello!"
[[rules]]
keywords = ["step by step"]
fallback = ["gpt-4o", "gpt-4.1-mini"]
[[rules]]
min_prompt_tokens = 50
model = "gpt-4.1-mini"
[[rules]]
keywords = ["forbidden"]
reject = "not allowed here"
[[rules]]
keywords = ["hallucinate"]
model = "gpt-9"
"#;

#[tokio::test]
async fn rules_router_decides_through_the_host() {
    let rt = runtime();
    let r: Plugin<RouterKind> = rt
        .load(&slot("rules_router.wasm", ROUTER_CFG))
        .await
        .unwrap();
    let c = candidates();
    assert_eq!(
        r.route(&view("hello!"), &c).await.unwrap(),
        RouteDecision::Respond("Hello!".into())
    );
    assert_eq!(
        r.route(&view("Explain step by step"), &c).await.unwrap(),
        RouteDecision::Fallback(vec!["gpt-4o".into(), "gpt-4.1-mini".into()])
    );
    assert_eq!(
        r.route(&view(&"long words here ".repeat(40)), &c)
            .await
            .unwrap(),
        RouteDecision::UseModel("gpt-4.1-mini".into())
    );
    assert_eq!(
        r.route(&view("what is a refund"), &c).await.unwrap(),
        RouteDecision::UseModel("gpt-4o-mini".into())
    );
    assert_eq!(
        r.route(&view("forbidden topic"), &c).await.unwrap(),
        RouteDecision::Reject("not allowed here".into())
    );
    // A model outside the candidates is refused by the host.
    let e = r.route(&view("please hallucinate"), &c).await.unwrap_err();
    assert!(matches!(e, PluginError::Invalid { .. }), "{e}");
    assert_eq!(
        r.stats().invalid.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Calls reuse a warm instance: one instantiation at load time serves them all.
    assert_eq!(
        r.stats()
            .instantiations
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_bad_plugin_config_is_refused_at_load() {
    let rt = runtime();
    let e = rt
        .load::<RouterKind>(&slot(
            "rules_router.wasm",
            "[[rules]]\nname = \"x\"\nregex = \"(\"\nmodel = \"m\"\n",
        ))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&e, LoadError::Init { message, .. } if message.contains("x: bad `regex`")),
        "{e}"
    );
}

#[tokio::test]
async fn trim_compressor_rewrites_through_the_host() {
    let rt = runtime();
    let p: Plugin<CompressorKind> = rt
        .load(&slot("trim_compressor.wasm", "max_repeats = 2"))
        .await
        .unwrap();
    let spam = format!("log:\n{}done", "ERROR disk full\n".repeat(50));
    let Compression::Rewritten(rw) = p.compress(&view(&spam)).await.unwrap() else {
        panic!("expected a rewrite")
    };
    let text = rw.messages[0].content.as_deref().unwrap();
    assert_eq!(
        text,
        "log:\nERROR disk full\nERROR disk full\n[previous line repeated 48 more times]\ndone"
    );
    assert!(rw.note.contains("48 repeated lines folded"), "{}", rw.note);
    assert_eq!(
        p.compress(&view("clean text")).await.unwrap(),
        Compression::Unchanged
    );
}

#[tokio::test]
async fn default_cache_policy_scopes_and_admits_through_the_host() {
    let rt = runtime();
    let p: Plugin<CachePolicyKind> = rt
        .load(&slot(
            "default_cache_policy.wasm",
            "ttl_seconds = 60\npersonal_features = [\"account\"]",
        ))
        .await
        .unwrap();
    let CacheDecision::Lookup(l) = p.lookup(&view("What is the refund window?")).await.unwrap()
    else {
        panic!("expected a lookup")
    };
    assert_eq!((l.scope, l.ttl_seconds), (CacheScope::Tenant, 60));
    let CacheDecision::Lookup(l) = p.lookup(&view("What is my refund status?")).await.unwrap()
    else {
        panic!("expected a lookup")
    };
    assert_eq!(l.scope, CacheScope::TenantUser);
    let mut hot = view("What is the refund window?");
    hot.temperature = Some(1.2);
    assert!(matches!(
        p.lookup(&hot).await.unwrap(),
        CacheDecision::Bypass(_)
    ));
    let meta = |finish: &str, content: &str| ResponseMeta {
        model: "gpt-4o".into(),
        prompt_tokens: 5,
        completion_tokens: 5,
        finish_reason: finish.into(),
        content: content.into(),
    };
    let v = view("q");
    assert!(p.admit(&v, &meta("stop", "an answer")).await.unwrap());
    assert!(!p.admit(&v, &meta("length", "an ans")).await.unwrap());
    assert!(!p.admit(&v, &meta("stop", "  ")).await.unwrap());
}

#[tokio::test]
async fn daily_budget_decides_through_the_host() {
    let rt = runtime();
    let p: Plugin<BudgetRuleKind> = rt
        .load(&slot(
            "daily_budget.wasm",
            "daily_usd = 1.0\ndowngrade_model = \"gpt-4o-mini\"",
        ))
        .await
        .unwrap();
    let spend = |t: f64| SpendSnapshot {
        day: "2026-11-23".into(),
        tenant_today_usd: t,
        feature_today_usd: 0.0,
        user_today_usd: 0.0,
        estimated_cost_usd: 0.01,
    };
    let v = view("q");
    assert_eq!(p.check(&v, &spend(0.1)).await.unwrap(), Verdict::Allow);
    assert_eq!(
        p.check(&v, &spend(0.9)).await.unwrap(),
        Verdict::Downgrade("gpt-4o-mini".into())
    );
    assert!(matches!(
        p.check(&v, &spend(1.0)).await.unwrap(),
        Verdict::Deny(_)
    ));
}

async fn hostile(rt: &Arc<Runtime>, mode: &str) -> Plugin<RouterKind> {
    let mut s = slot("hostile_fixture.wasm", &format!("mode = \"{mode}\""));
    s.timeout_ms = Some(20);
    s.memory_mib = 32;
    rt.load(&s).await.unwrap()
}

/// Loads the endless-loop fixture with fuel off (only the wall clock can
/// stop it), waits `idle`, and checks a call ends at its deadline.
async fn loop_stops_at_its_deadline(idle: Duration) {
    let rt = runtime();
    let mut s = slot("hostile_fixture.wasm", "mode = \"loop\"");
    s.timeout_ms = Some(20);
    s.fuel = Some(0);
    let p: Plugin<RouterKind> = rt.load(&s).await.unwrap();
    tokio::time::sleep(idle).await;
    let t = Instant::now();
    let e = p.route(&view("x"), &candidates()).await.unwrap_err();
    assert!(matches!(e, PluginError::Timeout { .. }), "{e}");
    // Never early (the deadline is checked against the clock), and not
    // much late (bounded loosely: the test machine's cores are shared).
    assert!(
        t.elapsed() >= Duration::from_millis(20),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_by_the_deadline() {
    loop_stops_at_its_deadline(Duration::ZERO).await;
}

#[tokio::test]
async fn the_deadline_holds_after_the_plugins_were_idle() {
    // The clock of deadlines stops once no deadline is ahead (after a
    // grace period of 2 ticks); the next call must start it again.
    loop_stops_at_its_deadline(Duration::from_millis(600)).await;
}

#[tokio::test]
async fn an_infinite_loop_runs_out_of_fuel() {
    let rt = runtime();
    let mut s = slot("hostile_fixture.wasm", "mode = \"loop\"");
    s.timeout_ms = Some(10_000);
    s.fuel = Some(1_000_000);
    let p: Plugin<RouterKind> = rt.load(&s).await.unwrap();
    let e = p.route(&view("x"), &candidates()).await.unwrap_err();
    assert!(matches!(e, PluginError::OutOfFuel { .. }), "{e}");
}

#[tokio::test]
async fn a_memory_bomb_hits_the_cap() {
    let rt = runtime();
    let p = hostile(&rt, "memory").await;
    let mut s = slot("hostile_fixture.wasm", "mode = \"memory\"");
    s.memory_mib = 32;
    s.timeout_ms = Some(5_000);
    s.fuel = Some(0);
    let p2: Plugin<RouterKind> = rt.load(&s).await.unwrap();
    for plugin in [&p, &p2] {
        let e = plugin.route(&view("x"), &candidates()).await.unwrap_err();
        assert!(
            matches!(
                e,
                PluginError::Memory { cap_mib: 32, .. } | PluginError::Timeout { .. }
            ),
            "{e}"
        );
    }
    // With time to spare, the cap is what stops it.
    let e = p2.route(&view("x"), &candidates()).await.unwrap_err();
    assert!(matches!(e, PluginError::Memory { .. }), "{e}");
}

#[tokio::test]
async fn a_panic_is_a_contained_trap_and_the_instance_is_replaced() {
    let rt = runtime();
    let p = hostile(&rt, "trap").await;
    for _ in 0..3 {
        let e = p.route(&view("x"), &candidates()).await.unwrap_err();
        assert!(
            matches!(&e, PluginError::Trap { message, .. } if message.contains("hostile plugin panics on purpose")),
            "{e}"
        );
    }
    let s = p.stats();
    assert_eq!(s.trap.load(std::sync::atomic::Ordering::Relaxed), 3);
    // Each failed call threw its instance away: 1 at load + 2 replacements.
    assert_eq!(
        s.instantiations.load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    // A well-behaved plugin in the same runtime is unaffected.
    let ok = hostile(&rt, "ok").await;
    assert_eq!(
        ok.route(&view("x"), &candidates()).await.unwrap(),
        RouteDecision::UseModel("gpt-4o-mini".into())
    );
}

#[tokio::test]
async fn init_failures_and_hangs_are_refused_at_load() {
    let rt = runtime();
    let e = rt
        .load::<RouterKind>(&slot("hostile_fixture.wasm", "mode = \"init-error\""))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&e, LoadError::Init { message, .. } if message.contains("refuses every config")),
        "{e}"
    );
    let mut s = slot("hostile_fixture.wasm", "mode = \"init-loop\"");
    s.init_timeout_ms = Some(50);
    s.fuel = Some(0);
    let t = Instant::now();
    let e = rt.load::<RouterKind>(&s).await.err().unwrap();
    assert!(
        matches!(&e, LoadError::Init { message, .. } if message.contains("deadline")),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn wrong_world_digest_and_garbage_are_refused() {
    let rt = runtime();
    let e = rt
        .load::<CompressorKind>(&slot("rules_router.wasm", ""))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            &e,
            LoadError::WrongWorld {
                world: "compressor",
                ..
            }
        ),
        "{e}"
    );
    let mut s = slot("rules_router.wasm", "");
    s.sha256 = Some("0".repeat(64));
    let e = rt.load::<RouterKind>(&s).await.err().unwrap();
    assert!(matches!(e, LoadError::DigestMismatch { .. }), "{e}");
    let e = rt
        .load_bytes::<RouterKind>(b"not wasm", "garbage.wasm", &slot("rules_router.wasm", ""))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, LoadError::Compile { .. }), "{e}");
    // The right digest is accepted.
    let bytes = std::fs::read(plugin_path("rules_router.wasm")).unwrap();
    let digest: String = sha2_hex(&bytes);
    let mut s = slot("rules_router.wasm", "");
    s.sha256 = Some(digest);
    assert!(rt.load::<RouterKind>(&s).await.is_ok());
}

fn sha2_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn fresh_instance_per_call_mode_works() {
    let rt = runtime();
    let mut s = slot("rules_router.wasm", ROUTER_CFG);
    s.reuse_instances = false;
    let r: Plugin<RouterKind> = rt.load(&s).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            r.route(&view("hello"), &candidates()).await.unwrap(),
            RouteDecision::Respond("Hello!".into())
        );
    }
    assert_eq!(
        r.stats()
            .instantiations
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

#[tokio::test]
async fn capabilities_are_denied_by_default_and_a_data_dir_is_read_only() {
    let rt = runtime();
    // Importing the filesystem without a grant: linked, but empty.
    let mut bare = slot("fs_probe_fixture.wasm", "read = \"words.txt\"");
    bare.timeout_ms = Some(1_000);
    let p: Plugin<RouterKind> = rt.load(&bare).await.unwrap();
    let RouteDecision::Respond(report) = p.route(&view("x"), &candidates()).await.unwrap() else {
        panic!("expected the probe report")
    };
    for denied in ["root", "etc", "data", "escape", "write"] {
        let line = report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{denied}=")))
            .unwrap_or_else(|| panic!("{denied} missing in {report}"));
        assert!(line.starts_with("denied"), "{denied}: {report}");
    }
    assert_eq!(p.describe()["capabilities"]["filesystem"], false);

    // The network is never granted, whatever the slot says.
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("words.txt"), "cancel pause").unwrap();
    let mut net = slot("net_probe_fixture.wasm", "");
    net.capabilities.data_dir = Some(data.path().to_path_buf());
    let e = rt.load::<RouterKind>(&net).await.err().unwrap();
    assert!(
        matches!(&e, LoadError::NotGranted { import, .. } if import.starts_with("wasi:sockets/")),
        "{e}"
    );

    // With a data directory: that directory, read-only, and nothing else.
    let mut fs = slot("fs_probe_fixture.wasm", "read = \"words.txt\"");
    fs.capabilities.data_dir = Some(data.path().to_path_buf());
    // Deadlines are not what this test is about; a busy machine must not fail it.
    fs.timeout_ms = Some(1_000);
    let p: Plugin<RouterKind> = rt.load(&fs).await.unwrap();
    let RouteDecision::Respond(report) = p.route(&view("x"), &candidates()).await.unwrap() else {
        panic!("expected the probe report")
    };
    let get = |k: &str| {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing in {report}"))
            .to_string()
    };
    assert_eq!(get("data"), "open:cancel pause", "{report}");
    for denied in ["root", "etc", "escape", "write"] {
        assert!(get(denied).starts_with("denied"), "{denied}: {report}");
    }
    assert_eq!(get("env_vars"), "0", "{report}");
    assert!(!data.path().join("written.txt").exists());
    assert!(p.describe()["capabilities"]["filesystem"]["seen_as"] == "/data");
}

#[tokio::test]
async fn a_log_flood_is_capped_per_call() {
    let rt = runtime();
    let mut s = slot("hostile_fixture.wasm", "mode = \"log-flood\"");
    s.timeout_ms = Some(5_000);
    let p: Plugin<RouterKind> = rt.load(&s).await.unwrap();
    assert_eq!(
        p.route(&view("x"), &candidates()).await.unwrap(),
        RouteDecision::Keep
    );
    let dropped = p
        .stats()
        .logs_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dropped, 10_000 - 16);
}

#[tokio::test]
async fn compiled_plugins_are_cached_on_disk_and_a_bad_artifact_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let cached_runtime = || {
        Runtime::new(
            &RuntimeConfig {
                cache_dir: Some(dir.path().to_path_buf()),
                ..RuntimeConfig::default()
            },
            Arc::new(ManualClock::new(0)),
        )
        .unwrap()
    };
    let s = slot("rules_router.wasm", "default = \"gpt-4o-mini\"");
    let cold = cached_runtime().load::<RouterKind>(&s).await.unwrap();
    assert!(!cold.compiled().from_cache);
    let artifacts: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(artifacts.len(), 1);
    assert!(
        artifacts[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(cold.digest()),
        "keyed by digest: {artifacts:?}"
    );

    // A restart (a new runtime) reads the artifact instead of compiling.
    let warm = cached_runtime().load::<RouterKind>(&s).await.unwrap();
    assert!(warm.compiled().from_cache);
    let d = warm.route(&view("hello"), &candidates()).await.unwrap();
    assert_eq!(d, RouteDecision::UseModel("gpt-4o-mini".into()));

    // A damaged artifact is thrown away and the plugin compiled again.
    std::fs::write(&artifacts[0], b"not machine code").unwrap();
    let again = cached_runtime().load::<RouterKind>(&s).await.unwrap();
    assert!(!again.compiled().from_cache);
    assert!(again.route(&view("hello"), &candidates()).await.is_ok());
    assert!(
        cached_runtime()
            .load::<RouterKind>(&s)
            .await
            .unwrap()
            .compiled()
            .from_cache
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_instances_bounds_concurrent_calls() {
    let rt = runtime();
    let mut s = slot("hostile_fixture.wasm", "mode = \"loop\"");
    s.timeout_ms = Some(200);
    s.fuel = Some(0);
    s.max_instances = Some(1);
    let p: Arc<Plugin<RouterKind>> = Arc::new(rt.load(&s).await.unwrap());
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move { p.route(&view("spin"), &candidates()).await })
        })
        .collect();
    let mut busy = 0;
    for c in calls {
        match c.await.unwrap() {
            Err(PluginError::Busy { max: 1, .. }) => busy += 1,
            Err(PluginError::Timeout { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // One call holds the only instance for its whole deadline; of the two
    // waiting for it, at least one gives up.
    assert!(busy >= 1, "{busy}");
    assert_eq!(
        p.stats().busy.load(std::sync::atomic::Ordering::Relaxed),
        busy
    );
    assert_eq!(p.describe()["limits"]["max_instances"], 1);
}
