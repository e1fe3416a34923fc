//! The reference model of a file and one handle's changes, and a seeded
//! generator for workloads.

use std::collections::{BTreeMap, HashMap};

/// Block `blk`'s content before anything was stored: varies inside the block
/// and between blocks, so a page shown at the wrong block or offset differs.
pub fn initial(blk: u64, blksize: usize) -> Vec<u8> {
    let mut buf = vec![0; blksize];
    fill_initial(blk, &mut buf);
    buf
}

/// [`initial`] into `buf`.
pub fn fill_initial(blk: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (blk.wrapping_mul(131) ^ (i as u64 / 97)) as u8;
    }
}

/// What the file and a handle must show: the committed blocks (what the
/// backing store holds) and the handle's changes not yet written out.
#[derive(Debug)]
pub struct Model {
    pub blksize: usize,
    pub committed: HashMap<u64, Vec<u8>>,
    pub dirty: BTreeMap<u64, Vec<u8>>,
}

impl Model {
    pub fn new(blksize: usize) -> Model {
        Model {
            blksize,
            committed: HashMap::new(),
            dirty: BTreeMap::new(),
        }
    }

    pub fn committed(&self, blk: u64) -> Vec<u8> {
        self.committed
            .get(&blk)
            .cloned()
            .unwrap_or_else(|| initial(blk, self.blksize))
    }

    /// What the handle shows for `blk`: its change, else the file's data.
    pub fn view(&self, blk: u64) -> Vec<u8> {
        self.dirty
            .get(&blk)
            .cloned()
            .unwrap_or_else(|| self.committed(blk))
    }

    pub fn write(&mut self, blk: u64, off: usize, data: &[u8]) {
        let mut page = self.view(blk);
        page[off..off + data.len()].copy_from_slice(data);
        self.dirty.insert(blk, page);
    }

    pub fn dirty_blocks(&self) -> Vec<u64> {
        self.dirty.keys().copied().collect()
    }
}

/// A small deterministic generator (xorshift64*): the same seed gives the same
/// workload, so the Nth call of a failure point is the same call every run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// A generator whose seed is first spread over all bits, so that seeds
    /// differing in few bits (0, 1, 2...) start unrelated sequences.
    pub fn spread(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_shows_changes_over_the_committed_data() {
        let mut m = Model::new(8);
        assert_eq!(m.view(3), initial(3, 8));
        m.write(3, 2, b"xy");
        assert_eq!(&m.view(3)[2..4], b"xy");
        assert_eq!(m.dirty_blocks(), [3]);
        assert_ne!(initial(3, 8), initial(4, 8));
    }

    #[test]
    fn a_seed_gives_one_sequence() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert!(Rng::new(0).below(5) < 5);
    }
}
