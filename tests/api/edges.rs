//! Hostile input at the edges, over real sockets: path spellings that could reach a metered route
//! unmetered, duplicate `Host`, slow clients and the connection cap, on both listeners.
//!
//! Requests are written by hand on a TCP stream: HTTP clients normalise paths themselves
//! (`/public/../v1` never leaves reqwest as such), which is exactly what an attacker does not do.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use quota_gateway::config::{ConnSettings, ProxySettings};
use quota_gateway::proxy::routes::{ChargeSpec, PathPattern, Route, RouteAction};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{
    TestApp, TestOptions, eventually, metric_value, proxy_settings, spawn_app_with, spawn_upstream,
};

/// Generous bound for what must happen: a hang guard, never a measurement.
const HANG: Duration = Duration::from_secs(10);

fn route(path: &str, unmetered: bool) -> Route {
    Route {
        method: None,
        path: PathPattern::parse(path).unwrap(),
        action: RouteAction {
            upstream: None,
            charges: if unmetered {
                vec![]
            } else {
                vec![ChargeSpec {
                    metric: "requests".into(),
                    amount: 1,
                }]
            },
            report: vec![],
            reserve: None,
            unmetered,
        },
    }
}

/// `/public/*` unmetered, `/v1/*` metered, nothing else (no default route), `api_key` mode.
fn edge_proxy(upstream: SocketAddr) -> ProxySettings {
    let mut p = proxy_settings(upstream);
    p.routes.routes = vec![route("/public/*", true), route("/v1/*", false)];
    p.routes.default_route = None;
    p
}

async fn edge_app(p: ProxySettings, api_conn: Option<ConnSettings>) -> TestApp {
    spawn_app_with(TestOptions {
        proxy: Some(p),
        api_conn,
        ..TestOptions::default()
    })
    .await
}

fn short(conn: &mut ConnSettings) {
    conn.header_read_timeout = Duration::from_millis(300);
    conn.body_idle_timeout = Duration::from_millis(300);
}

/// Status and body of the answer to `request` (the connection is read to its end).
async fn exchange(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(HANG, s.read_to_end(&mut buf))
        .await
        .expect("the gateway answers and closes");
    parse(&buf)
}

