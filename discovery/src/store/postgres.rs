//! [`PgStore`]: everything in PostgreSQL, so any number of server instances on one
//! database serve the same users at once.
//!
//! Each decision is one statement (or one transaction) whose outcome the database
//! orders, never a read followed by a write:
//!
//! - **Names**: an upsert of the node's claim that updates only when the new claim is
//!   newer; the unique constraint on the name refuses a name another node holds
//!   (`23505`), so of two instances racing for one name exactly one wins.
//! - **Presence**: an upsert that replaces the node's row only when the new timestamp is
//!   newer than the last one seen (live record or tombstone) or the tombstone is
//!   forgotten; a withdrawal writes a tombstone the same way.
//! - **Mailbox bound**: a deposit takes a slot from the recipient's count with a
//!   conditional upsert (`count < max`) and inserts the envelope in the same statement.
//! - **Replay guard**: the signature is the primary key of its table (`ON CONFLICT DO
//!   NOTHING`: a second use inserts nothing).
//!
//! Expiry is by query (`expires_at_ms > now`, with `now` from the instance's clock) and
//! by a periodic cleanup ([`Store::cleanup`]). A lost or refused connection, a restarting
//! server or a statement that outlives [`PgOptions::op_timeout`] is
//! [`StoreError::Unavailable`]: the server answers `503` with `Retry-After`, nothing was
//! changed, and the pool reconnects once the database is back.

use std::{
    net::IpAddr,
    str::FromStr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use deadpool_postgres::{Manager, Object, Pool, PoolError, Runtime};
use p2p_crypto::{NodeId, Signature};
use tokio_postgres::{error::SqlState, NoTls, Row};

use super::{
    decide, decode_signed, encode_signed, stored_verified, Announced, ClaimOutcome, DepositOutcome,
    Fetched, LivePresence, OnlinePage, PeerState, RequestSeen, Store, StoreError, StoreStats,
    StoredEnvelope, Withdrawn,
};
use crate::{
    presence::{expiry, TOMBSTONE_MS},
    record::{NameClaim, PresenceRecord, Signed, VerifiedSignatures, Withdrawal},
};

/// The schema migrations, in order: (version, name, SQL). Kept in `discovery/migrations/`.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "init", include_str!("../../migrations/0001_init.sql"))];

/// Settings of a [`PgStore`]. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Most connections this instance opens. Default 16.
    pub max_connections: usize,
    /// Longest wait for a connection, and longest run of one operation, before it is
    /// [`StoreError::Unavailable`]. Default 5 s.
    pub op_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            op_timeout: Duration::from_secs(5),
        }
    }
}

/// Names, mailboxes, presence and the replay guard in PostgreSQL (or an engine that
/// speaks its protocol and SQL).
pub struct PgStore {
    pool: Pool,
    /// The records read back and verified (see [`decode_signed`]).
    verified: VerifiedSignatures,
    options: PgOptions,
    /// Live records as last counted (by [`Store::cleanup`] and [`Store::stats`]): new
    /// nodes are refused once it reaches the limit, so the bound is approximate.
    live_estimate: AtomicU64,
    target: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Whether `url` names a PostgreSQL database (`postgres://` or `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The database a URL names, without its password: `user@host:port/dbname`.
pub fn describe_url(url: &str) -> Result<String, StoreError> {
    let config =
        tokio_postgres::Config::from_str(url).map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
            tokio_postgres::config::Host::Unix(path) => format!("{}:{p}", path.display()),
        })
        .collect();
    Ok(format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    ))
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/dbname`),
    /// with [`PgOptions::default`], and brings its schema up to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// [`PgStore::connect`] with options.
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        if !is_postgres_url(url) {
            return Err(StoreError::InvalidUrl(
                "expected postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME".into(),
            ));
        }
        let target = describe_url(url)?;
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.op_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("p2p-node discovery");
        }
        let pool = Pool::builder(Manager::new(config, NoTls))
            .max_size(options.max_connections.max(1))
            .wait_timeout(Some(options.op_timeout))
            .create_timeout(Some(options.op_timeout))
            .recycle_timeout(Some(options.op_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
        let store = Self {
            pool,
            verified: stored_verified(),
            options,
            live_estimate: AtomicU64::new(0),
            target,
        };
        store.timed(store.migrate()).await?;
        Ok(store)
    }

    /// The database, without its password.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Connections open and idle in this instance's pool.
    pub fn pool_status(&self) -> (usize, usize) {
        let s = self.pool.status();
        (s.size, s.available)
    }

    /// Runs `op` within [`PgOptions::op_timeout`].
    async fn timed<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.options.op_timeout, op)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "no answer from the database within {:?}",
                    self.options.op_timeout
                )))
            })
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => pg_error(e),
            PoolError::Timeout(_) | PoolError::Closed => StoreError::Unavailable(e.to_string()),
            other => StoreError::Unavailable(other.to_string()),
        })
    }

    /// Applies the migrations this database lacks, each in a transaction with the row
    /// that records it. Instances starting at once race harmlessly: the loser's
    /// transaction fails on the version's primary key (or the catalog), rolls back, and
    /// it reads the versions again.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let mut last_error = None;
        for _ in 0..5 {
            match migrate_once(&mut client).await {
                Ok(()) => return Ok(()),
                Err(e) if is_race(&e) => last_error = Some(e),
                Err(e) => return Err(pg_error(e)),
            }
        }
        Err(last_error.map_or_else(
            || StoreError::Unavailable("schema migration did not settle".into()),
            pg_error,
        ))
    }
}

