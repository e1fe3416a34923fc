//! Plain memory for tests: anonymous mappings, protections, byte accesses
//! the compiler keeps, and what `/proc/self/maps` says of an address.

use std::ptr;

use bigfile_os::os_page_size;

/// An anonymous private mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    pub start: usize,
    pub len: usize,
}

impl Mapping {
    /// `pages` OS pages with protection `prot`.
    pub fn new(pages: usize, prot: libc::c_int) -> Self {
        let len = pages * os_page_size();
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

    /// The address of page `i`.
    pub fn page(&self, i: usize) -> usize {
        assert!(i * os_page_size() < self.len);
        self.start + i * os_page_size()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range; tests drop a Mapping only
        // after the last access to it.
        unsafe { libc::munmap(self.start as *mut libc::c_void, self.len) };
    }
}

/// The start of the OS page holding `addr`.
pub fn page_of(addr: usize) -> usize {
    addr & !(os_page_size() - 1)
}

/// mprotect of whole pages; panics on failure.
pub fn protect(addr: usize, len: usize, prot: libc::c_int) {
    // SAFETY: callers pass pages of a mapping they own; changing protection
    // does not invalidate Rust references (tests access it through raw
    // pointers).
    let rc = unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) };
    assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
}

/// A volatile read of one byte (faulting the page in, if it is served).
pub fn read_byte(addr: usize) -> u8 {
    // SAFETY: callers pass an address of a live mapping whose faults are served.
    unsafe { ptr::read_volatile(addr as *const u8) }
}

/// A volatile write of one byte (dirtying the page, if it is served).
pub fn write_byte(addr: usize, value: u8) {
    // SAFETY: as for `read_byte`.
    unsafe { ptr::write_volatile(addr as *mut u8, value) }
}

/// Read 8 bytes at `addr`, aligned or not, with one instruction: across a
/// page boundary, that one instruction needs both pages at once.
pub fn read_u64_one_access(addr: usize) -> u64 {
    let v: u64;
    // SAFETY: callers pass 8 bytes of a live mapping whose faults are
    // served; the load changes nothing.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) v,
            options(nostack, readonly, preserves_flags));
    }
    // SAFETY: as above.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        std::arch::asm!("ldr {v}, [{a}]", a = in(reg) addr, v = out(reg) v,
            options(nostack, readonly, preserves_flags));
    }
    v
}

/// Write `v` as the 8 bytes at `addr`, aligned or not, with one
/// instruction: across a page boundary, that one instruction needs both
/// pages at once, writable.
pub fn write_u64_one_access(addr: usize, v: u64) {
    // SAFETY: callers pass 8 bytes of a live mapping whose faults are
    // served, which no Rust reference covers.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) v,
            options(nostack, preserves_flags));
    }
    // SAFETY: as above.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        std::arch::asm!("str {v}, [{a}]", a = in(reg) addr, v = in(reg) v,
            options(nostack, preserves_flags));
    }
}

/// Copy 8 bytes from `src` to `dst` with one instruction (`movsq`): with
/// `src` across a page boundary and `dst` on a third page, one instruction
/// that needs three pages at once. (aarch64 has no instruction that reads
/// and writes memory at two places.)
#[cfg(target_arch = "x86_64")]
pub fn move_u64_one_access(src: usize, dst: usize) {
    // SAFETY: callers pass 8 bytes at `src` and at `dst` of live mappings
    // whose faults are served; `movsq` moves forward (the direction flag
    // is clear at every call boundary by the ABI).
    unsafe {
        std::arch::asm!("movsq", inout("rsi") src => _, inout("rdi") dst => _,
            options(nostack, preserves_flags));
    }
}

/// The permissions of the kernel mapping holding `addr`, as
/// `/proc/self/maps` shows them ("r--s", "rw-p", "---p"...); `None` where
/// nothing is mapped.
pub fn prot_at(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        let (a, b) = it.next()?.split_once('-')?;
        let perms = it.next()?;
        let a = usize::from_str_radix(a, 16).ok()?;
        let b = usize::from_str_radix(b, 16).ok()?;
        (a..b).contains(&addr).then(|| perms.to_owned())
    })
}

/// What a user-mode access to the page at `addr` may do without faulting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAccess {
    /// Nothing: the first access faults (an inaccessible slot, or a page
    /// not present in an accessible mapping).
    None,
    /// Read: a read-only page, or one write-protected by a userfaultfd.
    Read,
    /// Read and write.
    Write,
}

/// [`PageAccess`] at `addr`, from `/proc/self/maps` (the mapping's
/// protection) and `/proc/self/pagemap` (whether the page is present, and
/// write-protected by a userfaultfd): the same answer for a page on either
/// of bigfile's fault backends.
pub fn access_at(addr: usize) -> PageAccess {
    access_in(prot_at(addr).as_deref(), addr)
}

/// [`access_at`] for a caller that has read `/proc/self/maps` already: `perms`
/// is the protection of the mapping holding `addr` (None: not mapped).
pub fn access_in(perms: Option<&str>, addr: usize) -> PageAccess {
    match perms {
        None | Some("---p" | "---s") => PageAccess::None,
        Some(p) if !p.starts_with("rw") => PageAccess::Read,
        Some(_) => {
            let entry = pagemap_entry(addr).expect("reading /proc/self/pagemap (as root)");
            const PRESENT: u64 = 1 << 63;
            const UFFD_WP: u64 = 1 << 57;
            if entry & PRESENT == 0 {
                PageAccess::None
            } else if entry & UFFD_WP != 0 {
                PageAccess::Read
            } else {
                PageAccess::Write
            }
        }
    }
}

/// The `/proc/self/pagemap` entry of the OS page at `addr`.
fn pagemap_entry(addr: usize) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / bigfile_os::os_page_size() * 8) as u64)?;
    Ok(u64::from_ne_bytes(b))
}

/// How many mappings of bigfile-ram's memory files the process has (lines
/// of `/proc/self/maps` naming one): what a leak of mappings shows in.
pub fn ram_file_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("memfd:bigfile-ram"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_show_a_mappings_protection() {
        let m = Mapping::new(2, libc::PROT_READ);
        assert_eq!(prot_at(m.page(1)).as_deref(), Some("r--p"));
        protect(
            m.page(1),
            os_page_size(),
            libc::PROT_READ | libc::PROT_WRITE,
        );
        write_byte(m.page(1) + 3, 9);
        assert_eq!(read_byte(m.page(1) + 3), 9);
        assert_eq!(prot_at(page_of(m.page(1) + 3)).as_deref(), Some("rw-p"));
    }

    #[test]
    fn one_access_words_cross_page_boundaries() {
        let m = Mapping::new(2, libc::PROT_READ | libc::PROT_WRITE);
        let at = m.page(1) - 3;
        write_u64_one_access(at, 0x0102_0304_0506_0708);
        assert_eq!(read_u64_one_access(at), 0x0102_0304_0506_0708);
        // Both architectures are little-endian: the low byte comes first.
        assert_eq!((read_byte(at), read_byte(at + 7)), (0x08, 0x01));
    }
}
