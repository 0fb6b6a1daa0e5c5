#![allow(clippy::unwrap_used)]

use super::*;
use p2p_crypto::SecretKey;
use tempfile::TempDir;

fn setup() -> (TempDir, PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let store = Store::open(&path).unwrap();
    (dir, path, store)
}

fn peer() -> NodeId {
    SecretKey::generate().public()
}

fn msg(text: &str, sent_at_ms: u64) -> ChatMessage {
    ChatMessage::text(text, sent_at_ms).unwrap()
}

fn texts(msgs: &[StoredMessage]) -> Vec<&str> {
    msgs.iter().map(|m| m.body.as_text().unwrap()).collect()
}

#[test]
fn incoming_is_stored_with_attribution() {
    let (_d, _p, store) = setup();
    let alice = peer();
    let m = msg("hi", 1_000);
    assert_eq!(
        store.insert_incoming(&alice, &m, 5_000).unwrap(),
        Inserted::New
    );
    let got = store.message(&m.id).unwrap().unwrap();
    assert_eq!(
        got,
        StoredMessage {
            id: m.id,
            peer: alice,
            direction: Direction::Incoming,
            sent_at_ms: 1_000,
            stored_at_ms: 5_000,
            body: Body::Text("hi".into()),
            status: MessageStatus::Received,
        }
    );
    assert_eq!(got.to_chat_message(), m);
    assert_eq!(store.history(&alice, 10, None).unwrap(), vec![got]);
    assert!(store.message(&MessageId([1; 16])).unwrap().is_none());
}

#[test]
fn incoming_dedup_by_id() {
    let (_d, _p, store) = setup();
    let alice = peer();
    let mallory = peer();
    let m = msg("once", 1);
    assert_eq!(
        store.insert_incoming(&alice, &m, 10).unwrap(),
        Inserted::New
    );
    // A resend (e.g. after a lost ack, or via the mailbox) at a later time.
    assert_eq!(
        store.insert_incoming(&alice, &m, 20).unwrap(),
        Inserted::Duplicate
    );
    assert_eq!(Inserted::Duplicate.ack_status(), AckStatus::Duplicate);
    // Even with a different body: the id decides.
    let mut altered = m.clone();
    altered.body = Body::Text("changed".into());
    assert_eq!(
        store.insert_incoming(&alice, &altered, 30).unwrap(),
        Inserted::Duplicate
    );
    // The same id from another peer is not theirs to claim.
    assert_eq!(
        store.insert_incoming(&mallory, &m, 40).unwrap(),
        Inserted::Conflict
    );
    assert_eq!(
        Inserted::Conflict.ack_status(),
        AckStatus::Rejected(RejectCode::ID_CONFLICT)
    );
    let h = store.history(&alice, 10, None).unwrap();
    assert_eq!(texts(&h), ["once"]);
    assert_eq!(h[0].stored_at_ms, 10);
    assert!(store.history(&mallory, 10, None).unwrap().is_empty());
    assert!(store.conversations().unwrap().len() == 1);
}

#[test]
fn echoed_outgoing_id_is_a_conflict() {
    let (_d, _p, store) = setup();
    let bob = peer();
    let m = msg("mine", 1);
    assert_eq!(store.insert_outgoing(&bob, &m, 1).unwrap(), Inserted::New);
    // Bob sends our own id back to us as if it were his message.
    assert_eq!(
        store.insert_incoming(&bob, &m, 2).unwrap(),
        Inserted::Conflict
    );
    let h = store.history(&bob, 10, None).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].direction, Direction::Outgoing);
}

fn incoming(peer: NodeId, msg: &ChatMessage, now_ms: u64) -> WriteOp {
    WriteOp::Incoming {
        peer,
        msg: msg.clone(),
        now_ms,
    }
}

fn outcomes(res: Vec<Result<WriteOutcome, StoreError>>) -> Vec<WriteOutcome> {
    res.into_iter().map(|r| r.unwrap()).collect()
}

#[test]
fn batch_insert_dedups_within_and_across() {
    let (_d, _p, store) = setup();
    let alice = peer();
    let bob = peer();
    let old = msg("old", 1);
    store.insert_incoming(&alice, &old, 1).unwrap();
    let a = msg("a", 2);
    let b = msg("b", 3);
    let batch = vec![
        incoming(alice, &a, 100),
        incoming(bob, &b, 101),
        incoming(alice, &old, 102),
        incoming(alice, &a, 103),
        incoming(bob, &a, 104),
    ];
    let res = outcomes(store.write_batch(&batch).unwrap());
    use WriteOutcome::Inserted as I;
    assert_eq!(
        res,
        [
            I(Inserted::New),
            I(Inserted::New),
            I(Inserted::Duplicate),
            I(Inserted::Duplicate),
            I(Inserted::Conflict)
        ]
    );
    assert_eq!(
        texts(&store.history(&alice, 10, None).unwrap()),
        ["old", "a"]
    );
    assert_eq!(texts(&store.history(&bob, 10, None).unwrap()), ["b"]);
    // An all-duplicate batch (no commit needed) and an empty batch.
    assert_eq!(
        outcomes(store.write_batch(&batch[..1]).unwrap()),
        [I(Inserted::Duplicate)]
    );
    assert!(store.write_batch(&[]).unwrap().is_empty());
}

#[test]
fn a_batch_links_every_row_of_each_conversation_in_order() {
    let (_d, path, store) = setup();
    let (alice, bob) = (peer(), peer());
    let texts_of =
        |n: &str, count: usize| -> Vec<String> { (0..count).map(|i| format!("{n}{i}")).collect() };
    let (a, b) = (texts_of("a", 6), texts_of("b", 6));
    // Two batches, each interleaving the conversations, several rows of each per batch.
    for half in [0..3, 3..6] {
        let batch: Vec<WriteOp> = half
            .flat_map(|i| {
                [
                    incoming(alice, &msg(&a[i], 1), 10 + 2 * i as u64),
                    incoming(bob, &msg(&b[i], 1), 11 + 2 * i as u64),
                ]
            })
            .collect();
        let res = outcomes(store.write_batch(&batch).unwrap());
        assert!(res
            .iter()
            .all(|o| *o == WriteOutcome::Inserted(Inserted::New)));
    }
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(texts(&store.history(&alice, 10, None).unwrap()), a);
    assert_eq!(texts(&store.history(&bob, 10, None).unwrap()), b);
    let newest: Vec<_> = store
        .conversations()
        .unwrap()
        .into_iter()
        .map(|c| (c.peer, c.last.body.as_text().unwrap().to_owned()))
        .collect();
    assert_eq!(newest, [(bob, "b5".to_owned()), (alice, "a5".to_owned())]);
}

