//! The `BigFile` trait: what a storage backend implements.

use crate::BlockPage;

/// The error a `loadblk` or `storeblk` returns: anything the backend likes.
pub type BlockError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A file of fixed-size blocks whose storage is provided by the implementor.
///
/// `loadblk` fills one block; `storeblk` stores one back. Both run on the
/// thread that needs them (for `loadblk`, the thread that touched the page,
/// from inside its page fault), never under the virtmem lock, and may run
/// concurrently for different blocks. They must not touch the page being
/// loaded through a mapping (that is a fatal error) but may read other
/// mappings, including other handles of the same file.
pub trait BigFile: Send + Sync + 'static {
    /// Block size in bytes: a multiple of the OS page size, and the page size
    /// of the RAM the file's handles use.
    fn blksize(&self) -> usize;

    /// Fill `buf` (exactly `blksize` bytes, initially unspecified) with block `blk`.
    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError>;

    /// Store block `blk` from `buf` (exactly `blksize` bytes).
    fn storeblk(&self, blk: u64, buf: &[u8]) -> Result<(), BlockError>;

    /// Fill `page`, the RAM page that will hold block `blk`: what virtmem
    /// calls for every load, on the thread doing it (the faulting thread or
    /// any other). The default calls [`loadblk`](Self::loadblk) with the
    /// page's memory; a loader that must hand the memory to code that may
    /// keep references to it past the call (the Python bindings) maps the
    /// page at an address of its own instead ([`BlockPage::map_at`]), to
    /// take it away after.
    fn loadblk_page(&self, blk: u64, page: &mut BlockPage<'_>) -> Result<(), BlockError> {
        self.loadblk(blk, page.as_mut_slice())
    }

    /// Store block `blk` from `page`, a RAM page mapped read-only
    /// everywhere for the call: what virtmem calls for every store, as
    /// [`loadblk_page`](Self::loadblk_page) is for loads. The default calls
    /// [`storeblk`](Self::storeblk) with the page's memory.
    fn storeblk_page(&self, blk: u64, page: &BlockPage<'_>) -> Result<(), BlockError> {
        self.storeblk(blk, page.as_slice())
    }

    /// A short human-readable name for diagnostics (a path, a database oid).
    fn name(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }

    /// Whether `loadblk`/`storeblk` may take the host lock (the GIL, see
    /// [`set_host_lock`](crate::set_host_lock)): a loader written in the
    /// host's language. A page fault taken by a thread holding the host lock
    /// keeps it while it serves the page, and releases it only before it
    /// calls such a file's `loadblk` or waits for work that may need the
    /// lock: such a file's load or writeout, or room in the budget held by
    /// such loads. A file that answers `false` (its I/O is native, as
    /// [`FileBigFile`](crate::FileBigFile)'s) lets faults of its pages
    /// finish without ever giving the host lock away, so host code that
    /// touches a mapping sees no other host thread run meanwhile. The
    /// default, `true`, is always safe.
    fn needs_host_lock(&self) -> bool {
        true
    }

    /// Whether asynchronous read-ahead may call `loadblk_page` on one of
    /// its worker threads, ahead of a detected stream. By default, a file
    /// whose loader takes no host lock. A loader that does (Python's) runs
    /// there only if it says so: it then runs on a thread other than the
    /// faulting one (its thread-local state, connections), takes the host
    /// lock there, and its failures are forgotten (the block is loaded
    /// again when touched).
    fn reads_ahead(&self) -> bool {
        !self.needs_host_lock()
    }
}
