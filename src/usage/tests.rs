//! Tap-level tests: format detection, plain-JSON scanning at size, memory
//! bounds, compression failures, and provider quirks that have no captured
//! fixture (the fixtures themselves are covered by `tests/usage_fixtures.rs`).

use super::*;
use std::io::Write;

fn tap(dialect: Dialect, ct: Option<&str>) -> UsageTap {
    UsageTap::new(
        dialect,
        BodyFormat::from_content_type(ct),
        None,
        TapLimits::default(),
    )
}

fn run(dialect: Dialect, ct: Option<&str>, body: &[u8]) -> Observation {
    let mut t = tap(dialect, ct);
    t.feed(body);
    t.finish()
}

/// Feeds `body` whole, byte by byte and in 7-byte pieces; all must agree.
fn run_splits(dialect: Dialect, ct: Option<&str>, body: &[u8]) -> Observation {
    let whole = run(dialect, ct, body);
    let mut t = tap(dialect, ct);
    for b in body.chunks(1) {
        t.feed(b);
    }
    assert_eq!(t.finish(), whole, "byte by byte");
    let mut t = tap(dialect, ct);
    for b in body.chunks(7) {
        t.feed(b);
    }
    assert_eq!(t.finish(), whole, "7-byte reads");
    whole
}

fn json_scanner_buffers(t: &mut UsageTap) -> usize {
    match &t.decoder.sink().parser {
        Parser::Json(s) => s.buffered_capacity(),
        _ => usize::MAX,
    }
}

#[test]
fn embeddings_20mb_usage_at_end_memory_bounded() {
    // An embeddings-like body: 20 MB of vectors, model and usage at the end.
    let mut body = Vec::with_capacity(21 << 20);
    body.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    let vector: String = (0..256)
        .map(|i| format!("{}0.{:07},", if i % 3 == 0 { "-" } else { "" }, i * 7919))
        .collect();
    let mut n = 0;
    while body.len() < 20 << 20 {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(
            format!("{{\"object\":\"embedding\",\"index\":{n},\"embedding\":[{vector}0.5]}}")
                .as_bytes(),
        );
        n += 1;
    }
    body.extend_from_slice(
        b"],\"model\":\"text-embedding-3-small\",\"usage\":{\"prompt_tokens\":123456,\"total_tokens\":123456}}",
    );
    let mut t = tap(Dialect::OpenAi, Some("application/json"));
    let mut peak = 0;
    for piece in body.chunks(64 * 1024) {
        t.feed(piece);
        peak = peak.max(json_scanner_buffers(&mut t));
    }
    // Only the scanner's small key/value buffers: nothing grows with the body.
    assert!(peak < 4096, "scanner buffers grew to {peak} bytes");
    assert_eq!(t.format(), Some(BodyFormat::Json));
    let o = t.finish();
    let u = o.usage.unwrap();
    assert_eq!(u.input_tokens, Some(123456));
    assert_eq!(u.output_tokens, None);
    assert_eq!(o.model.as_deref(), Some("text-embedding-3-small"));
    assert_eq!(o.outcome, Outcome::Completed);
    assert!(!o.parse_error);
    assert_eq!(o.body_bytes, body.len() as u64);
    assert_eq!(o.output_text_bytes, 0);
}

