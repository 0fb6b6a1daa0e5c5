//! The server's state: name claims, mailboxes, presence, and the replay guard of signed
//! mailbox requests, behind one [`Store`] trait.
//!
//! | store | names, mailboxes | presence, replay guard | instances |
//! |---|---|---|---|
//! | [`RedbStore`] | a redb file | memory | one |
//! | [`MemoryStore`] | memory | memory | one |
//! | [`PgStore`] | PostgreSQL | PostgreSQL | any number on one database |
//!
//! Every decision that orders writes (first come first served names, newer presence
//! wins, tombstones, the mailbox bound, a signed request used once) is made by the
//! store in one atomic step: a transaction of redb, a lock in memory, one conditional
//! statement in PostgreSQL. Time comes from the caller (`now`, the server's clock), so
//! expiry follows the same rules on every backend and tests drive it with a manual
//! clock. The server calls the store from its handlers; redb work runs on the blocking
//! pool, so no transaction is ever held across an `.await`.

mod local;
mod postgres;

use std::{fmt, net::IpAddr};

use async_trait::async_trait;
use p2p_crypto::{NodeId, Signature};

use crate::record::{NameClaim, PresenceRecord, Record, Signed, VerifiedSignatures, Withdrawal};

pub use local::{LocalStore, MemoryStore, RedbStore};
pub use postgres::{describe_url, is_postgres_url, PgOptions, PgStore};

/// Opens the store `spec` names: a `postgres://` (or `postgresql://`) URL is a
/// [`PgStore`] (connected, its schema brought up to date), anything else the path of a
/// [`RedbStore`] file.
pub async fn open_store(spec: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if is_postgres_url(spec) {
        Ok(std::sync::Arc::new(PgStore::connect(spec).await?))
    } else {
        let path = std::path::PathBuf::from(spec);
        let store = tokio::task::spawn_blocking(move || RedbStore::open(&path))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(std::sync::Arc::new(store))
    }
}

/// A storage failure. Never caused by request input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The redb database failed.
    #[error("database error: {0}")]
    Db(#[source] Box<redb::Error>),
    /// A database file written by an earlier version (redb 2) could not be moved to the
    /// current storage format.
    #[error(
        "the database file is in the storage format of an earlier version and could not be \
         moved to the current one: {0}"
    )]
    OldFormat(#[source] Box<redb2::Error>),
    /// PostgreSQL refused a statement (not a lost connection: see `Unavailable`).
    #[error("PostgreSQL error: {0}")]
    Postgres(#[source] Box<tokio_postgres::Error>),
    /// The database cannot be reached now (connection refused or lost, restarting,
    /// too many connections, timed out). Nothing was changed; retry later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A database URL that cannot be used.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// The database holds a schema newer than this build knows.
    #[error(
        "the database schema is version {found}, newer than this build's {known}; upgrade p2p-node"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    #[error("storage task failed: {0}")]
    Task(String),
    /// The database file is open to group or others, or cannot be created.
    #[error(transparent)]
    File(#[from] p2p_crypto::owner_only::OwnerOnlyError),
}

impl StoreError {
    /// Whether the failure is the database being out of reach for now (the request may
    /// be retried as it was), rather than a fault.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Result of storing a name claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Stored (new name, newer re-claim, or a rename by the same key).
    Stored,
    /// The identical claim was already stored.
    Unchanged,
    /// The name belongs to another key.
    Taken,
    /// The node already has a claim at least as new.
    Stale,
}

/// Result of a deposit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepositOutcome {
    /// Stored under this id.
    Stored(u64),
    /// The recipient's mailbox already holds the maximum count; nothing changed.
    Full,
}

/// Envelopes `(id, bytes)` oldest first, and whether more remain.
pub type Fetched = (Vec<(u64, Vec<u8>)>, bool);

/// A live presence record as the server keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivePresence {
    /// The verified record.
    pub signed: Signed<PresenceRecord>,
    /// The source IP of the announce that stored it.
    pub observed_ip: IpAddr,
    /// When it expires unless renewed (ms since the Unix epoch).
    pub expires_at_ms: u64,
}

/// Result of an announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    /// Stored; live until this time (ms since the Unix epoch).
    Live { expires_at_ms: u64 },
    /// Not newer than what the store has seen from this node, or already expired.
    Stale,
    /// The store holds its maximum number of live records.
    Full,
}

/// Result of a withdrawal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawn {
    /// Applied; whether a live record was removed.
    Applied { was_live: bool },
    /// Not newer than what the store has seen from this node.
    Stale,
    /// The store holds its maximum number of records.
    Full,
}

/// Result of recording a signed request's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestSeen {
    /// First use: recorded.
    Fresh,
    /// Already used.
    Replayed,
    /// Too many signatures remembered at once to record another.
    Full,
}

/// What the store knows of one node: its name claim and its live presence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerState {
    pub claim: Option<Signed<NameClaim>>,
    pub presence: Option<LivePresence>,
}

/// A page of the online list: live records with their claims, and the cursor of the
/// next page.
pub type OnlinePage = (
    Vec<(LivePresence, Option<Signed<NameClaim>>)>,
    Option<NodeId>,
);

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Claimed names.
    pub names: u64,
    /// Envelopes waiting in all mailboxes.
    pub envelopes: u64,
    /// Live presence records.
    pub live: u64,
}

