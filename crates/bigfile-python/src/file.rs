//! `BigFile`: the base class Python subclasses, and the virtmem `BigFile`
//! that calls their `loadblk`/`storeblk`.

use std::cell::RefCell;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use bigfile_virtmem::{BlockError, FileH, Ram};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::blockbuf::{memoryview, scrub, BlockBuffer};
use crate::error::to_py;
use crate::fileh::PyBigFileH;
use crate::gil::{with_python, ExcState};
use crate::ram::PyRam;

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
    #[pyo3(signature = (ram = None, budget = None))]
    fn fileh_open(
        slf: &Bound<'_, Self>,
        ram: Option<&Bound<'_, PyAny>>,
        budget: Option<u64>,
    ) -> PyResult<Py<PyBigFileH>> {
        open_python(slf.as_any(), slf.get().blksize, ram, budget)
    }
}

impl PyBigFile {
    /// The base object of a file of `blksize`-byte blocks (checked).
    pub(crate) fn with_blksize(blksize: isize) -> PyResult<PyBigFile> {
        let os_page = os_page_size();
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
    ram: Option<&Bound<'_, PyAny>>,
    budget: Option<u64>,
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
    crate::ensure_fault_handler_on_top()?;
    let ram = resolve_ram(py, ram, budget, blksize)?;
    let name = format!("{}", ty.qualname()?);
    let adapter = Arc::new(PyFileAdapter {
        obj: Mutex::new(Some(slf.clone().unbind())),
        blksize,
        name,
    });
    let fileh = FileH::open(adapter.clone(), ram.as_ref()).map_err(|e| to_py(py, e))?;
    Py::new(py, PyBigFileH::new(fileh, Some(adapter)))
}

pub(crate) fn os_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

pub(crate) fn resolve_ram(
    py: Python<'_>,
    ram: Option<&Bound<'_, PyAny>>,
    budget: Option<u64>,
    blksize: usize,
) -> PyResult<Option<Ram>> {
    let py_err = |e| to_py(py, e);
    let spec = match ram {
        Some(r) if r.is_none() => None,
        Some(r) => {
            if let Ok(r) = r.downcast::<PyRam>() {
                if budget.is_some() {
                    return Err(PyValueError::new_err(
                        "budget= applies to a RAM that fileh_open creates; set the budget of a RAM object on it",
                    ));
                }
                return Ok(Some(r.get().ram().clone()));
            }
            let Ok(s) = r.extract::<String>() else {
                return Err(PyTypeError::new_err(format!(
                    "ram must be None, a RAM spec string or a RAM, not {}",
                    r.get_type().qualname()?
                )));
            };
            Some(s)
        }
        None => None,
    };
    let spec = match (spec, budget) {
        (None, None) => return Ok(None),
        (Some(s), _) => s,
        (None, Some(_)) => std::env::var("BIGFILE_RAM")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "memfd".to_owned()),
    };
    let spec = if spec.contains("pagesize=") {
        spec
    } else {
        format!("{spec},pagesize={blksize}")
    };
    let ram = Ram::from_spec(&spec).map_err(py_err)?;
    Ok(Some(match budget {
        Some(b) => ram.with_budget(b),
        None => ram,
    }))
}

/// The virtmem `BigFile` of a Python BigFile object.
pub(crate) struct PyFileAdapter {
    /// The Python object; `None` once the cyclic GC cleared its handle.
    obj: Mutex<Option<Py<PyAny>>>,
    blksize: usize,
    name: String,
}

impl fmt::Debug for PyFileAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PyFileAdapter")
            .field("name", &self.name)
            .field("blksize", &self.blksize)
            .finish()
    }
}

/// A Python exception raised by `storeblk` (or `loadblk`), carried through
/// virtmem back to the Python caller.
#[derive(Debug)]
pub(crate) struct PyBlockError {
    pub(crate) err: PyErr,
    message: String,
}

impl fmt::Display for PyBlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PyBlockError {}

thread_local! {
    /// The exception of the last failed `loadblk` called outside a page
    /// fault (by prefault) on this thread, for prefault to raise.
    static LAST_LOAD_ERROR: RefCell<Option<PyErr>> = const { RefCell::new(None) };
}

/// The exception of the last `loadblk` that failed on this thread outside a fault.
pub(crate) fn take_load_error() -> Option<PyErr> {
    LAST_LOAD_ERROR.with(|e| e.borrow_mut().take())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Load,
    Store,
}

