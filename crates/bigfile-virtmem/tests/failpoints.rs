//! Failure paths reachable only by injection (`--features failpoints`); the
//! fault-injection suite (tests/faults) runs them all in a whole workload.
#![cfg(feature = "failpoints")]

use std::sync::Arc;
use std::time::Duration;

use bigfile_testkit::loads::settle;
use bigfile_testkit::memory::{access_at, prot_at, PageAccess};
use bigfile_testkit::MemFile;
use bigfile_virtmem::{Error, FaultBackend, FileH, PageState, Ram, Vma, WriteoutFlags};

const BLK: usize = 4096;

/// Permissions of the mapping holding `addr`.
fn perms_at(addr: usize) -> String {
    prot_at(addr).unwrap_or_else(|| panic!("{addr:#x} is not mapped"))
}

/// The byte at `offset` of `vma`, read through the mapping (faulting its
/// page in). Through `black_box`: a read whose result went unused could be
/// optimized away in a release build (as these tests run), and with it the
/// fault the test is about.
fn read(vma: &Vma, offset: usize) -> u8 {
    let mut b = [0u8];
    vma.read_at(offset, &mut b).unwrap();
    std::hint::black_box(b[0])
}

/// A handle of `file` on a RAM of its own (on the default fault backend),
/// and a mapping of its first two blocks.
fn open(file: Arc<MemFile>) -> (Ram, FileH, Vma) {
    open_on(file, None)
}

/// [`open`] on `backend` if given.
fn open_on(file: Arc<MemFile>, backend: Option<FaultBackend>) -> (Ram, FileH, Vma) {
    let mut ram = Ram::from_spec(&format!("memfd,pagesize={BLK}")).unwrap();
    if let Some(b) = backend {
        ram = ram.with_fault_backend(b).unwrap();
    }
    let fh = FileH::open(file, Some(&ram)).unwrap();
    let vma = fh.mmap(0, 2).unwrap();
    (ram, fh, vma)
}

/// When a dropped page cannot be replaced by the reservation (mmap fails,
/// as with ENOMEM at the mapping-count limit), it must not stay readable:
/// its RAM page is freed, so it would read zeros, or another block's data
/// once the RAM page is reused. It is made inaccessible and reloads. (The
/// signal backend's: on the userfaultfd backend no reservation replaces a
/// dropped page, whose page-table entry is zapped instead.)
#[test]
fn a_page_that_cannot_be_unmapped_is_made_inaccessible() {
    let _scenario = fail::FailScenario::setup();
    let (ram, fh, vma) = open_on(Arc::new(MemFile::new(BLK)), Some(FaultBackend::Signals));
    read(&vma, 0);
    assert_eq!(perms_at(vma.as_ptr() as usize), "r--s");

    fail::cfg("virtmem::mmap", &format!("1*return({})", libc::ENOMEM)).unwrap();
    fh.invalidate_page(0).unwrap();
    fail::remove("virtmem::mmap");

    assert!(perms_at(vma.as_ptr() as usize).starts_with("---"));
    assert_eq!(ram.stats().stats.resident_pages, 0);
    assert_eq!(
        read(&vma, 0),
        1,
        "block 0 reloaded, not a dropped page's zeros"
    );
    assert_eq!(fh.stats().loads, 2);
}

/// Writeout makes dirty pages read-only before storing them and before
/// marking them clean. If it cannot (mprotect, or on the userfaultfd
/// backend UFFDIO_WRITEPROTECT, fails), it must neither store (a write
/// during storeblk would go unseen) nor mark clean (a clean page left
/// writable takes writes without becoming dirty): it fails and the pages
/// stay dirty, and a retry does the job.
#[test]
fn writeout_that_cannot_protect_a_page_fails_and_keeps_it_dirty() {
    let _scenario = fail::FailScenario::setup();
    let file = Arc::new(MemFile::new(BLK));
    let (ram, fh, vma) = open(file.clone());
    let (point, call) = match ram.fault_backend() {
        FaultBackend::Signals => ("virtmem::mprotect", "mprotect"),
        FaultBackend::Userfaultfd => ("virtmem::uffd_writeprotect", "UFFDIO_WRITEPROTECT"),
    };
    let access = || access_at(vma.as_ptr() as usize);
    vma.write_at(0, b"x").unwrap();
    assert_eq!(access(), PageAccess::Write);
    for flags in [WriteoutFlags::STORE, WriteoutFlags::MARKSTORED] {
        fail::cfg(point, &format!("1*return({})", libc::ENOMEM)).unwrap();
        let res = fh.dirty_writeout(flags);
        fail::remove(point);
        assert!(
            matches!(&res, Err(Error::Os { op, .. }) if *op == call),
            "{res:?}"
        );
        assert_eq!(file.stores(), 0);
        assert_eq!(fh.dirty_blocks(), [0]);
        assert_eq!(fh.page_state(0), Some(PageState::Dirty));
        assert_eq!(access(), PageAccess::Write);
    }
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(file.stores(), 1);
    assert!(fh.dirty_blocks().is_empty());
    assert_eq!(access(), PageAccess::Read);
}