#[test]
fn a_batch_mixes_inserts_and_marks_and_isolates_bad_writes() {
    let (_d, path, store) = setup();
    let alice = peer();
    let bob = peer();
    let sent = msg("to bob", 1);
    let got = msg("from alice", 2);
    let mut too_long = msg("x", 3);
    too_long.body = Body::Text("x".repeat(crate::wire::MAX_TEXT_LEN + 1));
    let res = store
        .write_batch(&[
            WriteOp::Outgoing {
                to: bob,
                msg: sent.clone(),
                now_ms: 10,
            },
            incoming(alice, &too_long, 11),
            incoming(alice, &got, 12),
            WriteOp::Finish {
                peer: bob,
                id: sent.id,
                status: MessageStatus::Delivered,
            },
            // Only the recipient's answer counts.
            WriteOp::Finish {
                peer: alice,
                id: got.id,
                status: MessageStatus::Delivered,
            },
        ])
        .unwrap();
    assert!(matches!(res[0], Ok(WriteOutcome::Inserted(Inserted::New))));
    assert!(matches!(res[1], Err(StoreError::InvalidMessage(_))));
    assert!(matches!(res[2], Ok(WriteOutcome::Inserted(Inserted::New))));
    assert!(matches!(
        res[3],
        Ok(WriteOutcome::Marked(MarkOutcome::Updated))
    ));
    assert!(matches!(
        res[4],
        Ok(WriteOutcome::Marked(MarkOutcome::Unknown))
    ));
    assert!(store.outbox().unwrap().is_empty());
    assert_eq!(
        store.history(&bob, 10, None).unwrap()[0].status,
        MessageStatus::Delivered
    );
    assert_eq!(
        texts(&store.history(&alice, 10, None).unwrap()),
        ["from alice"]
    );

    // A batch of marks only is committed without waiting for the disk; `flush` (done
    // when the node stops) makes it durable, and it survives a reopen.
    let later = msg("later", 4);
    store.insert_outgoing(&bob, &later, 20).unwrap();
    store.mark_delivered(&bob, &later.id).unwrap();
    store.flush().unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    let hist = store.history(&bob, 10, None).unwrap();
    assert_eq!(hist.len(), 2);
    assert!(hist.iter().all(|m| m.status == MessageStatus::Delivered));
}

#[test]
fn history_last_n_in_order_with_pagination() {
    let (_d, _p, store) = setup();
    let alice = peer();
    let bob = peer();
    for i in 1..=10u64 {
        store
            .insert_incoming(&alice, &msg(&format!("a{i}"), 0), i * 10)
            .unwrap();
        // Interleave another conversation and outgoing messages.
        store
            .insert_outgoing(&bob, &msg(&format!("b{i}"), i), i * 10 + 1)
            .unwrap();
        if i == 5 {
            store.insert_outgoing(&alice, &msg("a-out", 0), 55).unwrap();
        }
    }

    let page = store.history(&alice, 3, None).unwrap();
    assert_eq!(texts(&page), ["a8", "a9", "a10"]);
    let page = store.history(&alice, 3, Some(page[0].cursor())).unwrap();
    assert_eq!(texts(&page), ["a-out", "a6", "a7"]);
    let page = store.history(&alice, 3, Some(page[0].cursor())).unwrap();
    assert_eq!(texts(&page), ["a3", "a4", "a5"]);
    let page = store.history(&alice, 3, Some(page[0].cursor())).unwrap();
    assert_eq!(texts(&page), ["a1", "a2"]);
    assert!(store
        .history(&alice, 3, Some(page[0].cursor()))
        .unwrap()
        .is_empty());

    assert_eq!(store.history(&alice, 100, None).unwrap().len(), 11);
    assert!(store.history(&alice, 0, None).unwrap().is_empty());
    assert!(store.history(&peer(), 10, None).unwrap().is_empty());
    assert_eq!(texts(&store.history(&bob, 2, None).unwrap()), ["b9", "b10"]);
}

#[test]
fn history_orders_by_local_time_not_sender_clock() {
    let (_d, _p, store) = setup();
    let alice = peer();
    // A sender claiming a far-future timestamp does not pin its message to the end.
    store
        .insert_incoming(&alice, &msg("liar", u64::MAX), 10)
        .unwrap();
    store.insert_incoming(&alice, &msg("later", 0), 20).unwrap();
    let h = store.history(&alice, 10, None).unwrap();
    assert_eq!(texts(&h), ["liar", "later"]);
    assert_eq!(h[0].sent_at_ms, u64::MAX);
}

#[test]
fn pagination_over_equal_timestamps() {
    let (_d, _p, store) = setup();
    let alice = peer();
    let mut ids = Vec::new();
    for i in 0..7 {
        let m = msg(&format!("m{i}"), 0);
        ids.push(m.id);
        store.insert_incoming(&alice, &m, 42).unwrap();
    }
    // Rows stored in the same millisecond read in the order they were written (one whose
    // id would sort before the newest row's is stored a millisecond later).
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = store.history(&alice, 2, before).unwrap();
        if page.is_empty() {
            break;
        }
        before = Some(page[0].cursor());
        seen.splice(0..0, page.iter().map(|m| m.id));
    }
    assert_eq!(seen, ids);
}

#[test]
fn outgoing_writes_history_and_outbox_atomically() {
    let (_d, _p, store) = setup();
    let bob = peer();
    let carol = peer();
    let m = msg("to bob", 7);
    assert_eq!(store.insert_outgoing(&bob, &m, 9).unwrap(), Inserted::New);
    let row = store.message(&m.id).unwrap().unwrap();
    assert_eq!(row.direction, Direction::Outgoing);
    assert_eq!(row.status, MessageStatus::Queued);
    assert_eq!(row.peer, bob);
    let entry = OutboxEntry {
        to: bob,
        message: m.clone(),
        attempts: 0,
        next_attempt_ms: 9,
        created_ms: 9,
        mailbox_deposited: false,
    };
    assert_eq!(store.outbox().unwrap(), vec![entry.clone()]);
    assert_eq!(store.outbox_for(&bob).unwrap(), vec![entry]);
    assert!(store.outbox_for(&carol).unwrap().is_empty());

    // Inserting again is idempotent and does not duplicate the outbox entry.
    assert_eq!(
        store.insert_outgoing(&bob, &m, 50).unwrap(),
        Inserted::Duplicate
    );
    assert_eq!(store.outbox().unwrap().len(), 1);
    // The same id to someone else is a conflict and stores nothing.
    assert_eq!(
        store.insert_outgoing(&carol, &m, 50).unwrap(),
        Inserted::Conflict
    );
    assert!(store.outbox_for(&carol).unwrap().is_empty());
    assert!(store.history(&carol, 10, None).unwrap().is_empty());
}

