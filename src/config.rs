//! Typed configuration: process settings (`gateway.toml`) and the plan catalog (`plans.toml`).
//!
//! Both files are parsed into a `toml::Table` first and then deserialized one section (and, for the
//! catalog, one metric and one plan) at a time, so a single run reports *every* invalid key with the
//! file, the dotted key and the reason, instead of stopping at the first serde error. Nothing
//! downstream re-validates: a `Settings` or a `Catalog` value is valid by construction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::domain::period::Period;
use crate::domain::plan::{Catalog, Enforcement, Metric, MetricKind, Overage, Plan, Quota, Rate};
use crate::proxy::routes::{ChargeSpec, PathPattern, ReportSpec, Route, RouteAction, RouteTable};

// Settings types live with the parts that use them; this module parses and validates them.
pub use crate::db::DatabaseSettings;
pub use crate::domain::decision::OnRedisError;
pub use crate::proxy::settings::{IdentityMode, IdentitySettings, ProxySettings, RefundOn};
pub use crate::serve::ConnSettings;
pub use crate::store::{RedisMode, RedisSettings};
pub use crate::telemetry::{LogFormat, LogSettings};
pub use crate::webhooks::{BillingProvider, BillingSettings, ProviderKind};

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
}

// ---- raw file shapes ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiRaw {
    listen: String,
    #[serde(default)]
    admin_token: String,
    #[serde(default)]
    service_token: String,
    #[serde(default)]
    guard_per_second: Option<i64>,
    #[serde(default)]
    guard_burst: Option<i64>,
    #[serde(default)]
    /// Parsed on its own (`conn_settings`), so its mistakes are reported with the others.
    conn: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConnRaw {
    #[serde(default)]
    header_read_timeout: Option<String>,
    #[serde(default)]
    body_idle_timeout: Option<String>,
    #[serde(default)]
    max_connections: Option<i64>,
}

/// Largest `max_connections`: well past what one process can hold open.
const MAX_CONNECTIONS: i64 = 1_000_000;

fn conn_settings(r: &mut Report<'_>, section: &str, raw: Option<toml::Value>) -> ConnSettings {
    let raw: ConnRaw = raw
        .and_then(|v| r.parse(&format!("{section}.conn"), v))
        .unwrap_or_default();
    let d = ConnSettings::default();
    let key = |k: &str| format!("{section}.conn.{k}");
    ConnSettings {
        header_read_timeout: duration_or(
            r,
            &key("header_read_timeout"),
            raw.header_read_timeout,
            d.header_read_timeout,
        ),
        body_idle_timeout: duration_or(
            r,
            &key("body_idle_timeout"),
            raw.body_idle_timeout,
            d.body_idle_timeout,
        ),
        max_connections: match raw.max_connections {
            None => d.max_connections,
            Some(n) => match usize::try_from(n)
                .ok()
                .filter(|_| n <= MAX_CONNECTIONS)
                .and_then(std::num::NonZeroUsize::new)
            {
                Some(n) => n,
                None => {
                    r.add(
                        key("max_connections"),
                        format!("must be a whole number from 1 to {MAX_CONNECTIONS}"),
                    );
                    d.max_connections
                }
            },
        },
    }
}

/// The admin token of the shipped example config. Anyone who has read the README knows it, so a
/// gateway that uses it must not be reachable from other hosts.
pub const EXAMPLE_ADMIN_TOKEN: &str = "dev-admin-token";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisRaw {
    url: String,
    #[serde(default = "default_prefix")]
    key_prefix: String,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    on_error: OnRedisError,
    #[serde(default)]
    local_share: Option<f64>,
    #[serde(default)]
    mode: RedisMode,
    #[serde(default)]
    require_noeviction: Option<bool>,
}

