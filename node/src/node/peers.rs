//! The peer directory: what this node knows about other nodes from discovery and from
//! its contacts (names, mailbox keys, the online list), with when it last asked.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use p2p_crypto::{MailboxPublicKey, NodeId};
use p2p_discovery::{PeerInfo, RelayRef};

use super::bounded_insert;

/// How often the name of a sender that is neither a contact nor online is looked up,
/// and how often a pinned name is checked against discovery.
pub(super) const NAME_LOOKUP_INTERVAL: Duration = Duration::from_secs(60);

/// Names, keys and presence of other nodes.
#[derive(Debug, Default)]
pub(super) struct PeerDirectory {
    /// The online list as of the last poll.
    online: HashMap<NodeId, PeerInfo>,
    /// The addresses and relay of peers that left the online list, as last announced.
    last_paths: HashMap<NodeId, (Vec<SocketAddr>, Option<RelayRef>)>,
    /// Names of pinned contacts.
    names: HashMap<NodeId, String>,
    /// Known mailbox keys.
    mailbox_keys: HashMap<NodeId, MailboxPublicKey>,
    /// (name, announced id) pairs already warned about.
    key_warned: HashSet<(String, NodeId)>,
    /// Names that senders we have no contact for claimed on discovery (verified
    /// claims), with when we last asked.
    claimed_names: HashMap<NodeId, (Option<String>, Instant)>,
    /// When each pinned name was last checked against discovery.
    names_checked: HashMap<String, Instant>,
    /// Peers that quit (closed their connection with us saying so), with the timestamp
    /// (ms) of the announcement they were online with then: until an announcement newer
    /// than that, their record is their old one, which discovery may list for a moment
    /// after they left.
    quit: HashMap<NodeId, u64>,
}

/// How the online list changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct OnlineChange {
    /// Nodes that appeared.
    pub came: Vec<PeerInfo>,
    /// Nodes that left.
    pub went: Vec<PeerInfo>,
    /// Nodes that announced other addresses or another relay.
    pub moved: Vec<NodeId>,
    /// (name, pinned id, announcing id): a pinned name announced by another key, first
    /// time seen.
    pub key_changes: Vec<(String, NodeId, NodeId)>,
}

impl PeerDirectory {
    /// The display name of `id`: its pinned contact name, else its name online.
    pub(super) fn name_of(&self, id: &NodeId) -> Option<String> {
        self.names
            .get(id)
            .cloned()
            .or_else(|| self.online.get(id).and_then(|p| p.name.clone()))
    }

    /// The name `id` has in the online list, if it has one and no pinned name.
    pub(super) fn unpinned_online_name(&self, id: &NodeId) -> Option<String> {
        if self.names.contains_key(id) {
            return None;
        }
        self.online.get(id).and_then(|p| p.name.clone())
    }

    /// Pins `name` for `id` in the in-memory view (the store holds the pin).
    pub(super) fn set_name(&mut self, id: NodeId, name: String) {
        self.names.insert(id, name);
    }

    /// The claimed name looked up for a sender within [`NAME_LOOKUP_INTERVAL`], if any
    /// lookup is that recent (`Some(None)`: it has none).
    pub(super) fn recent_claim(&self, id: &NodeId, now: Instant) -> Option<Option<String>> {
        self.claimed_names
            .get(id)
            .filter(|(_, at)| now.saturating_duration_since(*at) < NAME_LOOKUP_INTERVAL)
            .map(|(name, _)| name.clone())
    }

    /// Remembers what a lookup of a sender's claimed name found.
    pub(super) fn note_claim(&mut self, id: NodeId, name: Option<String>, now: Instant) {
        bounded_insert(&mut self.claimed_names, id, (name, now));
    }

    /// Whether `name` was checked against discovery within [`NAME_LOOKUP_INTERVAL`].
    pub(super) fn recently_checked(&self, name: &str, now: Instant) -> bool {
        self.names_checked
            .get(name)
            .is_some_and(|at| now.saturating_duration_since(*at) < NAME_LOOKUP_INTERVAL)
    }

    /// Remembers that `name` was checked against discovery.
    pub(super) fn note_checked(&mut self, name: String, now: Instant) {
        bounded_insert(&mut self.names_checked, name, now);
    }

    /// Remembers the mailbox keys of verified records.
    pub(super) fn learn(&mut self, peers: &[PeerInfo]) {
        for p in peers {
            bounded_insert(&mut self.mailbox_keys, p.node_id, p.mailbox_key);
        }
    }

    /// Remembers one mailbox key.
    pub(super) fn set_mailbox_key(&mut self, id: NodeId, key: MailboxPublicKey) {
        bounded_insert(&mut self.mailbox_keys, id, key);
    }

