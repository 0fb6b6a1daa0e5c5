//! Hostile peers and a lying discovery server against a node on loopback. In every
//! test a well-behaved peer keeps sending while the attack goes on, and its messages
//! must still arrive.

mod common;

use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use axum::{routing::get, Json, Router};
use p2p_crypto::SecretKey;
use p2p_discovery::api::{ClaimEntry, PeerEntry};
use p2p_node::{
    node::{CLOSE_BAD_FRAME, CLOSE_TOO_MANY_CONNECTIONS, MAX_CONNECTIONS_PER_PEER, STREAM_TIMEOUT},
    wire::{self, AckStatus, Body, ChatMessage, Frame, MessageId, MAX_TEXT_LEN},
    Node, NotThePeerCause, QueueReason, ResolveError, SendError, SendStatus, Timings,
    TransportSettings,
};
use tokio::task::JoinSet;

use common::*;

/// Test timings with a short stream read timeout, so stalled streams are cut quickly.
fn short_reads() -> Timings {
    Timings {
        read_timeout: Duration::from_millis(500),
        ..fast()
    }
}

/// Bob's node (with `bob_timings`) and Alice's on one discovery server, and Mallory with
/// a bare endpoint that writes whatever she likes.
struct Scene {
    d: Discovery,
    alice: User,
    bob: User,
    a: Node,
    b: Node,
    mallory: SecretKey,
    m: p2p_node::Endpoint,
}

impl Scene {
    async fn start(bob_timings: Timings) -> Result<Scene> {
        let d = Discovery::start().await?;
        let (alice, bob) = (User::new()?, User::new()?);
        let b = bob.builder(&d.url).timings(bob_timings).bind().await?;
        let a = alice.start(&d.url).await?;
        let mallory = SecretKey::generate();
        let m = raw_endpoint(&mallory).await?;
        Ok(Scene {
            d,
            alice,
            bob,
            a,
            b,
            mallory,
            m,
        })
    }

    /// A fresh connection from Mallory to Bob.
    async fn mallory_connects(&self) -> Result<p2p_node::Connection> {
        Ok(self.m.connect(self.b.local_addr()?, self.bob.id()).await?)
    }

    /// How many messages from Mallory Bob stored (at most `max`).
    async fn stored_from_mallory(&self, max: usize) -> Result<usize> {
        Ok(self
            .b
            .history(&self.mallory.public().to_string(), max)
            .await?
            .len())
    }

    /// How many messages from Alice Bob stored (at most 1000).
    async fn stored_from_alice(&self) -> Result<usize> {
        Ok(self
            .b
            .history(&self.alice.id().to_string(), 1000)
            .await?
            .len())
    }

    async fn stop(self) -> Result<()> {
        self.a.shutdown().await;
        self.b.shutdown().await;
        self.d.stop().await;
        Ok(())
    }
}

/// Alice sends `n` messages to Bob one after the other; each must be delivered.
async fn good_peer_sends(a: &Node, bob: &str, n: usize, tag: &str) -> Result<Duration> {
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let t = tokio::time::Instant::now();
        let out = tokio::time::timeout(DEADLINE, a.send(bob, &format!("{tag} {i}")))
            .await
            .with_context(|| format!("{tag} {i}: not delivered within {DEADLINE:?}"))??;
        if out.status != SendStatus::Delivered {
            bail!("{tag} {i}: {:?}", out.status);
        }
        slowest = slowest.max(t.elapsed());
    }
    Ok(slowest)
}

/// The reset or stop code a stalled stream ends with, as seen by the attacker. The
/// stream's halves are dropped on return, as any QUIC stack does with a stream the peer
/// reset, which gives the stream credit back.
async fn stream_end_code(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    trickle: bool,
) -> Result<u64> {
    if trickle {
        // A header announcing 256 bytes, which then come one at a time.
        send.write_all(&[0, 0, 1, 0]).await?;
    } else {
        // Two bytes of a four-byte header: the frame never completes.
        send.write_all(&[0, 0]).await?;
    }
    let mut buf = [0u8; 16];
    for _ in 0..1_000 {
        if trickle {
            // One byte at a time, forever (bounded by the loop): a slow writer.
            match send.write_all(&[0]).await {
                Ok(()) => {}
                Err(quinn::WriteError::Stopped(code)) => return Ok(code.into_inner()),
                Err(e) => bail!("write failed otherwise: {e}"),
            }
            match tokio::time::timeout(Duration::from_millis(50), recv.read(&mut buf)).await {
                Err(_) => continue,
                Ok(Err(quinn::ReadError::Reset(code))) => return Ok(code.into_inner()),
                Ok(other) => bail!("unexpected read result: {other:?}"),
            }
        } else {
            return match tokio::time::timeout(DEADLINE, recv.read(&mut buf)).await? {
                Err(quinn::ReadError::Reset(code)) => Ok(code.into_inner()),
                other => bail!("unexpected read result: {other:?}"),
            };
        }
    }
    bail!("the node never cut the slow stream")
}

