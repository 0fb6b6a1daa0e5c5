//! Router tests (`oneshot`): every endpoint, success and each documented error, on
//! every store: memory, redb, and PostgreSQL (a throwaway server started by the test).

mod common;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::*;
use p2p_crypto::{Domain, SecretKey};
use p2p_discovery::{NameClaim, PresenceRecord, ServerConfig, MAX_ADDRS};
use serde_json::{json, Value};

const BIG: usize = 300 * 1024;

/// Malformed JSON, wrong content type and an oversized body on a JSON POST endpoint.
async fn body_errors(h: &Harness, uri: &str) {
    h.post_raw(uri, "application/json", b"{not json".to_vec())
        .await
        .expect(400, Some("malformed_json"));
    h.post_json(uri, &json!({"unexpected": 1}))
        .await
        .expect(400, Some("malformed_json"));
    h.post_raw(uri, "text/plain", b"{}".to_vec())
        .await
        .expect(415, Some("unsupported_media_type"));
    let mut big = b"{\"record\":\"".to_vec();
    big.resize(BIG, b'a');
    big.extend_from_slice(b"\"}");
    h.post_raw(uri, "application/json", big)
        .await
        .expect(413, Some("body_too_large"));
}

async fn healthz_metrics_and_unknown_routes(b: &Backend<'_>) {
    let h = b.harness(ServerConfig::default()).await;
    let r = h.get("/healthz").await;
    r.expect(200, None);
    assert_eq!(r.json["status"], "ok");
    h.get("/nope").await.expect(404, Some("unknown_route"));
    h.send(
        axum::http::Request::delete("/v1/names")
            .body(axum::body::Body::empty())
            .expect("req"),
    )
    .await
    .expect(405, Some("method_not_allowed"));

    let sk = SecretKey::generate();
    h.claim(&sk, "alice").await;
    h.announce(&sk, Some("alice"), 60).await.expect(200, None);
    h.post_json(
        &format!("/v1/mailbox/{}", sk.public()),
        &json!({"envelope": "aGVsbG8"}),
    )
    .await
    .expect(201, None);
    let m = h.get("/metrics").await;
    m.expect(200, None);
    assert!(m.headers["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("text/plain"));
    for needle in [
        "discovery_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 1",
        "discovery_requests_total{method=\"POST\",route=\"/v1/names\",status=\"200\"} 1",
        "discovery_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1",
        "discovery_rejections_total{reason=\"unknown_route\"} 1",
        "discovery_rejections_total{reason=\"method_not_allowed\"} 1",
        "discovery_live_records 1",
        "discovery_names 1",
        "discovery_mailbox_envelopes 1",
    ] {
        assert!(m.text.contains(needle), "missing {needle:?} in\n{}", m.text);
    }
}

async fn claim_name_endpoint(b: &Backend<'_>) {
    let h = b.harness(ServerConfig::default()).await;
    let alice = SecretKey::generate();
    let mallory = SecretKey::generate();
    let c1 = claim(&alice, "alice", h.now());

    let r = h.post_json("/v1/names", &wire(&c1)).await;
    r.expect(200, None);
    assert_eq!(r.json["changed"], true);
    assert_eq!(r.json["claim"]["decoded"]["name"], "alice");
    // Identical re-claim: idempotent.
    let r = h.post_json("/v1/names", &wire(&c1)).await;
    r.expect(200, None);
    assert_eq!(r.json["changed"], false);
    // Newer re-claim by the same key (e.g. new mailbox key): accepted.
    h.clock.advance(Duration::from_millis(10));
    let c2 = claim(&alice, "alice", h.now());
    let r = h.post_json("/v1/names", &wire(&c2)).await;
    r.expect(200, None);
    assert_eq!(r.json["changed"], true);
    // The older claim again: stale.
    h.post_json("/v1/names", &wire(&c1))
        .await
        .expect(409, Some("stale_record"));
    // Another key: taken.
    h.post_json("/v1/names", &wire(&claim(&mallory, "alice", h.now())))
        .await
        .expect(409, Some("name_taken"));
    // Bad signature (tampered bytes) and a record signed by another key.
    let c3 = claim(&SecretKey::generate(), "carol", h.now());
    h.post_json("/v1/names", &tampered(&c3))
        .await
        .expect(401, Some("bad_signature"));
    h.post_json("/v1/names", &resigned(&c3, &mallory))
        .await
        .expect(401, Some("bad_signature"));
    // A record of another kind (domain) is not a claim.
    let w = withdrawal(&alice, h.now());
    h.post_json("/v1/names", &wire(&w))
        .await
        .expect(400, Some("invalid_record"));
    // Timestamp too far in the future: a millisecond past the 60 s window is refused,
    // the window's edge accepted.
    let future = claim(&mallory, "mallory", h.now() + 60_001);
    h.post_json("/v1/names", &wire(&future))
        .await
        .expect(400, Some("timestamp_out_of_window"));
    let edge = SecretKey::generate();
    h.post_json("/v1/names", &wire(&claim(&edge, "edge", h.now() + 60_000)))
        .await
        .expect(200, None);
    // Invalid name, signed correctly.
    let bad = NameClaim {
        name: "Not Valid".into(),
        node_id: mallory.public(),
        mailbox_key: mallory.mailbox_secret().public(),
        timestamp_ms: h.now(),
    };
    h.post_json("/v1/names", &forge(&mallory, Domain::NameClaim, &bad))
        .await
        .expect(400, Some("invalid_name"));
    // Garbage record bytes.
    h.post_json(
        "/v1/names",
        &json!({"record": "!!!", "signature": wire(&c1)["signature"]}),
    )
    .await
    .expect(400, Some("invalid_record"));
    h.post_json(
        "/v1/names",
        &json!({"record": "AAAA", "signature": wire(&c1)["signature"]}),
    )
    .await
    .expect(400, Some("invalid_record"));
    h.post_json("/v1/names", &json!({"record": "AAAA", "signature": "zz"}))
        .await
        .expect(400, Some("malformed_json"));
    body_errors(&h, "/v1/names").await;

    // Rename: a newer claim for another name frees the old one.
    h.clock.advance(Duration::from_millis(10));
    h.claim(&alice, "alice2").await;
    h.get("/v1/names/alice")
        .await
        .expect(404, Some("not_found"));
    h.claim(&mallory, "alice").await;
}

async fn lookup_name_endpoint(b: &Backend<'_>) {
    let h = b.harness(ServerConfig::default()).await;
    let alice = SecretKey::generate();
    h.claim(&alice, "alice").await;
    let r = h.get("/v1/names/alice").await;
    r.expect(200, None);
    assert_eq!(r.json["node_id"], alice.public().to_string());
    assert!(r.json["claim"]["record"].is_string());
    assert!(r.json["presence"].is_null());
    h.announce(&alice, Some("alice"), 60)
        .await
        .expect(200, None);
    let r = h.get("/v1/names/alice").await;
    assert!(r.json["presence"]["record"].is_string());
    h.get("/v1/names/bob").await.expect(404, Some("not_found"));
    h.get("/v1/names/BOB")
        .await
        .expect(400, Some("invalid_name"));
    h.get("/v1/names/%FF").await.expect(400, None);
}

async fn announce_endpoint(b: &Backend<'_>) {
    let h = b.harness(ServerConfig::default()).await;
    let alice = SecretKey::generate();
    let mallory = SecretKey::generate();
    h.claim(&alice, "alice").await;

    let rec = presence(&alice, Some("alice"), h.now(), 60);
    let r = h.post_json("/v1/presence", &wire(&rec)).await;
    r.expect(200, None);
    let after = r.json["reannounce_after_secs"].as_u64().expect("secs");
    assert!((30..=45).contains(&after), "{after}");
    assert_eq!(r.json["observed_ip"], "192.0.2.10");
    // Observed IP returned beside the (unmodified) signed record.
    let r = h.get(&format!("/v1/peers/{}", alice.public())).await;
    r.expect(200, None);
    assert_eq!(r.json["presence"]["observed_ip"], "192.0.2.10");
    assert_eq!(r.json["presence"]["record"], wire(&rec)["record"]);
    assert_eq!(r.json["presence"]["decoded"]["addrs"][0], "0.0.0.0:4433");

    // Replay of the same record, and an older one: stale.
    h.post_json("/v1/presence", &wire(&rec))
        .await
        .expect(409, Some("stale_record"));
    let older = presence(&alice, Some("alice"), h.now() - 1, 60);
    h.post_json("/v1/presence", &wire(&older))
        .await
        .expect(409, Some("stale_record"));
    // Renewal with a newer timestamp.
    h.clock.advance(Duration::from_secs(1));
    h.announce(&alice, Some("alice"), 60)
        .await
        .expect(200, None);
    // Bad signature, another key's signature.
    let m = presence(&mallory, None, h.now(), 60);
    h.post_json("/v1/presence", &tampered(&m))
        .await
        .expect(401, Some("bad_signature"));
    let a = presence(&alice, Some("alice"), h.now() + 5, 60);
    h.post_json("/v1/presence", &resigned(&a, &mallory))
        .await
        .expect(401, Some("bad_signature"));
    // Future timestamp; already-expired record.
    h.post_json(
        "/v1/presence",
        &wire(&presence(&mallory, None, h.now() + 61_000, 60)),
    )
    .await
    .expect(400, Some("timestamp_out_of_window"));
    h.post_json(
        "/v1/presence",
        &wire(&presence(&mallory, None, h.now() - 61_000, 60)),
    )
    .await
    .expect(409, Some("stale_record"));
    // Names: unclaimed, and claimed by someone else.
    h.announce(&mallory, Some("nobody"), 60)
        .await
        .expect(409, Some("name_not_claimed"));
    h.announce(&mallory, Some("alice"), 60)
        .await
        .expect(409, Some("name_taken"));
    // Bounds, with a valid signature.
    let too_many = PresenceRecord {
        node_id: mallory.public(),
        name: None,
        addrs: vec!["1.2.3.4:5".parse().expect("addr"); MAX_ADDRS + 1],
        mailbox_key: mallory.mailbox_secret().public(),
        timestamp_ms: h.now(),
        ttl_secs: 60,
        relay: None,
    };
    h.post_json(
        "/v1/presence",
        &forge(&mallory, Domain::PeerRecord, &too_many),
    )
    .await
    .expect(400, Some("invalid_record"));
    let ttl = PresenceRecord {
        addrs: vec![],
        ttl_secs: 999_999,
        ..too_many
    };
    h.post_json("/v1/presence", &forge(&mallory, Domain::PeerRecord, &ttl))
        .await
        .expect(400, Some("invalid_record"));
    // A name claim is not a presence record.
    h.post_json("/v1/presence", &wire(&claim(&mallory, "m", h.now())))
        .await
        .expect(400, Some("invalid_record"));
    h.announce(&mallory, None, 60).await.expect(200, None);
    body_errors(&h, "/v1/presence").await;
}

async fn withdraw_endpoint(b: &Backend<'_>) {
    let h = b.harness(ServerConfig::default()).await;
    let alice = SecretKey::generate();
    let old = presence(&alice, None, h.now(), 600);
    h.post_json("/v1/presence", &wire(&old))
        .await
        .expect(200, None);
    h.clock.advance(Duration::from_secs(1));

    let w = withdrawal(&alice, h.now());
    let r = h.post_json("/v1/presence/withdraw", &wire(&w)).await;
    r.expect(200, None);
    assert_eq!(r.json["withdrawn"], true);
    h.get(&format!("/v1/peers/{}", alice.public()))
        .await
        .expect(404, Some("not_found"));
    // Replayed withdrawal, and a replayed (older) announce cannot log back in.
    h.post_json("/v1/presence/withdraw", &wire(&w))
        .await
        .expect(409, Some("stale_record"));
    h.post_json("/v1/presence", &wire(&old))
        .await
        .expect(409, Some("stale_record"));
    // A new announce works; the old withdrawal cannot log it out.
    h.clock.advance(Duration::from_secs(1));
    h.announce(&alice, None, 600).await.expect(200, None);
    h.post_json("/v1/presence/withdraw", &wire(&w))
        .await
        .expect(409, Some("stale_record"));
    // Bad signature; another key logging alice out.
    let mallory = SecretKey::generate();
    let w2 = withdrawal(&alice, h.now() + 10);
    h.post_json("/v1/presence/withdraw", &tampered(&w2))
        .await
        .expect(401, Some("bad_signature"));
    h.post_json("/v1/presence/withdraw", &resigned(&w2, &mallory))
        .await
        .expect(401, Some("bad_signature"));
    h.post_json(
        "/v1/presence/withdraw",
        &wire(&withdrawal(&alice, h.now() + 61_000)),
    )
    .await
    .expect(400, Some("timestamp_out_of_window"));
    h.get(&format!("/v1/peers/{}", alice.public()))
        .await
        .expect(200, None);
    // Withdrawing when not online is fine.
    let r = h
        .post_json(
            "/v1/presence/withdraw",
            &wire(&withdrawal(&mallory, h.now())),
        )
        .await;
    r.expect(200, None);
    assert_eq!(r.json["withdrawn"], false);
    body_errors(&h, "/v1/presence/withdraw").await;
}

async fn online_list_is_paginated(b: &Backend<'_>) {
    let h = b.harness(ServerConfig::default()).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let sk = SecretKey::generate();
        h.announce(&sk, None, 60).await.expect(200, None);
        ids.push(sk.public().to_string());
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut uri = "/v1/presence?limit=2".to_owned();
    for _ in 0..10 {
        let r = h.get(&uri).await;
        r.expect(200, None);
        let peers = r.json["peers"].as_array().expect("peers");
        assert!(peers.len() <= 2);
        for p in peers {
            assert!(p["presence"]["record"].is_string());
            seen.push(p["node_id"].as_str().expect("id").to_owned());
        }
        match r.json["next_cursor"].as_str() {
            Some(c) => uri = format!("/v1/presence?limit=2&cursor={c}"),
            None => break,
        }
    }
    // Pages are in NodeId byte order; together they hold every node exactly once.
    seen.sort();
    assert_eq!(seen, ids);
    let all = h.get("/v1/presence").await;
    assert_eq!(all.json["peers"].as_array().map(Vec::len), Some(5));
    h.get("/v1/presence?limit=0")
        .await
        .expect(400, Some("invalid_parameter"));
    h.get("/v1/presence?limit=501")
        .await
        .expect(400, Some("invalid_parameter"));
    h.get("/v1/presence?limit=abc")
        .await
        .expect(400, Some("invalid_parameter"));
    h.get("/v1/presence?cursor=xyz")
        .await
        .expect(400, Some("invalid_parameter"));
}

async fn lookup_peer_endpoint(b: &Backend<'_>) {
    let h = b.harness(ServerConfig::default()).await;
    let alice = SecretKey::generate();
    h.claim(&alice, "alice").await;
    // Offline but claimed: known, with the claim's mailbox key.
    let r = h.get(&format!("/v1/peers/{}", alice.public())).await;
    r.expect(200, None);
    assert_eq!(r.json["claim"]["decoded"]["name"], "alice");
    assert!(r.json["presence"].is_null());
    h.get(&format!("/v1/peers/{}", SecretKey::generate().public()))
        .await
        .expect(404, Some("not_found"));
    h.get("/v1/peers/not-a-node-id")
        .await
        .expect(400, Some("invalid_node_id"));
}

async fn presence_expires_after_ttl(b: &Backend<'_>) {
    let h = b.harness(ServerConfig::default()).await;
    let alice = SecretKey::generate();
    h.announce(&alice, None, 30).await.expect(200, None);
    let path = format!("/v1/peers/{}", alice.public());
    h.clock.advance(Duration::from_secs(29));
    let r = h.get(&path).await;
    r.expect(200, None);
    assert_eq!(r.json["presence"]["expires_in_secs"], 1);
    h.clock.advance(Duration::from_secs(1));
    h.get(&path).await.expect(404, Some("not_found"));
    let list = h.get("/v1/presence").await;
    assert_eq!(list.json["peers"], json!([]));
    assert!(h
        .get("/metrics")
        .await
        .text
        .contains("discovery_live_records 0"));
    // Renewal before expiry keeps it alive.
    h.announce(&alice, None, 30).await.expect(200, None);
    h.clock.advance(Duration::from_secs(20));
    h.announce(&alice, None, 30).await.expect(200, None);
    h.clock.advance(Duration::from_secs(20));
    h.get(&path).await.expect(200, None);
}

fn envelope(n: usize) -> Value {
    json!({ "envelope": data_encoding::BASE64URL_NOPAD.encode(&vec![7u8; n]) })
}

async fn deposit_endpoint(b: &Backend<'_>) {
    let h = b
        .harness(ServerConfig {
            max_mailbox_count: 3,
            ..ServerConfig::default()
        })
        .await;
    let bob = SecretKey::generate();
    h.claim(&bob, "bob").await;
    let path = format!("/v1/mailbox/{}", bob.public());
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = h.post_json(&path, &envelope(100)).await;
        r.expect(201, None);
        ids.push(r.json["id"].as_u64().expect("id"));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    h.post_json(&path, &envelope(100))
        .await
        .expect(429, Some("mailbox_full"));
    // Nothing already stored was lost.
    let req = h.signed(&bob, Method::GET, &path, b"", h.now());
    let r = h.send(req).await;
    r.expect(200, None);
    let got: Vec<u64> = r.json["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["id"].as_u64())
        .collect();
    assert_eq!(got, ids);

    h.post_json(&path, &envelope(64 * 1024 + 1))
        .await
        .expect(413, Some("envelope_too_large"));
    h.post_json(&path, &json!({"envelope": "***"}))
        .await
        .expect(400, Some("invalid_envelope"));
    h.post_json(&path, &json!({"envelope": ""}))
        .await
        .expect(400, Some("invalid_envelope"));
    h.post_json(
        &format!("/v1/mailbox/{}", SecretKey::generate().public()),
        &envelope(10),
    )
    .await
    .expect(404, Some("not_found"));
    h.post_json("/v1/mailbox/xyz", &envelope(10))
        .await
        .expect(400, Some("invalid_node_id"));
    body_errors(&h, &path).await;
}

async fn fetch_and_delete_need_fresh_signatures(b: &Backend<'_>) {
    let h = b.harness(ServerConfig::default()).await;
    let bob = SecretKey::generate();
    let mallory = SecretKey::generate();
    h.claim(&bob, "bob").await;
    let path = format!("/v1/mailbox/{}", bob.public());
    for _ in 0..2 {
        h.post_json(&path, &envelope(10)).await.expect(201, None);
    }

    // Unsigned.
    h.get(&path).await.expect(401, Some("unauthenticated"));
    // Signed by another key.
    h.send(h.signed(&mallory, Method::GET, &path, b"", h.now()))
        .await
        .expect(401, Some("bad_signature"));
    // Signed for another path.
    let other = format!("/v1/mailbox/{}", mallory.public());
    let mut req = h.signed(&bob, Method::GET, &other, b"", h.now());
    *req.uri_mut() = path.parse().expect("uri");
    h.send(req).await.expect(401, Some("bad_signature"));
    // Out of window, both ways.
    h.send(h.signed(&bob, Method::GET, &path, b"", h.now() - 61_000))
        .await
        .expect(400, Some("timestamp_out_of_window"));
    h.send(h.signed(&bob, Method::GET, &path, b"", h.now() + 61_000))
        .await
        .expect(400, Some("timestamp_out_of_window"));
    // The window's edges: 60 s either way is in, a millisecond more is out.
    for ts in [h.now() - 60_001, h.now() + 60_001] {
        h.send(h.signed(&bob, Method::GET, &path, b"", ts))
            .await
            .expect(400, Some("timestamp_out_of_window"));
    }
    for ts in [h.now() - 60_000, h.now() + 60_000] {
        h.send(h.signed(&bob, Method::GET, &path, b"", ts))
            .await
            .expect(200, None);
    }
    // Valid, then replayed.
    let ts = h.now();
    let r = h.send(h.signed(&bob, Method::GET, &path, b"", ts)).await;
    r.expect(200, None);
    assert_eq!(r.json["more"], false);
    let items = r.json["items"].as_array().expect("items").clone();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["envelope"], envelope(10)["envelope"]);
    h.send(h.signed(&bob, Method::GET, &path, b"", ts))
        .await
        .expect(401, Some("replayed_request"));

    // Delete.
    let del = format!("{path}/delete");
    let ids: Vec<u64> = items.iter().filter_map(|i| i["id"].as_u64()).collect();
    let body = serde_json::to_vec(&json!({ "ids": [ids[0]] })).expect("json");
    // Body swapped after signing: bad signature.
    let mut req = h.signed(&bob, Method::POST, &del, &body, h.now());
    *req.body_mut() =
        axum::body::Body::from(serde_json::to_vec(&json!({ "ids": ids })).expect("json"));
    h.send(req).await.expect(401, Some("bad_signature"));
    let req = h.signed(&bob, Method::POST, &del, &body, h.now() + 1);
    let r = h.send(req).await;
    r.expect(200, None);
    assert_eq!(r.json["deleted"], 1);
    h.send(h.signed(&bob, Method::POST, &del, &body, h.now() + 1))
        .await
        .expect(401, Some("replayed_request"));
    h.post_json(&del, &json!({"ids": [ids[1]]}))
        .await
        .expect(401, Some("unauthenticated"));
    h.send(h.signed(&mallory, Method::POST, &del, &body, h.now() + 2))
        .await
        .expect(401, Some("bad_signature"));
    // Malformed JSON (signed), wrong content type, oversized.
    h.send(h.signed(&bob, Method::POST, &del, b"{nope", h.now() + 3))
        .await
        .expect(400, Some("malformed_json"));
    let mut req = h.signed(&bob, Method::POST, &del, &body, h.now() + 4);
    req.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        "text/plain".parse().expect("hv"),
    );
    h.send(req)
        .await
        .expect(415, Some("unsupported_media_type"));
    h.post_raw(&del, "application/json", vec![b' '; BIG])
        .await
        .expect(413, Some("body_too_large"));

    let r = h
        .send(h.signed(&bob, Method::GET, &path, b"", h.now() + 5))
        .await;
    let left: Vec<u64> = r.json["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["id"].as_u64())
        .collect();
    assert_eq!(left, vec![ids[1]]);
    h.get("/v1/mailbox/xyz")
        .await
        .expect(400, Some("invalid_node_id"));
}

async fn writes_are_rate_limited_per_client(b: &Backend<'_>) {
    let h = b
        .harness(ServerConfig {
            write_rate_per_sec: 1.0,
            write_burst: 2,
            ..ServerConfig::default()
        })
        .await;
    let a = "192.0.2.1:1000".parse().expect("addr");
    let b = "192.0.2.2:1000".parse().expect("addr");
    let body = json!({});
    for _ in 0..2 {
        h.send_from(json_request("/v1/names", &body), a)
            .await
            .expect(400, Some("malformed_json"));
    }
    let r = h.send_from(json_request("/v1/names", &body), a).await;
    r.expect(429, Some("rate_limited"));
    assert_eq!(r.headers["retry-after"], "1");
    // Reads are not limited; other clients are independent.
    h.send_from(
        axum::http::Request::get("/healthz")
            .body(axum::body::Body::empty())
            .expect("req"),
        a,
    )
    .await
    .expect(200, None);
    h.send_from(json_request("/v1/names", &body), b)
        .await
        .expect(400, Some("malformed_json"));
    h.clock.advance(Duration::from_secs(1));
    h.send_from(json_request("/v1/names", &body), a)
        .await
        .expect(400, Some("malformed_json"));
}

async fn garbage_never_gets_a_500(b: &Backend<'_>) {
    let h = b.harness(ServerConfig::default()).await;
    let node = SecretKey::generate().public();
    let posts = [
        "/v1/names".to_owned(),
        "/v1/presence".to_owned(),
        "/v1/presence/withdraw".to_owned(),
        format!("/v1/mailbox/{node}"),
        format!("/v1/mailbox/{node}/delete"),
    ];
    let bodies: Vec<Vec<u8>> = vec![
        vec![],
        b"null".to_vec(),
        b"[]".to_vec(),
        b"{\"record\": 1, \"signature\": []}".to_vec(),
        b"{\"record\": \"\", \"signature\": \"\"}".to_vec(),
        vec![0xff; 100],
        b"{\"envelope\": null, \"ids\": \"x\"}".to_vec(),
    ];
    for p in &posts {
        for b in &bodies {
            let r = h.post_raw(p, "application/json", b.clone()).await;
            assert!(
                r.status.is_client_error() && r.json["error"].is_string(),
                "{p} {b:?}: {} {}",
                r.status,
                r.text
            );
        }
    }
    for g in [
        "/v1/names/%00",
        "/v1/peers/%ZZ",
        "/v1/presence?limit=-1",
        "/v1/presence?cursor=%FF",
    ] {
        let r = h.get(g).await;
        assert!(r.status.is_client_error(), "{g}: {}", r.status);
    }
    assert_ne!(
        h.get("/healthz").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

backend_suite!(
    healthz_metrics_and_unknown_routes,
    claim_name_endpoint,
    lookup_name_endpoint,
    announce_endpoint,
    withdraw_endpoint,
    online_list_is_paginated,
    lookup_peer_endpoint,
    presence_expires_after_ttl,
    deposit_endpoint,
    fetch_and_delete_need_fresh_signatures,
    writes_are_rate_limited_per_client,
    garbage_never_gets_a_500
);
