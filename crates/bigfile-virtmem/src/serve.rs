//! Serving one page of one mapping: the loading protocol (ARCHITECTURE.md
//! walks through it). [`serve`] does not know who asked: a fault source
//! (`source.rs`) turns its faults into [`PageRequest`]s and reports the
//! outcome its own way.
//!
//! A round looks at the block's page, under the RAM lock, and takes one
//! step: EMPTY → [`load`] it on this thread; LOADING → [`wait_for_load`];
//! LOADED or DIRTY → [`map_page`] into the mapping. A step that had to wait
//! or load hands the lock back for another round, since anything may have
//! happened meanwhile.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;

use bigfile_fault::Access;
use bigfile_os::Prot;

use crate::blockpage::BlockPage;
use crate::callback::InCallback;
use crate::failure::{Failure, ALLOCATING, MAPPING, WINDOWING};
use crate::fork_generation;
use crate::fresh;
use crate::handle::FileHInner;
use crate::host::HostLease;
use crate::keys::{FileKey, PageKey, RamPage, VmaId};
use crate::mapper::{Deferred, MapError, Mapper};
use crate::pages::{LoadEnd, PageState};
use crate::readahead;
use crate::reclaim::{make_room, reclaim_one, Room};
use crate::shared::{Guard, Shared};
use crate::state::{self, Unmap};
use crate::stats::Counter;
use crate::streak::{Execution, Lost};
use crate::sys;
use crate::waits::{TakeOver, Ticket};

/// One page to serve: a block of a mapping, for an access.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PageRequest {
    pub(crate) vma: VmaId,
    pub(crate) blk: u64,
    pub(crate) access: Access,
    /// Note the request in its mapping's stream (sequential detection) and,
    /// when the mapping is read sequentially, demote the block before
    /// (drop-behind): for a fault; for prefault only for the first block of
    /// its range, so it does not reclaim the pages it has just served.
    pub(crate) drop_behind: bool,
    /// `Fault::execution` of the access that faulted, which keeps the page
    /// it was served last (`streak.rs`); `None` for prefault, which
    /// re-executes nothing.
    pub(crate) execution: Option<u64>,
    /// For a fault a system call took on a buffer it copies (userfaultfd
    /// backend), the block after the buffer's last in this mapping: the
    /// blocks up to there are read ahead and mapped as they load
    /// (ARCHITECTURE.md, "Read-ahead", "A system call's buffer").
    pub(crate) call_end: Option<u64>,
}

/// Serve `req` for handle `fh`: when this returns `Ok`, the page is mapped
/// in the request's mapping with the access it asked for. `host` is the
/// host lock, released only before a step that may need it: calling a
/// loader that takes it, waiting for work that may take it.
pub(crate) fn serve(
    fh: &FileHInner,
    req: &PageRequest,
    host: &mut HostLease,
) -> Result<(), Failure> {
    fh.counts().add(Counter::Faults, 1);
    let access = req.execution.map(|execution| Execution {
        ram: Arc::as_ptr(&fh.shared) as usize,
        execution,
    });
    let pin = match &access {
        Some(a) => a.begin(fh.key, req.blk).map_err(|Lost| Failure::TooWide {
            budget: fh.shared.budget_pages() * fh.page_size() as u64,
        })?,
        None => None,
    };
    fh.shared.adapt_budget();
    // Declared before the lock: released after it is dropped.
    let _pinned = pin.map(|pin| HeldPin {
        shared: &fh.shared,
        pin,
    });
    let mut st = fh.shared.lock();
    if let Some(pin) = pin {
        // For the reclaim of the RAMs sharing the budget, which the
        // thread-local pin does not reach.
        st.hold_pin(pin);
    }
    let sequential = st.drop_behind(
        fh.key,
        req.vma,
        req.blk,
        req.drop_behind,
        fh.shared.counters(),
    );
    // Read-ahead runs the loaders that allow it (`BigFile::reads_ahead`),
    // once the fault is served: a failed one reads nothing ahead.
    let ahead = req.drop_behind && (sequential || req.call_end.is_some()) && fh.reads_ahead;
    loop {
        st = match st.lookup(fh.key, req.blk) {
            None => load(fh, st, (req.blk, sequential), (access.as_ref(), pin), host)?,
            Some(pk) => match st.pages().get(pk).state() {
                PageState::Loading | PageState::LoadingInvalidated => {
                    wait_for_load(fh, st, (req.blk, pk), host)?
                }
                PageState::Loaded | PageState::Dirty => {
                    match map_page(fh, st, (req, pk, pin), host)? {
                        Some(st) => st,
                        None => {
                            if let Some(a) = &access {
                                a.served(fh.key, req.blk);
                            }
                            if ahead {
                                readahead::issue(
                                    fh,
                                    (req.vma, req.blk, req.call_end),
                                    pin,
                                    fill_ahead,
                                );
                            }
                            return Ok(());
                        }
                    }
                }
            },
        };
    }
}

/// A fault's pin, held in its RAM's state (`State::hold_pin`) until the
/// fault is over, then released under the lock retaken.
struct HeldPin<'a> {
    shared: &'a Shared,
    pin: (FileKey, u64),
}

impl Drop for HeldPin<'_> {
    fn drop(&mut self) {
        self.shared.lock().release_pin(self.pin);
    }
}

/// EMPTY: make room within the budget, then load the block on this
/// thread. Returns the lock retaken, for the next round to serve what is
/// there now (the loaded page; nothing, if it was invalidated meanwhile).
/// `access` is the faulting access (none for prefault), `pin` the block
/// whose page it still needs (`streak.rs`).
fn load<'a>(
    fh: &'a FileHInner,
    st: Guard<'a>,
    (blk, sequential): (u64, bool),
    (access, pin): (Option<&Execution>, Option<(FileKey, u64)>),
    host: &mut HostLease,
) -> Result<Guard<'a>, Failure> {
    let shared = &*fh.shared;
    let mut deferred = Deferred::default();
    let (mut st, room) = make_room(
        st,
        shared,
        (fh.key, &fh.ramh),
        (sequential, access, pin),
        host,
        &mut deferred,
    );
    let recycled = match room {
        Ok(Room::Ready(recycled)) => recycled,
        // Retry: after the deferred work, the next round waits for loads.
        other => {
            drop(st);
            deferred.finish(shared);
            return other.map(|_| shared.lock());
        }
    };
    if st.lookup(fh.key, blk).is_some() {
        // make_room waited, and meanwhile another thread took the block
        // on: give the room back and serve what it made.
        if let Some(rp) = recycled {
            deferred.release(fh.ramh.clone(), rp);
        }
        drop(st);
        deferred.finish(shared);
        return Ok(shared.lock());
    }
    let ticket = Ticket::mine_for(fh.needs_host);
    let pk = st.begin_load(fh.key, blk, ticket.clone());
    if fresh::wanted(&fh.shared, fh.reads_ahead) {
        // The next load's page, made while this one loads.
        fresh::ask(&fh.shared, &mut st, fh.key);
    }
    load_here(fh, st, (pk, blk), (&ticket, recycled), (deferred, host))
}

