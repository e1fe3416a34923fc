//! Several threads at once: one load per block, parallel loads, models,
//! load versus invalidate, lock order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use bigfile::virtmem::{Advice, Error, LoadError, WriteoutFlags};

use crate::common::{
    blocked_signals_of_threads, handle, mem_file, open, peek, ram, setup, Call, MemFile, BLK,
};

/// Two threads fault on one block: one loads it, the other waits for that
/// load. The load is held until both faults are being served (the fault
/// count is taken as a fault begins, before it looks at the page): a load
/// that merely took a while let a thread delayed past it (a loaded machine)
/// find the block loaded, and take no fault at all.
#[test]
fn two_threads_one_block_one_load() {
    let (file, _ram, fh, vma) = setup(16, 1);
    let gates = Arc::new(Gates::default());
    {
        let gates = gates.clone();
        file.on_load(move |blk, _| {
            gates.enter(blk);
            Ok(())
        });
    }
    let p = vma.as_ptr() as usize;
    let ts: Vec<_> = (0..2)
        .map(|_| thread::spawn(move || peek(p as *const u8)))
        .collect();
    gates.wait_entered(0, 1);
    while fh.stats().faults < 2 {
        thread::yield_now();
    }
    gates.open(0);
    for t in ts {
        assert_eq!(t.join().unwrap(), MemFile::initial(0));
    }
    assert_eq!(file.take_calls(), [Call::Load(0)]);
    assert_eq!(fh.stats().loads, 1);
    assert_eq!(fh.stats().faults, 2);
}

#[test]
fn two_blocks_load_in_parallel() {
    let (file, _ram, _fh, vma) = setup(16, 2);
    // Each loader waits (up to 10 s) for the other to be inside loadblk too:
    // both see each other only if the two loads run at the same time.
    let inside = Arc::new(AtomicUsize::new(0));
    let met = Arc::new(AtomicUsize::new(0));
    {
        let (inside, met) = (inside.clone(), met.clone());
        file.on_load(move |_, _| {
            inside.fetch_add(1, SeqCst);
            let t0 = std::time::Instant::now();
            while inside.load(SeqCst) < 2 && t0.elapsed() < Duration::from_secs(10) {
                thread::sleep(Duration::from_millis(1));
            }
            if inside.load(SeqCst) == 2 {
                met.fetch_add(1, SeqCst);
            }
            Ok(())
        });
    }
    let p = vma.as_ptr() as usize;
    let ts: Vec<_> = (0..2)
        .map(|i| thread::spawn(move || peek((p + i * BLK) as *const u8)))
        .collect();
    for (i, t) in ts.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), MemFile::initial(i as u64));
    }
    assert_eq!(met.load(SeqCst), 2, "both loads ran at the same time");
}

