//! The OpenAPI document (discovery/openapi.json) matches the router.

use std::collections::BTreeSet;

use p2p_discovery::{ErrorCode, ROUTES};
use serde_json::Value;

fn doc() -> Value {
    let text = include_str!("../openapi.json");
    serde_json::from_str(text).expect("openapi.json is valid JSON")
}

#[test]
fn every_route_is_documented_and_vice_versa() {
    let doc = doc();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented, served);
}

#[test]
fn error_codes_match() {
    let doc = doc();
    let documented: BTreeSet<String> = doc["components"]["schemas"]["Error"]["properties"]["error"]
        ["enum"]
        .as_array()
        .expect("enum")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let actual: BTreeSet<String> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_owned())
        .collect();
    assert_eq!(documented, actual);
    // Every per-operation code exists and is listed under its code's status.
    for item in doc["paths"].as_object().expect("paths").values() {
        for op in item.as_object().expect("item").values() {
            for (status, resp) in op["responses"].as_object().expect("responses") {
                for code in resp["x-error-codes"].as_array().into_iter().flatten() {
                    let code = ErrorCode::parse(code.as_str().expect("code")).expect("known code");
                    assert_eq!(status, code.status().as_str(), "{code:?}");
                }
            }
        }
    }
}

/// Every route in `ROUTES` is really served (not the router's fallback).
#[tokio::test]
async fn every_listed_route_is_served() {
    use axum::{body::Body, http::Request};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let state = p2p_discovery::AppState::open(Default::default()).expect("state");
    let app = p2p_discovery::router(state);
    let node = p2p_crypto::SecretKey::generate().public().to_string();
    for (method, path) in ROUTES {
        let uri = path.replace("{node_id}", &node).replace("{name}", "x");
        let req = Request::builder()
            .method(*method)
            .uri(&uri)
            .body(Body::empty())
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("unknown_route") && !text.contains("method_not_allowed"),
            "{method} {uri}: {status} {text}"
        );
    }
}