/// The application close code `conn` ends with.
async fn close_code(conn: &p2p_node::Connection) -> Result<quinn::VarInt> {
    match tokio::time::timeout(DEADLINE, conn.quic().closed()).await? {
        quinn::ConnectionError::ApplicationClosed(c) => Ok(c.error_code),
        other => bail!("connection ended otherwise: {other}"),
    }
}

/// Requires `answer` to be the ack of a stored message.
fn require_stored(answer: Option<Frame>, id: MessageId) -> Result<()> {
    match answer {
        Some(Frame::Ack(ack)) if ack.id == id && ack.status == AckStatus::Stored => Ok(()),
        other => bail!("expected the stored ack of {id}, got {other:?}"),
    }
}

#[tokio::test]
async fn stalled_and_trickling_streams_are_cut_and_a_good_peer_is_served() -> Result<()> {
    let s = Scene::start(short_reads()).await?;
    let conn = s.mallory_connects().await?;
    let mut attacks = JoinSet::new();
    for i in 0..32 {
        let (send, recv) = conn.quic().open_bi().await?;
        attacks.spawn(stream_end_code(send, recv, i % 2 == 1));
    }
    let bob = s.bob.id().to_string();
    let slowest = good_peer_sends(&s.a, &bob, 20, "during the attack").await?;
    eprintln!("good peer: slowest of 20 sends during the attack took {slowest:?}");

    let mut cut = 0;
    while let Some(code) = attacks.join_next().await {
        assert_eq!(
            code??,
            STREAM_TIMEOUT.into_inner(),
            "reset by the read timeout"
        );
        cut += 1;
    }
    assert_eq!(cut, 32);
    assert_eq!(s.stored_from_mallory(10).await?, 0);
    assert_eq!(s.stored_from_alice().await?, 20);
    s.stop().await
}

#[tokio::test]
async fn a_peer_at_the_stream_limit_waits_and_others_are_served() -> Result<()> {
    let s = Scene::start(short_reads()).await?;
    let limit = TransportSettings::default().max_concurrent_bidi_streams;
    let conn = s.mallory_connects().await?;
    let mut stalled = JoinSet::new();
    for _ in 0..limit {
        let (send, recv) = conn.quic().open_bi().await?;
        stalled.spawn(stream_end_code(send, recv, false));
    }
    // The node allows no more: opening one more stream cannot even start.
    assert!(
        tokio::time::timeout(Duration::ZERO, conn.quic().open_bi())
            .await
            .is_err(),
        "stream {} opened past the limit of {limit}",
        limit + 1
    );
    // Alice, on her own connection, is not affected.
    let bob = s.bob.id().to_string();
    good_peer_sends(&s.a, &bob, 10, "while mallory is at the limit").await?;

    // Once the node has cut the stalled streams, Mallory may open new ones, and a
    // well-formed message on one of them is stored and acknowledged.
    tokio::time::timeout(DEADLINE, conn.quic().open_bi())
        .await
        .context("stream credit never came back")??;
    let msg = ChatMessage::text("finally", 1)?;
    require_stored(
        raw_exchange(&conn, &Frame::Message(msg.clone())).await?,
        msg.id,
    )?;
    while let Some(code) = stalled.join_next().await {
        assert_eq!(code??, STREAM_TIMEOUT.into_inner());
    }
    s.stop().await
}

