//! The request signal: how a fault that another thread learned of reaches
//! the faulting thread, to be served there as if the thread had taken it
//! itself. A userfaultfd reader (bigfile-virtmem's userfaultfd backend) sees
//! a thread blocked in a fault of user-mode code; serving it on that thread
//! keeps everything a signal-served fault has (its host lock, its stack,
//! diagnostics and death at the access). [`send_request`] queues the signal
//! to the thread with the address; the signal interrupts the blocked fault,
//! the handler serves the address's range, and returning retries the
//! access, which finds the page.
//!
//! The signal is a real-time one, `SIGRTMAX - 2` unless the environment
//! variable `BIGFILE_REQUEST_SIGNAL` names another (a number); only signals
//! this process queued to itself are requests, others go to the action
//! that was there before.
//!
//! A request may arrive late: the thread may have left its fault before it
//! (woken by another thread's serving of the page, or by another signal,
//! after which it faults again: a second event, a second request). Served
//! where the thread is then, in the middle of any code (holding a lock of
//! bigfile's, or malloc's), its load could deadlock. So a request carries
//! where the thread was stopped when the sender looked ([`StoppedAt`]), and
//! is served only if it interrupts the thread right there; else it is
//! dropped (a thread still in that fault faults again: a new request).
//!
//! Requests queued together (retries of one fault interrupted by other
//! signals) are delivered one at a time: the signal is blocked while its
//! handler is on the alternate signal stack, and unblocked once the
//! handler has moved to the thread's own stack (`signal::serve`). Delivered
//! at once, their frames stacked on the small alternate stack overflowed it.

use std::io;
use std::sync::OnceLock;

use libc::{c_int, c_void, siginfo_t};

use crate::frames::{current_depth, MAX_DEPTH};
use crate::handler::{Access, Fault, FaultSignal, Outcome};
use crate::signal::{die_reporting, serve};
use crate::table::TABLE;
use crate::{arch, sys};

/// The request signal and the action it replaced.
struct Installed {
    signo: c_int,
    prev: libc::sigaction,
}

static INSTALLED: OnceLock<Result<Installed, (i32, String)>> = OnceLock::new();

/// The request signal's number, its handler installed (once).
///
/// # Errors
/// The variable names no real-time signal, or sigaction(2) failed.
pub fn request_signal() -> io::Result<c_int> {
    let inst = INSTALLED.get_or_init(|| {
        let signo = match std::env::var("BIGFILE_REQUEST_SIGNAL") {
            Ok(v) => match v.trim().parse::<c_int>() {
                Ok(n) if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&n) => n,
                _ => {
                    return Err((
                        libc::EINVAL,
                        format!(
                            "BIGFILE_REQUEST_SIGNAL={v:?}: not a real-time signal ({}..={})",
                            libc::SIGRTMIN(),
                            libc::SIGRTMAX()
                        ),
                    ))
                }
            },
            Err(_) => libc::SIGRTMAX() - 2,
        };
        // SAFETY: an all-zero sigaction is valid; the fields set make it ours.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_request as extern "C" fn(c_int, *mut siginfo_t, *mut c_void) as usize;
        // Not SA_RESTART-sensitive: the thread is in a page fault, not a
        // system call (kernel-mode faults are served by the reader's side).
        // Not SA_NODEFER: a second request waits until the handler has left
        // the alternate stack, where `signal::serve` unblocks it (a loader's
        // nested fault is a request too).
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        act.sa_mask = sys::sigset_of(&[signo]);
        match sys::sigaction_set(signo, &act) {
            Ok(prev) => Ok(Installed { signo, prev }),
            Err(e) => Err((
                e.raw_os_error().unwrap_or(libc::EINVAL),
                format!("sigaction({signo}): {e}"),
            )),
        }
    });
    match inst {
        Ok(i) => Ok(i.signo),
        Err((errno, msg)) => Err(io::Error::new(
            io::Error::from_raw_os_error(*errno).kind(),
            msg.clone(),
        )),
    }
}

