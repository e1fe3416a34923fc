use libc::c_void;

use crate::handler::Access;

/// AAPCS64 on Linux has no red zone; keep a little margin anyway.
pub(crate) const RED_ZONE: usize = 0;

/// Offset of `__reserved` in the kernel's `struct sigcontext` (`uc_mcontext`):
/// fault_address, regs[31], sp, pc, pstate (35 u64 = 280 bytes), then the
/// 16-aligned reserved area. libc keeps the field private, so we locate it.
const RESERVED_OFFSET: usize = 288;
const RESERVED_LEN: usize = 4096;
/// `struct _aarch64_ctx` magic of the ESR record.
const ESR_MAGIC: u32 = 0x4553_5201;
/// Exception classes of a data abort from a lower / the same exception level.
const EC_DABT_LOWER: u64 = 0x24;
const EC_DABT_CUR: u64 = 0x25;
/// ISS bits of a data abort: write-not-read, and cache maintenance (which reports WnR=1).
const ISS_WNR: u64 = 1 << 6;
const ISS_CM: u64 = 1 << 8;

/// Read or write, from the ESR record the kernel appends to the ucontext.
///
/// # Safety
/// `ctx` is the third argument of an SA_SIGINFO handler (a `ucontext_t`).
pub(crate) unsafe fn access(ctx: *const c_void) -> Access {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: the caller passes the kernel's ucontext; the reserved area is
    // part of it, and we never read past its 4096 bytes.
    unsafe {
        let base = std::ptr::addr_of!((*uc).uc_mcontext)
            .cast::<u8>()
            .add(RESERVED_OFFSET);
        let mut off = 0;
        while off + 8 <= RESERVED_LEN {
            let magic = base.add(off).cast::<u32>().read_unaligned();
            let size = base.add(off + 4).cast::<u32>().read_unaligned() as usize;
            if magic == 0 || size < 8 {
                break;
            }
            if magic == ESR_MAGIC && off + 16 <= RESERVED_LEN {
                let esr = base.add(off + 8).cast::<u64>().read_unaligned();
                let ec = esr >> 26;
                let is_write = (ec == EC_DABT_LOWER || ec == EC_DABT_CUR)
                    && esr & ISS_WNR != 0
                    && esr & ISS_CM == 0;
                return if is_write {
                    Access::Write
                } else {
                    Access::Read
                };
            }
            off += size;
        }
    }
    Access::Read
}

/// The program counter, stack pointer and general registers (x0 to x30)
/// of the interrupted code.
///
/// # Safety
/// As for [`access`].
pub(crate) unsafe fn registers(ctx: *const c_void) -> [u64; 33] {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: as in `access`.
    let mc = unsafe { &(*uc).uc_mcontext };
    std::array::from_fn(|i| match i {
        31 => mc.sp,
        32 => mc.pc,
        _ => mc.regs[i],
    })
}

/// The program counter of the interrupted code.
///
/// # Safety
/// As for [`access`].
pub(crate) unsafe fn program_counter(ctx: *const c_void) -> usize {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: as in `access`.
    unsafe { (*uc).uc_mcontext.pc as usize }
}

/// The stack pointer of the interrupted code.
///
/// # Safety
/// As for [`access`].
pub(crate) unsafe fn stack_pointer(ctx: *const c_void) -> usize {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: as in `access`.
    unsafe { (*uc).uc_mcontext.sp as usize }
}

// Calls `f(arg)` (x0 = arg, x1 = f) with sp = x2. The frame is anchored in
// x29 (callee-saved, so `f` preserves it) and described by CFI, so unwinders
// and backtraces walk from the new stack back to the old one.
std::arch::global_asm!(
    ".pushsection .text.bigfile_fault_call_on_stack,\"ax\",%progbits",
    ".globl bigfile_fault_call_on_stack",
    ".hidden bigfile_fault_call_on_stack",
    ".type bigfile_fault_call_on_stack,%function",
    ".p2align 2",
    "bigfile_fault_call_on_stack:",
    ".cfi_startproc",
    // Marked a signal frame: its caller's frame lies on another stack (the
    // alternate signal stack, below the thread's stack), at a lower address
    // than the frames it calls, which debuggers otherwise take for a corrupt
    // stack and stop unwinding at (gdb: "previous frame inner to this frame").
    ".cfi_signal_frame",
    "stp x29, x30, [sp, #-16]!",
    ".cfi_def_cfa_offset 16",
    ".cfi_offset x29, -16",
    ".cfi_offset x30, -8",
    "mov x29, sp",
    ".cfi_def_cfa_register x29",
    "mov sp, x2",
    "blr x1",
    "mov sp, x29",
    ".cfi_def_cfa sp, 16",
    "ldp x29, x30, [sp], #16",
    ".cfi_def_cfa_offset 0",
    ".cfi_restore x29",
    ".cfi_restore x30",
    "ret",
    ".cfi_endproc",
    ".size bigfile_fault_call_on_stack, . - bigfile_fault_call_on_stack",
    ".popsection",
);
