//! Which of bigfile's own threads runs loaders (a userfaultfd worker, a
//! read-ahead worker), and what such a thread does when a `loadblk` or
//! `storeblk` it ran forked (ARCHITECTURE.md, "Fork"): in the child, the
//! thread is the only one, a copy of the worker, and the loop it would go
//! back to is its parent's (the parent's queued jobs, against the child's
//! state, which forgot every page; the parent's job queue or channel, which
//! nothing in the child ever fills: the child ran its parent's jobs into a
//! panic, or waited for ever). It has no caller to return to: it says so
//! on stderr and ends the child with [`FORKED_WORKER_STATUS`], before it
//! touches anything of bigfile's again. A leaf: `callback.rs`, at the end
//! of every `loadblk` and `storeblk`, is where the child finds out.

use std::cell::Cell;

/// The exit status of a child forked by a `loadblk` or `storeblk` running
/// on one of bigfile's worker threads (read-ahead; a system call's fault on
/// the userfaultfd backend), once the call returns there: the child's only
/// thread is a copy of the worker, with nothing to go back to, so the child
/// ends with `_exit(FORKED_WORKER_STATUS)` after a diagnostic on stderr
/// (`bigfile: a loadblk ... forked on bigfile's worker thread ...`).
/// A child that never returns from the call (it execs, or ends itself, as
/// `subprocess` and `multiprocessing` children do) is not concerned.
/// 70 is `EX_SOFTWARE` of `sysexits.h`: "an internal software error".
pub const FORKED_WORKER_STATUS: i32 = 70;

/// A kind of bigfile's own threads that run loaders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Worker {
    /// A userfaultfd worker (`uffd.rs`), serving a system call's fault.
    Uffd,
    /// A read-ahead worker (`readahead.rs`).
    ReadAhead,
}

thread_local! {
    /// What this thread is, if one of bigfile's workers. Const-initialised
    /// with no destructor.
    static KIND: Cell<Option<Worker>> = const { Cell::new(None) };
}

/// Mark the calling thread (just started) as a worker of `kind`.
pub(crate) fn become_worker(kind: Worker) {
    KIND.with(|k| k.set(Some(kind)));
}

/// The kind of worker the calling thread is, if one.
pub(crate) fn current() -> Option<Worker> {
    KIND.with(Cell::get)
}

/// Called after a `loadblk` or `storeblk` (`call`, of block `blk` of file
/// `file`) that was entered in fork generation `forks`: on a worker thread
/// of a child forked inside the call, end the child (the module's comment).
pub(crate) fn end_if_forked_child(forks: u64, (call, blk, file): (&str, u64, &str)) {
    let Some(kind) = current() else {
        return;
    };
    if crate::fork_generation::generation() == forks {
        return;
    }
    let what = match kind {
        Worker::Uffd => "a userfaultfd worker, serving a system call's fault",
        Worker::ReadAhead => "a read-ahead worker",
    };
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("?");
    let msg = format!(
        "bigfile: a {call} of block {blk} of {file} forked on bigfile's worker thread {name} \
         ({what}); the child, whose only thread is that worker's copy, has nothing to return \
         to: it exits with status {FORKED_WORKER_STATUS} (a child forked there must exec or \
         _exit before the call returns)\n"
    );
    // Straight to the descriptor: std's stderr lock may have been held by a
    // thread of the parent's at the fork.
    // SAFETY: writes `msg`'s bytes, which outlive the call; `_exit` ends the
    // process at once, running no destructor nor atexit handler of the
    // parent's (its stdio buffers, its interpreter's state), and touching
    // none of bigfile's state again.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(FORKED_WORKER_STATUS)
    }
}
