//! The huge page pool guard: a holder that dies without restoring the pool
//! (a test killed by a signal while it held it) does not leave the
//! machine's pool grown for good. Needs root; elsewhere it says SKIPPED.

use std::os::fd::AsRawFd;

use bigfile_testkit::child::{forked, TIMEOUT};
use bigfile_testkit::hugepages::{pool_lock_path, HugePages, NR_HUGEPAGES};

fn pool() -> u64 {
    std::fs::read_to_string(NR_HUGEPAGES)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The pool's size as nobody has changed it: read under the lock.
fn pool_at_rest() -> u64 {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(pool_lock_path())
        .unwrap();
    // SAFETY: flock on a descriptor we own; released when it is closed.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    pool()
}

#[test]
fn a_holder_that_died_without_restoring_the_pool_is_undone_by_the_next() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: not root: cannot change {NR_HUGEPAGES}");
        return;
    }
    let before = pool_at_rest();
    // The child grows the pool and dies holding the guard: no restore.
    let status = forked(
        || {
            let guard = HugePages::set(before + 3);
            let ok = guard.is_ok();
            std::mem::forget(guard);
            ok
        },
        TIMEOUT,
    )
    .unwrap();
    assert!(status.success(), "the child could not grow the pool");
    {
        let _guard = HugePages::set(before + 1).unwrap();
        assert_eq!(pool(), before + 1);
    }
    assert_eq!(
        pool(),
        before,
        "the pool is back to its size before the holder that died"
    );
}
