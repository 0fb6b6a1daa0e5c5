//! JSON bodies of the HTTP API, shared by the server and the client.
//!
//! Signed records travel as [`SignedWire`](crate::SignedWire) (`record` + `signature`). Responses also
//! carry a `decoded` copy of each record for people and tools reading the JSON; the
//! client ignores it and decodes the signed bytes itself.

use std::net::IpAddr;

use p2p_crypto::{NodeId, Signature};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::record::{NameClaim, PresenceRecord};

/// Header carrying the request timestamp (milliseconds since the Unix epoch) of a
/// signed mailbox request.
pub const HEADER_TIMESTAMP: &str = "x-p2p-timestamp";
/// Header carrying the base32 signature of a signed mailbox request.
pub const HEADER_SIGNATURE: &str = "x-p2p-signature";

/// Header on every response of a server whose presence records live in its memory: a
/// random number drawn when the server started (decimal). When it changes, the server
/// restarted and forgot every presence record, and a node announces itself again at
/// once instead of at its next scheduled renewal. Absent when presence is kept in a
/// database across restarts (PostgreSQL).
pub const HEADER_PRESENCE_EPOCH: &str = "x-p2p-presence-epoch";

/// A stored name claim, as returned by the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimEntry {
    pub record: String,
    pub signature: Signature,
    /// Unverified convenience copy of the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoded: Option<NameClaim>,
}

/// A live presence record, as returned by the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub record: String,
    pub signature: Signature,
    /// Source IP the server saw the announce come from; only present when the record
    /// announces an unspecified address. Not signed: a hint, see [`crate::PeerInfo`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_ip: Option<IpAddr>,
    /// Seconds until the record expires unless renewed.
    #[serde(default)]
    pub expires_in_secs: u64,
    /// Unverified convenience copy of the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoded: Option<PresenceRecord>,
}

/// Everything the server knows about one node: its name claim (if any) and its live
/// presence (if online). Body of the lookups and item of the online list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerEntry {
    pub node_id: NodeId,
    #[serde(default)]
    pub claim: Option<ClaimEntry>,
    #[serde(default)]
    pub presence: Option<PresenceEntry>,
}

/// Response to `POST /v1/names`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimResponse {
    /// `true` when the claim was stored or updated, `false` when it was already there.
    pub changed: bool,
    pub claim: ClaimEntry,
}

/// Response to `POST /v1/presence`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnnounceResponse {
    /// Re-announce after this many seconds (below the TTL, with jitter).
    pub reannounce_after_secs: u64,
    /// The source IP the server saw.
    pub observed_ip: IpAddr,
}

/// Response to `GET /v1/relay`: the relay this discovery server runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayResponse {
    /// The relay's identity: the key its certificate presents.
    pub node_id: NodeId,
    /// Its UDP port, on the same host as this HTTP server (unless `addr` says where).
    pub port: u16,
    /// Where nodes reach it, when the server advertises an address of its own (an
    /// instance behind an HTTP load balancer); absent: this server's host at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<std::net::SocketAddr>,
}

/// Response to `POST /v1/presence/withdraw`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WithdrawResponse {
    /// Whether a live presence record was removed.
    pub withdrawn: bool,
}

/// Response to `GET /v1/presence`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OnlineResponse {
    pub peers: Vec<PeerEntry>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// Body of `POST /v1/mailbox/{node_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DepositRequest {
    /// The sealed envelope, base64url without padding.
    pub envelope: String,
}

/// Response to a deposit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DepositResponse {
    pub id: u64,
}

/// One stored envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailboxItemWire {
    pub id: u64,
    /// base64url without padding.
    pub envelope: String,
}

/// Response to `GET /v1/mailbox/{node_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailboxResponse {
    pub items: Vec<MailboxItemWire>,
    /// More envelopes wait beyond this batch (delete these, then fetch again).
    pub more: bool,
}

/// Body of `POST /v1/mailbox/{node_id}/delete`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteRequest {
    pub ids: Vec<u64>,
}

/// Response to a delete.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteResponse {
    pub deleted: u64,
}

/// Every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable code (see [`crate::ErrorCode`]).
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
}

/// The bytes a signed mailbox request signs (under `Domain::Request`): the postcard
/// encoding of `(method, path_and_query, sha256(body), timestamp_ms)`.
pub fn request_signing_bytes(method: &str, path_and_query: &str, body: &[u8], ts: u64) -> Vec<u8> {
    let digest: [u8; 32] = Sha256::digest(body).into();
    // Encoding a tuple of strings and integers into a Vec cannot fail.
    postcard::to_stdvec(&(method, path_and_query, digest, ts)).unwrap_or_default()
}
