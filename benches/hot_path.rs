//! The per-decision work that happens without I/O: building the limits a charge touches, their
//! Redis keys, evaluating the script's reply, and rendering headers and bodies.
//!
//! Run with `cargo bench --bench hot_path`; compare runs by ratio, not absolute time.

use std::hint::black_box;
use std::path::Path;

use chrono::{TimeZone, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use quota_gateway::config;
use quota_gateway::domain::decision::{Charge, LimitReply, evaluate, limits_for, merge_charges};
use quota_gateway::domain::org::OrgId;
use quota_gateway::domain::render::{denial_body, ratelimit_headers, usage_entries};
use quota_gateway::store::Keys;

fn bench(c: &mut Criterion) {
    let catalog = config::load_catalog(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/plans.toml"
    )))
    .expect("shipped catalog is valid");
    let plan = catalog.plan("free").unwrap();
    let requests = catalog.metric("requests").unwrap();
    let tokens = catalog.metric("tokens").unwrap();
    let now = Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap();
    let keys = Keys::new("qg");
    let org = OrgId::parse("acme-corp").unwrap();
    let charges = [
        Charge {
            metric: requests,
            amount: 1,
        },
        Charge {
            metric: tokens,
            amount: 500,
        },
    ];

    c.bench_function("org id validation", |b| {
        b.iter(|| OrgId::parse(black_box("acme-corp.eu-west:prod")))
    });

    c.bench_function("limits for 2 charges", |b| {
        b.iter(|| {
            limits_for(
                plan,
                &merge_charges(black_box(&charges)),
                now,
                &Default::default(),
            )
        })
    });

    let limits = limits_for(plan, &merge_charges(&charges), now, &Default::default());
    c.bench_function("redis keys for 3 limits", |b| {
        b.iter(|| {
            limits
                .iter()
                .map(|l| keys.limit(black_box(&org), l))
                .collect::<Vec<_>>()
        })
    });

    let allowed = [
        LimitReply {
            denied: false,
            value: 10,
            millis: 0,
        },
        LimitReply {
            denied: false,
            value: 9,
            millis: 100,
        },
        LimitReply {
            denied: false,
            value: 500,
            millis: 0,
        },
    ];
    c.bench_function("evaluate + headers + usage body (allowed)", |b| {
        b.iter(|| {
            let eval = evaluate(limits.clone(), black_box(&allowed), true, now);
            let h = ratelimit_headers(&eval);
            let body = serde_json::to_vec(&usage_entries(&eval)).unwrap();
            (h, body)
        })
    });

    let denied = [
        LimitReply {
            denied: true,
            value: 1000,
            millis: 0,
        },
        LimitReply {
            denied: false,
            value: 9,
            millis: 100,
        },
        LimitReply {
            denied: false,
            value: 500,
            millis: 0,
        },
    ];
    c.bench_function("evaluate + denial body (402)", |b| {
        b.iter(|| {
            let eval = evaluate(limits.clone(), black_box(&denied), false, now);
            let body = denial_body(&catalog, org.as_str(), plan, &eval).unwrap();
            serde_json::to_vec(&body).unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
