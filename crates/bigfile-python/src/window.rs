//! Where a Python `loadblk`/`storeblk` sees its block: an address range of
//! ours mapped onto the RAM page itself for the call
//! ([`BlockPage::map_at`]), so Python code writes (or reads) the page with
//! no copy through memory of its own.
//!
//! After the call the page is taken away from the range, one way or the
//! other (`blockbuf` decides):
//! - no view of the block is left (the common case): the range goes to an
//!   idle pool, still mapping the page but reachable by no Python object,
//!   and the next call maps its page over it: one `mmap` per call;
//! - views outlived the call: the range gets zeros at the same address (a
//!   private anonymous mapping), so those views keep a valid address that
//!   no longer reaches the page; the range is unmapped when the last of
//!   them goes.
//!
//! An idle range keeps the RAM file it maps open; [`detach_idle`] unmaps
//! the idle ranges when a handle is closed.
//!
//! The pool is shared by all threads (a load may run on any thread) and
//! only ever tried, never waited for: a thread that finds it locked (or a
//! forked child whose parent was inside it) makes a range of its own.

use std::io;
use std::ptr::NonNull;
use std::sync::Mutex;

use bigfile_virtmem::BlockPage;

/// Idle ranges kept at most: one per thread loading at once, for a few.
const MAX_IDLE: usize = 8;

static IDLE: Mutex<Vec<Range>> = Mutex::new(Vec::new());

/// An address range of ours, whatever is mapped there; unmapped when
/// dropped.
struct Range {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Range` is address space we own; its memory is only accessed
// through Python buffer exports, under the GIL, or by the thread running
// the call, as any Python buffer's is.
unsafe impl Send for Range {}
// SAFETY: as above; no `&Range` method touches the memory.
unsafe impl Sync for Range {}

impl Range {
    /// A fresh range for `page`, aligned as the page needs.
    fn reserve(page: &BlockPage<'_>) -> io::Result<Range> {
        let ptr = bigfile_os::reserve_aligned(page.len(), page.alignment())?;
        Ok(Range {
            ptr,
            len: page.len(),
        })
    }

    /// Replace what is mapped here by anonymous memory (`MAP_FIXED`, so the
    /// addresses are never free meanwhile): zeros with `prot`.
    fn map_anonymous(&self, prot: libc::c_int) -> io::Result<()> {
        // SAFETY: the range is ours (see `Range`); replacing its mapping
        // with fresh anonymous memory invalidates no Rust reference (none
        // points into it: Python views hold raw addresses, which stay
        // valid).
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().cast(),
                self.len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        // SAFETY: our own range; nothing reaches it any more (its owner is
        // being dropped).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A range mapped onto the call's RAM page.
pub(crate) struct PageWindow(Range);

impl PageWindow {
    /// Map `page` (read-write for a load, read-only for a store) at an idle
    /// range of its size, or at a new one; the error says what failed.
    pub(crate) fn map(page: &BlockPage<'_>) -> Result<PageWindow, String> {
        let range = match take_idle(page.len()) {
            Some(r) => r,
            None => Range::reserve(page).map_err(|e| format!("reserve a block window: {e}"))?,
        };
        // SAFETY: the range is ours alone (taken from the pool or just
        // reserved) and no Rust reference points into it.
        unsafe { page.map_at(range.ptr) }.map_err(|e| e.to_string())?;
        Ok(PageWindow(range))
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.0.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len
    }

    /// No view of the range is left: keep it for the next call.
    pub(crate) fn put_back(self) {
        let range = self.0;
        if let Ok(mut idle) = IDLE.try_lock() {
            if idle.len() < MAX_IDLE {
                idle.push(range);
            }
        }
    }

    /// Views of the range outlived the call: zeros at the same addresses
    /// (writable only if the call's were), owned by the returned value. If
    /// the kernel refuses, abort: the views would reach a page that holds
    /// another block next.
    pub(crate) fn into_zeros(self, writable: bool) -> Zeros {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        if let Err(e) = self.0.map_anonymous(prot) {
            eprintln!(
                "bigfile: cannot take a block's page away from the views of it left by \
                 loadblk/storeblk ({e}); aborting rather than let them reach other data"
            );
            std::process::abort();
        }
        Zeros { _range: self.0 }
    }
}

/// Zeros where a page was, kept while views of them live.
pub(crate) struct Zeros {
    _range: Range,
}

/// An idle range of `len` bytes, if the pool has one.
fn take_idle(len: usize) -> Option<Range> {
    let mut idle = IDLE.try_lock().ok()?;
    let i = idle.iter().rposition(|r| r.len == len)?;
    Some(idle.swap_remove(i))
}

/// Unmap every idle range, so none keeps a RAM file open (a closed
/// handle's file goes at once). The next call reserves a fresh range.
pub(crate) fn detach_idle() {
    // Tried, not waited for (see the module docs), but a thread taking or
    // giving back a range holds the lock for a moment only.
    for _ in 0..1000 {
        if let Ok(mut idle) = IDLE.try_lock() {
            idle.clear();
            return;
        }
        std::thread::yield_now();
    }
}
