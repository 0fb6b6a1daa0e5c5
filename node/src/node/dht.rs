//! Presence on the BitTorrent Mainline DHT, through pkarr: a node can be found by its
//! NodeId with no discovery server at all.
//!
//! A pkarr record is a small DNS packet signed with an ed25519 key and stored on the DHT
//! under that key (BEP 44 mutable items): the NodeId *is* the key, so the node signs
//! its record with its own identity and nobody else can publish one for it. Ours holds,
//! as TXT records under `_p2p`, `v=1`, the node's direct addresses (`addr=IP:PORT`) and
//! its home relay (`relay=NODEID@IP:PORT`); names stay on the discovery service.
//!
//! A reader trusts nothing it did not check: the packet must be at most
//! [`MAX_PACKET_BYTES`] (the DHT's own bound), its signature must verify with the key
//! looked up (checked again here, not only by pkarr), it must be younger than
//! [`MAX_RECORD_AGE`] and not from the future, and only the first [`MAX_ADDRS`]
//! well-formed addresses are taken; anything else is ignored.
//!
//! Off by default ([`NodeBuilder::dht`](super::NodeBuilder::dht)): publishing puts the
//! node's addresses in a public table anyone may read, and on a LAN without internet the
//! DHT cannot be reached at all.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{RelayRef, MAX_ADDRS};
use pkarr::{
    dns::{rdata::RData, Name},
    Keypair, PublicKey, ResolvePolicy, SignedPacket, Timestamp,
};

use super::Inner;

/// The DNS name our TXT records live under.
const NAME: &str = "_p2p";
/// TTL written in our records, in seconds.
const RECORD_TTL: u32 = 3600;
/// Largest signed packet read from the DHT: public key, signature, timestamp and the
/// 1000-byte DNS packet BEP 44 allows.
pub const MAX_PACKET_BYTES: usize = 1104;
/// Records older than this are ignored (a node republishes well within it).
pub const MAX_RECORD_AGE: Duration = Duration::from_secs(2 * 3600);
/// How far a record's timestamp may be ahead of our clock.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// How the node uses the DHT. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct DhtConfig {
    /// DHT nodes to join through (`host:port`). Default `None`: the public Mainline
    /// DHT's usual bootstrap nodes. Tests give the nodes of a local testnet.
    pub bootstrap: Option<Vec<String>>,
    /// Local IPv4 address of the DHT socket (any port). Default `None`: all interfaces.
    pub bind: Option<Ipv4Addr>,
    /// Whether to publish this node's record. Default `true`; lookups work either way.
    pub publish: bool,
    /// How often the record is published again (DHT nodes drop items after about two
    /// hours). Default 30 min.
    pub republish: Duration,
    /// Longest wait for one lookup. Default 10 s.
    pub lookup_timeout: Duration,
}

impl Default for DhtConfig {
    fn default() -> Self {
        Self {
            bootstrap: None,
            bind: None,
            publish: true,
            republish: Duration::from_secs(30 * 60),
            lookup_timeout: Duration::from_secs(10),
        }
    }
}

/// A DHT operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DhtError {
    /// The operation needs the DHT and this node does not use it.
    #[error("this node does not use the DHT")]
    NotUsed,
    /// The DHT client cannot start (e.g. its socket cannot be bound).
    #[error("cannot start the DHT client: {0}")]
    Start(String),
    /// The record cannot be built (it would not fit in a DHT item).
    #[error("cannot build the DHT record: {0}")]
    Build(String),
    /// Publishing failed.
    #[error("cannot publish on the DHT: {0}")]
    Publish(String),
    /// No record was found, or the lookup timed out.
    #[error("no DHT record for the node: {0}")]
    NotFound(String),
    /// A record was found but does not verify or is out of date.
    #[error("invalid DHT record: {0}")]
    Invalid(String),
}

/// What a node's DHT record says, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhtRecord {
    /// Direct addresses.
    pub addrs: Vec<SocketAddr>,
    /// Home relay.
    pub relay: Option<RelayRef>,
    /// When the node signed it (ms since the Unix epoch).
    pub timestamp_ms: u64,
}

/// The node's DHT client.
pub(crate) struct Dht {
    client: pkarr::Client,
    keypair: Keypair,
    config: DhtConfig,
}

impl std::fmt::Debug for Dht {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dht")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Dht {
    /// A DHT client for `secret`'s node.
    pub(crate) fn start(secret: &SecretKey, config: DhtConfig) -> Result<Self, DhtError> {
        let mut builder = pkarr::Client::builder();
        builder.no_default_network();
        let (bootstrap, bind) = (config.bootstrap.clone(), config.bind);
        builder.dht(|c| {
            // Any free port: a client needs no well-known one.
            c.port = Some(0);
            c.bind_address = bind;
            c
        });
        if let Some(nodes) = &bootstrap {
            builder.bootstrap(nodes);
        }
        let client = builder
            .build()
            .map_err(|e| DhtError::Start(e.to_string()))?;
        let keypair = Keypair::from_secret_key(&secret.to_bytes());
        Ok(Self {
            client,
            keypair,
            config,
        })
    }

