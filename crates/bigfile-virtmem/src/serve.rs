//! Serving one page of one mapping: the loading protocol.
//!
//! Used by the fault handler (a thread touched the page) and by prefault
//! (a thread asked for the page). First, in a mapping advised
//! `Advice::Sequential`, the clean page of the block before becomes the
//! first to be reclaimed (drop-behind). The steps, under the RAM lock except
//! where said:
//! - EMPTY: make room within the budget (taking a spare page of the handle,
//!   or reclaiming least recently used clean pages, in batches, whose
//!   unmapping is finished after the lock is dropped; with none clean,
//!   waiting for other threads' loads); if the block was taken on by another
//!   thread meanwhile, start over; else create the page LOADING
//!   with a ticket naming this thread, drop the lock; run `loadblk`
//!   into the handle's persistent window (the page is mapped nowhere, so
//!   nobody sees it half-filled); retake the lock. If the page was
//!   invalidated meanwhile, drop the result and start over; on failure drop
//!   it and fail every waiter; else it is LOADED.
//! - LOADING by another thread: wait on the RAM's condition variable for the
//!   ticket, then start over (or fail with the loader's diagnostic).
//! - LOADING by this thread: the loader touched its own page: fatal; so is
//!   any wait that would close a cycle of threads waiting for each other.
//! - LOADED/DIRTY: wait while a reclaimer still unmaps an earlier page from
//!   this slot; map into the mapping, read-only for a read; for a write,
//!   wait out a writeout of the handle, mark DIRTY, map read-write; populate
//!   the mapping's page-table entries after dropping the lock.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, MutexGuard};
use std::thread;

use bigfile_fault::Access;
use bigfile_ram::Prot;

use crate::fileh::FileHInner;
use crate::state::{Awaited, Deferred, LoadTicket, PageState, Shared, State};
use crate::stats::{CountPair, Counter};

thread_local! {
    /// How many `loadblk`/`storeblk` calls this thread is inside (nested
    /// through faults): such a thread must not wait for other threads'
    /// loads, which may be waiting for it. Const-initialised with no
    /// destructor, so reading it from the fault handler is safe.
    static IN_CALLBACK: Cell<u32> = const { Cell::new(0) };
}

/// Marks this thread inside a `loadblk` or `storeblk` while it lives.
pub(crate) struct InCallback(());

impl InCallback {
    pub(crate) fn enter() -> InCallback {
        IN_CALLBACK.with(|c| c.set(c.get() + 1));
        InCallback(())
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        IN_CALLBACK.with(|c| c.set(c.get() - 1));
    }
}

/// Whether this thread is inside a `loadblk` or `storeblk`.
pub(crate) fn in_callback() -> bool {
    IN_CALLBACK.with(|c| c.get() > 0)
}

/// Why a page could not be served.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Serving would wait on this very thread (a loader touching its own
    /// page, a storeblk writing to its handle under writeout): fatal, SIGSEGV.
    SelfWait(String),
    /// `loadblk` kept failing (or the loader of the page we waited for failed).
    Load(String),
    /// The budget is full of pages that cannot be reclaimed.
    NoMemory(String),
    /// The RAM itself (its filesystem, the OS) has no memory for another
    /// page, and no clean page is left to reclaim.
    RamExhausted {
        message: String,
        source: bigfile_ram::RamError,
    },
    /// An OS call needed to map the page failed.
    Os(String),
}

impl Failure {
    pub(crate) fn message(&self) -> &str {
        match self {
            Failure::SelfWait(m) | Failure::Load(m) | Failure::NoMemory(m) | Failure::Os(m) => m,
            Failure::RamExhausted { message, .. } => message,
        }
    }
}

