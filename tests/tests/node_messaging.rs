//! The messaging runtime end to end: several nodes and a discovery server on loopback.
//!
//! Every wait is on an event (or a poll) with a deadline; no fixed ports.

mod common;

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context, Result};
use chacha20poly1305::{aead::Aead, ChaCha20Poly1305, KeyInit};
use hkdf::Hkdf;
use p2p_crypto::{seal, Domain, MailboxPublicKey, NodeId, SecretKey};
use p2p_node::{
    node::{CLOSE_BAD_FRAME, CLOSE_UNEXPECTED_FRAME},
    store::{Direction, MessageStatus},
    wire::{self, Ack, AckStatus, ChatMessage, Frame, MessageId},
    BindError, Endpoint, Node, NodeEvent, Queued, RegisterError, ResolveError, SendError,
    SendStatus, Timings, TransportSettings, Via,
};
use sha2::Sha256;

use common::*;

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn online_send_arrives_once_acknowledged_in_both_histories() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob.start(&d.url).await?;
    b.register("bob").await?;
    let a = alice.start(&d.url).await?;
    let mut a_ev = a.subscribe();
    let mut b_ev = b.subscribe();
    assert!(matches!(
        a.register("bob").await,
        Err(RegisterError::NameTaken { name }) if name == "bob"
    ));

    let out = a.send("bob", "hello bob").await?;
    assert_eq!(out.status, SendStatus::Delivered);
    assert_eq!(out.to, bob.id());

    let ev = next_event(&mut b_ev, "message at bob", is_received).await?;
    let NodeEvent::MessageReceived {
        from, message, via, ..
    } = ev
    else {
        bail!("unexpected event");
    };
    assert_eq!(from, alice.id(), "attributed to the authenticated sender");
    assert_eq!(via, Via::Direct);
    assert_eq!(message.id, out.id);
    assert_eq!(text(&message), "hello bob");
    next_event(&mut a_ev, "delivered at alice", is_delivered(out.id)).await?;

    let at_b = b.history(&alice.id().to_string(), 10).await?;
    assert_eq!(at_b.len(), 1, "stored once: {at_b:?}");
    assert_eq!(at_b[0].id, out.id);
    assert_eq!(at_b[0].peer, alice.id());
    assert_eq!(at_b[0].direction, Direction::Incoming);
    assert_eq!(at_b[0].status, MessageStatus::Received);
    let at_a = a.history("bob", 10).await?;
    assert_eq!(at_a.len(), 1);
    assert!(a
        .history_before("bob", 10, Some(at_a[0].cursor()))
        .await?
        .is_empty());
    assert_eq!(at_a[0].direction, Direction::Outgoing);
    assert_eq!(at_a[0].status, MessageStatus::Delivered);
    assert!(a.outbox().await?.is_empty());
    assert!(
        !queued_events(&mut b_ev).iter().any(is_received),
        "no second delivery"
    );

    // The answer comes back on the same connection, and names resolve both ways.
    let back = b.send(&alice.id().to_string(), "hi alice").await?;
    assert_eq!(back.status, SendStatus::Delivered);
    assert_eq!(a.name_of(&bob.id()).as_deref(), Some("bob"));
    let peers = a.peers().await?;
    assert!(peers.iter().any(|p| p.node_id == bob.id()));

    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn offline_send_goes_through_the_mailbox_and_the_receipt_marks_it_delivered() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob.start(&d.url).await?;
    b.register("bob").await?;
    b.shutdown().await;

    let a = alice.start(&d.url).await?;
    a.register("alice").await?;
    let out = a.send("bob", "while you were away").await?;
    assert_eq!(out.status, SendStatus::Queued);
    let entries = a.outbox().await?;
    assert_eq!(entries.len(), 1);
    assert!(entries[0].mailbox_deposited, "sealed copy deposited");
    a.shutdown().await;

    // Bob starts while Alice is down: the message waits in his mailbox.
    let builder = bob.builder(&d.url);
    let mut b_ev = builder.subscribe();
    let b = builder.bind().await?;
    let ev = next_event(&mut b_ev, "mailbox message at bob", is_received).await?;
    let NodeEvent::MessageReceived {
        from, message, via, ..
    } = ev
    else {
        bail!("unexpected event");
    };
    assert_eq!(from, alice.id());
    assert_eq!(via, Via::Mailbox);
    assert_eq!(message.id, out.id);
    // Wait for the drain (and its receipt) to finish, then check it emptied the mailbox.
    assert_eq!(b.drain_mailbox().await?, 0);
    let left = d.client()?.fetch_mailbox(&bob.sk).await?;
    assert!(left.items.is_empty(), "drained mailbox is deleted");
    assert_eq!(b.history(&alice.id().to_string(), 10).await?.len(), 1);
    b.shutdown().await;

    // Alice comes back: Bob's receipt in her mailbox marks the message delivered.
    let builder = alice.builder(&d.url);
    let mut a_ev = builder.subscribe();
    let a = builder.bind().await?;
    next_event(&mut a_ev, "receipt at alice", is_delivered(out.id)).await?;
    let hist = a.history(&bob.id().to_string(), 10).await?;
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0].status, MessageStatus::Delivered);
    assert!(a.outbox().await?.is_empty());
    a.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_burst_of_sends_to_an_offline_peer_is_all_deposited_in_its_mailbox() -> Result<()> {
    // 200 sends at once to a peer that is offline: each deposits a sealed copy in its
    // mailbox. A server takes only so many connections from one address (64 by
    // default; 24 here, every test node being on 127.0.0.1) and answers more with `503
    // too_many_connections`: a node that made every deposit at once would get some
    // refused, and those messages would wait in its outbox only.
    const SENDS: usize = 200;
    let d = Discovery::start_with_config(p2p_discovery::ServerConfig {
        max_connections_per_ip: 24,
        ..Default::default()
    })
    .await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob.start(&d.url).await?;
    b.register("bob").await?;
    b.shutdown().await;
    let a = alice.start(&d.url).await?;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..SENDS {
        let (a, to) = (a.clone(), bob.id());
        sends.spawn(async move { a.send_to(&to, &format!("m{i}")).await });
    }
    let mut in_mailbox = 0;
    while let Some(out) = tokio::time::timeout(DEADLINE, sends.join_next())
        .await
        .context("sends still running")?
    {
        let out = out??;
        assert_eq!(out.status, SendStatus::Queued);
        if out.queued == Some(Queued::Mailbox) {
            in_mailbox += 1;
        }
    }
    assert_eq!(in_mailbox, SENDS, "every message sealed in bob's mailbox");
    a.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn restart_keeps_history_and_outbox_and_the_outbox_delivers_when_the_peer_comes_up(
) -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    // Bob has never been seen by discovery: no address, no mailbox key.
    let a = alice.start(&d.url).await?;
    let first = a.send(&bob.id().to_string(), "first").await?;
    let second = a.send(&bob.id().to_string(), "second").await?;
    assert_eq!(first.status, SendStatus::Queued);
    assert_eq!(second.status, SendStatus::Queued);
    a.shutdown().await;

    let a = alice.start(&d.url).await?;
    let mut a_ev = a.subscribe();
    let outbox = a.outbox().await?;
    assert_eq!(outbox.len(), 2, "outbox survives a restart");
    let hist = a.history(&bob.id().to_string(), 10).await?;
    assert_eq!(
        hist.iter().map(text).collect::<Vec<_>>(),
        ["first", "second"],
        "history survives a restart"
    );
    assert!(hist.iter().all(|m| m.status == MessageStatus::Queued));

    // Bob comes up while Alice runs: her outbox delivers directly.
    let builder = bob.builder(&d.url);
    let mut b_ev = builder.subscribe();
    let b = builder.bind().await?;
    next_event(&mut a_ev, "first delivered", is_delivered(first.id)).await?;
    eventually("both delivered", || async {
        Ok(a.outbox().await?.is_empty())
    })
    .await?;
    let ev = next_event(&mut b_ev, "message at bob", is_received).await?;
    assert!(matches!(
        ev,
        NodeEvent::MessageReceived {
            via: Via::Direct,
            from,
            ..
        } if from == alice.id()
    ));
    let at_b = b.history(&alice.id().to_string(), 10).await?;
    assert_eq!(
        at_b.iter().map(text).collect::<Vec<_>>(),
        ["first", "second"]
    );
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_same_message_id_is_stored_once_whatever_the_path() -> Result<()> {
    let d = Discovery::start().await?;
    let bob = User::new()?;
    let b = bob.start(&d.url).await?;
    b.register("bob").await?;
    let mut b_ev = b.subscribe();
    let b_addr = b.local_addr()?;

    let mallory = SecretKey::generate();
    let m = raw_endpoint(&mallory).await?;
    let conn = m.connect(b_addr, bob.id()).await?;
    let msg = ChatMessage::text("once", 1)?;
    let frame = Frame::Message(msg.clone());
    let ack = |status| Some(Frame::Ack(Ack { id: msg.id, status }));
    assert_eq!(raw_exchange(&conn, &frame).await?, ack(AckStatus::Stored));
    // A resend after a lost ack.
    assert_eq!(
        raw_exchange(&conn, &frame).await?,
        ack(AckStatus::Duplicate)
    );
    // The same message through the mailbox.
    let envelope = seal::seal(
        &mallory,
        &bob.id(),
        &bob.sk.mailbox_secret().public(),
        &wire::encode(&frame)?,
    );
    d.client()?.deposit(&bob.id(), envelope).await?;
    assert_eq!(b.drain_mailbox().await?, 0, "nothing new from the mailbox");
    // And on a fresh connection.
    let conn2 = m.connect(b_addr, bob.id()).await?;
    assert_eq!(
        raw_exchange(&conn2, &frame).await?,
        ack(AckStatus::Duplicate)
    );

    let hist = b.history(&mallory.public().to_string(), 10).await?;
    assert_eq!(hist.len(), 1, "{hist:?}");
    let received: Vec<_> = queued_events(&mut b_ev)
        .into_iter()
        .filter(is_received)
        .collect();
    assert_eq!(received.len(), 1, "one event for one message");
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

/// An envelope that claims to come from `claimed` but is signed by `signer`.
fn forged_envelope(
    claimed: &NodeId,
    signer: &SecretKey,
    to: &NodeId,
    to_key: &MailboxPublicKey,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let eph_secret = x25519_dalek::EphemeralSecret::random_from_rng(rand::rngs::OsRng);
    let eph = x25519_dalek::PublicKey::from(&eph_secret).to_bytes();
    let shared = eph_secret.diffie_hellman(&x25519_dalek::PublicKey::from(to_key.0));
    let mut signed = eph.to_vec();
    signed.extend_from_slice(to.as_bytes());
    signed.extend_from_slice(to_key.as_bytes());
    signed.extend_from_slice(payload);
    let sig = signer.sign(Domain::SealedEnvelope, &signed);
    let mut plain = claimed.as_bytes().to_vec();
    plain.extend_from_slice(&sig.0);
    plain.extend_from_slice(payload);
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&eph);
    salt[32..].copy_from_slice(to_key.as_bytes());
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&salt), shared.as_bytes())
        .expand(b"p2p-node/v1/seal", &mut key)
        .map_err(|e| anyhow::anyhow!("hkdf: {e}"))?;
    let ct = ChaCha20Poly1305::new(&key.into())
        .encrypt(&[0u8; 12].into(), plain.as_slice())
        .map_err(|e| anyhow::anyhow!("encrypt: {e}"))?;
    let mut env = vec![1u8];
    env.extend_from_slice(&eph);
    env.extend_from_slice(&ct);
    Ok(env)
}

