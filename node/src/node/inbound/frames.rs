//! The frames of one incoming stream, read as they come or as far as they have come.
//!
//! A frame holds its length of the connection's frame budget from its header on, until
//! its permit is dropped (after the ack). [`FrameReader::next`] either waits for the
//! whole next frame, or takes only what has arrived already: a frame begun that way is
//! kept, with its permit, and finished by the next call. So a receiver takes every frame
//! a pipelining sender has sent so far, stores them together and acknowledges them in
//! one write, and still holds no byte beyond the budget but a partial header.

use std::sync::Arc;

use futures::FutureExt;
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use crate::wire::{self, Frame, ReadFrameError, HEADER_LEN};

/// What [`FrameReader::next`] found.
#[derive(Debug)]
pub(super) enum Next {
    /// A whole frame, with its share of the budget.
    Frame(Frame, OwnedSemaphorePermit),
    /// Not waiting: the next frame is not whole yet (or the budget has no room for it).
    NotYet,
    /// The stream ended at a frame boundary.
    End,
}

/// A frame begun and not finished.
#[derive(Debug)]
struct Body {
    len: usize,
    filled: usize,
    permit: OwnedSemaphorePermit,
}

/// Reads the frames of one stream.
#[derive(Debug)]
pub(super) struct FrameReader<R> {
    recv: R,
    budget: Arc<Semaphore>,
    header: [u8; HEADER_LEN],
    /// Header bytes read.
    have: usize,
    /// The payload of the frame begun, once its header is whole and its budget held.
    body: Option<Body>,
    buf: Vec<u8>,
    /// The stream ended (at a frame boundary).
    ended: bool,
}

/// The payload buffer a stream keeps between frames, at most (a larger one is freed).
const IDLE_BUFFER: usize = 4096;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(super) fn new(recv: R, budget: Arc<Semaphore>) -> Self {
        Self {
            recv,
            budget,
            header: [0; HEADER_LEN],
            have: 0,
            body: None,
            buf: Vec::new(),
            ended: false,
        }
    }

    /// The stream read from.
    pub(super) fn get_mut(&mut self) -> &mut R {
        &mut self.recv
    }

    /// The next frame: waited for (`wait`), or only if what has arrived makes it whole
    /// and the budget has room for it now.
    pub(super) async fn next(&mut self, wait: bool) -> Result<Next, ReadFrameError> {
        if self.ended {
            return Ok(Next::End);
        }
        while self.have < HEADER_LEN {
            let Some(n) = read(&mut self.recv, &mut self.header[self.have..], wait).await? else {
                return Ok(Next::NotYet);
            };
            if n == 0 {
                if self.have == 0 {
                    self.ended = true;
                    return Ok(Next::End);
                }
                return Err(ReadFrameError::Truncated {
                    expected: HEADER_LEN,
                    got: self.have,
                });
            }
            self.have += n;
        }
        if self.body.is_none() {
            let len = wire::frame_len(self.header)?;
            // `len` is at most MAX_FRAME_LEN, far below u32::MAX and the budget.
            let permits = u32::try_from(len).unwrap_or(u32::MAX);
            let budget = self.budget.clone();
            let permit = if wait {
                match budget.acquire_many_owned(permits).await {
                    Ok(permit) => permit,
                    // Never closed; treat it like a stream that ended.
                    Err(_) => return Ok(Next::End),
                }
            } else {
                match budget.try_acquire_many_owned(permits) {
                    Ok(permit) => permit,
                    Err(_) => return Ok(Next::NotYet),
                }
            };
            if self.buf.capacity() > IDLE_BUFFER.max(len) {
                self.buf = Vec::new();
            }
            self.buf.clear();
            // Exactly `len`: `resize` alone may double a reused buffer past the limit.
            self.buf.reserve_exact(len);
            self.buf.resize(len, 0);
            self.body = Some(Body {
                len,
                filled: 0,
                permit,
            });
        }
        let Some(body) = self.body.as_mut() else {
            return Ok(Next::NotYet);
        };
        while body.filled < body.len {
            let Some(n) = read(&mut self.recv, &mut self.buf[body.filled..body.len], wait).await?
            else {
                return Ok(Next::NotYet);
            };
            if n == 0 {
                return Err(ReadFrameError::Truncated {
                    expected: body.len,
                    got: body.filled,
                });
            }
            body.filled += n;
        }
        let Some(Body { len, permit, .. }) = self.body.take() else {
            return Ok(Next::NotYet);
        };
        self.have = 0;
        let frame = wire::decode(&self.buf[..len])?;
        if self.buf.capacity() > IDLE_BUFFER {
            // A stream may wait idle for the sender's next message: it keeps no more
            // than a small buffer meanwhile, so the bytes held stay within the budget.
            self.buf = Vec::new();
        }
        Ok(Next::Frame(frame, permit))
    }
}

