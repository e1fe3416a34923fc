//! The state behind one RAM's lock: pages, file handles, mappings, the LRU.
//!
//! Every file handle and mapping that uses a RAM keeps its mutable state here,
//! under the RAM's one mutex, so reclaim can walk pages of all handles in LRU
//! order. `loadblk` and `storeblk` never run while the mutex is held.

use std::collections::{BTreeSet, HashMap};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::ThreadId;

use bigfile_ram::{PageMap, Prot, RamHandle};
use bitvec::vec::BitVec;
use slab::Slab;

use crate::spares::Spare;
use crate::stats::{CountPair, Counter, Counters};
use crate::sys;
use crate::vma::Advice;

/// A page's state; a page absent from its handle's page map is EMPTY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// `loadblk` is filling it; it is mapped nowhere yet.
    Loading,
    /// Invalidated while loading: the loader drops its result.
    LoadingInvalidated,
    /// Holds the file's data; mapped read-only; on the LRU list.
    Loaded,
    /// Changed in memory; on the handle's dirty list; never reclaimed.
    Dirty,
}

/// The result of one load, shared by the loader and the threads waiting for it.
#[derive(Debug)]
pub(crate) struct LoadTicket {
    pub(crate) loader: ThreadId,
    /// Set once by the loader: `Err` carries the diagnostic of a failed load.
    pub(crate) outcome: OnceLock<Result<(), Arc<str>>>,
}

#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) fileh: usize,
    pub(crate) blk: u64,
    pub(crate) state: PageState,
    /// The RAM page index in the handle's RAM file; `None` while loading.
    pub(crate) ram_page: Option<u64>,
    pub(crate) ticket: Option<Arc<LoadTicket>>,
    lru_prev: Option<usize>,
    lru_next: Option<usize>,
    in_lru: bool,
}

#[derive(Debug)]
pub(crate) struct VmaState {
    pub(crate) start: NonNull<u8>,
    pub(crate) pgoffset: u64,
    pub(crate) pglen: u64,
    /// Which pages of the mapping have a RAM page mapped (vs. the PROT_NONE reservation).
    pub(crate) mapped: BitVec,
    /// Pages reclaim detached and whose reclaimer is unmapping them outside
    /// the lock ([`Deferred`]): nothing may be mapped there, and the mapping
    /// may not go away, until the mark is cleared.
    pub(crate) unmapping: BitVec,
    /// The mapping's access pattern, given by `Vma::advise`.
    pub(crate) advice: Advice,
}

// SAFETY: `start` is only an address of a reservation owned by the Vma; it is
// dereferenced by no one through this struct, only passed to mmap/mprotect.
unsafe impl Send for VmaState {}

pub(crate) struct FileHState {
    pub(crate) ramh: Arc<RamHandle>,
    pub(crate) pages: PageMap<usize>,
    /// Dirty blocks, ascending: the order writeout stores them in.
    pub(crate) dirty: BTreeSet<u64>,
    pub(crate) vmas: Slab<VmaState>,
    /// The thread running a writeout of this handle, if any.
    pub(crate) writeout: Option<ThreadId>,
    pub(crate) counters: Arc<Counters>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) pages: Slab<Page>,
    pub(crate) filehs: Slab<FileHState>,
    lru_head: Option<usize>,
    lru_tail: Option<usize>,
    /// Pages holding or about to hold memory, counted against the budget.
    pub(crate) resident: u64,
    /// Threads waiting, each for one other thread: the loader of a page it
    /// needs, or the thread running a writeout it must wait out. Consulted
    /// before every such wait so that a cycle (two loaders each touching the
    /// other's page) fails at once instead of hanging.
    pub(crate) waiting_for: HashMap<ThreadId, Awaited>,
    /// RAM pages reclaimed ahead of need, counted in `resident` (see `spares`).
    pub(crate) spares: Vec<Spare>,
    /// Threads in [`Shared::wait`]: notifications are skipped when none.
    waiters: u32,
}

