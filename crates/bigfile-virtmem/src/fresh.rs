//! Fresh pages made ahead of need, inside the budget ("Fresh pages" in
//! ARCHITECTURE.md).
//!
//! The first use of a RAM page is its dearest: the kernel allocates and
//! zeroes its memory and, under `thp=collapse`, `MADV_COLLAPSE` makes it
//! huge (0.2–7.6 ms per 2 MiB page on this project's 2-core machines, the
//! collapse waiting for per-CPU work on the other core: benches/README.md,
//! "Issue 19, item 4"), more than a load of the block from the page cache. A
//! worker thread (`bigfile-fresh`, one per process, started on first use)
//! makes pages ahead while the faulting thread loads: allocated (made huge)
//! and populated in their handle's window, for the handle's next load to
//! take instead of allocating.
//!
//! A fresh page counts in the budget like any page, from the moment the
//! worker starts making it: it is made only into free room (never by
//! reclaiming), one at a time, at most [`reserve`] per RAM however many
//! handles it has. A load takes its handle's fresh page (after a spare of
//! the handle) before it allocates or reclaims (read-ahead has none to
//! take: pages are made only for files not read ahead, [`wanted`]);
//! reclaim drops fresh pages (after spares) before any page holding a
//! block (`Ram::reclaim` first waits for the one being made). A RAM's
//! fresh pages are made for the handle that last asked (one opening, or
//! loading a block). They hold no block: `resident_pages` does not count
//! them; the budget, the RAM's memory files and `bigfile-ram`'s statistics
//! do.
//!
//! Closing a handle waits until the worker no longer makes a page for it
//! (the worker holds its RAM handle meanwhile), then gives back its fresh
//! pages: the handle's file is closed by its closer, at once. A forked
//! child's state forgets them with every page (`State::forget_in_child`;
//! its files are its own, renewed by bigfile-ram) and the child starts a
//! worker of its own, of its fork generation: the parent's worker, absent
//! in the child, only ever acts on the parent's files.
//!
//! Nothing is made for a file whose loads are read ahead (a native
//! loader's: [`wanted`]), on the userfaultfd backend (each block's page is at its
//! own index), on hugetlbfs (no collapse to save, and a page of the fixed
//! pool another RAM may need), under `alloc=touch` (nothing to do before
//! the first touch) or for pages smaller than 2 MiB (not made huge; zeroing
//! them costs less than a worker's wake-up), nor for a budget under 32
//! pages ([`reserve`]).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::thread;

use bigfile_ram::{AllocPolicy, RamHandle};

use crate::deaf::spawn_deaf;
use crate::fork_generation;
use crate::keys::{FileKey, RamPage};
use crate::mapper::Mapper;
use crate::shared::{Guard, Shared};

/// Most fresh pages a RAM keeps: enough for the worker to stay ahead of a
/// scan's faults on 2 MiB pages (benches/README.md, "Cold start").
const MOST: u64 = 4;
/// One fresh page per this many pages of budget (a budget of fewer keeps
/// none, 64 MiB of 2 MiB pages), so a small budget is left to the pages
/// holding blocks.
const PER_BUDGET: u64 = 32;
/// Smallest page made ahead: a transparent huge page's size.
const MIN_PAGE_SIZE: usize = 2 << 20;

/// Fresh pages a RAM of `budget_pages` pages keeps made, at most.
pub(crate) fn reserve(budget_pages: u64) -> u64 {
    (budget_pages / PER_BUDGET).min(MOST)
}

/// Whether pages are made ahead for a handle of `shared` whose file's
/// `BigFile::reads_ahead` is `reads_ahead`: only for files whose loads are
/// not read ahead (by default, those that take the host lock). A read-ahead
/// scan's workers pay for fresh pages off the fault path already; a worker
/// making them as well only took the two cores from them (measured:
/// benches/README.md, "Issue 19, item 4").
pub(crate) fn wanted(shared: &Shared, reads_ahead: bool) -> bool {
    !reads_ahead && enabled(shared)
}

