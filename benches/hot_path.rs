//! Per-call work on the proxy's hot path, outside the usage reader (see
//! `benches/usage.rs` for that):
//!
//! - `pricing`: model lookup on the shipped `config/pricing.toml` (exact
//!   name, dated name resolved by removing the version suffix, miss) and the
//!   cost of a cached Anthropic usage (lookup + formula + entry name copy).
//! - `budget`: one `admit` + `settle` on a run that already exists, and the
//!   same for 10 000 distinct runs created on the way (fresh registry per
//!   batch).
//! - `request`: `proxy::request::inspect` on a ~4 KB chat request, plain and
//!   streamed without `stream_options` (usage injection rewrites the body).

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;

use tollgate::budget::{
    BudgetPolicy, Budgets, CallRequest, CostKind, RunEndSink, RunsConfig, SystemClock,
};
use tollgate::config::RouteKind;
use tollgate::money::Money;
use tollgate::pricing::{PriceTable, PricingConfig};
use tollgate::proxy::request::inspect;
use tollgate::usage::Usage;

fn price_table() -> PriceTable {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    PriceTable::load(&PricingConfig::default(), root).expect("config/pricing.toml loads")
}

fn pricing(c: &mut Criterion) {
    let table = price_table();
    for model in ["gpt-4o", "gpt-4o-2024-08-06", "claude-sonnet-4-5"] {
        assert!(table.lookup(model).is_some(), "{model} is priced");
    }
    assert!(table.lookup("no-such-model-7b").is_none());

    let mut group = c.benchmark_group("pricing");
    group.bench_function("lookup/exact", |b| {
        b.iter(|| black_box(table.lookup(black_box("gpt-4o"))).is_some())
    });
    group.bench_function("lookup/dated", |b| {
        b.iter(|| black_box(table.lookup(black_box("gpt-4o-2024-08-06"))).is_some())
    });
    group.bench_function("lookup/miss", |b| {
        b.iter(|| black_box(table.lookup(black_box("no-such-model-7b"))).is_some())
    });
    // An Anthropic call that read 12k tokens from the cache and wrote 2k.
    let usage = Usage {
        input_tokens: Some(15_000),
        output_tokens: Some(800),
        cached_input_tokens: Some(12_000),
        cache_write_input_tokens: Some(2_000),
        cache_write_1h_input_tokens: None,
        reasoning_tokens: None,
    };
    assert!(table.cost("claude-sonnet-4-5", &usage).cost > Money::ZERO);
    group.bench_function("cost/anthropic-cached", |b| {
        b.iter(|| black_box(table.cost(black_box("claude-sonnet-4-5"), black_box(&usage))))
    });
    group.finish();
}

fn budgets() -> Budgets {
    let policy = BudgetPolicy {
        default_run: Money::from_picos(1_000 * 1_000_000_000_000),
        ..BudgetPolicy::default()
    };
    let sink: RunEndSink = Arc::new(|_end| {});
    Budgets::new(policy, RunsConfig::default(), Arc::new(SystemClock), sink)
}

fn call<'a>(run_id: &'a str, body_hash: u64) -> CallRequest<'a> {
    CallRequest {
        run_id: Some(run_id),
        release: "2026-03-21",
        request_type: "research",
        model: Some("gpt-4o"),
        tool: None,
        route: "openai",
        budget_header: None,
        reservation: Money::from_picos(10_000_000_000),
        sdk_retry_count: None,
        body_hash: Some(body_hash),
    }
}

const COST: Money = Money::from_picos(1_000_000);

