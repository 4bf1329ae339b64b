//! The proxy's settings, as `config` parses and validates them.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::proxy::routes::RouteTable;
use crate::serve::ConnSettings;

/// `[proxy]`, `[identity]` and `[[routes]]`: the metering reverse proxy.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    /// Default upstream (`http://host:port`); a route may name its own.
    pub upstream: http::Uri,
    pub connect_timeout: Duration,
    /// The whole upstream exchange up to the response headers; past it the client gets a 504.
    pub request_timeout: Duration,
    /// How long a shutdown waits for in-flight requests before closing them.
    pub drain_timeout: Duration,
    /// `[proxy.conn]`: timeouts and the connection cap of the proxy listener.
    pub conn: ConnSettings,
    pub refund_on: RefundOn,
    pub identity: IdentitySettings,
    pub routes: RouteTable,
}

/// Outcomes after which a request's charges are given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundOn {
    pub server_error: bool,
    pub connect_error: bool,
    pub timeout: bool,
}

impl Default for RefundOn {
    fn default() -> Self {
        Self {
            server_error: true,
            connect_error: true,
            timeout: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityMode {
    /// `Authorization: Bearer <key>` or `x-api-key`, resolved through `api_keys`.
    ApiKey,
    /// The org id is in a header set by a trusted auth layer in front of the gateway.
    Header,
}

impl IdentityMode {
    /// As written in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            IdentityMode::ApiKey => "api_key",
            IdentityMode::Header => "header",
        }
    }
}

#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub mode: IdentityMode,
    /// The org header: read in `header` mode, removed from clients in `api_key` mode.
    pub header: http::HeaderName,
    /// The header naming the end user a request is for (`per = "user"` limits); `None`: no
    /// user level. Forwarded to the upstream unchanged.
    pub user_header: Option<http::HeaderName>,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            mode: IdentityMode::ApiKey,
            header: http::HeaderName::from_static("x-org-id"),
            user_header: None,
        }
    }
}
