//! Every libc call of this crate, each behind `syscall!`, which turns the C
//! convention (-1 and errno) into `io::Result`. All of these are
//! async-signal-safe: the signal handler uses them.

use std::io;
use std::mem::MaybeUninit;
use std::ptr;

use bigfile_os::syscall;
use libc::c_int;

/// The current action for `signo`.
pub(crate) fn sigaction_get(signo: c_int) -> io::Result<libc::sigaction> {
    let mut old = MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only queries; `old` is writable memory of the right type.
    syscall!(unsafe { libc::sigaction(signo, ptr::null(), old.as_mut_ptr()) })?;
    // SAFETY: sigaction succeeded, so it filled `old` (and it was zeroed anyway).
    Ok(unsafe { old.assume_init() })
}

/// Sets the action for `signo`, returning the one it replaced.
pub(crate) fn sigaction_set(signo: c_int, act: &libc::sigaction) -> io::Result<libc::sigaction> {
    let mut old = MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: `act` is a valid action (its handler, if any, is the caller's
    // choice of a function with the signal-handler ABI); `old` is writable.
    syscall!(unsafe { libc::sigaction(signo, act, old.as_mut_ptr()) })?;
    // SAFETY: sigaction succeeded, so it filled `old`.
    Ok(unsafe { old.assume_init() })
}

/// Restores the default action for `signo`. Errors are ignored: this is used
/// on the way to dying, where there is nothing better to do.
pub(crate) fn set_default_action(signo: c_int) {
    // SAFETY: an all-zero sigaction is SIG_DFL with an empty mask and no flags.
    let mut act: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    act.sa_sigaction = libc::SIG_DFL;
    let _ = sigaction_set(signo, &act);
}

/// A signal set holding exactly `signals`.
pub(crate) fn sigset_of(signals: &[c_int]) -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: `set` is a writable sigset_t; sigemptyset/sigaddset only write
    // it and cannot fail for valid signal numbers.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for &s in signals {
            libc::sigaddset(set.as_mut_ptr(), s);
        }
        set.assume_init()
    }
}

/// `pthread_sigmask(how, set)`, returning the previous mask of this thread.
pub(crate) fn thread_sigmask(how: c_int, set: &libc::sigset_t) -> io::Result<libc::sigset_t> {
    let mut old = MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: both pointers are valid sigset_t memory.
    let rc = unsafe { libc::pthread_sigmask(how, set, old.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: pthread_sigmask succeeded, so it filled `old`.
    Ok(unsafe { old.assume_init() })
}

/// Sends `signo` to the calling thread only (not the process: another thread
/// must not take it).
pub(crate) fn raise_on_this_thread(signo: c_int) {
    // SAFETY: getpid and gettid have no arguments and cannot fail. gettid
    // by its system call number: glibc's wrapper (2.30) is newer than the
    // glibc the wheels are built against (2.17).
    let (pid, tid) = unsafe { (libc::getpid(), libc::syscall(libc::SYS_gettid)) };
    // SAFETY: tgkill has no memory arguments.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signo) };
    let _ = syscall!(rc);
}

/// The calling thread's alternate signal stack settings.
pub(crate) fn sigaltstack_get() -> io::Result<libc::stack_t> {
    let mut old = MaybeUninit::<libc::stack_t>::zeroed();
    // SAFETY: a null new stack only queries; `old` is writable.
    syscall!(unsafe { libc::sigaltstack(ptr::null(), old.as_mut_ptr()) })?;
    // SAFETY: sigaltstack succeeded, so it filled `old`.
    Ok(unsafe { old.assume_init() })
}

/// Sets the calling thread's alternate signal stack.
pub(crate) fn sigaltstack_set(stack: &libc::stack_t) -> io::Result<()> {
    // SAFETY: `stack` is a valid stack_t; the memory it names (if enabled) is
    // the caller's to vouch for, and we only ever re-set one the kernel gave us.
    syscall!(unsafe { libc::sigaltstack(stack, ptr::null_mut()) })?;
    Ok(())
}

pub(crate) fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

pub(crate) fn set_errno(value: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = value };
}

/// Writes all of `bytes` to stderr with write(2), retrying on EINTR and short
/// writes; other errors drop the rest (nowhere to report them).
pub(crate) fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for reads of its length.
        match syscall!(unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) }) {
            Ok(n) => bytes = &bytes[n as usize..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Call the handler of signal action `action` with a signal's arguments,
/// in the form its `SA_SIGINFO` flag says it takes.
///
/// # Safety
/// `action.sa_sigaction` is a handler (not `SIG_IGN` or `SIG_DFL`) of the
/// form its flags say, and the arguments are those of a signal delivered
/// to this thread (or made up as the kernel would).
pub(crate) unsafe fn call_action(
    action: &libc::sigaction,
    signo: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let handler = action.sa_sigaction;
    if action.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the action holds a three-argument handler
        // (caller).
        unsafe {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(handler);
            f(signo, info, ctx);
        }
    } else {
        // SAFETY: without SA_SIGINFO the action holds a one-argument handler
        // (caller).
        unsafe {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
            f(signo);
        }
    }
}
