//! Scenarios that must end the process, and ones that need a process of
//! their own: the test binary re-executes itself with `BIGFILE_IT_CHILD`
//! naming the scenario, and the parent asserts how the child ended.

use std::sync::Arc;

use bigfile::virtmem::WriteoutFlags;
use bigfile_testkit::child::{self, Death};

#[cfg(target_arch = "x86_64")]
use bigfile_testkit::memory::move_u64_one_access;
use bigfile_testkit::memory::read_u64_one_access;

use crate::common::{mem_file, open, peek, poke, ram, setup, MemFile, BLK};

const CHILD_ENV: &str = "BIGFILE_IT_CHILD";

fn run_child(scenario: &str) -> child::Ended {
    child::run(
        child::test_child("crash::child", CHILD_ENV, scenario),
        child::TIMEOUT,
    )
    .unwrap()
}

fn expect_signal(scenario: &str, signal: i32, stderr_has: &[&str]) {
    let ended = run_child(scenario);
    if let Err(e) = Death::by(signal).stderr(stderr_has).check(&ended) {
        panic!("{scenario}: {e}");
    }
}

fn expect_ok(scenario: &str) -> String {
    let ended = run_child(scenario);
    assert!(ended.status.success(), "{scenario}: {}", ended.describe());
    ended.stdout
}

#[test]
fn persistent_load_failure_is_sigbus_with_diagnostic() {
    expect_signal(
        "load_fails",
        libc::SIGBUS,
        &["block 3", "memfile", "3 attempt", "media error"],
    );
}

#[test]
fn loader_touching_its_own_page_is_sigsegv_with_diagnostic() {
    expect_signal(
        "self_touch",
        libc::SIGSEGV,
        &["touched the page it is loading"],
    );
}

/// Two loaders of files on two RAMs, each touching the page the other is
/// loading: the wait graph is the process's, so the cycle through both
/// RAMs is found (it hung with a graph per RAM).
#[test]
fn a_wait_cycle_through_two_rams_is_sigsegv_with_diagnostic() {
    expect_signal("cross_ram_cycle", libc::SIGSEGV, &["would never end"]);
}

/// A budget of more pages than the process has kernel mappings for, mapped
/// apart (every other slot: each page splits its mapping's reservation):
/// the process keeps fewer slots mapped, taking least recently used pages
/// away (it died by SIGBUS, "Cannot allocate memory", at about 32,000 pages
/// mapped).
#[test]
fn pages_mapped_apart_past_the_kernel_mapping_limit_are_served() {
    let out = expect_ok("past_map_count");
    assert!(
        out.contains("all read") || out.contains(MAP_COUNT_HIGH),
        "{out}"
    );
}

/// An access straddling two pages of a RAM whose pages are all that its
/// faults may take away while the process keeps as many slots mapped as it
/// may (another RAM's): making room for one page must not take the other
/// page of the same access, else the instruction faults on each in turn
/// forever (it did: loads went on without end).
#[test]
fn a_straddling_access_at_the_mapped_slot_limit_ends() {
    let out = expect_ok("straddle_at_map_limit");
    assert!(
        out.contains("read across") || out.contains(MAP_COUNT_HIGH),
        "{out}"
    );
}

#[test]
fn storeblk_writing_its_own_handle_is_sigsegv_with_diagnostic() {
    expect_signal("store_writes_own", libc::SIGSEGV, &["during its writeout"]);
}

#[test]
fn budget_exhausted_by_dirty_pages_is_sigbus_with_diagnostic() {
    expect_signal(
        "dirty_over_budget",
        libc::SIGBUS,
        &["budget", "exhausted", "dirty"],
    );
}

#[test]
fn panic_in_loadblk_aborts_with_diagnostic() {
    expect_signal(
        "panic_in_load",
        libc::SIGABRT,
        &["panic", "loader exploded"],
    );
}

/// The same for a load a system call needs (`write(2)` from the mapping):
/// on the userfaultfd backend a worker runs it and the process aborts as
/// above, rather than the worker dying and the call blocking for good; on
/// the signal backend the call fails with EFAULT, no load made.
#[test]
fn panic_in_a_system_calls_loadblk_aborts_or_is_efault() {
    match ram(1).fault_backend() {
        bigfile::virtmem::FaultBackend::Userfaultfd => expect_signal(
            "panic_in_kernel_load",
            libc::SIGABRT,
            &["loader exploded", "panic while serving block 0"],
        ),
        bigfile::virtmem::FaultBackend::Signals => {
            assert!(expect_ok("panic_in_kernel_load").contains("EFAULT"))
        }
    }
}