#[test]
fn the_outbox_schedule_reads_no_message_and_entries_load_one_at_a_time() {
    let (_d, path, store) = setup();
    let (bob, carol) = (peer(), peer());
    let to_bob: Vec<ChatMessage> = (0..3).map(|i| msg("to bob", 10 + i)).collect();
    let to_carol = msg("to carol", 20);
    for (i, m) in to_bob.iter().enumerate() {
        store.insert_outgoing(&bob, m, 100 + i as u64).unwrap();
    }
    store.insert_outgoing(&carol, &to_carol, 200).unwrap();
    let mut later = store.outbox_for(&bob).unwrap().remove(1);
    later.attempts = 2;
    later.next_attempt_ms = 5000;
    later.mailbox_deposited = true;
    assert!(store.update_outbox(&later).unwrap());
    store.mark_delivered(&bob, &to_bob[2].id).unwrap();

    let schedule = |store: &Store| {
        let mut groups: Vec<(NodeId, Vec<OutboxSlot>)> = Vec::new();
        store
            .outbox_schedule(|peer, slots| groups.push((peer, slots)))
            .unwrap();
        groups
    };
    // One visit per recipient, in the table's order, each with all its entries.
    let groups = schedule(&store);
    let mut peers = vec![bob, carol];
    peers.sort_by_key(|p| *p.as_bytes());
    assert_eq!(groups.iter().map(|g| g.0).collect::<Vec<_>>(), peers);
    let bobs = &groups.iter().find(|g| g.0 == bob).unwrap().1;
    let mut ids: Vec<MessageId> = bobs.iter().map(|s| s.id).collect();
    ids.sort_by_key(|id| id.0);
    let mut want = vec![to_bob[0].id, to_bob[1].id];
    want.sort_by_key(|id| id.0);
    assert_eq!(ids, want);
    let slot = bobs.iter().find(|s| s.id == to_bob[1].id).unwrap();
    assert_eq!(
        *slot,
        OutboxSlot {
            to: bob,
            id: to_bob[1].id,
            attempts: 2,
            next_attempt_ms: 5000,
            created_ms: 101,
            mailbox_deposited: true,
        }
    );
    // An entry with its message, as the whole outbox has it; none once delivered.
    let whole = store.outbox().unwrap();
    for e in &whole {
        assert_eq!(
            store.outbox_entry(&e.to, &e.message.id).unwrap().as_ref(),
            Some(e)
        );
    }
    assert_eq!(store.outbox_entry(&bob, &to_bob[2].id).unwrap(), None);
    assert_eq!(store.outbox_entry(&carol, &to_bob[0].id).unwrap(), None);
    drop(store);

    // A message whose row no longer decodes: the schedule is read all the same, and only
    // that entry's load fails.
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(HISTORY).unwrap();
            let key = (100u64, &to_bob[0].id.0);
            let link = t.get(key).unwrap().unwrap().value().1.map(owned_row_key);
            let link = link.as_ref().map(|(at, id)| (*at, id));
            t.insert(key, (bob.as_bytes(), link, &[0xffu8, 0xff, 0xff][..]))
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(schedule(&store), groups);
    let err = store.outbox_entry(&bob, &to_bob[0].id).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::CorruptRecord {
                table: "history",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(store.outbox().is_err());
    assert!(store.outbox_entry(&bob, &to_bob[1].id).unwrap().is_some());
    assert!(store.outbox_entry(&carol, &to_carol.id).unwrap().is_some());
    // Read together, in the order asked: the bad row fails its own entry only.
    let ids = [to_bob[1].id, to_bob[0].id, to_bob[2].id, to_carol.id];
    let together = store.outbox_entries(&bob, &ids).unwrap();
    assert_eq!(together.len(), ids.len());
    assert_eq!(
        together[0].as_ref().unwrap().as_ref().map(|e| e.message.id),
        Some(to_bob[1].id)
    );
    assert!(matches!(
        &together[1],
        Err(StoreError::CorruptRecord {
            table: "history",
            ..
        })
    ));
    assert!(matches!(together[2], Ok(None)), "delivered");
    assert!(matches!(together[3], Ok(None)), "queued for carol, not bob");
}

#[test]
fn mark_delivered_is_idempotent_and_checks_the_peer() {
    let (_d, _p, store) = setup();
    let bob = peer();
    let mallory = peer();
    let m = msg("to bob", 1);
    store.insert_outgoing(&bob, &m, 1).unwrap();
    let other = msg("also to bob", 2);
    store.insert_outgoing(&bob, &other, 2).unwrap();

    // An ack from someone else changes nothing.
    assert_eq!(
        store.mark_delivered(&mallory, &m.id).unwrap(),
        MarkOutcome::Unknown
    );
    assert_eq!(store.outbox_for(&bob).unwrap().len(), 2);
    assert_eq!(
        store.mark_delivered(&bob, &MessageId([0; 16])).unwrap(),
        MarkOutcome::Unknown
    );

    assert_eq!(
        store.mark_delivered(&bob, &m.id).unwrap(),
        MarkOutcome::Updated
    );
    assert_eq!(
        store.mark_delivered(&bob, &m.id).unwrap(),
        MarkOutcome::Unchanged
    );
    let ids: Vec<_> = store
        .outbox()
        .unwrap()
        .into_iter()
        .map(|e| e.message.id)
        .collect();
    assert_eq!(ids, [other.id]);
    assert_eq!(
        store.message(&m.id).unwrap().unwrap().status,
        MessageStatus::Delivered
    );
    // A late rejection does not undo a delivery.
    assert_eq!(
        store
            .mark_rejected(&bob, &m.id, RejectCode::TOO_LARGE)
            .unwrap(),
        MarkOutcome::Unchanged
    );
    assert_eq!(
        store.message(&m.id).unwrap().unwrap().status,
        MessageStatus::Delivered
    );
    // An update for a delivered entry does not resurrect it.
    let stale = OutboxEntry {
        to: bob,
        message: m.clone(),
        attempts: 3,
        next_attempt_ms: 99,
        created_ms: 1,
        mailbox_deposited: true,
    };
    assert!(!store.update_outbox(&stale).unwrap());
    assert_eq!(store.outbox().unwrap().len(), 1);
}

#[test]
fn mark_delivered_ignores_incoming_messages() {
    let (_d, _p, store) = setup();
    let alice = peer();
    let m = msg("from alice", 1);
    store.insert_incoming(&alice, &m, 1).unwrap();
    assert_eq!(
        store.mark_delivered(&alice, &m.id).unwrap(),
        MarkOutcome::Unknown
    );
    assert_eq!(
        store.message(&m.id).unwrap().unwrap().status,
        MessageStatus::Received
    );
}

#[test]
fn mark_rejected_leaves_the_outbox() {
    let (_d, _p, store) = setup();
    let bob = peer();
    let m = msg("nope", 1);
    store.insert_outgoing(&bob, &m, 1).unwrap();
    assert_eq!(
        store
            .mark_rejected(&bob, &m.id, RejectCode::BLOCKED)
            .unwrap(),
        MarkOutcome::Updated
    );
    assert!(store.outbox().unwrap().is_empty());
    assert_eq!(
        store.message(&m.id).unwrap().unwrap().status,
        MessageStatus::Rejected(RejectCode::BLOCKED)
    );
}

#[test]
fn update_outbox_bookkeeping() {
    let (_d, _p, store) = setup();
    let bob = peer();
    let m = msg("retry me", 1);
    store.insert_outgoing(&bob, &m, 1).unwrap();
    let mut e = store.outbox_for(&bob).unwrap().remove(0);
    e.attempts = 2;
    e.next_attempt_ms = 4_000;
    e.mailbox_deposited = true;
    // Fields that are not bookkeeping are ignored.
    e.created_ms = 12345;
    assert!(store.update_outbox(&e).unwrap());
    let got = store.outbox_for(&bob).unwrap().remove(0);
    assert_eq!(got.attempts, 2);
    assert_eq!(got.next_attempt_ms, 4_000);
    assert!(got.mailbox_deposited);
    assert_eq!(got.created_ms, 1);
    assert_eq!(got.message, m);
}

#[test]
fn reopen_keeps_history_outbox_and_contacts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let alice = peer();
    let bob = peer();
    let inc = msg("from alice", 1);
    let out = msg("to bob", 2);
    {
        let store = Store::open(&path).unwrap();
        store.insert_incoming(&alice, &inc, 10).unwrap();
        store.insert_outgoing(&bob, &out, 20).unwrap();
        store.pin_contact("alice", &alice, 5).unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.path(), path);
    assert_eq!(
        texts(&store.history(&alice, 10, None).unwrap()),
        ["from alice"]
    );
    assert_eq!(texts(&store.history(&bob, 10, None).unwrap()), ["to bob"]);
    let ob = store.outbox().unwrap();
    assert_eq!(ob.len(), 1);
    assert_eq!(ob[0].message, out);
    assert_eq!(ob[0].to, bob);
    assert_eq!(store.contact("alice").unwrap().unwrap().node_id, alice);
    // Dedup survives the restart too.
    assert_eq!(
        store.insert_incoming(&alice, &inc, 30).unwrap(),
        Inserted::Duplicate
    );
}

#[test]
fn conversations_summarize_latest_first() {
    let (_d, _p, store) = setup();
    assert!(store.conversations().unwrap().is_empty());
    let alice = peer();
    let bob = peer();
    let carol = peer();
    store.insert_incoming(&alice, &msg("a1", 0), 10).unwrap();
    store.insert_outgoing(&bob, &msg("b1", 0), 20).unwrap();
    store.insert_incoming(&alice, &msg("a2", 0), 30).unwrap();
    store.insert_incoming(&carol, &msg("c1", 0), 5).unwrap();
    let conv = store.conversations().unwrap();
    let summary: Vec<_> = conv
        .iter()
        .map(|c| (c.peer, c.last.body.as_text().unwrap()))
        .collect();
    assert_eq!(summary, [(alice, "a2"), (bob, "b1"), (carol, "c1")]);
    assert!(conv.iter().all(|c| c.peer == c.last.peer));
}