#[test]
fn gemini_json_array_stream() {
    // streamGenerateContent without alt=sse: a JSON array streamed element by
    // element; each element repeats the running usageMetadata.
    let body = br#"[{"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"}}],"usageMetadata": {"promptTokenCount": 10,"totalTokenCount": 80,"thoughtsTokenCount": 70},"modelVersion": "gemini-2.5-flash"}
,
{"candidates": [{"content": {"parts": [{"text": " sky is blue"}],"role": "model"},"finishReason": "STOP"}],"usageMetadata": {"promptTokenCount": 10,"candidatesTokenCount": 48,"totalTokenCount": 598,"thoughtsTokenCount": 540},"modelVersion": "gemini-2.5-flash"}
]"#;
    let o = run_splits(
        Dialect::Gemini,
        Some("application/json; charset=UTF-8"),
        body,
    );
    let u = o.usage.unwrap();
    assert_eq!(u.input_tokens, Some(10));
    assert_eq!(u.output_tokens, Some(588));
    assert_eq!(u.reasoning_tokens, Some(540));
    assert_eq!(o.model.as_deref(), Some("gemini-2.5-flash"));
    assert_eq!(o.outcome, Outcome::Completed);
    assert_eq!(o.output_text_bytes, 3 + 12);
    let mut t = tap(Dialect::Gemini, Some("application/json"));
    t.feed(b"  [");
    assert_eq!(t.format(), Some(BodyFormat::JsonArray));
    // Cut after the first element: usage so far, not completed.
    let cut = body.iter().position(|&b| b == b'\n').unwrap();
    let o = run(Dialect::Gemini, Some("application/json"), &body[..cut]);
    assert_eq!(o.usage.unwrap().output_tokens, Some(70));
    assert_eq!(o.outcome, Outcome::Incomplete);
}

#[test]
fn gemini_json_array_with_error_element() {
    let body = br#"[{"usageMetadata":{"promptTokenCount":3}},{"error":{"code":499,"message":"cancelled","status":"CANCELLED"}}]"#;
    let o = run_splits(Dialect::Gemini, Some("application/json"), body);
    assert_eq!(o.outcome, Outcome::Failed);
    assert_eq!(o.provider_error.as_deref(), Some("CANCELLED"));
    assert_eq!(o.usage.unwrap().input_tokens, Some(3));
}

#[test]
fn gemini_raw_error_after_sse_events() {
    // vertexai-sdk-test-data streaming-failure-error-mid-stream: a raw,
    // multi-line JSON error object after the data events.
    let body = b"data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Hi\"}]}}],\"usageMetadata\": {\"promptTokenCount\": 7,\"totalTokenCount\": 7},\"modelVersion\": \"gemini-1.5-pro\"}\r\n\r\n{\n  \"error\": {\n    \"code\": 499,\n    \"message\": \"The operation was cancelled.\",\n    \"status\": \"CANCELLED\"\n  }\n}\n";
    let o = run_splits(Dialect::Gemini, Some("text/event-stream"), body);
    assert_eq!(o.outcome, Outcome::Failed);
    assert_eq!(o.provider_error.as_deref(), Some("CANCELLED"));
    assert_eq!(o.usage.unwrap().input_tokens, Some(7));
    // Cut while the error object is still being written: still an error.
    let cut = body.len() - 20;
    let o = run(Dialect::Gemini, Some("text/event-stream"), &body[..cut]);
    assert_eq!(o.outcome, Outcome::Failed);
}

#[test]
fn gemini_stream_without_finish_reason_is_incomplete() {
    let body = b"data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"The\"}]}}],\"usageMetadata\": {\"promptTokenCount\": 7,\"totalTokenCount\": 7}}\r\n\r\n";
    let o = run(Dialect::Gemini, Some("text/event-stream"), body);
    assert_eq!(o.outcome, Outcome::Incomplete);
    assert_eq!(o.usage.unwrap().input_tokens, Some(7));
}

