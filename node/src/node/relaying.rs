//! The home relay and path events.
//!
//! - The home relay task asks the discovery server which relay it runs (`GET /v1/relay`)
//!   and points the path layer at it, asking again every [`RELAY_REFRESH`] (a restarted
//!   server may come back with another relay) and retrying with backoff while the server
//!   is unreachable.
//! - The path events task turns the path layer's changes into [`NodeEvent::PathChanged`].

use std::{sync::Arc, time::Duration};

use tokio::sync::broadcast::error::RecvError;

use super::{Inner, NodeEvent};

/// How often the discovery server is asked again which relay it runs.
const RELAY_REFRESH: Duration = Duration::from_secs(60);

/// Keeps [`Inner::home_relay`] pointing at the discovery server's relay.
pub(super) async fn home_relay_loop(inner: Arc<Inner>) {
    let Some(disco) = inner.disco.as_ref() else {
        return;
    };
    let mut failures = 0u32;
    let mut said_none = false;
    let mut status = inner.discovery_status();
    loop {
        // A request to a server that just died may take its whole timeout: a change of
        // server meanwhile asks the new one at once.
        let asked = tokio::select! {
            asked = disco.relay() => asked,
            _ = super::server_changed(&mut status) => continue,
        };
        let wait = match asked {
            Ok(found) => {
                failures = 0;
                if found.is_none() && !said_none {
                    said_none = true;
                    tracing::info!(
                        "the discovery server runs no relay: peers behind NATs are reached through the mailbox only"
                    );
                }
                inner.home_relay.send_if_modified(|current| {
                    let changed = *current != found;
                    *current = found;
                    changed
                });
                inner.relay_checked.send_replace(true);
                RELAY_REFRESH
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::debug!(error = %e, "cannot ask discovery for its relay; retrying");
                }
                // Nothing to wait for: dials go ahead without a relay meanwhile.
                inner.relay_checked.send_replace(true);
                inner.timings.backoff(failures).min(RELAY_REFRESH)
            }
        };
        tokio::select! {
            _ = inner.cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            // Another server runs another relay (or none): ask at once.
            _ = super::server_changed(&mut status) => failures = 0,
        }
    }
}

/// Reports path changes as node events.
pub(super) async fn path_events(inner: Arc<Inner>) {
    let mut events = inner.endpoint.net().subscribe();
    loop {
        let ev = tokio::select! {
            _ = inner.cancel.cancelled() => break,
            ev = events.recv() => ev,
        };
        match ev {
            Ok(ev) => inner.emit(NodeEvent::PathChanged {
                node_id: ev.peer,
                name: inner.name_of(&ev.peer),
                path: ev.path,
                addr: ev.addr,
                rtt: ev.rtt,
            }),
            Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => break,
        }
    }
}
