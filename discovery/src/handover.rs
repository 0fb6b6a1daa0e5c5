//! Handing a server's names and mailboxes over to another server.
//!
//! When two servers find each other on a LAN, one of them stops serving. Before its
//! users are gone from it, it publishes every name claim it holds on the other server
//! (claims are signed by their nodes, so any server verifies them as if the node had
//! sent them) and deposits every envelope waiting in its mailboxes there, deleting each
//! one here only once the other server stored it. Presence is not handed over: the nodes
//! that are online announce themselves on the new server when they move to it.
//!
//! Interrupted at any point, nothing is lost: an envelope deposited but not yet deleted
//! here is deposited again by the next hand-over, and its recipient drops the copy (every
//! message is deduplicated by id).

use std::time::Duration;

use p2p_crypto::NodeId;

use crate::{client::Client, store::Store, ClientError, StoreError};

/// Claims or envelopes read from the store at a time.
const PAGE: usize = 256;

/// Most waits on the other server's rate limit in one hand-over.
const MAX_RATE_WAITS: u32 = 600;

/// How a hand-over went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandoverReport {
    /// Claims the other server now holds (stored, or already there).
    pub names: usize,
    /// Names the other server keeps for another key: `(name, the node that lost it)`.
    pub names_taken: Vec<(String, NodeId)>,
    /// Envelopes moved (deposited there, deleted here).
    pub envelopes: usize,
    /// Envelopes kept here: the recipient's mailbox there is full, or the other server
    /// does not know the recipient (yet: a node known only by its presence announces
    /// itself there when it moves). A later hand-over tries them again.
    pub envelopes_kept: usize,
}

/// A hand-over stopped; what was moved so far stays moved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoverError {
    /// This server's store failed.
    #[error("reading the local discovery store: {0}")]
    Store(#[from] StoreError),
    /// The other server failed or refused.
    #[error("the other discovery server: {0}")]
    Client(#[from] ClientError),
}

/// Publishes every claim of `store` on `to` and moves every envelope there.
pub async fn hand_over(store: &dyn Store, to: &Client) -> Result<HandoverReport, HandoverError> {
    let mut report = HandoverReport::default();
    let mut waits = 0u32;
    let mut after = None;
    loop {
        let claims = store.claims_after(after, PAGE).await?;
        let Some(last) = claims.last() else { break };
        after = Some(last.record().node_id);
        for claim in &claims {
            match retry(&mut waits, || to.publish_claim(claim)).await {
                Ok(_) => report.names += 1,
                Err(ClientError::NameTaken) => {
                    let r = claim.record();
                    report.names_taken.push((r.name.clone(), r.node_id));
                }
                // The other server holds a newer claim of this key: nothing to move.
                Err(ClientError::Server { code, .. }) if code == "stale_record" => {
                    report.names += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let mut after = None;
    loop {
        let page = store.envelopes_after(after, PAGE).await?;
        let Some((node, id, _)) = page.last() else {
            break;
        };
        after = Some((*node, *id));
        for (to_node, id, envelope) in page {
            match retry(&mut waits, || to.deposit(&to_node, envelope.clone())).await {
                Ok(_) => {
                    store.delete(&to_node, &[id]).await?;
                    report.envelopes += 1;
                }
                Err(ClientError::MailboxFull | ClientError::NotFound) => {
                    report.envelopes_kept += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(report)
}

/// Runs `op`, waiting out the other server's rate limit (and a database restart there),
/// at most [`MAX_RATE_WAITS`] times in all.
async fn retry<T, F, Fut>(waits: &mut u32, mut op: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    loop {
        match op().await {
            Err(
                ClientError::RateLimited { retry_after } | ClientError::Unavailable { retry_after },
            ) if *waits < MAX_RATE_WAITS => {
                *waits += 1;
                let wait = retry_after
                    .unwrap_or(Duration::from_millis(500))
                    .clamp(Duration::from_millis(50), Duration::from_secs(5));
                tokio::time::sleep(wait).await;
            }
            r => return r,
        }
    }
}
