//! bigfile's SIGSEGV/SIGBUS handler as a host runtime sees it: put back on
//! top of handlers the runtime installed after it.

use std::ffi::c_int;

use crate::error::guard;

/// Put bigfile's SIGSEGV/SIGBUS handler back on top if a handler installed
/// since (a runtime's crash reporter, a JIT's) replaced it; that handler is
/// then chained to for every fault that is not bigfile's. Installs bigfile's
/// handler if no mapping did yet. `bigfile_fileh_mmap` does this too; call it
/// after your runtime installs signal handlers, before touching mappings.
/// Returns 1 if bigfile's handler had been displaced, 0 if it was on top,
/// -1 if sigaction(2) failed.
///
/// Thread safety: any thread, concurrently with faults and other calls.
#[no_mangle]
pub extern "C" fn bigfile_ensure_fault_handler_on_top() -> c_int {
    guard("bigfile_ensure_fault_handler_on_top", || {
        let displaced = bigfile_fault::ensure_on_top().map_err(bigfile_virtmem::Error::from)?;
        Ok(c_int::from(displaced))
    })
}
