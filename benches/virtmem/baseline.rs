//! Kernel baselines written with plain libc, independent of our crates.

use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crate::support::fill_block;

/// A MAP_SHARED mapping of a fresh memfd of `len` bytes: the same kind of
/// memory (shmem, 4 KiB page-table entries) as a bigfile RAM page.
pub struct MemfdMap {
    fd: libc::c_int,
    pub ptr: *mut u8,
    pub len: usize,
}

impl MemfdMap {
    pub fn new(len: usize) -> MemfdMap {
        // SAFETY: plain syscalls on a new descriptor and a kernel-chosen
        // address; results are checked.
        unsafe {
            let fd = libc::memfd_create(c"bench-baseline".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create");
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0, "ftruncate");
            let p = libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "mmap");
            MemfdMap {
                fd,
                ptr: p.cast(),
                len,
            }
        }
    }
}

impl Drop for MemfdMap {
    fn drop(&mut self) {
        // SAFETY: the mapping and descriptor are ours and unused from here.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
            libc::close(self.fd);
        }
    }
}

static REGION_START: AtomicUsize = AtomicUsize::new(0);
static REGION_LEN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn segv_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let start = REGION_START.load(SeqCst);
    let len = REGION_LEN.load(SeqCst);
    if addr >= start && addr < start + len {
        // SAFETY: the region is the benchmark's own mapping.
        unsafe {
            libc::mprotect(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
    } else {
        // Not ours: die at the faulting instruction with the default action.
        // SAFETY: resetting a signal disposition is async-signal-safe.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
    }
}

/// `iters` bare SIGSEGV round trips on a populated `size`-byte memfd
/// mapping: mprotect PROT_NONE, read one byte, the handler mprotects the
/// region back, return. The previous SIGSEGV handler (bigfile's) is put back
/// afterwards.
pub fn sigsegv_round_trips(size: usize, iters: u64) -> Duration {
    let map = MemfdMap::new(size);
    // SAFETY: our own fresh mapping; populating it changes no data.
    unsafe { ptr::write_bytes(map.ptr, 1, size) };
    REGION_START.store(map.ptr as usize, SeqCst);
    REGION_LEN.store(size, SeqCst);
    // SAFETY: installing a handler with a zeroed, then filled, sigaction;
    // the old one is saved and restored below before anything else faults.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = segv_handler
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGSEGV, &sa, &mut old), 0);
    }
    let t = Instant::now();
    for _ in 0..iters {
        // SAFETY: our mapping; the read faults and the handler restores access.
        unsafe {
            libc::mprotect(map.ptr.cast(), size, libc::PROT_NONE);
            ptr::read_volatile(map.ptr);
        }
    }
    let d = t.elapsed();
    // SAFETY: putting back the handler saved above.
    unsafe { assert_eq!(libc::sigaction(libc::SIGSEGV, &old, ptr::null_mut()), 0) };
    d
}

/// `iters` times: map a fresh `size`-byte piece of a memfd, fill it as
/// `FillFile::loadblk` does (the kernel allocates and zeroes each page on
/// first touch), unmap it and punch the memory out again. The kernel doing
/// what a full-block fault does.
pub fn memfd_first_touch_fill(size: usize, iters: u64) -> Duration {
    // SAFETY: plain syscalls on our own descriptor; results are checked.
    let fd = unsafe { libc::memfd_create(c"bench-first-touch".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::ftruncate(fd, size as libc::off_t) }, 0);
    let t = Instant::now();
    for i in 0..iters {
        // SAFETY: a kernel-chosen address over our memfd; unmapped before reuse.
        unsafe {
            let p = libc::mmap(
                ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            fill_block(std::slice::from_raw_parts_mut(p.cast(), size), i);
            libc::munmap(p, size);
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                size as libc::off_t,
            );
        }
    }
    let d = t.elapsed();
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    d
}
