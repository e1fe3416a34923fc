//! The GIL as virtmem's host lock, entering Python from any thread, and the
//! thread's exception state saved around every Python call made from a fault.

use std::ptr;

use pyo3::ffi;
use pyo3::Python;

/// Virtmem releases the GIL through this before it takes its own lock or
/// waits for another thread's load, and retakes it after.
#[derive(Debug)]
pub(crate) struct Gil;

impl bigfile_virtmem::HostLock for Gil {
    fn release(&self) -> Option<usize> {
        // SAFETY: the hooks are installed by the module's init, so the
        // interpreter is initialized; PyGILState_Check only reads the calling
        // thread's state, and PyEval_SaveThread is called only when this
        // thread holds the GIL.
        unsafe {
            if ffi::PyGILState_Check() == 0 {
                return None;
            }
            Some(ffi::PyEval_SaveThread() as usize)
        }
    }

    fn retake(&self, token: usize) {
        // SAFETY: `token` is the thread state `release` saved on this thread,
        // and this thread does not hold the GIL since then.
        unsafe { ffi::PyEval_RestoreThread(token as *mut ffi::PyThreadState) }
    }
}

/// Run `f` holding the GIL, from any thread: one that holds it, one whose
/// GIL virtmem released (its thread state is reused, so exception state is
/// the faulting code's), or one Python never saw (a thread state is created
/// and destroyed).
///
/// The GIL is taken with a raw `PyGILState_Ensure` before pyo3 sees it: pyo3
/// counts GIL acquisitions per thread and would assume the GIL held when a
/// fault arrives inside pyo3 code whose GIL virtmem has released (a loadblk
/// reading another mapping, a storeblk under `dirty_writeout`). Every pyo3
/// object `f` creates is dropped before the GIL is released.
pub(crate) fn with_python<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> R {
    struct Ensured(ffi::PyGILState_STATE);
    impl Drop for Ensured {
        fn drop(&mut self) {
            // SAFETY: pairs with the PyGILState_Ensure below, on this thread.
            unsafe { ffi::PyGILState_Release(self.0) }
        }
    }
    // On a userfaultfd worker, the thread in the system call it serves may
    // hold the GIL: virtmem gives the fault up if this waits too long.
    // SAFETY: the interpreter is initialized while our module is loaded.
    let _ensured = Ensured(bigfile_virtmem::host_lock_wait(|| unsafe {
        ffi::PyGILState_Ensure()
    }));
    Python::attach(f)
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