fn parse(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn get(target: &str, key: Option<&str>) -> String {
    let key = key
        .map(|k| format!("x-api-key: {k}\r\n"))
        .unwrap_or_default();
    format!("GET {target} HTTP/1.1\r\nHost: gw\r\n{key}Connection: close\r\n\r\n")
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<Value>(body.trim())
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// 400, with or without a key; nothing forwarded, nothing charged.
    Rejected,
    /// 401 without a key; with one, forwarded as exactly this path + query and charged once.
    Metered(&'static str),
    /// Forwarded without a key as exactly this, uncharged: a `/public` resource.
    Public(&'static str),
}

/// Every spelling from issue 19, and more.
const SPELLINGS: &[(&str, Expect)] = {
    use Expect::*;
    &[
        ("/v1/chat/completions", Metered("/v1/chat/completions")),
        (
            "/public/../v1/chat/completions",
            Metered("/v1/chat/completions"),
        ),
        (
            "/public/%2e%2e/v1/chat/completions",
            Metered("/v1/chat/completions"),
        ),
        (
            "/public/%2E%2E/v1/chat/completions",
            Metered("/v1/chat/completions"),
        ),
        (
            "/public/.%2e/v1/chat/completions",
            Metered("/v1/chat/completions"),
        ),
        (
            "/public/%2e./v1/chat/completions",
            Metered("/v1/chat/completions"),
        ),
        (
            "/public/./../v1/chat/completions",
            Metered("/v1/chat/completions"),
        ),
        (
            "/public/x/../../v1/chat/completions",
            Metered("/v1/chat/completions"),
        ),
        ("//v1/chat/completions", Metered("/v1/chat/completions")),
        (
            "/public//../v1/chat/completions",
            Metered("/v1/chat/completions"),
        ),
        ("/%76%31/chat/completions", Metered("/v1/chat/completions")),
        (
            "/public/../v1/chat/completions?stream=1&x=%2e%2e",
            Metered("/v1/chat/completions?stream=1&x=%2e%2e"),
        ),
        (
            "http://gw/public/../v1/chat/completions",
            Metered("/v1/chat/completions"),
        ),
        ("/public/..%2fv1/chat/completions", Rejected),
        ("/public/..%2Fv1/chat/completions", Rejected),
        ("/public/%2e%2e%2fv1/chat/completions", Rejected),
        ("/public/..%5cv1/chat/completions", Rejected),
        ("/public/..\\v1/chat/completions", Rejected),
        ("/public/..;/v1/chat/completions", Rejected),
        ("/public/..;jsessionid=1/v1/chat/completions", Rejected),
        ("/public/.;/../v1/chat/completions", Rejected),
        ("/public/%2e%2e;/v1/chat/completions", Rejected),
        // ';' parameters on any segment: Spring and servlet upstreams strip them and route
        // `/v1;x/chat/completions` as `/v1/chat/completions`.
        ("/v1;x/chat/completions", Rejected),
        ("/v1/chat/completions;x=1", Rejected),
        ("/public;x/../v1/chat/completions", Rejected),
        ("/../v1/chat/completions", Rejected),
        ("/public/../../v1/chat/completions", Rejected),
        ("/public/%00/../v1/chat/completions", Rejected),
        ("/public/%zz/../v1/chat/completions", Rejected),
        ("/public/%4", Rejected),
        (
            "/public/%252e%252e/v1/chat/completions",
            Public("/public/%252e%252e/v1/chat/completions"),
        ),
        ("/public/a%2Db", Public("/public/a-b")),
        ("/public/%c3%a9", Public("/public/%C3%A9")),
    ]
};

#[tokio::test]
async fn no_spelling_reaches_a_metered_route_unidentified_or_uncharged() {
    let up = spawn_upstream().await;
    let app = edge_app(edge_proxy(up.addr), None).await;
    let proxy = app.proxy_addr.unwrap();
    let (_, key) = app.create_key("acme").await;
    app.set_plan("acme", "pro").await;
    for &(target, expect) in SPELLINGS {
        let before = up.count();
        let used = app.usage_of("acme", "requests").await;
        let (anon, anon_body) = exchange(proxy, &get(target, None)).await;
        let (keyed, keyed_body) = exchange(proxy, &get(target, Some(&key))).await;
        let charged = app.usage_of("acme", "requests").await - used;
        let forwarded: Vec<String> = up.received()[before..]
            .iter()
            .map(|r| r.uri.to_string())
            .collect();
        match expect {
            Expect::Rejected => {
                assert_eq!((anon, keyed), (400, 400), "{target}: {anon_body}");
                // hyper refuses some targets itself (no body); ours name the reason.
                for body in [&anon_body, &keyed_body] {
                    let code = error_code(body);
                    assert!(body.is_empty() || code == "bad_path", "{target}: {body}");
                }
                assert!(forwarded.is_empty(), "{target} forwarded as {forwarded:?}");
                assert_eq!(charged, 0, "{target}");
            }
            Expect::Metered(path) => {
                assert_eq!(anon, 401, "{target}: {anon_body}");
                assert_eq!(keyed, 200, "{target}: {keyed_body}");
                assert_eq!(forwarded, vec![path.to_string()], "{target}");
                assert_eq!(charged, 1, "{target}");
            }
            Expect::Public(path) => {
                assert_eq!((anon, keyed), (200, 200), "{target}");
                assert_eq!(forwarded, vec![path.to_string(); 2], "{target}");
                assert_eq!(charged, 0, "{target}");
            }
        }
    }
}

/// An nginx binary, if one is installed (`scripts/services.sh` installs it in CI).
fn nginx_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()]);
    for dir in candidates {
        let bin = dir.join("nginx");
        if bin.is_file() {
            return Some(bin);
        }
    }
    None
}

