//! The typed async client. It trusts nothing the server says: every record is decoded
//! from its signed bytes and verified against the key of the node it names.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use p2p_crypto::{Domain, MailboxPublicKey, NodeId, SecretKey, Signature};
use reqwest::{header, Method, StatusCode, Url};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    api::{
        request_signing_bytes, AnnounceResponse, ClaimEntry, ClaimResponse, DeleteRequest,
        DeleteResponse, DepositRequest, DepositResponse, ErrorBody, MailboxResponse,
        OnlineResponse, PeerEntry, PresenceEntry, RelayResponse, WithdrawResponse,
        HEADER_PRESENCE_EPOCH, HEADER_SIGNATURE, HEADER_TIMESTAMP,
    },
    clock,
    record::{
        b64_decode, b64_encode, validate_name, NameClaim, PresenceRecord, RecordError, RelayRef,
        Signed, SignedWire, VerifiedSignatures, Withdrawal,
    },
};

/// A lookup's body as this client reads it: a [`PeerEntry`] without its `decoded`
/// copies, the server's unverified convenience for other clients, which this one (it
/// decodes the signed bytes) skips unparsed.
#[derive(Deserialize)]
struct LookupBody {
    node_id: NodeId,
    #[serde(default)]
    claim: Option<SignedWire>,
    #[serde(default)]
    presence: Option<LookupPresence>,
}

#[derive(Deserialize)]
struct LookupPresence {
    record: String,
    signature: Signature,
    #[serde(default)]
    observed_ip: Option<IpAddr>,
    #[serde(default)]
    expires_in_secs: u64,
}

impl From<LookupBody> for PeerEntry {
    fn from(body: LookupBody) -> Self {
        PeerEntry {
            node_id: body.node_id,
            claim: body.claim.map(|c| ClaimEntry {
                record: c.record,
                signature: c.signature,
                decoded: None,
            }),
            presence: body.presence.map(|p| PresenceEntry {
                record: p.record,
                signature: p.signature,
                observed_ip: p.observed_ip,
                expires_in_secs: p.expires_in_secs,
                decoded: None,
            }),
        }
    }
}

/// Default timeout of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response body the client reads.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Most pages [`Client::online`] follows.
pub const MAX_PAGES: usize = 200;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("invalid discovery URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The server cannot be connected to; holds the innermost reason (e.g.
    /// "Connection refused (os error 111)").
    #[error("cannot connect: {0}")]
    Unreachable(String),
    #[error("discovery request timed out")]
    Timeout,
    #[error("HTTP error talking to the discovery server: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("the name is taken by another key")]
    NameTaken,
    #[error("not found")]
    NotFound,
    #[error("announce names a name this key has not claimed (claim it first)")]
    NameNotClaimed,
    #[error("rate limited by the discovery server (retry after {retry_after:?})")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the recipient's mailbox is full")]
    MailboxFull,
    /// The server is up but its database is not: nothing was changed; retry later.
    #[error("the discovery server's database is unavailable (retry after {retry_after:?})")]
    Unavailable { retry_after: Option<Duration> },
    #[error("discovery server error {status}: {code}: {message}")]
    Server {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the server returned an invalid record: {0}")]
    InvalidRecord(#[source] RecordError),
    #[error("the server returned an invalid response: {0}")]
    InvalidResponse(String),
    #[error("the server's response exceeds {max} bytes")]
    ResponseTooLarge { max: usize },
    #[error("cannot build the request: {0}")]
    InvalidRequest(#[source] RecordError),
}

fn map_reqwest(e: reqwest::Error) -> ClientError {
    if e.is_timeout() {
        ClientError::Timeout
    } else if e.is_connect() {
        let mut root: &dyn std::error::Error = &e;
        while let Some(next) = root.source() {
            root = next;
        }
        ClientError::Unreachable(root.to_string())
    } else {
        ClientError::Transport(e)
    }
}

/// Outcome of an announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceOutcome {
    /// When to announce again (the server picks it below the TTL, with jitter).
    pub reannounce_after: Duration,
    /// The source IP the server saw this node at.
    pub observed_ip: IpAddr,
}

/// What a node announces about itself (see [`Client::announce_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// A name this key has claimed, if any.
    pub name: Option<String>,
    /// Direct addresses (an unspecified IP means "the IP you see me at").
    pub addrs: Vec<SocketAddr>,
    /// The home relay.
    pub relay: Option<RelayRef>,
    /// How long the record stays live (10 s to 1 h).
    pub ttl: Duration,
}

/// One envelope waiting in this node's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxItem {
    /// Server-assigned id: pass it to [`Client::delete_mailbox`] once persisted.
    pub id: u64,
    /// The sealed envelope (open with `p2p_crypto::seal::open`).
    pub envelope: Vec<u8>,
}

