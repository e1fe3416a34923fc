//! The virtmem `BigFile` of a Python BigFile object: `loadblk` and
//! `storeblk` call the object's Python methods, with the GIL taken from any
//! thread, the thread's exception state kept, the block's RAM page handed
//! to Python for the call and taken back after it (`window`, `blockbuf`),
//! and a `loadblk` interrupted by Ctrl-C made again (`interrupt`).

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use bigfile_virtmem::{BlockError, BlockPage};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::blockbuf::{memoryview, scrub, write_stderr, BlockBuffer};
use crate::error::PyBlockError;
use crate::exiting;
use crate::gil::{with_python, ExcState, SubinterpreterThread};
use crate::interrupt::{self, Callback};
use crate::window::PageWindow;

/// The virtmem `BigFile` of a Python BigFile object.
pub(crate) struct PyFileAdapter {
    /// The Python object; `None` once the cyclic GC cleared its handle.
    obj: Mutex<Option<Py<PyAny>>>,
    blksize: usize,
    name: String,
    /// Whether read-ahead workers may call `loadblk` (the class's
    /// `readahead`).
    reads_ahead: bool,
}

impl PyFileAdapter {
    /// The adapter of `obj`, a file of `blksize`-byte blocks called `name`
    /// in diagnostics.
    pub(crate) fn new(
        obj: Py<PyAny>,
        blksize: usize,
        name: String,
        reads_ahead: bool,
    ) -> PyFileAdapter {
        PyFileAdapter {
            obj: Mutex::new(Some(obj)),
            blksize,
            name,
            reads_ahead,
        }
    }
}

