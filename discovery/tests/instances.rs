//! Several discovery instances on one PostgreSQL database serve the same users at once:
//! a name raced from both is won once, a deposit on one is fetched on the other,
//! presence announced on one is listed by the other, a signed request used on one is
//! refused on the other, the mailbox bound holds across both, users go on when one
//! instance dies, and a database restart is a `503` with `Retry-After` (nothing lost)
//! until the service resumes by itself.
//!
//! Every instance is a real HTTP server on 127.0.0.1:0 with its own connection pool;
//! the database is a throwaway PostgreSQL server started by the test (skipped with a
//! message when PostgreSQL is not installed, unless `P2P_REQUIRE_POSTGRES=1`).

mod common;

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use p2p_crypto::{seal, Domain, SecretKey};
use p2p_discovery::{
    api::{request_signing_bytes, HEADER_SIGNATURE, HEADER_TIMESTAMP},
    AppState, Client, ClientError, PgStore, ServerConfig, SystemClock,
};
use p2p_tests::postgres::PgServer;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

const DEADLINE: Duration = Duration::from_secs(30);

/// One discovery instance: its own HTTP server and pool on the shared database.
struct Instance {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Instance {
    async fn start(db: &str, config: ServerConfig) -> Instance {
        let store = PgStore::connect(db).await.expect("connect");
        let state = AppState::new(config, Arc::new(store), Arc::new(SystemClock));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = p2p_discovery::serve(listener, state, shutdown).await {
                eprintln!("instance failed: {e}");
            }
        });
        Instance {
            url,
            stop: Some(stop),
            task,
        }
    }

    fn client(&self) -> Client {
        Client::with_timeout(&self.url, Duration::from_secs(15)).expect("client")
    }

    /// Stops the instance, as if its process died: its port stops answering.
    async fn kill(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(DEADLINE, &mut self.task).await;
    }
}

/// Every test client comes from 127.0.0.1: lift the per-IP write limit.
fn config() -> ServerConfig {
    ServerConfig {
        write_rate_per_sec: 1e6,
        write_burst: 1_000_000,
        ..ServerConfig::default()
    }
}

/// Two instances on a fresh database of `pg`.
async fn pair(pg: &PgServer, db: &str, config: ServerConfig) -> (Instance, Instance) {
    let url = pg.create_database(db);
    // Both start at once: their schema migrations race, harmlessly.
    tokio::join!(
        Instance::start(&url, config.clone()),
        Instance::start(&url, config)
    )
}

/// Polls `check` until it is true, within [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < end, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_name_raced_from_both_instances_is_won_once(pg: &PgServer) {
    let (a, b) = pair(pg, "race", config()).await;
    let keys: Vec<SecretKey> = (0..16).map(|_| SecretKey::generate()).collect();
    let claims = keys.iter().cloned().enumerate().map(|(i, k)| {
        let client = if i % 2 == 0 { a.client() } else { b.client() };
        async move { client.claim_name(&k, "popular").await }
    });
    let results = futures_join_all(claims).await;
    let winners: Vec<usize> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|_| i))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one claim wins: {results:?}");
    for r in &results {
        assert!(
            matches!(r, Ok(_) | Err(ClientError::NameTaken)),
            "every other claim is name_taken: {r:?}"
        );
    }
    let winner = keys[winners[0]].public();
    for i in [&a, &b] {
        let found = i
            .client()
            .lookup_name("popular")
            .await
            .expect("lookup")
            .expect("claimed");
        assert_eq!(found.node_id, winner, "both instances name the same winner");
    }
    a.kill().await;
    b.kill().await;
}

/// `join_all` without another dependency: spawn each, then await them in order.
async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<JoinHandle<T>> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

