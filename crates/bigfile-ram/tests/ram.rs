//! RAM against the kernel: every backend, memory release, exhaustion on a tiny tmpfs, the
//! hugetlb pool, and every kind of bad input.
//!
//! Tests that need root (mounting a tmpfs or hugetlbfs, changing `nr_hugepages`) print
//! `SKIPPED: ...` and pass when not root or when the kernel refuses.
//!
//! Every test holds `serial()`: some change the process-wide (indeed system-wide) huge page
//! pool, and the leak test counts the process's descriptors and mappings, which a test running
//! beside it would disturb.

use bigfile_ram::{
    allocated_bytes, os_page_size, unmap, AllocPolicy, Backend, Prot, Ram, RamError, RamHandle,
    RamSpec, RamStats, ThpPolicy,
};
use bigfile_testkit::child::{forked, TIMEOUT};
use bigfile_testkit::hugepages::{HugePages, NR_HUGEPAGES};
use bigfile_testkit::memory::ram_file_mappings;
use bigfile_testkit::mount::Mount;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

const MIB: usize = 1 << 20;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn skip(why: &str) {
    eprintln!("SKIPPED: {why}");
    println!("SKIPPED: {why}");
}

fn new_ram(spec: &str) -> Ram {
    let spec: RamSpec = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
    Ram::new(spec.clone()).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

/// An anonymous PROT_NONE reservation of `len` bytes at an `align`-aligned address.
struct Reservation {
    aligned: NonNull<u8>,
    len: usize,
}

impl Reservation {
    fn new(len: usize, align: usize) -> Reservation {
        let aligned = bigfile_os::reserve_aligned(len, align).unwrap();
        Reservation { aligned, len }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the whole reservation (and whatever was mapped over it) is ours.
        unsafe { unmap(self.aligned, self.len) }.unwrap();
    }
}

/// Number of /proc/self/maps entries that overlap `addr..addr + len`.
fn vmas_in(addr: NonNull<u8>, len: usize) -> usize {
    let (lo, hi) = (addr.as_ptr() as usize, addr.as_ptr() as usize + len);
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (s, e) = range.split_once('-').unwrap();
            let (s, e) = (
                usize::from_str_radix(s, 16).unwrap(),
                usize::from_str_radix(e, 16).unwrap(),
            );
            s < hi && e > lo
        })
        .count()
}

/// Writes through one mapping of a page and reads through others: the window, a second
/// `map_page`, and a fixed mapping. Then checks two adjacent pages mapped adjacently are one
/// VMA (except on hugetlb).
fn check_one_memory(ram: &Ram) {
    let ps = ram.page_size();
    let h = ram.open_handle().unwrap();
    let page = h.alloc_page(0).unwrap();
    let a = h.map_page(page, Prot::ReadWrite).unwrap();
    let b = h.map_page(page, Prot::Read).unwrap();
    assert_ne!(a, b);
    let win = h.window(page).unwrap();
    let res = Reservation::new(2 * ps, ps);
    // SAFETY: the reservation's aligned range is ours, and nothing refers into it.
    unsafe { h.map_page_fixed(page, res.aligned, Prot::ReadWrite) }.unwrap();
    for (i, off) in [0, 1, ps / 2, ps - 1].into_iter().enumerate() {
        let v = 0x40 + i as u8;
        // SAFETY: `off < ps`, inside the read-write mapping `a`.
        unsafe { a.as_ptr().add(off).write_volatile(v) };
        // SAFETY: same page, through the other mappings, all `ps` bytes long.
        unsafe {
            assert_eq!(b.as_ptr().add(off).read_volatile(), v);
            assert_eq!(win.as_ptr().add(off).read_volatile(), v);
            assert_eq!(res.aligned.as_ptr().add(off).read_volatile(), v);
        }
    }
    // And the other way: written through the fixed mapping, seen through `b`.
    // SAFETY: inside the fixed read-write mapping and the read-only one.
    unsafe {
        res.aligned.as_ptr().add(7).write_volatile(0x99);
        assert_eq!(b.as_ptr().add(7).read_volatile(), 0x99);
    }

    // Pages 1 and 2 of the file at adjacent addresses.
    let p1 = h.alloc_page(1).unwrap();
    let p2 = h.alloc_page(2).unwrap();
    assert_eq!((p1, p2), (1, 2), "alloc_page honours a free hint");
    let pair = Reservation::new(2 * ps, ps);
    // SAFETY: the reservation's aligned range (two pages) is ours.
    unsafe {
        h.map_page_fixed(p1, pair.aligned, Prot::ReadWrite).unwrap();
        h.map_page_fixed(p2, pair.aligned.add(ps), Prot::ReadWrite)
            .unwrap();
    }
    let vmas = vmas_in(pair.aligned, 2 * ps);

    // SAFETY: `a` and `b` are `ps`-byte mappings made above, not used again.
    unsafe {
        unmap(a, ps).unwrap();
        unmap(b, ps).unwrap();
    }
    // The kernel never merges hugetlb VMAs (their vm_ops have a close hook); other backends
    // must merge.
    let want = if ram.huge_page_size().is_some() { 2 } else { 1 };
    assert_eq!(vmas, want, "VMAs for two adjacent pages mapped adjacently");
    assert_eq!(h.stats().pages_allocated, 3);
    assert_eq!(ram.stats().bytes_resident, 3 * ps as u64);
    h.close().unwrap();
    assert_eq!(ram.stats(), RamStats::default());
}