/// Where a thread blocked in a fault of its user-mode code is stopped: the
/// faulting access's program counter and stack pointer, as
/// `/proc/self/task/TID/syscall` shows them (`-1 SP PC`). The request's
/// signal interrupts the thread exactly there if it is still in that fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoppedAt {
    pub pc: usize,
    pub sp: usize,
}

/// Ask thread `tid` of this process, blocked in a fault at `addr` with its
/// code stopped `at`, to serve it (see the module docs). Served only if the
/// signal interrupts the thread there.
///
/// # Errors
/// The signal could not be installed or queued (the thread is gone: ESRCH).
pub fn send_request(
    tid: libc::pid_t,
    addr: usize,
    access: Access,
    at: StoppedAt,
) -> io::Result<()> {
    let signo = request_signal()?;
    // SAFETY: an all-zero siginfo is valid; we fill what SI_QUEUE carries.
    let mut info: siginfo_t = unsafe { std::mem::zeroed() };
    info.si_signo = signo;
    info.si_code = libc::SI_QUEUE;
    // SAFETY: the fields of siginfo's rt union that SI_QUEUE uses, written
    // through the layout libc gives them (pid, uid, value).
    unsafe {
        let rt = (&mut info as *mut siginfo_t)
            .cast::<u8>()
            .add(RT_OFFSET)
            .cast::<RtFields>();
        (*rt).pid = libc::getpid();
        (*rt).uid = libc::getuid();
        (*rt).value = encode(addr, access);
        (*rt).pc = at.pc;
        (*rt).sp = at.sp;
    }
    // SAFETY: rt_tgsigqueueinfo with our own pid, a tid, and a siginfo we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_tgsigqueueinfo,
            libc::getpid(),
            tid,
            signo,
            &info as *const siginfo_t,
        )
    };
    bigfile_os::cvt(rc).map(drop)
}

/// Where siginfo's union starts (after si_signo, si_errno, si_code and
/// padding to 8 bytes on 64-bit Linux).
const RT_OFFSET: usize = 16;

/// The union member SI_QUEUE fills (`_rt`), and after it where the thread
/// was stopped. The kernel queues and delivers a siginfo's first 48 bytes
/// (its `kernel_siginfo`, on 64-bit Linux) whatever its code, so the two
/// words after `_rt` (room of the union's larger members) arrive as sent.
#[repr(C)]
struct RtFields {
    pid: libc::pid_t,
    uid: libc::uid_t,
    value: usize,
    pc: usize,
    sp: usize,
}

/// The address with the access in its low bit (addresses from faults on
/// pages are even: userfaultfd reports them exactly, but a byte access's
/// low bit is dropped; the handler serves the whole page anyway).
fn encode(addr: usize, access: Access) -> usize {
    (addr & !1) | usize::from(access == Access::Write)
}

fn decode(v: usize) -> (usize, Access) {
    (
        v & !1,
        if v & 1 != 0 {
            Access::Write
        } else {
            Access::Read
        },
    )
}

extern "C" fn on_request(signo: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let errno = sys::errno();
    // SAFETY: the kernel calls an SA_SIGINFO handler with a valid siginfo.
    let (code, rt) = unsafe {
        (
            (*info).si_code,
            &*info.cast::<u8>().add(RT_OFFSET).cast::<RtFields>(),
        )
    };
    // SAFETY: getpid has no preconditions.
    let ours = code == libc::SI_QUEUE && rt.pid == unsafe { libc::getpid() };
    if ours {
        // SAFETY: the kernel's ucontext for this signal.
        let here = unsafe {
            StoppedAt {
                pc: arch::program_counter(ctx),
                sp: arch::stack_pointer(ctx),
            }
        };
        // Elsewhere, the thread left the fault the request was sent for:
        // dropped (module docs).
        if here
            == (StoppedAt {
                pc: rt.pc,
                sp: rt.sp,
            })
        {
            // SAFETY: forwarding the kernel's ucontext.
            unsafe { serve_request(signo, rt.value, ctx) };
        }
    } else if let Some(Ok(inst)) = INSTALLED.get() {
        chain_other(signo, info, ctx, &inst.prev);
    }
    sys::set_errno(errno);
}