/// Serve block `blk` of mapping `vma` (its key and start address) of `fh` for `access`.
///
/// `drop_behind`: in a mapping advised sequential, demote the block before
/// (a fault; prefault only for the first block of its range, so it does not
/// reclaim the pages it has just served).
pub(crate) fn serve(
    fh: &FileHInner,
    vma: (usize, usize),
    blk: u64,
    access: Access,
    drop_behind: bool,
) -> Result<(), Failure> {
    let shared = &*fh.shared;
    let ps = shared.page_size();
    let me = thread::current().id();
    let counts = CountPair {
        fileh: &fh.counters,
        ram: &shared.counters,
    };
    counts.add(Counter::Faults, 1);
    let mut st = shared.lock();
    let sequential = st.drop_behind(fh.key, vma, blk, drop_behind);
    loop {
        let Some(pk) = st.filehs[fh.key].pages.get(blk).copied() else {
            // EMPTY: this thread loads it.
            let mut deferred = Deferred::default();
            let room;
            (st, room) = make_room(st, shared, fh, (blk, sequential), &mut deferred);
            let recycled = match room {
                Ok(Room::Ready(recycled)) => recycled,
                Ok(Room::Retry) => {
                    drop(st);
                    deferred.finish(shared);
                    st = shared.lock();
                    continue;
                }
                Err(failure) => {
                    drop(st);
                    deferred.finish(shared);
                    return Err(failure);
                }
            };
            if st.filehs[fh.key].pages.get(blk).is_some() {
                // make_room waited, and meanwhile another thread took the
                // block on: give the room back and serve what it made.
                if let Some(rp) = recycled {
                    deferred.drops.push((fh.ramh.clone(), rp));
                }
                drop(st);
                deferred.finish(shared);
                st = shared.lock();
                continue;
            }
            let ticket = Arc::new(LoadTicket {
                loader: me,
                outcome: Default::default(),
            });
            let pk = st.new_page(fh.key, blk, ticket.clone());
            st.filehs[fh.key].pages.insert(blk, pk);
            drop(st);
            // Unmap what make_room reclaimed (the recycled RAM page among
            // it) before the load writes into it.
            deferred.finish(shared);

            let loaded = load(fh, blk, recycled);

            st = shared.lock();
            let invalidated = st.pages[pk].state == PageState::LoadingInvalidated;
            match loaded {
                Ok(ram_page) => {
                    st.pages[pk].ram_page = Some(ram_page);
                    counts.add(Counter::Resident, 1);
                    counts.add(Counter::Loads, 1);
                    if invalidated {
                        st.forget_page(pk, ps, &shared.counters);
                    } else {
                        st.pages[pk].state = PageState::Loaded;
                        st.pages[pk].ticket = None;
                        st.lru_push_back(pk);
                    }
                    let _ = ticket.outcome.set(Ok(()));
                    shared.notify(&st);
                    // Loaded: the next round maps it. Invalidated: the next
                    // round loads afresh.
                    continue;
                }
                Err((ram_page, failure)) => {
                    // Its memory is given back with the page.
                    st.pages[pk].ram_page = ram_page;
                    if ram_page.is_some() {
                        counts.add(Counter::Resident, 1);
                    }
                    let panic = match failure {
                        LoadFailure::Failed(failure) => {
                            st.forget_page(pk, ps, &shared.counters);
                            let _ = ticket.outcome.set(Err(failure.message().into()));
                            shared.notify(&st);
                            return Err(failure);
                        }
                        LoadFailure::Panicked(panic) => panic,
                    };
                    // Leave no LOADING page behind for waiters to hang on.
                    st.forget_page(pk, ps, &shared.counters);
                    let msg = format!("loadblk of block {blk} of {} panicked", fh.name);
                    let _ = ticket.outcome.set(Err(msg.as_str().into()));
                    shared.notify(&st);
                    drop(st);
                    // The fault handler reports the panic with the faulting
                    // address only: say which block of which file it was.
                    eprintln!("bigfile: {msg}");
                    resume_unwind(panic);
                }
            }
        };

        let page = &st.pages[pk];
        match page.state {
            PageState::Loading | PageState::LoadingInvalidated => {
                let ticket = page.ticket.clone().expect("a loading page has a ticket");
                if ticket.loader == me {
                    return Err(Failure::SelfWait(format!(
                        "loadblk of block {blk} of {} touched the page it is loading; \
                         a loader must not access its own page through a mapping",
                        fh.name
                    )));
                }
                if let Some(chain) = st.would_deadlock(me, ticket.loader) {
                    return Err(Failure::SelfWait(format!(
                        "waiting for block {blk} of {}, which another thread is loading, \
                         would never end: {chain}; loadblk and storeblk must not access pages \
                         other loads or writeouts may be waiting for",
                        fh.name
                    )));
                }
                st.waiting_for.insert(me, Awaited::Load(ticket.clone()));
                while ticket.outcome.get().is_none() {
                    st = shared.wait(st);
                }
                st.waiting_for.remove(&me);
                if let Some(Err(msg)) = ticket.outcome.get() {
                    return Err(Failure::Load(format!(
                        "while waiting for another thread's load: {msg}"
                    )));
                }
            }
            PageState::Loaded | PageState::Dirty => {
                if st.slot_unmapping(fh.key, vma, blk) {
                    // A reclaimer is still unmapping an earlier page of this
                    // block from this very slot.
                    st = shared.wait(st);
                    continue;
                }
                let ram_page = page.ram_page.expect("a resident page has RAM");
                let state = page.state;
                let prot = match access {
                    Access::Read => Prot::Read,
                    Access::Write => {
                        if let Some(writer) = st.filehs[fh.key].writeout {
                            if writer == me {
                                return Err(Failure::SelfWait(format!(
                                    "a write to block {blk} of {} during its writeout, from the \
                                     thread running that writeout (storeblk must not change \
                                     the memory it is storing)",
                                    fh.name
                                )));
                            }
                            // Writes wait for the writeout: storeblk must see
                            // the block as it was when writeout began. Checked
                            // again for each writeout, should another follow.
                            while let Some(writer) = st.filehs[fh.key].writeout {
                                if let Some(chain) = st.would_deadlock(me, writer) {
                                    st.waiting_for.remove(&me);
                                    return Err(Failure::SelfWait(format!(
                                        "a write to block {blk} of {} would wait for its \
                                         writeout forever: {chain}",
                                        fh.name
                                    )));
                                }
                                st.waiting_for
                                    .insert(me, Awaited::Writeout { fk: fh.key, writer });
                                st = shared.wait(st);
                            }
                            st.waiting_for.remove(&me);
                            continue;
                        }
                        if state == PageState::Loaded {
                            st.lru_remove(pk);
                            st.pages[pk].state = PageState::Dirty;
                            st.filehs[fh.key].dirty.insert(blk);
                            counts.add(Counter::Dirty, 1);
                        }
                        Prot::ReadWrite
                    }
                };
                let fresh = st
                    .map_into(fh.key, vma, blk, ram_page, prot, ps)
                    .map_err(|e| Failure::Os(format!("mapping block {blk} of {}: {e}", fh.name)))?;
                st.lru_touch(pk);
                drop(st);
                if let Some(addr) = fresh.filter(|_| !fh.ramh.is_huge(ram_page)) {
                    // Fill the page-table entries now, in one call, rather
                    // than one minor fault per OS page on the accesses to
                    // come (a huge page is mapped whole by the first access,
                    // which, unlike this call, takes no mmap_lock: two
                    // threads faulting contend less). Outside the lock: if
                    // the page is unmapped meanwhile this populates nothing,
                    // which is harmless.
                    // SAFETY: the range is still part of the mapping's
                    // reservation (dropping a Vma waits for its fault
                    // handlers, prefault borrows the Vma); whatever is mapped
                    // there by now (the page, or the reservation after a
                    // reclaim), populating it changes no data.
                    unsafe { crate::sys::populate(addr, ps, prot == Prot::ReadWrite) };
                }
                return Ok(());
            }
        }
    }
}