/// Reads into `dst`: waiting for at least a byte or the end (`wait`), or only what has
/// arrived (`None`: nothing yet). `Some(0)` is the end of the stream.
async fn read<R: AsyncRead + Unpin>(
    recv: &mut R,
    dst: &mut [u8],
    wait: bool,
) -> Result<Option<usize>, ReadFrameError> {
    loop {
        let got = if wait {
            recv.read(dst).await
        } else {
            // A read that is not ready consumes nothing, so dropping it loses nothing.
            match recv.read(dst).now_or_never() {
                Some(got) => got,
                None => return Ok(None),
            }
        };
        match got {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadFrameError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ChatMessage;

    fn frame(text: &str) -> (Frame, Vec<u8>) {
        let frame = Frame::Message(ChatMessage::text(text.to_owned(), 1).expect("valid"));
        let bytes = wire::encode(&frame).expect("encodes");
        (frame, bytes)
    }

    #[tokio::test]
    async fn frames_wait_for_the_connection_budget() {
        let (frame, bytes) = frame(&"x".repeat(100));
        let len = bytes.len() - HEADER_LEN;
        // Room for one frame, not two.
        let budget = Arc::new(Semaphore::new(len + len / 2));
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        let mut reader = FrameReader::new(std::io::Cursor::new(two), budget.clone());
        let Next::Frame(got, held) = reader.next(true).await.expect("reads") else {
            panic!("a frame");
        };
        assert_eq!(got, frame);
        assert_eq!(budget.available_permits(), len / 2);
        // Without waiting, the second frame is not taken while the first is held...
        assert!(matches!(reader.next(false).await, Ok(Next::NotYet)));
        // ... and waiting, it comes once the first is acknowledged (its permit dropped).
        let second = tokio::spawn(async move {
            reader.next(true).await.map(|n| match n {
                Next::Frame(f, _) => Some(f),
                _ => None,
            })
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!second.is_finished(), "waits for the budget");
        drop(held);
        let second = second.await.expect("joins").expect("reads");
        assert_eq!(second, Some(frame));
        assert_eq!(budget.available_permits(), len + len / 2);
    }

    #[tokio::test]
    async fn a_frame_begun_without_waiting_is_finished_by_the_next_read() {
        let (frame, bytes) = frame("hello");
        let budget = Arc::new(Semaphore::new(1 << 20));
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(rx, budget.clone());
        // Nothing yet, then the header and part of the payload.
        assert!(matches!(reader.next(false).await, Ok(Next::NotYet)));
        use tokio::io::AsyncWriteExt;
        tx.write_all(&bytes[..HEADER_LEN + 2])
            .await
            .expect("writes");
        assert!(matches!(reader.next(false).await, Ok(Next::NotYet)));
        // The frame's budget is held from its header on.
        let len = bytes.len() - HEADER_LEN;
        assert_eq!(budget.available_permits(), (1 << 20) - len);
        tx.write_all(&bytes[HEADER_LEN + 2..])
            .await
            .expect("writes");
        tx.write_all(&bytes).await.expect("writes");
        drop(tx);
        let Ok(Next::Frame(got, _held)) = reader.next(false).await else {
            panic!("the frame is whole now");
        };
        assert_eq!(got, frame);
        assert!(matches!(reader.next(true).await, Ok(Next::Frame(..))));
        assert!(matches!(reader.next(true).await, Ok(Next::End)));
    }

    #[tokio::test]
    async fn a_stream_that_ends_inside_a_frame_is_truncated() {
        let (_, bytes) = frame("hello");
        let budget = Arc::new(Semaphore::new(1 << 20));
        for cut in [1, HEADER_LEN, HEADER_LEN + 1] {
            let mut reader = FrameReader::new(&bytes[..cut], budget.clone());
            assert!(
                matches!(
                    reader.next(true).await,
                    Err(ReadFrameError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
    }
}
