//! `Vma`: one mapping of part of a file handle into the address space.

use std::fmt;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Arc;

use bigfile_fault::{Access, Registration};

use crate::advice::Advice;
use crate::error::{Error, Result};
use crate::handle::FileHInner;
use crate::host::{HostLease, HostUnlocked};
use crate::keys::{VmaId, VmaKey};
use crate::mapper::Mapper;
use crate::serve::PageRequest;
use crate::source::{take, Prefault, SignalFaults};
use crate::uffd::{UffdRange, UffdRegistration, UffdService};
use crate::vmas::VmaState;

/// A mapping of pages `pgoffset..pgoffset+pglen` of a file handle.
///
/// The address range is reserved inaccessible and registered with the fault
/// handler; pages appear as they are touched. Dropping the `Vma` unmaps it.
/// It keeps its file handle alive.
pub struct Vma {
    fileh: Arc<FileHInner>,
    key: VmaKey,
    start: NonNull<u8>,
    len: usize,
    pgoffset: u64,
    registration: Option<Registration>,
    /// On the userfaultfd backend: the mapping's faults reported there.
    uffd: Option<UffdRegistration>,
    /// Unregistered and forgotten by its handle (`detach`).
    detached: bool,
    /// The address range is still the Vma's to give back (not handed to a
    /// [`Placeholder`]).
    owns_range: bool,
}

// SAFETY: the mapping is process-wide memory; all bookkeeping goes through the
// RAM's mutex, and the fault handler serves accesses from any thread.
unsafe impl Send for Vma {}
// SAFETY: as above; shared access only reads addresses and calls methods that
// lock, and memory accesses through `&Vma` are raw (see `as_slice`).
unsafe impl Sync for Vma {}

impl fmt::Debug for Vma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vma")
            .field("addr", &self.start)
            .field("len", &self.len)
            .field("pgoffset", &self.pgoffset)
            .field("file", &self.fileh.name)
            .finish()
    }
}

