//! The userfaultfd backend on a hugetlbfs RAM: 2 MiB pages, each one
//! page-table entry, made present and write-protected as a whole. Needs
//! root (the huge page pool is resized for the test, under the machine-wide
//! lock of `bigfile_testkit::hugepages`) and a userfaultfd with minor
//! faults on hugetlbfs (Linux 5.13+); where the pool cannot be resized or
//! the process has no userfaultfd the test says `SKIPPED` and passes, as
//! bigfile-ram's pool tests do.

use std::io::{Read, Seek, Write};
use std::sync::Arc;

use bigfile::virtmem::{FaultBackend, FileH, Ram, Vma, WriteoutFlags};
use bigfile_testkit::child::{self, Death};
use bigfile_testkit::hugepages::HugePages;

use crate::common::{mappings_in, mem_file, open, peek, poke, read_each, MemFile};

/// The variable naming the scenario a child of this test binary runs.
const CHILD_ENV: &str = "BIGFILE_IT_HUGETLB_CHILD";

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
    hugetlbfs_ram_of(HUGE, 2 * BUDGET + 2, BUDGET)
}

/// The pool resized to `pool` huge pages, or None (said SKIPPED).
fn pool_of(pool: u64) -> Option<HugePages> {
    HugePages::set(pool).map_err(|why| skip(&why)).ok()
}

/// [`hugetlbfs_ram`] of pages of `page` bytes (a multiple of the huge
/// page), with a pool of `pool` huge pages and a budget of `budget` pages.
fn hugetlbfs_ram_of(page: usize, pool: u64, budget: u64) -> Option<(HugePages, Ram)> {
    let pool = pool_of(pool)?;
    // Skipped where the process has no userfaultfd at all (a memfd RAM is
    // refused it too); where it has one, a hugetlbfs RAM must get it.
    if let Err(why) = Ram::from_spec("memfd,pagesize=2M")
        .unwrap()
        .with_fault_backend(FaultBackend::Userfaultfd)
    {
        skip(&format!("no userfaultfd: {why}"));
        return None;
    }
    let ram = Ram::from_spec(&format!("hugetlbfs,pagesize={page}"))
        .unwrap()
        .with_budget(budget * page as u64)
        .with_fault_backend(FaultBackend::Userfaultfd)
        .unwrap();
    Some((pool, ram))
}

/// A hugetlbfs RAM on userfaultfd ([`hugetlbfs_ram`]), a memory file of
/// huge blocks, a handle of it on the RAM and a mapping of its first
/// blocks; dropped in that order, the pool last.
struct Mapped {
    vma: Vma,
    fh: FileH,
    file: Arc<MemFile>,
    ram: Ram,
    _pool: HugePages,
}

impl Mapped {
    /// `blocks` blocks mapped; None (said SKIPPED) as for [`hugetlbfs_ram`].
    fn new(blocks: u64) -> Option<Mapped> {
        let (pool, ram) = hugetlbfs_ram()?;
        let file = mem_file(HUGE);
        let fh = open(&file, &ram);
        let vma = fh.mmap(0, blocks).unwrap();
        Some(Mapped {
            vma,
            fh,
            file,
            ram,
            _pool: pool,
        })
    }

