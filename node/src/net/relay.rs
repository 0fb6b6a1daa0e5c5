//! Relay links: one QUIC connection per relay, from the node's own endpoint (so the
//! relay sees, and reports, the very UDP mapping peers must punch to), kept up with
//! backoff while the node runs.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use p2p_crypto::NodeId;
use p2p_discovery::{
    relay::proto::{Frame, ALPN},
    RelayRef,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{lock, Inbound, Outgoing, Shared, LINK_QUEUE};
use crate::endpoint::Endpoint;

/// First delay before reconnecting to a relay; doubles up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(250);
/// Longest delay between reconnects.
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Longest wait for a relay handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A link to a relay other than the home one ends after this long unused.
const OTHER_IDLE: Duration = Duration::from_secs(120);
/// Sender keys remembered per link (decoding a key is not free; packets repeat them).
const MAX_KNOWN_KEYS: usize = 4096;

/// Starts a link to `relay` unless one runs.
pub(super) fn start(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    relay: RelayRef,
    home: bool,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    let (id, token) = {
        let mut links = lock(&shared.links);
        if links.contains_key(&relay.node_id) {
            return;
        }
        let token = cancel.child_token();
        let id = NEXT_LINK.fetch_add(1, Ordering::Relaxed);
        links.insert(relay.node_id, (id, token.clone()));
        (id, token)
    };
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    shared
        .relays
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(relay.node_id, tx);
    let link = Link {
        shared: shared.clone(),
        relay,
        home,
        id,
    };
    tracker.spawn(link.run(endpoint.clone(), rx, token));
}

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// One running link.
struct Link {
    shared: Arc<Shared>,
    relay: RelayRef,
    home: bool,
    id: u64,
}

impl Drop for Link {
    /// Forgets the link (unless a newer one for the same relay replaced it).
    fn drop(&mut self) {
        let mut links = lock(&self.shared.links);
        if links
            .get(&self.relay.node_id)
            .is_some_and(|(id, _)| *id == self.id)
        {
            links.remove(&self.relay.node_id);
            self.shared
                .relays
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.relay.node_id);
        }
        drop(links);
        self.shared.paths().set_relay_up(self.relay.node_id, false);
    }
}

/// Stops the link to `relay`, if one runs.
pub(super) fn stop(shared: &Shared, relay: &NodeId) {
    if let Some((_, token)) = lock(&shared.links).remove(relay) {
        token.cancel();
    }
}

impl Link {
    /// Keeps the link up until cancelled (or, for a relay other than home, until unused
    /// for [`OTHER_IDLE`]).
    async fn run(
        self,
        endpoint: Endpoint,
        mut rx: mpsc::Receiver<Outgoing>,
        cancel: CancellationToken,
    ) {
        let (shared, relay, home) = (&self.shared, self.relay, self.home);
        let mut failures = 0u32;
        let last_used = Mutex::new(Instant::now());
        loop {
            let idle = !home && lock(&last_used).elapsed() >= OTHER_IDLE;
            if cancel.is_cancelled() || idle {
                break;
            }
            let connected = tokio::select! {
                _ = cancel.cancelled() => break,
                r = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    endpoint.connect_alpn(relay.addr, relay.node_id, ALPN),
                ) => r,
            };
            let conn = match connected {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    failures += 1;
                    log_failure(&relay, failures, &e.to_string());
                    backoff(failures, &cancel).await;
                    continue;
                }
                Err(_) => {
                    failures += 1;
                    log_failure(&relay, failures, "timed out");
                    backoff(failures, &cancel).await;
                    continue;
                }
            };
            let Some((send, recv)) = open_stream(&conn).await else {
                failures += 1;
                backoff(failures, &cancel).await;
                continue;
            };
            if failures > 0 || home {
                tracing::info!(relay = %relay.node_id.fingerprint(), addr = %relay.addr, "connected to the relay");
            }
            // Usable at once; a home link counts as connected once the relay said where
            // it sees us (its first frame).
            shared.paths().set_relay_up(relay.node_id, true);
            shared.wake.notify_one();
            let ended = tokio::select! {
                _ = cancel.cancelled() => None,
                r = read_frames(shared, relay, home, recv, &last_used) => Some(r),
                r = write_frames(&mut rx, send, &last_used, home) => Some(r),
            };
            shared.paths().set_relay_up(relay.node_id, false);
            if home {
                shared.home.send_modify(|h| {
                    h.connected = false;
                });
            }
            conn.quic().close(0u32.into(), b"");
            match ended {
                None => break,
                Some(reason) => {
                    tracing::info!(relay = %relay.node_id.fingerprint(), reason, "relay link lost; reconnecting");
                    failures = 1;
                    backoff(1, &cancel).await;
                }
            }
        }
    }
}

