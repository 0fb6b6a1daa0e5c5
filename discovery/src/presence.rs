//! The in-memory presence table of the single-instance stores: a plain state machine
//! that takes `now` as an argument. [`crate::PgStore`] keeps the same rules in SQL.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    ops::Bound,
};

use p2p_crypto::NodeId;

use crate::{
    record::{PresenceRecord, Signed, Withdrawal, MAX_TTL_SECS},
    store::LivePresence as Live,
};

/// Why a record was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not newer than what the server has seen from this node, or already expired.
    Stale,
    /// The table is at capacity.
    Full,
}

/// Live records by NodeId, their ids in order (for cursor pagination), plus the newest
/// timestamp seen from nodes that withdrew or expired, so their old records cannot be
/// replayed.
///
/// The records sit in a hash table and only the ids in an ordered set: a lookup, which
/// every `GET /v1/peers` and name lookup makes, is one probe however many records are
/// live, where a B-tree holding the records themselves walks five or six nodes of a few
/// KiB each at 100 000 (a cache miss at each).
#[derive(Debug, Default)]
pub(crate) struct PresenceTable {
    live: HashMap<NodeId, Live>,
    /// The keys of `live`, in order.
    order: BTreeSet<NodeId>,
    /// NodeId -> (last timestamp, forget at).
    tombstones: HashMap<NodeId, (u64, u64)>,
    last_prune_ms: u64,
}

/// How long a tombstone is kept: any older record has expired by then.
pub(crate) const TOMBSTONE_MS: u64 = (MAX_TTL_SECS as u64 + 120) * 1000;

/// When a record announced at `now` expires: its TTL after `min(timestamp, now)`.
pub(crate) fn expiry(record: &PresenceRecord, now: u64) -> u64 {
    record
        .timestamp_ms
        .min(now)
        .saturating_add(u64::from(record.ttl_secs) * 1000)
}

impl PresenceTable {
    fn last_timestamp(&self, node: &NodeId) -> Option<u64> {
        self.live
            .get(node)
            .map(|l| l.signed.record().timestamp_ms)
            .or_else(|| self.tombstones.get(node).map(|t| t.0))
    }

    /// Takes a verified record if it is newer than anything seen from its node; at most
    /// `max_live` live records.
    pub fn announce(
        &mut self,
        signed: Signed<PresenceRecord>,
        observed_ip: IpAddr,
        now: u64,
        max_live: usize,
    ) -> Result<u64, Refused> {
        self.maybe_prune(now, max_live);
        let rec = signed.record();
        let node = rec.node_id;
        let expires_at_ms = expiry(rec, now);
        if expires_at_ms <= now
            || self
                .last_timestamp(&node)
                .is_some_and(|last| rec.timestamp_ms <= last)
        {
            return Err(Refused::Stale);
        }
        if !self.live.contains_key(&node) && self.live.len() >= max_live {
            self.prune_bounded(now, max_live);
            if self.live.len() >= max_live {
                return Err(Refused::Full);
            }
        }
        self.tombstones.remove(&node);
        self.insert_live(
            node,
            Live {
                signed,
                observed_ip,
                expires_at_ms,
            },
        );
        Ok(expires_at_ms)
    }

    /// Applies a verified withdrawal; `Ok(true)` if a live record was removed. At most
    /// `max` tombstones.
    pub fn withdraw(&mut self, w: &Withdrawal, now: u64, max: usize) -> Result<bool, Refused> {
        self.maybe_prune(now, max);
        if self
            .last_timestamp(&w.node_id)
            .is_some_and(|last| w.timestamp_ms <= last)
        {
            return Err(Refused::Stale);
        }
        if !self.tombstones.contains_key(&w.node_id) && self.tombstones.len() >= max {
            self.prune_bounded(now, max);
            if self.tombstones.len() >= max {
                return Err(Refused::Full);
            }
        }
        let removed = self.remove_live(&w.node_id);
        self.tombstones.insert(
            w.node_id,
            (w.timestamp_ms, now.saturating_add(TOMBSTONE_MS)),
        );
        Ok(removed)
    }

    /// The live record of `node`, if any.
    pub fn get(&self, node: &NodeId, now: u64) -> Option<&Live> {
        self.live.get(node).filter(|l| l.expires_at_ms > now)
    }

    /// Up to `limit` live records after `cursor`, and the cursor of the next page.
    pub fn page(
        &self,
        cursor: Option<NodeId>,
        limit: usize,
        now: u64,
    ) -> (Vec<Live>, Option<NodeId>) {
        let lower = cursor.map_or(Bound::Unbounded, Bound::Excluded);
        let mut it = self
            .order
            .range((lower, Bound::Unbounded))
            .filter_map(|node| self.live.get(node))
            .filter(|l| l.expires_at_ms > now);
        let page: Vec<Live> = it.by_ref().take(limit).cloned().collect();
        let next = if it.next().is_some() {
            page.last().map(|l| l.signed.record().node_id)
        } else {
            None
        };
        (page, next)
    }