async fn mail_and_presence_cross_instances(pg: &PgServer) {
    let (a, b) = pair(pg, "cross", config()).await;
    let (alice, bob) = (SecretKey::generate(), SecretKey::generate());
    a.client().claim_name(&alice, "alice").await.expect("claim");
    b.client().claim_name(&bob, "bob").await.expect("claim");

    // Presence announced on A is listed by B; a withdrawal on B takes it off A.
    a.client()
        .announce(
            &alice,
            Some("alice"),
            &["127.0.0.1:4433".parse().expect("addr")],
            Duration::from_secs(60),
        )
        .await
        .expect("announce on A");
    let online = b.client().online().await.expect("online on B");
    assert_eq!(online.len(), 1);
    assert_eq!(online[0].node_id, alice.public());
    assert_eq!(online[0].name.as_deref(), Some("alice"));
    assert!(
        b.client()
            .lookup_id(&alice.public())
            .await
            .expect("lookup")
            .expect("known")
            .online
    );
    assert!(b.client().withdraw(&alice).await.expect("withdraw on B"));
    assert!(a.client().online().await.expect("online on A").is_empty());

    // A deposit on A is fetched (and deleted) on B.
    let bob_info = a
        .client()
        .lookup_name("bob")
        .await
        .expect("lookup")
        .expect("bob");
    let envelope = seal::seal(&alice, &bob.public(), &bob_info.mailbox_key, b"hello bob");
    let id = a
        .client()
        .deposit(&bob.public(), envelope)
        .await
        .expect("deposit on A");
    let batch = b.client().fetch_mailbox(&bob).await.expect("fetch on B");
    assert_eq!(batch.items.len(), 1);
    assert_eq!(batch.items[0].id, id);
    let opened = seal::open(&bob, &batch.items[0].envelope).expect("open");
    assert_eq!(opened.payload, b"hello bob");
    assert_eq!(
        b.client()
            .delete_mailbox(&bob, &[id])
            .await
            .expect("delete on B"),
        1
    );
    assert!(a
        .client()
        .fetch_mailbox(&bob)
        .await
        .expect("fetch on A")
        .items
        .is_empty());

    // A signed mailbox request used on A is refused on B: the replay guard is shared.
    let path = format!("/v1/mailbox/{}", bob.public());
    let ts = p2p_discovery::now_ms();
    let sig = bob.sign(
        Domain::Request,
        &request_signing_bytes("GET", &path, b"", ts),
    );
    let http = reqwest::Client::new();
    for (i, expected) in [(&a, 200u16), (&b, 401)] {
        let resp = http
            .get(format!("{}{path}", i.url))
            .header(HEADER_TIMESTAMP, ts.to_string())
            .header(HEADER_SIGNATURE, sig.to_string())
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), expected);
        if expected == 401 {
            let body: serde_json::Value = resp.json().await.expect("json");
            assert_eq!(body["error"], "replayed_request");
        }
    }
    a.kill().await;
    b.kill().await;
}

async fn the_mailbox_bound_holds_across_instances(pg: &PgServer) {
    let (a, b) = pair(
        pg,
        "bound",
        ServerConfig {
            max_mailbox_count: 5,
            ..config()
        },
    )
    .await;
    let bob = SecretKey::generate();
    a.client().claim_name(&bob, "bob").await.expect("claim");
    let deposits = (0..20).map(|i| {
        let client = if i % 2 == 0 { a.client() } else { b.client() };
        let to = bob.public();
        async move { client.deposit(&to, vec![i as u8; 16]).await }
    });
    let results = futures_join_all(deposits).await;
    let stored = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(stored, 5, "{results:?}");
    assert!(results
        .iter()
        .all(|r| matches!(r, Ok(_) | Err(ClientError::MailboxFull))));
    let batch = b.client().fetch_mailbox(&bob).await.expect("fetch");
    assert_eq!(batch.items.len(), 5);
    // Deleting frees slots for new deposits, on either instance.
    let ids: Vec<u64> = batch.items.iter().map(|i| i.id).collect();
    assert_eq!(
        a.client()
            .delete_mailbox(&bob, &ids[..2])
            .await
            .expect("del"),
        2
    );
    for _ in 0..2 {
        b.client()
            .deposit(&bob.public(), vec![9; 8])
            .await
            .expect("a freed slot");
    }
    assert!(matches!(
        a.client().deposit(&bob.public(), vec![9; 8]).await,
        Err(ClientError::MailboxFull)
    ));
    a.kill().await;
    b.kill().await;
}

/// Alice (claimed on A) and bob (claimed on B); alice deposits `text` for bob on A.
async fn alice_writes_to_bob(
    a: &Instance,
    b: &Instance,
    text: &[u8],
) -> (SecretKey, SecretKey, p2p_discovery::PeerInfo) {
    let (alice, bob) = (SecretKey::generate(), SecretKey::generate());
    a.client().claim_name(&alice, "alice").await.expect("claim");
    b.client().claim_name(&bob, "bob").await.expect("claim");
    let bob_info = a
        .client()
        .lookup_name("bob")
        .await
        .expect("lookup")
        .expect("bob");
    let envelope = seal::seal(&alice, &bob.public(), &bob_info.mailbox_key, text);
    a.client()
        .deposit(&bob.public(), envelope)
        .await
        .expect("deposit on A");
    (alice, bob, bob_info)
}