    /// The mailbox key of `id`, if known.
    pub(super) fn mailbox_key(&self, id: &NodeId) -> Option<MailboxPublicKey> {
        self.mailbox_keys.get(id).copied()
    }

    /// The addresses and relay `id` announced, if it is in the online list.
    pub(super) fn online_paths(&self, id: &NodeId) -> Option<(Vec<SocketAddr>, Option<RelayRef>)> {
        self.online.get(id).map(|p| (p.addrs.clone(), p.relay))
    }

    /// Notes that `id` quit: it closed its connection with us saying it shuts down. It
    /// leaves the online list at once (returned, when it was there), and its record
    /// stays out of it until it announces a newer one. `now_ms` stands in for the time of
    /// its announcement when it is not in the online list.
    pub(super) fn note_quit(&mut self, id: NodeId, now_ms: u64) -> Option<PeerInfo> {
        if self.quit.contains_key(&id) {
            return None;
        }
        let gone = self.online.remove(&id);
        let stamp = gone.as_ref().map_or(now_ms, |p| p.timestamp_ms);
        bounded_insert(&mut self.quit, id, stamp);
        if let Some(p) = &gone {
            bounded_insert(&mut self.last_paths, id, (p.addrs.clone(), p.relay));
        }
        gone
    }

    /// Notes that `id` is back: it connected again, or announced a newer record.
    pub(super) fn note_back(&mut self, id: &NodeId) {
        self.quit.remove(id);
    }

    /// Whether `id` quit and has not connected or announced itself since.
    pub(super) fn has_quit(&self, id: &NodeId) -> bool {
        self.quit.contains_key(id)
    }

    /// Whether `p` was announced after its node last quit (or it never did): a record
    /// that was not is the one its node left behind.
    pub(super) fn announced_since_quit(&self, p: &PeerInfo) -> bool {
        self.quit
            .get(&p.node_id)
            .is_none_or(|stamp| p.timestamp_ms > *stamp)
    }

    /// The addresses and relay `id` announced last: in the online list now, or before it
    /// left it.
    pub(super) fn last_paths(&self, id: &NodeId) -> Option<(Vec<SocketAddr>, Option<RelayRef>)> {
        self.online_paths(id)
            .or_else(|| self.last_paths.get(id).cloned())
    }

    /// Replaces the online list (without ourselves, and without the records peers that
    /// quit left behind) and says what changed.
    pub(super) fn replace_online(&mut self, me: NodeId, peers: Vec<PeerInfo>) -> OnlineChange {
        let new: HashMap<NodeId, PeerInfo> = peers
            .into_iter()
            .filter(|p| p.node_id != me && self.announced_since_quit(p))
            .map(|p| (p.node_id, p))
            .collect();
        let mut change = OnlineChange::default();
        for p in new.values() {
            match self.online.get(&p.node_id) {
                None => change.came.push(p.clone()),
                Some(old) if old.addrs != p.addrs || old.relay != p.relay => {
                    change.moved.push(p.node_id)
                }
                Some(_) => {}
            }
        }
        change.went = self
            .online
            .values()
            .filter(|p| !new.contains_key(&p.node_id))
            .cloned()
            .collect();
        for p in &change.came {
            let Some(name) = &p.name else { continue };
            let pinned = self
                .names
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(id, _)| *id);
            if let Some(pinned) = pinned {
                let key = (name.clone(), p.node_id);
                if pinned != p.node_id && !self.key_warned.contains(&key) {
                    if self.key_warned.len() >= super::MAX_PEER_STATE {
                        self.key_warned.clear();
                    }
                    self.key_warned.insert(key);
                    change.key_changes.push((name.clone(), pinned, p.node_id));
                }
            }
        }
        for p in &change.went {
            bounded_insert(&mut self.last_paths, p.node_id, (p.addrs.clone(), p.relay));
        }
        for id in new.keys() {
            self.last_paths.remove(id);
            self.quit.remove(id);
        }
        self.online = new;
        change
    }
}

#[cfg(test)]
mod tests {
    use p2p_crypto::SecretKey;

    use super::*;

    fn info(seed: u8, name: Option<&str>, port: u16) -> PeerInfo {
        let k = SecretKey::from_bytes(&[seed; 32]);
        PeerInfo {
            node_id: k.public(),
            name: name.map(str::to_owned),
            mailbox_key: k.mailbox_secret().public(),
            online: true,
            addrs: vec![SocketAddr::from(([192, 0, 2, 1], port))],
            announced_addrs: vec![],
            observed_ip: None,
            relay: None,
            timestamp_ms: 1,
        }
    }

