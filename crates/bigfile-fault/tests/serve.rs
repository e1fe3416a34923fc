//! Faults served in-process: decoding, threads, nesting, registration rules.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use bigfile_fault::{
    current_depth, register, Access, BlockFaultsGuard, Fault, FaultError, FaultHandler,
    FaultSignal, Outcome, Registration,
};
use bigfile_os::os_page_size as page_size;
use bigfile_testkit::handler::{handler, unprotect};
use bigfile_testkit::memory::{page_of, protect, read_byte, write_byte, Mapping};

/// Serves a read by making the page readable and a write by making it
/// writable, and records every fault.
#[derive(Default)]
struct Recorder {
    faults: Mutex<Vec<Fault>>,
}

impl FaultHandler for Recorder {
    fn handle(&self, fault: &Fault) -> Outcome {
        self.faults.lock().unwrap().push(*fault);
        unprotect(fault)
    }
}

impl Recorder {
    fn take(&self) -> Vec<Fault> {
        std::mem::take(&mut *self.faults.lock().unwrap())
    }
}

#[test]
fn read_and_write_faults_are_decoded_and_served() {
    let map = Mapping::new(3, libc::PROT_NONE);
    let rec = Arc::new(Recorder::default());
    let _reg = register(map.start, map.len, rec.clone()).unwrap();

    // Read of a PROT_NONE page.
    assert_eq!(read_byte(map.page(0) + 10), 0);
    let faults = rec.take();
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].addr, map.page(0) + 10);
    assert_eq!(faults[0].access, Access::Read);
    assert_eq!(faults[0].signal, FaultSignal::Segv);
    assert_eq!(faults[0].depth, 1);

    // Write of a PROT_NONE page.
    write_byte(map.page(1) + 20, 7);
    let faults = rec.take();
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].addr, map.page(1) + 20);
    assert_eq!(faults[0].access, Access::Write);
    assert_eq!(read_byte(map.page(1) + 20), 7);

    // Write of a PROT_READ page.
    protect(map.page(2), page_size(), libc::PROT_READ);
    write_byte(map.page(2) + 30, 9);
    let faults = rec.take();
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].access, Access::Write);
    assert_eq!(read_byte(map.page(2) + 30), 9);
    assert!(rec.take().is_empty(), "no faults once served");
}

