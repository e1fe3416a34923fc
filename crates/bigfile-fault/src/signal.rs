//! The signal handler itself: installing it, keeping it on top, dispatching a
//! fault to its range's handler (on the faulting thread's own stack), chaining
//! to the previous handler, and dying the right way.

use std::cell::Cell;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use libc::{c_int, c_void, siginfo_t};

use crate::error::FaultError;
use crate::frames::{self, current_depth, MAX_DEPTH};
use crate::halflock::WriteGuard;
use crate::handler::{Fault, FaultSignal, Outcome};
use crate::table::{current, RangeState, Table, TABLE};
use crate::{arch, diag, sys};

/// si_code of a SIGSEGV for an access the page's protection forbids (the
/// mapping exists); libc does not export it.
const SEGV_ACCERR: c_int = 2;

/// The signals we handle, in the order of `Table::prev`.
const SIGNALS: [(c_int, &str); 2] = [(libc::SIGSEGV, "SIGSEGV"), (libc::SIGBUS, "SIGBUS")];

/// Stack left untouched below the interrupted code's stack pointer (beyond
/// its red zone) when a handler is moved onto that stack.
const STACK_GAP: usize = 256;

/// What this thread is chaining to the previous handler, if anything.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Chaining {
    No,
    /// A hardware fault: returning from it re-executes the faulting access.
    Fault,
    /// A signal sent with kill(2) and friends: nothing re-executes.
    Sent,
}

thread_local! {
    static CHAINING: Cell<Chaining> = const { Cell::new(Chaining::No) };
}

fn our_handler() -> usize {
    on_signal as extern "C" fn(c_int, *mut siginfo_t, *mut c_void) as usize
}

fn our_action() -> libc::sigaction {
    // SAFETY: an all-zero sigaction is valid (SIG_DFL, empty mask, no flags).
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = our_handler();
    // SA_NODEFER: a handler may fault again (nested faults), and a synchronous
    // SIGSEGV that is blocked kills the process. SA_ONSTACK: stack-overflow
    // faults must be seen (and chained to Rust's reporter) on the alternate stack.
    act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
    act.sa_mask = sys::sigset_of(&[]);
    act
}

/// Installs the SIGSEGV and SIGBUS handler, remembering the actions it
/// replaces to chain to. Idempotent and thread-safe; if another handler has
/// displaced ours since, ours goes back on top (as [`ensure_on_top`] does).
///
/// # Errors
/// [`FaultError::Sigaction`] if sigaction(2) fails.
pub fn install() -> Result<(), FaultError> {
    ensure_on_top().map(drop)
}

/// Puts our handler back on top if another one replaced it (Python's
/// `faulthandler.enable()`, a crash reporter): the newcomer becomes the
/// handler we chain to for faults that are not ours. Installs the handler if
/// it never was. Returns whether ours had been displaced.
///
/// [`register`](crate::register) calls this every time; bindings call it
/// where a host may have installed handlers behind our back.
///
/// # Errors
/// [`FaultError::Sigaction`] if sigaction(2) fails.
pub fn ensure_on_top() -> Result<bool, FaultError> {
    crate::fork::install();
    let mut guard = TABLE.write();
    ensure_on_top_locked(&mut guard)
}

/// Whether our handler is the current action for both SIGSEGV and SIGBUS.
pub fn is_on_top() -> bool {
    SIGNALS.iter().all(|&(signo, _)| {
        sys::sigaction_get(signo).is_ok_and(|act| act.sa_sigaction == our_handler())
    })
}

pub(crate) fn ensure_on_top_locked(guard: &mut WriteGuard<'_, Table>) -> Result<bool, FaultError> {
    let mut table = current(guard);
    let mut displaced = [false; 2];
    for (i, &(signo, name)) in SIGNALS.iter().enumerate() {
        let act = sys::sigaction_get(signo).map_err(|source| FaultError::Sigaction {
            signal: name,
            source,
        })?;
        if act.sa_sigaction != our_handler() {
            table.prev[i] = act;
            displaced[i] = true;
        }
    }
    if displaced == [false; 2] {
        return Ok(false);
    }
    let was_installed = table.installed;
    table.installed = true;
    // Publish the actions to chain to before our handler can run.
    guard.publish(table.clone());
    let mut raced = false;
    for (i, &(signo, name)) in SIGNALS.iter().enumerate() {
        if !displaced[i] {
            continue;
        }
        let old =
            sys::sigaction_set(signo, &our_action()).map_err(|source| FaultError::Sigaction {
                signal: name,
                source,
            })?;
        if old.sa_sigaction != table.prev[i].sa_sigaction || old.sa_flags != table.prev[i].sa_flags
        {
            // Someone installed a handler between our query and our install.
            table.prev[i] = old;
            raced = true;
        }
    }
    if raced {
        guard.publish(table);
    }
    Ok(was_installed)
}

