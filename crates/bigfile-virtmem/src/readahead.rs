//! Asynchronous read-ahead: the blocks ahead of a stream (`stream.rs`) are
//! loaded by worker threads (`bigfile-readahead-N`, started on first use,
//! one per core at most) into pages counted in the budget, and mapped into
//! the stream's mapping when loaded, so the stream's next accesses take no
//! fault. The policy (what room read-ahead may take, when its pages go) is
//! described in ARCHITECTURE.md ("Read-ahead").
//!
//! A read-ahead page is LOADING under a ticket of its worker from the
//! moment it is asked. A fault on it waits for the load once the worker
//! has begun it; a job not begun yet (queued behind others, maybe behind
//! the very load that faulted, on this worker) the faulting thread takes
//! over and loads itself (`serve.rs`), and the worker skips it. The worker
//! waits only for the RAM lock (and for what its loader waits for). A
//! read-ahead load that fails is forgotten: the page is dropped, and a
//! fault that waited for it loads the block again itself (its failure, if
//! any, is the one reported).

use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread;

use bigfile_os::Prot;

use crate::deaf::spawn_deaf;
use crate::failure::Failure;
use crate::fork_generation;
use crate::handle::FileHInner;
use crate::keys::{FileKey, PageKey, RamPage, VmaId};
use crate::mapper::{Deferred, Mapper};
use crate::pages::{LoadEnd, PageState};
use crate::shared::Guard;
use crate::state::{self, Unmap};
use crate::stream::{max_window, MAX_WINDOW};
use crate::waits::{Ticket, Tid};
use crate::worker;

/// At most this many workers, however many cores.
const MAX_WORKERS: usize = 4;

/// How a worker fills a page (`serve.rs`'s `fill_page`, handed in by the
/// fault path): the RAM page filled, or the failure with the RAM page (if
/// one was had) to give back.
pub(crate) type Fill =
    fn(&FileHInner, u64, Option<RamPage>) -> Result<RamPage, (Option<RamPage>, Failure)>;

/// One block to load ahead: its page is LOADING under `ticket`, charged
/// to the budget; the ticket holds the RAM page reclaimed for it, if any,
/// until the job is claimed. The handle is held only while the job runs:
/// a handle closed with jobs queued goes at once (its drop drops their
/// pages), and its jobs are skipped.
struct Job {
    fh: Weak<FileHInner>,
    vma: VmaId,
    blk: u64,
    pk: PageKey,
    ticket: Arc<Ticket>,
    fill: Fill,
}

#[derive(Clone)]
struct Worker {
    id: Tid,
    jobs: Sender<Job>,
}

/// The workers of this process (of this fork generation: a forked child
/// has none of its parent's threads, and starts its own), of one kind of
/// loader.
struct Pool {
    generation: u64,
    workers: Vec<Worker>,
    next: usize,
}

/// The pools: for loaders that never take the host lock, and for those
/// that do. Apart, so that a native load is never queued behind one
/// waiting for the host lock: the userfaultfd worker serving a system
/// call's fault waits for the loads it read ahead for the call's buffer
/// (`wait_loaded`, native loaders only), and the host lock may be held by
/// the very thread in the call (a C extension's `write(2)` with the GIL
/// held): behind a job waiting for it, the call never returned. Taken
/// only under a RAM's lock (lock order: inside 5), so never held across a
/// fork: the forking thread holds every RAM's lock.
static POOLS: [Mutex<Option<Pool>>; 2] = [Mutex::new(None), Mutex::new(None)];

/// How many workers to have: one per core, at most [`MAX_WORKERS`] (the
/// cores asked once: not under the RAM lock for every block read ahead).
fn most_workers() -> usize {
    static MOST: OnceLock<usize> = OnceLock::new();
    *MOST.get_or_init(|| {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        cores.clamp(1, MAX_WORKERS)
    })
}