/// What a waiting thread waits for (see `State::waiting_for`). Kept as the
/// thing awaited, not just the thread, so an edge is followed only while
/// the wait is real: a load finished or a writeout ended meanwhile leaves
/// an entry its waiter has not yet woken to remove.
#[derive(Debug)]
pub(crate) enum Awaited {
    /// The load behind this ticket.
    Load(Arc<LoadTicket>),
    /// The writeout of handle `fk` run by thread `writer`.
    Writeout { fk: usize, writer: ThreadId },
}

/// One RAM as virtmem sees it: the page source, its budget, its lock.
pub(crate) struct Shared {
    pub(crate) ram: bigfile_ram::Ram,
    pub(crate) state: Mutex<State>,
    /// Signalled when a load finishes or a writeout ends.
    pub(crate) cond: Condvar,
    pub(crate) counters: Counters,
    pub(crate) budget_pages: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Take the lock. A panic while it was held leaves state that is still
    /// structurally valid (every step keeps the maps consistent), so poisoning
    /// is ignored rather than turned into a crash inside a page fault.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait on the condition variable, counted in `State::waiters`.
    pub(crate) fn wait<'a>(&self, mut guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        guard.waiters += 1;
        let mut guard = self.cond.wait(guard).unwrap_or_else(|p| p.into_inner());
        guard.waiters -= 1;
        guard
    }

    /// Wake every waiter, if any; `st` is the state just changed, still
    /// locked. (The standard condition variable makes a system call for
    /// every notification, waiters or not: two per fault otherwise.)
    pub(crate) fn notify(&self, st: &State) {
        if st.waiters > 0 {
            self.cond.notify_all();
        }
    }

    pub(crate) fn page_size(&self) -> usize {
        self.ram.page_size()
    }

    pub(crate) fn budget_pages(&self) -> u64 {
        self.budget_pages.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl State {
    pub(crate) fn new_page(&mut self, fileh: usize, blk: u64, ticket: Arc<LoadTicket>) -> usize {
        self.resident += 1;
        self.pages.insert(Page {
            fileh,
            blk,
            state: PageState::Loading,
            ram_page: None,
            ticket: Some(ticket),
            lru_prev: None,
            lru_next: None,
            in_lru: false,
        })
    }

    pub(crate) fn lru_push_back(&mut self, pk: usize) {
        debug_assert!(!self.pages[pk].in_lru);
        let tail = self.lru_tail;
        {
            let p = &mut self.pages[pk];
            p.lru_prev = tail;
            p.lru_next = None;
            p.in_lru = true;
        }
        match tail {
            Some(t) => self.pages[t].lru_next = Some(pk),
            None => self.lru_head = Some(pk),
        }
        self.lru_tail = Some(pk);
    }

    pub(crate) fn lru_remove(&mut self, pk: usize) {
        if !self.pages[pk].in_lru {
            return;
        }
        let (prev, next) = {
            let p = &mut self.pages[pk];
            p.in_lru = false;
            (p.lru_prev.take(), p.lru_next.take())
        };
        match prev {
            Some(pr) => self.pages[pr].lru_next = next,
            None => self.lru_head = next,
        }
        match next {
            Some(nx) => self.pages[nx].lru_prev = prev,
            None => self.lru_tail = prev,
        }
    }

    /// Mark a page most recently used.
    pub(crate) fn lru_touch(&mut self, pk: usize) {
        if self.pages[pk].in_lru && self.lru_tail != Some(pk) {
            self.lru_remove(pk);
            self.lru_push_back(pk);
        }
    }

    /// Make a page the first to be reclaimed.
    pub(crate) fn lru_demote(&mut self, pk: usize) {
        if self.pages[pk].in_lru && self.lru_head != Some(pk) {
            self.lru_remove(pk);
            let head = self.lru_head;
            {
                let p = &mut self.pages[pk];
                p.lru_prev = None;
                p.lru_next = head;
                p.in_lru = true;
            }
            match head {
                Some(h) => self.pages[h].lru_prev = Some(pk),
                None => self.lru_tail = Some(pk),
            }
            self.lru_head = Some(pk);
        }
    }

    /// Drop-behind for a mapping advised [`Advice::Sequential`]: with
    /// `demote`, a fault on block `blk` there makes the clean page of block
    /// `blk - 1` (if resident) the first to be reclaimed. Returns whether the
    /// mapping is advised sequential.
    pub(crate) fn drop_behind(
        &mut self,
        fk: usize,
        (vk, vma_start): (usize, usize),
        blk: u64,
        demote: bool,
    ) -> bool {
        let fh = &self.filehs[fk];
        let Some(vma) = fh
            .vmas
            .get(vk)
            .filter(|v| v.start.as_ptr() as usize == vma_start)
        else {
            return false;
        };
        if vma.advice != Advice::Sequential {
            return false;
        }
        if demote && blk > vma.pgoffset {
            if let Some(&pk) = fh.pages.get(blk - 1) {
                // Only clean pages are on the LRU list: a dirty one stays put.
                self.lru_demote(pk);
            }
        }
        true
    }

    pub(crate) fn lru_oldest(&self) -> Option<usize> {
        self.lru_head
    }

    /// Number of pages on the LRU list (clean, reclaimable).
    pub(crate) fn lru_len(&self) -> u64 {
        let mut n = 0;
        let mut cur = self.lru_head;
        while let Some(pk) = cur {
            n += 1;
            cur = self.pages[pk].lru_next;
        }
        n
    }

    /// Set the protection of block `blk` of handle `fk` in every mapping where
    /// it is mapped; stops at the first failure.
    pub(crate) fn protect_everywhere(
        &self,
        fk: usize,
        blk: u64,
        prot: libc::c_int,
        page_size: usize,
    ) -> std::io::Result<()> {
        let fh = &self.filehs[fk];
        for (_, vma) in fh.vmas.iter() {
            if let Some(idx) = vma.index_of(blk) {
                if vma.mapped[idx] {
                    let addr = vma.page_addr(idx, page_size);
                    // SAFETY: the page lies inside the mapping's reservation,
                    // owned by its Vma, which stays alive while its state is here.
                    unsafe { sys::mprotect(addr, page_size, prot) }?;
                }
            }
        }
        Ok(())
    }

    /// Drop a resident page (clean or dirty): unmap it from every mapping,
    /// give its memory back, forget it.
    pub(crate) fn forget_page(&mut self, pk: usize, page_size: usize, ram_counters: &Counters) {
        let (fk, ram_page) = self.detach_page(pk, page_size, ram_counters, None);
        if let Some(rp) = ram_page {
            // A failed hole punch keeps the page for the handle's next
            // allocation (bigfile-ram's stray list): nothing to do here.
            let _ = self.filehs[fk].ramh.drop_page(rp);
        }
    }

    /// Forget a page as `forget_page` does but keep its RAM page, returned
    /// with the handle it belongs to, for the caller to reuse or drop. With
    /// `defer`, the unmapping is left to the caller (see [`Deferred`]).
    pub(crate) fn detach_page(
        &mut self,
        pk: usize,
        page_size: usize,
        ram_counters: &Counters,
        mut defer: Option<&mut Deferred>,
    ) -> (usize, Option<u64>) {
        self.lru_remove(pk);
        let page = self.pages.remove(pk);
        self.resident -= 1;
        let fh = &mut self.filehs[page.fileh];
        fh.pages.remove(page.blk);
        let counts = CountPair {
            fileh: &fh.counters,
            ram: ram_counters,
        };
        if page.state == PageState::Dirty && fh.dirty.remove(&page.blk) {
            counts.sub(Counter::Dirty, 1);
        }
        for (vk, vma) in fh.vmas.iter_mut() {
            if let Some(idx) = vma.index_of(page.blk) {
                if vma.mapped[idx] {
                    let addr = vma.page_addr(idx, page_size);
                    vma.mapped.set(idx, false);
                    if let Some(d) = defer.as_deref_mut() {
                        vma.unmapping.set(idx, true);
                        d.unmaps.push((page.fileh, vk, idx, addr));
                        continue;
                    }
                    // SAFETY: the page lies inside the mapping's own reservation;
                    // the data in it is dropped on purpose (reclaim, discard,
                    // invalidate): later accesses fault and reload.
                    unsafe { revoke_slot(addr, page_size) };
                }
            }
        }
        if page.ram_page.is_some() {
            counts.sub(Counter::Resident, 1);
        }
        (page.fileh, page.ram_page)
    }

    /// Reclaim the least recently used clean page. If it belongs to handle
    /// `recycle_for`, its RAM page is kept and returned for reuse (saving a
    /// hole punch now and an allocation and zeroing on the next load);
    /// otherwise its memory goes back to the OS. `None` when no page is clean.
    /// With `defer`, unmapping it and giving its memory back are left to the
    /// caller, to do without the lock (a returned RAM page is then still
    /// mapped until [`Deferred::finish`]).
    pub(crate) fn reclaim_lru(
        &mut self,
        page_size: usize,
        ram_counters: &Counters,
        recycle_for: Option<usize>,
        mut defer: Option<&mut Deferred>,
    ) -> Option<Option<u64>> {
        let pk = self.lru_oldest()?;
        let (fk, ram_page) = self.detach_page(pk, page_size, ram_counters, defer.as_deref_mut());
        CountPair {
            fileh: &self.filehs[fk].counters,
            ram: ram_counters,
        }
        .add(Counter::Reclaims, 1);
        match ram_page {
            Some(rp) if recycle_for == Some(fk) => Some(Some(rp)),
            Some(rp) => {
                match defer {
                    Some(d) => d.drops.push((self.filehs[fk].ramh.clone(), rp)),
                    None => {
                        // On failure the RAM keeps it for its next allocation.
                        let _ = self.filehs[fk].ramh.drop_page(rp);
                    }
                }
                Some(None)
            }
            None => Some(None),
        }
    }

    /// Give back the memory of one clean page: a spare first, else the
    /// least recently used page. Returns false when there is none.
    pub(crate) fn reclaim_one(&mut self, page_size: usize, ram_counters: &Counters) -> bool {
        self.drop_spare(ram_counters, None)
            || self
                .reclaim_lru(page_size, ram_counters, None, None)
                .is_some()
    }

    /// Map block `blk`'s RAM page into mapping `vk` of handle `fk` with `prot`.
    ///
    /// If the mapping is gone (a loader dropped it while this fault was being
    /// served), nothing is mapped: the access is retried, finds the address
    /// unmapped and ends as any access to unmapped memory does.
    ///
    /// Returns the address of the page when it was newly mapped: the caller
    /// populates its page-table entries after dropping the RAM lock
    /// ([`sys::populate`] is advisory and changes no data, so it needs no
    /// lock, and holding the lock over it would serialise every fault).
    pub(crate) fn map_into(
        &mut self,
        fk: usize,
        (vk, vma_start): (usize, usize),
        blk: u64,
        ram_page: u64,
        prot: Prot,
        page_size: usize,
    ) -> crate::Result<Option<NonNull<u8>>> {
        let fh = &mut self.filehs[fk];
        let Some(vma) = fh
            .vmas
            .get_mut(vk)
            .filter(|v| v.start.as_ptr() as usize == vma_start)
        else {
            return Ok(None);
        };
        let idx = vma
            .index_of(blk)
            .expect("block inside the faulting mapping");
        let addr = vma.page_addr(idx, page_size);
        if vma.mapped[idx] {
            let prot = match prot {
                Prot::None => libc::PROT_NONE,
                Prot::Read => libc::PROT_READ,
                Prot::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
            };
            // SAFETY: the page is inside this mapping's reservation.
            unsafe { sys::mprotect(addr, page_size, prot) }.map_err(|source| crate::Error::Os {
                op: "mprotect",
                source,
            })?;
        } else {
            // SAFETY: `addr` is a page of this mapping's own reservation,
            // currently PROT_NONE with nothing behind it; replacing it with
            // the RAM page is exactly what the reservation is for.
            unsafe { fh.ramh.map_page_fixed(ram_page, addr, prot)? };
            vma.mapped.set(idx, true);
            return Ok(Some(addr));
        }
        Ok(None)
    }
}

/// Take a dropped page away from the mapping slot at `addr`: put the
/// reservation back or, when the kernel cannot (ENOMEM), make the page
/// inaccessible. Either way the next access faults and maps the slot
/// afresh. The page must not stay accessible, its RAM being freed or given
/// to another block next: if both fail (both may need the same split of a
/// kernel mapping, refused at the process's mapping limit), abort.
///
/// # Safety
/// `addr..addr + len` is a page slot of a live mapping's reservation whose
/// data is dropped on purpose.
unsafe fn revoke_slot(addr: NonNull<u8>, len: usize) {
    // SAFETY: forwarded to the caller.
    let res = unsafe { sys::unmap_to_reserved(addr, len) }
        // SAFETY: as above.
        .or_else(|_| unsafe { sys::mprotect(addr, len, libc::PROT_NONE) });
    if let Err(e) = res {
        // Left accessible, the slot would show whatever block its RAM page
        // holds next (or a zero page taken behind the budget's back): no
        // way to go on without handing out wrong data.
        eprintln!(
            "bigfile: cannot take a dropped page away from its mapping at {addr:p} ({e}); \
             aborting rather than let it show another block's data"
        );
        std::process::abort();
    }
}

/// The slow part of reclaim, done by the reclaiming thread after it drops
/// the RAM lock: replacing the reclaimed pages' mappings with the
/// reservation (hundreds of page-table entries for a large page) and
/// punching their memory out. Under the lock this was a third of a fault and
/// serialised every faulting thread.
///
/// Until [`finish`](Deferred::finish) clears them, the slots stay marked in
/// [`VmaState::unmapping`]: a fault there waits rather than map over a
/// pending unmap, and dropping the mapping waits rather than free a range
/// that is about to be mapped over, and `FileH::invalidate_page` waits for
/// it. Meanwhile the old mapping still shows the reclaimed block's (clean,
/// read-only) data, which is right until the block is invalidated.
#[derive(Default)]
pub(crate) struct Deferred {
    /// (handle, mapping, index in the mapping, address) of each slot.
    unmaps: Vec<(usize, usize, usize, NonNull<u8>)>,
    /// RAM pages to punch out once unmapped.
    pub(crate) drops: Vec<(Arc<RamHandle>, u64)>,
    /// Spares (handle, RAM page) to mark ready once unmapped.
    pub(crate) spares: Vec<(usize, u64)>,
}

impl Deferred {
    pub(crate) fn is_empty(&self) -> bool {
        self.unmaps.is_empty() && self.drops.is_empty() && self.spares.is_empty()
    }

    /// Do the work. Must be called, without the lock held, on every path
    /// after a reclaim that was given this `Deferred`.
    pub(crate) fn finish(mut self, shared: &Shared) {
        let ps = shared.page_size();
        // Adjacent slots of one mapping (a batch of a scan's oldest blocks)
        // are unmapped by one call: one mmap_lock hold, one TLB shootdown.
        self.unmaps
            .sort_unstable_by_key(|&(fk, vk, idx, _)| (fk, vk, idx));
        let mut i = 0;
        while i < self.unmaps.len() {
            let (fk, vk, first, addr) = self.unmaps[i];
            let mut n = 1;
            while self
                .unmaps
                .get(i + n)
                .is_some_and(|&(f, v, idx, _)| (f, v) == (fk, vk) && idx == first + n)
            {
                n += 1;
            }
            // SAFETY: the slots lie inside one mapping's reservation; the
            // mapping cannot be dropped (nor the slots mapped anew) while
            // they are marked unmapping, and the pages' data is dropped on
            // purpose (they are clean: reclaim takes clean pages only).
            unsafe { revoke_slot(addr, n * ps) };
            i += n;
        }
        for (ramh, rp) in &self.drops {
            // On failure the RAM keeps it for its next allocation.
            let _ = ramh.drop_page(*rp);
        }
        if !self.unmaps.is_empty() || !self.spares.is_empty() {
            let mut st = shared.lock();
            for &(fk, vk, idx, _) in &self.unmaps {
                st.filehs[fk].vmas[vk].unmapping.set(idx, false);
            }
            for &(fk, rp) in &self.spares {
                st.spare_unmapped(fk, rp);
            }
            shared.notify(&st);
        }
    }
}

impl State {
    /// If `me` waiting for `other` would close a cycle of waits, the cycle,
    /// described for a diagnostic.
    pub(crate) fn would_deadlock(&self, me: ThreadId, other: ThreadId) -> Option<String> {
        let mut chain = vec![me, other];
        let mut cur = other;
        while cur != me {
            cur = self.awaited_thread(cur)?;
            if chain.len() > self.waiting_for.len() + 2 {
                // Not through `me`: a cycle of others, which is theirs to find.
                return None;
            }
            chain.push(cur);
        }
        Some(
            chain
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(" waits for "),
        )
    }

    /// The thread `t` is waiting for, if it is waiting and its wait is
    /// still live.
    fn awaited_thread(&self, t: ThreadId) -> Option<ThreadId> {
        match self.waiting_for.get(&t)? {
            Awaited::Load(ticket) => ticket.outcome.get().is_none().then_some(ticket.loader),
            Awaited::Writeout { fk, writer } => {
                (self.filehs.get(*fk)?.writeout == Some(*writer)).then_some(*writer)
            }
        }
    }

    /// Whether a reclaimer is still unmapping block `blk` of handle `fk`
    /// from one of its mappings (see [`Deferred`]).
    pub(crate) fn block_unmapping(&self, fk: usize, blk: u64) -> bool {
        self.filehs[fk]
            .vmas
            .iter()
            .any(|(_, v)| v.index_of(blk).is_some_and(|idx| v.unmapping[idx]))
    }

    /// Whether a thread finding the budget full may wait for loads in
    /// progress (a loaded page is clean and can be reclaimed): some page is
    /// loading, and the thread is not itself inside a `loadblk` or
    /// `storeblk` (of any RAM): the thread it would wait for may be waiting
    /// for that load or writeout.
    pub(crate) fn may_wait_for_loads(&self) -> bool {
        !crate::serve::in_callback()
            && self
                .pages
                .iter()
                .any(|(_, p)| matches!(p.state, PageState::Loading | PageState::LoadingInvalidated))
    }

    /// Whether block `blk`'s slot in mapping `vma` (key, start) of handle
    /// `fk` is being unmapped by a reclaimer ([`Deferred`]).
    pub(crate) fn slot_unmapping(
        &self,
        fk: usize,
        (vk, vma_start): (usize, usize),
        blk: u64,
    ) -> bool {
        self.filehs[fk]
            .vmas
            .get(vk)
            .filter(|v| v.start.as_ptr() as usize == vma_start)
            .and_then(|v| v.index_of(blk).map(|idx| v.unmapping[idx]))
            .unwrap_or(false)
    }
}

impl VmaState {
    /// Index inside this mapping of file block `blk`, if the mapping covers it.
    pub(crate) fn index_of(&self, blk: u64) -> Option<usize> {
        if blk >= self.pgoffset && blk - self.pgoffset < self.pglen {
            usize::try_from(blk - self.pgoffset).ok()
        } else {
            None
        }
    }

    pub(crate) fn page_addr(&self, idx: usize, page_size: usize) -> NonNull<u8> {
        // SAFETY: idx < pglen, so the offset stays inside the reservation.
        unsafe { self.start.add(idx * page_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket() -> Arc<LoadTicket> {
        Arc::new(LoadTicket {
            loader: std::thread::current().id(),
            outcome: OnceLock::new(),
        })
    }

    fn lru_order(st: &State) -> Vec<usize> {
        let mut v = Vec::new();
        let mut cur = st.lru_head;
        while let Some(pk) = cur {
            v.push(pk);
            cur = st.pages[pk].lru_next;
        }
        v
    }

    #[test]
    fn lru_push_touch_remove_keep_order_and_links() {
        let mut st = State::default();
        let pks: Vec<usize> = (0..4).map(|b| st.new_page(0, b, ticket())).collect();
        assert_eq!(st.resident, 4);
        for &pk in &pks {
            st.lru_push_back(pk);
        }
        assert_eq!(lru_order(&st), pks);
        st.lru_touch(pks[0]);
        assert_eq!(lru_order(&st), [pks[1], pks[2], pks[3], pks[0]]);
        st.lru_remove(pks[2]);
        st.lru_remove(pks[2]); // not on the list any more: no effect
        assert_eq!(lru_order(&st), [pks[1], pks[3], pks[0]]);
        assert_eq!(st.lru_len(), 3);
        assert_eq!(st.lru_oldest(), Some(pks[1]));
        st.lru_remove(pks[1]);
        st.lru_remove(pks[0]);
        st.lru_remove(pks[3]);
        assert_eq!(st.lru_oldest(), None);
        assert_eq!(st.lru_tail, None);
        // touching a page that is not on the list (dirty) does not add it
        st.lru_touch(pks[1]);
        assert_eq!(st.lru_len(), 0);
    }

    #[test]
    fn lru_demote_makes_a_page_oldest_and_keeps_links() {
        let mut st = State::default();
        let pks: Vec<usize> = (0..4).map(|b| st.new_page(0, b, ticket())).collect();
        for &pk in &pks {
            st.lru_push_back(pk);
        }
        st.lru_demote(pks[2]);
        assert_eq!(lru_order(&st), [pks[2], pks[0], pks[1], pks[3]]);
        st.lru_demote(pks[2]); // already oldest
        assert_eq!(lru_order(&st), [pks[2], pks[0], pks[1], pks[3]]);
        st.lru_demote(pks[3]); // the newest: the tail moves back
        assert_eq!(lru_order(&st), [pks[3], pks[2], pks[0], pks[1]]);
        assert_eq!(st.lru_tail, Some(pks[1]));
        // backward links agree with the forward order
        let mut back = Vec::new();
        let mut cur = st.lru_tail;
        while let Some(pk) = cur {
            back.push(pk);
            cur = st.pages[pk].lru_prev;
        }
        assert_eq!(back, [pks[1], pks[0], pks[2], pks[3]]);
        // a page off the list (dirty) is not put on it
        st.lru_remove(pks[0]);
        st.lru_demote(pks[0]);
        assert_eq!(lru_order(&st), [pks[3], pks[2], pks[1]]);
        // the only page on the list
        for pk in [pks[3], pks[2]] {
            st.lru_remove(pk);
        }
        st.lru_demote(pks[1]);
        assert_eq!(lru_order(&st), [pks[1]]);
        assert_eq!(st.lru_tail, Some(pks[1]));
    }

    #[test]
    fn vma_index_of_covers_exactly_its_range() {
        let v = VmaState {
            start: NonNull::dangling(),
            pgoffset: 10,
            pglen: 3,
            mapped: BitVec::repeat(false, 3),
            unmapping: BitVec::repeat(false, 3),
            advice: Advice::Normal,
        };
        assert_eq!(v.index_of(9), None);
        assert_eq!(v.index_of(10), Some(0));
        assert_eq!(v.index_of(12), Some(2));
        assert_eq!(v.index_of(13), None);
        let top = VmaState {
            start: NonNull::dangling(),
            pgoffset: u64::MAX - 1,
            pglen: 1,
            mapped: BitVec::repeat(false, 1),
            unmapping: BitVec::repeat(false, 1),
            advice: Advice::Normal,
        };
        assert_eq!(top.index_of(u64::MAX), None);
        assert_eq!(top.index_of(u64::MAX - 1), Some(0));
    }
}