/// Dropping a page lowers the file's allocated blocks and makes the page read as zeros.
fn check_drop_releases(ram: &Ram) {
    let ps = ram.page_size();
    let h = ram.open_handle().unwrap();
    let page = h.alloc_page(0).unwrap();
    let view = h.map_page(page, Prot::Read).unwrap();
    let win = h.window(page).unwrap();
    // SAFETY: the window covers the `ps` bytes of the allocated page.
    unsafe { win.as_ptr().write_bytes(0x5A, ps) };
    let before = allocated_bytes(h.fd()).unwrap();
    assert!(
        before >= ps as u64,
        "{before} bytes allocated for a filled page"
    );
    // SAFETY: `view` maps the page read-only.
    assert_eq!(unsafe { view.as_ptr().add(ps - 1).read_volatile() }, 0x5A);

    h.drop_page(page).unwrap();
    let after = allocated_bytes(h.fd()).unwrap();
    assert!(
        after + ps as u64 <= before,
        "dropping a {ps}-byte page took blocks from {before} to {after} bytes"
    );
    assert!(!h.is_allocated(page));
    assert_eq!(h.stats(), RamStats::default());
    // SAFETY: the old mappings still cover the (now empty) page. (A read fault on a hole of
    // shmem populates a zeroed page again: the blocks are counted before reading.)
    unsafe {
        for off in [0, ps / 2, ps - 1] {
            assert_eq!(view.as_ptr().add(off).read_volatile(), 0);
            assert_eq!(win.as_ptr().add(off).read_volatile(), 0);
        }
    }
    // SAFETY: `view` was made above with length `ps`.
    unsafe { unmap(view, ps) }.unwrap();
    h.close().unwrap();
}

#[test]
fn memfd_one_memory_and_drop() {
    let _s = serial();
    for spec in ["memfd", "memfd,pagesize=4K", "memfd,alloc=touch"] {
        let ram = new_ram(spec);
        check_one_memory(&ram);
        check_drop_releases(&ram);
    }
}

#[test]
fn shmfs_one_memory_and_drop() {
    let _s = serial();
    for spec in ["shmfs", "shmfs:/dev/shm,pagesize=64K,alloc=touch"] {
        let ram = new_ram(spec);
        check_one_memory(&ram);
        check_drop_releases(&ram);
    }
}

#[test]
fn hugetlbfs_one_memory_and_drop() {
    let _s = serial();
    let _pool = match HugePages::set(8) {
        Ok(p) => p,
        Err(why) => return skip(&format!("hugetlbfs test: {why}")),
    };
    // memfd with MFD_HUGETLB.
    let ram = new_ram("hugetlbfs,pagesize=2M");
    assert_eq!(ram.huge_page_size(), Some(2 * MIB));
    assert_eq!(ram.max_size(), 8 * 2 * MIB as u64);
    check_one_memory(&ram);
    check_drop_releases(&ram);
    // A hugetlbfs mount.
    match Mount::new("hugetlbfs", "pagesize=2M") {
        Ok(m) => {
            let ram = new_ram(&format!("hugetlbfs:{},alloc=reserve", m.path().display()));
            check_one_memory(&ram);
            check_drop_releases(&ram);
        }
        Err(why) => skip(&format!("hugetlbfs mount: {why}")),
    }
}

