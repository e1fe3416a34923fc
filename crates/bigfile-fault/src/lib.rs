//! bigfile-fault owns the process-wide SIGSEGV/SIGBUS handler and nothing
//! else: it knows nothing of pages or files. It keeps a registry of address
//! ranges, each served by a [`FaultHandler`]; a protection fault
//! (`SEGV_ACCERR`, or a `SIGBUS`) inside a registered range is decoded into a
//! [`Fault`] (address, read or write, signal, nesting depth) and handed to
//! that range's handler on the faulting thread, on that thread's own stack.
//! Everything else — a missing mapping (`SEGV_MAPERR`), a signal sent with
//! kill(2), an address outside every range, or a handler answering
//! [`Outcome::NotOurs`] — goes to the action that was in place before ours;
//! where that is the default, the default is restored and the access
//! re-executes, so the process dies at the faulting instruction with a true
//! core.
//!
//! Its invariants (a lock-free lookup, no handler used after its
//! [`Registration`] is dropped, errno preserved, no unwinding through the
//! signal frame, at most [`MAX_DEPTH`] nested faults) and where it sits in
//! the fault path are in ARCHITECTURE.md at the repository root.
//!
//! The handler contract: [`FaultHandler::handle`] runs inside a signal
//! handler, synchronously on the faulting thread, with that thread's own
//! stack. It returns [`Outcome::Handled`] once the memory has been fixed up
//! (the access then re-executes), [`Outcome::NotOurs`] to pass the fault on,
//! or [`Outcome::Fatal`] to kill the process with a message. It may touch
//! other registered memory (the nested fault is dispatched with
//! `depth + 1`), register and unregister ranges (its own included), and take
//! locks — but never a lock that code touching the served memory may hold,
//! and it must not wait for a handler on its own thread. A panic in it prints
//! a diagnostic and aborts.
//!
//! Ranges are found per fault, so kernel accesses to unserved memory (a
//! read(2) into a protected page) get `EFAULT` instead of a fault: callers
//! must populate such memory first.
#![doc = include_str!("../README.md")]

mod arch;
mod diag;
mod error;
mod fork;
mod frames;
mod halflock;
mod handler;
mod registry;
mod request;
mod signal;
mod sys;
mod table;

pub use error::FaultError;
pub use frames::{current_depth, MAX_DEPTH};
pub use handler::{Access, Fault, FaultHandler, FaultSignal, Outcome};
pub use registry::{register, Registration};
pub use request::{request_signal, send_request, StoppedAt};
pub use signal::{ensure_on_top, install, is_on_top, BlockFaultsGuard};