#[test]
fn a_row_is_never_stored_before_the_newest_of_its_conversation() {
    let (lo, hi) = ([1u8; 16], [2u8; 16]);
    assert_eq!(row_time(7, &lo, None), 7);
    assert_eq!(row_time(7, &lo, Some((5, hi))), 7);
    assert_eq!(row_time(5, &hi, Some((5, lo))), 5);
    assert_eq!(row_time(5, &lo, Some((5, hi))), 6);
    assert_eq!(row_time(5, &lo, Some((5, lo))), 6);
    assert_eq!(row_time(3, &hi, Some((5, lo))), 5);
    assert_eq!(row_time(3, &lo, Some((5, hi))), 6);
}

#[test]
fn a_clock_that_goes_back_does_not_reorder_a_conversation() {
    let (_d, _p, store) = setup();
    let (alice, bob) = (peer(), peer());
    store
        .insert_incoming(&alice, &msg("first", 1), 1_000)
        .unwrap();
    store.insert_incoming(&bob, &msg("bob's", 1), 500).unwrap();
    // The clock went back by 900 ms.
    let second = msg("second", 2);
    store.insert_incoming(&alice, &second, 100).unwrap();
    store
        .insert_outgoing(&alice, &msg("third", 3), 100)
        .unwrap();
    let page = store.history(&alice, 10, None).unwrap();
    assert_eq!(texts(&page), ["first", "second", "third"]);
    assert!(page.windows(2).all(|w| w[0].cursor() < w[1].cursor()));
    assert!(page[1].stored_at_ms >= 1_000);
    assert_eq!(store.message(&second.id).unwrap().unwrap(), page[1]);
    // The outbox finds the row of the message it holds.
    assert_eq!(texts(&store.history(&bob, 10, None).unwrap()), ["bob's"]);
    let queued = store.outbox_for(&alice).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].created_ms, page[2].stored_at_ms);
    // Paging back from any cursor.
    let before = store.history(&alice, 10, Some(page[2].cursor())).unwrap();
    assert_eq!(texts(&before), ["first", "second"]);
    let none = store.history(&alice, 10, Some(page[0].cursor())).unwrap();
    assert!(none.is_empty());
}

#[test]
fn a_cursor_of_no_stored_row_pages_from_the_rows_older_than_it() {
    let (_d, _p, store) = setup();
    let alice = peer();
    for (i, t) in ["a", "b", "c", "d"].iter().enumerate() {
        store
            .insert_incoming(&alice, &msg(t, 1), 10 * (i as u64 + 1))
            .unwrap();
    }
    let page = |cursor| texts(&store.history(&alice, 2, Some(cursor)).unwrap()).join("");
    // Between "b" (20) and "c" (30); after everything; before everything.
    assert_eq!(page((25, MessageId([0; 16]))), "ab");
    assert_eq!(page((u64::MAX, MessageId([0xff; 16]))), "cd");
    assert_eq!(page((0, MessageId([0; 16]))), "");
}

#[test]
fn contact_pinning() {
    let (_d, _p, store) = setup();
    let alice = peer();
    let impostor = peer();
    assert!(store.contact("alice").unwrap().is_none());
    assert_eq!(
        store.pin_contact("alice", &alice, 100).unwrap(),
        PinOutcome::New
    );
    assert_eq!(
        store.pin_contact("alice", &alice, 200).unwrap(),
        PinOutcome::Same
    );
    assert_eq!(
        store.pin_contact("alice", &impostor, 300).unwrap(),
        PinOutcome::Changed { old: alice }
    );
    // Not overwritten.
    let c = store.contact("alice").unwrap().unwrap();
    assert_eq!(
        c,
        Contact {
            node_id: alice,
            first_seen_ms: 100,
            mailbox_key: None
        }
    );
    // The caller accepts the new key explicitly.
    let accepted = Contact {
        node_id: impostor,
        first_seen_ms: 300,
        mailbox_key: Some([4; 32]),
    };
    store.set_contact("alice", &accepted).unwrap();
    assert_eq!(store.contact("alice").unwrap(), Some(accepted.clone()));
    assert_eq!(
        store.pin_contact("alice", &impostor, 400).unwrap(),
        PinOutcome::Same
    );
    store.pin_contact("bob", &alice, 500).unwrap();
    let names: Vec<_> = store
        .contacts()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(store.remove_contact("bob").unwrap());
    assert!(!store.remove_contact("bob").unwrap());
    assert_eq!(store.contacts().unwrap().len(), 1);
}

#[test]
fn newer_schema_is_refused_untouched() {
    let (_d, path, store) = setup();
    drop(store);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    match &err {
        StoreError::NewerSchema {
            found,
            supported,
            path: p,
        } => {
            assert_eq!(*found, SCHEMA_VERSION + 1);
            assert_eq!(*supported, SCHEMA_VERSION);
            assert_eq!(p, &path);
        }
        other => panic!("unexpected {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("newer"), "{text}");
    // The file still says the newer version.
    let v = stored_schema_version(&path);
    assert_eq!(v, SCHEMA_VERSION + 1);
}

/// The schema version a database file says it has, read with redb directly.
fn stored_schema_version(path: &Path) -> u64 {
    let db = Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let v = txn
        .open_table(META)
        .unwrap()
        .get(SCHEMA_VERSION_KEY)
        .unwrap()
        .unwrap()
        .value();
    v
}

#[test]
fn schema_version_is_written() {
    let (_d, path, store) = setup();
    drop(store);
    let v = stored_schema_version(&path);
    assert_eq!(v, SCHEMA_CLEAR);
}

#[test]
fn garbage_file_is_a_corrupt_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    std::fs::write(
        &path,
        b"this is not a database, just some text\n".repeat(200),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { path: p, .. } if *p == path),
        "{err:?}"
    );
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[test]
fn missing_directory_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("node.redb");
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(&err, StoreError::Open { path: p, .. } if *p == path),
        "{err:?}"
    );
}

#[test]
fn second_open_is_refused() {
    let (_d, path, _store) = setup();
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyOpen { path: p } if *p == path),
        "{err:?}"
    );
}

#[test]
fn corrupt_values_are_typed_errors() {
    let (_d, path, store) = setup();
    let alice = peer();
    let m = msg("fine", 1);
    store.insert_incoming(&alice, &m, 1).unwrap();
    store.insert_outgoing(&alice, &msg("queued", 2), 2).unwrap();
    drop(store);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(HISTORY).unwrap();
            let link = t
                .get((1, &m.id.0))
                .unwrap()
                .unwrap()
                .value()
                .1
                .map(owned_row_key);
            let link = link.as_ref().map(|(at, id)| (*at, id));
            t.insert(
                (1, &m.id.0),
                (alice.as_bytes(), link, &[0xffu8, 0xff, 0xff][..]),
            )
            .unwrap();
            let mut o = txn.open_table(OUTBOX).unwrap();
            let mut keys: Vec<([u8; 32], [u8; 16])> = Vec::new();
            for row in o.iter().unwrap() {
                let (k, _) = row.unwrap();
                let (p, id) = k.value();
                keys.push((*p, *id));
            }
            for (p, id) in &keys {
                o.insert((p, id), &[1u8, 2, 3][..]).unwrap();
            }
            let mut c = txn.open_table(CONTACTS).unwrap();
            c.insert("alice", &[][..]).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let is_corrupt = |e: StoreError, table: &str| {
        assert!(
            matches!(&e, StoreError::CorruptRecord { table: t, .. } if *t == table),
            "{e:?}"
        );
    };
    is_corrupt(store.history(&alice, 10, None).unwrap_err(), "history");
    is_corrupt(store.message(&m.id).unwrap_err(), "history");
    is_corrupt(store.insert_incoming(&alice, &m, 3).unwrap_err(), "history");
    is_corrupt(store.outbox().unwrap_err(), "outbox");
    is_corrupt(store.contact("alice").unwrap_err(), "contacts");
    is_corrupt(
        store.pin_contact("alice", &alice, 1).unwrap_err(),
        "contacts",
    );
}