#[test]
fn groq_error_event_without_done_is_failed() {
    // pydantic-ai test_tool_use_failed_error_streaming, interaction 0.
    let body = b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"openai/gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
event: error\ndata: {\"error\":{\"message\":\"Tool call validation failed\",\"type\":\"invalid_request_error\",\"code\":\"tool_use_failed\",\"status_code\":400}}\n\n";
    let o = run_splits(Dialect::OpenAi, Some("text/event-stream"), body);
    assert_eq!(o.outcome, Outcome::Failed);
    assert_eq!(o.provider_error.as_deref(), Some("invalid_request_error"));
    assert_eq!(o.usage, None);
    assert_eq!(o.model.as_deref(), Some("openai/gpt-oss-120b"));
}

#[test]
fn openrouter_error_chunk_keeps_usage() {
    let body = b": OPENROUTER PROCESSING\n\n\
data: {\"id\":\"g\",\"model\":\"openai/gpt-4.1-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ab\"}}]}\n\n\
data: {\"id\":\"g\",\"error\":{\"code\":400,\"message\":\"Provider returned error\"},\"usage\":{\"prompt_tokens\":50,\"completion_tokens\":2,\"total_tokens\":52}}\n\n\
data: [DONE]\n\n";
    let o = run_splits(Dialect::OpenAi, Some("text/event-stream"), body);
    assert_eq!(o.outcome, Outcome::Failed);
    assert_eq!(o.provider_error.as_deref(), Some("400"));
    let u = o.usage.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (Some(50), Some(2)));
    assert_eq!(o.output_text_bytes, 2);
}

#[test]
fn responses_error_event_nested_and_flat_then_failed() {
    let nested = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-4.1\",\"usage\":null,\"error\":null}}\n\n\
event: error\ndata: {\"type\":\"error\",\"sequence_number\":2,\"error\":{\"type\":\"insufficient_quota\",\"code\":\"insufficient_quota\",\"message\":\"quota\",\"param\":null}}\n\n\
event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"model\":\"gpt-4.1\",\"usage\":null,\"error\":{\"code\":\"insufficient_quota\",\"message\":\"quota\"}}}\n\n";
    let o = run_splits(Dialect::OpenAi, Some("text/event-stream"), nested);
    assert_eq!(o.outcome, Outcome::Failed);
    assert_eq!(o.provider_error.as_deref(), Some("insufficient_quota"));
    assert_eq!(o.usage, None);
    assert_eq!(o.model.as_deref(), Some("gpt-4.1"));

    let flat = b"event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"boom\",\"param\":null,\"sequence_number\":3}\n\n";
    let o = run_splits(Dialect::OpenAi, Some("text/event-stream"), flat);
    assert_eq!(o.outcome, Outcome::Failed);
    assert_eq!(o.provider_error.as_deref(), Some("server_error"));

    // response.failed that does report usage.
    let failed = b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"model\":\"m\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1},\"error\":{\"code\":\"server_error\"}}}\n\n";
    let o = run(Dialect::OpenAi, Some("text/event-stream"), failed);
    assert_eq!(o.outcome, Outcome::Failed);
    assert_eq!(o.usage.unwrap().input_tokens, Some(5));
}

#[test]
fn responses_incomplete_is_completed_with_usage() {
    let body = b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"abc\"}\n\n\
event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"text\":\"abc\"}\n\n\
event: response.incomplete\ndata: {\"type\":\"response.incomplete\",\"response\":{\"model\":\"gpt-5\",\"incomplete_details\":{\"reason\":\"max_output_tokens\"},\"usage\":{\"input_tokens\":9,\"output_tokens\":16,\"output_tokens_details\":{\"reasoning_tokens\":13}}}}\n\n";
    let o = run_splits(Dialect::OpenAi, Some("text/event-stream"), body);
    assert_eq!(o.outcome, Outcome::Completed);
    let u = o.usage.unwrap();
    assert_eq!((u.output_tokens, u.reasoning_tokens), (Some(16), Some(13)));
    // Only the delta counts as text, not the `.done` repetition.
    assert_eq!(o.output_text_bytes, 3);
}

