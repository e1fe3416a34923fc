//! Every fault that is not ours and every fatal outcome, each in a child
//! process: the test binary re-executes itself with `SCENARIO` naming what to
//! do, and the parent asserts how the child died and what it printed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bigfile_fault::{
    ensure_on_top, install, is_on_top, register, BlockFaultsGuard, Fault, FaultHandler,
    FaultSignal, Outcome,
};
use bigfile_os::os_page_size as page_size;
use bigfile_testkit::child::{self, Death};
use bigfile_testkit::handler::{handler, unprotect};
use bigfile_testkit::memory::{read_byte, write_byte, Mapping};

const SCENARIO: &str = "BIGFILE_FAULT_CRASH_SCENARIO";
const HANDLER_CALLED: &str = "RANGE HANDLER CALLED";

/// The child's entry point; does nothing when run as an ordinary test.
#[test]
fn child() {
    let Some(name) = child::scenario(SCENARIO) else {
        return;
    };
    scenario(&name);
    println!("SCENARIO RETURNED");
}

fn run_child(name: &str) -> child::Ended {
    child::run(child::test_child("child", SCENARIO, name), child::TIMEOUT).unwrap()
}

/// Runs `name` in a child and asserts it died by `signal`, with `wanted` in
/// its stderr (in order) and none of `unwanted` in its output. Returns the
/// child's stdout.
fn assert_dies(name: &str, signal: libc::c_int, wanted: &[&str], unwanted: &[&str]) -> String {
    let ended = run_child(name);
    if let Err(e) = Death::by(signal)
        .stderr(wanted)
        .absent(unwanted)
        .check(&ended)
    {
        panic!("scenario {name}: {e}");
    }
    ended.stdout
}

/// A handler that says on stderr that it was called, then does `f`.
fn logged(f: impl Fn(&Fault) -> Outcome + Send + Sync + 'static) -> Arc<dyn FaultHandler> {
    handler(move |fault| {
        eprintln!("{HANDLER_CALLED}");
        f(fault)
    })
}

/// A registered PROT_NONE page, kept for the rest of the (short) child's life.
fn registered_page(f: fn(&Fault) -> Outcome) -> usize {
    let map = Mapping::new(1, libc::PROT_NONE);
    let start = map.start;
    std::mem::forget(register(map.start, map.len, logged(f)).unwrap());
    std::mem::forget(map);
    start
}

fn unmapped_address() -> usize {
    Mapping::new(1, libc::PROT_READ).start
}

fn stderr_write(msg: &str) {
    // SAFETY: writing a valid buffer to fd 2; async-signal-safe.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

fn set_action(signo: libc::c_int, handler: usize, flags: libc::c_int) -> libc::sigaction {
    // SAFETY: all-zero is a valid sigaction; we fill in handler and flags.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler;
    act.sa_flags = flags;
    // SAFETY: an empty mask for a valid sigaction.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: as above.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid action and out-pointer; handlers given are async-signal-safe.
    assert_eq!(unsafe { libc::sigaction(signo, &act, &mut old) }, 0);
    old
}

/// A previous/foreign handler that reports itself and asks for death by
/// resetting the default action and returning.
extern "C" fn info_handler(signo: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel's siginfo.
    let code = unsafe { (*info).si_code };
    stderr_write(if code == 1 {
        "INFO HANDLER MAPERR\n"
    } else {
        "INFO HANDLER OTHER\n"
    });
    set_action(signo, libc::SIG_DFL, 0);
}

extern "C" fn plain_handler(signo: libc::c_int) {
    stderr_write("PLAIN HANDLER\n");
    set_action(signo, libc::SIG_DFL, 0);
}

/// Like Python's faulthandler: reports, restores the action it displaced
/// (ours) and raises the signal again.
static DISPLACED: AtomicUsize = AtomicUsize::new(0);
static DISPLACED_FLAGS: AtomicUsize = AtomicUsize::new(0);
static RERAISES: AtomicUsize = AtomicUsize::new(0);

extern "C" fn reraising_handler(signo: libc::c_int) {
    if RERAISES.fetch_add(1, Ordering::SeqCst) > 3 {
        stderr_write("LOOPING\n");
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(99) };
    }
    stderr_write("RERAISING HANDLER\n");
    set_action(
        signo,
        DISPLACED.load(Ordering::SeqCst),
        DISPLACED_FLAGS.load(Ordering::SeqCst) as libc::c_int,
    );
    // SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(signo) };
}