/// Blocks SIGSEGV and SIGBUS on this thread while alive, for code where no
/// fault is legitimate: a fault there kills the process at once (the kernel
/// does not deliver a blocked synchronous fault) instead of being served.
/// Dropping it unblocks whichever of the two were not blocked before.
pub struct BlockFaultsGuard {
    unblock: libc::sigset_t,
    _not_send: PhantomData<*const ()>,
}

impl BlockFaultsGuard {
    /// Blocks SIGSEGV and SIGBUS on the calling thread.
    pub fn new() -> Self {
        let signals = sys::sigset_of(&[libc::SIGSEGV, libc::SIGBUS]);
        let old = sys::thread_sigmask(libc::SIG_BLOCK, &signals)
            .expect("pthread_sigmask with a valid set cannot fail");
        let newly: Vec<c_int> = SIGNALS
            .iter()
            .map(|&(s, _)| s)
            // SAFETY: `old` is a valid sigset_t.
            .filter(|&s| unsafe { libc::sigismember(&old, s) } == 0)
            .collect();
        Self {
            unblock: sys::sigset_of(&newly),
            _not_send: PhantomData,
        }
    }
}

impl Default for BlockFaultsGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BlockFaultsGuard {
    fn drop(&mut self) {
        let _ = sys::thread_sigmask(libc::SIG_UNBLOCK, &self.unblock);
    }
}

impl std::fmt::Debug for BlockFaultsGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockFaultsGuard").finish_non_exhaustive()
    }
}

extern "C" fn on_signal(signo: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let errno = sys::errno();
    // SAFETY: the kernel calls an SA_SIGINFO handler with valid siginfo and ucontext.
    unsafe { dispatch(signo, info, ctx) };
    sys::set_errno(errno);
}

/// # Safety
/// Called from `on_signal` with the kernel's arguments.
unsafe fn dispatch(signo: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let (signal, slot) = match signo {
        libc::SIGSEGV => (FaultSignal::Segv, 0),
        libc::SIGBUS => (FaultSignal::Bus, 1),
        _ => return,
    };
    // SAFETY: `info` is the kernel's siginfo; si_addr is meaningful for faults
    // (code > 0), and we only use it then.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Only a protection fault (or a bus error) can be a range's business: a
    // missing mapping is a real bug, and a sent signal is not a fault at all.
    let candidate = code > 0 && (signo == libc::SIGBUS || code == SEGV_ACCERR);
    let (range, prev) = TABLE.read(|table| match table {
        Some(t) => (
            candidate.then(|| t.find(addr).cloned()).flatten(),
            Some(t.prev[slot]),
        ),
        None => (None, None),
    });
    let Some(range) = range else {
        // SAFETY: forwarding the kernel's arguments.
        return unsafe { chain(signo, info, ctx, prev) };
    };
    let depth = current_depth() + 1;
    if depth > MAX_DEPTH {
        drop(range);
        diag::report(format_args!(
            "fault at {addr:#x} nested deeper than {MAX_DEPTH} handlers (runaway recursion in fault handlers)"
        ));
        // SAFETY: forwarding the kernel's ucontext.
        return unsafe { die(signo, FaultSignal::Segv, ctx) };
    }
    let fault = Fault {
        addr,
        // SAFETY: forwarding the kernel's ucontext.
        access: unsafe { arch::access(ctx) },
        signal,
        depth,
        requested: false,
        // SAFETY: forwarding the kernel's ucontext.
        execution: unsafe { arch::execution(ctx) },
    };
    // SAFETY: forwarding the kernel's ucontext.
    let outcome = unsafe { serve(&range, &fault, ctx, None) };
    // Our reference is what Registration's drop waits for: release it last.
    drop(range);
    match outcome {
        Outcome::Handled => {}
        // SAFETY: forwarding the kernel's arguments.
        Outcome::NotOurs => unsafe { chain(signo, info, ctx, prev) },
        // SAFETY: forwarding the kernel's ucontext.
        Outcome::Fatal { signal, message } => unsafe {
            die_reporting(signo, signal, &message, ctx)
        },
    }
}