#[test]
fn xai_and_azure_and_vllm_streams() {
    // xAI: reasoning outside completion_tokens. Azure: first chunk is a
    // content-filter chunk with choices [] and model "". vLLM continuous
    // usage: running totals on every chunk, last wins (never summed).
    let body = b"data: {\"choices\":[],\"id\":\"\",\"model\":\"\",\"created\":0,\"prompt_filter_results\":[]}\n\n\
data: {\"model\":\"grok-4\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":1,\"total_tokens\":13}}\n\n\
data: {\"model\":\"grok-4\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":354,\"completion_tokens_details\":{\"reasoning_tokens\":340}}}\n\n\
data: [DONE]\n\n";
    let o = run_splits(Dialect::OpenAi, Some("text/event-stream"), body);
    let u = o.usage.unwrap();
    assert_eq!(u.input_tokens, Some(12));
    assert_eq!(u.output_tokens, Some(342));
    assert_eq!(u.reasoning_tokens, Some(340));
    assert_eq!(o.model.as_deref(), Some("grok-4"));
    assert_eq!(o.outcome, Outcome::Completed);
}

#[test]
fn anthropic_stream_ttl_iterations_and_zero_input_delta() {
    let body = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-opus-4-5\",\"usage\":{\"input_tokens\":40,\"cache_creation_input_tokens\":1000,\"cache_read_input_tokens\":0,\"cache_creation\":{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":1000},\"output_tokens\":1}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hmm\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":0,\"output_tokens\":77,\"output_tokens_details\":{\"thinking_tokens\":50}}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let o = run_splits(Dialect::Anthropic, Some("text/event-stream"), body);
    let u = o.usage.unwrap();
    assert_eq!(u.input_tokens, Some(1040));
    assert_eq!(u.cache_write_input_tokens, Some(1000));
    assert_eq!(u.cache_write_1h_input_tokens, Some(1000));
    assert_eq!(u.output_tokens, Some(77));
    assert_eq!(u.reasoning_tokens, Some(50));
    assert_eq!(o.outcome, Outcome::Completed);
    assert_eq!(o.output_text_bytes, 3);

    let compaction = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":181,\"output_tokens\":1}}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":181,\"cache_read_input_tokens\":0,\"output_tokens\":8,\"iterations\":[{\"type\":\"compaction\",\"input_tokens\":100,\"cache_read_input_tokens\":55096,\"output_tokens\":83},{\"type\":\"message\",\"input_tokens\":181,\"output_tokens\":8}]}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let o = run(Dialect::Anthropic, Some("text/event-stream"), compaction);
    let u = o.usage.unwrap();
    assert_eq!(u.input_tokens, Some(55377));
    assert_eq!(u.output_tokens, Some(91));
}

#[test]
fn ollama_ndjson_without_done_is_incomplete_and_broken_line_recovers() {
    let body = b"{\"model\":\"llama3.2\",\"message\":{\"role\":\"assistant\",\"content\":\"The\"},\"done\":false}\n";
    let o = run_splits(Dialect::OpenAi, Some("application/x-ndjson"), body);
    assert_eq!(o.outcome, Outcome::Incomplete);
    assert_eq!(o.usage, None);
    assert_eq!(o.model.as_deref(), Some("llama3.2"));
    assert_eq!(o.output_text_bytes, 3);

    let body = b"{\"model\":\"llama3.2\",\"done\":fal\n{\"model\":\"llama3.2\",\"done\":true,\"prompt_eval_count\":26,\"eval_count\":282}\n";
    let o = run_splits(Dialect::OpenAi, Some("application/x-ndjson"), body);
    assert!(o.parse_error);
    assert_eq!(o.outcome, Outcome::Completed);
    let u = o.usage.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (Some(26), Some(282)));

    let err = b"{\"error\":\"model 'x' not found\"}\n";
    let o = run(Dialect::OpenAi, Some("application/x-ndjson"), err);
    assert_eq!(o.outcome, Outcome::Failed);
    assert_eq!(o.provider_error.as_deref(), Some("error"));
}

