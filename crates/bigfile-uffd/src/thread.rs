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