/// A loader whose system call (here `read(2)`) writes into the page it is
/// loading would wait for itself. On signals the call fails with EFAULT
/// (the kernel's access raises no signal); on userfaultfd, where the worker
/// serving the call's fault would wait for the loader, which waits in the
/// call for the worker, the wait graph sees the cycle and the call fails
/// with EFAULT and a diagnostic, instead of hanging: whether the loader
/// runs on the faulting thread (a user-mode fault) or on a worker (a
/// system call's fault). The page loads, for the next access.
#[test]
fn a_loaders_system_call_on_its_own_page_fails_with_efault() {
    let ended = run_child("syscall_on_own_page");
    assert!(ended.status.success(), "{}", ended.describe());
    let out = ended.stdout;
    for line in [
        "inner 0: EFAULT",
        "peek 0: ok",
        "outer 1: EFAULT",
        "inner 1: EFAULT",
        "peek 1: ok",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
    if ram(1).fault_backend() == bigfile::virtmem::FaultBackend::Userfaultfd {
        let err = ended.stderr;
        // Each loader's call is reported (a fault the kernel reported twice
        // before the poison landed is reported twice).
        for blk in 0..2 {
            let said =
                format!("block {blk} of memfile made a system call on the page it is loading");
            assert!(err.contains(&said), "{said}: {err}");
        }
        assert!(
            err.contains("(in a system call: it fails with EFAULT)"),
            "{err}"
        );
    }
}

/// As above, with signals sent to the thread all along (a timer's, a
/// profiler's): a thread with a signal pending retries its kernel-mode
/// fault over and over without sleeping, so it is not seen asleep in the
/// fault; the deadlock is found all the same.
#[test]
fn a_loaders_system_call_on_its_own_page_fails_with_efault_under_signals() {
    let ended = run_child("syscall_on_own_page_signalled");
    assert!(ended.status.success(), "{}", ended.describe());
    for line in [
        "inner 0: EFAULT",
        "peek 0: ok",
        "outer 1: EFAULT",
        "peek 1: ok",
    ] {
        assert!(ended.stdout.contains(line), "{line}: {}", ended.stdout);
    }
}

/// Sends SIGUSR2 (its handler does nothing) to the thread that started it
/// whenever that thread is found asleep in a userfaultfd fault, until
/// dropped: its fault then has a signal pending.
struct Signaller {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Signaller {
    fn start() -> Signaller {
        extern "C" fn nothing(_: libc::c_int) {}
        // SAFETY: a handler that does nothing, for a signal this child
        // uses for nothing else; SA_RESTART, as an application's would be.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
        }
        // SAFETY: getpid and gettid have no preconditions.
        let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let wchan = format!("/proc/self/task/{tid}/wchan");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if std::fs::read_to_string(&wchan).is_ok_and(|w| w == "handle_userfault") {
                        // SAFETY: a thread of this process, alive until we stop.
                        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR2) };
                    }
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            })
        };
        Signaller {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Signaller {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Userfaultfd workers end after idling a while (a burst of system calls'
/// faults does not leave its workers behind for good); the next system
/// call's fault starts another.
#[test]
fn idle_userfaultfd_workers_retire() {
    let out = expect_ok("workers_retire");
    if ram(1).fault_backend() == bigfile::virtmem::FaultBackend::Userfaultfd {
        assert!(out.contains("workers: some"), "{out}");
        assert!(out.contains("retired"), "{out}");
        assert!(out.contains("served after: true"), "{out}");
    }
}

/// A user-mode fault whose request signal cannot be queued (the user's
/// queued signals at `RLIMIT_SIGPENDING`: EAGAIN) is still served, by a
/// worker, on the userfaultfd backend, instead of leaving the thread
/// blocked in its fault for good; on signals nothing is queued at all.
#[test]
fn a_fault_served_when_no_signal_can_be_queued() {
    let out = expect_ok("no_signal_queue");
    assert!(out.contains("read: ok"), "{out}");
}

/// A user-mode fault of a thread that blocks the request signal (as some
/// libraries' threads block every signal) is served by a worker once the
/// reader finds the request held, on the userfaultfd backend, instead of
/// hanging; on signals the request signal plays no part.
#[test]
fn a_fault_served_when_its_thread_blocks_the_request_signal() {
    let out = expect_ok("request_signal_blocked");
    assert!(out.contains("read: ok"), "{out}");
}

#[test]
fn nested_fault_from_loadblk_is_served() {
    assert!(expect_ok("nested").contains("nested OK"));
}

#[test]
fn transient_load_failure_is_retried() {
    assert!(expect_ok("transient").contains("transient OK"));
}

#[test]
fn scan_of_ten_times_the_budget_stays_within_it() {
    let out = expect_ok("budget_scan");
    assert!(out.contains("budget OK"), "{out}");
}

/// A read of 8 bytes at the boundary of blocks 2 and 3 with a budget of
/// one page (and one with all but one page of the budget dirty): each
/// fault used to reclaim the other block's page, forever. In a child, so
/// that such a livelock fails as a hang instead of hanging the tests.
#[test]
fn an_access_spanning_two_blocks_completes_under_a_one_page_budget() {
    let out = expect_ok("span");
    assert!(out.contains("span OK"), "{out}");
}

/// With `BIGFILE_FAULTS` unset a RAM is on signals, and says why: the
/// userfaultfd backend is opt-in for now.
#[test]
fn the_default_fault_backend_is_signals_and_says_userfaultfd_is_opt_in() {
    let mut cmd = child::test_child("crash::child", CHILD_ENV, "default_backend");
    cmd.env_remove("BIGFILE_FAULTS");
    let ended = child::run(cmd, child::TIMEOUT).unwrap();
    assert!(ended.status.success(), "{}", ended.describe());
    assert!(
        ended
            .stdout
            .contains("signals (the default (userfaultfd is opt-in"),
        "{}",
        ended.stdout
    );
}

/// A seccomp filter refusing userfaultfd (as container runtimes' default
/// profiles do): a RAM made with `BIGFILE_FAULTS=auto` falls back to signals
/// and says why; asked for explicitly, it is an error, not a crash; mapped
/// memory works.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_seccomp_filter_refusing_userfaultfd_falls_back_to_signals() {
    let mut cmd = child::test_child("crash::child", CHILD_ENV, "seccomp");
    cmd.env("BIGFILE_FAULTS", "auto");
    let ended = child::run(cmd, child::TIMEOUT).unwrap();
    assert!(ended.status.success(), "{}", ended.describe());
    let out = ended.stdout;
    assert!(out.contains("auto: signals"), "{out}");
    assert!(
        out.contains("Operation not permitted") && out.contains("seccomp"),
        "the reason: {out}"
    );
    assert!(out.contains("asked for: error"), "{out}");
    assert!(out.contains("read: ok"), "{out}");
}

/// A kernel without `UFFDIO_POISON` (before Linux 6.6; here the feature
/// the kernel granted is hidden) could not fail a system call whose page
/// does not load, only retry it, forever if the loader keeps failing: a RAM
/// made with `BIGFILE_FAULTS=auto` is on signals and says why; asked for
/// explicitly, userfaultfd is an error.
#[test]
fn a_userfaultfd_without_poison_is_not_used() {
    let mut cmd = child::test_child("crash::child", CHILD_ENV, "report_backends");
    cmd.env("BIGFILE_FAULTS", "auto")
        .env("BIGFILE_UFFD_HIDE_FEATURES", "poison");
    let ended = child::run(cmd, child::TIMEOUT).unwrap();
    assert!(ended.status.success(), "{}", ended.describe());
    let out = ended.stdout;
    assert!(out.contains("auto: signals"), "{out}");
    assert!(out.contains("asked for: error"), "{out}");
    assert!(out.contains("read: ok"), "{out}");
    // Where this process may have userfaultfd, the child was refused it
    // for the missing feature only.
    if userfaultfd_here() {
        assert_eq!(out.matches("UFFDIO_POISON").count(), 2, "{out}");
    }
}

/// Whether this process may have userfaultfd (or must: `BIGFILE_REQUIRE_UFFD`):
/// where it may not, a child refused it is refused first for what it lacks.
fn userfaultfd_here() -> bool {
    let spec = format!("memfd,pagesize={BLK}");
    let here = bigfile::virtmem::Ram::from_spec(&spec)
        .unwrap()
        .with_fault_backend(bigfile::virtmem::FaultBackend::Userfaultfd);
    here.is_ok() || std::env::var_os("BIGFILE_REQUIRE_UFFD").is_some()
}

/// A process that cannot read `/proc/self/task/TID/syscall` (here: its own
/// mount namespace with an empty tmpfs over /proc) is not given the
/// userfaultfd backend: without that file the reader would serve every
/// fault, user-mode ones included, as a system call's, away from the thread
/// holding the host lock. Needs root (mount); else the child says so.
#[test]
fn a_process_without_proc_is_not_given_userfaultfd() {
    let mut cmd = child::test_child("crash::child", CHILD_ENV, "without_proc");
    cmd.env("BIGFILE_FAULTS", "auto");
    let ended = child::run(cmd, child::TIMEOUT).unwrap();
    assert!(ended.status.success(), "{}", ended.describe());
    let out = ended.stdout;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(out.contains("not root"), "{out}");
        return;
    }
    assert!(out.contains("auto: signals"), "{out}");
    assert!(out.contains("asked for: error"), "{out}");
    assert!(out.contains("read: ok"), "{out}");
    // Where this process may have userfaultfd, the child was refused it
    // for /proc only (elsewhere, e.g. before Linux 6.6, for what it lacks).
    if userfaultfd_here() {
        assert_eq!(
            out.matches("/proc/self/task/TID/syscall cannot be read")
                .count(),
            2,
            "{out}"
        );
    }
}

/// One instruction needing three pages under a budget of one page cannot
/// complete: it fails with a diagnostic instead of spinning.
#[cfg(target_arch = "x86_64")]
#[test]
fn an_access_wider_than_the_budget_plus_one_is_sigbus_with_diagnostic() {
    expect_signal(
        "too_wide",
        libc::SIGBUS,
        &["one instruction touches more pages than the RAM budget"],
    );
}

/// A memory cgroup of its own for a child process, removed on drop: v1's
/// memory hierarchy under the test's own cgroup, else v2's.
struct TestCgroup {
    dir: std::path::PathBuf,
    procs: std::path::PathBuf,
}

impl TestCgroup {
    fn new(limit: u64) -> Result<TestCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let mut tried = Vec::new();
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(ctl), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (roots, limit_file): (&[&str], _) = if ctl.split(',').any(|c| c == "memory") {
                (&["/sys/fs/cgroup/memory"], "memory.limit_in_bytes")
            } else if ctl.is_empty() {
                (&["/sys/fs/cgroup", "/sys/fs/cgroup/unified"], "memory.max")
            } else {
                continue;
            };
            for root in roots {
                let dir = std::path::Path::new(root)
                    .join(path.trim_start_matches('/'))
                    .join(format!("bigfile-it-{}", std::process::id()));
                let made = std::fs::create_dir(&dir)
                    .and_then(|()| std::fs::write(dir.join(limit_file), limit.to_string()));
                match made {
                    Ok(()) => {
                        return Ok(TestCgroup {
                            procs: dir.join("cgroup.procs"),
                            dir,
                        })
                    }
                    Err(e) => {
                        let _ = std::fs::remove_dir(&dir);
                        tried.push(format!("{}: {e}", dir.display()));
                    }
                }
            }
        }
        Err(format!(
            "no memory cgroup could be made (run as root on a machine with cgroup v1's memory \
             controller or v2's enabled for the test's cgroup): {tried:?}"
        ))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The default budget follows the memory the process may use: a process in
/// a cgroup limited to 256 MiB scans a sparse file of 512 MiB through a
/// handle opened without a RAM; the RAM stays within a quarter of the limit
/// (with a budget of all the machine's memory, as before, the scan filled
/// the cgroup with memory the kernel cannot reclaim and its OOM killer
/// ended the process).
#[test]
fn the_default_budget_keeps_a_scan_within_the_cgroup_limit() {
    let cg = TestCgroup::new(256 << 20).unwrap();
    let mut cmd = child::test_child("crash::child", CHILD_ENV, "default_budget_scan");
    cmd.env("BIGFILE_IT_CGROUP_PROCS", &cg.procs);
    let ended = child::run(cmd, child::TIMEOUT).unwrap();
    assert!(ended.status.success(), "{}", ended.describe());
    assert!(
        ended.stdout.contains("default budget OK"),
        "{}",
        ended.stdout
    );
}

/// The child side: runs the scenario named by `BIGFILE_IT_CHILD`; without it,
/// it is the parent's test run and there is nothing to do.
#[test]
fn child() {
    let Some(scenario) = child::scenario(CHILD_ENV) else {
        return;
    };
    match scenario.as_str() {
        "load_fails" => {
            let file = mem_file(BLK);
            file.on_load(|_, _| Err("media error".into()));
            let ram = ram(8);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 4).unwrap();
            peek(vma.as_ptr().wrapping_add(3 * BLK));
        }
        "no_signal_queue" => {
            let file = mem_file(BLK);
            let ram = ram(8);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 4).unwrap();
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: setrlimit with a valid struct; this child is ours.
            let rc = unsafe { libc::setrlimit(libc::RLIMIT_SIGPENDING, &none) };
            assert_eq!(rc, 0);
            let ok = (0..4)
                .all(|b| peek(vma.as_ptr().wrapping_add(b * BLK)) == MemFile::initial(b as u64));
            println!("read: {}", if ok { "ok" } else { "wrong data" });
        }
        "request_signal_blocked" => {
            let file = mem_file(BLK);
            let ram = ram(8);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 4).unwrap();
            let signo = bigfile::fault::request_signal().unwrap();
            // SAFETY: a signal set we own, blocked for this thread only.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signo);
                assert_eq!(
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                    0
                );
            }
            let ok = (0..4)
                .all(|b| peek(vma.as_ptr().wrapping_add(b * BLK)) == MemFile::initial(b as u64));
            println!("read: {}", if ok { "ok" } else { "wrong data" });
        }
        "cross_ram_cycle" => {
            let (a, b) = (mem_file(BLK), mem_file(BLK));
            let (ram_a, ram_b) = (ram(8), ram(8));
            let (fh_a, fh_b) = (open(&a, &ram_a), open(&b, &ram_b));
            let (vma_a, vma_b) = (fh_a.mmap(0, 1).unwrap(), fh_b.mmap(0, 1).unwrap());
            let (pa, pb) = (vma_a.as_ptr() as usize, vma_b.as_ptr() as usize);
            // Both loads begin before either touches the other's page.
            let both = Arc::new(std::sync::Barrier::new(2));
            let b2 = both.clone();
            a.on_load(move |_, _| {
                both.wait();
                peek(pb as *const u8);
                Ok(())
            });
            b.on_load(move |_, _| {
                b2.wait();
                peek(pa as *const u8);
                Ok(())
            });
            let other = std::thread::spawn(move || peek(pb as *const u8));
            peek(pa as *const u8);
            other.join().unwrap();
            println!("no cycle found");
        }
        "past_map_count" => {
            let Some(limit) = map_count_limit() else {
                return;
            };
            // Half the limit in pages mapped apart is the limit in kernel
            // mappings; a few thousand more are past it.
            let pages = limit / 2 + 4096;
            const SMALL: usize = 4096;
            let file = mem_file(SMALL);
            let ram = bigfile::virtmem::Ram::from_spec(&format!("memfd,pagesize={SMALL}"))
                .unwrap()
                .with_budget((pages * SMALL) as u64);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 2 * pages as u64).unwrap();
            for i in 0..pages {
                let blk = 2 * i;
                assert_eq!(
                    peek(vma.as_ptr().wrapping_add(blk * SMALL)),
                    MemFile::initial(blk as u64)
                );
            }
            let resident = fh.stats().resident_pages;
            assert!(resident < limit as u64 / 2, "{resident} pages resident");
            println!("all read: {resident} resident of {pages}");
        }
        "straddle_at_map_limit" => {
            let Some(limit) = map_count_limit() else {
                return;
            };
            // As many slots as the process keeps mapped
            // (`state::mapped_slots_kept`), in RAM `a`.
            let kept = limit / 16 * 5;
            const SMALL: usize = 4096;
            let file_a = mem_file(SMALL);
            let ram_a = bigfile::virtmem::Ram::from_spec(&format!("memfd,pagesize={SMALL}"))
                .unwrap()
                .with_budget(((kept + 64) * SMALL) as u64);
            let fh_a = open(&file_a, &ram_a);
            let vma_a = fh_a.mmap(0, kept as u64).unwrap();
            for blk in 0..kept {
                peek(vma_a.as_ptr().wrapping_add(blk * SMALL));
            }
            let file_b = mem_file(SMALL);
            let ram_b = bigfile::virtmem::Ram::from_spec(&format!("memfd,pagesize={SMALL}"))
                .unwrap()
                .with_budget((8 * SMALL) as u64);
            let fh_b = open(&file_b, &ram_b);
            let vma_b = fh_b.mmap(0, 2).unwrap();
            // No read-ahead: the access faults on each page.
            vma_b.advise(bigfile::virtmem::Advice::Random);
            let at = vma_b.as_ptr() as usize + SMALL - 4;
            let reader = std::thread::spawn(move || {
                // SAFETY: 8 bytes inside the 2-page mapping, kept alive
                // until the thread is joined (or the process exits).
                unsafe { std::ptr::read_unaligned(at as *const u64) }
            });
            // Two loads serve the access; a few more are the pages going
            // back and forth.
            while !reader.is_finished() {
                let loads = fh_b.stats().loads;
                if loads > 64 {
                    println!("livelock: {loads} loads for one access");
                    std::process::exit(1);
                }
                std::thread::yield_now();
            }
            reader.join().unwrap();
            println!("read across: {} loads", fh_b.stats().loads);
            drop(vma_a);
        }
        "self_touch" => {
            let file = mem_file(BLK);
            let ram = ram(8);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 1).unwrap();
            let p = vma.as_ptr() as usize;
            file.on_load(move |_, _| {
                peek(p as *const u8);
                Ok(())
            });
            peek(vma.as_ptr());
        }
        "syscall_on_own_page" | "syscall_on_own_page_signalled" => {
            let _signals = (scenario == "syscall_on_own_page_signalled").then(Signaller::start);
            let file = Arc::new(MemFile::new(BLK).native());
            let ram = ram(8);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 2).unwrap();
            let p = vma.as_ptr() as usize;
            // SAFETY: opening a path we name, read-only.
            let zero = unsafe { libc::open(c"/dev/zero".as_ptr(), libc::O_RDONLY) };
            assert!(zero >= 0);
            // read(2) of /dev/zero into `at`: its outcome, as text.
            let read_into = move |at: usize| {
                // SAFETY: `at` is in the mapping, alive for the whole
                // scenario; the kernel writes 100 bytes there or fails.
                let n = unsafe { libc::read(zero, at as *mut libc::c_void, 100) };
                match n {
                    100 => "ok".to_owned(),
                    _ => match std::io::Error::last_os_error().raw_os_error() {
                        Some(libc::EFAULT) => "EFAULT".to_owned(),
                        _ => format!("{n}: {}", std::io::Error::last_os_error()),
                    },
                }
            };
            file.on_load(move |blk, _| {
                // The loader's own system call on the page it is loading.
                println!("inner {blk}: {}", read_into(p + blk as usize * BLK));
                Ok(())
            });
            // Loaded on this thread (a user-mode fault)...
            let ok = peek(vma.as_ptr()) == MemFile::initial(0);
            println!("peek 0: {}", if ok { "ok" } else { "wrong data" });
            // ...and on a worker (a system call's fault; it fails too: the
            // poison that fails the loader's call fails every call blocked
            // on that page).
            println!("outer 1: {}", read_into(p + BLK));
            let ok = peek(vma.as_ptr().wrapping_add(BLK)) == MemFile::initial(1);
            println!("peek 1: {}", if ok { "ok" } else { "wrong data" });
        }
        "workers_retire" => {
            let (_file, ram, _fh, vma) = setup(8, 2);
            let read_into = |blk: usize| {
                let mut f = std::fs::File::open("/dev/zero").unwrap();
                // SAFETY: nothing else accesses these bytes meanwhile.
                let dst = unsafe { &mut vma.as_mut_slice()[blk * BLK..][..100] };
                std::io::Read::read(&mut f, dst).is_ok()
            };
            if ram.fault_backend() != bigfile::virtmem::FaultBackend::Userfaultfd {
                return;
            }
            // A system call's fault starts a worker...
            assert!(read_into(0));
            println!(
                "workers: {}",
                if uffd_workers() > 0 { "some" } else { "none" }
            );
            // ...which ends once idle long enough (the parent's timeout
            // says if it never does).
            while uffd_workers() > 0 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            println!("retired");
            // The next one starts another.
            println!("served after: {}", read_into(1));
        }
        "store_writes_own" => {
            let file = mem_file(BLK);
            let ram = ram(8);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 2).unwrap();
            poke(vma.as_ptr(), 1);
            let p = vma.as_ptr() as usize;
            file.on_store(move |_, _| {
                poke(p as *mut u8, 2);
                Ok(())
            });
            let _ = fh.dirty_writeout(WriteoutFlags::STORE);
        }
        "dirty_over_budget" => {
            let file = mem_file(BLK);
            let ram = ram(4);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 8).unwrap();
            for pg in 0..8 {
                poke(vma.as_ptr().wrapping_add(pg * BLK), 1);
            }
        }
        "panic_in_load" => {
            let file = mem_file(BLK);
            file.on_load(|_, _| panic!("loader exploded"));
            let ram = ram(8);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 1).unwrap();
            peek(vma.as_ptr());
        }
        "panic_in_kernel_load" => {
            use std::io::Write;
            let file = mem_file(BLK);
            file.on_load(|_, _| panic!("loader exploded"));
            let ram = ram(8);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 1).unwrap();
            // SAFETY: the mapping's first 64 bytes, read by write(2) only.
            let src = unsafe { std::slice::from_raw_parts(vma.as_ptr(), 64) };
            // A file, not /dev/null, which never reads what it is given.
            let path =
                std::env::temp_dir().join(format!("bigfile-it-kload-{}", std::process::id()));
            let mut sink = std::fs::File::create(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            match sink.write(src) {
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => println!("EFAULT"),
                other => println!("write: {other:?}"),
            }
        }
        "nested" => {
            let inner = mem_file(BLK);
            let outer = mem_file(BLK);
            // The nested fault is served on the faulting thread (on
            // userfaultfd: its request reaches the thread while its
            // handler for the outer fault runs, `bigfile_fault::serve`).
            let me = std::thread::current().id();
            inner.on_load(move |_, _| {
                assert_eq!(
                    std::thread::current().id(),
                    me,
                    "inner load on another thread"
                );
                Ok(())
            });
            let ram = ram(8);
            let inner_fh = open(&inner, &ram);
            let inner_vma = Arc::new(inner_fh.mmap(0, 2).unwrap());
            let iv = inner_vma.clone();
            // The outer file's block n is the inner file's block n, read
            // through the inner mapping: a fault inside loadblk.
            outer.on_load(move |blk, _| {
                let got = peek(iv.as_ptr().wrapping_add(blk as usize * BLK));
                assert_eq!(got, MemFile::initial(blk));
                Ok(())
            });
            let outer_fh = open(&outer, &ram);
            let outer_vma = outer_fh.mmap(0, 2).unwrap();
            assert_eq!(
                peek(outer_vma.as_ptr().wrapping_add(BLK)),
                MemFile::initial(1)
            );
            assert_eq!(inner_fh.stats().loads, 1);
            println!("nested OK");
        }
        "transient" => {
            let file = mem_file(BLK);
            let failures = std::sync::atomic::AtomicU32::new(0);
            file.on_load(move |_, _| {
                if failures.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                    Err("busy".into())
                } else {
                    Ok(())
                }
            });
            let ram = ram(8);
            let fh = open(&file, &ram);
            let vma = fh.mmap(0, 1).unwrap();
            assert_eq!(peek(vma.as_ptr()), MemFile::initial(0));
            assert_eq!(fh.stats().load_errors, 2);
            assert_eq!(fh.stats().loads, 1);
            println!("transient OK");
        }
        "budget_scan" => budget_scan(),
        "span" => span(),
        #[cfg(target_arch = "x86_64")]
        "seccomp" => seccomp_denies_userfaultfd(),
        "report_backends" => report_backends(),
        "without_proc" => {
            if hide_proc() {
                report_backends();
            }
        }
        "default_backend" => {
            let ram = ram(1);
            println!(
                "{} ({})",
                ram.fault_backend(),
                ram.fault_backend_fallback().unwrap_or_default()
            );
        }
        "default_budget_scan" => default_budget_scan(),
        #[cfg(target_arch = "x86_64")]
        "too_wide" => {
            let (_file, _ram, _fh, vma) = setup(1, 4);
            let base = vma.as_ptr() as usize;
            // From across blocks 0 and 1 into block 2: three pages at once.
            move_u64_one_access(base + BLK - 4, base + 2 * BLK);
        }
        other => panic!("unknown scenario {other}"),
    }
    std::process::exit(0);
}

