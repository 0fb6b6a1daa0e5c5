//! Nothing stalls: a restarted discovery server is noticed at once, a peer discovery
//! forgot is still tried, a node stops without waiting out QUIC's draining, and a full
//! disk heals without a restart.
//!
//! Every wait is on an event (or a poll) with a deadline; no fixed ports. The disk test
//! mounts a small tmpfs and needs root: it fails when `P2P_REQUIRE_NETNS=1` (as in CI)
//! and it cannot, and says it skipped otherwise.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use p2p_crypto::SecretKey;
use p2p_node::{
    wire::{ChatMessage, Frame},
    NodeEvent, SendStatus, Timings,
};

use common::*;

/// Timers of people (the renewal of a presence record a minute away), with a quick
/// poll of the online list.
fn renewal_far_away() -> Timings {
    Timings {
        presence_poll: Duration::from_millis(500),
        announce_ttl: Duration::from_secs(120),
        ..fast()
    }
}

#[tokio::test]
async fn a_restarted_discovery_server_is_noticed_and_nodes_announce_again_at_once() -> Result<()> {
    let mut d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob
        .builder(&d.url)
        .timings(renewal_far_away())
        .bind()
        .await?;
    let a = alice
        .builder(&d.url)
        .timings(renewal_far_away())
        .bind()
        .await?;
    let mut a_ev = a.subscribe();
    next_event(
        &mut a_ev,
        "bob online",
        |e| matches!(e, NodeEvent::PeerOnline { node_id, .. } if *node_id == bob.id()),
    )
    .await?;

    // The server dies and comes back on its port with nobody online.
    d.halt().await;
    let d2 = d.start_again().await?;
    let restarted = Instant::now();
    let client = d2.client()?;
    eventually("bob online again on the restarted server", || {
        let client = client.clone();
        let bob = bob.id();
        async move {
            Ok(client
                .lookup_id(&bob)
                .await?
                .is_some_and(|info| info.online))
        }
    })
    .await?;
    let reannounced = restarted.elapsed();
    eprintln!("bob announced again {reannounced:?} after the restart");
    assert!(
        reannounced < Duration::from_secs(5),
        "bob announced again after {reannounced:?}, not at once (the renewal is a minute away)"
    );
    let sent = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), "after the restart")).await??;
    assert_eq!(sent.status, SendStatus::Delivered);
    a.shutdown().await;
    b.shutdown().await;
    d2.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_peer_discovery_calls_offline_but_connected_a_moment_ago_is_tried_once() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    // A short idle timeout: Alice finds out soon that a connection is gone.
    let a = alice
        .builder(&d.url)
        .transport(notices_loss_soon())
        .bind()
        .await?;

    // Bob's node runs until Alice has dialed it, then dies without a word (a process
    // killed: one that quits says so, and is not tried).
    let elsewhere = tempfile::tempdir()?;
    let dying = bob.builder(&d.url).data_dir(elsewhere.path().join("node"));
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let (dialed_tx, dialed_rx) = tokio::sync::oneshot::channel::<()>();
    let died = tokio::spawn(run_then_die(dying, move |b| async move {
        b.register("bob").await?;
        let _ = up_tx.send(());
        let _ = dialed_rx.await;
        Ok(b)
    }));
    up_rx.await.context("bob's first node did not start")?;
    let first = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), "first")).await??;
    assert_eq!(first.status, SendStatus::Delivered);
    let _ = dialed_tx.send(());
    let port = died.await??.port();
    eventually("alice saw the connection close", || async {
        Ok(a.connections().iter().all(|(peer, _)| *peer != bob.id()))
    })
    .await?;

    // Discovery forgets him (as a restarted server would), and he runs again on his port
    // without announcing himself: discovery knows bob's name and says he is offline.
    d.client()?.withdraw(&bob.sk).await?;
    let b = bob
        .builder(&d.url)
        .listen(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .announce(false)
        .bind()
        .await?;
    let info = d.client()?.lookup_id(&bob.id()).await?;
    assert!(
        info.is_some_and(|i| !i.online),
        "discovery says bob is offline"
    );

    let started = Instant::now();
    let second = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), "second")).await??;
    assert_eq!(
        second.status,
        SendStatus::Delivered,
        "bob's last address is tried although discovery calls him offline"
    );
    eprintln!("delivered to the last address in {:?}", started.elapsed());
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_node_stops_at_once_after_a_peer_refused_its_handshake() -> Result<()> {
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    // Bob takes one connection, and a stranger holds it: alice's dial is refused.
    let b = bob.builder(&d.url).max_connections(1).bind().await?;
    let b_addr = b.local_addr()?;
    let stranger = raw_endpoint(&SecretKey::generate()).await?;
    let conn = stranger.connect(b_addr, bob.id()).await?;
    let msg = Frame::Message(ChatMessage::text("hold the slot", 1)?);
    assert!(raw_exchange(&conn, &msg).await?.is_some());

    let a = alice.start(&d.url).await?;
    let sent = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), "refused")).await??;
    assert_eq!(sent.status, SendStatus::Queued);
    let started = Instant::now();
    a.shutdown().await;
    let took = started.elapsed();
    eprintln!("alice stopped in {took:?} after the refused handshake");
    assert!(
        took < Duration::from_secs(1),
        "stopping took {took:?}: it waited for QUIC's draining period"
    );

    // And after a delivered message.
    let carol = User::new()?;
    let c = carol.start(&d.url).await?;
    let a = alice.start(&d.url).await?;
    let sent = tokio::time::timeout(DEADLINE, a.send_to(&carol.id(), "delivered")).await??;
    assert_eq!(sent.status, SendStatus::Delivered);
    let started = Instant::now();
    a.shutdown().await;
    let took = started.elapsed();
    eprintln!("alice stopped in {took:?} after a delivered message");
    assert!(took < Duration::from_secs(1), "stopping took {took:?}");
    drop(conn);
    c.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A full disk

