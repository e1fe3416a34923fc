//! Host-lock hooks: a runtime's global lock (an interpreter lock) released
//! while bigfile waits, as the Python bindings do for the GIL.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use bigfile_virtmem::HostLock;

use crate::error::{guard, CError};

/// Release the host lock if the calling thread holds it: return a non-NULL
/// token for `bigfile_host_retake_fn`, or NULL when the thread does not
/// hold it.
pub type bigfile_host_release_fn = Option<unsafe extern "C" fn(user: *mut c_void) -> *mut c_void>;

/// Retake the host lock released by `bigfile_host_release_fn`, which
/// returned `token`, on the same thread.
pub type bigfile_host_retake_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, token: *mut c_void)>;

/// Take the host lock, waiting for it (`bigfile_host_lock_wait`).
pub type bigfile_host_acquire_fn = Option<unsafe extern "C" fn(user: *mut c_void)>;

struct CHostLock {
    release: unsafe extern "C" fn(*mut c_void) -> *mut c_void,
    retake: unsafe extern "C" fn(*mut c_void, *mut c_void),
    user: *mut c_void,
}

// SAFETY: `user` is only handed to the hooks, which the caller of
// `bigfile_set_host_lock` promises may run on any thread (the header says so).
unsafe impl Send for CHostLock {}
// SAFETY: as above; there is no state of our own.
unsafe impl Sync for CHostLock {}

impl HostLock for CHostLock {
    fn release(&self) -> Option<usize> {
        // SAFETY: the hook's contract (header).
        let token = unsafe { (self.release)(self.user) };
        (!token.is_null()).then_some(token as usize)
    }

    fn retake(&self, token: usize) {
        // SAFETY: the hook's contract (header); `token` is what `release`
        // returned on this thread.
        unsafe { (self.retake)(self.user, token as *mut c_void) }
    }
}

/// Install the process's host-lock hooks, for a runtime with a global lock
/// (an interpreter lock) that threads hold while running its code, and that
/// `loadblk`/`storeblk` callbacks may need to take. Without them a thread
/// that touches a mapping while holding the lock could wait for another
/// thread's load whose loader waits for the lock: a deadlock.
///
/// bigfile calls `release(user)` in the calls that may wait, before it
/// takes its own lock, and in a page fault before it calls a `loadblk`
/// callback or waits for another thread's load or writeout (a fault that
/// needs neither keeps the lock), and `retake(user, token)` with the
/// non-NULL token it returned after, on the same thread. The callbacks run
/// between the two, so a callback that needs the host lock takes it itself
/// (and releases it before returning). Both hooks run on any
/// thread, from inside page faults (in the SIGSEGV handler), so they must
/// not touch bigfile mappings, and must return normally.
///
/// Install them before the runtime's threads use bigfile (a thread already
/// waiting inside bigfile keeps the lock). Only the first call installs
/// hooks: later ones return -1 (`BIGFILE_ERROR_STATE`); a NULL hook gives
/// -1 (`BIGFILE_ERROR_INVALID`). They cannot be removed: `user` must stay
/// valid for the life of the process. The hooks are process-wide, one host
/// runtime per process, not one per RAM or handle.
///
/// Thread safety: any thread; the first call wins.
#[no_mangle]
pub extern "C" fn bigfile_set_host_lock(
    release: bigfile_host_release_fn,
    retake: bigfile_host_retake_fn,
    user: *mut c_void,
) -> c_int {
    guard("bigfile_set_host_lock", || {
        let (Some(release), Some(retake)) = (release, retake) else {
            return Err(CError::invalid(
                "a hook is NULL; both release and retake are needed",
            ));
        };
        if !bigfile_virtmem::set_host_lock(Arc::new(CHostLock {
            release,
            retake,
            user,
        })) {
            return Err(CError::state(
                "host-lock hooks are already installed in this process",
            ));
        }
        Ok(0)
    })
}

/// Take the host lock by calling `acquire(user)` (which waits for it),
/// telling bigfile that this thread waits for the lock: for `loadblk` and
/// `storeblk` callbacks that take the host lock. On the userfaultfd fault
/// backend a callback may run on a bigfile worker for a system call on
/// mapped memory (`read(2)` into a mapping); when the thread in that system
/// call holds the host lock (a runtime calling it without releasing its
/// lock), the callback would wait for the lock forever and the thread for
/// the callback. Taken through this function, the wait is watched: after 5
/// seconds the system call fails with EFAULT and a diagnostic on stderr
/// (the callback still gets the lock once it is free, and loads the page
/// for the next access). Elsewhere it just calls `acquire(user)`.
///
/// Returns 0 once `acquire` returned, or -1 (`BIGFILE_ERROR_INVALID`) for
/// a NULL `acquire`.
///
/// # Safety
/// `acquire` is safe to call with `user`, and returns normally.
///
/// Thread safety: any thread; meant for callbacks.
#[no_mangle]
pub unsafe extern "C" fn bigfile_host_lock_wait(
    acquire: bigfile_host_acquire_fn,
    user: *mut c_void,
) -> c_int {
    guard("bigfile_host_lock_wait", || {
        let Some(acquire) = acquire else {
            return Err(CError::invalid("acquire is NULL"));
        };
        // SAFETY: the caller's contract.
        bigfile_virtmem::host_lock_wait(|| unsafe { acquire(user) });
        Ok(0)
    })
}