#[tokio::test]
async fn frames_at_the_limit_are_accepted_and_over_it_refused() -> Result<()> {
    let s = Scene::start(fast()).await?;
    let bob = s.bob.id().to_string();

    // The longest text is a normal message.
    let longest = "é".repeat(MAX_TEXT_LEN / 2);
    assert_eq!(longest.len(), MAX_TEXT_LEN);
    assert_eq!(
        s.a.send(&bob, &longest).await?.status,
        SendStatus::Delivered
    );
    // One byte more is refused before anything is stored or sent.
    let too_long = format!("{longest}x");
    assert!(matches!(
        s.a.send(&bob, &too_long).await,
        Err(SendError::InvalidMessage(_))
    ));

    // A peer that writes it anyway (bypassing the encoder's check) loses its connection,
    // and so does one sending a frame of exactly the size limit that does not decode.
    let mut msg = ChatMessage::text("x", 1)?;
    msg.body = Body::Text(too_long);
    let payload = postcard::to_stdvec(&Frame::Message(msg))?;
    assert!(
        payload.len() <= wire::MAX_FRAME_LEN,
        "within the frame limit"
    );
    let mut over_text = u32::try_from(payload.len())?.to_be_bytes().to_vec();
    over_text.extend_from_slice(&payload);
    let mut at_limit = u32::try_from(wire::MAX_FRAME_LEN)?.to_be_bytes().to_vec();
    at_limit.resize(4 + wire::MAX_FRAME_LEN, 0xff);
    for bytes in [over_text, at_limit] {
        let conn = s.mallory_connects().await?;
        let (mut send, _recv) = conn.quic().open_bi().await?;
        send.write_all(&bytes).await?;
        send.finish()?;
        assert_eq!(close_code(&conn).await?, CLOSE_BAD_FRAME);
    }

    good_peer_sends(&s.a, &bob, 3, "after the bad frames").await?;
    assert_eq!(s.stored_from_mallory(10).await?, 0);
    s.stop().await
}

#[tokio::test]
async fn a_flooding_peer_does_not_starve_a_good_one() -> Result<()> {
    const FLOOD: usize = 2_000;
    let s = Scene::start(fast()).await?;
    let conn = Arc::new(s.mallory_connects().await?);
    // Mallory sends as fast as the node lets her: 64 streams in flight at all times.
    let flood = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            for i in 0..FLOOD {
                if tasks.len() >= 64 {
                    if let Some(r) = tasks.join_next().await {
                        r??;
                    }
                }
                let conn = conn.clone();
                tasks.spawn(async move {
                    let msg = ChatMessage::text(format!("flood {i}"), 1)?;
                    require_stored(
                        raw_exchange(&conn, &Frame::Message(msg.clone())).await?,
                        msg.id,
                    )
                });
            }
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            anyhow::Ok(())
        })
    };
    let bob = s.bob.id().to_string();
    let slowest = good_peer_sends(&s.a, &bob, 20, "during the flood").await?;
    eprintln!("good peer: slowest of 20 sends during a {FLOOD}-message flood: {slowest:?}");
    tokio::time::timeout(DEADLINE * 3, flood)
        .await
        .context("the flood did not end")???;
    assert_eq!(
        s.stored_from_mallory(FLOOD + 10).await?,
        FLOOD,
        "every flood message stored once"
    );
    assert_eq!(s.stored_from_alice().await?, 20);
    s.stop().await
}

#[tokio::test]
async fn one_peer_cannot_take_every_connection() -> Result<()> {
    let s = Scene::start(fast()).await?;
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_PEER {
        let conn = s.mallory_connects().await?;
        // A message on each makes sure the node has admitted it.
        let msg = ChatMessage::text("hello", 1)?;
        require_stored(
            raw_exchange(&conn, &Frame::Message(msg.clone())).await?,
            msg.id,
        )?;
        held.push(conn);
    }
    let extra = s.mallory_connects().await?;
    assert_eq!(close_code(&extra).await?, CLOSE_TOO_MANY_CONNECTIONS);
    let bob = s.bob.id().to_string();
    good_peer_sends(&s.a, &bob, 3, "with mallory at her limit").await?;
    // A closed connection gives its slot back.
    if let Some(c) = held.pop() {
        c.quic().close(0u32.into(), b"bye");
    }
    eventually("a slot is free again", || async {
        let conn = s.mallory_connects().await?;
        let msg = ChatMessage::text("again", 1)?;
        Ok(matches!(
            raw_exchange(&conn, &Frame::Message(msg)).await,
            Ok(Some(Frame::Ack(_)))
        ))
    })
    .await?;
    s.stop().await
}

/// A discovery server that answers every lookup with `entry`, and the online list with
/// it too.
async fn lying_discovery(
    entry: serde_json::Value,
) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let (e1, e2, e3) = (entry.clone(), entry.clone(), entry);
    let app =
        Router::new()
            .route("/v1/names/{name}", get(move || async move { Json(e1) }))
            .route("/v1/peers/{id}", get(move || async move { Json(e2) }))
            .route(
                "/v1/presence",
                get(move || async move {
                    Json(serde_json::json!({ "peers": [e3], "next_cursor": null }))
                }),
            );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, task))
}

