//! `RAM`: where a handle's pages live, and the budget they are kept within.

use bigfile_virtmem::{FaultBackend, Ram};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::to_py;
use crate::stats::ram_stats_dict;

/// Memory for pages: a backend ("memfd", "shmfs[:DIR]", "hugetlbfs[:DIR]",
/// optionally ",pagesize=SIZE") and a budget of resident bytes; least
/// recently used clean pages are reclaimed to stay within it. Pass it to
/// `BigFile.fileh_open(ram=...)`: its page size must equal the blksize.
///
/// `budget`: None gives the default RAMs' budget, which follows the memory
/// the process may use (a quarter of the machine's or its cgroup's limit,
/// lowered while memory is short); setting `budget` fixes it.
///
/// `fault_backend`: how its mappings learn of page faults. "userfaultfd"
/// serves the kernel's own accesses too (file and socket I/O, numpy's
/// `tofile`/`save`, `readinto` into a mapping work without `prefault`);
/// "signals" (SIGSEGV) works everywhere, but a system call touching a page
/// not loaded fails with EFAULT. None or "auto": the process's default,
/// which the environment variable BIGFILE_FAULTS sets ("signals",
/// "userfaultfd", or "auto": userfaultfd where the process may use it) and
/// otherwise is signals, userfaultfd being opt-in for now
/// (`fault_backend_fallback` says why not userfaultfd). Asking for
/// userfaultfd where it cannot be had raises RuntimeError saying why.
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
    #[pyo3(signature = (spec = "memfd", budget = None, fault_backend = None))]
    fn new(
        py: Python<'_>,
        spec: &str,
        budget: Option<u64>,
        fault_backend: Option<&str>,
    ) -> PyResult<Self> {
        let backend = parse_fault_backend(fault_backend)?;
        let ram = Ram::from_spec(spec).map_err(|e| to_py(py, e))?;
        let ram = configure(py, ram, budget, backend)?;
        Ok(PyRam { ram })
    }

    /// The fault backend its mappings use: "signals" or "userfaultfd".
    #[getter]
    fn fault_backend(&self) -> &'static str {
        self.ram.fault_backend().name()
    }

    /// Why it does not use userfaultfd (None when it does).
    #[getter]
    fn fault_backend_fallback(&self) -> Option<String> {
        self.ram.fault_backend_fallback()
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

    /// Counters summed over the handles of this RAM, with budget,
    /// resident_bytes, fault_backend and fault_backend_fallback.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        ram_stats_dict(py, &self.ram)
    }

    fn __repr__(&self) -> String {
        format!(
            "<bigfile RAM {} pagesize={} budget={} faults={}>",
            self.ram.pages().spec(),
            self.ram.page_size(),
            self.ram.budget(),
            self.ram.fault_backend()
        )
    }
}

/// `fault_backend=`: None or "auto" for the default.
fn parse_fault_backend(name: Option<&str>) -> PyResult<Option<FaultBackend>> {
    match name {
        None | Some("auto") => Ok(None),
        Some("signals") => Ok(Some(FaultBackend::Signals)),
        Some("userfaultfd") => Ok(Some(FaultBackend::Userfaultfd)),
        Some(other) => Err(PyValueError::new_err(format!(
            "fault_backend={other:?}: expected 'auto', 'signals' or 'userfaultfd'"
        ))),
    }
}

/// `ram` on fault backend `backend` (when given), with budget `budget`
/// (when given; otherwise the default RAMs' policy, a budget that follows
/// the memory the process may use: without it, a RAM made only to choose a
/// backend, `fileh_open(fault_backend=...)`, could fill the machine's memory
/// with pages the kernel cannot drop).
fn configure(
    py: Python<'_>,
    ram: Ram,
    budget: Option<u64>,
    backend: Option<FaultBackend>,
) -> PyResult<Ram> {
    let ram = match backend {
        Some(b) => ram.with_fault_backend(b).map_err(|e| to_py(py, e))?,
        None => ram,
    };
    Ok(match budget {
        Some(b) => ram.with_budget(b),
        None => ram.following_memory(),
    })
}

/// What `fileh_open(ram=, budget=, fault_backend=)` asks for.
pub(crate) struct RamChoice<'a, 'py> {
    ram: Option<&'a Bound<'py, PyAny>>,
    budget: Option<u64>,
    backend: Option<FaultBackend>,
    /// `fault_backend=` named one (even "auto"): a RAM of its own.
    backend_named: bool,
}

impl<'a, 'py> RamChoice<'a, 'py> {
    /// The arguments, `fault_backend` checked.
    pub(crate) fn new(
        ram: Option<&'a Bound<'py, PyAny>>,
        budget: Option<u64>,
        fault_backend: Option<&str>,
    ) -> PyResult<Self> {
        Ok(RamChoice {
            ram,
            budget,
            backend: parse_fault_backend(fault_backend)?,
            backend_named: fault_backend.is_some(),
        })
    }

    /// The RAM asked for: `None` for the default RAM of the blksize.
    pub(crate) fn resolve(self, py: Python<'_>, blksize: usize) -> PyResult<Option<Ram>> {
        let RamChoice {
            ram,
            budget,
            backend,
            backend_named,
        } = self;
        let spec = match ram {
            Some(r) if r.is_none() => None,
            Some(r) => {
                if let Ok(r) = r.cast::<PyRam>() {
                    if budget.is_some() || backend_named {
                        return Err(PyValueError::new_err(
                            "budget= and fault_backend= apply to a RAM that fileh_open creates; \
                             give them to the RAM object instead",
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
        let ram = match spec {
            None if budget.is_none() && !backend_named => return Ok(None),
            // A RAM of its own, of the default backend (as the default
            // RAM: `BIGFILE_RAM`'s, when set).
            None => bigfile_ram::Ram::with_page_size(blksize)
                .map(Ram::new)
                .map_err(|e| to_py(py, e.into()))?,
            Some(s) => {
                let spec = if s.contains("pagesize=") {
                    s
                } else {
                    format!("{s},pagesize={blksize}")
                };
                Ram::from_spec(&spec).map_err(|e| to_py(py, e))?
            }
        };
        configure(py, ram, budget, backend).map(Some)
    }
}