fn budget(c: &mut Criterion) {
    let mut group = c.benchmark_group("budget");

    let warm = budgets();
    let hash = AtomicU64::new(0);
    group.throughput(Throughput::Elements(1));
    group.bench_function("admit_settle/one_run", |b| {
        b.iter(|| {
            let h = hash.fetch_add(1, Ordering::Relaxed);
            let admission = warm.admit(black_box(&call("run-1", h))).expect("admitted");
            admission.settle(COST, CostKind::Llm, false, None);
        })
    });

    const RUNS: usize = 10_000;
    let ids: Vec<String> = (0..RUNS).map(|i| format!("run-{i:05}")).collect();
    group.throughput(Throughput::Elements(RUNS as u64));
    group.bench_function("admit_settle/10k_new_runs", |b| {
        b.iter_batched(
            budgets,
            |budgets| {
                for (i, id) in ids.iter().enumerate() {
                    let admission = budgets
                        .admit(black_box(&call(id, i as u64)))
                        .expect("admitted");
                    admission.settle(COST, CostKind::Llm, false, None);
                }
                budgets
            },
            BatchSize::PerIteration,
        )
    });

    let live = budgets();
    for (i, id) in ids.iter().enumerate() {
        live.admit(&call(id, i as u64))
            .expect("admitted")
            .settle(COST, CostKind::Llm, false, None);
    }
    group.bench_function("admit_settle/10k_live_runs", |b| {
        b.iter(|| {
            for (i, id) in ids.iter().enumerate() {
                let h = hash.fetch_add(1, Ordering::Relaxed) ^ i as u64;
                let admission = live.admit(black_box(&call(id, h))).expect("admitted");
                admission.settle(COST, CostKind::Llm, false, None);
            }
        })
    });
    group.finish();
}

/// A chat request of about 4 KB: a system prompt and four turns.
fn chat_request(stream: bool) -> Bytes {
    let filler = "The agent looked up the order history, compared the totals and wrote a \
                  short summary of the differences for the user. ";
    let turn = |role: &str| json!({ "role": role, "content": filler.repeat(8) });
    let mut body = json!({
        "model": "gpt-4o-2024-08-06",
        "messages": [
            { "role": "system", "content": "You are a careful assistant. Answer briefly." },
            turn("user"),
            turn("assistant"),
            turn("user"),
            turn("assistant"),
        ],
        "temperature": 0.2,
        "max_tokens": 512,
    });
    if stream {
        body["stream"] = json!(true);
    }
    Bytes::from(serde_json::to_vec(&body).expect("serialises"))
}

/// An agent's request of about 64 KB: tool calls whose results are
/// captured provider replies (JSON and SSE), which arrive as strings full
/// of escaped quotes and newlines, as file contents and command output do.
fn agent_request() -> Bytes {
    let results = [
        include_str!(
            "../tests/fixtures/providers/openai/chat-completions.stream-include-usage.sse"
        ),
        include_str!("../tests/fixtures/providers/openai/chat-completions.nonstream.json"),
    ];
    let mut messages = vec![
        json!({ "role": "system", "content": "You are a coding agent. Use the tools." }),
        json!({ "role": "user", "content": "Find why the usage figures differ between the two replies." }),
    ];
    for turn in 0..10 {
        let id = format!("call_{turn}");
        messages.push(json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{
                "id": id,
                "type": "function",
                "function": { "name": "read_file", "arguments": "{\"path\": \"replies/reply.json\"}" },
            }],
        }));
        messages.push(json!({ "role": "tool", "tool_call_id": id, "content": results[turn % 2] }));
    }
    let body = json!({ "model": "gpt-4o-2024-08-06", "messages": messages, "max_tokens": 1024 });
    Bytes::from(serde_json::to_vec(&body).expect("serialises"))
}

fn request(c: &mut Criterion) {
    let mut group = c.benchmark_group("request");
    let path = "/v1/chat/completions";
    for (name, body, injects, size) in [
        ("inspect/4k-json", chat_request(false), false, 3_500..5_000),
        (
            "inspect/4k-stream-inject-usage",
            chat_request(true),
            true,
            3_500..5_000,
        ),
        (
            "inspect/64k-agent-tool-results",
            agent_request(),
            false,
            55_000..80_000,
        ),
    ] {
        let (info, rewritten) = inspect(RouteKind::Openai, path, None, &body);
        assert_eq!(info.usage_injected, injects);
        assert_eq!(rewritten.is_some(), injects);
        assert!(size.contains(&body.len()), "{}", body.len());
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| black_box(inspect(RouteKind::Openai, path, None, black_box(&body))))
        });
    }
    group.finish();
}

criterion_group!(benches, pricing, budget, request);
criterion_main!(benches);
