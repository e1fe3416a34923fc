//! The registry in a forked child: a handler running on another thread at
//! the fork (frozen in the child, which does not have that thread) must not
//! make the child wait for it, neither to unregister its range nor to
//! register another.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;

use bigfile_fault::{register, Outcome};
use bigfile_os::os_page_size as page_size;
use bigfile_testkit::child::{forked, TIMEOUT};
use bigfile_testkit::handler::{handler, unprotect};
use bigfile_testkit::memory::{read_byte, Mapping};

#[test]
fn a_handler_running_at_the_fork_holds_nothing_up_in_the_child() {
    let m = Mapping::new(2, libc::PROT_NONE);
    // Atomics only: the child drops the handler, and a lock inside it (a
    // channel's) could be held by the parent's faulting thread at the fork.
    let inside = Arc::new(AtomicBool::new(false));
    let entered = inside.clone();
    let release = Arc::new(AtomicBool::new(false));
    let held = release.clone();
    let reg = register(
        m.page(0),
        2 * page_size(),
        handler(move |f| {
            inside.store(true, SeqCst);
            while !held.load(SeqCst) {
                thread::yield_now();
            }
            unprotect(f)
        }),
    )
    .unwrap();
    let at = m.page(0);
    let faulter = thread::spawn(move || read_byte(at));
    while !entered.load(SeqCst) {
        thread::yield_now();
    }
    // The faulting thread is inside its handler now.
    let other = Mapping::new(1, libc::PROT_NONE);
    // Dropped in the child only: in the parent the handler still runs.
    let mut reg = Some(reg);
    let status = forked(
        || {
            drop(reg.take());
            let again = register(other.page(0), page_size(), handler(|_| Outcome::NotOurs));
            again.is_ok()
        },
        TIMEOUT,
    );
    release.store(true, SeqCst);
    faulter.join().unwrap();
    drop(reg);
    let status = status.unwrap();
    assert!(
        status.success(),
        "the child could not unregister or register: {status:?}"
    );
}
