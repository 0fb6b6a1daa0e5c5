//! The single-instance stores: names and mailboxes in redb ([`RedbStore`]) or in memory
//! ([`MemoryStore`]), presence and the replay guard in this process's memory.
//!
//! Both are a [`LocalStore`] over a [`Durable`] part, which is synchronous and runs on
//! the blocking pool.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    ops::Bound,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, RwLock,
    },
};

use async_trait::async_trait;
use p2p_crypto::{memo::Memo, NodeId, Signature};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{
    decide, decode_signed, encode_signed, stored_verified, Announced, ClaimOutcome, DepositOutcome,
    Fetched, OnlinePage, PeerState, RequestSeen, Store, StoreError, StoreStats, StoredEnvelope,
    Withdrawn,
};
use crate::{
    presence::{PresenceTable, Refused},
    record::{NameClaim, PresenceRecord, Signed, VerifiedSignatures, Withdrawal},
};

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

fn old_format<E: Into<redb2::Error>>(e: E) -> StoreError {
    StoreError::OldFormat(Box::new(e.into()))
}

/// The persistent part of a single-instance store: names and mailboxes. Synchronous;
/// [`LocalStore`] calls it on the blocking pool.
pub trait Durable: Send + Sync + fmt::Debug + 'static {
    /// `"redb"` or `"memory"`.
    const KIND: &'static str;
    /// See [`Store::claim`].
    fn claim(&self, claim: &Signed<NameClaim>) -> Result<ClaimOutcome, StoreError>;
    /// The claim on `name`.
    fn claim_by_name(&self, name: &str) -> Result<Option<Signed<NameClaim>>, StoreError>;
    /// The claim made by `node`.
    fn claim_by_node(&self, node: &NodeId) -> Result<Option<Signed<NameClaim>>, StoreError>;
    /// See [`Store::deposit`].
    fn deposit(
        &self,
        to: &NodeId,
        envelope: &[u8],
        max_count: usize,
    ) -> Result<DepositOutcome, StoreError>;
    /// See [`Store::fetch`].
    fn fetch(&self, to: &NodeId, max: usize) -> Result<Fetched, StoreError>;
    /// See [`Store::delete`].
    fn delete(&self, to: &NodeId, ids: &[u64]) -> Result<u64, StoreError>;
    /// Names and envelopes stored.
    fn counts(&self) -> Result<(u64, u64), StoreError>;
    /// See [`Store::claims_after`].
    fn claims_after(
        &self,
        after: Option<NodeId>,
        limit: usize,
    ) -> Result<Vec<Signed<NameClaim>>, StoreError>;
    /// See [`Store::envelopes_after`].
    fn envelopes_after(
        &self,
        after: Option<(NodeId, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError>;
}

/// A single-instance store: a `Durable` part for names and mailboxes, presence and the
/// replay guard in memory (they need not outlive the process: nodes announce again).
pub struct LocalStore<D> {
    durable: Arc<D>,
    presence: Mutex<PresenceTable>,
    replay: Mutex<ReplayCache>,
}

/// Names and mailboxes in a redb file; presence in memory.
pub type RedbStore = LocalStore<RedbTables>;

/// Everything in memory; lost when dropped.
pub type MemoryStore = LocalStore<MemoryTables>;

impl<D: Durable> fmt::Debug for LocalStore<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalStore")
            .field("kind", &D::KIND)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single step, so a poisoned lock is consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<D: Durable> LocalStore<D> {
    fn with_durable(durable: D) -> Self {
        Self {
            durable: Arc::new(durable),
            presence: Mutex::new(PresenceTable::default()),
            replay: Mutex::new(ReplayCache::default()),
        }
    }

    /// Runs a point read of the durable tables on the calling task. A read never waits
    /// for a writer (redb's readers see the last commit) and takes a few microseconds
    /// from redb's page cache, less than a hand-off to the blocking pool would cost;
    /// writes, which wait for the disk, go there ([`LocalStore::run`]).
    fn read<T>(&self, f: impl FnOnce(&D) -> Result<T, StoreError>) -> Result<T, StoreError> {
        f(&self.durable)
    }

    /// Runs `f` on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&D) -> Result<T, StoreError> + Send + 'static,
    {
        let durable = Arc::clone(&self.durable);
        tokio::task::spawn_blocking(move || f(&durable))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

impl RedbStore {
    /// Opens (or creates) the database file and its tables. A new file is created with
    /// mode 0600; an existing one that group or others may access is refused.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::with_durable(RedbTables::open(path)?))
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::with_durable(MemoryTables::default())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl<D: Durable> Store for LocalStore<D> {
    fn kind(&self) -> &'static str {
        D::KIND
    }

    async fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn claim(&self, claim: &Signed<NameClaim>) -> Result<ClaimOutcome, StoreError> {
        let claim = claim.clone();
        self.run(move |d| d.claim(&claim)).await
    }

    async fn lookup_name(&self, name: &str, now: u64) -> Result<Option<PeerState>, StoreError> {
        let Some(claim) = self.read(|d| d.claim_by_name(name))? else {
            return Ok(None);
        };
        let presence = lock(&self.presence)
            .get(&claim.record().node_id, now)
            .cloned();
        Ok(Some(PeerState {
            claim: Some(claim),
            presence,
        }))
    }

    async fn peer(&self, node: &NodeId, now: u64) -> Result<PeerState, StoreError> {
        let claim = self.read(|d| d.claim_by_node(node))?;
        let presence = lock(&self.presence).get(node, now).cloned();
        Ok(PeerState { claim, presence })
    }

    async fn online_page(
        &self,
        cursor: Option<NodeId>,
        limit: usize,
        now: u64,
    ) -> Result<OnlinePage, StoreError> {
        let (page, next) = lock(&self.presence).page(cursor, limit, now);
        let nodes: Vec<NodeId> = page.iter().map(|l| l.signed.record().node_id).collect();
        let claims = self
            .run(move |d| {
                nodes
                    .iter()
                    .map(|n| d.claim_by_node(n))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        Ok((page.into_iter().zip(claims).collect(), next))
    }

    async fn announce(
        &self,
        record: &Signed<PresenceRecord>,
        observed_ip: IpAddr,
        now: u64,
        max_live: usize,
    ) -> Result<Announced, StoreError> {
        let result = lock(&self.presence).announce(record.clone(), observed_ip, now, max_live);
        Ok(match result {
            Ok(expires_at_ms) => Announced::Live { expires_at_ms },
            Err(Refused::Stale) => Announced::Stale,
            Err(Refused::Full) => Announced::Full,
        })
    }

    async fn withdraw(
        &self,
        withdrawal: &Signed<Withdrawal>,
        now: u64,
        max_records: usize,
    ) -> Result<Withdrawn, StoreError> {
        let result = lock(&self.presence).withdraw(withdrawal.record(), now, max_records);
        Ok(match result {
            Ok(was_live) => Withdrawn::Applied { was_live },
            Err(Refused::Stale) => Withdrawn::Stale,
            Err(Refused::Full) => Withdrawn::Full,
        })
    }

    async fn deposit(
        &self,
        to: &NodeId,
        envelope: Vec<u8>,
        max_count: usize,
    ) -> Result<DepositOutcome, StoreError> {
        let to = *to;
        self.run(move |d| d.deposit(&to, &envelope, max_count))
            .await
    }

    async fn fetch(&self, to: &NodeId, max: usize) -> Result<Fetched, StoreError> {
        let to = *to;
        self.run(move |d| d.fetch(&to, max)).await
    }

    async fn delete(&self, to: &NodeId, ids: &[u64]) -> Result<u64, StoreError> {
        let (to, ids) = (*to, ids.to_vec());
        self.run(move |d| d.delete(&to, &ids)).await
    }

    async fn check_request(
        &self,
        signature: &Signature,
        forget_at: u64,
        now: u64,
        max: usize,
    ) -> Result<RequestSeen, StoreError> {
        Ok(lock(&self.replay).insert(signature, forget_at, now, max))
    }

    async fn cleanup(&self, now: u64) -> Result<(), StoreError> {
        lock(&self.presence).prune(now);
        lock(&self.replay).forget(now);
        Ok(())
    }

    async fn stats(&self, now: u64) -> Result<StoreStats, StoreError> {
        let (names, envelopes) = self.run(|d| d.counts()).await?;
        let live = lock(&self.presence).live_count(now) as u64;
        Ok(StoreStats {
            names,
            envelopes,
            live,
        })
    }

    async fn claims_after(
        &self,
        after: Option<NodeId>,
        limit: usize,
    ) -> Result<Vec<Signed<NameClaim>>, StoreError> {
        self.run(move |d| d.claims_after(after, limit)).await
    }

    async fn envelopes_after(
        &self,
        after: Option<(NodeId, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        self.run(move |d| d.envelopes_after(after, limit)).await
    }
}

/// Remembered signatures of signed requests, until their timestamps leave the window.
#[derive(Debug, Default)]
struct ReplayCache {
    seen: HashMap<[u8; 64], u64>,
}

impl ReplayCache {
    /// Records a signature unless it was seen, or the cache holds `max` live ones.
    fn insert(&mut self, sig: &Signature, forget_at: u64, now: u64, max: usize) -> RequestSeen {
        if self.seen.contains_key(&sig.0) {
            return RequestSeen::Replayed;
        }
        if self.seen.len() >= max {
            self.forget(now);
            if self.seen.len() >= max {
                return RequestSeen::Full;
            }
        }
        self.seen.insert(sig.0, forget_at);
        RequestSeen::Fresh
    }

    /// Forgets signatures whose time is up.
    fn forget(&mut self, now: u64) {
        self.seen.retain(|_, f| *f > now);
    }
}

/// The redb tables, all in one place.
mod tables {
    use redb::TableDefinition;

    /// name -> NodeId bytes of its owner.
    pub const NAMES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("names_v1");
    /// NodeId bytes -> signature (64) || signed claim bytes.
    pub const CLAIMS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("claims_v1");
    /// NodeId bytes (32) || big-endian id (8) -> sealed envelope. Range-scanned per node.
    pub const MAILBOX: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("mailbox_v1");
    /// Counters, e.g. the next mailbox id.
    pub const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta_v1");

    pub const NEXT_MAILBOX_ID: &str = "next_mailbox_id";
}

fn mailbox_key(node: &NodeId, id: u64) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(node.as_bytes());
    k[32..].copy_from_slice(&id.to_be_bytes());
    k
}

fn mailbox_id(key: &[u8]) -> Result<u64, StoreError> {
    key.get(32..40)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt("mailbox key".into()))
}

/// The node a stored name belongs to (the names table's value).
fn name_owner(bytes: &[u8]) -> Result<NodeId, StoreError> {
    NodeId::try_from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("name owner: {e}")))
}

/// Entries a [`ClaimCache`] keeps per generation: the two hold every claim of a server
/// at its default presence cap (100 000), in about 90 MiB at most once each record's
/// JSON is made.
const CLAIM_CACHE: usize = 65_536;

/// Claims by node as a [`RedbTables`] last read (decoded and verified) or stored them,
/// and nodes known to have none: a lookup of a node seen before is one hash probe, with
/// no redb read, no decoding, no signature memo and the record's JSON made before.
/// (At 100 000 claims the redb read walks a tree three pages deep, each page a probe of
/// redb's page cache, and with the memo's probe costs a few microseconds of cache
/// misses a lookup: BENCHMARKS.md, item 16.) Two generations of [`CLAIM_CACHE`]
/// entries, the older dropped when the newer fills; a miss costs the redb read it
/// replaces. Only this process writes the file (redb locks it), so the cache can only
/// miss what it stored itself, which [`ClaimCache::stored`] puts in.
struct ClaimCache {
    claims: RwLock<Memo<NodeId, Option<Signed<NameClaim>>>>,
    /// Claims stored so far: a read that began before a claim was stored does not fill
    /// the cache, which may already hold the newer claim.
    stored: AtomicU64,
}

impl Default for ClaimCache {
    fn default() -> Self {
        Self {
            claims: RwLock::new(Memo::with_capacity(CLAIM_CACHE)),
            stored: AtomicU64::new(0),
        }
    }
}

impl ClaimCache {
    /// What the cache knows of `node`'s claim: `None` if it must be read.
    fn get(&self, node: &NodeId) -> Option<Option<Signed<NameClaim>>> {
        let claims = self.claims.read().unwrap_or_else(|e| e.into_inner());
        claims.get(node).cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Memo<NodeId, Option<Signed<NameClaim>>>> {
        // Every update under this lock is a single step, so a poisoned lock is consistent.
        self.claims.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The count to pass to [`ClaimCache::fill`], taken before the read begins.
    fn before_read(&self) -> u64 {
        self.stored.load(Ordering::Acquire)
    }

    /// Keeps what a read found, unless a claim was stored since it began.
    fn fill(&self, node: NodeId, claim: Option<Signed<NameClaim>>, before: u64) {
        let mut claims = self.write();
        if self.stored.load(Ordering::Acquire) == before {
            claims.insert(node, claim);
        }
    }

    /// After `claim` was committed: it replaces what the cache holds for its node, unless
    /// that is newer (two claims of one node committed in turn, noted in the other order).
    fn stored(&self, claim: &Signed<NameClaim>) {
        let mut claims = self.write();
        self.stored.fetch_add(1, Ordering::AcqRel);
        let node = claim.record().node_id;
        let newer_held = matches!(
            claims.get(&node),
            Some(Some(held)) if held.record().timestamp_ms >= claim.record().timestamp_ms
        );
        if !newer_held {
            claims.insert(node, Some(claim.clone()));
        }
    }
}

/// The redb tables of a [`RedbStore`].
pub struct RedbTables {
    db: redb::Database,
    /// The claims read back and verified (see [`decode_signed`]).
    verified: VerifiedSignatures,
    /// The claims by node, decoded (see [`ClaimCache`]).
    cache: ClaimCache,
}

impl fmt::Debug for RedbTables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbTables").finish_non_exhaustive()
    }
}

impl RedbTables {
    /// Opens (or creates) the database file and its tables. A new file is created with
    /// mode 0600; an existing one that group or others may access is refused.
    ///
    /// A file written by an earlier version (redb 2, file format 2) is moved to the
    /// current format first, in place, by redb 2's own upgrade: these tables hold strings,
    /// byte strings and integers, which both versions encode alike.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = match Self::open_db(path)? {
            Err(redb::DatabaseError::UpgradeRequired(_)) => {
                // The node's target for these lines (`p2p_node::store::FORMAT_LOG_TARGET`),
                // which its program shows by default.
                tracing::info!(target: "p2p_node::format", path = %path.display(), "moving the database to the current storage format, once");
                let mut old = redb2::Database::open(path).map_err(old_format)?;
                old.upgrade().map_err(old_format)?;
                drop(old);
                Self::open_db(path)?
            }
            db => db,
        }
        .map_err(dberr)?;
        let tx = db.begin_write().map_err(dberr)?;
        {
            tx.open_table(tables::NAMES).map_err(dberr)?;
            tx.open_table(tables::CLAIMS).map_err(dberr)?;
            tx.open_table(tables::MAILBOX).map_err(dberr)?;
            tx.open_table(tables::META).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)?;
        Ok(Self {
            db,
            verified: stored_verified(),
            cache: ClaimCache::default(),
        })
    }
}

