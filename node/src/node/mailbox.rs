//! The offline mailbox: deposits sealed messages for unreachable peers, drains our own
//! mailbox, and answers with sealed receipts.
//!
//! A mailbox item is a [`seal`](p2p_crypto::seal)ed envelope whose payload is one
//! wire-encoded frame (length prefix and postcard bytes, exactly as on a stream):
//! - `Message`: stored (deduplicated by id) as sent by the *authenticated sender of the
//!   envelope*, then acknowledged with a receipt: a sealed `Ack` frame deposited in the
//!   sender's mailbox. (The sender's outbox retry, if it reaches us first, gets a
//!   `Duplicate` ack instead; either settles it.)
//! - `Ack`: a receipt for a message we sent. It marks the message delivered only if it
//!   was sent *to the envelope's sender* ([`Store::mark_delivered`] checks), so nobody
//!   can confirm or reject messages sent to someone else.
//!
//! Items are deleted from the server only once what they carry is durable here.
//! Envelopes that do not open or do not decode are logged and deleted.
//!
//! [`Store::mark_delivered`]: crate::store::Store::mark_delivered

use std::sync::Arc;

use p2p_crypto::{seal, MailboxPublicKey, NodeId};

use super::{deliver, Inner, MailboxError, NodeEvent, StorageError, Via};
use crate::{
    store::{Direction, Inserted, MessageStatus, OutboxEntry, StoredMessage},
    wire::{self, Ack, DecodeError, Frame, HEADER_LEN},
};

/// Most fetches in one drain (each returns a batch chosen by the server).
const MAX_FETCHES: usize = 64;

/// Drains at start and then every [`Timings::mailbox_poll`](super::Timings::mailbox_poll).
pub(super) async fn run(inner: Arc<Inner>) {
    if inner.disco.is_none() {
        inner.drained.send_replace(true);
        return;
    }
    let mut status = inner.discovery_status();
    loop {
        let before = generation(&status);
        match drain(&inner).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "received messages from the mailbox"),
            // The LAN's server moved meanwhile: the next drain goes to the new one.
            Err(e) if generation(&status) != before => {
                tracing::debug!(error = %e, "mailbox drain cut short by a change of server")
            }
            Err(e) => tracing::warn!(error = %e, "cannot drain the mailbox"),
        }
        inner.drained.send_replace(true);
        tokio::select! {
            _ = inner.cancel.cancelled() => break,
            _ = tokio::time::sleep(inner.timings.mailbox_poll) => {}
            // Another server: what waits for us there (handed over from the last one).
            _ = super::server_changed(&mut status) => {}
        }
    }
}

/// The discovery's count of server changes.
fn generation(
    status: &Option<tokio::sync::watch::Receiver<super::DiscoveryStatus>>,
) -> Option<u64> {
    status.as_ref().map(|rx| rx.borrow().generation)
}

/// Why a mailbox payload is not a frame.
#[derive(Debug, thiserror::Error)]
enum PayloadError {
    #[error("payload of {0} bytes is shorter than a frame header")]
    Short(usize),
    #[error("frame header says {header} bytes but {actual} follow")]
    LengthMismatch { header: usize, actual: usize },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

fn decode_payload(payload: &[u8]) -> Result<Frame, PayloadError> {
    let Some((header, rest)) = payload.split_first_chunk::<HEADER_LEN>() else {
        return Err(PayloadError::Short(payload.len()));
    };
    let len = wire::frame_len(*header)?;
    if len != rest.len() {
        return Err(PayloadError::LengthMismatch {
            header: len,
            actual: rest.len(),
        });
    }
    Ok(wire::decode(rest)?)
}

/// Fetches, stores, acknowledges and deletes until the mailbox is empty (or
/// [`MAX_FETCHES`] batches were handled). Returns the number of new messages.
pub(super) async fn drain(inner: &Arc<Inner>) -> Result<usize, MailboxError> {
    let disco = inner.disco.as_ref().ok_or(MailboxError::NoDiscovery)?;
    let _one_at_a_time = inner.drain_lock.lock().await;
    let mut total = 0;
    for _ in 0..MAX_FETCHES {
        let batch = disco.fetch_mailbox(&inner.secret).await?;
        if batch.items.is_empty() {
            break;
        }
        let mut delete = Vec::with_capacity(batch.items.len());
        let mut pending = Vec::new();
        for item in batch.items {
            let opened = match seal::open(&inner.secret, &item.envelope) {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(item = item.id, reason = %e, "deleting a mailbox envelope that does not open");
                    delete.push(item.id);
                    continue;
                }
            };
            let sender = opened.sender;
            let frame = match decode_payload(&opened.payload) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(item = item.id, %sender, reason = %e, "deleting a mailbox envelope that does not decode");
                    delete.push(item.id);
                    continue;
                }
            };
            match frame {
                Frame::Message(msg) => {
                    let rx = inner.writer.submit(sender, msg.clone()).await?;
                    pending.push((item.id, sender, msg, rx));
                }
                Frame::Ack(ack) => {
                    // A receipt: applies only to a message sent to `sender`.
                    match deliver::settle(inner, sender, ack.id, ack.status, None).await {
                        Ok(()) => delete.push(item.id),
                        Err(e) => {
                            tracing::warn!(item = item.id, error = %e, "cannot apply a receipt; keeping it")
                        }
                    }
                }
            }
        }
        let mut receipts = Vec::with_capacity(pending.len());
        for (item_id, sender, msg, rx) in pending {
            match rx.await {
                Ok(Ok((outcome, stored_at_ms))) => {
                    let inserted = outcome.inserted();
                    delete.push(item_id);
                    receipts.push((
                        sender,
                        Ack {
                            id: msg.id,
                            status: inserted.ack_status(),
                        },
                    ));
                    if inserted == Inserted::New {
                        total += 1;
                        let from_name = inner.sender_name(&sender).await;
                        inner.emit(NodeEvent::MessageReceived {
                            from: sender,
                            from_name,
                            message: StoredMessage {
                                id: msg.id,
                                peer: sender,
                                direction: Direction::Incoming,
                                sent_at_ms: msg.sent_at_ms,
                                stored_at_ms,
                                body: msg.body,
                                status: MessageStatus::Received,
                            },
                            via: Via::Mailbox,
                        });
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(item = item_id, error = %e, "cannot store a mailbox message; keeping it")
                }
                Err(_) => return Err(StorageError::Shutdown.into()),
            }
        }
        if !delete.is_empty() {
            disco.delete_mailbox(&inner.secret, &delete).await?;
        }
        for (sender, ack) in receipts {
            if let Err(e) = deposit_frame(inner, sender, &Frame::Ack(ack)).await {
                tracing::debug!(%sender, message = %ack.id, error = %e, "cannot send a receipt");
            }
        }
        if !batch.more {
            break;
        }
    }
    Ok(total)
}