    pub(crate) fn config(&self) -> &DhtConfig {
        &self.config
    }

    /// Signs and publishes our record: as many of `addrs` as fit, and the relay.
    pub(crate) async fn publish(
        &self,
        addrs: &[SocketAddr],
        relay: Option<RelayRef>,
    ) -> Result<(), DhtError> {
        let packet = build_packet(&self.keypair, addrs, relay, p2p_discovery::now_ms())?;
        self.client
            .publish(&packet)
            .await
            .map_err(|e| DhtError::Publish(e.to_string()))?;
        Ok(())
    }

    /// The verified record of `node`.
    pub(crate) async fn lookup(&self, node: &NodeId) -> Result<DhtRecord, DhtError> {
        let key =
            PublicKey::try_from(node.as_bytes()).map_err(|e| DhtError::Invalid(e.to_string()))?;
        let resolved = tokio::time::timeout(
            self.config.lookup_timeout,
            self.client.resolve(&key, ResolvePolicy::NetworkOnly),
        )
        .await
        .map_err(|_| DhtError::NotFound("the lookup timed out".into()))?
        .map_err(|e| DhtError::NotFound(e.to_string()))?;
        verify(node, resolved.as_bytes(), p2p_discovery::now_ms())
    }
}

/// Our record as a packet signed at `at_ms`, dropping addresses from the end until it
/// fits.
pub(crate) fn build_packet(
    keypair: &Keypair,
    addrs: &[SocketAddr],
    relay: Option<RelayRef>,
    at_ms: u64,
) -> Result<SignedPacket, DhtError> {
    let name = |n: &'static str| Name::new(n).map_err(|e| DhtError::Build(e.to_string()));
    let mut entries: Vec<String> = vec!["v=1".into()];
    if let Some(r) = relay {
        entries.push(format!("relay={}@{}", r.node_id, r.addr));
    }
    let usable: Vec<&SocketAddr> = addrs
        .iter()
        .filter(|a| !a.ip().is_unspecified() && a.port() != 0)
        .take(MAX_ADDRS)
        .collect();
    for keep in (0..=usable.len()).rev() {
        let mut builder = SignedPacket::builder().timestamp(Timestamp::from(at_ms * 1000));
        let texts: Vec<String> = entries
            .iter()
            .cloned()
            .chain(usable[..keep].iter().map(|a| format!("addr={a}")))
            .collect();
        for t in &texts {
            let txt = t
                .as_str()
                .try_into()
                .map_err(|e: pkarr::dns::SimpleDnsError| DhtError::Build(e.to_string()))?;
            builder = builder.txt(name(NAME)?, txt, RECORD_TTL);
        }
        match builder.sign(keypair) {
            Ok(p) => return Ok(p),
            Err(pkarr::errors::SignedPacketBuildError::PacketTooLarge(_)) if keep > 0 => {}
            Err(e) => return Err(DhtError::Build(e.to_string())),
        }
    }
    Err(DhtError::Build("the record does not fit".into()))
}

/// Checks a signed packet read from the DHT for `node` at `now_ms` and reads our
/// record out of it.
pub(crate) fn verify(node: &NodeId, bytes: &[u8], now_ms: u64) -> Result<DhtRecord, DhtError> {
    if bytes.len() > MAX_PACKET_BYTES || bytes.len() < 104 {
        return Err(DhtError::Invalid(format!(
            "{} bytes, outside 104..={MAX_PACKET_BYTES}",
            bytes.len()
        )));
    }
    if bytes[..32] != node.as_bytes()[..] {
        return Err(DhtError::Invalid("signed by another key".into()));
    }
    let key = PublicKey::try_from(node.as_bytes()).map_err(|e| DhtError::Invalid(e.to_string()))?;
    // Verifies the signature over the timestamp and DNS packet with `node`'s key.
    let packet =
        SignedPacket::from_relay_payload(&key, &bytes::Bytes::copy_from_slice(&bytes[32..]))
            .map_err(|e| DhtError::Invalid(e.to_string()))?;
    let timestamp_ms = packet.timestamp().as_u64() / 1000;
    let age = Duration::from_millis(now_ms.saturating_sub(timestamp_ms));
    if age > MAX_RECORD_AGE {
        return Err(DhtError::Invalid(format!("{age:?} old")));
    }
    if timestamp_ms > now_ms.saturating_add(CLOCK_SKEW.as_millis() as u64) {
        return Err(DhtError::Invalid("from the future".into()));
    }
    let mut record = DhtRecord {
        addrs: Vec::new(),
        relay: None,
        timestamp_ms,
    };
    let mut versioned = false;
    for rr in packet.resource_records(NAME) {
        let RData::TXT(txt) = &rr.rdata else {
            continue;
        };
        let Ok(text) = String::try_from(txt.clone()) else {
            continue;
        };
        match text.split_once('=') {
            Some(("v", "1")) => versioned = true,
            Some(("addr", a)) if record.addrs.len() < MAX_ADDRS => {
                if let Ok(addr) = a.parse::<SocketAddr>() {
                    if !record.addrs.contains(&addr) {
                        record.addrs.push(addr);
                    }
                }
            }
            Some(("relay", r)) if record.relay.is_none() => {
                record.relay = r.split_once('@').and_then(|(id, addr)| {
                    Some(RelayRef {
                        node_id: id.parse().ok()?,
                        addr: addr.parse().ok()?,
                    })
                });
            }
            _ => {}
        }
    }
    if !versioned {
        return Err(DhtError::Invalid("not a p2p-node record".into()));
    }
    Ok(record)
}