/// One pass of [`PgStore::migrate`].
async fn migrate_once(client: &mut Object) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS p2p_schema_migrations (
                version       BIGINT PRIMARY KEY,
                name          TEXT   NOT NULL,
                applied_at_ms BIGINT NOT NULL
            )",
        )
        .await?;
    let applied: Vec<i64> = client
        .query("SELECT version FROM p2p_schema_migrations", &[])
        .await?
        .iter()
        .filter_map(|r| r.try_get::<_, i64>(0).ok())
        .collect();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        let now = i64::try_from(crate::clock::now_ms()).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO p2p_schema_migrations (version, name, applied_at_ms) VALUES ($1, $2, $3)",
            &[version, name, &now],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied a discovery schema migration");
    }
    Ok(())
}

/// A concurrent instance applying the same migration.
fn is_race(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        [
            SqlState::UNIQUE_VIOLATION,
            SqlState::DUPLICATE_TABLE,
            SqlState::DUPLICATE_OBJECT,
            SqlState::T_R_SERIALIZATION_FAILURE,
        ]
        .contains(c)
    })
}

/// Maps a driver error: a lost connection or a database that cannot serve now is
/// [`StoreError::Unavailable`]; anything else is a fault.
fn pg_error(e: tokio_postgres::Error) -> StoreError {
    let unavailable = match e.code() {
        None => {
            e.is_closed() || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
        }
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("57P") // operator intervention: shutdown, restart
                || c == "53300" // too many connections
                || c == "40001" // serialization failure
                || c == "40P01" // deadlock detected
                || c == "25006" // read-only transaction (a standby)
        }
    };
    if unavailable {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Postgres(Box::new(e))
    }
}

/// `u64` milliseconds as a `BIGINT` (values past `i64::MAX` are clamped: every accepted
/// timestamp is near the present).
fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    idx: usize,
) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|e| StoreError::Corrupt(format!("column {idx}: {e}")))
}

fn node_id(bytes: &[u8]) -> Result<NodeId, StoreError> {
    NodeId::try_from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("stored NodeId: {e}")))
}

/// A live presence from its stored columns (record, observed IP, expiry).
fn live(
    record: &[u8],
    ip: Option<&str>,
    expires_at_ms: i64,
    seen: &VerifiedSignatures,
) -> Result<LivePresence, StoreError> {
    let signed = decode_signed::<PresenceRecord>(record, seen)?;
    let observed_ip = ip
        .unwrap_or("0.0.0.0")
        .parse::<IpAddr>()
        .map_err(|e| StoreError::Corrupt(format!("stored observed IP: {e}")))?;
    Ok(LivePresence {
        signed,
        observed_ip,
        expires_at_ms: u64::try_from(expires_at_ms).unwrap_or(0),
    })
}

