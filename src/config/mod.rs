//! Typed configuration: process settings (`gateway.toml`) and the plan catalog (`plans.toml`).
//!
//! Both files are parsed into a `toml::Table` first and then deserialized one section (and, for the
//! catalog, one metric and one plan) at a time, so a single run reports *every* invalid key with the
//! file, the dotted key and the reason, instead of stopping at the first serde error. Nothing
//! downstream re-validates: a `Settings` or a `Catalog` value is valid by construction.

mod catalog;
mod settings;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::domain::period::Period;
use crate::domain::plan::{
    Catalog, Concurrency, Enforcement, Metric, MetricKind, Overage, Plan, Quota, Rate,
};
use crate::proxy::routes::{
    ChargeSpec, Estimate, OnMissing, PathPattern, ReportSpec, ReserveSpec, Route, RouteAction,
    RouteTable,
};

// Settings types live with the parts that use them; this module parses and validates them.
pub use crate::db::DatabaseSettings;
pub use crate::domain::decision::OnRedisError;
pub use crate::lease::LeaseSettings;
pub use crate::notify::NotifySettings;
pub use crate::proxy::settings::{IdentityMode, IdentitySettings, ProxySettings, RefundOn};
pub use crate::serve::ConnSettings;
pub use crate::slots::SlotSettings;
pub use crate::store::{RedisMode, RedisSettings};
pub use crate::telemetry::{LogFormat, LogSettings};
pub use crate::webhooks::{BillingProvider, BillingSettings, ProviderKind};

pub use catalog::catalog_from_str;
use catalog::*;
pub use settings::check_against_catalog;
use settings::*;

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// Dotted path of the offending key (`plans.free.quotas.tokens.limit`); empty for the file.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
        }
    }
}

/// Every problem found in the configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Process settings from `gateway.toml`, environment overrides applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config_path: PathBuf,
    pub plans_path: PathBuf,
    pub api: ApiSettings,
    pub redis: RedisSettings,
    pub database: DatabaseSettings,
    pub log: LogSettings,
    pub usage: UsageSettings,
    /// `shadow`: no plan's limits block (overrides every plan's own setting).
    pub enforcement: Enforcement,
    /// `None` when `[proxy]` is absent: only the API listener runs.
    pub proxy: Option<ProxySettings>,
    /// `None` when `[billing]` is absent: the webhook endpoints answer 404.
    pub billing: Option<BillingSettings>,
    pub flush: FlushSettings,
    /// `[notifications]`: where threshold and plan-change events go (defaults: org endpoints
    /// only).
    pub notifications: NotifySettings,
    /// `[leases]`: off unless enabled.
    pub leases: LeaseSettings,
    /// `[concurrency]`: how slots of plans' concurrency limits are held.
    pub concurrency: SlotSettings,
}

#[derive(Debug, Clone)]
pub struct FlushSettings {
    /// How often each replica writes the counters it changed to Postgres.
    pub interval: Duration,
}

impl Default for FlushSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NotificationsRaw {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    max_age: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retry_initial: Option<String>,
    #[serde(default)]
    retry_max: Option<String>,
    #[serde(default)]
    poll_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConcurrencySettingsRaw {
    #[serde(default)]
    slot_ttl: Option<String>,
    #[serde(default)]
    queue_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LeasesRaw {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    max_block: Option<u64>,
    #[serde(default)]
    checkpoint: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FlushRaw {
    #[serde(default)]
    interval: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub listen: SocketAddr,
    /// Empty disables the admin API (every admin call answers 401).
    pub admin_token: SecretString,
    /// `None`: `/v1/*` is open (the gateway is expected on a private network).
    pub service_token: Option<SecretString>,
    /// Per-client-IP limit on `/admin/*` and `/webhooks/*` (requests per second, burst).
    pub guard_per_second: std::num::NonZeroU32,
    pub guard_burst: std::num::NonZeroU32,
    /// `[api.conn]`: timeouts and the connection cap of the API listener.
    pub conn: ConnSettings,
}

#[derive(Debug, Clone)]
pub struct UsageSettings {
    /// How long an idempotency key of `POST /v1/usage` is remembered.
    pub idempotency_ttl: Duration,
    /// What becomes of a `/v1/reservations` reservation that expires unsettled.
    pub reservation_expiry: crate::domain::reservation::OnExpiry,
}

pub(super) struct Report<'a> {
    pub(super) file: &'a Path,
    pub(super) problems: &'a mut Vec<Problem>,
    /// The plan catalog, when it loaded: settings that name metrics or plans are checked
    /// against it in the same pass.
    pub(super) catalog: Option<&'a Catalog>,
}

impl Report<'_> {
    fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        });
    }

    /// Deserialize `value` as `T`, reporting a failure under `key` (plus the path inside it).
    fn parse<T: DeserializeOwned>(&mut self, key: &str, value: toml::Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = e.path().to_string();
                let full = if inner.is_empty() || inner == "." {
                    key.to_string()
                } else if key.is_empty() {
                    inner
                } else {
                    format!("{key}.{inner}")
                };
                self.add(full, e.into_inner().message().to_string());
                None
            }
        }
    }
}