/// Records the NDJSON fast path reads (whole lines) must give what the
/// general scanner gives: usage on the final record, the first model, text
/// whose bytes look like keys, escaped quotes and backslashes, CRLF, a last
/// record without newline, and errors after content.
#[test]
fn ollama_ndjson_fast_path_loses_nothing() {
    let content = br#"He said \"eval_count\":9, \"done\":true"#;
    let mut body = Vec::new();
    body.extend_from_slice(b"{\"model\":\"llama3.2\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"");
    body.extend_from_slice(content);
    body.extend_from_slice(b"\"},\"done\":false}\r\n");
    body.extend_from_slice(b"{\"model\":\"other\",\"message\":{\"role\":\"assistant\",\"content\":\"\\\\\"},\"done\":false}\n");
    body.extend_from_slice(b"{\"model\":\"llama3.2\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"prompt_eval_count\":26,\"eval_count\":282}");
    let o = run_splits(Dialect::OpenAi, Some("application/x-ndjson"), &body);
    assert_eq!(o.outcome, Outcome::Completed);
    assert!(!o.parse_error);
    assert_eq!(o.model.as_deref(), Some("llama3.2"));
    let u = o.usage.clone().unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (Some(26), Some(282)));
    assert_eq!(o.output_text_bytes, content.len() as u64 + 2);

    // The same with a newline after the final record: one more body byte.
    body.push(b'\n');
    let o2 = run_splits(Dialect::OpenAi, Some("application/x-ndjson"), &body);
    assert_eq!(o2.body_bytes, o.body_bytes + 1);
    assert_eq!(
        Observation {
            body_bytes: o.body_bytes,
            ..o2
        },
        o
    );

    // An error record after content, then nothing.
    let body = b"{\"model\":\"m\",\"message\":{\"content\":\"ab\"},\"done\":false}\n{\"error\":{\"type\":\"overloaded\",\"message\":\"busy\"}}\n";
    let o = run_splits(Dialect::OpenAi, Some("application/x-ndjson"), body);
    assert_eq!(o.outcome, Outcome::Failed);
    assert_eq!(o.provider_error.as_deref(), Some("overloaded"));
    assert_eq!(o.output_text_bytes, 2);
    assert!(o.usage.is_none());
}

#[test]
fn format_sniffing() {
    // No content type: JSON by its first byte, else SSE.
    let o = run(
        Dialect::OpenAi,
        None,
        b"\n {\"model\":\"m\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}",
    );
    assert_eq!(o.usage.unwrap().output_tokens, Some(2));
    assert_eq!(o.outcome, Outcome::Completed);
    let o = run(
        Dialect::OpenAi,
        Some("application/octet-stream"),
        b"data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
    );
    assert_eq!(o.usage.unwrap().input_tokens, Some(1));
    assert_eq!(o.outcome, Outcome::Completed);
    // A JSON error body sent with the event-stream content type.
    let o = run(
        Dialect::Anthropic,
        Some("text/event-stream"),
        b"{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}",
    );
    assert_eq!(o.outcome, Outcome::Failed);
    assert_eq!(o.provider_error.as_deref(), Some("overloaded_error"));
    // An event stream labelled as JSON.
    let o = run(
        Dialect::OpenAi,
        Some("application/json"),
        b"data: {\"model\":\"m\",\"choices\":[]}\n\ndata: [DONE]\n\n",
    );
    assert_eq!(o.outcome, Outcome::Completed);
    assert_eq!(o.model.as_deref(), Some("m"));
    // Not JSON at all under a JSON label.
    let o = run(
        Dialect::OpenAi,
        Some("application/json"),
        b"<html>502</html>",
    );
    assert!(o.parse_error);
    assert_eq!(o.outcome, Outcome::Incomplete);
    // Empty body.
    let o = run(Dialect::OpenAi, Some("application/json"), b"");
    assert_eq!(o.outcome, Outcome::Incomplete);
    assert_eq!(o.body_bytes, 0);
}

#[test]
fn truncated_json_body_is_incomplete() {
    let body = br#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4},"choices":[{"message":{"content":"hel"#;
    let o = run_splits(Dialect::OpenAi, Some("application/json"), body);
    assert_eq!(o.outcome, Outcome::Incomplete);
    assert_eq!(o.usage.unwrap().input_tokens, Some(3));
    assert!(!o.parse_error);
}

