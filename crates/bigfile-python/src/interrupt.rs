//! Ctrl-C (`KeyboardInterrupt`) and `SystemExit` raised inside a Python
//! `loadblk`: not a failure of the storage, so never retried as one, never
//! counted, never the end of the fault (SIGBUS). The exception is held, the
//! load is made again, and once the thread leaves its outermost Python
//! callback the exception is raised again where the program is: at the
//! next instruction of the code that touched the memory.
//!
//! How it is raised again:
//! - on the main thread, by a pending call (`Py_AddPendingCall`), which
//!   raises the very exception object (`SystemExit`'s code, the traceback
//!   into `loadblk` kept). A pending call that runs while the thread is
//!   inside a `loadblk` again (the next fault of the same access) leaves the
//!   exception held for the end of that callback;
//! - on another Python thread, by an asynchronous exception
//!   (`PyThreadState_SetAsyncExc`), which takes the exception's type only
//!   (a thread's `SystemExit` only ends it). It fires inside the next
//!   `loadblk` of the same access too, if there is one: that load is then
//!   made again, and the exception goes on to the end of the access;
//! - from a thread Python does not know (its thread state lives only for
//!   the callback), to the main thread, as a signal's exception would.
//!
//! A `storeblk` is not made again: its interrupt stops the writeout, and
//! `dirty_writeout` raises it (the blocks not stored stay dirty).

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_long, c_void};

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::blockbuf::write_stderr;

thread_local! {
    /// Python callbacks (`loadblk`/`storeblk`) this thread is inside.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The interrupt this thread holds until it leaves its outermost callback.
    static HELD: RefCell<Option<Py<PyAny>>> = const { RefCell::new(None) };
    /// A pending call to raise `HELD` is queued (main thread only).
    static QUEUED: Cell<bool> = const { Cell::new(false) };
    /// The type of the asynchronous exception this thread sent itself last:
    /// when it fires inside a callback it is not a new interrupt.
    static ECHO: Cell<*mut ffi::PyObject> = const { Cell::new(std::ptr::null_mut()) };
}

/// Whether `err` is an interrupt: `KeyboardInterrupt` or `SystemExit`.
pub(crate) fn is_interrupt(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<PyKeyboardInterrupt>(py) || err.is_instance_of::<PySystemExit>(py)
}

/// Keep `err`, an interrupt, to raise once this thread's callbacks are over
/// (the first one held wins). Returns whether it is new, rather than the
/// echo of one this thread raised again itself.
pub(crate) fn hold(py: Python<'_>, err: PyErr) -> bool {
    let ty = err.get_type(py).as_ptr();
    let echo = ECHO.with(|e| e.replace(std::ptr::null_mut())) == ty;
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if h.is_none() {
            *h = Some(err.into_value(py).into_any());
        }
    });
    !echo
}

/// Inside one Python callback of this thread; the outermost, when it ends,
/// raises again what was held (see the module docs).
pub(crate) struct Callback {
    /// The thread had no Python thread state before this callback.
    foreign: bool,
}

impl Callback {
    /// Enter a callback. `foreign`: the thread was unknown to Python.
    pub(crate) fn enter(foreign: bool) -> Callback {
        DEPTH.with(|d| d.set(d.get() + 1));
        Callback { foreign }
    }

    /// Leave the callback, holding the GIL: the last thing done before it
    /// is given back, so no Python code of ours runs after the interrupt is
    /// queued.
    pub(crate) fn leave(self, py: Python<'_>) {
        let depth = DEPTH.with(|d| {
            d.set(d.get() - 1);
            d.get()
        });
        if depth == 0 {
            deliver(py, self.foreign);
        }
        std::mem::forget(self);
    }
}

