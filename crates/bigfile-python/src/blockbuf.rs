//! The memory a Python `loadblk`/`storeblk` sees, and taking it back after.
//!
//! Python code gets a memoryview of a [`BlockBuffer`]: memory of our own,
//! copied to the RAM page after `loadblk` (from it before `storeblk`). The
//! buffer counts the buffer-protocol exports it has handed out, so every
//! view derived from the memoryview (slices, numpy arrays) is seen. After the
//! call the buffer refuses new exports, and [`scrub`] takes the memory back
//! from Python: reference cycles are collected, finished frames that hold
//! the memoryview get the stub `"<pybuf>"` instead, the memoryview is
//! released (any remaining reference raises on use), and views that survive
//! all that see zeros in memory that is no longer the block's: the page is
//! never reachable from Python after the call.

use std::alloc::{self, Layout};
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyMemoryView, PyString};

use crate::gil::ExcState;

/// Memory handed to Python for one block.
#[pyclass(module = "bigfile._bigfile", name = "_BlockBuffer", frozen)]
pub(crate) struct BlockBuffer {
    mem: Mem,
    readonly: bool,
    /// Buffer-protocol exports alive.
    exports: AtomicUsize,
    /// Set once the call is over: no new exports.
    revoked: AtomicBool,
}

/// A zeroed allocation owned by its `BlockBuffer` (16-byte aligned, so it
/// comes from calloc: large blocks are fresh zero pages, not a memset).
struct Mem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: `Mem` owns its allocation; the pointer is only dereferenced under
// the GIL or by the thread running the call, as any Python buffer is.
unsafe impl Send for Mem {}
// SAFETY: as above; no `&Mem` method mutates through the pointer.
unsafe impl Sync for Mem {}

impl Mem {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, 16).expect("blksize is below isize::MAX")
    }

    fn zeroed(len: usize) -> Mem {
        // SAFETY: `len` is non-zero (a blksize).
        let ptr = unsafe { alloc::alloc_zeroed(Mem::layout(len)) };
        if ptr.is_null() {
            alloc::handle_alloc_error(Mem::layout(len));
        }
        Mem { ptr, len }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout; the owning
        // BlockBuffer is being dropped, so no export points here any more.
        unsafe { alloc::dealloc(self.ptr, Mem::layout(self.len)) }
    }
}

impl BlockBuffer {
    pub(crate) fn new(len: usize, readonly: bool) -> BlockBuffer {
        BlockBuffer {
            mem: Mem::zeroed(len),
            readonly,
            exports: AtomicUsize::new(0),
            revoked: AtomicBool::new(false),
        }
    }

    pub(crate) fn exports(&self) -> usize {
        self.exports.load(SeqCst)
    }

    /// Copy `src` in (before the call).
    pub(crate) fn fill_from(&self, src: &[u8]) {
        assert_eq!(src.len(), self.mem.len);
        // SAFETY: `mem` is `len` bytes we own; no export exists yet.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.mem.ptr, src.len()) };
    }

    /// Copy out to `dst` (after the call, before any other Python code runs).
    pub(crate) fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.mem.len);
        // SAFETY: `mem` is `len` bytes we own; exports may exist but run no
        // code while we hold the GIL, so the bytes do not change under us.
        unsafe { std::ptr::copy_nonoverlapping(self.mem.ptr, dst.as_mut_ptr(), dst.len()) };
    }

    /// Zero the memory: what views that outlived the call see from now on.
    fn zero(&self) {
        // SAFETY: as in `copy_to`; zeroing bytes views may hold is defined
        // for byte buffers.
        unsafe { std::ptr::write_bytes(self.mem.ptr, 0, self.mem.len) };
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
        // memory stays allocated until the last export is released, as
        // every export holds a reference to this object.
        unsafe {
            export(
                slf.as_any(),
                view,
                (this.mem.ptr, this.mem.len),
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
    if left != 0 {
        buf.get().zero();
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
