//! bigfile-ram owns the lowest layer of bigfile: the page table ([`PageMap`]) and RAM.
pub mod pagemap;

pub use pagemap::PageMap;
