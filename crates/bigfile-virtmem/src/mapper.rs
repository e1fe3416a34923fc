//! Every OS call virtmem makes on its mappings, in one place: reserving and
//! releasing a mapping's address range, mapping a RAM page into a slot,
//! changing protections, taking dropped pages away (now, or deferred until
//! the lock is dropped), giving RAM pages back, and populating page tables.
//! The bookkeeping (`state.rs` and its parts) decides; the mapper does.

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use bigfile_os::Prot;
use bigfile_ram::{RamError, RamHandle};
use bigfile_uffd::Uffd;

use crate::keys::{FileKey, PageKey, RamPage, Slot, VmaId};
use crate::poison;
use crate::shared::Shared;
use crate::state::{self, State, Unmap};
use crate::stats::Counters;
use crate::sys;

/// Pieces (the userfaultfd backend's kernel mappings of RAM pages over
/// slots, [`Mapper::map`]) the process's mappings, every RAM's, keep once
/// taken away, before they are turned back into the reservation
/// ([`Mapper::coalesce`]). A piece between two parts of the reservation
/// splits it: two kernel mappings each, a quarter of Linux's default
/// `vm.max_map_count` (65530), which is the process's.
pub(crate) const PIECES_KEPT: usize = 8192;

/// The OS side of one RAM's mappings. A mapping is a reservation with each
/// loaded page mapped over its slot (its RAM page, wherever in the handle's
/// memory file, so pages are recycled from block to block). On the signal
/// backend the reservation is inaccessible and a page is mapped read-only
/// until written. On the userfaultfd backend the reservation is read-write
/// anonymous memory registered for missing faults (every access to it, the
/// kernel's included, is reported); a page mapped over a slot is registered
/// for missing, minor and write-protect faults at once, made present by
/// `UFFDIO_CONTINUE` and kept clean by write-protection; taking it away
/// zaps its entries and leaves that piece registered (a later access raises
/// a minor or missing fault, never reaching whatever the RAM page holds
/// next). benches/README.md, "Why the userfaultfd figures are what they
/// are", has the measurements behind this order of calls.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mapper {
    page_size: usize,
    uffd: Option<&'static Uffd>,
    /// The size of one page-table entry of a RAM page: the OS page for
    /// shared memory, whose entries the kernel may take away one at a
    /// time; the huge page for hugetlbfs, each present or absent as a
    /// whole, `UFFDIO_CONTINUE` acting on whole ones only (a range of part
    /// of one is refused). A hugetlbfs RAM page is one entry or several
    /// (a page size a multiple of the huge page's).
    entry: usize,
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
            entry: shared
                .ram()
                .huge_page_size()
                .unwrap_or_else(bigfile_os::os_page_size),
        }
    }

    /// The process's userfaultfd, on that backend.
    pub(crate) fn uffd(&self) -> Option<&'static Uffd> {
        self.uffd
    }

    /// Reserve the address range of a mapping of `pages` pages, backed by
    /// nothing, aligned to the page size: inaccessible on the signal
    /// backend; read-write on the userfaultfd backend, whose registration
    /// (for missing faults, made by the mapping next) reports every access.
    pub(crate) fn reserve(&self, pages: usize) -> io::Result<NonNull<u8>> {
        let len = pages * self.page_size;
        let start = sys::reserve(len, self.page_size)?;
        if self.uffd.is_some() {
            // SAFETY: the reservation just made, used by nobody yet.
            if let Err(e) = unsafe { sys::mprotect(start, len, Prot::ReadWrite.bits()) } {
                // SAFETY: as above.
                let _ = unsafe { sys::unmap(start, len) };
                return Err(e);
            }
        }
        Ok(start)
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

    /// Put the inaccessible reservation over a whole mapping's range, on
    /// either backend: on the userfaultfd backend, before the range is
    /// unregistered (its pieces would show whatever their RAM pages hold by
    /// then). If the kernel refuses, abort.
    ///
    /// # Safety
    /// `start` and `pages` are a mapping's range, out of the state, whose
    /// pages are dropped on purpose.
    pub(crate) unsafe fn close(&self, start: NonNull<u8>, pages: usize) {
        // SAFETY: forwarded to the caller.
        unsafe {
            reserve_over(
                start,
                pages * self.page_size,
                "the pages of a closed mapping",
            )
        };
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
        (blk, ram_page): (u64, RamPage),
        prot: Prot,
    ) -> Result<Option<NonNull<u8>>, MapError> {
        let Some(slot) = st.slot(fk, vma, blk, self.page_size) else {
            return Ok(None);
        };
        if let Some(uffd) = self.uffd {
            let addr = slot.addr.as_ptr() as usize;
            let wp = prot == Prot::Read;
            // Not waking the threads blocked there: each is woken by the
            // source of its fault once done with the page (a thread in
            // user mode returns from its request signal; a worker wakes a
            // thread in a system call after letting go of the handle, whose
            // last reference that thread may drop next).
            if slot.mapped {
                // Mapped here by the state's account; entries may still
                // have gone, some or all (the kernel reclaims the RAM's
                // shared memory an OS page at a time): make each present
                // again, else an access there would fault again forever.
                // A `CONTINUE` stops at the first entry present (EEXIST,
                // as for a write to a clean page, the usual case): the
                // page tables say which are not, rather than a call per
                // OS page (for a 2 MiB page, 4 times the fault).
                let whole = uffd_continue_new(uffd, addr, self.page_size, wp)
                    .map_err(|e| MapError::Uffd("UFFDIO_CONTINUE", e))?;
                // A page of one entry (hugetlbfs) is present, since
                // `CONTINUE` found it so; huge entries are few, each
                // continued in turn.
                let os = bigfile_os::os_page_size();
                if !whole
                    && self.entry < self.page_size
                    && (self.entry != os
                        || sys::for_each_absent(addr, self.page_size, |page| {
                            uffd_continue(uffd, page, os, wp)
                        })
                        .is_err())
                {
                    // Unreadable (or a call failed): each entry, as below.
                    continue_each(uffd, addr, self.page_size, wp, self.entry)?;
                }
                uffd_write_protect(uffd, addr, self.page_size, wp)
                    .map_err(|e| MapError::Uffd("UFFDIO_WRITEPROTECT", e))?;
                return Ok(None);
            }
            if poison::is_poisoned(addr) {
                // A system call was failed here (its load was given up):
                // the slot is mapped by the access after the poison goes.
                return Ok(None);
            }
            // SAFETY: `addr` is a slot of this mapping's own reservation
            // with no page of ours in it (its old piece, if any, was taken
            // away); replacing it is what the reservation is for.
            // Read-only for a read (see `register_and_continue`).
            unsafe { st.ramh(fk).map_page_fixed(ram_page.0, slot.addr, prot) }
                .map_err(MapError::Map)?;
            #[cfg(feature = "failpoints")]
            crate::failpoint::hook("virtmem::uffd_before_register");
            match register_and_continue(uffd, slot.addr, self.page_size, wp, self.entry) {
                Ok(()) => {}
                Err(e) => {
                    // SAFETY: the slot just mapped, not counted mapped: its
                    // page stays the block's, and nothing was written in it
                    // that is not in the page.
                    unsafe { self.put_reservation_back(uffd, slot.addr) };
                    return Err(e);
                }
            }
            st.set_mapped(fk, vma.key, slot.index);
            st.add_piece(fk, vma.key, slot.index);
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
        self.revoke_slots(st, &slots);
        if let Some(rp) = d.ram_page {
            self.release(st.ramh(d.fileh), rp);
        }
    }

    /// Take detached pages away from their slots now.
    pub(crate) fn revoke_slots(&self, st: &mut State, slots: &[Slot]) {
        let coalesce = self.coalescing();
        for s in slots {
            // SAFETY: the slot lies inside its mapping's own reservation; the
            // data in it is dropped on purpose (reclaim, discard,
            // invalidate): later accesses fault and reload.
            unsafe { self.revoke(s.addr, 1) };
            // SAFETY: as above; the slot was just taken away.
            if coalesce && unsafe { self.coalesce(s.addr, 1) } {
                st.remove_piece(s);
            }
        }
    }

    /// Whether pieces taken away are turned back into the reservation now
    /// (the userfaultfd backend, past [`PIECES_KEPT`]).
    fn coalescing(&self) -> bool {
        self.uffd.is_some() && state::pieces_in_process() > PIECES_KEPT
    }

    /// On the userfaultfd backend, turn the taken-away pieces at `addr`
    /// back into the registered reservation, so that the process's kernel
    /// mappings do not grow with every slot ever mapped (each piece is one;
    /// the reservation around merges into one): `PROT_NONE` anonymous
    /// memory first, registered for missing faults, then made read-write.
    /// The window between them is the price (benches/README.md): a user
    /// access there takes a SIGSEGV, served as on the signal backend, but a
    /// kernel access fails with EFAULT; so it is paid only past
    /// [`PIECES_KEPT`]. Whether the slots are the reservation again (else
    /// they stay pieces, registered, with nothing mapped).
    ///
    /// # Safety
    /// The range is slots of a live mapping whose pages were taken away.
    unsafe fn coalesce(&self, addr: NonNull<u8>, pages: usize) -> bool {
        let Some(uffd) = self.uffd else {
            return false;
        };
        let len = pages * self.page_size;
        // SAFETY: forwarded to the caller.
        if unsafe { sys::unmap_to_reserved(addr, len) }.is_err() {
            return false;
        }
        // A slot left inaccessible (either call refused) still serves a
        // user access by SIGSEGV, and is mapped over as any other.
        if uffd
            .register_missing_part(addr.as_ptr() as usize, len)
            .is_ok()
        {
            // SAFETY: forwarded to the caller.
            let _ = unsafe { sys::mprotect(addr, len, Prot::ReadWrite.bits()) };
        }
        true
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
            // The piece stays, registered for minor faults; its page-table
            // entries go. The next access faults (minor: the RAM page holds
            // another block by then, or none yet; missing: it was freed),
            // and never reaches the page: no window, unlike putting the
            // reservation back (`coalesce`).
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
        unsafe { reserve_over(addr, len, "a dropped page") };
    }

    /// On the userfaultfd backend, put the registered reservation back over
    /// the slot at `addr` (a page mapped there could not be registered or
    /// made present): read-write anonymous memory registered for missing
    /// faults. A slot left unregistered would let a kernel write land
    /// untracked, or a read see zeros: if the kernel refuses, abort.
    ///
    /// # Safety
    /// `addr` is a slot of a live mapping whose piece holds nothing of its
    /// own.
    unsafe fn put_reservation_back(&self, uffd: &Uffd, addr: NonNull<u8>) {
        // SAFETY: forwarded to the caller.
        let res = unsafe { sys::map_zeros(addr, self.page_size) }
            .and_then(|()| uffd.register_missing_part(addr.as_ptr() as usize, self.page_size));
        taken_away_or_abort(res, addr, "a page that could not be registered");
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

/// Put the inaccessible reservation over `[addr, addr + len)` or, when the
/// kernel cannot (ENOMEM), make it inaccessible; abort if both fail
/// ([`taken_away_or_abort`]).
///
/// # Safety
/// The range is part of a live mapping's reservation whose pages (`what`)
/// are dropped on purpose.
unsafe fn reserve_over(addr: NonNull<u8>, len: usize, what: &str) {
    // SAFETY: forwarded to the caller.
    let res = unsafe { sys::unmap_to_reserved(addr, len) }
        // SAFETY: as above.
        .or_else(|_| unsafe { sys::mprotect(addr, len, Prot::None.bits()) });
    taken_away_or_abort(res, addr, what);
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
        let coalesce = !self.unmaps.is_empty() && mapper.coalescing();
        let mut coalesced = Vec::new();
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
            // SAFETY: as above.
            if coalesce && unsafe { mapper.coalesce(run[0].addr, run.len()) } {
                coalesced.extend_from_slice(run);
            }
        }
        for (ramh, rp) in &self.drops {
            mapper.release(ramh, *rp);
        }
        if !self.unmaps.is_empty() || !self.spares.is_empty() {
            let mut st = shared.lock();
            for slot in &self.unmaps {
                st.slot_unmapped(slot);
            }
            for slot in &coalesced {
                st.remove_piece(slot);
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

/// Map the memory file's pages at `addr`, none mapped yet, write-protected
/// if `wp`: false if one was mapped already (`Uffd::resolve_new`).
fn uffd_continue_new(uffd: &Uffd, addr: usize, len: usize, wp: bool) -> io::Result<bool> {
    #[cfg(feature = "failpoints")]
    crate::failpoint::check("virtmem::uffd_continue")?;
    uffd.resolve_new(addr, len, wp)
}

/// Write-protect (`wp`) or unprotect the pages at `addr`
/// (`UFFDIO_WRITEPROTECT`).
fn uffd_write_protect(uffd: &Uffd, addr: usize, len: usize, wp: bool) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    crate::failpoint::check("virtmem::uffd_writeprotect")?;
    uffd.write_protect(addr, len, wp, false)
}

/// Make every entry (of `entry` bytes) of the piece at `at` present, some
/// present already: a call per entry (a call stops at the first entry
/// present, EEXIST), then the whole piece write-protected if `wp` (an
/// entry present already may lack the bit).
fn continue_each(
    uffd: &Uffd,
    at: usize,
    len: usize,
    wp: bool,
    entry: usize,
) -> Result<(), MapError> {
    for page in (at..at + len).step_by(entry) {
        uffd_continue(uffd, page, entry, wp).map_err(|e| MapError::Uffd("UFFDIO_CONTINUE", e))?;
    }
    if wp {
        uffd_write_protect(uffd, at, len, true)
            .map_err(|e| MapError::Uffd("UFFDIO_WRITEPROTECT", e))?;
    }
    Ok(())
}

/// Register the piece at `addr` (a RAM page just mapped over a slot of a
/// registered reservation, read-only if `wp`, else read-write) for missing,
/// minor and write-protect faults, make its entries present,
/// write-protected if `wp`, and then make it read-write.
///
/// Until the registration the new kernel mapping reports nothing: an access
/// there maps the page itself. Mapped read-only for a read, no write lands
/// unseen in that window: a user write takes a SIGSEGV, served as on the
/// signal backend once this fault lets go of the lock; a kernel write fails
/// with EFAULT (the price: mapped read-write, a write there could not be
/// told from a read, and the page would have to be taken for dirty whenever
/// another thread read it meanwhile; benches/README.md). An entry made in
/// the window (`UFFDIO_CONTINUE` says EEXIST) is write-protected here, and
/// the rest mapped: none has the write-protect bit that would make a later
/// write fault. (A hugetlbfs piece's entries, `entry` bytes each, are huge
/// pages: each mapped in the window as a whole, or not at all.)
fn register_and_continue(
    uffd: &Uffd,
    addr: NonNull<u8>,
    len: usize,
    wp: bool,
    entry: usize,
) -> Result<(), MapError> {
    let at = addr.as_ptr() as usize;
    uffd.register_part(at, len)
        .map_err(|e| MapError::Uffd("UFFDIO_REGISTER", e))?;
    // One call when no entry is present, else one per entry.
    if !uffd_continue_new(uffd, at, len, wp).map_err(|e| MapError::Uffd("UFFDIO_CONTINUE", e))? {
        continue_each(uffd, at, len, wp, entry)?;
    }
    if wp {
        // SAFETY: the piece just mapped over the slot; its writes are
        // tracked from here on.
        unsafe { sys::mprotect(addr, len, Prot::ReadWrite.bits()) }.map_err(MapError::Protect)?;
    }
    Ok(())
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
            let fresh = mapper.map(&mut st, fk, id, (blk, rp), Prot::Read).unwrap();
            assert!(fresh.is_some(), "newly mapped");
            pks.push(pk);
        }
        assert_eq!(at(1), "r--s");
        // Mapped already: only the protection changes.
        let rp = st.pages().get(pks[1]).ram_page().unwrap();
        assert!(mapper
            .map(&mut st, fk, id, (1, rp), Prot::ReadWrite)
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
