//! Messages per second and latency between two nodes on loopback, beside a raw QUIC
//! echo over the same endpoint and transport settings, measured in the same run.
//!
//! `cargo bench -p p2p-tests --bench messaging` (env `BENCH_MESSAGES`, default 1000).
//!
//! - node: `Node::send` of a small text message to a peer that is online: the durable
//!   history+outbox write, one QUIC stream with the frame, the receiver's durable
//!   (group-committed) write and its ack, and the durable "delivered" mark.
//! - raw: the same frame on a new stream of an already open connection between two
//!   bare `Endpoint`s, echoed back as an ack with no storage at all.
//! - raw-ll: the same, on long-lived streams (one frame after the other on each of
//!   `CONCURRENCY` streams) instead of a stream per message.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use p2p_crypto::SecretKey;
use p2p_discovery::{AppState, ServerConfig};
use p2p_node::{
    wire::{self, Ack, AckStatus, ChatMessage, Frame},
    Endpoint, Node, SendStatus,
};
use tokio::task::JoinSet;

const CONCURRENCY: usize = 32;
const TEXT: &str = "hello, this is a small chat message";

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Stats {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn report(name: &str, s: &Stats) {
    println!(
        "{name:<6} {:>10.0} msg/s   p50 {:>8.3} ms   p99 {:>8.3} ms",
        s.per_sec,
        s.p50.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3
    );
}

async fn measure<F, Fut>(n: usize, op: F) -> Result<Stats>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    // Latency: one at a time.
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        op().await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    // Throughput: CONCURRENCY at a time.
    let start = Instant::now();
    let mut set = JoinSet::new();
    let per_task = n / CONCURRENCY;
    for _ in 0..CONCURRENCY {
        let op = op.clone();
        set.spawn(async move {
            for _ in 0..per_task {
                op().await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let per_sec = (per_task * CONCURRENCY) as f64 / start.elapsed().as_secs_f64();
    Ok(Stats {
        per_sec,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
    })
}

/// Raw QUIC echo: one stream per message, and long-lived streams.
async fn raw_echo(n: usize) -> Result<(Stats, Stats)> {
    let server_key = SecretKey::generate();
    let server = Endpoint::builder(server_key.clone())
        .bind_addr(loopback())
        .bind()
        .await?;
    let addr = server.local_addr()?;
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.accept().await else {
                    return;
                };
                while let Ok((mut send, mut recv)) = conn.quic().accept_bi().await {
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        while let Ok(Some(Frame::Message(m))) =
                            wire::read_frame(&mut recv, &mut buf).await
                        {
                            let ack = Frame::Ack(Ack {
                                id: m.id,
                                status: AckStatus::Stored,
                            });
                            if wire::write_frame(&mut send, &ack).await.is_err() {
                                return;
                            }
                        }
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    let client = Endpoint::builder(SecretKey::generate())
        .bind_addr(loopback())
        .bind()
        .await?;
    let conn = Arc::new(client.connect(addr, server_key.public()).await?);
    let per_message = {
        let conn = conn.clone();
        measure(n, move || {
            let conn = conn.clone();
            async move {
                let msg = ChatMessage::text(TEXT, 0)?;
                let (mut send, mut recv) = conn.quic().open_bi().await?;
                wire::write_frame(&mut send, &Frame::Message(msg)).await?;
                send.finish()?;
                let mut buf = Vec::new();
                match wire::read_frame(&mut recv, &mut buf).await? {
                    Some(Frame::Ack(_)) => Ok(()),
                    other => anyhow::bail!("unexpected answer {other:?}"),
                }
            }
        })
        .await?
    };
    // The alternative design: long-lived streams (a pool of CONCURRENCY streams, each
    // carrying message after message, ack after ack).
    let mut pool = Vec::new();
    for _ in 0..CONCURRENCY {
        pool.push(Arc::new(tokio::sync::Mutex::new(
            conn.quic().open_bi().await?,
        )));
    }
    let pool = Arc::new(pool);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let long_lived = measure(n, move || {
        let pool = pool.clone();
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % pool.len();
        async move {
            let msg = ChatMessage::text(TEXT, 0)?;
            let mut guard = pool[i].lock().await;
            let (send, recv) = &mut *guard;
            wire::write_frame(send, &Frame::Message(msg)).await?;
            let mut buf = Vec::new();
            match wire::read_frame(recv, &mut buf).await? {
                Some(Frame::Ack(_)) => Ok(()),
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
    })
    .await?;
    Ok((per_message, long_lived))
}

async fn nodes(n: usize) -> Result<Stats> {
    let state = AppState::open(ServerConfig {
        write_rate_per_sec: 100_000.0,
        write_burst: 100_000,
        ..Default::default()
    })?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(p2p_discovery::serve(
        listener,
        state,
        std::future::pending(),
    ));
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let b_key = SecretKey::generate();
    let b = Node::builder(b_key.clone())
        .data_dir(db.path().to_owned())
        .discovery_url(&url)
        .listen(loopback())
        .bind()
        .await?;
    let a = Node::builder(SecretKey::generate())
        .data_dir(da.path().to_owned())
        .discovery_url(&url)
        .listen(loopback())
        .bind()
        .await?;
    let to = b_key.public().to_string();
    // Warm up the connection.
    let first = a.send(&to, TEXT).await?;
    anyhow::ensure!(
        first.status == SendStatus::Delivered,
        "warm-up not delivered"
    );
    let sender = a.clone();
    let stats = measure(n, move || {
        let a = sender.clone();
        let to = to.clone();
        async move {
            let out = a.send(&to, TEXT).await?;
            anyhow::ensure!(out.status == SendStatus::Delivered, "queued under load");
            Ok(())
        }
    })
    .await?;
    a.shutdown().await?;
    b.shutdown().await?;
    Ok(stats)
}

fn main() -> Result<()> {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .map(|v| v.parse())
        .transpose()
        .context("BENCH_MESSAGES")?
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (raw, raw_long) = raw_echo(n).await?;
        let node = nodes(n).await?;
        println!(
            "{n} messages of {} bytes of text; throughput with {CONCURRENCY} in flight",
            TEXT.len()
        );
        report("raw", &raw);
        report("raw-ll", &raw_long);
        report("node", &node);
        println!(
            "node/raw: throughput {:.2}x, p50 latency {:.1}x, p99 latency {:.1}x",
            node.per_sec / raw.per_sec,
            node.p50.as_secs_f64() / raw.p50.as_secs_f64(),
            node.p99.as_secs_f64() / raw.p99.as_secs_f64()
        );
        Ok(())
    })
}
