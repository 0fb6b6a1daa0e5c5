//! Where an in-memory store keeps its database: redb's pages in fixed-size chunks.
//!
//! redb's own memory backend keeps the whole database in one `Vec`: every time the
//! database grows, the vector is reallocated (the database copied whole) and its new
//! tail zeroed a byte at a time. Under a steady stream of messages that growth took a
//! tenth to a fifth of an in-memory node's writer time (BENCHMARKS.md, item 20). Here
//! the database grows by whole chunks, allocated zeroed; nothing already written moves.
//!
//! Invariant: the bytes of the last chunk past the length are zero, so growing within
//! that chunk exposes zeros, as [`StorageBackend::set_len`] requires.

use std::io;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::StorageBackend;

/// Bytes per chunk: a multiple of redb's page size, so a small page never straddles two
/// chunks (a larger one may: reads and writes are split at chunk boundaries).
const CHUNK: usize = 1 << 20;

/// An in-memory [`StorageBackend`] that grows without copying what it holds.
#[derive(Debug, Default)]
pub(super) struct ChunkedMemory(RwLock<Chunks>);

#[derive(Debug, Default)]
struct Chunks {
    chunks: Vec<Box<[u8]>>,
    len: usize,
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset out of range")
}

/// `offset..offset + len` as a range of this process's memory, if it is one.
fn span(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let start = usize::try_from(offset).map_err(|_| out_of_range())?;
    let end = start.checked_add(len).ok_or_else(out_of_range)?;
    Ok((start, end))
}

/// The pieces of `start..end` (within `len`): chunk index, offset in it, length.
fn pieces(
    len: usize,
    start: usize,
    end: usize,
) -> io::Result<impl Iterator<Item = (usize, usize, usize)>> {
    if end > len {
        return Err(out_of_range());
    }
    let mut at = start;
    Ok(std::iter::from_fn(move || {
        (at < end).then(|| {
            let (chunk, within) = (at / CHUNK, at % CHUNK);
            let n = (CHUNK - within).min(end - at);
            at += n;
            (chunk, within, n)
        })
    }))
}

impl ChunkedMemory {
    fn chunks(&self) -> RwLockReadGuard<'_, Chunks> {
        // A panic while holding the lock leaves whole chunks behind: still usable.
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn chunks_mut(&self) -> RwLockWriteGuard<'_, Chunks> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl StorageBackend for ChunkedMemory {
    fn len(&self) -> io::Result<u64> {
        Ok(self.chunks().len as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let (start, end) = span(offset, out.len())?;
        let c = self.chunks();
        let mut to = 0;
        for (chunk, within, n) in pieces(c.len, start, end)? {
            out[to..to + n].copy_from_slice(&c.chunks[chunk][within..within + n]);
            to += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        let mut c = self.chunks_mut();
        let needed = len.div_ceil(CHUNK);
        if len < c.len {
            c.chunks.truncate(needed);
            // Keep the tail of the last chunk zero (the invariant).
            let within = len % CHUNK;
            if within > 0 {
                if let Some(last) = c.chunks.last_mut() {
                    last[within..].fill(0);
                }
            }
        } else {
            let more = needed - c.chunks.len();
            c.chunks.try_reserve(more).map_err(io::Error::other)?;
            for _ in 0..more {
                c.chunks.push(vec![0u8; CHUNK].into_boxed_slice());
            }
        }
        c.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let (start, end) = span(offset, data.len())?;
        let mut c = self.chunks_mut();
        let mut from = 0;
        for (chunk, within, n) in pieces(c.len, start, end)? {
            c.chunks[chunk][within..within + n].copy_from_slice(&data[from..from + n]);
            from += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// `len` bytes at `offset`.
    fn read(m: &ChunkedMemory, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut out = vec![0xA5; len];
        m.read(offset, &mut out)?;
        Ok(out)
    }

    #[test]
    fn grows_with_zeros_and_keeps_what_was_written() {
        let m = ChunkedMemory::default();
        assert_eq!(m.len().unwrap(), 0);
        m.set_len(100).unwrap();
        assert_eq!(read(&m, 0, 100).unwrap(), vec![0; 100]);
        m.write(10, b"hello").unwrap();
        m.set_len(3 * CHUNK as u64 + 7).unwrap();
        assert_eq!(m.len().unwrap(), 3 * CHUNK as u64 + 7);
        assert_eq!(read(&m, 10, 5).unwrap(), b"hello");
        assert_eq!(read(&m, CHUNK as u64 * 3, 7).unwrap(), vec![0; 7]);
    }

    #[test]
    fn reads_and_writes_across_chunks() {
        let m = ChunkedMemory::default();
        m.set_len(3 * CHUNK as u64).unwrap();
        let data: Vec<u8> = (0..2 * CHUNK + 10).map(|i| (i % 251) as u8).collect();
        let at = CHUNK as u64 / 2;
        m.write(at, &data).unwrap();
        assert_eq!(read(&m, at, data.len()).unwrap(), data);
        assert_eq!(read(&m, at - 1, 1).unwrap(), vec![0]);
        assert_eq!(
            read(&m, at + data.len() as u64, 1).unwrap(),
            vec![0],
            "nothing written past the end of the data"
        );
    }

    #[test]
    fn a_shrink_then_a_growth_shows_zeros_past_the_old_end() {
        let m = ChunkedMemory::default();
        m.set_len(2 * CHUNK as u64).unwrap();
        m.write(0, &vec![7; 2 * CHUNK]).unwrap();
        m.set_len(100).unwrap();
        assert_eq!(read(&m, 0, 100).unwrap(), vec![7; 100]);
        m.set_len(2 * CHUNK as u64).unwrap();
        assert_eq!(read(&m, 0, 100).unwrap(), vec![7; 100]);
        assert!(read(&m, 100, 2 * CHUNK - 100)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        m.set_len(CHUNK as u64).unwrap();
        m.set_len(CHUNK as u64 + 1).unwrap();
        assert_eq!(read(&m, CHUNK as u64, 1).unwrap(), vec![0]);
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let m = ChunkedMemory::default();
        m.set_len(10).unwrap();
        assert!(read(&m, 5, 6).is_err());
        assert!(m.write(9, b"ab").is_err());
        assert!(read(&m, u64::MAX, 1).is_err());
        assert!(m.write(u64::MAX - 1, b"abc").is_err());
        assert!(read(&m, 10, 0).unwrap().is_empty());
    }
}
