//! Page bitmaps: one bit per guest page, atomic, allocated lazily.
//!
//! # Mechanism
//! Two levels: a top array with one slot per leaf of [`LEAF_BITS`] pages,
//! and leaves of `AtomicU64` words allocated the first time one of their bits
//! is set. A clear leaf costs one empty slot (16 bytes per 128 MiB of 4 KiB
//! pages), so a bitmap sized by a peer's layout costs memory in proportion to
//! the pages actually marked, not to the address space: a 64 TiB layout is
//! 8 MiB of slots until pages arrive. [`AtomicBitmap::test_and_set`] is a
//! single `fetch_or`, so lanes on several cores claim or mark pages without
//! a lock; a running count of set bits makes [`AtomicBitmap::all_set`] O(1).
//!
//! Indices at or beyond [`AtomicBitmap::len`] behave as permanently set: they
//! are never reported clear and never need installing, so a bad index cannot
//! make the engine install outside the region (and nothing here panics).
//!
//! # Hazards
//! The scans (`next_clear`, `set_ranges`, ...) read word by word while others
//! may set bits: they return a consistent answer per word, not a snapshot of
//! the whole bitmap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Bits per leaf (32 Ki pages: 128 MiB of 4 KiB pages).
pub const LEAF_BITS: u64 = 1 << 15;
const WORDS_PER_LEAF: usize = 512;
const BITS: u64 = 64;

type Leaf = Box<[AtomicU64; WORDS_PER_LEAF]>;

/// A lazily allocated bitmap of atomic words with a count of set bits.
#[derive(Debug)]
pub struct AtomicBitmap {
    leaves: Box<[OnceLock<Leaf>]>,
    len: u64,
    set: AtomicU64,
}

/// Mask of bits `lo..hi` (0 <= lo <= hi <= 64) in a word.
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= BITS {
        u64::MAX
    } else {
        (1u64 << hi) - 1
    };
    let lower = if lo >= BITS {
        u64::MAX
    } else {
        (1u64 << lo) - 1
    };
    upper & !lower
}

fn new_leaf() -> Leaf {
    Box::new(std::array::from_fn(|_| AtomicU64::new(0)))
}

impl AtomicBitmap {
    /// A bitmap of `len` clear bits (nothing allocated but the leaf slots).
    pub fn new(len: u64) -> AtomicBitmap {
        let n = usize::try_from(len.div_ceil(LEAF_BITS)).unwrap_or(0);
        let leaves = (0..n).map(|_| OnceLock::new()).collect();
        AtomicBitmap {
            leaves,
            len,
            set: AtomicU64::new(0),
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated for leaves and slots (for metadata reports).
    pub fn allocated_bytes(&self) -> u64 {
        let leaves = self.leaves.iter().filter(|l| l.get().is_some()).count() as u64;
        leaves * (WORDS_PER_LEAF as u64 * 8)
            + self.leaves.len() as u64 * std::mem::size_of::<OnceLock<Leaf>>() as u64
    }

    fn slot(&self, i: u64) -> Option<(&OnceLock<Leaf>, usize)> {
        if i >= self.len {
            return None;
        }
        let leaf = usize::try_from(i / LEAF_BITS).ok()?;
        let word = usize::try_from((i % LEAF_BITS) / BITS).ok()?;
        Some((self.leaves.get(leaf)?, word))
    }

    fn word(&self, i: u64) -> Option<&AtomicU64> {
        let (slot, w) = self.slot(i)?;
        slot.get().map(|l| &l[w])
    }

    fn word_mut(&self, i: u64) -> Option<&AtomicU64> {
        let (slot, w) = self.slot(i)?;
        Some(&slot.get_or_init(new_leaf)[w])
    }

    /// Sets bit `i`; returns whether it was already set (out of range: true).
    /// Exactly one caller gets `false` for a given bit.
    pub fn test_and_set(&self, i: u64) -> bool {
        let Some(w) = self.word_mut(i) else {
            return true;
        };
        let m = 1u64 << (i % BITS);
        // AcqRel: Release publishes the page work done before setting the bit;
        // Acquire makes a loser see the winner's prior writes.
        let old = w.fetch_or(m, Ordering::AcqRel);
        if old & m != 0 {
            return true;
        }
        // AcqRel: a reader that Acquire-loads count == len then sees every bit.
        self.set.fetch_add(1, Ordering::AcqRel);
        false
    }

    /// Sets bits `first..first + count` (clamped to `len`); returns how many
    /// were newly set by this call.
    pub fn set_range(&self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.len);
        let mut newly = 0;
        let mut i = first;
        while i < end {
            let wi = i / BITS;
            let lo = i % BITS;
            let hi = (end - wi * BITS).min(BITS);
            let m = mask(lo, hi);
            if let Some(w) = self.word_mut(i) {
                // AcqRel: as in test_and_set, the bits publish the installs.
                let old = w.fetch_or(m, Ordering::AcqRel);
                newly += u64::from((m & !old).count_ones());
            }
            i = (wi + 1) * BITS;
        }
        if newly > 0 {
            // AcqRel: as in test_and_set.
            self.set.fetch_add(newly, Ordering::AcqRel);
        }
        newly
    }

    /// Clears bits `first..first + count` (clamped); returns how many were set.
    pub fn clear_range(&self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.len);
        let mut cleared = 0;
        let mut i = first;
        while i < end {
            let wi = i / BITS;
            let lo = i % BITS;
            let hi = (end - wi * BITS).min(BITS);
            let m = mask(lo, hi);
            if let Some(w) = self.word(i) {
                // AcqRel: orders the clear after whatever invalidated the pages
                // (a discard), and before later test_and_sets that re-claim them.
                let old = w.fetch_and(!m, Ordering::AcqRel);
                cleared += u64::from((m & old).count_ones());
            }
            i = (wi + 1) * BITS;
        }
        if cleared > 0 {
            // AcqRel: keeps the count consistent with the words for all_set.
            self.set.fetch_sub(cleared, Ordering::AcqRel);
        }
        cleared
    }

