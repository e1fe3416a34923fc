//! `bigfile_fileh`: a handle to a file with its own changes in memory.

use std::ffi::{c_int, c_uint};
use std::sync::Arc;
use std::time::Duration;

use bigfile_virtmem::{BigFile, FileH, LoadPolicy, WriteoutFlags};

use crate::closing::Mappings;
use crate::error::{guard, CError};
use crate::file::FILES;
use crate::handles::Registry;
use crate::ram::RAMS;
use crate::stats::bigfile_stats;
use crate::vma::{bigfile_vma, VmaObj, VMAS};

/// A handle to a file: a view of it with its own changes (opaque).
#[derive(Debug)]
pub struct bigfile_fileh {
    _opaque: [u8; 0],
}

/// `bigfile_fileh_dirty_writeout`: call `storeblk` for every dirty page, in
/// ascending block order; pages stay dirty.
pub const BIGFILE_WRITEOUT_STORE: c_uint = 1;
/// `bigfile_fileh_dirty_writeout`: mark every dirty page clean.
pub const BIGFILE_WRITEOUT_MARKSTORED: c_uint = 2;

pub(crate) static FILEHS: Registry<FileHObj> = Registry::new("bigfile_fileh");

pub(crate) struct FileHObj {
    fileh: FileH,
    mappings: Arc<Mappings>,
}

/// Open a handle of `file` whose pages live in `ram` (NULL: the process's
/// default RAM for the file's block size, from `$BIGFILE_RAM` or memfd). An
/// explicit RAM's page size must equal the file's block size. The handle
/// keeps `file` and `ram` alive; they may be freed before it.
///
/// Returns the handle, or NULL (last error set).
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn bigfile_fileh_open(
    file: *mut crate::file::bigfile_file,
    ram: *mut crate::ram::bigfile_ram,
) -> *mut bigfile_fileh {
    guard("bigfile_fileh_open", || {
        let file: Arc<dyn BigFile> = FILES.get(file)?;
        let ram = if ram.is_null() {
            None
        } else {
            Some(RAMS.get(ram)?)
        };
        let fileh = FileH::open(file, ram.as_deref())?;
        FILEHS.insert(FileHObj {
            fileh,
            mappings: Arc::default(),
        })
    })
}

/// Map pages `pgoffset .. pgoffset + pglen` of the file (a page is a
/// block) into the address space: `bigfile_vma_addr` gives the address.
/// Nothing is loaded until touched (or prefaulted): the first read of a
/// page loads its block, the first write also makes it dirty.
///
/// Returns the mapping, or NULL (last error set) for a dead handle, an
/// empty or overflowing range, or no address space left.
///
/// Thread safety: any thread, concurrently with other calls on the handle.
#[no_mangle]
pub extern "C" fn bigfile_fileh_mmap(
    fileh: *mut bigfile_fileh,
    pgoffset: u64,
    pglen: u64,
) -> *mut bigfile_vma {
    guard("bigfile_fileh_mmap", || {
        let fh = FILEHS.get(fileh)?;
        let slot = fh.mappings.begin()?;
        let vma = fh.fileh.mmap(pgoffset, pglen)?;
        VMAS.insert(VmaObj::new(vma, slot))
    })
}

/// Write out the dirty pages: `flags` is `BIGFILE_WRITEOUT_STORE`,
/// `BIGFILE_WRITEOUT_MARKSTORED` or both (commit: store, then mark clean).
/// While storing, writes to the handle's pages from other threads wait.
/// If a `storeblk` fails, returns -1 (`BIGFILE_ERROR_STORE`, the message
/// naming the block and the callback's message) and nothing is lost: every
/// page not stored, and with both flags every page, stays dirty, and a
/// later writeout retries. Other errors: bad flags, a dead handle, a
/// writeout of this handle already in progress (from a `storeblk`).
///
/// Thread safety: any thread; a second writeout of the same handle while one
/// runs is refused (`BIGFILE_ERROR_STATE`).
#[no_mangle]
pub extern "C" fn bigfile_fileh_dirty_writeout(fileh: *mut bigfile_fileh, flags: c_uint) -> c_int {
    guard("bigfile_fileh_dirty_writeout", || {
        let flags = WriteoutFlags::from_bits(flags)?;
        FILEHS.get(fileh)?.fileh.dirty_writeout(flags)?;
        Ok(0)
    })
}

