//! The simulated agent fleet: runs of two releases calling tollgate like
//! real agents do, through the project's own HTTP client stack.
//!
//! A run is a planned sequence of steps (LLM calls on both providers,
//! streamed or not; `web_search` and `deep_research` tool calls). Every call
//! carries the attribution headers; the last one says how the run ended.
//! The baseline release `2026-11-01` is lean. The regressed release
//! `2026-11-15` ships a longer system prompt, reasoning models and extended
//! thinking (more output tokens per call), hits provider errors that its
//! SDK retries (`x-stainless-retry-count`), and routes research through
//! the pricier `deep_research` tool. A call refused with 402 stops the run;
//! the agent then ends it through `POST /api/runs/{id}/finish` (or, in the
//! background trickle, simply goes away and the idle timeout ends it).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use super::provider::FAIL_HEADER;
use super::rng::{words, Rng};
use crate::proxy::RUN_COST_HEADER;

pub const BASELINE: &str = "2026-11-01";
pub const REGRESSED: &str = "2026-11-15";
pub const RELEASES: [&str; 2] = [BASELINE, REGRESSED];

/// Ceiling the runaway run asks for with `x-agent-budget-usd`.
pub const RUNAWAY_BUDGET_USD: f64 = 1.0;

/// Longest a single call may take before the agent gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts per LLM call (the first plus SDK retries).
const MAX_ATTEMPTS: u32 = 3;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    Support,
    Research,
}

impl RequestType {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestType::Support => "support",
            RequestType::Research => "research",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone)]
struct LlmCall {
    provider: Provider,
    model: &'static str,
    stream: bool,
    /// Ask for the usage chunk ourselves (else tollgate asks and strips it).
    include_usage: bool,
    max_tokens: Option<u64>,
    reasoning_effort: Option<&'static str>,
    thinking_budget: Option<u64>,
    /// The first attempt fails with a provider 500.
    fails_once: bool,
}

#[derive(Debug, Clone)]
enum Step {
    Llm(LlmCall),
    /// `n` concurrent `web_search` calls.
    Search {
        n: usize,
        fails: bool,
    },
    Research {
        fails: bool,
    },
}

/// How a planned run means to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Completed,
    ToolError,
    MaxSteps,
}

/// One run, planned up front from its seed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub run_id: String,
    pub release: &'static str,
    pub request_type: RequestType,
    steps: Vec<Step>,
    ending: Ending,
    system: String,
    task: String,
    seed: u64,
}

/// How a run ended, as the agent saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub run_id: String,
    pub release: &'static str,
    pub request_type: &'static str,
    /// `ok` or `error`, as `agent_run_total{status}` counts it.
    pub status: &'static str,
    pub stop_reason: &'static str,
    /// The run's settled spend, from tollgate's cost header or run API.
    pub cost_usd: f64,
    /// Calls tollgate admitted (refused calls not included).
    pub calls: u32,
    pub refused: bool,
    /// SDK retries after provider errors.
    pub retries: u32,
    /// The run was left for the idle timeout to end.
    pub abandoned: bool,
}

/// Where the fleet sends its traffic.
#[derive(Clone)]
pub struct Fleet {
    client: HttpClient,
    /// `http://host:port` of the agent listener.
    agent: String,
    /// `http://host:port` of the admin listener.
    admin: String,
    speed: f64,
}

/// The plan of run number `index` (the same on every machine).
pub fn plan(index: u64) -> Plan {
    let release = RELEASES[(index % 2) as usize];
    let request_type = if (index / 2).is_multiple_of(2) {
        RequestType::Support
    } else {
        RequestType::Research
    };
    let run_id = format!("{}-{release}-{index:03}", request_type.as_str());
    build_plan(
        run_id,
        release,
        request_type,
        0x7011_6a7e ^ index.wrapping_mul(0x9E37),
    )
}

/// The plan of the runaway: a regressed research run with a raised ceiling
/// whose steps never converge.
pub fn runaway_plan(generation: u64) -> Plan {
    let mut plan = build_plan(
        "research-2026-11-15-runaway".to_string(),
        REGRESSED,
        RequestType::Research,
        0xbad_5eed ^ generation,
    );
    // Its steps repeat until the ceiling stops it; no planned ending.
    plan.steps
        .retain(|s| !matches!(s, Step::Search { fails: true, .. }));
    plan
}

