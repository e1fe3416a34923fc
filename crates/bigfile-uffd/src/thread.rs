//! Where a faulting thread is: in its own code, or inside a system call
//! (the kernel touching the page for it).

use std::io;

/// What `/proc/self/task/TID/syscall` says of a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadMode {
    /// Blocked, not in a system call: its fault is from user-mode code
    /// (a signal sent to it interrupts the fault and runs its handler).
    User,
    /// Blocked inside system call number `nr`: the kernel faulted on its
    /// behalf (a signal would fail or restart the call).
    Syscall(i64),
    /// Running: it is not waiting for a fault (any more).
    Running,
}

/// The mode of thread `tid` of this process.
pub fn thread_mode(tid: libc::pid_t) -> io::Result<ThreadMode> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))?;
    parse(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc syscall: {text:?}"),
        )
    })
}

/// Whether signal `signo` is pending for thread `tid` of this process (sent
/// to it alone) and blocked there: `SigPnd` and `SigBlk` of
/// `/proc/self/task/TID/status`. A request signal so held never interrupts
/// the thread's fault.
pub fn signal_held(tid: libc::pid_t, signo: libc::c_int) -> io::Result<bool> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))?;
    let mask = |field: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("/proc status has no {field}"),
                )
            })
    };
    let bit = 1u64 << (signo - 1);
    Ok(mask("SigPnd:")? & bit != 0 && mask("SigBlk:")? & bit != 0)
}

fn parse(text: &str) -> Option<ThreadMode> {
    let first = text.split_whitespace().next()?;
    if first == "running" {
        return Some(ThreadMode::Running);
    }
    match first.parse::<i64>().ok()? {
        -1 => Some(ThreadMode::User),
        nr if nr >= 0 => Some(ThreadMode::Syscall(nr)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_parse() {
        assert_eq!(parse("-1 0x7ffd 0x4005\n"), Some(ThreadMode::User));
        assert_eq!(
            parse("0 0x3 0x7f 0x8 0 0 0 0x7ffd 0x4005\n"),
            Some(ThreadMode::Syscall(0))
        );
        assert_eq!(parse("running\n"), Some(ThreadMode::Running));
        assert_eq!(parse(""), None);
        assert_eq!(parse("x"), None);
    }

    #[test]
    fn a_blocked_pending_signal_is_held() {
        let signo = libc::SIGRTMIN() + 1;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tidtx, tidrx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // SAFETY: a signal set we own, blocked for this thread only.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signo);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            // SAFETY: gettid has no arguments and cannot fail.
            tidtx
                .send(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t)
                .unwrap();
            rx.recv().unwrap();
            // Exits with the signal still blocked: never delivered.
        });
        let tid = tidrx.recv().unwrap();
        assert!(!signal_held(tid, signo).unwrap());
        // SAFETY: a signal to our own thread, which blocks it.
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, signo) };
        assert_eq!(rc, 0);
        assert!(signal_held(tid, signo).unwrap());
        assert!(!signal_held(tid, signo + 1).unwrap());
        tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_blocked_thread_is_in_its_system_call() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tidtx, tidrx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            tidtx
                .send(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t)
                .unwrap();
            rx.recv().unwrap(); // blocks in futex(2)
        });
        let tid = tidrx.recv().unwrap();
        let mut mode = thread_mode(tid).unwrap();
        for _ in 0..1000 {
            if mode == ThreadMode::Syscall(libc::SYS_futex) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            mode = thread_mode(tid).unwrap();
        }
        assert_eq!(mode, ThreadMode::Syscall(libc::SYS_futex));
        tx.send(()).unwrap();
        t.join().unwrap();
    }
}
