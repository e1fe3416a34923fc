//! Helpers of the whole-stack tests, over the test kit's memory file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;
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
/// the default fault backend (`BIGFILE_FAULTS`'s, else signals).
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

/// A loader that takes the host lock (a memory file that is not native)
/// and says whether read-ahead may run it (`BigFile::reads_ahead`).
pub struct HostLoader {
    pub mem: MemFile,
    pub reads_ahead: bool,
}

impl bigfile::virtmem::BigFile for HostLoader {
    fn blksize(&self) -> usize {
        self.mem.blksize()
    }
    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), bigfile::virtmem::BlockError> {
        self.mem.loadblk(blk, buf)
    }
    fn storeblk(&self, blk: u64, buf: &[u8]) -> Result<(), bigfile::virtmem::BlockError> {
        self.mem.storeblk(blk, buf)
    }
    fn reads_ahead(&self) -> bool {
        self.reads_ahead
    }
}

/// A native memory file (read ahead), a RAM of `budget` pages on the
/// userfaultfd backend and a handle; `None` (said) where this process
/// cannot have userfaultfd, unless it must (`BIGFILE_REQUIRE_UFFD`).
pub fn on_uffd(budget: u64) -> Option<(Arc<MemFile>, Ram, FileH)> {
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

/// A scratch file (a memory file: its writes copy as a disk file's do,
/// `generic_perform_write`), empty.
pub fn scratch() -> File {
    // SAFETY: a name we own; the new descriptor is ours alone.
    let fd = unsafe { libc::memfd_create(c"bigfile-it-call-buffer".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    unsafe { File::from_raw_fd(fd) }
}

/// What `f` holds, from its start.
pub fn contents(f: &mut File) -> Vec<u8> {
    let mut got = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut got).unwrap();
    got
}

/// Write all of `vma` (not loaded) to a scratch file in one `write(2)`;
/// what the file got.
pub fn write_out(vma: &Vma) -> Vec<u8> {
    let mut out = scratch();
    // SAFETY: nothing writes the mapping while the slice lives.
    out.write_all(unsafe { vma.as_slice() }).unwrap();
    contents(&mut out)
}

/// Whether `got` holds blocks `blocks` of the memory file as first loaded.
pub fn holds_initial(got: &[u8], blocks: std::ops::Range<u64>) -> bool {
    blocks
        .zip(got.chunks(BLK))
        .all(|(b, chunk)| chunk.iter().all(|&x| x == MemFile::initial(b)))
}
