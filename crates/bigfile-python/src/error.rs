//! Virtmem errors as Python exceptions, in one place.
//!
//! Misuse is ValueError (bad ranges, offsets, flags, blksize, RAM specs) or
//! RuntimeError (a state that forbids the call: live mappings, a writeout in
//! progress); an exhausted budget is MemoryError; OS failures are OSError
//! with their errno (a native file's I/O errors too). An exception raised by
//! a Python `loadblk` or `storeblk` comes back as itself, to the caller and
//! to every thread that waited for that load.

use std::fmt;
use std::mem::ManuallyDrop;

use bigfile_virtmem::{Error, FileBlockError, LoadError};
use pyo3::exceptions::{PyMemoryError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::gil::with_python;

/// A Python exception raised by `loadblk` or `storeblk`, carried through
/// virtmem as the block error, back to the Python callers.
///
/// virtmem drops such errors wherever it is done with them, often with the
/// GIL released (a failed attempt before a retry, a fault's failure), where
/// pyo3 may still count the GIL as held (virtmem released it behind pyo3's
/// back): the exception is let go of under a GIL this drop takes itself.
#[derive(Debug)]
pub(crate) struct PyBlockError {
    /// `None` only once taken (`into_err`) or dropped.
    err: Option<PyErr>,
    message: String,
}

impl PyBlockError {
    /// `err` with its message (as `str(type): value`), for diagnostics.
    pub(crate) fn new(err: PyErr) -> PyBlockError {
        let message = err.to_string();
        PyBlockError {
            err: Some(err),
            message,
        }
    }

    fn err(&self) -> &PyErr {
        self.err
            .as_ref()
            .expect("taken only by into_err, which consumes")
    }

    fn into_err(mut self) -> PyErr {
        self.err.take().expect("taken only once")
    }
}

impl Drop for PyBlockError {
    /// Where the GIL cannot be taken (a thread of a subinterpreter before
    /// 3.12), the exception is leaked instead.
    fn drop(&mut self) {
        if let Some(err) = self.err.take() {
            let err = ManuallyDrop::new(err);
            let _ = with_python(move |_py| drop(ManuallyDrop::into_inner(err)));
        }
    }
}

impl fmt::Display for PyBlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PyBlockError {}

/// The Python exception for a virtmem error.
pub(crate) fn to_py(py: Python<'_>, e: Error) -> PyErr {
    match e {
        Error::Store { source, .. } => match source.downcast::<PyBlockError>() {
            Ok(b) => b.into_err(),
            Err(source) => block_error_to_py(&*source),
        },
        Error::Load { file, blk, source } => match source {
            LoadError::Waited(inner) => to_py(py, *inner),
            LoadError::Block { attempts, source } => {
                if let Some(b) = source.downcast_ref::<PyBlockError>() {
                    b.err().clone_ref(py)
                } else if source.is::<FileBlockError>() {
                    block_error_to_py(&*source)
                } else {
                    let source = LoadError::Block { attempts, source };
                    PyRuntimeError::new_err(Error::Load { file, blk, source }.to_string())
                }
            }
            source => PyRuntimeError::new_err(Error::Load { file, blk, source }.to_string()),
        },
        Error::BadBlksize { .. }
        | Error::PageSizeMismatch { .. }
        | Error::InvalidRange(_)
        | Error::OutOfBounds { .. }
        | Error::InvalidFlags(_) => PyValueError::new_err(e.to_string()),
        Error::BudgetExhausted { .. } => PyMemoryError::new_err(e.to_string()),
        Error::Ram(ref r) if r.is_exhausted() => PyMemoryError::new_err(e.to_string()),
        Error::Os { ref source, .. } => os_error(source.raw_os_error(), e.to_string()),
        Error::Ram(ref r) => {
            use std::error::Error as _;
            match r.source().and_then(|s| s.downcast_ref::<std::io::Error>()) {
                Some(io) => os_error(io.raw_os_error(), e.to_string()),
                None => PyValueError::new_err(e.to_string()),
            }
        }
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// The Python exception for an error of a native `loadblk`/`storeblk`: an
/// `OSError` with the errno for file I/O, else RuntimeError.
pub(crate) fn block_error_to_py(e: &(dyn std::error::Error + 'static)) -> PyErr {
    match e.downcast_ref::<FileBlockError>() {
        Some(f) => match f.source.raw_os_error() {
            Some(n) => PyOSError::new_err((n, f.to_string(), f.path.display().to_string())),
            None => PyOSError::new_err(f.to_string()),
        },
        None => PyRuntimeError::new_err(e.to_string()),
    }
}

fn os_error(errno: Option<i32>, msg: String) -> PyErr {
    match errno {
        Some(n) => PyOSError::new_err((n, msg)),
        None => PyOSError::new_err(msg),
    }
}
