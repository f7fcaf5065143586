//! The investigation API (`/api/runs/{id}`, `/api/runs`, `/api/segments`,
//! `/api/compare`) over scripted traffic with known token counts and prices
//! (`tests/fixtures/it_pricing.toml`), on the test's manual clock.

use bytes::Bytes;
use http::Request;
use serde_json::Value;
use tollgate::api::format_rfc3339;
use tollgate::budget::Clock;
use tollgate::money::Money;

use crate::support::*;

/// USD of `picos` as the API prints it.
fn usd(picos: u64) -> f64 {
    Money::from_picos(picos).as_usd_f64()
}

fn assert_close(actual: &Value, expected: f64, what: &str) {
    let got = actual
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {actual}"));
    assert!(
        (got - expected).abs() <= 1e-12 * expected.abs().max(1.0),
        "{what}: got {got}, expected {expected}"
    );
}

/// The mock answers chat completions with the usage the request asks for:
/// `{"model", "p", "c", "cached", "reasoning"}`; anything else (tools) `{}`.
async fn upstream() -> MockUpstream {
    MockUpstream::start(|request| {
        if request.uri.path() != "/v1/chat/completions" {
            return MockReply::json(200, "{}");
        }
        let asked: Value = serde_json::from_slice(&request.body).unwrap();
        let n = |k: &str| asked.get(k).and_then(Value::as_u64).unwrap_or(0);
        let (p, c) = (n("p"), n("c"));
        let body = serde_json::json!({
            "id": "c", "object": "chat.completion", "model": asked["model"], "choices": [],
            "usage": {
                "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": n("cached")},
                "completion_tokens_details": {"reasoning_tokens": n("reasoning")},
            }
        });
        MockReply::json(200, body.to_string())
    })
    .await
}

fn config(extra: &str) -> String {
    format!(
        "{}\n[[routes]]\nname = \"search\"\nprefix = \"/tools/search\"\nupstream = \"{{upstream}}\"\nkind = \"tool\"\ncost_per_call_usd = 0.001\n{extra}",
        config_all_routes()
    )
}

/// One call through the proxy; returns its status.
struct Call<'a> {
    run: Option<&'a str>,
    release: &'a str,
    request_type: &'a str,
    /// `None`: a tool call.
    model: Option<&'a str>,
    p: u64,
    c: u64,
    cached: u64,
    reasoning: u64,
    end: bool,
    retry: bool,
}

impl<'a> Call<'a> {
    fn llm(run: &'a str, release: &'a str, model: &'a str, p: u64, c: u64) -> Call<'a> {
        Call {
            run: Some(run),
            release,
            request_type: "research",
            model: Some(model),
            p,
            c,
            cached: 0,
            reasoning: 0,
            end: false,
            retry: false,
        }
    }

    fn tool(run: &'a str, release: &'a str) -> Call<'a> {
        Call {
            model: None,
            ..Call::llm(run, release, "", 0, 0)
        }
    }

    fn kind(mut self, request_type: &'a str) -> Call<'a> {
        self.request_type = request_type;
        self
    }

    fn ends(mut self) -> Call<'a> {
        self.end = true;
        self
    }

    async fn send(self, proxy: &Proxy) -> u16 {
        let mut headers = vec![
            ("x-agent-release", self.release),
            ("x-agent-request-type", self.request_type),
        ];
        if let Some(run) = self.run {
            headers.push(("x-agent-run-id", run));
        }
        if self.end {
            headers.push(("x-agent-run-status", "completed"));
        }
        if self.retry {
            headers.push(("x-stainless-retry-count", "1"));
        }
        let (url, body) = match self.model {
            Some(model) => (
                proxy.url("/openai/v1/chat/completions"),
                serde_json::json!({"model": model, "p": self.p, "c": self.c,
                    "cached": self.cached, "reasoning": self.reasoning})
                .to_string(),
            ),
            None => (proxy.url("/tools/search"), "{}".to_string()),
        };
        let response = post_json(url, &headers, &body).await;
        let status = response.status().as_u16();
        let _ = body_bytes(response).await;
        status
    }
}

async fn get(url: String, token: Option<&str>) -> (u16, Value) {
    let mut builder = Request::get(url);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let response = send(builder.body(Bytes::new()).unwrap()).await;
    let status = response.status().as_u16();
    let body = body_bytes(response).await;
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, value)
}

async fn api(proxy: &Proxy, path_and_query: &str) -> Value {
    let (status, body) = get(format!("http://{}{path_and_query}", proxy.admin), None).await;
    assert_eq!(status, 200, "{path_and_query}: {body}");
    body
}

fn ids(runs: &Value) -> Vec<String> {
    runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect()
}

