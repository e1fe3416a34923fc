//! Every OS call virtmem makes on its mappings, in one place: reserving and
//! releasing a mapping's address range, mapping a RAM page into a slot,
//! changing protections, taking dropped pages away (now, or deferred until
//! the lock is dropped), giving RAM pages back, and populating page tables.
//! The bookkeeping (`state.rs` and its parts) decides; the mapper does.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use bigfile_os::Prot;
use bigfile_ram::{RamError, RamHandle};
use bigfile_uffd::Uffd;

use crate::keys::{FileKey, PageKey, RamPage, Slot, VmaId};
use crate::poison;
use crate::shared::Shared;
use crate::state::{State, Unmap};
use crate::stats::Counters;
use crate::sys;

/// The OS side of one RAM's mappings. On the signal backend a mapping is a
/// reservation with each loaded page mapped over its slot (its RAM page,
/// wherever in the handle's memory file), read-only until written; on the
/// userfaultfd backend a mapping maps the handle's memory file linearly
/// (block `b` is file page `b`) and is registered with the userfaultfd, a
/// page is made present in a slot by `UFFDIO_CONTINUE` and kept clean by
/// write-protection, and dropping it from the file takes it away from every
/// mapping at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mapper {
    page_size: usize,
    uffd: Option<&'static Uffd>,
}

/// Why a page could not be mapped into its slot.
#[derive(Debug)]
pub(crate) enum MapError {
    /// Mapping the RAM page (bigfile-ram's mmap) failed.
    Map(RamError),
    /// Changing the protection of the mapped page failed.
    Protect(io::Error),
    /// The userfaultfd's `op` (`UFFDIO_CONTINUE`, `UFFDIO_WRITEPROTECT`)
    /// failed.
    Uffd(&'static str, io::Error),
}

impl Mapper {
    pub(crate) fn of(shared: &Shared) -> Mapper {
        Mapper {
            page_size: shared.page_size(),
            uffd: shared.backend().uffd(),
        }
    }

    /// Whether pages are at their block's place in the handle's memory file
    /// (the userfaultfd backend): a RAM page cannot be reused for another
    /// block, and each block's page is allocated at its own index.
    pub(crate) fn pages_in_place(&self) -> bool {
        self.uffd.is_some()
    }

