//! The RAM budget: clean pages are reclaimed, least recently used first.

use std::sync::Arc;

use bigfile::virtmem::FaultBackend;

use crate::common::{
    handle, mappings_in, mem_file, open, peek, ram_on, read_each, setup, MemFile, BLK,
};

#[test]
fn loading_beyond_the_budget_reclaims_lru_pages() {
    let (_file, ram, fh, vma) = setup(4, 16);
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

/// Resident blocks of `fh` among `blocks`.
fn resident(fh: &bigfile::virtmem::FileH, blocks: std::ops::Range<u64>) -> Vec<u64> {
    blocks.filter(|&b| fh.page_state(b).is_some()).collect()
}

/// Reads every byte of block `blk` of `vma` (mapping block 0 at its start)
/// and checks it holds the block's data.
fn read_block(vma: &bigfile::virtmem::Vma, idx: usize, blk: u64) {
    let mut buf = vec![0u8; BLK];
    vma.read_at(idx * BLK, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == MemFile::initial(blk)),
        "block {blk} read wrong data"
    );
}

/// A scan through a mapping advised `Sequential` reuses the page it just
/// left and leaves the other cached pages alone; so does one under `Normal`,
/// detected as a stream; under `Random` the same scan flushes them (LRU).
#[test]
fn sequential_advice_drops_behind_and_keeps_other_pages_cached() {
    scan_drops_behind(bigfile::virtmem::Advice::Sequential);
}

#[test]
fn a_scan_under_normal_advice_is_detected_and_drops_behind() {
    scan_drops_behind(bigfile::virtmem::Advice::Normal);
}

fn scan_drops_behind(advice: bigfile::virtmem::Advice) {
    use bigfile::virtmem::Advice;
    let (_file, ram, fh) = handle(6);
    let other = fh.mmap(20, 4).unwrap();
    for i in 0..4 {
        read_block(&other, i, 20 + i as u64);
    }
    // (The other mapping's four blocks were a stream of their own.)
    let before = fh.stats().streams;
    assert_eq!(before, 1);
    let scan = fh.mmap(0, 16).unwrap();
    assert_eq!(scan.advice(), Advice::Normal);
    scan.advise(advice);
    assert_eq!(scan.advice(), advice);
    assert_eq!(other.advice(), Advice::Normal, "advice is per mapping");
    // The first pass keeps the block it began with (loaded while the budget
    // had room) and the block it ended on; the second finds both cached,
    // dropping block 0 behind it, and ends holding its last two blocks.
    for (pass, kept) in [[0, 15], [14, 15]].into_iter().enumerate() {
        for blk in 0..16 {
            read_block(&scan, blk as usize, blk);
            assert!(ram.stats().resident_bytes <= ram.budget());
        }
        let mut want = kept.to_vec();
        want.extend(20..24); // the other mapping's blocks stay cached
        assert_eq!(resident(&fh, 0..24), want, "pass {pass}");
    }
    assert_eq!(fh.stats().loads, 4 + 16 + 14);
    // Detected (each pass began a stream) only where not advised.
    let streams = fh.stats().streams;
    let detected = if advice == Advice::Normal { 2 } else { 0 };
    assert_eq!(streams, before + detected);
    assert_eq!(ram.stats().stats.streams, streams);

    // A dirty page behind the scan is not dropped (nor written out).
    scan.write_at(3 * BLK, &[0xAA]).unwrap();
    for blk in 4..16 {
        read_block(&scan, blk as usize, blk);
    }
    assert!(fh.page_state(3) == Some(bigfile::virtmem::PageState::Dirty));
    fh.dirty_discard().unwrap();

    // Random: no detection, the scan pushes the least recently used pages
    // out, the other mapping's among them.
    let streams = fh.stats().streams;
    scan.advise(Advice::Random);
    for blk in 0..16 {
        read_block(&scan, blk as usize, blk);
    }
    assert_eq!(resident(&fh, 0..24), (10..16).collect::<Vec<_>>());
    assert_eq!(fh.stats().streams, streams, "none detected under Random");
}

/// Faults that never come on the block right after the one before (a
/// stride, backwards) are no stream: no drop-behind, the least recently
/// used pages go.
#[test]
fn random_access_under_normal_advice_is_no_stream() {
    let (_file, _ram, fh) = handle(4);
    let other = fh.mmap(20, 2).unwrap();
    read_block(&other, 1, 21);
    read_block(&other, 0, 20);
    let vma = fh.mmap(0, 16).unwrap();
    for blk in [0, 2, 4, 6, 15, 13, 11, 9] {
        read_block(&vma, blk as usize, blk);
    }
    assert_eq!(resident(&fh, 0..24), [9, 11, 13, 15]);
    assert_eq!(fh.stats().streams, 0);
}