fn build_plan(run_id: String, release: &'static str, request_type: RequestType, seed: u64) -> Plan {
    let mut rng = Rng::new(seed);
    let regressed = release == REGRESSED;
    let fail_p = if regressed { 0.35 } else { 0.0 };
    let llm = |rng: &mut Rng, provider, model: &'static str, reasoning: bool| {
        let stream = rng.chance(0.5);
        let (reasoning_effort, thinking_budget, max_tokens) = match (provider, reasoning) {
            (Provider::OpenAi, true) => (Some("high"), None, None),
            (Provider::OpenAi, false) => (None, None, Some(1_000)),
            // Haiku answers support tickets: a smaller thinking budget.
            (Provider::Anthropic, true) if model == "claude-haiku-4-5" => {
                (None, Some(1_024), Some(2_048))
            }
            (Provider::Anthropic, true) => (None, Some(2_048), Some(3_000)),
            (Provider::Anthropic, false) => (None, None, Some(1_000)),
        };
        Step::Llm(LlmCall {
            provider,
            model,
            stream,
            include_usage: stream && rng.chance(0.5),
            max_tokens,
            reasoning_effort,
            thinking_budget,
            fails_once: rng.chance(fail_p),
        })
    };
    let mut steps = Vec::new();
    match (request_type, regressed) {
        (RequestType::Support, false) => {
            steps.push(llm(&mut rng, Provider::OpenAi, "gpt-4.1-mini", false));
            steps.push(Step::Search { n: 1, fails: false });
            for _ in 0..rng.range(0, 2) {
                steps.push(llm(&mut rng, Provider::OpenAi, "gpt-4.1-mini", false));
            }
            steps.push(llm(
                &mut rng,
                Provider::Anthropic,
                "claude-haiku-4-5",
                false,
            ));
        }
        (RequestType::Support, true) => {
            steps.push(llm(&mut rng, Provider::OpenAi, "gpt-5-mini", true));
            steps.push(Step::Search { n: 1, fails: false });
            for _ in 0..rng.range(1, 3) {
                steps.push(llm(&mut rng, Provider::OpenAi, "gpt-5-mini", true));
            }
            steps.push(Step::Search { n: 1, fails: false });
            steps.push(llm(&mut rng, Provider::Anthropic, "claude-haiku-4-5", true));
        }
        (RequestType::Research, false) => {
            steps.push(llm(
                &mut rng,
                Provider::Anthropic,
                "claude-sonnet-4-5",
                false,
            ));
            steps.push(Step::Search { n: 2, fails: false });
            steps.push(llm(&mut rng, Provider::OpenAi, "gpt-4.1-mini", false));
            for _ in 0..rng.range(0, 2) {
                steps.push(Step::Search { n: 1, fails: false });
                steps.push(llm(&mut rng, Provider::OpenAi, "gpt-4.1-mini", false));
            }
            steps.push(llm(
                &mut rng,
                Provider::Anthropic,
                "claude-sonnet-4-5",
                false,
            ));
        }
        (RequestType::Research, true) => {
            steps.push(llm(
                &mut rng,
                Provider::Anthropic,
                "claude-sonnet-4-5",
                true,
            ));
            steps.push(Step::Search { n: 2, fails: false });
            steps.push(Step::Research { fails: false });
            steps.push(llm(&mut rng, Provider::OpenAi, "gpt-5", true));
            for _ in 0..rng.range(0, 2) {
                steps.push(Step::Research { fails: false });
                steps.push(llm(&mut rng, Provider::OpenAi, "gpt-5", true));
            }
            steps.push(llm(
                &mut rng,
                Provider::Anthropic,
                "claude-sonnet-4-5",
                true,
            ));
        }
    }
    // The last call gives the answer, so it is never planned to fail, and it
    // is not streamed: its response headers then carry the run's final cost.
    if let Some(Step::Llm(last)) = steps.last_mut() {
        last.fails_once = false;
        last.stream = false;
        last.include_usage = false;
    }
    let roll = rng.unit();
    let ending = if roll < 0.08 {
        Ending::ToolError
    } else if regressed && roll < 0.2 {
        Ending::MaxSteps
    } else {
        Ending::Completed
    };
    if ending == Ending::ToolError {
        // A tool call fails for good and the agent gives up after it.
        if let Some(i) = steps.iter().position(|s| matches!(s, Step::Search { .. })) {
            steps[i] = Step::Search { n: 1, fails: true };
            let last = steps.len() - 1;
            steps.drain(i + 1..last);
        }
    }
    let system = system_prompt(release, request_type);
    let task_words = rng.range(40, 120);
    let task = words(&mut rng, task_words);
    Plan {
        run_id,
        release,
        request_type,
        steps,
        ending,
        system,
        task,
        seed,
    }
}

