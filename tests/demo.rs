//! `tollgate demo` end to end: the demo runs in-process on port-0 listeners
//! at high speed; once its first batch has ended (the `ready` signal, not a
//! sleep) the test reads `/metrics` and then stops it.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;

use tollgate::demo::fleet::{BASELINE, REGRESSED};
use tollgate::demo::{self, DemoOptions};

#[path = "it/metrics_text.rs"]
mod metrics_text;
use metrics_text::metric_sum;

async fn get(url: String) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client
        .request(
            http::Request::get(url)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("the admin listener answers");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

fn mean_run_cost(text: &str, release: &str) -> f64 {
    let sum = metric_sum(&[text], "agent_run_cost_usd_sum", &[("release", release)]);
    let count = metric_sum(&[text], "agent_run_cost_usd_count", &[("release", release)]);
    assert!(count > 0.0, "no run of {release} ended");
    sum / count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_shows_a_regressed_release_and_budgets_firing() {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let options = DemoOptions {
        agent_listen: local,
        admin_listen: local,
        runs: 16,
        speed: 50.0,
        concurrency: 8,
        ready: Some(ready_tx),
    };
    let demo = tokio::spawn(demo::run(options, async move {
        let _ = stop_rx.await;
    }));

    let summary = ready_rx.await.expect("the first batch ends");
    let (status, metrics) = get(format!("http://{}/metrics", summary.admin)).await;
    assert_eq!(status, 200);

    for release in [BASELINE, REGRESSED] {
        let runs = metric_sum(&[&metrics], "agent_run_total", &[("release", release)]);
        assert!(runs > 0.0, "agent_run_total for {release}:\n{metrics}");
    }
    let rejections = metric_sum(&[&metrics], "agent_budget_rejections_total", &[]);
    assert!(rejections > 0.0, "no budget rejection:\n{metrics}");
    for tool in ["web_search", "deep_research"] {
        let cost = metric_sum(&[&metrics], "agent_tool_cost_usd_total", &[("tool", tool)]);
        assert!(cost > 0.0, "no cost for {tool}:\n{metrics}");
    }
    let (baseline, regressed) = (
        mean_run_cost(&metrics, BASELINE),
        mean_run_cost(&metrics, REGRESSED),
    );
    assert!(
        regressed > baseline,
        "regressed mean run cost {regressed} is not above the baseline's {baseline}"
    );
    let retries = metric_sum(
        &[&metrics],
        "agent_retries_total",
        &[("release", REGRESSED)],
    );
    assert!(retries > 0.0, "no retries for {REGRESSED}:\n{metrics}");
    assert_eq!(
        metric_sum(&[&metrics], "agent_unpriced_calls_total", &[]),
        0.0,
        "every simulated model has a price"
    );

    // The printed summary matches what tollgate measured, and the URL it
    // prints for the costliest live run resolves.
    assert_eq!(
        summary.releases.iter().map(|s| s.runs).sum::<usize>(),
        16,
        "{}",
        summary.text
    );
    let stats = |release: &str| {
        summary
            .releases
            .iter()
            .find(|s| s.release == release)
            .cloned()
            .unwrap()
    };
    for (release, measured) in [(BASELINE, baseline), (REGRESSED, regressed)] {
        let printed = stats(release).mean_cost_usd;
        assert!(
            (printed - measured).abs() < 1e-6,
            "{release}: summary says {printed}, /metrics says {measured}"
        );
    }
    assert!(summary
        .text
        .contains(&format!("http://{}/metrics", summary.admin)));
    assert!(summary
        .text
        .contains(&format!("http://{}/openai/v1", summary.agent)));
    // Every URL the summary prints answers; the ledger was flushed before
    // the summary, so the finished runs are there.
    for line in summary.text.lines() {
        let Some(url) = line.trim().strip_prefix("http://") else {
            continue;
        };
        let (status, body) = get(format!("http://{url}")).await;
        assert_eq!(status, 200, "{url}: {body}");
    }
    let costliest = summary.costliest.clone().expect("a costliest run");
    let (_, body) = get(format!(
        "http://{}/api/runs/{}",
        summary.admin, costliest.run_id
    ))
    .await;
    let record: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(record["run"]["status"], costliest.status, "{body}");
    let recorded = record["run"]["cost_usd"].as_f64().unwrap();
    assert!((recorded - costliest.cost_usd).abs() < 1e-9, "{body}");
    if let Some((id, _)) = &summary.runaway {
        let url = format!("http://{}/api/runs/{id}", summary.admin);
        assert!(summary.text.contains(&url));
        let (status, body) = get(url).await;
        assert_eq!(status, 200, "{body}");
    }

    stop_tx.send(()).unwrap();
    let report = demo.await.unwrap().expect("the demo stops cleanly");
    assert_eq!(report.batch.len(), 16);
    for outcome in &report.batch {
        println!("{outcome:?}");
    }
}