fn default_prefix() -> String {
    "qg".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseRaw {
    url: String,
    #[serde(default)]
    max_connections: Option<i64>,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    start_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LogRaw {
    #[serde(default)]
    format: Option<LogFormat>,
    #[serde(default)]
    level: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EnforcementRaw {
    #[serde(default)]
    mode: Enforcement,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UsageRaw {
    #[serde(default)]
    idempotency_ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyRaw {
    listen: String,
    upstream: String,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    request_timeout: Option<String>,
    #[serde(default)]
    drain_timeout: Option<String>,
    #[serde(default)]
    refund_on: Option<Vec<RefundOnRaw>>,
    #[serde(default)]
    default_route: Option<ActionRaw>,
    #[serde(default)]
    /// Parsed on its own (`conn_settings`), so its mistakes are reported with the others.
    conn: Option<toml::Value>,
}

#[derive(Deserialize, Clone, Copy)]
enum RefundOnRaw {
    #[serde(rename = "5xx")]
    ServerError,
    #[serde(rename = "connect_error")]
    ConnectError,
    #[serde(rename = "timeout")]
    Timeout,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct IdentityRaw {
    #[serde(default)]
    mode: Option<IdentityMode>,
    #[serde(default)]
    header: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteRaw {
    #[serde(default)]
    method: Option<String>,
    path: String,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    charges: Vec<ChargeRaw>,
    #[serde(default)]
    report: Vec<ReportRaw>,
    #[serde(default)]
    unmetered: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionRaw {
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    charges: Vec<ChargeRaw>,
    #[serde(default)]
    report: Vec<ReportRaw>,
    #[serde(default)]
    unmetered: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeRaw {
    metric: String,
    #[serde(default = "one")]
    amount: i64,
}

fn one() -> i64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportRaw {
    header: String,
    metric: String,
}

/// Collects problems for one file.
struct Report<'a> {
    file: &'a Path,
    problems: &'a mut Vec<Problem>,
    /// The plan catalog, when it loaded: settings that name metrics or plans are checked
    /// against it in the same pass.
    catalog: Option<&'a Catalog>,
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

fn read_table(path: &Path, problems: &mut Vec<Problem>) -> Option<toml::Table> {
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

fn parse_table(path: &Path, text: &str, problems: &mut Vec<Problem>) -> Option<toml::Table> {
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

fn duration_or(
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
        }
    }
}

/// Load `gateway.toml` and the plan catalog it names.
pub fn load(path: &Path, env: &EnvOverrides) -> Result<(Settings, Catalog), ConfigError> {
    let mut problems = Vec::new();
    let (settings, catalog) = load_settings(path, env, &mut problems);
    if let (Some(s), Some(c)) = (&settings, &catalog)
        && let Err(e) = check_against_catalog(s, c)
    {
        problems.extend(e.problems);
    }
    // The catalog checks run while parsing too; say each problem once.
    let mut seen = std::collections::HashSet::new();
    problems.retain(|p| seen.insert((p.key.clone(), p.reason.clone())));
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
fn load_settings(
    path: &Path,
    env: &EnvOverrides,
    problems: &mut Vec<Problem>,
) -> (Option<Settings>, Option<Catalog>) {
    let Some(mut table) = read_table(path, problems) else {
        return (None, None);
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let catalog = match table.get("plans") {
        Some(toml::Value::String(p)) => load_catalog_into(&base.join(p), problems),
        _ => None,
    };
    let settings = settings_from_table(path, &mut table, env, catalog.as_ref(), problems);
    (settings, catalog)
}

fn settings_from_table(
    path: &Path,
    table: &mut toml::Table,
    env: &EnvOverrides,
    catalog: Option<&Catalog>,
    problems: &mut Vec<Problem>,
) -> Option<Settings> {
    let mut r = Report {
        file: path,
        problems,
        catalog,
    };

    let plans_rel = match table.remove("plans") {
        Some(toml::Value::String(s)) => Some(s),
        Some(_) => {
            r.add("plans", "must be a string (a path relative to this file)");
            None
        }
        None => {
            r.add(
                "plans",
                "missing: the path of the plan catalog (plans.toml)",
            );
            None
        }
    };
    let mut section = |r: &mut Report<'_>, name: &str, required: bool| match table.remove(name) {
        Some(v) => Some(v),
        None if required => {
            r.add(name, format!("missing section [{name}]"));
            None
        }
        None => None,
    };
    let api_v = section(&mut r, "api", true);
    let redis_v = section(&mut r, "redis", true);
    let db_v = section(&mut r, "database", true);
    let log_v = section(&mut r, "log", false);
    let usage_v = section(&mut r, "usage", false);
    let enforcement_v = section(&mut r, "enforcement", false);
    let proxy_v = section(&mut r, "proxy", false);
    let identity_v = section(&mut r, "identity", false);
    let routes_v = section(&mut r, "routes", false);
    let billing_v = section(&mut r, "billing", false);
    let flush_v = section(&mut r, "flush", false);
    for key in table.keys() {
        r.add(key.clone(), "unknown key");
    }

    let api: Option<ApiRaw> = api_v.and_then(|v| r.parse("api", v));
    let redis: Option<RedisRaw> = redis_v.and_then(|v| r.parse("redis", v));
    let db: Option<DatabaseRaw> = db_v.and_then(|v| r.parse("database", v));
    let log: LogRaw = log_v.and_then(|v| r.parse("log", v)).unwrap_or_default();
    let usage: UsageRaw = usage_v
        .and_then(|v| r.parse("usage", v))
        .unwrap_or_default();
    let enforcement: EnforcementRaw = enforcement_v
        .and_then(|v| r.parse("enforcement", v))
        .unwrap_or_default();

    let base = path.parent().unwrap_or(Path::new("."));
    let plans_path = plans_rel.map(|p| base.join(p));

    let api = api.and_then(|a| {
        let listen_raw = env.api_listen.clone().unwrap_or(a.listen);
        let listen = listen_raw
            .parse::<SocketAddr>()
            .map_err(|e| {
                r.add(
                    "api.listen",
                    format!("`{listen_raw}` is not host:port ({e})"),
                )
            })
            .ok()?;
        let admin = env.admin_token.clone().unwrap_or(a.admin_token);
        if admin == EXAMPLE_ADMIN_TOKEN && !listen.ip().is_loopback() {
            r.add(
                "api.admin_token",
                format!(
                    "the example token `{EXAMPLE_ADMIN_TOKEN}` is public; it may only be used on a \
                     loopback listener, and api.listen is {listen}. Set QG_ADMIN_TOKEN to a secret \
                     of your own (e.g. `openssl rand -hex 24`)"
                ),
            );
        }
        let mut positive = |key: &str, v: Option<i64>, default: u32| match v {
            None => std::num::NonZeroU32::new(default),
            Some(n) => match u32::try_from(n).ok().and_then(std::num::NonZeroU32::new) {
                Some(n) => Some(n),
                None => {
                    r.add(key, "must be a positive whole number");
                    None
                }
            },
        };
        let guard_per_second = positive("api.guard_per_second", a.guard_per_second, 100)?;
        let guard_burst = positive("api.guard_burst", a.guard_burst, 200)?;
        let conn = conn_settings(&mut r, "api", a.conn);
        Some(ApiSettings {
            conn,
            guard_per_second,
            guard_burst,
            listen,
            admin_token: SecretString::from(admin),
            service_token: (!a.service_token.is_empty())
                .then(|| SecretString::from(a.service_token)),
        })
    });

    let redis = redis.and_then(|rr| {
        let url = env.redis_url.clone().unwrap_or(rr.url);
        let mut ok = true;
        let seeds: Vec<&str> = match rr.mode {
            RedisMode::Standalone => vec![url.as_str()],
            RedisMode::Cluster => url.split(',').map(str::trim).collect(),
        };
        for seed in seeds {
            if let Err(e) = redis::Client::open(seed) {
                r.add("redis.url", format!("not a valid Redis URL ({e})"));
                ok = false;
            }
        }
        if rr.key_prefix.is_empty()
            || rr
                .key_prefix
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace())
        {
            r.add(
                "redis.key_prefix",
                "must be non-empty and contain no braces or whitespace (braces would break the Redis Cluster hash tag)",
            );
            ok = false;
        }
        let timeout = duration_or(
            &mut r,
            "redis.timeout",
            rr.timeout,
            Duration::from_secs(1),
        );
        let local_share = rr.local_share.unwrap_or(1.0);
        if !(local_share > 0.0 && local_share <= 1.0) {
            r.add("redis.local_share", "must be greater than 0 and at most 1");
            ok = false;
        }
        let connect_timeout = duration_or(
            &mut r,
            "redis.connect_timeout",
            rr.connect_timeout,
            Duration::from_secs(2),
        );
        ok.then(|| RedisSettings {
            url: SecretString::from(url),
            key_prefix: rr.key_prefix,
            timeout,
            connect_timeout,
            on_error: rr.on_error,
            local_share,
            mode: rr.mode,
            require_noeviction: rr.require_noeviction.unwrap_or(true),
        })
    });

    let database = db.and_then(|d| {
        let url = env.database_url.clone().unwrap_or(d.url);
        let mut ok = true;
        if url.parse::<sqlx::postgres::PgConnectOptions>().is_err()
            || !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            r.add("database.url", "not a valid postgres:// URL");
            ok = false;
        }
        let max_connections = match d.max_connections {
            None => 10,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(_) => {
                r.add("database.max_connections", "must be between 1 and 1000");
                ok = false;
                10
            }
        };
        let connect_timeout = duration_or(
            &mut r,
            "database.connect_timeout",
            d.connect_timeout,
            Duration::from_secs(5),
        );
        let start_timeout = duration_or(
            &mut r,
            "database.start_timeout",
            d.start_timeout,
            Duration::from_secs(60),
        );
        ok.then(|| DatabaseSettings {
            url: SecretString::from(url),
            max_connections,
            connect_timeout,
            start_timeout,
        })
    });

    let log = LogSettings {
        format: log.format.unwrap_or(LogFormat::Pretty),
        level: log.level.unwrap_or_else(|| "info".into()),
    };
    let usage = UsageSettings {
        idempotency_ttl: duration_or(
            &mut r,
            "usage.idempotency_ttl",
            usage.idempotency_ttl,
            Duration::from_secs(48 * 3600),
        ),
    };
    if usage.idempotency_ttl < Duration::from_secs(24 * 3600) {
        r.add(
            "usage.idempotency_ttl",
            "must be at least 24h (providers and clients retry for a day)",
        );
    }

    let proxy = proxy_settings(&mut r, proxy_v, identity_v, routes_v);
    let billing = billing_v.and_then(|v| billing_settings(&mut r, v, env));
    let flush_raw: FlushRaw = flush_v
        .and_then(|v| r.parse("flush", v))
        .unwrap_or_default();
    let flush = FlushSettings {
        interval: duration_or(
            &mut r,
            "flush.interval",
            flush_raw.interval,
            Duration::from_secs(10),
        ),
    };

    Some(Settings {
        config_path: path.to_path_buf(),
        plans_path: plans_path?,
        api: api?,
        redis: redis?,
        database: database?,
        log,
        usage,
        enforcement: enforcement.mode,
        proxy,
        billing,
        flush,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BillingRaw {
    #[serde(default)]
    grace_period: Option<String>,
    #[serde(default)]
    auto_downgrade: Option<bool>,
    #[serde(default)]
    stripe: Option<ProviderRaw>,
    #[serde(default)]
    dodo: Option<ProviderRaw>,
    #[serde(default)]
    polar: Option<ProviderRaw>,
    #[serde(default)]
    standard: BTreeMap<String, ProviderRaw>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderRaw {
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    org_id_from: Option<String>,
    #[serde(default)]
    plans: BTreeMap<String, String>,
}

fn billing_settings(
    r: &mut Report<'_>,
    v: toml::Value,
    env: &EnvOverrides,
) -> Option<BillingSettings> {
    use crate::webhooks::signature::standard_key;
    let raw: BillingRaw = r.parse("billing", v)?;
    let grace_period = duration_or(
        r,
        "billing.grace_period",
        raw.grace_period,
        Duration::from_secs(72 * 3600),
    );
    let mut providers = Vec::new();
    let mut add = |r: &mut Report<'_>, kind: ProviderKind, key: String, p: ProviderRaw| {
        let mut secrets = p.secrets;
        if kind == ProviderKind::Stripe
            && let Some(s) = &env.stripe_webhook_secret
        {
            secrets.push(s.clone());
        }
        if secrets.is_empty() {
            r.add(
                format!("{key}.secrets"),
                "at least one signing secret is required",
            );
        }
        let encoding = kind.key_encoding();
        for (i, s) in secrets.iter().enumerate() {
            let bad = s.trim().is_empty() || encoding.is_some_and(|e| standard_key(s, e).is_err());
            if bad {
                r.add(
                    format!("{key}.secrets[{i}]"),
                    "not a usable secret (Standard Webhooks secrets are `whsec_` + base64)",
                );
            }
        }
        if let Some(catalog) = r.catalog {
            for (product, plan) in &p.plans {
                if let Some(reason) = plan_problem(catalog, plan) {
                    r.add(format!("{key}.plans.{product}"), reason);
                }
            }
        }
        providers.push(BillingProvider {
            kind,
            secrets: secrets.into_iter().map(SecretString::from).collect(),
            org_id_from: p.org_id_from.unwrap_or_else(|| "metadata.org_id".into()),
            plans: p.plans,
        });
    };
    if let Some(p) = raw.stripe {
        add(r, ProviderKind::Stripe, "billing.stripe".into(), p);
    } else if env.stripe_webhook_secret.is_some() {
        // The secret alone enables the endpoint (`add` takes it from the environment).
        add(
            r,
            ProviderKind::Stripe,
            "billing.stripe".into(),
            ProviderRaw {
                secrets: Vec::new(),
                org_id_from: None,
                plans: BTreeMap::new(),
            },
        );
    }
    if let Some(p) = raw.dodo {
        add(r, ProviderKind::Dodo, "billing.dodo".into(), p);
    }
    if let Some(p) = raw.polar {
        add(r, ProviderKind::Polar, "billing.polar".into(), p);
    }
    for (name, p) in raw.standard {
        if !valid_id(&name) {
            r.add(
                format!("billing.standard.{name}"),
                format!("name {ID_RULE}"),
            );
        }
        add(
            r,
            ProviderKind::Standard(name.clone()),
            format!("billing.standard.{name}"),
            p,
        );
    }
    Some(BillingSettings {
        grace_period,
        auto_downgrade: raw.auto_downgrade.unwrap_or(true),
        providers,
    })
}

/// `[proxy]` with its `[identity]` and `[[routes]]`; `None` when the proxy is not configured (or
/// invalid, in which case the problems are in `r`).
fn proxy_settings(
    r: &mut Report<'_>,
    proxy_v: Option<toml::Value>,
    identity_v: Option<toml::Value>,
    routes_v: Option<toml::Value>,
) -> Option<ProxySettings> {
    let Some(proxy_v) = proxy_v else {
        if identity_v.is_some() {
            r.add("identity", "only used by the proxy: add a [proxy] section");
        }
        if routes_v.is_some() {
            r.add("routes", "only used by the proxy: add a [proxy] section");
        }
        return None;
    };
    let before = r.problems.len();
    let raw: Option<ProxyRaw> = r.parse("proxy", proxy_v);
    let identity: IdentityRaw = identity_v
        .and_then(|v| r.parse("identity", v))
        .unwrap_or_default();
    let identity = IdentitySettings {
        mode: identity.mode.unwrap_or(IdentityMode::ApiKey),
        header: match identity.header {
            None => IdentitySettings::default().header,
            Some(h) => http::HeaderName::from_bytes(h.as_bytes()).unwrap_or_else(|_| {
                r.add(
                    "identity.header",
                    format!("`{h}` is not a valid header name"),
                );
                IdentitySettings::default().header
            }),
        },
    };

    let mut routes = Vec::new();
    match routes_v {
        None => {}
        Some(toml::Value::Array(items)) => {
            for (i, v) in items.into_iter().enumerate() {
                let key = format!("routes[{i}]");
                let Some(rr) = r.parse::<RouteRaw>(&key, v) else {
                    continue;
                };
                let method = rr.method.as_deref().and_then(|m| {
                    let upper = m.to_ascii_uppercase();
                    http::Method::from_bytes(upper.as_bytes())
                        .map_err(|_| {
                            r.add(
                                format!("{key}.method"),
                                format!("`{m}` is not an HTTP method"),
                            )
                        })
                        .ok()
                });
                let path = PathPattern::parse(&rr.path)
                    .map_err(|e| r.add(format!("{key}.path"), e))
                    .ok();
                let action = route_action(
                    r,
                    &key,
                    ActionRaw {
                        upstream: rr.upstream,
                        charges: rr.charges,
                        report: rr.report,
                        unmetered: rr.unmetered,
                    },
                );
                if let Some(path) = path {
                    routes.push(Route {
                        method,
                        path,
                        action,
                    });
                }
            }
        }
        Some(_) => r.add("routes", "must be an array of tables ([[routes]])"),
    }

    let raw = raw?;
    let default_route = raw
        .default_route
        .map(|a| route_action(r, "proxy.default_route", a));
    let listen = raw
        .listen
        .parse::<SocketAddr>()
        .map_err(|e| {
            r.add(
                "proxy.listen",
                format!("`{}` is not host:port ({e})", raw.listen),
            )
        })
        .ok();
    let upstream = parse_upstream(r, "proxy.upstream", &raw.upstream);
    let connect_timeout = duration_or(
        r,
        "proxy.connect_timeout",
        raw.connect_timeout,
        Duration::from_secs(2),
    );
    let request_timeout = duration_or(
        r,
        "proxy.request_timeout",
        raw.request_timeout,
        Duration::from_secs(60),
    );
    let drain_timeout = duration_or(
        r,
        "proxy.drain_timeout",
        raw.drain_timeout,
        Duration::from_secs(30),
    );
    let conn = conn_settings(r, "proxy", raw.conn);
    let refund_on = match raw.refund_on {
        None => RefundOn::default(),
        Some(list) => {
            let mut on = RefundOn {
                server_error: false,
                connect_error: false,
                timeout: false,
            };
            for item in list {
                match item {
                    RefundOnRaw::ServerError => on.server_error = true,
                    RefundOnRaw::ConnectError => on.connect_error = true,
                    RefundOnRaw::Timeout => on.timeout = true,
                }
            }
            on
        }
    };
    if r.problems.len() > before {
        return None;
    }
    Some(ProxySettings {
        listen: listen?,
        upstream: upstream?,
        connect_timeout,
        request_timeout,
        drain_timeout,
        conn,
        refund_on,
        identity,
        routes: RouteTable {
            routes,
            default_route,
        },
    })
}

fn route_action(r: &mut Report<'_>, key: &str, raw: ActionRaw) -> RouteAction {
    let upstream = raw
        .upstream
        .as_deref()
        .and_then(|u| parse_upstream(r, &format!("{key}.upstream"), u));
    if raw.unmetered && !(raw.charges.is_empty() && raw.report.is_empty()) {
        r.add(
            key,
            "an unmetered route cannot have charges or report headers",
        );
    }
    if !raw.unmetered && raw.charges.is_empty() {
        r.add(
            format!("{key}.charges"),
            "missing: give at least one charge, or set unmetered = true",
        );
    }
    let charges = raw
        .charges
        .into_iter()
        .enumerate()
        .map(|(j, c)| {
            if !(1..=crate::domain::decision::MAX_COUNTER).contains(&c.amount) {
                r.add(
                    format!("{key}.charges[{j}].amount"),
                    "must be an integer between 1 and 9007199254740991 (2^53 - 1)",
                );
            }
            if let Some(reason) = r.catalog.and_then(|cat| metric_problem(cat, &c.metric)) {
                r.add(format!("{key}.charges[{j}].metric"), reason);
            }
            ChargeSpec {
                metric: c.metric,
                amount: c.amount,
            }
        })
        .collect();
    let report = raw
        .report
        .into_iter()
        .enumerate()
        .filter_map(|(j, rep)| {
            let header = http::HeaderName::from_bytes(rep.header.as_bytes())
                .map_err(|_| {
                    r.add(
                        format!("{key}.report[{j}].header"),
                        format!("`{}` is not a valid header name", rep.header),
                    )
                })
                .ok()?;
            if let Some(reason) = r.catalog.and_then(|cat| metric_problem(cat, &rep.metric)) {
                r.add(format!("{key}.report[{j}].metric"), reason);
            }
            Some(ReportSpec {
                header,
                metric: rep.metric,
            })
        })
        .collect();
    RouteAction {
        upstream,
        charges,
        report,
        unmetered: raw.unmetered,
    }
}

/// An upstream is `http://host:port` (TLS to the upstream is out of scope: the gateway is a
/// sidecar on a private network).
fn parse_upstream(r: &mut Report<'_>, key: &str, raw: &str) -> Option<http::Uri> {
    let uri = match raw.parse::<http::Uri>() {
        Ok(u) => u,
        Err(e) => {
            r.add(key, format!("`{raw}` is not a URL ({e})"));
            return None;
        }
    };
    let reason = if uri.scheme_str() != Some("http") {
        Some("must be an http:// URL (put TLS termination in front of the upstream)")
    } else if uri.authority().is_none() {
        Some("must name a host, e.g. http://127.0.0.1:3000")
    } else if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        Some("must be scheme and host only (no path or query): request paths are kept as sent")
    } else {
        None
    };
    match reason {
        Some(reason) => {
            r.add(key, format!("`{raw}` {reason}"));
            None
        }
        None => Some(uri),
    }
}

/// Metrics named by proxy routes must be declared counters of the catalog.
/// Why a billing product may not map to `plan`, if it may not.
fn plan_problem(catalog: &Catalog, plan: &str) -> Option<String> {
    catalog
        .plan(plan)
        .is_none()
        .then(|| format!("unknown plan `{plan}` (not in the plan catalog)"))
}

/// Why a route may not charge `metric`, if it may not.
fn metric_problem(catalog: &Catalog, metric: &str) -> Option<String> {
    match catalog.metric(metric) {
        None => Some(format!(
            "undeclared metric `{metric}` (declare it under [metrics] in the plan catalog)"
        )),
        Some(m) if m.kind == MetricKind::Gauge => Some(format!(
            "`{metric}` is a gauge (a level); the proxy charges counters only"
        )),
        Some(_) => None,
    }
}

fn check_proxy_metrics(
    file: &Path,
    proxy: &ProxySettings,
    catalog: &Catalog,
    problems: &mut Vec<Problem>,
) {
    for (key, metric) in proxy.routes.metric_names() {
        let Some(reason) = metric_problem(catalog, metric) else {
            continue;
        };
        problems.push(Problem {
            file: file.to_path_buf(),
            key,
            reason,
        });
    }
}

/// Check settings that depend on the catalog (route metrics); used by `load` and by callers that
/// build `Settings` in code.
pub fn check_against_catalog(settings: &Settings, catalog: &Catalog) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    if let Some(proxy) = &settings.proxy {
        check_proxy_metrics(&settings.config_path, proxy, catalog, &mut problems);
    }
    if let Some(billing) = &settings.billing {
        for p in &billing.providers {
            let section = match &p.kind {
                ProviderKind::Standard(n) => format!("billing.standard.{n}"),
                other => format!("billing.{}", other.key()),
            };
            for (product, plan) in &p.plans {
                if let Some(reason) = plan_problem(catalog, plan) {
                    problems.push(Problem {
                        file: settings.config_path.clone(),
                        key: format!("{section}.plans.{product}"),
                        reason,
                    });
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

// ---- plan catalog ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricRaw {
    unit: String,
    #[serde(default)]
    kind: Option<MetricKindRaw>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum MetricKindRaw {
    Counter,
    Gauge,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanRaw {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    upgrade_to: Option<String>,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    quotas: BTreeMap<String, toml::Value>,
    #[serde(default)]
    rates: BTreeMap<String, toml::Value>,
    #[serde(default)]
    enforcement: Enforcement,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaRaw {
    limit: i64,
    #[serde(default)]
    period: Option<Period>,
    #[serde(default)]
    overage: Option<OverageRaw>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum OverageRaw {
    Block,
    Allow,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateRaw {
    limit: i64,
    window: String,
}

/// Ids of metrics and plans end up in Redis keys and HTTP headers: keep them plain.
fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

const ID_RULE: &str = "must be 1-64 characters of A-Z, a-z, 0-9, '_', '-' or '.'";

/// A quota or rate entry may be one table or an array of tables (e.g. a daily and a monthly cap).
fn one_or_many(v: toml::Value) -> Vec<(Option<usize>, toml::Value)> {
    match v {
        toml::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (Some(i), v))
            .collect(),
        other => vec![(None, other)],
    }
}

/// Parse a catalog from text; `path` only names the source in error messages.
pub fn catalog_from_str(path: &Path, text: &str) -> Result<Catalog, ConfigError> {
    let mut problems = Vec::new();
    let catalog = parse_table(path, text, &mut problems)
        .and_then(|t| catalog_from_table(path, t, &mut problems));
    match catalog {
        Some(c) if problems.is_empty() => Ok(c),
        _ => Err(ConfigError { problems }),
    }
}

fn load_catalog_into(path: &Path, problems: &mut Vec<Problem>) -> Option<Catalog> {
    let table = read_table(path, problems)?;
    catalog_from_table(path, table, problems)
}

/// Take the table under `key`, reporting it as `wrong` (not a table) or `missing`; an empty
/// table stands in so the other checks still run.
fn required_table(
    r: &mut Report<'_>,
    table: &mut toml::Table,
    key: &str,
    wrong: &str,
    missing: &str,
) -> toml::Table {
    match table.remove(key) {
        Some(toml::Value::Table(t)) => t,
        Some(_) => {
            r.add(key, wrong);
            toml::Table::new()
        }
        None => {
            r.add(key, missing);
            toml::Table::new()
        }
    }
}

fn catalog_from_table(
    path: &Path,
    mut table: toml::Table,
    problems: &mut Vec<Problem>,
) -> Option<Catalog> {
    let mut r = Report {
        file: path,
        problems,
        catalog: None,
    };
    let before = r.problems.len();

    let default_plan = match table.remove("default_plan") {
        Some(toml::Value::String(s)) => Some(s),
        Some(_) => {
            r.add("default_plan", "must be a string");
            None
        }
        None => {
            r.add("default_plan", "missing: the plan of orgs with no plan set");
            None
        }
    };
    let upgrade_url = match table.remove("upgrade_url") {
        Some(toml::Value::String(s)) => {
            if !(s.starts_with("https://") || s.starts_with("http://")) {
                r.add("upgrade_url", "must be an http:// or https:// URL");
            }
            Some(s)
        }
        Some(_) => {
            r.add("upgrade_url", "must be a string");
            None
        }
        None => None,
    };
    let metrics_t = required_table(
        &mut r,
        &mut table,
        "metrics",
        "must be a table of metric definitions",
        "missing: declare at least one metric under [metrics]",
    );
    let plans_t = required_table(
        &mut r,
        &mut table,
        "plans",
        "must be a table of plans",
        "missing: define at least one plan under [plans.<id>]",
    );
    for key in table.keys() {
        r.add(key.clone(), "unknown key");
    }

    // Names declared in the file, even when their definition has an error: cross-references to
    // them must not produce a second, misleading "unknown" problem.
    let declared_metrics: BTreeSet<String> = metrics_t.keys().cloned().collect();
    let declared_plans: BTreeSet<String> = plans_t.keys().cloned().collect();
    let mut metrics = BTreeMap::new();
    for (id, v) in metrics_t {
        let key = format!("metrics.{id}");
        if !valid_id(&id) {
            r.add(&key, format!("metric id {ID_RULE}"));
        }
        if let Some(m) = r.parse::<MetricRaw>(&key, v) {
            if m.unit.trim().is_empty() {
                r.add(format!("{key}.unit"), "must not be empty");
            }
            let kind = match m.kind {
                Some(MetricKindRaw::Gauge) => MetricKind::Gauge,
                _ => MetricKind::Counter,
            };
            metrics.insert(
                id.clone(),
                Metric {
                    id,
                    unit: m.unit,
                    kind,
                },
            );
        }
    }

    let mut plans = BTreeMap::new();
    for (id, v) in plans_t {
        let key = format!("plans.{id}");
        if !valid_id(&id) {
            r.add(&key, format!("plan id {ID_RULE}"));
        }
        let Some(raw) = r.parse::<PlanRaw>(&key, v) else {
            continue;
        };
        let mut quotas = Vec::new();
        for (metric_id, v) in raw.quotas {
            let metric = metrics.get(&metric_id);
            if !declared_metrics.contains(&metric_id) {
                r.add(
                    format!("{key}.quotas.{metric_id}"),
                    "undeclared metric (declare it under [metrics])",
                );
            }
            for (idx, v) in one_or_many(v) {
                let qkey = match idx {
                    Some(i) => format!("{key}.quotas.{metric_id}[{i}]"),
                    None => format!("{key}.quotas.{metric_id}"),
                };
                let Some(q) = r.parse::<QuotaRaw>(&qkey, v) else {
                    continue;
                };
                if q.limit <= 0 {
                    r.add(format!("{qkey}.limit"), "must be greater than 0");
                    continue;
                }
                let Some(metric) = metric else { continue };
                match (metric.kind, q.period) {
                    (MetricKind::Counter, None) => {
                        r.add(
                            format!("{qkey}.period"),
                            "missing: a counter quota needs a period (minute, hour, day or month)",
                        );
                        continue;
                    }
                    (MetricKind::Gauge, Some(_)) => {
                        r.add(
                            format!("{qkey}.period"),
                            "a gauge is a level, not a count per period: remove the period",
                        );
                        continue;
                    }
                    _ => {}
                }
                if quotas
                    .iter()
                    .any(|e: &Quota| e.metric == metric_id && e.period == q.period)
                {
                    r.add(&qkey, "a second quota for the same metric and period");
                    continue;
                }
                quotas.push(Quota {
                    metric: metric_id.clone(),
                    limit: q.limit as u64,
                    period: q.period,
                    overage: match q.overage {
                        Some(OverageRaw::Allow) => Overage::Allow,
                        _ => Overage::Block,
                    },
                });
            }
        }
        let mut rates = Vec::new();
        for (metric_id, v) in raw.rates {
            let metric = metrics.get(&metric_id);
            match metric {
                None if declared_metrics.contains(&metric_id) => {}
                None => r.add(
                    format!("{key}.rates.{metric_id}"),
                    "undeclared metric (declare it under [metrics])",
                ),
                Some(m) if m.kind == MetricKind::Gauge => r.add(
                    format!("{key}.rates.{metric_id}"),
                    "a gauge cannot have a rate limit",
                ),
                _ => {}
            }
            for (idx, v) in one_or_many(v) {
                let rkey = match idx {
                    Some(i) => format!("{key}.rates.{metric_id}[{i}]"),
                    None => format!("{key}.rates.{metric_id}"),
                };
                let Some(rr) = r.parse::<RateRaw>(&rkey, v) else {
                    continue;
                };
                if rr.limit <= 0 {
                    r.add(format!("{rkey}.limit"), "must be greater than 0");
                    continue;
                }
                let window = match parse_duration(&rr.window) {
                    Ok(w) => w,
                    Err(e) => {
                        r.add(format!("{rkey}.window"), e);
                        continue;
                    }
                };
                // The GCRA state is kept in integer microseconds scaled by the limit, which
                // must stay exact in a Lua double.
                if (window.as_micros() as f64) * (rr.limit as f64) > 2f64.powi(52) {
                    r.add(
                        &rkey,
                        "limit × window is too large (keep it under 2^52 units·µs)",
                    );
                    continue;
                }
                if window > Duration::from_secs(86_400) {
                    r.add(
                        format!("{rkey}.window"),
                        "must be at most 1d (use a quota for longer periods)",
                    );
                    continue;
                }
                if rates
                    .iter()
                    .any(|e: &Rate| e.metric == metric_id && e.window == window)
                {
                    r.add(&rkey, "a second rate for the same metric and window");
                    continue;
                }
                if metric.is_some() {
                    rates.push(Rate {
                        metric: metric_id.clone(),
                        limit: rr.limit as u64,
                        window,
                        window_label: rr.window.trim().to_string(),
                    });
                }
            }
        }
        for (i, f) in raw.features.iter().enumerate() {
            if !valid_id(f) {
                r.add(format!("{key}.features[{i}]"), format!("feature {ID_RULE}"));
            }
        }
        plans.insert(
            id.clone(),
            Plan {
                name: raw.name.unwrap_or_else(|| id.clone()),
                enforcement: raw.enforcement,
                id,
                upgrade_to: raw.upgrade_to,
                features: raw.features.into_iter().collect::<BTreeSet<_>>(),
                quotas,
                rates,
            },
        );
    }

    if let Some(d) = &default_plan
        && !declared_plans.contains(d)
    {
        r.add("default_plan", format!("unknown plan `{d}`"));
    }
    for (id, plan) in &plans {
        if let Some(up) = &plan.upgrade_to
            && !declared_plans.contains(up)
        {
            r.add(
                format!("plans.{id}.upgrade_to"),
                format!("unknown plan `{up}`"),
            );
        }
    }
    for id in plans.keys() {
        if let Some(cycle) = upgrade_cycle(&plans, id)
            && cycle.first() == Some(id)
        {
            r.add(
                format!("plans.{id}.upgrade_to"),
                format!("upgrade cycle: {}", cycle.join(" -> ")),
            );
        }
    }

    if r.problems.len() > before {
        return None;
    }
    Some(Catalog {
        default_plan: default_plan?,
        upgrade_url,
        metrics,
        plans,
    })
}

/// The cycle reachable from `start` through `upgrade_to`, if `start` is on one (reported once,
/// by the smallest id on the cycle).
fn upgrade_cycle(plans: &BTreeMap<String, Plan>, start: &String) -> Option<Vec<String>> {
    let mut seen = vec![start.clone()];
    let mut cur = plans.get(start)?.upgrade_to.clone();
    while let Some(next) = cur {
        if &next == start {
            seen.push(next);
            let min = seen.iter().min()?;
            return (min == start).then_some(seen);
        }
        if seen.contains(&next) {
            return None;
        }
        cur = plans.get(&next).and_then(|p| p.upgrade_to.clone());
        seen.push(next);
    }
    None
}

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
