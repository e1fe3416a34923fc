//! bigfile-capi: the C ABI of bigfile, for C and C++ programs and for
//! bindings to any language with a C FFI. Built as `libbigfile_capi.so` and
//! `libbigfile_capi.a`; the header `include/bigfile.h` is generated from
//! this crate by cbindgen (`cargo xtask capi-header`) and checked in.
//!
//! It owns the C handles and the error convention, built on
//! bigfile-virtmem's public API only. Invariants:
//! - a handle is an opaque token, never an address, looked up in a
//!   registry (`handles.rs`): NULL, a freed or closed handle, a handle of
//!   another kind are errors, never undefined behaviour;
//! - every entry point returns 0 / -1, a pointer / NULL, and sets the
//!   calling thread's last error on failure (clears it on success); no
//!   panic crosses into C (`error::guard`);
//! - C callbacks (`loadblk`, `storeblk`, `release`, host-lock hooks) are
//!   called with the user pointer given with them, never under a lock of
//!   this crate; no lock of this crate is held across a virtmem call,
//!   which may release and retake the host lock (`closing.rs`).
//!
//! See README.md for the API, an example and the rules for binding authors.

#![allow(non_camel_case_types)] // reason: the C type names (`bigfile_fileh`...)

// Public so that the constants and types the header declares are part of
// the crate's API (cbindgen reads them; Rust code has no use for them).
// The header shows each kind of item in this order.
mod closing;
pub mod error;
pub mod file;
pub mod fileh;
mod handles;
pub mod host;
pub mod ram;
pub mod signals;
pub mod stats;
pub mod vma;
