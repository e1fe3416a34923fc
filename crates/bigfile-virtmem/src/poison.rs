//! Pages the userfaultfd backend poisoned to fail a system call.
//!
//! When the load a system call waits for fails, the page is poisoned
//! (`UFFDIO_POISON`) and the thread woken: its access finds the poison and
//! the call fails with EFAULT, as on the signal backend. The poison stays
//! for [`POISON_TIME`], long enough for the woken thread to meet it (were it
//! cleared first, the thread would fault again and the load be tried again
//! at once, in a loop as long as the loader fails); then it is cleared, and
//! the next access, by the kernel or in user mode, faults and loads again.
//! A user-mode access meeting the poison first (SIGBUS in the mapping's
//! fault handler) clears it itself and loads. A page is never mapped over
//! a poison marker (the slot stays unmapped until an access after the
//! poison is gone maps it).
//!
//! Clearing drops the page-table entry (`MADV_DONTNEED`; the page, if any,
//! stays in the handle's file), so it must only ever hit a live mapping of
//! ours: a mapping forgets its pages here before it goes, under the same
//! lock the clearing takes.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::uffd_is_ours;

/// How long a poisoned page fails system calls.
pub(crate) const POISON_TIME: Duration = Duration::from_millis(100);

/// A cleared poison is remembered this long, for a user-mode access that
/// met it just before it was cleared and reaches [`take`] just after.
const REMEMBERED: Duration = Duration::from_secs(10);

struct Poison {
    since: Instant,
    cleared: bool,
}

/// Poisoned pages by address.
static POISONED: Mutex<Option<HashMap<usize, Poison>>> = Mutex::new(None);

fn table() -> MutexGuard<'static, Option<HashMap<usize, Poison>>> {
    POISONED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Note `page_addr` as poisoned now, before it is (so that an access that
/// meets the poison finds it noted).
pub(crate) fn note(page_addr: usize) {
    let mut t = table();
    let t = t.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    t.retain(|_, p| !p.cleared || now.duration_since(p.since) < REMEMBERED);
    t.insert(
        page_addr,
        Poison {
            since: now,
            cleared: false,
        },
    );
}

/// Clear the poison of `[page_addr, page_addr + len)` if it is still there
/// (not cleared by an access, its mapping not gone): [`POISON_TIME`] after
/// it was set, when the system call that met it has returned.
pub(crate) fn expire(page_addr: usize, len: usize) {
    let mut t = table();
    if let Some(p) = t.as_mut().and_then(|t| t.get_mut(&page_addr)) {
        if !p.cleared {
            // SAFETY: noted and not forgotten: a page of a live mapping
            // (its owner forgets it under this lock before unmapping).
            unsafe { zap(page_addr, len) };
            p.cleared = true;
        }
    }
}

/// A SIGBUS at `[page_addr, page_addr + len)` in a live mapping: whether it
/// was our poison, cleared now (if it was not already) and forgotten. The
/// access then loads the page as any other.
pub(crate) fn take(page_addr: usize, len: usize) -> bool {
    if !uffd_is_ours() {
        // A forked child: its mappings are on the signal backend, and the
        // table (whose lock a worker of the parent may have held at the
        // fork) is the parent's.
        return false;
    }
    let mut t = table();
    match t.as_mut().and_then(|t| t.remove(&page_addr)) {
        Some(p) => {
            if !p.cleared {
                // SAFETY: the caller's live mapping.
                unsafe { zap(page_addr, len) };
            }
            true
        }
        None => false,
    }
}

/// Whether the page at `page_addr` holds a poison marker now: mapping the
/// page there would fail (`UFFDIO_CONTINUE` finds the slot taken), so it
/// is left unmapped, to be mapped by the access after the poison is gone.
pub(crate) fn is_poisoned(page_addr: usize) -> bool {
    table()
        .as_ref()
        .and_then(|t| t.get(&page_addr))
        .is_some_and(|p| !p.cleared)
}

/// Forget the note of `page_addr`, poisoned after all not: nothing to clear.
pub(crate) fn unnote(page_addr: usize) {
    if let Some(t) = table().as_mut() {
        t.remove(&page_addr);
    }
}

/// A mapping of `[start, start + len)` is going: forget its pages (its
/// addresses may be reused by memory a late clearing would wipe).
pub(crate) fn forget_range(start: usize, len: usize) {
    if !uffd_is_ours() {
        // A forked child: the table is the parent's (see `take`).
        return;
    }
    if let Some(t) = table().as_mut() {
        t.retain(|&a, _| !(start..start + len).contains(&a));
    }
}

/// Drop the page-table entries of `[addr, addr + len)`, the poison marker
/// with them: the next access faults to the userfaultfd.
///
/// # Safety
/// The range is a slot of a live mapping of ours (the page, if any, stays
/// in the handle's file).
unsafe fn zap(addr: usize, len: usize) {
    // SAFETY: forwarded to the caller.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    debug_assert_eq!(rc, 0, "MADV_DONTNEED on a mapping of ours");
}
