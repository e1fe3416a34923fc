//! The userfaultfd backend on a hugetlbfs RAM: 2 MiB pages, each one
//! page-table entry, made present and write-protected as a whole. Needs
//! root (the huge page pool is resized for the test, under the machine-wide
//! lock of `bigfile_testkit::hugepages`) and a userfaultfd with minor
//! faults on hugetlbfs (Linux 5.13+); where the pool cannot be resized or
//! the process has no userfaultfd the test says `SKIPPED` and passes, as
//! bigfile-ram's pool tests do.

use std::io::{Read, Seek, Write};

use bigfile::virtmem::{FaultBackend, Ram, WriteoutFlags};
use bigfile_testkit::hugepages::HugePages;

use crate::common::{mem_file, open, peek, poke, MemFile};

const HUGE: usize = 2 << 20;
/// The RAM's budget, in pages; the pool holds twice as many (room for the
/// spares reclaim keeps ahead of need).
const BUDGET: u64 = 3;

fn skip(why: &str) {
    eprintln!("SKIPPED: {why}");
    println!("SKIPPED: {why}");
}

/// A file of `len` bytes holding `byte`, open for reading from its start.
fn bytes_file(name: &str, byte: u8, len: usize) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("bigfile-it-{name}-{}", std::process::id()));
    let mut f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f.write_all(&vec![byte; len]).unwrap();
    f.rewind().unwrap();
    f
}

/// A hugetlbfs RAM of `BUDGET` pages on userfaultfd, with the pool that
/// holds it (kept as long as the RAM); None (said SKIPPED) where the pool
/// cannot be resized or the process has no userfaultfd.
fn hugetlbfs_ram() -> Option<(HugePages, Ram)> {
    let pool = match HugePages::set(2 * BUDGET + 2) {
        Ok(p) => p,
        Err(why) => {
            skip(&why);
            return None;
        }
    };
    // Skipped where the process has no userfaultfd at all (a memfd RAM is
    // refused it too); where it has one, a hugetlbfs RAM must get it.
    if let Err(why) = Ram::from_spec("memfd,pagesize=2M")
        .unwrap()
        .with_fault_backend(FaultBackend::Userfaultfd)
    {
        skip(&format!("no userfaultfd: {why}"));
        return None;
    }
    let ram = Ram::from_spec("hugetlbfs,pagesize=2M")
        .unwrap()
        .with_budget(BUDGET * HUGE as u64)
        .with_fault_backend(FaultBackend::Userfaultfd)
        .unwrap();
    Some((pool, ram))
}

