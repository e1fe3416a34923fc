//! Crash scenarios: each runs in a child process that must die, by the
//! right signal, in the right function, after the right diagnostic.
//!
//! The Rust children are this binary re-executed with `--child NAME`
//! ([`child`]); the Python ones run a script in the interpreter named by
//! `BIGFILE_FAULTS_PYTHON`. How each died is read from its wait status and
//! from its core file with gdb (see [`crate::coredump`]).
//!
//! Every function a scenario expects to die in is `#[inline(never)]` and
//! named for what it does, so that it is a frame of its own in the core.

use std::hint::black_box;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bigfile_testkit::MemFile;
use bigfile_virtmem::{FileH, Ram, Vma, WriteoutFlags};

use crate::coredump::{expect_crash, Expect};
use crate::python;
use crate::Scenario;

/// Block size of the children's files (a multiple of any OS page size).
const BLK: usize = 64 << 10;

/// Printed by the bystander's loadblk once armed: from then on, the
/// scenario's fault must not be served as a page fault.
const LOADBLK_RAN: &str = "LOADBLK RAN";

static ARMED: AtomicBool = AtomicBool::new(false);

pub fn scenarios() -> Vec<Scenario> {
    use libc::{SIGABRT, SIGBUS, SIGSEGV};
    let rust: Vec<(&'static str, Expect)> =
        vec![
        // Faults that are not ours die at the access, the kernel's way, and
        // our handler says nothing.
        (
            "read-unmapped",
            Expect::new(SIGSEGV, "read_unmapped").absent(&["bigfile:", LOADBLK_RAN]),
        ),
        (
            "write-unmapped",
            Expect::new(SIGSEGV, "write_unmapped").absent(&["bigfile:", LOADBLK_RAN]),
        ),
        (
            "write-readonly-unregistered",
            Expect::new(SIGSEGV, "write_readonly").absent(&["bigfile:", LOADBLK_RAN]),
        ),
        // A sent SIGSEGV or SIGBUS is not a page fault: it is delivered
        // while the sender is inside kill(2), nothing is served, the
        // process dies.
        (
            "kill-sigsegv",
            Expect::new(SIGSEGV, "send_sigsegv").below().absent(&[
                "bigfile:",
                LOADBLK_RAN,
                "SURVIVED",
            ]),
        ),
        (
            "kill-sigbus",
            Expect::new(SIGBUS, "send_sigbus")
                .below()
                .absent(&["bigfile:", LOADBLK_RAN, "SURVIVED"]),
        ),
        (
            "loadblk-touches-own-page",
            Expect::new(SIGSEGV, "touch_own_page").stderr(&[
                "bigfile: loadblk of block 2 of self-touching touched the page it is loading",
            ]),
        ),
        // Two loaders each touching the page the other loads: the second to
        // wait would wait forever; it is refused and dies like a loader
        // touching its own page.
        (
            "loaders-touch-each-others-page",
            Expect::new(SIGSEGV, "touch_other_page").stderr(&[
                "bigfile: waiting for block",
                "of crossed-loaders, which another thread is loading, would never end",
            ]),
        ),
        (
            "storeblk-writes-own-handle",
            Expect::new(SIGSEGV, "write_own_handle").stderr(&[
                "storeblk 0",
                "bigfile: a write to block 1 of own-writer during its writeout, \
                 from the thread running that writeout",
            ]),
        ),
        // A signal handler touching a mapping while its thread holds the
        // RAM's lock (here, inside `FileH::dirty_blocks`): serving the fault
        // would wait for that very thread. It dies by SIGSEGV with a
        // diagnostic instead of hanging.
        (
            "signal-handler-under-ram-lock",
            Expect::new(SIGSEGV, "touch_in_signal_handler").stderr(&[
                "on a thread that holds a lock of bigfile's: a signal handler touched a mapping",
            ]),
        ),
        (
            "loadblk-keeps-failing",
            Expect::new(SIGBUS, "read_block")
                .stderr(&[
                    "loadblk attempt 1",
                    "loadblk attempt 2",
                    "loadblk attempt 3",
                    "bigfile: loadblk of block 5 of failing-disk failed after 3 attempt(s): \
                     media error at block 5",
                ])
                .absent(&["loadblk attempt 4"]),
        ),
        // The panic is caught inside the signal handler, which aborts: the
        // faulting function's guard is never dropped and no catch_unwind
        // around it sees anything; gdb unwinds through the handler's switch
        // of stacks down to the faulting function.
        (
            "panic-in-loadblk",
            Expect::new(SIGABRT, "read_with_guard")
                .below()
                .stderr(&[
                    "loader exploded at block 1",
                    "bigfile: loadblk of block 1 of",
                    "panicked",
                    "bigfile: panic in fault handler",
                    "loader exploded at block 1",
                ])
                .absent(&["UNWOUND ACROSS", "CAUGHT OUTSIDE"]),
        ),
        (
            "stack-overflow-main",
            Expect::new(SIGABRT, "recurse").below().stderr(&[
                "thread 'main'",
                "has overflowed its stack",
                "fatal runtime error: stack overflow",
            ]),
        ),
        (
            "stack-overflow-thread",
            Expect::new(SIGABRT, "recurse").below().stderr(&[
                "thread 'deep'",
                "has overflowed its stack",
                "fatal runtime error: stack overflow",
            ]),
        ),
        (
            "budget-exhausted-by-dirty",
            Expect::new(SIGBUS, "write_pages").stderr(&[
                "bigfile: RAM budget of 262144 bytes is exhausted by 4 dirty or loading pages; \
                 cannot load block 4 of dirty-pile",
            ]),
        ),
    ];
    let mut out: Vec<Scenario> = rust
        .into_iter()
        .map(|(name, expect)| {
            Scenario::new(format!("crash/{name}"), move || {
                let mut cmd = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
                cmd.args(["--child", name]).env("RUST_BACKTRACE", "0");
                expect_crash(cmd, &expect)
            })
        })
        .collect();
    out.extend(python_scenarios());
    out
}

/// The body of child `name` (run by `--child NAME`); returns only if the
/// process failed to die.
pub fn child(name: &str) {
    match name {
        "read-unmapped" => {
            let _live = live_mapping();
            read_unmapped(unmapped_address());
        }
        "write-unmapped" => {
            let _live = live_mapping();
            write_unmapped(unmapped_address());
        }
        "write-readonly-unregistered" => {
            let _live = live_mapping();
            write_readonly(readonly_page());
        }
        "kill-sigsegv" => {
            let (_ram, _fh, vma) = live_mapping();
            send_sigsegv();
            // Had the signal been taken for a fault, we would get here.
            println!("SURVIVED kill(SIGSEGV), vma at {:p}", vma.as_ptr());
        }
        "kill-sigbus" => {
            let (_ram, _fh, vma) = live_mapping();
            send_sigbus();
            println!("SURVIVED kill(SIGBUS), vma at {:p}", vma.as_ptr());
        }
        "loadblk-touches-own-page" => {
            let file = zeros("self-touching");
            let (_ram, _fh, vma) = mapping(file.clone(), 8, 4);
            let base = vma.as_ptr() as usize;
            file.on_load(move |blk, buf| {
                touch_own_page(base + blk as usize * BLK, buf);
                Ok(())
            });
            read_block(&vma, 2);
        }
        "loaders-touch-each-others-page" => {
            // Loading block 0 reads block 1 and loading block 1 reads block
            // 0, once both loads have started.
            let file = zeros("crossed-loaders");
            let (_ram, _fh, vma) = mapping(file.clone(), 8, 2);
            let base = vma.as_ptr() as usize;
            let started = AtomicUsize::new(0);
            file.on_load(move |blk, buf| {
                started.fetch_add(1, Ordering::SeqCst);
                let t0 = std::time::Instant::now();
                while started.load(Ordering::SeqCst) < 2 && t0.elapsed().as_secs() < 10 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                touch_other_page(base + (1 - blk as usize) * BLK, buf);
                Ok(())
            });
            let other = std::thread::spawn(move || {
                // SAFETY: block 1 of the live mapping, which outlives the
                // process's death below.
                unsafe { std::ptr::read_volatile((base + BLK) as *const u8) }
            });
            read_block(&vma, 0);
            let _ = other.join();
        }
        "storeblk-writes-own-handle" => {
            let file = zeros("own-writer");
            let (_ram, fh, vma) = mapping(file.clone(), 8, 4);
            let base = vma.as_ptr() as usize;
            file.on_store(move |blk, _| {
                eprintln!("storeblk {blk}");
                write_own_handle(base + BLK);
                Ok(())
            });
            write_pages(&vma, 2);
            let res = fh.dirty_writeout(WriteoutFlags::STORE);
            println!("writeout returned {res:?}");
        }
        "loadblk-keeps-failing" => {
            // A disk whose every read fails.
            let file = zeros("failing-disk");
            let attempts = AtomicUsize::new(0);
            file.on_load(move |blk, _| {
                let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
                eprintln!("loadblk attempt {n}");
                Err(format!("media error at block {blk}").into())
            });
            let (_ram, _fh, vma) = mapping(file, 8, 8);
            read_block(&vma, 5);
        }
        "panic-in-loadblk" => {
            let file = zeros("exploding");
            file.on_load(|blk, _| panic!("loader exploded at block {blk}"));
            let (_ram, _fh, vma) = mapping(file, 8, 4);
            let caught =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_with_guard(&vma, 1)));
            println!("CAUGHT OUTSIDE: {}", caught.is_err());
        }
        "stack-overflow-main" => {
            let _live = live_mapping();
            recurse(0);
        }
        "stack-overflow-thread" => {
            let _live = live_mapping();
            let t = std::thread::Builder::new()
                .name("deep".into())
                .spawn(|| recurse(0))
                .expect("spawn");
            let _ = t.join();
        }
        "signal-handler-under-ram-lock" => {
            let (_ram, fh, vma) = mapping(zeros("signalled"), 8, 4);
            SIGNAL_TARGET.store(vma.as_ptr() as usize + 3 * BLK, Ordering::SeqCst);
            // SAFETY: an all-zero sigaction is valid; the handler only
            // reads memory of a live mapping.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as usize;
                libc::sigaction(libc::SIGUSR1, &act, std::ptr::null_mut());
            }
            // The signal arrives while the RAM's lock is held.
            let _scenario = fail::FailScenario::setup();
            let once = std::sync::Once::new();
            fail::cfg_callback("virtmem::locked", move || {
                // SAFETY: raise has no memory arguments.
                once.call_once(|| unsafe {
                    libc::raise(libc::SIGUSR1);
                });
            })
            .expect("failpoint");
            black_box(fh.dirty_blocks());
        }
        "budget-exhausted-by-dirty" => {
            let (_ram, _fh, vma) = mapping(zeros("dirty-pile"), 4, 8);
            write_pages(&vma, 8);
        }
        other => eprintln!("faults: no child scenario {other:?}"),
    }
}

