//! Per-architecture pieces: decoding read/write from the signal's ucontext,
//! the interrupted stack pointer, and calling a function on another stack.
//!
//! Each architecture module provides:
//! - `unsafe fn access(ctx: *const libc::c_void) -> Access`
//! - `unsafe fn stack_pointer(ctx: *const libc::c_void) -> usize`
//! - `bigfile_fault_call_on_stack`, in assembly (`global_asm!`): the
//!   trampoline [`call_on_stack`] calls;
//! - `const RED_ZONE: usize`: bytes below the stack pointer the interrupted code may use.

use libc::c_void;

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::*;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub(crate) use aarch64::*;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!(
    "bigfile-fault supports x86_64 and aarch64 only: decoding whether a fault was a read or a \
     write needs per-architecture code in src/arch/"
);

#[cfg(not(target_os = "linux"))]
compile_error!("bigfile-fault supports Linux only (it relies on Linux's siginfo and ucontext)");

extern "C" {
    /// The architecture's trampoline: switch to `sp`, call `f(arg)`,
    /// switch back.
    fn bigfile_fault_call_on_stack(
        arg: *mut c_void,
        f: unsafe extern "C" fn(*mut c_void),
        sp: usize,
    );
}

/// Calls `f(arg)` with the stack pointer set to `sp`, then switches back.
///
/// # Safety
/// `sp` is 16-byte aligned and has room below it for everything `f` does;
/// `f` must not unwind; `arg` is whatever `f` expects.
pub(crate) unsafe fn call_on_stack(
    sp: usize,
    f: unsafe extern "C" fn(*mut c_void),
    arg: *mut c_void,
) {
    // SAFETY: the trampoline follows the C ABI; the caller vouches for the
    // new stack, `f` and `arg`.
    unsafe { bigfile_fault_call_on_stack(arg, f, sp) }
}
