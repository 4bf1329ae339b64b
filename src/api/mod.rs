//! The HTTP API on `[api].listen`: `/v1/*` (quota checks and usage), `/admin/*`, health,
//! `/openapi.json`.
//!
//! Routes are registered through `Routes`, which records each (method, path) pair as it adds it,
//! so the OpenAPI document can be checked against exactly what the router serves.

mod admin;
mod auth;
mod credits;
mod extract;
mod guard;
mod health;
mod observe;
mod reservations;
mod v1;

use std::sync::Arc;

use axum::Router;
use axum::http::Method;
use axum::routing::{MethodRouter, delete, get, post, put};
use secrecy::SecretString;
use sqlx::PgPool;

use crate::http::error::ApiError;
use crate::metrics::Metrics;
use crate::quota::QuotaService;
use crate::webhooks::{Webhooks, handler};

pub use extract::ApiJson;
pub use guard::FloodGuard;
pub use v1::parse_month;

/// Shared state of every handler.
pub struct AppState {
    pub quota: Arc<QuotaService>,
    pub metrics: Arc<Metrics>,
    pub pool: PgPool,
    pub admin_token: SecretString,
    pub service_token: Option<SecretString>,
    pub guard: FloodGuard,
    pub reservations: Arc<crate::reservations::Reservations>,
    /// The webhook endpoints' own state (see `webhooks::Webhooks`).
    pub webhooks: Webhooks,
}

impl axum::extract::FromRef<SharedState> for Webhooks {
    fn from_ref(state: &SharedState) -> Self {
        state.webhooks.clone()
    }
}

pub type SharedState = Arc<AppState>;

/// The OpenAPI 3.1 description of this API, served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// A router that remembers what it serves.
pub struct Routes {
    router: Router<SharedState>,
    served: Vec<(Method, &'static str)>,
}

impl Routes {
    fn new() -> Self {
        Self {
            router: Router::new(),
            served: Vec::new(),
        }
    }

    fn add(
        mut self,
        method: Method,
        path: &'static str,
        handler: MethodRouter<SharedState>,
    ) -> Self {
        self.served.push((method, path));
        self.router = self.router.route(path, handler);
        self
    }

    /// Every (method, path) the router serves, in axum's `{param}` syntax.
    pub fn served(&self) -> &[(Method, &'static str)] {
        &self.served
    }
}

/// All routes, grouped by who may call them.
pub fn routes() -> Routes {
    Routes::new()
        // Health and docs: unauthenticated, cheap.
        .add(Method::GET, "/healthz", get(health::healthz))
        .add(Method::GET, "/readyz", get(health::readyz))
        .add(Method::GET, "/openapi.json", get(health::openapi))
        .add(Method::GET, "/metrics", get(health::metrics))
        // Product services: the service token when configured.
        .add(Method::POST, "/v1/check", post(v1::check))
        .add(Method::POST, "/v1/usage", post(v1::usage))
        .add(Method::POST, "/v1/reservations", post(reservations::create))
        .add(
            Method::POST,
            "/v1/reservations/{id}/settle",
            post(reservations::settle),
        )
        .add(
            Method::DELETE,
            "/v1/reservations/{id}",
            delete(reservations::release),
        )
        .add(Method::GET, "/v1/orgs/{org_id}/usage", get(v1::org_usage))
        .add(
            Method::GET,
            "/v1/orgs/{org_id}/entitlements",
            get(v1::entitlements),
        )
        // Operators: the admin token, always.
        .add(Method::GET, "/admin/orgs", get(admin::list_orgs))
        .add(Method::PUT, "/admin/orgs/{org_id}", put(admin::put_org))
        .add(Method::GET, "/admin/orgs/{org_id}", get(admin::get_org))
        .add(
            Method::POST,
            "/admin/orgs/{org_id}/keys",
            post(admin::create_key),
        )
        .add(
            Method::DELETE,
            "/admin/keys/{id}",
            delete(admin::revoke_key),
        )
        .add(
            Method::PUT,
            "/admin/keys/{id}/limits",
            put(admin::put_key_limits),
        )
        .add(
            Method::GET,
            "/admin/keys/{id}/limits",
            get(admin::get_key_limits),
        )
        .add(
            Method::DELETE,
            "/admin/keys/{id}/limits",
            delete(admin::delete_key_limits),
        )
        .add(
            Method::POST,
            "/admin/orgs/{org_id}/adjustments",
            post(admin::adjust),
        )
        .add(
            Method::POST,
            "/admin/orgs/{org_id}/grants",
            post(credits::create),
        )
        .add(
            Method::GET,
            "/admin/orgs/{org_id}/grants",
            get(credits::list),
        )
        .add(
            Method::DELETE,
            "/admin/orgs/{org_id}/grants/{id}",
            delete(credits::void),
        )
        .add(
            Method::PUT,
            "/admin/orgs/{org_id}/notifications",
            put(admin::put_notifications),
        )
        .add(
            Method::GET,
            "/admin/orgs/{org_id}/notifications",
            get(admin::get_notifications),
        )
        .add(
            Method::DELETE,
            "/admin/orgs/{org_id}/notifications",
            delete(admin::delete_notifications),
        )
        // Payment providers: their signatures, verified over the raw body.
        .add(Method::POST, "/webhooks/stripe", post(handler::stripe_hook))
        .add(Method::POST, "/webhooks/dodo", post(handler::dodo_hook))
        .add(Method::POST, "/webhooks/polar", post(handler::polar_hook))
        .add(
            Method::POST,
            "/webhooks/standard/{name}",
            post(handler::standard_hook),
        )
}

/// The complete application router with auth layers and JSON fallbacks.
pub fn router(state: SharedState) -> Router {
    let Routes { router, .. } = routes();
    router
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_tokens,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::flood_guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe::requests,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
