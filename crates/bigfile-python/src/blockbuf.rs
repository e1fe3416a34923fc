//! The memory a Python `loadblk`/`storeblk` sees, and taking it back after.
//!
//! Python code gets a memoryview of a [`BlockBuffer`]: the block's RAM page
//! itself, mapped at an address of ours for the call (`window`), writable
//! for `loadblk` and read-only for `storeblk`; nothing is copied. The
//! buffer counts the buffer-protocol exports it has handed out, so every
//! view derived from the memoryview (slices, numpy arrays) is seen. After
//! the call the buffer refuses new exports, and [`scrub`] takes the memory
//! back from Python: reference cycles are collected, finished frames that
//! hold the memoryview get the stub `"<pybuf>"` instead, the memoryview is
//! released (any remaining reference raises on use), and views that survive
//! all that see zeros at the same addresses, which are no longer the page:
//! the page is never reachable from Python after the call.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyMemoryView, PyString};

use crate::gil::ExcState;
use crate::window::{PageWindow, Zeros};

/// The memory handed to Python for one block.
#[pyclass(module = "bigfile._bigfile", name = "_BlockBuffer", frozen)]
pub(crate) struct BlockBuffer {
    /// Where the memory is: the same for the buffer's whole life, so a view
    /// that outlives the call keeps a valid address.
    ptr: *mut u8,
    len: usize,
    readonly: bool,
    mem: Mutex<Mem>,
    /// Buffer-protocol exports alive.
    exports: AtomicUsize,
    /// Set once the call is over: no new exports.
    revoked: AtomicBool,
}

// SAFETY: `ptr` is the address of the memory `mem` owns, only dereferenced
// through Python buffer exports (under the GIL, or by the thread running
// the call, as any Python buffer is).
unsafe impl Send for BlockBuffer {}
// SAFETY: as above; the state is behind a mutex and atomics.
unsafe impl Sync for BlockBuffer {}

/// What is at the buffer's addresses.
enum Mem {
    /// The block's RAM page, during the call.
    Page(PageWindow),
    /// Zeros, after a call that views outlived.
    Zeros { _zeros: Zeros },
    /// Nothing of ours: the range went back to the pool (no view was left,
    /// and none can be made).
    Returned,
}

impl BlockBuffer {
    /// The buffer of a call, over `window` (read-only for a store).
    pub(crate) fn new(window: PageWindow, readonly: bool) -> BlockBuffer {
        BlockBuffer {
            ptr: window.ptr(),
            len: window.len(),
            readonly,
            mem: Mutex::new(Mem::Page(window)),
            exports: AtomicUsize::new(0),
            revoked: AtomicBool::new(false),
        }
    }

    pub(crate) fn exports(&self) -> usize {
        self.exports.load(SeqCst)
    }

    /// After the call, once exports are refused: take the page away. With
    /// no view left the range goes back to the pool; views that are left
    /// see zeros from now on.
    fn take_back(&self) {
        let mut mem = self.mem.lock().unwrap_or_else(|p| p.into_inner());
        if let Mem::Page(window) = std::mem::replace(&mut *mem, Mem::Returned) {
            if self.exports() == 0 {
                window.put_back();
            } else {
                *mem = Mem::Zeros {
                    _zeros: window.into_zeros(!self.readonly),
                };
            }
        }
    }
}

#[pymethods]
impl BlockBuffer {
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        if this.revoked.load(SeqCst) {
            return Err(PyBufferError::new_err(
                "the buffer given to loadblk/storeblk is valid only during that call",
            ));
        }
        // SAFETY: `view` is the consumer's Py_buffer (protocol contract); the
        // memory stays mapped (the page, then zeros) until the last export
        // is released, as every export holds a reference to this object
        // and `take_back` gives the range up only with no export left.
        unsafe {
            export(
                slf.as_any(),
                view,
                (this.ptr, this.len),
                this.readonly,
                flags,
                &this.exports,
            )
        }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.exports.fetch_sub(1, SeqCst);
    }
}

/// Fill `view` for a buffer-protocol export of `len` bytes at `ptr` owned by
/// `obj`, and count it in `exports` (what `__releasebuffer__` uncounts).
///
/// # Safety
/// `view` is the consumer's `Py_buffer`; the memory stays valid (and, unless
/// `readonly`, writable) until the export is released.
pub(crate) unsafe fn export(
    obj: &Bound<'_, PyAny>,
    view: *mut ffi::Py_buffer,
    (ptr, len): (*mut u8, usize),
    readonly: bool,
    flags: c_int,
    exports: &AtomicUsize,
) -> PyResult<()> {
    // SAFETY: forwarded to the caller; `obj` is a live object the view
    // will hold a reference to.
    let r = unsafe {
        ffi::PyBuffer_FillInfo(
            view,
            obj.as_ptr(),
            ptr.cast(),
            len as ffi::Py_ssize_t,
            c_int::from(readonly),
            flags,
        )
    };
    if r != 0 {
        return Err(PyErr::fetch(obj.py()));
    }
    exports.fetch_add(1, SeqCst);
    Ok(())
}

/// A memoryview over `buf` for the call.
pub(crate) fn memoryview<'py>(buf: &Bound<'py, BlockBuffer>) -> PyResult<Bound<'py, PyMemoryView>> {
    PyMemoryView::from(buf.as_any())
}