impl PyFileAdapter {
    pub(crate) fn traverse(&self, visit: &pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        if let Ok(obj) = self.obj.try_lock() {
            if let Some(o) = obj.as_ref() {
                visit.call(o)?;
            }
        }
        Ok(())
    }

    /// Drop the reference to the Python object (GC breaking a cycle).
    pub(crate) fn clear(&self) -> Option<Py<PyAny>> {
        self.obj.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Call `loadblk` or `storeblk` of the Python object. `buf` is the block
    /// (filled on success for a load).
    fn call(&self, op: Op, blk: u64, buf: *mut u8) -> Result<(), BlockError> {
        let len = self.blksize;
        let r = catch_unwind(AssertUnwindSafe(|| {
            with_python(|py| {
                // SAFETY: we hold the GIL (with_python).
                let saved = unsafe { ExcState::take() };
                let r = self.call_in(py, op, blk, buf, len);
                // SAFETY: we hold the GIL; this thread took `saved`.
                unsafe { saved.restore() };
                r
            })
        }));
        match r {
            Ok(r) => r,
            Err(_) => Err(format!("{} of block {blk} of {} panicked", op.name(), self.name).into()),
        }
    }

    fn call_in(
        &self,
        py: Python<'_>,
        op: Op,
        blk: u64,
        buf: *mut u8,
        len: usize,
    ) -> Result<(), BlockError> {
        let obj = {
            let guard = self.obj.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_ref().map(|o| o.bind(py).clone())
        };
        let Some(obj) = obj else {
            return Err(format!("{} was cleared by the garbage collector", self.name).into());
        };
        let block = Bound::new(py, BlockBuffer::new(len, op == Op::Store))
            .map_err(|e| self.fail(py, op, blk, e))?;
        if op == Op::Store {
            // SAFETY: virtmem hands storeblk `len` readable bytes at `buf`.
            block
                .get()
                .fill_from(unsafe { std::slice::from_raw_parts(buf, len) });
        }
        let mv = match memoryview(&block) {
            Ok(mv) => mv,
            Err(e) => return Err(self.fail(py, op, blk, e)),
        };
        let r = obj.call_method1(op.name(), (blk, &mv));
        if op == Op::Load && r.is_ok() {
            // SAFETY: virtmem hands loadblk `len` writable bytes at `buf`,
            // ours alone for the duration of the call.
            block
                .get()
                .copy_to(unsafe { std::slice::from_raw_parts_mut(buf, len) });
        }
        // While the exception (with frames holding the buffer) is alive, so
        // those frames get the stub.
        scrub(
            py,
            &block,
            mv,
            &format!("{} of block {blk} of {}", op.name(), self.name),
        );
        drop(block);
        match r {
            Ok(_) => {
                if op == Op::Load {
                    // A retry that succeeded: the earlier failure is moot.
                    LAST_LOAD_ERROR.with(|slot| slot.borrow_mut().take());
                }
                Ok(())
            }
            Err(e) => Err(self.fail(py, op, blk, e)),
        }
    }

    /// Turn the Python exception of a failed call into a virtmem error.
    fn fail(&self, py: Python<'_>, op: Op, blk: u64, e: PyErr) -> BlockError {
        let message = format!("{e}");
        match op {
            Op::Store => Box::new(PyBlockError { err: e, message }),
            Op::Load => {
                if bigfile_fault::current_depth() > 0 {
                    // Inside a page fault nobody can catch it: show it, then
                    // virtmem retries and finally raises SIGBUS.
                    crate::blockbuf::write_stderr(
                        py,
                        &format!("bigfile: loadblk of block {blk} of {} raised:\n", self.name),
                    );
                    e.display(py);
                } else {
                    LAST_LOAD_ERROR.with(|slot| *slot.borrow_mut() = Some(e));
                }
                // SAFETY: we hold the GIL.
                unsafe { ExcState::clear() };
                message.into()
            }
        }
    }
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Load => "loadblk",
            Op::Store => "storeblk",
        }
    }
}

impl bigfile_virtmem::BigFile for PyFileAdapter {
    fn blksize(&self) -> usize {
        self.blksize
    }

    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.call(Op::Load, blk, buf.as_mut_ptr())
    }

    fn storeblk(&self, blk: u64, buf: &[u8]) -> Result<(), BlockError> {
        // A store only reads: `call` copies from `buf` and never writes it.
        self.call(Op::Store, blk, buf.as_ptr().cast_mut())
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}
