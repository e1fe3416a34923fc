//! `bigfile_ram`: where pages live, and the budget they are kept within.

use std::ffi::{c_char, c_int};

use bigfile_virtmem::Ram;

use crate::error::guard;
use crate::file::c_str;
use crate::handles::Registry;
use crate::stats::bigfile_ram_usage;

/// Memory for pages with a budget of resident bytes (opaque).
#[derive(Debug)]
pub struct bigfile_ram {
    _opaque: [u8; 0],
}

pub(crate) static RAMS: Registry<Ram> = Registry::new("bigfile_ram");

/// A RAM from `spec` (NULL: `$BIGFILE_RAM`, else memfd with 2 MiB pages),
/// in the grammar `backend *("," option)`: backend `memfd`, `shmfs[:DIR]`
/// or `hugetlbfs[:DIR]`; options `pagesize=SIZE` (e.g. `64K`, `2M`),
/// `alloc=reserve|touch`, `thp=collapse|off`. Its page size must equal the
/// block size of the files opened on it. `budget` is the most bytes its
/// pages may hold (rounded down to whole pages, at least one; 0: all the
/// memory the backend has). Least recently used clean pages are reclaimed
/// to stay within it; dirty pages never are.
///
/// Returns the handle, or NULL (last error set) for a bad spec or a backend
/// that is not available.
///
/// # Safety
/// `spec` is NULL or a NUL-terminated string.
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn bigfile_ram_new(spec: *const c_char, budget: u64) -> *mut bigfile_ram {
    guard("bigfile_ram_new", || {
        // SAFETY: NULL or NUL-terminated (caller).
        let ram = match unsafe { c_str("spec", spec) }? {
            Some(spec) => Ram::from_spec(spec)?,
            None => Ram::new(::bigfile_ram::Ram::new(::bigfile_ram::RamSpec::from_env()?)?),
        };
        if budget != 0 {
            ram.set_budget(budget);
        }
        RAMS.insert(ram)
    })
}

/// Give up this handle of the RAM. File handles opened on it keep using it;
/// its memory is returned when the last of them is closed. Freeing NULL or
/// a handle freed before sets the last error.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn bigfile_ram_free(ram: *mut bigfile_ram) {
    guard("bigfile_ram_free", || {
        drop(RAMS.remove(ram)?);
        Ok(())
    })
}

/// Set the budget to `bytes` (rounded down to whole pages, at least one).
/// Lowering it does not drop pages now; the next loads reclaim down to it.
/// Returns 0, or -1 for a dead handle.
///
/// Thread safety: any thread, concurrently with faults and other calls.
#[no_mangle]
pub extern "C" fn bigfile_ram_set_budget(ram: *mut bigfile_ram, bytes: u64) -> c_int {
    guard("bigfile_ram_set_budget", || {
        RAMS.get(ram)?.set_budget(bytes);
        Ok(0)
    })
}

/// Fill `*out` with the RAM's counters, budget and resident bytes. Returns
/// 0, or -1 for a dead handle or a NULL `out`.
///
/// # Safety
/// `out` is NULL or points to writable memory for a `bigfile_ram_usage`.
///
/// Thread safety: any thread; the counters are read one by one while other
/// threads may change them.
#[no_mangle]
pub unsafe extern "C" fn bigfile_ram_stats(
    ram: *const bigfile_ram,
    out: *mut bigfile_ram_usage,
) -> c_int {
    guard("bigfile_ram_stats", || {
        let stats = RAMS.get(ram)?.stats().into();
        // SAFETY: NULL or writable (caller).
        unsafe { crate::error::write_out(out, stats) }?;
        Ok(0)
    })
}

/// Drop every clean page of `ram` (NULL: of every default RAM, those of
/// file handles opened without a RAM), as wendelin.core's `ram_reclaim`
/// does. Dirty pages stay. Returns the number of pages freed, or -1 for a
/// dead handle.
///
/// Thread safety: any thread, concurrently with faults and other calls.
#[no_mangle]
pub extern "C" fn bigfile_ram_reclaim(ram: *mut bigfile_ram) -> i64 {
    guard("bigfile_ram_reclaim", || {
        let freed = if ram.is_null() {
            Ram::reclaim_defaults()
        } else {
            RAMS.get(ram)?.reclaim()
        };
        Ok(i64::try_from(freed).unwrap_or(i64::MAX))
    })
}
