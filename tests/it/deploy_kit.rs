//! The deploy kit names only metrics that stockd exports: every `stockd_*`
//! metric in the Prometheus alerting rules and in the Grafana dashboard shows
//! up on the real binary's `/metrics` once it has served some traffic. (The
//! rules' syntax and behaviour are checked by `deploy/check` with promtool.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use stockd::pb;

use crate::support::process::Stockd;
use crate::support::*;

const ALERTS: &str = "deploy/prometheus/stockd-alerts.yml";
const DASHBOARD: &str = "deploy/grafana/stockd-dashboard.json";

/// The series a Prometheus histogram `X` exports: `X_bucket`, `X_sum`, `X_count`.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

fn read_kit_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// Every metric name of stockd's (`stockd_` and lower-case letters, digits,
/// underscores) that a text mentions. Settings such as `STOCKD_MAX_UNFLUSHED`
/// are upper-case and so not taken for metrics.
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_name_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("stockd_") {
        let start = from + found;
        let mut end = start + "stockd_".len();
        while end < bytes.len() && is_name_byte(bytes[end]) {
            end += 1;
        }
        let inside_a_word =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !inside_a_word {
            names.insert(text[start..end].to_owned());
        }
        from = end;
    }
    names
}

/// What a scrape exports: the names of its samples, and the families
/// declared as histograms by their `# TYPE` line.
#[derive(Debug, Default)]
struct Exported {
    samples: BTreeSet<String>,
    histograms: BTreeSet<String>,
}

impl Exported {
    fn parse(scrape: &str) -> Self {
        let mut exported = Self::default();
        for line in scrape.lines() {
            if let Some(declaration) = line.strip_prefix("# TYPE ") {
                if let [family, "histogram"] =
                    declaration.split_whitespace().collect::<Vec<_>>()[..]
                {
                    exported.histograms.insert(family.to_owned());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                exported.samples.insert(name.to_owned());
            }
        }
        exported
    }

    /// Does a query that names `name` find series? A histogram counts by
    /// its `_bucket`, `_sum` and `_count` series, not by its family name.
    fn has(&self, name: &str) -> bool {
        self.samples.contains(name)
            || HISTOGRAM_SUFFIXES.iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|family| self.histograms.contains(family))
            })
    }
}

async fn scrape(port: u16) -> Option<String> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?;
    response.text().await.ok()
}

/// Every query of the dashboard: the targets of its panels and the queries
/// of its template variables.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let panels = dashboard["panels"]
        .as_array()
        .expect("dashboard has panels");
    let mut queries: Vec<String> = panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "every target queries the dashboard's data source variable: {target}"
            );
            target["expr"]
                .as_str()
                .expect("a target has an expr")
                .to_owned()
        })
        .collect();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            queries.push(query.to_owned());
        }
    }
    queries
}

#[test]
fn metric_names_are_found_in_queries_and_settings_are_not() {
    let found = metric_names(
        "sum(rate(stockd_requests_total{code=\"Internal\"}[5m])) > 0.5 * STOCKD_MAX_UNFLUSHED \
         and histogram_quantile(0.99, rate(stockd_request_duration_seconds_bucket[5m])) # mystockd_x",
    );
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        [
            "stockd_request_duration_seconds_bucket",
            "stockd_requests_total"
        ]
    );
    let exported = Exported::parse(
        "# TYPE stockd_flush_batch_size histogram\n\
         stockd_requests_total{rpc=\"Reserve\",code=\"Ok\"} 3\n",
    );
    assert!(exported.has("stockd_requests_total"));
    assert!(exported.has("stockd_flush_batch_size_bucket"));
    assert!(
        !exported.has("stockd_flush_batch_size"),
        "a histogram family has no series of its own name"
    );
    assert!(!exported.has("stockd_requests"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_alerts_and_the_dashboard_is_exported() {
    let dashboard_text = read_kit_file(DASHBOARD);
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(
        queries.len() >= 10,
        "the dashboard has queries: {queries:?}"
    );

    // Each name with the files that use it, for the failure message.
    let mut used: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for name in metric_names(&read_kit_file(ALERTS)) {
        used.entry(name).or_default().insert(ALERTS);
    }
    for name in metric_names(&queries.join("\n")) {
        used.entry(name).or_default().insert(DASHBOARD);
    }
    for must in [
        "stockd_requests_total",
        "stockd_oldest_unflushed_age_seconds",
    ] {
        assert!(
            used.contains_key(must),
            "{must} not found in the kit: {used:?}"
        );
    }

    let namespace = unique_namespace("deploy-kit");
    let database = namespace.replace('-', "_");
    let leftovers = Leftovers::new(&namespace, &database);
    let metrics_port = free_port();
    let mut stockd = Stockd::start_with(
        &namespace,
        &postgres_url(&database),
        "deploy-kit",
        false,
        &[
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics_port}"),
            // The export series exist only with an exporter on.
            "--nats-url".into(),
            crate::support::brokers::nats_url(),
        ],
    )
    .await;

    // Series that exist only once something happened: a request (counts
    // and latencies), a change (a flush), a full reconcile.
    let rpc = stockd.clients();
    rpc.set("kit-seed", "kit", "", 5).await.unwrap();
    // The reconcile pages through Postgres: let the flusher write the item.
    eventually(Duration::from_secs(20), "the seed to be flushed", || {
        let rpc = rpc.clone();
        async move {
            let status = rpc.flush_status().await.ok()?;
            status
                .partitions
                .iter()
                .all(|p| p.pending == 0)
                .then_some(())
        }
    })
    .await;
    let report = rpc
        .reconcile_all(pb::ReconcileMode::Unspecified)
        .await
        .unwrap();
    assert_eq!(report.checked, 1, "{report:?}");

    // Gauges and flush histograms come from background tasks: poll.
    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let exported = Exported::parse(&scrape(metrics_port).await.unwrap_or_default());
        let missing: Vec<_> = used
            .iter()
            .filter(|(name, _)| !exported.has(name))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing
                .into_iter()
                .map(|(name, files)| format!("{name} (used in {files:?})"))
                .collect::<Vec<_>>();
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    assert!(
        missing.is_empty(),
        "metrics named in the deploy kit that stockd does not export (a typo, a renamed metric, \
         or one that appears only after an event this test does not cause: register it at zero, \
         or make this test cause it):\n  {}",
        missing.join("\n  ")
    );

    assert_eq!(stockd.terminate().await.code(), Some(0));
    crate::support::brokers::delete_nats_stream(&namespace).await;
    leftovers.remove().await;
}
