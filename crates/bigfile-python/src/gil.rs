//! The GIL as virtmem's host lock, entering Python from any thread, and the
//! thread's exception state saved around every Python call made from a fault.
//!
//! Whether a thread holds the GIL is read from the thread itself (the thread
//! state attached on it), never from `PyGILState_Check`, which answers 1
//! for every thread once any subinterpreter has been created.

use std::ptr;

use pyo3::ffi;
use pyo3::Python;

/// Virtmem releases the GIL through this before it waits for work that may
/// need it (or calls a loader that takes it), and retakes it after.
#[derive(Debug)]
pub(crate) struct Gil;

impl bigfile_virtmem::HostLock for Gil {
    fn release(&self) -> Option<usize> {
        if attached().is_null() {
            return None;
        }
        // SAFETY: this thread holds the GIL of the interpreter of its
        // attached thread state, which PyEval_SaveThread detaches and returns.
        Some(unsafe { ffi::PyEval_SaveThread() } as usize)
    }

    fn retake(&self, token: usize) {
        // SAFETY: `token` is the thread state `release` saved on this thread,
        // and this thread does not hold the GIL since then.
        unsafe { ffi::PyEval_RestoreThread(token as *mut ffi::PyThreadState) }
    }
}

/// The thread state attached on the calling thread (the thread holds its
/// interpreter's GIL), or null.
///
/// 3.12+: the thread's own current thread state. Before 3.12 CPython keeps
/// only the GIL holder's, process-wide: it is this thread's when it is the
/// thread state bound to this thread (`PyGILState_GetThisThreadState`). A
/// thread running a subinterpreter's code there holds the GIL through
/// another thread state, which this cannot tell from another thread holding
/// the GIL: it answers null (README: subinterpreters).
pub(crate) fn attached() -> *mut ffi::PyThreadState {
    // SAFETY: both only read the calling thread's (3.12+) or the runtime's
    // current thread state, with no requirement on the GIL.
    unsafe {
        let current = ffi::compat::PyThreadState_GetUnchecked();
        #[cfg(not(Py_3_12))]
        if current != ffi::PyGILState_GetThisThreadState() {
            return ptr::null_mut();
        }
        current
    }
}

/// Whether `ts` belongs to the main interpreter.
///
/// # Safety
/// `ts` is a live thread state.
unsafe fn of_main_interpreter(ts: *mut ffi::PyThreadState) -> bool {
    // SAFETY: `ts` is live (caller); both calls only read.
    unsafe { ffi::PyThreadState_GetInterpreter(ts) == ffi::PyInterpreterState_Main() }
}

/// A Python call asked for, before 3.12, on a thread started by a
/// subinterpreter: this module's objects live in the main interpreter, whose
/// GIL such a thread cannot take (see [`with_python`]).
#[derive(Debug)]
pub(crate) struct SubinterpreterThread;

/// Run `f` holding the GIL of the main interpreter, from any thread: one
/// that holds it, one whose GIL virtmem released (its thread state is
/// reused, so exception state is the faulting code's), one Python never saw
/// (a thread state is created and destroyed), or one running a
/// subinterpreter's code (its thread state there is detached meanwhile and
/// put back after; the call gets a thread state of the main interpreter for
/// its duration). Before 3.12 the PyGILState API, which pyo3 uses, knows
/// one thread state per thread, the first: a thread started by a
/// subinterpreter cannot run main-interpreter code (`Err`).
///
/// The GIL is taken with a raw `PyGILState_Ensure` before pyo3 sees it: pyo3
/// counts GIL acquisitions per thread and would assume the GIL held when a
/// fault arrives inside pyo3 code whose GIL virtmem has released (a loadblk
/// reading another mapping, a storeblk under `dirty_writeout`). Every pyo3
/// object `f` creates is dropped before the GIL is released.
pub(crate) fn with_python<R>(
    f: impl for<'py> FnOnce(Python<'py>) -> R,
) -> Result<R, SubinterpreterThread> {
    struct Ensured(ffi::PyGILState_STATE);
    impl Drop for Ensured {
        fn drop(&mut self) {
            // SAFETY: pairs with the PyGILState_Ensure below, on this thread.
            unsafe { ffi::PyGILState_Release(self.0) }
        }
    }
    struct Detached(*mut ffi::PyThreadState);
    impl Drop for Detached {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: the thread state detached below, on this thread,
                // which holds no GIL again by now.
                unsafe { ffi::PyEval_RestoreThread(self.0) }
            }
        }
    }
    // SAFETY: the interpreter is initialized while our module is loaded;
    // `attached()` and the bound thread state are this thread's own, live.
    unsafe {
        let current = attached();
        let _detached = Detached(if !current.is_null() && !of_main_interpreter(current) {
            ffi::PyEval_SaveThread()
        } else {
            ptr::null_mut()
        });
        let bound = ffi::PyGILState_GetThisThreadState();
        if bound.is_null() || of_main_interpreter(bound) {
            // On a userfaultfd worker, the thread in the system call it
            // serves may hold the GIL: virtmem gives the fault up if this
            // waits too long.
            let _ensured = Ensured(bigfile_virtmem::host_lock_wait(|| ffi::PyGILState_Ensure()));
            return Ok(Python::attach(f));
        }
        in_temporary_thread_state(f)
    }
}

