//! The write log: what makes an acknowledged message write durable before the database
//! commits it.
//!
//! A batch of message writes ([`super::WriteOp`]) is applied to a redb write
//! transaction that stays open, appended to this log as one record, and the log is
//! synced: one `fdatasync` of a few kilobytes written in place, where a redb commit
//! writes and syncs every page the batch touched. Only then is the batch acknowledged.
//! The open transaction takes many batches and is committed durably in one go, a
//! *fold* (see `Store::write_batch`). A fold also moves the database to the next log
//! *epoch* in the same commit (`META["log_epoch"]`): every record of the old epoch is
//! then dead at once, and the log is written again from its start.
//!
//! # Format
//!
//! ```text
//! record  = len (u32 LE) | crc (u32 LE) | epoch (u64 LE) | payload (len bytes)
//! crc     = CRC-32C of epoch (8, LE) | len (4, LE) | payload
//! payload = postcard Vec<WriteOp>                                   (clear database)
//!         = 0x01 | nonce (24) | XChaCha20-Poly1305 of the same | tag (16)   (encrypted)
//!           associated data "p2p-node/v1/log" | epoch (8, BE) | offset (8, BE)
//! ```
//!
//! Records follow each other from offset 0. Reading takes them in order while each is
//! whole, of the database's epoch, and checks out; the first that does not ends the log
//! (a record cut short by a crash was never synced, so never acknowledged); one that
//! checks out but does not open or decode refuses the open (`StoreError::CorruptLog`,
//! nothing applied). What was read is applied again, in order, to the database as it was last committed durably:
//! every write is idempotent (an insert finds its id taken, a mark finds its status
//! set). A database without an epoch is given a random one, so the log of another
//! database (one renamed over this file) is never applied to it.
//!
//! The file holds at most [`CAPACITY`] bytes and grows in zero-filled steps, so a synced
//! append never changes its size. It is emptied when the database opens and removed
//! when the database closes cleanly: a log on disk means a stop without a fold.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use p2p_crypto::owner_only;

use super::StoreError;

/// Bytes before a record's payload.
const HEADER: usize = 16;
/// The largest payload: a batch that encodes larger is committed to the database
/// directly. Its pages then cost more to write than the commit's fixed cost, and
/// writing its bodies twice (log, then fold) would halve bulk transfers.
pub(super) const MAX_PAYLOAD: usize = 64 << 10;
/// The largest log: a batch that does not fit folds instead.
pub(super) const CAPACITY: u64 = 4 << 20;
/// The log grows by this many zeros at a time.
const STEP: u64 = 256 << 10;

const CRC: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// The log of the database at `db`: the same name with `-log` appended.
pub(crate) fn path_of(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-log");
    PathBuf::from(name)
}

/// The write log of one database, open for appending.
pub(super) struct Log {
    file: File,
    path: PathBuf,
    epoch: u64,
    /// Where the next record goes.
    end: u64,
    /// How much of the file is written (zeros beyond `end`).
    allocated: u64,
    buf: Vec<u8>,
}

impl Log {
    /// Opens the log at `path` (created with mode 0600; an existing one must be
    /// owner-only) for records of `epoch`.
    pub(super) fn open(path: &Path, epoch: u64) -> Result<Log, StoreError> {
        let file = owner_only::open_file(path).map_err(StoreError::Access)?;
        let allocated = file
            .metadata()
            .map_err(|source| StoreError::Log {
                path: path.to_owned(),
                source,
            })?
            .len();
        Ok(Log {
            file,
            path: path.to_owned(),
            epoch,
            end: 0,
            allocated,
            buf: Vec::new(),
        })
    }

    /// The file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The epoch of the records written now.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Where the next record starts.
    pub(super) fn end(&self) -> u64 {
        self.end
    }

    /// Whether no record was written in this epoch.
    pub(super) fn is_empty(&self) -> bool {
        self.end == 0
    }

    /// Whether a record with a payload of `len` bytes fits.
    pub(super) fn fits(&self, len: usize) -> bool {
        len <= MAX_PAYLOAD && self.end + (HEADER + len) as u64 <= CAPACITY
    }

    /// The file's contents, at most [`CAPACITY`] bytes of them.
    pub(super) fn read_all(&self) -> io::Result<Vec<u8>> {
        let len = self.file.metadata()?.len().min(CAPACITY);
        let mut bytes = vec![0u8; len as usize];
        self.file.read_exact_at(&mut bytes, 0)?;
        Ok(bytes)
    }

    /// Moves to `epoch` after a fold: the records written so far are dead, the next one
    /// goes to the start.
    pub(super) fn next_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.end = 0;
    }

    /// Empties the file (no record of any epoch, clear or sealed, outlives an open).
    pub(super) fn truncate(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.end = 0;
        self.allocated = 0;
        Ok(())
    }

    /// Appends a record; with `sync`, returns once it (and every record before it) is
    /// on disk. The caller checked that it [`fits`](Log::fits).
    pub(super) fn append(&mut self, payload: &[u8], sync: bool) -> io::Result<()> {
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "log record too long"))?;
        self.buf.clear();
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf
            .extend_from_slice(&crc(self.epoch, len, payload).to_le_bytes());
        self.buf.extend_from_slice(&self.epoch.to_le_bytes());
        self.buf.extend_from_slice(payload);
        let end = self.end + self.buf.len() as u64;
        if end > self.allocated {
            self.grow(end)?;
        }
        self.file.write_all_at(&self.buf, self.end)?;
        if sync {
            self.file.sync_data()?;
        }
        self.end = end;
        Ok(())
    }

    /// Writes the first step of zeros now, if the file has less: the first append after
    /// an open then changes no size. (A synced append that grows the file also waits for
    /// its new size to be written, and the zeros of a whole step with it.)
    pub(super) fn reserve(&mut self) -> io::Result<()> {
        if self.allocated < STEP {
            self.grow(self.end.max(1))?;
        }
        Ok(())
    }

    /// Writes zeros up to the step that holds `end`, and syncs the new size.
    fn grow(&mut self, end: u64) -> io::Result<()> {
        let to = end
            .div_ceil(STEP)
            .saturating_mul(STEP)
            .min(CAPACITY)
            .max(end);
        let zeros = vec![0u8; (to - self.allocated) as usize];
        self.file.write_all_at(&zeros, self.allocated)?;
        self.file.sync_data()?;
        self.allocated = to;
        Ok(())
    }
}