/// Load page `pk` (block `blk`, LOADING under `ticket`, this thread's) on
/// this thread into `recycled` (or a new RAM page), once `deferred` is
/// finished without the lock; the lock retaken.
fn load_here<'a>(
    fh: &'a FileHInner,
    st: Guard<'a>,
    (pk, blk): (PageKey, u64),
    (ticket, recycled): (&Arc<Ticket>, Option<RamPage>),
    (deferred, host): (Deferred, &mut HostLease),
) -> Result<Guard<'a>, Failure> {
    let shared = &*fh.shared;
    let forks = fork_generation::generation();
    drop(st);
    // Unmap what make_room reclaimed (the recycled RAM page among it)
    // before the load writes into it.
    deferred.finish(shared);
    // A loader that takes the host lock may run on another thread's behalf
    // too (nested faults): never call it holding the lock.
    host.release_if(fh.needs_host);
    let loaded = fill_page(fh, blk, recycled);
    let st = shared.lock();
    if fork_generation::generation() != forks {
        // loadblk forked, and this is the child, whose state forgot the
        // page (and whose RAM handle is new): load it again, afresh. (On
        // a faulting thread, which goes on to its access: a worker's child
        // ended as the call returned, `worker.rs`.)
        if let Err((_, LoadFailure::Panicked(panic))) = loaded {
            drop(st);
            resume_unwind(panic)
        }
        return Ok(st);
    }
    finish_load(fh, st, (pk, blk), ticket, loaded)
}

/// After the load of `pk` (block `blk`): make the page LOADED, or drop it
/// (invalidated meanwhile, or the load failed), and tell the waiters.
fn finish_load<'a>(
    fh: &'a FileHInner,
    mut st: Guard<'a>,
    (pk, blk): (PageKey, u64),
    ticket: &Ticket,
    loaded: Result<RamPage, (Option<RamPage>, LoadFailure)>,
) -> Result<Guard<'a>, Failure> {
    let shared = &*fh.shared;
    let mapper = Mapper::of(shared);
    let rc = shared.counters();
    let (ram_page, failure) = match loaded {
        Ok(rp) => {
            if st.finish_load(pk, rp, rc) == LoadEnd::Invalidated {
                mapper.forget(&mut st, pk, rc);
            }
            ticket.finish(Ok(()));
            shared.notify(&st);
            return Ok(st);
        }
        Err(failed) => failed,
    };
    // Leave no LOADING page behind for waiters to hang on; its memory goes
    // back. (A loading page is mapped nowhere: no slot to unmap.)
    st.detach(pk, rc, Unmap::Now, &mut Vec::new());
    if let Some(rp) = ram_page {
        mapper.release(&fh.ramh, rp);
    }
    match failure {
        LoadFailure::Failed(failure) => {
            ticket.finish(Err(failure.clone()));
            shared.notify(&st);
            Err(failure)
        }
        LoadFailure::Panicked(panic) => {
            ticket.finish(Err(Failure::Panicked));
            shared.notify(&st);
            drop(st);
            // The fault handler reports the panic with the faulting address
            // only: say which block of which file it was.
            eprintln!("bigfile: {}", Failure::Panicked.message(blk, &fh.name));
            resume_unwind(panic)
        }
    }
}

/// LOADING by another thread: wait for its load, then look again. Fails
/// with the loader's own failure, or when the wait would never end (this
/// thread is the loader: it touched its own page; or a cycle of waits).
/// A loader that may take the host lock gets it first: the lock is
/// released, and the next round looks again.
fn wait_for_load<'a>(
    fh: &'a FileHInner,
    st: Guard<'a>,
    (blk, pk): (u64, PageKey),
    host: &mut HostLease,
) -> Result<Guard<'a>, Failure> {
    let ticket = st
        .pages()
        .get(pk)
        .ticket()
        .expect("a loading page has a ticket")
        .clone();
    match ticket.take_over() {
        TakeOver::Taken(recycled) => {
            return take_over(fh, st, (blk, pk), (&ticket, recycled), host)
        }
        // Claimable once the thread asking it has unmapped its page
        // (`readahead::issue`, which holds no lock of ours meanwhile, nor
        // waits for any), and notifies.
        TakeOver::NotYet => return Ok(fh.shared.wait(st)),
        TakeOver::No => {}
    }
    if ticket.needs_host() && host.kept() {
        drop(st);
        host.release_if(true);
        return Ok(fh.shared.lock());
    }
    let st = fh.shared.wait_for(st, &ticket).map_err(|cycle| {
        Failure::Deadlock(if cycle.is_self() {
            format!(
                "loadblk of block {blk} of {} touched the page it is loading; \
                 a loader must not access its own page through a mapping",
                fh.name
            )
        } else if cycle.is_own_load_in_system_call() {
            format!(
                "loadblk of block {blk} of {} made a system call on the page it is \
                 loading ({cycle}); a loader must not access its own page through a mapping",
                fh.name
            )
        } else {
            format!(
                "waiting for block {blk} of {}, which another thread is loading, \
                 would never end: {cycle}; loadblk and storeblk must not access pages \
                 other loads or writeouts may be waiting for",
                fh.name
            )
        })
    })?;
    match ticket.outcome() {
        // A read-ahead's failure is no one's: the next round loads afresh.
        Some(Err(failure)) if !ticket.is_read_ahead() => {
            Err(Failure::Waited(Box::new(failure.clone())))
        }
        _ => Ok(st),
    }
}

/// LOADING by a read-ahead job that its worker has not begun (`ticket`'s,
/// just claimed with the RAM page `recycled` reclaimed for it): load it on
/// this thread instead, under a ticket of its own. Never wait for a job
/// that has not begun: it may be queued behind the very load that faulted
/// (a loader reading another mapping, on that worker), and otherwise waits
/// for the loads before it. The worker skips it; those who waited for the
/// worker's ticket wait for this thread's.
fn take_over<'a>(
    fh: &'a FileHInner,
    mut st: Guard<'a>,
    (blk, pk): (u64, PageKey),
    (queued, recycled): (&Ticket, Option<RamPage>),
    host: &mut HostLease,
) -> Result<Guard<'a>, Failure> {
    let ticket = Ticket::mine_for(fh.needs_host);
    st.take_over_load(pk, ticket.clone());
    queued.finish(Ok(()));
    fh.shared.notify(&st);
    load_here(
        fh,
        st,
        (pk, blk),
        (&ticket, recycled),
        (Deferred::default(), host),
    )
}