/// Drop-behind follows the mapping, not the file: a fault in a mapping
/// advised random demotes nothing, even for blocks another mapping of the
/// same handle scans sequentially.
#[test]
fn sequential_advice_applies_to_faults_in_its_own_mapping_only() {
    use bigfile::virtmem::Advice;
    let (_file, _ram, fh) = handle(4);
    let seq = fh.mmap(0, 8).unwrap();
    seq.advise(Advice::Sequential);
    let random = fh.mmap(0, 8).unwrap();
    random.advise(Advice::Random);
    for blk in 0..8 {
        read_block(&random, blk as usize, blk);
    }
    assert_eq!(resident(&fh, 0..8), [4, 5, 6, 7]);
    // Block 6 is resident: the fault in `seq` maps it and demotes block 5,
    // which the next load then replaces instead of block 4.
    read_block(&seq, 6, 6);
    read_block(&seq, 0, 0);
    assert_eq!(resident(&fh, 0..8), [0, 4, 6, 7]);
}

/// With a budget of 16 pages or more, a load that finds the budget full
/// reclaims a batch of the handle's oldest pages (a quarter of the budget,
/// here 4): one is reused at once, the others kept as spares for the next
/// loads. Spares count against the budget and as resident, are given back by
/// `Ram::reclaim`, to other handles needing room, when the budget shrinks,
/// and when their handle closes.
#[test]
fn batched_reclaim_keeps_spares_within_the_budget() {
    // A policy of the signal backend; on the userfaultfd backend a page is
    // its block's place in the handle's file, and cannot be a spare.
    let file = mem_file(BLK);
    let ram = ram_on(FaultBackend::Signals, 16);
    let fh = open(&file, &ram);
    let vma = fh.mmap(0, 64).unwrap();
    // A scan that is no stream (a detected one drops behind instead).
    vma.advise(bigfile::virtmem::Advice::Random);
    for blk in 0..64 {
        read_block(&vma, blk as usize, blk);
        assert!(ram.stats().resident_bytes <= ram.budget(), "block {blk}");
    }
    // Every fourth load reclaimed four pages and the next three took the spares.
    assert_eq!(resident(&fh, 0..64), (48..64).collect::<Vec<_>>());
    assert_eq!(fh.stats().reclaims, 48);
    // Block 0 again: blocks 48 (reused) and 49..51 (spares) go.
    read_block(&vma, 0, 0);
    let mut want: Vec<u64> = (52..64).collect();
    want.insert(0, 0);
    assert_eq!(resident(&fh, 0..64), want);
    assert_eq!(
        ram.stats().stats.resident_pages,
        16,
        "13 pages and 3 spares"
    );
    assert_eq!(fh.stats().resident_pages, 16);
    assert_eq!(ram.pages().stats().pages_allocated, 16);
    assert_eq!(ram.reclaimable_pages(), 16);

    // Another handle of the same RAM takes the spare's room rather than a
    // page of the first handle.
    let file_b = mem_file(BLK);
    let fh_b = open(&file_b, &ram);
    let vma_b = fh_b.mmap(0, 1).unwrap();
    read_block(&vma_b, 0, 0);
    assert_eq!(resident(&fh, 0..64), want);
    assert_eq!(fh.stats().resident_pages, 15);
    assert_eq!(ram.stats().stats.resident_pages, 16);
    assert_eq!(ram.pages().stats().pages_allocated, 16);

    // A smaller budget is reached at the next load.
    read_block(&vma, 1, 1); // a spare again
    assert_eq!(fh.stats().resident_pages, 15);
    ram.set_budget(8 * BLK as u64);
    read_block(&vma, 2, 2);
    assert!(ram.stats().resident_bytes <= ram.budget());
    assert_eq!(
        ram.pages().stats().pages_allocated,
        ram.stats().stats.resident_pages
    );

    // Reclaim gives everything clean back, spares included.
    read_block(&vma, 3, 3);
    read_block(&vma, 4, 4);
    ram.set_budget(16 * BLK as u64);
    let clean = ram.reclaimable_pages();
    assert_eq!(ram.reclaim() as u64, clean);
    assert_eq!(ram.stats().stats.resident_pages, 0);
    assert_eq!(ram.pages().stats().pages_allocated, 0);
    drop((vma_b, fh_b));

    // Closing a handle gives its spares back.
    for blk in 0..17 {
        read_block(&vma, blk as usize, blk);
    }
    assert_eq!(fh.stats().resident_pages, 16);
    assert_eq!(resident(&fh, 0..64).len(), 13, "three of the 16 are spares");
    drop(vma);
    fh.close().map_err(|(e, _)| e).unwrap();
    assert_eq!(ram.stats().stats.resident_pages, 0);
    assert_eq!(ram.pages().stats().pages_allocated, 0);
}