/// Shared memory this process has resident, each page counted once: a RAM
/// page is mapped twice (the mapping and the handle's load window), which
/// RssShmem would count twice and Pss_Shmem splits between the two.
fn pss_shmem_kib() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let line = rollup
        .lines()
        .find(|l| l.starts_with("Pss_Shmem:"))
        .expect("Pss_Shmem in /proc/self/smaps_rollup (Linux 5.7+)");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn budget_scan() {
    const BIG: usize = 2 << 20;
    const BUDGET_PAGES: u64 = 8;
    let file = mem_file(BIG);
    let ram = bigfile::virtmem::Ram::from_spec("memfd,pagesize=2M")
        .unwrap()
        .with_budget(BUDGET_PAGES * BIG as u64);
    let fh = bigfile::virtmem::FileH::open(file.clone(), Some(&ram)).unwrap();
    let pages = BUDGET_PAGES * 10;
    let vma = fh.mmap(0, pages).unwrap();
    let base = pss_shmem_kib();
    let (mut peak_acct, mut peak_pss) = (0, 0);
    let mut sum = 0u64;
    for pg in 0..pages as usize {
        for off in (0..BIG).step_by(4096) {
            sum += peek(vma.as_ptr().wrapping_add(pg * BIG + off)) as u64;
        }
        peak_acct = peak_acct.max(ram.stats().resident_bytes);
        peak_pss = peak_pss.max(pss_shmem_kib().saturating_sub(base) * 1024);
    }
    assert_eq!(
        sum,
        (0..pages)
            .map(|b| MemFile::initial(b) as u64 * (BIG / 4096) as u64)
            .sum::<u64>()
    );
    let limit = ram.budget() + BIG as u64;
    assert!(
        peak_acct <= limit,
        "RAM accounting peak {peak_acct} > {limit}"
    );
    assert!(peak_pss <= limit, "Pss_Shmem peak {peak_pss} > {limit}");
    assert!(fh.stats().reclaims >= pages - BUDGET_PAGES);
    println!(
        "budget OK: peak {peak_acct} bytes by accounting, {peak_pss} by Pss_Shmem, limit {limit}"
    );
}

