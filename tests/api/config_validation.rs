//! Invalid configuration stops start-up with file, key and reason; one fixture per mistake in
//! `tests/fixtures/config/`.

use std::path::PathBuf;
use std::process::Command;

use quota_gateway::config::{self, EnvOverrides};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

/// Every problem reported for a plans fixture, as "key: reason" lines.
fn plan_problems(name: &str) -> Vec<String> {
    let err = config::load_catalog(&fixture(name)).expect_err(name);
    for p in &err.problems {
        assert!(p.file.ends_with(name), "{p} names the file");
    }
    err.problems
        .iter()
        .map(|p| format!("{}: {}", p.key, p.reason))
        .collect()
}

fn gateway_problems(name: &str) -> Vec<String> {
    let err = config::load(&fixture(name), &EnvOverrides::default()).expect_err(name);
    err.problems.iter().map(|p| p.to_string()).collect()
}

fn assert_has(problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "no problem contains {needle:?}: {problems:#?}"
    );
}

#[test]
fn each_catalog_mistake_is_named_with_key_and_reason() {
    let cases = [
        (
            "plans_unknown_key.toml",
            "plans.free.quota: unknown field `quota`",
        ),
        (
            "plans_undeclared_metric.toml",
            "plans.free.quotas.seats: undeclared metric",
        ),
        (
            "plans_unknown_upgrade.toml",
            "plans.free.upgrade_to: unknown plan `gold`",
        ),
        (
            "plans_unknown_default.toml",
            "default_plan: unknown plan `basic`",
        ),
        (
            "plans_upgrade_cycle.toml",
            "plans.free.upgrade_to: upgrade cycle: free -> pro -> team -> free",
        ),
        (
            "plans_zero_limit.toml",
            "plans.free.quotas.requests.limit: must be greater than 0",
        ),
        (
            "plans_negative_rate.toml",
            "plans.free.rates.requests.limit: must be greater than 0",
        ),
        (
            "plans_bad_window.toml",
            "plans.free.rates.requests.window: `1x` has an unknown unit",
        ),
        (
            "plans_bad_period.toml",
            "plans.free.quotas.requests.period: unknown variant `week`",
        ),
        (
            "plans_gauge_with_period.toml",
            "plans.free.quotas.projects.period: a gauge is a level",
        ),
    ];
    for (file, expected) in cases {
        let problems = plan_problems(file);
        assert_has(&problems, expected);
        assert_eq!(problems.len(), 1, "one mistake, one problem: {problems:#?}");
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let problems = plan_problems("plans_several_problems.toml");
    assert_has(&problems, "default_plan: unknown plan `missing`");
    assert_has(&problems, "plans.free.upgrade_to: unknown plan `nowhere`");
    assert_has(
        &problems,
        "plans.free.quotas.requests.limit: must be greater than 0",
    );
    assert_has(&problems, "plans.free.quotas.seats: undeclared metric");
    assert_has(&problems, "plans.pro.rates.requests.window");
    assert_eq!(problems.len(), 5, "{problems:#?}");
}

#[test]
fn each_settings_mistake_is_named_with_file_key_and_reason() {
    assert_has(
        &gateway_problems("gateway_unknown_section.toml"),
        "gateway_unknown_section.toml: proxyy: unknown key",
    );
    assert_has(
        &gateway_problems("gateway_misspelled_key.toml"),
        "gateway_misspelled_key.toml: redis.urll: unknown field `urll`",
    );
    let bad = gateway_problems("gateway_bad_values.toml");
    for needle in [
        "api.listen: `localhost` is not host:port",
        "redis.url: not a valid Redis URL",
        "redis.key_prefix: must be non-empty and contain no braces",
        "redis.timeout: `fast`",
        "database.url: not a valid postgres:// URL",
        "database.max_connections: must be between 1 and 1000",
    ] {
        assert_has(&bad, needle);
    }
    assert_has(
        &gateway_problems("gateway_missing_plans_file.toml"),
        "does_not_exist.toml: cannot read file",
    );
    assert_has(
        &gateway_problems("gateway_bad_toml.toml"),
        "gateway_bad_toml.toml: line 3: invalid TOML",
    );
    // Problems in the catalog named by a valid gateway.toml are reported against the catalog.
    assert_has(
        &gateway_problems("gateway_bad_plans.toml"),
        "plans_several_problems.toml: default_plan: unknown plan `missing`",
    );
}

#[test]
fn billing_mistakes_are_named_too() {
    let problems = gateway_problems("gateway_billing_problems.toml");
    for needle in [
        "billing.grace_period: `soon`",
        "billing.stripe.plans.price_x: unknown plan `platinum`",
        "billing.dodo.secrets[0]: not a usable secret",
        "billing.polar.secrets: at least one signing secret is required",
    ] {
        assert_has(&problems, needle);
    }
    let platinum = problems
        .iter()
        .filter(|p| p.contains("unknown plan `platinum`"))
        .count();
    assert_eq!(platinum, 1, "each problem is said once: {problems:#?}");
    for p in &problems {
        assert!(
            !p.contains("whsec_abc") && !p.contains("not base64!"),
            "secrets never appear in messages: {p}"
        );
    }
}

#[test]
fn credit_grant_mistakes_are_named_too() {
    let problems = gateway_problems("gateway_grant_problems.toml");
    for needle in [
        "billing.stripe.grants.price_a.metric: unknown metric `tokens`",
        "billing.stripe.grants.price_b.amount: must be a whole number from 1",
        "billing.stripe.grants.price_b.expires_in: `1y` has an unknown unit",
        "billing.stripe.grants.price_b.priority: must be a whole number from 0 to 99999",
    ] {
        assert_has(&problems, needle);
    }
    assert!(
        !problems.iter().any(|p| p.contains("polar")),
        "a valid grant is not a problem: {problems:#?}"
    );
}

#[test]
fn connection_settings_mistakes_are_named_too() {
    let problems = gateway_problems("gateway_conn_problems.toml");
    for needle in [
        "gateway_conn_problems.toml: api.conn.header_read_timeout: `0s` must be greater than zero",
        "api.conn.max_connections: must be a whole number from 1 to 1000000",
        "proxy.conn.body_idle_timeout: `soon`",
        "proxy.conn.max_connections: must be a whole number from 1 to 1000000",
    ] {
        assert_has(&problems, needle);
    }
}

#[test]
fn lease_settings_mistakes_are_named_too() {
    let problems = gateway_problems("gateway_lease_problems.toml");
    for needle in [
        "gateway_lease_problems.toml: leases.ttl: must be between 100ms and 60s",
        "leases.max_block: must be at least 1",
    ] {
        assert_has(&problems, needle);
    }
}

#[test]
fn reserve_and_settle_mistakes_are_named_too() {
    let problems = gateway_problems("gateway_reserve_problems.toml");
    for needle in [
        "usage.reservation_expiry: unknown variant `never`, expected `settle` or `release`",
        "routes[0].reserve: give `from_json` or `from_header`, not both",
        "routes[0].reserve.default: must be an integer between 0 and 9007199254740991",
        "routes[0].settle.from_sse: `usage..total` must be a dotted JSON path",
        "routes[1].settle: missing: a reservation needs `settle`",
        "routes[2].reserve: missing: `settle` needs a `reserve`",
        "routes[3].settle: give at least one of `from_header`, `from_trailer` and `from_sse`",
    ] {
        assert_has(&problems, needle);
    }
}

#[test]
fn concurrency_mistakes_are_named_too() {
    let problems = gateway_problems("gateway_concurrency_problems.toml");
    assert_has(
        &problems,
        "gateway_concurrency_problems.toml: concurrency.slot_ttl: must be between 3s and 1h",
    );
    let problems = plan_problems("plans_bad_concurrency.toml");
    for needle in [
        "plans.free.concurrency.requests: must be from 1 to 100000",
        "plans.huge.concurrency.requests: must be from 1 to 100000",
        "plans.team",
    ] {
        assert_has(&problems, needle);
    }
    assert_has(&problems, "queue");
}

#[test]
fn the_shipped_configuration_is_valid() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (settings, catalog) =
        config::load(&root.join("config/gateway.toml"), &EnvOverrides::default())
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(settings.redis.key_prefix, "qg");
    assert_eq!(catalog.default_plan, "free");
    assert!(catalog.plan("pro").is_some());
}

