//! Threads of bigfile's own (the userfaultfd reader and workers, the
//! read-ahead workers) that take no signal meant for the application.

use std::io;

/// Spawn a thread of ours with every signal blocked but those it must take
/// synchronously (a fault of its own: SIGSEGV, SIGBUS, SIGILL, SIGFPE,
/// SIGTRAP) and the fault request signal (sent to it when a loader it runs
/// touches a mapping). A signal for the process (Ctrl-C's SIGINT, SIGTERM,
/// SIGCHLD, a timer's) then goes to one of the application's threads,
/// which expects it: delivered here, it would interrupt nothing of the
/// application's (a Python main thread sleeping in `time.sleep` would not
/// see its KeyboardInterrupt until the sleep ends). The new thread
/// inherits the mask blocked around the spawn; the caller's is restored.
pub(crate) fn spawn_deaf<F: FnOnce() + Send + 'static>(
    builder: std::thread::Builder,
    f: F,
) -> io::Result<std::thread::JoinHandle<()>> {
    // SAFETY: sigset_t is plain data, filled by sigfillset before use;
    // pthread_sigmask only changes this thread's mask, given back below.
    unsafe {
        let mut deaf: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut deaf);
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGTRAP,
        ] {
            libc::sigdelset(&mut deaf, sig);
        }
        if let Ok(request) = bigfile_fault::request_signal() {
            libc::sigdelset(&mut deaf, request);
        }
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &deaf, &mut old);
        let spawned = builder.spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        spawned
    }
}