/// Reads (and a write) spanning two blocks under budgets they fill.
fn span() {
    let want = u64::from_le_bytes([3, 3, 3, 3, 4, 4, 4, 4]);
    // A budget of one page: blocks 2 and 3 cannot both fit, but the one
    // instruction needs both.
    let (_file, ram, _fh, vma) = setup(1, 4);
    let at = vma.as_ptr() as usize + 3 * BLK - 4;
    assert_eq!(read_u64_one_access(at), want);
    assert!(ram.stats().resident_bytes <= ram.budget() + BLK as u64);
    // The next access brings the RAM back within its budget.
    assert_eq!(peek(vma.as_ptr()), MemFile::initial(0));
    assert!(ram.stats().resident_bytes <= ram.budget());
    // All but one page of the budget dirty.
    let (_file, _ram, fh2, vma) = setup(4, 8);
    for pg in 4..7 {
        poke(vma.as_ptr().wrapping_add(pg * BLK), 9);
    }
    let at = vma.as_ptr() as usize + 3 * BLK - 4;
    assert_eq!(read_u64_one_access(at), want);
    assert_eq!(fh2.dirty_blocks(), [4, 5, 6]);
    // A write across the boundary with a budget of one page.
    let (_file, _ram, fh, vma) = setup(1, 4);
    let q = vma.as_ptr().wrapping_add(2 * BLK - 2);
    // SAFETY: 8 bytes inside the live mapping; one unaligned store.
    unsafe { std::ptr::write_unaligned(q.cast::<u64>(), u64::MAX) };
    assert_eq!(fh.dirty_blocks(), [1, 2]);
    println!("span OK");
}

