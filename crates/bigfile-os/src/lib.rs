//! bigfile-os: the OS plumbing shared by every layer of bigfile: the
//! [`syscall!`] helper, [`os_page_size`], [`Prot`], [`clone_io_error`] and
//! [`HeldLock`] (which of bigfile's locks this thread holds).
//! It knows nothing of pages, faults or files; see ARCHITECTURE.md at the
//! repository root for where it sits.
#![doc = include_str!("../README.md")]

mod held;

pub use held::{holds_lock, HeldLock};

use std::io;
use std::ptr::NonNull;
use std::sync::OnceLock;

pub use libc;

/// Turns a libc call's failure convention (`-1` with errno) into
/// `io::Result`. Two forms:
///
/// - `syscall!(expr)`: the call is written out, inside the caller's own
///   `unsafe` block with its `// SAFETY:` comment;
/// - `syscall!(name(args…))`: calls `libc::name(args…)`; the expansion must
///   sit inside the caller's `unsafe` block.
///
/// Reading errno is async-signal-safe, so signal handlers use it too.
#[macro_export]
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {
        $crate::cvt($crate::libc::$fn($($arg),*))
    };
    ($call:expr) => {
        $crate::cvt($call)
    };
}

/// A C return value that means failure when it is `-1`.
pub trait MinusOne: Copy + PartialEq {
    const MINUS_ONE: Self;
}

macro_rules! minus_one {
    ($($t:ty)*) => { $(impl MinusOne for $t { const MINUS_ONE: Self = -1; })* };
}
minus_one!(i8 i16 i32 i64 isize);

/// `Err(errno)` when `res` is `-1`, else `Ok(res)`. See [`syscall!`].
pub fn cvt<T: MinusOne>(res: T) -> io::Result<T> {
    if res == T::MINUS_ONE {
        Err(io::Error::last_os_error())
    } else {
        Ok(res)
    }
}

/// Register fork(2) handlers (`pthread_atfork`): `prepare` runs in the
/// forking thread before the fork, `parent` and `child` after it, in the
/// parent and in the child. Prepare handlers run in the reverse order of
/// their registration, the others in that order: a layer whose locks nest
/// inside another's registers first.
pub fn at_fork(
    prepare: unsafe extern "C" fn(),
    parent: unsafe extern "C" fn(),
    child: unsafe extern "C" fn(),
) -> io::Result<()> {
    // SAFETY: three function pointers valid for the life of the process.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Size of an OS page (the unit of `mmap`), e.g. 4096 on x86-64.
pub fn os_page_size() -> usize {
    static SIZE: OnceLock<usize> = OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let size = syscall!(unsafe { libc::sysconf(libc::_SC_PAGESIZE) });
        // POSIX requires _SC_PAGESIZE; 4096 is the only sane fallback.
        size.ok()
            .and_then(|s| usize::try_from(s).ok())
            .unwrap_or(4096)
    })
}

/// Reserve `len` bytes of address space at a multiple of `align` (a power
/// of two, or any multiple of the OS page size): inaccessible (PROT_NONE),
/// backed by nothing, for the caller to map over with MAP_FIXED and to
/// unmap when done. Mapping pages at aligned addresses lets the kernel use
/// large page-table entries (hugetlbfs requires it).
pub fn reserve_aligned(len: usize, align: usize) -> io::Result<NonNull<u8>> {
    let extra = if align > os_page_size() { align } else { 0 };
    let total = len
        .checked_add(extra)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's
    // choosing cannot alias any existing memory.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = addr as usize;
    let start = if extra == 0 {
        base
    } else {
        base.div_ceil(align) * align
    };
    let (head, tail) = (start - base, base + total - (start + len));
    for (at, n) in [(base, head), (start + len, tail)] {
        if n > 0 {
            // SAFETY: the slack around the kept range, part of the mapping
            // just made; nothing refers to it.
            unsafe { libc::munmap(at as *mut libc::c_void, n) };
        }
    }
    NonNull::new(start as *mut u8).ok_or_else(|| io::Error::other("mmap returned address 0"))
}

/// Protection of a page mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prot {
    /// No access: any touch faults.
    None,
    /// Read-only: a write faults.
    Read,
    /// Read and write.
    ReadWrite,
}

impl Prot {
    /// The `PROT_*` bits for mmap(2) and mprotect(2).
    pub fn bits(self) -> libc::c_int {
        match self {
            Prot::None => libc::PROT_NONE,
            Prot::Read => libc::PROT_READ,
            Prot::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// A copy of `e` for a second owner (an error shared by several threads
/// that each need it as a value): the same errno when it has one, else the
/// same kind and message.
pub fn clone_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvt_turns_minus_one_into_the_errno() {
        assert_eq!(cvt(5i32).unwrap(), 5);
        // SAFETY: close of a descriptor that cannot be open fails with EBADF
        // and touches nothing.
        let err = syscall!(unsafe { libc::close(-1) }).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        // SAFETY: as above, through the name form.
        let err = unsafe { syscall!(close(-1)) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn prot_bits_are_libcs() {
        assert_eq!(Prot::None.bits(), libc::PROT_NONE);
        assert_eq!(Prot::Read.bits(), libc::PROT_READ);
        assert_eq!(Prot::ReadWrite.bits(), libc::PROT_READ | libc::PROT_WRITE);
    }

    #[test]
    fn a_cloned_io_error_keeps_its_errno_or_its_message() {
        let e = clone_io_error(&io::Error::from_raw_os_error(libc::ENOMEM));
        assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
        let e = clone_io_error(&io::Error::new(io::ErrorKind::InvalidInput, "bad"));
        assert_eq!(
            (e.kind(), e.to_string()),
            (io::ErrorKind::InvalidInput, "bad".into())
        );
    }

    #[test]
    fn a_reservation_is_aligned_and_inaccessible() {
        let align = 2 << 20;
        let p = reserve_aligned(3 * os_page_size(), align).unwrap();
        assert_eq!(p.as_ptr() as usize % align, 0);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = format!("{:x}-", p.as_ptr() as usize);
        let line = maps.lines().find(|l| l.starts_with(&start)).unwrap();
        assert!(
            line.split_whitespace().nth(1).unwrap().starts_with("---"),
            "{line}"
        );
        // SAFETY: the reservation just made, used by nothing.
        let rc = unsafe { libc::munmap(p.as_ptr().cast(), 3 * os_page_size()) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn os_page_size_is_a_power_of_two() {
        assert!(os_page_size().is_power_of_two());
    }
}
