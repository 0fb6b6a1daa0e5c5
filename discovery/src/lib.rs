//! Discovery for p2p-node: signed records, the embeddable axum server and its
//! verifying client.
//!
//! # Protocol
//!
//! Every record a node publishes is a postcard-encoded struct signed with the node's
//! ed25519 key under a per-kind domain tag ([`p2p_crypto::Domain`]). On the wire (JSON)
//! a record is `{"record": "<base64url of the postcard bytes>", "signature":
//! "<base32>"}`; responses add an unverified `decoded` copy for readability. The
//! server verifies every record before keeping it, and the [`Client`] verifies every
//! record it receives, so neither a server nor a LAN peer running one can forge or
//! alter what a node published.
//!
//! | Record | Domain | Holds | Kept |
//! |---|---|---|---|
//! | [`NameClaim`] | `NameClaim` | name, NodeId, mailbox key, timestamp | the store, forever |
//! | [`PresenceRecord`] | `PeerRecord` | NodeId, name, ≤16 addrs, mailbox key, timestamp, TTL | the store, until TTL |
//! | [`Withdrawal`] | `Withdraw` | NodeId, timestamp | the store (tombstone) |
//!
//! The store ([`Store`]) is redb with presence in memory ([`RedbStore`], one instance),
//! memory ([`MemoryStore`]), or PostgreSQL ([`PgStore`]), where any number of server
//! instances on one database serve the same users at once.
//!
//! **Ordering.** Timestamps are milliseconds since the Unix epoch and strictly
//! increase per node: the server keeps a record only if it is newer than the last one
//! from that node (equal or older is `stale_record`), refuses records stamped more than
//! the time window (60 s) ahead of its clock (`timestamp_out_of_window`), and refuses
//! presence that has already expired. After a withdrawal or expiry a tombstone
//! remembers the last timestamp for longer than any TTL, so captured records cannot
//! be replayed to log a node back in or out.
//!
//! **Names** are 1–32 characters of `[a-z0-9_-]`, first come first served, one per
//! node: another key gets `409 name_taken`; an identical re-claim is a no-op; a newer
//! claim by the same key updates the mailbox key or renames the node (freeing the old
//! name). A presence record may carry only a name its key has claimed.
//!
//! **Observed address.** A node may announce an unspecified IP (`0.0.0.0:PORT`,
//! `[::]:PORT`) meaning "where you see me". The server never modifies a signed record;
//! it returns the announce's source IP beside it as an unsigned `observed_ip`, and
//! [`PeerInfo::addrs`] substitutes it (keeping the signed port). See [`PeerInfo`].
//!
//! **Presence** expires `ttl_secs` after `min(timestamp, now)`; the announce response
//! says when to re-announce (`reannounce_after_secs`, randomly between 1/2 and 3/4 of
//! the TTL, so clients do not synchronise).
//!
//! **Mailbox.** Anyone may deposit a sealed envelope (≤ 64 KiB) for a node the server
//! knows (a claim or live presence); each recipient holds at most 1000 (`429
//! mailbox_full`, nothing stored is dropped). Fetch and delete are signed by the
//! recipient under `Domain::Request` over `(method, path_and_query, sha256(body),
//! timestamp_ms)` ([`api::request_signing_bytes`]), sent in the `x-p2p-timestamp` and
//! `x-p2p-signature` headers; the timestamp must be within ±60 s of the server's
//! clock and a signature is accepted once (replays are `401 replayed_request`). The
//! recipient persists what it fetched, then deletes by id.
//!
//! **Errors** are `{"error": "<code>", "message": "..."}`, codes in [`ErrorCode`]. A store
//! that cannot be reached is `503 store_unavailable` with `Retry-After`.
//! Writes (POST) are rate limited per client IP by a token bucket (`429 rate_limited`
//! with `Retry-After`). The full API is described in `discovery/openapi.json`.
//!
//! # Use
//!
//! - Server: [`AppState::open`] with a [`ServerConfig`] (or [`AppState::new`] with a
//!   store from [`open_store`]), then [`serve`] on a listener
//!   with a shutdown future (runs on the caller's runtime, so a node can embed it), or
//!   [`router`] for tests.
//! - Client: [`Client::new`] with the server's URL.

pub mod api;
mod client;
mod clock;
mod error;
pub mod handover;
mod listen;
mod presence;
pub mod ratelimit;
mod record;
pub mod relay;
mod server;
mod store;

pub use client::{
    resolve_addrs, verify_entry, verify_entry_at, AnnounceOutcome, Announcement, Client,
    ClientError, MailboxBatch, MailboxItem, PeerInfo, CLOCK_SKEW, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT, MAX_PAGES, MAX_RESPONSE_BYTES,
};
pub use clock::{now_ms, Clock, ManualClock, SystemClock};
pub use error::{AppError, ErrorCode, STORE_RETRY_AFTER};
pub use listen::{connection_cap, nofile_limit, raise_nofile_limit};
pub use record::{
    validate_name, NameClaim, PresenceRecord, Record, RecordError, RelayRef, Signed, SignedWire,
    Withdrawal, MAX_ADDRS, MAX_NAME_LEN, MAX_RECORD_BYTES, MAX_TTL_SECS, MIN_TTL_SECS,
};
pub use server::{paths, router, serve, AppState, ServerConfig, ServerError, ROUTES};
pub use store::{
    describe_url, is_postgres_url, open_store, Announced, ClaimOutcome, DepositOutcome, Fetched,
    LivePresence, LocalStore, MemoryStore, OnlinePage, PeerState, PgOptions, PgStore, RedbStore,
    RequestSeen, Store, StoreError, StoreStats, StoredEnvelope, Withdrawn,
};
