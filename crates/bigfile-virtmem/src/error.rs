//! Errors of the virtmem layer.

use crate::bigfile::BlockError;

/// What went wrong in a virtmem call. Misuse is reported here, never by an abort.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file's block size cannot be a page size.
    #[error("blksize {blksize} is not a positive multiple of the OS page size {os_page}")]
    BadBlksize { blksize: usize, os_page: usize },
    /// An explicit RAM was given whose page size differs from the file's blksize.
    #[error("RAM page size {ram_page} differs from the file's blksize {blksize}; open with a RAM of page size {blksize} or with the default RAM")]
    PageSizeMismatch { ram_page: usize, blksize: usize },
    /// A page range that is empty or overflows.
    #[error("invalid page range: {0}")]
    InvalidRange(String),
    /// A byte range outside a mapping.
    #[error("byte range {offset}..{end} is outside the mapping of {len} bytes")]
    OutOfBounds {
        offset: usize,
        end: usize,
        len: usize,
    },
    /// Writeout flags that are not a non-empty combination of STORE and MARKSTORED.
    #[error("invalid writeout flags {0:#x}: allowed are STORE (1), MARKSTORED (2) or both")]
    InvalidFlags(u32),
    /// The operation conflicts with a writeout of the same handle in progress.
    #[error("{0}: a writeout of this file handle is in progress")]
    WriteoutInProgress(&'static str),
    /// A `storeblk` of this writeout called fork(2), and this is the child,
    /// which starts with nothing resident and nothing dirty: the writeout
    /// stopped there (the parent's goes on).
    #[error("the writeout was interrupted by fork(2): in the child, the handle has no page of the parent's")]
    Forked,
    /// `storeblk` failed; this block and every block after it are still dirty.
    #[error("storeblk of block {blk} of {file} failed: {source}")]
    Store {
        file: String,
        blk: u64,
        #[source]
        source: BlockError,
    },
    /// A page could not be loaded (returned by prefault; a failing page
    /// fault ends in SIGBUS): `source` says why, as a value (the loader's
    /// own error included, for this thread and every thread that waited
    /// for that load).
    #[error("loadblk of block {blk} of {file} {source}")]
    Load {
        file: String,
        blk: u64,
        #[source]
        source: LoadError,
    },
    /// The RAM budget is used up by pages that cannot be reclaimed (dirty or loading).
    #[error("RAM budget of {budget} bytes is exhausted by {pinned} dirty or loading pages; write out or discard changes, or raise the budget")]
    BudgetExhausted { budget: u64, pinned: u64 },
    /// Closing a file handle that still has mappings.
    #[error("file handle still has {0} live mapping(s); drop them before closing")]
    LiveMappings(usize),
    /// An error of the RAM layer.
    #[error(transparent)]
    Ram(#[from] bigfile_ram::RamError),
    /// An error of the fault layer.
    #[error(transparent)]
    Fault(#[from] bigfile_fault::FaultError),
    /// An OS call failed.
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Why a page could not be loaded: the value inside [`Error::Load`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// `loadblk` failed on each of `attempts` attempts (see
    /// [`LoadPolicy`](crate::LoadPolicy)); `source` is the error the last
    /// one returned, shared with every thread that waited for this load.
    #[error("failed after {attempts} attempt(s): {source}")]
    Block {
        attempts: u32,
        #[source]
        source: SharedBlockError,
    },
    /// `loadblk` panicked (seen by the threads that waited for it; the
    /// loader's own thread goes on unwinding).
    #[error("panicked")]
    Panicked,
    /// Waiting for the page would never end: this thread is loading it
    /// itself, or the wait would close a cycle of threads waiting for each
    /// other's loads and writeouts.
    #[error("cannot be served: {0}")]
    Deadlock(String),
    /// Another thread was loading the page, and its load failed with this.
    #[error("failed while waiting for another thread's load: {0}")]
    Waited(#[source] Box<Error>),
}

/// A `loadblk` error shared by the loader and the threads that waited for
/// its load: downcast it (`source.downcast_ref::<MyError>()`) to get the
/// backend's own error type back.
pub type SharedBlockError = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Result of the virtmem layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
