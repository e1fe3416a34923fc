//! Virtmem errors as Python exceptions, in one place.
//!
//! Misuse is ValueError (bad ranges, offsets, flags, blksize, RAM specs) or
//! RuntimeError (a state that forbids the call: live mappings, a writeout in
//! progress); an exhausted budget is MemoryError; OS failures are OSError
//! with their errno (a native file's I/O errors too). A `storeblk` exception
//! comes back as itself.

use bigfile_virtmem::{BlockError, Error, FileBlockError};
use pyo3::exceptions::{PyMemoryError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::file::{take_load_error, PyBlockError};

/// The Python exception for a virtmem error.
pub(crate) fn to_py(_py: Python<'_>, e: Error) -> PyErr {
    match e {
        Error::Store { source, .. } => match source.downcast::<PyBlockError>() {
            Ok(b) => b.err,
            Err(source) => block_error_to_py(source),
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
pub(crate) fn block_error_to_py(e: BlockError) -> PyErr {
    match e.downcast::<FileBlockError>() {
        Ok(f) => match f.source.raw_os_error() {
            Some(n) => PyOSError::new_err((n, f.to_string(), f.path.display().to_string())),
            None => PyOSError::new_err(f.to_string()),
        },
        Err(e) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// As [`to_py`], for calls that run `loadblk` outside a fault (prefault):
/// a loadblk exception comes back as itself.
pub(crate) fn to_py_load(py: Python<'_>, e: Error) -> PyErr {
    let pending = take_load_error();
    match (e, pending) {
        (Error::Load { .. }, Some(err)) => err,
        (e, _) => to_py(py, e),
    }
}

fn os_error(errno: Option<i32>, msg: String) -> PyErr {
    match errno {
        Some(n) => PyOSError::new_err((n, msg)),
        None => PyOSError::new_err(msg),
    }
}
