//! The accept loop both listeners (API and proxy) share, with the request hygiene they share.
//!
//! One loop, so that a slow or abusive client meets the same bounds on either port:
//! - **connection cap**: a semaphore of `max_connections` slots; at the cap the loop stops
//!   accepting until a connection closes (new clients wait in the kernel backlog) instead of
//!   accepting and dropping in a hot loop;
//! - **header read timeout**: hyper's own for every HTTP/1 request head (it also ends idle
//!   keep-alive connections), plus one here for a fresh connection's first request, which also
//!   covers the protocol sniffing before hyper's timer exists and the HTTP/2 preface;
//! - **body idle timeout**: the request body is wrapped (`RequestBody`) so that a pause longer
//!   than `body_idle_timeout` while the gateway reads it ends the body with an error; if the
//!   response has not started, the client gets a 408, otherwise the connection is cut;
//! - **Host**: two `Host` headers, or one that disagrees with an absolute-form target, get a 400
//!   (RFC 9112 §3.2) before any handler runs.
//!
//! Shutdown: when `stop` fires the loop returns its (closed) tracker of connections, each told to
//! finish its in-flight requests; the caller decides how long to wait and cancels `force` to cut
//! what is left.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use bytes::Bytes;
use http::{Request, Response, header};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::error::ApiError;
use crate::metrics::Metrics;

/// One listener's bounds and where it reports.
pub struct Listener {
    /// `api` or `proxy`: the metric label and the log field.
    pub name: &'static str,
    pub conn: ConnSettings,
    pub metrics: Arc<Metrics>,
}

/// Accept connections on `listener` until `stop` fires and serve each with the handler `make`
/// builds for its peer. Returns the tracker of the connections still open (closed: it only
/// shrinks); they finish in-flight requests, or stop when `force` is cancelled.
pub async fn accept_loop<M, H, Fut>(
    listener: TcpListener,
    l: Listener,
    stop: CancellationToken,
    force: CancellationToken,
    make: M,
) -> TaskTracker
where
    M: Fn(SocketAddr) -> H,
    H: Fn(Request<RequestBody>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(l.conn.header_read_timeout);
    let slots = Arc::new(Semaphore::new(l.conn.max_connections.get()));
    let conns = TaskTracker::new();
    let counters = Counters {
        open: l.metrics.connections_open.with_label_values(&[l.name]),
        header_timeouts: l
            .metrics
            .client_timeouts
            .with_label_values(&[l.name, "header"]),
        body_timeouts: l
            .metrics
            .client_timeouts
            .with_label_values(&[l.name, "body"]),
    };
    let at_cap = l.metrics.connections_at_cap.with_label_values(&[l.name]);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                at_cap.inc();
                tracing::warn!(
                    listener = l.name,
                    max = l.conn.max_connections.get(),
                    "connection cap reached; accepting again when one closes"
                );
                tokio::select! {
                    _ = stop.cancelled() => break,
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                }
            }
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(listener = l.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = Arc::new(make(peer));
        let conn_state = Arc::new(ConnState {
            body_idle_timeout: l.conn.body_idle_timeout,
            body_timeouts: counters.body_timeouts.clone(),
            first_request_seen: AtomicBool::new(false),
        });
        let builder = builder.clone();
        let stop = stop.clone();
        let force = force.clone();
        let header_read_timeout = l.conn.header_read_timeout;
        let open = OpenGuard::new(counters.open.clone());
        let header_timeouts = counters.header_timeouts.clone();
        conns.spawn(async move {
            let _slot = slot;
            let _open = open;
            let state = conn_state.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.serve(req, &*handler).await) }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let first = tokio::time::sleep(header_read_timeout);
            tokio::pin!(first);
            let mut awaiting_first = true;
            let mut draining = false;
            // A client that goes away ends `conn`, which drops the request future and whatever
            // it was doing: nothing is left behind.
            let result = loop {
                tokio::select! {
                    r = conn.as_mut() => break r,
                    _ = first.as_mut(), if awaiting_first => {
                        awaiting_first = false;
                        if !conn_state.first_request_seen.load(Ordering::Relaxed) {
                            header_timeouts.inc();
                            break Ok(());
                        }
                    }
                    _ = stop.cancelled(), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = force.cancelled(), if draining => break Ok(()),
                }
            };
            if let Err(e) = result {
                if e.downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout)
                {
                    header_timeouts.inc();
                }
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    conns.close();
    conns
}

struct Counters {
    open: IntGauge,
    header_timeouts: IntCounter,
    body_timeouts: IntCounter,
}

/// Counts a connection in `quota_gateway_connections_open` for as long as its task lives.
struct OpenGuard(IntGauge);

