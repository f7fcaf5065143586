//! The real binary: SIGHUP reloads (an invalid config keeps the old one),
//! and credentials never show up in logs, ledger, metrics or error bodies.

use std::process::Command;

use bytes::Bytes;

use crate::support::*;

const USAGE_BODY: &str = r#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":25,"completion_tokens":50,"total_tokens":75}}"#;

async fn metrics_of(admin: &str) -> String {
    let response = send(
        http::Request::get(format!("http://{admin}/metrics"))
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    String::from_utf8(body_bytes(response).await.to_vec()).unwrap()
}

fn signal(process: &Process, name: &str) {
    let pid = process.child.id().to_string();
    assert!(Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .unwrap()
        .success());
}

/// Waits (bounded) until the process has logged a line containing `text`.
async fn logged(process: &Process, text: &str) {
    for _ in 0..2000 {
        if process
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(text))
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("tollgate never logged `{text}`");
}

#[tokio::test]
async fn sighup_reloads_and_an_invalid_config_keeps_the_old_one() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path(), &upstream.url(), 50);
    let original = std::fs::read_to_string(&config).unwrap();
    let mut process = start_binary(&config);
    let call = || {
        post_json(
            format!("http://{}/openai/v1/chat/completions", process.agent),
            &[],
            r#"{"model":"gpt-4o-mini"}"#,
        )
    };
    assert_eq!(call().await.status(), 200);

    // An invalid config: refused with a logged reason, the old one serves.
    std::fs::write(&config, "[server]\nlisten = 7\n").unwrap();
    signal(&process, "HUP");
    logged(&process, "config reload refused").await;
    assert_eq!(call().await.status(), 200);
    assert!(process.child.try_wait().unwrap().is_none(), "still running");

    // A valid config without the openai route: applied without a restart.
    let without_openai = original.replacen("prefix = \"/openai\"", "prefix = \"/elsewhere\"", 1);
    std::fs::write(&config, without_openai).unwrap();
    signal(&process, "HUP");
    logged(&process, "config reloaded").await;
    assert_eq!(call().await.status(), 404);
    let metrics = metrics_of(&process.admin).await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_config_reloads_total",
            &[("result", "error")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "agent_config_reloads_total", &[("result", "ok")]),
        Some(1.0)
    );

    signal(&process, "TERM");
    assert!(process.wait_exit().success());
}

#[tokio::test]
async fn credentials_never_reach_logs_ledger_metrics_or_error_bodies() {
    let upstream = MockUpstream::start(|request| match request.uri.path() {
        "/v1/fail" => MockReply::json(
            500,
            r#"{"error":{"message":"upstream broke","type":"server_error"}}"#,
        ),
        _ => MockReply::json(200, USAGE_BODY),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path(), &upstream.url(), 20);
    let mut process = start_binary(&config);
    let secrets = [
        ("authorization", "Bearer sk-SECRET0openai0key"),
        ("x-api-key", "sk-ant-SECRET1anthropic1key"),
        ("x-goog-api-key", "AIzaSECRET2google2key"),
    ];
    let mut bodies = Vec::new();
    for (path, extra) in [
        ("/openai/v1/chat/completions", None),
        ("/openai/v1/fail", None),
        (
            "/openai/v1/chat/completions",
            Some(("x-agent-budget-usd", "0.000000001")),
        ),
        (
            "/openai/v1/chat/completions",
            Some(("x-agent-run-id", "bad id")),
        ),
        ("/nowhere", None),
        ("/anthropic/v1/messages", None),
        (
            "/gemini/v1beta/models/gemini-2.0-flash:generateContent",
            None,
        ),
    ] {
        let mut headers = secrets.to_vec();
        headers.push(("x-agent-run-id", "secret-test"));
        if let Some(extra) = extra {
            headers.retain(|(k, _)| *k != extra.0);
            headers.push(extra);
        }
        let response = post_json(
            format!("http://{}{path}", process.agent),
            &headers,
            r#"{"model":"gpt-4o-mini"}"#,
        )
        .await;
        bodies.push(String::from_utf8(body_bytes(response).await.to_vec()).unwrap());
    }
    // The keys did reach the upstream: tollgate forwards credentials.
    assert_eq!(
        upstream.last().headers["x-api-key"],
        "sk-ant-SECRET1anthropic1key"
    );
    let metrics = metrics_of(&process.admin).await;
    signal(&process, "TERM");
    assert!(process.wait_exit().success());

    let logs = process.logs.lock().unwrap().join("\n");
    let ledger = std::fs::read(dir.path().join("ledger.db")).unwrap();
    let ledger = String::from_utf8_lossy(&ledger);
    assert!(logs.contains("secret-test"), "the calls were logged");
    for (place, text) in [
        ("logs", logs.as_str()),
        ("ledger", &ledger),
        ("metrics", metrics.as_str()),
        ("error bodies", &bodies.join("\n")),
    ] {
        assert!(
            !text.contains("SECRET"),
            "a credential leaked into the {place}"
        );
    }
}