#[test]
fn invalid_node_id_in_key_is_a_typed_error() {
    let (_d, path, store) = setup();
    drop(store);
    // Find 32 bytes that are not a valid ed25519 point.
    let bad = (0u8..=255)
        .map(|b| [b; 32])
        .find(|k| NodeId::from_bytes(k).is_err())
        .unwrap();
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let rec = MessageRecord {
                direction: Direction::Incoming,
                sent_at_ms: 0,
                body: Body::Text("x".into()),
                status: MessageStatus::Received,
            };
            let mut t = txn.open_table(HISTORY).unwrap();
            t.insert(
                (1, &[5; 16]),
                (&bad, None, to_bytes("history", &rec).unwrap().as_slice()),
            )
            .unwrap();
            let mut c = txn.open_table(CONVERSATIONS).unwrap();
            c.insert(&bad, (1, &[5; 16])).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert!(matches!(
        store.conversations().unwrap_err(),
        StoreError::CorruptRecord {
            reason: RecordError::InvalidNodeId,
            ..
        }
    ));
}

#[test]
fn records_reject_trailing_bytes() {
    let rec = Contact {
        node_id: peer(),
        first_seen_ms: 1,
        mailbox_key: None,
    };
    let mut bytes = to_bytes("contacts", &rec).unwrap();
    assert_eq!(from_bytes::<Contact>(&bytes).unwrap(), rec);
    bytes.push(0);
    assert!(matches!(
        from_bytes::<Contact>(&bytes),
        Err(RecordError::TrailingBytes(1))
    ));
}

#[test]
fn invalid_messages_are_not_stored() {
    let (_d, _p, store) = setup();
    let alice = peer();
    let mut m = msg("x", 1);
    m.body = Body::Text("x".repeat(crate::wire::MAX_TEXT_LEN + 1));
    assert!(matches!(
        store.insert_incoming(&alice, &m, 1),
        Err(StoreError::InvalidMessage(_))
    ));
    assert!(matches!(
        store.insert_outgoing(&alice, &m, 1),
        Err(StoreError::InvalidMessage(_))
    ));
    assert!(store.message(&m.id).unwrap().is_none());
    assert!(store.outbox().unwrap().is_empty());
}

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
}

#[test]
fn in_memory_store_works_like_the_file() {
    let store = Store::open_in_memory().unwrap();
    let alice = peer();
    let m = msg("in memory", 1);
    assert_eq!(
        store.insert_outgoing(&alice, &m, 10).unwrap(),
        Inserted::New
    );
    assert_eq!(store.outbox().unwrap().len(), 1);
    assert_eq!(
        store.mark_delivered(&alice, &m.id).unwrap(),
        MarkOutcome::Updated
    );
    assert!(store.outbox().unwrap().is_empty());
    let hist = store.history(&alice, 10, None).unwrap();
    assert_eq!(texts(&hist), ["in memory"]);
    assert_eq!(hist[0].status, MessageStatus::Delivered);
}

// ---------------------------------------------------------------------------------------
// Files and encryption at rest
// ---------------------------------------------------------------------------------------

const MARKER: &str = "zebra-marker-4711";

fn file_has(path: &Path, needle: &str) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Inserts one message of each kind, marks one delivered and one rejected, pins a
/// contact, and returns what the store then shows, to compare across modes.
fn exercise(store: &Store, alice: NodeId, bob: NodeId, text: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let ids: Vec<MessageId> = (0..4u64)
        .map(|i| {
            let m = ChatMessage {
                id: MessageId([i as u8 + 1; 16]),
                ..msg(&format!("{text} {i}"), i)
            };
            let out = if i % 2 == 0 {
                store.insert_incoming(&alice, &m, 10 + i)
            } else {
                store.insert_outgoing(&bob, &m, 10 + i)
            };
            seen.push(format!("{:?}", out.unwrap()));
            m.id
        })
        .collect();
    let again = ChatMessage {
        id: ids[0],
        ..msg("again", 0)
    };
    seen.push(format!("{:?}", store.insert_incoming(&alice, &again, 99)));
    seen.push(format!("{:?}", store.insert_outgoing(&bob, &again, 99)));
    seen.push(format!("{:?}", store.mark_delivered(&bob, &ids[1])));
    seen.push(format!(
        "{:?}",
        store.mark_rejected(&bob, &ids[3], RejectCode::ID_CONFLICT)
    ));
    seen.push(format!(
        "{:?}",
        store.mark_rejected(&bob, &ids[1], RejectCode::ID_CONFLICT)
    ));
    seen.push(format!("{:?}", store.pin_contact("alice", &alice, 5)));
    seen.push(format!("{:?}", store.history(&alice, 10, None)));
    seen.push(format!("{:?}", store.history(&bob, 1, Some((13, ids[3])))));
    seen.push(format!("{:?}", store.outbox()));
    seen.push(format!("{:?}", store.conversations()));
    seen.push(format!("{:?}", store.message(&ids[2])));
    seen
}

#[test]
fn an_encrypted_store_behaves_like_a_clear_one_and_hides_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (peer(), peer());
    let clear_path = dir.path().join("clear.redb");
    let sealed_path = dir.path().join("sealed.redb");
    let key = SecretKey::generate().history_key();
    let clear = exercise(&Store::open(&clear_path).unwrap(), alice, bob, MARKER);
    let store = Store::open_with_key(&sealed_path, key.clone(), true).unwrap();
    assert!(store.is_encrypted());
    let sealed = exercise(&store, alice, bob, MARKER);
    assert_eq!(clear, sealed);
    assert!(sealed.iter().any(|s| s.contains(MARKER)));
    drop(store);
    assert!(file_has(&clear_path, MARKER), "the clear store is clear");
    assert!(
        !file_has(&sealed_path, MARKER),
        "no text in the encrypted file"
    );
    assert_eq!(stored_schema_version(&sealed_path), SCHEMA_SEALED);
    // Reopened with the key, encrypted or not asked, it reads the same and stays sealed.
    let store = Store::open_with_key(&sealed_path, key, false).unwrap();
    assert!(store.is_encrypted());
    assert_eq!(
        format!("{:?}", store.history(&alice, 10, None)),
        clear[clear.len() - 5]
    );
    store
        .insert_incoming(&alice, &msg(&format!("{MARKER} later"), 1), 50)
        .unwrap();
    drop(store);
    assert!(!file_has(&sealed_path, MARKER));
}

#[test]
fn an_encrypted_store_opens_only_with_its_key_and_is_left_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let key = SecretKey::generate().history_key();
    let store = Store::open_with_key(&path, key.clone(), true).unwrap();
    store
        .insert_incoming(&peer(), &msg("secret", 1), 1)
        .unwrap();
    drop(store);
    let before = contents(&path);
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(&err, StoreError::KeyRequired { path: p } if *p == path),
        "{err:?}"
    );
    let other = SecretKey::generate().history_key();
    for encrypt in [false, true] {
        let err = Store::open_with_key(&path, other.clone(), encrypt).unwrap_err();
        assert!(
            matches!(&err, StoreError::WrongKey { path: p } if *p == path),
            "{err:?}"
        );
        assert!(err.to_string().contains("another identity"), "{err}");
    }
    assert_eq!(contents(&path), before, "nothing changed");
    Store::open_with_key(&path, key, true).unwrap();
}