/// The worker to give the next load of a file to (whose loader takes the
/// host lock if `needs_host`), started if need be; `None` when no thread
/// starts. The caller holds a RAM's lock.
fn pick_worker(_locked: &Guard<'_>, needs_host: bool) -> Option<Worker> {
    let most = most_workers();
    let kind = usize::from(needs_host);
    let mut pool = POOLS[kind].lock().unwrap_or_else(|p| p.into_inner());
    let generation = fork_generation::generation();
    if pool.as_ref().is_none_or(|p| p.generation != generation) {
        // A forked child's pool is its parent's: its workers are not here,
        // and their channels may be locked by a thread the child lacks.
        // Forgotten, not dropped (what its queued jobs hold stays, unused).
        std::mem::forget(pool.take());
        *pool = Some(Pool {
            generation,
            workers: Vec::new(),
            next: 0,
        });
    }
    let pool = pool.as_mut()?;
    if pool.next == pool.workers.len() && pool.workers.len() < most {
        let (jobs, inbox) = channel();
        let (tid_tx, tid) = sync_channel(1);
        // Deaf: a worker started from a fault inherits the faulting
        // thread's signal mask, and would otherwise take the application's
        // signals (Ctrl-C) away from the threads waiting for them.
        spawn_deaf(
            thread::Builder::new().name(format!(
                "bigfile-readahead-{}{}",
                if needs_host { "host-" } else { "" },
                pool.workers.len()
            )),
            move || {
                // Its loads' tickets name it by its kernel thread id (the
                // wait graph's), which only it can learn.
                let _ = tid_tx.send(Tid::current());
                work(inbox)
            },
        )
        .ok()?;
        pool.workers.push(Worker {
            id: tid.recv().ok()?,
            jobs,
        });
    }
    let w = pool.workers.get(pool.next)?.clone();
    pool.next = (pool.next + 1) % most;
    Some(w)
}

/// Whether the calling thread is a read-ahead worker: a loader that takes
/// the host lock may refuse a load there (its failure is forgotten), e.g.
/// while its host shuts down.
pub fn on_worker() -> bool {
    worker::current() == Some(worker::Worker::ReadAhead)
}

fn work(inbox: Receiver<Job>) {
    // (A loader forking here ends its child: `worker.rs`.)
    worker::become_worker(worker::Worker::ReadAhead);
    for job in inbox {
        run(job);
    }
}

/// Read ahead of a fault on block `blk` in mapping `vma` of `fh`, just
/// served (its access holding the page of block `pin`, if any; a system
/// call's, copying a buffer that ends before block `call_end`, if known):
/// start loading the blocks of the stream's window (and of the call's
/// buffer) not resident (`State::read_ahead_range`), as far as the budget
/// has room or a page the stream has passed (never the pin) can be
/// reclaimed; map the read-ahead pages loaded meanwhile that the stream's
/// accesses reach before its next fault. The workers fill pages with
/// `fill`. Called without the RAM lock.
pub(crate) fn issue(
    fh: &FileHInner,
    (vma, blk, call_end): (VmaId, u64, Option<u64>),
    pin: Option<(FileKey, u64)>,
    fill: Fill,
) {
    let Some(me) = fh.me.get().cloned() else {
        return;
    };
    let shared = &*fh.shared;
    let max = max_window(shared.budget_pages(), fh.page_size());
    let mut deferred = Deferred::default();
    let mut jobs = Vec::new();
    // Whether a job has a reclaimed page, held until its old mappings go.
    let mut held = false;
    let mut st = shared.lock();
    let blocks = st
        .read_ahead_range(fh.key, vma, (blk, call_end), max)
        .unwrap_or(0..0);
    for b in blocks {
        if st.lookup(fh.key, b).is_some() {
            continue;
        }
        let Some((worker, recycled)) = room_for(&mut st, fh, (vma, blk), pin, &mut deferred) else {
            // Asked again at the stream's next fault.
            st.cut_read_ahead(fh.key, vma, b);
            break;
        };
        held |= recycled.is_some();
        let job = ask(&mut st, (fh, &me), (vma, b), (&worker, recycled), fill);
        jobs.push((worker, job));
    }
    // Pages read ahead earlier, now below the trigger: mapped as the
    // workers would have, had the trigger been there when they finished.
    // (A call's buffer only as far as it was asked: the rest of a buffer
    // larger than the budget is not there yet, and looking through it at
    // each of the call's faults cost its length each time.)
    let trigger_end = blk
        .saturating_add(MAX_WINDOW)
        .max(call_end.unwrap_or(0).min(asked_end(&st, fh, vma)));
    let trigger_range = blk.saturating_add(1)..trigger_end;
    for b in trigger_range {
        if let Some(pk) = st.lookup(fh.key, b) {
            map_ahead(fh, &mut st, vma, (b, pk));
        }
    }
    drop(st);
    // The reclaimed pages are unmapped before a worker writes into them, or
    // a fault that takes a job over (`Ticket::open_job`; until then a fault
    // on its block waits).
    deferred.finish(shared);
    if held {
        let st = shared.lock();
        for (_, job) in &jobs {
            job.ticket.open_job();
        }
        shared.notify(&st);
    }
    for (worker, job) in jobs {
        if let Err(back) = worker.jobs.send(job) {
            // The worker is gone (it cannot be, short of a bug): load here,
            // rather than leave the page loading for ever.
            run(back.0);
        }
    }
}