#[test]
fn environment_overrides_win_over_the_file() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let env = EnvOverrides {
        admin_token: Some("from-env".into()),
        redis_url: Some("redis://10.0.0.1:6380/2".into()),
        database_url: Some("postgres://u@db:5432/qg".into()),
        api_listen: Some("0.0.0.0:9100".into()),
        stripe_webhook_secret: None,
        notifications_secret: None,
        proxy_listen: Some("0.0.0.0:8081".into()),
        proxy_upstream: Some("http://demo-upstream:9100".into()),
    };
    let (settings, _) = config::load(&root.join("config/gateway.toml"), &env).unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(settings.api.admin_token.expose_secret(), "from-env");
    assert_eq!(
        settings.redis.url.expose_secret(),
        "redis://10.0.0.1:6380/2"
    );
    assert_eq!(
        settings.database.url.expose_secret(),
        "postgres://u@db:5432/qg"
    );
    assert_eq!(settings.api.listen.to_string(), "0.0.0.0:9100");
    let proxy = settings
        .proxy
        .as_ref()
        .expect("the example config runs the proxy");
    assert_eq!(proxy.listen.to_string(), "0.0.0.0:8081");
    assert_eq!(proxy.upstream.to_string(), "http://demo-upstream:9100/");
    // Secrets stay out of Debug output.
    let debug = format!("{settings:?}");
    assert!(!debug.contains("from-env"), "{debug}");
}

