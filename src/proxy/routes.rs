//! Which route a proxied request takes: pure matching, no I/O.
//!
//! Routes are tried in configuration order and the first match wins, so an operator can put a
//! narrow rule (`POST /v1/chat/completions`) before a broad one (`/v1/*`) and read the table top to
//! bottom the way the gateway does. A request that matches nothing takes the default route, or is
//! refused when none is configured (forwarding unknown paths unmetered would be a silent leak).

use http::header::HeaderName;
use http::{Method, Uri};

/// `path` of a route: an exact path, or a prefix written with a trailing `/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    /// The part before `/*`, without the slash: `/v1/chat/*` is `Prefix("/v1/chat")` and matches
    /// `/v1/chat` and everything under `/v1/chat/`, but not `/v1/chatter`. `/*` matches any path.
    Prefix(String),
}

impl PathPattern {
    /// Parse a pattern as written in `gateway.toml`; the error is the reason shown to the operator.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !raw.starts_with('/') {
            return Err(format!("`{raw}` must start with '/'"));
        }
        if raw
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'?' || b == b'#')
        {
            return Err(format!(
                "`{raw}` must be a path only (no whitespace, query or fragment)"
            ));
        }
        match raw.strip_suffix("/*") {
            Some(prefix) if !prefix.contains('*') => Ok(PathPattern::Prefix(prefix.to_string())),
            _ if raw.contains('*') => Err(format!(
                "`{raw}`: '*' is only allowed as a trailing \"/*\" (a prefix match)"
            )),
            _ => Ok(PathPattern::Exact(raw.to_string())),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => p == path,
            PathPattern::Prefix(p) => match path.strip_prefix(p.as_str()) {
                Some(rest) => rest.is_empty() || rest.starts_with('/'),
                None => false,
            },
        }
    }
}

/// One metric a route charges per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeSpec {
    pub metric: String,
    pub amount: i64,
}

/// A response header through which the upstream reports usage after the fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSpec {
    pub header: HeaderName,
    pub metric: String,
}

/// Where the estimate a route reserves is read from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Estimate {
    /// A top-level member of a JSON request body (read from its first `reserve::PREFIX_LIMIT`
    /// bytes).
    Json(String),
    /// A request header.
    Header(HeaderName),
    /// Always the default.
    Default,
}

/// What a request should pay once the response tells its true cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    /// The reservation stands (charged at the estimate).
    Reserved,
    /// The reservation is given back.
    Zero,
}

/// Reserve, then settle (`reserve` and `settle` of a route): the estimate is charged with the
/// route's charges before forwarding, and the difference to the actual, read from the response,
/// is refunded or charged afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveSpec {
    pub metric: String,
    pub estimate: Estimate,
    /// The estimate when the request does not give one.
    pub default: i64,
    /// A response header carrying the actual.
    pub from_header: Option<HeaderName>,
    /// An HTTP trailer carrying the actual.
    pub from_trailer: Option<HeaderName>,
    /// The JSON path (split at dots) of the actual in a server-sent event's `data:` line; the
    /// last event carrying it wins.
    pub from_sse: Option<Vec<String>>,
    pub on_missing: OnMissing,
}

