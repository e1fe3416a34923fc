use std::arch::asm;

use libc::c_void;

use crate::Access;

/// The System V ABI lets a leaf function use 128 bytes below `rsp`.
pub(crate) const RED_ZONE: usize = 128;

/// Bit 1 of the page-fault error code: the access was a write.
const PF_WRITE: i64 = 1 << 1;

/// Read or write, from the page-fault error code the kernel saved in the ucontext.
///
/// # Safety
/// `ctx` is the third argument of an SA_SIGINFO handler (a `ucontext_t`).
pub(crate) unsafe fn access(ctx: *const c_void) -> Access {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: the caller passes the kernel's ucontext, valid for the handler's duration.
    let err = unsafe { (*uc).uc_mcontext.gregs[libc::REG_ERR as usize] };
    if err & PF_WRITE != 0 {
        Access::Write
    } else {
        Access::Read
    }
}

/// The stack pointer of the interrupted code.
///
/// # Safety
/// As for [`access`].
pub(crate) unsafe fn stack_pointer(ctx: *const c_void) -> usize {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: as in `access`.
    unsafe { (*uc).uc_mcontext.gregs[libc::REG_RSP as usize] as usize }
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
    // SAFETY: r12 is callee-saved, so it holds our stack pointer across the
    // call; the caller vouches for the new stack; clobber_abi covers the call.
    unsafe {
        asm!(
            "mov r12, rsp",
            "mov rsp, {sp}",
            "call {f}",
            "mov rsp, r12",
            sp = in(reg) sp,
            f = in(reg) f,
            in("rdi") arg,
            out("r12") _,
            clobber_abi("C"),
        );
    }
}