#[test]
fn check_config_prints_a_summary_or_exits_64_with_the_problems() {
    let bin = env!("CARGO_BIN_EXE_quota-gateway");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ok = Command::new(bin)
        .args(["check-config", "--config"])
        .arg(root.join("config/gateway.toml"))
        .env_remove("QUOTA_GATEWAY_CONFIG")
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("plans (default: free)"), "{out}");
    assert!(out.contains("quota  requests"), "{out}");
    assert!(out.contains("billing: "), "{out}");

    let bad = Command::new(bin)
        .args(["check-config"])
        .env("QUOTA_GATEWAY_CONFIG", fixture("gateway_bad_plans.toml"))
        .output()
        .unwrap();
    // The same exit code as `serve` for the same mistake: EX_USAGE.
    assert_eq!(bad.status.code(), Some(64));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("plans_several_problems.toml: plans.free.upgrade_to: unknown plan `nowhere`"),
        "{err}"
    );

    // `serve` refuses to start on the same file, with EX_USAGE.
    let serve = Command::new(bin)
        .args(["serve", "--config"])
        .arg(fixture("gateway_bad_values.toml"))
        .output()
        .unwrap();
    assert_eq!(serve.status.code(), Some(64));
    let err = String::from_utf8_lossy(&serve.stderr);
    assert!(err.contains("gateway_bad_values.toml: api.listen"), "{err}");
}

#[test]
fn notification_thresholds_are_percentages_ascending_each_once() {
    let problems = plan_problems("plans_bad_notify_at.toml");
    assert_has(
        &problems,
        "notify_at[1]: thresholds must be ascending, each once",
    );
    assert_has(
        &problems,
        "notify_at[2]: must be a whole percentage from 1 to 1000",
    );
    assert_has(
        &problems,
        "plans.free.notify_at[1]: thresholds must be ascending, each once",
    );
    assert_has(
        &problems,
        "plans.free.notify_at[2]: must be a whole percentage from 1 to 1000",
    );
    assert_eq!(problems.len(), 4, "an empty list is fine: {problems:#?}");
}

#[test]
fn notification_settings_mistakes_are_named() {
    let problems = gateway_problems("gateway_notification_problems.toml");
    for needle in [
        "notifications.url: must be an absolute http:// or https:// URL",
        "notifications.secret: not a usable secret",
        "notifications.max_age: `forever`",
        "notifications.retry_max: must be at least notifications.retry_initial",
    ] {
        assert_has(&problems, needle);
    }
}

#[test]
fn the_catalog_default_applies_unless_a_plan_sets_its_own() {
    let text = r#"
default_plan = "free"
notify_at = [80, 100]
[metrics]
requests = { unit = "request" }
[plans.free]
quotas = { requests = { limit = 10, period = "month" } }
[plans.quiet]
notify_at = []
[plans.loud]
notify_at = [50, 90, 100, 150]
"#;
    let c = config::catalog_from_str(&PathBuf::from("plans.toml"), text).unwrap();
    assert_eq!(c.plan("free").unwrap().notify_at, [80, 100]);
    assert!(c.plan("quiet").unwrap().notify_at.is_empty());
    assert_eq!(c.plan("loud").unwrap().notify_at, [50, 90, 100, 150]);
}

#[test]
fn proxy_overrides_without_a_proxy_section_are_named() {
    // This fixture has no [proxy]: an override with nothing to override is a mistake, not a
    // silently ignored variable.
    let env = EnvOverrides {
        proxy_upstream: Some("http://demo-upstream:9100".into()),
        ..Default::default()
    };
    let err = config::load(&fixture("gateway_billing_problems.toml"), &env).expect_err("invalid");
    let problems: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    assert_has(
        &problems,
        "proxy: QG_PROXY_UPSTREAM is set, but there is no [proxy] section",
    );
}
