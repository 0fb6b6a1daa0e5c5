//! A real server on 127.0.0.1:0 driven by the client, on every store (memory, redb,
//! PostgreSQL), and the client's refusal of records a lying server makes up.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{routing::get, Json, Router};
use p2p_crypto::{seal, SecretKey};
use p2p_discovery::{
    api::{ClaimEntry, PeerEntry, PresenceEntry},
    AppState, Client, ClientError, RecordError, ServerConfig, Store, SystemClock,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

struct Running {
    url: String,
    state: Option<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), p2p_discovery::ServerError>>,
}

impl Running {
    /// A real server on `store`, with the system clock.
    async fn on(store: Arc<dyn Store>) -> Self {
        let state = AppState::new(ServerConfig::default(), store, Arc::new(SystemClock));
        let mut running = Self::start(Some(p2p_discovery::router(state.clone()))).await;
        running.state = Some(state);
        running
    }

    async fn start(app: Option<Router>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = match app {
            None => {
                let state = AppState::open(ServerConfig::default()).expect("state");
                tokio::spawn(p2p_discovery::serve(listener, state, shutdown))
            }
            Some(app) => tokio::spawn(async move {
                let app = app.into_make_service_with_connect_info::<SocketAddr>();
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                    .map_err(Into::into)
            }),
        };
        Self {
            url: format!("http://{addr}"),
            state: None,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("join").expect("serve");
    }
}

async fn client_round_trip_against_a_real_server(b: &common::Backend<'_>) {
    let (store, _dir) = b.store().await;
    let server = Running::on(store).await;
    let client = Client::new(&server.url).expect("client");
    client.health().await.expect("health");
    let alice = SecretKey::generate();
    let bob = SecretKey::generate();

    // Register.
    assert!(client.claim_name(&alice, "alice").await.expect("claim"));
    assert!(client.claim_name(&alice, "alice").await.expect("re-claim"));
    assert!(matches!(
        client.claim_name(&bob, "alice").await,
        Err(ClientError::NameTaken)
    ));
    client.claim_name(&bob, "bob").await.expect("claim bob");

    // Announce, with an unspecified address filled in from the observed IP.
    let addrs: Vec<SocketAddr> = vec!["0.0.0.0:4433".parse().expect("addr")];
    let out = client
        .announce(&alice, Some("alice"), &addrs, Duration::from_secs(60))
        .await
        .expect("announce");
    assert!(out.reannounce_after >= Duration::from_secs(30));
    assert!(out.reannounce_after < Duration::from_secs(60));
    assert_eq!(out.observed_ip.to_string(), "127.0.0.1");

    // List.
    let online = client.online().await.expect("online");
    assert_eq!(online.len(), 1);
    let a = &online[0];
    assert_eq!(a.node_id, alice.public());
    assert_eq!(a.name.as_deref(), Some("alice"));
    assert!(a.online);
    assert_eq!(
        a.addrs,
        vec!["127.0.0.1:4433".parse::<SocketAddr>().expect("addr")]
    );
    assert_eq!(a.announced_addrs, addrs);
    assert_eq!(a.mailbox_key, alice.mailbox_secret().public());

    // Lookup by name and by id.
    let by_name = client
        .lookup_name("alice")
        .await
        .expect("lookup")
        .expect("found");
    assert_eq!(&by_name, a);
    let by_id = client
        .lookup_id(&alice.public())
        .await
        .expect("lookup")
        .expect("found");
    assert_eq!(&by_id, a);
    assert!(client
        .lookup_name("nobody")
        .await
        .expect("lookup")
        .is_none());
    assert!(client
        .lookup_id(&SecretKey::generate().public())
        .await
        .expect("lookup")
        .is_none());

    // Withdraw.
    assert!(client.withdraw(&alice).await.expect("withdraw"));
    assert!(client.online().await.expect("online").is_empty());
    let offline = client
        .lookup_name("alice")
        .await
        .expect("lookup")
        .expect("claim remains");
    assert!(!offline.online);
    assert!(offline.addrs.is_empty());

    // Mailbox round trip: bob seals to offline alice using the verified mailbox key.
    let envelope = seal::seal(&bob, &alice.public(), &offline.mailbox_key, b"hi alice");
    let id = client
        .deposit(&alice.public(), envelope)
        .await
        .expect("deposit");
    assert!(matches!(
        client
            .deposit(&SecretKey::generate().public(), b"x".to_vec())
            .await,
        Err(ClientError::NotFound)
    ));
    let batch = client.fetch_mailbox(&alice).await.expect("fetch");
    assert_eq!(batch.items.len(), 1);
    assert!(!batch.more);
    assert_eq!(batch.items[0].id, id);
    let opened = seal::open(&alice, &batch.items[0].envelope).expect("open");
    assert_eq!(opened.sender, bob.public());
    assert_eq!(opened.payload, b"hi alice");
    // Bob cannot read alice's mailbox.
    assert!(matches!(
        client.fetch_mailbox(&bob).await,
        Ok(b) if b.items.is_empty()
    ));
    assert_eq!(
        client.delete_mailbox(&alice, &[id]).await.expect("delete"),
        1
    );
    assert!(client
        .fetch_mailbox(&alice)
        .await
        .expect("fetch")
        .items
        .is_empty());

    server.stop().await;
    // Once stopped, the server is unreachable.
    assert!(matches!(
        client.health().await,
        Err(ClientError::Unreachable(_))
    ));
}

/// A server that lies: claims and presence records it returns are made up.
fn lying_server(entry: PeerEntry) -> Router {
    let e1 = entry.clone();
    let e2 = entry.clone();
    Router::new()
        .route("/v1/names/{name}", get(move || async move { Json(e1) }))
        .route("/v1/peers/{id}", get(move || async move { Json(e2) }))
        .route(
            "/v1/presence",
            get(move || async move {
                Json(serde_json::json!({ "peers": [entry], "next_cursor": null }))
            }),
        )
}

fn claim_entry(c: &p2p_discovery::Signed<p2p_discovery::NameClaim>) -> ClaimEntry {
    let w = c.to_wire();
    ClaimEntry {
        record: w.record,
        signature: w.signature,
        decoded: None,
    }
}

#[tokio::test]
async fn client_rejects_forged_records() {
    let alice = SecretKey::generate();
    let mallory = SecretKey::generate();
    let now = p2p_discovery::now_ms();

    // 1. A claim for another name than asked.
    let wrong_name = common::claim(&alice, "alice", now);
    let server = Running::start(Some(lying_server(PeerEntry {
        node_id: alice.public(),
        claim: Some(claim_entry(&wrong_name)),
        presence: None,
    })))
    .await;
    let client = Client::new(&server.url).expect("client");
    assert!(matches!(
        client.lookup_name("bob").await,
        Err(ClientError::InvalidRecord(RecordError::NameMismatch { .. }))
    ));
    // ... and for another node than asked.
    assert!(matches!(
        client.lookup_id(&mallory.public()).await,
        Err(ClientError::InvalidRecord(RecordError::NodeMismatch { .. }))
    ));
    server.stop().await;

    // 2. Mallory's claim presented as alice's entry (signed by another key than the
    //    node the entry names).
    let server = Running::start(Some(lying_server(PeerEntry {
        node_id: alice.public(),
        claim: Some(claim_entry(&common::claim(&mallory, "alice", now))),
        presence: None,
    })))
    .await;
    let client = Client::new(&server.url).expect("client");
    assert!(matches!(
        client.lookup_id(&alice.public()).await,
        Err(ClientError::InvalidRecord(RecordError::NodeMismatch { .. }))
    ));
    server.stop().await;

    // 3. A presence record altered by the server (signature no longer verifies): the
    //    lookup fails and the online list skips it.
    let p = common::presence(&alice, None, now, 60);
    let mut bytes = p.bytes().to_vec();
    // The TTL (the byte before the empty relay option): still a valid record, but not
    // the one signed.
    let ttl = bytes.len() - 2;
    bytes[ttl] ^= 1;
    let forged = PresenceEntry {
        record: data_encoding::BASE64URL_NOPAD.encode(&bytes),
        signature: *p.signature(),
        observed_ip: None,
        expires_in_secs: 60,
        decoded: None,
    };
    let server = Running::start(Some(lying_server(PeerEntry {
        node_id: alice.public(),
        claim: None,
        presence: Some(forged),
    })))
    .await;
    let client = Client::new(&server.url).expect("client");
    assert!(matches!(
        client.lookup_id(&alice.public()).await,
        Err(ClientError::InvalidRecord(RecordError::BadSignature { .. }))
    ));
    assert!(client.online().await.expect("online").is_empty());
    server.stop().await;

    // 4. Oversized / malformed record bytes.
    let server = Running::start(Some(lying_server(PeerEntry {
        node_id: alice.public(),
        claim: None,
        presence: Some(PresenceEntry {
            record: "A".repeat(10_000),
            signature: *p.signature(),
            observed_ip: None,
            expires_in_secs: 60,
            decoded: None,
        }),
    })))
    .await;
    let client = Client::new(&server.url).expect("client");
    assert!(matches!(
        client.lookup_id(&alice.public()).await,
        Err(ClientError::InvalidRecord(RecordError::TooLarge { .. }))
    ));
    server.stop().await;

    // 5. A genuine but stale presence (an old login replayed) and one stamped in the
    //    future: ignored, so alice counts as offline and is not in the online list.
    for (what, stamp) in [
        ("expired", now - 10 * 60 * 1000),
        ("future", now + 10 * 60 * 1000),
    ] {
        let p = common::presence(&alice, Some("alice"), stamp, 60);
        let w = p.to_wire();
        let server = Running::start(Some(lying_server(PeerEntry {
            node_id: alice.public(),
            claim: Some(claim_entry(&common::claim(
                &alice,
                "alice",
                now - 3_600_000,
            ))),
            presence: Some(PresenceEntry {
                record: w.record,
                signature: w.signature,
                observed_ip: None,
                expires_in_secs: 60,
                decoded: None,
            }),
        })))
        .await;
        let client = Client::new(&server.url).expect("client");
        let info = client
            .lookup_name("alice")
            .await
            .expect("the claim still verifies")
            .expect("found");
        assert!(!info.online, "{what} presence ignored");
        assert!(info.addrs.is_empty(), "{what}: no addresses to dial");
        assert!(client.online().await.expect("online").is_empty(), "{what}");
        server.stop().await;
    }
}

#[tokio::test]
async fn client_errors_are_typed() {
    assert!(matches!(
        Client::new("not a url"),
        Err(ClientError::InvalidUrl { .. })
    ));
    // Nothing listens on a port we just released.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let client = Client::new(&format!("http://{addr}")).expect("client");
    assert!(matches!(
        client.online().await,
        Err(ClientError::Unreachable(_))
    ));
    // A server that never answers: timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client =
        Client::with_timeout(&format!("http://{addr}"), Duration::from_millis(200)).expect("c");
    assert!(matches!(client.online().await, Err(ClientError::Timeout)));
    drop(listener);
}

#[tokio::test]
async fn oversized_responses_are_refused() {
    let huge = vec![b' '; p2p_discovery::MAX_RESPONSE_BYTES + 1];
    let app = Router::new().route(
        "/v1/peers/{id}",
        get(move || {
            let body = huge.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    );
    let server = Running::start(Some(app)).await;
    let client = Client::new(&server.url).expect("client");
    assert!(matches!(
        client.lookup_id(&SecretKey::generate().public()).await,
        Err(ClientError::ResponseTooLarge { .. })
    ));
    server.stop().await;
}

/// A server hands its names and mailboxes over to another: claims verified there as if
/// their nodes sent them, envelopes moved (deleted here only once stored there), a name
/// taken there reported; a second hand-over moves nothing twice.
async fn a_server_hands_its_names_and_mail_over(b: &common::Backend<'_>) {
    let (store, _dir) = b.store().await;
    let old = Running::on(store).await;
    let new = Running::on(Arc::new(p2p_discovery::MemoryStore::new())).await;
    let (to_old, to_new) = (
        Client::new(&old.url).expect("client"),
        Client::new(&new.url).expect("client"),
    );
    let (alice, bob, carol) = (
        SecretKey::generate(),
        SecretKey::generate(),
        SecretKey::generate(),
    );
    to_old.claim_name(&alice, "alice").await.expect("claim");
    to_old.claim_name(&bob, "bob").await.expect("claim");
    // Carol took "bob" on the other server first.
    to_new.claim_name(&carol, "bob").await.expect("claim");
    let key = alice.mailbox_secret().public();
    let mut sent = Vec::new();
    for i in 0..3u8 {
        let envelope = seal::seal(&bob, &alice.public(), &key, &[i]);
        to_old
            .deposit(&alice.public(), envelope.clone())
            .await
            .expect("deposit");
        sent.push(envelope);
    }
    // Mail for a node the other server does not know (erin is only online here, with no
    // name) stays here.
    let erin = SecretKey::generate();
    let addr: SocketAddr = "192.0.2.7:4000".parse().expect("addr");
    to_old
        .announce(&erin, None, &[addr], Duration::from_secs(60))
        .await
        .expect("announce");
    let for_erin = seal::seal(&bob, &erin.public(), &erin.mailbox_secret().public(), b"e");
    to_old
        .deposit(&erin.public(), for_erin)
        .await
        .expect("deposit");

    let state = old.state.clone().expect("state");
    let report = state.hand_over(&to_new).await.expect("hand over");
    assert_eq!(report.names, 1, "{report:?}");
    assert_eq!(report.names_taken, vec![("bob".to_owned(), bob.public())]);
    assert_eq!(report.envelopes, 3);
    assert_eq!(report.envelopes_kept, 1);

    let found = to_new.lookup_name("alice").await.expect("lookup");
    assert_eq!(found.map(|p| p.node_id), Some(alice.public()));
    let found = to_new.lookup_name("bob").await.expect("lookup");
    assert_eq!(found.map(|p| p.node_id), Some(carol.public()));
    let moved = to_new.fetch_mailbox(&alice).await.expect("fetch");
    let moved: Vec<Vec<u8>> = moved.items.into_iter().map(|i| i.envelope).collect();
    assert_eq!(moved, sent);
    assert!(to_old
        .fetch_mailbox(&alice)
        .await
        .expect("fetch")
        .items
        .is_empty());

    // Again: the claim is already there, and only erin's envelope is left, until erin
    // shows up there.
    let again = state.hand_over(&to_new).await.expect("hand over");
    assert_eq!(
        (again.names, again.envelopes, again.envelopes_kept),
        (1, 0, 1)
    );
    to_new
        .announce(&erin, None, &[addr], Duration::from_secs(60))
        .await
        .expect("announce");
    let last = state.hand_over(&to_new).await.expect("hand over");
    assert_eq!((last.envelopes, last.envelopes_kept), (1, 0));
    let moved = to_new.fetch_mailbox(&erin).await.expect("fetch");
    assert_eq!(moved.items.len(), 1);
    old.stop().await;
    new.stop().await;
}

backend_suite!(
    client_round_trip_against_a_real_server,
    a_server_hands_its_names_and_mail_over
);

/// The default server (`AppState::open`, in memory) answers the client too.
#[tokio::test]
async fn the_default_server_answers() {
    let server = Running::start(None).await;
    let client = Client::new(&server.url).expect("client");
    client.health().await.expect("health");
    assert!(client.online().await.expect("online").is_empty());
    server.stop().await;
}