    /// Sets `node`'s live record; its id joins the ordered set only if it is new there
    /// (a renewal does not walk the set).
    fn insert_live(&mut self, node: NodeId, live: Live) {
        if self.live.insert(node, live).is_none() {
            self.order.insert(node);
        }
    }

    /// Drops `node`'s live record; whether there was one.
    fn remove_live(&mut self, node: &NodeId) -> bool {
        self.order.remove(node);
        self.live.remove(node).is_some()
    }

    /// Number of live records.
    pub fn live_count(&self, now: u64) -> usize {
        self.live.values().filter(|l| l.expires_at_ms > now).count()
    }

    /// Prunes at most once a second.
    fn maybe_prune(&mut self, now: u64, max_tombstones: usize) {
        if now.saturating_sub(self.last_prune_ms) >= 1000 {
            self.prune_bounded(now, max_tombstones);
        }
    }

    /// Drops expired records (keeping a tombstone) and forgotten tombstones.
    pub fn prune(&mut self, now: u64) {
        self.prune_bounded(now, usize::MAX);
    }

    /// [`PresenceTable::prune`], keeping at most `max_tombstones` tombstones.
    fn prune_bounded(&mut self, now: u64, max_tombstones: usize) {
        self.last_prune_ms = now;
        let expired: Vec<(NodeId, u64)> = self
            .live
            .iter()
            .filter(|(_, l)| l.expires_at_ms <= now)
            .map(|(n, l)| (*n, l.signed.record().timestamp_ms))
            .collect();
        self.tombstones.retain(|_, (_, forget_at)| *forget_at > now);
        for (node, ts) in expired {
            self.remove_live(&node);
            if self.tombstones.len() < max_tombstones {
                self.tombstones
                    .insert(node, (ts, now.saturating_add(TOMBSTONE_MS)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_crypto::SecretKey;

    fn rec(sk: &SecretKey, ts: u64, ttl: u32) -> Signed<PresenceRecord> {
        Signed::sign(
            sk,
            PresenceRecord {
                node_id: sk.public(),
                name: None,
                addrs: vec![],
                mailbox_key: sk.mailbox_secret().public(),
                timestamp_ms: ts,
                ttl_secs: ttl,
                relay: None,
            },
        )
        .expect("sign")
    }

    #[test]
    fn newer_wins_and_expiry() {
        let sk = SecretKey::generate();
        let ip = IpAddr::from([127, 0, 0, 1]);
        let mut t = PresenceTable::default();
        let now = 1_000_000;
        t.announce(rec(&sk, now, 30), ip, now, 10).expect("first");
        assert_eq!(
            t.announce(rec(&sk, now, 30), ip, now, 10),
            Err(Refused::Stale)
        );
        assert_eq!(
            t.announce(rec(&sk, now - 1, 30), ip, now, 10),
            Err(Refused::Stale)
        );
        assert!(t.get(&sk.public(), now + 29_999).is_some());
        assert!(t.get(&sk.public(), now + 30_000).is_none());
        t.prune(now + 30_000);
        assert_eq!(t.live_count(now + 30_000), 0);
        // The expired record cannot be replayed.
        assert_eq!(
            t.announce(rec(&sk, now, 30), ip, now + 30_000, 10),
            Err(Refused::Stale)
        );
    }

    #[test]
    fn capacity() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let mut t = PresenceTable::default();
        let a = SecretKey::generate();
        let b = SecretKey::generate();
        t.announce(rec(&a, 5000, 30), ip, 5000, 1).expect("a");
        assert_eq!(
            t.announce(rec(&b, 5000, 30), ip, 5000, 1),
            Err(Refused::Full)
        );
    }

    #[test]
    fn pages_walk_live_ids_in_order() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let now = 1_000_000;
        let mut t = PresenceTable::default();
        let keys: Vec<SecretKey> = (0..7).map(|_| SecretKey::generate()).collect();
        for (i, k) in keys.iter().enumerate() {
            let ttl = if i == 0 { 10 } else { 30 };
            t.announce(rec(k, now, ttl), ip, now, 100)
                .expect("announce");
        }
        let gone = keys[1].public();
        let w = Withdrawal {
            node_id: gone,
            timestamp_ms: now + 1,
        };
        assert_eq!(t.withdraw(&w, now, 100), Ok(true));
        // keys[0] has expired by `later`; keys[1] withdrew.
        let later = now + 10_000;
        t.prune(later);
        let mut want: Vec<NodeId> = keys[2..].iter().map(SecretKey::public).collect();
        want.sort();
        let (mut seen, mut cursor) = (Vec::new(), None);
        for _ in 0..10 {
            let (page, next) = t.page(cursor, 2, later);
            seen.extend(page.iter().map(|l| l.signed.record().node_id));
            cursor = next;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(seen, want);
        assert_eq!(t.live_count(later), want.len());
        assert_eq!(t.order.len(), t.live.len());
        assert!(t.get(&gone, later).is_none());
    }
}
