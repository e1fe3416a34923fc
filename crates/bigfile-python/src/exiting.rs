//! Python loads on bigfile's worker threads (read-ahead of a file that
//! opted in; a system call's fault on the userfaultfd backend) stopped
//! before the interpreter finalizes. A worker is a thread Python did not
//! start: past the start of finalization, a `loadblk` there that released
//! the GIL (a sleep, a read) and takes it again is ended by Python with
//! `pthread_exit`, which cannot unwind through our frames and aborts the
//! process. So an `atexit` callback (run before finalization) refuses
//! further worker loads of Python files and waits for those in progress; a
//! refused load fails (a failed read-ahead is forgotten; a system call's
//! fails with EFAULT). (The module imported into a subinterpreter
//! registers there too: that interpreter's exit turns worker loads of
//! Python files off for the rest of the process; user-mode faults still
//! load every block.) The callback is registered when the module is
//! imported, and atexit runs callbacks last registered first: those
//! registered before (and daemon threads, still running then) find worker
//! loads of Python files refused already, a system call of theirs on a
//! page not loaded failing with EFAULT.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use pyo3::prelude::*;

/// Set once the interpreter exits: no worker load of a Python file starts
/// any more.
static EXITING: AtomicBool = AtomicBool::new(false);
/// Worker loads of Python files in progress.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// How many forks this process descends from (since the module was
/// loaded): a load let in before a fork is not counted in the child.
static GENERATION: AtomicUsize = AtomicUsize::new(0);

/// A worker load of a Python file let in (in fork generation `.0`):
/// counted until dropped (after the GIL is given back).
pub(crate) struct Admitted(usize);

impl Drop for Admitted {
    fn drop(&mut self) {
        // A child forked during the load (from its loadblk, on the worker)
        // forgot it: its count is of its own loads only.
        if GENERATION.load(SeqCst) == self.0 {
            IN_FLIGHT.fetch_sub(1, SeqCst);
        }
    }
}

/// Let a worker load of a Python file in, unless the interpreter
/// exits. Counted first, then checked: `stop` sets the flag first, then
/// waits for the count, so one of the two sees the other.
pub(crate) fn admit() -> Option<Admitted> {
    IN_FLIGHT.fetch_add(1, SeqCst);
    let admitted = Admitted(GENERATION.load(SeqCst));
    (!EXITING.load(SeqCst)).then_some(admitted)
}

/// The `atexit` callback: refuse further worker loads of Python files,
/// wait (without the GIL, which they need) for those in progress.
#[pyfunction]
fn _stop_read_ahead(py: Python<'_>) {
    EXITING.store(true, SeqCst);
    py.detach(|| {
        while IN_FLIGHT.load(SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// A forked child has none of its parent's workers: their loads in
/// progress are not its own.
extern "C" fn forget_in_flight() {
    GENERATION.fetch_add(1, SeqCst);
    IN_FLIGHT.store(0, SeqCst);
}

/// Register the `atexit` callback and the fork handler (at module init).
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let stop = wrap_pyfunction!(_stop_read_ahead, m)?;
    m.py().import("atexit")?.call_method1("register", (stop,))?;
    // SAFETY: registers a handler that only changes atomics.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(forget_in_flight)) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in review: a load let in before a fork, ending in the child
    /// (a loadblk that forked, on its worker), took one off the child's
    /// count of its own loads, so its exit could stop waiting for a load
    /// still in progress (or wrap the count and wait for ever).
    #[test]
    fn a_load_from_before_a_fork_is_not_counted_in_the_child() {
        let parents = admit().expect("not exiting");
        forget_in_flight(); // as in the child
        let own = admit().expect("not exiting");
        drop(parents);
        assert_eq!(IN_FLIGHT.load(SeqCst), 1, "the child's own load");
        drop(own);
        assert_eq!(IN_FLIGHT.load(SeqCst), 0);
    }
}
