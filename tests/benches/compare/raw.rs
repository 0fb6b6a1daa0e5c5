//! The raw QUIC baseline: bare `p2p_node::Endpoint`s (same TLS, same
//! `TransportSettings::default()`) and the node's frame codec, with no storage at all.

use std::{net::SocketAddr, time::Instant};

use anyhow::{bail, ensure, Context, Result};
use p2p_crypto::{NodeId, SecretKey};
use p2p_node::{
    wire::{self, Ack, AckStatus, ChatMessage, Frame},
    Endpoint,
};

/// A 127.0.0.1 address on a free port.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A bare endpoint with a fresh key on 127.0.0.1.
pub async fn endpoint() -> Result<Endpoint> {
    Ok(Endpoint::builder(SecretKey::generate())
        .bind_addr(loopback())
        .bind()
        .await?)
}

/// What a raw server does with each stream.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Answers every `Message` frame with an `Ack` frame (what the node does, minus
    /// storage).
    Echo,
    /// Reads the stream to its end and answers with the byte count (8 bytes, big endian).
    Sink,
}

/// A raw server: a bare endpoint serving every connection and stream in tasks of their
/// own, as the node does.
#[derive(Debug)]
pub struct Server {
    pub endpoint: Endpoint,
    pub addr: SocketAddr,
    pub id: NodeId,
}

impl Server {
    pub async fn start(mode: Mode) -> Result<Server> {
        let endpoint = endpoint().await?;
        let addr = endpoint.local_addr()?;
        let id = endpoint.node_id();
        let ep = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.accept().await else {
                        return;
                    };
                    while let Ok((send, recv)) = conn.quic().accept_bi().await {
                        tokio::spawn(async move {
                            let _ = match mode {
                                Mode::Echo => echo_stream(send, recv).await,
                                Mode::Sink => sink_stream(send, recv).await,
                            };
                        });
                    }
                });
            }
        });
        Ok(Server { endpoint, addr, id })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.endpoint.close(0, b"done");
    }
}

async fn echo_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<()> {
    let mut buf = Vec::new();
    while let Some(frame) = wire::read_frame(&mut recv, &mut buf).await? {
        let Frame::Message(m) = frame else {
            bail!("unexpected frame");
        };
        let ack = Frame::Ack(Ack {
            id: m.id,
            status: AckStatus::Stored,
        });
        wire::write_frame(&mut send, &ack).await?;
    }
    send.finish()?;
    Ok(())
}

async fn sink_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<()> {
    let mut total: u64 = 0;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        total += chunk.bytes.len() as u64;
    }
    send.write_all(&total.to_be_bytes()).await?;
    send.finish()?;
    Ok(())
}

/// One message on a new stream, as the node sends it: the `Message` frame, finish, wait
/// for the `Ack`.
pub async fn exchange(conn: &quinn::Connection, text: &str) -> Result<()> {
    let msg = ChatMessage::text(text, 0)?;
    let id = msg.id;
    let (mut send, mut recv) = conn.open_bi().await?;
    wire::write_frame(&mut send, &Frame::Message(msg)).await?;
    send.finish()?;
    let mut buf = Vec::new();
    match wire::read_frame(&mut recv, &mut buf).await? {
        Some(Frame::Ack(a)) if a.id == id && a.status.is_delivered() => Ok(()),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// One message on an already open stream: the `Message` frame, then its `Ack`.
pub async fn exchange_on(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
    text: &str,
) -> Result<()> {
    let msg = ChatMessage::text(text, 0)?;
    let id = msg.id;
    wire::write_frame(send, &Frame::Message(msg)).await?;
    match wire::read_frame(recv, buf).await? {
        Some(Frame::Ack(a)) if a.id == id => Ok(()),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Ends a long-lived stream cleanly: finishes our side and reads the peer's side to its
/// end, so the stream is closed on both ends and quinn returns its credit (a stream
/// only dropped can stay open at the peer and block later `open_bi` calls). Bounded by
/// `timeout`.
pub async fn close_stream(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
    timeout: std::time::Duration,
) -> Result<()> {
    let _ = send.finish();
    tokio::time::timeout(timeout, async {
        while wire::read_frame(recv, buf).await?.is_some() {}
        Ok::<_, anyhow::Error>(())
    })
    .await
    .context("closing a long-lived stream timed out")?
}

/// Writes `total` bytes on one new stream (64 KiB writes) and waits for the sink's count.
/// Returns the time from the first write to the count.
pub async fn bulk(conn: &quinn::Connection, total: usize) -> Result<std::time::Duration> {
    let chunk = vec![b'x'; 64 * 1024];
    let start = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        send.write_all(&chunk[..n]).await?;
        left -= n;
    }
    send.finish()?;
    let mut count = [0u8; 8];
    recv.read_exact(&mut count)
        .await
        .context("reading the sink's count")?;
    let elapsed = start.elapsed();
    ensure!(
        u64::from_be_bytes(count) == total as u64,
        "sink counted {} of {total} bytes",
        u64::from_be_bytes(count)
    );
    Ok(elapsed)
}