/// Clear what a step of Python code left in the thread's exception state
/// (GC may run `__del__` code that raises at any allocation).
fn clear_exc(_py: Python<'_>) {
    // SAFETY: the GIL is held (a `Python` token exists).
    unsafe { ExcState::clear() }
}

/// After the call: take the block's memory back from Python. See the module
/// docs. `mv` is the memoryview the call got; `what` names the call for the
/// report on views left over.
pub(crate) fn scrub(
    py: Python<'_>,
    buf: &Bound<'_, BlockBuffer>,
    mv: Bound<'_, PyMemoryView>,
    what: &str,
) {
    buf.get().revoked.store(true, SeqCst);
    clear_exc(py);
    // One reference is ours: anything more is a cycle, a frame or a user.
    if refcnt(&mv) > 1 {
        gc_collect(py);
        if refcnt(&mv) > 1 {
            stub_in_frames(py, &mv);
        }
    }
    if mv.call_method0("release").is_err() {
        // Views exported by the memoryview itself are alive; see below.
        clear_exc(py);
    }
    drop(mv);
    if buf.get().exports() != 0 {
        gc_collect(py);
    }
    let left = buf.get().exports();
    buf.get().take_back();
    if left != 0 {
        let msg = format!(
            "bigfile: {what}: {left} view(s) of the block buffer outlived the call; \
             they now see zeros, not the block\n"
        );
        write_stderr(py, &msg);
    }
    clear_exc(py);
}

/// The reference count of `obj`.
fn refcnt(obj: &Bound<'_, PyMemoryView>) -> ffi::Py_ssize_t {
    // SAFETY: `obj` is a live object and the GIL is held (a `Bound` exists).
    unsafe { ffi::Py_REFCNT(obj.as_ptr()) }
}

fn gc_collect(py: Python<'_>) {
    if let Ok(gc) = py.import("gc") {
        let _ = gc.call_method0("collect");
    }
    clear_exc(py);
}

/// Frames running on some thread now: never rewritten.
fn running_frames<'py>(py: Python<'py>) -> Vec<Bound<'py, PyAny>> {
    let mut out = Vec::new();
    let Ok(frames) = py
        .import("sys")
        .and_then(|sys| sys.call_method0("_current_frames"))
    else {
        clear_exc(py);
        return out;
    };
    let Ok(frames) = frames.cast_into::<PyDict>() else {
        return out;
    };
    for (_, top) in frames.iter() {
        let mut f = Some(top);
        while let Some(frame) = f.filter(|f| !f.is_none()) {
            f = frame.getattr("f_back").ok();
            out.push(frame);
        }
    }
    clear_exc(py);
    out
}

/// Replace `mv` by `"<pybuf>"` in the locals of finished frames that hold
/// it (kept alive e.g. by a saved traceback).
fn stub_in_frames(py: Python<'_>, mv: &Bound<'_, PyMemoryView>) {
    let Ok(referrers) = py
        .import("gc")
        .and_then(|gc| gc.call_method1("get_referrers", (mv,)))
    else {
        clear_exc(py);
        return;
    };
    let Ok(frame_type) = py.import("types").and_then(|t| t.getattr("FrameType")) else {
        clear_exc(py);
        return;
    };
    let running = running_frames(py);
    let stub = PyString::new(py, "<pybuf>");
    let Ok(referrers) = referrers.try_iter() else {
        clear_exc(py);
        return;
    };
    for r in referrers.flatten() {
        if !r.is_instance(&frame_type).unwrap_or(false) || running.iter().any(|f| f.is(&r)) {
            continue;
        }
        stub_in_frame(&r, mv, &stub);
        clear_exc(py);
    }
    clear_exc(py);
}

fn stub_in_frame(
    frame: &Bound<'_, PyAny>,
    mv: &Bound<'_, PyMemoryView>,
    stub: &Bound<'_, PyString>,
) {
    // 3.13+: f_locals is a write-through proxy. Before: a snapshot dict,
    // written back with PyFrame_LocalsToFast.
    let Ok(locals) = frame.getattr("f_locals") else {
        return;
    };
    let Ok(items) = locals.call_method0("items").and_then(|i| i.try_iter()) else {
        return;
    };
    let names: Vec<Bound<'_, PyAny>> = items
        .flatten()
        .filter_map(|kv| {
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = kv.extract().ok()?;
            v.is(mv).then_some(k)
        })
        .collect();
    if names.is_empty() {
        return;
    }
    for name in names {
        let _ = locals.set_item(name, stub);
    }
    #[cfg(not(Py_3_13))]
    // SAFETY: `frame` is a frame object (checked by the caller) that is not
    // running on any thread, and we hold the GIL.
    unsafe {
        ffi::PyFrame_LocalsToFast(frame.as_ptr().cast(), 0)
    };
}

/// Write to `sys.stderr` (so test capture sees it), falling back to fd 2.
pub(crate) fn write_stderr(py: Python<'_>, msg: &str) {
    let ok = py
        .import("sys")
        .and_then(|sys| sys.getattr("stderr"))
        .and_then(|e| e.call_method1("write", (msg,)))
        .is_ok();
    if !ok {
        clear_exc(py);
        eprint!("{msg}");
    }
}
