//! A Redis that may evict keys is refused: `/readyz` answers 503 naming `maxmemory-policy` and
//! its value, and a gauge says so, unless `[redis] require_noeviction = false`. Each test runs a
//! private `redis-server` with the policy it needs (the shared Redis is never reconfigured).

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    PrivateRedis, TestApp, TestOptions, closed_port, eventually, json, spawn_app_with,
};

/// Three private cluster primaries with the given policies, slots spread over all three.
struct PrivateCluster {
    nodes: Vec<PrivateRedis>,
    dir: std::path::PathBuf,
}

impl PrivateCluster {
    async fn start(policies: [&str; 3]) -> PrivateCluster {
        let dir =
            std::env::temp_dir().join(format!("qg-cluster-{}", uuid::Uuid::new_v4().simple()));
        let mut nodes = Vec::new();
        for policy in policies {
            let port = closed_port().await.port();
            let bus = closed_port().await.port();
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let (bus, node_dir) = (bus.to_string(), node_dir.display().to_string());
            let args = [
                "--maxmemory",
                "64mb",
                "--maxmemory-policy",
                policy,
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus,
                "--cluster-config-file",
                "nodes.conf",
                "--dir",
                &node_dir,
            ];
            nodes.push(PrivateRedis::start_on(port, &args).await);
        }
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli on PATH");
        assert!(created.success(), "redis-cli --cluster create");
        for node in &nodes {
            let client = redis::Client::open(node.url()).unwrap();
            let ready = eventually(Duration::from_secs(10), || async {
                let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                    return false;
                };
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            })
            .await;
            assert!(ready.is_some(), "the private cluster becomes ready");
        }
        PrivateCluster { nodes, dir }
    }

    /// Only the first node: the gateway discovers the others.
    fn seed(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis that evicts (or not) by `policy`.
async fn redis_with(policy: &str) -> PrivateRedis {
    PrivateRedis::start(&["--maxmemory", "64mb", "--maxmemory-policy", policy]).await
}

async fn app_on(redis: &PrivateRedis, allow_eviction: bool) -> TestApp {
    spawn_app_with(TestOptions {
        redis_url: Some(redis.url()),
        allow_eviction,
        ..Default::default()
    })
    .await
}

/// The value of an unlabelled gauge on `/metrics`.
async fn gauge(app: &TestApp, name: &str) -> Option<f64> {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn gauge_becomes(app: &TestApp, value: f64) {
    let seen = eventually(Duration::from_secs(10), || async {
        gauge(app, "quota_gateway_redis_eviction_policy_ok").await == Some(value)
    })
    .await;
    assert!(
        seen.is_some(),
        "quota_gateway_redis_eviction_policy_ok becomes {value}, is {:?}",
        gauge(app, "quota_gateway_redis_eviction_policy_ok").await
    );
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let r = app.get("/readyz").await;
    (r.status().as_u16(), json(r).await)
}

fn assert_names_the_policy(body: &Value, policy: &str) {
    assert_eq!(body["maxmemory_policy"], policy, "{body}");
    let problem = body["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("maxmemory-policy") && problem.contains(policy),
        "{body}"
    );
}

#[tokio::test]
async fn a_redis_that_may_evict_keys_makes_the_gateway_not_ready() {
    let redis = redis_with("allkeys-lru").await;
    let app = app_on(&redis, false).await;
    gauge_becomes(&app, 0.0).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["redis"], "evicting");
    assert_eq!(body["postgres"], "ok");
    assert_names_the_policy(&body, "allkeys-lru");

    // The same gateway on a Redis that keeps every key is ready.
    let keeping = redis_with("noeviction").await;
    let app = app_on(&keeping, false).await;
    gauge_becomes(&app, 1.0).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["redis"], "ok");
    assert!(body.get("maxmemory_policy").is_none(), "{body}");
}

#[tokio::test]
async fn require_noeviction_false_accepts_an_evicting_redis_but_still_says_so() {
    let redis = redis_with("volatile-lru").await;
    let app = app_on(&redis, true).await;
    gauge_becomes(&app, 0.0).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["redis"], "ok");
    assert_names_the_policy(&body, "volatile-lru");
}

#[tokio::test]
async fn a_redis_that_comes_back_evicting_is_caught_after_the_reconnect() {
    let mut redis = redis_with("noeviction").await;
    let port = redis.port;
    let app = app_on(&redis, false).await;
    gauge_becomes(&app, 1.0).await;
    assert_eq!(readyz(&app).await.0, 200);

    // Restarted with another policy: noticed after the reconnect, well before the minute.
    redis.kill().await;
    let down = eventually(Duration::from_secs(10), || async {
        readyz(&app).await.1["redis"] == "unreachable"
    })
    .await;
    assert!(down.is_some(), "the gateway sees Redis go away");
    let _redis = PrivateRedis::start_on(
        port,
        &[
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            "allkeys-random",
        ],
    )
    .await;
    let caught = eventually(Duration::from_secs(15), || async {
        let (status, body) = readyz(&app).await;
        status == 503 && body["maxmemory_policy"] == "allkeys-random"
    })
    .await;
    assert!(caught.is_some(), "{:?}", readyz(&app).await);
    gauge_becomes(&app, 0.0).await;
}

#[tokio::test]
async fn in_a_cluster_every_primary_is_checked() {
    let cluster = PrivateCluster::start(["noeviction", "noeviction", "allkeys-lfu"]).await;
    let evicting = format!("127.0.0.1:{}", cluster.nodes[2].port);
    let app = spawn_app_with(TestOptions {
        redis_cluster: Some(cluster.seed()),
        ..Default::default()
    })
    .await;
    gauge_becomes(&app, 0.0).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_names_the_policy(&body, "allkeys-lfu");
    assert!(
        body["problem"].as_str().unwrap().contains(&evicting),
        "names the primary that is not the seed: {body}"
    );
    // Decisions still run on the cluster: only readiness is refused.
    let r = app
        .check(serde_json::json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(r.status(), 200);
}