/// Where the read-ahead of mapping `vma`'s stream ends: past the last block
/// asked (nothing beyond it is loading for the stream).
fn asked_end(st: &Guard<'_>, fh: &FileHInner, vma: VmaId) -> u64 {
    st.stream(fh.key, vma).map_or(0, |s| s.pending().end)
}

/// Wait until no block of `blocks` of `fh` that mapping `vma`'s stream
/// asked is loading: those `issue` read ahead for a system call's buffer
/// (ARCHITECTURE.md, "A system call's buffer"), or a fault took over.
/// Called by the userfaultfd worker that served the call's fault, before it
/// wakes the call; never for a loader that may take the host lock. A wait
/// that would close a cycle of waits ends it (the call then faults where
/// it finds a page missing).
pub(crate) fn wait_loaded(fh: &FileHInner, vma: VmaId, blocks: std::ops::Range<u64>) {
    let shared = &*fh.shared;
    let mut st = shared.lock();
    let mut next = blocks.start;
    while next < blocks.end.min(asked_end(&st, fh, vma)) {
        let loading = st
            .lookup(fh.key, next)
            .and_then(|pk| st.pages().get(pk).ticket().cloned())
            .filter(|t| !t.is_finished());
        match loading {
            // Looked at again once finished: a fault may have taken the
            // job over, under a ticket of its own.
            Some(ticket) => match shared.wait_for(st, &ticket) {
                Ok(locked) => st = locked,
                Err(_) => return,
            },
            None => next += 1,
        }
    }
}

/// Block `b` of `fh` (`me`, the same handle) for mapping `vma`'s stream:
/// LOADING under a ticket of `worker`, with `recycled` for it; the job to
/// give that worker.
fn ask(
    st: &mut Guard<'_>,
    (fh, me): (&FileHInner, &Weak<FileHInner>),
    (vma, b): (VmaId, u64),
    (worker, recycled): (&Worker, Option<RamPage>),
    fill: Fill,
) -> Job {
    let ticket = Ticket::read_ahead_by(worker.id, fh.needs_host, recycled);
    let pk = st.begin_load(fh.key, b, ticket.clone());
    Job {
        fh: me.clone(),
        vma,
        blk: b,
        pk,
        ticket,
        fill,
    }
}

