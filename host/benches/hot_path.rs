//! Criterion micro-benchmarks of what every request pays in the gateway:
//! token counting, the cache key hash, each plugin kind's call on a warm
//! instance, the whole chain of one request, and a ledger write.
//!
//! `cargo bench -p tollgate --bench hot_path` (`make bench-micro` builds the
//! plugins first). The plugin benchmarks need `target/plugins`; without it
//! they are skipped with a note.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Map, Value};
use tollgate::clock::SystemClock;
use tollgate::config::RuntimeConfig;
use tollgate::plugins::types::CacheScope;
use tollgate::plugins::{
    BudgetRuleKind, CachePolicyKind, CompressorKind, Plugin, RouterKind, Runtime,
};

#[path = "../src/bench_fixtures.rs"]
#[allow(dead_code)] // `slot`'s fuel and the row are used by `tollgate bench` too
mod bench_fixtures;
use bench_fixtures::{
    BUDGET_CFG, CACHE_CFG, ROUTER_CFG, bench_candidates, sample_meta, sample_row, sample_spend,
    sample_view, slot,
};

/// The sample request as the body a client sends.
fn sample_body() -> Map<String, Value> {
    let view = sample_view();
    let messages: Vec<Value> = view
        .messages
        .iter()
        .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
        .collect();
    let body = serde_json::json!({"model": view.model, "messages": messages, "temperature": 0, "max_tokens": 256});
    body.as_object().cloned().unwrap_or_default()
}

fn tokens(c: &mut Criterion) {
    let view = sample_view();
    let question = view.messages.last().map_or("", |m| m.content.as_str());
    let mut g = c.benchmark_group("tokens");
    g.throughput(Throughput::Bytes(question.len() as u64));
    g.bench_function("o200k count, one message", |b| {
        b.iter(|| tollgate::tokens::count(black_box(question), "gpt-4o"))
    });
    let bytes: usize = view.messages.iter().map(|m| m.content.len()).sum();
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("o200k prompt tokens, four-message request", |b| {
        b.iter(|| {
            tollgate::tokens::count_messages(
                "gpt-4o",
                black_box(&view.messages)
                    .iter()
                    .map(|m| (m.role.as_str(), m.content.as_str())),
            )
        })
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let body = sample_body();
    let json = Value::Object(body.clone()).to_string();
    let mut g = c.benchmark_group("hashing");
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("blake3 request hash (ledger)", |b| {
        b.iter(|| tollgate::ledger::request_hash(black_box(&json)))
    });
    g.bench_function("cache key (canonical fields + blake3)", |b| {
        b.iter(|| tollgate::cache::key(CacheScope::Tenant, "acme", "u42", "v1", black_box(&body)))
    });
    g.finish();
}

fn plugins(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    if !dir.join("rules_router.wasm").exists() {
        eprintln!(
            "plugin benchmarks skipped: no plugins in {} (make plugins)",
            dir.display()
        );
        return;
    }
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    else {
        eprintln!("plugin benchmarks skipped: no tokio runtime");
        return;
    };
    let loaded = rt.block_on(async {
        let runtime = Runtime::new(&RuntimeConfig::default(), Arc::new(SystemClock))?;
        let router: Plugin<RouterKind> = runtime
            .load(&slot(&dir, "rules_router.wasm", ROUTER_CFG, None)?)
            .await?;
        let compressor: Plugin<CompressorKind> = runtime
            .load(&slot(&dir, "trim_compressor.wasm", "", None)?)
            .await?;
        let cache: Plugin<CachePolicyKind> = runtime
            .load(&slot(&dir, "default_cache_policy.wasm", CACHE_CFG, None)?)
            .await?;
        let budget: Plugin<BudgetRuleKind> = runtime
            .load(&slot(&dir, "daily_budget.wasm", BUDGET_CFG, None)?)
            .await?;
        anyhow::Ok((router, compressor, cache, budget))
    });
    let (router, compressor, cache, budget) = match loaded {
        Ok(p) => p,
        Err(e) => {
            eprintln!("plugin benchmarks skipped: {e:#}");
            return;
        }
    };
    let view = sample_view();
    let candidates = bench_candidates();
    let meta = sample_meta(&view);
    let spend = sample_spend();
    let mut g = c.benchmark_group("plugin call (warm instance)");
    g.bench_function("router: route", |b| {
        b.to_async(&rt)
            .iter(|| async { router.route(black_box(&view), &candidates).await.ok() })
    });
    g.bench_function("compressor: compress", |b| {
        b.to_async(&rt)
            .iter(|| async { compressor.compress(black_box(&view)).await.ok() })
    });
    g.bench_function("cache policy: lookup", |b| {
        b.to_async(&rt)
            .iter(|| async { cache.lookup(black_box(&view)).await.ok() })
    });
    g.bench_function("cache policy: admit", |b| {
        b.to_async(&rt)
            .iter(|| async { cache.admit(black_box(&view), &meta).await.ok() })
    });
    g.bench_function("budget rule: check", |b| {
        b.to_async(&rt)
            .iter(|| async { budget.check(black_box(&view), &spend).await.ok() })
    });
    g.bench_function(
        "chain of one request (budget, compress, lookup, route, admit)",
        |b| {
            b.to_async(&rt).iter(|| async {
                budget.check(&view, &spend).await.ok();
                compressor.compress(&view).await.ok();
                cache.lookup(&view).await.ok();
                router.route(&view, &candidates).await.ok();
                cache.admit(&view, &meta).await.ok()
            })
        },
    );
    g.finish();
}

fn ledger(c: &mut Criterion) {
    use tollgate::ledger::{Ledger, LedgerOptions};
    let Ok(dir) = tempfile::tempdir() else {
        eprintln!("ledger benchmark skipped: no temporary directory");
        return;
    };
    let ledger = match Ledger::open(&dir.path().join("ledger.sqlite"), LedgerOptions::default()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ledger benchmark skipped: {e}");
            return;
        }
    };
    let row = sample_row();
    let mut g = c.benchmark_group("ledger");
    // What the request path pays: the row is queued; the writer thread
    // commits in batches.
    g.bench_function("record one row (request path)", |b| {
        b.iter(|| ledger.record(black_box(row.clone())))
    });
    // The writer's side: 1,000 rows queued and committed to SQLite.
    g.throughput(Throughput::Elements(1000));
    g.sample_size(20);
    g.bench_function("record and commit 1,000 rows", |b| {
        b.iter(|| {
            for _ in 0..1000 {
                ledger.record(row.clone());
            }
            ledger.flush();
        })
    });
    g.finish();
}

criterion_group!(benches, tokens, hashing, plugins, ledger);
criterion_main!(benches);
