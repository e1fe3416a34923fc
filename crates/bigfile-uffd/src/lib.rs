//! bigfile-uffd: userfaultfd(2) as bigfile's second way of learning about
//! page faults. Unlike a SIGSEGV handler, a userfaultfd also hears of the
//! kernel's own accesses to a registered range (`read(2)` into it,
//! `write(2)` from it), which the signal backend cannot serve (EFAULT).
//!
//! It owns the descriptor and the kernel ABI, nothing of pages or files:
//!
//! - [`Uffd::open`] opens one (the system call, else `/dev/userfaultfd`),
//!   negotiates the features bigfile needs, or says exactly why not
//!   ([`Unavailable`]);
//! - [`Uffd::register`] a range of a shared-memory mapping for missing,
//!   minor and write-protect faults;
//! - [`Uffd::read_events`]: page faults, each with its address, kind and
//!   faulting thread; [`thread_mode`] tells whether that thread is in user
//!   mode or inside a system call, and which ([`Call::buffer`]: the user
//!   memory that call copies);
//! - resolutions: [`Uffd::resolve`] (map the page-cache page, optionally
//!   write-protected), [`Uffd::write_protect`], [`Uffd::wake`],
//!   [`Uffd::poison`] (the access fails: SIGBUS in user mode, EFAULT in
//!   the kernel).
//!
//! See ARCHITECTURE.md at the repository root for where it sits.
#![doc = include_str!("../README.md")]

mod abi;
mod event;
mod fd;
mod thread;

pub use event::{Event, FaultKind};
pub use fd::{Features, Registration, Uffd, Unavailable, HIDE_FEATURES_ENV};
pub use thread::{
    signal_held, signal_pending, thread_mode, waiting, Buffer, Call, ThreadMode, Waiting,
};
