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
//!
//! A window is a shared mapping of the RAM file, which a forked child
//! shares with its parent: a process forking inside a `loadblk` would
//! leave the child's `buf` on the parent's page, and the child's writes
//! there in the parent's block. So the windows mapped for calls in progress
//! are tracked ([`LIVE`]), and before fork returns in the child each is
//! replaced by a private copy of what it shows: the child keeps the data,
//! and the parent's page is its own. (Idle ranges still map RAM pages in
//! the child too, but no Python object reaches them, and the next call
//! maps its own page over them.)

use std::cell::RefCell;
use std::io;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, Once};

use bigfile_virtmem::BlockPage;

/// Idle ranges kept at most: one per thread loading at once, for a few.
const MAX_IDLE: usize = 8;

static IDLE: Mutex<Vec<Range>> = Mutex::new(Vec::new());

/// A window mapped onto a RAM page for a call in progress.
struct Live {
    addr: usize,
    len: usize,
    writable: bool,
}

/// The windows of the calls in progress. A leaf lock, held over one
/// `mmap` at most, and across fork(2) (its handlers cut the child's
/// windows from the parent's pages).
static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<Live>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The window at `addr` no longer maps a page for a call.
fn forget_live(live: &mut Vec<Live>, addr: NonNull<u8>) {
    live.retain(|w| w.addr != addr.as_ptr() as usize);
}

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

/// A range mapped onto the call's RAM page (tracked in [`LIVE`] while it
/// is; the range is `None` only once given up).
pub(crate) struct PageWindow(Option<Range>);

impl PageWindow {
    /// Map `page` (read-write for a load, read-only for a store) at an idle
    /// range of its size, or at a new one; the error says what failed.
    pub(crate) fn map(page: &BlockPage<'_>) -> Result<PageWindow, String> {
        install_fork_handlers();
        let range = match take_idle(page.len()) {
            Some(r) => r,
            None => Range::reserve(page).map_err(|e| format!("reserve a block window: {e}"))?,
        };
        // SAFETY: the range is ours alone (taken from the pool or just
        // reserved) and no Rust reference points into it.
        unsafe { page.map_at(range.ptr) }.map_err(|e| e.to_string())?;
        // (A fork before this line leaves the child a window no Python
        // object reaches: the call's buffer is made after.)
        live().push(Live {
            addr: range.ptr.as_ptr() as usize,
            len: range.len,
            writable: page.is_writable(),
        });
        Ok(PageWindow(Some(range)))
    }

    fn range(&self) -> &Range {
        self.0
            .as_ref()
            .expect("a window has its range until given up")
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.range().ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.range().len
    }

    /// No view of the range is left: keep it for the next call.
    pub(crate) fn put_back(mut self) {
        let range = self.0.take().expect("a window has its range");
        forget_live(&mut live(), range.ptr);
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
    pub(crate) fn into_zeros(mut self, writable: bool) -> Zeros {
        let range = self.0.take().expect("a window has its range");
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // Zeros, then no longer live, under one hold of the lock: a fork
        // between would leave the child's views on the page, untracked.
        let mut live = live();
        if let Err(e) = range.map_anonymous(prot) {
            eprintln!(
                "bigfile: cannot take a block's page away from the views of it left by \
                 loadblk/storeblk ({e}); aborting rather than let them reach other data"
            );
            std::process::abort();
        }
        forget_live(&mut live, range.ptr);
        Zeros { _range: range }
    }
}

impl Drop for PageWindow {
    /// A window given up otherwise (the call's buffer was never made): no
    /// view of it exists; unmapped.
    fn drop(&mut self) {
        if let Some(range) = &self.0 {
            forget_live(&mut live(), range.ptr);
        }
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

/// Register the fork handlers that cut a child's windows from its
/// parent's pages, once.
fn install_fork_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Without them a child could write its parent's pages: no way on.
        bigfile_os::at_fork(prepare, parent, child).expect("pthread_atfork");
    });
}

thread_local! {
    /// The table of live windows, held by the forking thread between
    /// `prepare` and `parent`/`child` (the same thread runs all three).
    static HELD: RefCell<Option<MutexGuard<'static, Vec<Live>>>> = const { RefCell::new(None) };
}

unsafe extern "C" fn prepare() {
    HELD.set(Some(live()));
}

unsafe extern "C" fn parent() {
    HELD.take();
}

unsafe extern "C" fn child() {
    let Some(held) = HELD.take() else {
        return;
    };
    for w in held.iter() {
        // SAFETY: a live window is a range of ours mapped onto a RAM page
        // for a call in progress (tracked until given up); no Rust
        // reference points into it.
        if let Err(e) = unsafe { copy_private(w) } {
            eprintln!(
                "bigfile: cannot cut a forked child's loadblk/storeblk buffer from its \
                 parent's page ({e}); aborting rather than let the child write there"
            );
            std::process::abort();
        }
    }
}

/// Replace window `w` by a private anonymous copy of what it shows, with
/// the same protection, at the same address (the views of it stay valid).
///
/// # Safety
/// `w` is a range of ours, mapped and readable; no Rust reference points
/// into it.
unsafe fn copy_private(w: &Live) -> io::Result<()> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a fresh mapping anywhere.
    let copy = unsafe { libc::mmap(std::ptr::null_mut(), w.len, rw, flags, -1, 0) };
    if copy == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both ranges are `w.len` bytes, mapped readable (the copy
    // writable), and distinct.
    unsafe { std::ptr::copy_nonoverlapping(w.addr as *const u8, copy.cast::<u8>(), w.len) };
    // SAFETY: the copy is ours.
    let mut done = w.writable || unsafe { libc::mprotect(copy, w.len, libc::PROT_READ) } == 0;
    if done {
        // SAFETY: the copy replaces the window at its address
        // (MREMAP_FIXED unmaps what was there: the shared mapping of the
        // parent's page); the window's address is ours.
        let at = unsafe {
            libc::mremap(
                copy,
                w.len,
                w.len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                w.addr as *mut libc::c_void,
            )
        };
        done = at != libc::MAP_FAILED;
    }
    if !done {
        let e = io::Error::last_os_error();
        // SAFETY: the copy is ours, and still where it was made.
        unsafe { libc::munmap(copy, w.len) };
        return Err(e);
    }
    Ok(())
}