impl Drop for Callback {
    /// Left by unwinding (a panic): only the count.
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Raise again the interrupt this thread holds, if any (see the module docs).
fn deliver(py: Python<'_>, foreign: bool) {
    if !HELD.with(|h| h.borrow().is_some()) {
        return;
    }
    if foreign || on_main_thread(py) {
        if foreign {
            // The pending call runs on the main thread, whose HELD it reads.
            let Some(exc) = HELD.with(|h| h.borrow_mut().take()) else {
                return;
            };
            queue_for_main(py, exc, false);
        } else if !QUEUED.with(|q| q.replace(true)) {
            let exc = HELD.with(|h| h.borrow().as_ref().map(|e| e.clone_ref(py)));
            if let Some(exc) = exc {
                queue_for_main(py, exc, true);
            }
        }
        return;
    }
    let Some(exc) = HELD.with(|h| h.borrow_mut().take()) else {
        return;
    };
    let ty = exc.bind(py).get_type();
    ECHO.with(|e| e.set(ty.as_ptr()));
    // SAFETY: we hold the GIL; the thread id is this thread's, whose thread
    // state exists (a Python thread: not foreign); the type is a live
    // exception class (the function takes its own reference).
    unsafe {
        ffi::PyThreadState_SetAsyncExc(ffi::PyThread_get_thread_ident() as c_long, ty.as_ptr());
    }
}

fn on_main_thread(py: Python<'_>) -> bool {
    let main = py
        .import("threading")
        .and_then(|t| t.call_method0("main_thread"))
        .and_then(|m| m.getattr("ident"))
        .and_then(|i| i.extract::<u64>());
    // SAFETY: only reads the calling thread's id.
    let me = unsafe { ffi::PyThread_get_thread_ident() } as u64;
    main.is_ok_and(|m| m == me)
}

/// What a queued pending call raises: the main thread's held interrupt
/// (`own`), or one handed over from another thread.
enum Queued {
    Own,
    Handed(Py<PyAny>),
}

/// Queue a pending call that raises `exc` on the main thread.
fn queue_for_main(py: Python<'_>, exc: Py<PyAny>, own: bool) {
    let what = if own {
        Queued::Own
    } else {
        Queued::Handed(exc.clone_ref(py))
    };
    let arg = Box::into_raw(Box::new(what)).cast::<c_void>();
    // SAFETY: `raise_queued` takes back the box it is given, once.
    if unsafe { ffi::Py_AddPendingCall(Some(raise_queued), arg) } != 0 {
        // The queue is full (32 calls): the interrupt would be lost, so at
        // least say so.
        // SAFETY: not queued: the box is still ours.
        drop(unsafe { Box::from_raw(arg.cast::<Queued>()) });
        QUEUED.with(|q| q.set(false));
        write_stderr(
            py,
            &format!(
                "bigfile: could not raise {} again after the load it interrupted \
                 (Python's pending-call queue is full)\n",
                exc.bind(py).get_type()
            ),
        );
    }
}

/// The pending call: on the main thread, with the GIL held. Raises the
/// interrupt (returns -1 with it set), unless the thread is inside a
/// callback again, where it stays held for that callback's end.
extern "C" fn raise_queued(arg: *mut c_void) -> c_int {
    // SAFETY: the box queue_for_main leaked for this call.
    let what = unsafe { Box::from_raw(arg.cast::<Queued>()) };
    // SAFETY: pending calls run holding the GIL.
    let py = unsafe { Python::assume_attached() };
    let exc = match *what {
        Queued::Own => {
            QUEUED.with(|q| q.set(false));
            if DEPTH.with(|d| d.get()) > 0 {
                return 0;
            }
            HELD.with(|h| h.borrow_mut().take())
        }
        Queued::Handed(exc) => {
            if DEPTH.with(|d| d.get()) > 0 {
                HELD.with(|h| {
                    h.borrow_mut().get_or_insert(exc);
                });
                return 0;
            }
            Some(exc)
        }
    };
    match exc {
        Some(exc) => {
            PyErr::from_value(exc.into_bound(py)).restore(py);
            -1
        }
        None => 0,
    }
}
