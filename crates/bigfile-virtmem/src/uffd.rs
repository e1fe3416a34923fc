//! The userfaultfd backend's fault source: one userfaultfd for the process
//! (each forked child its own), a reader thread, and worker threads.
//!
//! A mapping of a RAM on this backend is registered with the userfaultfd
//! (`Mapper` says how: a reservation of anonymous memory, RAM pages mapped
//! over its slots); a fault there (a page not loaded, or not mapped here
//! yet, or the first write to a clean page) blocks the faulting thread and
//! queues an event with its thread id. The reader looks where the thread is
//! (`/proc/self/task/TID/syscall`):
//!
//! - in its own code (user mode): the request signal is queued to it
//!   (`bigfile_fault::send_request`) and the thread serves its own fault in
//!   the mapping's fault handler, exactly as on the signal backend (its host
//!   lock released while it waits, `loadblk` on its own stack, death at the
//!   access when it fails);
//! - inside a system call (the kernel touching the page for it): a worker
//!   serves it ([`serve`]), taking the host lock only if the loader needs
//!   it, and wakes the thread; a failure poisons the page so the system
//!   call fails with EFAULT (as it would on the signal backend), and the
//!   next user-mode access loads it again.
//!
//! Costs and limits are in ARCHITECTURE.md.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, OnceLock, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bigfile_fault::Access;
use bigfile_uffd::{
    signal_held, signal_pending, thread_mode, waiting, Buffer, Event, FaultKind, ThreadMode, Uffd,
    Waiting,
};

use crate::backend::process_uffd;
use crate::deaf::spawn_deaf;
use crate::failure::Failure;
use crate::fork_generation::PerGeneration;
use crate::handle::FileHInner;
use crate::host::HostLease;
use crate::hostwait::{self, Watch};
use crate::keys::VmaId;
use crate::poison::{self, POISON_TIME};
use crate::readahead;
use crate::serve::PageRequest;
use crate::source::{take, FaultSource};
use crate::waits::{Ticket, Tid};
use crate::worker::{self, Worker};

/// A registered mapping: what a fault in it is a request for.
pub(crate) struct UffdRange {
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) fileh: Arc<FileHInner>,
    pub(crate) vma: VmaId,
    pub(crate) pgoffset: u64,
}

impl UffdRange {
    /// The address of the page holding `addr`.
    fn page_of(&self, addr: usize) -> usize {
        let ps = self.fileh.page_size();
        self.start + (addr - self.start) / ps * ps
    }

    /// The request of a fault at `addr` for a system call copying
    /// `buffer` (if the reader knows it), and the page's address.
    fn request(&self, addr: usize, access: Access, buffer: Option<Buffer>) -> (PageRequest, usize) {
        let ps = self.fileh.page_size();
        let idx = (addr - self.start) / ps;
        // The rest of the buffer the call copies, past the fault (in this
        // mapping): read ahead and mapped before the call gets there.
        // Only for loaders read ahead that never take the host lock (the
        // worker waits for those loads: `readahead::wait_loaded`).
        let native = self.fileh.reads_ahead && !self.fileh.needs_host;
        let call_end = buffer
            .filter(|b| native && b.addr <= addr && addr - b.addr < b.len)
            .map(|b| {
                let end = b.addr.saturating_add(b.len).min(self.start + self.len);
                self.pgoffset + (end - self.start).div_ceil(ps) as u64
            });
        let req = PageRequest {
            vma: self.vma,
            blk: self.pgoffset + idx as u64,
            access,
            drop_behind: true,
            // A kernel access resumes where it stopped after each page:
            // nothing to hold across its faults.
            execution: None,
            call_end,
        };
        (req, self.start + idx * ps)
    }
}

/// Registered ranges by start address.
type Ranges = BTreeMap<usize, Arc<UffdRange>>;

/// The process's userfaultfd, its ranges and threads.
pub(crate) struct UffdService {
    uffd: &'static Uffd,
    ranges: RwLock<Ranges>,
    jobs: Mutex<Jobs>,
    job_ready: Condvar,
}