/// Run `f` in a thread state of the main interpreter made for it, on a
/// thread bound to a subinterpreter's and holding no GIL. From 3.12 the
/// thread state last attached on a thread is the one the PyGILState API
/// (and pyo3) uses, so `f` may use pyo3 as anywhere.
///
/// # Safety
/// The thread holds no GIL.
#[cfg(Py_3_12)]
unsafe fn in_temporary_thread_state<R>(
    f: impl for<'py> FnOnce(Python<'py>) -> R,
) -> Result<R, SubinterpreterThread> {
    struct Temporary;
    impl Drop for Temporary {
        fn drop(&mut self) {
            // SAFETY: the thread state attached below is current on this
            // thread; clearing it needs the GIL, which it holds.
            unsafe {
                ffi::PyThreadState_Clear(ffi::PyThreadState_Get());
                ffi::PyThreadState_DeleteCurrent();
            }
        }
    }
    // SAFETY: a new thread state of the main interpreter, attached (taking
    // its GIL) on this thread, which holds none (caller); deleted by
    // `Temporary` with the GIL released.
    unsafe {
        let tstate = ffi::PyThreadState_New(ffi::PyInterpreterState_Main());
        // As for PyGILState_Ensure above.
        bigfile_virtmem::host_lock_wait(|| ffi::PyEval_RestoreThread(tstate));
    }
    let _temporary = Temporary;
    Ok(Python::attach(f))
}

/// Before 3.12: see [`with_python`].
///
/// # Safety
/// None needed; `unsafe` to match the 3.12+ version.
#[cfg(not(Py_3_12))]
unsafe fn in_temporary_thread_state<R>(
    _f: impl for<'py> FnOnce(Python<'py>) -> R,
) -> Result<R, SubinterpreterThread> {
    Err(SubinterpreterThread)
}

/// The raised exception (an error being propagated) and the handled one (as
/// `sys.exc_info()` shows inside an `except:` block) of the current thread.
pub(crate) struct ExcState {
    #[cfg(Py_3_12)]
    raised: *mut ffi::PyObject,
    #[cfg(not(Py_3_12))]
    raised: [*mut ffi::PyObject; 3],
    /// `None`: the handled exception came from an outer frame of the
    /// exception stack (the innermost entry was empty), so nothing of ours
    /// is to be put back.
    handled: Option<Handled>,
}

#[cfg(Py_3_11)]
type Handled = *mut ffi::PyObject;
#[cfg(not(Py_3_11))]
type Handled = [*mut ffi::PyObject; 3];

#[cfg(Py_3_11)]
extern "C" {
    fn PyErr_GetHandledException() -> *mut ffi::PyObject;
    fn PyErr_SetHandledException(exc: *mut ffi::PyObject);
}

/// The handled exception, a new reference (null when none).
///
/// # Safety
/// The GIL is held.
#[cfg(Py_3_11)]
unsafe fn get_handled() -> Handled {
    // SAFETY: the GIL is held (caller).
    unsafe { PyErr_GetHandledException() }
}

/// Set the innermost entry of the handled-exception stack (null: clear it).
/// Does not steal the references.
///
/// # Safety
/// The GIL is held; the pointers are null or valid objects.
#[cfg(Py_3_11)]
unsafe fn set_handled(h: Handled) {
    // SAFETY: the GIL is held (caller); the function increfs what it keeps.
    unsafe { PyErr_SetHandledException(h) }
}

