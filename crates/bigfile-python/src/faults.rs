//! Keeping our SIGSEGV/SIGBUS handler on top of any a host installs after
//! it (Python's `faulthandler.enable()`).

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

/// Put our fault handler back on top of any installed after it; returns
/// whether it had been displaced.
pub(crate) fn ensure_on_top() -> PyResult<bool> {
    bigfile_fault::ensure_on_top().map_err(|e| PyOSError::new_err(e.to_string()))
}
