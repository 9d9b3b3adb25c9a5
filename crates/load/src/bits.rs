//! Compact sets of integers used by the accounting: a sparse bitmap keyed by 64-bit chunks
//! ([`ChunkSet`]), its frozen, sorted form for range counts ([`SortedSet`]), and a fast
//! hasher for integer keys.
//!
//! A dense run of members costs one bit each; a sparse one costs one map entry (16 bytes)
//! per 64-wide chunk touched. Both the v1 seq numbers of a room and the legacy message
//! indices of one sender are dense, so a receiver's record of what it got is about one
//! bit per delivery.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A multiply-xorshift hasher for integer keys (the keys are ours, not an attacker's).
#[derive(Default, Clone, Copy)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b) ^ self.0.rotate_left(8));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        let x = (n ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

/// Hash maps keyed by integers.
pub type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// A set of `u64`, stored as a map from `i / 64` to a 64-bit word.
#[derive(Debug, Default, Clone)]
pub struct ChunkSet {
    words: IntMap<u64, u64>,
    len: u64,
}

impl ChunkSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `i`; true when it was not there before.
    pub fn insert(&mut self, i: u64) -> bool {
        let word = self.words.entry(i >> 6).or_insert(0);
        let bit = 1u64 << (i & 63);
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        self.len += 1;
        true
    }

    pub fn contains(&self, i: u64) -> bool {
        self.words
            .get(&(i >> 6))
            .is_some_and(|w| w & (1u64 << (i & 63)) != 0)
    }

    /// How many members.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.words.clear();
        self.len = 0;
    }

    /// Adds every member of `other`.
    pub fn union_with(&mut self, other: &ChunkSet) {
        for (&k, &w) in &other.words {
            let word = self.words.entry(k).or_insert(0);
            let added = w & !*word;
            *word |= w;
            self.len += u64::from(added.count_ones());
        }
    }

    /// Every member, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().flat_map(|(&k, &w)| BitIter {
            base: k << 6,
            word: w,
        })
    }

    /// The same members, sorted, with prefix counts for fast range counts.
    pub fn freeze(&self) -> SortedSet {
        let mut words: Vec<(u64, u64)> = self
            .words
            .iter()
            .filter(|(_, &w)| w != 0)
            .map(|(&k, &w)| (k, w))
            .collect();
        words.sort_unstable_by_key(|&(k, _)| k);
        let mut before = Vec::with_capacity(words.len());
        let mut total = 0u64;
        for &(_, w) in &words {
            before.push(total);
            total += u64::from(w.count_ones());
        }
        SortedSet {
            words,
            before,
            total,
        }
    }
}

impl Extend<u64> for ChunkSet {
    fn extend<T: IntoIterator<Item = u64>>(&mut self, members: T) {
        for i in members {
            self.insert(i);
        }
    }
}

impl FromIterator<u64> for ChunkSet {
    fn from_iter<T: IntoIterator<Item = u64>>(members: T) -> Self {
        let mut set = Self::new();
        set.extend(members);
        set
    }
}

struct BitIter {
    base: u64,
    word: u64,
}

impl Iterator for BitIter {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.word == 0 {
            return None;
        }
        let tz = u64::from(self.word.trailing_zeros());
        self.word &= self.word - 1;
        Some(self.base + tz)
    }
}

/// A frozen [`ChunkSet`] that counts members in a range in O(log n).
#[derive(Debug, Default, Clone)]
pub struct SortedSet {
    words: Vec<(u64, u64)>,
    /// `before[i]`: members in `words[..i]`.
    before: Vec<u64>,
    total: u64,
}

impl SortedSet {
    /// Members `<= x`.
    pub fn count_le(&self, x: u64) -> u64 {
        let key = x >> 6;
        let pos = self.words.partition_point(|&(k, _)| k < key);
        let mut n = self.before.get(pos).copied().unwrap_or(self.total);
        if let Some(&(k, w)) = self.words.get(pos) {
            if k == key {
                let bit = x & 63;
                let mask = if bit == 63 {
                    u64::MAX
                } else {
                    (1u64 << (bit + 1)) - 1
                };
                n += u64::from((w & mask).count_ones());
            }
        }
        n
    }

    /// Members in `(lo, hi]`.
    pub fn count_in(&self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return 0;
        }
        self.count_le(hi) - self.count_le(lo)
    }
}

/// A union-find over `0..n` (path halving, union by size).
pub struct UnionFind {
    parent: Vec<u32>,
    size: Vec<u32>,
}

impl UnionFind {
    pub fn new(n: usize) -> Self {
        Self {
            parent: (0..n as u32).collect(),
            size: vec![1; n],
        }
    }

    pub fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let grand = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = grand;
            x = grand;
        }
        x
    }

    pub fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        let (big, small) = if self.size[ra as usize] >= self.size[rb as usize] {
            (ra, rb)
        } else {
            (rb, ra)
        };
        self.parent[small as usize] = big;
        self.size[big as usize] += self.size[small as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_set_inserts_once() {
        let mut s = ChunkSet::new();
        assert!(s.insert(5));
        assert!(!s.insert(5));
        assert!(s.insert(64));
        assert!(s.insert(1 << 40));
        assert_eq!(s.len(), 3);
        assert!(s.contains(64) && !s.contains(63));
        let mut all: Vec<u64> = s.iter().collect();
        all.sort_unstable();
        assert_eq!(all, vec![5, 64, 1 << 40]);
    }

    #[test]
    fn union_counts_new_members_only() {
        let mut a = ChunkSet::new();
        let mut b = ChunkSet::new();
        for i in 0..100 {
            a.insert(i);
        }
        for i in 50..150 {
            b.insert(i);
        }
        a.union_with(&b);
        assert_eq!(a.len(), 150);
    }

    #[test]
    fn sorted_set_counts_ranges() {
        let mut s = ChunkSet::new();
        for i in [1u64, 2, 63, 64, 65, 127, 128, 1000] {
            s.insert(i);
        }
        let f = s.freeze();
        assert_eq!(f.count_le(0), 0);
        assert_eq!(f.count_le(1), 1);
        assert_eq!(f.count_le(63), 3);
        assert_eq!(f.count_le(64), 4);
        assert_eq!(f.count_le(500), 7);
        assert_eq!(f.count_le(u64::MAX), 8);
        assert_eq!(f.count_in(2, 128), 5);
        assert_eq!(f.count_in(128, 2), 0);
    }

    #[test]
    fn union_find_groups() {
        let mut u = UnionFind::new(5);
        u.union(0, 1);
        u.union(3, 4);
        u.union(1, 4);
        assert_eq!(u.find(0), u.find(3));
        assert_ne!(u.find(2), u.find(0));
    }
}
