//! [`BlockPage`]: the RAM page a `loadblk` fills or a `storeblk` reads,
//! handed to [`BigFile::loadblk_page`](crate::BigFile::loadblk_page) and
//! [`BigFile::storeblk_page`](crate::BigFile::storeblk_page) so that a
//! loader that cannot be given a plain slice (a Python `loadblk`, whose
//! views of the memory may outlive the call) can map the page itself, at
//! an address of its own that it can take away afterwards, instead of
//! copying the block through memory of its own.

use std::ptr::NonNull;

use bigfile_os::Prot;
use bigfile_ram::{RamError, RamHandle};

use crate::sys;

/// One RAM page during a `loadblk` (writable) or a `storeblk` (read-only).
///
/// Usable from any thread (a load may run on a worker thread); valid only
/// for the call it is handed to.
#[derive(Debug)]
pub struct BlockPage<'a> {
    ramh: &'a RamHandle,
    page: u64,
    /// The page in the RAM handle's window.
    window: NonNull<u8>,
    writable: bool,
}

impl<'a> BlockPage<'a> {
    /// Page `page` of `ramh`, at `window` in the handle's window.
    ///
    /// # Safety
    /// `window` is `page`'s address in `ramh`'s window, and the page is the
    /// call's alone for `'a`: if `writable`, nothing else reads or writes
    /// it; else nothing writes it.
    pub(crate) unsafe fn new(
        ramh: &'a RamHandle,
        page: u64,
        window: NonNull<u8>,
        writable: bool,
    ) -> BlockPage<'a> {
        BlockPage {
            ramh,
            page,
            window,
            writable,
        }
    }

    /// Bytes in the page: the file's block size.
    pub fn len(&self) -> usize {
        self.ramh.page_size()
    }

    /// Always false: a page holds a whole block.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether the call may write the page (a load; a store only reads).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The page's memory, to read.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the window maps the page for as long as the handle lives
        // (`'a`); per `new`, nothing writes it while we read.
        unsafe { std::slice::from_raw_parts(self.window.as_ptr().cast_const(), self.len()) }
    }

    /// The page's memory, to fill. Panics for a store's page.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.writable, "a storeblk's page is read-only");
        // SAFETY: as in `as_slice`; per `new`, a writable page is the call's
        // alone, and `&mut self` makes this the only slice of it.
        unsafe { std::slice::from_raw_parts_mut(self.window.as_ptr(), self.len()) }
    }

    /// The alignment an address given to [`map_at`](Self::map_at) needs:
    /// the page size, so that huge pages (hugetlbfs, transparent huge pages)
    /// are mapped whole.
    pub fn alignment(&self) -> usize {
        self.len()
    }

    /// Map the page at `addr` (`MAP_FIXED`, shared: writes through it are
    /// the page's), read-write for a load and read-only for a store, with
    /// its page-table entries filled where that saves faults (small
    /// pages). One `mmap` call for a huge page.
    ///
    /// # Safety
    /// The caller owns `[addr, addr + len())`: whatever is mapped there is
    /// replaced, and no Rust reference may point into it. The mapping must
    /// be taken away (or replaced) before the call returns, or left
    /// unreachable by anything but the caller: the page is handed to other
    /// blocks later.
    pub unsafe fn map_at(&self, addr: NonNull<u8>) -> Result<(), RamError> {
        let prot = if self.writable {
            Prot::ReadWrite
        } else {
            Prot::Read
        };
        // SAFETY: forwarded to the caller.
        unsafe { self.ramh.map_page_fixed(self.page, addr, prot)? };
        if !self.ramh.is_huge(self.page) {
            // SAFETY: the range was just mapped onto our RAM page.
            unsafe { sys::populate(addr, self.len(), self.writable) };
        }
        Ok(())
    }
}
