//! Counters as Python dicts.

use std::collections::HashMap;

use bigfile_virtmem::{Ram, Stats};
use pyo3::prelude::*;
use pyo3::types::{IntoPyDict, PyDict};

pub(crate) fn stats_dict(s: Stats) -> HashMap<&'static str, u64> {
    HashMap::from([
        ("faults", s.faults),
        ("loads", s.loads),
        ("load_errors", s.load_errors),
        ("stores", s.stores),
        ("reclaims", s.reclaims),
        ("resident_pages", s.resident_pages),
        ("dirty_pages", s.dirty_pages),
        ("streams", s.streams),
        ("readahead_loads", s.readahead_loads),
        ("readahead_hits", s.readahead_hits),
        ("readahead_wasted", s.readahead_wasted),
    ])
}

/// A RAM's counters, with its budget, resident bytes, fault backend and
/// the reason it does not use userfaultfd (None when it does).
pub(crate) fn ram_stats_dict<'py>(py: Python<'py>, ram: &Ram) -> PyResult<Bound<'py, PyDict>> {
    let s = ram.stats();
    let d = stats_dict(s.stats).into_py_dict(py)?;
    d.set_item("budget", s.budget)?;
    d.set_item("resident_bytes", s.resident_bytes)?;
    d.set_item("fault_backend", ram.fault_backend().name())?;
    d.set_item("fault_backend_fallback", ram.fault_backend_fallback())?;
    Ok(d)
}
