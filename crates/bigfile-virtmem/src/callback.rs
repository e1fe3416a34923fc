//! Whether this thread is inside a `loadblk` or `storeblk`: such a thread
//! must not wait for other threads' loads, which may be waiting for it.
//! The end of a call is also where a worker thread finds out that the call
//! forked and this is the child (`worker.rs`).

use std::cell::Cell;

use crate::{fork_generation, worker};

thread_local! {
    /// How many `loadblk`/`storeblk` calls this thread is inside (nested
    /// through faults). Const-initialised with no destructor, so reading it
    /// from the fault handler is safe.
    static IN_CALLBACK: Cell<u32> = const { Cell::new(0) };
}

/// Marks this thread inside a `loadblk` or `storeblk` while it lives.
pub(crate) struct InCallback<'a> {
    /// The fork generation the call began in.
    forks: u64,
    /// The call, its block and file (for a diagnostic).
    call: (&'static str, u64, &'a str),
}

impl<'a> InCallback<'a> {
    /// Entering `call` ("loadblk", "storeblk") of block `blk` of `file`.
    pub(crate) fn enter(call: (&'static str, u64, &'a str)) -> InCallback<'a> {
        IN_CALLBACK.with(|c| c.set(c.get() + 1));
        InCallback {
            forks: fork_generation::generation(),
            call,
        }
    }
}

impl Drop for InCallback<'_> {
    fn drop(&mut self) {
        // Returning (or unwinding) from the call: a worker thread in a
        // child forked inside it goes no further.
        worker::end_if_forked_child(self.forks, self.call);
        IN_CALLBACK.with(|c| c.set(c.get() - 1));
    }
}

/// Whether this thread is inside a `loadblk` or `storeblk`.
pub(crate) fn in_callback() -> bool {
    IN_CALLBACK.with(|c| c.get() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_callbacks_count() {
        assert!(!in_callback());
        let outer = InCallback::enter(("loadblk", 0, "f"));
        let inner = InCallback::enter(("loadblk", 1, "f"));
        drop(inner);
        assert!(in_callback());
        drop(outer);
        assert!(!in_callback());
    }
}
