//! Helpers shared by the test binaries: anonymous mappings and protections.

use std::ptr;

pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory arguments.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// An anonymous private mapping, unmapped on drop.
pub struct Mapping {
    pub start: usize,
    pub len: usize,
}

impl Mapping {
    pub fn new(pages: usize, prot: libc::c_int) -> Self {
        let len = pages * page_size();
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Self {
            start: p as usize,
            len,
        }
    }

    pub fn page(&self, i: usize) -> usize {
        assert!(i * page_size() < self.len);
        self.start + i * page_size()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range; tests drop a Mapping only
        // after the last access to it.
        unsafe { libc::munmap(self.start as *mut libc::c_void, self.len) };
    }
}

/// mprotect of whole pages; panics on failure.
pub fn protect(addr: usize, len: usize, prot: libc::c_int) {
    // SAFETY: callers pass pages of a Mapping they own; changing protection
    // does not invalidate Rust references (tests access it through raw pointers).
    let rc = unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) };
    assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
}

/// A volatile read of one byte, so the compiler keeps the faulting access.
pub fn read_byte(addr: usize) -> u8 {
    // SAFETY: callers pass an address of a live Mapping whose faults are served.
    unsafe { ptr::read_volatile(addr as *const u8) }
}

/// A volatile write of one byte.
pub fn write_byte(addr: usize, value: u8) {
    // SAFETY: as for `read_byte`.
    unsafe { ptr::write_volatile(addr as *mut u8, value) }
}
