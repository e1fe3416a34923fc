//! Where a faulting thread is: in its own code, or inside a system call
//! (the kernel touching the page for it).

use std::io;

/// What `/proc/self/task/TID/syscall` says of a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadMode {
    /// Blocked, not in a system call: its fault is from user-mode code
    /// (a signal sent to it interrupts the fault and runs its handler),
    /// the faulting access's program counter and stack pointer these.
    User { pc: usize, sp: usize },
    /// Blocked inside a system call: the kernel faulted on its behalf (a
    /// signal would fail or restart the call).
    Syscall(Call),
    /// Running: it is not waiting for a fault (any more).
    Running,
}

/// A system call a thread is in: its number and arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub nr: i64,
    pub args: [u64; 6],
}

/// The most bytes one `read` or `write` copies (Linux's `MAX_RW_COUNT`:
/// `INT_MAX` rounded down to a page).
const MAX_RW_COUNT: usize = 0x7fff_f000;

/// The user memory a system call copies to or from, as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: usize,
    pub len: usize,
}

impl Call {
    /// The buffer this call copies, for `read`, `pread64`, `write` and
    /// `pwrite64` (its second and third arguments, as much of it as one
    /// call copies: at most `MAX_RW_COUNT`); `None` for any other call.
    /// Such a call on a blocking descriptor of a file copies all of it (the
    /// caller checks the descriptor: [`Call::fd`]). Not `sendto` or
    /// `recvfrom`, whose sockets are so often non-blocking (an event
    /// loop's) and copy what fits or what came; nor vectored I/O, whose
    /// buffers are in memory the reader would have to read.
    pub fn buffer(&self) -> Option<Buffer> {
        self.fd()?;
        Some(Buffer {
            addr: usize::try_from(self.args[1]).ok()?,
            len: usize::try_from(self.args[2]).ok()?.min(MAX_RW_COUNT),
        })
    }

    /// The descriptor of a `read`, `pread64`, `write` or `pwrite64` (its
    /// first argument).
    pub fn fd(&self) -> Option<libc::c_int> {
        match self.nr {
            libc::SYS_read | libc::SYS_pread64 | libc::SYS_write | libc::SYS_pwrite64 => {
                libc::c_int::try_from(self.args[0]).ok()
            }
            _ => None,
        }
    }
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

/// Where a thread of this process waits, if anywhere (`/proc/self/task/TID/`
/// `stat`'s state and `wchan`): an event read late may be of a fault its
/// thread has left since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Asleep in a userfaultfd fault (`handle_userfault`).
    InUserfault,
    /// Asleep anywhere else.
    Elsewhere,
    /// Running (in user code, or in the kernel, as a kernel-mode fault
    /// retried over and over while a signal is pending).
    Running,
    /// Asleep where the kernel does not say (no symbols: `wchan` is `0`).
    Unknown,
}

/// Where thread `tid` of this process waits now.
///
/// # Errors
/// The thread is gone, or `/proc` unreadable.
pub fn waiting(tid: libc::pid_t) -> io::Result<Waiting> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))?;
    // The state follows the command name, which is in parentheses and may
    // hold anything, spaces and parentheses included.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("/proc stat: {stat:?}"))
        })?;
    if state == "R" {
        return Ok(Waiting::Running);
    }
    let wchan = std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))?;
    Ok(match wchan.trim() {
        "handle_userfault" => Waiting::InUserfault,
        "0" | "" => Waiting::Unknown,
        _ => Waiting::Elsewhere,
    })
}

/// The signal masks of `/proc/self/task/TID/status`: the thread's pending
/// (`SigPnd`), the process's pending (`ShdPnd`), the thread's blocked
/// (`SigBlk`).
fn signal_masks(tid: libc::pid_t) -> io::Result<(u64, u64, u64)> {
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
    Ok((mask("SigPnd:")?, mask("ShdPnd:")?, mask("SigBlk:")?))
}

/// Whether signal `signo` is pending for thread `tid` of this process (sent
/// to it alone) and blocked there: `SigPnd` and `SigBlk` of
/// `/proc/self/task/TID/status`. A request signal so held never interrupts
/// the thread's fault.
pub fn signal_held(tid: libc::pid_t, signo: libc::c_int) -> io::Result<bool> {
    let (pending, _, blocked) = signal_masks(tid)?;
    let bit = 1u64 << (signo - 1);
    Ok(pending & bit != 0 && blocked & bit != 0)
}

/// Whether a signal thread `tid` does not block is pending for it (sent to
/// it or to the process): its kernel-mode fault, if it is in one, is
/// retried over and over without sleeping until served.
pub fn signal_pending(tid: libc::pid_t) -> io::Result<bool> {
    let (pending, shared, blocked) = signal_masks(tid)?;
    Ok((pending | shared) & !blocked != 0)
}

