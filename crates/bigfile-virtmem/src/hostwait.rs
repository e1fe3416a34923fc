//! Kernel faults whose loader waits for the host lock.
//!
//! On the userfaultfd backend a fault inside a system call is served by a
//! worker thread; a loader that needs the host lock (Python's: the GIL)
//! takes it there. If the thread in the system call holds that lock (a C
//! extension calling `write(2)` on mapped memory without releasing the
//! GIL), the worker would wait for it forever, and the thread for the
//! worker. The binding says when its loader waits for the lock
//! ([`host_lock_wait`]); the userfaultfd reader gives up a fault whose
//! worker has waited [`PATIENCE`]: the system call fails with EFAULT and a
//! diagnostic, as it would on the signal backend. (A lock held by another
//! thread that long is let go of in time; waiting longer would only turn
//! a hang into a late error.) The worker, once it has the lock, loads the
//! page anyway, for the next access.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long a kernel fault's loader may wait for the host lock.
pub(crate) const PATIENCE: Duration = Duration::from_secs(5);

/// A kernel fault being served by a worker.
pub(crate) struct Watch {
    /// The thread in the system call.
    pub(crate) tid: libc::pid_t,
    pub(crate) page_addr: usize,
    pub(crate) len: usize,
    pub(crate) blk: u64,
    pub(crate) file: String,
    answered: AtomicBool,
    /// When its loader started waiting for the host lock ([`since_start`]
    /// + 1), 0 when it is not waiting.
    waiting_since: AtomicU64,
}

impl Watch {
    pub(crate) fn new(
        tid: libc::pid_t,
        (page_addr, len): (usize, usize),
        blk: u64,
        file: String,
    ) -> Watch {
        Watch {
            tid,
            page_addr,
            len,
            blk,
            file,
            answered: AtomicBool::new(false),
            waiting_since: AtomicU64::new(0),
        }
    }

    /// Take the right to answer the fault (wake or poison its thread):
    /// false if it was given up already.
    pub(crate) fn answer(&self) -> bool {
        !self.answered.swap(true, Relaxed)
    }
}

/// Faults being served now.
static WATCHES: Mutex<Vec<Arc<Watch>>> = Mutex::new(Vec::new());

thread_local! {
    /// The fault the calling worker serves (null elsewhere). A raw pointer
    /// in a const-initialised cell: read from signal handlers (a loader
    /// may fault), so no lazy initialisation and no destructor.
    static CURRENT: Cell<*const Watch> = const { Cell::new(std::ptr::null()) };
}

/// Run `serve` as the worker serving `watch`'s fault.
pub(crate) fn serving<R>(watch: &Arc<Watch>, serve: impl FnOnce() -> R) -> R {
    struct Done<'a>(&'a Arc<Watch>);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(std::ptr::null()));
            let mut w = WATCHES.lock().unwrap_or_else(|p| p.into_inner());
            w.retain(|x| !Arc::ptr_eq(x, self.0));
        }
    }
    WATCHES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(watch.clone());
    CURRENT.with(|c| c.set(Arc::as_ptr(watch)));
    let _done = Done(watch);
    serve()
}

/// Run `acquire`, which takes the host lock (waiting for it), telling the
/// userfaultfd backend so: a system call that waits for a page this
/// thread's loader serves fails rather than waits forever when the thread
/// in the system call holds the lock. For bindings, around their loader's
/// taking of the host lock; elsewhere just runs `acquire`.
pub fn host_lock_wait<R>(acquire: impl FnOnce() -> R) -> R {
    let watch = CURRENT.with(Cell::get);
    if watch.is_null() {
        return acquire();
    }
    // SAFETY: set by `serving`, which keeps the `Arc` alive and clears it
    // before returning; this runs inside its `serve` on the same thread.
    let watch = unsafe { &*watch };
    let outer = watch.waiting_since.swap(since_start() + 1, Relaxed);
    let r = acquire();
    watch.waiting_since.store(outer, Relaxed);
    r
}

/// The faults whose loader has waited for the host lock longer than
/// [`PATIENCE`] and that are not answered yet: the caller now answers them
/// (gives them up).
pub(crate) fn overdue() -> Vec<Arc<Watch>> {
    let now = since_start() + 1;
    let patience = PATIENCE.as_millis() as u64;
    WATCHES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|w| {
            let since = w.waiting_since.load(Relaxed);
            since != 0 && now.saturating_sub(since) >= patience && w.answer()
        })
        .cloned()
        .collect()
}

/// The lock of the faults being served, for the forking thread to hold
/// across a fork (`uffd.rs`): a child never finds it held by a worker it
/// does not have.
pub(crate) fn hold_for_fork() -> MutexGuard<'static, Vec<Arc<Watch>>> {
    WATCHES.lock().unwrap_or_else(|p| p.into_inner())
}

/// In a forked child (before fork returns): forget the parent's faults,
/// whose system calls and workers are not the child's (its reader would
/// give them up, poisoning the child's pages). Leaked, not freed: stores
/// only.
pub(crate) fn forget_in_child(watches: &mut Vec<Arc<Watch>>) {
    std::mem::forget(std::mem::take(watches));
}

/// Milliseconds since the first call.
fn since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
