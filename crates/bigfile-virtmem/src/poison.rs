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
//! The table is a fixed array of atomic words, each a page address with its
//! state in the low bits, because [`take`] runs in the SIGBUS handler: it
//! takes no lock (a thread interrupted while holding one would wait for
//! itself) and allocates nothing. The other operations run on ordinary
//! threads and are serialised by a mutex of their own ([`WRITERS`]), which
//! [`take`] never touches; a slot changes between states by
//! compare-and-swap, so that of a clearing by [`expire`] and one by
//! [`take`], exactly one drops the marker.
//!
//! Clearing drops the page-table entry (`MADV_DONTNEED`; the page, if any,
//! stays in the handle's file), so it must only ever hit a live mapping of
//! ours: a mapping forgets its pages here ([`forget_range`]) before it goes,
//! under the mutex [`expire`] clears under; [`take`] clears only the page
//! its own thread is accessing, in a live mapping.

use std::sync::atomic::{
    AtomicU64, AtomicUsize, Ordering::AcqRel, Ordering::Acquire, Ordering::Release,
};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long a poisoned page fails system calls.
pub(crate) const POISON_TIME: Duration = Duration::from_millis(100);

/// A cleared poison is remembered this long, for a user-mode access that
/// met it just before it was cleared and reaches [`take`] just after
/// (within microseconds). Not longer: a real SIGBUS on that page (the RAM
/// could not provide memory) is taken for the poison until then, the
/// access retried in a loop.
const REMEMBERED: Duration = Duration::from_secs(1);

/// A cleared poison's slot is not taken for a new one sooner than this (a
/// late `take` comes within microseconds; a system call that met the
/// poison never comes, and a table full of those must not keep failed
/// system calls from being failed for long).
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

/// How many pages can be poisoned (or remembered as cleared) at once: a
/// poison lives [`POISON_TIME`], one per failed system call. With every
/// slot taken by live poisons a failed call is not poisoned: its thread
/// faults again (`UffdService::fail`).
const CAPACITY: usize = 64;

/// A slot's state, in the low bits of its word (page addresses are
/// page-aligned): 0 is an empty slot.
const STATE: usize = 0b11;
/// The marker is in place.
const POISONED: usize = 1;
/// The marker was dropped by [`expire`]; remembered for [`take`].
const CLEARED: usize = 2;

/// The poisoned pages: `address | state`, 0 when empty.
static SLOTS: [AtomicUsize; CAPACITY] = [const { AtomicUsize::new(0) }; CAPACITY];
/// When each slot's poison was cleared ([`now_ms`]), for forgetting it
/// after [`REMEMBERED`].
static CLEARED_AT: [AtomicU64; CAPACITY] = [const { AtomicU64::new(0) }; CAPACITY];

/// Serialises every change but [`take`]'s: claiming a slot, clearing by
/// [`expire`] and forgetting by [`forget_range`] (so that no clearing
/// reaches a mapping that is going).
static WRITERS: Mutex<()> = Mutex::new(());

fn writers() -> MutexGuard<'static, ()> {
    WRITERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Milliseconds since the first call.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The slot holding `page_addr` in a state of `states` (bits): its index
/// and word.
fn find(page_addr: usize, states: usize) -> Option<(usize, usize)> {
    SLOTS.iter().enumerate().find_map(|(i, s)| {
        let v = s.load(Acquire);
        (v & !STATE == page_addr && v & states != 0).then_some((i, v))
    })
}

/// Note `page_addr` as poisoned now, before it is (so that an access that
/// meets the poison finds it noted). False when the table is full of live
/// poisons and ones cleared less than `EVICTABLE_AFTER` ago: then the page
/// must not be poisoned (its thread faults again).
pub(crate) fn note(page_addr: usize) -> bool {
    debug_assert_eq!(page_addr & STATE, 0, "a page address");
    let _w = writers();
    let remembered = REMEMBERED.as_millis() as u64;
    let evictable = EVICTABLE_AFTER.as_millis() as u64;
    loop {
        let now = now_ms();
        // Its own slot if it has one, else an empty one, else the oldest
        // one cleared at least `EVICTABLE_AFTER` ago (forgotten first: it is
        // remembered only in case). Not one cleared more recently: a thread
        // that met that poison may still be on its way to `take`, and would
        // die of a SIGBUS no longer known as ours.
        let free = SLOTS
            .iter()
            .zip(&CLEARED_AT)
            .map(|(s, at)| (s, s.load(Acquire), at.load(Acquire)))
            .filter(|&(_, v, at)| {
                v == 0
                    || v & !STATE == page_addr
                    || (v & STATE == CLEARED && now.saturating_sub(at) >= evictable)
            })
            .min_by_key(|&(_, v, at)| match v {
                _ if v & !STATE == page_addr => (0, 0),
                0 => (1, 0),
                _ if now.saturating_sub(at) >= remembered => (2, 0),
                _ => (3, at),
            });
        let Some((slot, v, _)) = free else {
            return false;
        };
        // Only `take` changes a slot meanwhile (to empty): look again then.
        if slot
            .compare_exchange(v, page_addr | POISONED, AcqRel, Acquire)
            .is_ok()
        {
            return true;
        }
    }
}

