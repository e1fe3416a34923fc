//! Linux system interface: every libc call of the crate goes through here.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use bigfile_os::syscall;

/// Failure point `name` of the fault-injection suite (tests/faults): when the
/// suite arms it, returns the error number it gives as `return(ERRNO)` (EIO
/// without one), so the real error path of the call behind it runs. Compiled
/// only with the `failpoints` feature.
#[cfg(feature = "failpoints")]
pub(crate) fn failpoint(name: &str) -> io::Result<()> {
    fail::fail_point!(name, |arg: Option<String>| {
        let errno = arg.and_then(|a| a.parse().ok()).unwrap_or(libc::EIO);
        Err(io::Error::from_raw_os_error(errno))
    });
    Ok(())
}

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages";

pub use bigfile_os::os_page_size;

/// Bytes of physical memory.
pub(crate) fn phys_mem() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { syscall!(sysconf(libc::_SC_PHYS_PAGES)) }.unwrap_or(0);
    u64::try_from(pages).unwrap_or(0) * os_page_size() as u64
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// What `statfs` says about the filesystem holding `dir`.
pub(crate) struct FsInfo {
    pub is_hugetlbfs: bool,
    /// Block size: the huge page size on hugetlbfs.
    pub block_size: u64,
    /// Total size in bytes; 0 when the filesystem reports none (an unlimited hugetlbfs).
    pub total: u64,
}

pub(crate) fn statfs(dir: &Path) -> io::Result<FsInfo> {
    let c = cpath(dir)?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path, `st` has room for a `statfs`.
    unsafe { syscall!(statfs(c.as_ptr(), st.as_mut_ptr())) }?;
    // SAFETY: statfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The statfs field types differ between architectures; these casts are identities on
    // some of them.
    #[allow(clippy::unnecessary_cast)]
    let (block_size, f_blocks, f_type) = (st.f_bsize as u64, st.f_blocks as u64, st.f_type as i64);
    // hugetlbfs without size= reports u64::MAX ("-1") blocks.
    let blocks = if f_blocks == u64::MAX { 0 } else { f_blocks };
    Ok(FsInfo {
        is_hugetlbfs: f_type == HUGETLBFS_MAGIC,
        block_size,
        total: blocks.saturating_mul(block_size),
    })
}

/// Huge page sizes the kernel supports, ascending.
pub(crate) fn huge_page_sizes() -> Vec<usize> {
    let mut sizes: Vec<usize> = std::fs::read_dir(HUGEPAGES_SYSFS)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let kb = name
                .to_str()?
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?;
            kb.parse::<usize>().ok()?.checked_mul(1024)
        })
        .collect();
    sizes.sort_unstable();
    sizes
}

/// The sysfs file holding the pool size of huge pages of `size` bytes.
pub(crate) fn huge_pool_path(size: usize) -> PathBuf {
    PathBuf::from(format!(
        "{HUGEPAGES_SYSFS}/hugepages-{}kB/nr_hugepages",
        size / 1024
    ))
}