/// Reads `(claim, record, observed_ip, expires_at_ms)` columns starting at `at`.
fn peer_state(row: &Row, at: usize, seen: &VerifiedSignatures) -> Result<PeerState, StoreError> {
    let claim = get::<Option<&[u8]>>(row, at)?
        .map(|b| decode_signed::<NameClaim>(b, seen))
        .transpose()?;
    let presence = match get::<Option<&[u8]>>(row, at + 1)? {
        Some(record) => Some(live(
            record,
            get::<Option<&str>>(row, at + 2)?,
            get::<Option<i64>>(row, at + 3)?.unwrap_or(0),
            seen,
        )?),
        None => None,
    };
    Ok(PeerState { claim, presence })
}

const UPSERT_CLAIM: &str = "
    INSERT INTO p2p_claims AS c (node_id, name, timestamp_ms, claim) VALUES ($1, $2, $3, $4)
    ON CONFLICT (node_id) DO UPDATE
        SET name = EXCLUDED.name, timestamp_ms = EXCLUDED.timestamp_ms, claim = EXCLUDED.claim
        WHERE c.timestamp_ms < EXCLUDED.timestamp_ms
    RETURNING c.node_id";

const CLAIM_STATE: &str = "
    SELECT (SELECT node_id FROM p2p_claims WHERE name = $1),
           (SELECT claim FROM p2p_claims WHERE node_id = $2)";

const LOOKUP_NAME: &str = "
    SELECT c.claim, p.record, p.observed_ip, p.expires_at_ms
    FROM p2p_claims c
    LEFT JOIN p2p_presence p
        ON p.node_id = c.node_id AND p.record IS NOT NULL AND p.expires_at_ms > $2
    WHERE c.name = $1";

const CLAIM_OF: &str = "SELECT claim FROM p2p_claims WHERE node_id = $1";

const PRESENCE_OF: &str = "
    SELECT record, observed_ip, expires_at_ms FROM p2p_presence
    WHERE node_id = $1 AND record IS NOT NULL AND expires_at_ms > $2";

const ONLINE_PAGE: &str = "
    SELECT p.node_id, c.claim, p.record, p.observed_ip, p.expires_at_ms
    FROM p2p_presence p
    LEFT JOIN p2p_claims c ON c.node_id = p.node_id
    WHERE p.record IS NOT NULL AND p.expires_at_ms > $1 AND p.node_id > $2
    ORDER BY p.node_id
    LIMIT $3";

/// Replaces the node's row when the record is newer than the last timestamp seen, or
/// the row is a forgotten tombstone.
const UPSERT_PRESENCE: &str = "
    INSERT INTO p2p_presence AS p
        (node_id, timestamp_ms, expires_at_ms, forget_at_ms, record, observed_ip)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (node_id) DO UPDATE
        SET timestamp_ms = EXCLUDED.timestamp_ms, expires_at_ms = EXCLUDED.expires_at_ms,
            forget_at_ms = EXCLUDED.forget_at_ms, record = EXCLUDED.record,
            observed_ip = EXCLUDED.observed_ip
        WHERE p.timestamp_ms < EXCLUDED.timestamp_ms OR p.forget_at_ms <= $7
    RETURNING p.node_id";

/// [`UPSERT_PRESENCE`] for a node that already has a row (used at capacity).
const UPDATE_PRESENCE: &str = "
    UPDATE p2p_presence
        SET timestamp_ms = $2, expires_at_ms = $3, forget_at_ms = $4, record = $5,
            observed_ip = $6
        WHERE node_id = $1 AND (timestamp_ms < $2 OR forget_at_ms <= $7)
    RETURNING node_id";

const HAS_PRESENCE_ROW: &str =
    "SELECT 1 FROM p2p_presence WHERE node_id = $1 AND forget_at_ms > $2";

/// Locks the node's row (in the withdrawal's transaction) and says whether it is live.
const LOCK_PRESENCE: &str = "
    SELECT record IS NOT NULL AND expires_at_ms > $2 FROM p2p_presence
    WHERE node_id = $1 FOR UPDATE";

/// Writes a tombstone when the withdrawal is newer than the last timestamp seen.
const WITHDRAW: &str = "
    INSERT INTO p2p_presence AS p
        (node_id, timestamp_ms, expires_at_ms, forget_at_ms, record, observed_ip)
    VALUES ($1, $2, 0, $3, NULL, NULL)
    ON CONFLICT (node_id) DO UPDATE
        SET timestamp_ms = EXCLUDED.timestamp_ms, expires_at_ms = 0,
            forget_at_ms = EXCLUDED.forget_at_ms, record = NULL, observed_ip = NULL
        WHERE p.timestamp_ms < EXCLUDED.timestamp_ms OR p.forget_at_ms <= $4
    RETURNING p.node_id";