/// LOADED or DIRTY: map the page into the request's mapping, read-only for
/// a read; for a write, once no writeout of the handle runs, dirty and
/// read-write. Then populate it without the lock. `Ok(None)` when done,
/// `Ok(Some(lock))` when it had to wait and must look again. `pin` is the
/// block the access still needs (`streak.rs`).
fn map_page<'a>(
    fh: &'a FileHInner,
    mut st: Guard<'a>,
    (req, pk, pin): (&PageRequest, PageKey, Option<(FileKey, u64)>),
    host: &mut HostLease,
) -> Result<Option<Guard<'a>>, Failure> {
    let shared = &*fh.shared;
    if st.slot_unmapping(fh.key, req.vma, req.blk) {
        // A reclaimer is still unmapping an earlier page of this block
        // from this very slot.
        return Ok(Some(shared.wait(st)));
    }
    let prot = match req.access {
        Access::Read => Prot::Read,
        Access::Write => {
            if let Some(writeout) = st.writeout(fh.key).cloned() {
                return wait_out_writeout(fh, st, (req.blk, &writeout), host).map(Some);
            }
            if st.block_unmapping(fh.key, req.blk) {
                // A reclaimer is still unmapping an earlier page of this
                // block from another mapping, which shows the old data
                // until then: changed here, the block would show two
                // contents at once. (Its reclaimer waits for nothing.)
                return Ok(Some(shared.wait(st)));
            }
            st.mark_dirty(pk, shared.counters());
            Prot::ReadWrite
        }
    };
    let ram_page = st
        .pages()
        .get(pk)
        .ram_page()
        .expect("a resident page has RAM");
    if state::mapped_in_process() >= state::mapped_slots_kept()
        && st
            .slot(fh.key, req.vma, req.blk, fh.page_size())
            .is_some_and(|s| !s.mapped)
    {
        let pin = pin.and_then(|(fk, blk)| st.find_page(fk, blk));
        free_mappings(&mut st, shared, (pk, pin));
    }
    let mapper = Mapper::of(shared);
    let fresh = mapper
        .map(&mut st, fh.key, req.vma, (req.blk, ram_page), prot)
        .map_err(|e| match e {
            MapError::Map(source) => Failure::Ram {
                doing: MAPPING,
                source,
            },
            MapError::Protect(source) => Failure::Os {
                op: "mprotect",
                source,
            },
            MapError::Uffd(op, source) => Failure::Os { op, source },
        })?;
    st.touch(pk);
    st.reached(pk, shared.counters());
    drop(st);
    if let Some(addr) = fresh.filter(|_| !fh.ramh.is_huge(ram_page.0)) {
        // Populated now rather than by a minor fault per OS page on the
        // accesses to come (a huge page is mapped whole by the first access,
        // which, unlike this call, takes no mmap_lock: two threads faulting
        // contend less). Outside the lock: if the page is unmapped meanwhile
        // this populates nothing, which is harmless.
        // SAFETY: the range is still part of the mapping's reservation
        // (dropping a Vma waits for its fault handlers, prefault borrows the
        // Vma); whatever is mapped there by now (the page, or the
        // reservation after a reclaim), populating it changes no data.
        unsafe { mapper.populate(addr, prot == Prot::ReadWrite) };
    }
    Ok(None)
}

/// Pages taken away at once when the process keeps as many slots mapped as
/// it may (`state::mapped_slots_kept`).
const MAPPINGS_FREED: usize = 64;

/// Take up to [`MAPPINGS_FREED`] clean pages of this RAM away (least
/// recently used first; never `pk`, the page about to be mapped, nor
/// `pin`, the other page its access needs, else an instruction touching
/// both would take each from the other in turn forever): the
/// process keeps as many slots mapped as the kernel's limit on mappings
/// allows (`vm.max_map_count`; past it, mapping a page fails with ENOMEM,
/// and a fault with SIGBUS), so a budget bigger than that holds fewer pages
/// instead.
fn free_mappings(
    st: &mut Guard<'_>,
    shared: &crate::shared::Shared,
    (pk, pin): (PageKey, Option<PageKey>),
) {
    let mut freed = 0;
    while freed < MAPPINGS_FREED {
        if let Some(p) = pin.filter(|&p| st.lru().oldest() == Some(p)) {
            // The access still needs it: the next oldest goes.
            st.touch(p);
        }
        let spared = |oldest| oldest == pk || Some(oldest) == pin;
        if st.lru().oldest().is_none_or(spared) || !reclaim_one(st, shared) {
            return;
        }
        freed += 1;
    }
}

/// A write during a writeout of the handle waits for it: storeblk must see
/// the block as it was when the writeout began. (The next round checks
/// again, should another writeout follow; a storeblk that may take the host
/// lock gets it first, as in [`wait_for_load`].)
fn wait_out_writeout<'a>(
    fh: &'a FileHInner,
    st: Guard<'a>,
    (blk, writeout): (u64, &Arc<Ticket>),
    host: &mut HostLease,
) -> Result<Guard<'a>, Failure> {
    if writeout.needs_host() && host.kept() {
        drop(st);
        host.release_if(true);
        return Ok(fh.shared.lock());
    }
    fh.shared.wait_for(st, writeout).map_err(|cycle| {
        Failure::Deadlock(if cycle.is_self() {
            format!(
                "a write to block {blk} of {} during its writeout, from the thread \
                 running that writeout (storeblk must not change the memory it is storing)",
                fh.name
            )
        } else {
            format!(
                "a write to block {blk} of {} would wait for its writeout forever: {cycle}",
                fh.name
            )
        })
    })
}

/// Why [`fill_page`] failed.
enum LoadFailure {
    Failed(Failure),
    /// `loadblk` panicked: the caller cleans up, then resumes the unwinding.
    Panicked(Box<dyn Any + Send>),
}

