//! The Redis client: one connection manager (multiplexed, reconnecting by
//! itself), the four Lua scripts (EVALSHA, loaded again automatically after
//! a Redis restart), and the decoding of their replies. Every call is one
//! round trip bounded by `state.timeout_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Script, Value};
use arc_swap::ArcSwapOption;

use super::StateError;
use crate::money::Money;

const COMMON: &str = include_str!("common.lua");

/// A run's fields as the store holds them (`HGETALL`).
pub(crate) type RunFields = HashMap<String, String>;

/// What RESERVE answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reserved {
    Admitted {
        gen: u64,
        spent: Money,
        reserved: Money,
        ceiling: Money,
    },
    RunRefused {
        spent: Money,
        ceiling: Money,
    },
    /// `window`: index among the window keys passed.
    WindowRefused {
        window: usize,
        spent: Money,
        limit: Money,
    },
}

/// Arguments of RESERVE, in script order.
pub(crate) struct ReserveArgs<'a> {
    pub run_id: Option<&'a str>,
    pub reservation: Money,
    pub new_ceiling: Money,
    pub header_ceiling: Option<Money>,
    pub soft: bool,
    pub now_ms: u64,
    pub ttl_ms: u64,
    pub release: &'a str,
    pub request_type: &'a str,
    pub retry: bool,
    pub repeated: bool,
    /// (counter key, limit).
    pub windows: &'a [(String, Money)],
}

/// Arguments of SETTLE.
pub(crate) struct SettleArgs<'a> {
    pub run_id: Option<&'a str>,
    /// `None`: admitted while the store was unreachable.
    pub gen: Option<u64>,
    pub reservation: Money,
    pub cost: Money,
    pub tool: bool,
    pub failed: bool,
    pub now_ms: u64,
    pub ttl_ms: u64,
    pub reconcile: bool,
    pub ceiling: Money,
    pub release: &'a str,
    pub request_type: &'a str,
    /// (counter key, ttl ms).
    pub windows: &'a [(String, u64)],
}

struct Scripts {
    reserve: Script,
    settle: Script,
    end: Script,
    sweep: Script,
}

pub(crate) struct RedisStore {
    client: ::redis::Client,
    prefix: String,
    timeout: Duration,
    /// Set by the first successful connect; the manager reconnects by itself
    /// from then on.
    manager: ArcSwapOption<ConnectionManager>,
    connecting: tokio::sync::Mutex<()>,
    scripts: Scripts,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{COMMON}\n{body}"))
}

impl RedisStore {
    pub(crate) fn new(url: &str, prefix: &str, timeout: Duration) -> Result<RedisStore, String> {
        let client = ::redis::Client::open(url).map_err(|e| e.to_string())?;
        Ok(RedisStore {
            client,
            prefix: prefix.to_string(),
            timeout,
            manager: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            scripts: Scripts {
                reserve: script(include_str!("reserve.lua")),
                settle: script(include_str!("settle.lua")),
                end: script(include_str!("end.lua")),
                sweep: script(include_str!("sweep.lua")),
            },
        })
    }

    pub(crate) fn run_key(&self, run_id: &str) -> String {
        format!("{}run:{run_id}", self.prefix)
    }

    pub(crate) fn window_key(&self, cap: &str, period: u64) -> String {
        format!("{}win:{cap}:{period}", self.prefix)
    }

    fn gen_key(&self) -> String {
        format!("{}gen", self.prefix)
    }

    fn idle_key(&self) -> String {
        format!("{}idle", self.prefix)
    }

    /// The shared connection, connecting first if no connect succeeded yet
    /// (an unreachable Redis at start is not fatal).
    async fn connection(&self) -> Result<ConnectionManager, StateError> {
        if let Some(manager) = self.manager.load_full() {
            return Ok(ConnectionManager::clone(&manager));
        }
        let _one_connect = self.connecting.lock().await;
        if let Some(manager) = self.manager.load_full() {
            return Ok(ConnectionManager::clone(&manager));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1)
            .set_factor(10)
            .set_max_delay(500);
        let manager = ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .map_err(StateError::from)?;
        self.manager.store(Some(Arc::new(manager.clone())));
        Ok(manager)
    }

