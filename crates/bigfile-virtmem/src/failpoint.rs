//! Failure points of the fault-injection suite (tests/faults), compiled only
//! with the `failpoints` feature.

use std::io;

/// Failure point `name`: when the suite arms it, fails with the error number
/// it gives as `return(ERRNO)` (EIO without one), so that the caller's real
/// error path runs as if the system call behind it had failed.
pub(crate) fn check(name: &str) -> io::Result<()> {
    fail::fail_point!(name, |arg: Option<String>| {
        let errno = arg.and_then(|a| a.parse().ok()).unwrap_or(libc::EIO);
        Err(io::Error::from_raw_os_error(errno))
    });
    Ok(())
}

/// Hook point `name`: where the crate's own failpoint tests run code of
/// theirs (fail's callbacks), to hold a thread at a chosen step or to learn
/// that one got there.
pub(crate) fn hook(name: &str) {
    fail::fail_point!(name);
}
