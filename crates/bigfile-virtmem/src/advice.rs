//! [`Advice`]: how a mapping is expected to be accessed.

/// How a mapping is expected to be accessed, given to
/// [`Vma::advise`](crate::Vma::advise). The counterpart of `madvise(2)`'s
/// `MADV_NORMAL` / `MADV_SEQUENTIAL`, for the pages bigfile manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Advice {
    /// No expectation: clean pages are reclaimed least recently used first.
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
}
