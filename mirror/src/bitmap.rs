//! A plain bitmap over the grains of a device: which grains are dirty (not yet known to
//! be on the target), being copied, written on the target, or written there since its
//! last flush.

/// One bit per grain.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
    bits: u64,
    ones: u64,
}

impl Bitmap {
    pub(crate) fn new(bits: u64) -> Bitmap {
        Bitmap {
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
            ones: 0,
        }
    }

    pub(crate) fn full(bits: u64) -> Bitmap {
        let mut b = Bitmap::new(bits);
        b.set_range(0, bits);
        b
    }

    pub(crate) fn count(&self) -> u64 {
        self.ones
    }

    pub(crate) fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn put(&mut self, i: u64, v: bool) {
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        match (*w & m != 0, v) {
            (false, true) => {
                *w |= m;
                self.ones += 1;
            }
            (true, false) => {
                *w &= !m;
                self.ones -= 1;
            }
            _ => {}
        }
    }

    /// Sets grains `start..end`; returns how many were newly set.
    pub(crate) fn set_range(&mut self, start: u64, end: u64) -> u64 {
        let before = self.ones;
        for i in start..end.min(self.bits) {
            self.put(i, true);
        }
        self.ones - before
    }

    pub(crate) fn clear_range(&mut self, start: u64, end: u64) {
        for i in start..end.min(self.bits) {
            self.put(i, false);
        }
    }

    pub(crate) fn any_in(&self, start: u64, end: u64) -> bool {
        (start..end.min(self.bits)).any(|i| self.get(i))
    }

    /// The first set grain at or after `from`, skipping grains set in `skip`.
    pub(crate) fn next_set(&self, from: u64, skip: &Bitmap) -> Option<u64> {
        let mut i = from;
        while i < self.bits {
            let w = self.words[(i / 64) as usize] & !skip.words[(i / 64) as usize];
            let w = w >> (i % 64);
            if w == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            let at = i + u64::from(w.trailing_zeros());
            return (at < self.bits).then_some(at);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_counts_and_search() {
        let mut b = Bitmap::new(200);
        assert_eq!(b.set_range(3, 70), 67);
        assert_eq!(b.set_range(60, 80), 10);
        assert_eq!(b.count(), 77);
        let mut skip = Bitmap::new(200);
        skip.set_range(0, 10);
        assert_eq!(b.next_set(0, &skip), Some(10));
        assert_eq!(b.next_set(79, &skip), Some(79));
        assert_eq!(b.next_set(80, &skip), None);
        b.clear_range(0, 200);
        assert_eq!(b.count(), 0);
        b.set_range(199, 300);
        assert!(b.any_in(150, 250));
        assert!(b.get(199));
        let f = Bitmap::full(65);
        assert_eq!(f.count(), 65);
    }
}