/// A RAM of `budget` pages, a handle of `file` on it and a mapping of its
/// first `pages` blocks: our signal handler is installed from here on.
fn mapping(file: Arc<MemFile>, budget: u64, pages: u64) -> (Ram, FileH, Vma) {
    let ram = Ram::from_spec(&format!("memfd,pagesize={BLK}"))
        .expect("memfd RAM")
        .with_budget(budget * BLK as u64);
    let fh = FileH::open(file, Some(&ram)).expect("open handle");
    let vma = fh.mmap(0, pages).expect("mmap");
    (ram, fh, vma)
}

/// A mapping with one page loaded, alive while a scenario provokes a fault
/// elsewhere: the handler is installed and has a range to look up.
fn live_mapping() -> (Ram, FileH, Vma) {
    let m = mapping(zeros("bystander"), 8, 4);
    read_block(&m.2, 0);
    ARMED.store(true, Ordering::SeqCst);
    m
}

/// An address where nothing is mapped: a page mapped and unmapped again.
fn unmapped_address() -> usize {
    let p = readonly_page();
    // SAFETY: the page was mapped just now by us and nothing refers to it.
    let rc = unsafe { libc::munmap(p as *mut libc::c_void, page_size()) };
    assert_eq!(rc, 0, "munmap");
    p
}

