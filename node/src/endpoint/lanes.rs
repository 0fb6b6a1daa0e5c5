//! Lanes: the streams a connection's sender keeps and pipelines its messages on.
//!
//! A send writes its `Message` frame on a lane without waiting for the acks of the
//! messages ahead of it there; the receiver acknowledges a stream's messages in order,
//! so a task per lane reads the acks and hands each to the message at the front of the
//! lane's queue. A lane is taken by how few messages wait on it: a connection opens a
//! new one when each has [`LANE_DEPTH`] waiting, up to [`MAX_LANES`]. A lane idle for
//! longer than the caller's `fresh` is finished before anything else goes on it (the
//! receiver resets a stream it waited on for its read timeout).
//!
//! A lane fails as a whole (the stream is reset, ends, or the connection goes): every
//! message waiting on it gets the error, and its sender decides whether to send again
//! (the receiver deduplicates by id). A receiver that ends each stream after one ack
//! (one message per stream, as the protocol allows) turns the connection's lanes into
//! one exchange per stream from then on.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use crate::wire::{read_frame, Ack, Frame, MessageId, ReadFrameError};

/// Lanes a connection opens before it queues more messages on each.
pub const MAX_LANES: usize = 4;

/// Messages waiting on every lane before a connection opens another one.
pub const LANE_DEPTH: usize = 64;

/// Why a message on a lane got no ack.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LaneError {
    /// The stream could not be written.
    #[error("cannot send the message: {0}")]
    Write(Arc<quinn::WriteError>),
    /// Reading the acks failed (the stream was reset, or the connection closed).
    #[error("cannot read the acknowledgement: {0}")]
    Read(Arc<ReadFrameError>),
    /// The receiver ended the stream before this message's ack.
    #[error("the stream ended without an acknowledgement")]
    NoAck,
    /// The next ack on the stream named another message, or another frame came.
    #[error("the peer answered with an unexpected frame")]
    BadAck,
    /// A send on the stream was given up in the middle of its write (its caller's
    /// timeout): part of a frame may be on the stream, so nothing more goes on it.
    #[error("a send on the stream was given up in the middle of its write")]
    Abandoned,
}

/// Closes its lane when dropped still armed, that is when a send is dropped in the
/// middle of its write.
struct Writing<'a> {
    lane: &'a Lane,
    armed: bool,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.lane.fail(LaneError::Abandoned);
        }
    }
}

/// The answer a message waits for.
pub type AckResult = Result<Ack, LaneError>;

/// A message waiting for its ack.
struct Waiter {
    id: MessageId,
    reply: oneshot::Sender<AckResult>,
}

/// What a lane's sends and its ack reader share.
struct LaneState {
    waiting: VecDeque<Waiter>,
    /// Set once the lane failed or was finished; nothing more goes on it.
    closed: bool,
    /// When a message last went on the lane or its last ack came.
    last_used: Instant,
    /// Acks read so far.
    acked: u64,
}

/// One pipelined stream.
pub struct Lane {
    send: tokio::sync::Mutex<quinn::SendStream>,
    state: Mutex<LaneState>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("Lane")
            .field("waiting", &state.waiting.len())
            .field("closed", &state.closed)
            .finish()
    }
}

/// A message written on a lane.
#[derive(Debug)]
pub struct Sent {
    /// Its ack, or why none came.
    pub ack: oneshot::Receiver<AckResult>,
    /// Whether the lane had carried another message before it: a fresh lane that fails
    /// says something about the peer, a used one may only have been ended meanwhile.
    pub reused: bool,
}

