//! Read-ahead of a system call's buffer on the userfaultfd backend
//! (ARCHITECTURE.md, "Read-ahead", "A system call's buffer"): a `write(2)`
//! from a mapping not loaded faults once; the worker serving that fault
//! reads the rest of the buffer ahead, maps it, and wakes the call once it
//! is loaded, so that the kernel copies it without another fault; a
//! `read(2)` into one likewise. Not on a non-blocking descriptor.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use bigfile::virtmem::{FileH, PageState, WriteoutFlags};

use crate::common::{holds_initial, on_uffd, scratch, write_out, HostLoader, MemFile, BLK};

/// One `write(2)` of 64 blocks not loaded: one fault; the 63 blocks after
/// it read ahead (not a stream's window: all of them) and mapped before the
/// call copies them. (Without: a stream's read-ahead, about one fault per
/// half window, 4 blocks of 64 KiB here.) The loads are slow (a millisecond
/// each, as a network's): a call woken before they end would catch up with
/// them and fault on most blocks.
#[test]
fn a_write_from_an_unloaded_mapping_reads_its_buffer_ahead() {
    let Some((file, _ram, fh)) = on_uffd(128) else {
        return;
    };
    file.on_load(|_, _| {
        std::thread::sleep(std::time::Duration::from_millis(1));
        Ok(())
    });
    let vma = fh.mmap(0, 64).unwrap();
    let got = write_out(&vma);
    let s = fh.stats();
    assert!(s.faults <= 4, "one fault for the whole call: {s:?}");
    assert!(s.readahead_loads >= 60, "{s:?}");
    assert_eq!(file.loads(), 64, "every block loaded once");
    assert_eq!(got.len(), 64 * BLK);
    assert!(holds_initial(&got, 0..64), "the file got the blocks' data");
}

/// One `read(2)` into 32 blocks not loaded: read ahead as for a write, and
/// every page the kernel wrote is dirty (its write-protect fault served as
/// a write) and written out. (Read ahead only as a stream, its pages mapped
/// while the kernel writes met the window of `Mapper::map`: EFAULT, about
/// one run in six.)
#[test]
fn a_read_into_an_unloaded_mapping_dirties_what_it_wrote() {
    let Some((file, _ram, fh)) = on_uffd(64) else {
        return;
    };
    let vma = fh.mmap(0, 32).unwrap();
    let mut src = scratch();
    let data: Vec<u8> = (0..32 * BLK).map(|i| (i / 4096 % 251) as u8).collect();
    src.write_all(&data).unwrap();
    src.seek(SeekFrom::Start(0)).unwrap();
    // SAFETY: nothing else accesses the mapping while the slice lives.
    let dst = unsafe { vma.as_mut_slice() };
    src.read_exact(dst).unwrap();
    assert_eq!(fh.dirty_blocks(), (0..32).collect::<Vec<_>>());
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert!(!fh.is_dirty());
    for (b, want) in data.chunks(BLK).enumerate() {
        assert!(file.content(b as u64) == want, "block {b} stored");
    }
}

/// A buffer of 64 blocks under a budget of 16 pages: read ahead only as far
/// as the budget has room or pages the call has passed (the RAM never
/// holds more than the budget and one block), and the call still copies
/// every block right.
#[test]
fn a_buffer_larger_than_the_budget_is_read_ahead_within_it() {
    let Some((file, ram, fh)) = on_uffd(16) else {
        return;
    };
    let most = Arc::new(AtomicU64::new(0));
    {
        let (ram, most) = (ram.clone(), most.clone());
        file.on_load(move |_, _| {
            most.fetch_max(ram.stats().resident_bytes, SeqCst);
            Ok(())
        });
    }
    let vma = fh.mmap(0, 64).unwrap();
    let got = write_out(&vma);
    file.clear_load_hook();
    let s = fh.stats();
    assert!(
        most.load(SeqCst) <= ram.budget() + BLK as u64,
        "{} resident at most: {:?}",
        most.load(SeqCst),
        ram.stats()
    );
    assert!(s.readahead_loads >= 32, "{s:?}");
    assert!(s.faults < 32, "{s:?}");
    assert!(holds_initial(&got, 0..64));
    let resident = (0..64).filter(|&b| fh.page_state(b).is_some()).count();
    assert!(resident <= 16, "{resident} pages");
    assert!((0..64).all(|b| fh.page_state(b) != Some(PageState::Loading)));
}

