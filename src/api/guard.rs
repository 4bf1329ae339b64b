//! Flood guard for `/admin/*` and `/webhooks/*`: a per-client-IP rate limit (`governor`), so a
//! misbehaving script or a forged-webhook flood cannot exhaust the database pool that decisions
//! also need. The defaults leave room for a payment provider's retry bursts. The key is the peer
//! address; behind a load balancer that is the balancer's address, so raise the limit there.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use governor::{DefaultKeyedRateLimiter, Quota};

use super::SharedState;
use crate::http::error::error_response;

pub struct FloodGuard {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl FloodGuard {
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            ),
        }
    }

    fn admit(&self, ip: IpAddr) -> bool {
        if self.limiter.len() > 10_000 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&ip).is_ok()
    }
}

pub async fn flood_guard(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path.starts_with("/admin/") || path.starts_with("/webhooks/") {
        let ip = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        if let Some(ip) = ip
            && !state.guard.admit(ip)
        {
            let mut r = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "too many requests from this address; slow down",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    }
    next.run(req).await
}
