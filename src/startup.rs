//! Building and running the application from validated configuration.
//!
//! `Application::build` binds its listener before returning and reports the address it actually
//! got, so tests (and several replicas on one host) can use port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState, FloodGuard, SharedState};
use crate::clock::{Clock, SystemClock};
use crate::config::{ConnSettings, Settings};
use crate::db;
use crate::directory::OrgDirectory;
use crate::domain::plan::Catalog;
use crate::local::LocalMode;
use crate::metrics::Metrics;
use crate::proxy::{ProxyDeps, ProxyServer, ProxyState};
use crate::quota::QuotaService;
use crate::store::Store;
use crate::webhooks::Webhooks;

/// How long a shutdown lets API requests in flight finish before closing their connections.
const API_DRAIN: Duration = Duration::from_secs(30);

/// How long shutdown waits for each background task (the final replay and flush included).
const TASK_STOP: Duration = Duration::from_secs(15);

/// How long start-up waits for the org-change subscription before serving anyway (the
/// directory then distrusts its cache until the subscription is up).
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(3);

pub struct Options {
    /// Run pending migrations before serving.
    pub migrate: bool,
    pub clock: Arc<dyn Clock>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            migrate: true,
            clock: Arc::new(SystemClock),
        }
    }
}

pub struct Application {
    /// What start-up found, logged once when serving begins.
    banner: Banner,
    listener: TcpListener,
    api_addr: SocketAddr,
    api_conn: ConnSettings,
    state: SharedState,
    stop: CancellationToken,
    /// Joined in order on shutdown, each after cancelling its own token if it has one.
    tasks: Vec<(&'static str, JoinHandle<()>, Option<CancellationToken>)>,
    /// The reverse proxy, when `[proxy]` is configured.
    proxy: Option<ProxyServer>,
}

/// The start-up summary: one line an operator can read to know what this replica is.
struct Banner {
    catalog: String,
    redis: String,
    postgres: String,
    billing: String,
    enforcement: &'static str,
    identity: Option<&'static str>,
}

impl Application {
    pub async fn build(
        settings: Settings,
        catalog: Catalog,
        options: Options,
    ) -> anyhow::Result<Self> {
        let pool = db::pool(&settings.database).context("database settings")?;
        if options.migrate {
            db::wait_and_create(&settings.database)
                .await
                .context("creating the database")?;
            let applied = db::migrate(&pool)
                .await
                .context("running database migrations")?;
            if !applied.is_empty() {
                let names: Vec<String> = applied.iter().map(|(v, d)| format!("{v} {d}")).collect();
                tracing::info!(applied = %names.join(", "), "database migrated");
            }
        }
        let metrics = Arc::new(Metrics::new());
        // Threshold crossings leave the decision path through a bounded channel (see `notify`).
        let (crossings, crossings_rx) = crate::notify::queue();
        let store = Store::new(&settings.redis, metrics.clone())
            .context("Redis settings")?
            .with_crossings(crossings);
        let redis_up = store.ping().await;
        let directory = Arc::new(OrgDirectory::new(pool.clone()));
        let stop = CancellationToken::new();

        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let follower = tokio::spawn(directory.clone().follow_changes(
            store.clone(),
            stop.child_token(),
            Some(ready_tx),
        ));
        if tokio::time::timeout(SUBSCRIBE_WAIT, ready_rx)
            .await
            .is_err()
        {
            tracing::warn!("org-change subscription not ready yet; serving anyway");
        }

        let local = Arc::new(LocalMode::new(
            settings.redis.on_error,
            settings.redis.local_share,
            settings.usage.idempotency_ttl,
            metrics.clone(),
        ));
        if let Err(e) = redis_up {
            tracing::warn!(
                redis = %settings.redis.describe_seeds(),
                error = %e,
                "Redis is not reachable at start-up; deciding in degraded mode ([redis] on_error) until it is"
            );
            local.trip();
        }
        // Concurrency slots: released and renewed by their own task, which stops after the
        // listeners drained (the last responses' releases go out first).
        let slots = Arc::new(crate::slots::Slots::new(
            store.clone(),
            options.clock.clone(),
            settings.concurrency.clone(),
            metrics.clone(),
        ));
        let slots_stop = CancellationToken::new();
        let slots_task = tokio::spawn(slots.clone().run(slots_stop.clone()));
        // The composition root: each part gets what it uses, nothing more.
        let quota = Arc::new(
            QuotaService::new(
                catalog,
                directory,
                store.clone(),
                options.clock.clone(),
                settings.usage.idempotency_ttl,
                local.clone(),
                metrics.clone(),
            )
            .with_enforcement(settings.enforcement)
            .with_leases(&settings.leases)
            .with_slots(slots),
        );
        let webhooks = Webhooks::new(crate::webhooks::Parts {
            pool: pool.clone(),
            billing: settings.billing.clone(),
            quota: quota.clone(),
            metrics: metrics.clone(),
        });
        // The recovery task and the flusher stop only after the listeners have drained, in
        // that order: decisions made by the last requests are replayed, and the final flush
        // carries the replay (see `run_until_stopped`).
        // Blocks are settled before recovery stops, so what a settlement cannot give Redis
        // reaches recovery's final replay (or its outbox).
        let leases_stop = CancellationToken::new();
        let lease_settler = tokio::spawn(quota.clone().run_lease_settler(leases_stop.clone()));
        let recovery_stop = CancellationToken::new();
        let recovery = tokio::spawn(local.clone().recover(
            quota.clone(),
            store.clone(),
            pool.clone(),
            recovery_stop.clone(),
        ));
        let flush_stop = CancellationToken::new();
        let flusher = tokio::spawn(crate::flush::run(
            store.clone(),
            pool.clone(),
            metrics.clone(),
            options.clock.clone(),
            settings.flush.interval,
            settings.redis.seeds(),
            flush_stop.clone(),
        ));
        // Stopped after recovery (whose replays may cross thresholds), before the flusher.
        let writer_stop = CancellationToken::new();
        let writer = tokio::spawn(crate::notify::write_crossings(
            crossings_rx,
            quota.clone(),
            pool.clone(),
            metrics.clone(),
            writer_stop.clone(),
        ));
        let delivery = tokio::spawn(crate::notify::deliver(
            crate::notify::Deliverer::new(
                pool.clone(),
                settings.notifications.clone(),
                metrics.clone(),
            ),
            stop.child_token(),
        ));
        let downgrades = tokio::spawn(crate::webhooks::scheduler::run(
            webhooks.clone(),
            stop.child_token(),
        ));
        crate::config::check_against_catalog(&settings, &quota.catalog())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let proxy = match settings.proxy.clone() {
            Some(p) => {
                let deps = ProxyDeps {
                    quota: quota.clone(),
                    metrics: metrics.clone(),
                    pool: pool.clone(),
                };
                Some(ProxyServer::bind(p, deps).await?)
            }
            None => None,
        };
        let eviction = tokio::spawn(crate::store::eviction::watch(
            store.clone(),
            stop.child_token(),
        ));
        let reloader = tokio::spawn(crate::reload::follow(
            settings.clone(),
            quota.clone(),
            metrics.clone(),
            stop.child_token(),
        ));
        // Expired reservations are ended by whichever replica's sweeper claims them first.
        let reservations = Arc::new(crate::reservations::Reservations::new(
            quota.clone(),
            metrics.clone(),
            settings.usage.reservation_expiry,
        ));
        let sweeper = tokio::spawn(
            reservations
                .clone()
                .run(Duration::from_secs(1), stop.child_token()),
        );
        let state = Arc::new(AppState {
            reservations,
            quota,
            metrics,
            pool,
            admin_token: settings.api.admin_token.clone(),
            service_token: settings.api.service_token.clone(),
            guard: FloodGuard::new(settings.api.guard_per_second, settings.api.guard_burst),
            webhooks,
        });
        let listener = TcpListener::bind(settings.api.listen)
            .await
            .with_context(|| format!("binding the API listener on {}", settings.api.listen))?;
        let api_addr = listener.local_addr()?;
        let banner = Banner {
            catalog: {
                let c = state.quota.catalog();
                format!(
                    "{} plans ({}; default {}), {} metrics",
                    c.plans.len(),
                    c.plans.keys().cloned().collect::<Vec<_>>().join(", "),
                    c.default_plan,
                    c.metrics.len()
                )
            },
            redis: format!(
                "{} {} ({})",
                match settings.redis.mode {
                    crate::config::RedisMode::Standalone => "standalone",
                    crate::config::RedisMode::Cluster => "cluster",
                },
                settings.redis.describe_seeds(),
                if local.is_degraded() {
                    "unreachable: degraded mode"
                } else {
                    "ok"
                }
            ),
            postgres: db::describe_target(&settings.database),
            billing: settings.billing.as_ref().map_or_else(
                || "off".to_string(),
                |b| {
                    b.providers
                        .iter()
                        .map(|p| p.kind.key())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ),
            enforcement: match settings.enforcement {
                crate::domain::plan::Enforcement::Enforce => "enforce",
                crate::domain::plan::Enforcement::Shadow => "shadow",
            },
            identity: settings.proxy.as_ref().map(|p| p.identity.mode.as_str()),
        };
        Ok(Self {
            banner,
            listener,
            api_addr,
            api_conn: settings.api.conn,
            state,
            stop,
            tasks: vec![
                ("org-change follower", follower, None),
                ("catalog reloader", reloader, None),
                ("billing scheduler", downgrades, None),
                ("reservation sweeper", sweeper, None),
                ("redis eviction check", eviction, None),
                ("notification delivery", delivery, None),
                ("concurrency slots", slots_task, Some(slots_stop)),
                ("lease settler", lease_settler, Some(leases_stop)),
                ("redis recovery", recovery, Some(recovery_stop)),
                ("notification writer", writer, Some(writer_stop)),
                ("usage flusher", flusher, Some(flush_stop)),
            ],
            proxy,
        })
    }

    /// The proxy's bound address (`None` without `[proxy]`).
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy.as_ref().map(ProxyServer::local_addr)
    }