/// What [`make_room`] found.
enum Room {
    /// There is room for one more page; maybe with a RAM page of the
    /// handle's to reuse once the `Deferred` work is finished.
    Ready(Option<u64>),
    /// Other threads' loads hold the budget, and reclaim left work: finish
    /// it, then try again (the next try waits for those loads).
    Retry,
}

/// Reserve room for one more page within the budget: take a spare of the
/// handle if there is one, else reclaim (spares of other handles, then LRU
/// pages, their unmapping left to `deferred`). A reclaim takes a batch of
/// the handle's oldest pages, the extra ones kept as spares (see `spares`),
/// except in a mapping advised sequential, where drop-behind already hands
/// over the page just left.
///
/// When every resident page is dirty or loading, pages other threads are
/// loading will soon be clean and reclaimable: wait for them rather than
/// fail (unless this thread is itself inside a `loadblk` or `storeblk`, see
/// `State::may_wait_for_loads`); spares other threads are still unmapping
/// are waited for in any case (their reclaimers wait for nothing). Otherwise,
/// with no clean page left, the budget is exhausted.
fn make_room<'a>(
    mut st: MutexGuard<'a, State>,
    shared: &'a Shared,
    fh: &FileHInner,
    (blk, sequential): (u64, bool),
    deferred: &mut Deferred,
) -> (MutexGuard<'a, State>, Result<Room, Failure>) {
    let mut recycled = st.take_spare(fh.key, &shared.counters);
    let mut reclaimed = false;
    while st.resident >= shared.budget_pages() {
        if recycled.is_none() {
            // After a wait, spares of the handle may have become ready.
            recycled = st.take_spare(fh.key, &shared.counters);
            if recycled.is_some() {
                continue;
            }
        }
        if st.drop_spare(&shared.counters, Some(deferred)) {
            continue;
        }
        let want = if recycled.is_none() {
            Some(fh.key)
        } else {
            None
        };
        match st.reclaim_lru(shared.page_size(), &shared.counters, want, Some(deferred)) {
            Some(Some(rp)) => {
                recycled = Some(rp);
                reclaimed = true;
            }
            Some(None) => reclaimed = true,
            None => {
                if let Some(rp) = recycled.take() {
                    // Still mapped where it was until `deferred` is finished.
                    deferred.drops.push((fh.ramh.clone(), rp));
                }
                if st.spares_pending() || st.may_wait_for_loads() {
                    if !deferred.is_empty() {
                        return (st, Ok(Room::Retry));
                    }
                    st = shared.wait(st);
                    continue;
                }
                let failure = Failure::NoMemory(format!(
                    "RAM budget of {} bytes is exhausted by {} dirty or loading pages; \
                     cannot load block {blk} of {} (write out or discard changes, or raise the budget)",
                    shared.budget_pages().saturating_mul(shared.page_size() as u64),
                    st.resident,
                    fh.name
                ));
                return (st, Err(failure));
            }
        }
    }
    if reclaimed && !sequential {
        let ps = shared.page_size();
        for _ in 1..crate::spares::batch_size(shared.budget_pages()) {
            if !st.spare_from_lru(fh.key, ps, &shared.counters, deferred) {
                break;
            }
        }
    }
    (st, Ok(Room::Ready(recycled)))
}