/// Clear the poison of `[page_addr, page_addr + len)` if it is still there
/// (not cleared by an access, its mapping not gone): [`POISON_TIME`] after
/// it was set, when the system call that met it has returned.
pub(crate) fn expire(page_addr: usize, len: usize) {
    let _w = writers();
    let Some((i, v)) = find(page_addr, POISONED) else {
        return;
    };
    CLEARED_AT[i].store(now_ms(), Release);
    if SLOTS[i]
        .compare_exchange(v, page_addr | CLEARED, AcqRel, Acquire)
        .is_ok()
    {
        // SAFETY: noted and not forgotten: a page of a live mapping (its
        // owner forgets it under `WRITERS`, held here, before unmapping).
        unsafe { zap(page_addr, len) };
    }
}

/// A SIGBUS at `[page_addr, page_addr + len)` in a live mapping: whether it
/// was our poison, cleared now if it was not already (then remembered as
/// cleared: several threads may have met it, each on its way here). The
/// access then loads the page as any other. A poison cleared more than
/// [`REMEMBERED`] ago is not ours any more. Async-signal-safe: no lock, no
/// allocation.
pub(crate) fn take(page_addr: usize, len: usize) -> bool {
    while let Some((i, v)) = find(page_addr, POISONED | CLEARED) {
        if v & STATE == CLEARED {
            let cleared = CLEARED_AT[i].load(Acquire);
            return now_ms().saturating_sub(cleared) < REMEMBERED.as_millis() as u64;
        }
        CLEARED_AT[i].store(now_ms(), Release);
        if SLOTS[i]
            .compare_exchange(v, page_addr | CLEARED, AcqRel, Acquire)
            .is_ok()
        {
            // SAFETY: the caller's live mapping, whose page its own thread
            // is accessing.
            unsafe { zap(page_addr, len) };
            return true;
        }
        // Cleared by `expire` or another thread, or forgotten, meanwhile:
        // look again.
    }
    false
}

/// Whether the page at `page_addr` holds a poison marker now: mapping the
/// page there would fail (`UFFDIO_CONTINUE` finds the slot taken), so it
/// is left unmapped, to be mapped by the access after the poison is gone.
pub(crate) fn is_poisoned(page_addr: usize) -> bool {
    find(page_addr, POISONED).is_some()
}

/// Forget the note of `page_addr`, poisoned after all not: nothing to clear.
pub(crate) fn unnote(page_addr: usize) {
    let _w = writers();
    if let Some((i, v)) = find(page_addr, POISONED) {
        let _ = SLOTS[i].compare_exchange(v, 0, AcqRel, Acquire);
    }
}

/// A mapping of `[start, start + len)` is going: forget its pages (its
/// addresses may be reused by memory a late clearing would wipe).
pub(crate) fn forget_range(start: usize, len: usize) {
    let _w = writers();
    for slot in &SLOTS {
        let v = slot.load(Acquire);
        if v != 0 && (start..start + len).contains(&(v & !STATE)) {
            // Only `take` changes it meanwhile, to empty as well.
            let _ = slot.compare_exchange(v, 0, AcqRel, Acquire);
        }
    }
}

/// The lock of every change but [`take`]'s, for the forking thread to hold
/// across a fork (`uffd.rs`): a child never finds it held by a thread it
/// does not have.
pub(crate) fn hold_for_fork() -> MutexGuard<'static, ()> {
    writers()
}

