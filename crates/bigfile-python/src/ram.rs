//! `RAM`: where a handle's pages live, and the budget they are kept within.

use std::collections::HashMap;

use bigfile_virtmem::Ram;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::stats::ram_stats_dict;

/// Memory for pages: a backend ("memfd", "shmfs[:DIR]", "hugetlbfs[:DIR]",
/// optionally ",pagesize=SIZE") and a budget of resident bytes; least
/// recently used clean pages are reclaimed to stay within it. Pass it to
/// `BigFile.fileh_open(ram=...)`: its page size must equal the blksize.
#[pyclass(module = "bigfile._bigfile", name = "RAM", frozen)]
pub(crate) struct PyRam {
    ram: Ram,
}

impl PyRam {
    pub(crate) fn ram(&self) -> &Ram {
        &self.ram
    }
}

#[pymethods]
impl PyRam {
    #[new]
    #[pyo3(signature = (spec = "memfd", budget = None))]
    fn new(py: Python<'_>, spec: &str, budget: Option<u64>) -> PyResult<Self> {
        let ram = Ram::from_spec(spec).map_err(|e| to_py(py, e))?;
        Ok(PyRam {
            ram: match budget {
                Some(b) => ram.with_budget(b),
                None => ram,
            },
        })
    }

    /// Page size in bytes.
    #[getter]
    fn pagesize(&self) -> usize {
        self.ram.page_size()
    }

    /// Budget in bytes (a whole number of pages, at least one).
    #[getter]
    fn get_budget(&self) -> u64 {
        self.ram.budget()
    }

    #[setter]
    fn set_budget(&self, bytes: u64) {
        self.ram.set_budget(bytes);
    }

    /// Drop every clean page; returns how many.
    fn reclaim(&self) -> usize {
        self.ram.reclaim()
    }

    /// Counters summed over the handles of this RAM, with budget and resident_bytes.
    fn stats(&self) -> HashMap<&'static str, u64> {
        ram_stats_dict(&self.ram)
    }

    fn __repr__(&self) -> String {
        format!(
            "<bigfile RAM {} pagesize={} budget={}>",
            self.ram.pages().spec(),
            self.ram.page_size(),
            self.ram.budget()
        )
    }
}

/// The RAM `fileh_open(ram=, budget=)` asks for: `None` for the default
/// RAM of the blksize.
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
            if let Ok(r) = r.cast::<PyRam>() {
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
    let ram = match (spec, budget) {
        (None, None) => return Ok(None),
        // A RAM of its own for the budget, of the default backend (as
        // the default RAM: `BIGFILE_RAM`'s, when set).
        (None, Some(_)) => bigfile_ram::Ram::with_page_size(blksize)
            .map(Ram::new)
            .map_err(|e| py_err(e.into()))?,
        (Some(s), _) => {
            let spec = if s.contains("pagesize=") {
                s
            } else {
                format!("{s},pagesize={blksize}")
            };
            Ram::from_spec(&spec).map_err(py_err)?
        }
    };
    Ok(Some(match budget {
        Some(b) => ram.with_budget(b),
        None => ram,
    }))
}
