//! `bigfile_ram`: where pages live, and the budget they are kept within.

use std::ffi::{c_char, c_int};

use bigfile_virtmem::{FaultBackend, Ram};

use crate::error::{guard, CError};
use crate::file::c_str;
use crate::handles::Registry;
use crate::stats::bigfile_ram_usage;

/// Memory for pages with a budget of resident bytes (opaque).
#[derive(Debug)]
pub struct bigfile_ram {
    _opaque: [u8; 0],
}

pub(crate) static RAMS: Registry<Ram> = Registry::new("bigfile_ram");

/// `bigfile_ram_new_on`: the process's default fault backend (the
/// environment variable `BIGFILE_FAULTS`: `signals`, `userfaultfd`, `auto`;
/// signals when unset).
pub const BIGFILE_FAULTS_DEFAULT: c_int = 0;
/// Page faults by SIGSEGV: works everywhere; a system call touching a page
/// not loaded fails with EFAULT (prefault first).
pub const BIGFILE_FAULTS_SIGNALS: c_int = 1;
/// Page faults by userfaultfd(2): system calls on mapped memory load the
/// pages they touch. Needs root, CAP_SYS_PTRACE,
/// `vm.unprivileged_userfaultfd=1` or access to `/dev/userfaultfd`, and
/// Linux 6.6+.
pub const BIGFILE_FAULTS_USERFAULTFD: c_int = 2;

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
    // SAFETY: forwarded to the caller.
    guard("bigfile_ram_new", || unsafe {
        new_ram(spec, budget, BIGFILE_FAULTS_DEFAULT)
    })
}

/// `bigfile_ram_new` on fault backend `fault_backend`: one of
/// `BIGFILE_FAULTS_DEFAULT` (as `bigfile_ram_new`), `BIGFILE_FAULTS_SIGNALS`,
/// `BIGFILE_FAULTS_USERFAULTFD`. `bigfile_ram_fault_backend` tells which it
/// got, `bigfile_ram_fault_backend_fallback` why not userfaultfd.
///
/// Returns the handle, or NULL (last error set) as `bigfile_ram_new` does,
/// or for another `fault_backend` (`BIGFILE_ERROR_INVALID`), or userfaultfd
/// asked for where the process cannot have it (`BIGFILE_ERROR_OS`, the
/// message says why).
///
/// # Safety
/// `spec` is NULL or a NUL-terminated string.
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn bigfile_ram_new_on(
    spec: *const c_char,
    budget: u64,
    fault_backend: c_int,
) -> *mut bigfile_ram {
    // SAFETY: forwarded to the caller.
    guard("bigfile_ram_new_on", || unsafe {
        new_ram(spec, budget, fault_backend)
    })
}

/// The RAM of `bigfile_ram_new_on`.
///
/// # Safety
/// `spec` is NULL or a NUL-terminated string.
unsafe fn new_ram(
    spec: *const c_char,
    budget: u64,
    fault_backend: c_int,
) -> Result<*mut bigfile_ram, CError> {
    let backend = match fault_backend {
        BIGFILE_FAULTS_DEFAULT => None,
        BIGFILE_FAULTS_SIGNALS => Some(FaultBackend::Signals),
        BIGFILE_FAULTS_USERFAULTFD => Some(FaultBackend::Userfaultfd),
        other => {
            return Err(CError::invalid(format!(
                "fault_backend {other}: expected BIGFILE_FAULTS_DEFAULT, _SIGNALS or _USERFAULTFD"
            )))
        }
    };
    // SAFETY: NULL or NUL-terminated (caller).
    let mut ram = match unsafe { c_str("spec", spec) }? {
        Some(spec) => Ram::from_spec(spec)?,
        None => Ram::new(::bigfile_ram::Ram::new(::bigfile_ram::RamSpec::from_env()?)?),
    };
    if let Some(backend) = backend {
        ram = ram.with_fault_backend(backend)?;
    }
    if budget != 0 {
        ram.set_budget(budget);
    }
    RAMS.insert(ram)
}

/// The fault backend the RAM's mappings use: `BIGFILE_FAULTS_SIGNALS` or
/// `BIGFILE_FAULTS_USERFAULTFD`; -1 for a dead handle.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn bigfile_ram_fault_backend(ram: *const bigfile_ram) -> c_int {
    guard("bigfile_ram_fault_backend", || {
        Ok(match RAMS.get(ram)?.fault_backend() {
            FaultBackend::Signals => BIGFILE_FAULTS_SIGNALS,
            FaultBackend::Userfaultfd => BIGFILE_FAULTS_USERFAULTFD,
        })
    })
}

/// Why the RAM does not use userfaultfd (signals asked for, the default,
/// the process may not use it, the kernel lacks a feature, ...), copied
/// into `buf` (`len` bytes; NUL-terminated, cut short if need be, as
/// `snprintf` does; `buf` may be NULL when `len` is 0). Returns the
/// reason's length in bytes without the NUL (0 when the RAM uses
/// userfaultfd: `buf` then holds ""), or -1 for a dead handle or a NULL
/// `buf` with a nonzero `len`.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn bigfile_ram_fault_backend_fallback(
    ram: *const bigfile_ram,
    buf: *mut c_char,
    len: usize,
) -> i64 {
    guard("bigfile_ram_fault_backend_fallback", || {
        let why = RAMS.get(ram)?.fault_backend_fallback().unwrap_or_default();
        if len > 0 {
            if buf.is_null() {
                return Err(CError::invalid("buf is NULL"));
            }
            let n = why.len().min(len - 1);
            // SAFETY: `buf` has `len` writable bytes (caller), n + 1 <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(why.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        Ok(i64::try_from(why.len()).unwrap_or(i64::MAX))
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