fn crc(epoch: u64, len: u32, payload: &[u8]) -> u32 {
    let mut digest = CRC.digest();
    digest.update(&epoch.to_le_bytes());
    digest.update(&len.to_le_bytes());
    digest.update(payload);
    digest.finalize()
}

/// A record read back: where it starts, and its payload.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Record<'a> {
    pub offset: u64,
    pub payload: &'a [u8],
}

/// The records of `epoch` at the start of `bytes`, in order, up to the first that is cut
/// short, of another epoch, or damaged. Never panics.
pub(super) fn records(bytes: &[u8], epoch: u64) -> impl Iterator<Item = Record<'_>> {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        let header = bytes.get(offset..offset.checked_add(HEADER)?)?;
        let len = u32::from_le_bytes(header[..4].try_into().ok()?);
        let sum = u32::from_le_bytes(header[4..8].try_into().ok()?);
        let found = u64::from_le_bytes(header[8..16].try_into().ok()?);
        if found != epoch || len == 0 || len as usize > MAX_PAYLOAD {
            return None;
        }
        let start = offset + HEADER;
        let payload = bytes.get(start..start.checked_add(len as usize)?)?;
        if crc(epoch, len, payload) != sum {
            return None;
        }
        let record = Record {
            offset: offset as u64,
            payload,
        };
        offset = start + len as usize;
        Some(record)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn log(dir: &tempfile::TempDir, epoch: u64) -> Log {
        Log::open(&dir.path().join("node.redb-log"), epoch).unwrap()
    }

    #[test]
    fn records_read_back_in_order_and_only_of_their_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = log(&dir, 7);
        l.append(b"first", true).unwrap();
        l.append(b"second", false).unwrap();
        let bytes = l.read_all().unwrap();
        assert_eq!(bytes.len() as u64, STEP, "grown by one step of zeros");
        let got: Vec<_> = records(&bytes, 7).collect();
        assert_eq!(
            got,
            [
                Record {
                    offset: 0,
                    payload: b"first"
                },
                Record {
                    offset: 21,
                    payload: b"second"
                }
            ]
        );
        assert_eq!(records(&bytes, 8).count(), 0, "another epoch reads nothing");
        // The next epoch writes over the old records from the start; what is left of
        // them after its own is not read.
        l.next_epoch(8);
        l.append(b"third", true).unwrap();
        let bytes = l.read_all().unwrap();
        let got: Vec<_> = records(&bytes, 8).map(|r| r.payload).collect();
        assert_eq!(got, [b"third"]);
        assert_eq!(records(&bytes, 7).count(), 0);
    }

    #[test]
    fn a_cut_or_damaged_record_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = log(&dir, 1);
        for p in [&b"one"[..], b"two", b"three"] {
            l.append(p, true).unwrap();
        }
        let bytes = l.read_all().unwrap();
        let end = 3 * HEADER + 11;
        for cut in 0..end {
            let n = records(&bytes[..cut], 1).count();
            let whole = [HEADER + 3, 2 * HEADER + 6, end]
                .iter()
                .filter(|&&e| e <= cut)
                .count();
            assert_eq!(n, whole, "cut at {cut}");
        }
        let starts = [0, HEADER + 3, 2 * HEADER + 6];
        for flip in 0..end {
            let mut bad = bytes.clone();
            bad[flip] ^= 0x40;
            // The damaged record and those after it are not read; those before it are.
            let damaged = starts.iter().filter(|&&s| s <= flip).count() - 1;
            assert_eq!(records(&bad, 1).count(), damaged, "bit flipped at {flip}");
        }
    }

    #[test]
    fn the_log_stops_growing_at_its_capacity_and_empties() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = log(&dir, 3);
        let payload = vec![9u8; MAX_PAYLOAD];
        let mut n = 0;
        while l.fits(payload.len()) {
            l.append(&payload, false).unwrap();
            n += 1;
        }
        assert_eq!(n, 63, "63 records of 64 KiB and their headers fill 4 MiB");
        assert!(!l.fits(MAX_PAYLOAD + 1));
        assert!(l.read_all().unwrap().len() as u64 <= CAPACITY);
        assert_eq!(records(&l.read_all().unwrap(), 3).count(), n);
        l.truncate().unwrap();
        assert!(l.is_empty());
        assert!(l.read_all().unwrap().is_empty());
        l.append(b"again", true).unwrap();
        assert_eq!(records(&l.read_all().unwrap(), 3).count(), 1);
    }

    #[test]
    fn noise_reads_as_an_empty_log() {
        use rand::RngCore;
        let mut rng = rand::thread_rng();
        for len in [0, 1, 15, 16, 17, 100, 4096] {
            let mut bytes = vec![0u8; len];
            rng.fill_bytes(&mut bytes);
            let epoch = bytes
                .get(8..16)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
            for epoch in [0, epoch] {
                // Noise passes the checksum once in 2^32 tries.
                assert_eq!(records(&bytes, epoch).count(), 0);
            }
        }
    }
}
