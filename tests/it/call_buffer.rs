//! Read-ahead of a system call's buffer on the userfaultfd backend
//! (ARCHITECTURE.md, "Read-ahead", "A system call's buffer"): a `write(2)`
//! from a mapping not loaded, or a `read(2)` into one, faults once; the
//! worker serving that fault reads the rest of the buffer ahead, maps it,
//! and wakes the call once it is loaded, so that the kernel copies it
//! without another fault.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use bigfile::virtmem::{FaultBackend, FileH, PageState, Ram, WriteoutFlags};

use crate::common::{ram, MemFile, BLK};

/// A native memory file (read ahead), a RAM of `budget` pages on the
/// userfaultfd backend and a handle; `None` (said) where this process
/// cannot have userfaultfd, unless it must (`BIGFILE_REQUIRE_UFFD`).
fn on_uffd(budget: u64) -> Option<(Arc<MemFile>, Ram, FileH)> {
    let ram = match ram(budget).with_fault_backend(FaultBackend::Userfaultfd) {
        Ok(ram) => ram,
        Err(e) if std::env::var_os("BIGFILE_REQUIRE_UFFD").is_none() => {
            eprintln!("no userfaultfd here ({e}): nothing to test");
            return None;
        }
        Err(e) => panic!("userfaultfd required: {e}"),
    };
    let file = Arc::new(MemFile::new(BLK).native());
    let fh = FileH::open(file.clone(), Some(&ram)).unwrap();
    Some((file, ram, fh))
}

/// A scratch file of this test's own.
fn scratch(name: &str) -> (std::fs::File, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "bigfile-it-call-buffer-{name}-{}",
        std::process::id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    (f, path)
}

/// Whether `got` holds blocks `blocks` of the memory file as first loaded.
fn holds_initial(got: &[u8], blocks: std::ops::Range<u64>) -> bool {
    blocks
        .zip(got.chunks(BLK))
        .all(|(b, chunk)| chunk.iter().all(|&x| x == MemFile::initial(b)))
}

/// One `write(2)` of 64 blocks not loaded: one fault; the 63 blocks after
/// it read ahead (not a stream's window: all of them) and mapped before the
/// call copies them. (Without: a stream's read-ahead, about one fault per
/// half window, 4 blocks of 64 KiB here.)
#[test]
fn a_write_from_an_unloaded_mapping_reads_its_buffer_ahead() {
    let Some((file, _ram, fh)) = on_uffd(128) else {
        return;
    };
    let vma = fh.mmap(0, 64).unwrap();
    let (mut out, path) = scratch("write");
    // SAFETY: nothing writes the mapping while the slice lives.
    let src = unsafe { vma.as_slice() };
    out.write_all(src).unwrap();
    let s = fh.stats();
    assert!(s.faults <= 4, "one fault for the whole call: {s:?}");
    assert!(s.readahead_loads >= 60, "{s:?}");
    assert_eq!(file.loads(), 64, "every block loaded once");
    let mut got = Vec::new();
    out.seek(SeekFrom::Start(0)).unwrap();
    out.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), 64 * BLK);
    assert!(holds_initial(&got, 0..64), "the file got the blocks' data");
    drop(out);
    let _ = std::fs::remove_file(path);
}

/// One `read(2)` into 32 blocks not loaded: read ahead as for a write, and
/// every page the kernel wrote is dirty (its write-protect fault served as
/// a write) and written out.
#[test]
fn a_read_into_an_unloaded_mapping_dirties_what_it_wrote() {
    let Some((file, _ram, fh)) = on_uffd(64) else {
        return;
    };
    let vma = fh.mmap(0, 32).unwrap();
    let (mut src, path) = scratch("read");
    let data: Vec<u8> = (0..32 * BLK).map(|i| (i / 4096 % 251) as u8).collect();
    src.write_all(&data).unwrap();
    src.seek(SeekFrom::Start(0)).unwrap();
    // SAFETY: nothing else accesses the mapping while the slice lives.
    let dst = unsafe { vma.as_mut_slice() };
    src.read_exact(dst).unwrap();
    let s = fh.stats();
    assert!(s.readahead_loads >= 28, "{s:?}");
    assert_eq!(fh.dirty_blocks(), (0..32).collect::<Vec<_>>());
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert!(!fh.is_dirty());
    for (b, want) in data.chunks(BLK).enumerate() {
        assert!(file.content(b as u64) == want, "block {b} stored");
    }
    drop(src);
    let _ = std::fs::remove_file(path);
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
    let (mut out, path) = scratch("budget");
    // SAFETY: nothing writes the mapping while the slice lives.
    out.write_all(unsafe { vma.as_slice() }).unwrap();
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
    let mut got = Vec::new();
    out.seek(SeekFrom::Start(0)).unwrap();
    out.read_to_end(&mut got).unwrap();
    assert!(holds_initial(&got, 0..64));
    let resident = (0..64).filter(|&b| fh.page_state(b).is_some()).count();
    assert!(resident <= 16, "{resident} pages");
    assert!((0..64).all(|b| fh.page_state(b) != Some(PageState::Loading)));
    drop(out);
    let _ = std::fs::remove_file(path);
}
