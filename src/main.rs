//! The `quota-gateway` binary: parse the command line, load and validate configuration, run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use quota_gateway::config::{self, EnvOverrides};
use quota_gateway::domain::plan::{Catalog, MetricKind};
use quota_gateway::startup::{Application, Options};
use quota_gateway::{db, shutdown, telemetry};

/// The proxy allocates a little per request on every worker thread (header maps, futures, the
/// Redis command buffer); mimalloc's thread-local free lists make that markedly cheaper than
/// glibc's malloc under the load benchmark (see the README's performance section).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EX_USAGE from sysexits.h: the configuration is wrong, restarting will not help.
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "quota-gateway",
    version,
    about = "Usage metering and quota gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config`, the same for every command.
#[derive(clap::Args)]
struct ConfigArg {
    /// The gateway's settings file (it names the plan catalog).
    #[arg(
        long = "config",
        env = "QUOTA_GATEWAY_CONFIG",
        default_value = "config/gateway.toml"
    )]
    path: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Csv,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (runs pending migrations first unless --no-migrate).
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Do not run database migrations at start-up.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Validate the configuration and print a summary of plans and metrics.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Write every org's usage of one month (from Postgres) to stdout, for billing.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// The month, as YYYY-MM.
        #[arg(long)]
        period: String,
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
    },
    /// Write every credit grant (from Postgres) to stdout: what was granted, spent, voided and
    /// is left, as of each replica's last flush.
    ExportCredits {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run a stand-in product API to proxy to (the quick start's upstream); not for production.
    DemoUpstream {
        /// Where to listen.
        #[arg(
            long,
            env = "QG_DEMO_UPSTREAM_LISTEN",
            default_value = "127.0.0.1:9100"
        )]
        listen: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let env = EnvOverrides::from_env();
    match cli.command {
        Command::DemoUpstream { listen } => {
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn({
                let stop = stop.clone();
                async move {
                    shutdown::signal().await;
                    stop.cancel();
                }
            });
            match quota_gateway::demo_upstream::run(listen, stop).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo upstream: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => match config::load(&config.path, &env) {
            Ok((settings, catalog)) => {
                print_summary(&config.path, &settings.plans_path, &catalog);
                print_proxy_summary(&settings);
                print_billing_summary(&settings);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Export {
            config,
            period,
            format,
        } => {
            let (settings, _) = match config::load(&config.path, &env) {
                Ok(v) => v,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            let Some(month) = quota_gateway::api::parse_month(&period) else {
                eprintln!("--period: expected a month as YYYY-MM, got `{period}`");
                return ExitCode::from(EX_USAGE);
            };
            // Rows go to stdout as they are read; notes, progress and the summary to stderr,
            // so the export on stdout stays machine-readable.
            let written = async {
                let pool = db::pool(&settings.database)?;
                let rows = db::usage::export(&pool, month.start);
                write_export(rows, format, &period, std::io::stdout().lock()).await
            }
            .await;
            match written {
                Ok(summary) => {
                    let lag = chrono::Duration::from_std(settings.flush.interval)
                        .unwrap_or(chrono::Duration::zero());
                    if month.end + lag > chrono::Utc::now() {
                        eprintln!(
                            "note: {period} is still open (or closed less than one [flush] \
                             interval ago): these figures are as of each replica's last flush, up \
                             to {}s behind live usage, and will grow",
                            settings.flush.interval.as_secs()
                        );
                    }
                    if summary.rows == 0 {
                        eprintln!("{period}: no usage recorded for any org");
                    } else {
                        eprintln!(
                            "{period}: {} rows, {} orgs, {} units in all",
                            summary.rows, summary.orgs, summary.total
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("export failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ExportCredits { config, format } => {
            let (settings, _) = match config::load(&config.path, &env) {
                Ok(v) => v,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            let written = async {
                let pool = db::pool(&settings.database)?;
                let rows = db::credits::export(&pool);
                write_credits(rows, format, std::io::stdout().lock()).await
            }
            .await;
            match written {
                Ok(n) => {
                    eprintln!("{n} grants");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("export failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate { config } => {
            let (settings, _) = match config::load(&config.path, &env) {
                Ok(v) => v,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            telemetry::init(&settings.log);
            let result = async {
                db::wait_and_create(&settings.database).await?;
                let pool = db::pool(&settings.database)?;
                db::migrate(&pool).await
            }
            .await;
            match result {
                Ok(applied) => {
                    let total = db::MIGRATOR.iter().count();
                    if applied.is_empty() {
                        println!("database up to date: all {total} migrations were applied before");
                    } else {
                        for (version, description) in &applied {
                            println!("applied {version} {description}");
                        }
                        println!(
                            "database up to date: applied {} of {total} migrations",
                            applied.len()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = %e, "migration failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve { config, no_migrate } => {
            let (settings, catalog) = match config::load(&config.path, &env) {
                Ok(v) => v,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            telemetry::init(&settings.log);
            let options = Options {
                migrate: !no_migrate,
                ..Options::default()
            };
            let app = match Application::build(settings, catalog, options).await {
                Ok(app) => app,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "start-up failed");
                    return ExitCode::FAILURE;
                }
            };
            match app.run_until_stopped(shutdown::signal()).await {
                Ok(()) => {
                    tracing::info!("stopped");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "stopped with an error");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Progress goes to stderr every this many rows of an export.
const EXPORT_PROGRESS_EVERY: u64 = 100_000;

#[derive(Default)]
struct ExportSummary {
    rows: u64,
    orgs: u64,
    /// Wider than a row's quantity: a month's sum over many orgs may pass i64.
    total: i128,
}

/// Write the export to `out` as rows arrive (ordered by org, so orgs are counted on change).
async fn write_export(
    rows: impl futures_util::Stream<Item = Result<db::usage::ExportRow, db::DbError>>,
    format: ExportFormat,
    period: &str,
    out: impl std::io::Write,
) -> anyhow::Result<ExportSummary> {
    use futures_util::StreamExt as _;
    use std::io::Write as _;
    let stamp =
        |t: &chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut out = std::io::BufWriter::new(out);
    let mut summary = ExportSummary::default();
    let mut last_org = String::new();
    match format {
        ExportFormat::Csv => out.write_all(b"org_id,metric,period_start,quantity\n")?,
        ExportFormat::Json => out.write_all(b"[")?,
    }
    let mut rows = std::pin::pin!(rows);
    while let Some(r) = rows.next().await {
        let r = r?;
        match format {
            // Org ids and metric ids cannot contain commas or quotes, so no field needs quoting.
            ExportFormat::Csv => writeln!(
                out,
                "{},{},{},{}",
                r.org_id,
                r.metric,
                stamp(&r.period_start),
                r.quantity
            )?,
            ExportFormat::Json => {
                if summary.rows > 0 {
                    out.write_all(b",")?;
                }
                let item = serde_json::json!({
                    "org_id": r.org_id, "metric": r.metric,
                    "period_start": stamp(&r.period_start), "quantity": r.quantity,
                });
                out.write_all(item.to_string().as_bytes())?;
            }
        }
        summary.rows += 1;
        summary.total += i128::from(r.quantity);
        if r.org_id != last_org {
            summary.orgs += 1;
            last_org = r.org_id;
        }
        if summary.rows % EXPORT_PROGRESS_EVERY == 0 {
            eprintln!(
                "{period}: {} rows ({} orgs) written so far…",
                summary.rows, summary.orgs
            );
        }
    }
    if let ExportFormat::Json = format {
        out.write_all(b"]\n")?;
    }
    out.flush()?;
    Ok(summary)
}

/// Write the credits export to `out` as rows arrive; returns the number of grants.
async fn write_credits(
    rows: impl futures_util::Stream<Item = Result<db::credits::GrantRow, db::DbError>>,
    format: ExportFormat,
    out: impl std::io::Write,
) -> anyhow::Result<u64> {
    use futures_util::StreamExt as _;
    use std::io::Write as _;
    let stamp = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    let mut out = std::io::BufWriter::new(out);
    let mut n = 0u64;
    match format {
        ExportFormat::Csv => out.write_all(
            b"org_id,grant_id,metric,amount,spent,voided,remaining,priority,expires_at,created_at,voided_at,source\n",
        )?,
        ExportFormat::Json => out.write_all(b"[")?,
    }
    let mut rows = std::pin::pin!(rows);
    while let Some(r) = rows.next().await {
        let r = r?;
        let voided = r.voided.unwrap_or(0);
        let spent = (r.amount - r.remaining - voided).max(0);
        match format {
            // Ids and metrics cannot contain commas or quotes; the source is ours.
            ExportFormat::Csv => writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{}",
                r.org_id,
                r.id,
                r.metric,
                r.amount,
                spent,
                voided,
                r.remaining,
                r.priority,
                stamp(r.expires_at).unwrap_or_default(),
                stamp(Some(r.created_at)).unwrap_or_default(),
                stamp(r.voided_at).unwrap_or_default(),
                r.source
            )?,
            ExportFormat::Json => {
                if n > 0 {
                    out.write_all(b",")?;
                }
                let item = serde_json::json!({
                    "org_id": r.org_id, "grant_id": r.id, "metric": r.metric,
                    "amount": r.amount, "spent": spent, "voided": voided,
                    "remaining": r.remaining, "priority": r.priority,
                    "expires_at": stamp(r.expires_at), "created_at": stamp(Some(r.created_at)),
                    "voided_at": stamp(r.voided_at), "source": r.source,
                });
                out.write_all(item.to_string().as_bytes())?;
            }
        }
        n += 1;
    }
    if let ExportFormat::Json = format {
        out.write_all(b"]\n")?;
    }
    out.flush()?;
    Ok(n)
}

fn print_summary(config: &Path, plans: &Path, catalog: &Catalog) {
    println!("{}: ok", config.display());
    println!("{}: ok", plans.display());
    println!();
    println!("metrics:");
    for m in catalog.metrics.values() {
        let kind = match m.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        };
        println!("  {:<16} {:<8} unit: {}", m.id, kind, m.unit);
    }
    println!();
    println!("plans (default: {}):", catalog.default_plan);
    for p in catalog.plans.values() {
        let upgrade = p
            .upgrade_to
            .as_deref()
            .map(|u| format!(" -> {u}"))
            .unwrap_or_default();
        println!("  {} ({}){upgrade}", p.id, p.name);
        for q in &p.quotas {
            let period = q.period.map(|p| p.as_str()).unwrap_or("level");
            let soft = match q.overage {
                quota_gateway::domain::plan::Overage::Allow => " (soft)",
                quota_gateway::domain::plan::Overage::Block => "",
            };
            println!(
                "    quota  {:<12} {:>12} per {period}{soft}",
                q.metric, q.limit
            );
        }
        for r in &p.rates {
            println!(
                "    rate   {:<12} {:>12} per {}",
                r.metric, r.limit, r.window_label
            );
        }
        let unlimited: Vec<&str> = catalog
            .metrics
            .values()
            .filter(|m| p.quotas_for(&m.id).next().is_none())
            .map(|m| m.id.as_str())
            .collect();
        if !unlimited.is_empty() {
            println!("    unlimited: {}", unlimited.join(", "));
        }
        if !p.features.is_empty() {
            let f: Vec<&str> = p.features.iter().map(String::as_str).collect();
            println!("    features: {}", f.join(", "));
        }
    }
}

fn print_proxy_summary(settings: &config::Settings) {
    use quota_gateway::proxy::routes::{PathPattern, RouteAction};
    let Some(p) = &settings.proxy else {
        println!();
        println!("proxy: off (no [proxy] section)");
        return;
    };
    let describe = |a: &RouteAction| {
        let target = a
            .upstream
            .as_ref()
            .map(|u| format!(" -> {u}"))
            .unwrap_or_default();
        if a.unmetered {
            return format!("unmetered{target}");
        }
        let charges: Vec<String> = a
            .charges
            .iter()
            .map(|c| format!("{} x{}", c.metric, c.amount))
            .collect();
        let reports: Vec<String> = a
            .report
            .iter()
            .map(|r| format!(" report {}: {}", r.header, r.metric))
            .collect();
        format!("charge {}{}{target}", charges.join(", "), reports.concat())
    };
    println!();
    println!(
        "proxy: {} -> {} (identity: {}, header {})",
        p.listen,
        p.upstream,
        p.identity.mode.as_str(),
        p.identity.header
    );
    for r in &p.routes.routes {
        let method = r.method.as_ref().map_or("*", |m| m.as_str());
        let path = match &r.path {
            PathPattern::Exact(path) => path.clone(),
            PathPattern::Prefix(prefix) => format!("{prefix}/*"),
        };
        println!("  {method:<7} {path:<24} {}", describe(&r.action));
    }
    match &p.routes.default_route {
        Some(a) => println!("  default                          {}", describe(a)),
        None => println!("  default                          404 (no default route)"),
    }
}

fn print_billing_summary(settings: &config::Settings) {
    println!();
    let Some(b) = &settings.billing else {
        println!("billing: off (no [billing] section)");
        return;
    };
    let providers: Vec<String> = b.providers.iter().map(|p| p.kind.key()).collect();
    println!(
        "billing: {} (grace period {}s, auto_downgrade {})",
        if providers.is_empty() {
            "no providers".to_string()
        } else {
            providers.join(", ")
        },
        b.grace_period.as_secs(),
        b.auto_downgrade
    );
}
