//! Per-architecture pieces: decoding read/write from the signal's ucontext,
//! the interrupted stack pointer, and calling a function on another stack.
//!
//! Each architecture module provides:
//! - `unsafe fn access(ctx: *const libc::c_void) -> Access`
//! - `unsafe fn stack_pointer(ctx: *const libc::c_void) -> usize`
//! - `unsafe fn program_counter(ctx: *const libc::c_void) -> usize`
//! - `unsafe fn registers(ctx: *const libc::c_void) -> [u64; N]`: the
//!   program counter and the general registers of the interrupted code,
//!   without the ones the kernel fills per fault (fault address, error
//!   code), for [`execution`];
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

/// An identity of the faulting instruction's execution: a hash of the
/// interrupted program counter and general registers. An instruction that
/// faults again without making progress (an access spanning two pages,
/// faulting on each in turn) re-executes with the same registers; another
/// instruction, the same one in another loop iteration, or a string
/// instruction further along (`rep movs` advances its registers) has
/// others.
///
/// # Safety
/// `ctx` is the third argument of an SA_SIGINFO handler (a `ucontext_t`).
pub(crate) unsafe fn execution(ctx: *const c_void) -> u64 {
    // SAFETY: forwarded to the caller.
    let regs = unsafe { registers(ctx) };
    // FNV-1a over the words: identical registers give identical values;
    // that different ones collide is as unlikely as any 64-bit hash.
    regs.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &r| {
        (h ^ r).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

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
