//! Restart: a new server on the same redb file still knows names and undelivered
//! envelopes (and forgets presence, which lives in memory).

mod common;

use std::sync::Arc;

use axum::http::Method;
use common::*;
use p2p_crypto::SecretKey;
use p2p_discovery::{RedbStore, ServerConfig, Store};
use serde_json::json;

#[tokio::test]
async fn names_and_mailbox_survive_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("discovery.redb");
    let bob = SecretKey::generate();
    let mailbox = format!("/v1/mailbox/{}", bob.public());
    let ids: Vec<u64>;
    {
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&db).expect("open"));
        let h = Harness::with_store(ServerConfig::default(), store);
        h.claim(&bob, "bob").await;
        h.announce(&bob, Some("bob"), 60).await.expect(200, None);
        let mut got = Vec::new();
        for env in ["b25l", "dHdv", "dGhyZWU"] {
            let r = h.post_json(&mailbox, &json!({ "envelope": env })).await;
            r.expect(201, None);
            got.push(r.json["id"].as_u64().expect("id"));
        }
        // One delivered and deleted before the restart.
        let body = serde_json::to_vec(&json!({ "ids": [got[0]] })).expect("json");
        let del = format!("{mailbox}/delete");
        h.send(h.signed(&bob, Method::POST, &del, &body, h.now()))
            .await
            .expect(200, None);
        ids = got[1..].to_vec();
    }

    // Reopen through the public constructor, as `p2p-node discovery --db` does.
    let state = p2p_discovery::AppState::open(ServerConfig {
        db_path: Some(db.clone()),
        ..ServerConfig::default()
    })
    .expect("reopen");
    drop(state);
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&db).expect("reopen"));
    let h = Harness::with_store(ServerConfig::default(), store);
    let r = h.get("/v1/names/bob").await;
    r.expect(200, None);
    assert_eq!(r.json["node_id"], bob.public().to_string());
    assert!(r.json["presence"].is_null(), "presence is not persisted");
    // The name is still bound: another key cannot take it.
    let mallory = SecretKey::generate();
    h.post_json("/v1/names", &wire(&claim(&mallory, "bob", h.now())))
        .await
        .expect(409, Some("name_taken"));
    let r = h
        .send(h.signed(&bob, Method::GET, &mailbox, b"", h.now()))
        .await;
    r.expect(200, None);
    let items = r.json["items"].as_array().expect("items");
    let got: Vec<u64> = items.iter().filter_map(|i| i["id"].as_u64()).collect();
    assert_eq!(got, ids);
    assert_eq!(items[0]["envelope"], "dHdv");
    // New ids continue after the old ones.
    let r = h
        .post_json(&mailbox, &json!({ "envelope": "Zm91cg" }))
        .await;
    r.expect(201, None);
    assert!(r.json["id"].as_u64().expect("id") > ids[1]);
}

#[test]
fn the_database_file_is_created_0600_and_a_too_open_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("discovery.redb");
    drop(RedbStore::open(&db).expect("open"));
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&db), 0o600);
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = RedbStore::open(&db).expect_err("refused").to_string();
    assert!(
        err.contains(&format!("chmod 600 {}", db.display())),
        "{err}"
    );
}