/// A fresh read-only anonymous page, registered with nobody.
fn readonly_page() -> usize {
    // SAFETY: a new anonymous mapping at an address the kernel chooses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page_size(),
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p as usize
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory arguments.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// The page `on_sigusr1` reads.
static SIGNAL_TARGET: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigusr1(_: libc::c_int) {
    touch_in_signal_handler(SIGNAL_TARGET.load(Ordering::SeqCst));
}

#[inline(never)]
fn touch_in_signal_handler(addr: usize) {
    // SAFETY: a byte of a live mapping; its fault is ours to serve (or, on
    // a thread holding the RAM's lock, to refuse). (The `+ 1` keeps the
    // linker from folding this into `read_unmapped`.)
    black_box(unsafe { std::ptr::read_volatile(addr as *const u8) }.wrapping_add(1));
}

#[inline(never)]
fn read_unmapped(addr: usize) {
    // SAFETY: none: this read must kill the process (nothing is mapped).
    black_box(unsafe { std::ptr::read_volatile(addr as *const u8) });
}

#[inline(never)]
fn write_unmapped(addr: usize) {
    // SAFETY: none: this write must kill the process (nothing is mapped).
    // (A value of its own, or the linker folds this into write_readonly.)
    unsafe { std::ptr::write_volatile(addr as *mut u8, 0x5a) };
}

#[inline(never)]
fn write_readonly(addr: usize) {
    // SAFETY: none: this write must kill the process (the page is read-only
    // and no range of ours covers it).
    unsafe { std::ptr::write_volatile(addr as *mut u8, 1) };
}

#[inline(never)]
fn send_sigsegv() {
    // SAFETY: kill has no memory arguments; the signal is meant to kill us.
    let rc = unsafe { libc::kill(libc::getpid(), libc::SIGSEGV) };
    // Using the result keeps kill from being a tail call that would take
    // this frame off the stack.
    black_box(rc);
}

#[inline(never)]
fn send_sigbus() {
    // SAFETY: kill has no memory arguments; the signal is meant to kill us.
    let rc = unsafe { libc::kill(libc::getpid(), libc::SIGBUS) };
    black_box(rc);
}

/// Reads the first byte of block `blk` of `vma` (a fault, a load).
#[inline(never)]
fn read_block(vma: &Vma, blk: usize) -> u8 {
    assert!((blk + 1) * BLK <= vma.len());
    // SAFETY: the address lies inside the live mapping; the fault handler
    // serves it (or kills the process, which is what the scenario checks).
    black_box(unsafe { std::ptr::read_volatile(vma.as_ptr().add(blk * BLK)) })
}

/// Writes the first byte of each of the first `n` blocks of `vma`.
#[inline(never)]
fn write_pages(vma: &Vma, n: usize) {
    assert!(n * BLK <= vma.len());
    for blk in 0..n {
        // SAFETY: inside the live mapping, served by the fault handler.
        unsafe { std::ptr::write_volatile(vma.as_ptr().add(blk * BLK), 0xa5) };
    }
}

/// Says so if it is ever dropped: it lives in the frame of a faulting
/// access, which no panic may unwind.
struct UnwindWitness;

impl Drop for UnwindWitness {
    fn drop(&mut self) {
        eprintln!("UNWOUND ACROSS the signal frame");
    }
}

#[inline(never)]
fn read_with_guard(vma: &Vma, blk: usize) -> u8 {
    let witness = UnwindWitness;
    let v = read_block(vma, blk);
    black_box(&witness);
    std::mem::forget(witness);
    v
}

/// Recursion with a frame the optimiser cannot drop: overflows any stack.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 4096];
    black_box(&mut frame);
    frame[0] = depth as u8;
    if depth == u64::MAX {
        return 0;
    }
    recurse(black_box(depth + 1)) + black_box(&frame)[0] as u64
}