    /// Byte `off` of block `blk` of the mapping.
    fn at(&self, blk: usize, off: usize) -> *mut u8 {
        self.vma.as_ptr().wrapping_add(blk * HUGE + off)
    }
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

/// `write(2)` of `len` bytes from `from`: its result.
fn write_from(from: *const u8, len: usize) -> std::io::Result<usize> {
    let mut sink = bytes_file("hugetlb-write", 0, 0);
    // SAFETY: read by write(2) only while the slice lives.
    sink.write(unsafe { std::slice::from_raw_parts(from, len) })
}

/// Review: a load failing inside a system call on a page reclaimed before
/// (its slot a hugetlbfs piece, registered, with nothing mapped: the
/// poison goes on the hugetlbfs mapping, not on the reservation) fails the
/// call, and the next user access loads it.
#[test]
fn hugetlbfs_piece_whose_load_fails_in_a_system_call_fails_it() {
    let Some(m) = Mapped::new(2) else {
        return;
    };
    let (file, fh, ram, vma) = (&m.file, &m.fh, &m.ram, &m.vma);
    let at = |off: usize| m.at(1, off);
    assert_eq!(peek(at(5)), MemFile::initial(1));
    assert!(ram.reclaim() > 0);
    assert!(vma.mapped_pages().is_empty());
    file.on_load(|blk, _| match blk {
        1 => Err("block 1 is unreadable".into()),
        _ => Ok(()),
    });
    let err = write_from(at(HUGE / 2), 64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    file.clear_load_hook();
    assert_eq!(peek(at(HUGE - 1)), MemFile::initial(1), "loaded again");
    assert_eq!(write_from(at(HUGE / 2), 64).unwrap(), 64);
    assert!(fh.stats().load_errors > 0);
}

/// Review: two mappings of one handle on hugetlbfs show one page, a write
/// through either is tracked (each mapping's entry is write-protected),
/// and a reclaim takes the page from both.
#[test]
fn two_mappings_of_a_hugetlbfs_handle_share_pages_and_track_writes() {
    let Some(m) = Mapped::new(2) else {
        return;
    };
    let (file, fh, ram, a) = (&m.file, &m.fh, &m.ram, &m.vma);
    let b = fh.mmap(0, 2).unwrap();
    let at = |v: &Vma, blk: usize, off: usize| v.as_ptr().wrapping_add(blk * HUGE + off);
    assert_eq!(peek(at(a, 1, 10)), MemFile::initial(1));
    assert_eq!(peek(at(&b, 1, 10)), MemFile::initial(1));
    assert_eq!(file.loads(), 1, "one page for both");
    poke(at(&b, 1, 20), 0x5b);
    assert_eq!(fh.dirty_blocks(), [1]);
    assert_eq!(peek(at(a, 1, 20)), 0x5b);
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    // Clean again in both (the second, written through, protected again):
    // a kernel write through either is tracked.
    let kernel_write = |v: &Vma, byte: u8| {
        let mut src = bytes_file("hugetlb-two", byte, 8);
        // SAFETY: nothing else touches these bytes while the slice lives.
        let dst = unsafe { std::slice::from_raw_parts_mut(at(v, 1, 30), 8) };
        assert_eq!(src.read(dst).unwrap(), 8);
    };
    kernel_write(&b, 0x6a);
    assert_eq!(fh.dirty_blocks(), [1]);
    assert_eq!(peek(at(a, 1, 37)), 0x6a);
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(file.content(1)[30..38], [0x6a; 8]);
    poke(at(a, 1, 50), 0x6b);
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    kernel_write(a, 0x6c);
    assert_eq!(fh.dirty_blocks(), [1]);
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(file.content(1)[30..38], [0x6c; 8]);
    assert_eq!(file.content(1)[50], 0x6b);
    assert!(ram.reclaim() > 0);
    assert!(a.mapped_pages().is_empty() && b.mapped_pages().is_empty());
    file.put(1, vec![0x7c; HUGE]);
    fh.invalidate_page(1).unwrap();
    assert_eq!(peek(at(&b, 1, 0)), 0x7c);
    assert_eq!(peek(at(a, 1, HUGE - 1)), 0x7c);
}

/// Every free page of the pool, taken by a hugetlbfs file of another's:
/// the pool runs out under the RAM's feet. Given back on drop.
fn take_the_pool_free() -> std::fs::File {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    // SAFETY: a NUL-terminated name; the descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"hugetlb-hog".as_ptr(), libc::MFD_HUGETLB) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just made, owned by nothing else.
    let hog = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let len = (free * HUGE as u64) as libc::off_t;
    // SAFETY: fallocate on a descriptor we own.
    let rc = unsafe { libc::fallocate(fd, 0, 0, len) };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    hog
}

/// Review: the pool runs out mid-run (another user takes the free huge
/// pages). Loads then reclaim clean pages to make room; with every page
/// dirty, a system call's load fails with EFAULT (a diagnostic on stderr)
/// rather than hang or SIGBUS, and once the pages are written out the
/// call succeeds.
#[test]
fn a_hugetlbfs_pool_that_runs_out_reclaims_then_fails_the_load() {
    let Some(m) = Mapped::new(6) else {
        return;
    };
    let (file, fh, ram, vma) = (&m.file, &m.fh, &m.ram, &m.vma);
    let at = |blk: usize, off: usize| m.at(blk, off);
    assert_eq!(peek(at(0, 77)), MemFile::initial(0));
    assert_eq!(peek(at(1, 77)), MemFile::initial(1));
    let held = ram.stats().stats.resident_pages;
    let hog = take_the_pool_free();
    // Reads of more pages than the pool has left: each reclaims.
    for blk in 2..6 {
        assert_eq!(peek(at(blk, 77)), MemFile::initial(blk as u64));
    }
    assert!(ram.stats().stats.resident_pages <= held);
    assert!(fh.stats().reclaims > 0);
    // Every page the RAM has, dirty: nothing to reclaim.
    let resident = vma.mapped_pages();
    assert!(!resident.is_empty());
    for &blk in &resident {
        poke(at(blk as usize, 1), 0xd0 + blk as u8);
    }
    assert_eq!(fh.dirty_blocks().len(), resident.len());
    let other = (0..6).find(|b| !resident.contains(b)).unwrap() as usize;
    let err = write_from(at(other, 100), 16).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    let blk = resident[0];
    assert_eq!(file.content(blk)[1], 0xd0 + blk as u8);
    // The failed page's poison lasts a moment: a user access clears it.
    assert_eq!(peek(at(other, 100)), MemFile::initial(other as u64));
    assert_eq!(write_from(at(other, 100), 16).unwrap(), 16);
    drop(hog);
}

/// Review: a forked child of a process whose hugetlbfs RAM is on
/// userfaultfd reads, writes and writes out through the inherited mapping
/// (on signals, on a hugetlbfs file of its own), and the parent's pages
/// are as they were.
#[test]
fn a_forked_child_uses_its_hugetlbfs_ram_without_touching_the_parent() {
    let Some(m) = Mapped::new(6) else {
        return;
    };
    let (file, fh, ram) = (&m.file, &m.fh, &m.ram);
    let at = |blk: usize, off: usize| m.at(blk, off);
    poke(at(0, 7), 0xaa);
    assert_eq!(peek(at(1, 0)), MemFile::initial(1));
    let status = bigfile_testkit::child::forked(
        || {
            let mut ok = fh.dirty_blocks().is_empty()
                && ram.fault_backend() == FaultBackend::Signals
                && peek(at(0, 7)) == MemFile::initial(0);
            for blk in 0..6 {
                ok &= peek(at(blk, HUGE - 1)) == MemFile::initial(blk as u64);
            }
            poke(at(1, 0), 0x11);
            ok &= fh
                .dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
                .is_ok()
                && file.content(1)[0] == 0x11;
            ram.reclaim();
            ok && ram.stats().resident_bytes == 0
        },
        bigfile_testkit::child::TIMEOUT,
    )
    .unwrap();
    assert!(status.success(), "the child: {status:?}");
    assert_eq!(ram.fault_backend(), FaultBackend::Userfaultfd);
    assert_eq!(peek(at(0, 7)), 0xaa);
    assert_eq!(peek(at(1, 0)), MemFile::initial(1));
    assert_eq!(fh.dirty_blocks(), [0]);
    assert_eq!(
        file.content(1)[0],
        MemFile::initial(1),
        "the child's commit"
    );
    // Kernel writes are still tracked in the parent.
    let mut src = bytes_file("hugetlb-fork", 0x3c, 4);
    // SAFETY: nothing else touches these bytes while the slice lives.
    let dst = unsafe { std::slice::from_raw_parts_mut(at(1, 40), 4) };
    assert_eq!(src.read(dst).unwrap(), 4);
    assert_eq!(fh.dirty_blocks(), [0, 1]);
}

/// A kernel whose userfaultfd lacks minor faults on hugetlbfs (here the
/// feature the kernel granted is hidden, in a child): with
/// `BIGFILE_FAULTS=auto` a hugetlbfs RAM is on signals and says why, asked
/// for explicitly userfaultfd is an error, its pages load; a memfd RAM of
/// the same process is still on userfaultfd (where the process has it) and
/// serves a system call from pages not loaded.
#[test]
fn without_minor_faults_on_hugetlbfs_a_hugetlbfs_ram_falls_back_to_signals() {
    let Some(_pool) = pool_of(2 * BUDGET + 2) else {
        return;
    };
    let env = [
        ("BIGFILE_FAULTS", "auto"),
        ("BIGFILE_UFFD_HIDE_FEATURES", "minor_hugetlbfs"),
    ];
    let ended = run_scenario("no_minor_hugetlbfs", &env);
    assert!(ended.status.success(), "{}", ended.describe());
    let out = ended.stdout;
    assert!(out.contains("hugetlbfs auto: signals"), "{out}");
    assert!(out.contains("hugetlbfs asked for: error"), "{out}");
    assert!(out.contains("hugetlbfs read: ok"), "{out}");
    let memfd_uffd = Ram::from_spec("memfd,pagesize=2M")
        .unwrap()
        .with_fault_backend(FaultBackend::Userfaultfd)
        .is_ok();
    if memfd_uffd || std::env::var_os("BIGFILE_REQUIRE_UFFD").is_some() {
        // Refused for the missing feature only, both ways.
        assert_eq!(
            out.matches("UFFD_FEATURE_MINOR_HUGETLBFS").count(),
            2,
            "{out}"
        );
        assert!(out.contains("memfd auto: userfaultfd"), "{out}");
        assert!(out.contains("memfd write(2): ok"), "{out}");
    }
}

/// Run `scenario` of [`child`] in a child of this test binary, with `env`
/// set, to its end.
fn run_scenario(scenario: &str, env: &[(&str, &str)]) -> child::Ended {
    let mut cmd = child::test_child("hugetlb::child", CHILD_ENV, scenario);
    cmd.envs(env.iter().copied());
    child::run(cmd, child::TIMEOUT).unwrap()
}

/// The scenarios run in a child of this test binary.
#[test]
fn child() {
    let Some(scenario) = child::scenario(CHILD_ENV) else {
        return;
    };
    match scenario.as_str() {
        "no_minor_hugetlbfs" => report_hugetlbfs_and_memfd(),
        "pool_out_user" => pool_runs_out_under_a_user_access(),
        other => panic!("unknown scenario {other}"),
    }
}

/// Review: the pool runs out with every page of the RAM dirty, and a user
/// access needs another: the process dies of SIGBUS with a diagnostic
/// naming the block and the RAM's exhaustion (no hang, no silent zeros).
#[test]
fn a_hugetlbfs_pool_that_runs_out_under_a_user_access_is_sigbus_with_diagnostic() {
    let Some(_pool) = pool_of(2 * BUDGET + 2) else {
        return;
    };
    let ended = run_scenario("pool_out_user", &[]);
    if ended.stdout.contains("SKIPPED") {
        return;
    }
    let death = Death::by(libc::SIGBUS).stderr(&["no RAM for block 4", "memfile", "RAM exhausted"]);
    if let Err(e) = death.check(&ended) {
        panic!("{e}");
    }
}

fn pool_runs_out_under_a_user_access() {
    if let Err(why) = Ram::from_spec("memfd,pagesize=2M")
        .unwrap()
        .with_fault_backend(FaultBackend::Userfaultfd)
    {
        return skip(&format!("no userfaultfd: {why}"));
    }
    let ram = Ram::from_spec("hugetlbfs,pagesize=2M")
        .unwrap()
        .with_budget(BUDGET * HUGE as u64)
        .with_fault_backend(FaultBackend::Userfaultfd)
        .unwrap();
    let file = mem_file(HUGE);
    let fh = open(&file, &ram);
    let vma = fh.mmap(0, 6).unwrap();
    let at = |blk: usize| vma.as_ptr().wrapping_add(blk * HUGE);
    poke(at(0), 1);
    poke(at(1), 1);
    let _hog = take_the_pool_free();
    println!("about to fault block 4");
    peek(at(4));
    println!("block 4 read: the process should have died");
}

fn report_hugetlbfs_and_memfd() {
    let new = |spec: &str| {
        Ram::from_spec(spec)
            .unwrap()
            .with_budget(BUDGET * HUGE as u64)
    };
    let huge = new("hugetlbfs,pagesize=2M");
    println!(
        "hugetlbfs auto: {} ({})",
        huge.fault_backend(),
        huge.fault_backend_fallback().unwrap_or_default()
    );
    match new("hugetlbfs,pagesize=2M").with_fault_backend(FaultBackend::Userfaultfd) {
        Ok(_) => println!("hugetlbfs asked for: userfaultfd"),
        Err(e) => println!("hugetlbfs asked for: error ({e})"),
    }
    let file = mem_file(HUGE);
    let fh = open(&file, &huge);
    let vma = fh.mmap(0, 2).unwrap();
    let ok = peek(vma.as_ptr().wrapping_add(HUGE + 3)) == MemFile::initial(1);
    println!("hugetlbfs read: {}", if ok { "ok" } else { "wrong data" });

    let memfd = new("memfd,pagesize=2M");
    println!(
        "memfd auto: {} ({})",
        memfd.fault_backend(),
        memfd.fault_backend_fallback().unwrap_or_default()
    );
    let fh = open(&file, &memfd);
    let vma = fh.mmap(0, 2).unwrap();
    let written = write_from(vma.as_ptr().wrapping_add(HUGE - 8), 16);
    let ok = written.is_ok_and(|n| n == 16);
    println!("memfd write(2): {}", if ok { "ok" } else { "failed" });
}

/// Review: a RAM page of two huge pages (`pagesize=4M`), two page-table
/// entries: loaded, a kernel write across its two huge pages tracked, a
/// load failing in a system call failing it (the poison over both), a
/// reclaim, and a user access loading it again.
#[test]
fn hugetlbfs_pages_of_two_huge_pages_on_userfaultfd() {
    const PAGE: usize = 2 * HUGE;
    let Some((_pool, ram)) = hugetlbfs_ram_of(PAGE, 4 * BUDGET + 4, BUDGET) else {
        return;
    };
    let file = mem_file(PAGE);
    let fh = open(&file, &ram);
    let vma = fh.mmap(0, 4).unwrap();
    let at = |blk: usize, off: usize| vma.as_ptr().wrapping_add(blk * PAGE + off);
    assert_eq!(peek(at(0, PAGE - 1)), MemFile::initial(0));
    assert_eq!(peek(at(0, 0)), MemFile::initial(0));
    let mut src = bytes_file("hugetlb-4m", 0x2d, 64);
    // SAFETY: nothing else touches these bytes while the slice lives.
    let dst = unsafe { std::slice::from_raw_parts_mut(at(0, HUGE - 32), 64) };
    assert_eq!(src.read(dst).unwrap(), 64);
    assert_eq!(fh.dirty_blocks(), [0]);
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(file.content(0)[HUGE - 32..HUGE + 32], [0x2d; 64]);
    file.on_load(|blk, _| match blk {
        1 => Err("block 1 is unreadable".into()),
        _ => Ok(()),
    });
    let err = write_from(at(1, HUGE + 5), 16).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    file.clear_load_hook();
    assert_eq!(peek(at(1, 7)), MemFile::initial(1));
    assert_eq!(write_from(at(1, HUGE + 5), 16).unwrap(), 16);
    for blk in 0..4 {
        assert_eq!(peek(at(blk, PAGE - 9)), file.content(blk as u64)[PAGE - 9]);
    }
    assert!(fh.stats().reclaims > 0);
    assert!(ram.reclaim() > 0);
    assert_eq!(peek(at(0, HUGE)), 0x2d, "loaded again");
}

/// Review: past `PIECES_KEPT` (8192) pieces in the process (here: a memfd
/// RAM of 4 KiB pages touched at 8,500 slots), a hugetlbfs page taken away
/// is turned back into the reservation (2 MiB of anonymous memory mapped
/// over the hugetlbfs piece, registered for missing faults). The slot then
/// loads again for a user access and for a system call, and a kernel write
/// into it once loaded is tracked.
#[test]
fn hugetlbfs_pieces_past_the_limit_go_back_to_the_reservation() {
    const SMALL: usize = 4096;
    const SLOTS: usize = 8500;
    let Some(m) = Mapped::new(6) else {
        return;
    };
    let (file, fh, ram, vma) = (&m.file, &m.fh, &m.ram, &m.vma);
    let small = Ram::from_spec(&format!("memfd,pagesize={SMALL}"))
        .unwrap()
        .with_budget(16 * SMALL as u64)
        .with_fault_backend(FaultBackend::Userfaultfd)
        .unwrap();
    let small_file = mem_file(SMALL);
    let small_fh = open(&small_file, &small);
    let small_vma = small_fh.mmap(0, SLOTS as u64).unwrap();
    read_each(&small_vma, SMALL, 0..SLOTS);
    let at = |blk: usize, off: usize| m.at(blk, off);
    for round in 0..2 {
        for blk in 0..6 {
            assert_eq!(peek(at(blk, 999)), MemFile::initial(blk as u64), "{round}");
        }
        ram.reclaim();
        let left: Vec<_> = mappings_in(vma.addr_range())
            .into_iter()
            .filter(|l| l.split_whitespace().nth(5).is_some())
            .collect();
        assert!(left.is_empty(), "pieces kept: {left:?}");
    }
    // A system call reads from a slot turned back, and writes into one.
    assert_eq!(write_from(at(2, HUGE - 8), 16).unwrap(), 16);
    ram.reclaim();
    assert_eq!(peek(at(3, 0)), MemFile::initial(3));
    let mut src = bytes_file("hugetlb-coalesce", 0x4e, 8);
    // SAFETY: nothing else touches these bytes while the slice lives.
    let dst = unsafe { std::slice::from_raw_parts_mut(at(3, 64), 8) };
    assert_eq!(src.read(dst).unwrap(), 8);
    assert_eq!(fh.dirty_blocks(), [3]);
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(file.content(3)[64..72], [0x4e; 8]);
    drop(small_vma);
}
