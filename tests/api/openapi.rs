//! The OpenAPI document matches what the router serves, in both directions.

use std::collections::BTreeSet;

use crate::helpers::{json, spawn_app};

#[tokio::test]
async fn every_served_route_is_documented_and_nothing_else() {
    let app = spawn_app().await;
    let r = app.get("/openapi.json").await;
    assert_eq!(r.status(), 200);
    let doc = json(r).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = quota_gateway::api::routes()
        .served()
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(served, documented);
}
