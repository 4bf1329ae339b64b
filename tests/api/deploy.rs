//! What `deploy/` ships stays in step with the gateway: every metric the Grafana dashboard and
//! the Prometheus alert rules query is one the gateway exports.
//!
//! Labelled families (decisions, webhooks, Redis errors…) appear on `/metrics` only after their
//! first use, so the reference is `Metrics::names()`, every family the registry holds; the test
//! also scrapes a running gateway to check that list against what `/metrics` really shows.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::helpers::{TestOptions, proxy_settings, spawn_app_with, spawn_upstream};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `quota_gateway_*` and `process_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for prefix in ["quota_gateway_", "process_"] {
        let mut rest = text;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().next_back();
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                found.insert(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    found
}

/// Every `expr` string of a Grafana dashboard, however deeply nested.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// Is `name` exported, directly or as a histogram's `_bucket`/`_sum`/`_count` series?
fn exported(name: &str, families: &BTreeSet<String>) -> bool {
    families.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|base| families.contains(base))
        })
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    let up = spawn_upstream().await;
    let app = spawn_app_with(TestOptions {
        proxy: Some(proxy_settings(up.addr)),
        ..Default::default()
    })
    .await;
    let families: BTreeSet<String> = app.state.metrics.names().iter().cloned().collect();

    // Use the gateway a little (a check, a proxied request) so some labelled families
    // show up, then compare the scrape with the registry's list.
    app.check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    let (_, key) = app.create_key("acme").await;
    assert_eq!(app.proxy_get("/tiny", &key).await.status(), 200);
    let scrape = app.get("/metrics").await.text().await.unwrap();
    let scraped: BTreeSet<String> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(
        scraped.contains("quota_gateway_decisions_total"),
        "{scrape}"
    );
    let unlisted: Vec<&String> = scraped.difference(&families).collect();
    assert!(
        unlisted.is_empty(),
        "/metrics shows families Metrics::names() does not list: {unlisted:?}"
    );

    let dashboard_path = repo().join("deploy/grafana/quota-gateway.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let queried_by_dashboard = metric_names(&exprs.join("\n"));
    // The rules file: expressions and runbook text alike name only real metrics.
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let queried_by_alerts = metric_names(&alerts);
    assert!(queried_by_dashboard.len() > 20, "{queried_by_dashboard:?}");
    assert!(queried_by_alerts.len() > 5, "{queried_by_alerts:?}");

    for (file, names) in [
        ("deploy/grafana/quota-gateway.json", &queried_by_dashboard),
        ("deploy/prometheus/alerts.yml", &queried_by_alerts),
    ] {
        let unknown: Vec<&String> = names.iter().filter(|n| !exported(n, &families)).collect();
        assert!(
            unknown.is_empty(),
            "{file} queries metrics the gateway does not export: {unknown:?}\nexported: {families:?}"
        );
    }
}

#[test]
fn metric_names_are_found_in_expressions_and_prose() {
    let names = metric_names(
        "sum(rate(quota_gateway_decisions_total{x=\"y\"}[5m])) / process_open_fds, \
         not my_quota_gateway_thing; see quota_gateway_degraded.",
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "process_open_fds",
            "quota_gateway_decisions_total",
            "quota_gateway_degraded"
        ]
    );
}
