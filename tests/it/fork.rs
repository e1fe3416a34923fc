//! fork(2): nothing a child does changes what its parent sees or stores,
//! and the child's inherited mappings work, starting with nothing
//! resident and nothing dirty, on memory of its own.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::thread;

use bigfile::virtmem::{FaultBackend, PageState, WriteoutFlags};
use bigfile_testkit::child::{forked, TIMEOUT};

use crate::common::{peek, poke, setup, MemFile, BLK};

/// The byte at offset `off` of block `blk` of a mapping from block 0.
fn at(base: *mut u8, blk: usize, off: usize) -> *mut u8 {
    base.wrapping_add(blk * BLK + off)
}

#[test]
fn a_forked_child_reads_writes_reclaims_and_exits_without_touching_the_parent() {
    let (file, ram, fh, vma) = setup(2, 16);
    let backend = ram.fault_backend();
    let base = vma.as_ptr();
    poke(at(base, 0, 7), 0xaa); // dirty in the parent
    assert_eq!(peek(at(base, 1, 0)), MemFile::initial(1)); // clean
    for how in ["exit", "close", "abort"] {
        let status = forked(
            || {
                // Nothing of the parent's: not its dirty page, not its
                // loaded one, no memory.
                let fresh = fh.dirty_blocks().is_empty()
                    && fh.page_state(1).is_none()
                    && ram.stats().resident_bytes == 0
                    && vma.mapped_pages().is_empty();
                // The file's data, not the parent's change; a scan of
                // more blocks than the budget (reclaims); writes and a
                // commit to the storage (the child's copy of the memory
                // file), a discard, an invalidation.
                let mut ok = fresh && peek(at(base, 0, 7)) == MemFile::initial(0);
                // A userfaultfd is its opener's: the child's inherited
                // mappings are on the signal backend (its registrations
                // would be the parent's; its own RAMs get a userfaultfd of
                // its own: `fork_uffd.rs`).
                ok &= ram.fault_backend() == FaultBackend::Signals
                    && (backend == FaultBackend::Signals
                        || ram
                            .fault_backend_fallback()
                            .is_some_and(|why| why.contains("forked child")));
                for blk in 0..16 {
                    ok &= peek(at(base, blk, 1)) == MemFile::initial(blk as u64);
                }
                poke(at(base, 1, 0), 0x11);
                poke(at(base, 0, 7), 0x22);
                ok &= fh
                    .dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
                    .is_ok()
                    && file.content(1)[0] == 0x11;
                poke(at(base, 2, 0), 0x33);
                ok &= fh.dirty_discard().is_ok() && fh.invalidate_page(1).is_ok();
                ok &= ram.stats().resident_bytes <= ram.budget() + BLK as u64;
                ram.reclaim();
                ok &= ram.stats().resident_bytes == 0;
                match how {
                    "close" => {
                        // Unmapping and closing give back the child's pages
                        // only (hole punches in its own memory).
                        // SAFETY: the parent's `vma` is not used again in
                        // this child, which exits next.
                        let vma = unsafe { std::ptr::read(&vma) };
                        drop(vma);
                        // SAFETY: as above, for the handle.
                        let fh = unsafe { std::ptr::read(&fh) };
                        ok &= fh.close().is_ok();
                    }
                    // SAFETY: abort has no preconditions: the child dies
                    // with its pages resident and dirty.
                    "abort" => unsafe { libc::abort() },
                    _ => {}
                }
                ok
            },
            TIMEOUT,
        )
        .unwrap();
        match how {
            "abort" => assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(libc::SIGABRT)
            ),
            _ => assert!(status.success(), "{how}: the child saw the parent's pages"),
        }
        // The parent's pages are as they were, on the same backend.
        assert_eq!(ram.fault_backend(), backend);
        assert_eq!(peek(at(base, 0, 7)), 0xaa, "{how}");
        assert_eq!(peek(at(base, 1, 0)), MemFile::initial(1), "{how}");
        assert_eq!(fh.dirty_blocks(), [0], "{how}");
        assert_eq!(fh.page_state(1), Some(PageState::Loaded), "{how}");
        assert_eq!(
            file.content(1)[0],
            MemFile::initial(1),
            "{how}: the child's commit"
        );
    }
    for blk in 2..16 {
        assert_eq!(peek(at(base, blk, 0)), MemFile::initial(blk as u64));
    }
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(file.content(0)[7], 0xaa);
}

/// A fork while another thread is inside a `loadblk` and holds nothing:
/// in the child that load never ends (its thread is not there), so the
/// child must not wait for it: it loads the block itself.
#[test]
fn a_forked_child_does_not_wait_for_a_load_of_a_thread_it_does_not_have() {
    let (file, _ram, fh, vma) = setup(4, 4);
    let (inside, entered) = channel();
    let inside = Mutex::new(inside);
    let release = Arc::new(AtomicBool::new(false));
    let held = release.clone();
    file.on_load(move |blk, _| {
        if blk == 2 && !held.load(SeqCst) {
            let _ = inside.lock().unwrap().send(());
            while !held.load(SeqCst) {
                thread::yield_now();
            }
        }
        Ok(())
    });
    let base = vma.as_ptr() as usize;
    let loader = thread::spawn(move || peek(at(base as *mut u8, 2, 0)));
    entered.recv().unwrap();
    let status = forked(
        || {
            // The loader's hook would block here too: let it pass.
            release.store(true, SeqCst);
            fh.page_state(2).is_none() && peek(at(base as *mut u8, 2, 0)) == MemFile::initial(2)
        },
        TIMEOUT,
    );
    release.store(true, SeqCst);
    assert_eq!(loader.join().unwrap(), MemFile::initial(2));
    assert!(
        status.unwrap().success(),
        "the child did not load block 2 itself"
    );
}
