//! The state behind one RAM's lock, as parts that own their data: the page
//! table, the LRU list, the wait graph, the budget, and each handle's page
//! index, dirty list and mappings.
//!
//! Every file handle and mapping that uses a RAM keeps its mutable state
//! here, under the RAM's one mutex, so reclaim can walk pages of all
//! handles in LRU order. This is bookkeeping only: it makes no system call
//! (the mapper does, from what these methods return), and `loadblk` and
//! `storeblk` never run while the mutex is held.

use std::collections::BTreeSet;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, MutexGuard};

use bigfile_ram::{PageMap, RamHandle};
use slab::Slab;

use crate::advice::Advice;
use crate::budget::Budget;
use crate::keys::{FileKey, PageKey, RamPage, Slot, VmaId, VmaKey};
use crate::lru::Lru;
use crate::pages::{Invalidation, LoadEnd, PageState, PageTable};
use crate::stats::{CountPair, Counter, Counters};
use crate::stream::{Step, Stream};
use crate::vmas::VmaState;
use crate::waits::{self, Ticket, WaitGraph};

/// One file handle's part of the state.
pub(crate) struct HandleState {
    ramh: Arc<RamHandle>,
    /// Block → its resident page.
    index: PageMap<PageKey>,
    /// Dirty blocks, ascending: the order writeout stores them in.
    dirty: BTreeSet<u64>,
    vmas: Slab<VmaState>,
    /// Slots of its mappings that reclaimers are still unmapping: checked
    /// before looking at each mapping (a write to any block waits for them).
    unmapping: usize,
    /// The writeout of this handle in progress, if any.
    writeout: Option<Arc<Ticket>>,
    counters: Arc<Counters>,
}

/// A page forgotten by [`State::detach`], with its memory (if it had any)
/// for the caller to give back or reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Detached {
    pub(crate) fileh: FileKey,
    pub(crate) blk: u64,
    pub(crate) ram_page: Option<RamPage>,
}

/// When the slots of a detached page are taken away from their mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unmap {
    /// At once, by the caller, under the lock.
    Now,
    /// After the lock is dropped (a `Deferred`): the slots stay marked
    /// unmapping until then.
    Deferred,
}

/// A slot where a fault maps its page: its address, and what is there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotView {
    pub(crate) index: usize,
    pub(crate) addr: NonNull<u8>,
    /// A RAM page is mapped there (only its protection changes).
    pub(crate) mapped: bool,
}

#[derive(Default)]
pub(crate) struct State {
    pages: PageTable,
    lru: Lru,
    budget: Budget,
    handles: Slab<HandleState>,
    /// Threads waiting on the RAM's condition variable: notifications are
    /// skipped when none.
    waiters: u32,
    /// Ranges of mappings removed from their handle and not yet given back
    /// to the OS (by `Vma`'s drop, outside the lock): a forked child puts
    /// the reservation back over them too.
    releasing: Vec<(NonNull<u8>, usize)>,
    /// Slots of this RAM's mappings holding a piece (the userfaultfd
    /// backend's kernel mappings of RAM pages, `VmaState`), counted in
    /// [`pieces_in_process`] too.
    pieces: usize,
    /// Slots of this RAM's mappings with a RAM page mapped, counted in
    /// [`mapped_in_process`] too.
    mapped: usize,
    /// The pins of this RAM's faults in progress (`streak.rs`: the block of
    /// the other page their access needs), once per fault: what the
    /// reclaim of another RAM sharing the budget spares (`spare_pins`).
    pins: Vec<(FileKey, u64)>,
}

/// Slots of every RAM's mappings with a RAM page mapped: each is a kernel
/// mapping of its own, and splits its mapping's reservation when its
/// neighbours are not mapped (`serve.rs` keeps them under
/// [`mapped_slots_kept`]).
static MAPPED_IN_PROCESS: AtomicUsize = AtomicUsize::new(0);

/// Slots of the process's mappings (every RAM's) with a page mapped.
pub(crate) fn mapped_in_process() -> usize {
    MAPPED_IN_PROCESS.load(Relaxed)
}

/// How many slots the process keeps mapped at most: each may cost two
/// kernel mappings (the page, and the reservation it splits), of the
/// `vm.max_map_count` the process has (65530 by default) for all its
/// mappings, of which the userfaultfd backend's kept pieces take up to a
/// quarter (`mapper::PIECES_KEPT`) and the rest of the process needs some:
/// five sixteenths of the limit (20478 by default).
pub(crate) fn mapped_slots_kept() -> usize {
    static KEPT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KEPT.get_or_init(|| {
        let limit = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(65530);
        limit / 16 * 5
    })
}

/// Slots of every RAM's mappings holding a piece: past
/// `mapper::PIECES_KEPT`, taken-away pieces are turned back into the
/// reservation. The process's, not a RAM's: so is the kernel's limit on
/// mappings (`vm.max_map_count`).
static PIECES_IN_PROCESS: AtomicUsize = AtomicUsize::new(0);

/// Slots of the process's mappings (every RAM's) holding a piece.
pub(crate) fn pieces_in_process() -> usize {
    PIECES_IN_PROCESS.load(Relaxed)
}

// SAFETY: `releasing` holds addresses of reservations owned by dropping
// Vmas, never dereferenced through the state, only passed to the mapper.
unsafe impl Send for State {}

