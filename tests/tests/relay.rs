//! Reaching peers through the relay, on loopback: relayed delivery, the move to a direct
//! path, a relay restart, relays that lie, and nodes on two discovery instances (one
//! PostgreSQL database, a relay each) reaching each other through each other's relay.
//!
//! Relay-only nodes (`PathConfig { direct: false }`) stand for nodes behind NATs that
//! cannot punch through; nodes that publish no direct addresses stand for nodes behind
//! NATs that can. The real thing, in network namespaces with NAT routers, is in
//! `nat.rs`.

mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Result};
use bytes::{Bytes, BytesMut};
use p2p_crypto::{tls, NodeId, SecretKey};
use p2p_discovery::relay::proto::{Frame, ALPN};
use p2p_node::{
    store::Direction, Node, NodeBuilder, NodeEvent, PathConfig, PathKind, SendStatus, Timings, Via,
};
use quinn::crypto::rustls::QuicServerConfig;

use common::*;

/// Timers for these tests: the mailbox never delivers within a test, so whatever
/// arrives came over a connection.
fn no_mailbox() -> Timings {
    Timings {
        mailbox_poll: Duration::from_secs(3600),
        ..fast()
    }
}

fn relay_only() -> PathConfig {
    PathConfig {
        direct: false,
        ..PathConfig::default()
    }
}

fn node(user: &User, d: &Discovery) -> NodeBuilder {
    user.builder(&d.url).timings(no_mailbox())
}

async fn received(
    rx: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
) -> Result<(NodeId, Via, String)> {
    match next_event(rx, "a message", is_received).await? {
        NodeEvent::MessageReceived {
            from, message, via, ..
        } => Ok((from, via, text(&message).to_owned())),
        _ => bail!("not a message"),
    }
}

/// Alice and bob (registered as "bob"), both relay-only, with their events.
struct Pair {
    alice: User,
    bob: User,
    a: Node,
    b: Node,
    a_ev: tokio::sync::broadcast::Receiver<NodeEvent>,
    b_ev: tokio::sync::broadcast::Receiver<NodeEvent>,
}

impl Pair {
    async fn relay_only(d: &Discovery) -> Result<Pair> {
        let (alice, bob) = (User::new()?, User::new()?);
        let b = node(&bob, d).paths(relay_only()).bind().await?;
        b.register("bob").await?;
        let b_ev = b.subscribe();
        let a = node(&alice, d).paths(relay_only()).bind().await?;
        let a_ev = a.subscribe();
        Ok(Pair {
            alice,
            bob,
            a,
            b,
            a_ev,
            b_ev,
        })
    }
}