/// A prefault whose page cannot be mapped (mmap fails; on the userfaultfd
/// backend, UFFDIO_CONTINUE) reports an OS error naming the call, with its
/// errno, not a loadblk failure; a retry maps the page.
#[test]
fn prefault_reports_a_mapping_failure_as_an_os_error() {
    let _scenario = fail::FailScenario::setup();
    let (ram, _fh, vma) = open(Arc::new(MemFile::new(BLK)));
    let (point, call) = match ram.fault_backend() {
        FaultBackend::Signals => ("ram::map_page", "map a RAM page"),
        FaultBackend::Userfaultfd => ("virtmem::uffd_continue", "UFFDIO_CONTINUE"),
    };
    fail::cfg(point, &format!("1*return({})", libc::ENOMEM)).unwrap();
    let res = vma.prefault(0..BLK, bigfile_virtmem::Access::Read);
    fail::remove(point);
    match res {
        Err(Error::Os { op, source }) if op == call => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOMEM), "{source}")
        }
        other => panic!("expected Error::Os of {call}, got {other:?}"),
    }
    vma.prefault(0..BLK, bigfile_virtmem::Access::Read).unwrap();
    assert_eq!(access_at(vma.as_ptr() as usize), PageAccess::Read);
}

/// A reclaimer unmaps what it took outside the lock; meanwhile the old page
/// stays readable in its mappings. A write to that block through another
/// mapping must wait for the unmap (as `invalidate_page` does): else the
/// block, reloaded and changed there, still shows its old data through the
/// first mapping. The reclaimer is held before its unmap
/// (`virtmem::deferred_unmap`) and let go once a thread waits
/// (`virtmem::wait`).
#[test]
fn a_write_waits_for_a_pending_unmap_of_its_block_in_another_mapping() {
    use std::sync::mpsc::channel;
    use std::sync::Mutex;
    use std::thread;

    let _scenario = fail::FailScenario::setup();
    let ram = Ram::from_spec(&format!("memfd,pagesize={BLK}"))
        .unwrap()
        .with_budget(2 * BLK as u64);
    let fh = FileH::open(Arc::new(MemFile::new(BLK)), Some(&ram)).unwrap();
    let (first, second) = (fh.mmap(0, 3).unwrap(), fh.mmap(0, 3).unwrap());
    read(&first, 0);
    read(&first, 2 * BLK);

    let (reached, at_unmap) = channel();
    let (release, released) = channel::<()>();
    let released = Mutex::new(released);
    fail::cfg_callback("virtmem::deferred_unmap", move || {
        if thread::current().name() == Some("reclaimer") {
            reached.send(()).unwrap();
            let _ = released.lock().unwrap().recv();
        }
    })
    .unwrap();
    thread::scope(|s| {
        // Loading block 1 reclaims block 0, the oldest, and stops before
        // unmapping it from `first`.
        let reclaimer = thread::Builder::new()
            .name("reclaimer".into())
            .spawn_scoped(s, || read(&first, BLK))
            .unwrap();
        // Not forever: a reclaimer that ends without reaching the unmap
        // (it reclaimed nothing, or failed) fails the test, saying how.
        while at_unmap.recv_timeout(Duration::from_secs(1)).is_err() {
            if reclaimer.is_finished() {
                let how = reclaimer.join().map(|_| "returned").unwrap_or("panicked");
                panic!(
                    "the reclaimer {how} without a deferred unmap: pages {:?}, {:?}",
                    [0, 1, 2].map(|b| fh.page_state(b)),
                    fh.stats()
                );
            }
        }
        fail::cfg_callback("virtmem::wait", move || {
            let _ = release.send(());
        })
        .unwrap();
        second.write_at(0, &[0x55]).unwrap();
        let b = read(&first, 0);
        fail::remove("virtmem::wait");
        fail::remove("virtmem::deferred_unmap");
        assert_eq!(
            b, 0x55,
            "the first mapping still shows block 0 as it was before the write"
        );
        reclaimer.join().unwrap();
    });
}

