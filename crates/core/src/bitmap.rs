//! A fixed-size atomic bitmap: one bit of state per chunk, no per-chunk allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::mapped::MappedFile;

/// `len` bits packed into `AtomicU64` words; every operation is lock-free.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Words,
    len: u64,
}

/// Where the words live: in this process, or in a mapped state file (persistent).
#[derive(Debug)]
enum Words {
    Owned(Box<[AtomicU64]>),
    Mapped {
        file: Arc<MappedFile>,
        byte_offset: usize,
    },
}

impl AtomicBitmap {
    /// A bitmap of `len` cleared bits.
    pub fn new(len: u64) -> Self {
        let words = (0..Self::words_for(len)).map(|_| AtomicU64::new(0)).collect();
        Self {
            words: Words::Owned(words),
            len,
        }
    }

    /// A bitmap of `len` bits stored in `file` at `byte_offset` (keeping whatever bits the file
    /// holds), so every change is in the page cache at once and survives this process.
    pub fn in_mapped_file(file: Arc<MappedFile>, byte_offset: usize, len: u64) -> Self {
        // Check the range now, so `words()` cannot fail later.
        file.words(byte_offset, Self::words_for(len) as usize);
        Self {
            words: Words::Mapped { file, byte_offset },
            len,
        }
    }

    /// Number of 64-bit words needed for `len` bits.
    pub fn words_for(len: u64) -> u64 {
        len.div_ceil(64)
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.words {
            Words::Owned(words) => words,
            Words::Mapped { file, byte_offset } => {
                file.words(*byte_offset, Self::words_for(self.len) as usize)
            }
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn word_and_mask(&self, index: u64) -> (&AtomicU64, u64) {
        assert!(index < self.len, "bit {index} out of range {}", self.len);
        (&self.words()[(index / 64) as usize], 1 << (index % 64))
    }

    /// Reads bit `index`.
    pub fn get(&self, index: u64) -> bool {
        let (word, mask) = self.word_and_mask(index);
        word.load(Ordering::Acquire) & mask != 0
    }

    /// Sets bit `index`; returns its previous value.
    pub fn set(&self, index: u64) -> bool {
        let (word, mask) = self.word_and_mask(index);
        word.fetch_or(mask, Ordering::AcqRel) & mask != 0
    }

    /// Clears bit `index`; returns its previous value.
    pub fn clear(&self, index: u64) -> bool {
        let (word, mask) = self.word_and_mask(index);
        word.fetch_and(!mask, Ordering::AcqRel) & mask != 0
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        for (i, word) in self.words().iter().enumerate() {
            word.store(self.full_word_mask(i), Ordering::Release);
        }
    }

    fn full_word_mask(&self, word_index: usize) -> u64 {
        let bits_here = (self.len - word_index as u64 * 64).min(64);
        if bits_here == 64 {
            u64::MAX
        } else {
            (1u64 << bits_here) - 1
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words()
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Whether every bit is set.
    pub fn all(&self) -> bool {
        self.count_ones() == self.len
    }

    /// Indices of set bits, in order (a snapshot; concurrent changes may or may not show).
    pub fn ones(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, word) in self.words().iter().enumerate() {
            collect_ones(word.load(Ordering::Acquire), i, &mut out);
        }
        out
    }

    /// Clears every bit and returns the indices that were set. Each word is swapped atomically,
    /// so a bit set concurrently is either returned now or stays set for the next call.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, word) in self.words().iter().enumerate() {
            collect_ones(word.swap(0, Ordering::AcqRel), i, &mut out);
        }
        out
    }
}

fn collect_ones(mut bits: u64, word_index: usize, out: &mut Vec<u64>) {
    while bits != 0 {
        let bit = bits.trailing_zeros() as u64;
        out.push(word_index as u64 * 64 + bit);
        bits &= bits - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_a_bool_vector(len in 1u64..300, ops in proptest::collection::vec((0u8..3, any::<u64>()), 0..200)) {
            let bitmap = AtomicBitmap::new(len);
            let mut model = vec![false; len as usize];
            for (op, raw) in ops {
                let i = raw % len;
                match op {
                    0 => prop_assert_eq!(bitmap.set(i), std::mem::replace(&mut model[i as usize], true)),
                    1 => prop_assert_eq!(bitmap.clear(i), std::mem::replace(&mut model[i as usize], false)),
                    _ => prop_assert_eq!(bitmap.get(i), model[i as usize]),
                }
            }
            let expected: Vec<u64> = (0..len).filter(|&i| model[i as usize]).collect();
            prop_assert_eq!(bitmap.count_ones(), expected.len() as u64);
            prop_assert_eq!(bitmap.ones(), expected.clone());
            prop_assert_eq!(bitmap.take(), expected);
            prop_assert_eq!(bitmap.count_ones(), 0);
            bitmap.set_all();
            prop_assert!(bitmap.all());
            prop_assert_eq!(bitmap.count_ones(), len);
        }
    }
}