impl Vma {
    pub(crate) fn new(fileh: Arc<FileHInner>, pgoffset: u64, pglen: u64) -> Result<Vma> {
        let ps = fileh.page_size();
        if pglen == 0 {
            return Err(Error::InvalidRange("zero-length mapping".into()));
        }
        if pgoffset.checked_add(pglen).is_none() {
            return Err(Error::InvalidRange(format!(
                "pages {pgoffset} + {pglen} overflow a 64-bit page offset"
            )));
        }
        let len = usize::try_from(pglen)
            .ok()
            .and_then(|n| n.checked_mul(ps))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::InvalidRange(format!(
                    "{pglen} pages of {ps} bytes do not fit in the address space"
                ))
            })?;
        let pages = len / ps;
        let mapper = Mapper::of(&fileh.shared);
        let service = match mapper.uffd() {
            Some(_) => Some(UffdService::get().map_err(Error::Backend)?),
            None => None,
        };
        let start = mapper.reserve(pages).map_err(|source| Error::Os {
            op: "reserve address space",
            source,
        })?;
        let key = {
            let _host = HostUnlocked::new();
            let mut st = fileh.shared.lock();
            st.add_vma(fileh.key, VmaState::new(start, pgoffset, pages))
        };
        let id = VmaId {
            key,
            start: start.as_ptr() as usize,
        };
        let handler = Arc::new(SignalFaults::new(fileh.clone(), id, pgoffset));
        let mut vma = Vma {
            fileh,
            key,
            start,
            len,
            pgoffset,
            registration: None,
            uffd: None,
            detached: false,
            owns_range: true,
        };
        // On error `vma` is dropped, which undoes the steps above. The fault
        // handler serves a signal backend's faults, and a userfaultfd
        // backend's user-mode ones (sent to the faulting thread).
        vma.registration = Some(bigfile_fault::register(
            start.as_ptr() as usize,
            len,
            handler,
        )?);
        if let Some(service) = service {
            let range = Arc::new(UffdRange {
                start: start.as_ptr() as usize,
                len,
                fileh: vma.fileh.clone(),
                vma: id,
                pgoffset,
            });
            vma.uffd = Some(service.register(range).map_err(|source| Error::Os {
                op: "register the mapping with the userfaultfd",
                source,
            })?);
        }
        Ok(vma)
    }

    /// The mapping as a fault names it.
    pub(crate) fn id(&self) -> VmaId {
        VmaId {
            key: self.key,
            start: self.start.as_ptr() as usize,
        }
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.start.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// First file page mapped.
    pub fn pgoffset(&self) -> u64 {
        self.pgoffset
    }

    /// Number of pages mapped.
    pub fn pglen(&self) -> u64 {
        (self.len / self.fileh.page_size()) as u64
    }

    /// The address range of the mapping.
    pub fn addr_range(&self) -> Range<usize> {
        let s = self.start.as_ptr() as usize;
        s..s + self.len
    }

    /// Which file pages are mapped in (have memory behind them) in this mapping.
    pub fn mapped_pages(&self) -> Vec<u64> {
        let _host = HostUnlocked::new();
        let st = self.fileh.shared.lock();
        st.mapped_blocks(self.fileh.key, self.key)
    }

    /// Declare how this mapping will be accessed (see [`Advice`]); the last
    /// advice given holds. It only changes which clean page reclaim takes
    /// first, never what a read sees.
    pub fn advise(&self, advice: Advice) {
        let _host = HostUnlocked::new();
        let mut st = self.fileh.shared.lock();
        st.vma_mut(self.fileh.key, self.key).set_advice(advice);
    }

    /// The advice in effect (see [`Vma::advise`]).
    pub fn advice(&self) -> Advice {
        let _host = HostUnlocked::new();
        let st = self.fileh.shared.lock();
        st.vma(self.fileh.key, self.key).advice()
    }

    /// The mapping as a byte slice.
    ///
    /// # Safety
    /// The caller must ensure no one writes the bytes while the slice is
    /// alive (through another slice, another mapping of the same handle, or
    /// `write_at`); a discard or invalidation during its life changes what it
    /// reads. Touching the slice may run `loadblk` on this thread.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the range is this mapping, valid while `self` lives; every
        // access is served by the fault handler; aliasing is the caller's duty.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
    }

    /// The mapping as a mutable byte slice.
    ///
    /// # Safety
    /// As [`Vma::as_slice`], and nothing else may read or write the bytes
    /// while the slice is alive.
    #[allow(clippy::mut_from_ref)] // reason: the memory is not owned by `self`'s Rust value; exclusivity is the caller's contract
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; exclusivity is the caller's duty.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.len) }
    }

    fn check(&self, offset: usize, n: usize) -> Result<()> {
        match offset.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfBounds {
                offset,
                end: offset.saturating_add(n),
                len: self.len,
            }),
        }
    }

    /// Copy bytes at `offset` into `buf`. Pages not yet loaded are loaded.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: the range was checked to lie inside the mapping; the copy
        // is raw, creating no reference to the mapped memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.start.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Copy `data` into the mapping at `offset`, dirtying the pages touched.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: as in `read_at`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.start.as_ptr().add(offset),
                data.len(),
            )
        };
        Ok(())
    }

    /// Load (for `Access::Read`) or load and dirty (for `Access::Write`) every
    /// page of the byte range `range` now, without touching the memory.
    ///
    /// Needed before handing the memory to the kernel: a syscall such as
    /// `read(2)` into a page that is not yet mapped fails with EFAULT instead
    /// of faulting the page in, because the kernel does not deliver SIGSEGV
    /// for its own accesses. Errors are returned instead of ending in
    /// SIGBUS: a failing loadblk, or the failed load of another thread this
    /// one waited for, is [`Error::Load`] with the loader's error as a value
    /// ([`LoadError`](crate::LoadError)); a budget full of dirty pages
    /// [`Error::BudgetExhausted`]; the RAM's memory itself exhausted with no
    /// clean page left [`Error::Ram`], whose `is_exhausted()` is true; an OS
    /// call failing to provide or map the page [`Error::Os`], naming the
    /// call, with its errno.
    pub fn prefault(&self, range: Range<usize>, access: Access) -> Result<()> {
        if range.start > range.end {
            return Err(Error::OutOfBounds {
                offset: range.start,
                end: range.end,
                len: self.len,
            });
        }
        self.check(range.start, range.end - range.start)?;
        if range.is_empty() {
            return Ok(());
        }
        let ps = self.fileh.page_size();
        let mut host = HostLease::released();
        let first = range.start / ps;
        for idx in first..=(range.end - 1) / ps {
            let req = PageRequest {
                vma: self.id(),
                blk: self.pgoffset + idx as u64,
                access,
                // Drop-behind would reclaim the pages just prefaulted.
                drop_behind: idx == first,
                execution: None,
                call_end: None,
            };
            take(&Prefault, &self.fileh, &req, &mut host)?;
        }
        Ok(())
    }

    /// Unmap now (the same as dropping).
    pub fn unmap(self) {}

    /// Unmap the file from this mapping now, as dropping does, but leave its
    /// addresses taken by zero-filled memory of the returned [`Placeholder`]
    /// until it is dropped: for code that may still hold the addresses (an
    /// array that outlived the mapping, in the Python bindings). Such code
    /// then reads zeros and writes into memory of the placeholder, dropped
    /// with it, instead of faulting or reaching whatever would be mapped at
    /// those addresses next. The file's pages are replaced in one `mmap`, so
    /// no other mapping can take the addresses meanwhile; where the kernel
    /// refuses that (ENOMEM), they are made inaccessible instead (still
    /// taken: a touch then dies by SIGSEGV). The handle counts the mapping
    /// as gone at once.
    pub fn unmap_to_placeholder(mut self) -> Placeholder {
        let _host = HostUnlocked::new();
        self.detach();
        let pages = self.len / self.fileh.page_size();
        // SAFETY: the reservation is ours, no longer registered nor being
        // unmapped (detach); it is handed to the placeholder, which gives
        // it back.
        unsafe { Mapper::of(&self.fileh.shared).replace_with_zeros(self.start, pages) };
        // Zeros of its own now, not RAM memory: nothing a forked child
        // must take away from it.
        self.fileh.shared.lock().released(self.start);
        self.owns_range = false;
        Placeholder {
            mapper: Mapper::of(&self.fileh.shared),
            start: self.start,
            pages,
        }
    }

    /// Unregister the mapping and remove it from its handle, once.
    fn detach(&mut self) {
        if std::mem::replace(&mut self.detached, true) {
            return;
        }
        // Unregister first: this waits for handlers of this mapping running on
        // other threads, so none maps a page into it after this point. Not
        // under the RAM lock, which those handlers may be waiting for.
        let _host = HostUnlocked::new();
        drop(self.registration.take());
        let shared = &self.fileh.shared;
        let mut st = shared.lock();
        // A reclaimer may be unmapping pages of ours outside the lock:
        // the range must stay ours until it is done.
        while st.vma(self.fileh.key, self.key).any_unmapping() {
            st = shared.wait(st);
        }
        st.remove_vma(self.fileh.key, self.key);
        drop(st);
        if self.uffd.is_some() {
            // Unregistered, a piece taken away would show whatever its RAM
            // page holds by then (another block): the inaccessible
            // reservation goes over the whole range first.
            let pages = self.len / self.fileh.page_size();
            // SAFETY: the range is ours, out of the state: nothing maps
            // into it any more, and its pages are the handle's, not ours.
            unsafe { Mapper::of(&self.fileh.shared).close(self.start, pages) };
        }
        // No more userfaultfd events for this range (threads blocked in it
        // are woken and retry, into a mapping nobody may use any more). Only
        // now: until the mapping left the state, a writeout or a worker
        // could still protect or map pages of it, which the userfaultfd
        // refuses for a range no longer registered.
        drop(self.uffd.take());
    }
}