impl OpenGuard {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct ConnState {
    body_idle_timeout: Duration,
    body_timeouts: IntCounter,
    first_request_seen: AtomicBool,
}

impl ConnState {
    /// The hygiene every request gets before and after its handler.
    async fn serve<H, Fut>(&self, req: Request<Incoming>, handler: &H) -> Response<Body>
    where
        H: Fn(Request<RequestBody>) -> Fut,
        Fut: Future<Output = Response<Body>>,
    {
        self.first_request_seen.store(true, Ordering::Relaxed);
        if let Err(e) = check_host(&req) {
            return e.into_response();
        }
        let (parts, body) = req.into_parts();
        let http1 = parts.version < http::Version::HTTP_2;
        let body = RequestBody::new(body, self.body_idle_timeout);
        let seen = body.seen.clone();
        let mut response = handler(Request::from_parts(parts, body)).await;
        let Some(seen) = seen else {
            return response;
        };
        if seen.expired.load(Ordering::Relaxed) {
            self.body_timeouts.inc();
            // The handler saw its body fail; what it made of that (a 400, a 502) is not what
            // happened.
            return ApiError::RequestTimeout.into_response();
        }
        // An answer given before the body was read (401, 402, 429 before forwarding): hyper
        // will not read the rest, so the connection cannot carry another request. Say so, or a
        // client that reuses it sends its next request into a closing socket.
        // (hyper reads on by itself what is already buffered, but not what has yet to arrive,
        // so a denied POST costs its client a new connection: a small price for never
        // breaking one.) An upgrade keeps its `Connection: upgrade`.
        if http1
            && !seen.finished.load(Ordering::Relaxed)
            && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
        {
            response
                .headers_mut()
                .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        response
    }
}

/// RFC 9112 §3.2: exactly one `Host`, and, with an absolute-form target, the same authority.
pub fn check_host<B>(req: &Request<B>) -> Result<(), ApiError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ApiError::BadHost(
            "the request has more than one Host header",
        ));
    }
    if let (Some(target), Some(host)) = (req.uri().authority(), host) {
        let default_port = match req.uri().scheme_str() {
            Some("https") => 443,
            _ => 80,
        };
        let agrees = host
            .to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .is_some_and(|h| {
                h.host().eq_ignore_ascii_case(target.host())
                    && h.port_u16().unwrap_or(default_port)
                        == target.port_u16().unwrap_or(default_port)
            });
        if !agrees {
            return Err(ApiError::BadHost(
                "the Host header disagrees with the authority of the request target",
            ));
        }
    }
    Ok(())
}

/// A request body that ends with `BodyError::Idle` when nothing arrives for `timeout` while it
/// is being read. The clock only runs while someone waits for the next frame: a handler busy
/// elsewhere (deciding, waiting for a slow upstream to read) does not count against the client.
/// Empty bodies carry no timer and no flag, so the common GET allocates nothing here.
pub struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// What the connection needs to know about how reading went; `None` for a body that was
    /// already complete.
    seen: Option<Arc<BodySeen>>,
}

/// Shared between a body and the connection that serves its request.
#[derive(Default)]
struct BodySeen {
    /// The idle timeout fired.
    expired: AtomicBool,
    /// The body was read to its end.
    finished: AtomicBool,
}

impl RequestBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        let seen = (!inner.is_end_stream()).then(|| Arc::new(BodySeen::default()));
        Self {
            inner,
            timeout,
            sleep: None,
            armed: false,
            seen,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Read(#[from] hyper::Error),
    #[error("the request body stopped arriving")]
    Idle,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this
            .seen
            .as_ref()
            .is_some_and(|s| s.expired.load(Ordering::Relaxed))
        {
            return Poll::Ready(Some(Err(BodyError::Idle)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                if let Some(seen) = &this.seen
                    && (frame.is_none() || this.inner.is_end_stream())
                {
                    seen.finished.store(true, Ordering::Relaxed);
                }
                Poll::Ready(frame.map(|f| f.map_err(BodyError::Read)))
            }
            Poll::Pending => {
                let Some(seen) = &this.seen else {
                    return Poll::Pending;
                };
                let deadline = Instant::now() + this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.armed {
                    sleep.as_mut().reset(deadline);
                    this.armed = true;
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        seen.expired.store(true, Ordering::Relaxed);
                        Poll::Ready(Some(Err(BodyError::Idle)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri(target);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_rules() {
        assert!(check_host(&req("/x", &["a.example"])).is_ok());
        assert!(check_host(&req("/x", &[])).is_ok());
        assert!(check_host(&req("/x", &["a.example", "b.example"])).is_err());
        assert!(check_host(&req("/x", &["a.example", "a.example"])).is_err());
        assert!(check_host(&req("http://a.example/x", &["A.example"])).is_ok());
        assert!(check_host(&req("http://a.example/x", &["a.example:80"])).is_ok());
        assert!(check_host(&req("http://a.example:8080/x", &["a.example:8080"])).is_ok());
        assert!(check_host(&req("http://a.example/x", &["b.example"])).is_err());
        assert!(check_host(&req("http://a.example:81/x", &["a.example"])).is_err());
        assert!(check_host(&req("http://a.example/x", &["not a host"])).is_err());
        assert!(check_host(&req("http://a.example/x", &[])).is_ok());
    }
}

/// `[api.conn]` / `[proxy.conn]`: what one listener grants a client connection. The defaults
/// are what a slow or idle client cannot turn into a resource drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnSettings {
    /// Time to send a request's headers (and, on a fresh connection, the first request); it also
    /// bounds how long an idle HTTP/1 keep-alive connection waits for its next request.
    pub header_read_timeout: Duration,
    /// Longest pause allowed inside a request body while the gateway is reading it.
    pub body_idle_timeout: Duration,
    /// Connections served at once; past it the listener stops accepting until one closes.
    pub max_connections: std::num::NonZeroUsize,
}

impl Default for ConnSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            max_connections: std::num::NonZeroUsize::new(10_000).expect("non-zero"),
        }
    }
}