/// # Safety
/// `ctx` is the kernel's ucontext for this signal.
unsafe fn serve_request(signo: c_int, value: usize, ctx: *mut c_void) {
    let (addr, access) = decode(value);
    // A range unregistered since the request was sent: the retried access
    // faults afresh (into nothing ours, or a new range's reservation).
    let Some(range) = TABLE.read(|t| t.and_then(|t| t.find(addr).cloned())) else {
        return;
    };
    let depth = current_depth() + 1;
    if depth > MAX_DEPTH {
        drop(range);
        let msg = format!("fault at {addr:#x} nested deeper than {MAX_DEPTH} handlers (runaway recursion in fault handlers)");
        // SAFETY: forwarding the kernel's ucontext.
        return unsafe { die_reporting(signo, FaultSignal::Segv, &msg, ctx) };
    }
    let fault = Fault {
        addr,
        access,
        signal: FaultSignal::Segv,
        depth,
        requested: true,
        // SAFETY: the kernel's ucontext: the interrupted access's registers.
        execution: unsafe { arch::execution(ctx) },
    };
    // SAFETY: forwarding the kernel's ucontext.
    let outcome = unsafe { serve(&range, &fault, ctx, Some(signo)) };
    drop(range);
    match outcome {
        Outcome::Handled | Outcome::NotOurs => {}
        // SAFETY: forwarding the kernel's ucontext.
        Outcome::Fatal { signal, message } => unsafe {
            die_reporting(signo, signal, &message, ctx)
        },
    }
}

/// A signal that is not a request (sent by another process, or with
/// another code): to the action installed before ours, as the kernel would.
fn chain_other(signo: c_int, info: *mut siginfo_t, ctx: *mut c_void, prev: &libc::sigaction) {
    let handler = prev.sa_sigaction;
    if handler == libc::SIG_IGN {
        return;
    }
    if handler == libc::SIG_DFL {
        // The default action of a real-time signal is to terminate.
        sys::set_default_action(signo);
        let _ = sys::thread_sigmask(libc::SIG_UNBLOCK, &sys::sigset_of(&[signo]));
        sys::raise_on_this_thread(signo);
        return;
    }
    // Called as the kernel would have: the interrupted code's mask and the
    // action's, the signal itself blocked unless it asked for SA_NODEFER
    // (our own action blocks it).
    // SAFETY: the kernel's ucontext for this signal: its uc_sigmask is the
    // interrupted code's mask.
    let mut mask = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_sigmask };
    for s in 1..=libc::SIGRTMAX() {
        // SAFETY: valid sigset_t values, a valid signal number.
        unsafe {
            if libc::sigismember(&prev.sa_mask, s) == 1 {
                libc::sigaddset(&mut mask, s);
            }
        }
    }
    if prev.sa_flags & libc::SA_NODEFER == 0 {
        // SAFETY: `mask` is a valid sigset_t.
        unsafe { libc::sigaddset(&mut mask, signo) };
    }
    let old = sys::thread_sigmask(libc::SIG_SETMASK, &mask).ok();
    // SAFETY: `prev` is the action installed before ours, neither SIG_IGN
    // nor SIG_DFL; the arguments are the kernel's own.
    unsafe { sys::call_action(prev, signo, info, ctx) };
    if let Some(old) = old {
        let _ = sys::thread_sigmask(libc::SIG_SETMASK, &old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rides_in_the_low_bit() {
        assert_eq!(
            decode(encode(0x7000_1000, Access::Write)),
            (0x7000_1000, Access::Write)
        );
        assert_eq!(
            decode(encode(0x7000_1001, Access::Read)),
            (0x7000_1000, Access::Read)
        );
        // the layout SI_QUEUE's fields are read through, within the 48
        // bytes the kernel carries
        assert_eq!(std::mem::size_of::<RtFields>(), 32);
        assert!(RT_OFFSET + std::mem::size_of::<RtFields>() <= 48);
    }
}