#[test]
fn hugetlbfs_pages_on_userfaultfd_load_track_writes_and_go() {
    let Some((_pool, ram)) = hugetlbfs_ram() else {
        return;
    };
    assert_eq!(ram.fault_backend(), FaultBackend::Userfaultfd);
    let file = mem_file(HUGE);
    let fh = open(&file, &ram);
    let vma = fh.mmap(0, 6).unwrap();
    let at = |blk: usize, off: usize| vma.as_ptr().wrapping_add(blk * HUGE + off);

    // Load: a user read, anywhere in the page.
    assert_eq!(peek(at(0, HUGE - 1)), MemFile::initial(0));
    assert_eq!(file.loads(), 1);
    assert!(fh.dirty_blocks().is_empty(), "a read leaves the page clean");

    // A user write into a clean page is tracked.
    poke(at(1, 4096 * 3 + 7), 0xa1);
    assert_eq!(fh.dirty_blocks(), [1]);

    // A kernel write (read(2)) into a clean loaded page is tracked, and
    // into a page not loaded is served.
    assert_eq!(peek(at(2, 0)), MemFile::initial(2));
    let mut src = bytes_file("hugetlb-src", 0xb2, 2 * HUGE);
    // SAFETY: nothing else touches these bytes while the slice lives.
    let dst = unsafe { std::slice::from_raw_parts_mut(at(2, HUGE - 100), 200) };
    assert_eq!(src.read(dst).unwrap(), 200);
    assert_eq!(fh.dirty_blocks(), [1, 2, 3]);
    assert_eq!(peek(at(2, HUGE - 1)), 0xb2);
    assert_eq!(peek(at(3, 99)), 0xb2);
    assert_eq!(peek(at(3, 100)), MemFile::initial(3));

    // Writeout stores the three, which are clean (write-protected) again:
    // the next user and kernel writes are tracked anew.
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert!(fh.dirty_blocks().is_empty());
    assert_eq!(file.content(1)[4096 * 3 + 7], 0xa1);
    assert_eq!(file.content(2)[HUGE - 100], 0xb2);
    assert_eq!(file.content(3)[..100], [0xb2; 100]);
    poke(at(1, 0), 0xa2);
    let mut src = bytes_file("hugetlb-src2", 0xb3, 10);
    // SAFETY: as above.
    let dst = unsafe { std::slice::from_raw_parts_mut(at(2, 5000), 10) };
    assert_eq!(src.read(dst).unwrap(), 10);
    assert_eq!(fh.dirty_blocks(), [1, 2]);
    fh.dirty_discard().unwrap();
    assert_eq!(
        peek(at(1, 0)),
        MemFile::initial(1),
        "discarded: loaded again"
    );
    assert_eq!(
        peek(at(2, 5000)),
        MemFile::initial(2),
        "discarded: as stored"
    );
    assert_eq!(peek(at(2, HUGE - 1)), 0xb2, "as stored");

    // Reclaim: within the budget of 3 pages, touching 6 reclaims; every
    // page reads back what the file holds, loaded again.
    let loads = file.loads();
    for blk in 0..6 {
        assert_eq!(peek(at(blk, 12345)), file.content(blk as u64)[12345]);
    }
    assert!(fh.stats().reclaims > 0);
    assert!(file.loads() > loads);
    assert!(ram.stats().stats.resident_pages <= BUDGET + 1);
    assert!(ram.reclaim() > 0);
    assert_eq!(
        peek(at(0, 1)),
        MemFile::initial(0),
        "loaded after a reclaim"
    );

    // Invalidate: the new content shows at the next access.
    file.put(0, vec![0xc4; HUGE]);
    fh.invalidate_page(0).unwrap();
    assert_eq!(peek(at(0, HUGE / 2)), 0xc4);

    // The kernel reads from pages not loaded too (write(2) from them).
    ram.reclaim();
    let mut sink = bytes_file("hugetlb-sink", 0, 0);
    // SAFETY: as above.
    let from = unsafe { std::slice::from_raw_parts(at(4, HUGE - 8), 16) };
    assert_eq!(sink.write(from).unwrap(), 16);
    sink.rewind().unwrap();
    let mut back = Vec::new();
    sink.read_to_end(&mut back).unwrap();
    assert_eq!(back[..8], [MemFile::initial(4); 8]);
    assert_eq!(back[8..], [MemFile::initial(5); 8]);
    assert!(fh.dirty_blocks().is_empty());
    drop(vma);
    drop(fh);
    assert_eq!(ram.stats().stats.resident_pages, 0);
}

/// A load that fails inside a system call fails the call (EFAULT: the
/// 2 MiB page is poisoned whole); a user access then loads the page.
#[test]
fn hugetlbfs_page_whose_load_fails_in_a_system_call_fails_it() {
    let Some((_pool, ram)) = hugetlbfs_ram() else {
        return;
    };
    let file = mem_file(HUGE);
    file.on_load(|blk, _| match blk {
        1 => Err("block 1 is unreadable".into()),
        _ => Ok(()),
    });
    let fh = open(&file, &ram);
    let vma = fh.mmap(0, 2).unwrap();
    let mut sink = bytes_file("hugetlb-efault", 0, 0);
    // SAFETY: read by write(2) only while the slice lives.
    let from = unsafe { std::slice::from_raw_parts(vma.as_ptr().wrapping_add(HUGE + 4096), 64) };
    let err = sink.write(from).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    file.clear_load_hook();
    assert_eq!(
        peek(vma.as_ptr().wrapping_add(HUGE + 8192)),
        MemFile::initial(1)
    );
    assert_eq!(sink.write(from).unwrap(), 64);
    assert!(fh.stats().load_errors > 0);
}