/// A fault for a worker: a kernel-mode one (or a user-mode one whose
/// thread held its request blocked).
struct Job {
    range: Arc<UffdRange>,
    e: Event,
    /// The buffer of the system call the thread is in (when the reader
    /// follows that call's: `Call::buffer`).
    buffer: Option<Buffer>,
    /// A user-mode fault whose thread held its request signal blocked
    /// ([`Requests::held`]): its thread is in that fault still (its
    /// deadlock needs no confirming, and could not have it in time: each
    /// round takes [`RECHECK`]).
    held: bool,
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    idle: usize,
    /// Workers ever started (their names' numbers).
    started: usize,
    /// The kernel faults queued or being served: thread id, page address.
    /// A thread in such a fault is woken when it is served, so a further
    /// event of the same thread and page is a retry, dropped: the kernel
    /// retries a kernel-mode fault at once, over and over, while the thread
    /// has a signal pending (its wait is interruptible, but only a fatal
    /// signal ends the fault), and each retry made a job that waited for
    /// the one load on a worker of its own (thousands of threads for one
    /// slow load, found with a Ctrl-C during `np.save`).
    serving: HashSet<(libc::pid_t, usize)>,
    /// Kernel faults whose load would have deadlocked, woken once to
    /// confirm it (`Suspects`).
    suspects: Suspects,
}

/// How long a deadlock seen for a thread and page waits for its
/// confirmations: a real one comes back at once, round after round (a
/// woken kernel-mode fault is retried without returning to user mode);
/// stale events of one fault were seen to come half a second to seconds
/// apart (in the fault suite's races with signals).
const CONFIRM_WITHIN: Duration = Duration::from_millis(100);

/// Kernel faults (thread, page) whose service found a deadlock once: the
/// thread in a system call waiting for its own load. The event may be
/// stale: a thread whose user-mode fault was interrupted by a signal faults
/// again, a second event; the first one's request then serves the page on
/// the thread, which loads it, and makes system calls while it does; the
/// second event, read then, finds the thread in a system call and its
/// worker waits for that thread's load. Failed, that false deadlock
/// poisoned the page (an EFAULT for any system call on it meanwhile). So a
/// first deadlock only wakes the thread: a real one faults again at once
/// and fails the second time; a stale one is forgotten. (Before that, a
/// thread surely not in a fault any more is told apart: `may_be_waiting`.)
#[derive(Default)]
struct Suspects(HashMap<(libc::pid_t, usize), (Instant, u32)>);

/// How many times a deadlock is seen for one thread and page, each after a
/// wake, before it is failed: a real one comes back at once, round after
/// round (a thread with a signal pending spins through its fault, an event
/// each time); stale events of one fault are a few (one per signal that
/// interrupted it), and not all of them find their thread where a fault
/// could still be waiting.
const CONFIRMATIONS: u32 = 4;

impl Suspects {
    /// Whether the deadlock of `tid` on `page` seen `now` is confirmed
    /// (seen [`CONFIRMATIONS`] times, each within [`CONFIRM_WITHIN`] of the
    /// first); else it is counted.
    fn confirmed(&mut self, tid: libc::pid_t, page: usize, now: Instant) -> bool {
        self.0
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < CONFIRM_WITHIN);
        let seen = self.0.entry((tid, page)).or_insert((now, 0));
        seen.1 += 1;
        if seen.1 < CONFIRMATIONS {
            return false;
        }
        self.0.remove(&(tid, page));
        true
    }
}

/// Request signals the reader sent lately, looked at again after
/// [`RECHECK`]: a thread that blocks the request signal (its own mask, or a
/// library's threads that block every signal) would otherwise stay in its
/// fault for good, its request pending. The reader's alone.
#[derive(Default)]
struct Requests {
    queue: VecDeque<(Instant, Event)>,
}

/// How long a request signal may stay unanswered before the reader checks
/// whether its thread holds it blocked (a served fault takes microseconds;
/// the check reads `/proc`, so it is made only for requests this old).
const RECHECK: Duration = Duration::from_secs(1);

impl Requests {
    fn note(&mut self, e: Event) {
        self.queue.push_back((Instant::now(), e));
    }

