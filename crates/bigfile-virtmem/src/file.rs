//! `FileBigFile`: a BigFile over an OS file, block `n` at byte `n * blksize`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use crate::bigfile::{BigFile, BlockError};

/// A block I/O error with the path, block and OS error.
#[derive(Debug, thiserror::Error)]
#[error("{op} of block {blk} of {path}: {source}")]
pub struct FileBlockError {
    /// "read" or "write".
    pub op: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The block.
    pub blk: u64,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// A BigFile stored in an OS file.
///
/// `loadblk` reads with `pread`; bytes past the end of the file read as
/// zeros, so a sparse or short file is a file of zero blocks beyond its
/// end. `storeblk` writes with `pwrite`, extending the file as needed. If
/// the file shrinks underneath, blocks past the new end read as zeros on
/// their next load; pages already loaded keep the old data until
/// invalidated or reclaimed.
#[derive(Debug)]
pub struct FileBigFile {
    file: File,
    path: PathBuf,
    blksize: usize,
    fsync_on_store: AtomicBool,
}

impl FileBigFile {
    /// Open `path` read-write (creating it if absent).
    pub fn open(path: impl AsRef<Path>, blksize: usize) -> io::Result<FileBigFile> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(FileBigFile::from_file(file, path, blksize))
    }

    /// Open `path` read-only: `storeblk` fails with the OS error.
    pub fn open_readonly(path: impl AsRef<Path>, blksize: usize) -> io::Result<FileBigFile> {
        let path = path.as_ref();
        Ok(FileBigFile::from_file(File::open(path)?, path, blksize))
    }

    /// Wrap an open file; `path` is only used in messages.
    pub fn from_file(file: File, path: impl Into<PathBuf>, blksize: usize) -> FileBigFile {
        FileBigFile {
            file,
            path: path.into(),
            blksize,
            fsync_on_store: AtomicBool::new(false),
        }
    }

    /// With `true`, every `storeblk` is followed by `fdatasync` (see also
    /// [`FileBigFile::sync`] to sync once after a writeout).
    pub fn set_fsync_on_store(&self, on: bool) {
        self.fsync_on_store.store(on, Relaxed);
    }

    /// Flush written blocks to stable storage (`fdatasync`).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn offset(&self, blk: u64) -> io::Result<u64> {
        blk.checked_mul(self.blksize as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "block offset overflows"))
    }

    fn err(&self, op: &'static str, blk: u64, source: io::Error) -> BlockError {
        Box::new(FileBlockError {
            op,
            path: self.path.clone(),
            blk,
            source,
        })
    }
}

impl BigFile for FileBigFile {
    fn blksize(&self) -> usize {
        self.blksize
    }

    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let mut off = self.offset(blk).map_err(|e| self.err("read", blk, e))?;
        let mut rest = &mut buf[..];
        while !rest.is_empty() {
            match self.file.read_at(rest, off) {
                Ok(0) => {
                    rest.fill(0);
                    break;
                }
                Ok(n) => {
                    rest = &mut rest[n..];
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("read", blk, e)),
            }
        }
        Ok(())
    }

    fn storeblk(&self, blk: u64, buf: &[u8]) -> Result<(), BlockError> {
        let off = self.offset(blk).map_err(|e| self.err("write", blk, e))?;
        self.file
            .write_all_at(buf, off)
            .map_err(|e| self.err("write", blk, e))?;
        if self.fsync_on_store.load(Relaxed) {
            self.file
                .sync_data()
                .map_err(|e| self.err("fdatasync", blk, e))?;
        }
        Ok(())
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// pread/pwrite: no host code.
    fn needs_host_lock(&self) -> bool {
        false
    }
}