/// What happens to requests that take a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAction {
    /// Overrides `[proxy].upstream`.
    pub upstream: Option<Uri>,
    pub charges: Vec<ChargeSpec>,
    pub report: Vec<ReportSpec>,
    /// Reserve an estimate, settle the actual (`None`: the route charges fixed amounts only).
    pub reserve: Option<ReserveSpec>,
    /// Forwarded without identity or charge (health checks, public assets).
    pub unmetered: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None`: any method.
    pub method: Option<Method>,
    pub path: PathPattern,
    pub action: RouteAction,
}

impl Route {
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method) && self.path.matches(path)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteTable {
    pub routes: Vec<Route>,
    pub default_route: Option<RouteAction>,
}

/// The route a request matched, for logs: its pattern, or `default`.
pub enum RouteLabel<'a> {
    Pattern(&'a PathPattern),
    Default,
    None,
}

impl std::fmt::Display for RouteLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteLabel::Pattern(PathPattern::Exact(p)) => f.write_str(p),
            RouteLabel::Pattern(PathPattern::Prefix(p)) => write!(f, "{p}/*"),
            RouteLabel::Default => f.write_str("default"),
            RouteLabel::None => f.write_str("-"),
        }
    }
}

impl RouteTable {
    /// Which route `find` would pick, as a label (no allocation until it is formatted).
    pub fn route_label(&self, method: &Method, path: &str) -> RouteLabel<'_> {
        match self.routes.iter().find(|r| r.matches(method, path)) {
            Some(r) => RouteLabel::Pattern(&r.path),
            None if self.default_route.is_some() => RouteLabel::Default,
            None => RouteLabel::None,
        }
    }

    /// The action for a request: the first matching route's, else the default route's.
    pub fn find(&self, method: &Method, path: &str) -> Option<&RouteAction> {
        self.routes
            .iter()
            .find(|r| r.matches(method, path))
            .map(|r| &r.action)
            .or(self.default_route.as_ref())
    }

    /// Every metric any route charges or records, with where it is named (for validation).
    pub fn metric_names(&self) -> impl Iterator<Item = (String, &str)> {
        let routes = self
            .routes
            .iter()
            .enumerate()
            .flat_map(|(i, r)| action_metrics(format!("routes[{i}]"), &r.action));
        let default = self
            .default_route
            .iter()
            .flat_map(|a| action_metrics("proxy.default_route".to_string(), a));
        routes.chain(default)
    }
}

fn action_metrics(key: String, a: &RouteAction) -> Vec<(String, &str)> {
    let charges = a
        .charges
        .iter()
        .enumerate()
        .map(|(j, c)| (format!("{key}.charges[{j}].metric"), c.metric.as_str()));
    let reports = a
        .report
        .iter()
        .enumerate()
        .map(|(j, r)| (format!("{key}.report[{j}].metric"), r.metric.as_str()));
    let reserve = a
        .reserve
        .iter()
        .map(|r| (format!("{key}.reserve.metric"), r.metric.as_str()));
    charges.chain(reports).chain(reserve).collect()
}

impl RouteAction {
    /// The metrics this route charges only after the response (reported or settled): their hard
    /// quotas must have room left before a request is forwarded (`Limit::headroom`).
    pub fn charged_after(&self) -> impl Iterator<Item = &str> {
        self.report
            .iter()
            .map(|r| r.metric.as_str())
            .chain(self.reserve.iter().map(|r| r.metric.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(tag: i64) -> RouteAction {
        RouteAction {
            upstream: None,
            charges: vec![ChargeSpec {
                metric: "requests".into(),
                amount: tag,
            }],
            report: vec![],
            reserve: None,
            unmetered: false,
        }
    }

    fn route(method: Option<Method>, path: &str, tag: i64) -> Route {
        Route {
            method,
            path: PathPattern::parse(path).unwrap(),
            action: action(tag),
        }
    }

    #[test]
    fn parses_exact_and_prefix_patterns() {
        assert_eq!(
            PathPattern::parse("/health"),
            Ok(PathPattern::Exact("/health".into()))
        );
        assert_eq!(
            PathPattern::parse("/v1/chat/*"),
            Ok(PathPattern::Prefix("/v1/chat".into()))
        );
        assert_eq!(PathPattern::parse("/*"), Ok(PathPattern::Prefix("".into())));
        for bad in [
            "health", "/v1/*/x", "/v1*", "/a b", "/a?b", "/a#b", "/**", "",
        ] {
            assert!(PathPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn prefix_matches_on_segment_boundaries() {
        let p = PathPattern::parse("/v1/chat/*").unwrap();
        assert!(p.matches("/v1/chat"));
        assert!(p.matches("/v1/chat/"));
        assert!(p.matches("/v1/chat/completions"));
        assert!(!p.matches("/v1/chatter"));
        assert!(!p.matches("/v1"));
        let all = PathPattern::parse("/*").unwrap();
        assert!(all.matches("/"));
        assert!(all.matches("/anything/at/all"));
        let exact = PathPattern::parse("/health").unwrap();
        assert!(exact.matches("/health"));
        assert!(!exact.matches("/health/"));
        assert!(!exact.matches("/healthz"));
    }

    #[test]
    fn first_match_wins_and_methods_filter() {
        let table = RouteTable {
            routes: vec![
                route(Some(Method::POST), "/v1/chat/*", 1),
                route(None, "/v1/*", 2),
            ],
            default_route: Some(action(9)),
        };
        let tag = |m: Method, p: &str| table.find(&m, p).map(|a| a.charges[0].amount);
        assert_eq!(tag(Method::POST, "/v1/chat/completions"), Some(1));
        assert_eq!(tag(Method::GET, "/v1/chat/completions"), Some(2));
        assert_eq!(tag(Method::GET, "/v1"), Some(2));
        assert_eq!(tag(Method::GET, "/other"), Some(9));
    }

    #[test]
    fn no_default_route_means_no_match() {
        let table = RouteTable {
            routes: vec![route(None, "/health", 1)],
            default_route: None,
        };
        assert!(table.find(&Method::GET, "/nope").is_none());
        assert!(table.find(&Method::GET, "/health").is_some());
    }

    #[test]
    fn lists_metrics_with_their_keys() {
        let mut a = action(1);
        a.report.push(ReportSpec {
            header: HeaderName::from_static("x-usage-tokens"),
            metric: "tokens".into(),
        });
        let table = RouteTable {
            routes: vec![Route {
                method: None,
                path: PathPattern::parse("/*").unwrap(),
                action: a,
            }],
            default_route: Some(action(1)),
        };
        let names: Vec<_> = table.metric_names().collect();
        assert_eq!(
            names,
            vec![
                ("routes[0].charges[0].metric".to_string(), "requests"),
                ("routes[0].report[0].metric".to_string(), "tokens"),
                (
                    "proxy.default_route.charges[0].metric".to_string(),
                    "requests"
                ),
            ]
        );
    }
}