    /// Set bits among `first..first + count` (clamped to `len`).
    pub fn count_range(&self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.len);
        let mut n = 0;
        let mut i = first;
        while i < end {
            let wi = i / BITS;
            let lo = i % BITS;
            let hi = (end - wi * BITS).min(BITS);
            if let Some(w) = self.word(i) {
                // Acquire: as in is_set.
                n += u64::from((w.load(Ordering::Acquire) & mask(lo, hi)).count_ones());
            }
            i = (wi + 1) * BITS;
        }
        n
    }

    /// Whether bit `i` is set (out of range: true).
    pub fn is_set(&self, i: u64) -> bool {
        if i >= self.len {
            return true;
        }
        // Acquire: seeing the bit implies seeing the work it publishes.
        self.word(i)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1u64 << (i % BITS)) != 0)
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        // Acquire: pairs with the AcqRel updates.
        self.set.load(Ordering::Acquire)
    }

    /// Whether every bit is set.
    pub fn all_set(&self) -> bool {
        self.count() >= self.len
    }

    /// The first clear bit at or after `from`.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let (slot, w) = self.slot(i)?;
            let Some(leaf) = slot.get() else {
                return Some(i);
            };
            let word = leaf[w].load(Ordering::Acquire) | mask(0, i % BITS);
            if word != u64::MAX {
                let bit = (i / BITS) * BITS + u64::from((!word).trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            i = (i / BITS + 1) * BITS;
        }
        None
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let (slot, w) = self.slot(i)?;
            let Some(leaf) = slot.get() else {
                i = (i / LEAF_BITS + 1) * LEAF_BITS;
                continue;
            };
            let word = leaf[w].load(Ordering::Acquire) & !mask(0, i % BITS);
            if word != 0 {
                let bit = (i / BITS) * BITS + u64::from(word.trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            i = (i / BITS + 1) * BITS;
        }
        None
    }

    /// The first run of clear bits at or after `from`, at most `max_len` long.
    pub fn next_clear_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let start = self.next_clear(from)?;
        let limit = start.saturating_add(max_len.max(1)).min(self.len);
        let end = self.next_set(start).map_or(limit, |s| s.min(limit));
        Some((start, end - start))
    }

    /// Maximal runs of set bits as `(first, count)`, in order.
    pub fn set_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(s) = self.next_set(at) {
            let e = self.next_clear(s).unwrap_or(self.len);
            out.push((s, e - s));
            at = e;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lazy_until_set() {
        let b = AtomicBitmap::new(64 << 30 >> 12 << 10); // 64 TiB of 4 KiB pages
        let empty = b.allocated_bytes();
        assert!(empty < 16 << 20, "{empty}");
        assert!(!b.test_and_set(12345));
        assert!(b.test_and_set(12345));
        assert_eq!(b.allocated_bytes(), empty + 4096);
        assert_eq!(b.next_clear(12345), Some(12346));
        assert_eq!(b.next_set(0), Some(12345));
    }

    #[test]
    fn ranges_across_leaves() {
        let n = 3 * LEAF_BITS + 17;
        let b = AtomicBitmap::new(n);
        assert_eq!(b.set_range(LEAF_BITS - 3, 10), 10);
        assert_eq!(b.set_range(n - 5, 100), 5);
        assert_eq!(b.set_ranges(), vec![(LEAF_BITS - 3, 10), (n - 5, 5)]);
        assert_eq!(b.clear_range(LEAF_BITS, 2), 2);
        assert_eq!(b.count(), 13);
        assert_eq!(
            b.set_ranges(),
            vec![(LEAF_BITS - 3, 3), (LEAF_BITS + 2, 5), (n - 5, 5)]
        );
        assert_eq!(b.next_clear_run(LEAF_BITS - 3, 100), Some((LEAF_BITS, 2)));
        assert!(b.is_set(n));
        assert!(!b.all_set());
    }

    proptest! {
        #[test]
        fn matches_a_vec(ops in proptest::collection::vec((0u64..70_000, 1u64..300, any::<bool>()), 1..40)) {
            let n = 70_000u64;
            let b = AtomicBitmap::new(n);
            let mut v = vec![false; usize::try_from(n).unwrap()];
            for (first, count, set) in ops {
                let end = (first + count).min(n);
                if set { b.set_range(first, count); } else { b.clear_range(first, count); }
                for i in first..end { v[usize::try_from(i).unwrap()] = set; }
            }
            let want = v.iter().filter(|x| **x).count() as u64;
            prop_assert_eq!(b.count(), want);
            for (i, x) in v.iter().enumerate() {
                prop_assert_eq!(b.is_set(i as u64), *x);
            }
            let mut runs = Vec::new();
            let mut i = 0;
            while i < v.len() {
                if v[i] { let s = i; while i < v.len() && v[i] { i += 1; } runs.push((s as u64, (i - s) as u64)); } else { i += 1; }
            }
            prop_assert_eq!(b.set_ranges(), runs);
        }
    }
}