/// A tmpfs of `size` mounted by the test; unmounted (and its directory removed) when
/// dropped, also when the test fails.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts one, or `None` (the test skips) when this machine cannot, unless
    /// `P2P_REQUIRE_NETNS=1`.
    fn mount(size: &str) -> Result<Option<SmallDisk>> {
        let dir = tempfile::tempdir()?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Ok(Some(SmallDisk { dir })),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => e.to_string(),
        };
        if std::env::var("P2P_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
            bail!("mounting a tmpfs is required (P2P_REQUIRE_NETNS=1) but: {why}");
        }
        eprintln!("SKIPPED: cannot mount a small file system (needs root): {why}");
        Ok(None)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with a file of zeros until it is full.
    fn fill(&self) -> Result<PathBuf> {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => return Err(e).context("filling the file system"),
            }
        }
        // The last partial chunks, byte by byte-ish.
        let small = [0u8; 512];
        while f.write(&small).is_ok_and(|n| n > 0) {}
        Ok(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_messages_and_heals_without_a_restart() -> Result<()> {
    let Some(disk) = SmallDisk::mount("8m")? else {
        return Ok(());
    };
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob
        .builder(&d.url)
        .data_dir(disk.path().join("bob"))
        .bind()
        .await?;
    let mut b_ev = b.subscribe();
    let a = alice.start(&d.url).await?;
    let first = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), "before")).await??;
    assert_eq!(first.status, SendStatus::Delivered);

    let filler = disk.fill()?;
    // Messages of 12 KiB until bob's database cannot take them (its write log takes
    // some into the space it holds already).
    let big = "x".repeat(12 * 1024);
    let mut queued = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    let mut sent_count = 0;
    let mut acked = Vec::new();
    let failing = loop {
        if Instant::now() > deadline {
            bail!("bob's node never reported its storage failing");
        }
        sent_count += 1;
        let text = format!("{sent_count} {big}");
        let sent = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), &text)).await??;
        if sent.status == SendStatus::Queued {
            queued.push(text);
        } else {
            acked.push(text);
        }
        if let Some(error) = queued_events(&mut b_ev).into_iter().find_map(|e| match e {
            NodeEvent::StorageFailing { error } => Some(error),
            _ => None,
        }) {
            break error;
        }
    };
    eprintln!("bob: storage failing: {failing}");
    // While it fails, nothing is acknowledged: a message sent now is queued.
    let text = "while the disk is full".to_owned();
    let sent = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), &text)).await??;
    assert_eq!(sent.status, SendStatus::Queued, "refused, not acknowledged");
    queued.push(text);

    // Space comes back: bob's node opens its database again by itself.
    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    next_event(&mut b_ev, "storage recovered", |e| {
        matches!(e, NodeEvent::StorageRecovered)
    })
    .await?;
    eprintln!(
        "bob: storage recovered {:?} after space returned",
        freed.elapsed()
    );
    // Every refused message arrives (from alice's outbox or bob's mailbox), once; every
    // message acknowledged while the disk filled is there, once.
    queued.extend(acked);
    eventually("every refused message stored", || {
        let (b, alice, queued) = (b.clone(), alice.id(), queued.clone());
        async move {
            let history = b.history(&alice.to_string(), 1000).await?;
            Ok(queued.iter().all(|t| {
                history
                    .iter()
                    .filter(|m| m.body.as_text() == Some(t.as_str()))
                    .count()
                    == 1
            }))
        }
    })
    .await?;
    let later = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), "after")).await??;
    assert_eq!(later.status, SendStatus::Delivered);
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    drop(disk);
    Ok(())
}