    /// On the userfaultfd backend, map `pages` pages of `ramh`'s memory file
    /// from page `pgoffset` over the reservation at `start`, read-write
    /// (faults are the userfaultfd's to report); nothing on the signal
    /// backend.
    ///
    /// # Safety
    /// `start` and `pages` are those of a reservation made by
    /// [`Mapper::reserve`] that nothing uses yet.
    pub(crate) unsafe fn map_file(
        &self,
        start: NonNull<u8>,
        pages: usize,
        ramh: &RamHandle,
        pgoffset: u64,
    ) -> io::Result<()> {
        if self.uffd.is_none() {
            return Ok(());
        }
        if pgoffset
            .checked_add(pages as u64)
            .is_none_or(|end| end > ramh.max_pages())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "pages {pgoffset}..+{pages} are beyond the RAM handle's capacity of {} pages",
                    ramh.max_pages()
                ),
            ));
        }
        let offset = pgoffset * self.page_size as u64;
        // SAFETY: forwarded to the caller; the memory file is the handle's.
        unsafe {
            sys::map_shared_fixed(start, pages * self.page_size, ramh.fd().as_raw_fd(), offset)
        }
    }

    /// Reserve the address range of a mapping of `pages` pages:
    /// inaccessible, backed by nothing, aligned to the page size.
    pub(crate) fn reserve(&self, pages: usize) -> io::Result<NonNull<u8>> {
        let len = pages * self.page_size;
        sys::reserve(len, self.page_size)
    }

    /// Bytes of `pages` pages.
    pub(crate) fn len_of(&self, pages: usize) -> usize {
        pages * self.page_size
    }

    /// Give back a mapping's whole range.
    ///
    /// # Safety
    /// `start` and `pages` are those of a reservation that nothing uses any
    /// more (nothing registered for it, no slot being unmapped in it).
    pub(crate) unsafe fn release_range(&self, start: NonNull<u8>, pages: usize) {
        // SAFETY: forwarded to the caller.
        let res = unsafe { sys::unmap(start, pages * self.page_size) };
        debug_assert!(res.is_ok(), "munmap: {res:?}");
    }

    /// Replace a whole mapping's range by zero-filled memory of its own
    /// (the mapping's pages dropped), keeping the addresses taken: one
    /// `mmap`, so no other mapping can take them meanwhile. When the kernel
    /// refuses (ENOMEM), the range is made inaccessible instead; if that
    /// fails too, abort rather than leave dropped pages readable (their RAM
    /// may hold another block next).
    ///
    /// # Safety
    /// `start` and `pages` are those of a reservation that nothing uses any
    /// more (nothing registered for it, no slot being unmapped in it).
    pub(crate) unsafe fn replace_with_zeros(&self, start: NonNull<u8>, pages: usize) {
        let len = pages * self.page_size;
        // SAFETY: forwarded to the caller.
        let res = unsafe { sys::map_zeros(start, len) }
            // SAFETY: as above.
            .or_else(|_| unsafe { sys::mprotect(start, len, Prot::None.bits()) });
        taken_away_or_abort(res, start, "the pages of a closed mapping");
    }

    /// Put the reservation back over a whole mapping's range, whatever
    /// pages are mapped in it (a forked child's, which are its parent's).
    /// A range that stays accessible would show the parent's memory: if
    /// the kernel refuses, abort.
    ///
    /// # Safety
    /// `start` and `pages` are a mapping's range, whose pages are dropped
    /// on purpose.
    pub(crate) unsafe fn reserve_again(&self, start: NonNull<u8>, pages: usize) {
        // SAFETY: forwarded to the caller.
        unsafe { self.revoke(start, pages) };
    }

    /// Make block `blk`'s RAM page `ram_page` visible in mapping `vma` of
    /// handle `fk` with `prot`: replace the slot's reservation by the page,
    /// or, where it is mapped already, change its protection.
    ///
    /// If the mapping is gone (a loader dropped it while this fault was being
    /// served), nothing is mapped: the access is retried, finds the address
    /// unmapped and ends as any access to unmapped memory does.
    ///
    /// Returns the slot's address when the page was newly mapped: the
    /// caller populates it after dropping the lock ([`Mapper::populate`]).
    pub(crate) fn map(
        &self,
        st: &mut State,
        fk: FileKey,
        vma: VmaId,
        blk: u64,
        ram_page: RamPage,
        prot: Prot,
    ) -> Result<Option<NonNull<u8>>, MapError> {
        let Some(slot) = st.slot(fk, vma, blk, self.page_size) else {
            return Ok(None);
        };
        if let Some(uffd) = self.uffd {
            debug_assert_eq!(ram_page.0, blk, "pages in place");
            let addr = slot.addr.as_ptr() as usize;
            let wp = prot == Prot::Read;
            // Not waking the threads blocked there: each is woken by the
            // source of its fault once done with the page (a thread in
            // user mode returns from its request signal; a worker wakes a
            // thread in a system call after letting go of the handle, whose
            // last reference that thread may drop next).
            if slot.mapped {
                // Mapped here by the state's account; the entry may still
                // have gone (the page swapped out): map it again if so
                // (EEXIST, the usual case, is no error), else the access
                // would fault again forever.
                uffd_continue(uffd, addr, self.page_size, wp)
                    .map_err(|e| MapError::Uffd("UFFDIO_CONTINUE", e))?;
                uffd_write_protect(uffd, addr, self.page_size, wp)
                    .map_err(|e| MapError::Uffd("UFFDIO_WRITEPROTECT", e))?;
            } else if poison::is_poisoned(addr) {
                // A system call was failed here (its load was given up):
                // the slot is mapped by the access after the poison goes.
                return Ok(None);
            } else {
                // Present in the file: map it here.
                uffd_continue(uffd, addr, self.page_size, wp)
                    .map_err(|e| MapError::Uffd("UFFDIO_CONTINUE", e))?;
            }
            st.set_mapped(fk, vma.key, slot.index);
            // Present already: nothing to populate.
            return Ok(None);
        }
        if slot.mapped {
            // SAFETY: the page is inside this mapping's reservation.
            unsafe { sys::mprotect(slot.addr, self.page_size, prot.bits()) }
                .map_err(MapError::Protect)?;
            return Ok(None);
        }
        // SAFETY: `addr` is a slot of this mapping's own reservation,
        // currently PROT_NONE with nothing behind it; replacing it with the
        // RAM page is exactly what the reservation is for.
        unsafe { st.ramh(fk).map_page_fixed(ram_page.0, slot.addr, prot) }
            .map_err(MapError::Map)?;
        st.set_mapped(fk, vma.key, slot.index);
        Ok(Some(slot.addr))
    }

    /// The system call [`Mapper::protect_everywhere`] makes, for its errors.
    pub(crate) fn protect_call(&self) -> &'static str {
        match self.uffd {
            Some(_) => "UFFDIO_WRITEPROTECT",
            None => "mprotect",
        }
    }

    /// Set the protection of block `blk` of handle `fk` in every mapping
    /// where it is mapped; stops at the first failure.
    pub(crate) fn protect_everywhere(
        &self,
        st: &State,
        fk: FileKey,
        blk: u64,
        prot: Prot,
    ) -> io::Result<()> {
        for addr in st.mapped_addrs(fk, blk, self.page_size) {
            if let Some(uffd) = self.uffd {
                uffd_write_protect(
                    uffd,
                    addr.as_ptr() as usize,
                    self.page_size,
                    prot == Prot::Read,
                )?;
                continue;
            }
            // SAFETY: the page lies inside a mapping's reservation, owned by
            // its Vma, which stays alive while its state is in `st`.
            unsafe { sys::mprotect(addr, self.page_size, prot.bits()) }?;
        }
        Ok(())
    }

    /// Drop a resident page now (clean or dirty): detach it, take it away
    /// from every mapping, give its memory back.
    pub(crate) fn forget(&self, st: &mut State, pk: PageKey, rc: &Counters) {
        let mut slots = Vec::new();
        let d = st.detach(pk, rc, Unmap::Now, &mut slots);
        self.revoke_slots(&slots);
        if let Some(rp) = d.ram_page {
            self.release(st.ramh(d.fileh), rp);
        }
    }

    /// Take detached pages away from their slots now.
    pub(crate) fn revoke_slots(&self, slots: &[Slot]) {
        for s in slots {
            // SAFETY: the slot lies inside its mapping's own reservation; the
            // data in it is dropped on purpose (reclaim, discard,
            // invalidate): later accesses fault and reload.
            unsafe { self.revoke(s.addr, 1) };
        }
    }

    /// Give RAM page `rp` of `ramh` back to the OS. A failed hole punch
    /// keeps the page for the handle's next allocation (bigfile-ram's stray
    /// list): nothing to do about it here.
    pub(crate) fn release(&self, ramh: &RamHandle, rp: RamPage) {
        let _ = ramh.drop_page(rp.0);
    }

    /// Take `pages` dropped pages at `addr` away from their mapping: put the
    /// reservation back or, when the kernel cannot (ENOMEM), make them
    /// inaccessible. Either way the next access faults and maps the slot
    /// afresh. A page must not stay accessible, its RAM being freed or given
    /// to another block next: if both fail (both may need the same split of
    /// a kernel mapping, refused at the process's mapping limit), abort.
    ///
    /// # Safety
    /// The range is slots of a live mapping's reservation whose data is
    /// dropped on purpose.
    unsafe fn revoke(&self, addr: NonNull<u8>, pages: usize) {
        let len = pages * self.page_size;
        if let Some(uffd) = self.uffd {
            // The linear mapping stays; its page-table entries go (the page
            // itself is dropped from the file by `release`, which takes it
            // from every mapping). The next access faults.
            // SAFETY: forwarded to the caller.
            if let Err(e) = unsafe { sys::zap(addr, len) } {
                eprintln!(
                    "bigfile: cannot take a dropped page away from its mapping at {addr:p} ({e}); \
                     aborting rather than let it show another block's data"
                );
                std::process::abort();
            }
            // A write-protected entry leaves a write-protect marker when
            // zapped; a poison (failing a system call's access: `poison.rs`)
            // is refused over it, and the call would be retried forever.
            // Nothing is mapped here now (the slot is not mapped again
            // until its unmapping is over): unprotecting drops the marker.
            let _ = uffd_write_protect(uffd, addr.as_ptr() as usize, len, false);
            return;
        }
        // SAFETY: forwarded to the caller.
        let res = unsafe { sys::unmap_to_reserved(addr, len) }
            // SAFETY: as above.
            .or_else(|_| unsafe { sys::mprotect(addr, len, Prot::None.bits()) });
        taken_away_or_abort(res, addr, "a dropped page");
    }

    /// Fill the page-table entries of the slot at `addr` now, in one call,
    /// rather than one minor fault per OS page on the accesses to come.
    ///
    /// # Safety
    /// As [`sys::populate`]: `addr` is a slot of a live mapping (whatever is
    /// mapped there by now).
    pub(crate) unsafe fn populate(&self, addr: NonNull<u8>, write: bool) {
        if self.uffd.is_some() {
            // UFFDIO_CONTINUE made the page present (and populating a
            // registered range would fault into the userfaultfd).
            return;
        }
        // SAFETY: forwarded to the caller.
        unsafe { sys::populate(addr, self.page_size, write) }
    }
}

