//! `bigfile_file`: a BigFile whose `loadblk`/`storeblk` are C callbacks,
//! and the message a failing callback gives.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Mutex;

use bigfile_virtmem::{BigFile, BlockError};

use crate::error::{guard, CError};
use crate::handles::Registry;

/// A file of blocks whose storage is C code (opaque).
#[derive(Debug)]
pub struct bigfile_file {
    _opaque: [u8; 0],
}

/// Fill `buf` (`len` = blksize bytes) with block `blk`; return 0, or -1 on
/// failure (see `bigfile_block_error`).
pub type bigfile_loadblk_fn = Option<
    unsafe extern "C" fn(user: *mut c_void, blk: u64, buf: *mut c_void, len: usize) -> c_int,
>;

/// Store block `blk` from `buf` (`len` = blksize bytes); return 0, or -1 on
/// failure (see `bigfile_block_error`).
pub type bigfile_storeblk_fn = Option<
    unsafe extern "C" fn(user: *mut c_void, blk: u64, buf: *const c_void, len: usize) -> c_int,
>;

pub(crate) static FILES: Registry<CFile> = Registry::new("bigfile_file");

/// The callbacks and their user pointer.
pub(crate) struct CFile {
    blksize: usize,
    loadblk: unsafe extern "C" fn(*mut c_void, u64, *mut c_void, usize) -> c_int,
    storeblk: bigfile_storeblk_fn,
    release: Option<unsafe extern "C" fn(*mut c_void)>,
    user: *mut c_void,
    name: Mutex<String>,
}

// SAFETY: `user` is only handed to the callbacks, which the C caller of
// `bigfile_file_new` promises may run on any thread, concurrently for
// different blocks (the header says so); `release` runs once, when the last
// reference is gone.
unsafe impl Send for CFile {}
// SAFETY: as above; the only state of our own is the Mutex-guarded name.
unsafe impl Sync for CFile {}

