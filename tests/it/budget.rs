//! The RAM budget: clean pages are reclaimed, least recently used first.

use crate::common::{open, peek, ram, MemFile, BLK};

#[test]
fn loading_beyond_the_budget_reclaims_lru_pages() {
    let file = MemFile::new(BLK);
    let ram = ram(4);
    let fh = open(&file, &ram);
    let vma = fh.mmap(0, 16).unwrap();
    let at = |pg: usize| vma.as_ptr().wrapping_add(pg * BLK);
    for pg in 0..4 {
        peek(at(pg));
    }
    peek(at(0)); // mapped already: no fault, so page 0 stays least recently faulted
    vma.write_at(BLK, &[1]).unwrap(); // page 1 dirty: never reclaimed
    for pg in 4..16 {
        assert_eq!(peek(at(pg)), MemFile::initial(pg as u64));
        assert!(ram.stats().resident_bytes <= ram.budget());
    }
    assert_eq!(fh.page_state(1), Some(bigfile::virtmem::PageState::Dirty));
    assert_eq!(ram.stats().stats.resident_pages, 4);
    assert_eq!(fh.stats().reclaims, 12);
    let mut b = [0u8];
    vma.read_at(BLK, &mut b).unwrap();
    assert_eq!(b[0], 1);
}
