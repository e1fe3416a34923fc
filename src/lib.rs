#![doc = include_str!("../README.md")]
//!
//! This crate only re-exports the layers, so that one dependency gives the
//! whole stack; pick a layer crate directly to depend on less:
//! [`ram`] (page table and RAM), [`fault`] (the page-fault handler) and
//! [`virtmem`] (BigFile, file handles, mappings).

pub use bigfile_fault as fault;
pub use bigfile_ram as ram;
pub use bigfile_virtmem as virtmem;
