//! `BigFile`: the base class Python subclasses, and opening a handle whose
//! blocks its Python `loadblk`/`storeblk` load and store.

use std::sync::Arc;

use bigfile_virtmem::FileH;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::adapter::PyFileAdapter;
use crate::error::to_py;
use crate::faults::ensure_on_top;
use crate::fileh::PyBigFileH;
use crate::ram::RamChoice;

/// A file of `blksize`-byte blocks whose storage is Python code.
#[pyclass(
    module = "bigfile._bigfile",
    name = "BigFile",
    subclass,
    weakref,
    frozen
)]
pub(crate) struct PyBigFile {
    blksize: usize,
}

#[pymethods]
impl PyBigFile {
    #[new]
    #[pyo3(signature = (blksize, *_args, **_kwargs))]
    fn new(
        blksize: isize,
        _args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        PyBigFile::with_blksize(blksize)
    }

    /// Whether read-ahead may call `loadblk` on a worker thread of its own
    /// (default False; a subclass sets `readahead = True` to allow it).
    /// Read-ahead loads the blocks ahead of a sequential scan while the
    /// scan goes on: `loadblk` then runs on another thread (holding the
    /// GIL), and an exception it raises there is forgotten (the block is
    /// loaded again when touched, raising as usual). Read when a handle is
    /// opened.
    #[classattr]
    fn readahead() -> bool {
        false
    }

    /// Block size in bytes (read-only).
    #[getter]
    pub(crate) fn blksize(&self) -> usize {
        self.blksize
    }

    /// Open a handle of this file: mappings of it load blocks with
    /// `loadblk`; `dirty_writeout` stores changes with `storeblk`.
    ///
    /// `ram`: None (the default RAM for this blksize), a RAM spec string
    /// such as "memfd" or "shmfs:/dev/shm" (page size = blksize unless the
    /// spec says), or a `RAM`. `budget`: bytes of memory the handle's pages
    /// may hold (a RAM of its own is created for it).
    ///
    /// The default RAM's budget follows the memory the process may use: a
    /// quarter of the least of the machine's memory and its cgroups' memory
    /// limits, lowered while memory is short, never below a 64th of that
    /// limit (setting `RAM.budget` fixes a budget instead); so does the
    /// budget of a RAM of its own made without `budget`.
    ///
    /// `fault_backend`: "signals", "userfaultfd" or "auto" (see `RAM`), for
    /// a RAM of its own; by default the default RAM's, which follows the
    /// environment variable BIGFILE_FAULTS (signals when unset).
    #[pyo3(signature = (ram = None, budget = None, fault_backend = None))]
    fn fileh_open(
        slf: &Bound<'_, Self>,
        ram: Option<&Bound<'_, PyAny>>,
        budget: Option<u64>,
        fault_backend: Option<&str>,
    ) -> PyResult<Py<PyBigFileH>> {
        let choice = RamChoice::new(ram, budget, fault_backend)?;
        open_python(slf.as_any(), slf.get().blksize, choice)
    }
}

impl PyBigFile {
    /// The base object of a file of `blksize`-byte blocks (checked).
    pub(crate) fn with_blksize(blksize: isize) -> PyResult<PyBigFile> {
        let os_page = bigfile_os::os_page_size();
        if blksize <= 0 || blksize as usize % os_page != 0 {
            return Err(PyValueError::new_err(format!(
                "blksize {blksize} is not a positive multiple of the OS page size {os_page}"
            )));
        }
        Ok(PyBigFile {
            blksize: blksize as usize,
        })
    }
}

/// Open a handle of `slf` whose blocks are loaded and stored by calling its
/// Python `loadblk`/`storeblk` methods.
pub(crate) fn open_python(
    slf: &Bound<'_, PyAny>,
    blksize: usize,
    choice: RamChoice<'_, '_>,
) -> PyResult<Py<PyBigFileH>> {
    let py = slf.py();
    let ty = slf.get_type();
    let loadblk = ty.getattr("loadblk").ok();
    if !loadblk.is_some_and(|f| f.is_callable()) {
        return Err(PyTypeError::new_err(format!(
                "{} must define loadblk(self, blk, buf) to be opened (subclass BigFile and implement it)",
                ty.qualname()?
            )));
    }
    ensure_on_top()?;
    let ram = choice.resolve(py, blksize)?;
    let name = format!("{}", ty.qualname()?);
    let reads_ahead = ty.getattr("readahead")?.is_truthy()?;
    let adapter = Arc::new(PyFileAdapter::new(
        slf.clone().unbind(),
        blksize,
        name,
        reads_ahead,
    ));
    let fileh = FileH::open(adapter.clone(), ram.as_ref()).map_err(|e| to_py(py, e))?;
    Py::new(py, PyBigFileH::new(fileh, Some(adapter)))
}