    /// The requests sent at least [`RECHECK`] ago whose thread still holds
    /// the request signal pending and blocked: their faults go to workers.
    /// (A thread that blocked it after its fault was served is found too:
    /// serving that page again and waking its address is harmless.)
    fn held(&mut self) -> Vec<Event> {
        let Ok(signo) = bigfile_fault::request_signal() else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut held = Vec::new();
        while let Some(&(at, e)) = self.queue.front() {
            if now.duration_since(at) < RECHECK {
                break;
            }
            self.queue.pop_front();
            if signal_held(e.tid, signo).unwrap_or(false) {
                held.push(e);
            }
        }
        held
    }
}

/// How long a worker waits for a job before it ends: a burst of kernel
/// faults (a big `write(2)` from pages not loaded) starts workers that a
/// process would otherwise keep for good.
const RETIRE_AFTER: Duration = Duration::from_secs(2);

/// A fork generation's service and whether its reader was started.
#[derive(Default)]
struct Generation {
    service: OnceLock<Result<UffdService, String>>,
    reader: OnceLock<()>,
}

/// The service of each fork generation that used one: a forked child
/// starts its own, with its own userfaultfd (`backend::process_uffd`), its
/// own reader and workers, tables and locks, never one a parent's thread
/// may have held at the fork. The earlier generations' stay for the
/// mappings the child inherited, whose drops take their ranges out.
static SERVICES: PerGeneration<Generation> = PerGeneration::new();