/// In a forked child (before fork returns, its lock held by the forking
/// thread): forget every poison, the parent's (the child's mappings were
/// put back to reservations, and its own userfaultfd poisons its own).
/// Stores only: async-signal-safe.
pub(crate) fn forget_in_child() {
    for (slot, at) in SLOTS.iter().zip(&CLEARED_AT) {
        slot.store(0, Release);
        at.store(0, Release);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A private anonymous page holding `byte`: MADV_DONTNEED makes it
    /// read zeros, which shows a clearing.
    fn page(byte: u8) -> (usize, usize) {
        let ps = bigfile_os::os_page_size();
        // SAFETY: a new private anonymous mapping; written while we own it.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                ps,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            p.cast::<u8>().write_volatile(byte);
            (p as usize, ps)
        }
    }

    fn first_byte(addr: usize) -> u8 {
        // SAFETY: a page of `page`'s, never unmapped by these tests.
        unsafe { (addr as *const u8).read_volatile() }
    }

    /// The tests share the process's table: one at a time.
    static TABLE: Mutex<()> = Mutex::new(());

    fn table() -> MutexGuard<'static, ()> {
        TABLE.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Found in review: with the table full, `note` took the slot of a
    /// poison cleared a moment ago, so a thread that had met it and was
    /// still on its way to `take` died of a SIGBUS no longer ours.
    #[test]
    fn a_recently_cleared_poison_is_not_forgotten_for_a_new_one() {
        let _t = table();
        let pages: Vec<_> = (0..CAPACITY).map(|_| page(3)).collect();
        for &(addr, ps) in &pages {
            assert!(note(addr));
            expire(addr, ps);
        }
        let (other, _) = page(4);
        assert!(!note(other), "the table is full of poisons remembered");
        for &(addr, ps) in &pages {
            assert!(take(addr, ps), "still ours");
        }
        assert!(!note(other), "met a moment ago: others may be on their way");
        for &(addr, ps) in &pages {
            forget_range(addr, ps);
        }
        assert!(note(other), "room once they are gone");
        unnote(other);
    }

    /// Found by the races with kernel I/O: two threads met one poison (a
    /// user-mode access each); the first one's `take` forgot it, and the
    /// second died of a SIGBUS no longer known as ours.
    #[test]
    fn every_thread_that_met_a_poison_takes_it() {
        let _t = table();
        let (addr, ps) = page(6);
        assert!(note(addr));
        assert!(take(addr, ps), "the first thread's");
        assert_eq!(first_byte(addr), 0, "cleared");
        // SAFETY: our page.
        unsafe { (addr as *mut u8).write_volatile(8) };
        assert!(take(addr, ps), "the second thread's");
        assert_eq!(first_byte(addr), 8, "not cleared twice");
        forget_range(addr, ps);
    }

    /// The SIGBUS handler's `take` may interrupt a thread inside another
    /// operation of the table: it must not wait for that thread (here:
    /// itself, as a handler would).
    #[test]
    fn take_answers_while_its_own_thread_holds_the_table() {
        let _t = table();
        let (addr, ps) = page(7);
        assert!(note(addr));
        assert!(is_poisoned(addr));
        let held = writers();
        assert!(take(addr, ps), "our poison");
        drop(held);
        assert_eq!(first_byte(addr), 0, "the marker (here: the page) dropped");
        assert!(!is_poisoned(addr));
        forget_range(addr, ps);
        assert!(!take(addr, ps), "forgotten");
    }

    /// Cleared by `expire` first, the poison is still recognised by a late
    /// `take`, which drops nothing more.
    #[test]
    fn expire_clears_once_and_take_still_knows_it() {
        let _t = table();
        let (addr, ps) = page(9);
        assert!(note(addr));
        expire(addr, ps);
        assert!(!is_poisoned(addr));
        assert_eq!(first_byte(addr), 0, "cleared");
        // SAFETY: our page.
        unsafe { (addr as *mut u8).write_volatile(5) };
        assert!(take(addr, ps));
        assert_eq!(first_byte(addr), 5, "not cleared twice");
        forget_range(addr, ps);
    }

    /// A forked child forgets its parent's poisons (live and cleared): its
    /// SIGBUS at such an address is no poison of its own.
    #[test]
    fn a_forked_child_forgets_the_parents_poisons() {
        let _t = table();
        let (live, ps) = page(2);
        let (cleared, _) = page(3);
        assert!(note(live));
        assert!(note(cleared));
        expire(cleared, ps);
        forget_in_child();
        assert!(!is_poisoned(live));
        assert!(!take(live, ps) && !take(cleared, ps));
        assert_eq!(first_byte(live), 2, "nothing cleared");
    }

    #[test]
    fn unnote_and_forget_range_forget() {
        let _t = table();
        let (addr, ps) = page(1);
        assert!(note(addr));
        unnote(addr);
        assert!(!is_poisoned(addr));
        assert!(note(addr));
        forget_range(addr, ps);
        assert!(!take(addr, ps));
        assert_eq!(first_byte(addr), 1, "nothing cleared");
    }
}