/// Number of huge pages of `size` bytes in the kernel's pool (0 when unknown).
pub(crate) fn huge_pool(size: usize) -> u64 {
    std::fs::read_to_string(huge_pool_path(size))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// memfd_create(2), by its system call number: glibc's wrapper is newer
/// (2.27) than the glibc the wheels are built against (2.17), and would
/// make them fail to load where it is missing.
pub(crate) fn memfd_create(name: &CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the returned descriptor is new and owned by us.
    let fd = unsafe { syscall!(syscall(libc::SYS_memfd_create, name.as_ptr(), flags)) }?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns (a descriptor fits a c_int).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Opens a new, already unlinked file in `dir` (O_TMPFILE, else a named file unlinked at once).
pub(crate) fn open_unlinked(dir: &Path) -> io::Result<OwnedFd> {
    let c = cpath(dir)?;
    let flags = libc::O_TMPFILE | libc::O_RDWR | libc::O_EXCL | libc::O_CLOEXEC;
    // SAFETY: `c` is a NUL-terminated path; a returned descriptor is new and owned by us.
    match unsafe { syscall!(open(c.as_ptr(), flags, 0o600)) } {
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        // Filesystems without O_TMPFILE say EOPNOTSUPP (or EISDIR on old kernels).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {}
        Err(e) => return Err(e),
    }
    let mut template = dir.join("bigfile-ram.XXXXXX").into_os_string().into_vec();
    template.push(0);
    // SAFETY: `template` is a writable NUL-terminated buffer ending in XXXXXX.
    let fd = unsafe { syscall!(mkostemp(template.as_mut_ptr().cast(), libc::O_CLOEXEC)) }?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: mkostemp filled in the name; the buffer is still NUL-terminated.
    unsafe { syscall!(unlink(template.as_ptr().cast())) }?;
    Ok(fd)
}

pub(crate) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: ftruncate on a valid descriptor has no memory-safety preconditions.
    unsafe { syscall!(ftruncate(fd.as_raw_fd(), len)) }.map(drop)
}

pub(crate) fn fallocate(
    fd: BorrowedFd<'_>,
    mode: libc::c_int,
    off: u64,
    len: u64,
) -> io::Result<()> {
    let off = libc::off_t::try_from(off).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    loop {
        // SAFETY: fallocate on a valid descriptor has no memory-safety preconditions.
        match unsafe { syscall!(fallocate(fd.as_raw_fd(), mode, off, len)) } {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(drop),
        }
    }
}

/// Bytes of storage the file holds (`st_blocks` × 512).
pub fn allocated_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` has room for a `stat`.
    unsafe { syscall!(fstat(fd.as_raw_fd(), st.as_mut_ptr())) }?;
    // SAFETY: fstat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.st_blocks as u64 * 512)
}

/// Maps `len` bytes of `fd` at `off`.
///
/// # Safety
/// With `MAP_FIXED` in `flags`, whatever was mapped at `addr` is replaced: the caller must own
/// that range and nothing may use the old contents as Rust-visible memory any more.
pub(crate) unsafe fn mmap(
    addr: *mut u8,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: BorrowedFd<'_>,
    off: u64,
) -> io::Result<NonNull<u8>> {
    let off = libc::off_t::try_from(off).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: the caller vouches for a fixed `addr`; otherwise the kernel picks a free range.
    let p = unsafe { libc::mmap(addr.cast(), len, prot, flags, fd.as_raw_fd(), off) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned address 0"))
}

/// Maps `len` bytes of `fd` from offset 0, shared, at an address that is a
/// multiple of `align` (a multiple of the OS page size).
pub(crate) fn mmap_aligned(
    len: usize,
    align: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: BorrowedFd<'_>,
) -> io::Result<NonNull<u8>> {
    let aligned = bigfile_os::reserve_aligned(len, align)?;
    // SAFETY: `[aligned, aligned + len)` is the reservation just made,
    // which nothing else knows about.
    let mapped = unsafe { mmap(aligned.as_ptr(), len, prot, flags | libc::MAP_FIXED, fd, 0) };
    if mapped.is_err() {
        // SAFETY: our own reservation, not handed out.
        unsafe { libc::munmap(aligned.as_ptr().cast(), len) };
    }
    mapped
}

/// `madvise(addr, len, advice)`.
///
/// # Safety
/// The range must be memory the caller owns, and the advice must not change
/// data anyone relies on (e.g. not MADV_DONTNEED on private memory in use).
pub(crate) unsafe fn madvise(addr: NonNull<u8>, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { syscall!(madvise(addr.as_ptr().cast(), len, advice)) }.map(drop)
}

/// Unmaps `len` bytes at `addr`.
///
/// # Safety
/// The range is a mapping the caller owns and nothing uses afterwards.
pub(crate) unsafe fn munmap(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { syscall!(munmap(addr.as_ptr().cast(), len)) }.map(drop)
}

/// Makes descriptor `to` refer to `from`'s file (`dup3`, close-on-exec).
pub(crate) fn dup_onto(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: two valid descriptors; `to` keeps its number and now refers
    // to `from`'s file, which is what its owner asks for.
    unsafe { syscall!(dup3(from.as_raw_fd(), to.as_raw_fd(), libc::O_CLOEXEC)) }.map(drop)
}

/// Replaces `[addr, addr + len)` by private anonymous memory.
///
/// # Safety
/// The caller owns the range and nothing relies on its old contents.
pub(crate) unsafe fn map_anonymous_over(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: forwarded to the caller.
    let p = unsafe {
        libc::mmap(
            addr.as_ptr().cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes `fd`, reporting the error `Drop for OwnedFd` would swallow.
pub(crate) fn close(fd: OwnedFd) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    let raw = fd.into_raw_fd();
    // SAFETY: we own `raw` and never use it again; on Linux the descriptor is released even
    // when close reports an error, so no retry.
    unsafe { syscall!(close(raw)) }.map(drop)
}
