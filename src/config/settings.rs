//! `gateway.toml`: every section parsed and validated, problems collected in one report.

use super::*;

// ---- raw file shapes ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApiRaw {
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
pub(super) struct ConnRaw {
    #[serde(default)]
    header_read_timeout: Option<String>,
    #[serde(default)]
    body_idle_timeout: Option<String>,
    #[serde(default)]
    max_connections: Option<i64>,
}

/// Largest `max_connections`: well past what one process can hold open.
pub(super) const MAX_CONNECTIONS: i64 = 1_000_000;

pub(super) fn conn_settings(
    r: &mut Report<'_>,
    section: &str,
    raw: Option<toml::Value>,
) -> ConnSettings {
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
pub(super) struct RedisRaw {
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

pub(super) fn default_prefix() -> String {
    "qg".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DatabaseRaw {
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
pub(super) struct LogRaw {
    #[serde(default)]
    format: Option<LogFormat>,
    #[serde(default)]
    level: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct EnforcementRaw {
    #[serde(default)]
    mode: Enforcement,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageRaw {
    #[serde(default)]
    idempotency_ttl: Option<String>,
    #[serde(default)]
    reservation_expiry: Option<crate::domain::reservation::OnExpiry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProxyRaw {
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
pub(super) enum RefundOnRaw {
    #[serde(rename = "5xx")]
    ServerError,
    #[serde(rename = "connect_error")]
    ConnectError,
    #[serde(rename = "timeout")]
    Timeout,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct IdentityRaw {
    #[serde(default)]
    mode: Option<IdentityMode>,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    user_header: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteRaw {
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
    reserve: Option<ReserveRaw>,
    #[serde(default)]
    settle: Option<SettleRaw>,
    #[serde(default)]
    unmetered: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ActionRaw {
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    charges: Vec<ChargeRaw>,
    #[serde(default)]
    report: Vec<ReportRaw>,
    #[serde(default)]
    reserve: Option<ReserveRaw>,
    #[serde(default)]
    settle: Option<SettleRaw>,
    #[serde(default)]
    unmetered: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChargeRaw {
    metric: String,
    #[serde(default = "one")]
    amount: i64,
}

pub(super) fn one() -> i64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReserveRaw {
    metric: String,
    #[serde(default)]
    from_json: Option<String>,
    #[serde(default)]
    from_header: Option<String>,
    default: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SettleRaw {
    #[serde(default)]
    from_header: Option<String>,
    #[serde(default)]
    from_trailer: Option<String>,
    #[serde(default)]
    from_sse: Option<String>,
    #[serde(default)]
    on_missing: Option<OnMissingRaw>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum OnMissingRaw {
    Reserved,
    Zero,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReportRaw {
    header: String,
    metric: String,
}

/// Collects problems for one file.
pub(super) fn load_settings(
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

pub(super) fn settings_from_table(
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
    let notifications_v = section(&mut r, "notifications", false);
    let leases_v = section(&mut r, "leases", false);
    let concurrency_v = section(&mut r, "concurrency", false);
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
        reservation_expiry: usage.reservation_expiry.unwrap_or_default(),
    };
    if usage.idempotency_ttl < Duration::from_secs(24 * 3600) {
        r.add(
            "usage.idempotency_ttl",
            "must be at least 24h (providers and clients retry for a day)",
        );
    }

    let proxy = proxy_settings(&mut r, proxy_v, identity_v, routes_v, env);
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

    let notifications = notification_settings(&mut r, notifications_v, env);
    let leases_raw: LeasesRaw = leases_v
        .and_then(|v| r.parse("leases", v))
        .unwrap_or_default();
    let lease_defaults = LeaseSettings::default();
    let leases = LeaseSettings {
        enabled: leases_raw.enabled,
        ttl: duration_or(&mut r, "leases.ttl", leases_raw.ttl, lease_defaults.ttl),
        max_block: leases_raw.max_block.unwrap_or(lease_defaults.max_block),
        checkpoint: leases_raw.checkpoint.unwrap_or(lease_defaults.checkpoint),
    };
    if leases.ttl < Duration::from_millis(100) || leases.ttl > Duration::from_secs(60) {
        r.add(
            "leases.ttl",
            "must be between 100ms and 60s (a block is settled, and its usage seen, within it)",
        );
    }
    if leases.max_block == 0 {
        r.add("leases.max_block", "must be at least 1");
    }
    let concurrency_raw: ConcurrencySettingsRaw = concurrency_v
        .and_then(|v| r.parse("concurrency", v))
        .unwrap_or_default();
    let concurrency = SlotSettings {
        ttl: duration_or(
            &mut r,
            "concurrency.slot_ttl",
            concurrency_raw.slot_ttl,
            SlotSettings::default().ttl,
        ),
        queue_timeout: duration_or(
            &mut r,
            "concurrency.queue_timeout",
            concurrency_raw.queue_timeout,
            SlotSettings::default().queue_timeout,
        ),
    };
    if concurrency.queue_timeout > Duration::from_secs(60) {
        r.add(
            "concurrency.queue_timeout",
            "must be at most 60s (a waiting request holds its connection and polls Redis)",
        );
    }
    if concurrency.ttl < Duration::from_secs(3) || concurrency.ttl > Duration::from_secs(3600) {
        r.add(
            "concurrency.slot_ttl",
            "must be between 3s and 1h (a crashed replica's slots free themselves within it)",
        );
    }

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
        notifications,
        leases,
        concurrency,
    })
}

pub(super) fn notification_settings(
    r: &mut Report<'_>,
    v: Option<toml::Value>,
    env: &EnvOverrides,
) -> NotifySettings {
    use crate::webhooks::signature::{StandardKeyEncoding, standard_key};
    let raw: NotificationsRaw = v
        .and_then(|v| r.parse("notifications", v))
        .unwrap_or_default();
    let d = NotifySettings::default();
    let secret = env.notifications_secret.clone().or(raw.secret);
    if let Some(url) = &raw.url {
        if let Some(reason) = crate::notify::url_problem(url) {
            r.add("notifications.url", reason);
        }
        match &secret {
            None => r.add(
                "notifications.secret",
                "missing: a Standard Webhooks secret (`whsec_` + base64) to sign events with \
                 (or QG_NOTIFICATIONS_SECRET)",
            ),
            Some(s) if standard_key(s, StandardKeyEncoding::Base64AfterWhsecPrefix).is_err() => r
                .add(
                    "notifications.secret",
                    "not a usable secret (Standard Webhooks secrets are `whsec_` + base64)",
                ),
            Some(_) => {}
        }
    }
    let mut dur = |key: &str, raw: Option<String>, default: Duration| {
        duration_or(r, &format!("notifications.{key}"), raw, default)
    };
    let s = NotifySettings {
        url: raw.url,
        secret: secret.map(SecretString::from),
        max_age: dur("max_age", raw.max_age, d.max_age),
        timeout: dur("timeout", raw.timeout, d.timeout),
        retry_initial: dur("retry_initial", raw.retry_initial, d.retry_initial),
        retry_max: dur("retry_max", raw.retry_max, d.retry_max),
        poll_interval: dur("poll_interval", raw.poll_interval, d.poll_interval),
    };
    if s.retry_max < s.retry_initial {
        r.add(
            "notifications.retry_max",
            "must be at least notifications.retry_initial",
        );
    }
    s
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BillingRaw {
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
pub(super) struct ProviderRaw {
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    org_id_from: Option<String>,
    #[serde(default)]
    plans: BTreeMap<String, String>,
    /// One-time purchases (Stripe price, Polar / Dodo product id) → the credits they grant.
    #[serde(default)]
    grants: BTreeMap<String, GrantRaw>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GrantRaw {
    metric: String,
    amount: i64,
    #[serde(default)]
    expires_in: Option<String>,
    #[serde(default)]
    priority: Option<u32>,
}

/// `[billing.<provider>] grants`: every problem of every entry, named by key.
fn grant_templates(
    r: &mut Report<'_>,
    key: &str,
    raw: BTreeMap<String, GrantRaw>,
) -> BTreeMap<String, crate::webhooks::GrantTemplate> {
    use crate::domain::credit::MAX_PRIORITY;
    use crate::domain::decision::MAX_COUNTER;
    let mut out = BTreeMap::new();
    for (product, g) in raw {
        let at = format!("{key}.grants.{product}");
        if let Some(catalog) = r.catalog {
            match catalog.metric(&g.metric) {
                None => r.add(
                    format!("{at}.metric"),
                    format!("unknown metric `{}`", g.metric),
                ),
                Some(m) if m.kind != crate::domain::plan::MetricKind::Counter => r.add(
                    format!("{at}.metric"),
                    format!(
                        "`{}` is a gauge; credits pay for counter metrics only",
                        g.metric
                    ),
                ),
                Some(_) => {}
            }
        }
        if g.amount < 1 || g.amount > MAX_COUNTER {
            r.add(
                format!("{at}.amount"),
                format!("must be a whole number from 1 to {MAX_COUNTER}"),
            );
        }
        if g.priority.is_some_and(|p| p > MAX_PRIORITY) {
            r.add(
                format!("{at}.priority"),
                format!("must be a whole number from 0 to {MAX_PRIORITY}"),
            );
        }
        let expires_in = g.expires_in.and_then(|s| match super::parse_duration(&s) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                r.add(format!("{at}.expires_in"), "must be longer than zero");
                None
            }
            Err(e) => {
                r.add(format!("{at}.expires_in"), e);
                None
            }
        });
        out.insert(
            product,
            crate::webhooks::GrantTemplate {
                metric: g.metric,
                amount: g.amount,
                expires_in,
                priority: g
                    .priority
                    .unwrap_or(crate::domain::credit::DEFAULT_PRIORITY),
            },
        );
    }
    out
}

pub(super) fn billing_settings(
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
        let grants = grant_templates(r, &key, p.grants);
        providers.push(BillingProvider {
            kind,
            secrets: secrets.into_iter().map(SecretString::from).collect(),
            org_id_from: p.org_id_from.unwrap_or_else(|| "metadata.org_id".into()),
            plans: p.plans,
            grants,
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
                grants: BTreeMap::new(),
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
pub(super) fn proxy_settings(
    r: &mut Report<'_>,
    proxy_v: Option<toml::Value>,
    identity_v: Option<toml::Value>,
    routes_v: Option<toml::Value>,
    env: &EnvOverrides,
) -> Option<ProxySettings> {
    let Some(proxy_v) = proxy_v else {
        for (var, set) in [
            ("QG_PROXY_LISTEN", &env.proxy_listen),
            ("QG_PROXY_UPSTREAM", &env.proxy_upstream),
        ] {
            if set.is_some() {
                r.add(
                    "proxy",
                    format!("{var} is set, but there is no [proxy] section for it to override"),
                );
            }
        }
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
        user_header: identity.user_header.and_then(|h| {
            http::HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| {
                    r.add(
                        "identity.user_header",
                        format!("`{h}` is not a valid header name"),
                    )
                })
                .ok()
        }),
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
                        reserve: rr.reserve,
                        settle: rr.settle,
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

    let mut raw = raw?;
    if let Some(listen) = &env.proxy_listen {
        raw.listen = listen.clone();
    }
    if let Some(upstream) = &env.proxy_upstream {
        raw.upstream = upstream.clone();
    }
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

pub(super) fn route_action(r: &mut Report<'_>, key: &str, raw: ActionRaw) -> RouteAction {
    let upstream = raw
        .upstream
        .as_deref()
        .and_then(|u| parse_upstream(r, &format!("{key}.upstream"), u));
    if raw.unmetered
        && !(raw.charges.is_empty()
            && raw.report.is_empty()
            && raw.reserve.is_none()
            && raw.settle.is_none())
    {
        r.add(
            key,
            "an unmetered route cannot have charges, report headers or a reservation",
        );
    }
    let reserve = reserve_spec(r, key, raw.reserve, raw.settle);
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
        reserve,
        unmetered: raw.unmetered,
    }
}

/// `reserve` and `settle` of a route: both or neither.
fn reserve_spec(
    r: &mut Report<'_>,
    key: &str,
    reserve: Option<ReserveRaw>,
    settle: Option<SettleRaw>,
) -> Option<ReserveSpec> {
    let (reserve, settle) = match (reserve, settle) {
        (None, None) => return None,
        (Some(_), None) => {
            r.add(
                format!("{key}.settle"),
                "missing: a reservation needs `settle` (where the actual is read from)",
            );
            return None;
        }
        (None, Some(_)) => {
            r.add(
                format!("{key}.reserve"),
                "missing: `settle` needs a `reserve` (metric and estimate)",
            );
            return None;
        }
        (Some(a), Some(b)) => (a, b),
    };
    let before = r.problems.len();
    if let Some(reason) = r
        .catalog
        .and_then(|cat| metric_problem(cat, &reserve.metric))
    {
        r.add(format!("{key}.reserve.metric"), reason);
    }
    if !(0..=crate::domain::decision::MAX_COUNTER).contains(&reserve.default) {
        r.add(
            format!("{key}.reserve.default"),
            "must be an integer between 0 and 9007199254740991 (2^53 - 1)",
        );
    }
    let header = |r: &mut Report<'_>, field: &str, raw: Option<String>| {
        raw.and_then(|h| {
            http::HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| {
                    r.add(
                        format!("{key}.{field}"),
                        format!("`{h}` is not a valid header name"),
                    )
                })
                .ok()
        })
    };
    let estimate = match (reserve.from_json, reserve.from_header) {
        (Some(_), Some(_)) => {
            r.add(
                format!("{key}.reserve"),
                "give `from_json` or `from_header`, not both",
            );
            Estimate::Default
        }
        (Some(field), None) => {
            if field.is_empty() || field.contains('.') {
                r.add(
                    format!("{key}.reserve.from_json"),
                    format!("`{field}` must be the name of a top-level member of the JSON body (no dots)"),
                );
            }
            Estimate::Json(field)
        }
        (None, Some(h)) => header(r, "reserve.from_header", Some(h))
            .map(Estimate::Header)
            .unwrap_or(Estimate::Default),
        (None, None) => Estimate::Default,
    };
    let from_header = header(r, "settle.from_header", settle.from_header);
    let from_trailer = header(r, "settle.from_trailer", settle.from_trailer);
    let from_sse = settle.from_sse.map(|path| {
        let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
        if parts.iter().any(String::is_empty) {
            r.add(
                format!("{key}.settle.from_sse"),
                format!("`{path}` must be a dotted JSON path such as \"usage.total_tokens\""),
            );
        }
        parts
    });
    if from_header.is_none()
        && from_trailer.is_none()
        && from_sse.is_none()
        && r.problems.len() == before
    {
        r.add(
            format!("{key}.settle"),
            "give at least one of `from_header`, `from_trailer` and `from_sse`",
        );
    }
    Some(ReserveSpec {
        metric: reserve.metric,
        estimate,
        default: reserve.default,
        from_header,
        from_trailer,
        from_sse,
        on_missing: match settle.on_missing {
            Some(OnMissingRaw::Zero) => OnMissing::Zero,
            _ => OnMissing::Reserved,
        },
    })
}

/// An upstream is `http://host:port` (TLS to the upstream is out of scope: the gateway is a
/// sidecar on a private network).
pub(super) fn parse_upstream(r: &mut Report<'_>, key: &str, raw: &str) -> Option<http::Uri> {
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
pub(super) fn plan_problem(catalog: &Catalog, plan: &str) -> Option<String> {
    catalog
        .plan(plan)
        .is_none()
        .then(|| format!("unknown plan `{plan}` (not in the plan catalog)"))
}

/// Why a route may not charge `metric`, if it may not.
pub(super) fn metric_problem(catalog: &Catalog, metric: &str) -> Option<String> {
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

pub(super) fn check_proxy_metrics(
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
