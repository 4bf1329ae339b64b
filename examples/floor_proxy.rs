//! The load benchmark's floors: a bare hyper-util reverse proxy, and the same plus one trivial
//! `EVALSHA` per request. No metering, no identity, no headers of ours: what a proxy built on
//! the gateway's own stack costs at least, so the gateway's rows can be quoted as ratios to it.
//!
//!   cargo run --release --example floor_proxy -- LISTEN UPSTREAM [REDIS_URL]
//!
//! With `REDIS_URL`, every request first runs `return 1` as a loaded script (one round trip on a
//! multiplexed connection, as the gateway's decision is).

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, upstream) = match (args.first(), args.get(1)) {
        (Some(l), Some(u)) => (
            l.parse::<SocketAddr>().expect("LISTEN is host:port"),
            u.parse::<Uri>().expect("UPSTREAM is http://host:port"),
        ),
        _ => {
            eprintln!("usage: floor_proxy LISTEN UPSTREAM [REDIS_URL]");
            std::process::exit(64);
        }
    };
    let redis = match args.get(2) {
        Some(url) => {
            let client = redis::Client::open(url.as_str()).expect("a redis:// URL");
            let conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("Redis answers");
            Some((conn, redis::Script::new("return 1")))
        }
        None => None,
    };
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .expect("LISTEN is free");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, upstream, redis) = (client.clone(), upstream.clone(), redis.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let (client, upstream, redis) = (client.clone(), upstream.clone(), redis.clone());
                async move {
                    if let Some((mut conn, script)) = redis {
                        let _: i64 = script.invoke_async(&mut conn).await.unwrap_or(0);
                    }
                    let mut parts = upstream.into_parts();
                    parts.path_and_query = req.uri().path_and_query().cloned();
                    *req.uri_mut() = Uri::from_parts(parts).expect("a valid URI");
                    client.request(req).await
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