/// Opens the relay stream and sends its first bytes (the relay learns of a stream
/// from its first bytes).
async fn open_stream(conn: &crate::Connection) -> Option<(quinn::SendStream, quinn::RecvStream)> {
    let (mut send, recv) = conn.quic().open_bi().await.ok()?;
    let mut hello = BytesMut::new();
    Frame::PunchReport {
        attempts: 0,
        successes: 0,
    }
    .encode(&mut hello)
    .ok()?;
    send.write_all(&hello).await.ok()?;
    Some((send, recv))
}

fn log_failure(relay: &RelayRef, failures: u32, error: &str) {
    if failures == 1 {
        tracing::warn!(relay = %relay.node_id.fingerprint(), addr = %relay.addr, error, "cannot connect to the relay; retrying");
    } else {
        tracing::debug!(relay = %relay.node_id.fingerprint(), failures, error, "relay connect failed again");
    }
}

async fn backoff(failures: u32, cancel: &CancellationToken) {
    let shift = failures.saturating_sub(1).min(8);
    let delay = RECONNECT_MIN.saturating_mul(1 << shift).min(RECONNECT_MAX);
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// Reads the relay's frames until the link fails; returns why.
async fn read_frames(
    shared: &Shared,
    relay: RelayRef,
    home: bool,
    mut recv: quinn::RecvStream,
    last_used: &Mutex<Instant>,
) -> &'static str {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut known: HashMap<[u8; 32], NodeId> = HashMap::new();
    loop {
        let chunk = match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => return "the relay closed the stream",
            Err(_) => return "the relay connection failed",
        };
        buf.extend_from_slice(&chunk);
        loop {
            let frame = match Frame::decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return "the relay broke the protocol",
            };
            match frame {
                Frame::Recv { src, packet } => {
                    *lock(last_used) = Instant::now();
                    let node = match known.get(&src) {
                        Some(n) => *n,
                        None => {
                            let Ok(n) = NodeId::from_bytes(&src) else {
                                continue;
                            };
                            if known.len() >= MAX_KNOWN_KEYS {
                                known.clear();
                            }
                            known.insert(src, n);
                            n
                        }
                    };
                    let item = Inbound {
                        src: node,
                        relay,
                        packet,
                    };
                    if shared.inbound_tx.send(item).await.is_err() {
                        return "the node is shutting down";
                    }
                }
                Frame::Observed { addr } => {
                    if home {
                        tracing::debug!(%addr, "the relay sees us at this address");
                        shared.paths().set_reflexive(Some(addr));
                        shared.home.send_if_modified(|h| {
                            let changed = h.reflexive != Some(addr) || !h.connected;
                            h.reflexive = Some(addr);
                            h.connected = true;
                            changed
                        });
                    }
                }
                Frame::PeerGone { node } => {
                    if let Ok(node) = NodeId::from_bytes(&node) {
                        shared
                            .paths()
                            .peer_gone(node, relay.node_id, Instant::now());
                    }
                }
                // Only nodes send these; a relay that does is ignored.
                Frame::Send { .. } | Frame::PunchReport { .. } => {}
            }
        }
    }
}

/// Writes queued packets to the relay, several frames per write, until the link fails.
async fn write_frames(
    rx: &mut mpsc::Receiver<Outgoing>,
    mut send: quinn::SendStream,
    last_used: &Mutex<Instant>,
    home: bool,
) -> &'static str {
    let mut batch = BytesMut::with_capacity(64 * 1024);
    loop {
        let Some(first) = rx.recv().await else {
            return "the node is shutting down";
        };
        batch.clear();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            let frame = match item {
                Outgoing::Packet(dst, packet) => {
                    if !home {
                        *lock(last_used) = Instant::now();
                    }
                    Frame::Send { dst, packet }
                }
                Outgoing::Report(stats) => Frame::PunchReport {
                    attempts: stats.attempts,
                    successes: stats.successes,
                },
            };
            // Oversized packets are dropped (QUIC never makes them).
            let _ = frame.encode(&mut batch);
            if batch.len() < 64 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if send.write_all(&batch).await.is_err() {
            return "the relay connection failed";
        }
    }
}