pub(super) fn read_table(path: &Path, problems: &mut Vec<Problem>) -> Option<toml::Table> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_table(path, &text, problems),
        Err(e) => {
            problems.push(Problem {
                file: path.to_path_buf(),
                key: String::new(),
                reason: format!("cannot read file: {e}"),
            });
            None
        }
    }
}

pub(super) fn parse_table(
    path: &Path,
    text: &str,
    problems: &mut Vec<Problem>,
) -> Option<toml::Table> {
    match text.parse::<toml::Table>() {
        Ok(t) => Some(t),
        Err(e) => {
            let place = e
                .span()
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    format!("line {line}: ")
                })
                .unwrap_or_default();
            problems.push(Problem {
                file: path.to_path_buf(),
                key: String::new(),
                reason: format!("{place}invalid TOML: {}", e.message().trim()),
            });
            None
        }
    }
}

/// Parse a duration like `"500ms"`, `"1s"`, `"10s"`, `"1m"`, `"72h"`, `"7d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` has no unit (use ms, s, m, h or d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` must start with a whole number"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        _ => return Err(format!("`{s}` has an unknown unit (use ms, s, m, h or d)")),
    };
    if d.is_zero() {
        return Err(format!("`{s}` must be greater than zero"));
    }
    Ok(d)
}

pub(super) fn duration_or(
    report: &mut Report<'_>,
    key: &str,
    raw: Option<String>,
    default: Duration,
) -> Duration {
    match raw {
        None => default,
        Some(s) => parse_duration(&s).unwrap_or_else(|e| {
            report.add(key, e);
            default
        }),
    }
}

/// Environment variables that override file values, read once at start-up.
#[derive(Debug, Clone, Default)]
pub struct EnvOverrides {
    pub admin_token: Option<String>,
    pub redis_url: Option<String>,
    pub database_url: Option<String>,
    pub api_listen: Option<String>,
    pub stripe_webhook_secret: Option<String>,
    pub notifications_secret: Option<String>,
    /// `QG_PROXY_LISTEN` and `QG_PROXY_UPSTREAM`: where the proxy listens and forwards, which
    /// differ between a laptop and a container network; only with a `[proxy]` section.
    pub proxy_listen: Option<String>,
    pub proxy_upstream: Option<String>,
}

impl EnvOverrides {
    pub fn from_env() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            admin_token: get("QG_ADMIN_TOKEN"),
            redis_url: get("REDIS_URL"),
            database_url: get("DATABASE_URL"),
            api_listen: get("QG_API_LISTEN"),
            stripe_webhook_secret: get("QG_STRIPE_WEBHOOK_SECRET"),
            notifications_secret: get("QG_NOTIFICATIONS_SECRET"),
            proxy_listen: get("QG_PROXY_LISTEN"),
            proxy_upstream: get("QG_PROXY_UPSTREAM"),
        }
    }
}

/// Load `gateway.toml` and the plan catalog it names.
pub fn load(path: &Path, env: &EnvOverrides) -> Result<(Settings, Catalog), ConfigError> {
    let mut problems = Vec::new();
    // The checks that need the catalog (route metrics, billing plans) run while parsing;
    // `check_against_catalog` is for settings built in code.
    let (settings, catalog) = load_settings(path, env, &mut problems);
    match (settings, catalog) {
        (Some(s), Some(c)) if problems.is_empty() => Ok((s, c)),
        _ => Err(ConfigError { problems }),
    }
}