impl UffdService {
    /// This process's service, started on first use; why not, when the
    /// process cannot have it.
    pub(crate) fn get() -> Result<&'static UffdService, String> {
        let generation = SERVICES.get();
        let svc = generation.service.get_or_init(|| {
            Ok(UffdService {
                uffd: process_uffd()?,
                ranges: RwLock::new(BTreeMap::new()),
                jobs: Mutex::new(Jobs::default()),
                job_ready: Condvar::new(),
            })
        });
        let svc = svc.as_ref().map_err(Clone::clone)?;
        generation.reader.get_or_init(|| {
            static HANDLERS: Once = Once::new();
            HANDLERS.call_once(|| {
                // Without them a forked child could find a table of ranges,
                // the poisons' or the watches' locked forever: no way on.
                bigfile_os::at_fork(prepare, parent, child).expect("pthread_atfork");
            });
            // Its workers, which it starts, inherit its signal mask.
            spawn_deaf(
                std::thread::Builder::new().name("bigfile-uffd".into()),
                move || svc.read_loop(),
            )
            .expect("spawning the userfaultfd reader");
        });
        Ok(svc)
    }

    /// Register `range` (a mapping's reservation, read-write anonymous
    /// memory; the pages mapped over its slots are registered as they are
    /// mapped, `Mapper::map`): its faults come here until the returned
    /// value is dropped.
    pub(crate) fn register(&'static self, range: Arc<UffdRange>) -> io::Result<UffdRegistration> {
        let reg = self.uffd.register_missing(range.start, range.len)?;
        self.ranges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(range.start, range.clone());
        Ok(UffdRegistration {
            svc: self,
            start: range.start,
            reg: Some(reg),
        })
    }

    fn read_loop(&'static self) {
        let mut events = Vec::new();
        let mut sent = Requests::default();
        loop {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own. Woken at least once a second to
            // give up faults whose loader waits too long for the host lock.
            let _ = unsafe { libc::poll(&mut pfd, 1, 1000) };
            for w in hostwait::overdue() {
                self.give_up(&w);
            }
            for e in sent.held() {
                self.dispatch(e, None);
            }
            events.clear();
            if let Err(e) = self.uffd.read_events(&mut events, 64) {
                eprintln!("bigfile: reading the userfaultfd failed ({e}); faults of its mappings would hang: aborting");
                std::process::abort();
            }
            for &e in &events {
                self.dispatch(e, Some(&mut sent));
            }
        }
    }

    /// Hand event `e` on: to its thread (the request signal, noted in
    /// `sent`) for a fault of user-mode code, else to a worker; always to a
    /// worker when `sent` is `None` (a request its thread holds blocked).
    fn dispatch(&'static self, e: Event, sent: Option<&mut Requests>) {
        let sent_none = sent.is_none();
        let access = if e.write { Access::Write } else { Access::Read };
        let (range, buffer) = {
            // Looked up under the lock, kept only for a worker: a reference
            // held here would keep the handle alive after its owner dropped
            // it (its pages then freed by this thread, later).
            let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
            let found = ranges
                .range(..=e.addr)
                .next_back()
                .map(|(_, r)| r)
                .filter(|r| e.addr < r.start + r.len);
            let Some(range) = found else {
                drop(ranges);
                // Unregistered since (its mapping is going away): let the
                // thread retry, into whatever is there now.
                let ps = bigfile_os::os_page_size();
                let _ = self.uffd.wake(e.addr & !(ps - 1), ps);
                return;
            };
            let mode = thread_mode(e.tid);
            let stopped = match mode {
                Ok(ThreadMode::User { pc, sp }) => Some(bigfile_fault::StoppedAt { pc, sp }),
                _ => None,
            };
            let user = stopped.is_some();
            // (A thread in user mode is not in that fault any more: woken
            // by another's wake, its page taken away since, it faults anew,
            // served on it as any user-mode fault; dropped, it would wait,
            // its host lock held, for the job to be done.)
            let retry = !user
                && self
                    .jobs()
                    .serving
                    .contains(&(e.tid, range.page_of(e.addr)));
            if retry {
                return;
            }
            if let (Some(sent), Some(at)) = (sent, stopped) {
                // Served by the thread itself, in the mapping's fault
                // handler (if the request finds it still stopped `at`).
                match bigfile_fault::send_request(e.tid, e.addr, access, at) {
                    Ok(()) => {
                        sent.note(e);
                        return;
                    }
                    // The thread is gone: nothing waits.
                    Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return,
                    // Not queued (EAGAIN: the user's queued signals are at
                    // RLIMIT_SIGPENDING): nothing would ever wake the
                    // thread, so a worker serves it as a kernel fault.
                    Err(err) => unqueued_request(&err),
                }
            }
            let buffer = match mode {
                Ok(ThreadMode::Syscall(call)) if call.fd().is_some_and(blocking) => call.buffer(),
                _ => None,
            };
            (range.clone(), buffer)
        };
        let mut jobs = self.jobs();
        jobs.serving.insert((e.tid, range.page_of(e.addr)));
        jobs.queue.push_back(Job {
            range,
            e,
            buffer,
            held: sent_none,
        });
        if jobs.idle == 0 {
            // Every worker is busy (or blocked in a nested fault, or in a
            // loader waiting for a lock): one more, so that no fault waits
            // behind a worker waiting for it.
            jobs.started += 1;
            let n = jobs.started;
            drop(jobs);
            let spawned = std::thread::Builder::new()
                .name(format!("bigfile-uffd-{n}"))
                .spawn(move || self.work());
            if let Err(e) = spawned {
                // Without a worker, no fault of any mapping on this backend
                // would ever be answered: every access would hang.
                eprintln!(
                    "bigfile: cannot start a userfaultfd worker ({e}): faults on mapped memory \
                     could not be served; aborting"
                );
                std::process::abort();
            }
        } else {
            drop(jobs);
            self.job_ready.notify_one();
        }
    }

    fn work(&'static self) {
        // (A loader forking here ends its child: `worker.rs`.)
        worker::become_worker(Worker::Uffd);
        loop {
            let Job {
                range,
                e,
                buffer,
                held,
            } = {
                let mut jobs = self.jobs();
                loop {
                    if let Some(job) = jobs.queue.pop_front() {
                        break job;
                    }
                    jobs.idle += 1;
                    let (held, waited) = self
                        .job_ready
                        .wait_timeout(jobs, RETIRE_AFTER)
                        .unwrap_or_else(|p| p.into_inner());
                    jobs = held;
                    jobs.idle -= 1;
                    if waited.timed_out() && jobs.queue.is_empty() {
                        // Idle that long: retired (`dispatch` starts
                        // another when no worker is idle).
                        return;
                    }
                }
            };
            let access = if e.write || e.kind == FaultKind::WriteProtect {
                Access::Write
            } else {
                Access::Read
            };
            let (req, page_addr) = range.request(e.addr, access, buffer);
            let ps = range.fileh.page_size();
            let watch = Arc::new(Watch::new(
                e.tid,
                (page_addr, ps),
                req.blk,
                range.fileh.name.clone(),
            ));
            // The faulting thread waits for this worker: a wait of the
            // worker's that comes back to that thread (its own load, or a
            // load waiting for it) is a cycle, failed instead of hung.
            let edge = InSystemCall::start(&range.fileh, Tid(e.tid));
            // A worker holds no host lock: its loads wait as they please.
            // A panic (a loader's, re-raised by `serve`) ends the process,
            // as on a faulting thread (bigfile-fault): unwound here, it
            // would end the worker and leave the system call blocked.
            let served = hostwait::serving(&watch, || {
                let serve = || take(&KernelFault, &range.fileh, &req, &mut HostLease::released());
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(serve)).unwrap_or_else(|_| {
                    eprintln!(
                        "bigfile: panic while serving block {} of {} for a system call \
                         (userfaultfd worker): aborting",
                        req.blk, range.fileh.name
                    );
                    std::process::abort()
                })
            });
            if let (Ok(()), Some(end)) = (&served, req.call_end) {
                // The system call copies the rest of its buffer without a
                // fault, unless it catches up with the loads: then the
                // kernel shortens its copies for the rest of the call
                // (ARCHITECTURE.md, "A system call's buffer").
                readahead::wait_loaded(&range.fileh, req.vma, req.blk.saturating_add(1)..end);
            }
            // Let go of the handle before the thread goes on: it may drop
            // the handle's last reference next.
            drop(edge);
            drop(range);
            if !watch.answer() {
                // Given up while the loader waited for the host lock: the
                // system call has failed; the page is loadable again. (Its
                // entry in `serving` went then: `give_up`.)
                poison::expire(page_addr, ps);
                continue;
            }
            self.served(e.tid, page_addr);
            match served {
                Ok(()) => {
                    let _ = self.uffd.wake(page_addr, ps);
                }
                Err(failed)
                    if !may_be_waiting(e.tid)
                        || (failed.deadlock && !held && !self.deadlocked(e.tid, page_addr)) =>
                {
                    // A stale event's: nothing to fail (a wake is harmless).
                    let _ = self.uffd.wake(page_addr, ps);
                }
                Err(failed) => {
                    eprintln!(
                        "bigfile: {} (in a system call: it fails with EFAULT)",
                        failed.message
                    );
                    if self.fail(page_addr, ps) {
                        // Its page is loadable again once the system call
                        // has failed (`poison.rs`). More workers are
                        // started meanwhile if faults wait.
                        std::thread::sleep(POISON_TIME);
                        poison::expire(page_addr, ps);
                    }
                }
            }
        }
    }

    /// Whether the deadlock found serving thread `tid`'s kernel fault on
    /// the page at `page_addr` is confirmed: the thread faulted there again
    /// after a first wake (`Suspects`).
    fn deadlocked(&self, tid: libc::pid_t, page_addr: usize) -> bool {
        self.jobs()
            .suspects
            .confirmed(tid, page_addr, Instant::now())
    }

    fn jobs(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kernel fault of thread `tid` on the page at `page_addr` is
    /// served (or failed): a further event of them is a new fault. Called
    /// before the thread is woken, so that a retry dropped meanwhile
    /// (`dispatch`) was made before that wake, which ends it.
    fn served(&self, tid: libc::pid_t, page_addr: usize) {
        self.jobs().serving.remove(&(tid, page_addr));
    }

    /// Fail the system call waiting for `[page_addr, page_addr + len)`:
    /// poison the page and wake the thread. False if that could not be done
    /// (the page was just mapped there, or the poison table is full of live
    /// poisons: `poison::note`): then the thread is only woken, to fault
    /// again or find the page (better than hanging it). (A kernel without
    /// `UFFDIO_POISON` is not used: `backend::process_uffd`.)
    fn fail(&self, page_addr: usize, len: usize) -> bool {
        if poison::note(page_addr) && self.uffd.poison(page_addr, len).is_ok() {
            return true;
        }
        // Nothing was poisoned: only the note goes. (The refusal may mean an
        // entry is there, a page just mapped: it must stay.)
        poison::unnote(page_addr);
        let _ = self.uffd.wake(page_addr, len);
        false
    }

    /// Give up a fault whose loader waited too long for the host lock.
    fn give_up(&self, w: &Watch) {
        if !may_be_waiting(w.tid) {
            // A stale event's (its thread holds the lock elsewhere): no call
            // to fail.
            self.jobs().serving.retain(|&(_, page)| page != w.page_addr);
            let _ = self.uffd.wake(w.page_addr, w.len);
            return;
        }
        eprintln!(
            "bigfile: a system call needs block {} of {}, whose loader has waited {}s for the \
             host lock (Python's GIL), most likely held by the very thread in the system call \
             (a C extension calling it on mapped memory without releasing the GIL): the call \
             fails with EFAULT (release the GIL around such calls, or prefault the pages)",
            w.blk,
            w.file,
            hostwait::PATIENCE.as_secs()
        );
        // The thread's next fault on the page, after its system call
        // failed, is a new one, served apart (this one's loader is still
        // waiting for the lock): it could be that very thread's, again.
        self.jobs().serving.retain(|&(_, page)| page != w.page_addr);
        if !self.fail(w.page_addr, w.len) {
            eprintln!("bigfile: (the page could not be poisoned: the call is retried)");
        }
    }
}