#[test]
fn hugetlb_pool_exhaustion_is_typed() {
    let _s = serial();
    let _pool = match HugePages::set(2) {
        Ok(p) => p,
        Err(why) => return skip(&format!("hugetlb exhaustion test: {why}")),
    };
    let ram = new_ram("hugetlbfs");
    let h1 = ram.open_handle().unwrap();
    let h2 = ram.open_handle().unwrap();
    h1.alloc_page(0).unwrap();
    h1.alloc_page(1).unwrap();
    let err = h2.alloc_page(0).unwrap_err();
    assert!(
        matches!(err, RamError::Exhausted { .. }),
        "want Exhausted, got {err}"
    );
    h1.drop_page(0).unwrap();
    h2.alloc_page(0).unwrap();
}

#[test]
fn tiny_tmpfs_exhaustion_then_recovery() {
    let _s = serial();
    if !is_root() {
        return skip("tiny tmpfs exhaustion test: not root, cannot mount a tmpfs");
    }
    let mount = match Mount::new("tmpfs", "size=8m") {
        Ok(m) => m,
        Err(why) => return skip(&format!("tiny tmpfs exhaustion test: {why}")),
    };
    let ram = new_ram(&format!(
        "shmfs:{},pagesize=2M,alloc=reserve",
        mount.path().display()
    ));
    assert_eq!(ram.max_size(), 8 * MIB as u64);
    let h1 = ram.open_handle().unwrap();
    assert_eq!(h1.max_pages(), 4);
    for i in 0..4 {
        assert_eq!(h1.alloc_page(i).unwrap(), i);
    }
    // The handle has no index left.
    let full = h1.alloc_page(0).unwrap_err();
    assert!(
        matches!(full, RamError::HandleFull { max_pages: 4 }),
        "{full}"
    );
    assert!(full.is_exhausted());
    // Another handle on the same full tmpfs: the kernel says ENOSPC.
    let h2 = ram.open_handle().unwrap();
    let err = h2.alloc_page(0).unwrap_err();
    assert!(
        matches!(err, RamError::Exhausted { .. }),
        "want Exhausted, got {err}"
    );
    assert!(err.is_exhausted());
    assert!(err.to_string().contains("RAM exhausted"), "{err}");
    assert!(
        !h2.is_allocated(0),
        "a failed allocation leaves the index free"
    );
    assert_eq!(ram.stats().pages_allocated, 4);
    // Dropping one page's memory lets the allocation succeed.
    h1.drop_page(2).unwrap();
    assert_eq!(h2.alloc_page(0).unwrap(), 0);
    assert_eq!(ram.stats().pages_allocated, 4);
    h1.close().unwrap();
    h2.close().unwrap();
    assert_eq!(ram.stats(), RamStats::default());
}

#[test]
fn hugetlbfs_without_reserved_pages_is_an_error() {
    let _s = serial();
    let _pool = match HugePages::set(0) {
        Ok(p) => Some(p),
        Err(_) if !is_root() && bigfile_ram_pool_is_empty() => None,
        Err(why) => return skip(&format!("no-huge-pages test: {why}")),
    };
    let err = Ram::new("hugetlbfs".parse().unwrap()).unwrap_err();
    assert!(matches!(err, RamError::NoHugePages { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("no 2097152-byte huge pages are reserved"),
        "{msg}"
    );
    assert!(msg.contains("nr_hugepages"), "{msg}");
}

fn bigfile_ram_pool_is_empty() -> bool {
    std::fs::read_to_string(NR_HUGEPAGES).is_ok_and(|s| s.trim() == "0")
}

/// Descriptors of this crate's memfds. (Only ours are counted: the test harness starts and
/// ends threads meanwhile, which changes the process's mappings.)
fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("memfd:bigfile-ram"))
        .count()
}

fn assert_err(r: Result<impl std::fmt::Debug, RamError>, want: &str) -> RamError {
    let e = r.expect_err(want);
    assert!(e.to_string().contains(want), "{e:?}: {e} lacks {want:?}");
    e
}