/// Takes a slot from the recipient's count (only while below the bound) and stores the
/// envelope, in one statement.
const DEPOSIT: &str = "
    WITH slot AS (
        INSERT INTO p2p_mailbox_counts AS m (node_id, count) VALUES ($1, 1)
        ON CONFLICT (node_id) DO UPDATE SET count = m.count + 1 WHERE m.count < $3
        RETURNING node_id
    )
    INSERT INTO p2p_mailbox (node_id, envelope) SELECT node_id, $2 FROM slot
    RETURNING id";

const FETCH: &str = "SELECT id, envelope FROM p2p_mailbox WHERE node_id = $1 ORDER BY id LIMIT $2";

const DELETE: &str = "DELETE FROM p2p_mailbox WHERE node_id = $1 AND id = ANY($2)";

const RELEASE_SLOTS: &str = "UPDATE p2p_mailbox_counts SET count = count - $2 WHERE node_id = $1";

const CHECK_REQUEST: &str = "
    INSERT INTO p2p_request_signatures (signature, forget_at_ms) VALUES ($1, $2)
    ON CONFLICT (signature) DO NOTHING";

const STATS: &str = "
    SELECT (SELECT count(*) FROM p2p_claims),
           (SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM p2p_mailbox_counts),
           (SELECT count(*) FROM p2p_presence WHERE record IS NOT NULL AND expires_at_ms > $1)";

/// Forgotten tombstones and signatures whose time is up (both `forget_at_ms <= $1`).
const CLEANUP: [&str; 2] = [
    "DELETE FROM p2p_presence WHERE forget_at_ms <= $1",
    "DELETE FROM p2p_request_signatures WHERE forget_at_ms <= $1",
];

/// Counts of emptied mailboxes (a deposit creates the row again).
const CLEANUP_COUNTS: &str = "DELETE FROM p2p_mailbox_counts WHERE count <= 0";

const CLAIMS_AFTER: &str =
    "SELECT claim FROM p2p_claims WHERE node_id > $1 ORDER BY node_id LIMIT $2";

const ENVELOPES_AFTER: &str = "
    SELECT node_id, id, envelope FROM p2p_mailbox
    WHERE node_id > $1 OR (node_id = $1 AND id > $2)
    ORDER BY node_id, id LIMIT $3";

const LIVE_COUNT: &str =
    "SELECT count(*) FROM p2p_presence WHERE record IS NOT NULL AND expires_at_ms > $1";

impl PgStore {
    async fn claim_inner(&self, claim: &Signed<NameClaim>) -> Result<ClaimOutcome, StoreError> {
        let rec = claim.record();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(UPSERT_CLAIM)
            .await
            .map_err(pg_error)?;
        let node = rec.node_id.as_bytes().as_slice();
        let stored = client
            .query_opt(
                &stmt,
                &[
                    &node,
                    &rec.name,
                    &ms(rec.timestamp_ms),
                    &encode_signed(claim),
                ],
            )
            .await;
        match stored {
            Ok(Some(_)) => {
                self.verified.remember(claim);
                Ok(ClaimOutcome::Stored)
            }
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(ClaimOutcome::Taken),
            Err(e) => Err(pg_error(e)),
            Ok(None) => {
                // Not newer than the node's claim: say whether it is the same one, an
                // older one, or a name someone else holds (claims are never deleted and
                // their timestamps only grow, so this read cannot turn it into Stored).
                let stmt = client.prepare_cached(CLAIM_STATE).await.map_err(pg_error)?;
                let row = client
                    .query_one(&stmt, &[&rec.name, &node])
                    .await
                    .map_err(pg_error)?;
                let owner = get::<Option<&[u8]>>(&row, 0)?.map(node_id).transpose()?;
                let old = get::<Option<&[u8]>>(&row, 1)?
                    .map(|b| decode_signed::<NameClaim>(b, &self.verified))
                    .transpose()?;
                Ok(match decide(owner, old.as_ref(), claim) {
                    ClaimOutcome::Stored => ClaimOutcome::Stale,
                    other => other,
                })
            }
        }
    }