// Across a fork, the locks a child may take that threads it does not have
// may hold are held by the forking thread: every generation's table of
// ranges (the child drops the mappings it inherited, each taking its range
// out of its generation's table; their unregistration is refused in the
// child: the descriptor acts on the parent), the poisons' and the watches'
// (`poison.rs`, `hostwait.rs`: the child's own service uses them, emptied
// in the child first: the parent's poisons and faults are not the child's).

/// Whether the calling thread is a userfaultfd worker, serving a system
/// call's fault: a loader that takes the host lock may refuse a load there
/// (the system call then fails with EFAULT), e.g. while its host shuts
/// down.
pub fn on_worker() -> bool {
    worker::current() == Some(Worker::Uffd)
}

/// The locks held by the forking thread across the fork.
struct Held {
    _ranges: Vec<RwLockWriteGuard<'static, Ranges>>,
    _poisons: MutexGuard<'static, ()>,
    watches: MutexGuard<'static, Vec<Arc<Watch>>>,
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

unsafe extern "C" fn prepare() {
    let ranges = SERVICES
        .all()
        .filter_map(|g| g.service.get()?.as_ref().ok())
        .map(|svc| svc.ranges.write().unwrap_or_else(|p| p.into_inner()))
        .collect();
    let held = Held {
        _ranges: ranges,
        _poisons: poison::hold_for_fork(),
        watches: hostwait::hold_for_fork(),
    };
    HELD.with(|h| *h.borrow_mut() = Some(held));
}

unsafe extern "C" fn parent() {
    release(false);
}

unsafe extern "C" fn child() {
    release(true);
}

/// Let go of what `prepare` took; in the child, empty the poisons and the
/// watches first (the parent's).
fn release(in_child: bool) {
    let held = HELD.with(|h| h.borrow_mut().take());
    if let (Some(mut held), true) = (held, in_child) {
        poison::forget_in_child();
        hostwait::forget_in_child(&mut held.watches);
    }
}

/// A fault the kernel took for a thread inside a system call, served by a
/// worker; the worker then wakes the thread, or poisons the page so that
/// the system call fails with EFAULT (after the diagnostic).
struct KernelFault;

/// Why a kernel fault's service failed.
struct KernelFailure {
    message: String,
    /// A wait that would never end (a deadlock, maybe a stale event's:
    /// `Suspects`).
    deadlock: bool,
}

impl FaultSource for KernelFault {
    type Finished = Result<(), KernelFailure>;