impl RedbTables {
    /// The file at `path` (created if missing) as redb opens it: the inner error is
    /// redb's verdict on the file.
    fn open_db(path: &Path) -> Result<Result<redb::Database, redb::DatabaseError>, StoreError> {
        let file = p2p_crypto::owner_only::open_file(path)?;
        Ok(redb::backends::FileBackend::new(file)
            .and_then(|backend| redb::Builder::new().create_with_backend(backend)))
    }
}

impl Durable for RedbTables {
    const KIND: &'static str = "redb";

    fn claim(&self, claim: &Signed<NameClaim>) -> Result<ClaimOutcome, StoreError> {
        let new = claim.record();
        let tx = self.db.begin_write().map_err(dberr)?;
        let outcome = {
            let mut names = tx.open_table(tables::NAMES).map_err(dberr)?;
            let mut claims = tx.open_table(tables::CLAIMS).map_err(dberr)?;
            let owner = match names.get(new.name.as_str()).map_err(dberr)? {
                Some(g) => Some(name_owner(g.value())?),
                None => None,
            };
            let old = match claims
                .get(new.node_id.as_bytes().as_slice())
                .map_err(dberr)?
            {
                Some(g) => Some(decode_signed(g.value(), &self.verified)?),
                None => None,
            };
            let outcome = decide(owner, old.as_ref(), claim);
            if outcome == ClaimOutcome::Stored {
                if let Some(old) = old.filter(|o| o.record().name != new.name) {
                    names.remove(old.record().name.as_str()).map_err(dberr)?;
                }
                names
                    .insert(new.name.as_str(), new.node_id.as_bytes().as_slice())
                    .map_err(dberr)?;
                claims
                    .insert(
                        new.node_id.as_bytes().as_slice(),
                        encode_signed(claim).as_slice(),
                    )
                    .map_err(dberr)?;
                self.verified.remember(claim);
            }
            outcome
        };
        if outcome == ClaimOutcome::Stored {
            tx.commit().map_err(dberr)?;
            self.cache.stored(claim);
        } else {
            tx.abort().map_err(dberr)?;
        }
        Ok(outcome)
    }