impl Drop for Vma {
    fn drop(&mut self) {
        let _host = HostUnlocked::new();
        self.detach();
        if self.owns_range {
            // SAFETY: the reservation is ours and no longer registered, nor
            // being unmapped; nobody may use it after the Vma is dropped
            // (slices borrow the Vma).
            unsafe {
                Mapper::of(&self.fileh.shared)
                    .release_range(self.start, self.len / self.fileh.page_size())
            };
            self.fileh.shared.lock().released(self.start);
        }
    }
}

/// The addresses of a mapping closed by [`Vma::unmap_to_placeholder`]: taken
/// by zero-filled anonymous memory (readable and writable, private to the
/// placeholder) until it is dropped, which gives them back.
pub struct Placeholder {
    mapper: Mapper,
    start: NonNull<u8>,
    pages: usize,
}

// SAFETY: the placeholder owns its address range and only gives it back.
unsafe impl Send for Placeholder {}
// SAFETY: as above; `&Placeholder` only reads its fields.
unsafe impl Sync for Placeholder {}

impl Placeholder {
    /// The address range it holds.
    pub fn addr_range(&self) -> Range<usize> {
        let s = self.start.as_ptr() as usize;
        s..s + self.mapper.len_of(self.pages)
    }
}

impl fmt::Debug for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Placeholder")
            .field("range", &self.addr_range())
            .finish()
    }
}