#[test]
fn a_clear_store_is_encrypted_in_place_with_everything_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let (alice, bob) = (peer(), peer());
    let clear = exercise(&Store::open(&path).unwrap(), alice, bob, MARKER);
    assert!(file_has(&path, MARKER));
    let key = SecretKey::generate().history_key();
    let store = Store::open_with_key(&path, key.clone(), true).unwrap();
    assert!(store.is_encrypted());
    let n = clear.len();
    assert_eq!(
        format!("{:?}", store.history(&alice, 10, None)),
        clear[n - 5]
    );
    assert_eq!(format!("{:?}", store.outbox()), clear[n - 3]);
    assert_eq!(format!("{:?}", store.conversations()), clear[n - 2]);
    assert_eq!(store.contacts().unwrap().len(), 1);
    drop(store);
    assert!(
        !file_has(&path, MARKER),
        "the clear rows are gone from the file"
    );
    assert_eq!(stored_schema_version(&path), SCHEMA_SEALED);
    assert_eq!(mode(&path), 0o600);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        [std::ffi::OsString::from("node.redb")],
        "no copy is left"
    );
    Store::open_with_key(&path, key, true).unwrap();
}

#[test]
fn a_sealed_row_moved_to_another_key_does_not_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let key = SecretKey::generate().history_key();
    let (alice, mallory) = (peer(), peer());
    let store = Store::open_with_key(&path, key.clone(), true).unwrap();
    let m = msg("to alice", 1);
    store.insert_incoming(&alice, &m, 1).unwrap();
    let other = msg("from mallory", 1);
    store.insert_incoming(&mallory, &other, 2).unwrap();
    drop(store);
    {
        // Swap the two sealed values.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(HISTORY).unwrap();
            let a = (*alice.as_bytes(), 1, m.id.0);
            let b = (*mallory.as_bytes(), 2, other.id.0);
            let va = t.get(row_key(&a)).unwrap().unwrap().value().2.to_vec();
            let vb = t.get(row_key(&b)).unwrap().unwrap().value().2.to_vec();
            t.insert(row_key(&a), (&a.0, None, vb.as_slice())).unwrap();
            t.insert(row_key(&b), (&b.0, None, va.as_slice())).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open_with_key(&path, key, true).unwrap();
    let err = store.history(&alice, 10, None).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::CorruptRecord {
                reason: RecordError::Decrypt(_),
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn an_opened_row_is_read_again_only_while_its_stored_value_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let store = Store::open_with_key(&path, SecretKey::generate().history_key(), true).unwrap();
    let alice = peer();
    let m = msg("first words", 1);
    store.insert_incoming(&alice, &m, 1).unwrap();
    assert_eq!(
        texts(&store.history(&alice, 10, None).unwrap()),
        ["first words"]
    );
    // Another value sealed for the same row, written behind the store's back: the row
    // reads as stored.
    let row = (*alice.as_bytes(), 1, m.id.0);
    let value = {
        let db = store.db().unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(HISTORY).unwrap();
        let v = t.get(row_key(&row)).unwrap().unwrap().value().2.to_vec();
        v
    };
    let mut rec = store.decode_message(&row, &value).unwrap();
    rec.body = Body::Text("other words".into());
    let other = store.cipher.seal(&row, to_bytes("messages", &rec).unwrap());
    let write = |v: &[u8]| {
        let db = store.db().unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(HISTORY)
            .unwrap()
            .insert(row_key(&row), (&row.0, None, v))
            .unwrap();
        txn.commit().unwrap();
    };
    write(&other);
    let read = || store.history(&alice, 10, None).unwrap();
    assert_eq!(texts(&read()), ["other words"]);
    // The first value written back reads as first written.
    write(&value);
    assert_eq!(texts(&read()), ["first words"]);
}

#[test]
fn a_leftover_rewrite_is_removed_and_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let store = Store::open(&path).unwrap();
    store.insert_incoming(&peer(), &msg(MARKER, 1), 1).unwrap();
    drop(store);
    let leftover = rewrite_path(&path);
    std::fs::write(&leftover, b"half a copy").unwrap();
    let store = Store::open_with_key(&path, SecretKey::generate().history_key(), true).unwrap();
    assert!(store.is_encrypted());
    assert!(!leftover.exists());
}

#[test]
fn the_file_is_created_0600_and_a_too_open_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (_d, path, store) = setup();
    drop(store);
    assert_eq!(mode(&path), 0o600);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Access(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("chmod 600 {}", path.display())),
        "{err}"
    );
}

#[test]
fn a_record_written_from_a_borrowed_body_is_the_owned_record() {
    let m = msg("borrowed, not copied", 42);
    let owned = MessageRecord {
        direction: Direction::Outgoing,
        sent_at_ms: m.sent_at_ms,
        body: m.body.clone(),
        status: MessageStatus::Queued,
    };
    let borrowed = MessageRecordRef {
        direction: Direction::Outgoing,
        sent_at_ms: m.sent_at_ms,
        body: &m.body,
        status: MessageStatus::Queued,
    };
    let bytes = to_bytes("messages", &borrowed).unwrap();
    assert_eq!(bytes, to_bytes("messages", &owned).unwrap());
    let back: MessageRecord = from_bytes(&bytes).unwrap();
    assert_eq!(back.body, m.body);
    assert_eq!(back.status, MessageStatus::Queued);
}

/// Writes a database of schema 1 (clear) or 2 (sealed under `key`) by hand, as builds
/// before schema 3 did: `rows` are `(peer, stored_at_ms, message, direction)`.
fn write_by_conversation(
    path: &Path,
    key: Option<&HistoryKey>,
    rows: &[(NodeId, u64, &ChatMessage, Direction)],
) {
    // As those builds typed them: arrays owned, the same bytes.
    const OLD_MESSAGES: redb::TableDefinition<'_, MessageKey, &[u8]> =
        redb::TableDefinition::new("messages");
    const OLD_IDS: redb::TableDefinition<'_, [u8; 16], ([u8; 32], u64)> =
        redb::TableDefinition::new("message_ids");
    const OLD_OUTBOX: redb::TableDefinition<'_, ([u8; 32], [u8; 16]), &[u8]> =
        redb::TableDefinition::new("outbox");
    let cipher = match key {
        Some(k) => RowCipher::Sealed(k.clone()),
        None => RowCipher::Clear,
    };
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(META).unwrap();
        match key {
            Some(k) => {
                meta.insert(SCHEMA_VERSION_KEY, SCHEMA_SEALED_BY_CONVERSATION)
                    .unwrap();
                meta.insert(HISTORY_KEY_CHECK_KEY, k.check_value()).unwrap();
            }
            None => {
                meta.insert(SCHEMA_VERSION_KEY, SCHEMA_CLEAR_BY_CONVERSATION)
                    .unwrap();
            }
        }
        let mut messages = txn.open_table(OLD_MESSAGES).unwrap();
        let mut ids = txn.open_table(OLD_IDS).unwrap();
        let mut outbox = txn.open_table(OLD_OUTBOX).unwrap();
        for (peer, at, m, direction) in rows {
            let row = (*peer.as_bytes(), *at, m.id.0);
            let rec = MessageRecord {
                direction: *direction,
                sent_at_ms: m.sent_at_ms,
                body: m.body.clone(),
                status: match direction {
                    Direction::Incoming => MessageStatus::Received,
                    Direction::Outgoing => MessageStatus::Queued,
                },
            };
            let value = cipher.seal(&row, to_bytes("messages", &rec).unwrap());
            messages.insert(row, value.as_slice()).unwrap();
            ids.insert(m.id.0, (row.0, row.1)).unwrap();
            if *direction == Direction::Outgoing {
                let queued = OutboxRecord {
                    attempts: 0,
                    next_attempt_ms: *at,
                    created_ms: *at,
                    mailbox_deposited: false,
                };
                let queued = to_bytes("outbox", &queued).unwrap();
                outbox.insert((row.0, row.2), queued.as_slice()).unwrap();
            }
        }
        txn.open_table(CONTACTS).unwrap();
    }
    txn.commit().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The names of the tables of a database file, read with redb directly.