impl fmt::Debug for PyFileAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PyFileAdapter")
            .field("name", &self.name)
            .field("blksize", &self.blksize)
            .finish()
    }
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

    /// Call `loadblk` or `storeblk` of the Python object on `page`, the
    /// block's RAM page (filled on success for a load).
    fn call(&self, op: Op, blk: u64, page: &BlockPage<'_>) -> Result<(), BlockError> {
        // On one of bigfile's workers (read-ahead of a file that opted in,
        // or a system call's fault on userfaultfd), only while the
        // interpreter does not exit (`exiting`); counted until the GIL is
        // given back.
        let worker = if bigfile_virtmem::on_read_ahead_worker() {
            Some("read-ahead")
        } else if bigfile_virtmem::on_userfaultfd_worker() {
            Some("a system call's fault")
        } else {
            None
        };
        let _admitted = match worker.map(|w| (w, exiting::admit())) {
            Some((w, None)) => {
                return Err(format!(
                    "{} of block {blk} of {} for {w}: Python exits",
                    op.name(),
                    self.name
                )
                .into())
            }
            admitted => admitted.and_then(|(_, a)| a),
        };
        // SAFETY: only reads the calling thread's bound thread state.
        let foreign = unsafe { ffi::PyGILState_GetThisThreadState() }.is_null();
        let r = catch_unwind(AssertUnwindSafe(|| {
            with_python(|py| {
                let callback = Callback::enter(foreign);
                // SAFETY: we hold the GIL (with_python).
                let saved = unsafe { ExcState::take() };
                let r = self.call_until_done(py, op, blk, page);
                callback.leave(py);
                // SAFETY: we hold the GIL; this thread took `saved`.
                unsafe { saved.restore() };
                r
            })
        }));
        match r {
            Ok(Ok(r)) => r,
            Ok(Err(SubinterpreterThread)) => Err(format!(
                "{} of block {blk} of {} was needed on a thread started by a subinterpreter, \
                 which cannot run the main interpreter's code before Python 3.12",
                op.name(),
                self.name
            )
            .into()),
            Err(_) => Err(format!("{} of block {blk} of {} panicked", op.name(), self.name).into()),
        }
    }

    /// The call, made again while a `loadblk` is interrupted (Ctrl-C,
    /// `SystemExit`): the interrupt is held for later (`interrupt`).
    fn call_until_done(
        &self,
        py: Python<'_>,
        op: Op,
        blk: u64,
        page: &BlockPage<'_>,
    ) -> Result<(), BlockError> {
        let mut interrupted = 0;
        loop {
            match self.call_in(py, op, blk, page) {
                Ok(()) => return Ok(()),
                Err(e) if op == Op::Load && interrupt::is_interrupt(py, &e) => {
                    let ty = e
                        .get_type(py)
                        .name()
                        .map_or_else(|_| "?".into(), |n| n.to_string());
                    if interrupt::hold(py, e) {
                        interrupted += 1;
                        // A storage that hangs is interrupted each time: say
                        // what ends the process, since nothing else can.
                        let hint = if interrupted > 1 {
                            " (the page is needed to go on; Ctrl-\\ (SIGQUIT) ends the process)"
                        } else {
                            ""
                        };
                        write_stderr(
                            py,
                            &format!(
                                "bigfile: loadblk of block {blk} of {} was interrupted by {ty}; \
                                 loading it again, then the {ty} is raised{hint}\n",
                                self.name
                            ),
                        );
                    }
                }
                Err(e) => return Err(self.fail(py, op, blk, e)),
            }
        }
    }

    fn call_in(&self, py: Python<'_>, op: Op, blk: u64, page: &BlockPage<'_>) -> PyResult<()> {
        let obj = {
            let guard = self.obj.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_ref().map(|o| o.bind(py).clone())
        };
        let Some(obj) = obj else {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                "{} was cleared by the garbage collector",
                self.name
            )));
        };
        let window = PageWindow::map(page).map_err(|e| {
            pyo3::exceptions::PyOSError::new_err(format!(
                "{} of block {blk} of {}: {e}",
                op.name(),
                self.name
            ))
        })?;
        let block = Bound::new(py, BlockBuffer::new(window, op == Op::Store))?;
        let mv = memoryview(&block)?;
        let r = obj.call_method1(op.name(), (blk, &mv));
        // While the exception (with frames holding the buffer) is alive, so
        // those frames get the stub.
        scrub(
            py,
            &block,
            mv,
            &format!("{} of block {blk} of {}", op.name(), self.name),
        );
        drop(block);
        r.map(drop)
    }

    /// Turn the Python exception of a failed call into a virtmem error that
    /// carries it: virtmem hands it, as a value, to whoever called for the
    /// block (the writeout, a prefault, every thread that waited for that
    /// load), and the bindings raise it there.
    fn fail(&self, py: Python<'_>, op: Op, blk: u64, e: PyErr) -> BlockError {
        if op == Op::Load {
            if bigfile_fault::current_depth() > 0 {
                // Inside a page fault nobody can catch it: show it, then
                // virtmem retries and finally raises SIGBUS.
                write_stderr(
                    py,
                    &format!("bigfile: loadblk of block {blk} of {} raised:\n", self.name),
                );
                e.display(py);
            }
            // SAFETY: we hold the GIL.
            unsafe { ExcState::clear() };
            if bigfile_virtmem::on_read_ahead_worker() {
                // Forgotten by virtmem: no exception object to free later
                // (with the GIL, which may be gone by then: `exiting`).
                return format!("loadblk of block {blk} of {} raised {e}", self.name).into();
            }
        }
        Box::new(PyBlockError::new(e))
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

    /// Python loads through [`loadblk_page`](Self::loadblk_page): its
    /// views of the memory may outlive the call, and only a page mapped at
    /// an address of ours can be taken away from them.
    fn loadblk(&self, blk: u64, _buf: &mut [u8]) -> Result<(), BlockError> {
        Err(format!(
            "loadblk of block {blk} of {}: a Python file loads into a RAM page only",
            self.name
        )
        .into())
    }

    /// As `loadblk`: Python stores through `storeblk_page`.
    fn storeblk(&self, blk: u64, _buf: &[u8]) -> Result<(), BlockError> {
        Err(format!(
            "storeblk of block {blk} of {}: a Python file stores from a RAM page only",
            self.name
        )
        .into())
    }

    fn loadblk_page(&self, blk: u64, page: &mut BlockPage<'_>) -> Result<(), BlockError> {
        self.call(Op::Load, blk, page)
    }

    fn storeblk_page(&self, blk: u64, page: &BlockPage<'_>) -> Result<(), BlockError> {
        self.call(Op::Store, blk, page)
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn reads_ahead(&self) -> bool {
        self.reads_ahead
    }
}
