//! A bounded memo: a hash map that forgets its oldest entries by generations.
//!
//! The memos of checked keys, verified signatures and decoded records are each one of
//! these. It keeps two generations of at most `per_generation` entries: entries go into
//! the newer; when the newer is full it becomes the older and the older is dropped. All
//! entries sit in one table tagged with their generation, so a lookup is one probe
//! however the entries are spread between the two (with a table per generation, most
//! lookups in a memo of 100 000 entries would probe both, each probe a cache miss).
//! Starting a generation walks the table once to drop the older one: amortized, one
//! step per insert.

use std::{borrow::Borrow, collections::HashMap, hash::Hash};

/// A hash map of at most two generations of `per_generation` entries (see the module).
#[derive(Debug)]
pub struct Memo<K, V> {
    per_generation: usize,
    entries: HashMap<K, Entry<V>>,
    /// The newer generation's number.
    generation: u64,
    /// How many entries the newer generation has.
    newer: usize,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    generation: u64,
}

impl<K: Hash + Eq, V> Memo<K, V> {
    /// Keeps up to `per_generation` entries per generation (at least one).
    pub fn with_capacity(per_generation: usize) -> Self {
        Self {
            per_generation: per_generation.max(1),
            entries: HashMap::new(),
            generation: 0,
            newer: 0,
        }
    }

    /// The value remembered for `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key).map(|e| &e.value)
    }

    /// Whether `key` is remembered.
    pub fn contains<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.contains_key(key)
    }

    /// Remembers `value` for `key` in the newer generation (moving it there if the older
    /// held it), first starting a new generation if the newer is full.
    pub fn insert(&mut self, key: K, value: V) {
        let keep = self.generation;
        if self.newer >= self.per_generation
            && self.entries.get(&key).is_none_or(|e| e.generation != keep)
        {
            self.entries.retain(|_, e| e.generation == keep);
            self.generation += 1;
            self.newer = 0;
        }
        let entry = Entry {
            value,
            generation: self.generation,
        };
        if self
            .entries
            .insert(key, entry)
            .is_none_or(|old| old.generation != self.generation)
        {
            self.newer += 1;
        }
    }

    /// How many entries are remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.newer = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_two_generations_and_drops_the_older_when_the_newer_fills() {
        let mut m = Memo::with_capacity(4);
        for k in 0..11u32 {
            m.insert(k, k * 10);
        }
        // 0..4 filled the first generation, 4..8 the second; 8 started a third, which
        // dropped the first.
        assert_eq!(m.len(), 7);
        assert!((0..4).all(|k| !m.contains(&k)));
        assert!((4..11).all(|k| m.get(&k) == Some(&(k * 10))));
        // Replacing an entry of the newer generation does not start another.
        m.insert(10, 1);
        assert_eq!(m.get(&10), Some(&1));
        assert_eq!(m.len(), 7);
        // An entry of the older generation inserted again moves to the newer (which is
        // then full), so it outlives the rest of the older when the next one starts.
        m.insert(4, 4);
        m.insert(100, 100);
        assert_eq!(m.len(), 5);
        assert!(m.contains(&4) && m.contains(&100));
        assert!((5..8).all(|k| !m.contains(&k)));
        m.clear();
        assert!(m.is_empty());
    }

    #[test]
    fn never_holds_more_than_two_generations() {
        let mut m = Memo::with_capacity(100);
        for k in 0..10_000u32 {
            m.insert(k % 1234, ());
            assert!(m.len() <= 200);
        }
    }
}