    fn claim_by_name(&self, name: &str) -> Result<Option<Signed<NameClaim>>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let names = tx.open_table(tables::NAMES).map_err(dberr)?;
        let Some(owner) = names.get(name).map_err(dberr)? else {
            return Ok(None);
        };
        // The owner's claim from the cache if it still names `name` (the owner may have
        // renamed since this read began; then the claim is read in this transaction).
        let owner = name_owner(owner.value())?;
        if let Some(Some(known)) = self.cache.get(&owner) {
            if known.record().name == name {
                return Ok(Some(known));
            }
        }
        let claims = tx.open_table(tables::CLAIMS).map_err(dberr)?;
        let claim = match claims.get(owner.as_bytes().as_slice()).map_err(dberr)? {
            Some(g) => Some(decode_signed(g.value(), &self.verified)?),
            None => None,
        };
        Ok(claim)
    }

    fn claim_by_node(&self, node: &NodeId) -> Result<Option<Signed<NameClaim>>, StoreError> {
        if let Some(known) = self.cache.get(node) {
            return Ok(known);
        }
        let before = self.cache.before_read();
        let tx = self.db.begin_read().map_err(dberr)?;
        let claims = tx.open_table(tables::CLAIMS).map_err(dberr)?;
        let claim = match claims.get(node.as_bytes().as_slice()).map_err(dberr)? {
            Some(g) => Some(decode_signed(g.value(), &self.verified)?),
            None => None,
        };
        self.cache.fill(*node, claim.clone(), before);
        Ok(claim)
    }

    fn deposit(
        &self,
        to: &NodeId,
        envelope: &[u8],
        max_count: usize,
    ) -> Result<DepositOutcome, StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let id = {
            let mut mailbox = tx.open_table(tables::MAILBOX).map_err(dberr)?;
            let start = mailbox_key(to, 0);
            let end = mailbox_key(to, u64::MAX);
            let count = mailbox
                .range(start.as_slice()..=end.as_slice())
                .map_err(dberr)?
                .take(max_count)
                .count();
            if count >= max_count {
                None
            } else {
                let mut meta = tx.open_table(tables::META).map_err(dberr)?;
                let id = meta
                    .get(tables::NEXT_MAILBOX_ID)
                    .map_err(dberr)?
                    .map_or(1, |g| g.value());
                meta.insert(tables::NEXT_MAILBOX_ID, id + 1)
                    .map_err(dberr)?;
                mailbox
                    .insert(mailbox_key(to, id).as_slice(), envelope)
                    .map_err(dberr)?;
                Some(id)
            }
        };
        match id {
            Some(id) => {
                tx.commit().map_err(dberr)?;
                Ok(DepositOutcome::Stored(id))
            }
            None => {
                tx.abort().map_err(dberr)?;
                Ok(DepositOutcome::Full)
            }
        }
    }

    fn fetch(&self, to: &NodeId, max: usize) -> Result<Fetched, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let mailbox = tx.open_table(tables::MAILBOX).map_err(dberr)?;
        let start = mailbox_key(to, 0);
        let end = mailbox_key(to, u64::MAX);
        let mut items = Vec::new();
        let mut more = false;
        for entry in mailbox
            .range(start.as_slice()..=end.as_slice())
            .map_err(dberr)?
        {
            let (k, v) = entry.map_err(dberr)?;
            if items.len() == max {
                more = true;
                break;
            }
            items.push((mailbox_id(k.value())?, v.value().to_vec()));
        }
        Ok((items, more))
    }

    fn delete(&self, to: &NodeId, ids: &[u64]) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let mut deleted = 0;
        {
            let mut mailbox = tx.open_table(tables::MAILBOX).map_err(dberr)?;
            for id in ids {
                if mailbox
                    .remove(mailbox_key(to, *id).as_slice())
                    .map_err(dberr)?
                    .is_some()
                {
                    deleted += 1;
                }
            }
        }
        tx.commit().map_err(dberr)?;
        Ok(deleted)
    }

    fn counts(&self) -> Result<(u64, u64), StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let names = tx
            .open_table(tables::NAMES)
            .map_err(dberr)?
            .len()
            .map_err(dberr)?;
        let envelopes = tx
            .open_table(tables::MAILBOX)
            .map_err(dberr)?
            .len()
            .map_err(dberr)?;
        Ok((names, envelopes))
    }

    fn claims_after(
        &self,
        after: Option<NodeId>,
        limit: usize,
    ) -> Result<Vec<Signed<NameClaim>>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let claims = tx.open_table(tables::CLAIMS).map_err(dberr)?;
        let start = after.map(|a| *a.as_bytes());
        let range = match &start {
            Some(k) => claims.range::<&[u8]>((Bound::Excluded(k.as_slice()), Bound::Unbounded)),
            None => claims.range::<&[u8]>(..),
        }
        .map_err(dberr)?;
        let mut out = Vec::new();
        for entry in range.take(limit) {
            let (_, v) = entry.map_err(dberr)?;
            out.push(decode_signed(v.value(), &self.verified)?);
        }
        Ok(out)
    }

    fn envelopes_after(
        &self,
        after: Option<(NodeId, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let mailbox = tx.open_table(tables::MAILBOX).map_err(dberr)?;
        let start = after.map(|(n, id)| mailbox_key(&n, id));
        let range = match &start {
            Some(k) => mailbox.range::<&[u8]>((Bound::Excluded(k.as_slice()), Bound::Unbounded)),
            None => mailbox.range::<&[u8]>(..),
        }
        .map_err(dberr)?;
        let mut out = Vec::new();
        for entry in range.take(limit) {
            let (k, v) = entry.map_err(dberr)?;
            let key = k.value();
            let node = key
                .get(..32)
                .and_then(|b| <&[u8; 32]>::try_from(b).ok())
                .and_then(|b| NodeId::from_bytes(b).ok())
                .ok_or_else(|| StoreError::Corrupt("mailbox key".into()))?;
            out.push((node, mailbox_id(key)?, v.value().to_vec()));
        }
        Ok(out)
    }
}