fn claim_json(sk: &SecretKey, name: &str, node: &SecretKey) -> Result<serde_json::Value> {
    let claim = p2p_discovery::Signed::sign(
        sk,
        p2p_discovery::NameClaim {
            name: name.into(),
            node_id: sk.public(),
            mailbox_key: sk.mailbox_secret().public(),
            timestamp_ms: p2p_discovery::now_ms(),
        },
    )?;
    let w = claim.to_wire();
    Ok(serde_json::to_value(PeerEntry {
        node_id: node.public(),
        claim: Some(ClaimEntry {
            record: w.record,
            signature: w.signature,
            decoded: None,
        }),
        presence: None,
    })?)
}

#[tokio::test]
async fn a_lying_discovery_server_cannot_make_the_node_trust_its_records() -> Result<()> {
    let bob = SecretKey::generate();
    let mallory = SecretKey::generate();
    let forged = claim_json(&mallory, "bob", &bob)?; // Mallory's claim passed off as bob's
    let mut altered = claim_json(&bob, "bob", &bob)?; // bob's claim, with a bit flipped
    let record = altered["claim"]["record"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut bytes = data_encoding::BASE64URL_NOPAD.decode(record.as_bytes())?;
    if let Some(last) = bytes.last_mut() {
        *last ^= 1;
    }
    altered["claim"]["record"] = data_encoding::BASE64URL_NOPAD.encode(&bytes).into();
    let oversized = serde_json::json!({ "node_id": bob.public().to_string(), "claim": { "record": "A".repeat(512 * 1024), "signature": "a" } });
    let malformed = serde_json::json!({ "node_id": 42, "claim": [] });

    for (what, entry) in [
        ("forged", forged),
        ("altered", altered),
        ("oversized", oversized),
        ("malformed", malformed),
    ] {
        let (url, server) = lying_discovery(entry).await?;
        let alice = User::new()?;
        let a = alice.start(&url).await?;
        let err = a.send("bob", "hi bob").await;
        assert!(
            matches!(err, Err(SendError::Resolve(ResolveError::Discovery(_)))),
            "{what}: the lookup must fail, got {err:?}"
        );
        assert!(a.outbox().await?.is_empty(), "{what}: nothing queued");
        let listed = a.peers().await.map(|p| p.len()).unwrap_or(0);
        assert_eq!(listed, 0, "{what}: nothing listed");
        let by_id = a.history(&bob.public().to_string(), 10).await?;
        assert!(by_id.is_empty(), "{what}: nothing stored");
        a.shutdown().await;
        server.abort();
    }
    Ok(())
}

/// Bob's (genuine, signed) presence names an address where another node answers.
async fn bob_published_at(
    d: &Discovery,
    bob: &SecretKey,
    addr: std::net::SocketAddr,
) -> Result<()> {
    let client = d.client()?;
    client.claim_name(bob, "bob").await?;
    client
        .announce(bob, Some("bob"), &[addr], Duration::from_secs(60))
        .await?;
    Ok(())
}

/// Mallory's endpoint, accepting every connection, at the address bob's genuine presence
/// names; returns her key, that address and the task accepting for her.
async fn impostor_at_bobs_address(
    d: &Discovery,
    bob: &SecretKey,
) -> Result<(SecretKey, std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let mallory = SecretKey::generate();
    let impostor = raw_endpoint(&mallory).await?;
    let at = std::net::SocketAddr::from(([127, 0, 0, 1], impostor.local_addr()?.port()));
    let task = tokio::spawn(async move {
        while let Some(incoming) = impostor.accept().await {
            let _ = incoming.accept().await;
        }
    });
    bob_published_at(d, bob, at).await?;
    Ok((mallory, at, task))
}

#[tokio::test]
async fn a_node_at_the_peers_address_with_another_key_is_reported_and_the_message_queued(
) -> Result<()> {
    let d = Discovery::start().await?;
    let bob = SecretKey::generate();
    let (mallory, at, task) = impostor_at_bobs_address(&d, &bob).await?;
    let alice = User::new()?;
    let a = alice.start(&d.url).await?;
    let out = tokio::time::timeout(DEADLINE, a.send("bob", "for bob only")).await??;
    assert_eq!(out.status, SendStatus::Queued);
    assert_eq!(
        out.queued_because,
        Some(QueueReason::NotThePeer {
            addr: Some(at),
            expected: bob.public(),
            actual: Some(mallory.public()),
            cause: NotThePeerCause::OtherKey,
        })
    );
    // A second message meets the dial backoff the first one set, and says why too.
    let again = tokio::time::timeout(DEADLINE, a.send("bob", "again")).await??;
    assert_eq!(again.queued_because, out.queued_because);
    // Kept for bob, and tried again later.
    assert_eq!(a.outbox().await?.len(), 2);
    a.shutdown().await;
    task.abort();
    d.stop().await;
    Ok(())
}

/// `p2p-node send`, at the default log level, tells the user on stderr that the node at
/// bob's address is not bob, with both fingerprints; `--json` carries the reason; the
/// message is queued and the exit status is 0.
#[tokio::test]
async fn the_cli_warns_when_the_node_at_the_peers_address_is_another_key() -> Result<()> {
    let d = Discovery::start().await?;
    let bob = SecretKey::generate();
    let (mallory, at, task) = impostor_at_bobs_address(&d, &bob).await?;
    let dir = p2p_tests::private_tempdir();
    let mut cmd = p2p_tests::p2p_node();
    cmd.arg("--data-dir").arg(dir.path()).args([
        "--discovery",
        &d.url,
        "--no-relay",
        "send",
        "bob",
        "hi",
        "--json",
    ]);
    let out =
        tokio::task::spawn_blocking(move || p2p_tests::run_with_deadline(cmd, DEADLINE)).await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.contains("is not who discovery says"))
        .with_context(|| format!("no warning on stderr: {stderr}"))?;
    assert!(warning.contains(&at.to_string()), "{warning}");
    assert!(warning.contains(&bob.public().fingerprint()), "{warning}");
    assert!(
        warning.contains(&mallory.public().fingerprint()),
        "{warning}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert_eq!(v["status"], "queued", "{stdout}");
    assert_eq!(v["reason"]["code"], "not_the_peer", "{stdout}");
    assert_eq!(v["reason"]["expected"], bob.public().to_string());
    assert_eq!(v["reason"]["actual"], mallory.public().to_string());
    task.abort();
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_node_at_the_peers_address_without_the_protocol_is_reported() -> Result<()> {
    let d = Discovery::start().await?;
    let bob = SecretKey::generate();
    // A QUIC server that knows no ALPN the node speaks.
    let other = p2p_crypto::tls::certify(&SecretKey::generate())?;
    let mut tls = p2p_crypto::tls::server_config(&other)?;
    tls.alpn_protocols = vec![b"something-else/1".to_vec()];
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
        )),
        "127.0.0.1:0".parse()?,
    )?;
    let at = server.local_addr()?;
    let task = tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let _ = incoming.await;
        }
    });
    bob_published_at(&d, &bob, at).await?;
    let alice = User::new()?;
    let a = alice.start(&d.url).await?;
    let out = tokio::time::timeout(DEADLINE, a.send("bob", "for bob only")).await??;
    assert_eq!(out.status, SendStatus::Queued);
    assert!(
        matches!(
            out.queued_because,
            Some(QueueReason::NotThePeer {
                addr: Some(addr),
                actual: None,
                cause: NotThePeerCause::NoCommonProtocol,
                ..
            }) if addr == at
        ),
        "{:?}",
        out.queued_because
    );
    a.shutdown().await;
    task.abort();
    d.stop().await;
    Ok(())
}