async fn users_continue_on_one_instance_when_the_other_dies(pg: &PgServer) {
    let (a, b) = pair(pg, "failover", config()).await;
    let (alice, bob, bob_info) = alice_writes_to_bob(&a, &b, b"before").await;
    let a_client = a.client();
    a.kill().await;
    assert!(matches!(
        a_client.health().await,
        Err(ClientError::Unreachable(_))
    ));

    // Everything A stored is on B, and B takes new work.
    let b_client = b.client();
    b_client.health().await.expect("B is healthy");
    assert!(matches!(
        b_client.claim_name(&SecretKey::generate(), "alice").await,
        Err(ClientError::NameTaken)
    ));
    b_client
        .announce(&alice, Some("alice"), &[], Duration::from_secs(60))
        .await
        .expect("announce on B");
    let envelope = seal::seal(&alice, &bob.public(), &bob_info.mailbox_key, b"after");
    b_client
        .deposit(&bob.public(), envelope)
        .await
        .expect("deposit on B");
    let batch = b_client.fetch_mailbox(&bob).await.expect("fetch on B");
    let texts: Vec<Vec<u8>> = batch
        .items
        .iter()
        .map(|i| seal::open(&bob, &i.envelope).expect("open").payload)
        .collect();
    assert_eq!(texts, vec![b"before".to_vec(), b"after".to_vec()]);
    assert_eq!(b_client.online().await.expect("online").len(), 1);
    b.kill().await;
}

async fn a_database_restart_is_a_503_then_the_service_resumes(pg: &mut PgServer) {
    let (a, b) = pair(pg, "restart", config()).await;
    let (alice, bob, bob_info) = alice_writes_to_bob(&a, &b, b"kept").await;
    let envelope = seal::seal(&alice, &bob.public(), &bob_info.mailbox_key, b"again");

    pg.stop();
    let http = reqwest::Client::new();
    for i in [&a, &b] {
        for path in ["/healthz", "/v1/names/alice", "/v1/presence"] {
            let resp = http
                .get(format!("{}{path}", i.url))
                .send()
                .await
                .expect("the instance answers");
            assert_eq!(resp.status().as_u16(), 503, "{path}");
            assert_eq!(
                resp.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                Some("2"),
                "{path}"
            );
            let body: serde_json::Value = resp.json().await.expect("json");
            assert_eq!(body["error"], "store_unavailable", "{path}");
            assert!(body["message"].is_string());
        }
        let metrics = http
            .get(format!("{}/metrics", i.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        assert!(metrics.contains("discovery_store_up 0"), "{metrics}");
        assert!(metrics.contains("discovery_rejections_total{reason=\"store_unavailable\"}"));
    }
    // The client says what happened, and a deposit that failed is the sender's to keep.
    assert!(matches!(
        b.client().deposit(&bob.public(), envelope.clone()).await,
        Err(ClientError::Unavailable {
            retry_after: Some(_)
        })
    ));
    assert!(matches!(
        a.client().claim_name(&SecretKey::generate(), "carol").await,
        Err(ClientError::Unavailable { .. })
    ));

    pg.start_again();
    for i in [&a, &b] {
        let client = i.client();
        eventually("the instance serves again", || {
            let client = client.clone();
            async move { client.health().await.is_ok() }
        })
        .await;
    }
    // Nothing was lost, and nothing half-done was kept: carol's claim never happened.
    let found = b.client().lookup_name("alice").await.expect("lookup");
    assert_eq!(found.map(|p| p.node_id), Some(alice.public()));
    assert!(a
        .client()
        .lookup_name("carol")
        .await
        .expect("lookup")
        .is_none());
    let batch = b.client().fetch_mailbox(&bob).await.expect("fetch");
    assert_eq!(batch.items.len(), 1);
    assert_eq!(
        seal::open(&bob, &batch.items[0].envelope)
            .expect("open")
            .payload,
        b"kept"
    );
    b.client()
        .deposit(&bob.public(), envelope)
        .await
        .expect("deposits work again");
    a.kill().await;
    b.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_instances_share_one_database() {
    let Some(mut pg) = PgServer::start() else {
        return;
    };
    a_name_raced_from_both_instances_is_won_once(&pg).await;
    mail_and_presence_cross_instances(&pg).await;
    the_mailbox_bound_holds_across_instances(&pg).await;
    users_continue_on_one_instance_when_the_other_dies(&pg).await;
    a_database_restart_is_a_503_then_the_service_resumes(&mut pg).await;
}