/// A file of zero blocks named `name`, whose loads are said on stderr once
/// the scenario is ARMED.
fn zeros(name: &str) -> Arc<MemFile> {
    let file = MemFile::new(BLK)
        .named(name)
        .with_initial(|_, buf| buf.fill(0));
    let name = name.to_owned();
    file.on_load(move |blk, _| {
        if ARMED.load(Ordering::SeqCst) {
            eprintln!("{LOADBLK_RAN} for block {blk} of {name}");
        }
        Ok(())
    });
    Arc::new(file)
}

/// A loader touching the other loader's page.
#[inline(never)]
fn touch_other_page(other: usize, buf: &mut [u8]) {
    // SAFETY: `other` is inside the child's live mapping; waiting there for
    // a loader that waits for us is the misuse under test, which must kill us.
    buf[1] = unsafe { std::ptr::read_volatile(other as *const u8) };
}

/// A loader touching its own page (a frame with a name of its own in the core).
#[inline(never)]
fn touch_own_page(own: usize, buf: &mut [u8]) {
    // SAFETY: `own` is inside the child's live mapping; touching it from its
    // own loader is the misuse under test, which must kill us.
    buf[0] = unsafe { std::ptr::read_volatile(own as *const u8) };
}

/// A storeblk writing the handle under writeout.
#[inline(never)]
fn write_own_handle(addr: usize) {
    // SAFETY: inside the child's live mapping; writing the handle under
    // writeout from its storeblk is the misuse under test.
    unsafe { std::ptr::write_volatile(addr as *mut u8, 7) };
}

