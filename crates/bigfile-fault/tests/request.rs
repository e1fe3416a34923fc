//! The request signal (`send_request`): served on the thread it is sent to,
//! on that thread's own stack, only where the thread was stopped when it
//! was sent, one at a time however many arrive together.
//!
//! A thread blocked in `sigsuspend` stands in for a thread blocked in a
//! fault: `/proc/self/task/TID/syscall` shows where it is stopped, and a
//! signal interrupts it right there, as it would interrupt a fault.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bigfile_fault::{register, send_request, Access, Fault, FaultHandler, Outcome, StoppedAt};
use bigfile_testkit::handler::unprotect;
use bigfile_testkit::memory::{read_byte, Mapping};

/// The request signal's number (installed), with a handler of the
/// application's there before it: [`other_handler`], under SA_NODEFER and a
/// mask of SIGUSR1 (installed once, before bigfile's, for every test here).
fn request_signal() -> libc::c_int {
    static SIGNO: std::sync::OnceLock<libc::c_int> = std::sync::OnceLock::new();
    *SIGNO.get_or_init(|| {
        let signo = libc::SIGRTMAX() - 2;
        // SAFETY: an action we fill; the handler only reads its mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = other_handler as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaddset(&mut sa.sa_mask, libc::SIGUSR1);
            assert_eq!(libc::sigaction(signo, &sa, std::ptr::null_mut()), 0);
        }
        assert_eq!(bigfile_fault::request_signal().unwrap(), signo);
        signo
    })
}

/// What [`other_handler`] found blocked when it ran: bit 0 the signal
/// itself, bit 1 SIGUSR1; bit 2 set once it ran.
static OTHER_SAW: AtomicUsize = AtomicUsize::new(0);

extern "C" fn other_handler(signo: libc::c_int) {
    // SAFETY: the current mask, read into a set we own.
    let blocked = |s| unsafe {
        let mut now: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut now);
        libc::sigismember(&now, s) == 1
    };
    let saw = usize::from(blocked(signo)) | usize::from(blocked(libc::SIGUSR1)) << 1 | 4;
    OTHER_SAW.store(saw, Ordering::SeqCst);
}

/// A signal of the request's number that this process did not queue (here
/// tgkill's) goes to the action there before, under that action's mask and
/// flags, as the kernel would have called it: not under ours, which
/// blocks the request signal in its handler.
#[test]
fn another_signal_of_the_number_goes_to_the_previous_action_under_its_mask() {
    let signo = request_signal();
    // SAFETY: a signal to this very thread, whose handler is installed.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), signo) };
    assert_eq!(rc, 0);
    assert_eq!(
        OTHER_SAW.load(Ordering::SeqCst),
        0b110,
        "ran with SIGUSR1 blocked, the signal itself not (SA_NODEFER)"
    );
}

/// Needs more stack than an alternate signal stack has (a request served
/// there would overflow it), and counts what it serves.
struct BigFrames(AtomicUsize);

impl FaultHandler for BigFrames {
    fn handle(&self, fault: &Fault) -> Outcome {
        assert!(fault.requested);
        let frame = std::hint::black_box([1u8; 256 << 10]);
        self.0.fetch_add(
            usize::from(frame[fault.addr % frame.len()]),
            Ordering::SeqCst,
        );
        unprotect(fault)
    }
}

/// The signal that ends a thread's first `sigsuspend` (a handler that does
/// nothing: the call returns).
const WAKE: libc::c_int = libc::SIGUSR2;

extern "C" fn nothing(_: libc::c_int) {}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: a set we own, emptied before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// A thread that blocks the request signal and waits twice in
/// `sigsuspend`, from one call site (so stopped at the same place both
/// times): first with only [`WAKE`] let through, then with the requests
/// let through too. Its thread id comes back on the channel.
fn suspended_twice(signo: libc::c_int, tid: mpsc::Sender<libc::pid_t>) -> thread::JoinHandle<()> {
    // SAFETY: a handler that does nothing, for a signal only this test sends.
    unsafe {
        libc::signal(
            WAKE,
            nothing as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    thread::spawn(move || {
        let blocked = sigset(&[signo, WAKE]);
        // SAFETY: this thread's own mask; the sets are valid.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut());
            let mut first = blocked;
            libc::sigdelset(&mut first, WAKE);
            let then = sigset(&[]);
            tid.send(libc::gettid()).unwrap();
            for mask in [first, then] {
                libc::sigsuspend(&mask);
            }
        }
    })
}

/// Ends thread `tid`'s first `sigsuspend`.
fn wake(tid: libc::pid_t) {
    // SAFETY: a thread of this process, alive until joined.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, WAKE) };
    assert_eq!(rc, 0);
}

/// Where thread `tid` is stopped in `sigsuspend`, once it is.
fn stopped_in_sigsuspend(tid: libc::pid_t) -> StoppedAt {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap();
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.first() == Some(&libc::SYS_rt_sigsuspend.to_string().as_str()) {
            let hex = |w: &str| usize::from_str_radix(w.trim_start_matches("0x"), 16).unwrap();
            return StoppedAt {
                sp: hex(words[words.len() - 2]),
                pc: hex(words[words.len() - 1]),
            };
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} never waited: {text}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Found by the fault suite's races with kernel I/O (userfaultfd): one
/// fault's retries (the thread interrupted by other signals) are several
/// events, so several requests, all queued to the thread. Delivered at
/// once, each handler's frame over the last on the alternate signal stack,
/// they overflowed it (SIGSEGV, no diagnostic). Now the first is served on
/// the thread's stack and the others, delivered only then, find the thread
/// in that handler, not where they were sent for: dropped.
#[test]
fn requests_queued_together_are_served_once_on_the_threads_stack() {
    let served = serves(|tid, addr, at| {
        // More frames than an alternate stack holds, were they delivered
        // at once.
        for _ in 0..8 {
            send_request(tid, addr, Access::Read, at).unwrap();
        }
    });
    assert_eq!(served, 1, "served once");
}

/// A request that arrives after its thread left the fault it was sent for
/// (the thread elsewhere, perhaps holding a lock its loader would need) is
/// not served.
#[test]
fn a_request_that_finds_its_thread_elsewhere_is_dropped() {
    let served = serves(|tid, addr, at| {
        for elsewhere in [
            StoppedAt {
                pc: at.pc + 1,
                ..at
            },
            StoppedAt {
                sp: at.sp - 16,
                ..at
            },
        ] {
            send_request(tid, addr, Access::Read, elsewhere).unwrap();
        }
    });
    assert_eq!(served, 0, "not served");
}

/// How many times the requests `send` queues (to a thread stopped in
/// `sigsuspend`, where it is said to be stopped, for an address of a
/// registered page) are served once the thread lets them through.
fn serves(send: impl FnOnce(libc::pid_t, usize, StoppedAt)) -> usize {
    let map = Mapping::new(1, libc::PROT_NONE);
    let served = Arc::new(BigFrames(AtomicUsize::new(0)));
    let _reg = register(map.start, map.len, served.clone()).unwrap();
    let (tx, rx) = mpsc::channel();
    let t = suspended_twice(request_signal(), tx);
    let tid = rx.recv().unwrap();
    send(tid, map.start + 8, stopped_in_sigsuspend(tid));
    wake(tid);
    t.join().unwrap();
    let n = served.0.load(Ordering::SeqCst);
    if n > 0 {
        assert_eq!(read_byte(map.start + 8), 0, "served: readable");
    }
    n
}
