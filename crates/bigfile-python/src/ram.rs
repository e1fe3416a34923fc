//! `RAM`: where a handle's pages live, and the budget they are kept within.

use std::collections::HashMap;

use bigfile_virtmem::Ram;
use pyo3::prelude::*;

use crate::error::to_py;

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

pub(crate) fn ram_stats_dict(ram: &Ram) -> HashMap<&'static str, u64> {
    let s = ram.stats();
    let mut d = crate::fileh::stats_dict(s.stats);
    d.insert("budget", s.budget);
    d.insert("resident_bytes", s.resident_bytes);
    d
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
