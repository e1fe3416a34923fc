//! `FileBigFile`: a BigFile over an OS file whose blocks are read and written
//! in Rust (virtmem's `FileBigFile`), with no Python call, no GIL and no copy
//! through a Python buffer on a page fault or a writeout.
//!
//! It is a `BigFile` to Python (a subclass of it), so `bigfile.file_file`
//! can build the wendelin.core-compatible `BigFile_File` on it. A Python
//! subclass that overrides `loadblk` or `storeblk` gets the Python path of
//! `BigFile.fileh_open` instead, and may call these methods through
//! `super()` (they accept any writable/readable buffer of `blksize` bytes).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::Arc;

use bigfile_virtmem::{BigFile, FileBigFile, FileH};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyString, PyTuple};

use crate::error::{block_error_to_py, to_py};
use crate::faults::ensure_on_top;
use crate::file::{open_python, PyBigFile};
use crate::fileh::PyBigFileH;
use crate::ram::RamChoice;

/// A file of `blksize`-byte blocks stored in an OS file, block n at byte
/// n * blksize; blocks past the end of the file read as zeros, a stored
/// block extends the file as needed.
#[pyclass(
    module = "bigfile._bigfile",
    name = "FileBigFile",
    extends = PyBigFile,
    subclass,
    frozen
)]
pub(crate) struct PyFileBigFile {
    file: Arc<FileBigFile>,
}

/// An `OSError` of the right subclass (FileNotFoundError, ...) naming `what`.
fn os_error(e: io::Error, what: &str) -> PyErr {
    match e.raw_os_error() {
        Some(n) => PyOSError::new_err((n, e.to_string(), what.to_owned())),
        None => PyOSError::new_err(format!("{what}: {e}")),
    }
}

/// Open `path_or_fd` for reading and writing: a path (str, bytes,
/// os.PathLike) is opened as `open(path, "r+b")` would (it must exist); an
/// int is a file descriptor, taken over as `io.FileIO(fd, "r+")` does (it is
/// closed when the file and its handles are gone).
fn open_file(path_or_fd: &Bound<'_, PyAny>) -> PyResult<(File, PathBuf)> {
    if path_or_fd.is_instance_of::<PyInt>() {
        let fd: RawFd = path_or_fd
            .extract()
            .map_err(|_| PyValueError::new_err(format!("bad file descriptor {path_or_fd}")))?;
        if fd < 0 {
            return Err(PyValueError::new_err(format!(
                "file descriptor must be >= 0, got {fd}"
            )));
        }
        // SAFETY: F_GETFD only reads the descriptor's flags (EBADF if closed).
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(os_error(
                io::Error::last_os_error(),
                &format!("file descriptor {fd}"),
            ));
        }
        let path = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .unwrap_or_else(|_| PathBuf::from(format!("<fd {fd}>")));
        // SAFETY: `fd` is open (checked) and the caller hands it over to us,
        // as to io.FileIO: nobody else closes it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        return Ok((File::from(owned), path));
    }
    let os = PyModule::import(path_or_fd.py(), "os")?;
    let p = os.call_method1("fspath", (path_or_fd,)).map_err(|_| {
        PyTypeError::new_err(format!(
            "path_or_fd must be a path (str, bytes, os.PathLike) or a file descriptor, not {}",
            path_or_fd
                .get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string())
        ))
    })?;
    let path = if let Ok(s) = p.cast::<PyString>() {
        PathBuf::from(s.to_str()?)
    } else if let Ok(b) = p.cast::<PyBytes>() {
        PathBuf::from(OsString::from_vec(b.as_bytes().to_vec()))
    } else {
        return Err(PyTypeError::new_err(
            "os.fspath returned neither str nor bytes",
        ));
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| os_error(e, &path.display().to_string()))?;
    Ok((file, path))
}

/// The buffer `buf` of a `loadblk`/`storeblk` called from Python, checked:
/// bytes, C-contiguous, `blksize` long and, for a load, writable.
fn block_buffer(buf: &Bound<'_, PyAny>, blksize: usize, writable: bool) -> PyResult<PyBuffer<u8>> {
    let b = PyBuffer::<u8>::get(buf)?;
    if writable && b.readonly() {
        return Err(PyTypeError::new_err("loadblk needs a writable buffer"));
    }
    if !b.is_c_contiguous() {
        return Err(PyValueError::new_err("the block buffer must be contiguous"));
    }
    if b.len_bytes() != blksize {
        return Err(PyValueError::new_err(format!(
            "the block buffer has {} bytes, not blksize {blksize}",
            b.len_bytes()
        )));
    }
    Ok(b)
}

