//! bigfile-ram owns the lowest layer of bigfile: the page table and RAM. [`PageMap`] maps a
//! 64-bit page offset to a value through radix tables of one OS page each; a table exists only
//! while it holds something, and the tree is only as tall as its largest key needs. [`Ram`]
//! hands out pages of one fixed size (a multiple of the OS page size, of the huge page size on
//! hugetlbfs) from memfd, a tmpfs directory or the hugetlb pool; every page of a
//! [`RamHandle`] lives in that handle's single kernel file at offset `index × page_size`, so a
//! page mapped at several addresses is one memory, and adjacent pages mapped adjacently form
//! one kernel VMA. This crate knows nothing of signals, files or Python; its invariants
//! (allocation counts, errors not panics, owned descriptors and mappings) are in
//! ARCHITECTURE.md at the repository root.
//!
#![doc = include_str!("../README.md")]

#[cfg(not(target_os = "linux"))]
compile_error!("bigfile-ram needs Linux: memfd_create, fallocate(PUNCH_HOLE) and hugetlbfs");

mod error;
pub mod pagemap;
mod ram;
mod spec;
mod sys;
mod thp;

pub use bigfile_os::Prot;
pub use error::RamError;
pub use pagemap::PageMap;
pub use ram::{unmap, Ram, RamHandle, RamStats};
pub use spec::{AllocPolicy, Backend, RamSpec, ThpPolicy, DEFAULT_PAGE_SIZE, RAM_ENV};
pub use sys::os_page_size;

/// Bytes of storage a file holds (`st_blocks × 512` from `fstat`): how much memory a RAM
/// handle's file really takes.
pub fn allocated_bytes(fd: std::os::fd::BorrowedFd<'_>) -> Result<u64, RamError> {
    sys::allocated_bytes(fd).map_err(|e| RamError::io("fstat", e))
}