#[tokio::test]
async fn relayed_messages_arrive_end_to_end_and_say_so() -> Result<()> {
    let d = Discovery::start_with_relay().await?;
    let Pair {
        alice,
        bob,
        a,
        b,
        mut a_ev,
        mut b_ev,
    } = Pair::relay_only(&d).await?;

    let out = a.send("bob", "through the relay").await?;
    assert_eq!(out.status, SendStatus::Delivered);
    assert_eq!(out.path, Some(PathKind::Relay));
    let (from, via, text) = received(&mut b_ev).await?;
    assert_eq!(
        (from, via, text.as_str()),
        (alice.id(), Via::Relay, "through the relay")
    );
    next_event(&mut a_ev, "delivered", is_delivered(out.id)).await?;
    assert!(d.relayed_packets() > 0, "the relay carried it");

    // And back, on the same connection.
    let back = b.send_to(&alice.id(), "and back").await?;
    assert_eq!(
        (back.status, back.path),
        (SendStatus::Delivered, Some(PathKind::Relay))
    );
    let (from, via, _) = received(&mut a_ev).await?;
    assert_eq!((from, via), (bob.id(), Via::Relay));
    assert_eq!(a.path_of(&bob.id()), Some(PathKind::Relay));

    // Each knows its home relay and the address it sees it at.
    let home = a.home_relay();
    assert!(home.connected);
    assert_eq!(home.relay.map(|r| r.addr), d.relay_addr);
    assert_eq!(home.reflexive, Some(a.local_addr()?));
    // Both histories hold the two messages once.
    for (n, peer) in [(&a, bob.id()), (&b, alice.id())] {
        let h = n.history(&peer.to_string(), 10).await?;
        assert_eq!(h.len(), 2, "{h:?}");
    }
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_path_moves_from_relay_to_direct_without_losing_or_repeating_a_message() -> Result<()> {
    let d = Discovery::start_with_relay().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    // Neither publishes a direct address, so packets must go through the relay until a
    // direct path is punched; punching waits a second, so messages flow on the relay
    // first and the path changes under a busy connection.
    let paths = PathConfig {
        punch_delay: Duration::from_secs(1),
        ..PathConfig::default()
    };
    let b = node(&bob, &d)
        .publish_direct_addrs(false)
        .paths(paths.clone())
        .bind()
        .await?;
    b.register("bob").await?;
    let mut b_ev = b.subscribe();
    let a = node(&alice, &d)
        .publish_direct_addrs(false)
        .paths(paths)
        .bind()
        .await?;
    let mut a_ev = a.subscribe();

    let mut paths = Vec::new();
    let mut sent = Vec::new();
    let mut direct_seen = false;
    // Send until the path is direct and a few more messages went that way.
    for i in 0..5000 {
        let out = a.send("bob", &format!("message {i}")).await?;
        assert_eq!(out.status, SendStatus::Delivered, "message {i}");
        sent.push(out.id);
        paths.push(out.path);
        direct_seen |= queued_events(&mut a_ev).iter().any(|e| {
            matches!(e, NodeEvent::PathChanged { node_id, path: Some(PathKind::Direct), .. } if *node_id == bob.id())
        });
        let direct_sends = paths
            .iter()
            .filter(|p| **p == Some(PathKind::Direct))
            .count();
        if direct_seen && direct_sends >= 5 {
            break;
        }
    }
    assert!(direct_seen, "no direct path found: {paths:?}");
    assert_eq!(
        paths[0],
        Some(PathKind::Relay),
        "the first message went through the relay"
    );
    assert!(
        d.relayed_packets() > 0,
        "the relay carried the first packets"
    );
    // Once direct, later messages stay direct (no path flapping on a quiet link).
    let first_direct = paths
        .iter()
        .position(|p| *p == Some(PathKind::Direct))
        .unwrap_or(paths.len());
    assert!(
        paths[first_direct..]
            .iter()
            .all(|p| *p == Some(PathKind::Direct)),
        "{paths:?}"
    );
    assert_eq!(a.path_of(&bob.id()), Some(PathKind::Direct));
    let (addr, rtt) = a.direct_path_of(&bob.id()).expect("a direct path");
    assert_eq!(addr, b.local_addr()?);
    assert!(rtt.is_some());

    // Every message arrived exactly once, in order.
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let (from, _, text) = received(&mut b_ev).await?;
        assert_eq!(from, alice.id());
        got.push(text);
    }
    let want: Vec<String> = (0..sent.len()).map(|i| format!("message {i}")).collect();
    assert_eq!(got, want);
    let history = b.history(&alice.id().to_string(), 1000).await?;
    assert_eq!(history.len(), sent.len());
    let ids: HashSet<_> = history.iter().map(|m| m.id).collect();
    assert_eq!(ids, sent.iter().copied().collect::<HashSet<_>>());
    assert!(history.iter().all(|m| m.direction == Direction::Incoming));
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_relay_restart_loses_nothing_and_the_link_comes_back() -> Result<()> {
    let d = Discovery::start_with_relay().await?;
    let Pair {
        alice,
        bob: _bob,
        a,
        b,
        mut a_ev,
        mut b_ev,
    } = Pair::relay_only(&d).await?;
    let first = a.send("bob", "before").await?;
    assert_eq!(first.path, Some(PathKind::Relay));
    received(&mut b_ev).await?;

    // The server and its relay go away (in-memory state lost, as in a crash).
    let mut d = d;
    d.halt().await;
    eventually("alice sees the relay link down", || async {
        Ok(!a.home_relay().connected)
    })
    .await?;
    let during = a.send("bob", "during the outage").await?;
    assert_eq!(during.status, SendStatus::Queued);

    // Back on the same ports, with the same relay key.
    let d = d.start_again().await?;
    eventually("alice's relay link is back", || async {
        Ok(a.home_relay().connected)
    })
    .await?;
    eventually("bob's relay link is back", || async {
        Ok(b.home_relay().connected)
    })
    .await?;
    // The queued message arrives once, without anyone sending again.
    let (_, via, text) = received(&mut b_ev).await?;
    assert_eq!((via, text.as_str()), (Via::Relay, "during the outage"));
    next_event(&mut a_ev, "delivered", is_delivered(during.id)).await?;
    let after = a.send("bob", "after").await?;
    assert_eq!(
        (after.status, after.path),
        (SendStatus::Delivered, Some(PathKind::Relay))
    );
    let history = b.history(&alice.id().to_string(), 10).await?;
    let texts: Vec<&str> = history.iter().map(common::text).collect();
    assert_eq!(texts, ["before", "during the outage", "after"]);
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A relay that lies.

/// What the hostile relay does with packets.
#[derive(Clone, Copy)]
enum Lie {
    /// Packets for `victim` go to `impostor` instead, and the impostor's answers are
    /// stamped as the victim's.
    Redirect { victim: NodeId, impostor: NodeId },
    /// Packets from `impostor` are stamped as `victim`'s, and packets for the victim go
    /// to the impostor: the impostor poses as the victim towards everyone.
    Stamp { victim: NodeId, impostor: NodeId },
}

/// A relay speaking the protocol correctly but forwarding as `lie` says.
struct HostileRelay {
    id: NodeId,
    port: u16,
    _endpoint: quinn::Endpoint,
}

impl HostileRelay {
    fn start(lie: Lie) -> Result<HostileRelay> {
        let key = SecretKey::generate();
        let certified = tls::certify(&key)?;
        let mut server = tls::server_config(&certified)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let config =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server)?));
        let endpoint = quinn::Endpoint::server(config, loopback())?;
        let port = endpoint.local_addr()?.port();
        let clients: Arc<Mutex<HashMap<[u8; 32], tokio::sync::mpsc::UnboundedSender<Bytes>>>> =
            Arc::default();
        let ep = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let clients = clients.clone();
                tokio::spawn(async move {
                    let _ = serve_hostile(incoming, clients, lie).await;
                });
            }
        });
        Ok(HostileRelay {
            id: key.public(),
            port,
            _endpoint: endpoint,
        })
    }
}

