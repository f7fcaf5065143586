//! Throughput of the usage tap (decoder + extractor) per provider stream.
//!
//! Each captured stream is inflated to about 1 MiB by repeating its content
//! events (everything between the first event and the usage-bearing tail), so
//! the figure reflects the steady state of a long generation rather than the
//! fixed cost of creating a tap. The stream is fed in 16 KiB reads, roughly
//! what hyper hands the proxy per frame.
//!
//! A non-streamed reply (`application/json`) is one call's body: its cases
//! read the captured reply whole, one tap per copy, as many copies as make
//! about 1 MiB, so that their figure is the cost of a call's usage read,
//! tap creation and finish included.

use criterion::{criterion_group, Criterion, Throughput};
use std::hint::black_box;
use std::path::Path;
use tollgate::usage::{BodyFormat, Dialect, TapLimits, UsageTap};

const TARGET: usize = 1 << 20;
const READ: usize = 16 * 1024;

struct Case {
    name: &'static str,
    path: &'static str,
    dialect: Dialect,
    content_type: &'static str,
    /// The first record stays in place and only the ones between it and the
    /// usage-bearing tail repeat. `false` for a stream whose first record is
    /// an ordinary content record (Ollama NDJSON): every record but the
    /// tail repeats.
    keep_first: bool,
}

impl Case {
    /// A non-streamed reply: each copy is a call of its own.
    fn per_call(&self) -> bool {
        self.content_type == "application/json"
    }
}

const CASES: &[Case] = &[
    Case {
        name: "openai/chat-include-usage",
        path: "openai/chat-completions.stream-include-usage.sse",
        dialect: Dialect::OpenAi,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "openai/completions",
        path: "openai/completions.stream.sse",
        dialect: Dialect::OpenAi,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "openai/responses",
        path: "openai/responses.stream.sse",
        dialect: Dialect::OpenAi,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "azure/responses",
        path: "azure/responses.stream.sse",
        dialect: Dialect::OpenAi,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "openrouter/chat",
        path: "openrouter/chat-completions.stream.sse",
        dialect: Dialect::OpenAi,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "groq/chat",
        path: "groq/chat-completions.stream.sse",
        dialect: Dialect::OpenAi,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "mistral/chat",
        path: "mistral/chat-completions.stream.sse",
        dialect: Dialect::OpenAi,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "anthropic/cache",
        path: "anthropic/messages.stream.cache.sse",
        dialect: Dialect::Anthropic,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "anthropic/padded",
        path: "anthropic/messages.stream.padded.sse",
        dialect: Dialect::Anthropic,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "gemini/stream",
        path: "gemini/streamGenerateContent.sse",
        dialect: Dialect::Gemini,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "gemini/thinking",
        path: "gemini/streamGenerateContent.thinking.sse",
        dialect: Dialect::Gemini,
        content_type: "text/event-stream",
        keep_first: true,
    },
    Case {
        name: "ollama/api-chat",
        path: "ollama/api-chat.stream.ndjson",
        dialect: Dialect::OpenAi,
        content_type: "application/x-ndjson",
        keep_first: true,
    },
    // The same two records, inflated as a real stream is: content records
    // repeat, the final `done` record with the usage comes once. The case
    // above (too few records to have a middle) repeats the whole fixture,
    // so half its records are final records.
    Case {
        name: "ollama/api-chat-long",
        path: "ollama/api-chat.stream.ndjson",
        dialect: Dialect::OpenAi,
        content_type: "application/x-ndjson",
        keep_first: false,
    },
    // Non-streamed replies, one tap per body.
    Case {
        name: "openai/chat-json",
        path: "openai/chat-completions.nonstream.json",
        dialect: Dialect::OpenAi,
        content_type: "application/json",
        keep_first: true,
    },
    Case {
        name: "openai/responses-json",
        path: "openai/responses.nonstream.json",
        dialect: Dialect::OpenAi,
        content_type: "application/json",
        keep_first: true,
    },
    Case {
        name: "anthropic/json",
        path: "anthropic/messages.nonstream.cache.json",
        dialect: Dialect::Anthropic,
        content_type: "application/json",
        keep_first: true,
    },
    Case {
        name: "gemini/json",
        path: "gemini/generateContent.json",
        dialect: Dialect::Gemini,
        content_type: "application/json",
        keep_first: true,
    },
];