/// nginx on a free loopback port, stopped when dropped. `/v1/` answers `PAID <$uri>`,
/// `/public/` answers `public <$uri>` (nginx's `$uri` is the path it decoded and normalised).
struct Nginx {
    addr: SocketAddr,
    child: tokio::process::Child,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Nginx {
    async fn start(bin: &PathBuf) -> Nginx {
        let dir = std::env::temp_dir().join(format!("qg-nginx-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let addr = crate::helpers::closed_port().await;
        let conf = format!(
            r#"
worker_processes 1;
error_log {dir}/logs/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type text/plain;
    server {{
        listen {addr};
        location /v1/ {{ return 200 "PAID $uri\n"; }}
        location /public/ {{ return 200 "public $uri\n"; }}
        location / {{ return 404 "other $uri\n"; }}
    }}
}}
"#,
            dir = dir.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = tokio::process::Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-g")
            .arg("daemon off;")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts");
        let up = eventually(HANG, || async { TcpStream::connect(addr).await.is_ok() }).await;
        assert!(up.is_some(), "nginx listens on {addr}");
        Nginx {
            addr,
            child,
            _dir: TempDir(dir),
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn nginx_upstream_never_serves_its_paid_location_unmetered() {
    let Some(bin) = nginx_binary() else {
        eprintln!(
            "nginx_upstream_never_serves_its_paid_location_unmetered: skipped, nginx is not installed (scripts/services.sh installs it)"
        );
        return;
    };
    let nginx = Nginx::start(&bin).await;
    // Without the gateway in front, nginx itself normalises the traversal: the attack is real.
    let (status, body) =
        exchange(nginx.addr, &get("/public/%2e%2e/v1/chat/completions", None)).await;
    assert_eq!((status, body.trim()), (200, "PAID /v1/chat/completions"));

    let app = edge_app(edge_proxy(nginx.addr), None).await;
    let proxy = app.proxy_addr.unwrap();
    let (_, key) = app.create_key("acme").await;
    app.set_plan("acme", "pro").await;
    for &(target, expect) in SPELLINGS {
        let used = app.usage_of("acme", "requests").await;
        let (anon, anon_body) = exchange(proxy, &get(target, None)).await;
        assert!(
            !anon_body.contains("PAID"),
            "{target} reached the paid location without a key: {anon_body}"
        );
        let (keyed, keyed_body) = exchange(proxy, &get(target, Some(&key))).await;
        let charged = app.usage_of("acme", "requests").await - used;
        match expect {
            Expect::Rejected => {
                assert_eq!((anon, keyed), (400, 400), "{target}");
                assert_eq!(charged, 0, "{target}");
            }
            Expect::Metered(path) => {
                assert_eq!(anon, 401, "{target}");
                let path = path.split('?').next().unwrap();
                assert_eq!(
                    (keyed, keyed_body.trim()),
                    (200, format!("PAID {path}").as_str()),
                    "{target}"
                );
                assert_eq!(charged, 1, "{target}");
            }
            Expect::Public(_) => {
                assert_eq!(anon, 200, "{target}");
                assert!(
                    anon_body.starts_with("public /public/"),
                    "{target}: {anon_body}"
                );
                assert_eq!(charged, 0, "{target}");
            }
        }
    }
    // Double encoding: nginx decodes once and sees a literal "%2e%2e" name, not "..".
    let (_, body) = exchange(proxy, &get("/public/%252e%252e/v1/chat/completions", None)).await;
    assert_eq!(body.trim(), "public /public/%2e%2e/v1/chat/completions");
}

#[tokio::test]
async fn duplicate_or_disagreeing_host_is_400_on_both_listeners() {
    let up = spawn_upstream().await;
    let app = edge_app(edge_proxy(up.addr), None).await;
    for addr in [app.addr, app.proxy_addr.unwrap()] {
        let (status, body) = exchange(
            addr,
            "GET /public/x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (400, "bad_host"),
            "{addr}: {body}"
        );
        let (status, body) = exchange(
            addr,
            "GET http://a.example/public/x HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (400, "bad_host"),
            "{addr}: {body}"
        );
        // The same authority twice over is fine.
        let (status, _) = exchange(
            addr,
            "GET http://a.example/public/x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_ne!(status, 400, "{addr}");
    }
    assert_eq!(up.count(), 1, "only the agreeing request was forwarded");
}

#[tokio::test]
async fn slow_headers_are_cut_on_both_listeners() {
    let up = spawn_upstream().await;
    let mut p = edge_proxy(up.addr);
    short(&mut p.conn);
    let mut api_conn = ConnSettings::default();
    short(&mut api_conn);
    let app = edge_app(p, Some(api_conn)).await;
    for (name, addr) in [("api", app.addr), ("proxy", app.proxy_addr.unwrap())] {
        // Half a request head, then silence; and a connection that never says anything.
        for start in ["GET /public/x HTTP/1.1\r\nHost: gw\r\n", ""] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(start.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            let read = tokio::time::timeout(HANG, s.read_to_end(&mut buf)).await;
            assert!(read.is_ok(), "{name}: a slow client keeps its connection");
            let (status, _) = parse(&buf);
            assert!(matches!(status, 0 | 408), "{name}: answered {status}");
        }
        let series =
            format!("quota_gateway_client_timeouts_total{{listener=\"{name}\",phase=\"header\"}}");
        assert!(metric_value(&app, &series).await >= 2.0, "{series}");
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_on_both_listeners() {
    let up = spawn_upstream().await;
    let mut p = edge_proxy(up.addr);
    p.routes.routes.push(route("/sink", true));
    short(&mut p.conn);
    let mut api_conn = ConnSettings::default();
    short(&mut api_conn);
    let app = edge_app(p, Some(api_conn)).await;
    let requests = [
        (
            "proxy",
            app.proxy_addr.unwrap(),
            "POST /sink HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nabc",
        ),
        (
            "api",
            app.addr,
            "POST /v1/check HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"org_id\":",
        ),
    ];
    for (name, addr, request) in requests {
        let (status, body) = exchange(addr, request).await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (408, "request_timeout"),
            "{name}: {body}"
        );
        let series =
            format!("quota_gateway_client_timeouts_total{{listener=\"{name}\",phase=\"body\"}}");
        assert_eq!(metric_value(&app, &series).await, 1.0, "{series}");
    }
    // A body that keeps coming, however slowly, is not cut.
    let mut s = TcpStream::connect(app.proxy_addr.unwrap()).await.unwrap();
    s.write_all(
        b"POST /sink HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    for b in [b"a", b"b", b"c", b"d"] {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b).await.unwrap();
    }
    let mut buf = Vec::new();
    tokio::time::timeout(HANG, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parse(&buf), (200, "4".to_string()));
}

#[tokio::test]
async fn at_the_connection_cap_a_new_connection_waits_for_a_free_slot() {
    let up = spawn_upstream().await;
    let mut p = edge_proxy(up.addr);
    p.conn.max_connections = std::num::NonZeroUsize::new(2).unwrap();
    let app = edge_app(p, None).await;
    let proxy = app.proxy_addr.unwrap();
    // Two kept-alive connections, each served once: both slots are taken.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(b"GET /public/a HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(HANG, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(parse(&buf[..n]).0, 200);
        held.push(s);
    }
    let open = "quota_gateway_connections_open{listener=\"proxy\"}";
    assert_eq!(metric_value(&app, open).await, 2.0);

    let mut third = TcpStream::connect(proxy).await.unwrap();
    third
        .write_all(b"GET /public/b HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let early = tokio::time::timeout(Duration::from_millis(500), third.read_to_end(&mut buf)).await;
    assert!(early.is_err(), "served past the cap: {:?}", parse(&buf));
    assert_eq!(up.count(), 2);
    let at_cap = "quota_gateway_connections_at_cap_total{listener=\"proxy\"}";
    assert!(metric_value(&app, at_cap).await >= 1.0);

    drop(held.pop());
    tokio::time::timeout(HANG, third.read_to_end(&mut buf))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(parse(&buf).0, 200);
    assert_eq!(up.count(), 3);
}

/// Read one response (headers and a `Content-Length` body) from a kept-alive connection.
async fn read_one(s: &mut TcpStream) -> (u16, String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(HANG, s.read(&mut chunk))
            .await
            .expect("an answer")
            .unwrap();
        assert!(
            n > 0,
            "the connection closed before a whole answer: {buf:?}"
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let head = head.to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if body.len() >= len {
                let (status, _) = parse(&buf);
                return (status, head, body[..len].to_string());
            }
        }
    }
}

#[tokio::test]
async fn an_answer_before_the_body_says_connection_close_and_a_read_body_keeps_alive() {
    let up = spawn_upstream().await;
    let app = edge_app(edge_proxy(up.addr), None).await;
    let proxy = app.proxy_addr.unwrap();

    // The body is still on its way when the gateway answers 401: the connection cannot carry
    // another request, and the answer says so.
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"POST /v1/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = read_one(&mut s).await;
    assert_eq!(status, 401, "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(HANG, s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the gateway closes the connection after saying so"
    );

    // Without a body, the same early answer keeps the connection for the next request.
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"GET /v1/chat HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = read_one(&mut s).await;
    assert_eq!(status, 401, "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    s.write_all(b"GET /public/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = read_one(&mut s).await;
    assert_eq!(
        status, 200,
        "the kept connection serves the next request: {head}"
    );

    // A body the gateway read (forwarded to the upstream) keeps the connection too.
    s.write_all(b"POST /public/sink HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (status, head, _) = read_one(&mut s).await;
    assert_eq!(status, 200, "{head}");
    assert!(!head.contains("connection: close"), "{head}");

    // The API listener: a /v1/check refused before its body was read (service token missing).
    let api = spawn_app_with(TestOptions {
        service_token: Some("svc".into()),
        ..TestOptions::default()
    })
    .await;
    let mut s = TcpStream::connect(api.addr).await.unwrap();
    s.write_all(
        b"POST /v1/check HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n",
    )
    .await
    .unwrap();
    let (status, head, _) = read_one(&mut s).await;
    assert_eq!(status, 401, "{head}");
    assert!(head.contains("connection: close"), "{head}");
}