/// `prefault` in a mapping advised sequential leaves every page of its range
/// mapped when the range fits the budget: drop-behind applies to the block
/// before the range, not to blocks of the range (they are about to be used,
/// e.g. by a system call that cannot fault them back in).
#[test]
fn prefault_in_a_sequential_mapping_keeps_its_whole_range() {
    use bigfile::virtmem::{Access, Advice};
    let (_file, _ram, fh, vma) = setup(4, 8);
    vma.advise(Advice::Sequential);
    for blk in 0..4 {
        read_block(&vma, blk as usize, blk);
    }
    vma.prefault(4 * BLK..7 * BLK, Access::Read).unwrap();
    let mapped = vma.mapped_pages();
    for blk in 4..7 {
        assert!(mapped.contains(&blk), "block {blk} not mapped: {mapped:?}");
    }
    // The block before the range was dropped first.
    assert_eq!(fh.page_state(3), None);
}

/// Found in review: the kernel mappings are the process's (65,530 at most,
/// `vm.max_map_count`), but pieces were bounded per RAM, and a piece between
/// two parts of the reservation splits it: two kernel mappings each. 4 RAMs
/// whose mappings are touched at every other slot had 4 x 16,384, and
/// mapping a page failed with ENOMEM (SIGBUS). Here 2 RAMs, 20,000 slots
/// each, every other one touched, with a budget of 16 pages each: at most
/// `PIECES_KEPT` (8192) pieces in all, two kernel mappings each.
#[test]
fn kernel_mappings_stay_bounded_across_rams_when_scattered_slots_are_touched() {
    const SLOTS: usize = 20_000;
    let mut kept = Vec::new();
    for _ in 0..2 {
        let (file, ram) = small_blocks();
        let fh = open(&file, &ram);
        let vma = fh.mmap(0, SLOTS as u64).unwrap();
        read_each(&vma, SMALL, (0..SLOTS).step_by(2));
        kept.push((vma, fh, ram));
    }
    let inside: usize = kept
        .iter()
        .map(|(vma, _, _)| kernel_mappings_in(vma.addr_range()))
        .sum();
    assert!(
        inside <= 2 * 8192 + 64,
        "{inside} kernel mappings in 2 mappings of {SLOTS} slots"
    );
}

/// The block size of [`small_blocks`].
const SMALL: usize = 4096;

/// A file of blocks of [`SMALL`] bytes, block `b` holding `MemFile::initial(b)`,
/// and a RAM of pages that size with a budget of 16 pages: mappings of many
/// slots, few of them resident.
fn small_blocks() -> (Arc<MemFile>, bigfile::virtmem::Ram) {
    let file = Arc::new(MemFile::new(SMALL));
    let ram = bigfile::virtmem::Ram::from_spec(&format!("memfd,pagesize={SMALL}"))
        .unwrap()
        .with_budget(16 * SMALL as u64);
    (file, ram)
}

/// How many kernel mappings (/proc/self/maps) overlap `range`.
fn kernel_mappings_in(range: std::ops::Range<usize>) -> usize {
    mappings_in(range).len()
}

/// A mapping touched at more slots than the kernel keeps mappings for does
/// not run out of them: on the signal backend a page taken away goes back to
/// the reservation; on the userfaultfd backend a RAM page's mapping over a
/// slot (a piece) stays once taken away, until the process holds more than
/// `PIECES_KEPT` (8192) of them, then pieces taken away are turned back into
/// the reservation. Here 12,000 slots of 4 KiB with a budget of 16 pages:
/// without that, 12,000 kernel mappings.
#[test]
fn kernel_mappings_stay_bounded_however_many_slots_are_touched() {
    const SLOTS: usize = 12_000;
    let (file, ram) = small_blocks();
    let fh = open(&file, &ram);
    let vma = fh.mmap(0, SLOTS as u64).unwrap();
    read_each(&vma, SMALL, 0..SLOTS);
    let inside = kernel_mappings_in(vma.addr_range());
    assert!(
        inside <= 8192 + 64,
        "{inside} kernel mappings in a mapping of {SLOTS} slots"
    );
    // Every slot still reads its block.
    read_each(&vma, SMALL, (0..SLOTS).step_by(997));
}