#[test]
fn done_and_message_stop_without_trailing_blank_line() {
    let body = b"data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]";
    let o = run_splits(Dialect::OpenAi, Some("text/event-stream"), body);
    assert_eq!(o.outcome, Outcome::Completed);
    // Usage in the unterminated last event is used when its JSON is complete…
    let body = b"data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}";
    let o = run_splits(Dialect::OpenAi, Some("text/event-stream"), body);
    assert_eq!(o.usage.unwrap().output_tokens, Some(2));
    assert_eq!(o.outcome, Outcome::Incomplete);
    assert!(!o.parse_error);
    // …and silently ignored when the stream was cut inside it.
    let body = b"data: {\"model\":\"m\",\"choices\":[{}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tok";
    let o = run_splits(Dialect::OpenAi, Some("text/event-stream"), body);
    assert_eq!(o.usage, None);
    assert!(!o.parse_error);
    assert_eq!(o.outcome, Outcome::Incomplete);
}

#[test]
fn oversized_event_sets_parse_error_and_keeps_going() {
    let limits = TapLimits {
        max_event_bytes: 256,
        max_json_value_bytes: 256,
    };
    let mut body = b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"".to_vec();
    body.extend(std::iter::repeat_n(b'x', 10_000));
    body.extend_from_slice(b"\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
    let mut t = UsageTap::new(Dialect::OpenAi, Some(BodyFormat::Sse), None, limits);
    for c in body.chunks(100) {
        t.feed(c);
    }
    let o = t.finish();
    assert!(o.parse_error);
    assert_eq!(o.usage.unwrap().output_tokens, Some(2));
    assert_eq!(o.outcome, Outcome::Completed);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn unknown_encoding_is_parse_error_with_raw_size() {
    let body = gzip(b"{\"usage\":{\"prompt_tokens\":1}}");
    let mut t = UsageTap::new(
        Dialect::OpenAi,
        Some(BodyFormat::Json),
        Some("compress"),
        TapLimits::default(),
    );
    t.feed(&body);
    let o = t.finish();
    assert!(o.parse_error);
    assert_eq!(o.usage, None);
    assert_eq!(o.body_bytes, body.len() as u64);
    // Two stacked codings are not decoded either.
    let mut t = UsageTap::new(
        Dialect::OpenAi,
        None,
        Some("gzip, br"),
        TapLimits::default(),
    );
    t.feed(&body);
    assert!(t.finish().parse_error);
    // identity is no coding.
    let mut t = UsageTap::new(
        Dialect::OpenAi,
        None,
        Some("identity"),
        TapLimits::default(),
    );
    t.feed(b"{\"usage\":{\"prompt_tokens\":1}}");
    assert!(!t.finish().parse_error);
}

#[test]
fn broken_and_truncated_compression_never_panics() {
    let good = gzip(b"data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
    // Corrupt the deflate payload after the header.
    let mut bad = good.clone();
    for b in bad.iter_mut().skip(12).take(8) {
        *b ^= 0x5a;
    }
    for enc in ["gzip", "deflate", "br", "zstd"] {
        let mut t = UsageTap::new(
            Dialect::OpenAi,
            Some(BodyFormat::Sse),
            Some(enc),
            TapLimits::default(),
        );
        t.feed(&bad);
        t.feed(b"more garbage after the failure");
        let o = t.finish();
        assert!(o.parse_error, "{enc}");
    }
    // Truncated but valid so far: usage read before the cut stays.
    let mut t = UsageTap::new(
        Dialect::OpenAi,
        Some(BodyFormat::Sse),
        Some("gzip"),
        TapLimits::default(),
    );
    t.feed(&good[..good.len() - 12]);
    let o = t.finish();
    assert_eq!(o.usage.unwrap().output_tokens, Some(2));
}

#[test]
fn decompression_bomb_is_cut_off() {
    // 100 MB of one JSON string compress to a few KB with zstd; the per-read
    // budget stops decoding long before the whole body is inflated.
    let mut plain = b"{\"model\":\"m\",\"x\":\"".to_vec();
    plain.resize(100 << 20, b'a');
    plain.extend_from_slice(b"\",\"usage\":{\"prompt_tokens\":1}}");
    let bomb = zstd::encode_all(&plain[..], 3).unwrap();
    drop(plain);
    assert!(bomb.len() < 100 * 1024, "{}", bomb.len());
    let mut t = UsageTap::new(
        Dialect::OpenAi,
        Some(BodyFormat::Json),
        Some("zstd"),
        TapLimits::default(),
    );
    for c in bomb.chunks(4096) {
        t.feed(c);
    }
    let o = t.finish();
    assert!(o.parse_error);
    assert_eq!(o.usage, None);
    assert_eq!(o.model.as_deref(), Some("m"));
    assert!(o.body_bytes < 64 << 20, "decoded {}", o.body_bytes);
}

#[test]
fn content_type_mapping() {
    use BodyFormat::*;
    let f = |s| BodyFormat::from_content_type(Some(s));
    assert_eq!(f("text/event-stream; charset=utf-8"), Some(Sse));
    assert_eq!(f("application/x-ndjson"), Some(Ndjson));
    assert_eq!(f("application/jsonl"), Some(Ndjson));
    assert_eq!(f("Application/JSON"), Some(Json));
    assert_eq!(f("application/problem+json"), Some(Json));
    assert_eq!(f("application/PROBLEM+JSON ; charset=utf-8"), Some(Json));
    assert_eq!(f(" Text/Event-Stream"), Some(Sse));
    assert_eq!(f("application/X-NDJSON"), Some(Ndjson));
    assert_eq!(f("application/json-lines"), Some(Ndjson));
    assert_eq!(f("application/x-JSONLines"), Some(Ndjson));
    assert_eq!(f("application/vnd.acme.events+ndjson"), Some(Ndjson));
    assert_eq!(f("ndjson"), Some(Ndjson));
    assert_eq!(f("application/jsonlx"), None);
    assert_eq!(f("text/html"), None);
    assert_eq!(f("+json"), Some(Json));
    assert_eq!(f("json"), None);
    assert_eq!(f("application/jsonx"), None);
    assert_eq!(f(""), None);
    assert_eq!(BodyFormat::from_content_type(None), None);
}

/// Events and records stream; a single JSON document is held whole.
#[test]
fn only_event_and_record_formats_stream() {
    assert!(BodyFormat::Sse.is_stream());
    assert!(BodyFormat::Ndjson.is_stream());
    assert!(!BodyFormat::Json.is_stream());
    assert!(!BodyFormat::JsonArray.is_stream());
}

/// A JSON reply's `model` as serde_json reads it: a plain string borrowed,
/// escapes decoded, `null` no model, anything else a parse error.
#[test]
fn json_reply_model_forms() {
    let reply = |model: &str| {
        format!(r#"{{"model": {model} , "usage": {{"prompt_tokens": 3, "completion_tokens": 2}}}}"#)
    };
    let json = Some("application/json");
    for (model, read, parse_error) in [
        (r#""gpt-4.1""#, Some("gpt-4.1"), false),
        (r#""gpt-4\u002e1""#, Some("gpt-4.1"), false),
        (r#""  gpt-4.1 ""#, Some("gpt-4.1"), false),
        ("null", None, false),
        ("41", None, true),
        (r#""gpt-\ud800""#, None, true),
    ] {
        let o = run_splits(Dialect::OpenAi, json, reply(model).as_bytes());
        assert_eq!(o.model.as_deref(), read, "{model}");
        assert_eq!(o.parse_error, parse_error, "{model}");
        assert_eq!(o.usage.unwrap().input_tokens, Some(3), "{model}");
    }
}