#[tokio::test]
async fn nobody_can_get_a_message_attributed_to_another_node() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob.start(&d.url).await?;
    b.register("bob").await?;
    let mut b_ev = b.subscribe();
    let bob_key = bob.sk.mailbox_secret().public();
    let mallory = SecretKey::generate();

    // 1. Over QUIC: there is no sender field; whatever Mallory writes is hers.
    let m = raw_endpoint(&mallory).await?;
    let conn = m.connect(b.local_addr()?, bob.id()).await?;
    let msg = ChatMessage::text("this is alice, honest", 1)?;
    raw_exchange(&conn, &Frame::Message(msg.clone())).await?;
    let ev = next_event(&mut b_ev, "message at bob", is_received).await?;
    assert!(matches!(ev, NodeEvent::MessageReceived { from, .. } if from == mallory.public()));

    // 2. Through the mailbox: an envelope naming Alice as sender but signed by Mallory
    //    does not open, and is deleted.
    let forged = forged_envelope(
        &alice.id(),
        &mallory,
        &bob.id(),
        &bob_key,
        &wire::encode(&Frame::Message(ChatMessage::text("forged", 2)?))?,
    )?;
    // Sanity: the forgery is well-formed but fails the signature check.
    assert_eq!(
        seal::open(&bob.sk, &forged),
        Err(seal::SealError::BadSignature)
    );
    let client = d.client()?;
    client.deposit(&bob.id(), forged).await?;
    // Garbage and a sealed non-frame are dropped too.
    client
        .deposit(&bob.id(), b"not an envelope".to_vec())
        .await?;
    client
        .deposit(
            &bob.id(),
            seal::seal(&mallory, &bob.id(), &bob_key, b"not a frame"),
        )
        .await?;

    // 3. A receipt from Mallory for a message Bob sent to Alice changes nothing.
    let to_alice = b.send(&alice.id().to_string(), "for alice").await?;
    assert_eq!(to_alice.status, SendStatus::Queued);
    let fake_receipt = Frame::Ack(Ack {
        id: to_alice.id,
        status: AckStatus::Stored,
    });
    client
        .deposit(
            &bob.id(),
            seal::seal(&mallory, &bob.id(), &bob_key, &wire::encode(&fake_receipt)?),
        )
        .await?;

    assert_eq!(b.drain_mailbox().await?, 0);
    let left = client.fetch_mailbox(&bob.sk).await?;
    assert!(left.items.is_empty(), "bad envelopes are deleted");
    assert!(b
        .history(&alice.id().to_string(), 10)
        .await?
        .iter()
        .all(|m| m.direction == Direction::Outgoing));
    let sent = b.history(&alice.id().to_string(), 10).await?;
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].status,
        MessageStatus::Queued,
        "fake receipt ignored"
    );
    assert_eq!(b.outbox().await?.len(), 1);
    let from_m = b.history(&mallory.public().to_string(), 10).await?;
    assert_eq!(from_m.len(), 1);
    assert_eq!(text(&from_m[0]), "this is alice, honest");

    b.shutdown().await;
    d.stop().await;
    Ok(())
}