/// A batch fetched from the mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailboxBatch {
    pub items: Vec<MailboxItem>,
    /// More envelopes wait: delete these, then fetch again.
    pub more: bool,
}

/// A peer as verified by the client.
///
/// Everything but `addrs` and `observed_ip` comes from records whose signatures the
/// client checked against `node_id`. **Observed address:** a node behind NAT or
/// unsure of its own IP announces an unspecified IP (`0.0.0.0:PORT` or `[::]:PORT`); the
/// server cannot change the signed record, so it returns the source IP it saw as an
/// unsigned `observed_ip` hint, and `addrs` substitutes that IP into such entries
/// (keeping the signed port). A lying server can thus only misdirect a dial, never
/// impersonate: the QUIC handshake authenticates the NodeId.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_id: NodeId,
    /// The claimed name (from the verified claim; else the name in the signed presence).
    pub name: Option<String>,
    /// x25519 key to seal mailbox envelopes to (from the newest verified record).
    pub mailbox_key: MailboxPublicKey,
    /// Whether a live presence record was returned.
    pub online: bool,
    /// Addresses to dial, resolved as described above; empty when offline.
    pub addrs: Vec<SocketAddr>,
    /// Addresses exactly as signed in the presence record.
    pub announced_addrs: Vec<SocketAddr>,
    /// The server's unsigned observed-IP hint, if it gave one.
    pub observed_ip: Option<IpAddr>,
    /// The home relay named in the signed presence record (none when offline).
    pub relay: Option<RelayRef>,
    /// Timestamp of the newest verified record.
    pub timestamp_ms: u64,
}

/// Substitutes the observed IP into unspecified addresses; drops those it cannot fill.
pub fn resolve_addrs(announced: &[SocketAddr], observed_ip: Option<IpAddr>) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(announced.len());
    for addr in announced {
        let resolved = if addr.ip().is_unspecified() {
            match observed_ip.filter(|ip| !ip.is_unspecified()) {
                Some(ip) => SocketAddr::new(ip, addr.port()),
                None => continue,
            }
        } else {
            *addr
        };
        if !out.contains(&resolved) {
            out.push(resolved);
        }
    }
    out
}

/// How far a presence record's clock may be off ours before the client refuses it as
/// expired or from the future (the server allows the same).
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Verifies one entry from the server. `expect_node` / `expect_name` are what was asked.
/// See [`verify_entry_at`]; this one uses the system clock.
pub fn verify_entry(
    entry: &PeerEntry,
    expect_node: Option<&NodeId>,
    expect_name: Option<&str>,
) -> Result<PeerInfo, RecordError> {
    verify_entry_at(entry, expect_node, expect_name, clock::now_ms())
}

/// Verifies one entry from the server at time `now_ms`: every record's signature, that
/// it is for the node (and name) asked about, and that its presence is live. A presence
/// record that expired (a server replaying an old login) or is stamped in the future,
/// by more than [`CLOCK_SKEW`], is dropped with a warning: the node counts as offline.
pub fn verify_entry_at(
    entry: &PeerEntry,
    expect_node: Option<&NodeId>,
    expect_name: Option<&str>,
    now_ms: u64,
) -> Result<PeerInfo, RecordError> {
    verify_entry_seen(entry, expect_node, expect_name, now_ms, None)
}

