//! A two-level atomic bit set: one bit per granule, plus a summary bit per
//! 64-bit word, so scans skip clean regions 4096 granules at a time. Used
//! by the dirty bitmaps ([`crate::bitmap`]), the layered `file:` store and
//! the jobs; it depends on nothing of theirs.
//!
//! Writers only ever set bits (`fetch_or`, word first, then summary), so a
//! set summary bit is a superset hint: a summary bit may be set over a zero
//! word (after a clear), never clear over a non-zero word. Clearing a
//! summary bit re-checks its word afterwards to keep that invariant under
//! concurrent setters.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Bits stored in one word.
const W: u64 = 64;

/// Fixed-size atomic bit set with a summary level.
#[derive(Debug)]
pub struct AtomicBits {
    len: u64,
    words: Box<[AtomicU64]>,
    summary: Box<[AtomicU64]>,
}

fn zeroed(n: u64) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn idx(i: u64) -> usize {
    usize::try_from(i).expect("bitmap index fits in memory")
}

impl AtomicBits {
    /// `len` bits, all clear.
    pub fn new(len: u64) -> Self {
        let nwords = len.div_ceil(W);
        Self { len, words: zeroed(nwords), summary: zeroed(nwords.div_ceil(W)) }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set has zero bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of 64-bit words.
    pub fn word_count(&self) -> u64 {
        self.words.len() as u64
    }

    /// Reads one word.
    pub fn word(&self, w: u64) -> u64 {
        self.words[idx(w)].load(SeqCst)
    }

    /// Sets bits `first..=last` (clamped to the set); returns true if any was newly set.
    pub fn set_range(&self, first: u64, last: u64) -> bool {
        let last = last.min(self.len.saturating_sub(1));
        let mut newly = false;
        let mut w = first / W;
        while first <= last && w <= last / W {
            let mask = range_mask(w, first, last);
            let word = &self.words[idx(w)];
            if word.load(SeqCst) & mask != mask {
                newly |= word.fetch_or(mask, SeqCst) & mask != mask;
                self.summary[idx(w / W)].fetch_or(1 << (w % W), SeqCst);
            }
            w += 1;
        }
        newly
    }

    /// Whether every bit of `first..=last` is set.
    pub fn all_set(&self, first: u64, last: u64) -> bool {
        let last = last.min(self.len.saturating_sub(1));
        (first / W..=last / W).all(|w| {
            let mask = range_mask(w, first, last);
            self.word(w) & mask == mask
        })
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.word(i / W) & (1 << (i % W)) != 0
    }

    /// ORs `bits` into word `w`.
    pub fn or_word(&self, w: u64, bits: u64) {
        if bits != 0 {
            self.words[idx(w)].fetch_or(bits, SeqCst);
            self.summary[idx(w / W)].fetch_or(1 << (w % W), SeqCst);
        }
    }

    /// Clears `bits` in word `w`, keeping the summary a superset.
    pub fn and_not_word(&self, w: u64, bits: u64) {
        if bits == 0 {
            return;
        }
        let left = self.words[idx(w)].fetch_and(!bits, SeqCst) & !bits;
        if left == 0 {
            self.clear_summary_if_zero(w);
        }
    }

    fn clear_summary_if_zero(&self, w: u64) {
        let s = &self.summary[idx(w / W)];
        s.fetch_and(!(1 << (w % W)), SeqCst);
        if self.word(w) != 0 {
            s.fetch_or(1 << (w % W), SeqCst);
        }
    }

    /// Clears word `w` and returns what it held.
    pub fn take_word(&self, w: u64) -> u64 {
        let old = self.words[idx(w)].swap(0, SeqCst);
        if old != 0 {
            self.clear_summary_if_zero(w);
        }
        old
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in self.dirty_words().collect::<Vec<_>>() {
            self.and_not_word(w, u64::MAX);
        }
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        if self.len > 0 {
            self.set_range(0, self.len - 1);
        }
    }

    /// Indices of words that may be non-zero, in order (cost ∝ dirty words + len/4096).
    pub fn dirty_words(&self) -> impl Iterator<Item = u64> + '_ {
        self.summary.iter().enumerate().flat_map(move |(s, sw)| {
            let mut bits = sw.load(SeqCst);
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                Some(s as u64 * W + b)
            })
        })
    }

    /// Runs of set bits as `(first, count)`, in order, starting at bit `from`.
    pub fn runs_from(&self, from: u64) -> Runs<'_> {
        let words = Box::new(self.dirty_words().skip_while(move |&w| w < from / W));
        Runs { bits: self, words, from, word: 0, left: 0, pending: None }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.dirty_words().map(|w| u64::from(self.word(w).count_ones())).sum()
    }

    /// A point-in-time copy of the words (for persistence and job hand-off).
    pub fn snapshot(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.load(SeqCst)).collect()
    }

    /// A bit set holding a copy of `words` (extra bits past `len` are dropped).
    pub fn from_words(len: u64, words: &[u64]) -> Self {
        let bits = Self::new(len);
        for (w, &v) in words.iter().enumerate().take(bits.words.len()) {
            bits.or_word(w as u64, v & valid_mask(len, w as u64));
        }
        bits
    }
}

