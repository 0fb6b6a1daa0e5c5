//! Helpers shared by the discovery integration tests.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{header, HeaderMap, Method, Request, StatusCode},
    Router,
};
use http_body_util::BodyExt;
use p2p_crypto::{Domain, NodeId, SecretKey};
use p2p_discovery::{
    api::{request_signing_bytes, HEADER_SIGNATURE, HEADER_TIMESTAMP},
    AppState, ManualClock, MemoryStore, NameClaim, PgStore, PresenceRecord, RedbStore,
    ServerConfig, Signed, SignedWire, Store, Withdrawal,
};
use p2p_tests::postgres::PgServer;
use serde_json::{json, Value};
use tower::ServiceExt;

/// A fixed starting time for the manual clock (2023-11-14).
pub const T0: u64 = 1_700_000_000_000;

pub struct Harness {
    pub app: Router,
    pub clock: ManualClock,
    pub state: AppState,
    /// Keeps a redb store's directory.
    _dir: Option<tempfile::TempDir>,
}

/// The store a test runs on.
pub enum Backend<'a> {
    Memory,
    Redb,
    /// A fresh database on this server for each harness.
    Postgres(&'a PgServer),
}

/// Names the databases a test binary creates on its PostgreSQL server.
static DATABASES: AtomicUsize = AtomicUsize::new(0);

impl Backend<'_> {
    /// A new, empty store of this kind (and the directory of a redb one).
    pub async fn store(&self) -> (Arc<dyn Store>, Option<tempfile::TempDir>) {
        match self {
            Backend::Memory => (Arc::new(MemoryStore::new()), None),
            Backend::Redb => {
                let dir = tempfile::tempdir().expect("tempdir");
                let store = RedbStore::open(&dir.path().join("discovery.redb")).expect("redb");
                (Arc::new(store), Some(dir))
            }
            Backend::Postgres(pg) => (pg_store(pg).await, None),
        }
    }

    /// A harness on a new, empty store of this kind.
    pub async fn harness(&self, config: ServerConfig) -> Harness {
        let (store, dir) = self.store().await;
        let mut h = Harness::with_store(config, store);
        h._dir = dir;
        h
    }
}

/// A store on a new database of `pg`.
pub async fn pg_store(pg: &PgServer) -> Arc<dyn Store> {
    let n = DATABASES.fetch_add(1, Ordering::SeqCst);
    let url = pg.create_database(&format!("test{n}"));
    Arc::new(PgStore::connect(&url).await.expect("connect to PostgreSQL"))
}

/// Runs each of the given `async fn(&Backend)` tests on memory and redb (a test each),
/// and all of them on one throwaway PostgreSQL server (one test, a database each),
/// skipped with a message when PostgreSQL is not installed (unless
/// `P2P_REQUIRE_POSTGRES=1`).
#[macro_export]
macro_rules! backend_suite {
    ($($test:ident),* $(,)?) => {
        mod on_memory {
            $(#[tokio::test]
            async fn $test() {
                super::$test(&$crate::common::Backend::Memory).await
            })*
        }
        mod on_redb {
            $(#[tokio::test]
            async fn $test() {
                super::$test(&$crate::common::Backend::Redb).await
            })*
        }
        #[tokio::test]
        async fn on_postgres() {
            let Some(pg) = p2p_tests::postgres::PgServer::start() else {
                return;
            };
            $(
                eprintln!("postgres: {}", stringify!($test));
                $test(&$crate::common::Backend::Postgres(&pg)).await;
            )*
        }
    };
}

impl Harness {
    pub fn new() -> Self {
        Self::with_config(ServerConfig::default())
    }

    pub fn with_config(config: ServerConfig) -> Self {
        Self::with_store(config, Arc::new(MemoryStore::new()))
    }

    pub fn with_store(config: ServerConfig, store: Arc<dyn Store>) -> Self {
        let clock = ManualClock::new(T0);
        let state = AppState::new(config, store, Arc::new(clock.clone()));
        Self {
            app: p2p_discovery::router(state.clone()),
            clock,
            state,
            _dir: None,
        }
    }

    pub fn now(&self) -> u64 {
        p2p_discovery::Clock::now_ms(&self.clock)
    }

    /// Sends a request from 192.0.2.10:5555.
    pub async fn send(&self, req: Request<Body>) -> Reply {
        self.send_from(req, "192.0.2.10:5555".parse().expect("addr"))
            .await
    }

