//! A mapping's bookkeeping: which of its page slots have a RAM page mapped,
//! which a reclaimer is still unmapping, and its access advice.

use std::ptr::NonNull;

use bitvec::vec::BitVec;

use crate::advice::Advice;
use crate::stream::Stream;

#[derive(Debug)]
pub(crate) struct VmaState {
    start: NonNull<u8>,
    pgoffset: u64,
    pglen: u64,
    /// Which slots have a RAM page mapped (vs. the PROT_NONE reservation).
    mapped: BitVec,
    /// Slots reclaim detached and whose reclaimer is unmapping them outside
    /// the lock (a `Deferred`): nothing may be mapped there, and the mapping
    /// may not go away, until the mark is cleared.
    unmapping: BitVec,
    /// On the userfaultfd backend: slots holding a piece, the mapping of a
    /// RAM page made over the reservation (mapped, or taken away and left
    /// registered: `Mapper::map`, `Mapper::revoke`), one kernel mapping
    /// each.
    pieces: BitVec,
    advice: Advice,
    /// Its faults seen as a stream (sequential detection, under
    /// `Advice::Normal`).
    stream: Stream,
}

// SAFETY: `start` is only the address of a reservation owned by the Vma; it
// is dereferenced by no one through this struct, only passed to the mapper.
unsafe impl Send for VmaState {}

impl VmaState {
    /// A mapping of `pglen` pages from file page `pgoffset` at `start`,
    /// nothing mapped yet.
    pub(crate) fn new(start: NonNull<u8>, pgoffset: u64, pglen: usize) -> VmaState {
        VmaState {
            start,
            pgoffset,
            pglen: pglen as u64,
            mapped: BitVec::repeat(false, pglen),
            unmapping: BitVec::repeat(false, pglen),
            pieces: BitVec::repeat(false, pglen),
            advice: Advice::Normal,
            stream: Stream::default(),
        }
    }

    /// The start address, as faults name the mapping.
    pub(crate) fn start(&self) -> usize {
        self.start.as_ptr() as usize
    }

    pub(crate) fn pgoffset(&self) -> u64 {
        self.pgoffset
    }

    /// Index inside this mapping of file block `blk`, if the mapping covers it.
    pub(crate) fn index_of(&self, blk: u64) -> Option<usize> {
        if blk >= self.pgoffset && blk - self.pgoffset < self.pglen {
            usize::try_from(blk - self.pgoffset).ok()
        } else {
            None
        }
    }

    /// The address of slot `idx` (`idx < pglen`).
    pub(crate) fn page_addr(&self, idx: usize, page_size: usize) -> NonNull<u8> {
        assert!((idx as u64) < self.pglen);
        // SAFETY: idx < pglen, so the offset stays inside the reservation.
        unsafe { self.start.add(idx * page_size) }
    }

    pub(crate) fn is_mapped(&self, idx: usize) -> bool {
        self.mapped[idx]
    }

    /// A RAM page is now mapped in slot `idx` (`true`), or no longer.
    pub(crate) fn set_mapped(&mut self, idx: usize, mapped: bool) {
        self.mapped.set(idx, mapped);
    }

    /// The file pages mapped in, ascending.
    pub(crate) fn mapped_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.mapped.iter_ones().map(|i| self.pgoffset + i as u64)
    }

    pub(crate) fn is_unmapping(&self, idx: usize) -> bool {
        self.unmapping[idx]
    }

    /// A reclaimer is unmapping slot `idx` outside the lock (`true`), or
    /// has finished.
    pub(crate) fn set_unmapping(&mut self, idx: usize, unmapping: bool) {
        self.unmapping.set(idx, unmapping);
    }

    /// Slot `idx` holds a piece now: whether it did not before.
    pub(crate) fn add_piece(&mut self, idx: usize) -> bool {
        !self.pieces.replace(idx, true)
    }

    /// Slot `idx` is the reservation again: whether it held a piece.
    pub(crate) fn remove_piece(&mut self, idx: usize) -> bool {
        self.pieces.replace(idx, false)
    }

    /// Slots with a RAM page mapped.
    pub(crate) fn mapped_count(&self) -> usize {
        self.mapped.count_ones()
    }

    /// How many slots hold a piece.
    pub(crate) fn piece_count(&self) -> usize {
        self.pieces.count_ones()
    }

    /// Whether any slot is still being unmapped.
    pub(crate) fn any_unmapping(&self) -> bool {
        self.unmapping.any()
    }

    /// Nothing is mapped in any slot, nor being unmapped (a forked child
    /// put the reservation back over the whole range).
    pub(crate) fn forget_pages(&mut self) {
        self.mapped.fill(false);
        self.unmapping.fill(false);
        self.pieces.fill(false);
        self.stream = Stream::default();
    }

    /// The first address and the number of pages of the mapping.
    pub(crate) fn range(&self) -> (NonNull<u8>, usize) {
        (self.start, self.pglen as usize)
    }

    pub(crate) fn advice(&self) -> Advice {
        self.advice
    }

    pub(crate) fn set_advice(&mut self, advice: Advice) {
        self.advice = advice;
    }

    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    pub(crate) fn stream_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_of_covers_exactly_its_range() {
        let v = VmaState::new(NonNull::dangling(), 10, 3);
        assert_eq!(v.index_of(9), None);
        assert_eq!(v.index_of(10), Some(0));
        assert_eq!(v.index_of(12), Some(2));
        assert_eq!(v.index_of(13), None);
        let top = VmaState::new(NonNull::dangling(), u64::MAX - 1, 1);
        assert_eq!(top.index_of(u64::MAX), None);
        assert_eq!(top.index_of(u64::MAX - 1), Some(0));
    }

    #[test]
    fn slots_are_marked_mapped_and_unmapping() {
        let mut v = VmaState::new(NonNull::dangling(), 4, 3);
        v.set_mapped(0, true);
        v.set_mapped(2, true);
        assert_eq!(v.mapped_blocks().collect::<Vec<_>>(), [4, 6]);
        assert!(!v.any_unmapping());
        v.set_unmapping(1, true);
        assert!(v.is_unmapping(1) && v.any_unmapping());
        v.set_unmapping(1, false);
        assert!(!v.any_unmapping());
        v.set_advice(Advice::Sequential);
        assert_eq!(v.advice(), Advice::Sequential);
    }
}