impl Drop for Placeholder {
    fn drop(&mut self) {
        // SAFETY: the range was handed over by its Vma, which no longer
        // uses it; whoever still reads it was told it goes with us.
        unsafe { self.mapper.release_range(self.start, self.pages) };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bigfile_testkit::memory::prot_at;

    use crate::{FileBigFile, FileH, Ram};

    const BLK: usize = 4096;

    #[test]
    fn a_placeholder_keeps_the_addresses_with_zeros_until_dropped() {
        let path = std::env::temp_dir().join(format!("placeholder-{}.bin", std::process::id()));
        std::fs::write(&path, [7u8; 4 * BLK]).unwrap();
        let file = Arc::new(FileBigFile::open(&path, BLK).unwrap());
        std::fs::remove_file(&path).unwrap();
        let ram = Ram::from_spec(&format!("memfd,pagesize={BLK}")).unwrap();
        let fh = FileH::open(file, Some(&ram)).unwrap();
        let vma = fh.mmap(0, 4).unwrap();
        vma.write_at(BLK, b"dirty").unwrap();
        let mut b = [0u8; 1];
        vma.read_at(2 * BLK, &mut b).unwrap();
        assert_eq!(b[0], 7);
        let range = vma.addr_range();
        let placeholder = vma.unmap_to_placeholder();
        assert_eq!(placeholder.addr_range(), range);
        assert_eq!(fh.mapping_count(), 0, "the handle no longer has it");
        assert_eq!(fh.dirty_blocks(), [1], "the handle's pages stay");
        for at in [range.start, range.start + BLK, range.end - 1] {
            assert_eq!(prot_at(at).unwrap(), "rw-p");
            // SAFETY: the placeholder's memory, alive until it is dropped.
            assert_eq!(unsafe { std::ptr::read_volatile(at as *const u8) }, 0);
        }
        // SAFETY: as above; writes go to the placeholder's own memory.
        unsafe { std::ptr::write_volatile((range.start + BLK) as *mut u8, 9) };
        let again = fh.mmap(0, 4).unwrap();
        let mut b = [0u8; 5];
        again.read_at(BLK, &mut b).unwrap();
        assert_eq!(
            &b, b"dirty",
            "the write went to the placeholder, not the file"
        );
        assert!(!again.addr_range().contains(&range.start));
        drop(placeholder);
        assert_eq!(prot_at(range.start), None, "given back");
    }
}