#[test]
fn bad_input_is_an_error_and_leaks_nothing() {
    let _s = serial();
    let os = os_page_size();
    let (fds, maps) = (fd_count(), ram_file_mappings());

    // Page sizes.
    let spec = |page_size| RamSpec {
        page_size,
        ..RamSpec::default()
    };
    let e = assert_err(
        Ram::new(spec(1000)),
        &format!("page size 1000 is not a multiple of the OS page size {os}"),
    );
    assert!(matches!(e, RamError::PageSize { .. }));
    assert_err(Ram::new(spec(0)), "page size 0 is not a multiple");
    assert_err(Ram::new(spec(os + os / 2)), "allowed: a non-zero multiple");
    assert_err(
        Ram::with_page_size(12345),
        "page size 12345 is not a multiple",
    );
    if Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists() {
        // With or without a pool, 4 KiB is below every huge page size.
        let e = Ram::new("hugetlbfs,pagesize=4K".parse().unwrap()).unwrap_err();
        assert!(
            matches!(
                e,
                RamError::PageSize {
                    unit_name: "huge",
                    ..
                }
            ),
            "{e}"
        );
    }
    let e = assert_err(
        Ram::new(RamSpec {
            backend: Backend::Memfd,
            page_size: 1 << 62,
            alloc: AllocPolicy::Reserve,
            thp: ThpPolicy::Collapse,
        }),
        "cannot hold one page",
    );
    assert!(matches!(e, RamError::TooSmall { .. }));

    // Specs and directories.
    assert_err("tmpfs".parse::<RamSpec>(), "unknown backend \"tmpfs\"");
    assert_err("memfd,pagesize=3Q".parse::<RamSpec>(), "allowed: memfd");
    assert_err(
        Ram::new("shmfs:/nonexistent/bigfile".parse().unwrap()),
        "shmfs directory /nonexistent/bigfile",
    );
    assert_err(
        Ram::new("shmfs:/proc/self/exe".parse().unwrap()),
        "shmfs directory /proc/self/exe",
    );
    let e = assert_err(
        Ram::new("hugetlbfs:/dev/shm".parse().unwrap()),
        "/dev/shm is not on a hugetlbfs mount",
    );
    assert!(matches!(e, RamError::NotHugetlbfs { .. }));

    // Handle operations.
    let ram = new_ram("memfd,pagesize=64K");
    let h = ram.open_handle().unwrap();
    let max = h.max_pages();
    let page = h.alloc_page(0).unwrap();
    for bad in [max, max + 1, u64::MAX] {
        let want = format!("page {bad} is beyond the handle, which holds pages 0..{max}");
        assert_err(h.map_page(bad, Prot::Read), &want);
        assert_err(h.window(bad), &want);
        assert_err(h.drop_page(bad), &want);
        assert!(!h.is_allocated(bad));
        let res = Reservation::new(h.page_size(), h.page_size());
        // SAFETY: the reservation is ours.
        assert_err(
            unsafe { h.map_page_fixed(bad, res.aligned, Prot::Read) },
            &want,
        );
    }
    assert_err(h.map_page(1, Prot::Read), "page 1 is not allocated");
    assert_err(h.window(1), "page 1 is not allocated");
    assert_err(h.drop_page(1), "page 1 is not allocated");
    let res = Reservation::new(2 * h.page_size(), h.page_size());
    for off in [1, os, h.page_size() / 2] {
        // SAFETY: inside the reservation, which is ours.
        let addr = unsafe { res.aligned.add(off) };
        let e = assert_err(
            // SAFETY: the reservation is ours.
            unsafe { h.map_page_fixed(page, addr, Prot::ReadWrite) },
            "is not aligned to the page size 65536",
        );
        assert!(matches!(e, RamError::Unaligned { .. }));
    }
    h.drop_page(page).unwrap();
    assert_err(h.drop_page(page), "page 0 is not allocated");
    drop(res);
    h.close().unwrap();

    assert_eq!(fd_count(), fds, "descriptors leaked");
    assert_eq!(ram_file_mappings(), maps, "mappings leaked");
}

#[test]
fn handles_close_their_descriptor_and_window() {
    let _s = serial();
    let ram = new_ram("memfd,pagesize=64K");
    let (fds, maps) = (fd_count(), ram_file_mappings());
    for close in [true, false] {
        let h = ram.open_handle().unwrap();
        let p = h.alloc_page(0).unwrap();
        h.window(p).unwrap();
        assert_eq!((fd_count(), ram_file_mappings()), (fds + 1, maps + 1));
        if close {
            h.close().unwrap();
        } else {
            drop(h);
        }
        assert_eq!((fd_count(), ram_file_mappings()), (fds, maps));
    }
    assert_eq!(ram.stats(), RamStats::default());
}

