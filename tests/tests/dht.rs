//! Presence on the Mainline DHT, on a local testnet in this process (loopback only):
//! a node publishes its record, and another finds it by NodeId and sends to it when
//! its discovery server does not know the peer, and when no discovery server is left.

mod common;

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{bail, Result};
use p2p_node::{DhtConfig, NodeEvent, SendStatus, Timings, Via};
use p2p_tests::dht::Testnet;

use common::*;

fn dht(testnet: &Testnet, publish: bool) -> DhtConfig {
    DhtConfig {
        bootstrap: Some(testnet.bootstrap.clone()),
        bind: Some(Ipv4Addr::LOCALHOST),
        publish,
        lookup_timeout: Duration::from_secs(5),
        ..DhtConfig::default()
    }
}

/// The mailbox never delivers within this test: what arrives came over a connection.
fn timings() -> Timings {
    Timings {
        mailbox_poll: Duration::from_secs(3600),
        ..fast()
    }
}

async fn received_text(
    rx: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
) -> Result<(Via, String)> {
    match next_event(rx, "a message", is_received).await? {
        NodeEvent::MessageReceived { message, via, .. } => Ok((via, text(&message).to_owned())),
        _ => bail!("not a message"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_is_found_on_the_dht_by_node_id_and_reached() -> Result<()> {
    let testnet = Testnet::start(8).await;
    let bobs_server = Discovery::start().await?;
    let other_server = Discovery::start().await?;
    let (alice, bob, carol) = (User::new()?, User::new()?, User::new()?);
    let b = bob
        .builder(&bobs_server.url)
        .timings(timings())
        .dht(dht(&testnet, true))
        .bind()
        .await?;
    let mut b_ev = b.subscribe();
    let bob_addr = b.local_addr()?;

    // Alice's discovery server has never heard of bob: her node finds him on the DHT.
    let a = alice
        .builder(&other_server.url)
        .timings(timings())
        .dht(dht(&testnet, false))
        .bind()
        .await?;
    eventually("bob's record is on the DHT", || async {
        Ok(a.dht_lookup(&bob.id())
            .await
            .is_ok_and(|r| r.addrs.contains(&bob_addr)))
    })
    .await?;
    assert!(other_server.client()?.lookup_id(&bob.id()).await?.is_none());
    let out = a.send_to(&bob.id(), "found on the DHT").await?;
    assert_eq!(out.status, SendStatus::Delivered);
    assert_eq!(
        received_text(&mut b_ev).await?,
        (Via::Direct, "found on the DHT".to_owned())
    );

    // With every discovery server gone, carol (who never saw bob) still reaches him.
    let dead_url = bobs_server.url.clone();
    bobs_server.stop().await;
    other_server.stop().await;
    let c = carol
        .builder(&dead_url)
        .timings(timings())
        .dht(dht(&testnet, false))
        .bind()
        .await?;
    let out = c.send_to(&bob.id(), "no discovery at all").await?;
    assert_eq!(out.status, SendStatus::Delivered);
    assert_eq!(
        received_text(&mut b_ev).await?,
        (Via::Direct, "no discovery at all".to_owned())
    );
    // A node without the DHT cannot: its message waits in the outbox.
    let d = User::new()?
        .builder(&dead_url)
        .timings(timings())
        .bind()
        .await?;
    assert_eq!(
        d.send_to(&bob.id(), "nobody to ask").await?.status,
        SendStatus::Queued
    );
    for n in [a, b, c, d] {
        n.shutdown().await;
    }
    drop(testnet);
    Ok(())
}