/// Splits a body into records: SSE events end at a blank line (LF or CRLF
/// framing), NDJSON records at a newline.
fn records(body: &[u8], ndjson: bool) -> Vec<Vec<u8>> {
    let sep: &[u8] = if ndjson {
        b"\n"
    } else if body.windows(4).any(|w| w == b"\r\n\r\n") {
        b"\r\n\r\n"
    } else {
        b"\n\n"
    };
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        match rest.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                out.push(rest[..i + sep.len()].to_vec());
                rest = &rest[i + sep.len()..];
            }
            None => {
                out.push(rest.to_vec());
                rest = &[];
            }
        }
    }
    out
}

/// Repeats the middle records (content deltas) until the body is ~1 MiB; the
/// first record (model-bearing start, unless `keep_first` is false) and the
/// last two (usage, terminator; the last one in NDJSON) stay in place. A
/// body with too few records for that repeats whole.
fn inflate(body: &[u8], ndjson: bool, keep_first: bool) -> Vec<u8> {
    let recs = records(body, ndjson);
    let head_len = usize::from(keep_first);
    let tail_len = if ndjson { 1 } else { 2 };
    let too_few = if keep_first {
        recs.len() < 4
    } else {
        recs.len() <= tail_len
    };
    if too_few {
        let mut out = Vec::new();
        while out.len() < TARGET {
            out.extend_from_slice(body);
        }
        return out;
    }
    let head = &recs[..head_len];
    let mid = &recs[head_len..recs.len() - tail_len];
    let tail = &recs[recs.len() - tail_len..];
    let fixed: usize = head.iter().chain(tail).map(Vec::len).sum();
    let mut out: Vec<u8> = head.concat();
    'fill: loop {
        for r in mid {
            if out.len() + fixed >= TARGET {
                break 'fill;
            }
            out.extend_from_slice(r);
        }
    }
    out.extend_from_slice(&tail.concat());
    out
}

/// The bodies one iteration reads, one tap each: a stream inflated to
/// ~1 MiB, or copies of a non-streamed reply making ~1 MiB.
fn bodies(case: &Case, raw: &[u8]) -> Vec<Vec<u8>> {
    if case.per_call() {
        vec![raw.to_vec(); TARGET.div_ceil(raw.len().max(1))]
    } else {
        vec![inflate(
            raw,
            case.content_type.contains("ndjson"),
            case.keep_first,
        )]
    }
}

/// Reads each body through a tap of its own, in `READ`-sized reads.
fn read_all(case: &Case, bodies: &[Vec<u8>]) {
    for body in bodies {
        let mut tap = UsageTap::new(
            case.dialect,
            BodyFormat::from_content_type(Some(case.content_type)),
            None,
            TapLimits::default(),
        );
        for chunk in body.chunks(READ) {
            tap.feed(black_box(chunk));
        }
        black_box(tap.finish());
    }
}

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers");
    let mut group = c.benchmark_group("usage_tap");
    for case in CASES {
        let raw = match std::fs::read(root.join(case.path)) {
            Ok(raw) => raw,
            Err(_) => continue,
        };
        let bodies = bodies(case, &raw);
        let bytes: usize = bodies.iter().map(Vec::len).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(case.name, |b| b.iter(|| read_all(case, &bodies)));
    }
    group.finish();
}

criterion_group!(benches, bench);

/// `USAGE_BENCH_ONLY=<case> USAGE_BENCH_ITERS=<n>` runs one case `n` times
/// and exits, without criterion: on a shared machine, wrap that in
/// `perf stat -e task-clock` and divide bytes by CPU time instead of trusting
/// wall-clock figures.
fn fixed_run() -> bool {
    let (Ok(only), Ok(iters)) = (
        std::env::var("USAGE_BENCH_ONLY"),
        std::env::var("USAGE_BENCH_ITERS"),
    ) else {
        return false;
    };
    let iters: usize = iters.parse().unwrap_or(100);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers");
    for case in CASES.iter().filter(|c| c.name == only) {
        let Ok(raw) = std::fs::read(root.join(case.path)) else {
            continue;
        };
        let bodies = bodies(case, &raw);
        for _ in 0..iters {
            read_all(case, &bodies);
        }
        let bytes: usize = bodies.iter().map(Vec::len).sum();
        println!("{bytes} bytes x {iters}");
    }
    true
}

fn main() {
    if fixed_run() {
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