/// In a cgroup of 256 MiB (this process moves itself in first): a sparse
/// file twice that size, scanned through the default RAM.
fn default_budget_scan() {
    use bigfile::virtmem::{FileBigFile, FileH};
    let procs = std::env::var("BIGFILE_IT_CGROUP_PROCS").unwrap();
    std::fs::write(&procs, std::process::id().to_string()).unwrap();
    const LIMIT: u64 = 256 << 20;
    const SIZE: u64 = 2 * LIMIT;
    let path = std::env::temp_dir().join(format!("bigfile-it-sparse-{}", std::process::id()));
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let file = Arc::new(FileBigFile::open(&path, BLK).unwrap());
    let fh = FileH::open(file, None).unwrap();
    let ram = fh.ram().clone();
    let budget = ram.budget();
    assert!(
        (LIMIT / 64..=LIMIT / 4).contains(&budget),
        "default budget {budget} in a cgroup of {LIMIT}"
    );
    let blocks = SIZE / BLK as u64;
    let vma = fh.mmap(0, blocks).unwrap();
    let mut peak = 0;
    let mut sum = 0u64;
    for blk in 0..blocks as usize {
        for off in (0..BLK).step_by(4096) {
            sum += peek(vma.as_ptr().wrapping_add(blk * BLK + off)) as u64;
        }
        peak = peak.max(ram.stats().resident_bytes);
        assert!(
            peak <= LIMIT / 4 + BLK as u64,
            "resident {peak} over a quarter of the limit (+ 1 block); budget now {}",
            ram.budget()
        );
    }
    assert_eq!(sum, 0, "a sparse file reads zeros");
    drop(vma);
    drop(fh);
    let _ = std::fs::remove_file(&path);
    println!("default budget OK: budget {budget} bytes, peak {peak} bytes in a cgroup of {LIMIT}");
}