    fn finish(
        &self,
        fh: &FileHInner,
        req: &PageRequest,
        served: Result<(), Failure>,
    ) -> Result<(), KernelFailure> {
        served.map_err(|f| KernelFailure {
            message: f.message(req.blk, &fh.name),
            deadlock: f.is_deadlock(),
        })
    }
}

/// The wait graph's edge from a thread blocked in a kernel-mode fault to
/// the worker serving it, for as long as this lives.
struct InSystemCall<'a> {
    fileh: &'a FileHInner,
    tid: Tid,
    ticket: Arc<Ticket>,
}

impl<'a> InSystemCall<'a> {
    fn start(fileh: &'a FileHInner, tid: Tid) -> InSystemCall<'a> {
        let ticket = Ticket::mine_for(false);
        fileh
            .shared
            .lock()
            .waits()
            .start_in_system_call(tid, ticket.clone());
        InSystemCall { fileh, tid, ticket }
    }
}

impl Drop for InSystemCall<'_> {
    fn drop(&mut self) {
        self.ticket.finish(Ok(()));
        self.fileh
            .shared
            .lock()
            .waits()
            .end_in_system_call(self.tid, &self.ticket);
    }
}

/// A range registered with the service; dropping it stops the delivery of
/// its faults (the range is forgotten first, then unregistered).
pub(crate) struct UffdRegistration {
    svc: &'static UffdService,
    start: usize,
    reg: Option<bigfile_uffd::Registration<'static>>,
}