/// Writes `bytes` on a new stream of a fresh connection and returns the close code.
async fn close_code_after(
    m: &Endpoint,
    b_addr: SocketAddr,
    b_id: NodeId,
    bytes: &[u8],
) -> Result<u64> {
    let conn = m.connect(b_addr, b_id).await?;
    let (mut send, _recv) = conn.quic().open_bi().await?;
    send.write_all(bytes).await?;
    send.finish()?;
    let err = tokio::time::timeout(DEADLINE, conn.quic().closed()).await?;
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => Ok(c.error_code.into_inner()),
        other => bail!("connection ended otherwise: {other}"),
    }
}

#[tokio::test]
async fn bad_frames_close_that_connection_and_other_peers_are_served() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob.start(&d.url).await?;
    let a = alice.start(&d.url).await?;
    let b_addr = b.local_addr()?;
    let mallory = SecretKey::generate();
    let m = raw_endpoint(&mallory).await?;

    // Alice holds an open connection to Bob throughout.
    let out = a.send(&bob.id().to_string(), "before").await?;
    assert_eq!(out.status, SendStatus::Delivered);

    let valid = wire::encode(&Frame::Message(ChatMessage::text("x".repeat(100), 1)?))?;
    let mut oversized = ((wire::MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0u8; 64]);
    let truncated = valid[..valid.len() - 10].to_vec();
    let garbage = [0u8, 0, 0, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb].to_vec();
    for (what, bytes) in [
        ("oversized", oversized),
        ("truncated", truncated),
        ("garbage", garbage),
    ] {
        let code = close_code_after(&m, b_addr, bob.id(), &bytes).await?;
        assert_eq!(code, CLOSE_BAD_FRAME.into_inner(), "{what}");
        let during = a.send(&bob.id().to_string(), what).await?;
        assert_eq!(
            during.status,
            SendStatus::Delivered,
            "{what}: others served"
        );
    }
    // An ack where a message belongs is a protocol error too.
    let stray = wire::encode(&Frame::Ack(Ack {
        id: MessageId([1; 16]),
        status: AckStatus::Stored,
    }))?;
    let code = close_code_after(&m, b_addr, bob.id(), &stray).await?;
    assert_eq!(code, CLOSE_UNEXPECTED_FRAME.into_inner());

    assert!(
        b.history(&mallory.public().to_string(), 10)
            .await?
            .is_empty(),
        "nothing stored"
    );
    assert_eq!(b.history(&alice.id().to_string(), 10).await?.len(), 4);
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_receiver_killed_between_persist_and_ack_gets_a_resend_and_no_duplicate() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    // Bob stores but "dies" before acknowledging.
    let b = bob
        .builder(&d.url)
        .drop_acks_after_persist(true)
        .bind()
        .await?;
    b.register("bob").await?;
    let a = alice.start(&d.url).await?;
    let mut a_ev = a.subscribe();
    let out = a.send("bob", "are you there?").await?;
    assert_eq!(out.status, SendStatus::Queued, "no ack, so not delivered");
    assert_eq!(
        b.history(&alice.id().to_string(), 10).await?.len(),
        1,
        "persisted"
    );
    b.shutdown().await;

    // Bob restarts normally: the mailbox copy and Alice's resend are both duplicates.
    let builder = bob.builder(&d.url);
    let mut b_ev = builder.subscribe();
    let b = builder.bind().await?;
    next_event(&mut a_ev, "delivered at alice", is_delivered(out.id)).await?;
    b.drain_mailbox().await?;
    let at_b = b.history(&alice.id().to_string(), 10).await?;
    assert_eq!(at_b.len(), 1, "no duplicate: {at_b:?}");
    assert!(
        !queued_events(&mut b_ev).iter().any(is_received),
        "a duplicate is not reported as new"
    );
    let at_a = a.history("bob", 10).await?;
    assert_eq!(at_a[0].status, MessageStatus::Delivered);
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn many_concurrent_messages_are_all_stored_once() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob.start(&d.url).await?;
    let a = alice.start(&d.url).await?;
    let to = bob.id().to_string();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let a = a.clone();
        let to = to.clone();
        tasks.spawn(async move { a.send(&to, &format!("m{i}")).await });
    }
    let mut delivered = 0;
    while let Some(r) = tasks.join_next().await {
        if r??.status == SendStatus::Delivered {
            delivered += 1;
        }
    }
    // On a loaded machine a few may miss the ack timeout and go through the outbox.
    assert!(delivered > 0);
    eventually("every message delivered", || async {
        Ok(a.outbox().await?.is_empty())
    })
    .await?;
    assert_eq!(b.history(&alice.id().to_string(), 1000).await?.len(), 100);
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn one_process_per_data_dir() -> Result<()> {
    let d = Discovery::start().await?;
    let alice = User::new()?;
    let a = alice.start(&d.url).await?;
    let err = alice
        .start(&d.url)
        .await
        .expect_err("second node on the same dir");
    let Some(BindError::DataDirLocked { dir }) = err.downcast_ref::<BindError>() else {
        bail!("unexpected error {err:?}");
    };
    assert_eq!(dir, &alice.data_dir());
    assert!(err
        .to_string()
        .contains(&alice.data_dir().display().to_string()));
    a.shutdown().await;
    // Released at shutdown.
    let a = alice.start(&d.url).await?;
    a.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_changed_key_for_a_pinned_name_is_a_warning_and_the_pin_holds() -> Result<()> {
    let d1 = Discovery::start().await?;
    let (alice, bob, carol) = (User::new()?, User::new()?, User::new()?);
    let b = bob.start(&d1.url).await?;
    b.register("bob").await?;
    let a = alice.start(&d1.url).await?;
    assert_eq!(
        a.resolve("bob").await?.node_id,
        bob.id(),
        "first sight pins"
    );
    a.shutdown().await;

    // Another discovery server where Carol holds the name "bob".
    let d2 = Discovery::start().await?;
    let c = carol.start(&d2.url).await?;
    c.register("bob").await?;
    let a = alice.start(&d2.url).await?;
    let mut a_ev = a.subscribe();
    let r = a.resolve("bob").await?;
    assert_eq!(r.node_id, bob.id(), "the pinned key is kept");
    let ev = next_event(&mut a_ev, "key change warning", |e| {
        matches!(e, NodeEvent::KeyChanged { .. })
    })
    .await?;
    assert!(matches!(
        ev,
        NodeEvent::KeyChanged { name, pinned, announced }
            if name == "bob" && pinned == bob.id() && announced == carol.id()
    ));
    let out = a.send("bob", "to the real bob").await?;
    assert_eq!(out.to, bob.id());
    assert!(c.history(&alice.id().to_string(), 10).await?.is_empty());

    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
    d1.stop().await;
    d2.stop().await;
    Ok(())
}

#[tokio::test]
async fn discovery_down_does_not_stop_the_node_and_sends_to_ids_are_queued() -> Result<()> {
    init_tracing();
    // A port with nothing behind it.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let url = format!("http://{closed}");
    let (alice, bob) = (User::new()?, User::new()?);
    let a = alice.start(&url).await?;
    let out = a.send(&bob.id().to_string(), "later").await?;
    assert_eq!(out.status, SendStatus::Queued);
    assert_eq!(a.outbox().await?.len(), 1);
    let err = a
        .send("bob", "to a name")
        .await
        .expect_err("name cannot resolve");
    assert!(
        matches!(
            err,
            SendError::Resolve(ResolveError::Discovery(_) | ResolveError::UnknownPeer { .. })
        ),
        "{err:?}"
    );
    assert!(matches!(
        a.send("Not A Name!", "x").await,
        Err(SendError::Resolve(ResolveError::UnknownPeer { .. }))
    ));
    assert!(a.peers().await.is_err());
    a.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn embedded_discovery_serves_a_lan_of_nodes() -> Result<()> {
    init_tracing();
    let (eve, frank) = (User::new()?, User::new()?);
    let e = Node::builder(eve.sk.clone())
        .data_dir(eve.data_dir())
        .embedded_discovery(loopback())
        .listen(loopback())
        .timings(fast())
        .bind()
        .await?;
    let addr = e.embedded_discovery_addr().context("embedded address")?;
    assert_ne!(addr.port(), 0);
    let url = e.discovery_url().context("url")?;
    assert!(eve.data_dir().join("discovery.redb").exists());
    e.register("eve").await?;

    let f = frank.start(&url).await?;
    let mut e_ev = e.subscribe();
    let out = f.send("eve", "hello over the LAN").await?;
    assert_eq!(out.status, SendStatus::Delivered);
    next_event(&mut e_ev, "message at eve", is_received).await?;
    let peers = f.peers().await?;
    assert!(peers.iter().any(|p| p.node_id == eve.id()));

    f.shutdown().await;
    e.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn shutdown_withdraws_and_others_see_it_go_offline() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob.start(&d.url).await?;
    let mut b_ev = b.subscribe();
    let a = alice.start(&d.url).await?;
    a.register("alice").await?;
    next_event(
        &mut b_ev,
        "alice online",
        |e| matches!(e, NodeEvent::PeerOnline { node_id, .. } if *node_id == alice.id()),
    )
    .await?;
    a.shutdown().await;
    next_event(
        &mut b_ev,
        "alice offline",
        |e| matches!(e, NodeEvent::PeerOffline { node_id, .. } if *node_id == alice.id()),
    )
    .await?;
    assert!(!b.peers().await?.iter().any(|p| p.node_id == alice.id()));

    // A one-shot node neither announces nor withdraws.
    let a = alice.builder(&d.url).announce(false).bind().await?;
    let _ = a.drain_mailbox().await?;
    assert!(!b.peers().await?.iter().any(|p| p.node_id == alice.id()));
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn connections_past_the_limit_are_refused() -> Result<()> {
    let d = Discovery::start().await?;
    let bob = User::new()?;
    let b = bob.builder(&d.url).max_connections(1).bind().await?;
    let b_addr = b.local_addr()?;
    let first = raw_endpoint(&SecretKey::generate()).await?;
    let conn = first.connect(b_addr, bob.id()).await?;
    let msg = Frame::Message(ChatMessage::text("in", 1)?);
    assert!(raw_exchange(&conn, &msg).await?.is_some());
    let second = raw_endpoint(&SecretKey::generate()).await?;
    assert!(
        tokio::time::timeout(DEADLINE, second.connect(b_addr, bob.id()))
            .await?
            .is_err(),
        "refused past the limit"
    );
    // The first connection still works.
    let msg = Frame::Message(ChatMessage::text("still in", 2)?);
    assert!(raw_exchange(&conn, &msg).await?.is_some());
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_name_given_at_start_is_claimed_on_a_server_that_does_not_know_it() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob.start(&d.url).await?;
    let mut b_ev = b.subscribe();
    let a = alice.builder(&d.url).name("alice".into()).bind().await?;
    let ev = next_event(
        &mut b_ev,
        "alice online",
        |e| matches!(e, NodeEvent::PeerOnline { node_id, .. } if *node_id == alice.id()),
    )
    .await?;
    assert!(matches!(ev, NodeEvent::PeerOnline { name: Some(n), .. } if n == "alice"));
    assert_eq!(b.resolve("alice").await?.node_id, alice.id());
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn names_from_the_online_list_are_pinned_once_messages_are_exchanged() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob, carol) = (User::new()?, User::new()?, User::new()?);
    let a = alice.start(&d.url).await?;
    a.register("alice").await?;
    let b = bob.start(&d.url).await?;
    b.register("bob").await?;
    let c = carol.start(&d.url).await?;
    c.register("carol").await?;
    let mut a_ev = a.subscribe();
    // Alice knows bob and carol from the online list only.
    eventually("alice's online list names bob and carol", || async {
        Ok(a.name_of(&bob.id()).as_deref() == Some("bob")
            && a.name_of(&carol.id()).as_deref() == Some("carol"))
    })
    .await?;
    // She writes to bob by his NodeId (as the full-screen chat does); carol writes to her.
    let out = a.send_to(&bob.id(), "to bob by id").await?;
    assert_eq!(out.status, SendStatus::Delivered);
    c.send("alice", "from carol").await?;
    next_event(&mut a_ev, "carol's message at alice", is_received).await?;
    // With discovery gone, both conversations are still found by name.
    d.stop().await;
    let with_bob = a.history("bob", 10).await?;
    assert_eq!(with_bob.len(), 1);
    assert_eq!(text(&with_bob[0]), "to bob by id");
    let with_carol = a.history("carol", 10).await?;
    assert_eq!(with_carol.len(), 1);
    assert_eq!(text(&with_carol[0]), "from carol");
    for n in [a, b, c] {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_senders_claimed_name_is_learned_and_pinned() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    // Alice claims her name but never announces: bob only learns it from her claim.
    let a = alice.builder(&d.url).announce(false).bind().await?;
    a.register("alice").await?;
    let b = bob.start(&d.url).await?;
    b.register("bob").await?;
    let mut b_ev = b.subscribe();

    assert_eq!(
        a.send("bob", "who am i?").await?.status,
        SendStatus::Delivered
    );
    let ev = next_event(&mut b_ev, "message at bob", is_received).await?;
    let NodeEvent::MessageReceived { from_name, .. } = ev else {
        bail!("unexpected event");
    };
    assert_eq!(from_name.as_deref(), Some("alice"));
    // Pinned: the conversation is found by name, even with discovery gone.
    a.shutdown().await;
    d.stop().await;
    let hist = b.history("alice", 10).await?;
    assert_eq!(hist.len(), 1);
    assert_eq!(text(&hist[0]), "who am i?");
    b.shutdown().await;
    Ok(())
}

/// A peer that quits says so as it closes its connections: it is offline at once, and a
/// send to it right after is queued at once, although the sender's next poll is a minute
/// away and discovery may list its old record for a moment. When it returns at a new
/// address, what was queued arrives.
#[tokio::test]
async fn a_peer_that_left_gets_the_message_when_it_returns_at_a_new_address() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob.start(&d.url).await?;
    b.register("bob").await?;
    // Dials (and the one quick try of a peer connected a moment ago) far beyond the
    // deadline, and no presence poll within it: the sends below only return in time if
    // they do not dial Bob.
    let slow = Timings {
        presence_poll: Duration::from_secs(60),
        dial_timeout: Duration::from_secs(120),
        quick_dial: Duration::from_secs(120),
        ..fast()
    };
    let builder = alice.builder(&d.url).timings(slow);
    let mut a_ev = builder.subscribe();
    let a = builder.bind().await?;
    a.register("alice").await?;
    next_event(
        &mut a_ev,
        "bob online at alice",
        |e| matches!(e, NodeEvent::PeerOnline { node_id, .. } if *node_id == bob.id()),
    )
    .await?;
    // Bob connects to Alice, so she has his connection and the address it came from.
    assert_eq!(b.send("alice", "hi").await?.status, SendStatus::Delivered);
    b.shutdown().await;

    let mut sent = Vec::new();
    for text in ["are you there?", "hello?"] {
        let out = tokio::time::timeout(DEADLINE, a.send("bob", text))
            .await
            .context("a send to a peer that quit must not dial it")??;
        assert_eq!(out.status, SendStatus::Queued);
        sent.push(out.id);
    }
    // Alice shows him offline without waiting for her next poll.
    next_event(
        &mut a_ev,
        "bob offline at alice",
        |e| matches!(e, NodeEvent::PeerOffline { node_id, .. } if *node_id == bob.id()),
    )
    .await?;

    // Bob returns on another port (his old connection and address are dead).
    let builder = bob.builder(&d.url);
    let mut b_ev = builder.subscribe();
    let b = builder.bind().await?;
    for id in sent {
        next_event(&mut a_ev, "delivered", is_delivered(id)).await?;
    }
    for _ in 0..2 {
        let ev = next_event(&mut b_ev, "message at bob", is_received).await?;
        assert!(matches!(ev, NodeEvent::MessageReceived { from, .. } if from == alice.id()));
    }
    let at_b = b.history("alice", 10).await?;
    assert_eq!(
        at_b.iter().map(text).collect::<Vec<_>>(),
        ["hi", "are you there?", "hello?"]
    );
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

/// The node over the in-memory discovery: no HTTP server at all. Names, presence, a
/// direct message, and one through the mailbox while its recipient is away.
#[tokio::test]
async fn nodes_work_over_any_discovery_implementation() -> Result<()> {
    use p2p_node::discovery::{Discovery, MemoryDiscovery, Source};
    use std::sync::Arc;

    let memory: Arc<dyn Discovery> = MemoryDiscovery::new();
    let (alice, bob) = (User::new()?, User::new()?);
    let on_memory = |u: &User| {
        Node::builder(u.sk.clone())
            .data_dir(u.data_dir())
            .discovery(memory.clone())
            .listen(loopback())
            .timings(fast())
    };
    let a = on_memory(&alice).bind().await?;
    let status = a.discovery_status().context("a discovery")?;
    assert_eq!(status.borrow().source, Source::Memory);
    a.register("alice").await?;
    let b = on_memory(&bob).bind().await?;
    b.register("bob").await?;
    eventually("bob sees alice online", || async {
        Ok(b.peers().await?.iter().any(|p| p.node_id == alice.id()))
    })
    .await?;
    let out = b.send("alice", "over the fake").await?;
    assert_eq!(out.status, SendStatus::Delivered);
    a.shutdown().await;

    // Alice is away: the message is sealed into her mailbox on the fake.
    let out = b.send("alice", "while you were away").await?;
    assert_eq!(out.status, SendStatus::Queued);
    let entries = b.outbox().await?;
    assert!(entries[0].mailbox_deposited, "sealed copy deposited");
    b.shutdown().await;

    let builder = on_memory(&alice);
    let mut events = builder.subscribe();
    let a = builder.bind().await?;
    let ev = next_event(&mut events, "mailbox message at alice", is_received).await?;
    let NodeEvent::MessageReceived { via, message, .. } = ev else {
        bail!("unexpected event");
    };
    assert_eq!(via, Via::Mailbox);
    assert_eq!(message.id, out.id);
    assert_eq!(a.history(&bob.id().to_string(), 10).await?.len(), 2);
    a.shutdown().await;
    Ok(())
}

/// A discovery that moves to another server is reported, even when it moves before the
/// node's own tasks first run (a LAN's server taken over while the node starts).
#[tokio::test]
async fn a_discovery_that_moves_right_after_bind_is_reported() -> Result<()> {
    use p2p_node::discovery::MemoryDiscovery;
    use std::sync::Arc;

    let memory = MemoryDiscovery::new();
    let alice = User::new()?;
    let builder = Node::builder(alice.sk.clone())
        .data_dir(alice.data_dir())
        .discovery(memory.clone() as Arc<dyn p2p_node::discovery::Discovery>)
        .listen(loopback())
        .timings(fast());
    let mut events = builder.subscribe();
    let a = builder.bind().await?;
    // No await between the bind and the move: on this single-threaded runtime the
    // node's tasks have not run since the bind returned.
    memory.move_to("memory:elsewhere");
    let ev = next_event(&mut events, "the move reported", |e| {
        matches!(e, NodeEvent::DiscoveryChanged(_))
    })
    .await?;
    let NodeEvent::DiscoveryChanged(status) = ev else {
        bail!("unexpected event");
    };
    assert_eq!(status.url.as_deref(), Some("memory:elsewhere"));
    a.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_peer_connected_a_moment_ago_is_tried_once_while_discovery_calls_it_offline() -> Result<()>
{
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    // The one quick try must not run out on a loaded machine; a short idle timeout finds
    // out soon that a connection is gone.
    let a = alice
        .builder(&d.url)
        .timings(Timings {
            quick_dial: Duration::from_secs(5),
            ..fast()
        })
        .transport(notices_loss_soon())
        .bind()
        .await?;
    // Bob claims a name but never announces presence: discovery knows him, offline.
    let b = bob.builder(&d.url).announce(false).bind().await?;
    b.register("bob").await?;
    b.shutdown().await;
    // Bob dials Alice, so she has a connection from his address, then dies without a
    // word (a process killed; one that quits says so, and is not tried).
    let mut a_ev = a.subscribe();
    let elsewhere = tempfile::tempdir()?;
    let dying = bob
        .builder(&d.url)
        .data_dir(elsewhere.path().join("node"))
        .announce(false);
    let to = alice.id();
    let bob_addr = run_then_die(dying, move |b| async move {
        let hi = b.send_to(&to, "hi alice").await?;
        anyhow::ensure!(hi.status == SendStatus::Delivered, "{hi:?}");
        Ok(b)
    })
    .await?;
    // Alice's connection to him times out; he restarts on the same port, still without
    // announcing.
    eventually("alice saw the connection close", || async {
        Ok(a.connections().iter().all(|(peer, _)| *peer != bob.id()))
    })
    .await?;
    let b = bind_again(|| bob.builder(&d.url).announce(false).listen(bob_addr)).await?;
    // Discovery says Bob is offline, but he was connected a moment ago: Alice tries his
    // last address once, and the message is delivered at once instead of queued.
    let out = a.send_to(&bob.id(), "still there?").await?;
    assert_eq!(
        out.status,
        SendStatus::Delivered,
        "tried at the last address"
    );
    next_event(&mut a_ev, "delivered", is_delivered(out.id)).await?;
    b.shutdown().await;
    a.shutdown().await;
    d.stop().await;
    Ok(())
}

/// Binds a node on an address a node of this process just left: polls (within
/// [`DEADLINE`]) while the old socket is still being released.
async fn bind_again(builder: impl Fn() -> p2p_node::NodeBuilder) -> Result<Node> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match builder().bind().await {
            Ok(node) => return Ok(node),
            Err(BindError::Endpoint(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How a [`bare_receiver`] serves a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serve {
    /// Acknowledges each message as it comes, frame after frame.
    Each,
    /// Ends the stream after its first ack (a minimal receiver that serves one message
    /// per stream).
    OnePerStream,
    /// Reads this many messages before it acknowledges them (all at once, in order):
    /// only a sender that puts several messages on a stream without waiting for their
    /// acks gets any.
    InBatchesOf(usize),
}

/// A bare receiver for `bob`'s key: acknowledges every message as stored, as `serve`
/// says, and counts the streams it was sent on. It lets a sender open `streams_allowed`
/// streams at once.
async fn bare_receiver(
    d: &Discovery,
    bob: &SecretKey,
    serve: Serve,
    streams_allowed: u32,
) -> Result<(
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::sync::mpsc::UnboundedReceiver<MessageId>,
    tokio::task::JoinHandle<()>,
)> {
    use std::sync::{atomic::Ordering, Arc};
    let ep = Endpoint::builder(bob.clone())
        .bind_addr(loopback())
        .transport(TransportSettings {
            max_concurrent_bidi_streams: streams_allowed,
            ..TransportSettings::default()
        })
        .bind()
        .await?;
    let at = SocketAddr::from(([127, 0, 0, 1], ep.local_addr()?.port()));
    let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (got_tx, got) = tokio::sync::mpsc::unbounded_channel();
    let counted = streams.clone();
    let task = tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.accept().await else {
                continue;
            };
            let (counted, got_tx) = (counted.clone(), got_tx.clone());
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.quic().accept_bi().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let got_tx = got_tx.clone();
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let batch = match serve {
                            Serve::InBatchesOf(n) => n,
                            Serve::Each | Serve::OnePerStream => 1,
                        };
                        let mut unacked = Vec::new();
                        while let Ok(Some(Frame::Message(m))) =
                            wire::read_frame(&mut recv, &mut buf).await
                        {
                            let _ = got_tx.send(m.id);
                            unacked.push(m.id);
                            if unacked.len() < batch {
                                continue;
                            }
                            for id in unacked.drain(..) {
                                let ack = Frame::Ack(Ack {
                                    id,
                                    status: AckStatus::Stored,
                                });
                                if wire::write_frame(&mut send, &ack).await.is_err() {
                                    return;
                                }
                            }
                            if serve == Serve::OnePerStream {
                                let _ = recv.stop(0u32.into());
                                break;
                            }
                        }
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    let client = d.client()?;
    client
        .announce(bob, None, &[at], Duration::from_secs(60))
        .await?;
    Ok((streams, got, task))
}

#[tokio::test]
async fn consecutive_messages_to_a_peer_share_one_stream_and_a_receiver_that_ends_streams_still_gets_them(
) -> Result<()> {
    let d = Discovery::start().await?;
    let alice = User::new()?;
    for one_per_stream in [false, true] {
        let bob = SecretKey::generate();
        let serve = if one_per_stream {
            Serve::OnePerStream
        } else {
            Serve::Each
        };
        let (streams, mut got, task) = bare_receiver(&d, &bob, serve, 64).await?;
        let a = alice.builder(&d.url).bind().await?;
        let mut sent = Vec::new();
        for i in 0..5 {
            let out = tokio::time::timeout(DEADLINE, a.send_to(&bob.public(), &format!("m{i}")))
                .await??;
            assert_eq!(out.status, SendStatus::Delivered, "message {i}");
            sent.push(out.id);
        }
        let mut received = Vec::new();
        while let Ok(id) = got.try_recv() {
            received.push(id);
        }
        // Each message is there, in order (a message sent again after a stream ended
        // would show twice).
        received.dedup();
        assert_eq!(received, sent);
        let streams = streams.load(std::sync::atomic::Ordering::SeqCst);
        if one_per_stream {
            assert!(streams >= 5, "a new stream for each message: {streams}");
        } else {
            assert_eq!(streams, 1, "one stream kept from message to message");
        }
        a.shutdown().await;
        task.abort();
    }
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_outbox_round_beside_sends_never_sends_a_delivered_message_again() -> Result<()> {
    // Outbox rounds run back to back while messages are sent and acknowledged: a round
    // reads the outbox, and a message it read may be delivered and settled by its send
    // before the round gets to it. The round must not send it again.
    let d = Discovery::start().await?;
    let alice = User::new()?;
    let bob = SecretKey::generate();
    let (_, mut got, task) = bare_receiver(&d, &bob, Serve::Each, 64).await?;
    let a = alice.builder(&d.url).bind().await?;
    let flushing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flusher = {
        let (a, flushing) = (a.clone(), flushing.clone());
        tokio::spawn(async move {
            let mut rounds = 0u32;
            while flushing.load(std::sync::atomic::Ordering::SeqCst) && rounds < 100_000 {
                let _ = a.flush_outbox(Duration::from_secs(5)).await;
                rounds += 1;
                tokio::task::yield_now().await;
            }
            rounds
        })
    };
    let mut sent = Vec::new();
    for i in 0..1000 {
        let out =
            tokio::time::timeout(DEADLINE, a.send_to(&bob.public(), &format!("m{i}"))).await??;
        assert_eq!(out.status, SendStatus::Delivered, "message {i}");
        sent.push(out.id);
    }
    flushing.store(false, std::sync::atomic::Ordering::SeqCst);
    let rounds = flusher.await?;
    assert!(rounds > 0);
    let mut received = Vec::new();
    while let Ok(id) = got.try_recv() {
        received.push(id);
    }
    let mut twice: Vec<_> = received.clone();
    twice.sort();
    twice.dedup();
    let again = received.len() - twice.len();
    assert_eq!(
        again,
        0,
        "{again} of {} sent again ({rounds} rounds beside)",
        sent.len()
    );
    assert!(received == sent, "each message once, in order");
    a.shutdown().await;
    task.abort();
    d.stop().await;
    Ok(())
}

/// Sends `count` messages from `a` to `to` at once; returns their ids once every one is
/// delivered (`case` names the run in a failure).
async fn send_at_once(a: &Node, to: NodeId, count: usize, case: &str) -> Result<Vec<MessageId>> {
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..count {
        let a = a.clone();
        sends.spawn(async move { a.send_to(&to, &format!("m{i}")).await });
    }
    let mut sent = Vec::new();
    while let Some(out) = tokio::time::timeout(DEADLINE, sends.join_next())
        .await
        .with_context(|| format!("{case}: sends still waiting for their acks"))?
    {
        let out = out??;
        assert_eq!(out.status, SendStatus::Delivered, "{case}");
        sent.push(out.id);
    }
    Ok(sent)
}

#[tokio::test]
async fn concurrent_sends_are_pipelined_on_a_stream_without_waiting_for_each_ack() -> Result<()> {
    // The receiver acknowledges a stream's messages only once it has read 8 of them: a
    // sender that waited for each ack before the next message on a stream would get none
    // (the sends would time out). 32 sends at once fit on one stream (a connection opens
    // another only when one has `LANE_DEPTH` waiting), ahead of their acks, and every
    // one is delivered.
    const SENDS: usize = 32;
    const _: () = assert!(SENDS <= p2p_node::endpoint::LANE_DEPTH && SENDS.is_multiple_of(8));
    let d = Discovery::start().await?;
    let alice = User::new()?;
    let bob = SecretKey::generate();
    let (streams, mut got, task) = bare_receiver(&d, &bob, Serve::InBatchesOf(8), 64).await?;
    let a = alice.builder(&d.url).bind().await?;
    let sent = send_at_once(&a, bob.public(), SENDS, "pipelined").await?;
    let mut received = Vec::new();
    while let Ok(id) = got.try_recv() {
        received.push(id);
    }
    received.sort();
    received.dedup();
    for id in &sent {
        assert!(received.contains(id), "{id} was delivered, so received");
    }
    let streams = streams.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(streams, 1, "{SENDS} messages pipelined on one stream");
    a.shutdown().await;
    task.abort();
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_queue_drains_pipelined_on_one_stream_in_order_and_one_at_a_time_to_a_receiver_that_ends_streams(
) -> Result<()> {
    // Messages queued for a peer nobody knew go out when it appears. The receiver
    // acknowledges a stream's messages only once it has read 8 of them: an outbox that
    // waited for each ack before the next message would get none (each attempt would
    // end at the ack timeout, ten seconds, and the queue would not drain in time). They arrive in the order they were sent, on one stream. A receiver that
    // ends each stream after one message gets them all, in order, one a stream.
    const QUEUED: usize = 24;
    let d = Discovery::start().await?;
    let alice = User::new()?;
    for serve in [Serve::InBatchesOf(8), Serve::OnePerStream] {
        let bob = SecretKey::generate();
        let a = alice.builder(&d.url).bind().await?;
        let mut sent = Vec::new();
        for i in 0..QUEUED {
            let out = a.send_to(&bob.public(), &format!("m{i}")).await?;
            assert_eq!(out.status, SendStatus::Queued, "{serve:?}: bob is unknown");
            sent.push(out.id);
        }
        let (streams, mut got, task) = bare_receiver(&d, &bob, serve, 64).await?;
        // Alice's outbox tries the queue once she sees bob online.
        eventually(&format!("{serve:?}: the queue drained"), || async {
            Ok(a.outbox().await?.is_empty())
        })
        .await?;
        let mut received = Vec::new();
        while let Ok(id) = got.try_recv() {
            received.push(id);
        }
        received.dedup();
        assert_eq!(received, sent, "{serve:?}: each message once, in order");
        let streams = streams.load(std::sync::atomic::Ordering::SeqCst);
        if serve == Serve::OnePerStream {
            assert!(streams >= QUEUED, "{serve:?}: a stream each: {streams}");
        } else {
            assert_eq!(streams, 1, "{serve:?}: the queue pipelined on one stream");
        }
        a.shutdown().await;
        task.abort();
    }
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_send_given_up_in_the_middle_of_its_write_closes_its_lane() -> Result<()> {
    // A peer that reads nothing: past the stream's window of bytes, a write waits. A send
    // given up there (its caller's timeout) may have left part of a frame on the stream,
    // so the lane must close: the message waiting on it gets `Abandoned` (its sender sends
    // it again elsewhere), nothing more goes on it, and the next send takes a new stream.
    use p2p_node::endpoint::LaneError;
    let bob = SecretKey::generate();
    let ep = Endpoint::builder(bob.clone())
        .bind_addr(loopback())
        .transport(TransportSettings {
            stream_receive_window: 16 * 1024,
            ..TransportSettings::default()
        })
        .bind()
        .await?;
    let at = SocketAddr::from(([127, 0, 0, 1], ep.local_addr()?.port()));
    let task = tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                // Streams accepted and held, never read.
                let mut held = Vec::new();
                while let Ok(stream) = conn.quic().accept_bi().await {
                    held.push(stream);
                }
            });
        }
    });
    let alice = Endpoint::builder(SecretKey::generate())
        .bind_addr(loopback())
        .bind()
        .await?;
    let conn = alice.connect(at, bob.public()).await?;
    let frame = |i: u64| -> Result<(MessageId, Vec<u8>)> {
        let m = ChatMessage::text(format!("m{i}"), i)?;
        Ok((m.id, wire::encode(&Frame::Message(m))?))
    };
    let lane = conn.lane(Duration::from_secs(60)).await?;
    let (id, bytes) = frame(1)?;
    let first = lane.send(id, &bytes).await.context("a new lane is open")?;
    let (id, _) = frame(2)?;
    let cut = tokio::time::timeout(
        Duration::from_millis(200),
        lane.send(id, &vec![0u8; 64 * 1024]),
    )
    .await;
    assert!(cut.is_err(), "the write waits for the peer to read");
    let answer = tokio::time::timeout(DEADLINE, first.ack)
        .await
        .context("the message waiting on the lane is told")?;
    assert!(
        matches!(answer, Ok(Err(LaneError::Abandoned))),
        "{answer:?}"
    );
    let (id, bytes) = frame(3)?;
    let again = tokio::time::timeout(DEADLINE, lane.send(id, &bytes))
        .await
        .context("a closed lane answers at once")?;
    assert!(again.is_none(), "nothing more goes on the lane");
    let next = conn.lane(Duration::from_secs(60)).await?;
    assert!(!std::sync::Arc::ptr_eq(&lane, &next), "a new lane");
    task.abort();
    Ok(())
}

#[tokio::test]
async fn more_concurrent_sends_than_the_peer_allows_streams_wait_for_a_kept_one_and_all_arrive(
) -> Result<()> {
    // The peer allows 4 streams at once; 40 sends at once. Every stream ends up kept
    // (idle) between exchanges, so a send waiting for the peer to allow a new stream
    // would wait for ever: it takes the next stream put back instead. A receiver that
    // ends each stream after one message gets them all too.
    const ALLOWED: u32 = 4;
    const SENDS: usize = 40;
    let d = Discovery::start().await?;
    let alice = User::new()?;
    for one_per_stream in [false, true] {
        let bob = SecretKey::generate();
        let serve = if one_per_stream {
            Serve::OnePerStream
        } else {
            Serve::Each
        };
        let (streams, mut got, task) = bare_receiver(&d, &bob, serve, ALLOWED).await?;
        let a = alice.builder(&d.url).bind().await?;
        let mut sent = send_at_once(&a, bob.public(), SENDS, &format!("{serve:?}")).await?;
        let mut received = Vec::new();
        while let Ok(id) = got.try_recv() {
            received.push(id);
        }
        sent.sort();
        received.sort();
        received.dedup();
        assert_eq!(received, sent, "every message arrived");
        let streams = streams.load(std::sync::atomic::Ordering::SeqCst);
        if one_per_stream {
            assert!(streams >= SENDS, "a stream for each message: {streams}");
        } else {
            assert!(
                streams <= ALLOWED as usize,
                "{SENDS} messages on the {ALLOWED} streams kept, not a stream each: {streams}"
            );
        }
        a.shutdown().await;
        task.abort();
    }
    d.stop().await;
    Ok(())
}