/// Room for one read-ahead page and the worker to load it: free room in
/// the budget, or the least recently used clean page if it was used less
/// recently than the stream's own (`oldest_is_stale`) and the fault's
/// access does not hold it (`pin`: the other page of an access spanning two
/// blocks, which drop-behind made the oldest) (reclaimed: its RAM page to
/// reuse, or released, once `deferred` is finished). `None` when there is
/// neither (read-ahead never waits for room), or no worker.
fn room_for(
    st: &mut Guard<'_>,
    fh: &FileHInner,
    (vma, blk): (VmaId, u64),
    pin: Option<(FileKey, u64)>,
    deferred: &mut Deferred,
) -> Option<(Worker, Option<RamPage>)> {
    let shared = &*fh.shared;
    // (No fresh page of the handle to take: `fresh.rs` makes them only for
    // files not read ahead.)
    let full = st.budget().is_full(shared.budget_pages());
    let pinned = || {
        pin.and_then(|(fk, b)| st.find_page(fk, b))
            .is_some_and(|p| st.lru().oldest() == Some(p))
    };
    // (Nor while a fresh page, another handle's, is being made into the
    // last room.)
    if full
        && (st.budget().making_fresh().is_some() || pinned() || !oldest_is_stale(st, fh, vma, blk))
    {
        return None;
    }
    let worker = pick_worker(st, fh.needs_host)?;
    if !full {
        return Some((worker, None));
    }
    let d = st.reclaim_oldest(shared.counters(), Unmap::Deferred, deferred.slots())?;
    let recycled = d.ram_page.and_then(|rp| {
        if d.fileh == fh.key {
            Some(rp)
        } else {
            // Another handle's (a page used before the stream began may
            // be): a page of its own memory file, given back there once
            // unmapped.
            deferred.release(st.ramh(d.fileh).clone(), rp);
            None
        }
    });
    Some((worker, recycled))
}

/// Whether the least recently used clean page was used less recently than
/// the stream of `vma`'s own pages: one the stream has passed (a block of
/// the mapping below the fault's block `blk`, which drop-behind made the
/// oldest), or one last used before the stream's first fault (as the
/// blocks an earlier pass of a scan left, above the block where the next
/// pass starts: the stream has passed none of them yet).
fn oldest_is_stale(st: &Guard<'_>, fh: &FileHInner, vma: VmaId, blk: u64) -> bool {
    let Some(pk) = st.lru().oldest() else {
        return false;
    };
    let Some(v) = st.find_vma(fh.key, vma) else {
        return false;
    };
    let p = st.pages().get(pk);
    let passed = p.fileh() == fh.key && p.blk() < blk && v.index_of(p.blk()).is_some();
    passed || st.lru().used(pk) < Some(v.stream().since())
}

/// Map read-ahead page `pk` (block `blk`, loaded, not reached) read-only
/// into the stream's mapping `vma`, if the stream's accesses reach it
/// before its next fault and the slot is free (nothing mapped, no
/// reclaimer unmapping it). A failure to map leaves it to the fault.
fn map_ahead(fh: &FileHInner, st: &mut Guard<'_>, vma: VmaId, (blk, pk): (u64, PageKey)) {
    let page = st.pages().get(pk);
    let (Some(rp), true, PageState::Loaded) = (page.ram_page(), page.is_ahead(), page.state())
    else {
        return;
    };
    // (Read ahead by another mapping of the handle, it may be a block
    // this one does not cover.)
    let wanted = st
        .find_vma(fh.key, vma)
        .is_some_and(|v| v.index_of(blk).is_some() && v.stream().maps_ahead(blk));
    if !wanted || st.slot_unmapping(fh.key, vma, blk) {
        return;
    }
    // Not past the slots the process keeps mapped ("Kernel mappings"): the
    // stream's fault maps it, taking older pages away first.
    let free = st
        .slot(fh.key, vma, blk, fh.page_size())
        .is_some_and(|slot| !slot.mapped)
        && state::mapped_in_process() < state::mapped_slots_kept();
    if free {
        let _ = Mapper::of(&fh.shared).map(st, fh.key, vma, (blk, rp), Prot::Read);
    }
}

