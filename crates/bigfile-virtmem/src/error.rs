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
    /// `storeblk` failed; this block and every block after it are still dirty.
    #[error("storeblk of block {blk} of {file} failed: {source}")]
    Store {
        file: String,
        blk: u64,
        #[source]
        source: BlockError,
    },
    /// `loadblk` failed (returned by prefault; a failing page fault ends in SIGBUS).
    #[error("loadblk of block {blk} of {file} failed: {message}")]
    Load {
        file: String,
        blk: u64,
        message: String,
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

/// Result of the virtmem layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
