//! The keys of virtmem's bookkeeping, each its own type so that a page key
//! cannot be passed where a handle key is meant.

use std::ptr::NonNull;

/// A file handle's key in its RAM's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct FileKey(pub(crate) usize);

/// A mapping's key among its handle's mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct VmaKey(pub(crate) usize);

/// A resident page's key in the page table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct PageKey(pub(crate) usize);

/// A page of a RAM handle's file, by its index there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct RamPage(pub(crate) u64);

/// One mapping as a fault names it: its key, and its start address. A
/// mapping dropped while one of its faults was being served may leave its
/// key to a new mapping; the address tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VmaId {
    pub(crate) key: VmaKey,
    pub(crate) start: usize,
}

/// One page slot of one mapping: where a block's page is (or was) mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) fileh: FileKey,
    pub(crate) vma: VmaKey,
    /// The page's index in the mapping.
    pub(crate) index: usize,
    pub(crate) addr: NonNull<u8>,
}

// SAFETY: `addr` is only an address inside a reservation owned by a Vma; it
// is dereferenced by no one through a `Slot`, only passed to the mapper.
unsafe impl Send for Slot {}