/// Prints `bigfile: <message>`, then dies by `want` at the access (see
/// `die`).
///
/// # Safety
/// `ctx` is the kernel's ucontext for the signal being handled.
pub(crate) unsafe fn die_reporting(
    signo: c_int,
    want: FaultSignal,
    message: &str,
    ctx: *mut c_void,
) {
    diag::report(format_args!("{message}"));
    // SAFETY: forwarded to the caller.
    unsafe { die(signo, want, ctx) };
}

/// One handler call, passed through `call_on_stack` as a raw pointer.
struct Call<'a> {
    range: &'a RangeState,
    fault: &'a Fault,
    /// Set when we moved off the alternate signal stack: the settings to restore.
    altstack: Option<libc::stack_t>,
    /// The request signal, blocked while a request's handler is on the
    /// alternate stack (`request.rs`): unblocked while the handler runs
    /// off it, so that a nested fault's request reaches this thread.
    unblock: Option<c_int>,
    outcome: Option<Outcome>,
}

/// Runs the range's handler on the faulting thread's own stack: the
/// alternate signal stack (where SA_ONSTACK puts us when the thread has one,
/// as every Rust thread does) is a few KiB, far too small for real handlers.
/// `request`: the request signal, for a request's handler (which its
/// action blocks: let through once off the alternate stack).
///
/// # Safety
/// `ctx` is the kernel's ucontext for this fault.
pub(crate) unsafe fn serve(
    range: &RangeState,
    fault: &Fault,
    ctx: *mut c_void,
    request: Option<c_int>,
) -> Outcome {
    let mut call = Call {
        range,
        fault,
        altstack: None,
        unblock: request,
        outcome: None,
    };
    let arg = ptr::addr_of_mut!(call).cast::<c_void>();
    // SAFETY: forwarding the kernel's ucontext.
    let sp = unsafe { arch::stack_pointer(ctx) };
    match sys::sigaltstack_get() {
        Ok(alt) if alt.ss_flags & libc::SS_ONSTACK != 0 => {
            let lo = alt.ss_sp as usize;
            let on_alt = (lo..=lo + alt.ss_size).contains(&sp);
            if on_alt {
                // The faulting code itself ran on the alternate stack; stay
                // there (further requests wait, their frames would go
                // there too).
                call.unblock = None;
                // SAFETY: `arg` points to `call`, alive across the call.
                unsafe { run_handler(arg) };
            } else {
                call.altstack = Some(alt);
                let new_sp = (sp - arch::RED_ZONE - STACK_GAP) & !15;
                // SAFETY: below the interrupted stack pointer and its red zone,
                // the faulting thread's stack is free; run_handler never unwinds.
                unsafe { arch::call_on_stack(new_sp, run_handler, arg) };
            }
        }
        // SAFETY: `arg` points to `call`, alive across the call.
        _ => unsafe { run_handler(arg) },
    }
    call.outcome.unwrap_or(Outcome::NotOurs)
}