/// Allocate a RAM page for block `blk`, reclaiming clean pages while the OS
/// (or the RAM's filesystem) is out of memory.
fn alloc(fh: &FileHInner, blk: u64) -> Result<u64, Failure> {
    let shared = &*fh.shared;
    loop {
        match fh.ramh.alloc_page(blk) {
            Ok(p) => return Ok(p),
            Err(e) if e.is_exhausted() => {
                let mut st = shared.lock();
                if !st.reclaim_one(shared.page_size(), &shared.counters) {
                    return Err(Failure::RamExhausted {
                        message: format!(
                            "no RAM for block {blk} of {} and no clean page to reclaim: {e}",
                            fh.name
                        ),
                        source: e,
                    });
                }
            }
            Err(e) => {
                return Err(Failure::Os(format!(
                    "allocating RAM for block {blk} of {}: {e}",
                    fh.name
                )));
            }
        }
    }
}

/// Why [`load`] failed.
enum LoadFailure {
    Failed(Failure),
    /// `loadblk` panicked: the caller cleans up, then resumes the unwinding.
    Panicked(Box<dyn std::any::Any + Send>),
}

/// Allocate a RAM page (or take the recycled one) and fill it with
/// `loadblk`, retrying per the handle's policy. Runs without the RAM lock.
/// On failure (a panic of `loadblk` included) returns the RAM page, if one
/// was had, so the caller frees it.
fn load(
    fh: &FileHInner,
    blk: u64,
    recycled: Option<u64>,
) -> Result<u64, (Option<u64>, LoadFailure)> {
    let ram_page = match recycled {
        Some(rp) => rp,
        // Caught too (a bug, no user code runs there): a page left LOADING
        // would hang its waiters.
        None => match catch_unwind(AssertUnwindSafe(|| alloc(fh, blk))) {
            Ok(Ok(rp)) => rp,
            Ok(Err(f)) => return Err((None, LoadFailure::Failed(f))),
            Err(panic) => return Err((None, LoadFailure::Panicked(panic))),
        },
    };
    match catch_unwind(AssertUnwindSafe(|| {
        fill(fh, blk, ram_page, recycled.is_some())
    })) {
        Ok(Ok(())) => Ok(ram_page),
        Ok(Err(f)) => Err((Some(ram_page), LoadFailure::Failed(f))),
        Err(panic) => Err((Some(ram_page), LoadFailure::Panicked(panic))),
    }
}