/// The discovery server's state. Every method is one atomic decision of the store.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// `"redb"`, `"memory"` or `"postgres"`.
    fn kind(&self) -> &'static str;

    /// Whether presence records outlive the server process (they live in the database).
    /// A server whose store forgets them at a restart tells its clients so (see
    /// [`crate::api::HEADER_PRESENCE_EPOCH`]), so that they announce again at once.
    fn keeps_presence(&self) -> bool {
        false
    }

    /// Checks that the store can serve requests (for PostgreSQL: a round trip).
    async fn health(&self) -> Result<(), StoreError>;

    /// Stores a verified claim, first come first served; one name per node (a newer
    /// claim for another name renames the node and frees the old name).
    async fn claim(&self, claim: &Signed<NameClaim>) -> Result<ClaimOutcome, StoreError>;

    /// The claim on `name`, and the live presence of its node at `now`.
    async fn lookup_name(&self, name: &str, now: u64) -> Result<Option<PeerState>, StoreError>;

    /// The claim and the live presence of `node` at `now`.
    async fn peer(&self, node: &NodeId, now: u64) -> Result<PeerState, StoreError>;

    /// Up to `limit` live records after `cursor` (in NodeId byte order) with their
    /// claims, and the cursor of the next page.
    async fn online_page(
        &self,
        cursor: Option<NodeId>,
        limit: usize,
        now: u64,
    ) -> Result<OnlinePage, StoreError>;

    /// Takes a verified presence record if it is newer than anything seen from its node
    /// (live record or tombstone) and not expired; `max_live` bounds live records.
    async fn announce(
        &self,
        record: &Signed<PresenceRecord>,
        observed_ip: IpAddr,
        now: u64,
        max_live: usize,
    ) -> Result<Announced, StoreError>;

    /// Applies a verified withdrawal if it is newer than anything seen from its node,
    /// leaving a tombstone so older records cannot be replayed.
    async fn withdraw(
        &self,
        withdrawal: &Signed<Withdrawal>,
        now: u64,
        max_records: usize,
    ) -> Result<Withdrawn, StoreError>;

    /// Appends an envelope unless the recipient already has `max_count`.
    async fn deposit(
        &self,
        to: &NodeId,
        envelope: Vec<u8>,
        max_count: usize,
    ) -> Result<DepositOutcome, StoreError>;

    /// Up to `max` envelopes, oldest first, and whether more remain.
    async fn fetch(&self, to: &NodeId, max: usize) -> Result<Fetched, StoreError>;

    /// Deletes the given ids from `to`'s mailbox; unknown ids are ignored.
    async fn delete(&self, to: &NodeId, ids: &[u64]) -> Result<u64, StoreError>;

    /// Records the signature of a signed request, remembered until `forget_at` (after
    /// which its timestamp is out of the window anyway); says if it was used before.
    async fn check_request(
        &self,
        signature: &Signature,
        forget_at: u64,
        now: u64,
        max: usize,
    ) -> Result<RequestSeen, StoreError>;

    /// Drops what expired by `now`: presence turns into tombstones, old tombstones and
    /// remembered signatures go.
    async fn cleanup(&self, now: u64) -> Result<(), StoreError>;

    /// Counts for metrics.
    async fn stats(&self, now: u64) -> Result<StoreStats, StoreError>;

    /// Up to `limit` claims of the nodes after `after` in NodeId byte order: what a
    /// server hands over when another takes its place ([`crate::handover`]).
    async fn claims_after(
        &self,
        after: Option<NodeId>,
        limit: usize,
    ) -> Result<Vec<Signed<NameClaim>>, StoreError>;

    /// Up to `limit` envelopes after `after`, by recipient and then id.
    async fn envelopes_after(
        &self,
        after: Option<(NodeId, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError>;
}

/// An envelope as stored: its recipient, its id in that mailbox, its bytes.
pub type StoredEnvelope = (NodeId, u64, Vec<u8>);

/// What to do with a new claim given what is stored.
fn decide(
    name_owner: Option<NodeId>,
    node_claim: Option<&Signed<NameClaim>>,
    new: &Signed<NameClaim>,
) -> ClaimOutcome {
    if name_owner.is_some_and(|owner| owner != new.record().node_id) {
        return ClaimOutcome::Taken;
    }
    match node_claim {
        Some(old) if old.bytes() == new.bytes() => ClaimOutcome::Unchanged,
        Some(old) if old.record().timestamp_ms >= new.record().timestamp_ms => ClaimOutcome::Stale,
        _ => ClaimOutcome::Stored,
    }
}

/// Stored form of a signed record: signature (64 bytes) then the signed bytes.
fn encode_signed<R: Record>(c: &Signed<R>) -> Vec<u8> {
    let mut v = c.signature().to_bytes().to_vec();
    v.extend_from_slice(c.bytes());
    v
}

/// How many signatures of stored records a store remembers per generation (see
/// [`decode_signed`]): enough for every record of a server at its default presence cap,
/// in at most about 11 MiB (41 bytes an entry in a table of 2^18, two generations).
const STORED_VERIFIED: usize = 65_536;

/// The memo of a store's verified records.
fn stored_verified() -> VerifiedSignatures {
    VerifiedSignatures::with_capacity(STORED_VERIFIED)
}

/// Reads a stored signed record back, verifying it again: stored bytes are not trusted.
/// A signature `seen` verified before over the same bytes is not verified twice (every
/// other check runs); stores keep one `seen` each, so a record read on every lookup costs
/// its signature once.
fn decode_signed<R: Record>(
    blob: &[u8],
    seen: &VerifiedSignatures,
) -> Result<Signed<R>, StoreError> {
    if blob.len() < 64 {
        return Err(StoreError::Corrupt("stored record too short".into()));
    }
    let (sig, bytes) = blob.split_at(64);
    let sig: [u8; 64] = sig
        .try_into()
        .map_err(|_| StoreError::Corrupt("stored signature".into()))?;
    Signed::verify_seen(bytes.to_vec(), Signature(sig), seen)
        .map_err(|e| StoreError::Corrupt(format!("stored record: {e}")))
}
