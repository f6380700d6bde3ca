//! The present bitmap: one bit per guest page, set once the page is installed.
//!
//! Bits live in `AtomicU64` words so that fault lanes and the background
//! pusher can claim pages without a lock: [`AtomicBitmap::test_and_set`] is a
//! single `fetch_or`, and exactly one caller sees a given bit flip. A running
//! count of set bits makes [`AtomicBitmap::all_set`] O(1).
//!
//! Indices at or beyond [`AtomicBitmap::len`] behave as permanently set: they
//! are never reported clear and never need installing, so a bad index cannot
//! make the engine install outside the region (and nothing here panics).
//!
//! The scans (`next_clear`, `set_ranges`, ...) read word by word while others
//! may set bits: they return a consistent answer per word, not a snapshot of
//! the whole bitmap.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size bitmap of atomic words with a count of set bits.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    len: u64,
    set: AtomicU64,
}

const BITS: u64 = 64;

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

impl AtomicBitmap {
    /// A bitmap of `len` clear bits.
    pub fn new(len: u64) -> AtomicBitmap {
        let n = len.div_ceil(BITS);
        let words = (0..n).map(|_| AtomicU64::new(0)).collect();
        AtomicBitmap {
            words,
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

    fn word(&self, i: u64) -> Option<&AtomicU64> {
        if i >= self.len {
            return None;
        }
        usize::try_from(i / BITS)
            .ok()
            .and_then(|w| self.words.get(w))
    }

    /// Sets bit `i`; returns whether it was already set (out of range: true).
    /// Exactly one caller gets `false` for a given bit.
    pub fn test_and_set(&self, i: u64) -> bool {
        let Some(w) = self.word(i) else { return true };
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
            if let Some(w) = usize::try_from(wi).ok().and_then(|w| self.words.get(w)) {
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

    /// Clears bit `i` (a REMOVE event zapped the page); returns whether it was
    /// set. Out of range: no-op, false.
    pub fn clear(&self, i: u64) -> bool {
        let Some(w) = self.word(i) else { return false };
        let m = 1u64 << (i % BITS);
        // AcqRel: orders the clear after the zap that caused it and before
        // any later re-install that sets the bit again.
        let old = w.fetch_and(!m, Ordering::AcqRel);
        if old & m == 0 {
            return false;
        }
        // AcqRel: keeps the count in step with the bit for Acquire readers.
        self.set.fetch_sub(1, Ordering::AcqRel);
        true
    }

    /// Whether bit `i` is set (out of range: true).
    pub fn is_set(&self, i: u64) -> bool {
        let Some(w) = self.word(i) else { return true };
        // Acquire: a set bit means the page's install is visible to us.
        w.load(Ordering::Acquire) & (1u64 << (i % BITS)) != 0
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        // Acquire: pairs with the AcqRel increments (see test_and_set).
        self.set.load(Ordering::Acquire)
    }

    /// Whether every bit is set.
    pub fn all_set(&self) -> bool {
        self.count() == self.len
    }

    /// Loads word `wi` with bits at or beyond `len` forced to 1.
    fn load_word(&self, wi: u64) -> u64 {
        let Some(w) = usize::try_from(wi).ok().and_then(|w| self.words.get(w)) else {
            return u64::MAX;
        };
        // Acquire: set bits we report must have their installs visible.
        let v = w.load(Ordering::Acquire);
        let valid = self.len.saturating_sub(wi * BITS).min(BITS);
        v | !mask(0, valid)
    }

    /// The first clear bit at or after `from`.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let mut wi = from / BITS;
        let mut lowmask = mask(0, from % BITS);
        while wi * BITS < self.len {
            let free = !(self.load_word(wi) | lowmask);
            if free != 0 {
                return Some(wi * BITS + u64::from(free.trailing_zeros()));
            }
            lowmask = 0;
            wi += 1;
        }
        None
    }

    /// The first set bit at or after `from`, or `len` if none.
    fn next_set_or_len(&self, from: u64) -> u64 {
        let mut wi = from / BITS;
        let mut lowmask = mask(0, from % BITS);
        while wi * BITS < self.len {
            let set = self.load_word(wi) & !lowmask;
            if set != 0 {
                return (wi * BITS + u64::from(set.trailing_zeros())).min(self.len);
            }
            lowmask = 0;
            wi += 1;
        }
        self.len
    }

    /// The first run of clear bits at or after `from`, as `(first, len)`,
    /// with `len` capped at `max_len` (at least 1).
    pub fn next_clear_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let first = self.next_clear(from)?;
        let cap = first.saturating_add(max_len.max(1));
        let end = self.next_set_or_len(first).min(cap);
        Some((first, end - first))
    }

    /// Runs of set bits as `(first, len)`, in order (for run-length encoding).
    pub fn set_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.len {
            let start = self.next_set_or_len(i);
            if start >= self.len {
                break;
            }
            let end = self.next_clear(start).unwrap_or(self.len);
            out.push((start, end - start));
            i = end;
        }
        out
    }

    /// Sets every bit that is set in `words` (a bitset in this bitmap's
    /// layout, e.g. from `sys::pagemap::populated_pages`); returns how many
    /// were newly set. Bits beyond `len` are ignored.
    pub fn set_from_words(&self, words: &[u64]) -> u64 {
        let mut newly = 0;
        for (wi, (&src, w)) in words.iter().zip(self.words.iter()).enumerate() {
            let wi = u64::try_from(wi).unwrap_or(u64::MAX);
            let valid = self.len.saturating_sub(wi.saturating_mul(BITS)).min(BITS);
            let m = src & mask(0, valid);
            if m == 0 {
                continue;
            }
            // AcqRel: as in test_and_set.
            let old = w.fetch_or(m, Ordering::AcqRel);
            newly += u64::from((m & !old).count_ones());
        }
        if newly > 0 {
            // AcqRel: as in test_and_set.
            self.set.fetch_add(newly, Ordering::AcqRel);
        }
        newly
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64),
        SetRange(u64, u64),
        Clear(u64),
    }