/// A block whose read-ahead load fails (every attempt the load policy
/// allows) is forgotten: the worker's wait for the buffer's loads ends, the
/// call copies up to that block, faults there, and its own load (which
/// succeeds) serves it; the call succeeds with the right data.
#[test]
fn a_failed_read_ahead_load_is_loaded_again_by_the_call() {
    let Some((file, _ram, fh)) = on_uffd(128) else {
        return;
    };
    let attempts = Arc::new(AtomicU64::new(0));
    {
        let attempts = attempts.clone();
        file.on_load(move |blk, _| match blk {
            10 if attempts.fetch_add(1, SeqCst) < 3 => Err("block 10 not yet".into()),
            _ => Ok(()),
        });
    }
    let vma = fh.mmap(0, 32).unwrap();
    let got = write_out(&vma);
    assert!(holds_initial(&got, 0..32), "the file got the blocks' data");
    assert_eq!(attempts.load(SeqCst), 4, "3 failed, then the call's");
    let s = fh.stats();
    assert!(s.faults >= 2, "the call faulted again on block 10: {s:?}");
    assert!(s.readahead_loads >= 28, "{s:?}");
}

/// Found in review: a `write(2)` to a non-blocking descriptor (an event
/// loop's socket or pipe) takes only what fits, yet its whole buffer was
/// read ahead, and the call waited for those loads (up to the budget)
/// before copying anything: an event loop stalled for seconds. Such a
/// call's buffer is not followed: the blocks loaded are about what the
/// pipe took, plus a stream's window.
#[test]
fn a_write_to_a_non_blocking_pipe_does_not_read_its_buffer_ahead() {
    use std::os::fd::AsRawFd;
    let Some((file, _ram, fh)) = on_uffd(64) else {
        return;
    };
    let vma = fh.mmap(0, 32).unwrap();
    let mut fds = [0; 2];
    // SAFETY: two descriptors written into `fds`, owned below.
    let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    assert_eq!(made, 0);
    // SAFETY: just made, owned by nothing else.
    let (r, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: nothing writes the mapping while the slice lives.
    let src = unsafe { vma.as_slice() };
    // SAFETY: `src` is live memory of ours; the kernel checks it.
    let n = unsafe { libc::write(w.as_raw_fd(), src.as_ptr().cast(), src.len()) };
    assert!(
        n > 0 && (n as usize) < src.len(),
        "a pipe takes what fits: {n}"
    );
    let loaded = file.loads();
    // 64 KiB of pipe: one or two blocks, and a stream's window (at most 8).
    assert!(
        loaded <= 12,
        "{loaded} blocks loaded for a write that took {n} bytes"
    );
    drop((r, w));
}

/// Found in review: the worker serving a `write(2)`'s fault waits for the
/// loads it read ahead for the call's buffer, and they were queued on the
/// read-ahead workers behind loads of a loader that takes the host lock,
/// waiting for it, held by the very thread in the call (Python: a C
/// extension's `write(2)` with the GIL held): the call never returned.
/// Such loaders' jobs now go to workers of their own.
#[test]
fn a_calls_read_ahead_does_not_queue_behind_loads_that_wait_for_the_caller() {
    let Some((_file, ram, fh)) = on_uffd(128) else {
        return;
    };
    // The host loader's blocks after the first wait until the call is done
    // (as for the GIL the calling thread holds).
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let mem = MemFile::new(BLK);
    let waiting = Arc::new(AtomicU64::new(0));
    {
        let (gate, waiting) = (gate.clone(), waiting.clone());
        mem.on_load(move |blk, _| {
            if blk > 0 {
                waiting.fetch_add(1, SeqCst);
                let (open, cv) = &*gate;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
            }
            Ok(())
        });
    }
    let host = Arc::new(HostLoader {
        mem,
        reads_ahead: true,
    });
    let hfh = FileH::open(host, Some(&ram)).unwrap();
    let hvma = hfh.mmap(0, 16).unwrap();
    hvma.advise(bigfile::virtmem::Advice::Sequential);
    // Its first fault reads a window ahead: a job on every read-ahead
    // worker, each waiting at the gate.
    assert_eq!(crate::common::peek(hvma.as_ptr()), MemFile::initial(0));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while waiting.load(SeqCst) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let vma = Arc::new(fh.mmap(0, 16).unwrap());
    let (done_tx, done) = std::sync::mpsc::channel();
    let writer = {
        let vma = vma.clone();
        std::thread::spawn(move || {
            let got = write_out(&vma);
            let _ = done_tx.send(());
            got
        })
    };
    let finished = done
        .recv_timeout(std::time::Duration::from_secs(20))
        .is_ok();
    let (open, cv) = &*gate;
    *open.lock().unwrap() = true;
    cv.notify_all();
    let got = writer.join().unwrap();
    assert!(
        finished,
        "the write waited for the gate (its read-ahead queued behind the host loads)"
    );
    assert!(holds_initial(&got, 0..16));
}