/// The in-memory tables of a [`MemoryStore`].
#[derive(Debug, Default)]
pub struct MemoryTables {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    names: HashMap<String, NodeId>,
    claims: HashMap<NodeId, Signed<NameClaim>>,
    mailbox: BTreeMap<(NodeId, u64), Vec<u8>>,
    next_id: u64,
}

impl MemoryTables {
    fn lock(&self) -> MutexGuard<'_, MemoryInner> {
        lock(&self.inner)
    }
}

impl Durable for MemoryTables {
    const KIND: &'static str = "memory";

    fn claim(&self, claim: &Signed<NameClaim>) -> Result<ClaimOutcome, StoreError> {
        let mut inner = self.lock();
        let new = claim.record();
        let owner = inner.names.get(&new.name).copied();
        let outcome = decide(owner, inner.claims.get(&new.node_id), claim);
        if outcome == ClaimOutcome::Stored {
            if let Some(old) = inner.claims.insert(new.node_id, claim.clone()) {
                if old.record().name != new.name {
                    inner.names.remove(&old.record().name);
                }
            }
            inner.names.insert(new.name.clone(), new.node_id);
        }
        Ok(outcome)
    }

    fn claim_by_name(&self, name: &str) -> Result<Option<Signed<NameClaim>>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .names
            .get(name)
            .and_then(|n| inner.claims.get(n))
            .cloned())
    }

    fn claim_by_node(&self, node: &NodeId) -> Result<Option<Signed<NameClaim>>, StoreError> {
        Ok(self.lock().claims.get(node).cloned())
    }

    fn deposit(
        &self,
        to: &NodeId,
        envelope: &[u8],
        max_count: usize,
    ) -> Result<DepositOutcome, StoreError> {
        let mut inner = self.lock();
        let count = inner.mailbox.range((*to, 0)..=(*to, u64::MAX)).count();
        if count >= max_count {
            return Ok(DepositOutcome::Full);
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner.mailbox.insert((*to, id), envelope.to_vec());
        Ok(DepositOutcome::Stored(id))
    }

    fn fetch(&self, to: &NodeId, max: usize) -> Result<Fetched, StoreError> {
        let inner = self.lock();
        let mut it = inner.mailbox.range((*to, 0)..=(*to, u64::MAX));
        let items = it
            .by_ref()
            .take(max)
            .map(|((_, id), env)| (*id, env.clone()))
            .collect();
        Ok((items, it.next().is_some()))
    }

    fn delete(&self, to: &NodeId, ids: &[u64]) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        Ok(ids
            .iter()
            .filter(|id| inner.mailbox.remove(&(*to, **id)).is_some())
            .count() as u64)
    }

    fn counts(&self) -> Result<(u64, u64), StoreError> {
        let inner = self.lock();
        Ok((inner.names.len() as u64, inner.mailbox.len() as u64))
    }

    fn claims_after(
        &self,
        after: Option<NodeId>,
        limit: usize,
    ) -> Result<Vec<Signed<NameClaim>>, StoreError> {
        let inner = self.lock();
        let mut claims: Vec<_> = inner
            .claims
            .iter()
            .filter(|(n, _)| after.is_none_or(|a| **n > a))
            .collect();
        claims.sort_by_key(|(n, _)| **n);
        Ok(claims
            .into_iter()
            .take(limit)
            .map(|(_, c)| c.clone())
            .collect())
    }

    fn envelopes_after(
        &self,
        after: Option<(NodeId, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        let inner = self.lock();
        let range = match after {
            Some(k) => inner.mailbox.range((Bound::Excluded(k), Bound::Unbounded)),
            None => inner.mailbox.range(..),
        };
        Ok(range
            .take(limit)
            .map(|((n, id), env)| (*n, *id, env.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_cache_refuses_repeats_and_makes_room_only_from_expired_entries() {
        let sig = |b: u8| Signature([b; 64]);
        let mut c = ReplayCache::default();
        assert_eq!(c.insert(&sig(1), 100, 0, 2), RequestSeen::Fresh);
        assert_eq!(c.insert(&sig(1), 100, 0, 2), RequestSeen::Replayed);
        assert_eq!(c.insert(&sig(2), 100, 0, 2), RequestSeen::Fresh);
        // Full, and nothing expired yet (entries are kept while forget_at > now).
        assert_eq!(c.insert(&sig(3), 200, 99, 2), RequestSeen::Full);
        assert_eq!(c.seen.len(), 2);
        // At forget_at the old entries go, and make room.
        assert_eq!(c.insert(&sig(3), 200, 100, 2), RequestSeen::Fresh);
        assert_eq!(c.seen.len(), 1);
        assert_eq!(
            c.insert(&sig(1), 200, 100, 2),
            RequestSeen::Fresh,
            "forgotten"
        );
        assert_eq!(c.insert(&sig(3), 300, 150, 2), RequestSeen::Replayed);
    }

    fn claim(sk: &p2p_crypto::SecretKey, name: &str, timestamp_ms: u64) -> Signed<NameClaim> {
        let record = NameClaim {
            name: name.into(),
            node_id: sk.public(),
            mailbox_key: sk.mailbox_secret().public(),
            timestamp_ms,
        };
        Signed::sign(sk, record).expect("sign")
    }

    /// Overwrites the stored claim of `node` behind the store's back, and empties its
    /// cache of decoded claims, as a restart on the changed file would.
    fn put_claim(t: &RedbTables, node: &NodeId, blob: &[u8]) {
        let tx = t.db.begin_write().expect("write");
        tx.open_table(tables::CLAIMS)
            .expect("claims")
            .insert(node.as_bytes().as_slice(), blob)
            .expect("insert");
        tx.commit().expect("commit");
        t.cache.write().clear();
    }

    #[test]
    fn the_claim_cache_serves_what_was_stored_last_and_reads_only_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = RedbTables::open(&dir.path().join("d.redb")).expect("open");
        let sk = p2p_crypto::SecretKey::generate();
        let node = sk.public();
        // Unknown, then claimed: the remembered absence gives way to the claim.
        assert!(t.claim_by_node(&node).expect("read").is_none());
        assert!(matches!(t.cache.get(&node), Some(None)));
        let first = claim(&sk, "alice", 1);
        assert_eq!(t.claim(&first).expect("claim"), ClaimOutcome::Stored);
        let read = t.claim_by_node(&node).expect("read").expect("found");
        assert_eq!(read.record(), first.record());
        // A newer claim replaces it; an older one, noted late, does not.
        let second = claim(&sk, "alice2", 2);
        assert_eq!(t.claim(&second).expect("claim"), ClaimOutcome::Stored);
        t.cache.stored(&first);
        let read = t.claim_by_node(&node).expect("read").expect("found");
        assert_eq!(read.record(), second.record());
        // A read that began before a claim was stored does not fill the cache.
        let other = p2p_crypto::SecretKey::generate().public();
        let before = t.cache.before_read();
        t.cache
            .stored(&claim(&p2p_crypto::SecretKey::generate(), "carol", 1));
        t.cache.fill(other, None, before);
        assert!(t.cache.get(&other).is_none());
        // Served from the cache: the table is not read again (here, a garbage row put
        // behind the store's back without emptying the cache still reads as the claim).
        let tx = t.db.begin_write().expect("write");
        tx.open_table(tables::CLAIMS)
            .expect("claims")
            .insert(node.as_bytes().as_slice(), &[0u8; 80][..])
            .expect("insert");
        tx.commit().expect("commit");
        let read = t.claim_by_node(&node).expect("read").expect("found");
        assert_eq!(read.record(), second.record());
    }

    #[test]
    fn a_name_lookup_never_answers_with_a_claim_that_names_another_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = RedbTables::open(&dir.path().join("d.redb")).expect("open");
        let sk = p2p_crypto::SecretKey::generate();
        let first = claim(&sk, "alice", 1);
        assert_eq!(t.claim(&first).expect("claim"), ClaimOutcome::Stored);
        let read = t.claim_by_name("alice").expect("read").expect("found");
        assert_eq!(read.record(), first.record());
        // The owner renames; the cache still holds (as a read racing the commit would
        // leave it) the claim on the old name. The new name is answered from the table,
        // the old one no longer at all.
        let second = claim(&sk, "alice2", 2);
        assert_eq!(t.claim(&second).expect("claim"), ClaimOutcome::Stored);
        t.cache.write().insert(sk.public(), Some(first.clone()));
        let read = t.claim_by_name("alice2").expect("read").expect("found");
        assert_eq!(read.record(), second.record());
        assert!(t.claim_by_name("alice").expect("read").is_none());
    }

    #[test]
    fn a_claim_read_back_is_verified_once_and_other_bytes_never_pass_as_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.redb");
        let sk = p2p_crypto::SecretKey::generate();
        let node = sk.public();
        let first = claim(&sk, "alice", 1);
        {
            let t = RedbTables::open(&path).expect("open");
            assert_eq!(t.claim(&first).expect("claim"), ClaimOutcome::Stored);
            // Verified on its way in: remembered from the write.
            assert_eq!(t.verified.len(), 1);
        }
        // Opened again (a restart): verified on the first read only.
        let t = RedbTables::open(&path).expect("open");
        assert!(t.verified.is_empty());
        for _ in 0..3 {
            let read = t.claim_by_node(&node).expect("read").expect("found");
            assert_eq!(read.record(), first.record());
        }
        let by_name = t.claim_by_name("alice").expect("read").expect("found");
        assert_eq!(by_name.signature(), first.signature());
        assert_eq!(t.verified.len(), 1);
        // The reads consult the memo: a record it vouches for is not verified again
        // (here one whose stored signature is garbage, vouched for by hand).
        let garbage = Signature([7; 64]);
        let mut vouched = garbage.to_bytes().to_vec();
        vouched.extend_from_slice(first.bytes());
        put_claim(&t, &node, &vouched);
        assert!(t.claim_by_node(&node).is_err(), "garbage signature");
        t.verified
            .insert(p2p_crypto::Domain::NameClaim, first.bytes(), garbage);
        assert!(t.claim_by_node(&node).expect("read").is_some());
        put_claim(&t, &node, &encode_signed(&first));

        // Another valid claim of the same key, stored under the remembered signature.
        let other = claim(&sk, "mallory", 2);
        let mut forged = first.signature().to_bytes().to_vec();
        forged.extend_from_slice(other.bytes());
        put_claim(&t, &node, &forged);
        assert!(matches!(
            t.claim_by_node(&node),
            Err(StoreError::Corrupt(e)) if e.contains("signature")
        ));
        // A flipped byte of the remembered record.
        let mut flipped = encode_signed(&first);
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        put_claim(&t, &node, &flipped);
        assert!(matches!(
            t.claim_by_node(&node),
            Err(StoreError::Corrupt(_))
        ));
        // Neither was remembered; the genuine claim still reads.
        assert_eq!(t.verified.len(), 2);
        put_claim(&t, &node, &encode_signed(&first));
        assert!(t.claim_by_node(&node).expect("read").is_some());
    }
}