#[test]
fn handler_runs_on_the_faulting_threads_stack() {
    // The alternate signal stack Rust gives each thread is a few KiB; a
    // handler using far more must have been moved to the thread's own stack.
    let big_stack = handler(|fault| {
        let buf = std::hint::black_box([fault.addr as u8; 256 * 1024]);
        assert_eq!(std::hint::black_box(&buf)[1000], fault.addr as u8);
        unprotect(fault)
    });
    let map = Mapping::new(1, libc::PROT_NONE);
    let _reg = register(map.start, map.len, big_stack).unwrap();
    let addr = map.start;
    thread::Builder::new()
        .stack_size(4 << 20)
        .spawn(move || assert_eq!(read_byte(addr), 0))
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn errno_is_preserved_across_a_served_fault() {
    let clobber = handler(|fault| {
        // SAFETY: closing an invalid descriptor only sets errno (EBADF).
        unsafe { libc::close(-1) };
        unprotect(fault)
    });
    let map = Mapping::new(1, libc::PROT_NONE);
    let _reg = register(map.start, map.len, clobber).unwrap();
    // SAFETY: this thread's errno slot.
    unsafe { *libc::__errno_location() = libc::ENOSPC };
    read_byte(map.start);
    // SAFETY: as above.
    assert_eq!(unsafe { *libc::__errno_location() }, libc::ENOSPC);
}

#[test]
fn eight_threads_fault_into_different_and_the_same_ranges() {
    const THREADS: usize = 8;
    const PAGES: usize = 32;
    let shared = Mapping::new(PAGES, libc::PROT_NONE);
    let own: Vec<Mapping> = (0..THREADS)
        .map(|_| Mapping::new(PAGES, libc::PROT_NONE))
        .collect();
    let rec = Arc::new(Recorder::default());
    let mut regs = vec![register(shared.start, shared.len, rec.clone()).unwrap()];
    for m in &own {
        regs.push(register(m.start, m.len, rec.clone()).unwrap());
    }
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let barrier = barrier.clone();
            let (shared_start, own_start) = (shared.start, own[t].start);
            thread::spawn(move || {
                barrier.wait();
                for i in 0..PAGES {
                    // Different orders (odd strides permute 0..PAGES), so threads meet on the same pages.
                    let p = (i * (2 * t + 1)) % PAGES;
                    write_byte(own_start + p * page_size() + 1, t as u8);
                    assert_eq!(read_byte(shared_start + p * page_size()), 0);
                }
                for p in 0..PAGES {
                    assert_eq!(read_byte(own_start + p * page_size() + 1), t as u8);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let faults = rec.take();
    // Every own page faulted exactly once (one writer); every shared page at
    // least once and at most once per thread.
    assert_eq!(
        faults.iter().filter(|f| f.access == Access::Write).count(),
        THREADS * PAGES
    );
    let shared_faults = faults
        .iter()
        .filter(|f| (shared.start..shared.start + shared.len).contains(&f.addr))
        .count();
    assert!((PAGES..=PAGES * THREADS).contains(&shared_faults));
    drop(regs);
}

#[test]
fn nested_fault_is_dispatched_with_its_depth() {
    struct Outer {
        inner_addr: usize,
        depth_seen: AtomicUsize,
    }
    impl FaultHandler for Outer {
        fn handle(&self, fault: &Fault) -> Outcome {
            self.depth_seen
                .store(current_depth() as usize, Ordering::SeqCst);
            // Touch another registered range from inside the handler.
            assert_eq!(read_byte(self.inner_addr), 0);
            protect(page_of(fault.addr), page_size(), libc::PROT_READ);
            Outcome::Handled
        }
    }
    let outer_map = Mapping::new(1, libc::PROT_NONE);
    let inner_map = Mapping::new(1, libc::PROT_NONE);
    let outer = Arc::new(Outer {
        inner_addr: inner_map.start,
        depth_seen: AtomicUsize::new(0),
    });
    let inner = Arc::new(Recorder::default());
    let _r1 = register(outer_map.start, outer_map.len, outer.clone()).unwrap();
    let _r2 = register(inner_map.start, inner_map.len, inner.clone()).unwrap();
    assert_eq!(current_depth(), 0);
    read_byte(outer_map.start);
    assert_eq!(current_depth(), 0);
    assert_eq!(outer.depth_seen.load(Ordering::SeqCst), 1);
    let faults = inner.take();
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].depth, 2);
}

#[test]
fn a_sigbus_inside_a_range_reaches_its_handler() {
    // A shared file mapping past the end of its (empty) file raises SIGBUS;
    // the handler grows the file.
    struct Grow {
        fd: libc::c_int,
        seen: Mutex<Option<Fault>>,
    }
    impl FaultHandler for Grow {
        fn handle(&self, fault: &Fault) -> Outcome {
            *self.seen.lock().unwrap() = Some(*fault);
            // SAFETY: our own memfd.
            assert_eq!(unsafe { libc::ftruncate(self.fd, page_size() as i64) }, 0);
            Outcome::Handled
        }
    }
    // SAFETY: a NUL-terminated name; no other arguments are pointers.
    let fd = unsafe { libc::memfd_create(c"bigfile-fault-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh shared mapping of our memfd.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page_size(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let grow = Arc::new(Grow {
        fd,
        seen: Mutex::new(None),
    });
    let reg = register(p as usize, page_size(), grow.clone()).unwrap();
    write_byte(p as usize + 5, 3);
    assert_eq!(read_byte(p as usize + 5), 3);
    let fault = grow.seen.lock().unwrap().expect("handler called");
    assert_eq!(fault.signal, FaultSignal::Bus);
    assert_eq!(fault.addr, p as usize + 5);
    drop(reg);
    // SAFETY: our mapping and descriptor, no longer used.
    unsafe {
        libc::munmap(p, page_size());
        libc::close(fd);
    }
}

/// Blocks inside its first fault until released.
struct Blocking {
    entered: Barrier,
    release: Barrier,
    dropped: Arc<AtomicBool>,
}

impl FaultHandler for Blocking {
    fn handle(&self, fault: &Fault) -> Outcome {
        self.entered.wait();
        self.release.wait();
        assert!(!self.dropped.load(Ordering::SeqCst));
        protect(page_of(fault.addr), page_size(), libc::PROT_READ);
        Outcome::Handled
    }
}

impl Drop for Blocking {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[test]
fn dropping_a_registration_waits_for_handlers_on_other_threads() {
    let map = Mapping::new(1, libc::PROT_NONE);
    let dropped = Arc::new(AtomicBool::new(false));
    let handler = Arc::new(Blocking {
        entered: Barrier::new(2),
        release: Barrier::new(2),
        dropped: dropped.clone(),
    });
    let reg = register(map.start, map.len, handler.clone()).unwrap();
    let addr = map.start;
    let faulter = thread::spawn(move || read_byte(addr));
    handler.entered.wait();
    let unregistered = Arc::new(AtomicBool::new(false));
    let dropper = {
        let unregistered = unregistered.clone();
        thread::spawn(move || {
            drop(reg);
            unregistered.store(true, Ordering::SeqCst);
        })
    };
    thread::sleep(Duration::from_millis(100));
    assert!(
        !unregistered.load(Ordering::SeqCst),
        "drop returned while a handler was running"
    );
    // Only our clone and the running handler's keep it alive now.
    let release = &handler.release;
    release.wait();
    dropper.join().unwrap();
    faulter.join().unwrap();
    assert!(unregistered.load(Ordering::SeqCst));
    assert!(!dropped.load(Ordering::SeqCst));
    drop(handler);
    assert!(dropped.load(Ordering::SeqCst));
}

#[test]
fn a_handler_may_drop_its_own_and_other_registrations() {
    struct SelfDropping {
        own: Mutex<Option<Registration>>,
        other: Mutex<Option<Registration>>,
    }
    impl FaultHandler for SelfDropping {
        fn handle(&self, fault: &Fault) -> Outcome {
            drop(self.other.lock().unwrap().take());
            drop(self.own.lock().unwrap().take());
            protect(page_of(fault.addr), page_size(), libc::PROT_READ);
            Outcome::Handled
        }
    }
    let map = Mapping::new(1, libc::PROT_NONE);
    let other_map = Mapping::new(1, libc::PROT_NONE);
    let handler = Arc::new(SelfDropping {
        own: Mutex::new(None),
        other: Mutex::new(None),
    });
    *handler.own.lock().unwrap() = Some(register(map.start, map.len, handler.clone()).unwrap());
    *handler.other.lock().unwrap() = Some(
        register(
            other_map.start,
            other_map.len,
            Arc::new(Recorder::default()),
        )
        .unwrap(),
    );
    read_byte(map.start);
    assert!(handler.own.lock().unwrap().is_none());
    // Both ranges are free again.
    let again = register(map.start, map.len, Arc::new(Recorder::default())).unwrap();
    let again_other = register(
        other_map.start,
        other_map.len,
        Arc::new(Recorder::default()),
    );
    assert!(again_other.is_ok());
    assert_eq!(again.range(), map.start..map.start + map.len);
}

#[test]
fn registration_errors() {
    let map = Mapping::new(4, libc::PROT_NONE);
    let h = || -> Arc<dyn FaultHandler> { Arc::new(Recorder::default()) };
    let ps = page_size();
    assert!(matches!(
        register(map.start, 0, h()),
        Err(FaultError::EmptyRange { .. })
    ));
    assert!(matches!(
        register(usize::MAX - ps + 1, 2 * ps, h()),
        Err(FaultError::Overflow { .. })
    ));
    let mid = register(map.page(1), 2 * ps, h()).unwrap();
    for (start, len) in [
        (map.page(0), 2 * ps),
        (map.page(2), 2 * ps),
        (map.page(1) + 1, 1),
        (map.page(0), 4 * ps),
    ] {
        let err = register(start, len, h()).unwrap_err();
        match err {
            FaultError::Overlap { existing, .. } => assert_eq!(existing, mid.range()),
            other => panic!("expected overlap, got {other:?}"),
        }
    }
    // Adjacent ranges are fine.
    let left = register(map.page(0), ps, h()).unwrap();
    let right = register(map.page(3), ps, h()).unwrap();
    assert!(format!("{left:?}").contains("Registration"));
    drop((left, right, mid));
}

#[test]
fn thousands_of_ranges_each_get_their_own_faults() {
    struct Tagged {
        tag: usize,
        hits: Arc<Vec<AtomicUsize>>,
    }
    impl FaultHandler for Tagged {
        fn handle(&self, fault: &Fault) -> Outcome {
            self.hits[self.tag].fetch_add(1, Ordering::SeqCst);
            protect(page_of(fault.addr), page_size(), libc::PROT_READ);
            Outcome::Handled
        }
    }
    const N: usize = 2000;
    let map = Mapping::new(N, libc::PROT_NONE);
    let hits: Arc<Vec<AtomicUsize>> = Arc::new((0..N).map(|_| AtomicUsize::new(0)).collect());
    // Register in a scattered order; each page its own range.
    let regs: Vec<_> = (0..N)
        .map(|i| (i * 7919) % N)
        .map(|tag| {
            let h = Arc::new(Tagged {
                tag,
                hits: hits.clone(),
            });
            register(map.page(tag), page_size(), h).unwrap()
        })
        .collect();
    for i in (0..N).step_by(3) {
        read_byte(map.page(i) + 1);
    }
    for (i, h) in hits.iter().enumerate() {
        assert_eq!(
            h.load(Ordering::SeqCst),
            usize::from(i % 3 == 0),
            "range {i}"
        );
    }
    drop(regs);
}

#[test]
fn block_faults_guard_blocks_and_restores() {
    fn blocked() -> bool {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
        // SAFETY: querying this thread's mask into valid memory.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), set.as_mut_ptr());
            libc::sigismember(set.as_ptr(), libc::SIGSEGV) == 1
                && libc::sigismember(set.as_ptr(), libc::SIGBUS) == 1
        }
    }
    assert!(!blocked());
    {
        let _outer = BlockFaultsGuard::new();
        assert!(blocked());
        {
            let _inner = BlockFaultsGuard::new();
            assert!(blocked());
        }
        assert!(blocked(), "an inner guard leaves the outer one's block");
    }
    assert!(!blocked());
}

#[test]
fn install_is_idempotent_and_on_top() {
    bigfile_fault::install().unwrap();
    bigfile_fault::install().unwrap();
    assert!(bigfile_fault::is_on_top());
    assert!(!bigfile_fault::ensure_on_top().unwrap());
}