/// Abort unless `res` says dropped pages at `addr` (`what`) were taken away
/// from their mapping: left accessible, a slot would show whatever block
/// its RAM page holds next (or a zero page taken behind the budget's back),
/// and there is no way to go on without handing out wrong data.
fn taken_away_or_abort(res: io::Result<()>, addr: NonNull<u8>, what: &str) {
    if let Err(e) = res {
        eprintln!(
            "bigfile: cannot take {what} away from its mapping at {addr:p} ({e}); \
             aborting rather than let it show another block's data"
        );
        std::process::abort();
    }
}

/// The slow part of reclaim, done by the reclaiming thread after it drops
/// the RAM lock: replacing the reclaimed pages' mappings with the
/// reservation (hundreds of page-table entries for a large page) and
/// punching their memory out. Under the lock this was a third of a fault and
/// serialised every faulting thread (batched reclaim, ARCHITECTURE.md).
///
/// Until [`finish`](Deferred::finish) clears them, the slots stay marked
/// unmapping: a fault there waits rather than map over a pending unmap,
/// dropping the mapping waits rather than free a range that is about to be
/// mapped over, and `FileH::invalidate_page` waits for it. Meanwhile the old
/// mapping still shows the reclaimed block's (clean, read-only) data, which
/// is right until the block is invalidated.
#[derive(Default)]
pub(crate) struct Deferred {
    unmaps: Vec<Slot>,
    drops: Vec<(Arc<RamHandle>, RamPage)>,
    /// Spares to mark ready once unmapped.
    spares: Vec<(FileKey, RamPage)>,
}

