//! Header hygiene between client, gateway and upstream.
//!
//! Hop-by-hop fields describe one connection, not the message (RFC 9110 §7.6.1): a proxy must not
//! forward them, including every field the `Connection` header names. Identity fields
//! (`x-org-id`, `x-plan-id`) are the gateway's statement to the upstream, so whatever a client
//! sent under those names is removed before the gateway's values are set.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_ORG_ID: HeaderName = HeaderName::from_static("x-org-id");
pub static X_PLAN_ID: HeaderName = HeaderName::from_static("x-plan-id");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Fields that are hop-by-hop whether or not `Connection` names them: the RFC 9110 §7.6.1 list,
/// the proxy authentication pair (meant for this hop's proxy) and `Trailer`.
/// Typed names, not strings: removing by `&str` parses the name again on every call, which was
/// a visible share of the proxy's per-request instructions.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Remove every hop-by-hop field, including those listed in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names is cheaper than nine removals.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Whether the request asks to switch protocols (a WebSocket handshake); returns the `Upgrade`
/// value to pass on, since removing hop-by-hop fields drops it.
pub fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Re-add the two fields a protocol switch needs on the next hop.
pub fn set_upgrade(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// The client end of one downstream connection, worked out once per connection rather than once
/// per request.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's IP as an `X-Forwarded-For` entry.
    ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .expect("an IP address is a valid header value");
        Self { ip }
    }
}

/// Where the request came from, for the `X-Forwarded-*` fields.
pub struct ClientInfo<'a> {
    pub peer: &'a Peer,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2) as the client sent it.
    pub host: Option<&'a str>,
}

/// Append the client to `X-Forwarded-For` (keeping earlier hops) and set the protocol and host.
pub fn set_forwarded(headers: &mut HeaderMap, client: &ClientInfo<'_>) {
    let ip = &client.peer.ip;
    let chain = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(prev) if !prev.trim_ascii().is_empty() => {
            let mut chain = Vec::with_capacity(prev.len() + 2 + ip.len());
            chain.extend_from_slice(prev);
            chain.extend_from_slice(b", ");
            chain.extend_from_slice(ip.as_bytes());
            HeaderValue::from_bytes(&chain).ok()
        }
        _ => Some(ip.clone()),
    };
    if let Some(v) = chain {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    // The gateway listens in plain HTTP; TLS, when any, ends before it.
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    match client.host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(v) => {
            headers.insert(X_FORWARDED_HOST.clone(), v);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// The client's `x-request-id` when it is a sane token, else a fresh one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 200 && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            let mut buf = uuid::Uuid::encode_buffer();
            let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
            HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn removes_listed_and_connection_named_fields() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "x-other"),
            ("x-secret-hop", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "3"),
            ("authorization", "Bearer y"),
        ]);
        remove_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, vec!["authorization", "x-kept"]);
    }

    #[test]
    fn detects_upgrades() {
        let h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(upgrade_request(&h).unwrap(), "websocket");
        let h = map(&[("upgrade", "websocket")]);
        assert!(upgrade_request(&h).is_none());
    }

    #[test]
    fn appends_to_forwarded_for() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-host", "evil"),
        ]);
        let peer = Peer::new("127.0.0.1:5000".parse().unwrap());
        set_forwarded(
            &mut h,
            &ClientInfo {
                peer: &peer,
                host: Some("api.example.com"),
            },
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "api.example.com");
        let mut h = HeaderMap::new();
        set_forwarded(
            &mut h,
            &ClientInfo {
                peer: &peer,
                host: None,
            },
        );
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1");
        assert!(h.get(&X_FORWARDED_HOST).is_none());
    }

    #[test]
    fn keeps_or_makes_request_ids() {
        let h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&h), "abc-123");
        let h = map(&[("x-request-id", "has space")]);
        assert_ne!(request_id(&h), "has space");
        assert_eq!(request_id(&HeaderMap::new()).len(), 36);
    }
}