    /// The proxy's state (counters), when the proxy is configured.
    pub fn proxy_state(&self) -> Option<Arc<ProxyState>> {
        self.proxy.as_ref().map(ProxyServer::state)
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn state(&self) -> &SharedState {
        &self.state
    }

    /// A token that stops the application when cancelled (tests use it instead of a signal).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Serve until `shutdown` resolves or the stop token is cancelled, then drain and stop the
    /// background tasks.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = self.stop.clone();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                tokio::select! {
                    _ = shutdown => stop.cancel(),
                    _ = stop.cancelled() => {}
                }
            }
        });
        let b = &self.banner;
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            api = %self.api_addr,
            proxy = %self.proxy_addr().map_or_else(|| "off".to_string(), |a| a.to_string()),
            identity = b.identity.unwrap_or("-"),
            catalog = %b.catalog,
            redis = %b.redis,
            postgres = %b.postgres,
            billing = %b.billing,
            enforcement = b.enforcement,
            "quota-gateway serving"
        );
        // The proxy drains on its own (up to `[proxy] drain_timeout`) while the API does the same.
        let proxy = self
            .proxy
            .map(|p| tokio::spawn(p.serve(stop.child_token())));
        let api = tokio::spawn(serve_api(
            self.listener,
            self.state.clone(),
            self.api_conn,
            stop.clone(),
        ));
        let served = api.await;
        stop.cancel();
        if let Some(proxy) = proxy {
            match proxy.await {
                Ok(()) => tracing::info!(task = "proxy", "stopped"),
                Err(e) => tracing::error!(task = "proxy", error = %e, "task failed"),
            }
        }
        for (name, task, own_stop) in self.tasks {
            if let Some(own_stop) = own_stop {
                own_stop.cancel();
            }
            match tokio::time::timeout(TASK_STOP, task).await {
                Ok(Ok(())) => tracing::info!(task = name, "stopped"),
                Ok(Err(e)) => tracing::error!(task = name, error = %e, "task failed"),
                Err(_) => tracing::warn!(
                    task = name,
                    waited_s = TASK_STOP.as_secs(),
                    "did not stop in time; leaving it"
                ),
            }
        }
        served.context("serving the API")
    }
}

/// The API listener: the shared accept loop (`crate::serve`) in front of the axum router, then a
/// drain of up to `API_DRAIN` once `stop` fires.
async fn serve_api(
    listener: TcpListener,
    state: SharedState,
    conn: ConnSettings,
    stop: CancellationToken,
) {
    use axum::extract::ConnectInfo;
    use tower::ServiceExt as _;
    let router = api::router(state.clone());
    let force = CancellationToken::new();
    let listening = crate::serve::Listener {
        name: "api",
        conn,
        metrics: state.metrics.clone(),
    };
    let conns = crate::serve::accept_loop(listener, listening, stop, force.clone(), |peer| {
        let router = router.clone();
        move |mut req: http::Request<crate::serve::RequestBody>| {
            // The flood guard keys on the client address, as with axum's own server.
            req.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                match router.oneshot(req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
        }
    })
    .await;
    if tokio::time::timeout(API_DRAIN, conns.wait()).await.is_err() {
        tracing::warn!(
            drain_s = API_DRAIN.as_secs(),
            "API drain time over; closing what is left"
        );
        force.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), conns.wait()).await;
    }
}