/// Whether pages of `shared` are made ahead at all.
fn enabled(shared: &Shared) -> bool {
    let ram = shared.ram();
    ram.huge_page_size().is_none()
        && ram.spec().alloc == AllocPolicy::Reserve
        && ram.page_size() >= MIN_PAGE_SIZE
}

/// The worker of this process (of this fork generation: a forked child has
/// none of its parent's threads, and starts its own).
struct Worker {
    generation: u64,
    rams: Sender<Weak<Shared>>,
}

/// The worker. Taken only under a RAM's lock (as read-ahead's pool), so
/// never held across a fork: the forking thread holds every RAM's lock.
static WORKER: Mutex<Option<Worker>> = Mutex::new(None);

/// Handle `fk` of `shared` is about to need pages: have the worker make
/// fresh pages for it, if the budget has room and the RAM's reserve is not
/// made. Cheap when there is nothing to do (a full budget, the steady
/// state of a scan): no system call.
pub(crate) fn ask(shared: &Arc<Shared>, st: &mut Guard<'_>, fk: FileKey) {
    let limit = shared.budget_pages();
    if !st.ask_fresh(fk, limit, reserve(limit)) {
        return;
    }
    let sent = worker(st).is_some_and(|w| w.send(Arc::downgrade(shared)).is_ok());
    if !sent {
        // No thread to be had: loads allocate their pages themselves.
        st.stop_fresh();
    }
}

/// The channel to the worker, started if need be. The caller holds a
/// RAM's lock.
fn worker(_locked: &Guard<'_>) -> Option<Sender<Weak<Shared>>> {
    let mut w = WORKER.lock().unwrap_or_else(|p| p.into_inner());
    let generation = fork_generation::generation();
    if w.as_ref().is_none_or(|w| w.generation != generation) {
        // A forked child's channel is its parent's: forgotten, not dropped
        // (a thread the child lacks may have held its lock).
        std::mem::forget(w.take());
        let (rams, inbox) = channel();
        // Deaf: started from a fault, it would inherit the faulting
        // thread's signal mask and could take the application's signals.
        spawn_deaf(
            thread::Builder::new().name("bigfile-fresh".into()),
            move || work(inbox),
        )
        .ok()?;
        *w = Some(Worker { generation, rams });
    }
    w.as_ref().map(|w| w.rams.clone())
}

fn work(inbox: Receiver<Weak<Shared>>) {
    for shared in inbox {
        if let Some(shared) = shared.upgrade() {
            // A panic making a page (a bug) ends that page (`Making`), not
            // the worker: a dead one would never be woken again.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| refill(&shared)));
        }
    }
}

/// Make fresh pages for the handle of `shared` that last asked, one at a
/// time, while the budget has room and the reserve is not made.
fn refill(shared: &Shared) {
    loop {
        let ramh = {
            let limit = shared.budget_pages();
            let mut st = shared.lock();
            match st.begin_fresh(limit, reserve(limit)) {
                Some(ramh) => ramh,
                None => return,
            }
        };
        let mut making = Making {
            shared,
            ramh: Some(ramh),
            made: None,
        };
        make(&mut making);
        let made = making.made;
        drop(making);
        if made.is_none() {
            return;
        }
    }
}

/// A fresh page being made: counted (`begin_fresh`) until this is dropped,
/// which ends it as `made` (none: failed), also when making it panicked
/// (else every load finding the budget full would wait for it forever).
struct Making<'a> {
    shared: &'a Shared,
    ramh: Option<Arc<RamHandle>>,
    made: Option<RamPage>,
}

impl Drop for Making<'_> {
    fn drop(&mut self) {
        // Let go of the RAM handle before saying so: a closing handle
        // waits for that, and closes its file itself.
        drop(self.ramh.take());
        let mut st = self.shared.lock();
        st.end_fresh(self.made);
        self.shared.notify(&st);
    }
}

