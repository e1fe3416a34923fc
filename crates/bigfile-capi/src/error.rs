//! Errors at the C boundary: each thread's last error (a message and a
//! kind), and the guard every entry point runs in, so that a failure, a
//! misuse or a panic comes back as -1 or NULL and never crosses into C.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use bigfile_virtmem::Error;

/// No error: the last call on this thread succeeded.
pub const BIGFILE_ERROR_NONE: c_int = 0;
/// Misuse: NULL or a handle that is not live (closed, freed, of another
/// kind), a bad argument (flags, advice, range, block size, RAM spec).
pub const BIGFILE_ERROR_INVALID: c_int = 1;
/// Refused in the current state: a file handle with live mappings, a
/// writeout of the handle in progress, host-lock hooks already installed.
pub const BIGFILE_ERROR_STATE: c_int = 2;
/// Out of memory: the RAM budget is full of dirty pages, or the RAM's own
/// memory (its filesystem, the huge page pool) is exhausted.
pub const BIGFILE_ERROR_NOMEM: c_int = 3;
/// `loadblk` kept failing (from `bigfile_vma_prefault`).
pub const BIGFILE_ERROR_LOAD: c_int = 4;
/// `storeblk` failed: every page not stored is still dirty.
pub const BIGFILE_ERROR_STORE: c_int = 5;
/// An operating-system call failed (the message names it and the errno).
pub const BIGFILE_ERROR_OS: c_int = 6;
/// A bug in bigfile (a panic, caught at the boundary).
pub const BIGFILE_ERROR_INTERNAL: c_int = 7;

/// An error on its way to C: its kind (a `BIGFILE_ERROR_*`) and message.
#[derive(Debug)]
pub(crate) struct CError {
    kind: c_int,
    message: String,
}

impl CError {
    pub(crate) fn invalid(message: impl Into<String>) -> CError {
        CError {
            kind: BIGFILE_ERROR_INVALID,
            message: message.into(),
        }
    }

    pub(crate) fn state(message: impl Into<String>) -> CError {
        CError {
            kind: BIGFILE_ERROR_STATE,
            message: message.into(),
        }
    }

    #[cfg(test)]
    pub(crate) fn kind(&self) -> c_int {
        self.kind
    }
}

impl From<Error> for CError {
    fn from(e: Error) -> CError {
        let kind = match &e {
            Error::BadBlksize { .. }
            | Error::PageSizeMismatch { .. }
            | Error::InvalidRange(_)
            | Error::OutOfBounds { .. }
            | Error::InvalidFlags(_) => BIGFILE_ERROR_INVALID,
            Error::WriteoutInProgress(_) | Error::LiveMappings(_) | Error::Forked => {
                BIGFILE_ERROR_STATE
            }
            Error::BudgetExhausted { .. } => BIGFILE_ERROR_NOMEM,
            Error::Ram(r) if r.is_exhausted() => BIGFILE_ERROR_NOMEM,
            Error::Ram(
                bigfile_ram::RamError::Spec { .. } | bigfile_ram::RamError::PageSize { .. },
            ) => BIGFILE_ERROR_INVALID,
            Error::Load { .. } => BIGFILE_ERROR_LOAD,
            Error::Store { .. } => BIGFILE_ERROR_STORE,
            // The RAM's and the fault layer's other errors are system
            // calls failing; so are variants virtmem may add.
            _ => BIGFILE_ERROR_OS,
        };
        CError {
            kind,
            message: e.to_string(),
        }
    }
}

impl From<bigfile_ram::RamError> for CError {
    fn from(e: bigfile_ram::RamError) -> CError {
        Error::Ram(e).into()
    }
}

thread_local! {
    /// This thread's last error: kind and message. Const-initialised, so
    /// reading it from inside a fault handler allocates nothing.
    static LAST: RefCell<Option<(c_int, CString)>> = const { RefCell::new(None) };
}

fn set_last(e: Option<CError>) {
    let value = e.map(|e| {
        // A message with a NUL inside (from a callback's text) is cut there.
        let bytes: Vec<u8> = e
            .message
            .into_bytes()
            .into_iter()
            .take_while(|&b| b != 0)
            .collect();
        (e.kind, CString::new(bytes).unwrap_or_default())
    });
    // During the thread's teardown the slot may be gone: nothing to report to.
    let _ = LAST.try_with(|l| *l.borrow_mut() = value);
}