/// A signed record from its wire form: verified, or known verified to `seen`.
fn from_wire<R: crate::record::Record>(
    wire: &SignedWire,
    seen: Option<&VerifiedSignatures>,
) -> Result<Signed<R>, RecordError> {
    match seen {
        Some(seen) => Signed::from_wire_seen(wire, seen),
        None => Signed::from_wire(wire),
    }
}

/// [`verify_entry_at`], with the signatures `seen` verified before taken as verified.
fn verify_entry_seen(
    entry: &PeerEntry,
    expect_node: Option<&NodeId>,
    expect_name: Option<&str>,
    now_ms: u64,
    seen: Option<&VerifiedSignatures>,
) -> Result<PeerInfo, RecordError> {
    let node = entry.node_id;
    if let Some(expected) = expect_node.filter(|e| **e != node) {
        return Err(RecordError::NodeMismatch {
            expected: *expected,
            got: node,
        });
    }
    let claim = match &entry.claim {
        Some(c) => {
            let signed = from_wire::<NameClaim>(
                &SignedWire {
                    record: c.record.clone(),
                    signature: c.signature,
                },
                seen,
            )?;
            if signed.record().node_id != node {
                return Err(RecordError::NodeMismatch {
                    expected: node,
                    got: signed.record().node_id,
                });
            }
            Some(signed.record().clone())
        }
        None => None,
    };
    let presence = match &entry.presence {
        Some(p) => {
            let signed = from_wire::<PresenceRecord>(
                &SignedWire {
                    record: p.record.clone(),
                    signature: p.signature,
                },
                seen,
            )?;
            if signed.record().node_id != node {
                return Err(RecordError::NodeMismatch {
                    expected: node,
                    got: signed.record().node_id,
                });
            }
            let record = signed.record();
            let skew = u64::try_from(CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX);
            let expires = record
                .timestamp_ms
                .saturating_add(u64::from(record.ttl_secs).saturating_mul(1000));
            if expires.saturating_add(skew) < now_ms {
                tracing::warn!(%node, timestamp_ms = record.timestamp_ms, "discovery returned an expired presence record; ignoring it");
                None
            } else if record.timestamp_ms > now_ms.saturating_add(skew) {
                tracing::warn!(%node, timestamp_ms = record.timestamp_ms, "discovery returned a presence record from the future; ignoring it");
                None
            } else {
                Some((record.clone(), p.observed_ip))
            }
        }
        None => None,
    };
    if let Some(expected) = expect_name {
        match &claim {
            Some(c) if c.name == expected => {}
            Some(c) => {
                return Err(RecordError::NameMismatch {
                    expected: expected.to_owned(),
                    got: c.name.clone(),
                })
            }
            None => return Err(RecordError::Missing("name claim")),
        }
    }
    let (name, mailbox_key, timestamp_ms) = match (&claim, &presence) {
        (Some(c), Some((p, _))) => {
            let key = if p.timestamp_ms >= c.timestamp_ms {
                p.mailbox_key
            } else {
                c.mailbox_key
            };
            (
                Some(c.name.clone()),
                key,
                p.timestamp_ms.max(c.timestamp_ms),
            )
        }
        (Some(c), None) => (Some(c.name.clone()), c.mailbox_key, c.timestamp_ms),
        (None, Some((p, _))) => (p.name.clone(), p.mailbox_key, p.timestamp_ms),
        (None, None) => return Err(RecordError::Missing("name claim or presence")),
    };
    let (announced_addrs, observed_ip, relay) = presence
        .as_ref()
        .map(|(p, ip)| (p.addrs.clone(), *ip, p.relay))
        .unwrap_or_default();
    Ok(PeerInfo {
        node_id: node,
        name,
        mailbox_key,
        online: presence.is_some(),
        addrs: resolve_addrs(&announced_addrs, observed_ip),
        announced_addrs,
        observed_ip,
        relay,
        timestamp_ms,
    })
}