fn install_reraising(flags: libc::c_int) {
    let old = set_action(
        libc::SIGSEGV,
        reraising_handler as *const () as usize,
        flags,
    );
    DISPLACED.store(old.sa_sigaction, Ordering::SeqCst);
    DISPLACED_FLAGS.store(old.sa_flags as usize, Ordering::SeqCst);
}

fn null_deref() {
    read_byte(std::hint::black_box(0));
}

fn scenario(name: &str) {
    match name {
        "null_deref" => {
            registered_page(unprotect);
            null_deref();
        }
        "unmapped_read" => {
            registered_page(unprotect);
            read_byte(unmapped_address());
        }
        "unmapped_write" => {
            registered_page(unprotect);
            write_byte(unmapped_address(), 1);
        }
        "kill" => {
            registered_page(unprotect);
            // SAFETY: sends a signal to ourselves.
            unsafe { libc::kill(libc::getpid(), libc::SIGSEGV) };
        }
        "kill_default_prev" => {
            set_action(libc::SIGSEGV, libc::SIG_DFL, 0);
            registered_page(unprotect);
            // SAFETY: sends a signal to ourselves.
            unsafe { libc::kill(libc::getpid(), libc::SIGSEGV) };
        }
        "kill_ignored_prev" => {
            set_action(libc::SIGSEGV, libc::SIG_IGN, 0);
            registered_page(unprotect);
            // SAFETY: sends a signal to ourselves.
            unsafe { libc::kill(libc::getpid(), libc::SIGSEGV) };
            std::thread::sleep(std::time::Duration::from_millis(50));
            println!("SURVIVED IGNORED KILL");
        }
        "not_ours_outcome" => {
            read_byte(registered_page(|_| Outcome::NotOurs));
        }
        "fatal_segv" => {
            read_byte(registered_page(|_| Outcome::Fatal {
                signal: FaultSignal::Segv,
                message: "the handler says no".into(),
            }));
        }
        "fatal_bus" => {
            write_byte(
                registered_page(|_| Outcome::Fatal {
                    signal: FaultSignal::Bus,
                    message: "block 7 failed to load".into(),
                }),
                1,
            );
        }
        "panic" => {
            read_byte(registered_page(|_| panic!("handler exploded")));
        }
        "depth_limit" => {
            // Each fault's handler touches the next page: runaway nesting.
            let map = Mapping::new(16, libc::PROT_NONE);
            let next = |f: &Fault| {
                read_byte(f.addr + page_size());
                Outcome::Handled
            };
            std::mem::forget(register(map.start, map.len, logged(next)).unwrap());
            read_byte(map.start);
        }
        "blocked" => {
            let page = registered_page(unprotect);
            let _guard = BlockFaultsGuard::new();
            read_byte(page);
        }
        "chain_siginfo" => {
            set_action(
                libc::SIGSEGV,
                info_handler as *const () as usize,
                libc::SA_SIGINFO,
            );
            let page = registered_page(unprotect);
            read_byte(page);
            println!("SERVED");
            read_byte(unmapped_address());
        }
        "chain_plain" => {
            set_action(libc::SIGSEGV, plain_handler as *const () as usize, 0);
            registered_page(unprotect);
            null_deref();
        }
        "displaced" => {
            let page = registered_page(unprotect);
            set_action(
                libc::SIGSEGV,
                info_handler as *const () as usize,
                libc::SA_SIGINFO,
            );
            assert!(!is_on_top());
            assert!(ensure_on_top().unwrap());
            assert!(is_on_top());
            assert!(!ensure_on_top().unwrap());
            read_byte(page);
            println!("SERVED");
            null_deref();
        }
        "displaced_reraising" | "displaced_reraising_deferred" => {
            install().unwrap();
            let flags = if name == "displaced_reraising" {
                libc::SA_NODEFER
            } else {
                0
            };
            install_reraising(flags);
            // register() puts us back on top too.
            let page = registered_page(unprotect);
            assert!(is_on_top());
            read_byte(page);
            println!("SERVED");
            null_deref();
        }
        "stack_overflow" => {
            registered_page(unprotect);
            #[allow(unconditional_recursion)] // reason: the point is to overflow the stack
            fn recurse(n: u64) -> u64 {
                let buf = std::hint::black_box([n; 64]);
                recurse(n + 1) + buf[3]
            }
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(|| recurse(0))
                .unwrap()
                .join()
                .unwrap();
        }
        other => panic!("unknown scenario {other}"),
    }
}