#[test]
fn eight_threads_against_a_model() {
    const BLOCKS: u64 = 64;
    let file = mem_file(BLK);
    let ram = ram(BLOCKS * 2);
    let fh = open(&file, &ram);
    let vma = Arc::new(fh.mmap(0, BLOCKS).unwrap());
    // Thread t owns the bytes at offsets = t (mod 8) in every block, so the
    // model is exact with no cross-thread ordering questions.
    let models: Vec<HashMap<usize, u8>> = thread::scope(|s| {
        let hs: Vec<_> = (0..8usize)
            .map(|t| {
                let vma = vma.clone();
                s.spawn(move || {
                    let mut model = HashMap::new();
                    let mut x = 0x9e3779b97f4a7c15u64 ^ t as u64;
                    for _ in 0..4000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let blk = (x % BLOCKS) as usize;
                        let slot = ((x >> 8) % (BLK as u64 / 8)) as usize;
                        let off = blk * BLK + slot * 8 + t;
                        if x & 1 == 0 {
                            let v = (x >> 32) as u8;
                            vma.write_at(off, &[v]).unwrap();
                            model.insert(off, v);
                        } else {
                            let mut b = [0u8];
                            vma.read_at(off, &mut b).unwrap();
                            let want = model
                                .get(&off)
                                .copied()
                                .unwrap_or(MemFile::initial(blk as u64));
                            assert_eq!(b[0], want, "thread {t} offset {off}");
                        }
                    }
                    model
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    for model in models {
        for (off, v) in model {
            let blk = (off / BLK) as u64;
            assert_eq!(file.content(blk)[off % BLK], v, "offset {off}");
        }
    }
    let loads = file
        .take_calls()
        .iter()
        .filter(|c| matches!(c, Call::Load(_)))
        .count();
    assert_eq!(loads, BLOCKS as usize, "each block loaded exactly once");
}

#[test]
fn load_versus_invalidate_sees_the_new_data() {
    let file = mem_file(BLK);
    let ram = ram(16);
    let fh = Arc::new(open(&file, &ram));
    let vma = fh.mmap(0, 1).unwrap();
    let entered = Arc::new(Barrier::new(2));
    let invalidated = Arc::new(Barrier::new(2));
    let first = Arc::new(AtomicBool::new(true));
    {
        let (entered, invalidated, first) = (entered.clone(), invalidated.clone(), first.clone());
        file.on_load(move |_, _| {
            if first.swap(false, SeqCst) {
                entered.wait();
                invalidated.wait();
            }
            Ok(())
        });
    }
    let p = vma.as_ptr() as usize;
    let reader = thread::spawn(move || peek(p as *const u8));
    entered.wait();
    // The file changes underneath while the first load is in flight.
    file.put(0, vec![0x77; BLK]);
    fh.invalidate_page(0).unwrap();
    assert_eq!(
        fh.page_state(0),
        Some(bigfile::virtmem::PageState::LoadingInvalidated)
    );
    invalidated.wait();
    assert_eq!(reader.join().unwrap(), 0x77);
    assert_eq!(file.take_calls(), [Call::Load(0), Call::Load(0)]);
}

#[test]
fn external_lock_in_loadblk_and_around_invalidate_does_not_deadlock() {
    let file = mem_file(BLK);
    let other = mem_file(BLK);
    let ram = ram(16);
    let fh = open(&file, &ram);
    let fh_other = Arc::new(open(&other, &ram));
    let vma = fh.mmap(0, 4).unwrap();
    let m = Arc::new(Mutex::new(()));
    let in_load = Arc::new(AtomicUsize::new(0));
    {
        let (ml, in_load) = (m.clone(), in_load.clone());
        file.on_load(move |_, _| {
            in_load.fetch_add(1, SeqCst);
            let _g = ml.lock().unwrap();
            Ok(())
        });
        let m = m.clone();
        file.on_store(move |_, _| {
            let _g = m.lock().unwrap();
            Ok(())
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let inval = {
        let (m, stop, fh_other) = (m.clone(), stop.clone(), fh_other.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(SeqCst) {
                let _g = m.lock().unwrap();
                fh_other.invalidate_page(n % 4).unwrap();
                n += 1;
            }
        })
    };
    for round in 0..50 {
        let pg = round % 4;
        assert_eq!(
            peek(vma.as_ptr().wrapping_add(pg * BLK)),
            MemFile::initial(pg as u64)
        );
        vma.write_at(pg * BLK, &[1]).unwrap();
        fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
            .unwrap();
        ram.reclaim();
        file.clear();
    }
    stop.store(true, SeqCst);
    inval.join().unwrap();
    assert!(in_load.load(SeqCst) >= 50);
}

#[test]
fn write_during_writeout_waits_for_it() {
    let file = mem_file(BLK);
    let ram = ram(16);
    let fh = Arc::new(open(&file, &ram));
    let vma = Arc::new(fh.mmap(0, 2).unwrap());
    vma.write_at(0, &[1]).unwrap();
    let in_store = Arc::new(Barrier::new(2));
    let writer_done = Arc::new(AtomicBool::new(false));
    {
        let (in_store, writer_done) = (in_store.clone(), writer_done.clone());
        file.on_store(move |_, _| {
            in_store.wait();
            thread::sleep(Duration::from_millis(100));
            // The writer must still be blocked: storeblk sees the old data.
            assert!(!writer_done.load(SeqCst));
            Ok(())
        });
    }
    let writer = {
        let (vma, in_store, writer_done) = (vma.clone(), in_store.clone(), writer_done.clone());
        thread::spawn(move || {
            in_store.wait();
            vma.write_at(0, &[2]).unwrap();
            writer_done.store(true, SeqCst);
        })
    };
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    writer.join().unwrap();
    assert_eq!(file.content(0)[0], 1);
    let mut b = [0];
    vma.read_at(0, &mut b).unwrap();
    assert_eq!(b[0], 2);
    assert_eq!(fh.dirty_blocks(), [0]);
}

/// Whether thread `tid` of this process is asleep in the kernel (state `S`
/// in /proc/self/task/TID/stat: waiting on a futex, here).
fn sleeping(tid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    // "TID (COMM) STATE ...": COMM may hold spaces and parentheses.
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('S'))
}

/// The loader's error, as a value.
#[derive(Debug)]
struct BadSector;

impl std::fmt::Display for BadSector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bad sector")
    }
}

impl std::error::Error for BadSector {}

#[test]
fn waiters_of_a_failed_load_get_its_error() {
    let file = mem_file(BLK);
    // The load fails only once the second thread waits for it: its fault
    // counted (as serving begins), then asleep in the kernel, which from
    // there is only the wait for a LOADING page. A load that merely took a
    // while let a thread delayed past it (a loaded machine) load the block
    // itself, and hang in this hook.
    let gates = Arc::new(Gates::default());
    {
        let gates = gates.clone();
        file.on_load(move |blk, _| {
            gates.enter(blk);
            Err(Box::new(BadSector))
        });
    }
    let ram = ram(4);
    let fh = open(&file, &ram);
    fh.set_load_policy(bigfile::virtmem::LoadPolicy {
        attempts: 1,
        backoff: Duration::ZERO,
    });
    let vma = Arc::new(fh.mmap(0, 1).unwrap());
    let loader = {
        let vma = vma.clone();
        thread::spawn(move || vma.prefault(0..1, bigfile::virtmem::Access::Read))
    };
    gates.wait_entered(0, 1);
    let waiter_tid = Arc::new(AtomicI32::new(0));
    let waiter = {
        let (vma, waiter_tid) = (vma.clone(), waiter_tid.clone());
        thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            waiter_tid.store(unsafe { libc::gettid() }, SeqCst);
            vma.prefault(0..1, bigfile::virtmem::Access::Read)
        })
    };
    while fh.stats().faults < 2 || !sleeping(waiter_tid.load(SeqCst)) {
        thread::yield_now();
    }
    gates.open(0);
    let waited = waiter.join().unwrap();
    let loaded = loader.join().unwrap();
    let (l, w) = (loaded.unwrap_err(), waited.unwrap_err());
    assert!(l.to_string().contains("bad sector"), "{l}");
    assert!(
        w.to_string()
            .contains("while waiting for another thread's load")
            && w.to_string().contains("bad sector"),
        "{w}"
    );
    // The very error value loadblk returned, for both threads.
    let block_error = |e: &Error| match e {
        Error::Load {
            source: LoadError::Block { source, .. },
            ..
        } => source.clone(),
        e => panic!("not loadblk's error: {e:?}"),
    };
    let Error::Load {
        source: LoadError::Waited(inner),
        ..
    } = &w
    else {
        panic!("the waiter's error is not the load it waited for: {w:?}");
    };
    let (mine, theirs) = (block_error(&l), block_error(inner));
    assert!(Arc::ptr_eq(&mine, &theirs));
    assert!(mine.downcast_ref::<BadSector>().is_some());
    assert_eq!(file.take_calls(), [Call::Load(0)]);
    assert_eq!(fh.page_state(0), None);
}

/// Reclaim unmaps its victims after dropping the RAM lock. Under a budget of
/// 3 pages, scanners keep reclaiming pages that other threads are reading,
/// mapping again in other mappings, or unmapping whole: every read must see
/// its block's data (a slot mapped anew and then unmapped by a late
/// reclaimer would read as zeros) and everything must add up at the end.
/// Drop-behind (sequential advice, switched on and off meanwhile) changes
/// which pages go first, not what is read.
#[test]
fn reclaim_races_with_faults_and_unmaps_of_the_same_pages() {
    const BLOCKS: u64 = 8;
    let (_file, ram, fh) = handle(3);
    let shared = Arc::new(fh.mmap(0, BLOCKS).unwrap());
    thread::scope(|s| {
        for t in 0..2u64 {
            let shared = shared.clone();
            s.spawn(move || {
                for i in 0..20_000u64 {
                    if t == 0 && i % 1000 == 0 {
                        shared.advise(if i % 2000 == 0 {
                            Advice::Sequential
                        } else {
                            Advice::Normal
                        });
                    }
                    let blk = (i * (t + 1) + t) % BLOCKS;
                    let off = (i * 4096 + t * 8) as usize % BLK;
                    let got = peek(shared.as_ptr().wrapping_add(blk as usize * BLK + off));
                    assert_eq!(got, MemFile::initial(blk), "scanner {t}, block {blk}");
                }
            });
        }
        for t in 0..2u64 {
            let fh = &fh;
            s.spawn(move || {
                for i in 0..2000u64 {
                    let first = (i + t) % (BLOCKS - 1);
                    let vma = fh.mmap(first, 2).unwrap();
                    if i % 2 == 0 {
                        vma.advise(Advice::Sequential);
                    }
                    for k in 0..2 {
                        let got = peek(vma.as_ptr().wrapping_add(k * BLK + 100));
                        assert_eq!(got, MemFile::initial(first + k as u64), "mapper {t}");
                    }
                }
            });
        }
    });
    assert!(fh.stats().reclaims > 100, "{:?}", fh.stats());
    assert!(ram.stats().resident_bytes <= 3 * BLK as u64);
    drop(shared);
    assert_eq!(fh.mapping_count(), 0);
    fh.close().map_err(|(e, _)| e).unwrap();
    assert_eq!(ram.stats().resident_bytes, 0);
}

/// A budget full of pages that other threads are still loading is not
/// exhausted: those pages will be clean. With a budget of one page, a fault
/// on a second block waits for the first block's slow load and reclaims it.
#[test]
fn a_full_budget_of_loading_pages_waits_for_them() {
    let (file, _ram, fh, vma) = setup(1, 2);
    let first_loading = Arc::new(AtomicBool::new(false));
    {
        let first_loading = first_loading.clone();
        file.on_load(move |blk, _| {
            if blk == 0 {
                first_loading.store(true, SeqCst);
                thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        });
    }
    let p = vma.as_ptr() as usize;
    let slow = thread::spawn(move || peek(p as *const u8));
    while !first_loading.load(SeqCst) {
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(peek((p + BLK) as *const u8), MemFile::initial(1));
    assert_eq!(slow.join().unwrap(), MemFile::initial(0));
    // With one page for two blocks, a block just loaded may be reclaimed by
    // the other thread before its loader maps it, and be loaded again.
    assert!(fh.stats().loads >= 2 && fh.stats().reclaims >= 1);
}

/// Gates a `loadblk` can be held at: `enter(blk)` records the block and
/// waits until `open(blk)`.
#[derive(Default)]
struct Gates {
    state: Mutex<(Vec<u64>, Vec<u64>)>, // (entered, opened)
    cond: std::sync::Condvar,
}

impl Gates {
    fn enter(&self, blk: u64) {
        let mut st = self.state.lock().unwrap();
        st.0.push(blk);
        self.cond.notify_all();
        while !st.1.contains(&blk) {
            st = self.cond.wait(st).unwrap();
        }
    }

    fn open(&self, blk: u64) {
        self.state.lock().unwrap().1.push(blk);
        self.cond.notify_all();
    }

    fn wait_entered(&self, blk: u64, times: usize) {
        let mut st = self.state.lock().unwrap();
        while st.0.iter().filter(|&&b| b == blk).count() < times {
            st = self.cond.wait(st).unwrap();
        }
    }
}

/// Two threads wait for room (the budget full of loading pages) to load
/// the same block. The first to get room loads it; the second, getting room
/// later, must see the block taken and wait for that load, not load it a
/// second time over the first (which left a page counted but lost).
#[test]
fn two_threads_waiting_for_room_for_one_block_load_it_once() {
    let (file, ram, fh, vma) = setup(2, 10);
    let gates = Arc::new(Gates::default());
    {
        let gates = gates.clone();
        file.on_load(move |blk, _| {
            gates.enter(blk);
            Ok(())
        });
    }
    let p = vma.as_ptr() as usize;
    let read = move |blk: u64| thread::spawn(move || peek((p + blk as usize * BLK) as *const u8));
    // Blocks 0 and 9 fill the budget, loading until their gates open.
    let l0 = read(0);
    let l9 = read(9);
    gates.wait_entered(0, 1);
    gates.wait_entered(9, 1);
    // Two readers of block 1 find no room and wait for those loads.
    let a = read(1);
    let b = read(1);
    while fh.stats().faults < 4 {
        thread::yield_now();
    }
    thread::sleep(Duration::from_millis(100));
    // Block 0 loaded: one reader reclaims it and starts loading block 1.
    gates.open(0);
    gates.wait_entered(1, 1);
    // Block 9 loaded: the other reader gets room too, finds block 1 taken.
    gates.open(9);
    assert_eq!(l9.join().unwrap(), MemFile::initial(9));
    thread::sleep(Duration::from_millis(100));
    gates.open(1);
    assert_eq!(a.join().unwrap(), MemFile::initial(1));
    assert_eq!(b.join().unwrap(), MemFile::initial(1));
    l0.join().unwrap();
    let loads_of_1 = file
        .take_calls()
        .iter()
        .filter(|c| **c == Call::Load(1))
        .count();
    assert_eq!(loads_of_1, 1, "block 1 loaded once");
    let resident_blocks = (0..10).filter(|&b| fh.page_state(b).is_some()).count() as u64;
    assert_eq!(ram.stats().stats.resident_pages, resident_blocks);
    assert_eq!(ram.pages().stats().pages_allocated, resident_blocks);
}

/// The userfaultfd backend's own threads (its reader, its workers) block
/// the signals meant for the process: Ctrl-C's SIGINT delivered to one of
/// them would interrupt nothing of the application's (Python's main thread
/// would sleep on, its KeyboardInterrupt late). They still take their own
/// faults' signals.
#[test]
fn the_backends_own_threads_leave_process_signals_to_the_application() {
    use std::io::Read;
    let (file, ram, fh, vma) = setup(16, 2);
    // The backend's threads as the first load sees them: on userfaultfd
    // that load runs on the worker the kernel fault started, which is
    // certain to be there then; listed after read(2) returned, it may have
    // retired already (idle for 2 s: a test thread preempted that long).
    let at_first_load = Arc::new(Mutex::new(None));
    {
        let at_first_load = at_first_load.clone();
        file.on_load(move |_, _| {
            let mut seen = at_first_load.lock().unwrap();
            seen.get_or_insert_with(|| blocked_signals_of_threads("bigfile-uffd"));
            Ok(())
        });
    }
    // A kernel fault (read(2) into a page not loaded) starts a worker.
    let path = std::env::temp_dir().join(format!("bigfile-it-deaf-{}", std::process::id()));
    std::fs::write(&path, [5u8; 64]).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    // SAFETY: nothing else accesses these bytes while the slice lives.
    let dst = unsafe { &mut vma.as_mut_slice()[..64] };
    let kernel_io = f.read(dst);
    std::fs::remove_file(&path).unwrap();
    // (On signals, read(2) fails and loads nothing.)
    let threads = at_first_load.lock().unwrap().take();
    let threads = threads.unwrap_or_else(|| blocked_signals_of_threads("bigfile-uffd"));
    let mut ours = Vec::new();
    for (comm, blocked) in threads {
        let is_blocked = |sig: i32| blocked & (1 << (sig - 1)) != 0;
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGCHLD, libc::SIGALRM] {
            assert!(is_blocked(sig), "{comm} takes signal {sig}");
        }
        for sig in [libc::SIGSEGV, libc::SIGBUS] {
            assert!(!is_blocked(sig), "{comm} blocks signal {sig}");
        }
        ours.push(comm);
    }
    match ram.fault_backend() {
        bigfile::virtmem::FaultBackend::Userfaultfd => {
            assert_eq!(kernel_io.unwrap(), 64);
            assert_eq!(peek(vma.as_ptr()), 5);
            assert!(ours.iter().any(|c| c == "bigfile-uffd"), "{ours:?}");
            assert!(ours.len() >= 2, "a worker too: {ours:?}");
        }
        // (Other tests of this process may have RAMs on userfaultfd.)
        bigfile::virtmem::FaultBackend::Signals => assert!(kernel_io.is_err()),
    }
    drop(fh);
}

/// Found in review: on the userfaultfd backend a page mapped in a slot whose
/// entries the kernel took away in part (reclaiming the RAM's shared memory
/// to swap unmaps it an OS page at a time; `MADV_DONTNEED` stands for it
/// here) was faulted on forever: `UFFDIO_CONTINUE` over the whole slot
/// stopped at its first entry, present (EEXIST), and the missing one was
/// never made present again. (On signals the kernel maps it back itself.)
#[test]
fn a_slot_whose_entries_went_in_part_is_made_whole_again() {
    let (_file, _ram, fh, vma) = setup(4, 2);
    // SAFETY: sysconf has no preconditions.
    let os = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    assert!(BLK >= 2 * os);
    let base = vma.as_ptr() as usize;
    assert_eq!(peek(base as *const u8), MemFile::initial(0));
    // SAFETY: the second OS page of a slot of a shared mapping: its entries
    // go, its data stays in the RAM.
    let zapped = unsafe { libc::madvise((base + os) as *mut _, os, libc::MADV_DONTNEED) };
    assert_eq!(zapped, 0);
    let faults = fh.stats().faults;
    let reader = thread::spawn(move || peek((base + os) as *const u8));
    // Each fault is counted: a thousand for one access is a loop.
    while !reader.is_finished() && fh.stats().faults < faults + 1000 {
        thread::yield_now();
    }
    let looping = !reader.is_finished();
    if looping {
        // Let it out: with all of the slot's entries gone, the next fault
        // makes them all present.
        // SAFETY: as above, the whole slot.
        unsafe { libc::madvise(base as *mut _, BLK, libc::MADV_DONTNEED) };
    }
    assert_eq!(reader.join().unwrap(), MemFile::initial(0));
    assert!(!looping, "one access faulted over 1000 times");
}

/// Found in use (Ctrl-C during `np.save` of an array whose loads were
/// slow): a signal sent to a thread blocked in a kernel-mode fault (here a
/// `write(2)` from a page still loading) ends its interruptible wait at
/// once, and the kernel, which abandons a kernel-mode fault only for a
/// fatal signal, retries it at once, again and again until the load ends:
/// each retry is a new event. Each became a job, each job's worker waited
/// for the one load, and each next event found no idle worker: thousands
/// of threads (8184 in that Python session) for one slow load. A retry of a
/// fault being served is now dropped (the fault's end wakes the thread).
#[test]
fn a_signal_during_a_kernel_fault_does_not_start_a_worker_per_retry() {
    use std::io::Write;
    use std::os::unix::thread::JoinHandleExt;
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: a handler that does nothing, for a signal no other test uses.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    let workers = || blocked_signals_of_threads("bigfile-uffd-").len();
    let (file, ram, fh, vma) = setup(16, 1);
    let loading = Arc::new(Barrier::new(2));
    let most = Arc::new(AtomicUsize::new(0));
    {
        let (loading, most) = (loading.clone(), most.clone());
        file.on_load(move |_, _| {
            loading.wait();
            // The retries come meanwhile: each one a worker, before.
            for _ in 0..30 {
                thread::sleep(Duration::from_millis(10));
                most.fetch_max(workers(), SeqCst);
            }
            Ok(())
        });
    }
    let path = std::env::temp_dir().join(format!("bigfile-it-sigretry-{}", std::process::id()));
    let out = std::fs::File::create(&path).unwrap();
    let p = vma.as_ptr() as usize;
    let writer = thread::spawn(move || {
        let src =
            // SAFETY: the mapping outlives the thread (joined below);
            // nothing writes it meanwhile.
            unsafe { std::slice::from_raw_parts(p as *const u8, BLK) };
        (&out).write(src)
    });
    let on_uffd = ram.fault_backend() == bigfile::virtmem::FaultBackend::Userfaultfd;
    if on_uffd {
        loading.wait();
        // SAFETY: the thread is alive (joined below).
        let sent = unsafe { libc::pthread_kill(writer.as_pthread_t(), libc::SIGUSR2) };
        assert_eq!(sent, 0);
    }
    let written = writer.join().unwrap();
    let saved = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    if on_uffd {
        assert_eq!(written.unwrap(), BLK);
        assert!(saved.iter().all(|&b| b == MemFile::initial(0)));
        let most = most.load(SeqCst);
        // (Other tests of this process may have workers of their own.)
        assert!(most <= 16, "{most} userfaultfd workers for one slow load");
        assert_eq!(fh.stats().loads, 1);
    } else {
        // On signals the kernel's access fails: no load, no signal sent.
        assert!(written.is_err() && saved.is_empty());
    }
    drop(vma);
}