    #[test]
    fn a_peer_that_quit_leaves_the_online_list_until_it_announces_again() {
        let me = SecretKey::from_bytes(&[9; 32]).public();
        let mut d = PeerDirectory::default();
        let a = info(1, Some("alice"), 1);
        d.replace_online(me, vec![a.clone()]);
        assert_eq!(
            d.note_quit(a.node_id, 1000),
            Some(a.clone()),
            "she leaves at once"
        );
        assert_eq!(d.note_quit(a.node_id, 1000), None, "once");
        assert!(d.has_quit(&a.node_id));
        assert_eq!(
            d.online_paths(&a.node_id),
            None,
            "the old record is not dialed"
        );
        assert_eq!(
            d.last_paths(&a.node_id).map(|(addrs, _)| addrs),
            Some(a.addrs.clone())
        );
        assert!(!d.announced_since_quit(&a));
        // The next poll still lists the old record: it stays out.
        let c = d.replace_online(me, vec![a.clone()]);
        assert_eq!(c, OnlineChange::default());
        assert_eq!(d.online_paths(&a.node_id), None);
        // A newer announcement: back.
        let back = PeerInfo {
            timestamp_ms: 2,
            ..info(1, Some("alice"), 4)
        };
        assert!(d.announced_since_quit(&back));
        let c = d.replace_online(me, vec![back.clone()]);
        assert_eq!(c.came, vec![back]);
        assert!(!d.has_quit(&a.node_id));
        assert!(d.online_paths(&a.node_id).is_some());
        // Not in the online list when she quits: the time stands in for her record's.
        d.replace_online(me, vec![]);
        assert_eq!(d.note_quit(a.node_id, 1000), None);
        assert!(!d.announced_since_quit(&PeerInfo {
            timestamp_ms: 999,
            ..a.clone()
        }));
        assert!(d.announced_since_quit(&PeerInfo {
            timestamp_ms: 1001,
            ..a.clone()
        }));
        // Connecting again clears it.
        d.note_back(&a.node_id);
        assert!(!d.has_quit(&a.node_id));
    }

    #[test]
    fn online_changes_are_reported_once() {
        let me = SecretKey::from_bytes(&[9; 32]).public();
        let mut d = PeerDirectory::default();
        let (a, b) = (info(1, Some("alice"), 1), info(2, None, 2));
        let c = d.replace_online(me, vec![a.clone(), b.clone()]);
        assert_eq!(c.came.len(), 2);
        assert!(c.went.is_empty() && c.moved.is_empty());
        // Bob moves, alice leaves.
        let b2 = info(2, None, 3);
        let c = d.replace_online(me, vec![b2]);
        assert_eq!(c.went, vec![a.clone()]);
        assert_eq!(c.moved, vec![b.node_id]);
        assert_eq!(d.online_paths(&a.node_id), None);
        assert_eq!(
            d.last_paths(&a.node_id).map(|(addrs, _)| addrs),
            Some(a.addrs.clone()),
            "what alice announced last is remembered"
        );
        assert_eq!(
            d.online_paths(&b.node_id).map(|(addrs, _)| addrs),
            Some(vec![SocketAddr::from(([192, 0, 2, 1], 3))])
        );
    }

    #[test]
    fn a_pinned_name_announced_by_another_key_is_reported_once() {
        let me = SecretKey::from_bytes(&[9; 32]).public();
        let mut d = PeerDirectory::default();
        let real = SecretKey::from_bytes(&[1; 32]).public();
        d.set_name(real, "alice".into());
        let impostor = info(5, Some("alice"), 1);
        let c = d.replace_online(me, vec![impostor.clone()]);
        assert_eq!(
            c.key_changes,
            vec![("alice".to_owned(), real, impostor.node_id)]
        );
        d.replace_online(me, vec![]);
        let c = d.replace_online(me, vec![impostor]);
        assert!(c.key_changes.is_empty(), "warned already");
        assert_eq!(d.name_of(&real).as_deref(), Some("alice"));
    }

    #[test]
    fn lookups_are_remembered_for_the_interval() {
        let mut d = PeerDirectory::default();
        let id = SecretKey::from_bytes(&[1; 32]).public();
        let t0 = Instant::now();
        assert_eq!(d.recent_claim(&id, t0), None);
        d.note_claim(id, Some("x".into()), t0);
        assert_eq!(d.recent_claim(&id, t0), Some(Some("x".into())));
        assert_eq!(d.recent_claim(&id, t0 + NAME_LOOKUP_INTERVAL), None);
        d.note_checked("x".into(), t0);
        assert!(d.recently_checked("x", t0 + Duration::from_secs(1)));
        assert!(!d.recently_checked("x", t0 + NAME_LOOKUP_INTERVAL));
    }
}