const NOT_CALLED: &[&str] = &[HANDLER_CALLED];

#[test]
fn null_deref_dies_by_sigsegv() {
    assert_dies("null_deref", libc::SIGSEGV, &[], NOT_CALLED);
}

#[test]
fn unmapped_read_and_write_die_by_sigsegv() {
    assert_dies("unmapped_read", libc::SIGSEGV, &[], NOT_CALLED);
    assert_dies("unmapped_write", libc::SIGSEGV, &[], NOT_CALLED);
}

#[test]
fn a_killed_process_dies_without_calling_handlers() {
    // Previous handler is Rust's (which resets the default and returns).
    assert_dies("kill", libc::SIGSEGV, &[], NOT_CALLED);
    assert_dies("kill_default_prev", libc::SIGSEGV, &[], NOT_CALLED);
}

#[test]
fn a_sent_signal_ignored_before_us_stays_ignored() {
    let ended = run_child("kill_ignored_prev");
    assert!(ended.status.success(), "{}", ended.describe());
    assert!(ended.stdout.contains("SURVIVED IGNORED KILL"));
}

#[test]
fn not_ours_outcome_chains_and_dies() {
    assert_dies("not_ours_outcome", libc::SIGSEGV, &[HANDLER_CALLED], &[]);
}

#[test]
fn fatal_segv_prints_and_dies_by_sigsegv() {
    assert_dies(
        "fatal_segv",
        libc::SIGSEGV,
        &["bigfile: the handler says no\n"],
        &[],
    );
}

#[test]
fn fatal_bus_prints_and_dies_by_sigbus() {
    assert_dies(
        "fatal_bus",
        libc::SIGBUS,
        &["bigfile: block 7 failed to load\n"],
        &[],
    );
}

#[test]
fn panic_in_handler_aborts_with_a_diagnostic() {
    assert_dies(
        "panic",
        libc::SIGABRT,
        &["bigfile: panic in fault handler at 0x", "handler exploded"],
        &[],
    );
}

#[test]
fn runaway_nesting_hits_the_depth_limit() {
    assert_dies(
        "depth_limit",
        libc::SIGSEGV,
        &["bigfile: fault at 0x", "nested deeper than 8 handlers"],
        &[],
    );
}

#[test]
fn fault_under_block_faults_guard_dies_at_once() {
    assert_dies("blocked", libc::SIGSEGV, &[], NOT_CALLED);
}

#[test]
fn chains_to_a_previous_siginfo_handler() {
    let stdout = assert_dies(
        "chain_siginfo",
        libc::SIGSEGV,
        &["INFO HANDLER MAPERR"],
        &["INFO HANDLER OTHER"],
    );
    assert!(
        stdout.contains("SERVED"),
        "range fault reached the previous handler"
    );
}

#[test]
fn chains_to_a_previous_plain_handler() {
    assert_dies("chain_plain", libc::SIGSEGV, &["PLAIN HANDLER"], NOT_CALLED);
}

#[test]
fn displaced_handler_is_put_back_on_top_and_chained_to() {
    let stdout = assert_dies("displaced", libc::SIGSEGV, &["INFO HANDLER MAPERR"], &[]);
    assert!(stdout.contains("SERVED"));
}

#[test]
fn a_newcomer_that_reraises_through_us_does_not_loop() {
    for name in ["displaced_reraising", "displaced_reraising_deferred"] {
        let stdout = assert_dies(name, libc::SIGSEGV, &["RERAISING HANDLER"], &["LOOPING"]);
        assert!(stdout.contains("SERVED"), "{name}");
    }
}

#[test]
fn rust_stack_overflow_report_still_appears() {
    assert_dies(
        "stack_overflow",
        libc::SIGABRT,
        &["has overflowed its stack"],
        NOT_CALLED,
    );
}
