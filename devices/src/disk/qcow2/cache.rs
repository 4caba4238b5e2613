//! A small LRU-ish cache of cluster-sized metadata tables (L2 tables, refcount blocks),
//! keyed by their host offset. Entries may be dirty; the owner decides when and in which
//! order dirty entries are written back (see `Qcow2::flush_metadata`).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes a table's host offset with murmur3's 64-bit finaliser: a few cycles where the
/// default SipHash costs tens of nanoseconds on every request's lookup. The keys are
/// offsets of tables in the image, and the map holds at most a few thousand of them, so a
/// keyed hash buys nothing here.
#[derive(Default)]
pub struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

pub struct Entry<T> {
    pub table: T,
    pub dirty: bool,
    last_use: u64,
}

pub struct TableCache<T> {
    map: HashMap<u64, Entry<T>, BuildHasherDefault<OffsetHasher>>,
    capacity: usize,
    tick: u64,
}

impl<T> TableCache<T> {
    pub fn new(capacity: usize) -> Self {
        TableCache {
            map: HashMap::default(),
            capacity: capacity.max(4),
            tick: 0,
        }
    }

    pub fn get_mut(&mut self, offset: u64) -> Option<&mut Entry<T>> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.map.get_mut(&offset)?;
        entry.last_use = tick;
        Some(entry)
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.map.contains_key(&offset)
    }

    /// Inserts without evicting: eviction happens only in `evict_clean`, at points where
    /// the owner holds no reference into the cache.
    pub fn insert(&mut self, offset: u64, table: T, dirty: bool) {
        self.tick += 1;
        self.map.insert(
            offset,
            Entry {
                table,
                dirty,
                last_use: self.tick,
            },
        );
    }

    pub fn remove(&mut self, offset: u64) {
        self.map.remove(&offset);
    }

    /// Marks an entry written back (no use: the LRU order stays).
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(e) = self.map.get_mut(&offset) {
            e.dirty = false;
        }
    }

    pub fn over_capacity(&self) -> bool {
        self.map.len() > self.capacity
    }

    /// Drops least recently used clean entries down to 3/4 of the capacity. Returns false
    /// if dirty entries keep the cache over capacity (the owner must write them back).
    pub fn evict_clean(&mut self) -> bool {
        if !self.over_capacity() {
            return true;
        }
        let target = self.capacity * 3 / 4;
        let mut clean: Vec<(u64, u64)> = self
            .map
            .iter()
            .filter(|(_, e)| !e.dirty)
            .map(|(&off, e)| (e.last_use, off))
            .collect();
        clean.sort_unstable();
        let excess = self.map.len().saturating_sub(target);
        for (_, off) in clean.into_iter().take(excess) {
            self.map.remove(&off);
        }
        !self.over_capacity()
    }

    /// Offsets of dirty entries, in ascending order.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }
}
