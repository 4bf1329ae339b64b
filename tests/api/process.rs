//! The real binary: SIGHUP reloads the catalog, SIGTERM stops it with exit code 0.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgPoolOptions;

use crate::helpers::{eventually, test_database_url, test_redis_url};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn sighup_reloads_the_catalog_and_sigterm_exits_cleanly() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!("qg-proc-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let plans = "default_plan = \"free\"\n[metrics]\nrequests = { unit = \"request\" }\n[plans.free]\nquotas = { requests = { limit = 5, period = \"month\" } }\n";
    std::fs::write(dir.join("plans.toml"), plans).unwrap();
    let port = free_port();
    let db_name = format!("qg_test_{id}");
    let db_url = {
        let base = test_database_url();
        let cut = base.rfind('/').unwrap();
        format!("{}/{db_name}", &base[..cut])
    };
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            "plans = \"plans.toml\"\n[api]\nlisten = \"127.0.0.1:{port}\"\nadmin_token = \"t\"\n\
             [redis]\nurl = \"{}\"\nkey_prefix = \"qgt-{}\"\n[database]\nurl = \"{db_url}\"\n\
             [log]\nformat = \"json\"\n",
            test_redis_url(),
            &id[..12]
        ),
    )
    .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_quota-gateway"))
        .args(["serve", "--config"])
        .arg(dir.join("gateway.toml"))
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("QG_API_LISTEN")
        .env_remove("QG_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(20), || async {
        client
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(up.is_some(), "the gateway came up");

    let check = |amount: u64| {
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .post(format!("{url}/v1/check"))
                .json(&json!({"org_id": "acme", "metric": "requests", "amount": amount, "consume": false}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(check(7).await, 402);

    // Same size and the same mtime: only SIGHUP can tell the gateway to look again.
    let path = dir.join("plans.toml");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::write(&path, plans.replace("limit = 5", "limit = 9")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(check(7).await, 402, "not reloaded before the signal");
    signal(pid, "-HUP");
    let reloaded = eventually(Duration::from_secs(5), || async { check(7).await == 200 }).await;
    assert!(reloaded.is_some(), "SIGHUP reloaded the catalog");

    signal(pid, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&test_database_url())
        .await
        .unwrap();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    let mut conn = crate::helpers::test_redis_conn().await;
    for key in crate::helpers::keys_matching(&format!("qgt-{}:*", &id[..12])).await {
        let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A config directory for the real binary, with `database` as the `[database]` table's body.
fn config_dir(port: u16, database: &str) -> std::path::PathBuf {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!("qg-proc-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let plans = "default_plan = \"free\"\n[metrics]\nrequests = { unit = \"request\" }\n[plans.free]\nquotas = { requests = { limit = 5, period = \"month\" } }\n";
    std::fs::write(dir.join("plans.toml"), plans).unwrap();
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            "plans = \"plans.toml\"\n[api]\nlisten = \"127.0.0.1:{port}\"\nadmin_token = \"t\"\n\
             [redis]\nurl = \"{}\"\nkey_prefix = \"qgt-{}\"\n[database]\n{database}\n",
            test_redis_url(),
            &id[..12]
        ),
    )
    .unwrap();
    dir
}

fn serve(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_quota-gateway"));
    c.args(["serve", "--config"])
        .arg(dir.join("gateway.toml"))
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("QG_API_LISTEN")
        .env_remove("QG_ADMIN_TOKEN")
        .env_remove("RUST_LOG");
    c
}

#[tokio::test]
async fn serve_waits_for_a_postgres_that_starts_later() {
    let proxy =
        crate::helpers::ChaosProxy::start(&crate::helpers::host_port(&test_database_url())).await;
    proxy.cut();
    let base = test_database_url();
    let db_name = format!("qg_test_{}", uuid::Uuid::new_v4().simple());
    let through = base.replacen(
        &crate::helpers::host_port(&base),
        &proxy.addr.to_string(),
        1,
    );
    let through = format!("{}/{db_name}", &through[..through.rfind('/').unwrap()]);
    let port = free_port();
    let dir = config_dir(
        port,
        &format!("url = \"{through}\"\nstart_timeout = \"60s\""),
    );
    let mut child = serve(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let ready = || async {
        client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still waiting, not exited"
    );
    assert!(!ready().await, "not serving before Postgres answers");
    proxy.restore();
    let up = eventually(Duration::from_secs(20), ready).await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(up.is_some(), "serving once Postgres answers");
}

#[tokio::test]
async fn serve_gives_up_on_postgres_naming_where_it_looked() {
    let port = free_port();
    let dead = free_port();
    let dir = config_dir(
        port,
        &format!(
            "url = \"postgres://postgres:hunter2@127.0.0.1:{dead}/qg_nowhere\"\nstart_timeout = \"1s\""
        ),
    );
    let out = tokio::task::spawn_blocking(move || {
        let out = serve(&dir).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        out
    })
    .await
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "Postgres at 127.0.0.1:{dead}/qg_nowhere did not answer within 1s"
        )),
        "{text}"
    );
    assert!(
        text.contains("Postgres is not reachable yet; waiting"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "never the password: {text}");
}