    pub async fn send_from(&self, mut req: Request<Body>, from: SocketAddr) -> Reply {
        req.extensions_mut().insert(ConnectInfo(from));
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            json,
            text,
        }
    }

    pub async fn get(&self, uri: &str) -> Reply {
        self.send(Request::get(uri).body(Body::empty()).expect("request"))
            .await
    }

    pub async fn post_json(&self, uri: &str, body: &Value) -> Reply {
        self.send(json_request(uri, body)).await
    }

    pub async fn post_raw(&self, uri: &str, content_type: &str, body: Vec<u8>) -> Reply {
        self.send(
            Request::post(uri)
                .header(header::CONTENT_TYPE, content_type)
                .body(Body::from(body))
                .expect("request"),
        )
        .await
    }

    /// Claims `name` for `sk` at the current time; asserts success.
    pub async fn claim(&self, sk: &SecretKey, name: &str) -> Reply {
        let r = self
            .post_json("/v1/names", &wire(&claim(sk, name, self.now())))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r
    }

    /// Announces `sk` with name and addrs at the current time.
    pub async fn announce(&self, sk: &SecretKey, name: Option<&str>, ttl: u32) -> Reply {
        let rec = presence(sk, name, self.now(), ttl);
        self.post_json("/v1/presence", &wire(&rec)).await
    }

    /// Builds a mailbox request signed by `sk` at `ts`.
    pub fn signed(
        &self,
        sk: &SecretKey,
        method: Method,
        path: &str,
        body: &[u8],
        ts: u64,
    ) -> Request<Body> {
        let sig = sk.sign(
            Domain::Request,
            &request_signing_bytes(method.as_str(), path, body, ts),
        );
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(HEADER_TIMESTAMP, ts.to_string())
            .header(HEADER_SIGNATURE, sig.to_string());
        if !body.is_empty() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        b.body(Body::from(body.to_vec())).expect("request")
    }
}

pub fn json_request(uri: &str, body: &Value) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Reply {
    /// Asserts the status and, for errors, the stable error code.
    #[track_caller]
    pub fn expect(&self, status: u16, code: Option<&str>) -> &Self {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        if let Some(code) = code {
            assert_eq!(self.json["error"], json!(code), "body: {}", self.text);
            assert!(self.json["message"].is_string(), "body: {}", self.text);
        }
        self
    }
}

pub fn claim(sk: &SecretKey, name: &str, ts: u64) -> Signed<NameClaim> {
    Signed::sign(
        sk,
        NameClaim {
            name: name.into(),
            node_id: sk.public(),
            mailbox_key: sk.mailbox_secret().public(),
            timestamp_ms: ts,
        },
    )
    .expect("sign claim")
}

pub fn presence(sk: &SecretKey, name: Option<&str>, ts: u64, ttl: u32) -> Signed<PresenceRecord> {
    Signed::sign(
        sk,
        PresenceRecord {
            node_id: sk.public(),
            name: name.map(Into::into),
            addrs: vec![
                "0.0.0.0:4433".parse().expect("addr"),
                "198.51.100.1:4433".parse().expect("addr"),
            ],
            mailbox_key: sk.mailbox_secret().public(),
            timestamp_ms: ts,
            ttl_secs: ttl,
            relay: None,
        },
    )
    .expect("sign presence")
}

pub fn withdrawal(sk: &SecretKey, ts: u64) -> Signed<Withdrawal> {
    Signed::sign(
        sk,
        Withdrawal {
            node_id: sk.public(),
            timestamp_ms: ts,
        },
    )
    .expect("sign withdrawal")
}

pub fn wire<R: p2p_discovery::Record>(s: &Signed<R>) -> Value {
    serde_json::to_value(s.to_wire()).expect("json")
}

/// Signs arbitrary postcard bytes of `value` without any validation (to build records
/// that break the rules) with `signer`.
pub fn forge<T: serde::Serialize>(signer: &SecretKey, domain: Domain, value: &T) -> Value {
    let bytes = postcard::to_stdvec(value).expect("encode");
    let sig = signer.sign(domain, &bytes);
    serde_json::to_value(SignedWire {
        record: data_encoding::BASE64URL_NOPAD.encode(&bytes),
        signature: sig,
    })
    .expect("json")
}

/// The same record with its signature replaced by one from `other` over the same bytes.
pub fn resigned<R: p2p_discovery::Record>(s: &Signed<R>, other: &SecretKey) -> Value {
    serde_json::to_value(SignedWire {
        record: data_encoding::BASE64URL_NOPAD.encode(s.bytes()),
        signature: other.sign(R::DOMAIN, s.bytes()),
    })
    .expect("json")
}

/// The same record with one byte of the signed bytes flipped.
/// The record with one bit flipped, as near its end as still decodes to a valid record
/// (so the only fault left is the signature).
pub fn tampered<R: p2p_discovery::Record>(s: &Signed<R>) -> Value {
    let original = s.bytes().to_vec();
    let bytes = (0..original.len())
        .rev()
        .map(|i| {
            let mut b = original.clone();
            b[i] ^= 1;
            b
        })
        .find(|b| {
            matches!(
                Signed::<R>::verify(b.clone(), *s.signature()),
                Err(p2p_discovery::RecordError::BadSignature { .. })
            )
        })
        .expect("some bit flip leaves a valid record");
    serde_json::to_value(SignedWire {
        record: data_encoding::BASE64URL_NOPAD.encode(&bytes),
        signature: *s.signature(),
    })
    .expect("json")
}

pub fn node_path(prefix: &str, node: &NodeId) -> String {
    format!("{prefix}/{node}")
}