    async fn peer_inner(&self, node: &NodeId, now: u64) -> Result<PeerState, StoreError> {
        let client = self.client().await?;
        let (claim_stmt, presence_stmt) = tokio::try_join!(
            client.prepare_cached(CLAIM_OF),
            client.prepare_cached(PRESENCE_OF)
        )
        .map_err(pg_error)?;
        let id = node.as_bytes().as_slice();
        let now = ms(now);
        let claim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
        let presence_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &now];
        // Both queries go out at once on the connection (pipelined).
        let (claim, presence) = tokio::try_join!(
            client.query_opt(&claim_stmt, &claim_params),
            client.query_opt(&presence_stmt, &presence_params)
        )
        .map_err(pg_error)?;
        let claim = match &claim {
            Some(row) => Some(decode_signed::<NameClaim>(
                get::<&[u8]>(row, 0)?,
                &self.verified,
            )?),
            None => None,
        };
        let presence = match &presence {
            Some(row) => Some(live(
                get::<&[u8]>(row, 0)?,
                get::<Option<&str>>(row, 1)?,
                get::<i64>(row, 2)?,
                &self.verified,
            )?),
            None => None,
        };
        Ok(PeerState { claim, presence })
    }

    async fn announce_inner(
        &self,
        record: &Signed<PresenceRecord>,
        observed_ip: IpAddr,
        now: u64,
        max_live: usize,
    ) -> Result<Announced, StoreError> {
        let rec = record.record();
        let expires_at_ms = expiry(rec, now);
        if expires_at_ms <= now {
            return Ok(Announced::Stale);
        }
        let forget_at = expires_at_ms.saturating_add(TOMBSTONE_MS);
        let client = self.client().await?;
        let at_capacity = self.live_estimate.load(Ordering::Relaxed) >= max_live as u64;
        let sql = if at_capacity {
            UPDATE_PRESENCE
        } else {
            UPSERT_PRESENCE
        };
        let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
        let node = rec.node_id.as_bytes().as_slice();
        let ip = observed_ip.to_string();
        let stored = client
            .query_opt(
                &stmt,
                &[
                    &node,
                    &ms(rec.timestamp_ms),
                    &ms(expires_at_ms),
                    &ms(forget_at),
                    &encode_signed(record),
                    &ip,
                    &ms(now),
                ],
            )
            .await
            .map_err(pg_error)?;
        if stored.is_some() {
            self.verified.remember(record);
            return Ok(Announced::Live { expires_at_ms });
        }
        if !at_capacity {
            return Ok(Announced::Stale);
        }
        let stmt = client
            .prepare_cached(HAS_PRESENCE_ROW)
            .await
            .map_err(pg_error)?;
        let known = client
            .query_opt(&stmt, &[&node, &ms(now)])
            .await
            .map_err(pg_error)?;
        Ok(if known.is_some() {
            Announced::Stale
        } else {
            Announced::Full
        })
    }

    async fn online_inner(
        &self,
        cursor: Option<NodeId>,
        limit: usize,
        now: u64,
    ) -> Result<OnlinePage, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(ONLINE_PAGE).await.map_err(pg_error)?;
        let after: &[u8] = cursor.as_ref().map_or(&[], |c| c.as_bytes().as_slice());
        let fetch = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = client
            .query(&stmt, &[&ms(now), &after, &fetch])
            .await
            .map_err(pg_error)?;
        let more = rows.len() > limit;
        let mut page = Vec::with_capacity(rows.len().min(limit));
        for row in rows.iter().take(limit) {
            let id = node_id(get::<&[u8]>(row, 0)?)?;
            let state = peer_state(row, 1, &self.verified)?;
            let presence = state
                .presence
                .ok_or_else(|| StoreError::Corrupt("online row without a record".into()))?;
            if presence.signed.record().node_id != id {
                return Err(StoreError::Corrupt(format!(
                    "presence row {id} holds another node's record"
                )));
            }
            page.push((presence, state.claim));
        }
        let next = if more {
            page.last().map(|(l, _)| l.signed.record().node_id)
        } else {
            None
        };
        Ok((page, next))
    }

    async fn delete_inner(&self, to: &NodeId, ids: &[u64]) -> Result<u64, StoreError> {
        let ids: Vec<i64> = ids.iter().filter_map(|i| i64::try_from(*i).ok()).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let node = to.as_bytes().as_slice();
        let deleted = tx.execute(DELETE, &[&node, &ids]).await.map_err(pg_error)?;
        if deleted > 0 {
            let n = i32::try_from(deleted).unwrap_or(i32::MAX);
            tx.execute(RELEASE_SLOTS, &[&node, &n])
                .await
                .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(deleted)
    }

    async fn stats_inner(&self, now: u64) -> Result<StoreStats, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(STATS).await.map_err(pg_error)?;
        let row = client
            .query_one(&stmt, &[&ms(now)])
            .await
            .map_err(pg_error)?;
        let count = |i| get::<i64>(&row, i).map(|v| u64::try_from(v).unwrap_or(0));
        let stats = StoreStats {
            names: count(0)?,
            envelopes: count(1)?,
            live: count(2)?,
        };
        self.live_estimate.store(stats.live, Ordering::Relaxed);
        Ok(stats)
    }
}