/// One line of `/proc/PID/task/TID/syscall`: `running`; `-1 SP PC` (not in
/// a system call); or the call's number, its six arguments, `SP PC` (the
/// numbers after the first in hexadecimal, `0x` before each).
fn parse(text: &str) -> Option<ThreadMode> {
    let mut words = text.split_whitespace();
    let first = words.next()?;
    if first == "running" {
        return Some(ThreadMode::Running);
    }
    match first.parse::<i64>().ok()? {
        -1 => {
            let mut reg = || usize::from_str_radix(words.next()?.strip_prefix("0x")?, 16).ok();
            let sp = reg()?;
            let pc = reg()?;
            Some(ThreadMode::User { pc, sp })
        }
        nr if nr >= 0 => {
            let mut args = [0u64; 6];
            for a in &mut args {
                let hex = words.next()?.strip_prefix("0x")?;
                *a = u64::from_str_radix(hex, 16).ok()?;
            }
            Some(ThreadMode::Syscall(Call { nr, args }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The number of the call a thread is in, if any.
    fn nr(mode: ThreadMode) -> Option<i64> {
        match mode {
            ThreadMode::Syscall(call) => Some(call.nr),
            _ => None,
        }
    }

    #[test]
    fn proc_lines_parse() {
        assert_eq!(
            parse("-1 0x7ffd 0x4005\n"),
            Some(ThreadMode::User {
                pc: 0x4005,
                sp: 0x7ffd
            })
        );
        assert_eq!(parse("-1 0x7ffd\n"), None, "no program counter");
        assert_eq!(
            parse("0 0x3 0x7f 0x8 0x0 0x0 0x0 0x7ffd 0x4005\n"),
            Some(ThreadMode::Syscall(Call {
                nr: 0,
                args: [3, 0x7f, 8, 0, 0, 0]
            }))
        );
        assert_eq!(parse("running\n"), Some(ThreadMode::Running));
        assert_eq!(parse(""), None);
        assert_eq!(parse("x"), None);
        assert_eq!(parse("1 0x3 0x7f\n"), None, "arguments cut short");
        assert_eq!(parse("1 0x3 0x7f 0x8 0x0 0x0 zz 0x1 0x2\n"), None);
    }

    #[test]
    fn the_buffer_of_a_copying_call_is_its_second_and_third_argument() {
        let call = |nr, buf: u64, count: u64| Call {
            nr,
            args: [7, buf, count, 0x99, 0, 0],
        };
        let buf = Some(Buffer {
            addr: 0x7f00_0000_1000,
            len: 0x20_0000,
        });
        let b = |nr| call(nr, 0x7f00_0000_1000, 0x20_0000).buffer();
        for copying in [
            libc::SYS_write,
            libc::SYS_pwrite64,
            libc::SYS_read,
            libc::SYS_pread64,
        ] {
            assert_eq!(b(copying), buf, "call {copying}");
            assert_eq!(call(copying, 1, 1).fd(), Some(7));
        }
        let huge = call(libc::SYS_write, 0x1000, u64::MAX >> 1).buffer();
        assert_eq!(huge.map(|b| b.len), Some(MAX_RW_COUNT), "one call's most");
        for other in [
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_writev,
            libc::SYS_readv,
            libc::SYS_futex,
            libc::SYS_sendfile,
        ] {
            assert_eq!(b(other), None, "call {other}");
        }
        let parsed = parse("1 0x5 0x7f0000001000 0x200000 0x0 0x0 0x0 0x7ffd 0x4005\n");
        let Some(ThreadMode::Syscall(c)) = parsed else {
            panic!("{parsed:?}");
        };
        assert_eq!(c.buffer(), buf);
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
        assert!(!signal_pending(tid).unwrap(), "pending, but blocked");
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
            if nr(mode) == Some(libc::SYS_futex) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            mode = thread_mode(tid).unwrap();
        }
        assert_eq!(nr(mode), Some(libc::SYS_futex), "{mode:?}");
        assert_eq!(
            waiting(tid).unwrap(),
            Waiting::Elsewhere,
            "asleep in futex(2)"
        );
        tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_busy_thread_is_running() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tidtx, tidrx) = std::sync::mpsc::channel();
        let t = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                tidtx
                    .send(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t)
                    .unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let tid = tidrx.recv().unwrap();
        // Running whenever it has a core (on a busy machine: sometimes).
        let seen = (0..100_000).any(|_| waiting(tid).unwrap() == Waiting::Running);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
        assert!(seen);
    }
}