/// Drop every change (abort): dirty pages are forgotten and the next access
/// loads the file's data again. Returns 0, or -1 (a dead handle, a
/// writeout in progress).
///
/// Thread safety: any thread; pointers into dirty pages held by other
/// threads read the file's data after this.
#[no_mangle]
pub extern "C" fn bigfile_fileh_dirty_discard(fileh: *mut bigfile_fileh) -> c_int {
    guard("bigfile_fileh_dirty_discard", || {
        FILEHS.get(fileh)?.fileh.dirty_discard()?;
        Ok(0)
    })
}

/// Forget page `pgoffset` in whatever state (a dirty page's changes are
/// dropped): the next access loads it again. Use it when the file's data
/// changed underneath. A page being loaded is reloaded after its loader
/// finishes. Returns 0, or -1 (a dead handle, a writeout in progress).
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn bigfile_fileh_invalidate_page(fileh: *mut bigfile_fileh, pgoffset: u64) -> c_int {
    guard("bigfile_fileh_invalidate_page", || {
        FILEHS.get(fileh)?.fileh.invalidate_page(pgoffset)?;
        Ok(0)
    })
}

/// How a failing `loadblk` is retried: `attempts` in all (at least 1), the
/// n-th retry after sleeping n * `backoff_us` microseconds (default: 3
/// attempts, 1000 us). Returns 0, or -1 for a dead handle or 0 attempts.
///
/// Thread safety: any thread; loads in progress finish with the policy
/// they started with.
#[no_mangle]
pub extern "C" fn bigfile_fileh_set_load_policy(
    fileh: *mut bigfile_fileh,
    attempts: c_uint,
    backoff_us: u64,
) -> c_int {
    guard("bigfile_fileh_set_load_policy", || {
        if attempts == 0 {
            return Err(CError::invalid("attempts is 0; at least 1 is needed"));
        }
        FILEHS.get(fileh)?.fileh.set_load_policy(LoadPolicy {
            attempts,
            backoff: Duration::from_micros(backoff_us),
        });
        Ok(0)
    })
}

/// The load policy in effect: `*attempts` and `*backoff_us` (either may be
/// NULL). Returns 0, or -1 for a dead handle.
///
/// # Safety
/// `attempts` and `backoff_us` are NULL or point to writable memory of
/// their type.
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn bigfile_fileh_load_policy(
    fileh: *const bigfile_fileh,
    attempts: *mut c_uint,
    backoff_us: *mut u64,
) -> c_int {
    guard("bigfile_fileh_load_policy", || {
        let policy = FILEHS.get(fileh)?.fileh.load_policy();
        if !attempts.is_null() {
            // SAFETY: writable (caller).
            unsafe { attempts.write(policy.attempts) };
        }
        if !backoff_us.is_null() {
            let us = u64::try_from(policy.backoff.as_micros()).unwrap_or(u64::MAX);
            // SAFETY: writable (caller).
            unsafe { backoff_us.write(us) };
        }
        Ok(0)
    })
}

/// Fill `*out` with the handle's counters. Returns 0, or -1 for a dead
/// handle or a NULL `out`.
///
/// # Safety
/// `out` is NULL or points to writable memory for a `bigfile_stats`.
///
/// Thread safety: any thread; the counters are read one by one while other
/// threads may change them.
#[no_mangle]
pub unsafe extern "C" fn bigfile_fileh_stats(
    fileh: *const bigfile_fileh,
    out: *mut bigfile_stats,
) -> c_int {
    guard("bigfile_fileh_stats", || {
        let stats = FILEHS.get(fileh)?.fileh.stats().into();
        // SAFETY: NULL or writable (caller).
        unsafe { crate::error::write_out(out, stats) }?;
        Ok(0)
    })
}

/// Close the handle, dropping changes not written out. Refused (-1,
/// `BIGFILE_ERROR_STATE`) while mappings of it are live: unmap them first;
/// the handle stays open then. Closing a handle twice is an error
/// (`BIGFILE_ERROR_INVALID`).
///
/// Thread safety: any thread; a call on this handle in progress on another
/// thread finishes first (the memory is returned when it does), later calls
/// fail as on a closed handle.
#[no_mangle]
pub extern "C" fn bigfile_fileh_close(fileh: *mut bigfile_fileh) -> c_int {
    guard("bigfile_fileh_close", || {
        FILEHS.get(fileh)?.mappings.close()?;
        // Only the one close that marked it closed gets here.
        drop(FILEHS.remove(fileh)?);
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writeout_flags_are_virtmems() {
        assert_eq!(BIGFILE_WRITEOUT_STORE, WriteoutFlags::STORE.bits());
        assert_eq!(
            BIGFILE_WRITEOUT_MARKSTORED,
            WriteoutFlags::MARKSTORED.bits()
        );
    }
}