/// A millisecond timestamp for a record or request signed by `node`, strictly greater
/// than the last one this process made for that node, so two made in the same
/// millisecond are still ordered (and never sign the same bytes twice).
///
/// Per node, not per process: a process signing for many nodes at a high rate (a
/// bench, a tool) would otherwise run its one counter ahead of the clock until servers
/// refuse its timestamps as being in the future.
fn next_timestamp(node: &NodeId) -> u64 {
    next_timestamp_at(node, clock::now_ms())
}

/// Nodes whose last timestamp is remembered before the ones in the past are dropped.
const REMEMBERED_NODES: usize = 1024;

fn next_timestamp_at(node: &NodeId, now: u64) -> u64 {
    static LAST: Mutex<BTreeMap<[u8; 32], u64>> = Mutex::new(BTreeMap::new());
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.len() >= REMEMBERED_NODES {
        // A node whose last timestamp is in the past gets `now` anyway: forgetting it
        // changes nothing.
        last.retain(|_, ts| *ts >= now);
    }
    let slot = last.entry(*node.as_bytes()).or_insert(0);
    let ts = now.max(*slot + 1);
    *slot = ts;
    ts
}

/// Client of one discovery server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    epoch: Arc<PresenceEpoch>,
    /// The record signatures this client (and its clones) verified: a lookup whose
    /// answer did not change is not verified again.
    verified: Arc<VerifiedSignatures>,
}

/// The server's presence epoch as last seen, and how often it changed.
#[derive(Debug)]
struct PresenceEpoch {
    last: Mutex<Option<u64>>,
    resets: tokio::sync::watch::Sender<u64>,
}

impl PresenceEpoch {
    fn new() -> Self {
        Self {
            last: Mutex::new(None),
            resets: tokio::sync::watch::channel(0).0,
        }
    }