impl Drop for UffdRegistration {
    fn drop(&mut self) {
        let range = self
            .svc
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.start);
        if let Some(r) = range {
            poison::forget_range(r.start, r.len);
        }
        drop(self.reg.take());
    }
}

/// Whether thread `tid` may still wait in the kernel fault an event of its
/// reported: asleep in a userfaultfd fault, or where the kernel does not
/// say, or running with a signal pending (a kernel-mode fault so retried
/// never sleeps). Not when it sleeps anywhere else or runs with nothing
/// pending: the event is stale (its thread left that fault, woken by
/// another thread's serving of the page or by a signal, and its
/// page is served already or faulted again), and failing its page would
/// poison it under other threads' system calls (EFAULT for nothing).
fn may_be_waiting(tid: libc::pid_t) -> bool {
    match waiting(tid) {
        Ok(Waiting::InUserfault | Waiting::Unknown) | Err(_) => true,
        Ok(Waiting::Elsewhere) => false,
        Ok(Waiting::Running) => signal_pending(tid).unwrap_or(true),
    }
}

/// Whether descriptor `fd` of this process is in blocking mode: a `write`
/// to it copies its whole buffer before it returns (a non-blocking one, an
/// event loop's socket or pipe, takes what fits, so the rest of its buffer
/// is not read ahead). A descriptor closed or reused since the fault reads
/// as whatever it is now: at worst a buffer read ahead, or not, for
/// nothing.
fn blocking(fd: libc::c_int) -> bool {
    // SAFETY: F_GETFL reads a descriptor's flags; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK == 0
}

/// Say once per process that a user-mode fault could not be handed to its
/// thread and goes to a worker instead: such a fault is served without the
/// thread's host lock (a Python loader then waits for the GIL the faulting
/// thread holds, until the watchdog gives up on it: `hostwait.rs`).
fn unqueued_request(err: &io::Error) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!(
            "bigfile: the request signal could not be queued to a faulting thread ({err}); \
             its faults are served by userfaultfd workers instead"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadlock_is_confirmed_by_the_same_fault_again_soon() {
        let mut s = Suspects::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        for k in 1..CONFIRMATIONS {
            assert!(
                !s.confirmed(7, 0x1000, t0 + ms(k.into())),
                "seen {k}: only woken"
            );
        }
        assert!(!s.confirmed(8, 0x1000, t0), "another thread's");
        assert!(!s.confirmed(7, 0x2000, t0), "another page's");
        assert!(s.confirmed(7, 0x1000, t0 + ms(9)), "once more: failed");
        assert!(!s.confirmed(7, 0x1000, t0 + ms(10)), "then new");
        let late = t0 + ms(10) + CONFIRM_WITHIN;
        assert!(!s.confirmed(7, 0x1000, late), "too late: a new suspicion");
        assert_eq!(s.0.len(), 1, "old suspicions are forgotten");
    }
}
