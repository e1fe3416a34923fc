//! bigfile-python: the extension module `bigfile._bigfile`.
//!
//! It owns the Python face of virtmem: `BigFile` (a base class whose
//! subclasses implement `loadblk`/`storeblk` in Python), `BigFileH`, `VMA`
//! (a writable buffer numpy can use without copying) and `RAM`. Its
//! invariants (the GIL and exception state around every Python call made
//! from virtmem, no Python object reaching a block's memory after the call,
//! the references the cyclic GC sees, our signal handler kept on top) and
//! its place in the lock order are in ARCHITECTURE.md at the repository
//! root.

mod adapter;
mod blockbuf;
mod error;
mod exiting;
mod faults;
mod file;
mod fileh;
mod gil;
mod heap;
mod interrupt;
mod mapcache;
mod mapping;
mod native_file;
mod ram;
mod stats;
mod window;

use std::sync::Arc;

use pyo3::prelude::*;

/// `dirty_writeout` flag: call storeblk for every dirty block.
const WRITEOUT_STORE: u32 = 1;
/// `dirty_writeout` flag: mark every dirty block clean.
const WRITEOUT_MARKSTORED: u32 = 2;

/// Drop every clean page of the default RAMs; returns how many.
#[pyfunction]
fn ram_reclaim() -> usize {
    bigfile_virtmem::Ram::reclaim_defaults()
}

/// Put bigfile's SIGSEGV/SIGBUS handler back on top if another handler
/// (faulthandler.enable()) replaced it; the other one still gets every fault
/// that is not bigfile's. Returns whether it had been displaced.
#[pyfunction]
fn _ensure_fault_handler_on_top() -> PyResult<bool> {
    faults::ensure_on_top()
}

/// Testing aid: read the byte at `offset` of `vma` with the GIL released,
/// as a numpy loop would.
#[pyfunction]
fn _read_nogil(py: Python<'_>, vma: &Bound<'_, fileh::PyVMA>, offset: usize) -> PyResult<u8> {
    let vma = vma.borrow().get()?;
    py.detach(|| {
        let mut b = [0u8];
        vma.read_at(offset, &mut b).map(|()| b[0])
    })
    .map_err(|e| error::to_py(py, e))
}

/// Testing aid: read the byte at `offset` of `vma` from a new thread that
/// Python has never seen.
#[pyfunction]
fn _read_in_new_thread(
    py: Python<'_>,
    vma: &Bound<'_, fileh::PyVMA>,
    offset: usize,
) -> PyResult<u8> {
    let vma = vma.borrow().get()?;
    py.detach(|| {
        std::thread::spawn(move || {
            let mut b = [0u8];
            vma.read_at(offset, &mut b).map(|()| b[0])
        })
        .join()
    })
    .map_err(|_| pyo3::exceptions::PyRuntimeError::new_err("reader thread panicked"))?
    .map_err(|e| error::to_py(py, e))
}

/// Serve allocations below `bytes` from the C heap and keep `bytes` free
/// at its top between loads (glibc's `M_MMAP_THRESHOLD`, `M_TOP_PAD`; see
/// heap.rs): for Python loaders that allocate block-sized objects per load
/// (`bigfile.file_zodb`). Returns whether it is set; False where malloc is
/// not glibc's or the environment tunes it.
#[pyfunction]
fn _keep_heap_top(bytes: usize) -> bool {
    heap::keep_top(bytes)
}

#[pymodule]
fn _bigfile(m: &Bound<'_, PyModule>) -> PyResult<()> {
    bigfile_virtmem::set_host_lock(Arc::new(gil::Gil));
    faults::ensure_on_top()?;
    exiting::register(m)?;
    m.add_class::<file::PyBigFile>()?;
    m.add_class::<native_file::PyFileBigFile>()?;
    m.add_class::<fileh::PyBigFileH>()?;
    m.add_class::<fileh::PyVMA>()?;
    m.add_class::<ram::PyRam>()?;
    m.add("WRITEOUT_STORE", WRITEOUT_STORE)?;
    m.add("WRITEOUT_MARKSTORED", WRITEOUT_MARKSTORED)?;
    m.add(
        "FORKED_WORKER_STATUS",
        bigfile_virtmem::FORKED_WORKER_STATUS,
    )?;
    m.add_function(wrap_pyfunction!(ram_reclaim, m)?)?;
    m.add_function(wrap_pyfunction!(_ensure_fault_handler_on_top, m)?)?;
    m.add_function(wrap_pyfunction!(_read_nogil, m)?)?;
    m.add_function(wrap_pyfunction!(_read_in_new_thread, m)?)?;
    m.add_function(wrap_pyfunction!(_keep_heap_top, m)?)?;
    Ok(())
}
