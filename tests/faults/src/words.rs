//! Self-describing words: the model of the multi-threaded scenarios (`races`,
//! `soak`). Every 8-byte word of their files holds `word(blk, w, version)`,
//! so any value read anywhere says which block and word it belongs to and
//! which version it is: a page mapped at the wrong place, data of another
//! block, a torn load or garbage is caught by whoever reads it.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::thread;
use std::time::Duration;

use bigfile_virtmem::Vma;

const MAGIC: u64 = 0xb1;
const BLK_BITS: u32 = 12;
const WORD_BITS: u32 = 18;
const VERSION_BITS: u32 = 26;

/// The most blocks a file of words has.
pub const MAX_BLOCKS: u64 = 1 << BLK_BITS;
/// The highest version a word can hold.
pub const MAX_VERSION: u32 = (1 << VERSION_BITS) - 1;

/// The value of word `w` of block `blk` at `version` (0: as first loaded).
pub fn word(blk: u64, w: usize, version: u32) -> u64 {
    debug_assert!(blk < MAX_BLOCKS && w < 1 << WORD_BITS && version <= MAX_VERSION);
    (MAGIC << 56)
        | (blk << (WORD_BITS + VERSION_BITS))
        | ((w as u64) << VERSION_BITS)
        | version as u64
}

/// `(blk, w, version)` of a value, if it is one `word` makes.
pub fn decode(v: u64) -> Option<(u64, usize, u32)> {
    (v >> 56 == MAGIC).then_some((
        (v >> (WORD_BITS + VERSION_BITS)) & (MAX_BLOCKS - 1),
        ((v >> VERSION_BITS) & ((1 << WORD_BITS) - 1)) as usize,
        (v as u32) & MAX_VERSION,
    ))
}

/// Fill `buf` as block `blk` whose words are all at `version`.
pub fn fill(blk: u64, version: u32, buf: &mut [u8]) {
    for (w, c) in buf.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&word(blk, w, version).to_ne_bytes());
    }
}

/// The words of `buf` (8-byte chunks).
pub fn words(buf: &[u8]) -> impl Iterator<Item = u64> + '_ {
    buf.chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
}

/// The versions of the words of `buf` as block `blk`; `u32::MAX` for a word
/// that is not of that block at its place.
pub fn versions(blk: u64, buf: &[u8]) -> Vec<u32> {
    words(buf)
        .enumerate()
        .map(|(w, v)| match decode(v) {
            Some((b, ww, ver)) if b == blk && ww == w => ver,
            _ => u32::MAX,
        })
        .collect()
}

/// What is wrong with `buf` as block `blk`, if anything: the first word
/// that is not of this block at its place.
pub fn misplaced(blk: u64, buf: &[u8]) -> Option<String> {
    words(buf).enumerate().find_map(|(w, v)| match decode(v) {
        Some((b, ww, _)) if b == blk && ww == w => None,
        _ => Some(format!("block {blk}: word {w} is {v:#x}")),
    })
}

/// The byte offset of word `w` of page `page` of `vma`.
fn offset(vma: &Vma, page: u64, w: usize) -> usize {
    let blksize = vma.len() / vma.pglen() as usize;
    let off = page as usize * blksize + w * 8;
    assert!(w * 8 < blksize && off + 8 <= vma.len());
    off
}

/// The address of word `w` of page `page` of `vma` (for the kernel to
/// read or write it in a system call).
pub fn word_addr(vma: &Vma, page: u64, w: usize) -> usize {
    vma.as_ptr() as usize + offset(vma, page, w)
}

/// Word `w` of page `page` (counted from the mapping's start) of `vma`.
pub fn read_word(vma: &Vma, page: u64, w: usize) -> u64 {
    let off = offset(vma, page, w);
    // SAFETY: an aligned word inside the live mapping; faults are served by
    // the handler. A raw volatile read: no reference to memory that other
    // threads write.
    unsafe { std::ptr::read_volatile(vma.as_ptr().add(off).cast::<u64>()) }
}

/// Store `v` as word `w` of page `page` of `vma`.
pub fn write_word(vma: &Vma, page: u64, w: usize, v: u64) {
    let off = offset(vma, page, w);
    // SAFETY: as in `read_word`; only the block's owner writes it, and one
    // aligned 8-byte store is re-executed whole after a fault.
    unsafe { std::ptr::write_volatile(vma.as_ptr().add(off).cast::<u64>(), v) }
}

/// Yield now and then, sleep more rarely, by the `n`th call: loads and
/// stores that take a little longer now and then, so that other threads
/// find pages LOADING and handles under writeout.
pub fn pause(n: &AtomicU64) {
    let n = n.fetch_add(1, SeqCst);
    if n.is_multiple_of(7) {
        thread::yield_now();
    }
    if n.is_multiple_of(97) {
        thread::sleep(Duration::from_micros(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_says_where_it_belongs() {
        let v = word(MAX_BLOCKS - 1, (1 << WORD_BITS) - 1, MAX_VERSION);
        assert_eq!(
            decode(v),
            Some((MAX_BLOCKS - 1, (1 << WORD_BITS) - 1, MAX_VERSION))
        );
        assert_eq!(decode(word(3, 7, 9)), Some((3, 7, 9)));
        assert_eq!(decode(0), None);
        let mut buf = vec![0; 64];
        fill(5, 2, &mut buf);
        assert_eq!(versions(5, &buf), [2; 8]);
        assert_eq!(versions(6, &buf), [u32::MAX; 8]);
        assert!(misplaced(5, &buf).is_none());
        assert!(misplaced(4, &buf).is_some());
    }
}
