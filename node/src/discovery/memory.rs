//! An in-process discovery for tests: names, presence and mailboxes in memory, shared by
//! every node built with the same [`MemoryDiscovery`].
//!
//! It keeps the server's rules that nodes rely on (first come, first served names; an
//! announce may only carry a name its key claimed; a deposit needs a known recipient;
//! presence expires), but it checks no signatures: the keys come from the nodes of the
//! test itself.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use p2p_crypto::{MailboxPublicKey, NodeId, SecretKey};
use p2p_discovery::{
    resolve_addrs, Announcement, ClientError, MailboxBatch, MailboxItem, PeerInfo, RelayRef,
};
use tokio::{sync::watch, time::Instant};

use super::{Discovery, DiscoveryError, DiscoveryStatus, Source};

/// Envelopes returned by one fetch, as the real server's default.
const FETCH_BATCH: usize = 100;

/// An in-memory discovery shared by the nodes of a test.
#[derive(Debug)]
pub struct MemoryDiscovery {
    state: Mutex<State>,
    status: watch::Sender<DiscoveryStatus>,
}

#[derive(Debug, Default)]
struct State {
    names: HashMap<String, NodeId>,
    claims: HashMap<NodeId, (String, MailboxPublicKey)>,
    presence: HashMap<NodeId, Live>,
    mailboxes: BTreeMap<(NodeId, u64), Vec<u8>>,
    next_id: u64,
    relay: Option<RelayRef>,
}

#[derive(Debug, Clone)]
struct Live {
    info: PeerInfo,
    expires: Instant,
}

impl MemoryDiscovery {
    /// An empty discovery; pass it (as `Arc<dyn Discovery>`) to every node of a test.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            status: watch::channel(DiscoveryStatus::fixed("memory:", Source::Memory)).0,
        })
    }

    /// Makes it report `relay` as its relay.
    pub fn set_relay(&self, relay: Option<RelayRef>) {
        self.state().relay = relay;
    }

    /// Makes it report that the server in use moved to `url`, as a LAN's discovery does
    /// when another node takes over.
    pub fn move_to(&self, url: &str) {
        self.status.send_modify(|s| {
            s.generation += 1;
            s.url = Some(url.to_owned());
        });
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(source: ClientError) -> DiscoveryError {
        DiscoveryError::Client {
            url: "memory:".to_owned(),
            source,
        }
    }
}

impl State {
    /// What is known of `id` now: its claim, and its presence if live.
    fn peer(&self, id: &NodeId) -> Option<PeerInfo> {
        let live = self
            .presence
            .get(id)
            .filter(|l| l.expires > Instant::now())
            .map(|l| l.info.clone());
        let claim = self.claims.get(id);
        match (live, claim) {
            (Some(mut info), Some((name, _))) => {
                info.name = Some(name.clone());
                Some(info)
            }
            (Some(info), None) => Some(info),
            (None, Some((name, key))) => Some(PeerInfo {
                node_id: *id,
                name: Some(name.clone()),
                mailbox_key: *key,
                online: false,
                addrs: Vec::new(),
                announced_addrs: Vec::new(),
                observed_ip: None,
                relay: None,
                timestamp_ms: 0,
            }),
            (None, None) => None,
        }
    }
}

#[async_trait]
impl Discovery for MemoryDiscovery {
    fn status(&self) -> watch::Receiver<DiscoveryStatus> {
        self.status.subscribe()
    }

    async fn claim_name(&self, secret: &SecretKey, name: &str) -> Result<(), DiscoveryError> {
        p2p_discovery::validate_name(name)
            .map_err(|e| Self::refuse(ClientError::InvalidRequest(e)))?;
        let id = secret.public();
        let mut s = self.state();
        match s.names.get(name) {
            Some(owner) if *owner != id => return Err(Self::refuse(ClientError::NameTaken)),
            _ => {}
        }
        if let Some((old, _)) = s.claims.get(&id).cloned() {
            s.names.remove(&old);
        }
        s.names.insert(name.to_owned(), id);
        s.claims
            .insert(id, (name.to_owned(), secret.mailbox_secret().public()));
        Ok(())
    }

    async fn announce(
        &self,
        secret: &SecretKey,
        announcement: &Announcement,
    ) -> Result<Duration, DiscoveryError> {
        let id = secret.public();
        let mut s = self.state();
        if let Some(name) = &announcement.name {
            if s.names.get(name) != Some(&id) {
                return Err(Self::refuse(ClientError::NameNotClaimed));
            }
        }
        let observed = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let info = PeerInfo {
            node_id: id,
            name: announcement.name.clone(),
            mailbox_key: secret.mailbox_secret().public(),
            online: true,
            addrs: resolve_addrs(&announcement.addrs, Some(observed)),
            announced_addrs: announcement.addrs.clone(),
            observed_ip: Some(observed),
            relay: announcement.relay,
            timestamp_ms: p2p_discovery::now_ms(),
        };
        let expires = Instant::now() + announcement.ttl;
        s.presence.insert(id, Live { info, expires });
        Ok(announcement.ttl / 2)
    }

    async fn relay(&self) -> Result<Option<RelayRef>, DiscoveryError> {
        Ok(self.state().relay)
    }

    async fn withdraw(&self, secret: &SecretKey) -> Result<(), DiscoveryError> {
        self.state().presence.remove(&secret.public());
        Ok(())
    }

    async fn online(&self) -> Result<Vec<PeerInfo>, DiscoveryError> {
        let s = self.state();
        let mut ids: Vec<NodeId> = s.presence.keys().copied().collect();
        ids.sort();
        Ok(ids
            .iter()
            .filter_map(|id| s.peer(id))
            .filter(|p| p.online)
            .collect())
    }

    async fn lookup_name(&self, name: &str) -> Result<Option<PeerInfo>, DiscoveryError> {
        let s = self.state();
        Ok(s.names.get(name).and_then(|id| s.peer(id)))
    }

    async fn lookup_id(&self, id: &NodeId) -> Result<Option<PeerInfo>, DiscoveryError> {
        Ok(self.state().peer(id))
    }

    async fn deposit(&self, to: &NodeId, envelope: Vec<u8>) -> Result<(), DiscoveryError> {
        let mut s = self.state();
        if s.peer(to).is_none() {
            return Err(Self::refuse(ClientError::NotFound));
        }
        s.next_id += 1;
        let id = s.next_id;
        s.mailboxes.insert((*to, id), envelope);
        Ok(())
    }

    async fn fetch_mailbox(&self, secret: &SecretKey) -> Result<MailboxBatch, DiscoveryError> {
        let id = secret.public();
        let s = self.state();
        let mut it = s.mailboxes.range((id, 0)..=(id, u64::MAX));
        let items = it
            .by_ref()
            .take(FETCH_BATCH)
            .map(|((_, n), envelope)| MailboxItem {
                id: *n,
                envelope: envelope.clone(),
            })
            .collect();
        Ok(MailboxBatch {
            items,
            more: it.next().is_some(),
        })
    }

    async fn delete_mailbox(&self, secret: &SecretKey, ids: &[u64]) -> Result<(), DiscoveryError> {
        let id = secret.public();
        let mut s = self.state();
        for n in ids {
            s.mailboxes.remove(&(id, *n));
        }
        Ok(())
    }
}