/// A worker's load of one block ahead, unless it was taken over (by a
/// thread that faulted on it) or its handle is gone (its drop dropped the
/// page): then nothing of it is touched.
fn run(job: Job) {
    let Some(fh) = job.fh.upgrade() else {
        return;
    };
    let shared = &*fh.shared;
    let forks = fork_generation::generation();
    let (recycled, dropped) = {
        let st = shared.lock();
        let Some(recycled) = job.ticket.claim_job() else {
            drop(st);
            // The handle may be held here last: dropped without the lock.
            drop(fh);
            return;
        };
        // Dropped before it began: the stream's mapping is gone, or the
        // block was invalidated.
        let dropped = st.stream(fh.key, job.vma).is_none()
            || st.pages().get(job.pk).state() == PageState::LoadingInvalidated;
        (recycled, dropped)
    };
    let loaded = if dropped {
        Err((recycled, None))
    } else {
        (job.fill)(&fh, job.blk, recycled).map_err(|(rp, f)| (rp, Some(f)))
    };
    let mut st = shared.lock();
    if fork_generation::generation() != forks {
        // loadblk forked and this is the child, whose state forgot the page.
        // (Only off a worker, `issue`'s own run: a worker's child ended as
        // the call returned, `worker.rs`.)
        return;
    }
    let rc = shared.counters();
    let mapper = Mapper::of(shared);
    match loaded {
        Ok(rp) => {
            if st.finish_load(job.pk, rp, rc) == LoadEnd::Invalidated {
                mapper.forget(&mut st, job.pk, rc);
            } else {
                st.loaded_ahead(job.pk, rc);
                let pending = st
                    .stream(fh.key, job.vma)
                    .is_some_and(|s| s.pending().contains(&job.blk));
                if pending {
                    map_ahead(&fh, &mut st, job.vma, (job.blk, job.pk));
                } else {
                    // The stream stopped meanwhile: this page goes first.
                    st.demote(job.pk);
                }
            }
            job.ticket.finish(Ok(()));
        }
        Err((rp, failure)) => {
            // Forgotten: a fault that waited loads the block itself.
            mapper.forget(&mut st, job.pk, rc);
            if let Some(rp) = rp {
                mapper.release(&fh.ramh, rp);
            }
            job.ticket.finish(failure.map_or(Ok(()), Err));
        }
    }
    shared.notify(&st);
    drop(st);
    // The handle may be held here last: dropped without the lock.
    drop(fh);
}

/// Jobs queued on a worker that never runs them unless told: the calling
/// test's thread (as a worker busy with a load).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A read-ahead job asked and not begun.
    pub(crate) struct Queued(Job);

    /// Ask block `blk` of `fh` for the stream of `vma`, queued on the
    /// calling thread as its worker: the page is LOADING under this
    /// thread's read-ahead ticket until [`Queued::run`].
    pub(crate) fn queue_here(fh: &FileHInner, vma: VmaId, blk: u64, fill: Fill) -> Queued {
        let (worker, me) = here(fh);
        let mut st = fh.shared.lock();
        Queued(ask(&mut st, (fh, &me), (vma, blk), (&worker, None), fill))
    }

    /// The calling thread as a worker (its inbox dropped: it runs its jobs
    /// by hand), and `fh`'s own reference.
    fn here(fh: &FileHInner) -> (Worker, Weak<FileHInner>) {
        let (jobs, _inbox) = channel();
        let worker = Worker {
            id: Tid::current(),
            jobs,
        };
        (worker, fh.me.get().cloned().expect("a handle in its Arc"))
    }

    /// [`queue_here`], into the RAM page of the least recently used page,
    /// reclaimed for it as `issue` does, its old mappings not taken away
    /// yet: until [`Held::open`], as `issue` is between its lock and its
    /// deferred work's end.
    pub(crate) fn queue_here_recycling(fh: &FileHInner, vma: VmaId, blk: u64, fill: Fill) -> Held {
        let (worker, me) = here(fh);
        let shared = &*fh.shared;
        let mut deferred = Deferred::default();
        let mut st = shared.lock();
        let reclaimed = st
            .reclaim_oldest(shared.counters(), Unmap::Deferred, deferred.slots())
            .expect("a page to reclaim");
        let rp = reclaimed.ram_page.expect("a RAM page");
        let job = ask(&mut st, (fh, &me), (vma, blk), (&worker, Some(rp)), fill);
        Held(Queued(job), deferred)
    }

    /// A read-ahead job whose page still shows its old block.
    pub(crate) struct Held(Queued, Deferred);

    impl Held {
        /// Its old mappings taken away, claimable by faults (and notified).
        pub(crate) fn open(self, fh: &FileHInner) -> Queued {
            let Held(queued, deferred) = self;
            deferred.finish(&fh.shared);
            let st = fh.shared.lock();
            queued.0.ticket.open_job();
            fh.shared.notify(&st);
            queued
        }
    }

    impl Queued {
        /// Its worker gets to it.
        pub(crate) fn run(self) {
            run(self.0)
        }
    }
}