fn table_names(path: &Path) -> Vec<String> {
    let db = Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let names = txn
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_owned())
        .collect();
    names
}

#[test]
fn a_history_kept_by_conversation_opens_moved_to_storage_order() {
    for sealed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let key = SecretKey::generate().history_key();
        let (alice, bob) = (peer(), peer());
        let (a1, a2, b1, a3) = (msg("a1", 1), msg("a2", 2), msg("b1", 3), msg("a3 out", 4));
        write_by_conversation(
            &path,
            sealed.then_some(&key),
            &[
                (alice, 10, &a1, Direction::Incoming),
                (bob, 15, &b1, Direction::Incoming),
                (alice, 20, &a2, Direction::Incoming),
                (alice, 30, &a3, Direction::Outgoing),
            ],
        );
        let store = match sealed {
            true => Store::open_with_key(&path, key.clone(), true).unwrap(),
            false => Store::open(&path).unwrap(),
        };
        assert_eq!(store.is_encrypted(), sealed);
        let history = store.history(&alice, 10, None).unwrap();
        assert_eq!(texts(&history), ["a1", "a2", "a3 out"]);
        assert_eq!(
            history.iter().map(|m| m.stored_at_ms).collect::<Vec<_>>(),
            [10, 20, 30]
        );
        assert_eq!(history[2].status, MessageStatus::Queued);
        assert_eq!(texts(&store.history(&bob, 10, None).unwrap()), ["b1"]);
        assert_eq!(store.message_count().unwrap(), 4);
        assert_eq!(store.message(&b1.id).unwrap().unwrap().stored_at_ms, 15);
        let conv = store.conversations().unwrap();
        assert_eq!(
            conv.iter().map(|c| (c.peer, c.last.id)).collect::<Vec<_>>(),
            [(alice, a3.id), (bob, b1.id)]
        );
        assert_eq!(store.outbox_for(&alice).unwrap()[0].message, a3);
        // Deduplication still knows every moved id, and new rows link to the moved ones.
        assert_eq!(
            store.insert_incoming(&alice, &a2, 40).unwrap(),
            Inserted::Duplicate
        );
        store.insert_incoming(&alice, &msg("a4", 5), 40).unwrap();
        assert_eq!(
            store.mark_delivered(&alice, &a3.id).unwrap(),
            MarkOutcome::Updated
        );
        let history = store.history(&alice, 10, None).unwrap();
        assert_eq!(texts(&history), ["a1", "a2", "a3 out", "a4"]);
        assert_eq!(history[2].status, MessageStatus::Delivered);
        drop(store);
        let version = stored_schema_version(&path);
        assert_eq!(version, if sealed { SCHEMA_SEALED } else { SCHEMA_CLEAR });
        let tables = table_names(&path);
        assert!(!tables.iter().any(|t| t == "messages"), "{tables:?}");
    }
}

#[test]
fn a_link_to_a_row_that_is_not_older_is_a_typed_error_not_a_loop() {
    let (_d, path, store) = setup();
    let alice = peer();
    let m = msg("looped", 1);
    store.insert_incoming(&alice, &m, 10).unwrap();
    store
        .insert_incoming(&alice, &msg("newest", 1), 20)
        .unwrap();
    drop(store);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(HISTORY).unwrap();
            let value = t.get((10, &m.id.0)).unwrap().unwrap().value().2.to_vec();
            // The oldest row now links to itself.
            t.insert(
                (10, &m.id.0),
                (alice.as_bytes(), Some((10, &m.id.0)), value.as_slice()),
            )
            .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let err = store.history(&alice, 10, None).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::CorruptRecord {
                reason: RecordError::BrokenLink(_),
                ..
            }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The write log
// ---------------------------------------------------------------------------------------

/// What a kill -9 leaves of the store at `from` (the files as the kernel has them), copied
/// to a new directory: the database and, with `with_log`, its write log.
fn crash_copy(from: &Path, with_log: bool) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("node.redb");
    std::fs::copy(from, &to).unwrap();
    if with_log {
        std::fs::copy(log::path_of(from), log::path_of(&to)).unwrap();
    }
    (dir, to)
}

fn outgoing(to: NodeId, msg: &ChatMessage, now_ms: u64) -> WriteOp {
    WriteOp::Outgoing {
        to,
        msg: msg.clone(),
        now_ms,
    }
}

fn log_len(db: &Path) -> u64 {
    std::fs::metadata(log::path_of(db)).unwrap().len()
}

#[test]
fn acknowledged_writes_survive_a_crash_before_they_fold() {
    let (_d, path, store) = setup();
    let (alice, bob) = (peer(), peer());
    let sent = msg("to bob", 1);
    store
        .write_batch(&[
            incoming(alice, &msg("one", 1), 10),
            outgoing(bob, &sent, 11),
        ])
        .unwrap();
    store.insert_incoming(&alice, &msg("two", 2), 12).unwrap();
    // A batch of marks only: written to the log, not synced; kept by the next sync.
    store
        .write_batch(&[WriteOp::Finish {
            peer: bob,
            id: sent.id,
            status: MessageStatus::Delivered,
        }])
        .unwrap();
    store.insert_incoming(&alice, &msg("three", 3), 13).unwrap();
    assert!(store.unfolded());

    // The database file alone does not have them: the log does.
    let (_c, bare) = crash_copy(&path, false);
    let opened = Store::open(&bare).unwrap();
    assert!(opened.history(&alice, 10, None).unwrap().is_empty());
    drop(opened);

    let (_c, copy) = crash_copy(&path, true);
    let opened = Store::open(&copy).unwrap();
    assert_eq!(
        texts(&opened.history(&alice, 10, None).unwrap()),
        ["one", "two", "three"]
    );
    let to_bob = opened.history(&bob, 10, None).unwrap();
    assert_eq!(to_bob[0].status, MessageStatus::Delivered);
    assert!(opened.outbox().unwrap().is_empty());
    // Applied and folded: the log is empty, and the rows keep the times they had.
    assert_eq!(log_len(&copy), 0);
    assert!(!opened.unfolded());
    assert_eq!(
        opened.history(&alice, 10, None).unwrap(),
        store.history(&alice, 10, None).unwrap()
    );
    // A clean close removes the log; the history stays.
    drop(opened);
    assert!(!log::path_of(&copy).exists());
    let opened = Store::open(&copy).unwrap();
    assert_eq!(opened.message_count().unwrap(), 4);
}

#[test]
fn reads_see_acknowledged_writes_and_a_crash_after_them_loses_nothing() {
    let (_d, path, store) = setup();
    let alice = peer();
    for i in 0..5u64 {
        store
            .insert_incoming(&alice, &msg(&format!("m{i}"), i), 100 + i)
            .unwrap();
        // The read commits the open transaction without waiting for the disk.
        assert_eq!(store.history(&alice, 10, None).unwrap().len() as u64, i + 1);
    }
    assert!(store.unfolded(), "read commits do not fold");
    let (_c, copy) = crash_copy(&path, true);
    let opened = Store::open(&copy).unwrap();
    assert_eq!(
        texts(&opened.history(&alice, 10, None).unwrap()),
        ["m0", "m1", "m2", "m3", "m4"]
    );
    // A crash right after that open (before any write) applies nothing twice.
    let (_c2, again) = crash_copy(&copy, true);
    drop(opened);
    let opened = Store::open(&again).unwrap();
    assert_eq!(opened.message_count().unwrap(), 5);
}