async fn serve_hostile(
    incoming: quinn::Incoming,
    clients: Arc<Mutex<HashMap<[u8; 32], tokio::sync::mpsc::UnboundedSender<Bytes>>>>,
    lie: Lie,
) -> Result<()> {
    let conn = incoming.await?;
    let chain = conn
        .peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no certificate"))?;
    let me = *tls::node_id_from_chain(&chain)?.as_bytes();
    let (mut send, mut recv) = conn.accept_bi().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    clients.lock().expect("lock").insert(me, tx);
    let mut hello = BytesMut::new();
    Frame::Observed {
        addr: conn.remote_address(),
    }
    .encode(&mut hello)?;
    send.write_all(&hello).await?;
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if send.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut buf = BytesMut::new();
    while let Some(chunk) = recv.read_chunk(65536, true).await? {
        buf.extend_from_slice(&chunk.bytes);
        while let Some(frame) = Frame::decode(&mut buf)? {
            let Frame::Send { dst, packet } = frame else {
                continue;
            };
            let (to, stamp) = match lie {
                Lie::Redirect { victim, impostor } if dst == *victim.as_bytes() => {
                    (*impostor.as_bytes(), me)
                }
                Lie::Redirect { victim, impostor } if me == *impostor.as_bytes() => {
                    (dst, *victim.as_bytes())
                }
                Lie::Stamp { victim, impostor } if me == *impostor.as_bytes() => {
                    (dst, *victim.as_bytes())
                }
                Lie::Stamp { victim, impostor } if dst == *victim.as_bytes() => {
                    (*impostor.as_bytes(), me)
                }
                _ => (dst, me),
            };
            let mut out = BytesMut::new();
            Frame::Recv { src: stamp, packet }.encode(&mut out)?;
            let target = clients.lock().expect("lock").get(&to).cloned();
            if let Some(t) = target {
                let _ = t.send(out.freeze());
            }
        }
    }
    Ok(())
}