/// Publishes our record at start, when the home relay or the address it sees us at
/// changes, and every [`DhtConfig::republish`]; retries with backoff after a failure.
pub(super) async fn publish_loop(inner: Arc<Inner>) {
    let Some(dht) = inner.dht.as_ref() else {
        return;
    };
    if !dht.config().publish {
        return;
    }
    let mut home = inner.endpoint.net().home();
    let mut failures = 0u32;
    // A relay link that is coming up is worth waiting a moment for.
    inner.relay_ready(Duration::from_secs(2)).await;
    loop {
        home.mark_unchanged();
        let relay = home.borrow().relay;
        let addrs = if inner.publish_addrs {
            super::presence::our_addrs(&inner)
        } else {
            Vec::new()
        };
        let wait = match dht.publish(&addrs, relay).await {
            Ok(()) => {
                failures = 0;
                tracing::debug!(
                    addrs = addrs.len(),
                    relay = relay.is_some(),
                    "published on the DHT"
                );
                dht.config().republish
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!(error = %e, "cannot publish on the DHT; retrying in the background");
                }
                inner.timings.backoff(failures)
            }
        };
        tokio::select! {
            _ = inner.cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            changed = home.changed() => if changed.is_err() { break },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_bytes(sk: &SecretKey, addrs: &[SocketAddr], relay: Option<RelayRef>) -> Vec<u8> {
        let kp = Keypair::from_secret_key(&sk.to_bytes());
        build_packet(&kp, addrs, relay, p2p_discovery::now_ms())
            .expect("build")
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn a_record_round_trips_and_is_bound_to_its_key() {
        let sk = SecretKey::generate();
        let relay = RelayRef {
            node_id: SecretKey::generate().public(),
            addr: "192.0.2.1:7117".parse().expect("addr"),
        };
        let addrs: Vec<SocketAddr> = vec![
            "0.0.0.0:4000".parse().expect("a"),
            "198.51.100.4:4000".parse().expect("b"),
            "[2001:db8::1]:4000".parse().expect("c"),
        ];
        let bytes = record_bytes(&sk, &addrs, Some(relay));
        let now = p2p_discovery::now_ms();
        let rec = verify(&sk.public(), &bytes, now).expect("verifies");
        assert_eq!(
            rec.addrs,
            addrs[1..].to_vec(),
            "unspecified addresses are left out"
        );
        assert_eq!(rec.relay, Some(relay));
        // Another key's NodeId, a flipped byte, too old, too big: refused.
        let other = SecretKey::generate().public();
        assert!(verify(&other, &bytes, now).is_err());
        let mut tampered = bytes.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(verify(&sk.public(), &tampered, now).is_err());
        let later = now + MAX_RECORD_AGE.as_millis() as u64 + 60_000;
        assert!(verify(&sk.public(), &bytes, later).is_err());
        assert!(verify(&sk.public(), &vec![0; MAX_PACKET_BYTES + 1], now).is_err());
        assert!(verify(&sk.public(), &bytes[..50], now).is_err());
    }

    #[test]
    fn the_most_addresses_fit() {
        let sk = SecretKey::generate();
        let addrs: Vec<SocketAddr> = (0..40u16)
            .map(|i| {
                SocketAddr::new(
                    std::net::Ipv6Addr::new(0x2001, 0xdb8, i, i, i, i, i, i).into(),
                    40000 + i,
                )
            })
            .collect();
        let bytes = record_bytes(&sk, &addrs, None);
        assert!(bytes.len() <= MAX_PACKET_BYTES);
        let rec = verify(&sk.public(), &bytes, p2p_discovery::now_ms()).expect("verifies");
        assert!(!rec.addrs.is_empty() && rec.addrs.len() <= MAX_ADDRS);
        assert_eq!(rec.addrs[..], addrs[..rec.addrs.len()]);
    }
}
