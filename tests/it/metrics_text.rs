//! Reading `/metrics` (Prometheus text format) in tests. A module of the
//! `it` test crate (re-exported by `support`) and, through
//! `#[path = "it/metrics_text.rs"]`, of `tests/demo.rs`.

/// The values of every series of `name` (matched exactly) in one metrics
/// text whose labels include each pair of `labels`, in text order.
pub fn series_values<'a>(
    text: &'a str,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(move |line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = metric == name
                && labels.iter().all(|(k, v)| {
                    label_text
                        .split(',')
                        .any(|pair| pair == format!("{k}=\"{v}\""))
                });
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
}

/// The sum of every series of `name` whose labels include each pair of
/// `labels`, over all of `texts` (e.g. the `/metrics` of several replicas).
pub fn metric_sum<T: AsRef<str>>(texts: &[T], name: &str, labels: &[(&str, &str)]) -> f64 {
    texts
        .iter()
        .flat_map(|text| series_values(text.as_ref(), name, labels))
        .sum()
}

#[test]
fn metric_sum_adds_every_matching_series_of_every_text() {
    let a = "# TYPE agent_run_total counter\n\
             agent_run_total{release=\"r1\",stop_reason=\"completed\"} 2\n\
             agent_run_total{release=\"r1\",stop_reason=\"idle_timeout\"} 3\n\
             agent_run_total{release=\"r2\",stop_reason=\"completed\"} 5\n\
             agent_run_total_extra{release=\"r1\"} 100\n";
    let b = "agent_run_total{release=\"r1\",stop_reason=\"completed\"} 7\n";
    assert_eq!(
        metric_sum(&[a], "agent_run_total", &[("release", "r1")]),
        5.0
    );
    assert_eq!(metric_sum(&[a], "agent_run_total", &[]), 10.0);
    assert_eq!(
        metric_sum(&[a, b], "agent_run_total", &[("release", "r1")]),
        12.0
    );
    assert_eq!(
        metric_sum(
            &[a, b],
            "agent_run_total",
            &[("release", "r1"), ("stop_reason", "completed")]
        ),
        9.0
    );
    assert_eq!(
        metric_sum(&[a], "agent_run_total", &[("release", "r3")]),
        0.0
    );
    assert_eq!(metric_sum(&[a], "agent_run", &[]), 0.0);
}