/// What an entry point returns when it fails.
pub(crate) trait Failed {
    fn failed() -> Self;
}

impl Failed for c_int {
    fn failed() -> c_int {
        -1
    }
}

impl Failed for i64 {
    fn failed() -> i64 {
        -1
    }
}

impl Failed for () {
    fn failed() {}
}

impl<T> Failed for *mut T {
    fn failed() -> *mut T {
        ptr::null_mut()
    }
}

/// Run the body of entry point `func`: its result on success (clearing this
/// thread's last error), else the failure value with the last error set,
/// prefixed by `func`. A panic is caught here and becomes an internal error.
pub(crate) fn guard<R: Failed>(func: &str, body: impl FnOnce() -> Result<R, CError>) -> R {
    let e = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(r)) => {
            set_last(None);
            return r;
        }
        Ok(Err(e)) => e,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            CError {
                kind: BIGFILE_ERROR_INTERNAL,
                message: format!("internal error (please report): {what}"),
            }
        }
    };
    set_last(Some(CError {
        kind: e.kind,
        message: format!("{func}: {}", e.message),
    }));
    R::failed()
}

/// The last error of the calling thread: a message naming the function that
/// failed, or NULL when the last call succeeded (or none was made).
///
/// The string belongs to bigfile and stays valid until the thread's next
/// call of a bigfile function other than `bigfile_last_error` and
/// `bigfile_last_error_kind`; copy it to keep it.
///
/// Thread safety: any thread; each thread has its own last error.
#[no_mangle]
pub extern "C" fn bigfile_last_error() -> *const c_char {
    LAST.try_with(|l| match &*l.borrow() {
        Some((_, msg)) => msg.as_ptr(),
        None => ptr::null(),
    })
    .unwrap_or(ptr::null())
}

/// The kind of the calling thread's last error: a `BIGFILE_ERROR_*`
/// constant, `BIGFILE_ERROR_NONE` when the last call succeeded.
///
/// Thread safety: any thread; each thread has its own last error.
#[no_mangle]
pub extern "C" fn bigfile_last_error_kind() -> c_int {
    LAST.try_with(|l| l.borrow().as_ref().map_or(BIGFILE_ERROR_NONE, |(k, _)| *k))
        .unwrap_or(BIGFILE_ERROR_NONE)
}

/// Store `value` into a C out-parameter.
///
/// # Safety
/// `out` is NULL or valid for a write of a `T`.
pub(crate) unsafe fn write_out<T>(out: *mut T, value: T) -> Result<(), CError> {
    if out.is_null() {
        return Err(CError::invalid("out is NULL"));
    }
    // SAFETY: not NULL and writable (caller).
    unsafe { out.write(value) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> Option<(c_int, String)> {
        let p = bigfile_last_error();
        if p.is_null() {
            return None;
        }
        // SAFETY: a non-NULL result is this thread's NUL-terminated message,
        // valid until the next call that sets it.
        let msg = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        Some((bigfile_last_error_kind(), msg))
    }

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let r: c_int = guard("bigfile_test", || panic!("boom {}", 7));
        assert_eq!(r, -1);
        let (kind, msg) = last().unwrap();
        assert_eq!(kind, BIGFILE_ERROR_INTERNAL);
        assert!(msg.starts_with("bigfile_test: internal error"), "{msg}");
        assert!(msg.contains("boom 7"), "{msg}");
    }

    #[test]
    fn success_clears_and_failure_names_the_function() {
        let p: *mut u8 = guard("bigfile_x", || Err(CError::invalid("bad \0thing")));
        assert!(p.is_null());
        assert_eq!(
            last(),
            Some((BIGFILE_ERROR_INVALID, "bigfile_x: bad ".to_owned()))
        );
        assert_eq!(guard("bigfile_y", || Ok(5i64)), 5);
        assert_eq!(last(), None);
        assert_eq!(bigfile_last_error_kind(), BIGFILE_ERROR_NONE);
    }

    #[test]
    fn virtmem_errors_keep_their_kind() {
        let e: CError = Error::LiveMappings(2).into();
        assert_eq!(e.kind(), BIGFILE_ERROR_STATE);
        let e: CError = Error::InvalidFlags(4).into();
        assert_eq!(e.kind(), BIGFILE_ERROR_INVALID);
        let e: CError = Error::BudgetExhausted {
            budget: 1,
            pinned: 1,
        }
        .into();
        assert_eq!(e.kind(), BIGFILE_ERROR_NOMEM);
    }
}