/// Whether this thread is a read-ahead worker.
fn on_read_ahead_worker() -> bool {
    std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with("bigfile-readahead"))
}

/// A native memory file (read ahead on the workers) whose loads of block 3
/// fail with `fail(on_worker)` (`None`: succeed); a worker's load of it
/// first waits until a fault waits for it (failure point `virtmem::wait`).
/// A fault on block 0 of a mapping advised sequential (16 blocks, budget
/// 32) has read blocks 1..=8 ahead, and a worker has begun block 3 (a
/// fault on a job not begun would load the block itself); returns the
/// file, RAM, handle and mapping.
fn read_ahead_failing_at_3(
    fail: impl Fn(bool) -> Option<&'static str> + Send + Sync + 'static,
) -> (Arc<MemFile>, Ram, FileH, Vma) {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let waiting = Arc::new(AtomicBool::new(false));
    let begun = Arc::new(AtomicBool::new(false));
    let begun_here = begun.clone();
    {
        let waiting = waiting.clone();
        fail::cfg_callback("virtmem::wait", move || {
            if !on_read_ahead_worker() {
                waiting.store(true, SeqCst);
            }
        })
        .unwrap();
    }
    let file = Arc::new(MemFile::new(BLK).native());
    file.on_load(move |blk, _| {
        if blk != 3 {
            return Ok(());
        }
        let worker = on_read_ahead_worker();
        if worker {
            begun_here.store(true, SeqCst);
            // Bounded only so a bug fails the test instead of hanging it.
            let start = std::time::Instant::now();
            while !waiting.load(SeqCst) && start.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        fail(worker).map_or(Ok(()), |m| Err(m.into()))
    });
    let ram = Ram::from_spec(&format!("memfd,pagesize={BLK}"))
        .unwrap()
        .with_budget(32 * BLK as u64);
    let fh = FileH::open(file.clone(), Some(&ram)).unwrap();
    fh.set_load_policy(bigfile_virtmem::LoadPolicy {
        attempts: 1,
        backoff: Duration::ZERO,
    });
    let vma = fh.mmap(0, 16).unwrap();
    vma.advise(bigfile_virtmem::Advice::Sequential);
    assert_eq!(read(&vma, 0), 1);
    let start = std::time::Instant::now();
    while !begun.load(SeqCst) {
        assert!(start.elapsed() < Duration::from_secs(60), "never begun");
        std::thread::sleep(Duration::from_millis(1));
    }
    (file, ram, fh, vma)
}

/// A read-ahead load that fails is forgotten: the fault that waited for it
/// loads the block again itself, and succeeds.
#[test]
fn a_failing_read_ahead_is_forgotten_and_the_fault_loads_again() {
    let _scenario = fail::FailScenario::setup();
    let (file, _ram, fh, vma) =
        read_ahead_failing_at_3(|worker| worker.then_some("read-ahead failure"));
    assert_eq!(read(&vma, 3 * BLK), 4, "loaded again by the fault");
    settle(&fh, 0..16);
    fail::remove("virtmem::wait");
    let loads_of_3 = file
        .take_calls()
        .iter()
        .filter(|c| **c == bigfile_testkit::Call::Load(3))
        .count();
    assert_eq!(loads_of_3, 2);
    let s = fh.stats();
    assert_eq!(s.load_errors, 1);
    // Every load but the faults' own (blocks 0 and 3) was read ahead.
    assert_eq!(s.readahead_loads, s.loads - 2, "{s:?}");
    assert!(s.readahead_loads >= 7, "blocks 1..=8 but 3 at least: {s:?}");
    assert_eq!(fh.page_state(3), Some(PageState::Loaded));
}

/// When the fault's own load fails too, the error reported is the fault's
/// own, not the read-ahead's.
#[test]
fn a_fault_after_a_failed_read_ahead_reports_its_own_failure() {
    let _scenario = fail::FailScenario::setup();
    let (_file, _ram, fh, vma) = read_ahead_failing_at_3(|worker| {
        Some(if worker {
            "read-ahead failure"
        } else {
            "the fault's failure"
        })
    });
    let err = vma
        .prefault(3 * BLK..4 * BLK, bigfile_virtmem::Access::Read)
        .unwrap_err();
    settle(&fh, 0..16);
    fail::remove("virtmem::wait");
    let Error::Load { blk: 3, source, .. } = &err else {
        panic!("{err:?}");
    };
    let message = source.to_string();
    assert!(
        message.contains("the fault's failure") && !message.contains("read-ahead"),
        "{message}"
    );
    assert_eq!(fh.stats().load_errors, 2);
    assert_eq!(fh.page_state(3), None);
}

/// On the userfaultfd backend a page mapped over a slot is registered just
/// after the `mmap`: an access in between reaches it unreported, and makes
/// its page-table entry without the write-protect bit. Such a read must
/// neither dirty the page (read-only blocks are never stored) nor leave it
/// writable unseen: the next write must still fault and dirty it. The read
/// is made at that step (`virtmem::uffd_before_register`) while another
/// read maps the page.
#[test]
fn a_read_before_a_mapped_page_is_registered_leaves_it_clean_and_tracked() {
    read_before_register_leaves_clean(&format!("memfd,pagesize={BLK}"), BLK);
}

/// The same on a hugetlbfs RAM, whose 2 MiB page the early read maps whole
/// (one entry: `UFFDIO_CONTINUE` then finds it present and is not retried
/// per OS page, which hugetlbfs refuses). Needs root for the pool.
#[test]
fn a_read_before_a_hugetlbfs_page_is_registered_leaves_it_clean_and_tracked() {
    with_hugepages(2, || {
        read_before_register_leaves_clean("hugetlbfs,pagesize=2M", 2 << 20)
    });
}

/// Found in review: a hugetlbfs RAM page of two huge pages (4 MiB) is two
/// entries. The early read maps the first; `UFFDIO_CONTINUE` of the whole
/// page stops there (EEXIST) and the second was taken for present too: the
/// read that needs it faulted again forever (each fault finding the slot
/// mapped, its `CONTINUE` stopping at the first entry again).
#[test]
fn a_read_before_a_page_of_two_huge_pages_is_registered_leaves_it_mapped_whole() {
    with_hugepages(4, || {
        read_before_register_leaves_clean("hugetlbfs,pagesize=4M", 4 << 20)
    });
}

/// Run `test` with the huge page pool resized to `pages` (root only:
/// elsewhere it says skipped).
fn with_hugepages(pages: u64, test: impl FnOnce()) {
    match bigfile_testkit::hugepages::HugePages::set(pages) {
        Ok(_pool) => test(),
        Err(why) => eprintln!("skipped: {why}"),
    }
}

fn read_before_register_leaves_clean(spec: &str, blk: usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    if Ram::from_spec(&format!("memfd,pagesize={BLK}"))
        .unwrap()
        .with_fault_backend(FaultBackend::Userfaultfd)
        .is_err()
        && std::env::var_os("BIGFILE_REQUIRE_UFFD").is_none()
    {
        eprintln!("skipped: userfaultfd not available");
        return;
    }
    let _scenario = fail::FailScenario::setup();
    let ram = Ram::from_spec(spec)
        .unwrap()
        .with_fault_backend(FaultBackend::Userfaultfd)
        .unwrap();
    let fh = FileH::open(Arc::new(MemFile::new(blk)), Some(&ram)).unwrap();
    let vma = fh.mmap(0, 2).unwrap();
    let at = vma.as_ptr() as usize;
    let done = Arc::new(AtomicBool::new(false));
    {
        let done = done.clone();
        fail::cfg_callback("virtmem::uffd_before_register", move || {
            if !done.swap(true, Ordering::SeqCst) {
                // SAFETY: the slot of block 0, its RAM page mapped there and
                // not registered yet: the read maps the page itself.
                let b = unsafe { (at as *const u8).read_volatile() };
                assert_eq!(b, 1);
            }
        })
        .unwrap();
    }
    assert_eq!(read(&vma, blk - 1), 1);
    fail::remove("virtmem::uffd_before_register");
    assert!(done.load(Ordering::SeqCst));
    assert!(fh.dirty_blocks().is_empty(), "a read dirties nothing");
    assert_eq!(access_at(at), PageAccess::Read, "write-protected");
    vma.write_at(0, &[9]).unwrap();
    assert_eq!(fh.dirty_blocks(), [0], "the write was seen");
    assert_eq!(read(&vma, 0), 9);
}