impl Deferred {
    pub(crate) fn is_empty(&self) -> bool {
        self.unmaps.is_empty() && self.drops.is_empty() && self.spares.is_empty()
    }

    /// Where the bookkeeping puts the slots to unmap (`Unmap::Deferred`).
    pub(crate) fn slots(&mut self) -> &mut Vec<Slot> {
        &mut self.unmaps
    }

    /// Give `rp` of `ramh` back once the slots are unmapped.
    pub(crate) fn release(&mut self, ramh: Arc<RamHandle>, rp: RamPage) {
        self.drops.push((ramh, rp));
    }

    /// Mark the spare `(fk, rp)` ready once the slots are unmapped.
    pub(crate) fn spare(&mut self, fk: FileKey, rp: RamPage) {
        self.spares.push((fk, rp));
    }

    /// Do the work. Must be called, without the lock held, on every path
    /// after a reclaim that was given this `Deferred`.
    pub(crate) fn finish(mut self, shared: &Shared) {
        #[cfg(feature = "failpoints")]
        if !self.unmaps.is_empty() {
            crate::failpoint::hook("virtmem::deferred_unmap");
        }
        let mapper = Mapper::of(shared);
        // Adjacent slots of one mapping (a batch of a scan's oldest blocks)
        // are unmapped by one call: one mmap_lock hold, one TLB shootdown.
        self.unmaps
            .sort_unstable_by_key(|s| (s.fileh, s.vma, s.index));
        for run in self
            .unmaps
            .chunk_by(|a, b| (a.fileh, a.vma) == (b.fileh, b.vma) && a.index + 1 == b.index)
        {
            // SAFETY: the slots lie inside one mapping's reservation; the
            // mapping cannot be dropped (nor the slots mapped anew) while
            // they are marked unmapping, and the pages' data is dropped on
            // purpose (they are clean: reclaim takes clean pages only).
            unsafe { mapper.revoke(run[0].addr, run.len()) };
        }
        for (ramh, rp) in &self.drops {
            mapper.release(ramh, *rp);
        }
        if !self.unmaps.is_empty() || !self.spares.is_empty() {
            let mut st = shared.lock();
            for slot in &self.unmaps {
                st.slot_unmapped(slot);
            }
            for &(fk, rp) in &self.spares {
                st.spare_unmapped(fk, rp);
            }
            shared.notify(&st);
        }
    }
}

