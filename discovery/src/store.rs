//! Persistent state of the server: name claims and mailboxes.
//!
//! [`Store`] is synchronous; the server calls it from `spawn_blocking`, so no redb
//! transaction is ever held across an `.await`. [`RedbStore`] persists to a file,
//! [`MemoryStore`] keeps everything in memory (tests, throwaway servers).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::Path,
    sync::Mutex,
};

use p2p_crypto::{NodeId, Signature};
use redb::{ReadableTable, ReadableTableMetadata};

use crate::record::{NameClaim, Signed};

/// A storage failure. Never caused by request input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[source] Box<redb::Error>),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    #[error("storage task failed: {0}")]
    Task(String),
    /// The database file is open to group or others, or cannot be created.
    #[error(transparent)]
    File(#[from] p2p_crypto::owner_only::OwnerOnlyError),
}

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
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

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub names: u64,
    pub envelopes: u64,
}

/// Names and mailboxes, behind one trait so tests can use memory.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Stores a verified claim, first come first served; one name per node (a newer
    /// claim for another name renames the node and frees the old name).
    fn claim(&self, claim: &Signed<NameClaim>) -> Result<ClaimOutcome, StoreError>;
    /// The claim on `name`.
    fn claim_by_name(&self, name: &str) -> Result<Option<Signed<NameClaim>>, StoreError>;
    /// The claim made by `node`.
    fn claim_by_node(&self, node: &NodeId) -> Result<Option<Signed<NameClaim>>, StoreError>;
    /// Appends an envelope unless the recipient already has `max_count`.
    fn deposit(
        &self,
        to: &NodeId,
        envelope: &[u8],
        max_count: usize,
    ) -> Result<DepositOutcome, StoreError>;
    /// Up to `max` envelopes, oldest first, and whether more remain.
    fn fetch(&self, to: &NodeId, max: usize) -> Result<Fetched, StoreError>;
    /// Deletes the given ids from `to`'s mailbox; unknown ids are ignored.
    fn delete(&self, to: &NodeId, ids: &[u64]) -> Result<u64, StoreError>;
    /// Counts for metrics.
    fn stats(&self) -> Result<StoreStats, StoreError>;
}

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

/// Stored form of a signed claim: signature (64 bytes) then the signed bytes.
fn encode_claim(c: &Signed<NameClaim>) -> Vec<u8> {
    let mut v = c.signature().to_bytes().to_vec();
    v.extend_from_slice(c.bytes());
    v
}

fn decode_claim(blob: &[u8]) -> Result<Signed<NameClaim>, StoreError> {
    if blob.len() < 64 {
        return Err(StoreError::Corrupt("claim blob too short".into()));
    }
    let (sig, bytes) = blob.split_at(64);
    let sig: [u8; 64] = sig
        .try_into()
        .map_err(|_| StoreError::Corrupt("claim signature".into()))?;
    Signed::verify(bytes.to_vec(), Signature(sig))
        .map_err(|e| StoreError::Corrupt(format!("stored claim: {e}")))
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

/// Names and mailboxes in a redb file.
pub struct RedbStore {
    db: redb::Database,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens (or creates) the database file and its tables. A new file is created with
    /// mode 0600; an existing one that group or others may access is refused.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = p2p_crypto::owner_only::open_file(path)?;
        let db = redb::Builder::new().create_file(file).map_err(dberr)?;
        let tx = db.begin_write().map_err(dberr)?;
        {
            tx.open_table(tables::NAMES).map_err(dberr)?;
            tx.open_table(tables::CLAIMS).map_err(dberr)?;
            tx.open_table(tables::MAILBOX).map_err(dberr)?;
            tx.open_table(tables::META).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)?;
        Ok(Self { db })
    }
}

impl Store for RedbStore {
    fn claim(&self, claim: &Signed<NameClaim>) -> Result<ClaimOutcome, StoreError> {
        let new = claim.record();
        let tx = self.db.begin_write().map_err(dberr)?;
        let outcome = {
            let mut names = tx.open_table(tables::NAMES).map_err(dberr)?;
            let mut claims = tx.open_table(tables::CLAIMS).map_err(dberr)?;
            let owner = match names.get(new.name.as_str()).map_err(dberr)? {
                Some(g) => Some(
                    NodeId::try_from_slice(g.value())
                        .map_err(|e| StoreError::Corrupt(format!("name owner: {e}")))?,
                ),
                None => None,
            };
            let old = match claims
                .get(new.node_id.as_bytes().as_slice())
                .map_err(dberr)?
            {
                Some(g) => Some(decode_claim(g.value())?),
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
                        encode_claim(claim).as_slice(),
                    )
                    .map_err(dberr)?;
            }
            outcome
        };
        if outcome == ClaimOutcome::Stored {
            tx.commit().map_err(dberr)?;
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
        let claims = tx.open_table(tables::CLAIMS).map_err(dberr)?;
        let claim = match claims.get(owner.value()).map_err(dberr)? {
            Some(g) => Some(decode_claim(g.value())?),
            None => None,
        };
        Ok(claim)
    }

    fn claim_by_node(&self, node: &NodeId) -> Result<Option<Signed<NameClaim>>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let claims = tx.open_table(tables::CLAIMS).map_err(dberr)?;
        let claim = match claims.get(node.as_bytes().as_slice()).map_err(dberr)? {
            Some(g) => Some(decode_claim(g.value())?),
            None => None,
        };
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

    fn stats(&self) -> Result<StoreStats, StoreError> {
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
        Ok(StoreStats { names, envelopes })
    }
}

/// Names and mailboxes in memory; lost when dropped.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    names: HashMap<String, NodeId>,
    claims: HashMap<NodeId, Signed<NameClaim>>,
    mailbox: BTreeMap<(NodeId, u64), Vec<u8>>,
    next_id: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // The data stays consistent even if a holder panicked: every update is one step.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
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

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let inner = self.lock();
        Ok(StoreStats {
            names: inner.names.len() as u64,
            envelopes: inner.mailbox.len() as u64,
        })
    }
}
