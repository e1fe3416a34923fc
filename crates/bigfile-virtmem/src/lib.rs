//! bigfile-virtmem: a BigFile mapped into memory, loaded on demand, tracked
//! for changes, written out or discarded, within a RAM budget.
//!
//! See the crate README (below) for an example and the semantics.
//!
//! It owns the `BigFile` trait, file handles ([`FileH`]: a snapshot of a
//! file plus its own in-memory changes), mappings ([`Vma`]), page states, the
//! loading protocol, the dirty list, writeout, discard, invalidation, and LRU
//! reclaim of clean pages under a [`Ram`]'s budget. Its invariants, the
//! path of a fault through its modules, its lock order and its policies
//! (batched reclaim, drop-behind, load retry) are in ARCHITECTURE.md at the
//! repository root.
//!
//! Errors are values ([`Error`]); inside a page fault, where no value can be
//! returned, a persistent load failure or an exhausted budget ends in SIGBUS
//! for the faulting thread with a diagnostic, and a loader touching its own
//! page in SIGSEGV.

#![doc = include_str!("../README.md")]

mod advice;
mod backend;
mod bigfile;
mod blockpage;
mod budget;
mod callback;
mod deaf;
mod error;
#[cfg(feature = "failpoints")]
mod failpoint;
mod failure;
mod file;
mod fileh;
mod fork;
mod fork_generation;
mod fresh;
mod handle;
mod host;
mod hostwait;
mod keys;
mod lru;
mod mapper;
mod memlimit;
mod pages;
mod poison;
mod ram;
mod readahead;
mod reclaim;
mod serve;
mod shared;
mod source;
mod state;
mod stats;
mod streak;
mod stream;
mod sys;
mod uffd;
mod vma;
mod vmas;
mod waits;
mod worker;

pub use advice::Advice;
pub use backend::FaultBackend;
pub use bigfile::{BigFile, BlockError};
pub use bigfile_fault::Access;
pub use blockpage::BlockPage;
pub use error::{Error, LoadError, Result, SharedBlockError};
pub use file::{FileBigFile, FileBlockError};
pub use fileh::{FileH, WriteoutFlags};
pub use handle::LoadPolicy;
pub use host::{set_host_lock, HostLock};
pub use hostwait::host_lock_wait;
pub use pages::PageState;
pub use ram::{Ram, RamStats};
pub use readahead::on_worker as on_read_ahead_worker;
pub use stats::Stats;
pub use uffd::on_worker as on_userfaultfd_worker;
pub use vma::{Placeholder, Vma};
pub use worker::FORKED_WORKER_STATUS;