// The userfaultfd calls that map a page or change its access, with the
// failure points the fault suite arms where the signal backend's mmap and
// mprotect are. Neither wakes the threads blocked on the range: see
// `Mapper::map`.

/// Map the memory file's page present at `addr` (`UFFDIO_CONTINUE`),
/// write-protected if `wp`.
fn uffd_continue(uffd: &Uffd, addr: usize, len: usize, wp: bool) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    crate::failpoint::check("virtmem::uffd_continue")?;
    uffd.resolve(addr, len, wp, false)
}

/// Write-protect (`wp`) or unprotect the pages at `addr`
/// (`UFFDIO_WRITEPROTECT`).
fn uffd_write_protect(uffd: &Uffd, addr: usize, len: usize, wp: bool) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    crate::failpoint::check("virtmem::uffd_writeprotect")?;
    uffd.write_protect(addr, len, wp, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Unmap;
    use crate::vmas::VmaState;
    use crate::waits::Ticket;
    use bigfile_testkit::memory::prot_at;

    const PS: usize = 4096;

    #[test]
    fn pages_are_mapped_protected_and_revoked_in_runs() {
        let ram = bigfile_ram::Ram::new("memfd,pagesize=4K".parse().unwrap()).unwrap();
        let shared = Shared::with_backend(
            ram,
            crate::backend::Backend::Signals {
                why_not_uffd: "the test asks for signals".into(),
            },
        );
        let mapper = Mapper::of(&shared);
        let ramh = Arc::new(shared.ram().open_handle().unwrap());
        let start = mapper.reserve(3).unwrap();
        let mut st = shared.lock();
        let fk = st.open_handle(ramh.clone(), Default::default());
        let vk = st.add_vma(fk, VmaState::new(start, 0, 3));
        let id = VmaId {
            key: vk,
            start: start.as_ptr() as usize,
        };
        let at = |blk: usize| prot_at(start.as_ptr() as usize + blk * PS).unwrap();
        let mut pks = Vec::new();
        for blk in 0..3 {
            let rp = RamPage(ramh.alloc_page(blk).unwrap());
            let pk = st.begin_load(fk, blk, Ticket::mine());
            st.finish_load(pk, rp, shared.counters());
            let fresh = mapper.map(&mut st, fk, id, blk, rp, Prot::Read).unwrap();
            assert!(fresh.is_some(), "newly mapped");
            pks.push(pk);
        }
        assert_eq!(at(1), "r--s");
        // Mapped already: only the protection changes.
        let rp = st.pages().get(pks[1]).ram_page().unwrap();
        assert!(mapper
            .map(&mut st, fk, id, 1, rp, Prot::ReadWrite)
            .unwrap()
            .is_none());
        assert_eq!(at(1), "rw-s");
        mapper.protect_everywhere(&st, fk, 1, Prot::Read).unwrap();
        assert_eq!(at(1), "r--s");
        // Blocks 0 and 2 reclaimed now, block 1 deferred.
        mapper.forget(&mut st, pks[0], shared.counters());
        let mut deferred = Deferred::default();
        let d = st.detach(pks[1], shared.counters(), Unmap::Deferred, deferred.slots());
        deferred.release(ramh.clone(), d.ram_page.unwrap());
        assert_eq!(at(1), "r--s", "still mapped until finished");
        assert!(st.vma(fk, vk).any_unmapping());
        drop(st);
        deferred.finish(&shared);
        assert!(at(0).starts_with("---") && at(1).starts_with("---"));
        let mut st = shared.lock();
        assert!(!st.vma(fk, vk).any_unmapping());
        mapper.forget(&mut st, pks[2], shared.counters());
        assert_eq!(ramh.stats().pages_allocated, 0, "every page given back");
        st.remove_vma(fk, vk);
        st.released(start);
        st.close_handle(fk);
        drop(st);
        // SAFETY: the reservation made above, unused from here on.
        unsafe { mapper.release_range(start, 3) };
    }
}
