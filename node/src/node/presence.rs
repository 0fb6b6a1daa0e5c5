//! Login, renewal and the online list.
//!
//! - The announce task announces this node at start and again when the server's hint
//!   says (before the TTL runs out), and at once when its home relay or the address the
//!   relay sees it at changes, when the server restarted and forgot who is online (a new
//!   presence epoch on any of its responses), or when the server answers again after
//!   an outage; after a failure it retries with backoff.
//! - The poll task fetches the online list every
//!   [`Timings::presence_poll`](super::Timings::presence_poll) (every
//!   [`POLL_WHILE_FAILING`] while the server does not answer, so a restart is noticed
//!   soon after it), reports who came and went, retries the outbox of peers that came
//!   online (or moved), and warns when a pinned name is announced by another key.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::Arc,
    time::Duration,
};

use p2p_discovery::Announcement;

use super::{Inner, NodeEvent, PeerInfo, RegisterError};

/// How long the poll waits after the discovery server changed, so that the others have
/// announced themselves there before the online list is read.
const SETTLE_AFTER_MOVE: Duration = Duration::from_secs(1);

/// How often the online list is asked for while the server does not answer.
pub(super) const POLL_WHILE_FAILING: Duration = Duration::from_secs(1);

/// Waits until the server in use says it forgot every presence record (it restarted);
/// never returns for a discovery that cannot tell.
async fn presence_lost(resets: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    if let Some(rx) = resets {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    *resets = None;
    std::future::pending().await
}

/// Announces until the node stops.
pub(super) async fn announce_loop(inner: Arc<Inner>) {
    let mut failures = 0u32;
    let mut home = inner.endpoint.net().home();
    let mut status = inner.discovery_status();
    let mut resets = inner.disco.as_ref().and_then(|d| d.presence_resets());
    loop {
        // What the home relay looked like as this announcement started: a change while it
        // is under way (the link coming up) is announced right after it.
        let seen = home.borrow_and_update().clone();
        let wait = match announce_once(&inner).await {
            Ok(after) => {
                if failures > 0 {
                    tracing::info!("announced on discovery");
                }
                failures = 0;
                after
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!(error = %e, "cannot announce on discovery; retrying in the background");
                } else {
                    tracing::debug!(error = %e, failures, "announce failed again");
                }
                inner.timings.backoff(failures)
            }
        };
        tokio::select! {
            _ = inner.cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            // Another server: announce there at once (claiming our name there first).
            _ = super::server_changed(&mut status) => failures = 0,
            // The server restarted and forgot us: announce again at once.
            _ = presence_lost(&mut resets) => {
                tracing::info!("discovery forgot our presence (it restarted); announcing again");
                failures = 0;
            }
            // The server answers again after an outage: do not wait out the backoff.
            _ = inner.discovery_back.notified(), if failures > 0 => failures = 0,
            changed = relay_changed(&mut home, &seen) => {
                if !changed {
                    // The path layer is gone (shutting down): keep the timer only.
                    tokio::select! {
                        _ = inner.cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

/// Waits until what we announce of the home relay differs from `seen` (the relay itself,
/// or our address as it sees us), or the link to it comes back (the server may have
/// restarted and forgotten our presence). Returns at once when it differs already: a
/// change during the announcement is not lost. `false` when the path layer is gone.
async fn relay_changed(
    home: &mut tokio::sync::watch::Receiver<crate::net::HomeRelay>,
    seen: &crate::net::HomeRelay,
) -> bool {
    let before = (seen.relay, seen.reflexive);
    let mut connected = seen.connected;
    loop {
        {
            let h = home.borrow_and_update();
            let reconnected = h.connected && !connected;
            connected = h.connected;
            if (h.relay, h.reflexive) != before || reconnected {
                return true;
            }
        }
        if home.changed().await.is_err() {
            return false;
        }
    }
}

/// Announces once; returns when to announce again.
pub(super) async fn announce_once(inner: &Inner) -> Result<Duration, RegisterError> {
    let disco = inner.disco.as_ref().ok_or(RegisterError::NoDiscovery)?;
    let _one_at_a_time = inner.announce_lock.lock().await;
    let home = inner.endpoint.net().home().borrow().clone();
    let mut addrs = our_addrs(inner);
    if !inner.publish_addrs {
        addrs.clear();
    }
    let mut announcement = Announcement {
        name: inner.current_name(),
        addrs,
        relay: home.relay,
        ttl: inner.timings.announce_ttl,
    };
    let ttl = announcement.ttl;
    let after = match disco.announce(&inner.secret, &announcement).await {
        Err(e) if e.is_name_not_claimed() => {
            // This server does not know our name (another server, or a fresh one):
            // claim it here, or announce without it if someone else holds it.
            let name = announcement.name.clone().unwrap_or_default();
            let keep_name = match disco.claim_name(&inner.secret, &name).await {
                Ok(()) => true,
                Err(e) if e.is_name_taken() => {
                    tracing::warn!(
                        name,
                        "our name is taken on this discovery server; announcing without it"
                    );
                    false
                }
                Err(e) => return Err(e.into()),
            };
            announcement.name = keep_name.then_some(name);
            disco.announce(&inner.secret, &announcement).await?
        }
        r => r?,
    };
    inner.announced.send_replace(true);
    inner.announced_relay.send_replace(announcement.relay);
    // Trust the server's hint, but never wait past half the TTL we asked for.
    Ok(after.min(ttl / 2).max(Duration::from_millis(100)))
}

/// The addresses to announce for our QUIC endpoint.
///
/// A concrete bind address is announced as is. For an unspecified one (`0.0.0.0`), we
/// announce the address of the interface that routes to the discovery server (when it
/// is not loopback) and to the internet (no packet is sent: a connected UDP socket only
/// asks the routing table), then the unspecified address itself, which the server
/// replaces with the source address it sees.
fn announce_addrs(inner: &Inner) -> Vec<SocketAddr> {
    let Ok(local) = inner.endpoint.local_addr() else {
        return Vec::new();
    };
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let mut out = Vec::new();
    let mut targets: Vec<SocketAddr> = Vec::new();
    if let Some(d) = &inner.disco {
        if let Some(a) = d.server_addr() {
            targets.push(a);
        }
    }
    // The routes to the server and to the internet first, then every other interface
    // (a LAN with no default route, or a node that reaches its own server on loopback).
    let interfaces = crate::discovery::mdns::local_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|a| a.ip)
        .filter(|ip| local.is_ipv6() || ip.is_ipv4());
    let routed = targets
        .into_iter()
        .filter_map(|t| route_ip(local, t))
        .chain(outward_ip(local))
        .chain(interfaces);
    for ip in routed {
        let a = SocketAddr::new(ip, local.port());
        if !ip.is_loopback() && !ip.is_unspecified() && !out.contains(&a) {
            out.push(a);
        }
    }
    out.push(local);
    out
}

/// Our direct addresses: those [`announce_addrs`] finds, and first the address the relay
/// sees us at (the public side of our NAT, a hole-punching candidate for peers).
pub(super) fn our_addrs(inner: &Inner) -> Vec<SocketAddr> {
    let reflexive = inner.endpoint.net().home().borrow().reflexive;
    let mut addrs = announce_addrs(inner);
    // A relay on loopback (this machine's own server) sees only 127.0.0.1.
    if let Some(r) = reflexive.filter(|a| !addrs.contains(a) && !a.ip().is_loopback()) {
        addrs.insert(0, r);
    }
    addrs.truncate(p2p_discovery::MAX_ADDRS);
    addrs
}

/// Keeps the addresses the path layer offers peers for hole punching current, for
/// every node, announced or not (a one-shot `send` punches too).
pub(super) async fn candidates_loop(inner: Arc<Inner>) {
    let mut home = inner.endpoint.net().home();
    loop {
        inner.endpoint.net().set_own_candidates(our_addrs(&inner));
        tokio::select! {
            _ = inner.cancel.cancelled() => break,
            changed = home.changed() => if changed.is_err() { break },
        }
    }
}

/// The local IP of the interface that routes to the internet (of `local`'s family), if
/// it is not loopback.
pub(super) fn outward_ip(local: SocketAddr) -> Option<IpAddr> {
    let target = match local.ip() {
        IpAddr::V4(_) => SocketAddr::from(([192, 0, 2, 1], 9)),
        IpAddr::V6(_) => SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 9)),
    };
    route_ip(local, target).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// The local IP the routing table picks to reach `target`.
fn route_ip(local: SocketAddr, target: SocketAddr) -> Option<IpAddr> {
    if local.is_ipv4() != target.is_ipv4() {
        return None;
    }
    let bind = SocketAddr::new(local.ip(), 0);
    let sock = UdpSocket::bind(bind).ok()?;
    sock.connect(target).ok()?;
    sock.local_addr().ok().map(|a| a.ip())
}

/// Polls the online list until the node stops.
pub(super) async fn poll_loop(inner: Arc<Inner>) {
    let Some(disco) = inner.disco.as_ref() else {
        return;
    };
    let mut failing = false;
    let mut status = inner.discovery_status();
    let mut resets = disco.presence_resets();
    loop {
        match disco.online().await {
            Ok(peers) => {
                if failing {
                    tracing::info!("discovery is reachable again");
                    inner.discovery_back.notify_one();
                }
                failing = false;
                apply_online(&inner, peers);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot fetch the online list");
                }
                failing = true;
            }
        }
        let every = if failing {
            POLL_WHILE_FAILING.min(inner.timings.presence_poll)
        } else {
            inner.timings.presence_poll
        };
        tokio::select! {
            _ = inner.cancel.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
            // Another server, or this one restarted: give the others a moment to announce
            // themselves there.
            _ = async {
                tokio::select! {
                    _ = super::server_changed(&mut status) => {}
                    _ = presence_lost(&mut resets) => {}
                }
            } => {
                tokio::select! {
                    _ = inner.cancel.cancelled() => break,
                    _ = tokio::time::sleep(SETTLE_AFTER_MOVE.min(inner.timings.presence_poll)) => {}
                }
            }
        }
    }
}

/// Replaces the cached online list, reporting the differences.
fn apply_online(inner: &Inner, peers: Vec<PeerInfo>) {
    inner.learn_peers(&peers);
    let change = inner.peers().replace_online(inner.node_id, peers);
    let super::peers::OnlineChange {
        came,
        went,
        moved,
        key_changes,
    } = change;
    for p in came {
        tracing::debug!(peer = %p.node_id, "peer online");
        inner.wake_outbox_for(p.node_id);
        inner.emit(NodeEvent::PeerOnline {
            node_id: p.node_id,
            name: p.name,
        });
    }
    for id in moved {
        inner.wake_outbox_for(id);
    }
    for p in went {
        tracing::debug!(peer = %p.node_id, "peer offline");
        inner.emit(NodeEvent::PeerOffline {
            node_id: p.node_id,
            name: p.name,
        });
    }
    for (name, pinned, announced) in key_changes {
        inner.key_changed(&name, pinned, announced);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use p2p_crypto::SecretKey;
    use p2p_discovery::RelayRef;
    use tokio::sync::watch;

    use super::relay_changed;
    use crate::net::HomeRelay;

    fn linked() -> HomeRelay {
        HomeRelay {
            relay: Some(RelayRef {
                node_id: SecretKey::from_bytes(&[9; 32]).public(),
                addr: "127.0.0.1:7117".parse().expect("address"),
            }),
            connected: true,
            reflexive: Some("203.0.113.5:4000".parse().expect("address")),
        }
    }

    /// The relay link came up while an announcement without it was under way: the loop
    /// announces again at once instead of waiting for the next refresh.
    #[tokio::test]
    async fn a_relay_link_that_came_up_during_an_announcement_is_announced_at_once() {
        let seen = HomeRelay::default();
        let (tx, mut rx) = watch::channel(seen.clone());
        tx.send_replace(linked());
        // The receiver has not been asked yet: as the loop's `select!` first polls it.
        let changed = tokio::time::timeout(Duration::from_secs(5), relay_changed(&mut rx, &seen))
            .await
            .expect("returns at once");
        assert!(changed);
    }

    /// Nothing announced differs: it waits for a change, and returns on the link coming
    /// back after it went down.
    #[tokio::test]
    async fn an_unchanged_relay_waits_and_a_link_back_up_is_a_change() {
        let seen = linked();
        let (tx, mut rx) = watch::channel(seen.clone());
        let waiting =
            tokio::time::timeout(Duration::from_millis(50), relay_changed(&mut rx, &seen)).await;
        assert!(waiting.is_err(), "nothing changed: still waiting");
        let down = HomeRelay {
            connected: false,
            ..linked()
        };
        // One thread: the task runs exactly where this test yields.
        let task = tokio::spawn(async move { relay_changed(&mut rx, &seen).await });
        tokio::task::yield_now().await;
        tx.send_replace(down);
        tokio::task::yield_now().await;
        assert!(!task.is_finished(), "a link going down is not announced");
        tx.send_replace(linked());
        let changed = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("returns")
            .expect("task");
        assert!(changed);
    }
}