/// Picos of `p` prompt and `c` completion tokens of gpt-4o-mini ($2 / $6 per M).
fn mini(p: u64, c: u64) -> u64 {
    p * 2_000_000 + c * 6_000_000
}

const TOOL: u64 = 1_000_000_000;

const SEGMENT_THRESHOLDS: &str = "
[segments]
cost_per_run_warning_usd = 0.005
cost_per_run_critical_usd = 0.05
cost_p95_warning_usd = 0.0025
cost_p95_critical_usd = 0.01
burn_rate_warning_usd_per_hour = 0.01
";

/// The scripted mix, one call per second from `t0 + 1s`:
///
/// | t  | run     | release | type     | call                                   | picos  |
/// |----|---------|---------|----------|----------------------------------------|--------|
/// | 1  | r-a #1  | rel-1   | research | gpt-4o-mini 1000/100                   | 2.6e9  |
/// | 2  | r-a #1  |         |          | tool search                            | 1e9    |
/// | 3  | r-a #1  |         |          | gpt-5.1 1000 (400 cached)/300 (100 r.) | 5.2e9  |
/// | 4  | r-a #1  |         |          | gpt-4o-mini 500/50, completed          | 1.3e9  |
/// | 5  | r-b     | rel-1   | chat     | gpt-4o-mini 2000/200                   | 5.2e9  |
/// | 6  | r-b     |         |          | same body, SDK retry, completed        | 5.2e9  |
/// | 7–9| r-c     | rel-2   | research | 3 × tool search, completed             | 3e9    |
/// | 10 | r-d     | rel-2   | research | gpt-4o-mini 100/10                     | 0.26e9 |
/// | 11 | r-d finished with status error through the API                  |        |
/// | 12 | (none)  | rel-1   | chat     | gpt-4o-mini 100/100                    | 0.8e9  |
/// | 13 | r-a #2  | rel-1   | research | gpt-4o-mini 100/10, completed          | 0.26e9 |
/// | 14 | r-live  | rel-2   | chat     | gpt-4o-mini 300/30 (stays active)      | 0.78e9 |
async fn scripted_mix(proxy: &Proxy) -> u64 {
    let t0 = proxy.clock.now_ms();
    let tick = || proxy.clock.advance(1_000);
    let steps: Vec<Call<'_>> = vec![
        Call::llm("r-a", "rel-1", "gpt-4o-mini", 1000, 100),
        Call::tool("r-a", "rel-1"),
        Call {
            cached: 400,
            reasoning: 100,
            ..Call::llm("r-a", "rel-1", "gpt-5.1", 1000, 300)
        },
        Call::llm("r-a", "rel-1", "gpt-4o-mini", 500, 50).ends(),
        Call::llm("r-b", "rel-1", "gpt-4o-mini", 2000, 200).kind("chat"),
        Call {
            retry: true,
            ..Call::llm("r-b", "rel-1", "gpt-4o-mini", 2000, 200)
                .kind("chat")
                .ends()
        },
        Call::tool("r-c", "rel-2"),
        Call::tool("r-c", "rel-2"),
        Call::tool("r-c", "rel-2").ends(),
        Call::llm("r-d", "rel-2", "gpt-4o-mini", 100, 10),
    ];
    for call in steps {
        tick();
        assert_eq!(call.send(proxy).await, 200);
    }
    tick(); // t11
    let finish = post_json(
        format!("http://{}/api/runs/r-d/finish", proxy.admin),
        &[],
        r#"{"status":"error"}"#,
    )
    .await;
    assert_eq!(finish.status(), 200);
    tick(); // t12
    let no_run = Call {
        run: None,
        ..Call::llm("", "rel-1", "gpt-4o-mini", 100, 100).kind("chat")
    };
    assert_eq!(no_run.send(proxy).await, 200);
    tick(); // t13
    assert_eq!(
        Call::llm("r-a", "rel-1", "gpt-4o-mini", 100, 10)
            .ends()
            .send(proxy)
            .await,
        200
    );
    tick(); // t14
    assert_eq!(
        Call::llm("r-live", "rel-2", "gpt-4o-mini", 300, 30)
            .kind("chat")
            .send(proxy)
            .await,
        200
    );
    proxy.state.ledger.as_ref().unwrap().flush();
    t0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_and_segments_over_a_scripted_mix() {
    runs_and_segments(Backend::Sqlite, "runs_and_segments_over_a_scripted_mix").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_and_segments_over_a_scripted_mix_on_postgres() {
    runs_and_segments(
        Backend::Postgres,
        "runs_and_segments_over_a_scripted_mix_on_postgres",
    )
    .await;
}

async fn runs_and_segments(backend: Backend, test: &str) {
    let upstream = upstream().await;
    let Some((proxy, _pg)) = start_on(backend, test, &config(SEGMENT_THRESHOLDS), &upstream).await
    else {
        return;
    };
    let t0 = scripted_mix(&proxy).await;
    let t = |i: u64| t0 + i * 1_000;

    // --- One run: the latest under a reused id, then the earlier one.
    let latest = api(&proxy, "/api/runs/r-a").await;
    assert_eq!(latest["run"]["started_ms"], t(13));
    assert_eq!(latest["run"]["calls"], 1);
    assert_eq!(latest["total"], 1);
    assert_close(
        &latest["run"]["cost_usd"],
        usd(mini(100, 10)),
        "r-a #2 cost",
    );

    let first = api(&proxy, &format!("/api/runs/r-a?started_ms={}", t(1))).await;
    let run = &first["run"];
    assert_eq!(run["run_id"], "r-a");
    assert_eq!(run["release"], "rel-1");
    assert_eq!(run["request_type"], "research");
    assert_eq!(run["status"], "ok");
    assert_eq!(run["stop_reason"], "completed");
    let r_a_cost = mini(1000, 100) + TOOL + 5_200_000_000 + mini(500, 50);
    assert_eq!(r_a_cost, 10_100_000_000);
    assert_close(&run["cost_usd"], usd(r_a_cost), "r-a cost");
    assert_close(&run["llm_cost_usd"], usd(r_a_cost - TOOL), "r-a llm");
    assert_close(&run["tool_cost_usd"], usd(TOOL), "r-a tool");
    assert_eq!(
        run["tokens"],
        serde_json::json!({"prompt": 2500, "cached_prompt": 400, "cache_write": 0, "completion": 450, "reasoning": 100})
    );
    assert_eq!(run["calls"], 4);
    assert_eq!(
        (run["refusals"].clone(), run["retries"].clone()),
        (0.into(), 0.into())
    );
    assert_eq!(run["estimated_calls"], 0);
    assert_eq!(run["started_ms"], t(1));
    assert_eq!(run["ended_ms"], t(4));
    assert_eq!(run["started_at"], format_rfc3339(t(1)));
    assert_eq!(run["ended_at"], format_rfc3339(t(4)));
    assert_eq!(run["breached"], false);
    let calls = first["calls"].as_array().unwrap();
    let path: Vec<(Value, Value, Value)> = calls
        .iter()
        .map(|c| (c["route"].clone(), c["model"].clone(), c["tool"].clone()))
        .collect();
    assert_eq!(
        path,
        [
            ("openai".into(), "gpt-4o-mini".into(), Value::Null),
            ("search".into(), Value::Null, "search".into()),
            ("openai".into(), "gpt-5.1".into(), Value::Null),
            ("openai".into(), "gpt-4o-mini".into(), Value::Null),
        ],
        "the tool path, in order"
    );
    let ts: Vec<Value> = calls.iter().map(|c| c["ts_ms"].clone()).collect();
    assert_eq!(ts, [t(1), t(2), t(3), t(4)].map(Value::from));
    let reasoning_call = &calls[2];
    assert_eq!(
        reasoning_call["tokens"],
        serde_json::json!({"prompt": 1000, "cached_prompt": 400, "cache_write": 0, "completion": 300, "reasoning": 100})
    );
    // 600 × $2 + 400 × $1 (cached) + 300 × $12 per million.
    assert_close(&reasoning_call["cost_usd"], 0.0052, "gpt-5.1 call");
    assert_eq!(reasoning_call["status"], 200);
    assert_eq!(reasoning_call["outcome"], "complete");
    assert_eq!(reasoning_call["price_entry"], "gpt-5.1");
    assert_eq!(
        reasoning_call["price_version"],
        proxy.state.pricing.load().version()
    );
    assert_eq!(calls[1]["provider"], "tool");
    // Pagination of the calls.
    let page = api(
        &proxy,
        &format!("/api/runs/r-a?started_ms={}&limit=2&offset=1", t(1)),
    )
    .await;
    assert_eq!(
        (
            page["total"].clone(),
            page["limit"].clone(),
            page["offset"].clone()
        ),
        (4.into(), 2.into(), 1.into())
    );
    let page_ts: Vec<Value> = page["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ts_ms"].clone())
        .collect();
    assert_eq!(page_ts, [t(2), t(3)].map(Value::from));

    let retried = api(&proxy, "/api/runs/r-b").await;
    assert_eq!(retried["run"]["retries"], 1);
    assert_eq!(retried["run"]["repeated_calls"], 1);
    assert_eq!(retried["calls"][1]["sdk_retry"], true);
    assert_eq!(retried["calls"][1]["duplicate_body"], true);
    assert_eq!(retried["calls"][0]["sdk_retry"], false);

    let errored = api(&proxy, "/api/runs/r-d").await;
    assert_eq!(errored["run"]["status"], "error");
    assert_eq!(errored["run"]["stop_reason"], "step_error");
    assert_eq!(errored["run"]["ended_ms"], t(11));

    let live = api(&proxy, "/api/runs/r-live").await;
    assert_eq!(live["run"]["status"], "active");
    assert_eq!(live["run"]["stop_reason"], Value::Null);
    assert_eq!(live["run"]["ended_ms"], Value::Null);
    assert_eq!(live["run"]["ended_at"], Value::Null);
    assert_eq!(live["run"]["calls"], 1);
    assert_close(&live["run"]["cost_usd"], usd(mini(300, 30)), "live cost");
    assert_eq!(live["run"]["tokens"]["prompt"], 300);
    assert_eq!(live["calls"].as_array().unwrap().len(), 1);

    let (status, body) = get(format!("http://{}/api/runs/nope", proxy.admin), None).await;
    assert_eq!(status, 404, "{body}");

    // --- Run lists. Costs: r-b 10.4e9, r-a#1 10.1e9, r-c 3e9, r-live 0.78e9,
    // r-a#2 and r-d 0.26e9 (the later start first).
    let by_cost = api(&proxy, "/api/runs").await;
    assert_eq!(ids(&by_cost), ["r-b", "r-a", "r-c", "r-live", "r-a", "r-d"]);
    assert_eq!(by_cost["total"], 6);
    assert_eq!(by_cost["limit"], 50);
    assert_eq!(by_cost["runs"][1]["started_ms"], t(1));
    assert_eq!(
        by_cost["runs"][1]["tokens"], run["tokens"],
        "list rows carry tokens"
    );
    assert_eq!(
        by_cost["runs"][3]["tokens"]["prompt"], 300,
        "and live rows too"
    );
    assert_eq!(by_cost["runs"][4]["started_ms"], t(13));
    assert_close(
        &by_cost["runs"][0]["cost_usd"],
        usd(2 * mini(2000, 200)),
        "r-b cost",
    );
    let page = api(&proxy, "/api/runs?sort=cost&limit=2&offset=2").await;
    assert_eq!(ids(&page), ["r-c", "r-live"]);
    assert_eq!(
        (page["total"].clone(), page["offset"].clone()),
        (6.into(), 2.into())
    );
    let page = api(&proxy, "/api/runs?limit=2&offset=4").await;
    assert_eq!(ids(&page), ["r-a", "r-d"]);
    assert_eq!(page["runs"][1]["tokens"]["prompt"], 100);
    let ended_page = api(&proxy, "/api/runs?status=ok&limit=1&offset=1").await;
    assert_eq!(ids(&ended_page), ["r-a"]);
    assert_eq!(ended_page["total"], 4);
    assert_eq!(ended_page["runs"][0]["tokens"]["completion"], 450);
    let by_start = api(&proxy, "/api/runs?sort=started").await;
    assert_eq!(
        ids(&by_start),
        ["r-live", "r-a", "r-d", "r-c", "r-b", "r-a"]
    );
    let by_end = api(&proxy, "/api/runs?sort=ended").await;
    assert_eq!(ids(&by_end), ["r-live", "r-a", "r-d", "r-c", "r-b", "r-a"]);
    assert_eq!(
        ids(&api(&proxy, "/api/runs?status=active").await),
        ["r-live"]
    );
    assert_eq!(ids(&api(&proxy, "/api/runs?status=error").await), ["r-d"]);
    let ok = api(&proxy, "/api/runs?status=ok").await;
    assert_eq!(ids(&ok), ["r-b", "r-a", "r-c", "r-a"]);
    assert_eq!(
        ids(&api(&proxy, "/api/runs?release=rel-1").await),
        ["r-b", "r-a", "r-a"]
    );
    assert_eq!(
        ids(&api(&proxy, "/api/runs?request_type=chat").await),
        ["r-b", "r-live"]
    );
    // Ended from t7 on (inclusive), RFC 3339 with an offset, and live runs.
    let since = format_rfc3339(t(7)).replace("Z", "%2B00:00");
    let recent = api(&proxy, &format!("/api/runs?since={since}")).await;
    assert_eq!(ids(&recent), ["r-c", "r-live", "r-a", "r-d"]);
    // Until t9 as a duration back from now (t14): 5s.
    let older = api(&proxy, "/api/runs?until=5s&status=ok").await;
    assert_eq!(ids(&older), ["r-b", "r-a", "r-c"]);

    // --- Segments over the last 24 hours (the default window).
    let rel_1_calls = r_a_cost + 2 * mini(2000, 200) + mini(100, 100) + mini(100, 10);
    let rel_2_calls = 3 * TOOL + mini(100, 10) + mini(300, 30);
    let by_release = api(&proxy, "/api/segments").await;
    assert_eq!(by_release["by"], serde_json::json!(["release"]));
    assert_eq!(by_release["until_ms"], t(14));
    assert_eq!(by_release["since_ms"], t(14) - 86_400_000);
    assert_eq!(by_release["since"], format_rfc3339(t(14) - 86_400_000));
    assert_eq!(by_release["total"], 2);
    let segs = by_release["segments"].as_array().unwrap();
    let (one, two) = (&segs[0], &segs[1]);
    assert_eq!(one["key"], serde_json::json!({"release": "rel-1"}));
    assert_eq!(
        (one["runs"].clone(), one["calls"].clone()),
        (3.into(), 8.into())
    );
    assert_close(&one["cost_usd"], usd(rel_1_calls), "rel-1 cost");
    assert_close(&one["tool_cost_usd"], usd(TOOL), "rel-1 tool");
    assert_close(&one["llm_cost_usd"], usd(rel_1_calls - TOOL), "rel-1 llm");
    // Ended runs: r-a#1 10.1e9, r-b 10.4e9, r-a#2 0.26e9.
    assert_close(&one["cost_per_run"], 0.00692, "rel-1 cost per run");
    assert_close(&one["cost_per_1k_runs"], 6.92, "rel-1 per 1k runs");
    assert_close(&one["cost_p95"], 0.0104, "rel-1 p95 (rank 3 of 3)");
    assert_close(
        &one["burn_rate_usd_per_hour"],
        (usd(rel_1_calls) / 24.0 * 1e12).round() / 1e12,
        "rel-1 burn",
    );
    assert_close(&one["llm_share"], 0.9536, "rel-1 llm share");
    assert_close(&one["tool_share"], 0.0464, "rel-1 tool share");
    assert_close(&one["estimated_share"], 0.0, "rel-1 estimated share");
    assert_eq!(one["status"], "critical");
    assert_eq!(
        one["reasons"],
        serde_json::json!([
            "cost_per_run 0.00692 > warning 0.005",
            "cost_p95 0.0104 > critical 0.01"
        ])
    );
    assert_eq!(two["key"], serde_json::json!({"release": "rel-2"}));
    assert_eq!(
        (two["runs"].clone(), two["calls"].clone()),
        (2.into(), 5.into())
    );
    assert_close(&two["cost_usd"], usd(rel_2_calls), "rel-2 cost");
    assert_close(&two["cost_per_run"], 0.00163, "rel-2 cost per run");
    assert_close(&two["cost_p95"], 0.003, "rel-2 p95 (rank 2 of 2)");
    assert_eq!(two["status"], "warning");
    assert_eq!(
        two["reasons"],
        serde_json::json!(["cost_p95 0.003 > warning 0.0025"])
    );

    // A two-hour window given as RFC 3339 times: burn rate = spend / 2.
    let window = format!(
        "since={}&until={}",
        format_rfc3339(t0),
        format_rfc3339(t0 + 7_200_000)
    );
    let two_hours = api(&proxy, &format!("/api/segments?{window}")).await;
    let one = &two_hours["segments"][0];
    assert_close(
        &one["burn_rate_usd_per_hour"],
        usd(rel_1_calls) / 2.0,
        "rel-1 burn over 2h",
    );
    assert_eq!(
        one["reasons"][2],
        format!(
            "burn_rate_usd_per_hour {} > warning 0.01",
            usd(rel_1_calls) / 2.0
        )
    );

    // By model: a run counts in each model it called, with those calls' cost.
    let by_model = api(&proxy, "/api/segments?by=model").await;
    let segs = by_model["segments"].as_array().unwrap();
    let keys: Vec<Value> = segs.iter().map(|s| s["key"]["model"].clone()).collect();
    assert_eq!(keys, ["gpt-4o-mini".into(), "gpt-5.1".into(), Value::Null]);
    let mini_seg = &segs[0];
    assert_eq!(
        (mini_seg["calls"].clone(), mini_seg["runs"].clone()),
        (8.into(), 4.into())
    );
    // r-a#1 3.9e9, r-b 10.4e9, r-d 0.26e9, r-a#2 0.26e9.
    assert_close(&mini_seg["cost_per_run"], 0.003705, "mini cost per run");
    assert_close(&mini_seg["cost_p95"], 0.0104, "mini p95");
    let tools_seg = &segs[2];
    assert_eq!(
        (tools_seg["calls"].clone(), tools_seg["runs"].clone()),
        (4.into(), 2.into())
    );
    assert_close(&tools_seg["cost_per_run"], 0.002, "tool-call cost per run");
    assert_close(&tools_seg["tool_share"], 1.0, "tool share");
    let paged = api(&proxy, "/api/segments?by=model&limit=1&offset=1").await;
    assert_eq!(paged["total"], 3);
    assert_eq!(paged["segments"].as_array().unwrap().len(), 1);
    assert_eq!(paged["segments"][0]["key"]["model"], "gpt-5.1");
    assert_eq!(paged["segments"][0]["runs"], 1);

    let by_tool = api(&proxy, "/api/segments?by=tool").await;
    let segs = by_tool["segments"].as_array().unwrap();
    assert_eq!(segs[0]["key"], serde_json::json!({"tool": null}));
    assert_eq!(
        (segs[0]["calls"].clone(), segs[0]["runs"].clone()),
        (9.into(), 4.into())
    );
    assert_eq!(segs[1]["key"], serde_json::json!({"tool": "search"}));
    assert_eq!(
        (segs[1]["calls"].clone(), segs[1]["runs"].clone()),
        (4.into(), 2.into())
    );
    assert_close(&segs[1]["cost_usd"], usd(4 * TOOL), "search spend");

    let by_type = api(&proxy, "/api/segments?by=request_type").await;
    let segs = by_type["segments"].as_array().unwrap();
    assert_eq!(
        segs[0]["key"],
        serde_json::json!({"request_type": "research"})
    );
    assert_eq!(
        (segs[0]["calls"].clone(), segs[0]["runs"].clone()),
        (9.into(), 4.into())
    );
    assert_close(&segs[0]["cost_per_run"], 0.003405, "research cost per run");
    assert_close(&segs[0]["cost_p95"], 0.0101, "research p95");
    assert_eq!(segs[1]["key"], serde_json::json!({"request_type": "chat"}));
    assert_eq!(
        (segs[1]["calls"].clone(), segs[1]["runs"].clone()),
        (4.into(), 1.into())
    );
    assert_close(&segs[1]["cost_per_run"], 0.0104, "chat cost per run");

    // Keys come back in the documented order whatever order they are asked in.
    let pair = api(&proxy, "/api/segments?by=tool,release").await;
    assert_eq!(pair["by"], serde_json::json!(["release", "tool"]));
    let rel2_search = pair["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == serde_json::json!({"release": "rel-2", "tool": "search"}))
        .expect("rel-2 / search segment");
    assert_eq!(
        (rel2_search["calls"].clone(), rel2_search["runs"].clone()),
        (3.into(), 1.into())
    );
    assert_close(
        &rel2_search["cost_per_run"],
        0.003,
        "rel-2 search cost per run",
    );

    proxy.shutdown().await;
}

/// One run shape: `p`/`c` tokens of `model` in one call, then `tools` tool
/// calls; the last call ends the run.
#[derive(Clone, Copy)]
struct Shape {
    model: &'static str,
    p: u64,
    c: u64,
    tools: u32,
}

const fn shape(model: &'static str, p: u64, c: u64, tools: u32) -> Shape {
    Shape { model, p, c, tools }
}

/// gpt-4o-mini 1000/100 + 1 tool: 1100 tokens, $0.0026 LLM + $0.001 tool.
const A: Shape = shape("gpt-4o-mini", 1000, 100, 1);

async fn runs_of(proxy: &Proxy, release: &str, shapes: &[(usize, Shape)]) {
    let mut index = 0;
    for &(count, s) in shapes {
        for _ in 0..count {
            index += 1;
            let run = format!("{release}-{index}");
            proxy.clock.advance(10);
            let llm = Call::llm(&run, release, s.model, s.p, s.c);
            let llm = if s.tools == 0 { llm.ends() } else { llm };
            assert_eq!(llm.send(proxy).await, 200);
            for i in 0..s.tools {
                proxy.clock.advance(10);
                let tool = Call::tool(&run, release);
                let tool = if i + 1 == s.tools { tool.ends() } else { tool };
                assert_eq!(tool.send(proxy).await, 200);
            }
        }
    }
}

const SIGNALS: [&str; 5] = [
    "more_tokens_per_run",
    "over_tooling",
    "prompt_or_reasoning_regression",
    "unit_cost_regression",
    "tail_runs_accelerating_spend",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_names_each_signal_combination() {
    compare_signals(Backend::Sqlite, "compare_names_each_signal_combination").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_names_each_signal_combination_on_postgres() {
    compare_signals(
        Backend::Postgres,
        "compare_names_each_signal_combination_on_postgres",
    )
    .await;
}

async fn compare_signals(backend: Backend, test: &str) {
    let upstream = upstream().await;
    let Some((proxy, _pg)) = start_on(backend, test, &config(""), &upstream).await else {
        return;
    };
    // Baseline: 10 runs of A (tokens 1100, LLM $0.0026, tool $0.001, p95 $0.0036).
    runs_of(&proxy, "base", &[(10, A)]).await;
    // 1. Twice the tokens, no tool call, 7 runs: tokens and LLM cost per run
    //    +100%, tool −100%, burn rate +1.1% (stable).
    runs_of(&proxy, "s1", &[(7, shape("gpt-4o-mini", 2000, 200, 0))]).await;
    // 2. Three tool calls, 6 runs: tool +200%, cost per run +55.6%, LLM and
    //    tokens flat, burn rate −6.7%.
    runs_of(&proxy, "s2", &[(6, shape("gpt-4o-mini", 1000, 100, 3))]).await;
    // 3. Same tokens, more of them output (600/500), 7 runs: LLM +61.5%,
    //    tokens and tool flat, burn rate +1.1%.
    runs_of(&proxy, "s3", &[(7, shape("gpt-4o-mini", 600, 500, 1))]).await;
    // 4. Its own baseline with one $0.0041 run; head: 10 runs of a pricier
    //    model at $0.0041, no tool: burn +12.3% at the same run count, p95
    //    flat, tokens −2.2%, tool −100%.
    runs_of(
        &proxy,
        "s4-base",
        &[(9, A), (1, shape("gpt-4o-mini", 1250, 100, 1))],
    )
    .await;
    runs_of(
        &proxy,
        "s4",
        &[(10, shape("gpt-4o-2024-08-06", 1000, 100, 0))],
    )
    .await;
    // 5. Twice the runs, two of them tail runs ($0.00568): p95 +57.8%, burn
    //    +111.6%, per-run averages within 8%.
    runs_of(
        &proxy,
        "s5",
        &[(18, A), (2, shape("gpt-4o-mini", 1800, 180, 1))],
    )
    .await;
    proxy.state.ledger.as_ref().unwrap().flush();

    let cases = [
        ("base", "s1", "more_tokens_per_run"),
        ("base", "s2", "over_tooling"),
        ("base", "s3", "prompt_or_reasoning_regression"),
        ("s4-base", "s4", "unit_cost_regression"),
        ("base", "s5", "tail_runs_accelerating_spend"),
    ];
    for (base, head, expected) in cases {
        let report = api(&proxy, &format!("/api/compare?base={base}&head={head}")).await;
        assert_eq!(
            report["diagnosis"],
            serde_json::json!([expected]),
            "{base} → {head}: {report:#}"
        );
        let signals = report["signals"].as_array().unwrap();
        let names: Vec<&str> = signals
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, SIGNALS);
        for s in signals {
            assert_eq!(s["matched"], s["name"] == expected, "{head}: {s}");
            assert!(s["rule"].as_str().unwrap().contains("10%"), "{s}");
        }
    }

    // The figures and evidence of case 1, exactly.
    let report = api(&proxy, "/api/compare?base=base&head=s1&since=1h").await;
    let hours = 1.0;
    let base = &report["base"];
    assert_eq!(base["release"], "base");
    assert_eq!(base["runs"], 10);
    assert_close(&base["tokens_per_run"], 1100.0, "base tokens per run");
    assert_close(&base["llm_cost_per_run"], 0.0026, "base llm per run");
    assert_close(&base["tool_cost_per_run"], 0.001, "base tool per run");
    assert_close(&base["cost_per_run"], 0.0036, "base cost per run");
    assert_close(&base["cost_p95"], 0.0036, "base p95");
    assert_close(&base["retries_per_run"], 0.0, "base retries");
    assert_close(&base["calls_per_run"], 2.0, "base calls per run");
    assert_close(&base["burn_rate_usd_per_hour"], 0.036 / hours, "base burn");
    let head = &report["head"];
    assert_eq!(head["runs"], 7);
    assert_close(&head["tokens_per_run"], 2200.0, "head tokens per run");
    assert_close(&head["llm_cost_per_run"], 0.0052, "head llm per run");
    assert_close(&head["tool_cost_per_run"], 0.0, "head tool per run");
    assert_close(&head["calls_per_run"], 1.0, "head calls per run");
    assert_close(&head["burn_rate_usd_per_hour"], 0.0364, "head burn");
    let delta = &report["delta"];
    assert_eq!(delta["runs"], serde_json::json!({"abs": -3, "pct": -30.0}));
    assert_eq!(
        delta["tokens_per_run"],
        serde_json::json!({"abs": 1100.0, "pct": 100.0})
    );
    assert_close(&delta["tool_cost_per_run"]["pct"], -100.0, "tool pct");
    assert_close(&delta["cost_per_run"]["pct"], 44.44, "cost pct");
    assert_close(&delta["burn_rate_usd_per_hour"]["pct"], 1.11, "burn pct");
    assert_eq!(
        report["signals"][0]["evidence"],
        serde_json::json!({"tokens_per_run_pct": 100.0, "llm_cost_per_run_pct": 100.0})
    );
    assert_eq!(
        report["signals"][3]["evidence"],
        serde_json::json!({"burn_rate_usd_per_hour_pct": 1.11, "runs_pct": -30.0})
    );
    assert_eq!(report["threshold_pct"], 10.0);

    // Case 4's evidence: burn up at a stable run count.
    let report = api(&proxy, "/api/compare?base=s4-base&head=s4").await;
    assert_eq!(
        report["signals"][3]["evidence"],
        serde_json::json!({"burn_rate_usd_per_hour_pct": 12.33, "runs_pct": 0.0})
    );
    assert_eq!(
        report["signals"][4]["evidence"],
        serde_json::json!({"cost_p95_pct": 0.0, "burn_rate_usd_per_hour_pct": 12.33})
    );

    // A release with nothing in the window.
    let (status, body) = get(
        format!("http://{}/api/compare?base=base&head=nope", proxy.admin),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("head:"),
        "{body}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn compare_threshold_comes_from_the_config() {
    compare_threshold(Backend::Sqlite, "compare_threshold_comes_from_the_config").await;
}

#[tokio::test]
async fn compare_threshold_comes_from_the_config_on_postgres() {
    compare_threshold(
        Backend::Postgres,
        "compare_threshold_comes_from_the_config_on_postgres",
    )
    .await;
}

async fn compare_threshold(backend: Backend, test: &str) {
    let upstream = upstream().await;
    let config = config("[compare]\nthreshold_pct = 250\n");
    let Some((proxy, _pg)) = start_on(backend, test, &config, &upstream).await else {
        return;
    };
    runs_of(&proxy, "base", &[(10, A)]).await;
    runs_of(&proxy, "s2", &[(6, shape("gpt-4o-mini", 1000, 100, 3))]).await;
    proxy.state.ledger.as_ref().unwrap().flush();
    // Tool cost per run +200% is no longer "up" at 250%.
    let report = api(&proxy, "/api/compare?base=base&head=s2").await;
    assert_eq!(report["diagnosis"], serde_json::json!([]));
    assert_eq!(report["threshold_pct"], 250.0);
    assert!(report["signals"][1]["rule"]
        .as_str()
        .unwrap()
        .contains("250%"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_api_needs_the_admin_token_when_one_is_set() {
    const VAR: &str = "TOLLGATE_IT_API_TOKEN_5C81D";
    std::env::set_var(VAR, "s3cret-api-token");
    let upstream = upstream().await;
    let proxy = Proxy::start(
        &config(&format!("[admin]\ntoken_env = \"{VAR}\"\n")),
        &upstream.url(),
    )
    .await;
    for path in [
        "/api/runs",
        "/api/runs/r-1",
        "/api/segments",
        "/api/compare?base=a&head=b",
    ] {
        let url = format!("http://{}{path}", proxy.admin);
        let (status, _) = get(url.clone(), None).await;
        assert_eq!(status, 401, "{path} without a token");
        let (status, _) = get(url.clone(), Some("wrong")).await;
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    for (path, expected) in [
        ("/api/runs", 200),
        ("/api/segments", 200),
        ("/api/runs/r-1", 404),
        ("/api/compare?base=a&head=b", 404),
    ] {
        let (status, body) = get(
            format!("http://{}{path}", proxy.admin),
            Some("s3cret-api-token"),
        )
        .await;
        assert_eq!(status, expected, "{path} with the token: {body}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn bad_parameters_are_a_400_naming_the_parameter() {
    let upstream = upstream().await;
    let proxy = Proxy::start(&config(""), &upstream.url()).await;
    let cases = [
        ("/api/runs?sort=price", "sort"),
        ("/api/runs?limit=0", "limit"),
        ("/api/runs?limit=1001", "limit"),
        ("/api/runs?limit=ten", "limit"),
        ("/api/runs?offset=-1", "offset"),
        ("/api/runs?status=done", "status"),
        ("/api/runs?since=5y", "since"),
        ("/api/runs?until=yesterday", "until"),
        ("/api/runs?since=0h", "since"),
        ("/api/runs?colour=red", "colour"),
        ("/api/runs?limit=5&limit=6", "limit"),
        ("/api/runs/r-1?started_ms=soon", "started_ms"),
        ("/api/runs/r-1?limit=5000", "limit"),
        ("/api/segments?by=release,colour", "by"),
        ("/api/segments?by=", "by"),
        ("/api/segments?since=2026-13-01T00:00:00Z", "since"),
        ("/api/segments?since=1h&until=2h", "since"),
        ("/api/compare?head=x", "base"),
        ("/api/compare?base=x", "head"),
        ("/api/compare?base=x&head=y&since=7q", "since"),
    ];
    for (path, param) in cases {
        let (status, body) = get(format!("http://{}{path}", proxy.admin), None).await;
        assert_eq!(status, 400, "{path}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(param), "{path}: `{message}` names {param}");
    }
    proxy.shutdown().await;
}