/// A BigFile in Python whose loadblk raises: each attempt's traceback is
/// printed, then the reader dies by SIGBUS in CPython's memoryview item
/// access, the instruction that touched the page.
const PY_LOADBLK_RAISES: &str = r#"
import mmap
from bigfile import BigFile
PS = mmap.PAGESIZE
class Broken(BigFile):
    def loadblk(self, blk, buf):
        raise ValueError("cannot load block %d" % blk)
fh = Broken(PS).fileh_open()
m = memoryview(fh.mmap(0, 8))
print("touching", flush=True)
m[3 * PS]
print("SURVIVED", flush=True)
"#;

/// A Python loadblk reading its own page through the mapping.
const PY_LOADBLK_TOUCHES_OWN_PAGE: &str = r#"
import mmap
from bigfile import BigFile
PS = mmap.PAGESIZE
class Selfish(BigFile):
    def loadblk(self, blk, buf):
        buf[0] = m[blk * PS]
m = memoryview(Selfish(PS).fileh_open().mmap(0, 4))
m[2 * PS]
print("SURVIVED", flush=True)
"#;

fn python_scenarios() -> Vec<Scenario> {
    let cases: Vec<(&'static str, &'static str, Expect)> = vec![
        (
            "python-loadblk-raises",
            PY_LOADBLK_RAISES,
            Expect::new(libc::SIGBUS, "memory_item")
                .stderr(&[
                    "Traceback (most recent call last)",
                    "in loadblk",
                    "ValueError: cannot load block 3",
                    "bigfile: loadblk of block 3 of Broken failed after 3 attempt(s): \
                     ValueError: cannot load block 3",
                ])
                .absent(&["SURVIVED"]),
        ),
        (
            "python-loadblk-touches-own-page",
            PY_LOADBLK_TOUCHES_OWN_PAGE,
            Expect::new(libc::SIGSEGV, "memory_item")
                .stderr(&["bigfile: loadblk of block 2 of Selfish touched the page it is loading"])
                .absent(&["SURVIVED"]),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, script, expect)| {
            Scenario::new(format!("crash/{name}"), move || {
                expect_crash(python::command(script)?, &expect)
            })
        })
        .collect()
}
