//! `p2p_node::store`'s write log (`node.redb-log`): a database is opened beside a log
//! built from the input, as an unclean stop, a damaged disk or another program would
//! leave it, and the log is applied.
//!
//! Records are framed here by an independent model of the format (`len | crc32c | epoch |
//! payload`, CRC-32C computed bit by bit), with the database's own epoch, so inputs get
//! past the checksum: as raw bytes, as arbitrary payloads, or as arbitrary message
//! writes encoded with postcard.
//!
//! Invariants:
//! - nothing panics; opening gives a store, a `CorruptLog` error (naming an offset
//!   where a record starts) or nothing else;
//! - an opened store has folded the log: the log is empty, and opening again changes
//!   nothing (the writes are applied once);
//! - well-formed writes of valid messages are all applied: every new incoming message
//!   is in the history.

#![no_main]

use std::{path::PathBuf, sync::LazyLock};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use redb::ReadableDatabase;
use p2p_crypto::SecretKey;
use p2p_node::{
    store::{
        tables::{LOG_EPOCH_KEY, META},
        MessageStatus, Store, StoreError, WriteOp,
    },
    wire::{Body, ChatMessage, Conversation, MessageId, RejectCode},
};

/// A fresh database (with its epoch) copied for every input.
static TEMPLATE: LazyLock<(tempfile::TempDir, PathBuf, u64)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("template.redb");
    drop(Store::open(&path).expect("a new database"));
    let db = redb::Database::open(&path).expect("reopens");
    let epoch = {
        let txn = db.begin_read().expect("read");
        let meta = txn.open_table(META).expect("meta");
        let value = meta.get(LOG_EPOCH_KEY).expect("get").expect("an epoch");
        value.value()
    };
    drop(db);
    (dir, path, epoch)
});

mod mode {
    pub const RAW: u8 = 0;
    pub const PAYLOADS: u8 = 1;
    pub const COUNT: u8 = 3;
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let (_, template, epoch) = &*TEMPLATE;
    let mut u = Unstructured::new(rest);
    let (log, expect_new) = match m % mode::COUNT {
        mode::RAW => (rest.to_vec(), None),
        mode::PAYLOADS => {
            let payloads: Vec<Vec<u8>> = u.arbitrary().unwrap_or_default();
            (frame(*epoch, payloads.iter().map(Vec::as_slice)), None)
        }
        _ => match writes(&mut u) {
            Ok((batches, new)) => {
                let payloads: Vec<Vec<u8>> = batches
                    .iter()
                    .map(|b| postcard::to_allocvec(b).expect("encodes"))
                    .collect();
                (frame(*epoch, payloads.iter().map(Vec::as_slice)), Some(new))
            }
            Err(_) => return,
        },
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("node.redb");
    std::fs::copy(template, &path).expect("copy");
    let log_path = dir.path().join("node.redb-log");
    {
        // Owner-only, as the store requires (a log that others may read is refused).
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&log_path)
            .expect("create log");
        f.write_all(&log).expect("write log");
    }
    match Store::open(&path) {
        Ok(store) => {
            assert_eq!(std::fs::metadata(&log_path).expect("log").len(), 0);
            let count = store.message_count().expect("count");
            if let Some(new) = &expect_new {
                for (peer, id) in new {
                    let m = store.message(id).expect("read").expect("applied");
                    assert_eq!(m.peer, *peer);
                }
            }
            drop(store);
            assert!(!log_path.exists(), "a clean close removes the log");
            let again = Store::open(&path).expect("opens again");
            assert_eq!(again.message_count().expect("count"), count);
        }
        Err(StoreError::CorruptLog { offset, .. }) => {
            assert!(expect_new.is_none(), "well-formed writes refused");
            assert!((offset as usize) < log.len());
            assert_eq!(
                std::fs::read(&log_path).expect("log"),
                log,
                "left as it was"
            );
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
});

/// The log of `payloads`, each framed as one record of `epoch`.
fn frame<'a>(epoch: u64, payloads: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        let len = p.len() as u32;
        let mut covered = epoch.to_le_bytes().to_vec();
        covered.extend_from_slice(&len.to_le_bytes());
        covered.extend_from_slice(p);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&crc32c(&covered).to_le_bytes());
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// CRC-32C (Castagnoli), bit by bit.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[derive(Arbitrary)]
enum Write {
    Incoming { peer: u8, id: u8, text_len: u8 },
    Outgoing { peer: u8, id: u8, text_len: u8 },
    Finish { peer: u8, id: u8, rejected: bool },
}

/// Batches of writes among a few peers and ids (so duplicates, conflicts and marks of
/// known messages happen), and the (peer, id) of each incoming message that is new.
#[allow(clippy::type_complexity)]
fn writes(
    u: &mut Unstructured<'_>,
) -> arbitrary::Result<(Vec<Vec<WriteOp>>, Vec<(p2p_crypto::NodeId, MessageId)>)> {
    let peers: Vec<_> = (0..4u8)
        .map(|i| SecretKey::from_bytes(&[i + 1; 32]).public())
        .collect();
    let batches: Vec<Vec<Write>> = u.arbitrary()?;
    let mut taken = std::collections::HashSet::new();
    let mut new = Vec::new();
    let mut now = 1_000;
    let ops = batches
        .into_iter()
        .map(|batch| {
            batch
                .into_iter()
                .map(|w| {
                    now += 1;
                    let id = |n: u8| MessageId([n % 8; 16]);
                    let msg = |n: u8, len: u8| ChatMessage {
                        id: id(n),
                        conversation: Conversation::Direct,
                        sent_at_ms: 7,
                        body: Body::Text("x".repeat(usize::from(len))),
                    };
                    match w {
                        Write::Incoming {
                            peer,
                            id: n,
                            text_len,
                        } => {
                            let peer = peers[usize::from(peer % 4)];
                            if taken.insert(id(n)) {
                                new.push((peer, id(n)));
                            }
                            WriteOp::Incoming {
                                peer,
                                msg: msg(n, text_len),
                                now_ms: now,
                            }
                        }
                        Write::Outgoing {
                            peer,
                            id: n,
                            text_len,
                        } => {
                            taken.insert(id(n));
                            WriteOp::Outgoing {
                                to: peers[usize::from(peer % 4)],
                                msg: msg(n, text_len),
                                now_ms: now,
                            }
                        }
                        Write::Finish {
                            peer,
                            id: n,
                            rejected,
                        } => WriteOp::Finish {
                            peer: peers[usize::from(peer % 4)],
                            id: id(n),
                            status: if rejected {
                                MessageStatus::Rejected(RejectCode::ID_CONFLICT)
                            } else {
                                MessageStatus::Delivered
                            },
                        },
                    }
                })
                .collect()
        })
        .collect();
    Ok((ops, new))
}