    fn op(len: u64) -> impl Strategy<Value = Op> {
        let i = 0..len + 3; // include a few out-of-range indices
        prop_oneof![
            i.clone().prop_map(Op::Set),
            (i.clone(), 0..len + 70).prop_map(|(a, b)| Op::SetRange(a, b)),
            i.prop_map(Op::Clear),
        ]
    }

    fn model_next_clear(m: &[bool], from: u64) -> Option<u64> {
        (from..m.len() as u64).find(|&i| !m[usize::try_from(i).unwrap_or(usize::MAX)])
    }

    fn model_ranges(m: &[bool]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < m.len() {
            if m[i] {
                let s = i;
                while i < m.len() && m[i] {
                    i += 1;
                }
                out.push((s as u64, (i - s) as u64));
            } else {
                i += 1;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_vec_bool_model(
            (len, ops) in (0u64..300).prop_flat_map(|len| (Just(len), proptest::collection::vec(op(len), 0..60))),
            probes in proptest::collection::vec(0u64..310, 8),
            cap in 1u64..100,
        ) {
            let bm = AtomicBitmap::new(len);
            let n = usize::try_from(len).unwrap_or(0);
            let mut model = vec![false; n];
            let idx = |i: u64| usize::try_from(i).ok().filter(|&i| i < n);
            for op in ops {
                match op {
                    Op::Set(i) => {
                        let was = bm.test_and_set(i);
                        match idx(i) {
                            Some(k) => { prop_assert_eq!(was, model[k]); model[k] = true; }
                            None => prop_assert!(was),
                        }
                    }
                    Op::SetRange(a, c) => {
                        let newly = bm.set_range(a, c);
                        let mut exp = 0;
                        for i in a..a.saturating_add(c) {
                            if let Some(k) = idx(i) {
                                if !model[k] { exp += 1; model[k] = true; }
                            }
                        }
                        prop_assert_eq!(newly, exp);
                    }
                    Op::Clear(i) => {
                        let was = bm.clear(i);
                        match idx(i) {
                            Some(k) => { prop_assert_eq!(was, model[k]); model[k] = false; }
                            None => prop_assert!(!was),
                        }
                    }
                }
            }
            let count = model.iter().filter(|&&b| b).count() as u64;
            prop_assert_eq!(bm.count(), count);
            prop_assert_eq!(bm.all_set(), count == len);
            for (k, &b) in model.iter().enumerate() {
                prop_assert_eq!(bm.is_set(k as u64), b);
            }
            prop_assert!(bm.is_set(len));
            for &p in &probes {
                prop_assert_eq!(bm.next_clear(p), model_next_clear(&model, p));
                let run = bm.next_clear_run(p, cap);
                let exp = model_next_clear(&model, p).map(|f| {
                    let mut e = f;
                    while e < len && !model[usize::try_from(e).unwrap_or(0)] && e - f < cap { e += 1; }
                    (f, e - f)
                });
                prop_assert_eq!(run, exp);
            }
            prop_assert_eq!(bm.set_ranges(), model_ranges(&model));
        }
    }

    #[test]
    fn concurrent_test_and_set_has_one_winner() {
        let bm = std::sync::Arc::new(AtomicBitmap::new(1000));
        let wins: Vec<u64> = (0..2)
            .map(|_| {
                let bm = bm.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|&i| !bm.test_and_set(i)).count() as u64
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or(0))
            .collect();
        assert_eq!(wins.iter().sum::<u64>(), 1000);
        assert!(bm.all_set());
        assert_eq!(bm.set_ranges(), vec![(0, 1000)]);
    }

    #[test]
    fn set_from_words_ignores_tail() {
        let bm = AtomicBitmap::new(70);
        assert_eq!(bm.set_from_words(&[0b101, u64::MAX]), 2 + 6);
        assert_eq!(bm.count(), 8);
        assert_eq!(bm.next_clear(0), Some(1));
        assert_eq!(bm.next_clear(64), None);
    }
}