#[tokio::test]
async fn a_sender_whose_storage_fails_sends_nothing_until_it_heals() -> Result<()> {
    let Some(disk) = SmallDisk::mount("8m")? else {
        return Ok(());
    };
    let d = Discovery::start().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = bob.start(&d.url).await?;
    let a = alice
        .builder(&d.url)
        .data_dir(disk.path().join("alice"))
        .bind()
        .await?;
    let mut a_ev = a.subscribe();
    let first = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), "before")).await??;
    assert_eq!(first.status, SendStatus::Delivered);

    let filler = disk.fill()?;
    // Messages of 12 KiB until alice's database cannot take them. A message whose
    // write fails during its send may still reach bob (it goes out while it commits).
    let big = "x".repeat(12 * 1024);
    let deadline = Instant::now() + DEADLINE;
    for n in 0.. {
        if Instant::now() > deadline {
            bail!("alice's node never reported its storage failing");
        }
        let sent =
            tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), &format!("{n} {big}"))).await?;
        let failing = queued_events(&mut a_ev)
            .iter()
            .any(|e| matches!(e, NodeEvent::StorageFailing { .. }));
        if sent.is_err() && failing {
            break;
        }
    }
    // From now on a send is refused before anything leaves: bob gets nothing.
    let held = b.history(&alice.id().to_string(), 1000).await?.len();
    let refused = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), "while full")).await?;
    assert!(
        matches!(refused, Err(p2p_node::SendError::Storage(_))),
        "refused with a storage error: {refused:?}"
    );
    // Had it gone out, bob's ack (a round trip on loopback) would be long back by the
    // time alice's send returned; the history is read after bob's writes settle.
    let after = b.history(&alice.id().to_string(), 1000).await?;
    assert_eq!(
        after.len(),
        held,
        "nothing reached bob while alice's storage failed"
    );
    assert!(after.iter().all(|m| m.body.as_text() != Some("while full")));

    std::fs::remove_file(&filler)?;
    next_event(&mut a_ev, "storage recovered", |e| {
        matches!(e, NodeEvent::StorageRecovered)
    })
    .await?;
    let later = tokio::time::timeout(DEADLINE, a.send_to(&bob.id(), "after")).await??;
    assert_eq!(later.status, SendStatus::Delivered);
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    drop(disk);
    Ok(())
}