impl Lane {
    fn state(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the lane with `error` for every message waiting on it.
    fn fail(&self, error: LaneError) {
        let waiting = {
            let mut state = self.state();
            state.closed = true;
            std::mem::take(&mut state.waiting)
        };
        for w in waiting {
            let _ = w.reply.send(Err(error.clone()));
        }
    }

    /// Writes `frame`, the encoded `Message` frame of message `id`. `None` when the lane
    /// closed before the frame went out (the caller takes another lane). Dropped before
    /// the frame is written whole (a caller's timeout), it closes the lane: every message
    /// waiting there gets [`LaneError::Abandoned`].
    pub async fn send(&self, id: MessageId, frame: &[u8]) -> Option<Sent> {
        let (reply, ack) = oneshot::channel();
        let mut send = self.send.lock().await;
        let reused = {
            let mut state = self.state();
            if state.closed {
                return None;
            }
            let reused = state.acked > 0 || !state.waiting.is_empty();
            state.waiting.push_back(Waiter { id, reply });
            state.last_used = Instant::now();
            reused
        };
        let mut writing = Writing {
            lane: self,
            armed: true,
        };
        let written = send.write_all(frame).await;
        writing.armed = false;
        if let Err(e) = written {
            drop(send);
            self.fail(LaneError::Write(Arc::new(e)));
        }
        Some(Sent { ack, reused })
    }

    /// Whether the lane is open and has been idle (nothing waiting) for `fresh` or more.
    fn idle_for(&self, fresh: Duration, now: Instant) -> bool {
        let state = self.state();
        state.waiting.is_empty() && now.duration_since(state.last_used) >= fresh
    }

    fn waiting(&self) -> usize {
        self.state().waiting.len()
    }

    fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Closes an idle lane and finishes its stream, unless a send got to it first.
    fn retire(&self) {
        {
            let mut state = self.state();
            if !state.waiting.is_empty() {
                return;
            }
            state.closed = true;
        }
        if let Ok(mut send) = self.send.try_lock() {
            let _ = send.finish();
        }
        // Otherwise a send holds it and finds the lane closed; the stream is finished
        // when the lane is dropped.
    }
}

/// The lanes of one connection.
#[derive(Debug, Default)]
pub(super) struct Lanes {
    lanes: Mutex<Vec<Arc<Lane>>>,
    /// Serializes opening lanes, so concurrent sends share the one just opened.
    opening: tokio::sync::Mutex<()>,
    /// The peer ends a stream after its first ack: one message per lane.
    one_per_stream: std::sync::atomic::AtomicBool,
}

impl Lanes {
    fn lanes(&self) -> MutexGuard<'_, Vec<Arc<Lane>>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn single(&self) -> bool {
        self.one_per_stream
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The open lane with the fewest messages waiting, unless each has enough waiting
    /// that another lane may be opened. Lanes idle for `fresh` are retired.
    fn pick(&self, fresh: Duration, max_lanes: usize) -> Option<Arc<Lane>> {
        let now = Instant::now();
        let mut lanes = self.lanes();
        lanes.retain(|l| {
            if l.is_closed() {
                return false;
            }
            if l.idle_for(fresh, now) {
                l.retire();
                return false;
            }
            true
        });
        let (best, waiting) = lanes
            .iter()
            .map(|l| (l, l.waiting()))
            .min_by_key(|(_, waiting)| *waiting)?;
        if waiting >= LANE_DEPTH && lanes.len() < max_lanes {
            return None;
        }
        Some(best.clone())
    }

    /// A lane to send on: the least busy one, or a new one when every lane has
    /// [`LANE_DEPTH`] messages waiting and fewer than `max_lanes` are open; to a peer
    /// that serves one message per stream, always a new one. A new stream waits until
    /// the peer allows one more.
    pub(super) async fn lane(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        fresh: Duration,
        max_lanes: usize,
    ) -> Result<Arc<Lane>, quinn::ConnectionError> {
        let _opening = if self.single() {
            None
        } else {
            if let Some(lane) = self.pick(fresh, max_lanes) {
                return Ok(lane);
            }
            let opening = self.opening.lock().await;
            if let Some(lane) = self.pick(fresh, max_lanes) {
                return Ok(lane);
            }
            Some(opening)
        };
        let (send, recv) = conn.open_bi().await?;
        let lane = Arc::new(Lane {
            send: tokio::sync::Mutex::new(send),
            state: Mutex::new(LaneState {
                waiting: VecDeque::new(),
                closed: false,
                last_used: Instant::now(),
                acked: 0,
            }),
        });
        if !self.single() {
            self.lanes().push(lane.clone());
        }
        tokio::spawn(read_acks(self.clone(), lane.clone(), recv));
        Ok(lane)
    }
}

/// Reads the acks of `lane` and answers its messages in order, until the stream ends,
/// fails, or says something else.
async fn read_acks(lanes: Arc<Lanes>, lane: Arc<Lane>, mut recv: quinn::RecvStream) {
    let mut buf = Vec::new();
    let error = loop {
        match read_frame(&mut recv, &mut buf).await {
            Ok(Some(Frame::Ack(ack))) => {
                let mut state = lane.state();
                let Some(front) = state.waiting.pop_front() else {
                    break LaneError::BadAck;
                };
                if front.id != ack.id {
                    drop(state);
                    let _ = front.reply.send(Err(LaneError::BadAck));
                    break LaneError::BadAck;
                }
                state.acked += 1;
                state.last_used = Instant::now();
                drop(state);
                let _ = front.reply.send(Ok(ack));
            }
            Ok(Some(Frame::Message(_))) => break LaneError::BadAck,
            Ok(None) => {
                let state = lane.state();
                if state.acked == 1 && !state.waiting.is_empty() {
                    lanes
                        .one_per_stream
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                break LaneError::NoAck;
            }
            Err(e) => break LaneError::Read(Arc::new(e)),
        }
    };
    lane.fail(error);
    if let Ok(mut send) = lane.send.try_lock() {
        let _ = send.finish();
    }
}