/// Allocate a page of `making`'s handle (made huge where the RAM does) and
/// populate its window, so the load filling it takes no fault. Out of
/// memory, or any other failure: none made (loads meet it themselves).
fn make(making: &mut Making<'_>) {
    #[cfg(feature = "failpoints")]
    crate::failpoint::hook("virtmem::fresh_make");
    let Some(ramh) = making.ramh.as_deref() else {
        return;
    };
    let Ok(page) = ramh.alloc_page(0) else {
        return;
    };
    // Made from now on, whatever happens next: the page is the handle's.
    making.made = Some(RamPage(page));
    if let Ok(window) = ramh.window(page) {
        // SAFETY: the window maps the RAM file shared and read-write; the
        // page is allocated to no block yet (counted as being made), so no
        // one else uses its memory; populating changes no data.
        unsafe { Mapper::of(making.shared).populate(window, true) };
    }
}

/// Wait until the worker makes no fresh page for handle `fk` (closing), or
/// none at all (`None`: reclaim, to give back every fresh page). The worker
/// waits for nothing but the lock, so neither does this for long.
pub(crate) fn wait_idle<'a>(
    shared: &'a Shared,
    mut st: Guard<'a>,
    fk: Option<FileKey>,
) -> Guard<'a> {
    while st
        .budget()
        .making_fresh()
        .is_some_and(|m| fk.is_none_or(|fk| fk == m))
    {
        st = shared.wait(st);
    }
    st
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bigfile_testkit::child::forked;

    use crate::bigfile::{BigFile, BlockError};
    use crate::{FaultBackend, FileH, Ram};

    const BLK: usize = 2 << 20;
    const TIMEOUT: Duration = Duration::from_secs(20);

    /// A file of zeros (its loads write nothing: RAM pages come zeroed),
    /// needing the host lock as Python loaders do (so not read ahead).
    struct Zeros;

    impl BigFile for Zeros {
        fn blksize(&self) -> usize {
            BLK
        }
        fn loadblk(&self, _blk: u64, _buf: &mut [u8]) -> Result<(), BlockError> {
            Ok(())
        }
        fn storeblk(&self, _blk: u64, _buf: &[u8]) -> Result<(), BlockError> {
            Ok(())
        }
    }

    /// A RAM of 2 MiB pages and a budget of `budget` pages, on the signal
    /// backend (the userfaultfd backend makes nothing ahead).
    fn ram(spec: &str, budget: u64) -> Ram {
        Ram::from_spec(spec)
            .unwrap()
            .with_fault_backend(FaultBackend::Signals)
            .unwrap()
            .with_budget(budget * BLK as u64)
    }

    fn open(ram: &Ram) -> FileH {
        FileH::open(Arc::new(Zeros), Some(ram)).unwrap()
    }

    /// Fresh pages made and not taken, on `ram`.
    fn fresh_pages(ram: &Ram) -> u64 {
        ram.shared().lock().budget().fresh_pages()
    }

    /// Wait until `ram` has `n` fresh pages and none is being made.
    fn wait_fresh(ram: &Ram, n: u64) -> bool {
        let start = Instant::now();
        loop {
            {
                let st = ram.shared().lock();
                if st.budget().fresh_pages() == n && st.budget().making_fresh().is_none() {
                    return true;
                }
            }
            if start.elapsed() > TIMEOUT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Bytes of memory the handle's memory file holds.
    fn allocated(fh: &FileH) -> u64 {
        // SAFETY: fstat of an open descriptor into a zeroed stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let fd = fh.inner.ramh.fd().as_raw_fd();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
        st.st_blocks as u64 * 512
    }

    fn read(vma: &crate::Vma, blk: u64) {
        let mut b = [1];
        vma.read_at(blk as usize * BLK, &mut b).unwrap();
        assert_eq!(b, [0]);
    }

    #[test]
    fn the_reserve_is_a_32nd_of_the_budget_at_most_4_pages_for_files_not_read_ahead() {
        assert_eq!(super::reserve(31), 0);
        assert_eq!(super::reserve(64), 2);
        assert_eq!(super::reserve(1 << 30), 4);
        let on = |spec: &str| super::wanted(ram(spec, 64).shared(), false);
        assert!(on(&format!("memfd,pagesize={BLK}")));
        let read_ahead = ram(&format!("memfd,pagesize={BLK}"), 64);
        assert!(
            !super::wanted(read_ahead.shared(), true),
            "read ahead instead"
        );
        assert!(!on(&format!("memfd,pagesize={BLK},alloc=touch")));
        assert!(!on("memfd,pagesize=64K"), "small pages");
    }

    /// A handle's first load takes a page made ahead (not one it allocates
    /// at its own hint), and the worker makes the next.
    #[test]
    fn a_load_takes_a_fresh_page_made_ahead() {
        let ram = ram(&format!("memfd,pagesize={BLK}"), 64);
        let fh = open(&ram);
        assert!(wait_fresh(&ram, 2), "made when the handle opened");
        assert_eq!(allocated(&fh), 2 * BLK as u64, "counted in the memory file");
        assert_eq!(fh.stats().resident_pages, 0, "no block in them");
        let vma = fh.mmap(0, 16).unwrap();
        read(&vma, 9);
        let rp = {
            let st = ram.shared().lock();
            let pk = st.find_page(fh.inner.key, 9).unwrap();
            st.pages().get(pk).ram_page().unwrap()
        };
        assert!(rp.0 < 2, "a fresh page ({rp:?}), not one allocated at 9");
        assert!(wait_fresh(&ram, 2), "made again");
        assert_eq!(allocated(&fh), 3 * BLK as u64);
        assert_eq!(ram.shared().lock().budget().resident(), 3);
        drop(vma);
        drop(fh);
        assert_eq!(ram.shared().lock().budget().resident(), 0, "given back");
    }

    /// Many handles on one RAM, scanning in turn: the RAM's pages (as the
    /// budget counts them, as bigfile-ram counts them, and as their memory
    /// files hold them) never exceed the budget, fresh pages included; they
    /// are made for the handle that last asked, up to one reserve for all.
    #[test]
    fn many_handles_keep_fresh_pages_within_the_budget() {
        const BUDGET: u64 = 64;
        let ram = ram(&format!("memfd,pagesize={BLK}"), BUDGET);
        let handles: Vec<FileH> = (0..8).map(|_| open(&ram)).collect();
        let vmas: Vec<_> = handles.iter().map(|fh| fh.mmap(0, 64).unwrap()).collect();
        let check = |when: &str| {
            let held: u64 = handles.iter().map(allocated).sum();
            let counted = ram.shared().lock().budget().resident();
            let pages = ram.shared().ram().stats().pages_allocated;
            assert!(counted <= BUDGET, "{when}: {counted} pages counted");
            assert!(pages <= BUDGET, "{when}: {pages} pages allocated");
            assert!(held <= BUDGET * BLK as u64, "{when}: {held} bytes held");
        };
        assert!(wait_fresh(&ram, 2), "one reserve for all handles");
        check("opened");
        for round in 0..2 {
            for (h, vma) in vmas.iter().enumerate() {
                for blk in 0..6 {
                    read(vma, round * 6 + blk);
                    check(&format!("round {round}, handle {h}, block {blk}"));
                }
            }
        }
        // The worker idle, the budget is full (of blocks, spares and fresh
        // pages not yet taken or dropped).
        drop(super::wait_idle(ram.shared(), ram.shared().lock(), None));
        assert!(ram.shared().lock().budget().is_full(BUDGET));
        check("after");
        // Room again: made for the last handle that asked.
        ram.reclaim();
        read(&vmas[3], 0);
        assert!(wait_fresh(&ram, 2));
        check("reclaimed");
        let st = ram.shared().lock();
        assert!(st.budget().has_fresh(handles[3].inner.key));
    }

    /// Reclaim drops fresh pages before any page holding a block: a budget
    /// full of blocks and fresh pages makes room from the fresh pages.
    #[test]
    fn reclaim_drops_fresh_pages_before_blocks() {
        const BUDGET: u64 = 32;
        let ram = ram(&format!("memfd,pagesize={BLK}"), BUDGET);
        let a = open(&ram);
        let b = open(&ram);
        let (va, vb) = (a.mmap(0, 64).unwrap(), b.mmap(0, 64).unwrap());
        for blk in 0..BUDGET - 2 {
            read(&vb, blk);
        }
        read(&va, 0);
        assert!(wait_fresh(&ram, 1), "the reserve");
        assert!(ram.shared().lock().budget().is_full(BUDGET));
        // `b` needs a page: the fresh page goes (or is taken, if `b`'s),
        // no block.
        read(&vb, BUDGET);
        assert_eq!(b.stats().resident_pages + a.stats().resident_pages, BUDGET);
        assert_eq!(fresh_pages(&ram), 0);
        assert_eq!(b.stats().reclaims + a.stats().reclaims, 0);
        // `Ram::reclaim` gives fresh pages back too, and counts them.
        ram.reclaim();
        assert!(wait_fresh(&ram, 0));
        read(&va, 1);
        assert!(wait_fresh(&ram, 1), "made again");
        assert_eq!(ram.reclaim(), 2, "a block and the fresh page");
        assert_eq!(ram.shared().ram().stats().pages_allocated, 0);
    }

    /// A load that finds the budget full while a fresh page is being made
    /// into its last room waits for that page (and takes it) rather than
    /// reclaim a page holding a block: a budget the size of the data keeps
    /// it all (np.save after `prefault` once lost a block so).
    #[test]
    fn a_load_waits_for_the_fresh_page_being_made_rather_than_reclaim_a_block() {
        const BUDGET: u64 = 32;
        let ram = ram(&format!("memfd,pagesize={BLK}"), BUDGET);
        let fh = open(&ram);
        let vma = fh.mmap(0, BUDGET).unwrap();
        vma.advise(crate::Advice::Random);
        for blk in 0..BUDGET - 1 {
            read(&vma, blk);
        }
        // The reserve (one page) made into the last room, the worker idle:
        // it stops once the budget is full.
        assert!(wait_fresh(&ram, 1), "the reserve made");
        // The worker's part played here: its page taken back and "being
        // made" until the load waits.
        let key = fh.inner.key;
        let rp = {
            let mut st = ram.shared().lock();
            let rp = st.take_fresh(key).expect("the reserve's page");
            // (Asked for `key`; the worker is not woken: it is us.)
            let _ = st.ask_fresh(key, BUDGET, 1);
            assert!(st.begin_fresh(BUDGET, 1).is_some());
            assert!(st.budget().is_full(BUDGET));
            rp
        };
        let waited = std::thread::scope(|s| {
            let load = s.spawn(|| read(&vma, BUDGET - 1));
            let start = Instant::now();
            let waited = loop {
                if ram.shared().lock().waiters() > 0 {
                    break true;
                }
                if load.is_finished() || start.elapsed() > TIMEOUT {
                    break false;
                }
                std::thread::yield_now();
            };
            // Made, in any case (closing the handle waits for that).
            let mut st = ram.shared().lock();
            st.end_fresh(Some(rp));
            ram.shared().notify(&st);
            drop(st);
            load.join().unwrap();
            waited
        });
        assert!(waited, "the load did not wait for the fresh page");
        assert_eq!(fh.stats().reclaims, 0, "no block reclaimed");
        assert_eq!(fh.stats().resident_pages, BUDGET);
        let st = ram.shared().lock();
        let pk = st.find_page(key, BUDGET - 1).unwrap();
        assert_eq!(st.pages().get(pk).ram_page(), Some(rp), "the fresh page");
    }

    /// A forked child holds no fresh page (its files are its own) and makes
    /// its own with a worker of its own; the parent's stay.
    #[test]
    fn a_forked_child_makes_its_own_fresh_pages() {
        let ram = ram(&format!("memfd,pagesize={BLK}"), 128);
        let fh = open(&ram);
        assert!(wait_fresh(&ram, 4));
        let vma = fh.mmap(0, 4).unwrap();
        let status = forked(
            || {
                if fresh_pages(&ram) != 0 || allocated(&fh) != 0 {
                    return false;
                }
                let mut b = [1];
                vma.read_at(0, &mut b).is_ok()
                    && b == [0]
                    && wait_fresh(&ram, 4)
                    && allocated(&fh) == 5 * BLK as u64
            },
            TIMEOUT,
        )
        .unwrap();
        assert!(status.success(), "the child's fresh pages were not its own");
        assert_eq!(fresh_pages(&ram), 4);
        assert_eq!(allocated(&fh), 4 * BLK as u64);
    }

    /// The inode open at descriptor `fd`, if any.
    fn inode_at(fd: i32) -> Option<u64> {
        // SAFETY: fstat of a descriptor number into a zeroed stat (EBADF if
        // none is open).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
    }

    /// A handle dropped while the worker makes its fresh pages is gone when
    /// the drop returns: the worker does not keep its file open after it.
    #[test]
    fn a_handle_dropped_while_pages_are_made_closes_its_file_at_once() {
        let ram = ram(&format!("memfd,pagesize={BLK}"), 64);
        for _ in 0..10 {
            let fh = open(&ram);
            let fd = fh.inner.ramh.fd().as_raw_fd();
            let inode = inode_at(fd);
            // Until the worker is at its second page (of 2).
            let start = Instant::now();
            while fresh_pages(&ram) == 0 && start.elapsed() < TIMEOUT {
                std::thread::yield_now();
            }
            drop(fh);
            // (Another test's file may have the number by now: not the inode.)
            assert_ne!(inode_at(fd), inode, "the handle's file is closed");
            assert_eq!(ram.shared().lock().budget().resident(), 0);
        }
    }

    /// A fresh page whose making panics (the worker thread dies) is no
    /// longer counted as being made: a reclaim, which waits for it, ends;
    /// the worker goes on making pages.
    #[cfg(feature = "failpoints")]
    #[test]
    fn a_panic_making_a_fresh_page_leaves_nothing_waiting_for_it() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let _scenario = fail::FailScenario::setup();
        static HIT: AtomicBool = AtomicBool::new(false);
        let ram = ram(&format!("memfd,pagesize={BLK}"), 64);
        let mine = ram.clone();
        fail::cfg_callback("virtmem::fresh_make", move || {
            // The process's one worker makes the pages of every test's
            // RAMs, one at a time: only a page of this one fails (another
            // test's would never be made, and that test fail).
            let ours = mine.shared().lock().budget().making_fresh().is_some();
            if ours && !HIT.swap(true, Ordering::SeqCst) {
                panic!("made to fail");
            }
        })
        .unwrap();
        let fh = open(&ram);
        let start = Instant::now();
        while !HIT.load(Ordering::SeqCst) {
            assert!(start.elapsed() < TIMEOUT, "the worker never made a page");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (done, reclaimed) = std::sync::mpsc::channel();
        let r = ram.clone();
        std::thread::spawn(move || done.send(r.reclaim()).unwrap());
        assert!(
            reclaimed.recv_timeout(TIMEOUT).is_ok(),
            "the reclaim waits for the page the dead worker was making"
        );
        let vma = fh.mmap(0, 4).unwrap();
        read(&vma, 3);
        assert!(wait_fresh(&ram, 2), "made again");
        fail::remove("virtmem::fresh_make");
    }
}