/// Iterator over runs of set bits; see [`AtomicBits::runs_from`].
pub struct Runs<'a> {
    bits: &'a AtomicBits,
    words: Box<dyn Iterator<Item = u64> + 'a>,
    from: u64,
    word: u64,
    left: u64,
    pending: Option<(u64, u64)>,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        loop {
            if self.left == 0 {
                let Some(w) = self.words.next() else { return self.pending.take() };
                self.word = w;
                self.left = self.bits.word(w);
                if w == self.from / W {
                    self.left &= u64::MAX << (self.from % W);
                }
                continue;
            }
            let start = u64::from(self.left.trailing_zeros());
            let run = u64::from((self.left >> start).trailing_ones());
            self.left &= if run >= W { 0 } else { !(((1u64 << run) - 1) << start) };
            let first = self.word * W + start;
            match self.pending {
                Some((f, n)) if f + n == first => self.pending = Some((f, n + run)),
                done => {
                    self.pending = Some((first, run));
                    if done.is_some() {
                        return done;
                    }
                }
            }
        }
    }
}

/// Mask of the valid bits of word `w` in a set of `len` bits.
pub fn valid_mask(len: u64, w: u64) -> u64 {
    let first = w * W;
    if first + W <= len {
        u64::MAX
    } else if first >= len {
        0
    } else {
        (1u64 << (len - first)) - 1
    }
}

/// Mask of the bits of word `w` that fall in `first..=last`.
fn range_mask(w: u64, first: u64, last: u64) -> u64 {
    let lo = if w == first / W { first % W } else { 0 };
    let hi = if w == last / W { last % W } else { W - 1 };
    (u64::MAX >> (W - 1 - hi)) & (u64::MAX << lo)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test values
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_merge_across_words() {
        let b = AtomicBits::new(1000);
        b.set_range(60, 130);
        b.set_range(500, 500);
        b.set_range(999, 2000);
        assert_eq!(b.runs_from(0).collect::<Vec<_>>(), vec![(60, 71), (500, 1), (999, 1)]);
        assert_eq!(b.runs_from(100).collect::<Vec<_>>(), vec![(100, 31), (500, 1), (999, 1)]);
        assert_eq!(b.count(), 73);
        b.and_not_word(1, u64::MAX);
        assert_eq!(b.runs_from(0).collect::<Vec<_>>(), vec![(60, 4), (128, 3), (500, 1), (999, 1)]);
    }

    #[test]
    fn set_range_reports_new_bits_only() {
        let b = AtomicBits::new(256);
        assert!(b.set_range(10, 20));
        assert!(!b.set_range(12, 18));
        assert!(b.set_range(20, 21));
        assert!(b.all_set(10, 21) && !b.all_set(9, 21));
    }

    proptest! {
        #[test]
        fn matches_a_vec_of_bools(len in 1u64..5000, ops in proptest::collection::vec((any::<bool>(), 0u64..5000, 0u64..300), 0..40)) {
            let b = AtomicBits::new(len);
            let mut model = vec![false; len as usize];
            for (set, first, n) in ops {
                let last = first + n;
                if set {
                    b.set_range(first, last);
                    for i in first..=last.min(len - 1) { model[i as usize] = true; }
                } else if first < len {
                    let w = first / 64;
                    b.and_not_word(w, u64::MAX);
                    for i in w * 64..((w + 1) * 64).min(len) { model[i as usize] = false; }
                }
            }
            let mut runs = Vec::new();
            let mut i = 0;
            while i < len {
                if model[i as usize] {
                    let s = i;
                    while i < len && model[i as usize] { i += 1; }
                    runs.push((s, i - s));
                } else { i += 1; }
            }
            prop_assert_eq!(b.runs_from(0).collect::<Vec<_>>(), runs);
            prop_assert_eq!(b.count(), model.iter().filter(|&&x| x).count() as u64);
        }
    }
}