/// How many userfaultfd workers (`bigfile-uffd-N`) this process has.
fn uffd_workers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("bigfile-uffd-"))
        .count()
}

/// In a child: refuse userfaultfd(2) and `/dev/userfaultfd`'s ioctl with
/// EPERM by a seccomp filter, then make RAMs.
#[cfg(target_arch = "x86_64")]
fn seccomp_denies_userfaultfd() {
    // Classic BPF over `struct seccomp_data` (nr at 0, arch at 4, args at
    // 16): the opcodes and offsets of linux/filter.h and linux/seccomp.h.
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // USERFAULTFD_IOC_NEW: _IO(0xAA, 0x00).
    const IOC_NEW: u32 = 0xaa00;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k, jt, jf| libc::sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    };
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let filter = [
        stmt(LD_W_ABS, 4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, 0),
        jeq(libc::SYS_userfaultfd as u32, 4, 0),
        jeq(libc::SYS_ioctl as u32, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, 24), // args[1] (the request), low half
        jeq(IOC_NEW, 0, 1),
        stmt(RET_K, deny),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
    ];
    // The jump from the userfaultfd test lands on `deny`.
    assert_eq!(filter[4 + 1 + 4].k, deny);
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a filter program that outlives the call (the
    // kernel copies it); it applies to this process from now on.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
    }
    report_backends();
}