/// # Safety
/// `arg` points to a live `Call`.
unsafe extern "C" fn run_handler(arg: *mut c_void) {
    // SAFETY: the caller passes a pointer to its `Call`.
    let call = unsafe { &mut *arg.cast::<Call<'_>>() };
    if call.altstack.is_some() {
        // We left the alternate stack but our signal frame is still on it; a
        // nested fault would be delivered at its top and overwrite that frame.
        // Disabled, nested faults are delivered on this stack, below us.
        let disable = libc::stack_t {
            ss_sp: ptr::null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        };
        let _ = sys::sigaltstack_set(&disable);
    }
    let requests = call.unblock.map(|signo| sys::sigset_of(&[signo]));
    if let Some(set) = &requests {
        let _ = sys::thread_sigmask(libc::SIG_UNBLOCK, set);
    }
    let depth = call.fault.depth;
    frames::enter(depth, call.range);
    let handler = &call.range.handler;
    let fault = call.fault;
    let result = catch_unwind(AssertUnwindSafe(|| handler.handle(fault)));
    frames::leave(depth);
    if let Some(set) = &requests {
        // Before the alternate stack is back: a request delivered now
        // would be put at its top, over this handler's frame.
        let _ = sys::thread_sigmask(libc::SIG_BLOCK, set);
    }
    if let Some(mut alt) = call.altstack {
        alt.ss_flags &= !libc::SS_ONSTACK;
        let _ = sys::sigaltstack_set(&alt);
    }
    match result {
        Ok(outcome) => call.outcome = Some(outcome),
        Err(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("<non-string panic payload>");
            diag::report(format_args!(
                "panic in fault handler at {:#x} ({:?} access): {text}",
                fault.addr, fault.access
            ));
            std::process::abort();
        }
    }
}

/// Hands a fault that is not ours to the action that was in place before ours.
///
/// # Safety
/// The kernel's arguments for this signal.
unsafe fn chain(
    signo: c_int,
    info: *mut siginfo_t,
    ctx: *mut c_void,
    prev: Option<libc::sigaction>,
) {
    // SAFETY: the kernel's siginfo.
    let code = unsafe { (*info).si_code };
    let outer = CHAINING.with(Cell::get);
    if outer != Chaining::No {
        // The handler we chained to sent the signal back to us (Python's
        // faulthandler restores its predecessor, us, and re-raises) or
        // faulted: end the loop with the default action.
        sys::set_default_action(signo);
        if code <= 0 && outer == Chaining::Sent {
            raise_default(signo);
        }
        // Otherwise returning re-executes a faulting access (this one, or the
        // original one once the chained handler returns) under SIG_DFL.
        return;
    }
    let Some(prev) = prev else {
        return die_default(signo, code);
    };
    let handler = prev.sa_sigaction;
    if handler == libc::SIG_DFL || (handler == libc::SIG_IGN && code > 0) {
        // An ignored fault would re-execute forever; the kernel kills for it too.
        return die_default(signo, code);
    }
    if handler == libc::SIG_IGN {
        return;
    }
    // Call it as the kernel would have: with its mask, and the signal itself
    // blocked unless it asked for SA_NODEFER.
    let mut mask = prev.sa_mask;
    if prev.sa_flags & libc::SA_NODEFER == 0 {
        // SAFETY: `mask` is a valid sigset_t.
        unsafe { libc::sigaddset(&mut mask, signo) };
    }
    let old_mask = sys::thread_sigmask(libc::SIG_BLOCK, &mask).ok();
    CHAINING.with(|c| {
        c.set(if code > 0 {
            Chaining::Fault
        } else {
            Chaining::Sent
        })
    });
    // SAFETY: `prev` is the action installed before ours, a handler (the
    // caller checked for SIG_IGN and SIG_DFL); the arguments are the
    // kernel's own.
    unsafe { sys::call_action(&prev, signo, info, ctx) };
    if let Some(old) = old_mask {
        // A signal the handler raised while blocked arrives here, still chaining.
        let _ = sys::thread_sigmask(libc::SIG_SETMASK, &old);
    }
    CHAINING.with(|c| c.set(Chaining::No));
    if code <= 0 && sys::sigaction_get(signo).is_ok_and(|a| a.sa_sigaction == libc::SIG_DFL) {
        // The chained handler asked for death the way a fault handler does
        // (reset to default and return); for a sent signal nothing
        // re-executes, so deliver it again.
        raise_default(signo);
    }
}

/// The default action: for a fault, restore it and return so the access
/// re-executes and the process dies at the faulting instruction; for a sent
/// signal, send it again.
fn die_default(signo: c_int, code: c_int) {
    sys::set_default_action(signo);
    if code <= 0 {
        raise_default(signo);
    }
}

fn raise_default(signo: c_int) {
    sys::set_default_action(signo);
    let _ = sys::thread_sigmask(libc::SIG_UNBLOCK, &sys::sigset_of(&[signo]));
    sys::raise_on_this_thread(signo);
}

/// Dies by `want` at the faulting instruction of a fault taken as `signo`.
///
/// # Safety
/// `ctx` is the kernel's ucontext for this fault.
unsafe fn die(signo: c_int, want: FaultSignal, ctx: *mut c_void) {
    let want_signo = match want {
        FaultSignal::Segv => libc::SIGSEGV,
        FaultSignal::Bus => libc::SIGBUS,
    };
    sys::set_default_action(want_signo);
    if want_signo == libc::SIGSEGV && signo == libc::SIGSEGV {
        // Returning re-executes the access: a true core at the real place.
        return;
    }
    // Make the signal pending but blocked, and unblocked in the mask that
    // sigreturn restores: it is delivered as we return, before the faulting
    // instruction runs again, and only to this thread.
    let set = sys::sigset_of(&[want_signo]);
    let _ = sys::thread_sigmask(libc::SIG_BLOCK, &set);
    sys::raise_on_this_thread(want_signo);
    // SAFETY: the kernel's ucontext is ours to edit until we return; its
    // uc_sigmask is the mask sigreturn installs.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        libc::sigdelset(ptr::addr_of_mut!((*uc).uc_sigmask), want_signo);
    }
}