#[test]
fn a_record_cut_short_by_a_crash_is_not_applied() {
    let (_d, path, store) = setup();
    let alice = peer();
    store.insert_incoming(&alice, &msg("whole", 1), 10).unwrap();
    let before = store.pending.lock().unwrap().log.as_ref().unwrap().end();
    store.insert_incoming(&alice, &msg("cut", 2), 11).unwrap();
    let (_c, copy) = crash_copy(&path, true);
    let log_file = std::fs::OpenOptions::new()
        .write(true)
        .open(log::path_of(&copy))
        .unwrap();
    log_file.set_len(before + 20).unwrap();
    let opened = Store::open(&copy).unwrap();
    assert_eq!(texts(&opened.history(&alice, 10, None).unwrap()), ["whole"]);
}

#[test]
fn the_log_of_another_database_is_never_applied() {
    let (_d, path, store) = setup();
    let (_d2, other_path, other) = setup();
    let alice = peer();
    other
        .insert_incoming(&alice, &msg("elsewhere", 1), 10)
        .unwrap();
    store.insert_incoming(&alice, &msg("here", 1), 10).unwrap();
    let (_c, copy) = crash_copy(&path, false);
    std::fs::copy(log::path_of(&other_path), log::path_of(&copy)).unwrap();
    let opened = Store::open(&copy).unwrap();
    assert_eq!(opened.message_count().unwrap(), 0);
    assert_eq!(log_len(&copy), 0, "emptied on open");
}

#[test]
fn a_damaged_record_that_passes_its_checksum_is_a_typed_error_naming_the_log() {
    let (_d, path, store) = setup();
    store.insert_incoming(&peer(), &msg("hi", 1), 10).unwrap();
    let (_c, copy) = crash_copy(&path, true);
    // A record of the database's epoch, with a good checksum, that is not a batch.
    let epoch = store.pending.lock().unwrap().log.as_ref().unwrap().epoch();
    {
        let mut forged = log::Log::open(&log::path_of(&copy), epoch).unwrap();
        forged.append(&[0xff; 40], true).unwrap();
    }
    let err = Store::open(&copy).unwrap_err();
    assert!(
        matches!(&err, StoreError::CorruptLog { offset: 0, .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("node.redb-log") && text.contains("move the file"),
        "{text}"
    );
    assert!(log_len(&copy) > 0, "the log is left as it was");
}

#[test]
fn writes_fold_after_a_bound_and_bulk_batches_commit_directly() {
    let (_d, path, store) = setup();
    let alice = peer();
    let mut n = 0u64;
    let mut batch = |count: usize, text_len: usize| -> Vec<WriteOp> {
        (0..count)
            .map(|_| {
                n += 1;
                incoming(alice, &msg(&"x".repeat(text_len), n), n)
            })
            .collect()
    };
    // Small batches stay in the log until FOLD_WRITES writes.
    for _ in 0..16 {
        store.write_batch(&batch(FOLD_WRITES / 16 - 1, 10)).unwrap();
        assert!(store.unfolded());
    }
    store.write_batch(&batch(16, 10)).unwrap();
    assert!(!store.unfolded(), "folded at {FOLD_WRITES} writes");
    // A batch larger than a log record is committed at once, not logged.
    let bulk = batch(5, 16 * 1024);
    store.write_batch(&bulk).unwrap();
    assert!(!store.unfolded());
    let (_c, bare) = crash_copy(&path, false);
    assert_eq!(
        Store::open(&bare).unwrap().message_count().unwrap(),
        FOLD_WRITES as u64 + 5
    );
}

#[test]
fn an_encrypted_store_logs_sealed_writes_and_applies_them_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let key = SecretKey::generate().history_key();
    let store = Store::open_with_key(&path, key.clone(), true).unwrap();
    let alice = peer();
    store
        .insert_incoming(&alice, &msg("a secret in the log", 1), 10)
        .unwrap();
    let (_c, copy) = crash_copy(&path, true);
    let logged = std::fs::read(log::path_of(&copy)).unwrap();
    assert!(!logged.windows(6).any(|w| w == b"secret"), "sealed");
    assert!(matches!(
        Store::open(&copy),
        Err(StoreError::KeyRequired { .. })
    ));
    let opened = Store::open_with_key(&copy, key, false).unwrap();
    assert_eq!(
        texts(&opened.history(&alice, 10, None).unwrap()),
        ["a secret in the log"]
    );
}

#[test]
fn opening_and_reading_a_database_changes_nothing_it_holds() {
    let (_d, path, store) = setup();
    store.insert_incoming(&peer(), &msg("x", 1), 1).unwrap();
    store.insert_outgoing(&peer(), &msg("y", 2), 2).unwrap();
    store.pin_contact("bob", &peer(), 3).unwrap();
    drop(store);
    let before = contents(&path);
    for _ in 0..2 {
        let store = Store::open(&path).unwrap();
        assert_eq!(store.message_count().unwrap(), 2);
        assert!(!store.unfolded());
    }
    assert_eq!(contents(&path), before, "the rows changed");
    assert!(!log::path_of(&path).exists());
}

/// Every row of every table of the database at `path`, read with redb directly: what
/// the file holds, whatever redb's own bookkeeping in it (which redb 4 rewrites when a
/// database closes).
fn contents(path: &Path) -> Vec<String> {
    fn rows<K: redb::Key + 'static, V: redb::Value + 'static>(
        txn: &redb::ReadTransaction,
        table: redb::TableDefinition<'_, K, V>,
        out: &mut Vec<String>,
    ) where
        for<'a> K::SelfType<'a>: std::fmt::Debug,
        for<'a> V::SelfType<'a>: std::fmt::Debug,
    {
        for row in txn.open_table(table).unwrap().iter().unwrap() {
            let (k, v) = row.unwrap();
            out.push(format!("{}: {:?} -> {:?}", table, k.value(), v.value()));
        }
    }
    let db = Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let mut out = Vec::new();
    rows(&txn, META, &mut out);
    rows(&txn, HISTORY, &mut out);
    rows(&txn, CONVERSATIONS, &mut out);
    rows(&txn, MESSAGE_IDS, &mut out);
    rows(&txn, OUTBOX, &mut out);
    rows(&txn, CONTACTS, &mut out);
    out
}

#[test]
fn a_prepared_log_takes_the_first_write_without_growing() {
    let (_d, path, store) = setup();
    // The log is readied (its first step written ahead), and one write then fits in it.
    let first_write_fits = |text: &str, at: u64, when: &str| {
        let ready = log_len(&path);
        assert!(ready > 0, "the log is not readied {when}");
        store.insert_incoming(&peer(), &msg(text, at), at).unwrap();
        assert_eq!(log_len(&path), ready, "the first write {when} grew the log");
    };
    // Emptied by the open.
    assert_eq!(log_len(&path), 0);
    store.prepare_log().unwrap();
    first_write_fits("first", 10, "after the open");
    // Preparing again changes nothing, and nothing written is lost.
    let ready = log_len(&path);
    store.prepare_log().unwrap();
    assert_eq!(log_len(&path), ready);
    // A reopen (the heal after an I/O error) readies the new log the same way.
    store.reopen().unwrap();
    first_write_fits("after the reopen", 20, "after a reopen");
    drop(store);
    let opened = Store::open(&path).unwrap();
    assert_eq!(opened.message_count().unwrap(), 2);
}