/// Load only the plan catalog (used by hot reload and `check-config`).
pub fn load_catalog(path: &Path) -> Result<Catalog, ConfigError> {
    let mut problems = Vec::new();
    match load_catalog_into(path, &mut problems) {
        Some(c) if problems.is_empty() => Ok(c),
        _ => Err(ConfigError { problems }),
    }
}

/// The settings file and the catalog it names, in one pass: the catalog is read first, so checks
/// that need it (a route's metric) are reported together with every other problem.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("72h"), Ok(Duration::from_secs(72 * 3600)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    const PLANS_TOML: &str = r#"
default_plan = "free"
[metrics]
requests = { unit = "request" }
tokens = { unit = "token" }
projects = { unit = "project", kind = "gauge" }
[plans.free]
quotas = { requests = { limit = 10, period = "month" } }
"#;

    const BASE: &str = r#"
plans = "plans.toml"
[api]
listen = "127.0.0.1:0"
[redis]
url = "redis://127.0.0.1:6379/0"
[database]
url = "postgres://postgres@127.0.0.1:5432/x"
"#;

    fn load_text(gateway: &str) -> Result<(Settings, Catalog), ConfigError> {
        load_whole(&format!("{BASE}{gateway}"))
    }

    fn load_whole(gateway: &str) -> Result<(Settings, Catalog), ConfigError> {
        let dir = std::env::temp_dir().join(format!("qg-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("plans.toml"), PLANS_TOML).unwrap();
        std::fs::write(dir.join("gateway.toml"), gateway).unwrap();
        let r = load(&dir.join("gateway.toml"), &EnvOverrides::default());
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    fn keys_of(e: ConfigError) -> Vec<(String, String)> {
        e.problems.into_iter().map(|p| (p.key, p.reason)).collect()
    }

    #[test]
    fn an_evicting_redis_is_refused_unless_accepted() {
        let (s, _) = load_text("").unwrap();
        assert!(s.redis.require_noeviction);
        let accepted = BASE.replace("[redis]\n", "[redis]\nrequire_noeviction = false\n");
        let (s, _) = load_whole(&accepted).unwrap();
        assert!(!s.redis.require_noeviction);
        let bad = BASE.replace("[redis]\n", "[redis]\nrequire_noeviction = \"no\"\n");
        assert!(load_whole(&bad).is_err());
    }

    #[test]
    fn the_example_admin_token_is_refused_off_loopback() {
        let example = BASE.replace("[api]\n", "[api]\nadmin_token = \"dev-admin-token\"\n");
        assert!(load_whole(&example).is_ok(), "fine on loopback");
        let public = example.replace("127.0.0.1:0", "0.0.0.0:9000");
        let problems = keys_of(load_whole(&public).unwrap_err());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "api.admin_token");
        assert!(problems[0].1.contains("0.0.0.0:9000"), "{problems:?}");
        let own = public.replace("dev-admin-token", "a-secret-of-our-own");
        assert!(load_whole(&own).is_ok());
    }

    #[test]
    fn database_start_timeout_is_a_duration() {
        let (s, _) = load_text("").unwrap();
        assert_eq!(s.database.start_timeout, Duration::from_secs(60));
        let set = BASE.replace("[database]\n", "[database]\nstart_timeout = \"5s\"\n");
        assert_eq!(
            load_whole(&set).unwrap().0.database.start_timeout,
            Duration::from_secs(5)
        );
        let bad = BASE.replace("[database]\n", "[database]\nstart_timeout = \"soon\"\n");
        assert_eq!(
            keys_of(load_whole(&bad).unwrap_err())[0].0,
            "database.start_timeout"
        );
    }

    #[test]
    fn proxy_is_optional() {
        let (s, _) = load_text("").unwrap();
        assert!(s.proxy.is_none());
    }

    #[test]
    fn loads_the_documented_proxy_example() {
        let (s, _) = load_text(
            r#"
[proxy]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:3000"
connect_timeout = "2s"
request_timeout = "60s"
refund_on = ["5xx", "connect_error", "timeout"]

[identity]
mode = "api_key"
header = "x-org-id"

[[routes]]
method = "post"
path = "/v1/chat/*"
charges = [{ metric = "requests", amount = 1 }]
report  = [{ header = "x-usage-tokens", metric = "tokens" }]

[[routes]]
path = "/health"
unmetered = true
upstream = "http://127.0.0.1:3001/"

[proxy.default_route]
charges = [{ metric = "requests" }]
"#,
        )
        .unwrap();
        let p = s.proxy.unwrap();
        assert_eq!(p.listen.port(), 8080);
        assert_eq!(p.drain_timeout, Duration::from_secs(30));
        assert_eq!(p.refund_on, RefundOn::default());
        assert_eq!(p.identity.mode, IdentityMode::ApiKey);
        assert_eq!(p.routes.routes.len(), 2);
        assert_eq!(p.routes.routes[0].method, Some(http::Method::POST));
        assert_eq!(
            p.routes.routes[0].path,
            PathPattern::Prefix("/v1/chat".into())
        );
        assert_eq!(p.routes.routes[0].action.report[0].metric, "tokens");
        assert!(p.routes.routes[1].action.unmetered);
        assert!(p.routes.routes[1].action.upstream.is_some());
        assert_eq!(p.routes.default_route.unwrap().charges[0].amount, 1);
    }

    #[test]
    fn reports_every_proxy_problem_with_its_key() {
        let err = load_text(
            r#"
[proxy]
listen = "nowhere"
upstream = "https://127.0.0.1:3000"
drain_timeout = "0s"

[identity]
mode = "header"
header = "bad header"

[[routes]]
method = "GE T"
path = "v1/*"
charges = [{ metric = "nope" }]

[[routes]]
path = "/a/*/b"
upstream = "http://127.0.0.1:3000/base"
charges = [{ metric = "projects", amount = 0 }]
report = [{ header = "x y", metric = "tokens" }, { header = "x-used", metric = "missing" }]

[[routes]]
path = "/h"
unmetered = true
charges = [{ metric = "requests" }]

[[routes]]
path = "/x"
colour = "blue"

[proxy.default_route]
"#,
        )
        .unwrap_err();
        let got = keys_of(err);
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        for expected in [
            "identity.header",
            "routes[0].method",
            "routes[0].path",
            "routes[1].path",
            "routes[1].upstream",
            "routes[1].charges[0].amount",
            // catalog checks, reported in the same pass as the rest
            "routes[1].charges[0].metric",
            "routes[1].report[1].metric",
            "routes[1].report[0].header",
            "routes[2]",
            "routes[3].colour",
            "proxy.default_route.charges",
            "proxy.listen",
            "proxy.upstream",
            "proxy.drain_timeout",
        ] {
            assert!(keys.contains(&expected), "{expected} not in {got:#?}");
        }
    }

    #[test]
    fn route_metrics_must_be_declared_counters() {
        let err = load_text(
            r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:3000"
[[routes]]
path = "/a"
charges = [{ metric = "nope" }, { metric = "projects" }]
report = [{ header = "x-used", metric = "missing" }]
"#,
        )
        .unwrap_err();
        let got = keys_of(err);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert_eq!(got[0].0, "routes[0].charges[0].metric");
        assert!(got[0].1.contains("undeclared metric `nope`"));
        assert_eq!(got[1].0, "routes[0].charges[1].metric");
        assert!(got[1].1.contains("gauge"));
        assert_eq!(got[2].0, "routes[0].report[0].metric");
    }

    #[test]
    fn proxy_sections_need_a_proxy() {
        let err = load_text(
            r#"
[identity]
mode = "api_key"
[[routes]]
path = "/a"
unmetered = true
"#,
        )
        .unwrap_err();
        let keys: Vec<String> = err.problems.into_iter().map(|p| p.key).collect();
        assert_eq!(keys, vec!["identity", "routes"]);
    }

    #[test]
    fn refund_on_accepts_only_known_outcomes() {
        let err = load_text(
            r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:3000"
refund_on = ["6xx"]
"#,
        )
        .unwrap_err();
        assert!(err.problems[0].key.starts_with("proxy.refund_on"), "{err}");
    }
}
