//! Opened rows of an encrypted database, kept so that reading a row again costs no
//! decryption.
//!
//! An entry is a row's decoded record together with the seal it was opened from: the
//! sealed value's nonce and tag ([`super::cipher::seal_id`]). A lookup returns the record
//! only when the row's stored value still carries that seal. Every sealing draws a fresh
//! random nonce and the tag authenticates the ciphertext under it, so the same seal means
//! the same stored value: the cache is a memo of "open this value", and needs no
//! invalidation: a row sealed again since (a status change, a rewrite) is a miss, never
//! a stale answer.
//!
//! Bounded in entries and in bytes of records; least recently used rows go first
//! (two generations: a row used in the current one stays, one left in the old
//! generation when the current one fills is dropped). Records are zeroized when they
//! leave the cache.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use zeroize::Zeroize;

/// Bytes identifying one sealing of a row: its nonce and its tag.
pub(crate) type SealId = [u8; 40];

/// Entries of one generation.
const GENERATION_ENTRIES: usize = 8 * 1024;
/// Bytes of records (as reported by the caller) of one generation.
const GENERATION_BYTES: usize = 4 * 1024 * 1024;

/// A record in the cache, zeroized when dropped.
struct Entry<V: Zeroize> {
    seal: SealId,
    record: V,
}

impl<V: Zeroize> Drop for Entry<V> {
    fn drop(&mut self) {
        self.record.zeroize();
    }
}

struct Generations<K, V: Zeroize> {
    current: HashMap<K, Entry<V>>,
    current_bytes: usize,
    old: HashMap<K, Entry<V>>,
}

/// Opened records by row key (see the module documentation).
pub(crate) struct OpenedRows<K, V: Zeroize> {
    inner: Mutex<Generations<K, V>>,
    entries: usize,
    bytes: usize,
}

impl<K: Eq + Hash, V: Zeroize + Clone> OpenedRows<K, V> {
    pub(crate) fn new() -> Self {
        Self::with_limits(GENERATION_ENTRIES, GENERATION_BYTES)
    }

    fn with_limits(entries: usize, bytes: usize) -> Self {
        OpenedRows {
            inner: Mutex::new(Generations {
                current: HashMap::new(),
                current_bytes: 0,
                old: HashMap::new(),
            }),
            entries,
            bytes,
        }
    }

    /// The record of row `key` if it was opened from the seal `seal`.
    pub(crate) fn get(&self, key: &K, seal: &SealId) -> Option<V> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = g.current.get(key) {
            return (e.seal == *seal).then(|| e.record.clone());
        }
        let (key, entry) = g.old.remove_entry(key)?;
        if entry.seal != *seal {
            return None;
        }
        let record = entry.record.clone();
        // Used again: it moves to the current generation. Its size was counted when
        // it was inserted; a promoted entry counts as one of the current entries.
        g.current.insert(key, entry);
        self.rotate_if_full(&mut g);
        Some(record)
    }

    /// Remembers that row `key`, sealed as `seal`, holds `record` (of about `size` bytes).
    pub(crate) fn insert(&self, key: K, seal: SealId, record: V, size: usize) {
        if size > self.bytes {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.old.remove(&key);
        g.current.insert(key, Entry { seal, record });
        g.current_bytes += size;
        self.rotate_if_full(&mut g);
    }

    fn rotate_if_full(&self, g: &mut Generations<K, V>) {
        if g.current.len() >= self.entries || g.current_bytes >= self.bytes {
            g.old = std::mem::take(&mut g.current);
            g.current_bytes = 0;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.current.len() + g.old.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex as StdMutex};

    use super::*;

    #[test]
    fn a_record_comes_back_only_for_its_own_seal() {
        let c = OpenedRows::<u32, String>::new();
        c.insert(1, [1; 40], "one".into(), 3);
        assert_eq!(c.get(&1, &[1; 40]).as_deref(), Some("one"));
        assert_eq!(c.get(&1, &[2; 40]), None, "the row was sealed again since");
        assert_eq!(c.get(&2, &[1; 40]), None);
        c.insert(1, [2; 40], "uno".into(), 3);
        assert_eq!(c.get(&1, &[2; 40]).as_deref(), Some("uno"));
        assert_eq!(c.get(&1, &[1; 40]), None);
    }

    #[test]
    fn bounded_in_entries_and_bytes_keeping_the_rows_in_use() {
        let c = OpenedRows::<u32, String>::with_limits(4, 1000);
        for k in 0..4 {
            c.insert(k, [0; 40], k.to_string(), 1);
        }
        // The current generation filled up and became the old one; using 0 keeps it.
        assert_eq!(c.get(&0, &[0; 40]).as_deref(), Some("0"));
        for k in 10..14 {
            c.insert(k, [0; 40], k.to_string(), 1);
        }
        assert!(c.len() <= 8);
        assert_eq!(c.get(&1, &[0; 40]), None, "unused since: dropped");
        for k in 10..13 {
            assert!(c.get(&k, &[0; 40]).is_some());
        }
        // One big record fills a generation by bytes; one larger than it is not kept.
        let c = OpenedRows::<u32, String>::with_limits(100, 10);
        c.insert(1, [0; 40], "x".into(), 11);
        assert_eq!(c.get(&1, &[0; 40]), None);
        for k in 1..=4 {
            c.insert(k, [0; 40], k.to_string(), 6);
        }
        assert_eq!(c.get(&1, &[0; 40]), None);
        assert!(c.get(&4, &[0; 40]).is_some());
    }

    /// A record that reports when it is zeroized.
    #[derive(Clone)]
    struct Watched(Arc<StdMutex<u32>>, bool);

    impl Zeroize for Watched {
        fn zeroize(&mut self) {
            if self.1 {
                *self.0.lock().expect("lock") += 1;
            }
        }
    }

    #[test]
    fn records_are_zeroized_when_they_leave() {
        let wiped = Arc::new(StdMutex::new(0));
        let c = OpenedRows::<u32, Watched>::with_limits(2, 1000);
        c.insert(1, [0; 40], Watched(wiped.clone(), true), 1);
        c.insert(1, [1; 40], Watched(wiped.clone(), true), 1);
        assert_eq!(*wiped.lock().expect("lock"), 1, "replaced");
        drop(c);
        assert_eq!(*wiped.lock().expect("lock"), 2, "dropped with the cache");
    }
}
