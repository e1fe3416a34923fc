use libc::c_void;

use crate::handler::Access;

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

/// The program counter and general registers of the interrupted code
/// (`REG_R8` to `REG_RIP`: everything before the flags, segment and fault
/// words).
///
/// # Safety
/// As for [`access`].
pub(crate) unsafe fn registers(ctx: *const c_void) -> [u64; 17] {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: as in `access`.
    let gregs = unsafe { &(*uc).uc_mcontext.gregs };
    std::array::from_fn(|i| gregs[libc::REG_R8 as usize + i] as u64)
}

/// The program counter of the interrupted code.
///
/// # Safety
/// As for [`access`].
pub(crate) unsafe fn program_counter(ctx: *const c_void) -> usize {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: as in `access`.
    unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] as usize }
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

// Calls `f(arg)` (rdi = arg, rsi = f) with rsp = rdx. The frame is anchored
// in rbp (callee-saved, so `f` preserves it) and described by CFI, so
// unwinders and backtraces walk from the new stack back to the old one.
std::arch::global_asm!(
    ".pushsection .text.bigfile_fault_call_on_stack,\"ax\",@progbits",
    ".globl bigfile_fault_call_on_stack",
    ".hidden bigfile_fault_call_on_stack",
    ".type bigfile_fault_call_on_stack,@function",
    ".p2align 4",
    "bigfile_fault_call_on_stack:",
    ".cfi_startproc",
    // Marked a signal frame: its caller's frame lies on another stack (the
    // alternate signal stack, below the thread's stack), at a lower address
    // than the frames it calls, which debuggers otherwise take for a corrupt
    // stack and stop unwinding at (gdb: "previous frame inner to this frame").
    ".cfi_signal_frame",
    "push rbp",
    ".cfi_def_cfa_offset 16",
    ".cfi_offset rbp, -16",
    "mov rbp, rsp",
    ".cfi_def_cfa_register rbp",
    "mov rsp, rdx",
    "call rsi",
    "mov rsp, rbp",
    "pop rbp",
    ".cfi_def_cfa rsp, 8",
    "ret",
    ".cfi_endproc",
    ".size bigfile_fault_call_on_stack, . - bigfile_fault_call_on_stack",
    ".popsection",
);
