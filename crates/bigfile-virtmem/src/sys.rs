//! The few OS calls virtmem makes itself: reserving address space and
//! changing protection; only the mapper (`mapper.rs`) calls them. Page
//! memory itself comes from `bigfile-ram`.

use std::io;
use std::ptr::NonNull;

use bigfile_os::syscall;

/// Reserve `len` bytes of address space aligned to `align` (a power-of-two
/// multiple of the OS page size, or any page multiple: see below),
/// inaccessible (PROT_NONE), backed by nothing. Pages of the RAM are mapped
/// at page-size-aligned addresses (hugetlbfs requires it; it also lets the
/// kernel use large page-table entries).
pub(crate) fn reserve(len: usize, align: usize) -> io::Result<NonNull<u8>> {
    #[cfg(feature = "failpoints")]
    crate::failpoint::check("virtmem::mmap")?;
    bigfile_os::reserve_aligned(len, align)
}

/// Put an inaccessible anonymous reservation over `[addr, addr+len)`, dropping
/// whatever page was mapped there.
///
/// # Safety
/// The range must lie inside a reservation owned by the caller, and nothing may
/// rely on the memory previously mapped there.
pub(crate) unsafe fn unmap_to_reserved(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { map_anonymous(addr, len, libc::PROT_NONE) }
}

/// Put anonymous, private, zero-filled read-write memory over
/// `[addr, addr+len)` in one call, dropping whatever was mapped there.
///
/// # Safety
/// As [`unmap_to_reserved`].
pub(crate) unsafe fn map_zeros(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { map_anonymous(addr, len, libc::PROT_READ | libc::PROT_WRITE) }
}

/// Map fresh anonymous private memory with `prot` over `[addr, addr+len)`.
///
/// # Safety
/// As [`unmap_to_reserved`].
unsafe fn map_anonymous(addr: NonNull<u8>, len: usize, prot: libc::c_int) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    crate::failpoint::check("virtmem::mmap")?;
    // SAFETY: per this function's contract the range is ours to replace.
    let res = unsafe {
        libc::mmap(
            addr.as_ptr().cast(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if res == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Drop the page-table entries of `[addr, addr+len)` in a shared mapping
/// (MADV_DONTNEED): the file keeps its pages; the next access faults.
///
/// # Safety
/// The range must be owned by the caller.
pub(crate) unsafe fn zap(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: per this function's contract the range is the caller's; a
    // shared mapping loses no data.
    syscall!(unsafe { libc::madvise(addr.as_ptr().cast(), len, libc::MADV_DONTNEED) }).map(drop)
}

/// Call `absent` with the address of each OS page of `[addr, addr+len)`
/// whose page-table entry is not present (bit 63 of its entry in
/// `/proc/self/pagemap` clear), stopping at its first error; an error too
/// if the file cannot be read. Allocates nothing: faults are served in
/// signal handlers.
pub(crate) fn for_each_absent(
    addr: usize,
    len: usize,
    mut absent: impl FnMut(usize) -> io::Result<()>,
) -> io::Result<()> {
    const PRESENT: u64 = 1 << 63;
    let os = bigfile_os::os_page_size();
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = syscall!(unsafe {
        libc::open(
            c"/proc/self/pagemap".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    })?;
    let mut read = || {
        let mut entries = [0u64; 64];
        let end = addr + len;
        let mut page = addr;
        while page < end {
            let n = ((end - page) / os).min(entries.len());
            let want = n * size_of::<u64>();
            let at = (page / os * size_of::<u64>()) as libc::off_t;
            // SAFETY: reads at most `want` bytes, the size of `n` entries.
            let got = syscall!(unsafe { libc::pread(fd, entries.as_mut_ptr().cast(), want, at) })?;
            if (got as usize) < want {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            for (i, entry) in entries[..n].iter().enumerate() {
                if entry & PRESENT == 0 {
                    absent(page + i * os)?;
                }
            }
            page += n * os;
        }
        Ok(())
    };
    let res = read();
    // SAFETY: the descriptor opened above, used by nothing else.
    unsafe { libc::close(fd) };
    res
}

/// Change the protection of `[addr, addr+len)`.
///
/// # Safety
/// The range must be owned by the caller; revoking access under a live
/// reference is only sound because accesses through our mappings are served
/// by the fault handler.
pub(crate) unsafe fn mprotect(addr: NonNull<u8>, len: usize, prot: libc::c_int) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    crate::failpoint::check("virtmem::mprotect")?;
    // SAFETY: per this function's contract the range is the caller's.
    syscall!(unsafe { libc::mprotect(addr.as_ptr().cast(), len, prot) }).map(drop)
}

/// Release a whole reservation.
///
/// # Safety
/// The range must be a reservation owned by the caller and no longer used.
pub(crate) unsafe fn unmap(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: per this function's contract the reservation is unused.
    syscall!(unsafe { libc::munmap(addr.as_ptr().cast(), len) }).map(drop)
}

/// Linux's MADV_POPULATE_READ / MADV_POPULATE_WRITE (5.14+), not in libc yet.
const MADV_POPULATE_READ: libc::c_int = 22;
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Fill the page-table entries of `[addr, addr+len)` in one call, instead of
/// one minor fault per OS page on first touch. Best effort: on kernels
/// without it the pages simply fault in on first touch.
///
/// # Safety
/// Populating changes no data (it faults pages in as an access would, and
/// fails without effect where the protection does not allow the access),
/// but a write populate dirties shared file pages and allocates anonymous
/// ones: the range must be memory of ours (a mapping of our RAM, or a
/// range that was such a mapping and may have been replaced meanwhile).
pub(crate) unsafe fn populate(addr: NonNull<u8>, len: usize, write: bool) {
    let advice = if write {
        MADV_POPULATE_WRITE
    } else {
        MADV_POPULATE_READ
    };
    // SAFETY: per this function's contract the range is memory of ours;
    // populating it changes no data.
    let _ = syscall!(unsafe { libc::madvise(addr.as_ptr().cast(), len, advice) });
}