/// What a child says when `vm.max_map_count` is too high for its test.
const MAP_COUNT_HIGH: &str = "too many mappings to reach here";

/// `vm.max_map_count`, if low enough to reach with a few hundred MiB of
/// 4 KiB pages (the kernel's default, 65530; some distributions set a
/// million): else none, said on stdout.
fn map_count_limit() -> Option<usize> {
    let limit: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if limit > 1 << 18 {
        println!("vm.max_map_count is {limit}: {MAP_COUNT_HIGH}");
        return None;
    }
    Some(limit)
}

/// Put an empty tmpfs over /proc for this thread (and the threads it starts),
/// in a mount namespace of its own; false, saying why, where that is not
/// allowed.
fn hide_proc() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("not root: /proc cannot be hidden");
        return false;
    }
    // SAFETY: unshare and mount with valid C strings; the namespace is this
    // thread's (the child is a test process of its own).
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare");
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0,
            "mount --make-rprivate /"
        );
        assert_eq!(
            libc::mount(
                c"none".as_ptr(),
                c"/proc".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null()
            ),
            0,
            "mount tmpfs /proc"
        );
    }
    true
}

/// In a child: make a RAM as `BIGFILE_FAULTS` says and one asking for
/// userfaultfd, print which backends they got and why, and read through a
/// mapping of the first.
fn report_backends() {
    use bigfile::virtmem::{FaultBackend, Ram};
    let spec = format!("memfd,pagesize={BLK}");
    let auto = Ram::from_spec(&spec).unwrap();
    println!(
        "auto: {} ({})",
        auto.fault_backend(),
        auto.fault_backend_fallback().unwrap_or_default()
    );
    match Ram::from_spec(&spec)
        .unwrap()
        .with_fault_backend(FaultBackend::Userfaultfd)
    {
        Ok(_) => println!("asked for: userfaultfd"),
        Err(e) => println!("asked for: error ({e})"),
    }
    let fh = open(&mem_file(BLK), &auto);
    let vma = fh.mmap(0, 2).unwrap();
    let ok = peek(vma.as_ptr().wrapping_add(BLK)) == MemFile::initial(1);
    println!("read: {}", if ok { "ok" } else { "wrong data" });
}