/// Fill `ram_page` with block `blk` through the handle's window.
fn fill(fh: &FileHInner, blk: u64, ram_page: u64, recycled: bool) -> Result<(), Failure> {
    let shared = &*fh.shared;
    let ps = shared.page_size();
    let counts = CountPair {
        fileh: &fh.counters,
        ram: &shared.counters,
    };
    let window = fh.ramh.window(ram_page).map_err(|e| {
        Failure::Os(format!(
            "window onto RAM page for block {blk} of {}: {e}",
            fh.name
        ))
    })?;
    // The window keeps its page-table entries between loads (nothing drops
    // them but punching the RAM page out), so a recycled RAM page is written
    // at full speed with no fault. A fresh one is populated in one call
    // instead of one write fault per OS page.
    if !recycled {
        // SAFETY: the window maps the RAM file shared and read-write; the
        // page is ours alone while LOADING.
        unsafe { crate::sys::populate(window, ps, true) };
    }
    // SAFETY: `ram_page` was just allocated (or recycled) to this page alone; it is mapped in
    // no mapping yet (the page is LOADING), so this is the only reference to
    // its memory until the load finishes; the window stays valid while the
    // handle's RamHandle (held by `fh`) lives.
    let buf = unsafe { std::slice::from_raw_parts_mut(window.as_ptr(), ps) };
    let policy = fh.load_policy();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let res = {
            let _inside = InCallback::enter();
            fh.file.loadblk(blk, buf)
        };
        match res {
            Ok(()) => return Ok(()),
            Err(e) => {
                counts.add(Counter::LoadErrors, 1);
                if attempt >= policy.attempts {
                    return Err(Failure::Load(format!(
                        "loadblk of block {blk} of {} failed after {attempt} attempt(s): {e}",
                        fh.name
                    )));
                }
                thread::sleep(policy.backoff * attempt);
            }
        }
    }
}