/// A relay-only node of `user` on a discovery server that names `relay` as its relay.
async fn on_hostile(user: &User, d: &Discovery) -> Result<Node> {
    Ok(node(user, d).paths(relay_only()).bind().await?)
}

#[tokio::test]
async fn a_relay_cannot_pass_another_node_off_as_the_one_dialed() -> Result<()> {
    let (alice, bob, mallory) = (User::new()?, User::new()?, User::new()?);
    let relay = HostileRelay::start(Lie::Redirect {
        victim: bob.id(),
        impostor: mallory.id(),
    })?;
    let d = Discovery::start_advertising(relay.id, relay.port).await?;
    let b = on_hostile(&bob, &d).await?;
    b.register("bob").await?;
    let m = on_hostile(&mallory, &d).await?;
    let mut m_ev = m.subscribe();
    let a = on_hostile(&alice, &d).await?;
    eventually("relay links up", || async {
        Ok(a.home_relay().connected && m.home_relay().connected && b.home_relay().connected)
    })
    .await?;
    // Alice's packets for bob reach mallory, who answers with her own certificate:
    // alice's handshake refuses it, exactly as a direct dial to the wrong key.
    let out = a.send("bob", "for bob only").await?;
    assert_eq!(out.status, SendStatus::Queued);
    assert!(queued_events(&mut m_ev)
        .iter()
        .all(|e| !matches!(e, NodeEvent::MessageReceived { .. })));
    assert!(m.history(&alice.id().to_string(), 10).await?.is_empty());
    assert!(b.history(&alice.id().to_string(), 10).await?.is_empty());
    for n in [a, b, m] {
        n.shutdown().await;
    }
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_relayed_caller_presenting_another_key_is_refused() -> Result<()> {
    let (alice, bob, mallory) = (User::new()?, User::new()?, User::new()?);
    let relay = HostileRelay::start(Lie::Stamp {
        victim: alice.id(),
        impostor: mallory.id(),
    })?;
    let d = Discovery::start_advertising(relay.id, relay.port).await?;
    let b = on_hostile(&bob, &d).await?;
    b.register("bob").await?;
    let mut b_ev = b.subscribe();
    let m = on_hostile(&mallory, &d).await?;
    eventually("relay links up", || async {
        Ok(m.home_relay().connected && b.home_relay().connected)
    })
    .await?;
    // Mallory's packets reach bob stamped as alice's; the handshake says mallory, so
    // bob refuses the connection: nothing is stored, nothing is attributed to anyone.
    let out = m.send("bob", "signed, alice").await?;
    assert_eq!(out.status, SendStatus::Queued);
    assert!(queued_events(&mut b_ev)
        .iter()
        .all(|e| !matches!(e, NodeEvent::MessageReceived { .. })));
    assert!(b.history(&alice.id().to_string(), 10).await?.is_empty());
    assert!(b.history(&mallory.id().to_string(), 10).await?.is_empty());
    for n in [b, m] {
        n.shutdown().await;
    }
    d.stop().await;
    Ok(())
}

/// The addresses a node announces do not matter to a relay-only peer: it never dials
/// them.
#[tokio::test]
async fn a_relay_only_node_sends_nothing_directly() -> Result<()> {
    let d = Discovery::start_with_relay().await?;
    let (alice, bob) = (User::new()?, User::new()?);
    let b = node(&bob, &d).bind().await?;
    b.register("bob").await?;
    let a = node(&alice, &d).paths(relay_only()).bind().await?;
    let before = d.relayed_packets();
    let out = a.send("bob", "relayed").await?;
    assert_eq!(
        (out.status, out.path),
        (SendStatus::Delivered, Some(PathKind::Relay))
    );
    assert!(d.relayed_packets() > before);
    a.shutdown().await;
    b.shutdown().await;
    d.stop().await;
    Ok(())
}

/// A node that says it is logged in can be reached through its relay at once: its link
/// to the relay is up, and the presence peers look up names that relay.
#[tokio::test]
async fn a_logged_in_node_is_announced_with_its_live_relay_link() -> Result<()> {
    let d = Discovery::start_with_relay().await?;
    let client = d.client()?;
    let relay = client.relay_ref().await?.expect("the server runs a relay");
    for _ in 0..3 {
        let user = User::new()?;
        let n = node(&user, &d).paths(relay_only()).bind().await?;
        assert!(n.wait_announced(DEADLINE).await);
        assert!(n.home_relay().connected, "logged in before the relay link");
        let found = client.lookup_id(&user.id()).await?.expect("announced");
        assert_eq!(found.relay, Some(relay), "announced without its relay");
        n.shutdown().await;
    }
    d.stop().await;
    Ok(())
}

/// Two discovery instances on one PostgreSQL database, each with its own relay: a
/// relay-only node on one reaches a relay-only node on the other through the other's
/// relay (its home relay, named in its presence record), and is answered.
#[tokio::test]
async fn relay_only_nodes_on_two_instances_reach_each_other() -> Result<()> {
    let Some(pg) = p2p_tests::postgres::PgServer::start() else {
        return Ok(());
    };
    let db = pg.create_database("relays");
    let store = || async { p2p_discovery::PgStore::connect(&db).await };
    let d1 = Discovery::start_with_relay_on(Arc::new(store().await?)).await?;
    let d2 = Discovery::start_with_relay_on(Arc::new(store().await?)).await?;

    // Each instance reports its own relay.
    let r1 = d1
        .client()?
        .relay()
        .await?
        .expect("instance 1 runs a relay");
    let r2 = d2
        .client()?
        .relay()
        .await?
        .expect("instance 2 runs a relay");
    assert_eq!(Some(r1.port), d1.relay_addr.map(|a| a.port()));
    assert_eq!(Some(r2.port), d2.relay_addr.map(|a| a.port()));
    assert_ne!(r1.node_id, r2.node_id);

    let (alice, bob) = (User::new()?, User::new()?);
    let b = node(&bob, &d2).paths(relay_only()).bind().await?;
    b.register("bob").await?;
    let mut b_ev = b.subscribe();
    let a = node(&alice, &d1).paths(relay_only()).bind().await?;
    let mut a_ev = a.subscribe();
    assert!(a.wait_announced(DEADLINE).await && b.wait_announced(DEADLINE).await);
    assert_eq!(a.home_relay().relay.map(|r| r.node_id), Some(r1.node_id));
    assert_eq!(b.home_relay().relay.map(|r| r.node_id), Some(r2.node_id));

    let out = a.send("bob", "across instances").await?;
    assert_eq!(
        (out.status, out.path),
        (SendStatus::Delivered, Some(PathKind::Relay))
    );
    let (from, via, text) = received(&mut b_ev).await?;
    assert_eq!(
        (from, via, text.as_str()),
        (alice.id(), Via::Relay, "across instances")
    );
    let back = b.send_to(&alice.id(), "and back").await?;
    assert_eq!(back.status, SendStatus::Delivered);
    let (from, via, _) = received(&mut a_ev).await?;
    assert_eq!((from, via), (bob.id(), Via::Relay));
    // Alice reached bob through bob's home relay (instance 2), where she opened a link
    // of her own; his answers came back that way, on the same connection.
    assert!(d2.relayed_packets() > 0, "bob's home relay carried it");
    a.shutdown().await;
    b.shutdown().await;
    d1.stop().await;
    d2.stop().await;
    Ok(())
}
