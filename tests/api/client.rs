//! The Rust client (`clients/rust`) against a real gateway: typed answers, typed 402/429 with
//! the upgrade hint, idempotent reports and their retries, batching, the service token and the
//! timeout.

use std::time::Duration;

use quota_gateway_client::{Charge, Client, Error, UsageEvent};

use crate::helpers::{TestOptions, spawn_app, spawn_app_with};

fn client(app: &crate::helpers::TestApp) -> Client {
    Client::builder(format!("http://{}", app.addr))
        .build()
        .unwrap()
}

#[tokio::test]
async fn check_answers_typed_allowances_and_denials_with_the_upgrade_hint() {
    let app = spawn_app().await;
    let gw = client(&app);
    let limit = app
        .catalog
        .plan("free")
        .unwrap()
        .quotas_for("tokens")
        .next()
        .unwrap()
        .limit;

    let allowed = gw
        .check("acme", &[Charge::new("tokens", limit - 1)])
        .await
        .unwrap();
    assert_eq!(allowed.plan.id, "free");
    assert!(!allowed.dry_run);
    let tokens = allowed.usage.iter().find(|u| u.metric == "tokens").unwrap();
    assert_eq!(tokens.current, (limit - 1) as i64);

    // A dry run answers as a real check would and consumes nothing.
    let dry = gw
        .check_dry_run("acme", &[Charge::new("tokens", 1)])
        .await
        .unwrap();
    assert!(dry.dry_run);
    assert_eq!(app.usage_of("acme", "tokens").await, (limit - 1) as i64);

    match gw.check("acme", &[Charge::new("tokens", 2)]).await {
        Err(Error::QuotaExceeded(denial)) => {
            assert_eq!(denial.status, 402);
            assert_eq!(denial.plan.id, "free");
            let quota = denial.quota.as_ref().unwrap();
            assert_eq!(quota.metric, "tokens");
            assert_eq!(quota.limit, Some(limit));
            let upgrade = denial.upgrade.as_ref().unwrap();
            assert_eq!(upgrade.plan, "pro");
            assert!(upgrade.url.as_deref().unwrap().contains("org=acme"));
        }
        other => panic!("expected a 402, got {other:?}"),
    }

    let rate = app
        .catalog
        .plan("free")
        .unwrap()
        .rates_for("requests")
        .next()
        .unwrap()
        .limit;
    let mut limited = None;
    for _ in 0..=rate {
        if let Err(e) = gw.check("globex", &[Charge::new("requests", 1)]).await {
            limited = Some(e);
            break;
        }
    }
    match limited {
        Some(Error::RateLimited(denial)) => {
            assert_eq!(denial.error, "rate_limited");
            assert!(denial.retry_after_seconds.is_some_and(|s| s >= 1));
            assert_eq!(denial.rate.as_ref().unwrap().metric, "requests");
        }
        other => panic!("expected a 429 within {} checks, got {other:?}", rate + 1),
    }

    // Other refusals keep the gateway's code and message.
    match gw.check("acme", &[Charge::new("nope", 1)]).await {
        Err(Error::Refused {
            status, message, ..
        }) => {
            assert_eq!(status, 422);
            assert!(message.contains("nope"), "{message}");
        }
        other => panic!("expected a 422, got {other:?}"),
    }
}

#[tokio::test]
async fn reports_are_idempotent_and_batches_are_split_and_counted() {
    let app = spawn_app().await;
    let gw = client(&app);

    let first = gw
        .report(UsageEvent::new("acme", "tokens", 7))
        .await
        .unwrap();
    assert!(first.recorded && !first.duplicate);
    assert!(first.idempotency_key.starts_with("qgc-"));
    // What a retry after a lost answer sends: the same key, not counted twice.
    let again = gw
        .report(UsageEvent::new("acme", "tokens", 7).idempotency_key(&first.idempotency_key))
        .await
        .unwrap();
    assert!(again.duplicate && !again.recorded);
    assert_eq!(app.usage_of("acme", "tokens").await, 7);

    let events: Vec<UsageEvent> = (0..25)
        .map(|i| UsageEvent::new(if i % 2 == 0 { "acme" } else { "globex" }, "tokens", 2))
        .collect();
    let batch = gw.report_batch(events.clone()).await.unwrap();
    assert_eq!(batch.recorded, 25);
    assert_eq!(batch.duplicates, 0);
    assert_eq!(app.usage_of("acme", "tokens").await, 7 + 13 * 2);

    let usage = gw.usage("globex").await.unwrap();
    assert_eq!(usage.metric("tokens").unwrap().current, 12 * 2);
    let ent = gw.entitlements("acme").await.unwrap();
    assert_eq!(ent.plan.id, "free");
    assert_eq!(ent.features.get("export_md"), Some(&true));
    assert_eq!(ent.features.get("sso"), Some(&false));
}

#[tokio::test]
async fn the_service_token_is_sent_and_a_missing_one_is_a_typed_401() {
    let app = spawn_app_with(TestOptions {
        service_token: Some("svc-secret".into()),
        ..Default::default()
    })
    .await;
    let without = client(&app);
    match without.usage("acme").await {
        Err(Error::Refused { status: 401, .. }) => {}
        other => panic!("expected a 401, got {other:?}"),
    }
    let with = Client::builder(format!("http://{}/", app.addr))
        .service_token("svc-secret")
        .build()
        .unwrap();
    assert_eq!(with.usage("acme").await.unwrap().org_id, "acme");
}

#[tokio::test]
async fn an_unreachable_gateway_is_retried_then_reported_and_a_silent_one_times_out() {
    // Nothing listens: connection refused, retried with back-off, then a transport error.
    let closed = crate::helpers::closed_port().await;
    let gw = Client::builder(format!("http://{closed}"))
        .retries(2)
        .backoff(Duration::from_millis(20))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let err = gw
        .check("acme", &[Charge::new("requests", 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(20 + 40),
        "backed off between attempts"
    );

    // A listener that accepts and never answers: the timeout ends each attempt.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            open.push(sock);
        }
    });
    let gw = Client::builder(format!("http://{addr}"))
        .timeout(Duration::from_millis(200))
        .retries(0)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let err = gw.usage("acme").await.unwrap_err();
    assert!(
        matches!(&err, Error::Transport(e) if e.is_timeout()),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    assert!(matches!(
        Client::builder("not a url").build(),
        Err(Error::Config(_))
    ));
}

/// In front of `target`: the first connection's request reaches the gateway, but its answer is
/// dropped (what a reset or a timeout after the gateway acted looks like to a client); later
/// connections pass both ways.
async fn loses_the_first_answer(target: std::net::SocketAddr) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
            if first {
                first = false;
                let mut buf = vec![0u8; 64 * 1024];
                let n = client.read(&mut buf).await.unwrap();
                upstream.write_all(&buf[..n]).await.unwrap();
                let _ = upstream.read(&mut buf).await; // the gateway answered: it acted
                continue; // both dropped, the answer never reaches the client
            }
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_report_whose_answer_is_lost_is_retried_under_its_key_and_counted_once() {
    let app = spawn_app().await;
    let lossy = loses_the_first_answer(app.addr).await;
    let gw = Client::builder(format!("http://{lossy}"))
        .backoff(Duration::from_millis(10))
        .build()
        .unwrap();
    let r = gw
        .report(UsageEvent::new("acme", "tokens", 5))
        .await
        .unwrap();
    assert!(r.duplicate, "the retry carried the first attempt's key");
    assert_eq!(app.usage_of("acme", "tokens").await, 5);
}
