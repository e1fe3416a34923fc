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
        let start = Mapper::of(&fileh.shared)
            .reserve(pages)
            .map_err(|source| Error::Os {
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
        };
        // On error `vma` is dropped, which undoes the two steps above.
        vma.registration = Some(bigfile_fault::register(
            start.as_ptr() as usize,
            len,
            handler,
        )?);
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
        self.fileh
            .shared
            .lock()
            .mapped_blocks(self.fileh.key, self.key)
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
            };
            take(&Prefault, &self.fileh, &req, &mut host)?;
        }
        Ok(())
    }

    /// Unmap now (the same as dropping).
    pub fn unmap(self) {}
}

impl Drop for Vma {
    fn drop(&mut self) {
        // Unregister first: this waits for handlers of this mapping running on
        // other threads, so none maps a page into it after this point. Not
        // under the RAM lock, which those handlers may be waiting for.
        let _host = HostUnlocked::new();
        drop(self.registration.take());
        let shared = &self.fileh.shared;
        {
            let mut st = shared.lock();
            // A reclaimer may be unmapping pages of ours outside the lock:
            // the range must stay ours until it is done.
            while st.vma(self.fileh.key, self.key).any_unmapping() {
                st = shared.wait(st);
            }
            st.remove_vma(self.fileh.key, self.key);
        }
        // SAFETY: the reservation is ours and no longer registered, nor
        // being unmapped; nobody may use it after the Vma is dropped
        // (slices borrow the Vma).
        unsafe { Mapper::of(shared).release_range(self.start, self.len / self.fileh.page_size()) };
    }
}