impl State {
    /// A state whose pages count in `pooled` too (`Budget::pooled`), its
    /// LRU list on `clock`, showing its oldest page's use in `shown_oldest`
    /// (`Lru::sharing`): for RAMs that share a budget.
    pub(crate) fn pooled(
        pooled: Arc<AtomicU64>,
        clock: Arc<AtomicU64>,
        shown_oldest: Arc<AtomicU64>,
    ) -> State {
        State {
            budget: Budget::pooled(pooled),
            lru: Lru::sharing(clock, shown_oldest),
            ..State::default()
        }
    }

    pub(crate) fn pages(&self) -> &PageTable {
        &self.pages
    }

    pub(crate) fn lru(&self) -> &Lru {
        &self.lru
    }

    pub(crate) fn budget(&self) -> &Budget {
        &self.budget
    }

    #[cfg(test)]
    pub(crate) fn budget_mut(&mut self) -> &mut Budget {
        &mut self.budget
    }

    /// The process's wait graph (`waits::graph`: one for all RAMs), locked;
    /// taken under this RAM's lock, as the lock order requires.
    pub(crate) fn waits(&self) -> MutexGuard<'static, WaitGraph> {
        waits::graph()
    }

    pub(crate) fn waiters(&self) -> u32 {
        self.waiters
    }

    /// A thread starts (`true`) or stops waiting on the condition variable.
    pub(crate) fn count_waiter(&mut self, starts: bool) {
        if starts {
            self.waiters += 1;
        } else {
            self.waiters -= 1;
        }
    }

    /// The counters a change of handle `fk` is counted in.
    fn counts<'a>(&'a self, fk: FileKey, ram: &'a Counters) -> CountPair<'a> {
        CountPair {
            fileh: &self.handles[fk.0].counters,
            ram,
        }
    }

    // --- handles ---

    pub(crate) fn open_handle(&mut self, ramh: Arc<RamHandle>, counters: Arc<Counters>) -> FileKey {
        FileKey(self.handles.insert(HandleState {
            ramh,
            index: PageMap::new(),
            dirty: BTreeSet::new(),
            vmas: Slab::new(),
            unmapping: 0,
            writeout: None,
            counters,
        }))
    }

    /// Forget handle `fk`; its pages must be gone.
    pub(crate) fn close_handle(&mut self, fk: FileKey) {
        self.budget.forget_asker(fk);
        let h = self.handles.remove(fk.0);
        debug_assert!(h.index.is_empty(), "a closed handle still has pages");
    }

    pub(crate) fn ramh(&self, fk: FileKey) -> &Arc<RamHandle> {
        &self.handles[fk.0].ramh
    }

    /// Handle `fk`'s resident pages.
    pub(crate) fn pages_of(&self, fk: FileKey) -> Vec<PageKey> {
        self.handles[fk.0].index.iter().map(|(_, &pk)| pk).collect()
    }

    /// The resident page of block `blk` of handle `fk`.
    pub(crate) fn lookup(&self, fk: FileKey, blk: u64) -> Option<PageKey> {
        self.handles[fk.0].index.get(blk).copied()
    }

    /// The resident page of block `blk` of handle `fk`, if the handle is
    /// still open (a fault's pin may name one closed since).
    pub(crate) fn find_page(&self, fk: FileKey, blk: u64) -> Option<PageKey> {
        self.handles.get(fk.0)?.index.get(blk).copied()
    }

    /// A fault keeping block `pin` (its access's pin) begins.
    pub(crate) fn hold_pin(&mut self, pin: (FileKey, u64)) {
        self.pins.push(pin);
    }

    /// The fault that held `pin` is over.
    pub(crate) fn release_pin(&mut self, pin: (FileKey, u64)) {
        if let Some(i) = self.pins.iter().position(|&p| p == pin) {
            self.pins.swap_remove(i);
        }
    }

    fn is_pinned(&self, pk: PageKey) -> bool {
        self.pins
            .iter()
            .any(|&(fk, blk)| self.find_page(fk, blk) == Some(pk))
    }

    /// For the reclaim of another RAM sharing the budget: the pages this
    /// RAM's faults in progress keep go behind the others when they are
    /// the oldest, as a fault's own reclaim moves its own pin
    /// (`reclaim::make_room`). Whether the oldest page now is one kept by
    /// none (false: no clean page, or only kept ones).
    pub(crate) fn spare_pins(&mut self) -> bool {
        // Each kept page is moved at most once.
        for _ in 0..self.pins.len() {
            match self.lru.oldest() {
                Some(pk) if self.is_pinned(pk) => self.lru.touch(pk),
                _ => break,
            }
        }
        self.lru.oldest().is_some_and(|pk| !self.is_pinned(pk))
    }

    /// Handle `fk`'s dirty blocks, ascending, with their pages.
    pub(crate) fn dirty_pages(&self, fk: FileKey) -> Vec<(u64, PageKey)> {
        let h = &self.handles[fk.0];
        h.dirty
            .iter()
            .map(|&blk| (blk, *h.index.get(blk).expect("a dirty page is resident")))
            .collect()
    }

    pub(crate) fn writeout(&self, fk: FileKey) -> Option<&Arc<Ticket>> {
        self.handles[fk.0].writeout.as_ref()
    }

    /// A writeout of handle `fk` starts under `ticket`.
    pub(crate) fn begin_writeout(&mut self, fk: FileKey, ticket: Arc<Ticket>) {
        debug_assert!(self.handles[fk.0].writeout.is_none());
        self.handles[fk.0].writeout = Some(ticket);
    }

    /// The writeout of handle `fk` has ended: its ticket, to finish.
    pub(crate) fn end_writeout(&mut self, fk: FileKey) -> Option<Arc<Ticket>> {
        self.handles[fk.0].writeout.take()
    }

    // --- mappings ---

    pub(crate) fn add_vma(&mut self, fk: FileKey, vma: VmaState) -> VmaKey {
        VmaKey(self.handles[fk.0].vmas.insert(vma))
    }

    /// Forget mapping `vk` of `fk`, whose range the caller gives back to
    /// the OS next, and then calls [`State::released`].
    pub(crate) fn remove_vma(&mut self, fk: FileKey, vk: VmaKey) {
        let v = self.handles[fk.0].vmas.remove(vk.0);
        let pieces = v.piece_count();
        self.pieces -= pieces;
        PIECES_IN_PROCESS.fetch_sub(pieces, Relaxed);
        let mapped = v.mapped_count();
        self.mapped -= mapped;
        MAPPED_IN_PROCESS.fetch_sub(mapped, Relaxed);
        self.releasing.push(v.range());
    }

    /// The range at `start` of a removed mapping is given back to the OS.
    pub(crate) fn released(&mut self, start: NonNull<u8>) {
        self.releasing.retain(|&(s, _)| s != start);
    }

    /// In a forked child: forget every page (the parent's memory, which
    /// the child must neither use nor drop), every load and writeout (of
    /// threads the child does not have: `fork.rs` empties the wait graph)
    /// and every spare; handles and
    /// mappings stay, with nothing mapped. Returns the ranges of every
    /// mapping, live or being released, for the caller to put the
    /// reservation back over.
    pub(crate) fn forget_in_child(&mut self, rc: &Counters) -> Vec<(NonNull<u8>, usize)> {
        self.pages = PageTable::default();
        self.lru.forget();
        self.budget.forget();
        self.waiters = 0;
        self.pins.clear();
        PIECES_IN_PROCESS.fetch_sub(std::mem::take(&mut self.pieces), Relaxed);
        MAPPED_IN_PROCESS.fetch_sub(std::mem::take(&mut self.mapped), Relaxed);
        rc.forget_pages();
        let mut ranges = std::mem::take(&mut self.releasing);
        for (_, h) in self.handles.iter_mut() {
            h.index = PageMap::new();
            h.dirty.clear();
            h.writeout = None;
            h.unmapping = 0;
            h.counters.forget_pages();
            for (_, v) in h.vmas.iter_mut() {
                v.forget_pages();
                ranges.push(v.range());
            }
        }
        ranges
    }

    pub(crate) fn vma_count(&self, fk: FileKey) -> usize {
        self.handles[fk.0].vmas.len()
    }

    pub(crate) fn vma(&self, fk: FileKey, vk: VmaKey) -> &VmaState {
        &self.handles[fk.0].vmas[vk.0]
    }

    pub(crate) fn vma_mut(&mut self, fk: FileKey, vk: VmaKey) -> &mut VmaState {
        &mut self.handles[fk.0].vmas[vk.0]
    }

    /// The mapping a fault names, unless it is gone (a loader dropped it
    /// while the fault was being served).
    pub(crate) fn find_vma(&self, fk: FileKey, vma: VmaId) -> Option<&VmaState> {
        self.handles[fk.0]
            .vmas
            .get(vma.key.0)
            .filter(|v| v.start() == vma.start)
    }

    /// The slot of block `blk` in mapping `vma`, unless the mapping is gone.
    pub(crate) fn slot(&self, fk: FileKey, vma: VmaId, blk: u64, ps: usize) -> Option<SlotView> {
        let v = self.find_vma(fk, vma)?;
        let index = v.index_of(blk).expect("block inside the faulting mapping");
        Some(SlotView {
            index,
            addr: v.page_addr(index, ps),
            mapped: v.is_mapped(index),
        })
    }

    /// Whether a reclaimer is still unmapping block `blk`'s slot in `vma`.
    pub(crate) fn slot_unmapping(&self, fk: FileKey, vma: VmaId, blk: u64) -> bool {
        self.find_vma(fk, vma)
            .and_then(|v| v.index_of(blk).map(|idx| v.is_unmapping(idx)))
            .unwrap_or(false)
    }

    /// Whether a reclaimer is still unmapping block `blk` of handle `fk`
    /// from one of its mappings.
    pub(crate) fn block_unmapping(&self, fk: FileKey, blk: u64) -> bool {
        let h = &self.handles[fk.0];
        h.unmapping > 0
            && h.vmas
                .iter()
                .any(|(_, v)| v.index_of(blk).is_some_and(|idx| v.is_unmapping(idx)))
    }

    /// The addresses where block `blk` of handle `fk` is mapped.
    pub(crate) fn mapped_addrs(&self, fk: FileKey, blk: u64, ps: usize) -> Vec<NonNull<u8>> {
        self.handles[fk.0]
            .vmas
            .iter()
            .filter_map(|(_, v)| {
                let idx = v.index_of(blk)?;
                v.is_mapped(idx).then(|| v.page_addr(idx, ps))
            })
            .collect()
    }

    /// Drop-behind (ARCHITECTURE.md) for a fault on block `blk` in mapping
    /// `vma`, when the mapping is read sequentially: advised so, or, under
    /// `Advice::Normal`, its faults form a stream (sequential detection).
    /// With `demote` (a fault, or prefault's first block) the fault is noted
    /// in the mapping's stream (a stream that begins is counted; read-ahead
    /// pages it passed are reached; those of a stream that stops are
    /// demoted, to be reclaimed first), and the clean page of block
    /// `blk - 1` (if resident) becomes the first to be reclaimed. Returns
    /// whether the mapping is read sequentially.
    pub(crate) fn drop_behind(
        &mut self,
        fk: FileKey,
        vma: VmaId,
        blk: u64,
        demote: bool,
        rc: &Counters,
    ) -> bool {
        let h = &mut self.handles[fk.0];
        let Some(v) = h.vmas.get_mut(vma.key.0).filter(|v| v.start() == vma.start) else {
            return false;
        };
        let advice = v.advice();
        if !demote || advice == Advice::Random {
            return match advice {
                Advice::Sequential => true,
                Advice::Random => false,
                Advice::Normal => v.stream().is_sequential(),
            };
        }
        let (prev, pending) = (v.stream().last(), v.stream().pending());
        let step = v.stream_mut().note(blk, self.lru.clock());
        let pgoffset = v.pgoffset();
        let counts = CountPair {
            fileh: &h.counters,
            ram: rc,
        };
        if step == Step::Began && advice == Advice::Normal {
            counts.add(Counter::Streams, 1);
        }
        let sequential = advice == Advice::Sequential || step != Step::Random;
        if step == Step::Random {
            // The stream stopped: what it read ahead goes first.
            for b in pending {
                if let Some(pk) = self
                    .lookup(fk, b)
                    .filter(|&pk| self.pages.get(pk).is_ahead())
                {
                    self.lru.demote(pk);
                }
            }
        } else if let Some(prev) = prev.filter(|&p| p < blk) {
            // Passed without a fault: read ahead and mapped.
            for b in prev + 1..blk {
                if let Some(pk) = self.lookup(fk, b) {
                    self.reached(pk, rc);
                }
            }
        }
        if sequential && blk > pgoffset {
            if let Some(pk) = self.lookup(fk, blk - 1) {
                // Only clean pages are on the LRU list: a dirty one stays put.
                self.lru.demote(pk);
            }
        }
        sequential
    }

    /// Page `pk` is reached (by a fault, or passed by its stream): if
    /// read-ahead loaded it, that is a hit.
    pub(crate) fn reached(&mut self, pk: PageKey, rc: &Counters) {
        if self.pages.set_ahead(pk, false) {
            let fk = self.pages.get(pk).fileh();
            self.counts(fk, rc).add(Counter::ReadAheadHits, 1);
        }
    }

    /// The blocks to read ahead of a fault on block `blk` in mapping `vma`
    /// (read sequentially), at most `max` (inside the mapping; those already
    /// read ahead are not asked again: the range may be empty), the
    /// stream moved on past them; and, for a fault a system call took on
    /// its buffer, the blocks up to `call_end` (`Stream::read_ahead_to`).
    /// Asked once the fault is served (a failed one moves nothing). `None`
    /// for no read-ahead: a mapping advised random, not (or no longer) read
    /// sequentially and no system call's, a budget too small for a window,
    /// or a stream whose last fault is another block by now (another
    /// thread's, which reads ahead of its own).
    pub(crate) fn read_ahead_range(
        &mut self,
        fk: FileKey,
        vma: VmaId,
        (blk, call_end): (u64, Option<u64>),
        max: u64,
    ) -> Option<Range<u64>> {
        let v = self.handles[fk.0]
            .vmas
            .get_mut(vma.key.0)
            .filter(|v| v.start() == vma.start)?;
        let advised = match v.advice() {
            Advice::Sequential => true,
            Advice::Random => return None,
            Advice::Normal => false,
        };
        let window = v.stream().window(advised, max);
        let call_end = call_end.filter(|_| max > 0);
        if (window == 0 && call_end.is_none()) || v.stream().last() != Some(blk) {
            return None;
        }
        let end = v.pgoffset() + v.range().1 as u64;
        let mut r = match window {
            0 => blk.saturating_add(1)..blk.saturating_add(1),
            w => v.stream_mut().read_ahead(blk, w),
        };
        if let Some(call_end) = call_end {
            // Follows on from the window (both start where read-ahead
            // stopped).
            let more = v.stream_mut().read_ahead_to(blk, call_end.min(end));
            if !more.is_empty() {
                r = r.start.min(more.start)..more.end.max(r.end);
            }
        }
        Some(r.start.min(end)..r.end.min(end))
    }

    /// Read-ahead in mapping `vma` stopped short of block `at`.
    pub(crate) fn cut_read_ahead(&mut self, fk: FileKey, vma: VmaId, at: u64) {
        if let Some(v) = self.handles[fk.0]
            .vmas
            .get_mut(vma.key.0)
            .filter(|v| v.start() == vma.start)
        {
            v.stream_mut().cut_ahead(at);
        }
    }

    /// The stream of mapping `vma` of `fk`, unless the mapping is gone.
    pub(crate) fn stream(&self, fk: FileKey, vma: VmaId) -> Option<&Stream> {
        self.find_vma(fk, vma).map(|v| v.stream())
    }

    /// The read-ahead load of `pk` ended LOADED: counted, marked not
    /// reached yet.
    pub(crate) fn loaded_ahead(&mut self, pk: PageKey, rc: &Counters) {
        self.pages.set_ahead(pk, true);
        let fk = self.pages.get(pk).fileh();
        self.counts(fk, rc).add(Counter::ReadAheadLoads, 1);
    }

    /// Make clean page `pk` the first to be reclaimed.
    pub(crate) fn demote(&mut self, pk: PageKey) {
        self.lru.demote(pk);
    }

    // --- the loading protocol ---

    /// EMPTY → LOADING: block `blk` of `fk` is loaded by `ticket`'s owner;
    /// the page counts against the budget from now on.
    pub(crate) fn begin_load(&mut self, fk: FileKey, blk: u64, ticket: Arc<Ticket>) -> PageKey {
        let pk = self.pages.begin_load(fk, blk, ticket);
        self.handles[fk.0].index.insert(blk, pk);
        self.budget.charge();
        pk
    }

    /// A read-ahead job of loading page `pk` was taken over: loaded by the
    /// owner of `ticket` instead.
    pub(crate) fn take_over_load(&mut self, pk: PageKey, ticket: Arc<Ticket>) {
        self.pages.hand_over(pk, ticket);
    }

    /// The load of `pk` filled `ram_page`: LOADED and on the LRU list, or
    /// (invalidated meanwhile) left for the caller to drop.
    pub(crate) fn finish_load(&mut self, pk: PageKey, ram_page: RamPage, rc: &Counters) -> LoadEnd {
        let fk = self.pages.get(pk).fileh();
        let counts = self.counts(fk, rc);
        counts.add(Counter::Resident, 1);
        counts.add(Counter::Loads, 1);
        let end = self.pages.finish_load(pk, ram_page);
        if end == LoadEnd::Loaded {
            self.lru.push_back(pk);
        }
        end
    }

    /// LOADED → DIRTY: off the LRU list, onto the handle's dirty list.
    pub(crate) fn mark_dirty(&mut self, pk: PageKey, rc: &Counters) {
        if self.pages.mark_dirty(pk) {
            self.lru.remove(pk);
            let (fk, blk) = (self.pages.get(pk).fileh(), self.pages.get(pk).blk());
            self.handles[fk.0].dirty.insert(blk);
            self.counts(fk, rc).add(Counter::Dirty, 1);
        }
    }

    /// A STORE stored dirty page `pk`.
    pub(crate) fn mark_stored(&mut self, pk: PageKey) {
        self.pages.mark_stored(pk);
    }

    /// DIRTY → LOADED (written out): off the dirty list, onto the LRU list.
    pub(crate) fn mark_clean(&mut self, pk: PageKey, rc: &Counters) {
        self.pages.mark_clean(pk);
        let (fk, blk) = (self.pages.get(pk).fileh(), self.pages.get(pk).blk());
        self.handles[fk.0].dirty.remove(&blk);
        self.lru.push_back(pk);
        self.counts(fk, rc).sub(Counter::Dirty, 1);
    }

    /// Invalidate `pk`: a loading page is marked for its loader to drop; a
    /// resident one is the caller's to drop.
    pub(crate) fn invalidate(&mut self, pk: PageKey) -> Invalidation {
        self.pages.invalidate(pk)
    }

    /// Mark page `pk` used (LRU).
    pub(crate) fn touch(&mut self, pk: PageKey) {
        self.lru.touch(pk);
    }

    /// Mark slot `index` of mapping `vk` of `fk` as having its page mapped.
    pub(crate) fn set_mapped(&mut self, fk: FileKey, vk: VmaKey, index: usize) {
        let v = &mut self.handles[fk.0].vmas[vk.0];
        if !v.is_mapped(index) {
            v.set_mapped(index, true);
            self.mapped += 1;
            MAPPED_IN_PROCESS.fetch_add(1, Relaxed);
        }
    }

    /// Slot `index` of mapping `vk` holds a piece (`VmaState::add_piece`).
    pub(crate) fn add_piece(&mut self, fk: FileKey, vk: VmaKey, index: usize) {
        if self.handles[fk.0].vmas[vk.0].add_piece(index) {
            self.pieces += 1;
            PIECES_IN_PROCESS.fetch_add(1, Relaxed);
        }
    }

    /// `slot` is the reservation again, if its mapping is still there.
    pub(crate) fn remove_piece(&mut self, slot: &Slot) {
        let removed = self.handles[slot.fileh.0]
            .vmas
            .get_mut(slot.vma.0)
            .is_some_and(|v| v.remove_piece(slot.index));
        if removed {
            self.pieces -= 1;
            PIECES_IN_PROCESS.fetch_sub(1, Relaxed);
        }
    }

    /// Forget page `pk` in any state: off every list, out of the budget,
    /// its slots pushed to `slots` for the caller to take away from their
    /// mappings `when` said. Returns the memory it had.
    pub(crate) fn detach(
        &mut self,
        pk: PageKey,
        rc: &Counters,
        when: Unmap,
        slots: &mut Vec<Slot>,
    ) -> Detached {
        self.lru.remove(pk);
        let page = self.pages.detach(pk);
        self.budget.release();
        let fk = page.fileh();
        let h = &mut self.handles[fk.0];
        h.index.remove(page.blk());
        let counts = CountPair {
            fileh: &h.counters,
            ram: rc,
        };
        if page.state() == PageState::Dirty && h.dirty.remove(&page.blk()) {
            counts.sub(Counter::Dirty, 1);
        }
        if page.ram_page().is_some() {
            counts.sub(Counter::Resident, 1);
        }
        if page.is_ahead() {
            counts.add(Counter::ReadAheadWasted, 1);
        }
        let ps = h.ramh.page_size();
        let mut unmapped = 0;
        for (vk, v) in h.vmas.iter_mut() {
            let Some(index) = v.index_of(page.blk()).filter(|&i| v.is_mapped(i)) else {
                continue;
            };
            v.set_mapped(index, false);
            unmapped += 1;
            if when == Unmap::Deferred {
                v.set_unmapping(index, true);
                h.unmapping += 1;
            }
            slots.push(Slot {
                fileh: fk,
                vma: VmaKey(vk),
                index,
                addr: v.page_addr(index, ps),
            });
        }
        self.mapped -= unmapped;
        MAPPED_IN_PROCESS.fetch_sub(unmapped, Relaxed);
        Detached {
            fileh: fk,
            blk: page.blk(),
            ram_page: page.ram_page(),
        }
    }

    /// Detach the least recently used clean page (counted as a reclaim);
    /// `None` when no page is clean.
    pub(crate) fn reclaim_oldest(
        &mut self,
        rc: &Counters,
        when: Unmap,
        slots: &mut Vec<Slot>,
    ) -> Option<Detached> {
        let pk = self.lru.oldest()?;
        let d = self.detach(pk, rc, when, slots);
        self.counts(d.fileh, rc).add(Counter::Reclaims, 1);
        Some(d)
    }

    /// A reclaimer has unmapped `slot`.
    pub(crate) fn slot_unmapped(&mut self, slot: &Slot) {
        let h = &mut self.handles[slot.fileh.0];
        let v = &mut h.vmas[slot.vma.0];
        if v.is_unmapping(slot.index) {
            v.set_unmapping(slot.index, false);
            h.unmapping -= 1;
        }
    }

    // --- spares (batched reclaim) ---

    /// Take a ready spare of handle `fk` for a load (it leaves the resident
    /// count; the load counts it again).
    /// Else a fresh page of the handle (`fresh.rs`), taken before any
    /// reclaim (not in the resident count: it leaves only the budget's).
    pub(crate) fn take_spare(&mut self, fk: FileKey, rc: &Counters) -> Option<RamPage> {
        let Some(rp) = self.budget.take_spare(fk) else {
            return self.take_fresh(fk);
        };
        self.counts(fk, rc).sub(Counter::Resident, 1);
        Some(rp)
    }

    /// Take any ready spare, else any fresh page, to give its memory back:
    /// both go before any page holding a block.
    pub(crate) fn drop_spare(&mut self, rc: &Counters) -> Option<(Arc<RamHandle>, RamPage)> {
        let Some(s) = self.budget.pop_ready_spare() else {
            let (fk, rp) = self.budget.pop_fresh()?;
            return Some((self.handles[fk.0].ramh.clone(), rp));
        };
        self.counts(s.fileh, rc).sub(Counter::Resident, 1);
        Some((self.handles[s.fileh.0].ramh.clone(), s.ram_page))
    }

    /// Reclaim the least recently used clean page as a spare if it belongs
    /// to handle `fk`; its slots go to `slots` (marked unmapping), and the
    /// spare is ready once they are unmapped. `None` (nothing done) when
    /// the oldest page is another handle's, or there is none.
    pub(crate) fn spare_from_lru(
        &mut self,
        fk: FileKey,
        rc: &Counters,
        slots: &mut Vec<Slot>,
    ) -> Option<RamPage> {
        let pk = self.lru.oldest()?;
        if self.pages.get(pk).fileh() != fk {
            return None;
        }
        let rp = self.reclaim_oldest(rc, Unmap::Deferred, slots)?.ram_page?;
        self.budget.add_spare(fk, rp);
        self.counts(fk, rc).add(Counter::Resident, 1);
        Some(rp)
    }

    /// The spare `(fk, ram_page)` is unmapped: ready.
    pub(crate) fn spare_unmapped(&mut self, fk: FileKey, ram_page: RamPage) {
        self.budget.spare_unmapped(fk, ram_page);
    }

    /// Take handle `fk`'s spares (it is closing), to give their memory back.
    /// Its fresh pages too.
    pub(crate) fn take_spares_of(&mut self, fk: FileKey, rc: &Counters) -> Vec<RamPage> {
        let mut spares = self.budget.take_spares_of(fk);
        self.counts(fk, rc)
            .sub(Counter::Resident, spares.len() as u64);
        spares.extend(self.budget.take_fresh_of(fk));
        spares
    }

    // --- fresh pages (`fresh.rs`) ---

    /// Take a fresh page of handle `fk` for a load (it leaves the count;
    /// the load charges it again).
    pub(crate) fn take_fresh(&mut self, fk: FileKey) -> Option<RamPage> {
        self.budget.take_fresh(fk)
    }

    /// Handle `fk` asks for fresh pages: whether to wake the worker
    /// (`Budget::ask_fresh`).
    pub(crate) fn ask_fresh(&mut self, fk: FileKey, limit: u64, reserve: u64) -> bool {
        self.budget.ask_fresh(fk, limit, reserve)
    }

    /// The worker did not start.
    pub(crate) fn stop_fresh(&mut self) {
        self.budget.stop_fresh();
    }

    /// If the budget of `limit` pages has room for a fresh page and fewer
    /// than `reserve` are made: count one as being made for the handle
    /// that asked last, and return its RAM handle to make it in.
    pub(crate) fn begin_fresh(&mut self, limit: u64, reserve: u64) -> Option<Arc<RamHandle>> {
        let fk = self.budget.begin_fresh(limit, reserve)?;
        let ramh = self.handles.get(fk.0).map(|h| h.ramh.clone());
        if ramh.is_none() {
            // Not a live handle (a bug): nothing is being made after all.
            self.budget.end_fresh(None);
        }
        ramh
    }

    /// A reclaim begins (`true`) or ends (`Budget::hold_fresh`).
    pub(crate) fn hold_fresh(&mut self, reclaiming: bool) {
        self.budget.hold_fresh(reclaiming);
    }

    /// The fresh page being made is `ram_page`, or none (its making failed).
    pub(crate) fn end_fresh(&mut self, ram_page: Option<RamPage>) {
        self.budget.end_fresh(ram_page);
    }

    /// Handle `fk`'s mapped blocks in mapping `vk`.
    pub(crate) fn mapped_blocks(&self, fk: FileKey, vk: VmaKey) -> Vec<u64> {
        self.vma(fk, vk).mapped_blocks().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 4096;

    struct Fixture {
        st: State,
        rc: Counters,
        fh: Arc<Counters>,
        fk: FileKey,
        vk: VmaKey,
        start: NonNull<u8>,
    }

    /// A state with one handle (on a real RAM handle) and one mapping of
    /// its blocks 10..14 at a made-up address (no system call is made).
    fn fixture() -> Fixture {
        let ram = bigfile_ram::Ram::new("memfd,pagesize=4K".parse().unwrap()).unwrap();
        let ramh = Arc::new(ram.open_handle().unwrap());
        let mut st = State::default();
        let fh = Arc::new(Counters::default());
        let fk = st.open_handle(ramh, fh.clone());
        let start = NonNull::new(0x7000_0000_0000 as *mut u8).unwrap();
        let vk = st.add_vma(fk, VmaState::new(start, 10, 4));
        Fixture {
            st,
            rc: Counters::default(),
            fh,
            fk,
            vk,
            start,
        }
    }

    impl Fixture {
        fn vma_id(&self) -> VmaId {
            VmaId {
                key: self.vk,
                start: self.start.as_ptr() as usize,
            }
        }

        /// Load block `blk` into RAM page `rp` and map it in the mapping.
        fn resident(&mut self, blk: u64, rp: u64) -> PageKey {
            let pk = self.st.begin_load(self.fk, blk, Ticket::mine());
            assert_eq!(
                self.st.finish_load(pk, RamPage(rp), &self.rc),
                LoadEnd::Loaded
            );
            let slot = self.st.slot(self.fk, self.vma_id(), blk, PS).unwrap();
            self.st.set_mapped(self.fk, self.vk, slot.index);
            pk
        }
    }

    #[test]
    fn a_load_counts_against_the_budget_and_ends_on_the_lru() {
        let mut f = fixture();
        let pk = f.st.begin_load(f.fk, 11, Ticket::mine());
        assert_eq!(f.st.lookup(f.fk, 11), Some(pk));
        assert_eq!(f.st.budget().resident(), 1);
        assert!(f.st.pages().any_loading() && !f.st.lru().contains(pk));
        f.st.finish_load(pk, RamPage(0), &f.rc);
        assert!(f.st.lru().contains(pk));
        let s = f.fh.snapshot();
        assert_eq!((s.loads, s.resident_pages), (1, 1));
        assert_eq!(f.rc.snapshot().loads, 1, "counted for the RAM too");
    }

    #[test]
    fn dirty_pages_leave_the_lru_and_come_back_clean() {
        let mut f = fixture();
        let pk = f.resident(12, 0);
        f.st.mark_dirty(pk, &f.rc);
        f.st.mark_dirty(pk, &f.rc); // already dirty: counted once
        assert!(!f.st.lru().contains(pk));
        assert_eq!(f.st.dirty_pages(f.fk), [(12, pk)]);
        assert_eq!(f.fh.snapshot().dirty_pages, 1);
        f.st.mark_clean(pk, &f.rc);
        assert!(f.st.lru().contains(pk));
        assert!(f.st.dirty_pages(f.fk).is_empty());
        assert_eq!(f.fh.snapshot().dirty_pages, 0);
    }

    #[test]
    fn detach_hands_back_the_slots_and_the_memory() {
        let mut f = fixture();
        let pk = f.resident(13, 7);
        f.st.mark_dirty(pk, &f.rc);
        let mut slots = Vec::new();
        let d = f.st.detach(pk, &f.rc, Unmap::Deferred, &mut slots);
        assert_eq!(
            d,
            Detached {
                fileh: f.fk,
                blk: 13,
                ram_page: Some(RamPage(7))
            }
        );
        assert_eq!(slots.len(), 1);
        assert_eq!(
            (slots[0].index, slots[0].addr.as_ptr() as usize),
            (3, 0x7000_0000_0000 + 3 * PS)
        );
        assert_eq!(f.st.lookup(f.fk, 13), None);
        assert!(
            f.st.block_unmapping(f.fk, 13),
            "deferred: marked until unmapped"
        );
        f.st.slot_unmapped(&slots[0]);
        assert!(!f.st.block_unmapping(f.fk, 13));
        let s = f.fh.snapshot();
        assert_eq!(
            (s.dirty_pages, s.resident_pages, f.st.budget().resident()),
            (0, 0, 0)
        );
    }

    #[test]
    fn reclaim_takes_the_oldest_clean_page_and_batches_become_spares() {
        let mut f = fixture();
        let a = f.resident(10, 0);
        let b = f.resident(11, 1);
        f.st.touch(a); // b is now the oldest
        let mut slots = Vec::new();
        let d = f.st.reclaim_oldest(&f.rc, Unmap::Now, &mut slots).unwrap();
        assert_eq!(d.ram_page, Some(RamPage(1)));
        assert_eq!(f.st.lookup(f.fk, 11), None);
        assert_eq!(f.fh.snapshot().reclaims, 1);
        // The next oldest (a) becomes a spare of the handle: still
        // counted, usable once unmapped.
        let rp = f.st.spare_from_lru(f.fk, &f.rc, &mut slots).unwrap();
        assert_eq!(rp, RamPage(0));
        assert_eq!(f.st.budget().resident(), 1);
        assert_eq!(f.st.take_spare(f.fk, &f.rc), None, "not unmapped yet");
        f.st.spare_unmapped(f.fk, rp);
        assert_eq!(f.st.take_spare(f.fk, &f.rc), Some(rp));
        assert!(f.st.reclaim_oldest(&f.rc, Unmap::Now, &mut slots).is_none());
        let _ = b;
    }

    #[test]
    fn drop_behind_demotes_the_block_before_in_a_sequential_mapping() {
        let mut f = fixture();
        let a = f.resident(10, 0);
        let b = f.resident(11, 1);
        let id = f.vma_id();
        assert!(!f.st.drop_behind(f.fk, id, 13, true, &f.rc), "not advised");
        assert_eq!(f.st.lru().oldest(), Some(a));
        f.st.vma_mut(f.fk, f.vk).set_advice(Advice::Sequential);
        assert!(f.st.drop_behind(f.fk, id, 12, true, &f.rc));
        assert_eq!(f.st.lru().oldest(), Some(b));
        let gone = VmaId {
            key: f.vk,
            start: 1,
        };
        assert!(
            !f.st.drop_behind(f.fk, gone, 11, true, &f.rc),
            "another mapping now"
        );
        assert_eq!(f.fh.snapshot().streams, 0, "advised: no stream detected");
    }

    #[test]
    fn a_stream_detected_under_normal_advice_drops_behind_until_it_stops() {
        let mut f = fixture();
        let a = f.resident(10, 0);
        let b = f.resident(11, 1);
        let id = f.vma_id();
        assert!(
            !f.st.drop_behind(f.fk, id, 13, true, &f.rc),
            "a first fault"
        );
        assert!(!f.st.drop_behind(f.fk, id, 11, true, &f.rc), "backward");
        assert_eq!(f.st.lru().oldest(), Some(a), "nothing demoted");
        assert!(f.st.drop_behind(f.fk, id, 12, true, &f.rc), "right after");
        assert_eq!(f.st.lru().oldest(), Some(b), "block 11 dropped behind");
        assert!(f.st.drop_behind(f.fk, id, 12, false, &f.rc), "not noted");
        assert!(f.st.drop_behind(f.fk, id, 13, true, &f.rc));
        assert!(!f.st.drop_behind(f.fk, id, 10, true, &f.rc), "a jump");
        assert_eq!((f.fh.snapshot().streams, f.rc.snapshot().streams), (1, 1));
        // Random advice turns detection off.
        f.st.vma_mut(f.fk, f.vk).set_advice(Advice::Random);
        f.st.touch(a);
        f.st.touch(b);
        assert!(!f.st.drop_behind(f.fk, id, 11, true, &f.rc));
        assert!(!f.st.drop_behind(f.fk, id, 12, true, &f.rc));
        assert_eq!(f.st.lru().oldest(), Some(a), "nothing demoted");
        assert_eq!(f.fh.snapshot().streams, 1);
    }

    #[test]
    fn a_writeout_is_a_ticket_of_the_handle() {
        let mut f = fixture();
        let t = Ticket::mine();
        f.st.begin_writeout(f.fk, t.clone());
        assert!(Arc::ptr_eq(f.st.writeout(f.fk).unwrap(), &t));
        assert!(Arc::ptr_eq(&f.st.end_writeout(f.fk).unwrap(), &t));
        assert!(f.st.writeout(f.fk).is_none());
    }
}