/// Instructions and tool schemas; the regressed release's prompt is longer.
fn system_prompt(release: &str, request_type: RequestType) -> String {
    // Shared by every run of a release and type, so providers cache it.
    let mut rng = Rng::new(
        super::rng::hash_bytes(0, release.as_bytes()) ^ request_type.as_str().len() as u64,
    );
    let n = if release == REGRESSED { 1_400 } else { 350 };
    format!(
        "You are a {} agent (release {release}). Use the tools when needed. {}",
        request_type.as_str(),
        words(&mut rng, n)
    )
}

/// What one call returned.
struct Reply {
    status: StatusCode,
    /// `x-agent-run-cost-usd`.
    run_cost: Option<f64>,
    body: Bytes,
}

impl Fleet {
    pub fn new(agent: String, admin: String, speed: f64) -> Fleet {
        Fleet {
            client: Client::builder(TokioExecutor::new()).build_http(),
            agent,
            admin,
            speed,
        }
    }

    fn pause(&self, rng: &mut Rng, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_secs_f64(rng.range(lo_ms, hi_ms) as f64 / 1000.0 / self.speed)
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Reply, String> {
        let response = tokio::time::timeout(CALL_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| "call timed out".to_string())?
            .map_err(|e| format!("call failed: {e}"))?;
        let status = response.status();
        let run_cost = response
            .headers()
            .get(RUN_COST_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok());
        let body = tokio::time::timeout(CALL_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| "response body timed out".to_string())?
            .map_err(|e| format!("response body failed: {e}"))?
            .to_bytes();
        Ok(Reply {
            status,
            run_cost,
            body,
        })
    }

    /// Executes a planned run to its end.
    pub async fn run(&self, plan: &Plan, abandon_on_refusal: bool) -> RunOutcome {
        let mut agent = Agent::new(self, plan, None);
        let result = agent.execute(plan).await;
        self.conclude(agent, plan, result, abandon_on_refusal).await
    }

    async fn conclude(
        &self,
        agent: Agent<'_>,
        plan: &Plan,
        result: StepsResult,
        abandon_on_refusal: bool,
    ) -> RunOutcome {
        let mut outcome = RunOutcome {
            run_id: plan.run_id.clone(),
            release: plan.release,
            request_type: plan.request_type.as_str(),
            status: "ok",
            stop_reason: "completed",
            cost_usd: agent.last_cost,
            calls: agent.calls,
            refused: false,
            retries: agent.retries,
            abandoned: false,
        };
        match result {
            StepsResult::Ended { status, reason } => {
                outcome.status = status;
                outcome.stop_reason = reason;
            }
            StepsResult::Refused => {
                outcome.refused = true;
                outcome.status = "error";
                outcome.stop_reason = "budget_exceeded";
                if abandon_on_refusal {
                    outcome.abandoned = true;
                } else {
                    outcome.cost_usd = self
                        .finish(&plan.run_id, "error", "budget_exceeded")
                        .await
                        .unwrap_or(agent.last_cost);
                }
            }
            StepsResult::Failed => {
                outcome.status = "error";
                outcome.stop_reason = "llm_error";
                outcome.cost_usd = self
                    .finish(&plan.run_id, "error", "llm_error")
                    .await
                    .unwrap_or(agent.last_cost);
            }
        }
        outcome
    }

    /// The spend of a run, from `GET /api/runs/{id}`.
    pub async fn run_spent(&self, run_id: &str) -> Option<f64> {
        let request = Request::get(format!("{}/api/runs/{run_id}", self.admin))
            .body(Full::new(Bytes::new()))
            .ok()?;
        let reply = self.send(request).await.ok()?;
        if !reply.status.is_success() {
            return None;
        }
        serde_json::from_slice::<Value>(&reply.body)
            .ok()?
            .pointer("/run/cost_usd")?
            .as_f64()
    }

    /// Reads the run's spend, then ends it through the admin API
    /// (`POST /api/runs/{id}/finish`). No call of the run is in flight, so
    /// the spend read is the run's final cost.
    async fn finish(&self, run_id: &str, status: &str, reason: &str) -> Option<f64> {
        let spent = self.run_spent(run_id).await;
        let body = json!({"status": status, "stop_reason": reason}).to_string();
        if let Ok(request) = Request::post(format!("{}/api/runs/{run_id}/finish", self.admin))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
        {
            let _ = self.send(request).await;
        }
        spent
    }

    /// The runaway: a regressed research run with a raised ceiling that
    /// keeps stepping, one step every `interval`, until its ceiling refuses
    /// it; then it is ended and starts over under the same id. Runs until
    /// the task is dropped.
    pub async fn runaway(&self, interval: Duration) {
        let mut generation = 0u64;
        loop {
            let plan = runaway_plan(generation);
            let mut agent = Agent::new(self, &plan, Some(RUNAWAY_BUDGET_USD));
            let mut index = 0usize;
            loop {
                let step = &plan.steps[index % plan.steps.len().saturating_sub(1).max(1)];
                index += 1;
                match agent.step(step, false, Ending::Completed).await {
                    StepResult::Done => {}
                    StepResult::Refused => {
                        let _ = self.finish(&plan.run_id, "error", "budget_exceeded").await;
                        break;
                    }
                    StepResult::Failed => {}
                }
                tokio::time::sleep(interval).await;
            }
            generation += 1;
        }
    }
}

enum StepsResult {
    Ended {
        status: &'static str,
        reason: &'static str,
    },
    Refused,
    Failed,
}

enum StepResult {
    Done,
    Refused,
    Failed,
}

/// One run in progress: its conversation so far and its counters.
struct Agent<'f> {
    fleet: &'f Fleet,
    run_id: String,
    release: &'static str,
    request_type: &'static str,
    budget: Option<f64>,
    system: String,
    /// `(role, content)`, oldest first.
    history: Vec<(&'static str, String)>,
    rng: Rng,
    calls: u32,
    retries: u32,
    /// The run's spend as the last response reported it.
    last_cost: f64,
}

impl<'f> Agent<'f> {
    fn new(fleet: &'f Fleet, plan: &Plan, budget: Option<f64>) -> Agent<'f> {
        Agent {
            fleet,
            run_id: plan.run_id.clone(),
            release: plan.release,
            request_type: plan.request_type.as_str(),
            budget,
            system: plan.system.clone(),
            history: vec![("user", plan.task.clone())],
            rng: Rng::new(plan.seed ^ 0x5eed),
            calls: 0,
            retries: 0,
            last_cost: 0.0,
        }
    }

    async fn execute(&mut self, plan: &Plan) -> StepsResult {
        let mut tool_failed = false;
        for (i, step) in plan.steps.iter().enumerate() {
            let last = i + 1 == plan.steps.len();
            let ending = if tool_failed {
                Ending::ToolError
            } else {
                plan.ending
            };
            match self.step(step, last, ending).await {
                StepResult::Done => {}
                StepResult::Refused => return StepsResult::Refused,
                StepResult::Failed if matches!(step, Step::Llm(_)) => return StepsResult::Failed,
                // A failed tool: the agent reports it in its final answer.
                StepResult::Failed => tool_failed = true,
            }
            if !last {
                let pause = self.fleet.pause(&mut self.rng, 50, 250);
                tokio::time::sleep(pause).await;
            }
        }
        match if tool_failed {
            Ending::ToolError
        } else {
            plan.ending
        } {
            Ending::Completed => StepsResult::Ended {
                status: "ok",
                reason: "completed",
            },
            Ending::ToolError => StepsResult::Ended {
                status: "error",
                reason: "tool_error",
            },
            Ending::MaxSteps => StepsResult::Ended {
                status: "error",
                reason: "max_steps",
            },
        }
    }

    fn attribution(&self, builder: http::request::Builder) -> http::request::Builder {
        let mut builder = builder
            .header("content-type", "application/json")
            .header("x-agent-run-id", &self.run_id)
            .header("x-agent-release", self.release)
            .header("x-agent-request-type", self.request_type);
        if let Some(budget) = self.budget {
            builder = builder.header("x-agent-budget-usd", format!("{budget:.2}"));
        }
        builder
    }

    async fn step(&mut self, step: &Step, last: bool, ending: Ending) -> StepResult {
        match step {
            Step::Llm(call) => self.llm(call, last, ending).await,
            Step::Search { n, fails } => {
                let queries: Vec<String> = (0..*n)
                    .map(|_| {
                        let k = self.rng.range(4, 9);
                        words(&mut self.rng, k)
                    })
                    .collect();
                let calls = queries
                    .iter()
                    .map(|q| self.tool("/tools/search", q, *fails));
                let results = futures_util::future::join_all(calls).await;
                let mut outcome = StepResult::Done;
                for result in results {
                    match result {
                        ToolResult::Ok(body) => {
                            self.calls += 1;
                            self.history.push(("user", body));
                        }
                        ToolResult::Refused => outcome = StepResult::Refused,
                        ToolResult::Failed => {
                            self.calls += 1;
                            if !matches!(outcome, StepResult::Refused) {
                                outcome = StepResult::Failed;
                            }
                        }
                    }
                }
                outcome
            }
            Step::Research { fails } => {
                let k = self.rng.range(6, 12);
                let query = words(&mut self.rng, k);
                match self.tool("/tools/research", &query, *fails).await {
                    ToolResult::Ok(body) => {
                        self.calls += 1;
                        self.history.push(("user", body));
                        StepResult::Done
                    }
                    ToolResult::Refused => StepResult::Refused,
                    ToolResult::Failed => {
                        self.calls += 1;
                        StepResult::Failed
                    }
                }
            }
        }
    }

    async fn tool(&self, path: &str, query: &str, fails: bool) -> ToolResult {
        let mut builder = self.attribution(Request::post(format!("{}{path}", self.fleet.agent)));
        if fails {
            builder = builder.header(FAIL_HEADER, "502");
        }
        let body = json!({"query": query}).to_string();
        let Ok(request) = builder.body(Full::new(Bytes::from(body))) else {
            return ToolResult::Failed;
        };
        match self.fleet.send(request).await {
            Ok(reply) if reply.status == StatusCode::PAYMENT_REQUIRED => ToolResult::Refused,
            Ok(reply) if reply.status.is_success() => {
                ToolResult::Ok(String::from_utf8_lossy(&reply.body).into_owned())
            }
            _ => ToolResult::Failed,
        }
    }

    fn llm_body(&self, call: &LlmCall) -> Value {
        match call.provider {
            Provider::OpenAi => {
                let mut messages = vec![json!({"role": "system", "content": self.system})];
                messages.extend(
                    self.history
                        .iter()
                        .map(|(role, content)| json!({"role": role, "content": content})),
                );
                let mut body = json!({"model": call.model, "messages": messages});
                if call.stream {
                    body["stream"] = json!(true);
                    if call.include_usage {
                        body["stream_options"] = json!({"include_usage": true});
                    }
                }
                if let Some(max) = call.max_tokens {
                    body["max_completion_tokens"] = json!(max);
                }
                if let Some(effort) = call.reasoning_effort {
                    body["reasoning_effort"] = json!(effort);
                }
                body
            }
            Provider::Anthropic => {
                let messages: Vec<Value> = self
                    .history
                    .iter()
                    .map(|(role, content)| json!({"role": role, "content": content}))
                    .collect();
                let mut body = json!({
                    "model": call.model,
                    "max_tokens": call.max_tokens.unwrap_or(1_024),
                    "system": [{"type": "text", "text": self.system, "cache_control": {"type": "ephemeral"}}],
                    "messages": messages,
                });
                if call.stream {
                    body["stream"] = json!(true);
                }
                if let Some(budget) = call.thinking_budget {
                    body["thinking"] = json!({"type": "enabled", "budget_tokens": budget});
                }
                body
            }
        }
    }

    async fn llm(&mut self, call: &LlmCall, last: bool, ending: Ending) -> StepResult {
        let (path, auth) = match call.provider {
            Provider::OpenAi => ("/openai/v1/chat/completions", "authorization"),
            Provider::Anthropic => ("/anthropic/v1/messages", "x-api-key"),
        };
        let body = Bytes::from(self.llm_body(call).to_string());
        for attempt in 0..MAX_ATTEMPTS {
            let mut builder = self
                .attribution(Request::post(format!("{}{path}", self.fleet.agent)))
                .header(auth, "demo-key-not-checked")
                .header("x-stainless-retry-count", attempt.to_string());
            if call.provider == Provider::Anthropic {
                builder = builder.header("anthropic-version", "2023-06-01");
            }
            if call.fails_once && attempt == 0 {
                builder = builder.header(FAIL_HEADER, "500");
            }
            if last {
                let (status, reason) = match ending {
                    Ending::Completed => ("completed", None),
                    Ending::ToolError => ("error", Some("tool_error")),
                    Ending::MaxSteps => ("error", Some("max_steps")),
                };
                builder = builder.header("x-agent-run-status", status);
                if let Some(reason) = reason {
                    builder = builder.header("x-agent-stop-reason", reason);
                }
            }
            let Ok(request) = builder.body(Full::new(body.clone())) else {
                return StepResult::Failed;
            };
            let reply = match self.fleet.send(request).await {
                Ok(reply) => reply,
                Err(_) => return StepResult::Failed,
            };
            if let Some(cost) = reply.run_cost {
                self.last_cost = self.last_cost.max(cost);
            }
            if reply.status == StatusCode::PAYMENT_REQUIRED {
                return StepResult::Refused;
            }
            self.calls += 1;
            if attempt > 0 {
                self.retries += 1;
            }
            if reply.status.is_success() {
                let text = assistant_text(&reply.body);
                self.history.push(("assistant", text));
                return StepResult::Done;
            }
            if !reply.status.is_server_error() || attempt + 1 == MAX_ATTEMPTS {
                return StepResult::Failed;
            }
            // SDK-style backoff before the retry.
            let backoff = self.fleet.pause(&mut self.rng, 200, 500);
            tokio::time::sleep(backoff).await;
        }
        StepResult::Failed
    }
}

enum ToolResult {
    Ok(String),
    Refused,
    Failed,
}

/// The assistant's text from a JSON response or an SSE stream of either
/// provider.
fn assistant_text(body: &Bytes) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        if let Some(text) = value
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
        {
            return text.to_string();
        }
        if let Some(content) = value.get("content").and_then(Value::as_array) {
            return content
                .iter()
                .filter_map(|block| block.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("");
        }
        return String::new();
    }
    let mut out = String::new();
    for line in String::from_utf8_lossy(body).lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(text) = event
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            out.push_str(text);
        } else if let Some(text) = event.pointer("/delta/text").and_then(Value::as_str) {
            out.push_str(text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_alternate_releases_and_types() {
        let kinds: Vec<(&str, RequestType)> = (0..4)
            .map(plan)
            .map(|p| (p.release, p.request_type))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (BASELINE, RequestType::Support),
                (REGRESSED, RequestType::Support),
                (BASELINE, RequestType::Research),
                (REGRESSED, RequestType::Research),
            ]
        );
    }

    #[test]
    fn the_last_step_is_a_plain_llm_call() {
        for i in 0..200 {
            let p = plan(i);
            assert!((3..=9).contains(&p.steps.len()), "{} steps", p.steps.len());
            match p.steps.last() {
                Some(Step::Llm(call)) => assert!(!call.stream && !call.fails_once),
                other => panic!("run {i} ends with {other:?}"),
            }
        }
    }

    #[test]
    fn text_comes_out_of_every_shape() {
        let openai = Bytes::from_static(br#"{"choices":[{"message":{"content":"hi"}}]}"#);
        assert_eq!(assistant_text(&openai), "hi");
        let anthropic = Bytes::from_static(br#"{"content":[{"type":"text","text":"yo"}]}"#);
        assert_eq!(assistant_text(&anthropic), "yo");
        let sse = Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"delta\":{\"type\":\"text_delta\",\"text\":\"b\"}}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(assistant_text(&sse), "ab");
    }
}