#[async_trait]
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn keeps_presence(&self) -> bool {
        true
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.timed(async {
            let client = self.client().await?;
            client.simple_query("SELECT 1").await.map_err(pg_error)?;
            Ok(())
        })
        .await
    }

    async fn claim(&self, claim: &Signed<NameClaim>) -> Result<ClaimOutcome, StoreError> {
        self.timed(self.claim_inner(claim)).await
    }

    async fn lookup_name(&self, name: &str, now: u64) -> Result<Option<PeerState>, StoreError> {
        self.timed(async {
            let client = self.client().await?;
            let stmt = client.prepare_cached(LOOKUP_NAME).await.map_err(pg_error)?;
            let row = client
                .query_opt(&stmt, &[&name, &ms(now)])
                .await
                .map_err(pg_error)?;
            row.map(|r| peer_state(&r, 0, &self.verified)).transpose()
        })
        .await
    }

    async fn peer(&self, node: &NodeId, now: u64) -> Result<PeerState, StoreError> {
        self.timed(self.peer_inner(node, now)).await
    }

    async fn online_page(
        &self,
        cursor: Option<NodeId>,
        limit: usize,
        now: u64,
    ) -> Result<OnlinePage, StoreError> {
        self.timed(self.online_inner(cursor, limit, now)).await
    }

    async fn announce(
        &self,
        record: &Signed<PresenceRecord>,
        observed_ip: IpAddr,
        now: u64,
        max_live: usize,
    ) -> Result<Announced, StoreError> {
        self.timed(self.announce_inner(record, observed_ip, now, max_live))
            .await
    }

    async fn withdraw(
        &self,
        withdrawal: &Signed<Withdrawal>,
        now: u64,
        _max_records: usize,
    ) -> Result<Withdrawn, StoreError> {
        let w = withdrawal.record();
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            let node = w.node_id.as_bytes().as_slice();
            let was_live = match tx
                .query_opt(LOCK_PRESENCE, &[&node, &ms(now)])
                .await
                .map_err(pg_error)?
            {
                Some(row) => get::<Option<bool>>(&row, 0)?.unwrap_or(false),
                None => false,
            };
            let forget_at = now.saturating_add(TOMBSTONE_MS);
            let applied = tx
                .query_opt(
                    WITHDRAW,
                    &[&node, &ms(w.timestamp_ms), &ms(forget_at), &ms(now)],
                )
                .await
                .map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)?;
            Ok(match applied {
                Some(_) => Withdrawn::Applied { was_live },
                None => Withdrawn::Stale,
            })
        })
        .await
    }

    async fn deposit(
        &self,
        to: &NodeId,
        envelope: Vec<u8>,
        max_count: usize,
    ) -> Result<DepositOutcome, StoreError> {
        if max_count == 0 {
            return Ok(DepositOutcome::Full);
        }
        self.timed(async {
            let client = self.client().await?;
            let stmt = client.prepare_cached(DEPOSIT).await.map_err(pg_error)?;
            let max = i32::try_from(max_count).unwrap_or(i32::MAX);
            let row = client
                .query_opt(&stmt, &[&to.as_bytes().as_slice(), &envelope, &max])
                .await
                .map_err(pg_error)?;
            match row {
                Some(row) => {
                    let id = get::<i64>(&row, 0)?;
                    let id = u64::try_from(id)
                        .map_err(|_| StoreError::Corrupt(format!("mailbox id {id}")))?;
                    Ok(DepositOutcome::Stored(id))
                }
                None => Ok(DepositOutcome::Full),
            }
        })
        .await
    }

    async fn fetch(&self, to: &NodeId, max: usize) -> Result<Fetched, StoreError> {
        self.timed(async {
            let client = self.client().await?;
            let stmt = client.prepare_cached(FETCH).await.map_err(pg_error)?;
            let limit = i64::try_from(max.saturating_add(1)).unwrap_or(i64::MAX);
            let rows = client
                .query(&stmt, &[&to.as_bytes().as_slice(), &limit])
                .await
                .map_err(pg_error)?;
            let more = rows.len() > max;
            let items = rows
                .iter()
                .take(max)
                .map(|row| {
                    let id = get::<i64>(row, 0)?;
                    let id = u64::try_from(id)
                        .map_err(|_| StoreError::Corrupt(format!("mailbox id {id}")))?;
                    Ok((id, get::<Vec<u8>>(row, 1)?))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok((items, more))
        })
        .await
    }

    async fn delete(&self, to: &NodeId, ids: &[u64]) -> Result<u64, StoreError> {
        self.timed(self.delete_inner(to, ids)).await
    }

    async fn check_request(
        &self,
        signature: &Signature,
        forget_at: u64,
        _now: u64,
        _max: usize,
    ) -> Result<RequestSeen, StoreError> {
        self.timed(async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(CHECK_REQUEST)
                .await
                .map_err(pg_error)?;
            let inserted = client
                .execute(&stmt, &[&signature.0.as_slice(), &ms(forget_at)])
                .await
                .map_err(pg_error)?;
            Ok(if inserted == 1 {
                RequestSeen::Fresh
            } else {
                RequestSeen::Replayed
            })
        })
        .await
    }

    async fn cleanup(&self, now: u64) -> Result<(), StoreError> {
        self.timed(async {
            let client = self.client().await?;
            for sql in CLEANUP {
                client.execute(sql, &[&ms(now)]).await.map_err(pg_error)?;
            }
            client
                .execute(CLEANUP_COUNTS, &[])
                .await
                .map_err(pg_error)?;
            let row = client
                .query_one(LIVE_COUNT, &[&ms(now)])
                .await
                .map_err(pg_error)?;
            let live = u64::try_from(get::<i64>(&row, 0)?).unwrap_or(0);
            self.live_estimate.store(live, Ordering::Relaxed);
            Ok(())
        })
        .await
    }

    async fn stats(&self, now: u64) -> Result<StoreStats, StoreError> {
        self.timed(self.stats_inner(now)).await
    }

    async fn claims_after(
        &self,
        after: Option<NodeId>,
        limit: usize,
    ) -> Result<Vec<Signed<NameClaim>>, StoreError> {
        self.timed(async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(CLAIMS_AFTER)
                .await
                .map_err(pg_error)?;
            let after: &[u8] = after.as_ref().map_or(&[], |a| a.as_bytes().as_slice());
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client
                .query(&stmt, &[&after, &limit])
                .await
                .map_err(pg_error)?;
            rows.iter()
                .map(|row| decode_signed::<NameClaim>(get::<&[u8]>(row, 0)?, &self.verified))
                .collect()
        })
        .await
    }

    async fn envelopes_after(
        &self,
        after: Option<(NodeId, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        self.timed(async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(ENVELOPES_AFTER)
                .await
                .map_err(pg_error)?;
            let (node, id): (&[u8], i64) = match &after {
                Some((n, id)) => (
                    n.as_bytes().as_slice(),
                    i64::try_from(*id).unwrap_or(i64::MAX),
                ),
                None => (&[], 0),
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client
                .query(&stmt, &[&node, &id, &limit])
                .await
                .map_err(pg_error)?;
            rows.iter()
                .map(|row| {
                    let node = <&[u8; 32]>::try_from(get::<&[u8]>(row, 0)?)
                        .ok()
                        .and_then(|b| NodeId::from_bytes(b).ok())
                        .ok_or_else(|| StoreError::Corrupt("mailbox recipient".into()))?;
                    let id = get::<i64>(row, 1)?;
                    let id = u64::try_from(id)
                        .map_err(|_| StoreError::Corrupt(format!("mailbox id {id}")))?;
                    Ok((node, id, get::<Vec<u8>>(row, 2)?))
                })
                .collect()
        })
        .await
    }
}