#[test]
fn env_var_picks_the_default_backend() {
    let _s = serial();
    let old = std::env::var_os("BIGFILE_RAM");
    std::env::set_var("BIGFILE_RAM", "shmfs,pagesize=64K,alloc=touch");
    let spec = RamSpec::from_env();
    let ram = Ram::with_page_size(128 << 10);
    std::env::set_var("BIGFILE_RAM", "ramdisk");
    let bad = RamSpec::from_env();
    match &old {
        Some(v) => std::env::set_var("BIGFILE_RAM", v),
        None => std::env::remove_var("BIGFILE_RAM"),
    }
    let spec = spec.unwrap();
    assert_eq!(
        spec.backend,
        Backend::Shmfs {
            dir: "/dev/shm".into()
        }
    );
    assert_eq!(
        (spec.page_size, spec.alloc),
        (64 << 10, AllocPolicy::OnTouch)
    );
    let ram = ram.unwrap();
    assert_eq!(ram.page_size(), 128 << 10);
    assert!(matches!(ram.spec().backend, Backend::Shmfs { .. }));
    let bad = bad.unwrap_err().to_string();
    assert!(
        bad.contains("unknown backend \"ramdisk\" (from BIGFILE_RAM)"),
        "{bad}"
    );
}

#[test]
fn concurrent_alloc_and_drop_keep_counts() {
    let _s = serial();
    let ram = new_ram("memfd,pagesize=4K");
    let h = ram.open_handle().unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let h: &RamHandle = &h;
            s.spawn(move || {
                let mut mine = Vec::new();
                for i in 0..200 {
                    mine.push(h.alloc_page(t * 1000 + i).unwrap());
                }
                for p in mine.drain(..100) {
                    h.drop_page(p).unwrap();
                }
            });
        }
    });
    assert_eq!(h.stats().pages_allocated, 400);
    assert_eq!(ram.stats().pages_allocated, 400);
    assert_eq!(
        (0..10_000).filter(|&p| h.is_allocated(p)).count(),
        400,
        "bitmap and counters agree"
    );
}