    /// Notes the epoch of a response; counts a change from one seen before.
    fn observe(&self, epoch: u64) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let changed = last.is_some_and(|l| l != epoch);
        *last = Some(epoch);
        drop(last);
        if changed {
            tracing::info!("the discovery server restarted and forgot who is online");
            self.resets.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

impl Client {
    /// A client for the server at `base_url` (e.g. `http://192.168.1.20:7117`), with
    /// [`DEFAULT_TIMEOUT`]. Only plain `http` URLs without query or fragment are accepted.
    /// System proxies are ignored: discovery servers are usually on the LAN.
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        Self::with_timeout(base_url, DEFAULT_TIMEOUT)
    }

    /// Like [`Client::new`] with a request timeout.
    pub fn with_timeout(base_url: &str, timeout: Duration) -> Result<Self, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let mut base = Url::parse(base_url).map_err(|e| invalid(&e.to_string()))?;
        if base.scheme() != "http" {
            return Err(invalid("only http:// URLs are supported"));
        }
        if base.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no host"));
        }
        if base.query().is_some() || base.fragment().is_some() || !base.username().is_empty() {
            return Err(invalid("no query, fragment or credentials allowed"));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT.min(timeout))
            .no_proxy()
            .build()
            .map_err(ClientError::Transport)?;
        Ok(Self {
            http,
            base,
            epoch: Arc::new(PresenceEpoch::new()),
            verified: Arc::default(),
        })
    }

    /// [`verify_entry`], with the signatures this client verified before taken as
    /// verified.
    fn verify(
        &self,
        entry: &PeerEntry,
        expect_node: Option<&NodeId>,
        expect_name: Option<&str>,
    ) -> Result<PeerInfo, RecordError> {
        verify_entry_seen(
            entry,
            expect_node,
            expect_name,
            clock::now_ms(),
            Some(&self.verified),
        )
    }

    /// Counts the restarts of the server this client has seen: a server that keeps
    /// presence in memory sends [`HEADER_PRESENCE_EPOCH`] on every response, and a new
    /// value means it forgot every presence record, ours included. Changes (by one per
    /// restart seen) as soon as a response shows it.
    pub fn presence_resets(&self) -> tokio::sync::watch::Receiver<u64> {
        self.epoch.resets.subscribe()
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// The URL of `path` (an API path, optionally with a query) under the base URL.
    /// Only the path and query are parsed: the base, checked once, is cloned.
    fn url(&self, path: &str) -> Url {
        let (path, query) = path
            .split_once('?')
            .map_or((path, None), |(p, q)| (p, Some(q)));
        let mut url = self.base.clone();
        url.set_path(&format!(
            "{}{}",
            self.base.path(),
            path.trim_start_matches('/')
        ));
        url.set_query(query);
        url
    }

    /// Sends a request and decodes a JSON success body, mapping error bodies to
    /// [`ClientError`].
    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = req.send().await.map_err(map_reqwest)?;
        if let Some(epoch) = resp
            .headers()
            .get(HEADER_PRESENCE_EPOCH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            self.epoch.observe(epoch);
        }
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = read_body(resp, MAX_RESPONSE_BYTES).await?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| ClientError::InvalidResponse(e.to_string()));
        }
        let err: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        let (code, message) = err.map_or_else(
            || {
                (
                    String::new(),
                    String::from_utf8_lossy(&body).chars().take(200).collect(),
                )
            },
            |e| (e.error, e.message),
        );
        Err(match code.as_str() {
            "name_taken" => ClientError::NameTaken,
            "not_found" => ClientError::NotFound,
            "name_not_claimed" => ClientError::NameNotClaimed,
            "mailbox_full" => ClientError::MailboxFull,
            "store_unavailable" => ClientError::Unavailable { retry_after },
            _ if status == StatusCode::TOO_MANY_REQUESTS => {
                ClientError::RateLimited { retry_after }
            }
            _ => ClientError::Server {
                status: status.as_u16(),
                code,
                message,
            },
        })
    }

    async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    /// The relay this server runs beside it, if any: its identity and UDP port (on the
    /// server's host).
    pub async fn relay(&self) -> Result<Option<RelayResponse>, ClientError> {
        match self.send(self.http.get(self.url("/v1/relay"))).await {
            Ok(r) => Ok(Some(r)),
            Err(ClientError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The relay this server runs, at the address the server advertises for it, else at
    /// this server's host (resolved if the URL names a host): what a node connects to
    /// and names as its home relay.
    pub async fn relay_ref(&self) -> Result<Option<RelayRef>, ClientError> {
        let Some(info) = self.relay().await? else {
            return Ok(None);
        };
        if let Some(addr) = info.addr {
            return Ok(Some(RelayRef {
                node_id: info.node_id,
                addr,
            }));
        }
        let host = self.base.host_str().unwrap_or_default();
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>();
        let ip = match literal {
            Ok(ip) => ip,
            Err(_) if !host.is_empty() => {
                let found: Vec<SocketAddr> = tokio::net::lookup_host((host, info.port))
                    .await
                    .map_err(|e| ClientError::Unreachable(format!("cannot resolve {host}: {e}")))?
                    .collect();
                found
                    .iter()
                    .find(|a| a.is_ipv4())
                    .or(found.first())
                    .map(SocketAddr::ip)
                    .ok_or_else(|| ClientError::Unreachable(format!("{host} has no address")))?
            }
            Err(_) => {
                return Err(ClientError::InvalidUrl {
                    url: self.base.to_string(),
                    reason: "no host".into(),
                })
            }
        };
        Ok(Some(RelayRef {
            node_id: info.node_id,
            addr: SocketAddr::new(ip, info.port),
        }))
    }

    /// Checks that the server answers `/healthz`.
    pub async fn health(&self) -> Result<(), ClientError> {
        let _: serde_json::Value = self.send(self.http.get(self.url("/healthz"))).await?;
        Ok(())
    }

    /// Claims `name` for this key (register). Returns whether the server changed
    /// anything (`false` for an identical re-claim).
    /// Errors: [`ClientError::NameTaken`] if another key holds it.
    pub async fn claim_name(&self, secret: &SecretKey, name: &str) -> Result<bool, ClientError> {
        validate_name(name).map_err(ClientError::InvalidRequest)?;
        let claim = Signed::sign(
            secret,
            NameClaim {
                name: name.to_owned(),
                node_id: secret.public(),
                mailbox_key: secret.mailbox_secret().public(),
                timestamp_ms: next_timestamp(&secret.public()),
            },
        )
        .map_err(ClientError::InvalidRequest)?;
        self.publish_claim(&claim).await
    }

    /// Publishes a claim signed earlier, by this key or another (a server handing its
    /// names over to another one). Returns whether the server changed anything.
    /// Errors: [`ClientError::NameTaken`] if another key holds the name there.
    pub async fn publish_claim(&self, claim: &Signed<NameClaim>) -> Result<bool, ClientError> {
        let resp: ClaimResponse = self.post_json("/v1/names", &claim.to_wire()).await?;
        Ok(resp.changed)
    }

    /// Announces this node online at `addrs` for `ttl` (login / renew; `ttl` must be
    /// 10 s to 1 h). Use an unspecified IP (`0.0.0.0:PORT`) to let peers use the IP the
    /// server sees. A `name` must have been claimed with [`Client::claim_name`] first
    /// ([`ClientError::NameNotClaimed`] otherwise).
    pub async fn announce(
        &self,
        secret: &SecretKey,
        name: Option<&str>,
        addrs: &[SocketAddr],
        ttl: Duration,
    ) -> Result<AnnounceOutcome, ClientError> {
        self.announce_with(
            secret,
            &Announcement {
                name: name.map(str::to_owned),
                addrs: addrs.to_vec(),
                relay: None,
                ttl,
            },
        )
        .await
    }

    /// Announces like [`Client::announce`], with everything a presence record holds
    /// (the home relay too).
    pub async fn announce_with(
        &self,
        secret: &SecretKey,
        announcement: &Announcement,
    ) -> Result<AnnounceOutcome, ClientError> {
        let ttl_secs = u32::try_from(announcement.ttl.as_secs()).unwrap_or(u32::MAX);
        let record = Signed::sign(
            secret,
            PresenceRecord {
                node_id: secret.public(),
                name: announcement.name.clone(),
                addrs: announcement.addrs.clone(),
                mailbox_key: secret.mailbox_secret().public(),
                timestamp_ms: next_timestamp(&secret.public()),
                ttl_secs,
                relay: announcement.relay,
            },
        )
        .map_err(ClientError::InvalidRequest)?;
        let resp: AnnounceResponse = self.post_json("/v1/presence", &record.to_wire()).await?;
        let reannounce = resp
            .reannounce_after_secs
            .clamp(1, u64::from(ttl_secs.max(1)));
        Ok(AnnounceOutcome {
            reannounce_after: Duration::from_secs(reannounce),
            observed_ip: resp.observed_ip,
        })
    }

    /// Withdraws this node's presence (logout). Returns whether it was online.
    pub async fn withdraw(&self, secret: &SecretKey) -> Result<bool, ClientError> {
        let w = Signed::sign(
            secret,
            Withdrawal {
                node_id: secret.public(),
                timestamp_ms: next_timestamp(&secret.public()),
            },
        )
        .map_err(ClientError::InvalidRequest)?;
        let resp: WithdrawResponse = self
            .post_json("/v1/presence/withdraw", &w.to_wire())
            .await?;
        Ok(resp.withdrawn)
    }

    /// The whole online list, following pages (at most [`MAX_PAGES`]). Entries that do
    /// not verify are skipped with a warning.
    pub async fn online(&self) -> Result<Vec<PeerInfo>, ClientError> {
        let mut peers = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = self.url("/v1/presence");
            if let Some(c) = &cursor {
                url.query_pairs_mut().append_pair("cursor", c);
            }
            let page: OnlineResponse = self.send(self.http.get(url)).await?;
            for entry in &page.peers {
                if entry.presence.is_none() {
                    tracing::warn!(node = %entry.node_id, "online list entry without presence; skipped");
                    continue;
                }
                match self.verify(entry, None, None) {
                    Ok(info) if info.online => peers.push(info),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(node = %entry.node_id, error = %e, "invalid record in online list; skipped");
                    }
                }
            }
            match page.next_cursor {
                Some(next) if Some(&next) != cursor.as_ref() && !page.peers.is_empty() => {
                    cursor = Some(next);
                }
                Some(_) => {
                    return Err(ClientError::InvalidResponse(
                        "online list cursor does not advance".into(),
                    ))
                }
                None => return Ok(peers),
            }
        }
        tracing::warn!(pages = MAX_PAGES, "online list truncated");
        Ok(peers)
    }

    /// Looks a name up. `Ok(None)` if nobody claimed it; an error if the server's
    /// answer does not verify (e.g. a claim for another name, or signed by another key).
    pub async fn lookup_name(&self, name: &str) -> Result<Option<PeerInfo>, ClientError> {
        validate_name(name).map_err(ClientError::InvalidRequest)?;
        let url = self.url(&format!("/v1/names/{name}"));
        match self.send::<LookupBody>(self.http.get(url)).await {
            Ok(body) => self
                .verify(&body.into(), None, Some(name))
                .map(Some)
                .map_err(|e| {
                    tracing::warn!(name, error = %e, "discovery returned an invalid record");
                    ClientError::InvalidRecord(e)
                }),
            Err(ClientError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Looks a node up by id. `Ok(None)` if the server knows nothing of it.
    pub async fn lookup_id(&self, node: &NodeId) -> Result<Option<PeerInfo>, ClientError> {
        let url = self.url(&format!("/v1/peers/{node}"));
        match self.send::<LookupBody>(self.http.get(url)).await {
            Ok(body) => self
                .verify(&body.into(), Some(node), None)
                .map(Some)
                .map_err(|e| {
                    tracing::warn!(%node, error = %e, "discovery returned an invalid record");
                    ClientError::InvalidRecord(e)
                }),
            Err(ClientError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deposits a sealed envelope for `to`; returns its id. Errors:
    /// [`ClientError::NotFound`] (unknown recipient), [`ClientError::MailboxFull`].
    pub async fn deposit(&self, to: &NodeId, envelope: Vec<u8>) -> Result<u64, ClientError> {
        let body = DepositRequest {
            envelope: b64_encode(&envelope),
        };
        let resp: DepositResponse = self.post_json(&format!("/v1/mailbox/{to}"), &body).await?;
        Ok(resp.id)
    }

    /// Builds a request signed by `secret` over method, path, body hash and timestamp.
    fn signed_request(
        &self,
        secret: &SecretKey,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        let url = self.url(path);
        let path_and_query = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let ts = next_timestamp(&secret.public());
        let sig = secret.sign(
            Domain::Request,
            &request_signing_bytes(method.as_str(), &path_and_query, &body, ts),
        );
        let mut req = self
            .http
            .request(method, url)
            .header(HEADER_TIMESTAMP, ts.to_string())
            .header(HEADER_SIGNATURE, sig.to_string());
        if !body.is_empty() {
            req = req
                .header(header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        Ok(req)
    }

    /// Fetches a batch of this node's mailbox (oldest first). Delete the items by id
    /// once they are persisted; fetch again while `more` is set.
    pub async fn fetch_mailbox(&self, secret: &SecretKey) -> Result<MailboxBatch, ClientError> {
        let path = format!("/v1/mailbox/{}", secret.public());
        let req = self.signed_request(secret, Method::GET, &path, Vec::new())?;
        let resp: MailboxResponse = self.send(req).await?;
        let items = resp
            .items
            .into_iter()
            .map(|item| {
                b64_decode(&item.envelope)
                    .map(|envelope| MailboxItem {
                        id: item.id,
                        envelope,
                    })
                    .map_err(|e| ClientError::InvalidResponse(format!("envelope {}: {e}", item.id)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MailboxBatch {
            items,
            more: resp.more,
        })
    }

    /// Deletes envelopes from this node's mailbox; returns how many were deleted.
    pub async fn delete_mailbox(
        &self,
        secret: &SecretKey,
        ids: &[u64],
    ) -> Result<u64, ClientError> {
        let path = format!("/v1/mailbox/{}/delete", secret.public());
        let body = serde_json::to_vec(&DeleteRequest { ids: ids.to_vec() })
            .map_err(|e| ClientError::InvalidResponse(e.to_string()))?;
        let req = self.signed_request(secret, Method::POST, &path, body)?;
        let resp: DeleteResponse = self.send(req).await?;
        Ok(resp.deleted)
    }
}

/// Reads at most `max` bytes of body.
async fn read_body(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, ClientError> {
    if resp.content_length().is_some_and(|l| l > max as u64) {
        return Err(ClientError::ResponseTooLarge { max });
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(map_reqwest)? {
        if buf.len() + chunk.len() > max {
            return Err(ClientError::ResponseTooLarge { max });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_validation() {
        assert!(Client::new("http://127.0.0.1:7117").is_ok());
        assert!(Client::new("http://host/prefix").is_ok());
        for bad in [
            "",
            "127.0.0.1:7117",
            "ftp://x",
            "https://x",
            "http://x/?q=1",
            "http://u@x",
        ] {
            assert!(
                matches!(Client::new(bad), Err(ClientError::InvalidUrl { .. })),
                "{bad}"
            );
        }
        let c = Client::new("http://host/prefix").expect("client");
        assert_eq!(
            c.url("/v1/presence").as_str(),
            "http://host/prefix/v1/presence"
        );
        // The same URL as parsing the path against the base whole.
        for base in [
            "http://127.0.0.1:7117",
            "http://host/prefix/",
            "http://[::1]:9/a/b",
        ] {
            let c = Client::new(base).expect("client");
            for path in [
                "/v1/peers/abc",
                "/v1/names/bob-2",
                "/v1/presence?cursor=x&limit=5",
                "/v1/mailbox/k/delete",
                "/healthz",
            ] {
                let whole = c.base.join(path.trim_start_matches('/')).expect("join");
                assert_eq!(c.url(path), whole, "{base} {path}");
            }
        }
    }

    #[test]
    fn observed_ip_substitution() {
        let announced: Vec<SocketAddr> = vec![
            "0.0.0.0:4000".parse().expect("a"),
            "192.168.1.5:4000".parse().expect("b"),
            "[::]:4001".parse().expect("c"),
        ];
        let observed = Some(IpAddr::from([203, 0, 113, 7]));
        assert_eq!(
            resolve_addrs(&announced, observed),
            vec![
                "203.0.113.7:4000".parse::<SocketAddr>().expect("x"),
                "192.168.1.5:4000".parse().expect("y"),
                "203.0.113.7:4001".parse().expect("z"),
            ]
        );
        assert_eq!(
            resolve_addrs(&announced, None),
            vec!["192.168.1.5:4000".parse::<SocketAddr>().expect("y")]
        );
    }

    #[test]
    fn timestamps_increase_per_node_and_stay_with_the_clock() {
        let (a, b) = (
            SecretKey::generate().public(),
            SecretKey::generate().public(),
        );
        let first = next_timestamp(&a);
        assert!(next_timestamp(&a) > first);
        // Many records of many nodes in the same millisecond: each node's timestamps
        // increase, none runs ahead of the clock by more than its own count.
        let now = 5_000_000_000_000;
        let nodes: Vec<NodeId> = (0..3 * REMEMBERED_NODES)
            .map(|_| SecretKey::generate().public())
            .collect();
        for n in &nodes {
            assert_eq!(next_timestamp_at(n, now), now);
        }
        assert_eq!(next_timestamp_at(&b, now), now);
        assert_eq!(next_timestamp_at(&b, now), now + 1);
        assert_eq!(next_timestamp_at(&b, now), now + 2);
        assert_eq!(next_timestamp_at(&b, now + 10), now + 10);
        // Nodes forgotten for being in the past still get increasing timestamps.
        for n in &nodes {
            assert_eq!(next_timestamp_at(n, now + 20), now + 20);
        }
        assert_eq!(next_timestamp_at(&nodes[0], now + 20), now + 21);
    }
}