#[tokio::test]
async fn every_message_on_a_stream_is_acknowledged_and_the_stream_ends_after_the_senders_side(
) -> Result<()> {
    let s = Scene::start(fast()).await?;
    let conn = s.mallory_connects().await?;
    let (mut send, mut recv) = conn.quic().open_bi().await?;
    let mut buf = Vec::new();
    let (one, two) = (ChatMessage::text("one", 1)?, ChatMessage::text("two", 2)?);
    wire::write_frame(&mut send, &Frame::Message(one.clone())).await?;
    let ack = tokio::time::timeout(DEADLINE, wire::read_frame(&mut recv, &mut buf)).await??;
    require_stored(ack, one.id)?;
    // The sender's side is still open: the node keeps reading the stream, and a second
    // message on it is stored and acknowledged too (PROTOCOL.md, stream lifecycle).
    wire::write_frame(&mut send, &Frame::Message(two.clone())).await?;
    send.finish()?;
    let ack = tokio::time::timeout(DEADLINE, wire::read_frame(&mut recv, &mut buf)).await??;
    require_stored(ack, two.id)?;
    // Then, the sender's side having ended, the node ends its own.
    let end = tokio::time::timeout(DEADLINE, wire::read_frame(&mut recv, &mut buf)).await??;
    assert_eq!(end, None, "the stream ends after both acks");
    assert_eq!(s.stored_from_mallory(10).await?, 2);
    s.stop().await
}