thread_local! {
    /// The message the callback running on this thread gave with
    /// `bigfile_block_error`. Const-initialised: used inside page faults.
    static BLOCK_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn take_block_error() -> Option<String> {
    BLOCK_ERROR
        .try_with(|m| m.borrow_mut().take())
        .ok()
        .flatten()
}

/// The result of callback `what` that returned `rc`.
fn outcome(what: &str, blk: u64, rc: c_int) -> Result<(), BlockError> {
    let message = take_block_error();
    match rc {
        0 => Ok(()),
        -1 => Err(message
            .unwrap_or_else(|| format!("{what} returned -1 for block {blk} (no message given)"))
            .into()),
        rc => Err(format!(
            "{what} returned {rc} for block {blk}; callbacks return 0 or -1{}",
            message.map(|m| format!(": {m}")).unwrap_or_default()
        )
        .into()),
    }
}

impl BigFile for CFile {
    fn blksize(&self) -> usize {
        self.blksize
    }

    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        take_block_error();
        // SAFETY: the callback's contract (header): it writes at most `len`
        // bytes of `buf`, which is ours for the call.
        let rc = unsafe { (self.loadblk)(self.user, blk, buf.as_mut_ptr().cast(), buf.len()) };
        outcome("loadblk", blk, rc)
    }

    fn storeblk(&self, blk: u64, buf: &[u8]) -> Result<(), BlockError> {
        let Some(storeblk) = self.storeblk else {
            return Err(format!("{} has no storeblk (created read-only)", self.name()).into());
        };
        take_block_error();
        // SAFETY: the callback's contract (header): it reads at most `len`
        // bytes of `buf`, valid for the call.
        let rc = unsafe { storeblk(self.user, blk, buf.as_ptr().cast(), buf.len()) };
        outcome("storeblk", blk, rc)
    }

    fn name(&self) -> String {
        self.name.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for CFile {
    fn drop(&mut self) {
        if let Some(release) = self.release {
            // SAFETY: the last reference is gone: no callback runs or will
            // run with `user`, and this is the one call of `release`.
            unsafe { release(self.user) }
        }
    }
}

/// Read a C string argument.
///
/// # Safety
/// `s` is NULL or a NUL-terminated string valid for the call.
pub(crate) unsafe fn c_str<'a>(what: &str, s: *const c_char) -> Result<Option<&'a str>, CError> {
    if s.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated (caller).
    let s = unsafe { CStr::from_ptr(s) };
    s.to_str()
        .map(Some)
        .map_err(|_| CError::invalid(format!("{what} is not valid UTF-8")))
}

/// A file of `blksize`-byte blocks (a positive multiple of the OS page size)
/// whose `loadblk` (required) and `storeblk` (NULL: the file is read-only,
/// writeouts of its dirty pages fail) are called with `user`. `release`
/// (may be NULL) is called with `user` once, when neither this handle nor
/// any file handle opened on it remains: after `bigfile_file_free` and the
/// last `bigfile_fileh_close` (or the last `bigfile_vma_unmap` of a closed
/// handle's mappings), on the thread making that call.
///
/// The callbacks run on the thread that needs the block: `loadblk` on the
/// thread that touched the page, inside its page fault, or in
/// `bigfile_vma_prefault`; `storeblk` in `bigfile_fileh_dirty_writeout`.
/// Several may run at once for different blocks, so they must be
/// thread-safe. They run without bigfile's locks and with the host lock
/// released (see `bigfile_set_host_lock`); they may read other mappings
/// but must not touch the page being loaded, nor write to a handle being
/// written out (the process dies with a diagnostic). They must return
/// normally: no C++ exception, `longjmp` or thread exit out of them.
/// A `loadblk` returning -1 is retried (`bigfile_fileh_set_load_policy`);
/// when it keeps failing inside a page fault the thread gets SIGBUS after a
/// diagnostic on stderr naming the file, the block and the message.
///
/// Returns the handle, or NULL (last error set) for a bad `blksize` or a
/// NULL `loadblk`.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn bigfile_file_new(
    blksize: usize,
    loadblk: bigfile_loadblk_fn,
    storeblk: bigfile_storeblk_fn,
    release: Option<unsafe extern "C" fn(user: *mut c_void)>,
    user: *mut c_void,
) -> *mut bigfile_file {
    guard("bigfile_file_new", || {
        let loadblk = loadblk.ok_or_else(|| CError::invalid("loadblk is NULL"))?;
        let os_page = bigfile_os::os_page_size();
        if blksize == 0 || blksize % os_page != 0 {
            return Err(bigfile_virtmem::Error::BadBlksize { blksize, os_page }.into());
        }
        FILES.insert(CFile {
            blksize,
            loadblk,
            storeblk,
            release,
            user,
            name: Mutex::new(format!("C bigfile (user {user:p})")),
        })
    })
}

/// Give up this handle of the file. File handles opened on it keep using
/// it; `release` is called when the last of them is closed (now, if none).
/// Freeing NULL or a handle freed before sets the last error.
///
/// Thread safety: any thread; calls on this handle in progress on other
/// threads finish normally.
#[no_mangle]
pub extern "C" fn bigfile_file_free(file: *mut bigfile_file) {
    guard("bigfile_file_free", || {
        drop(FILES.remove(file)?);
        Ok(())
    })
}

/// Name the file in diagnostics and error messages (default: "C bigfile
/// (user 0x...)"): a path, a table, an object id. Applies to file handles
/// opened after the call. Returns 0, or -1 for a dead handle or a name that
/// is NULL or not UTF-8.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string; it is copied.
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn bigfile_file_set_name(
    file: *mut bigfile_file,
    name: *const c_char,
) -> c_int {
    guard("bigfile_file_set_name", || {
        let f = FILES.get(file)?;
        // SAFETY: NULL or NUL-terminated (caller).
        let name =
            unsafe { c_str("name", name) }?.ok_or_else(|| CError::invalid("name is NULL"))?;
        *f.name.lock().unwrap_or_else(|p| p.into_inner()) = name.to_owned();
        Ok(0)
    })
}

/// Give the message of the failure a `loadblk` or `storeblk` callback is
/// about to report; returns -1, so a callback can end with
/// `return bigfile_block_error("read of block 7 failed: EIO");`. The message
/// (copied; NULL: none) becomes part of the diagnostic or of the error of
/// the call that ran the callback. Only meaningful inside a callback, on
/// its thread; it is forgotten when the callback returns.
///
/// # Safety
/// `msg` is NULL or a NUL-terminated string.
///
/// Thread safety: any thread; applies to the callback running on the
/// calling thread.
#[no_mangle]
pub unsafe extern "C" fn bigfile_block_error(msg: *const c_char) -> c_int {
    // SAFETY: NULL or NUL-terminated (caller).
    let text = match unsafe { c_str("msg", msg) } {
        Ok(m) => m.map(str::to_owned),
        Err(_) => {
            // SAFETY: as above; shown lossily rather than lost.
            Some(
                unsafe { CStr::from_ptr(msg) }
                    .to_string_lossy()
                    .into_owned(),
            )
        }
    };
    let _ = BLOCK_ERROR.try_with(|m| *m.borrow_mut() = text);
    -1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callback_message_is_used_once() {
        // SAFETY: a NUL-terminated literal.
        assert_eq!(unsafe { bigfile_block_error(c"disk on fire".as_ptr()) }, -1);
        let e = outcome("loadblk", 7, -1).unwrap_err();
        assert_eq!(e.to_string(), "disk on fire");
        let e = outcome("loadblk", 7, -1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "loadblk returned -1 for block 7 (no message given)"
        );
        let e = outcome("storeblk", 3, 2).unwrap_err();
        assert!(e.to_string().contains("returned 2"), "{e}");
        assert!(outcome("loadblk", 7, 0).is_ok());
    }
}