#[pymethods]
impl PyFileBigFile {
    #[new]
    #[pyo3(signature = (path_or_fd, blksize, *_args, **_kwargs))]
    fn new(
        path_or_fd: &Bound<'_, PyAny>,
        blksize: isize,
        _args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let base = PyBigFile::with_blksize(blksize)?;
        let (file, path) = open_file(path_or_fd)?;
        let file = Arc::new(FileBigFile::from_file(file, path, base.blksize()));
        Ok(PyClassInitializer::from(base).add_subclass(PyFileBigFile { file }))
    }

    /// Open a handle of this file (see `BigFile.fileh_open`). Blocks are
    /// read and written natively unless a subclass overrides `loadblk` or
    /// `storeblk`, in which case those Python methods are called.
    #[pyo3(signature = (ram = None, budget = None, fault_backend = None))]
    fn fileh_open(
        slf: &Bound<'_, Self>,
        ram: Option<&Bound<'_, PyAny>>,
        budget: Option<u64>,
        fault_backend: Option<&str>,
    ) -> PyResult<Py<PyBigFileH>> {
        let py = slf.py();
        let choice = RamChoice::new(ram, budget, fault_backend)?;
        let blksize = slf.get().file.blksize();
        let ours = py.get_type::<PyFileBigFile>();
        let ty = slf.get_type();
        let overridden =
            |name: &str| -> PyResult<bool> { Ok(!ty.getattr(name)?.is(&ours.getattr(name)?)) };
        if overridden("loadblk")? || overridden("storeblk")? {
            return open_python(slf.as_any(), blksize, choice);
        }
        ensure_on_top()?;
        let ram = choice.resolve(py, blksize)?;
        let file: Arc<dyn BigFile> = slf.get().file.clone();
        let fileh = FileH::open(file, ram.as_ref()).map_err(|e| to_py(py, e))?;
        Py::new(py, PyBigFileH::new(fileh, None))
    }

    /// Read block `blk` into the writable buffer `buf` (`blksize` bytes);
    /// past the end of the file: zeros.
    fn loadblk(&self, blk: u64, buf: &Bound<'_, PyAny>) -> PyResult<()> {
        let b = block_buffer(buf, self.file.blksize(), true)?;
        // SAFETY: `b` holds the export, so the memory stays valid for
        // `len_bytes` bytes; it is writable and contiguous (checked). The GIL
        // stays held (this path is for Python callers, not for faults), so
        // no Python code can resize or free the exporter meanwhile.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(b.buf_ptr().cast::<u8>(), b.len_bytes()) };
        let r = self.file.loadblk(blk, dst);
        drop(b);
        r.map_err(|e| block_error_to_py(&*e))
    }

    /// Write the buffer `buf` (`blksize` bytes) as block `blk`.
    fn storeblk(&self, blk: u64, buf: &Bound<'_, PyAny>) -> PyResult<()> {
        let b = block_buffer(buf, self.file.blksize(), false)?;
        // SAFETY: as in loadblk; the memory is only read.
        let src = unsafe {
            std::slice::from_raw_parts(b.buf_ptr().cast::<u8>().cast_const(), b.len_bytes())
        };
        let r = self.file.storeblk(blk, src);
        drop(b);
        r.map_err(|e| block_error_to_py(&*e))
    }

    /// The file descriptor the blocks are read from and written to (owned
    /// by this object and its handles: do not close it).
    fn fileno(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.file.file().as_raw_fd()
    }

    /// Flush written blocks to stable storage (fdatasync). `dirty_writeout`
    /// only hands them to the OS.
    fn sync(&self, py: Python<'_>) -> PyResult<()> {
        let file = self.file.clone();
        py.detach(move || file.sync())
            .map_err(|e| os_error(e, &self.file.path().display().to_string()))
    }

    /// The path of the file (for a descriptor, what /proc says it is).
    #[getter]
    fn path(&self) -> OsString {
        // A str (not a pathlib.Path, pyo3's conversion of a PathBuf), as
        // io.FileIO's `name`.
        self.file.path().as_os_str().to_owned()
    }

    fn __repr__(&self) -> String {
        format!(
            "<bigfile FileBigFile {} blksize={}>",
            self.file.path().display(),
            self.file.blksize()
        )
    }
}