#[cfg(Py_3_11)]
fn handled_value(h: &Handled) -> *mut ffi::PyObject {
    *h
}

/// Release the references of a handled-exception value.
///
/// # Safety
/// The GIL is held; `h` holds owned references or nulls.
#[cfg(Py_3_11)]
unsafe fn drop_handled(h: Handled) {
    // SAFETY: an owned reference or null (caller).
    unsafe { ffi::Py_XDECREF(h) }
}

/// # Safety
/// The GIL is held.
#[cfg(not(Py_3_11))]
unsafe fn get_handled() -> Handled {
    let mut h = [ptr::null_mut(); 3];
    // SAFETY: the GIL is held (caller); the out-pointers are valid.
    unsafe { ffi::PyErr_GetExcInfo(&mut h[0], &mut h[1], &mut h[2]) };
    h
}

/// # Safety
/// The GIL is held; the pointers are null or valid objects.
#[cfg(not(Py_3_11))]
unsafe fn set_handled(h: Handled) {
    // SAFETY: PyErr_SetExcInfo steals its arguments: give it new references.
    unsafe {
        ffi::Py_XINCREF(h[0]);
        ffi::Py_XINCREF(h[1]);
        ffi::Py_XINCREF(h[2]);
        ffi::PyErr_SetExcInfo(h[0], h[1], h[2]);
    }
}

#[cfg(not(Py_3_11))]
fn handled_value(h: &Handled) -> *mut ffi::PyObject {
    h[1]
}

/// # Safety
/// The GIL is held; `h` holds owned references or nulls.
#[cfg(not(Py_3_11))]
unsafe fn drop_handled(h: Handled) {
    // SAFETY: owned references or nulls (caller).
    unsafe {
        ffi::Py_XDECREF(h[0]);
        ffi::Py_XDECREF(h[1]);
        ffi::Py_XDECREF(h[2]);
    }
}

#[cfg(Py_3_11)]
const NO_HANDLED: Handled = ptr::null_mut();
#[cfg(not(Py_3_11))]
const NO_HANDLED: Handled = [ptr::null_mut(); 3];

impl ExcState {
    /// Take both exception states of this thread, leaving them clear.
    ///
    /// # Safety
    /// The GIL is held by this thread.
    pub(crate) unsafe fn take() -> ExcState {
        // SAFETY: the GIL is held (caller).
        unsafe {
            #[cfg(Py_3_12)]
            let raised = ffi::PyErr_GetRaisedException();
            #[cfg(not(Py_3_12))]
            let raised = {
                let mut r = [ptr::null_mut(); 3];
                ffi::PyErr_Fetch(&mut r[0], &mut r[1], &mut r[2]);
                r
            };
            let handled = get_handled();
            set_handled(NO_HANDLED);
            // If an outer entry of the stack still shows the same exception,
            // the innermost entry was empty: put nothing back into it later.
            let outer = get_handled();
            let from_outer = !handled_value(&handled).is_null()
                && handled_value(&outer) == handled_value(&handled);
            drop_handled(outer);
            let handled = if from_outer {
                drop_handled(handled);
                None
            } else {
                Some(handled)
            };
            ExcState { raised, handled }
        }
    }

    /// Clear both exception states (what a step of Python code left behind).
    ///
    /// # Safety
    /// The GIL is held by this thread.
    pub(crate) unsafe fn clear() {
        // SAFETY: the GIL is held (caller).
        unsafe {
            ffi::PyErr_Clear();
            set_handled(NO_HANDLED);
        }
    }

    /// Put back the state taken by [`ExcState::take`], replacing whatever is there.
    ///
    /// # Safety
    /// The GIL is held by the thread that took the state.
    pub(crate) unsafe fn restore(self) {
        // SAFETY: the GIL is held (caller); the references are owned and
        // handed over (PyErr_Restore/SetRaisedException steal them).
        unsafe {
            ExcState::clear();
            if let Some(h) = self.handled {
                set_handled(h);
                drop_handled(h);
            }
            #[cfg(Py_3_12)]
            if !self.raised.is_null() {
                ffi::PyErr_SetRaisedException(self.raised);
            }
            #[cfg(not(Py_3_12))]
            ffi::PyErr_Restore(self.raised[0], self.raised[1], self.raised[2]);
        }
    }
}
