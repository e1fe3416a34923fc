//! [`Advice`]: how a mapping is expected to be accessed.

/// How a mapping is expected to be accessed, given to
/// [`Vma::advise`](crate::Vma::advise). The counterpart of `madvise(2)`'s
/// `MADV_NORMAL` / `MADV_SEQUENTIAL` / `MADV_RANDOM`, for the pages bigfile
/// manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Advice {
    /// No expectation: clean pages are reclaimed least recently used first,
    /// and the mapping's faults are watched for a forward scan, as the
    /// kernel does for a file (sequential detection, see ARCHITECTURE.md): a
    /// fault on block `b` right after one on block `b - 1` in this mapping
    /// makes its faults a stream, which gets drop-behind as under
    /// [`Sequential`](Advice::Sequential) until a fault elsewhere ends it.
    #[default]
    Normal,
    /// Pages are accessed in ascending order and, once passed, not soon
    /// again: when a fault in this mapping hits block `b`, the clean page of
    /// block `b - 1` becomes the first to be reclaimed (drop-behind, see
    /// ARCHITECTURE.md). A scan bigger than the budget then keeps reusing
    /// the page it just left, still in the CPU caches, instead of the least
    /// recently used one, and leaves the rest of the budget's pages (other
    /// data) cached. The page is only reclaimed when room is needed, so data
    /// read within the budget stays resident as with `Normal`.
    /// [`Vma::prefault`](crate::Vma::prefault) applies it to the block
    /// before its range only, never to pages of the range.
    Sequential,
    /// No order to expect: sequential detection is off, so two faults on
    /// consecutive blocks never make this mapping's pages be dropped behind;
    /// clean pages are reclaimed least recently used first, in batches (as
    /// `MADV_RANDOM` turns the kernel's read-ahead off).
    Random,
}
