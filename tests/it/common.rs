//! Helpers of the whole-stack tests, over the test kit's memory file.

use std::sync::Arc;

use bigfile::virtmem::{FaultBackend, FileH, Ram, Vma};
use bigfile_testkit::memory::{read_byte, write_byte};

pub use bigfile_testkit::memory::{access_at, PageAccess};
pub use bigfile_testkit::{Call, MemFile};

pub const BLK: usize = 64 * 1024;

/// A memory file of `blksize`-byte blocks (block `n` is all bytes `n + 1`
/// until stored), to share with handles.
pub fn mem_file(blksize: usize) -> Arc<MemFile> {
    Arc::new(MemFile::new(blksize))
}

/// A private RAM of `BLK`-sized pages with a budget of `pages` pages, on
/// the default fault backend (`BIGFILE_FAULTS`, else the best available).
pub fn ram(pages: u64) -> Ram {
    let ram = Ram::from_spec(&format!("memfd,pagesize={}", BLK))
        .unwrap()
        .with_budget(pages * BLK as u64);
    // The userfaultfd pass of `cargo xtask test` must not run on signals
    // unnoticed (BIGFILE_FAULTS falls back, with the reason).
    if std::env::var_os("BIGFILE_REQUIRE_UFFD").is_some()
        && std::env::var("BIGFILE_FAULTS").is_ok_and(|b| b == "userfaultfd")
    {
        assert_eq!(
            ram.fault_backend(),
            FaultBackend::Userfaultfd,
            "{:?}",
            ram.fault_backend_fallback()
        );
    }
    ram
}

/// [`ram`] on fault backend `backend`.
pub fn ram_on(backend: FaultBackend, pages: u64) -> Ram {
    ram(pages).with_fault_backend(backend).unwrap()
}

pub fn open(file: &Arc<MemFile>, ram: &Ram) -> FileH {
    FileH::open(file.clone(), Some(ram)).unwrap()
}

/// Read one byte through a raw pointer (faulting the page in).
pub fn peek(ptr: *const u8) -> u8 {
    read_byte(ptr as usize)
}

/// Write one byte through a raw pointer (dirtying the page).
pub fn poke(ptr: *mut u8, v: u8) {
    write_byte(ptr as usize, v)
}

/// A memory file, a RAM of `budget` pages and a handle of the file on it.
pub fn handle(budget: u64) -> (Arc<MemFile>, Ram, FileH) {
    let file = mem_file(BLK);
    let ram = ram(budget);
    let fh = open(&file, &ram);
    (file, ram, fh)
}

/// [`handle`], and a mapping of the file's first `pages` blocks.
pub fn setup(budget: u64, pages: u64) -> (Arc<MemFile>, Ram, FileH, Vma) {
    let (file, ram, fh) = handle(budget);
    let vma = fh.mmap(0, pages).unwrap();
    (file, ram, fh, vma)
}

/// The threads of this process whose name starts with `prefix`, each with
/// the signals it blocks (`SigBlk` of /proc/self/task/TID/status) as a mask
/// (bit `sig - 1`). A thread that ends meanwhile is left out.
pub fn blocked_signals_of_threads(prefix: &str) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        // (comm holds the first 15 bytes of the thread's name)
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !comm.starts_with(prefix) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
            .unwrap();
        found.push((comm.trim().to_owned(), blocked));
    }
    found
}

/// The lines of /proc/self/maps whose kernel mappings overlap `range`.
pub fn mappings_in(range: std::ops::Range<usize>) -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|l| {
            let Some((s, e)) = l.split_once(' ').and_then(|(span, _)| span.split_once('-')) else {
                return false;
            };
            match (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                (Ok(s), Ok(e)) => s < range.end && e > range.start,
                _ => false,
            }
        })
        .map(str::to_owned)
        .collect()
}

/// Read the first byte of each block `slots` of `vma` (blocks of `blksize`
/// bytes, mapped from block 0), checking it holds the block's initial byte.
pub fn read_each(vma: &Vma, blksize: usize, slots: impl Iterator<Item = usize>) {
    for i in slots {
        assert_eq!(
            peek(vma.as_ptr().wrapping_add(i * blksize)),
            MemFile::initial(i as u64)
        );
    }
}