/// `ShmemPmdMapped` of the /proc/self/smaps entry containing `addr`, in KiB:
/// how much of that mapping's shared memory is mapped as huge pages.
fn shmem_pmd_mapped_kib(addr: NonNull<u8>) -> u64 {
    let a = addr.as_ptr() as usize;
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if let Some((s, e)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                inside = (s..e).contains(&a);
                continue;
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("ShmemPmdMapped:") {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
    }
    panic!("no smaps entry with ShmemPmdMapped for {a:#x}")
}

/// Whether this kernel can make shmem huge pages on request (MADV_COLLAPSE,
/// Linux 6.1+, shmem THP not denied).
fn kernel_collapses_shmem() -> bool {
    let sys = Path::new("/sys/kernel/mm/transparent_hugepage");
    let denied = std::fs::read_to_string(sys.join("shmem_enabled"))
        .map(|s| s.contains("[deny]"))
        .unwrap_or(true);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    sys.join("hpage_pmd_size").exists() && !denied && (major, minor) >= (6, 1)
}

/// With 2 MiB pages, memfd and shmfs pages are transparent huge pages (one
/// PMD entry per page wherever mapped), however the system's shmem THP
/// setting is; `thp=off` keeps small pages. Either way the page holds
/// exactly its size of memory, keeps its data and is released on drop.
#[test]
fn two_mib_pages_are_transparent_huge_pages_unless_off() {
    let _s = serial();
    let collapses = kernel_collapses_shmem();
    for (spec, want_huge) in [
        ("memfd,pagesize=2M", collapses),
        ("shmfs:/dev/shm,pagesize=2M", collapses),
        ("memfd,pagesize=2M,thp=off", false),
        ("memfd,pagesize=2M,alloc=touch", false),
    ] {
        if spec.starts_with("shmfs") && !Path::new("/dev/shm").is_dir() {
            skip("no /dev/shm");
            continue;
        }
        let ram = new_ram(spec);
        let h = ram.open_handle().unwrap();
        let page = h.alloc_page(0).unwrap();
        let w = h.window(page).unwrap();
        // SAFETY: the window maps the allocated page read-write; nothing else uses it.
        unsafe {
            w.as_ptr().write_volatile(7);
            w.as_ptr().add(2 * MIB - 1).write_volatile(9);
        }
        let huge = shmem_pmd_mapped_kib(w);
        assert_eq!(h.is_huge(page), want_huge, "{spec}: is_huge");
        if want_huge {
            assert_eq!(huge, 2048, "{spec}: the page is one PMD-mapped huge page");
        } else {
            assert_eq!(huge, 0, "{spec}: small pages");
        }
        let fixed = Reservation::new(2 * MIB, 2 * MIB);
        let at = fixed.aligned;
        // SAFETY: `at` is a 2 MiB-aligned part of our own reservation.
        unsafe { h.map_page_fixed(page, at, Prot::Read).unwrap() };
        // SAFETY: just mapped readable.
        let (a, b) = unsafe {
            (
                at.as_ptr().read_volatile(),
                at.as_ptr().add(2 * MIB - 1).read_volatile(),
            )
        };
        assert_eq!((a, b), (7, 9), "{spec}: one memory");
        if want_huge {
            // Mapped whole by that one access: no populate needed.
            assert_eq!(
                shmem_pmd_mapped_kib(at),
                2048,
                "{spec}: huge in every aligned mapping"
            );
        }
        if spec.contains("alloc=touch") {
            assert!(allocated_bytes(h.fd()).unwrap() <= 2 * MIB as u64);
        } else {
            assert_eq!(allocated_bytes(h.fd()).unwrap(), 2 * MIB as u64, "{spec}");
        }
        drop(fixed);
        h.drop_page(page).unwrap();
        assert!(!h.is_huge(page), "{spec}: a dropped page is not huge");
        assert_eq!(allocated_bytes(h.fd()).unwrap(), 0, "{spec}: released");
    }
}

/// A handle opened with `open_handle_small` is never collapsed into huge
/// pages, whatever the spec (bigfile-virtmem's userfaultfd backend maps its
/// pages by small entries, and a collapse would fail there).
#[test]
fn small_page_handles_are_not_collapsed() {
    let _s = serial();
    let ram = new_ram("memfd,pagesize=2M");
    let h = ram.open_handle_small().unwrap();
    let page = h.alloc_page(0).unwrap();
    let w = h.window(page).unwrap();
    // SAFETY: the window maps the allocated page read-write; nothing else uses it.
    unsafe { w.as_ptr().write_volatile(7) };
    assert!(!h.is_huge(page));
    assert_eq!(shmem_pmd_mapped_kib(w), 0, "small pages");
    h.drop_page(page).unwrap();
}

/// A forked child gets every handle renewed: no page allocated, the page
/// indices free, its writes and hole punches in memory of its own. The
/// parent's pages are as they were.
#[test]
fn a_forked_child_has_handles_of_its_own() {
    let _s = serial();
    for spec in ["memfd,pagesize=4K", "shmfs,pagesize=4K"] {
        let ram = new_ram(spec);
        let h = ram.open_handle().unwrap();
        let p = h.alloc_page(3).unwrap();
        let w = h.window(p).unwrap();
        // SAFETY: the page's 4 KiB in the window, ours alone.
        unsafe { w.as_ptr().write_bytes(0x5a, 4096) };
        let status = forked(
            || {
                if h.stats().pages_allocated != 0
                    || h.is_allocated(p)
                    || ram.stats().pages_allocated != 0
                {
                    return false;
                }
                // The same index, in the child's own memory: it reads zeros,
                // and what the child writes and punches is its own.
                let Ok(q) = h.alloc_page(3) else { return false };
                let Ok(w) = h.window(q) else { return false };
                // SAFETY: as in the parent, in the child's own file.
                let zero = unsafe { w.as_ptr().read() } == 0;
                // SAFETY: as above.
                unsafe { w.as_ptr().write_bytes(0x11, 4096) };
                zero && q == p && h.drop_page(q).is_ok()
            },
            TIMEOUT,
        )
        .unwrap();
        assert!(
            status.success(),
            "{spec}: the child's handle was not its own"
        );
        // SAFETY: the parent's page, still allocated.
        let back = unsafe { std::slice::from_raw_parts(h.window(p).unwrap().as_ptr(), 4096) };
        assert!(
            back.iter().all(|&b| b == 0x5a),
            "{spec}: the child changed the parent's page"
        );
        assert_eq!(ram.stats().pages_allocated, 1);
        h.drop_page(p).unwrap();
    }
}
