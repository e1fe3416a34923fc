//! `BigFileH` (a handle of a BigFile with its own changes) and `VMA` (one
//! mapping of it, usable as a writable buffer).

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bigfile_virtmem::{Access, Advice, FileH, LoadPolicy, PageState, Vma, WriteoutFlags};
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt};
use pyo3::{PyTraverseError, PyVisit};

use crate::adapter::PyFileAdapter;
use crate::blockbuf::export;
use crate::error::to_py;
use crate::faults::ensure_on_top;
use crate::mapcache::{self, MapCache};
use crate::mapping::{Addresses, Mapping};
use crate::stats::{ram_stats_dict, stats_dict};
use crate::window;

/// A non-negative integer argument that fits in 64 bits.
fn u64_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    if !obj.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "{what} must be an int, not {}",
            obj.get_type().qualname()?
        )));
    }
    if obj.lt(0)? {
        return Err(PyValueError::new_err(format!(
            "{what} must be >= 0, got {obj}"
        )));
    }
    obj.extract::<u64>()
        .map_err(|_| PyValueError::new_err(format!("{what} {obj} does not fit in 64 bits")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A handle of a BigFile: the file as it is, plus this handle's changes.
#[pyclass(module = "bigfile._bigfile", name = "BigFileH", weakref)]
pub(crate) struct PyBigFileH {
    fileh: Mutex<Option<Arc<FileH>>>,
    /// The Python file's adapter; `None` for a native file (no Python object involved).
    adapter: Option<Arc<PyFileAdapter>>,
    /// Mappings kept for `mmap_cached`.
    cache: Mutex<MapCache>,
}

impl PyBigFileH {
    pub(crate) fn new(fileh: FileH, adapter: Option<Arc<PyFileAdapter>>) -> Self {
        PyBigFileH {
            fileh: Mutex::new(Some(Arc::new(fileh))),
            adapter,
            cache: Mutex::new(MapCache::default()),
        }
    }

    fn get(&self) -> PyResult<Arc<FileH>> {
        lock(&self.fileh)
            .clone()
            .ok_or_else(|| PyValueError::new_err("operation on a closed BigFileH"))
    }
}

/// The `pgoffset, pglen` arguments of `mmap` and `mmap_cached`.
fn page_range(pgoffset: &Bound<'_, PyAny>, pglen: &Bound<'_, PyAny>) -> PyResult<(u64, u64)> {
    let pgoffset = u64_arg(pgoffset, "pgoffset")?;
    let pglen = u64_arg(pglen, "pglen")?;
    if pglen == 0 {
        return Err(PyValueError::new_err("pglen must be > 0"));
    }
    Ok((pgoffset, pglen))
}

#[pymethods]
impl PyBigFileH {
    /// Map pages `pgoffset .. pgoffset+pglen` of the file; returns a VMA.
    fn mmap(
        slf: &Bound<'_, Self>,
        pgoffset: &Bound<'_, PyAny>,
        pglen: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyVMA>> {
        let (pgoffset, pglen) = page_range(pgoffset, pglen)?;
        let fileh = slf.borrow().get()?;
        ensure_on_top()?;
        let vma = fileh
            .mmap(pgoffset, pglen)
            .map_err(|e| to_py(slf.py(), e))?;
        Py::new(
            slf.py(),
            PyVMA::new(vma, fileh.blksize(), slf.clone().unbind()),
        )
    }

    /// A mapping covering at least pages `pgoffset .. pgoffset+pglen`,
    /// possibly shared with earlier calls: the handle keeps a few recent
    /// mappings (small requests widened to aligned windows) and reuses one
    /// that covers the request. Use `filerange()` for where it starts.
    /// Closing the returned VMA only gives up this holder; kept mappings
    /// are dropped by `release_cached()` and `close()`.
    fn mmap_cached(
        slf: &Bound<'_, Self>,
        pgoffset: &Bound<'_, PyAny>,
        pglen: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyVMA>> {
        let py = slf.py();
        let (pgoffset, pglen) = page_range(pgoffset, pglen)?;
        let this = slf.borrow();
        let fileh = this.get()?;
        let ps = fileh.blksize();
        let found = lock(&this.cache).lookup(pgoffset, pglen);
        let vma = match found {
            Some(v) => v,
            None => {
                ensure_on_top()?;
                let window = mapcache::window(pgoffset, pglen, ps);
                let (start, len) = window.unwrap_or((pgoffset, pglen));
                let vma = Mapping::new(fileh.mmap(start, len).map_err(|e| to_py(py, e))?);
                if window.is_some() {
                    let evicted = lock(&this.cache).insert(vma.clone());
                    drop(evicted);
                }
                vma
            }
        };
        Py::new(py, PyVMA::shared(vma, ps, slf.clone().unbind()))
    }

    /// Drop the mappings kept for `mmap_cached` (those still used by
    /// arrays stay mapped until the arrays go).
    fn release_cached(&self) {
        let kept = lock(&self.cache).take_all();
        drop(kept);
    }

    /// Write out changes: WRITEOUT_STORE calls storeblk for each dirty
    /// block (ascending); WRITEOUT_MARKSTORED marks them clean. An exception
    /// of storeblk is raised here; the blocks not stored stay dirty.
    fn dirty_writeout(&self, py: Python<'_>, flags: &Bound<'_, PyAny>) -> PyResult<()> {
        let bits = u64_arg(flags, "flags")?;
        let flags = u32::try_from(bits)
            .map_err(|_| PyValueError::new_err(format!("invalid writeout flags {bits:#x}")))
            .and_then(|b| WriteoutFlags::from_bits(b).map_err(|e| to_py(py, e)))?;
        let fileh = self.get()?;
        fileh.dirty_writeout(flags).map_err(|e| to_py(py, e))
    }

    /// Drop every change not written out.
    fn dirty_discard(&self, py: Python<'_>) -> PyResult<()> {
        self.get()?.dirty_discard().map_err(|e| to_py(py, e))
    }

    /// Whether there are changes not written out.
    fn isdirty(&self) -> PyResult<bool> {
        Ok(self.get()?.is_dirty())
    }

    /// Forget page `pgoffset` (changes included): the next access loads it again.
    fn invalidate_page(&self, py: Python<'_>, pgoffset: &Bound<'_, PyAny>) -> PyResult<()> {
        let pgoffset = u64_arg(pgoffset, "pgoffset")?;
        self.get()?
            .invalidate_page(pgoffset)
            .map_err(|e| to_py(py, e))
    }

    /// Whether the mappings take clean pages from a base-layer mapping of
    /// the file (wendelin.core 2.x's mode over its WCFS filesystem): never
    /// here, every page is loaded into this handle's RAM. Kept for
    /// wendelin.core's callers.
    fn uses_mmap_overlay(&self) -> bool {
        false
    }

    /// The state of page `pgoffset`: `None` when not in memory, else
    /// "loading", "loaded" or "dirty" (a load invalidated meanwhile is "loading").
    fn page_state(&self, pgoffset: &Bound<'_, PyAny>) -> PyResult<Option<&'static str>> {
        let pgoffset = u64_arg(pgoffset, "pgoffset")?;
        Ok(self.get()?.page_state(pgoffset).map(|st| match st {
            PageState::Loading | PageState::LoadingInvalidated => "loading",
            PageState::Loaded => "loaded",
            PageState::Dirty => "dirty",
        }))
    }

    /// The dirty blocks, ascending.
    fn dirty_blocks(&self) -> PyResult<Vec<u64>> {
        Ok(self.get()?.dirty_blocks())
    }

    /// This handle's counters: faults, loads, load_errors, stores,
    /// reclaims, resident_pages, dirty_pages, streams, readahead_loads,
    /// readahead_hits, readahead_wasted.
    fn stats(&self) -> PyResult<HashMap<&'static str, u64>> {
        Ok(stats_dict(self.get()?.stats()))
    }

    /// The counters of the RAM this handle's pages live in, with
    /// `budget`, `resident_bytes`, `fault_backend` ("signals" or
    /// "userfaultfd") and `fault_backend_fallback` (why not userfaultfd;
    /// None when it is).
    fn ram_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        ram_stats_dict(py, self.get()?.ram())
    }

    /// How a failing loadblk is retried (inside a fault, the last failure
    /// ends in SIGBUS): `attempts` in all, sleeping `n * backoff` seconds
    /// before retry n.
    #[pyo3(signature = (attempts, backoff = 0.001))]
    fn set_load_policy(&self, attempts: u32, backoff: f64) -> PyResult<()> {
        if attempts == 0 {
            return Err(PyValueError::new_err("attempts must be >= 1"));
        }
        let backoff = Duration::try_from_secs_f64(backoff)
            .map_err(|e| PyValueError::new_err(format!("backoff: {e}")))?;
        self.get()?
            .set_load_policy(LoadPolicy { attempts, backoff });
        Ok(())
    }

    /// Block size of the file (= page size of the mappings).
    #[getter]
    fn blksize(&self) -> PyResult<usize> {
        Ok(self.get()?.blksize())
    }

    /// Whether the handle is closed.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.fileh).is_none()
    }

    /// Close the handle, dropping changes not written out. Refused
    /// (RuntimeError) while mappings of it are alive. Closing twice is fine.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.release_cached();
        let Some(fileh) = lock(&self.fileh).take() else {
            return Ok(());
        };
        let give_back = |f: Arc<FileH>, err: PyErr| {
            *lock(&self.fileh) = Some(f);
            Err(err)
        };
        let fileh =
            match Arc::try_unwrap(fileh) {
                Ok(f) => f,
                Err(f) => return give_back(
                    f,
                    pyo3::exceptions::PyRuntimeError::new_err(
                        "BigFileH is in use by another thread; close it after that call returns",
                    ),
                ),
            };
        match fileh.close() {
            Ok(()) => {
                // An idle block window may map a page of its RAM file.
                window::detach_idle();
                Ok(())
            }
            Err((e, f)) => give_back(Arc::new(f), to_py(py, e)),
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        match &self.adapter {
            Some(a) => a.traverse(&visit),
            None => Ok(()),
        }
    }

    fn __clear__(&mut self) {
        if let Some(a) = &self.adapter {
            drop(a.clear());
        }
    }
}

impl Drop for PyBigFileH {
    fn drop(&mut self) {
        // Dropped without `close`: as there, no idle block window keeps the
        // handle's RAM file open.
        window::detach_idle();
    }
}

/// One mapping of a BigFileH: a writable buffer of `len(vma)` bytes.
#[pyclass(module = "bigfile._bigfile", name = "VMA", weakref)]
pub(crate) struct PyVMA {
    /// The mapping while this object holds it (until closed).
    vma: Mutex<Option<Arc<Mapping>>>,
    /// Its addresses, taken as long as this object lives (`mapping.rs`);
    /// `None` only while dropped.
    addresses: Option<Arc<Addresses>>,
    addr: usize,
    len: usize,
    pgoffset: u64,
    pagesize: usize,
    /// Keeps the handle alive as long as the mapping; `None` once GC cleared it.
    fileh: Option<Py<PyBigFileH>>,
    exports: AtomicUsize,
}

impl PyVMA {
    fn new(vma: Vma, pagesize: usize, fileh: Py<PyBigFileH>) -> Self {
        PyVMA::shared(Mapping::new(vma), pagesize, fileh)
    }

    /// A holder of a mapping others may hold too: it is unmapped when the last goes.
    fn shared(vma: Arc<Mapping>, pagesize: usize, fileh: Py<PyBigFileH>) -> Self {
        PyVMA {
            addr: vma.as_ptr() as usize,
            len: vma.len(),
            pgoffset: vma.pgoffset(),
            pagesize,
            addresses: Some(vma.addresses()),
            vma: Mutex::new(Some(vma)),
            fileh: Some(fileh),
            exports: AtomicUsize::new(0),
        }
    }

    pub(crate) fn get(&self) -> PyResult<Arc<Mapping>> {
        lock(&self.vma)
            .clone()
            .ok_or_else(|| PyValueError::new_err("operation on an unmapped VMA"))
    }
}

#[pymethods]
impl PyVMA {
    fn __len__(&self) -> usize {
        self.len
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.borrow();
        // Holds the mapping for the check; the export count then keeps
        // unmap() from happening while the buffer is out.
        let _vma = this.get()?;
        ensure_on_top()?;
        // SAFETY: `view` is the consumer's Py_buffer; the mapping stays in
        // place while any export is alive (unmap refuses, and each export
        // holds a reference to this object).
        unsafe {
            export(
                slf.as_any(),
                view,
                (this.addr as *mut u8, this.len),
                false,
                flags,
                &this.exports,
            )
        }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.exports.fetch_sub(1, SeqCst);
    }

    /// (pgoffset, pglen): the file pages this mapping covers.
    fn filerange(&self) -> (u64, u64) {
        (self.pgoffset, (self.len / self.pagesize) as u64)
    }

    /// Page size (= the file's blksize).
    fn pagesize(&self) -> usize {
        self.pagesize
    }

    /// Address of the first byte.
    #[getter]
    fn addr_start(&self) -> usize {
        self.addr
    }

    /// Address just past the last byte.
    #[getter]
    fn addr_stop(&self) -> usize {
        self.addr + self.len
    }

    /// The handle this mapping is of.
    #[getter]
    fn fileh(&self, py: Python<'_>) -> Option<Py<PyBigFileH>> {
        self.fileh.as_ref().map(|f| f.clone_ref(py))
    }

    /// Whether the mapping is unmapped.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.vma).is_none()
    }

    /// File pages currently mapped in (holding memory) in this mapping.
    fn mapped_pages(&self) -> PyResult<Vec<u64>> {
        Ok(self.get()?.mapped_pages())
    }

    /// Declare how the mapping will be accessed: "normal" (the default:
    /// clean pages are reclaimed least recently used first, and faults on
    /// consecutive blocks are detected as a forward scan, which then gets
    /// drop-behind as under "sequential"), "sequential" (ascending, each
    /// page once: a fault on a block makes the clean page of the block before
    /// the first to be reclaimed, so a scan bigger than the RAM budget reuses
    /// the page it just left and leaves other cached pages alone) or
    /// "random" (no order: no sequential detection). Only which page is
    /// reclaimed changes, never the data.
    fn advise(&self, advice: &str) -> PyResult<()> {
        let advice = match advice {
            "normal" => Advice::Normal,
            "sequential" => Advice::Sequential,
            "random" => Advice::Random,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown advice '{other}': expected 'normal', 'sequential' or 'random'"
                )))
            }
        };
        self.get()?.advise(advice);
        Ok(())
    }

    /// The advice in effect: "normal", "sequential" or "random" (see
    /// advise()).
    #[getter]
    fn advice(&self) -> PyResult<&'static str> {
        Ok(match self.get()?.advice() {
            Advice::Normal => "normal",
            Advice::Sequential => "sequential",
            Advice::Random => "random",
        })
    }

    /// Load (and with write=True, dirty) the pages of bytes start..stop now,
    /// e.g. before passing the memory to a system call such as readinto():
    /// the kernel gets EFAULT, not a page fault, for pages not yet mapped.
    /// A loadblk exception is raised here.
    #[pyo3(signature = (start = 0, stop = None, write = false))]
    fn prefault(
        &self,
        py: Python<'_>,
        start: usize,
        stop: Option<usize>,
        write: bool,
    ) -> PyResult<()> {
        let vma = self.get()?;
        let stop = stop.unwrap_or(self.len);
        let access = if write { Access::Write } else { Access::Read };
        vma.prefault(start..stop, access).map_err(|e| to_py(py, e))
    }

    /// Unmap now: the file leaves the mapping and the handle counts it gone.
    /// Refused (BufferError) while buffers taken of it (memoryviews, and
    /// numpy arrays over them) are alive. numpy arrays made over the VMA
    /// itself (`np.ndarray(buffer=vma)`, `np.frombuffer(vma)`) hold no
    /// buffer but this object: they then read zeros, and write into memory
    /// dropped with them, until the last of them goes; the addresses are
    /// never reused meanwhile. Unmapping twice is fine.
    fn close(&self) -> PyResult<()> {
        let n = self.exports.load(SeqCst);
        if n != 0 {
            return Err(PyBufferError::new_err(format!(
                "cannot unmap a VMA with {n} exported buffer(s) (memoryview, numpy array) alive"
            )));
        }
        let vma = lock(&self.vma).take();
        drop(vma);
        Ok(())
    }

    /// The same as close().
    fn unmap(&self) -> PyResult<()> {
        self.close()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close()?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "<bigfile VMA of pages {}..{} at {:#x}{}>",
            self.pgoffset,
            self.pgoffset + (self.len / self.pagesize) as u64,
            self.addr,
            if self.closed() { ", unmapped" } else { "" }
        )
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(f) = &self.fileh {
            visit.call(f)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.fileh = None;
    }
}

impl Drop for PyVMA {
    fn drop(&mut self) {
        // The addresses first: if no other object holds them, the mapping
        // (if this was its last holder) is then simply unmapped.
        drop(self.addresses.take());
        drop(self.vma.get_mut().unwrap_or_else(|p| p.into_inner()).take());
    }
}