/// Allocate a RAM page (or take the recycled one) and fill it with block
/// `blk`. Runs without the RAM lock. On failure (a panic included: a page
/// left LOADING would hang its waiters) returns the RAM page, if one was
/// had, for the caller to give back.
fn fill_page(
    fh: &FileHInner,
    blk: u64,
    recycled: Option<RamPage>,
) -> Result<RamPage, (Option<RamPage>, LoadFailure)> {
    let ram_page = match recycled {
        Some(rp) => rp,
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

/// [`fill_page`] for a read-ahead worker, which reports nothing: a panic
/// of `loadblk` (reported by the panic hook) fails the load like an error.
fn fill_ahead(
    fh: &FileHInner,
    blk: u64,
    recycled: Option<RamPage>,
) -> Result<RamPage, (Option<RamPage>, Failure)> {
    fill_page(fh, blk, recycled).map_err(|(rp, failure)| match failure {
        LoadFailure::Failed(f) => (rp, f),
        LoadFailure::Panicked(_) => (rp, Failure::Panicked),
    })
}

/// Allocate a RAM page for block `blk`, reclaiming clean pages while the OS
/// (or the RAM's filesystem) is out of memory.
fn alloc(fh: &FileHInner, blk: u64) -> Result<RamPage, Failure> {
    loop {
        match fh.ramh.alloc_page(blk) {
            Ok(p) => return Ok(RamPage(p)),
            Err(e) if e.is_exhausted() => {
                // A fresh page being made (its memory maybe the last) is
                // given back by reclaim once made, before any block: wait
                // for it rather than reclaim a block or fail.
                let mut st = fresh::wait_idle(&fh.shared, fh.shared.lock(), None);
                if !reclaim_one(&mut st, &fh.shared) {
                    return Err(Failure::RamExhausted(e));
                }
            }
            Err(source) => {
                return Err(Failure::Ram {
                    doing: ALLOCATING,
                    source,
                })
            }
        }
    }
}

/// Fill `ram_page` with block `blk` through the handle's window, retrying
/// per the handle's load policy.
fn fill(fh: &FileHInner, blk: u64, ram_page: RamPage, recycled: bool) -> Result<(), Failure> {
    let window = fh.ramh.window(ram_page.0).map_err(|source| Failure::Ram {
        doing: WINDOWING,
        source,
    })?;
    // The window keeps its page-table entries between loads (nothing drops
    // them but punching the RAM page out), so a recycled RAM page is written
    // at full speed with no fault. A fresh one is populated in one call
    // instead of one write fault per OS page, on either backend (the window
    // is never registered with the userfaultfd: on that backend every load
    // is into a fresh page, and the loader's 512 minor faults per 2 MiB
    // cost several times its copy).
    if !recycled {
        // SAFETY: the window maps the RAM file shared and read-write; the
        // page is ours alone while LOADING.
        unsafe { sys::populate(window, fh.page_size(), true) };
    }
    // SAFETY: `ram_page` was just allocated (or recycled) to this page
    // alone; it is mapped in no mapping yet (the page is LOADING), so the
    // load is the only user of its memory until it finishes; the window
    // stays valid while the handle's RamHandle (held by `fh`) lives.
    let mut page = unsafe { BlockPage::new(&fh.ramh, ram_page.0, window, true) };
    let policy = fh.load_policy();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let res = {
            let _inside = InCallback::enter(("loadblk", blk, &fh.name));
            fh.file.loadblk_page(blk, &mut page)
        };
        let Err(e) = res else {
            return Ok(());
        };
        fh.counts().add(Counter::LoadErrors, 1);
        if attempt >= policy.attempts {
            return Err(Failure::Load {
                attempts: attempt,
                source: Arc::from(e),
            });
        }
        thread::sleep(policy.backoff * attempt);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use bigfile_testkit::memory::prot_at;
    use bigfile_testkit::{Call, MemFile};

    use super::*;
    use crate::bigfile::{BigFile, BlockError};
    use crate::{FileH, LoadPolicy, PageState, Ram, Vma};

    const BLK: usize = 4096;

    /// The test kit's memory file as this crate's BigFile; the flag is its
    /// `needs_host_lock`.
    struct Kit(Arc<MemFile>, bool);

    impl BigFile for Kit {
        fn blksize(&self) -> usize {
            self.0.blksize()
        }
        fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            self.0.load(blk, buf)
        }
        fn storeblk(&self, blk: u64, buf: &[u8]) -> Result<(), BlockError> {
            self.0.store(blk, buf)
        }
        fn name(&self) -> String {
            self.0.name().to_owned()
        }
        fn needs_host_lock(&self) -> bool {
            self.1
        }
    }

    /// Serve as a thread that holds no host lock would.
    fn serve_now(fh: &FileHInner, req: &PageRequest) -> Result<(), Failure> {
        serve(fh, req, &mut HostLease::default())
    }

    /// Serve `req` of `fh` on a thread of its own; its result comes on the
    /// receiver.
    fn serve_on_thread(
        fh: &FileH,
        req: PageRequest,
    ) -> (
        thread::JoinHandle<()>,
        std::sync::mpsc::Receiver<Result<(), Failure>>,
    ) {
        let (done_tx, done) = std::sync::mpsc::channel();
        let inner = fh.inner.clone();
        let t = thread::spawn(move || done_tx.send(serve_now(&inner, &req)).unwrap());
        (t, done)
    }

    /// A handle of a memory file on a RAM of `budget` pages, and a mapping
    /// of its first 4 blocks (no fault is taken: the tests call `serve`).
    fn setup(budget: u64) -> (Arc<MemFile>, FileH, Vma) {
        setup_with(budget, true)
    }

    /// As [`setup`], with a file whose `needs_host_lock` is `host`.
    fn setup_with(budget: u64, host: bool) -> (Arc<MemFile>, FileH, Vma) {
        let file = Arc::new(MemFile::new(BLK));
        // The signal backend: these tests check its page protections.
        let ram = Ram::from_spec(&format!("memfd,pagesize={BLK}"))
            .unwrap()
            .with_fault_backend(crate::FaultBackend::Signals)
            .unwrap()
            .with_budget(budget * BLK as u64);
        let fh = FileH::open(Arc::new(Kit(file.clone(), host)), Some(&ram)).unwrap();
        fh.set_load_policy(LoadPolicy {
            attempts: 2,
            backoff: std::time::Duration::ZERO,
        });
        let vma = fh.mmap(0, 4).unwrap();
        (file, fh, vma)
    }

    fn request(vma: &Vma, blk: u64, access: Access) -> PageRequest {
        PageRequest {
            vma: vma.id(),
            blk,
            access,
            drop_behind: false,
            execution: None,
            call_end: None,
        }
    }

    /// A request of the access `execution` (one instruction's faults).
    fn of_access(vma: &Vma, blk: u64, access: Access, execution: u64) -> PageRequest {
        PageRequest {
            execution: Some(execution),
            ..request(vma, blk, access)
        }
    }

    fn prot_of(vma: &Vma, blk: u64) -> String {
        prot_at(vma.as_ptr() as usize + blk as usize * BLK).unwrap()
    }

    #[test]
    fn a_read_loads_once_and_maps_read_only() {
        let (file, fh, vma) = setup(4);
        let req = request(&vma, 2, Access::Read);
        serve_now(&fh.inner, &req).unwrap();
        assert_eq!(fh.page_state(2), Some(PageState::Loaded));
        assert_eq!(vma.mapped_pages(), [2]);
        assert_eq!(prot_of(&vma, 2), "r--s");
        serve_now(&fh.inner, &req).unwrap();
        assert_eq!(file.take_calls(), [Call::Load(2)]);
        let stats = fh.stats();
        assert_eq!((stats.faults, stats.loads, stats.resident_pages), (2, 1, 1));
        let mut b = [0];
        vma.read_at(2 * BLK, &mut b).unwrap();
        assert_eq!(b[0], MemFile::initial(2));
    }

    /// A load in a RAM sharing its budget with another (a forked child's
    /// default RAMs) takes the other's oldest page, unless a fault in
    /// progress there keeps it: the other page of its access.
    #[test]
    fn a_load_in_a_shared_budget_spares_the_other_rams_pin() {
        let (old_file, old_fh, old_vma) = setup(3);
        let pages = bigfile_ram::Ram::new(format!("memfd,pagesize={BLK}").parse().unwrap());
        let new = Ram::renewing(pages.unwrap(), old_fh.ram());
        let new_file = Arc::new(MemFile::new(BLK));
        let new_fh = FileH::open(Arc::new(Kit(new_file, true)), Some(&new)).unwrap();
        let new_vma = new_fh.mmap(0, 4).unwrap();
        // One access spans blocks 0 and 1 of the old RAM: its fault on 1
        // keeps 0, the oldest page of the two RAMs.
        serve_now(&old_fh.inner, &of_access(&old_vma, 0, Access::Read, 7)).unwrap();
        serve_now(&new_fh.inner, &request(&new_vma, 0, Access::Read)).unwrap();
        {
            // While block 1 loads (the budget full with it), another
            // thread loads in the new RAM.
            let (new_fh, req) = (new_fh.inner.clone(), request(&new_vma, 1, Access::Read));
            old_file.on_load(move |_, _| {
                let (new_fh, req) = (new_fh.clone(), req);
                thread::spawn(move || serve_now(&new_fh, &req))
                    .join()
                    .unwrap()
                    .unwrap();
                Ok(())
            });
        }
        serve_now(&old_fh.inner, &of_access(&old_vma, 1, Access::Read, 7)).unwrap();
        old_file.clear_load_hook();
        assert_eq!(old_fh.page_state(0), Some(PageState::Loaded), "the pin");
        assert_eq!(new_fh.page_state(0), None, "the new RAM's own page went");
        assert_eq!(new_fh.page_state(1), Some(PageState::Loaded));
        // The fault over, its pin is kept no more.
        serve_now(&new_fh.inner, &request(&new_vma, 2, Access::Read)).unwrap();
        assert_eq!(old_fh.page_state(0), None, "the oldest page went");
    }

    #[test]
    fn a_write_dirties_the_page_and_maps_it_read_write() {
        let (_file, fh, vma) = setup(4);
        serve_now(&fh.inner, &request(&vma, 1, Access::Read)).unwrap();
        serve_now(&fh.inner, &request(&vma, 1, Access::Write)).unwrap();
        assert_eq!(fh.page_state(1), Some(PageState::Dirty));
        assert_eq!(fh.dirty_blocks(), [1]);
        assert_eq!(prot_of(&vma, 1), "rw-s");
    }

    #[test]
    fn a_budget_full_of_dirty_pages_fails_the_next_load() {
        let (file, fh, vma) = setup(1);
        serve_now(&fh.inner, &request(&vma, 0, Access::Write)).unwrap();
        let f = serve_now(&fh.inner, &request(&vma, 1, Access::Read)).unwrap_err();
        assert!(
            matches!(f, Failure::Budget { budget, pinned: 1 } if budget == BLK as u64),
            "{f:?}"
        );
        assert_eq!(file.take_calls(), [Call::Load(0)]);
        assert_eq!(fh.page_state(1), None);
    }

    #[test]
    fn a_failing_load_is_retried_then_fails_with_the_loaders_error() {
        let (file, fh, vma) = setup(4);
        file.on_load(|blk, _| Err(format!("media error at {blk}").into()));
        let f = serve_now(&fh.inner, &request(&vma, 3, Access::Read)).unwrap_err();
        let Failure::Load { attempts, source } = &f else {
            panic!("{f:?}");
        };
        assert_eq!(
            (*attempts, source.to_string()),
            (2, "media error at 3".into())
        );
        assert_eq!(fh.page_state(3), None, "no LOADING page left behind");
        assert_eq!(fh.stats().load_errors, 2);
        assert_eq!(fh.ram().stats().stats.resident_pages, 0);
        assert!(vma.mapped_pages().is_empty());
    }

    #[test]
    fn a_loader_asking_for_its_own_page_is_a_deadlock_not_a_hang() {
        let (file, fh, vma) = setup(4);
        let inner = Arc::new(OnceLock::new());
        let req = request(&vma, 0, Access::Read);
        {
            let (inner, fh) = (inner.clone(), fh.inner.clone());
            file.on_load(move |_, _| {
                let nested = serve_now(&fh, &req);
                let _ = inner.set(nested.map_err(|f| f.message(0, "memfile")));
                Ok(())
            });
        }
        serve_now(&fh.inner, &req).unwrap();
        file.clear_load_hook();
        let nested = inner.get().expect("the loader asked");
        assert!(
            nested
                .as_ref()
                .unwrap_err()
                .contains("loadblk of block 0 of memfile touched the page it is loading"),
            "{nested:?}"
        );
    }

    /// A request of a fault (noted in its mapping's stream), of the access
    /// `execution`.
    fn fault(vma: &Vma, blk: u64, execution: u64) -> PageRequest {
        PageRequest {
            drop_behind: true,
            ..of_access(vma, blk, Access::Read, execution)
        }
    }

    /// Wait until the read-ahead workers are done with `fh`'s blocks.
    fn settle(fh: &FileH, blocks: std::ops::Range<u64>) {
        let start = std::time::Instant::now();
        while blocks.clone().any(|b| {
            matches!(
                fh.page_state(b),
                Some(PageState::Loading | PageState::LoadingInvalidated)
            )
        }) {
            assert!(start.elapsed().as_secs() < 60, "loads never finish");
            thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Found in review: a read-ahead job is given to a worker when asked,
    /// and a worker runs its jobs one by one. A native loader reading
    /// another mapping from `loadblk` on a worker could fault on a block
    /// queued behind its own load on that worker, and die of waiting for
    /// itself. A job not begun is taken over by the thread that faults on
    /// it; its worker skips it.
    #[test]
    fn a_fault_on_a_read_ahead_job_not_begun_loads_it_itself() {
        let (file, fh, vma) = setup_with(4, false);
        // Queued on this thread, as on a worker busy with the load that
        // faults.
        let job = readahead::testing::queue_here(&fh.inner, vma.id(), 2, fill_ahead);
        assert_eq!(fh.page_state(2), Some(PageState::Loading));
        serve_now(&fh.inner, &request(&vma, 2, Access::Read)).unwrap();
        assert_eq!(fh.page_state(2), Some(PageState::Loaded));
        job.run();
        assert_eq!(file.take_calls(), [Call::Load(2)], "skipped by the worker");
        let s = fh.stats();
        assert_eq!((s.loads, s.readahead_loads, s.resident_pages), (1, 0, 1));
        assert_eq!(fh.ram().stats().stats.resident_pages, 1);
    }

    /// Found in review: a queued job held its handle until a worker got to
    /// it. A handle closed with read-ahead queued goes at once.
    #[test]
    fn a_handle_closed_with_read_ahead_queued_goes_at_once() {
        let (file, fh, vma) = setup_with(4, false);
        let job = readahead::testing::queue_here(&fh.inner, vma.id(), 1, fill_ahead);
        let ram = fh.ram().clone();
        drop(vma);
        fh.close().map_err(|(e, _)| e).unwrap();
        assert_eq!(Arc::strong_count(&file), 1, "the handle's file went");
        assert_eq!(ram.stats().stats.resident_pages, 0);
        job.run();
        assert!(file.take_calls().is_empty(), "skipped by the worker");
    }

    /// Found in review: a fault could take over a read-ahead job whose RAM
    /// page, reclaimed from a block the stream had passed, was still mapped
    /// where that block was (`issue` takes the old mappings away after its
    /// lock), and fill it there: a reader of the old block saw the new one.
    /// The fault waits until the job is opened.
    #[test]
    fn a_fault_waits_to_take_over_a_job_whose_page_is_still_mapped() {
        let (_file, fh, vma) = setup_with(1, false);
        serve_now(&fh.inner, &request(&vma, 0, Access::Read)).unwrap();
        let old = vma.as_ptr();
        // SAFETY: slot 0 maps block 0 (all bytes 1) read-only.
        let at_old = || unsafe { std::ptr::read_volatile(old) };
        assert_eq!(at_old(), 1);
        let held = readahead::testing::queue_here_recycling(&fh.inner, vma.id(), 2, fill_ahead);
        let (faulting, done) = serve_on_thread(&fh, request(&vma, 2, Access::Read));
        let start = std::time::Instant::now();
        while fh.inner.shared.lock().waiters() == 0 {
            if let Ok(served) = done.try_recv() {
                panic!("the fault took the job over at once ({served:?})");
            }
            // (Without the wait, the fault took the job over and never
            // ended: the test failed here.)
            assert!(start.elapsed().as_secs() < 30, "the fault never waited");
            thread::yield_now();
        }
        assert_eq!(at_old(), 1, "block 0's slot still shows block 0");
        let job = held.open(&fh.inner);
        assert!(matches!(done.recv(), Ok(Ok(()))));
        faulting.join().unwrap();
        assert_eq!(fh.page_state(2), Some(PageState::Loaded));
        assert_eq!(fh.page_state(0), None, "reclaimed");
        job.run();
        assert_eq!(fh.stats().loads, 2, "the job skipped by its worker");
    }

    /// Found in review: a handle dropped with read-ahead queued gave its
    /// loading pages' room back without a notification, so a thread of
    /// another handle waiting in `make_room` for those loads to end (the
    /// budget holding nothing else to reclaim) slept on (no worker would
    /// notify for a job it skips).
    #[test]
    fn a_handle_dropped_with_read_ahead_queued_wakes_a_thread_waiting_for_room() {
        let (_file, fh, vma) = setup_with(2, false);
        let ram = fh.ram().clone();
        let other = FileH::open(
            Arc::new(Kit(Arc::new(MemFile::new(BLK)), false)),
            Some(&ram),
        )
        .unwrap();
        let other_vma = other.mmap(0, 4).unwrap();
        serve_now(&other.inner, &request(&other_vma, 0, Access::Write)).unwrap();
        let job = readahead::testing::queue_here(&fh.inner, vma.id(), 1, fill_ahead);
        // The budget: one dirty page and one loading.
        let (waiter, done) = serve_on_thread(&other, request(&other_vma, 1, Access::Read));
        while fh.inner.shared.lock().waiters() == 0 {
            thread::yield_now();
        }
        drop(vma);
        drop(fh);
        let served = done.recv_timeout(std::time::Duration::from_secs(30));
        job.run();
        assert!(
            matches!(served, Ok(Ok(()))),
            "the waiter slept on: {served:?}"
        );
        waiter.join().unwrap();
    }

    /// Found in review: read-ahead reclaimed the page the faulting access
    /// holds (the other block of an access spanning two, which
    /// drop-behind made the oldest), so the access faulted on it again and
    /// restarted the stream.
    #[test]
    fn read_ahead_never_reclaims_the_page_the_access_holds() {
        let (file, fh, _) = setup_with(4, false);
        let vma = fh.mmap(0, 16).unwrap();
        vma.advise(crate::Advice::Sequential);
        // A window of one block (a quarter of the budget).
        for blk in 0..4 {
            serve_now(&fh.inner, &fault(&vma, blk, 100 + blk)).unwrap();
            settle(&fh, 0..16);
        }
        assert_eq!(fh.ram().stats().stats.resident_pages, 4, "full");
        assert_eq!(fh.page_state(4), Some(PageState::Loaded), "read ahead");
        // An access spanning blocks 3 and 4: block 4 is resident, and its
        // read-ahead of block 5 may take only what the stream passed.
        serve_now(&fh.inner, &fault(&vma, 3, 200)).unwrap();
        serve_now(&fh.inner, &fault(&vma, 4, 200)).unwrap();
        settle(&fh, 0..16);
        assert_eq!(fh.page_state(3), Some(PageState::Loaded), "kept");
        assert_eq!(file.take_calls().len(), 5, "blocks 0 to 4 loaded once");
    }

    /// A scan that starts again (a bench's next pass) found the budget
    /// full of the last pass's blocks, above the blocks it faulted on:
    /// read-ahead took only pages the stream had passed, so it read nothing
    /// ahead until the scan passed those blocks, and the scan loaded its
    /// blocks itself. Pages used before the stream's first fault are used
    /// less recently than any of the stream's: read-ahead may take them.
    #[test]
    fn a_stream_reads_ahead_into_pages_used_before_it_began() {
        let (file, fh, _) = setup_with(8, false);
        let vma = fh.mmap(0, 16).unwrap();
        // Backwards: no stream. The budget is full of blocks 8 to 15.
        for (i, blk) in (8..16).rev().enumerate() {
            serve_now(&fh.inner, &fault(&vma, blk, i as u64)).unwrap();
        }
        settle(&fh, 0..16);
        assert_eq!((fh.stats().streams, fh.stats().readahead_loads), (0, 0));
        assert_eq!(fh.ram().stats().stats.resident_pages, 8, "full");
        // A scan from block 0: a stream from its second fault, whose window
        // (one block) may take the oldest page, block 14's.
        serve_now(&fh.inner, &fault(&vma, 0, 100)).unwrap();
        serve_now(&fh.inner, &fault(&vma, 1, 101)).unwrap();
        settle(&fh, 0..16);
        let s = fh.stats();
        assert_eq!((s.streams, s.readahead_loads), (1, 1), "block 2 read ahead");
        assert_eq!(fh.page_state(2), Some(PageState::Loaded));
        assert_eq!(fh.page_state(14), None, "the oldest page went");
        assert_eq!(file.take_calls().len(), 11, "16 blocks down to 8, 0, 1, 2");
    }

    /// Found by the race test of tests/it (a page of a handle closed
    /// since, not allocated in this one): a page used before the stream
    /// began may be another handle's, whose RAM page is one of that
    /// handle's memory file. Read-ahead gives it back there and loads into
    /// a page of its own.
    #[test]
    fn read_ahead_taking_another_handles_page_loads_into_its_own() {
        let (_, other, other_vma) = setup_with(8, false);
        let file = Arc::new(MemFile::new(BLK));
        let fh = FileH::open(Arc::new(Kit(file.clone(), false)), Some(other.ram())).unwrap();
        let vma = fh.mmap(0, 16).unwrap();
        for blk in (0..4).rev() {
            serve_now(&other.inner, &fault(&other_vma, blk, blk)).unwrap();
        }
        for blk in (8..12).rev() {
            serve_now(&fh.inner, &fault(&vma, blk, 10 + blk)).unwrap();
        }
        settle(&fh, 0..16);
        assert_eq!(fh.ram().stats().stats.resident_pages, 8, "full");
        serve_now(&fh.inner, &fault(&vma, 0, 100)).unwrap();
        serve_now(&fh.inner, &fault(&vma, 1, 101)).unwrap();
        settle(&fh, 0..16);
        assert_eq!(fh.stats().readahead_loads, 1, "block 2 read ahead");
        // Of its 4 pages, the first went to the fault on block 0, the
        // second to the read-ahead.
        assert_eq!(other.stats().resident_pages, 2);
        let mut b = [0];
        vma.read_at(2 * BLK, &mut b).unwrap();
        assert_eq!(b[0], MemFile::initial(2));
        drop(other_vma);
        other.close().map_err(|(e, _)| e).unwrap();
        assert_eq!(fh.page_state(2), Some(PageState::Loaded));
    }

    /// Found in review: the stream was moved on before the fault was
    /// served, so a failed fault's blocks were never read ahead.
    #[test]
    fn a_failed_fault_reads_nothing_ahead_and_the_next_one_does() {
        let (file, fh, vma) = setup_with(16, false);
        vma.advise(crate::Advice::Sequential);
        file.on_load(|blk, _| Err(format!("media error at {blk}").into()));
        serve_now(&fh.inner, &fault(&vma, 0, 1)).unwrap_err();
        file.clear_load_hook();
        serve_now(&fh.inner, &fault(&vma, 0, 2)).unwrap();
        settle(&fh, 0..4);
        let read_ahead: Vec<_> = (1..4).filter(|&b| fh.page_state(b).is_some()).collect();
        assert_eq!(read_ahead, [1, 2, 3]);
    }

    #[test]
    fn a_page_invalidated_while_loading_is_loaded_afresh() {
        let (file, fh, vma) = setup(4);
        let fh2 = fh.inner.clone();
        let once = std::sync::atomic::AtomicBool::new(true);
        file.on_load(move |blk, _| {
            if once.swap(false, std::sync::atomic::Ordering::SeqCst) {
                // The data changed underneath while this load ran.
                FileH { inner: fh2.clone() }.invalidate_page(blk).unwrap();
            }
            Ok(())
        });
        serve_now(&fh.inner, &request(&vma, 1, Access::Read)).unwrap();
        file.clear_load_hook();
        assert_eq!(file.take_calls(), [Call::Load(1), Call::Load(1)]);
        assert_eq!(fh.page_state(1), Some(PageState::Loaded));
        let stats = fh.stats();
        assert_eq!((stats.loads, stats.resident_pages), (2, 1));
    }

    thread_local! {
        /// How many times this thread released the test's host lock.
        static RELEASES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    /// The threads holding the test's host lock (seen from other threads).
    static HOLDERS: std::sync::Mutex<Vec<std::thread::ThreadId>> =
        std::sync::Mutex::new(Vec::new());

    fn holds_host(t: std::thread::ThreadId) -> bool {
        HOLDERS.lock().unwrap().contains(&t)
    }

    fn set_holds_host(held: bool) {
        let me = std::thread::current().id();
        let mut h = HOLDERS.lock().unwrap();
        h.retain(|&t| t != me);
        if held {
            h.push(me);
        }
    }

    /// A host lock that only threads that said so hold.
    struct TestHost;

    impl crate::HostLock for TestHost {
        fn release(&self) -> Option<usize> {
            let held = holds_host(std::thread::current().id());
            set_holds_host(false);
            RELEASES.with(|r| r.set(r.get() + u32::from(held)));
            held.then_some(0)
        }
        fn retake(&self, _token: usize) {
            set_holds_host(true);
        }
    }

    /// The calling thread holds the host lock from now on.
    fn hold_host() {
        static INSTALLED: OnceLock<()> = OnceLock::new();
        INSTALLED.get_or_init(|| {
            crate::set_host_lock(Arc::new(TestHost));
        });
        set_holds_host(true);
        RELEASES.with(|r| r.set(0));
    }

    /// Serve block `blk` holding the host lock as a fault does; returns how
    /// often the lock was released and whether the loader (on this thread)
    /// ran with it held.
    fn fault_holding_host(file: &MemFile, fh: &FileH, vma: &Vma, blk: u64) -> (u32, Option<bool>) {
        hold_host();
        let seen = Arc::new(std::sync::Mutex::new(None));
        let seen2 = seen.clone();
        file.on_load(move |_, _| {
            *seen2.lock().unwrap() = Some(holds_host(std::thread::current().id()));
            Ok(())
        });
        {
            let mut host = HostLease::default();
            serve(&fh.inner, &request(vma, blk, Access::Read), &mut host).unwrap();
        }
        file.clear_load_hook();
        assert!(
            holds_host(std::thread::current().id()),
            "held again after the fault"
        );
        set_holds_host(false);
        let seen = *seen.lock().unwrap();
        (RELEASES.with(|r| r.get()), seen)
    }

    #[test]
    fn a_fault_keeps_the_host_lock_for_a_native_loader() {
        let (file, fh, vma) = setup_with(4, false);
        assert_eq!(fault_holding_host(&file, &fh, &vma, 1), (0, Some(true)));
    }

    #[test]
    fn a_fault_releases_the_host_lock_before_a_loader_that_takes_it() {
        let (file, fh, vma) = setup_with(4, true);
        assert_eq!(fault_holding_host(&file, &fh, &vma, 1), (1, Some(false)));
    }

    /// Block 2 is being loaded by another thread while this one, holding the
    /// host lock, faults on block `blk` with a budget of `budget` pages:
    /// whether this thread held the host lock while it waited.
    fn waits_holding_host(host: bool, budget: u64, blk: u64) -> bool {
        let (file, fh, vma) = setup_with(budget, host);
        let (loading_tx, loading) = std::sync::mpsc::channel();
        let (held_tx, held) = std::sync::mpsc::channel();
        let shared = fh.inner.shared.clone();
        let waiter = std::thread::current().id();
        file.on_load(move |loading, _| {
            if loading == 2 {
                let _ = loading_tx.send(());
                // Finish once the other thread waits for this load.
                while shared.lock().waiters() == 0 {
                    std::thread::yield_now();
                }
                let _ = held_tx.send(holds_host(waiter));
            }
            Ok(())
        });
        let loader = {
            let fh = fh.inner.clone();
            let req = request(&vma, 2, Access::Read);
            std::thread::spawn(move || serve_now(&fh, &req).unwrap())
        };
        loading.recv().unwrap();
        hold_host();
        {
            let mut lease = HostLease::default();
            serve(&fh.inner, &request(&vma, blk, Access::Read), &mut lease).unwrap();
        }
        set_holds_host(false);
        loader.join().unwrap();
        file.clear_load_hook();
        let calls = file.take_calls();
        assert_eq!(calls[0], Call::Load(2));
        assert_eq!(calls.len(), 1 + usize::from(blk != 2));
        held.recv().unwrap()
    }

    #[test]
    fn a_fault_waits_for_a_native_load_holding_the_host_lock() {
        assert!(waits_holding_host(false, 4, 2), "for the page");
        assert!(waits_holding_host(false, 1, 3), "for room in the budget");
    }

    #[test]
    fn a_fault_releases_the_host_lock_to_wait_for_a_load_that_takes_it() {
        assert!(!waits_holding_host(true, 4, 2), "for the page");
        assert!(!waits_holding_host(true, 1, 3), "for room in the budget");
    }

    #[test]
    fn an_access_spanning_two_pages_keeps_the_first_one_over_a_one_page_budget() {
        let (file, fh, vma) = setup(1);
        serve_now(&fh.inner, &of_access(&vma, 2, Access::Read, 11)).unwrap();
        serve_now(&fh.inner, &of_access(&vma, 3, Access::Read, 11)).unwrap();
        assert_eq!(fh.page_state(2), Some(PageState::Loaded), "kept");
        assert_eq!(fh.page_state(3), Some(PageState::Loaded));
        assert_eq!(fh.ram().stats().stats.resident_pages, 2, "budget + 1");
        // The next access's first fault brings it back within the budget.
        serve_now(&fh.inner, &of_access(&vma, 0, Access::Read, 12)).unwrap();
        assert_eq!(fh.ram().stats().stats.resident_pages, 1);
        assert_eq!(
            file.take_calls(),
            [Call::Load(2), Call::Load(3), Call::Load(0)]
        );
    }

    #[test]
    fn a_write_spanning_two_pages_completes_when_the_first_is_dirty() {
        let (_file, fh, vma) = setup(1);
        serve_now(&fh.inner, &of_access(&vma, 0, Access::Write, 21)).unwrap();
        serve_now(&fh.inner, &of_access(&vma, 1, Access::Write, 21)).unwrap();
        assert_eq!(fh.dirty_blocks(), [0, 1]);
    }

    /// Found by the soak (tests/faults, `soak/`): another thread reclaims
    /// the page an access spanning two blocks was served last, before the
    /// instruction runs again. Its next fault is on that page once more; the
    /// page it must keep is then the other one, not the one it faults on.
    #[test]
    fn an_access_keeps_its_other_page_when_the_one_served_last_was_taken() {
        let (file, fh, vma) = setup(2);
        serve_now(&fh.inner, &of_access(&vma, 0, Access::Read, 41)).unwrap();
        serve_now(&fh.inner, &of_access(&vma, 1, Access::Read, 41)).unwrap();
        // Another thread takes block 1 and loads block 3: the budget is
        // full, block 0 the oldest.
        fh.invalidate_page(1).unwrap();
        serve_now(&fh.inner, &request(&vma, 3, Access::Read)).unwrap();
        // The instruction runs again and faults on block 1: block 3 goes.
        serve_now(&fh.inner, &of_access(&vma, 1, Access::Read, 41)).unwrap();
        assert_eq!(fh.page_state(0), Some(PageState::Loaded), "kept");
        assert_eq!(fh.page_state(3), None);
        serve_now(&fh.inner, &of_access(&vma, 0, Access::Read, 41)).unwrap();
        assert_eq!(
            file.take_calls(),
            [Call::Load(0), Call::Load(1), Call::Load(3), Call::Load(1)]
        );
    }

    /// Found by the soak: a prefault is no part of the access its thread
    /// faulted last; what its reclaim takes is no loss of that access, which
    /// may run again (the same instruction with the same registers: one
    /// reading the same address in a loop) and must be served.
    #[test]
    fn a_prefault_taking_a_page_of_the_last_access_does_not_fail_it() {
        let (_file, fh, vma) = setup(2);
        serve_now(&fh.inner, &of_access(&vma, 0, Access::Read, 51)).unwrap();
        serve_now(&fh.inner, &of_access(&vma, 1, Access::Read, 51)).unwrap();
        // A prefault on this thread reclaims block 0, the oldest.
        serve_now(&fh.inner, &request(&vma, 2, Access::Read)).unwrap();
        assert_eq!(fh.page_state(0), None);
        serve_now(&fh.inner, &of_access(&vma, 0, Access::Read, 51)).unwrap();
        assert_eq!(fh.page_state(1), Some(PageState::Loaded), "kept");
    }

    /// Found by the soak: a fault that waits for room (other threads'
    /// loads hold the budget) must keep the page its access holds as it is
    /// when it wakes: meanwhile that page may have gone and come back as
    /// another page of the table (the block reclaimed and loaded again).
    /// The access's other page is block 0: taken by another thread and
    /// loaded again while the fault on block 1 waits.
    #[cfg(feature = "failpoints")]
    #[test]
    fn a_fault_that_waited_for_room_keeps_the_page_its_access_holds_now() {
        use std::sync::mpsc::channel;
        use std::sync::Mutex;

        let _scenario = fail::FailScenario::setup();
        let file = Arc::new(MemFile::new(BLK));
        let ram = Ram::from_spec(&format!("memfd,pagesize={BLK}"))
            .unwrap()
            .with_budget(2 * BLK as u64);
        let fh = FileH::open(Arc::new(Kit(file.clone(), true)), Some(&ram)).unwrap();
        let vma = fh.mmap(0, 4).unwrap();
        // Block 2's load holds the budget until `go`.
        let (loading, b_loads) = channel();
        let (go, gone) = channel::<()>();
        let hold = Mutex::new((loading, gone));
        file.on_load(move |blk, _| {
            if blk == 2 {
                let hold = hold.lock().unwrap();
                hold.0.send(()).unwrap();
                let _ = hold.1.recv();
            }
            Ok(())
        });
        let (waiting, a_waits) = channel();
        let waiting = Mutex::new(waiting);
        fail::cfg_callback("virtmem::wait", move || {
            if thread::current().name() == Some("pin-reloaded") {
                let _ = waiting.lock().unwrap().send(());
            }
        })
        .unwrap();
        let (served, a_served) = channel();
        let (proceed, a_proceeds) = channel::<()>();
        let (fh, vma) = (&fh, &vma);
        thread::scope(|s| {
            serve_now(&fh.inner, &request(vma, 3, Access::Write)).unwrap();
            let a = thread::Builder::new()
                .name("pin-reloaded".into())
                .spawn_scoped(s, move || {
                    serve_now(&fh.inner, &of_access(vma, 0, Access::Read, 71)).unwrap();
                    serve_now(&fh.inner, &of_access(vma, 1, Access::Read, 71)).unwrap();
                    served.send(()).unwrap();
                    a_proceeds.recv().unwrap();
                    // Block 1 was taken: the fault waits for room.
                    serve_now(&fh.inner, &of_access(vma, 1, Access::Read, 71)).unwrap();
                    serve_now(&fh.inner, &of_access(vma, 0, Access::Read, 71))
                })
                .unwrap();
            a_served.recv().unwrap();
            fh.invalidate_page(1).unwrap();
            ram.set_budget(3 * BLK as u64);
            let b = s.spawn(|| serve_now(&fh.inner, &request(vma, 2, Access::Read)).unwrap());
            b_loads.recv().unwrap();
            ram.set_budget(2 * BLK as u64);
            proceed.send(()).unwrap();
            a_waits.recv().unwrap();
            // Block 0 goes and comes back as another page (the dirty block
            // 3 goes too, and its page is the one block 0 reuses).
            fh.invalidate_page(0).unwrap();
            fh.invalidate_page(3).unwrap();
            serve_now(&fh.inner, &request(vma, 0, Access::Read)).unwrap();
            let res = a.join().unwrap();
            go.send(()).unwrap();
            b.join().unwrap();
            fail::remove("virtmem::wait");
            assert!(res.is_ok(), "the access lost its page 0: {res:?}");
        });
    }

    #[test]
    fn an_access_wider_than_the_budget_plus_one_fails_instead_of_spinning() {
        let (_file, fh, vma) = setup(1);
        for blk in [0, 1, 2] {
            serve_now(&fh.inner, &of_access(&vma, blk, Access::Read, 31)).unwrap();
        }
        // Loading block 2 took block 0 back from the same access.
        let f = serve_now(&fh.inner, &of_access(&vma, 0, Access::Read, 31)).unwrap_err();
        assert!(
            f.message(0, "memfile").contains(
                "one instruction touches more pages than the RAM budget of 4096 bytes plus one page"
            ),
            "{f:?}"
        );
        // Another access (or the same instruction run again) is served.
        serve_now(&fh.inner, &of_access(&vma, 0, Access::Read, 32)).unwrap();
    }
}