    /// Runs one script invocation within the timeout.
    async fn invoke(
        &self,
        invocation: &::redis::ScriptInvocation<'_>,
    ) -> Result<Value, StateError> {
        let call = async {
            let mut connection = self.connection().await?;
            invocation
                .invoke_async::<Value>(&mut connection)
                .await
                .map_err(StateError::from)
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StateError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    pub(crate) async fn ping(&self) -> Result<(), StateError> {
        let call = async {
            let mut connection = self.connection().await?;
            ::redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .map_err(StateError::from)
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(StateError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    pub(crate) async fn reserve(&self, args: &ReserveArgs<'_>) -> Result<Reserved, StateError> {
        let mut invocation = self.scripts.reserve.prepare_invoke();
        invocation
            .key(self.gen_key())
            .key(self.idle_key())
            .key(self.run_key(args.run_id.unwrap_or("")));
        for (key, _) in args.windows {
            invocation.key(key);
        }
        invocation
            .arg(args.run_id.unwrap_or(""))
            .arg(args.reservation.picos())
            .arg(args.new_ceiling.picos())
            .arg(
                args.header_ceiling
                    .map_or(String::new(), |c| c.picos().to_string()),
            )
            .arg(if args.soft { "soft" } else { "reserve" })
            .arg(args.now_ms)
            .arg(args.ttl_ms)
            .arg(args.release)
            .arg(args.request_type)
            .arg(u8::from(args.retry))
            .arg(u8::from(args.repeated));
        for (_, limit) in args.windows {
            invocation.arg(limit.picos());
        }
        let reply = strings(self.invoke(&invocation).await?)?;
        let [outcome, gen, spent, reserved, ceiling] = reply.as_slice() else {
            return Err(StateError::Reply(format!("RESERVE answered {reply:?}")));
        };
        let gen = number(gen)?;
        let (spent, reserved, ceiling) = (money(spent)?, money(reserved)?, money(ceiling)?);
        match outcome.as_str() {
            "admitted" => Ok(Reserved::Admitted {
                gen,
                spent,
                reserved,
                ceiling,
            }),
            "run" => Ok(Reserved::RunRefused { spent, ceiling }),
            "window" => Ok(Reserved::WindowRefused {
                window: usize::try_from(gen.saturating_sub(1)).unwrap_or(usize::MAX),
                spent,
                limit: ceiling,
            }),
            other => Err(StateError::Reply(format!("RESERVE outcome `{other}`"))),
        }
    }

    /// Returns the script's outcome word (`settled`, `reconciled`, `stale`,
    /// `windows`).
    pub(crate) async fn settle(&self, args: &SettleArgs<'_>) -> Result<String, StateError> {
        let mut invocation = self.scripts.settle.prepare_invoke();
        invocation
            .key(self.gen_key())
            .key(self.idle_key())
            .key(self.run_key(args.run_id.unwrap_or("")));
        for (key, _) in args.windows {
            invocation.key(key);
        }
        invocation
            .arg(args.run_id.unwrap_or(""))
            .arg(args.gen.map_or(String::new(), |g| g.to_string()))
            .arg(args.reservation.picos())
            .arg(args.cost.picos())
            .arg(if args.tool { "tool" } else { "llm" })
            .arg(u8::from(args.failed))
            .arg(args.now_ms)
            .arg(args.ttl_ms)
            .arg(if args.reconcile {
                "reconcile"
            } else {
                "settle"
            })
            .arg(args.ceiling.picos())
            .arg(args.release)
            .arg(args.request_type);
        for (_, ttl) in args.windows {
            invocation.arg(*ttl);
        }
        text(&self.invoke(&invocation).await?)
    }

    /// A run's fields (HGETALL), `None` when no replica holds it live.
    pub(crate) async fn run_fields(&self, run_id: &str) -> Result<Option<RunFields>, StateError> {
        let key = self.run_key(run_id);
        let call = async {
            let mut connection = self.connection().await?;
            ::redis::cmd("HGETALL")
                .arg(&key)
                .query_async::<RunFields>(&mut connection)
                .await
                .map_err(StateError::from)
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map(|fields| (!fields.is_empty()).then_some(fields)),
            Err(_) => Err(StateError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    /// Claims one run (explicit end, or idle with `idle`'s bounds); with
    /// `gen`, only that incarnation of it.
    pub(crate) async fn end(
        &self,
        run_id: &str,
        now_ms: u64,
        idle: Option<IdleBounds>,
        gen: Option<u64>,
    ) -> Result<Option<RunFields>, StateError> {
        let bounds = idle.unwrap_or(IdleBounds {
            idle_before: 0,
            stuck_before: 0,
        });
        let mut invocation = self.scripts.end.prepare_invoke();
        invocation
            .key(self.run_key(run_id))
            .key(self.idle_key())
            .arg(run_id)
            .arg(if idle.is_some() { "idle" } else { "explicit" })
            .arg(now_ms)
            .arg(bounds.idle_before)
            .arg(bounds.stuck_before)
            .arg(gen.map_or(String::new(), |g| g.to_string()));
        match self.invoke(&invocation).await? {
            Value::Nil => Ok(None),
            fields => Ok(Some(pairs(fields)?)),
        }
    }

    /// Claims up to `limit` idle runs: (run id, fields) of each.
    pub(crate) async fn sweep(
        &self,
        now_ms: u64,
        bounds: IdleBounds,
        limit: usize,
    ) -> Result<Vec<(String, RunFields)>, StateError> {
        let mut invocation = self.scripts.sweep.prepare_invoke();
        invocation
            .key(self.idle_key())
            .arg(self.run_key(""))
            .arg(now_ms)
            .arg(bounds.idle_before)
            .arg(bounds.stuck_before)
            .arg(limit);
        let Value::Array(items) = self.invoke(&invocation).await? else {
            return Err(StateError::Reply("SWEEP did not answer a list".into()));
        };
        let mut claimed = Vec::with_capacity(items.len() / 2);
        let mut items = items.into_iter();
        while let (Some(id), Some(fields)) = (items.next(), items.next()) {
            claimed.push((text(&id)?, pairs(fields)?));
        }
        Ok(claimed)
    }
}

/// Last-seen bounds of an idle claim (unix ms): a run is idle when last
/// seen at or before `idle_before` with no call in flight, or at or before
/// `stuck_before` whatever it has in flight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdleBounds {
    pub idle_before: u64,
    pub stuck_before: u64,
}

fn text(value: &Value) -> Result<String, StateError> {
    match value {
        Value::BulkString(bytes) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(n) => Ok(n.to_string()),
        Value::Okay => Ok("OK".into()),
        other => Err(StateError::Reply(format!(
            "expected a string, got {other:?}"
        ))),
    }
}

fn strings(value: Value) -> Result<Vec<String>, StateError> {
    match value {
        Value::Array(items) => items.iter().map(text).collect(),
        other => Err(StateError::Reply(format!("expected a list, got {other:?}"))),
    }
}

fn pairs(value: Value) -> Result<RunFields, StateError> {
    let items = strings(value)?;
    let mut fields = HashMap::with_capacity(items.len() / 2);
    let mut items = items.into_iter();
    while let (Some(k), Some(v)) = (items.next(), items.next()) {
        fields.insert(k, v);
    }
    Ok(fields)
}

pub(crate) fn number(text: &str) -> Result<u64, StateError> {
    text.parse()
        .map_err(|_| StateError::Reply(format!("`{text}` is not a count")))
}

/// Pico-dollars; a negative figure (only after a lost update) reads as zero.
pub(crate) fn money(text: &str) -> Result<Money, StateError> {
    if text.starts_with('-') {
        return Ok(Money::ZERO);
    }
    number(text).map(Money::from_picos)
}