/// The mailbox key of `peer`: known from discovery records or a pinned contact, else
/// looked up.
async fn mailbox_key(inner: &Arc<Inner>, peer: NodeId) -> Result<MailboxPublicKey, MailboxError> {
    if let Some(k) = inner.peers().mailbox_key(&peer) {
        return Ok(k);
    }
    let disco = inner.disco.as_ref().ok_or(MailboxError::NoDiscovery)?;
    let info = tokio::time::timeout(inner.timings.dial_timeout, disco.lookup_id(&peer))
        .await
        .unwrap_or_else(|_| Err(super::DiscoveryError::timeout(disco.url())))?
        .ok_or(MailboxError::UnknownPeer { peer })?;
    inner.learn_peers(std::slice::from_ref(&info));
    Ok(info.mailbox_key)
}

/// Seals `frame` to `to` and deposits it in its mailbox.
async fn deposit_frame(inner: &Arc<Inner>, to: NodeId, frame: &Frame) -> Result<(), MailboxError> {
    let disco = inner.disco.as_ref().ok_or(MailboxError::NoDiscovery)?;
    let key = mailbox_key(inner, to).await?;
    let payload = wire::encode(frame)?;
    let envelope = seal::seal(&inner.secret, &to, &key, &payload);
    disco.deposit(&to, envelope).await?;
    Ok(())
}

/// Deposits a queued message, sealed, in its recipient's mailbox.
pub(super) async fn deposit_message(
    inner: &Arc<Inner>,
    entry: &OutboxEntry,
) -> Result<(), MailboxError> {
    deposit_frame(inner, entry.to, &Frame::Message(entry.message.clone())).await?;
    tracing::debug!(peer = %entry.to, message = %entry.message.id, "deposited in the mailbox");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AckStatus, ChatMessage, MessageId};

    #[test]
    fn payload_round_trip_and_garbage() {
        let m = Frame::Message(ChatMessage::text("hi", 1).expect("valid"));
        let bytes = wire::encode(&m).expect("encodes");
        assert_eq!(decode_payload(&bytes).expect("decodes"), m);
        let a = Frame::Ack(Ack {
            id: MessageId([1; 16]),
            status: AckStatus::Stored,
        });
        assert_eq!(
            decode_payload(&wire::encode(&a).expect("encodes")).expect("decodes"),
            a
        );
        assert!(matches!(
            decode_payload(&[0, 0]),
            Err(PayloadError::Short(2))
        ));
        assert!(matches!(
            decode_payload(&bytes[..bytes.len() - 1]),
            Err(PayloadError::LengthMismatch { .. })
        ));
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode_payload(&extra).is_err());
        assert!(decode_payload(&[0xff, 0xff, 0xff, 0xff, 1]).is_err());
        assert!(decode_payload(&[0, 0, 0, 3, 9, 9, 9]).is_err());
    }
}
