//! `bigfile_vma`: one mapping of part of a file handle.

use std::ffi::{c_int, c_uint, c_void};

use bigfile_virtmem::{Access, Advice, Vma};

use crate::closing::MappingSlot;
use crate::error::{guard, CError};
use crate::handles::Registry;

/// A mapping of pages of a file handle (opaque).
#[derive(Debug)]
pub struct bigfile_vma {
    _opaque: [u8; 0],
}

/// `bigfile_vma_prefault`: load the pages.
pub const BIGFILE_ACCESS_READ: c_uint = 0;
/// `bigfile_vma_prefault`: load the pages and make them dirty (writable).
pub const BIGFILE_ACCESS_WRITE: c_uint = 1;

/// `bigfile_vma_advise`: no expectation; least recently used clean pages
/// are reclaimed first, and faults on consecutive blocks are detected as a
/// forward scan, which then gets drop-behind as under
/// `BIGFILE_ADVICE_SEQUENTIAL`.
pub const BIGFILE_ADVICE_NORMAL: c_uint = 0;
/// `bigfile_vma_advise`: a forward scan; a fault on block b makes the clean
/// page of block b - 1 the first to be reclaimed (as `MADV_SEQUENTIAL`).
pub const BIGFILE_ADVICE_SEQUENTIAL: c_uint = 1;
/// `bigfile_vma_advise`: no order to expect; no sequential detection (as
/// `MADV_RANDOM`).
pub const BIGFILE_ADVICE_RANDOM: c_uint = 2;

pub(crate) static VMAS: Registry<VmaObj> = Registry::new("bigfile_vma");

/// A mapping, counted among its file handle's while it lives.
pub(crate) struct VmaObj {
    // Fields drop in order: unmapped first, then uncounted.
    vma: Vma,
    _slot: MappingSlot,
}

impl VmaObj {
    pub(crate) fn new(vma: Vma, slot: MappingSlot) -> VmaObj {
        VmaObj { vma, _slot: slot }
    }
}

/// The start of the mapping: `pglen * blksize` bytes of ordinary memory
/// (readable and writable; pages appear as they are touched). NULL (last
/// error set) for a dead handle.
///
/// Thread safety: any thread. The memory may be used from any thread,
/// until `bigfile_vma_unmap`.
#[no_mangle]
pub extern "C" fn bigfile_vma_addr(vma: *const bigfile_vma) -> *mut c_void {
    guard("bigfile_vma_addr", || {
        Ok(VMAS.get(vma)?.vma.as_ptr().cast())
    })
}

/// The length of the mapping in bytes; 0 (last error set) for a dead handle.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn bigfile_vma_len(vma: *const bigfile_vma) -> usize {
    guard("bigfile_vma_len", || Ok(Length(VMAS.get(vma)?.vma.len()))).0
}

/// A length, 0 on failure.
struct Length(usize);

impl crate::error::Failed for Length {
    fn failed() -> Length {
        Length(0)
    }
}

/// Unmap: the address range becomes inaccessible and the mapping's handle
/// is freed; the file handle's pages stay (still dirty if they were).
/// Returns 0, or -1 for a dead handle (unmapping twice, NULL).
///
/// Thread safety: any thread. No thread may use the memory after this
/// call; a call on this mapping in progress on another thread (prefault)
/// finishes first and the range is unmapped when it returns.
#[no_mangle]
pub extern "C" fn bigfile_vma_unmap(vma: *mut bigfile_vma) -> c_int {
    guard("bigfile_vma_unmap", || {
        drop(VMAS.remove(vma)?);
        Ok(0)
    })
}

/// Load every page of bytes `offset .. offset + len` of the mapping now
/// (`access` `BIGFILE_ACCESS_READ`), or load and dirty them
/// (`BIGFILE_ACCESS_WRITE`). Needed before handing the memory to the kernel:
/// `read(2)` into a page not loaded yet fails with EFAULT, since the kernel
/// raises no fault for its own accesses (`BIGFILE_ACCESS_WRITE` before
/// `read(2)` into it, `BIGFILE_ACCESS_READ` before `write(2)` from it). Also
/// the way to get load errors as values: a failing `loadblk` gives -1 with
/// `BIGFILE_ERROR_LOAD` instead of SIGBUS, a budget full of dirty pages
/// `BIGFILE_ERROR_NOMEM`. Other errors: a range outside the mapping or
/// overflowing, a bad `access`, a dead handle.
///
/// Thread safety: any thread, concurrently with faults and other calls.
#[no_mangle]
pub extern "C" fn bigfile_vma_prefault(
    vma: *const bigfile_vma,
    offset: usize,
    len: usize,
    access: c_uint,
) -> c_int {
    guard("bigfile_vma_prefault", || {
        let access = one_of(
            "access",
            access,
            [
                (BIGFILE_ACCESS_READ, "BIGFILE_ACCESS_READ", Access::Read),
                (BIGFILE_ACCESS_WRITE, "BIGFILE_ACCESS_WRITE", Access::Write),
            ],
        )?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| CError::invalid(format!("offset {offset} + len {len} overflows")))?;
        VMAS.get(vma)?.vma.prefault(offset..end, access)?;
        Ok(0)
    })
}

/// Declare how the mapping will be accessed: `BIGFILE_ADVICE_NORMAL`,
/// `BIGFILE_ADVICE_SEQUENTIAL` or `BIGFILE_ADVICE_RANDOM`; the last advice
/// holds. It only changes which
/// clean page is reclaimed first, never what a read sees. Returns 0, or -1
/// for a bad `advice` or a dead handle.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn bigfile_vma_advise(vma: *mut bigfile_vma, advice: c_uint) -> c_int {
    guard("bigfile_vma_advise", || {
        let advice = one_of(
            "advice",
            advice,
            [
                (
                    BIGFILE_ADVICE_NORMAL,
                    "BIGFILE_ADVICE_NORMAL",
                    Advice::Normal,
                ),
                (
                    BIGFILE_ADVICE_SEQUENTIAL,
                    "BIGFILE_ADVICE_SEQUENTIAL",
                    Advice::Sequential,
                ),
                (
                    BIGFILE_ADVICE_RANDOM,
                    "BIGFILE_ADVICE_RANDOM",
                    Advice::Random,
                ),
            ],
        )?;
        VMAS.get(vma)?.vma.advise(advice);
        Ok(0)
    })
}

/// The meaning of `value` among `options` (value, C name, meaning).
fn one_of<T: Copy, const N: usize>(
    what: &str,
    value: c_uint,
    options: [(c_uint, &str, T); N],
) -> Result<T, CError> {
    options
        .iter()
        .find(|(v, _, _)| *v == value)
        .map(|&(_, _, meaning)| meaning)
        .ok_or_else(|| {
            let allowed: Vec<String> = options
                .iter()
                .map(|(v, name, _)| format!("{name} ({v})"))
                .collect();
            CError::invalid(format!(
                "{what} {value} is not one of {}",
                allowed.join(", ")
            ))
        })
}
