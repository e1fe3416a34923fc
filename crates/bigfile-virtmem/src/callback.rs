//! Whether this thread is inside a `loadblk` or `storeblk`: such a thread
//! must not wait for other threads' loads, which may be waiting for it.

use std::cell::Cell;

thread_local! {
    /// How many `loadblk`/`storeblk` calls this thread is inside (nested
    /// through faults). Const-initialised with no destructor, so reading it
    /// from the fault handler is safe.
    static IN_CALLBACK: Cell<u32> = const { Cell::new(0) };
}

/// Marks this thread inside a `loadblk` or `storeblk` while it lives.
pub(crate) struct InCallback(());

impl InCallback {
    pub(crate) fn enter() -> InCallback {
        IN_CALLBACK.with(|c| c.set(c.get() + 1));
        InCallback(())
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
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
        let outer = InCallback::enter();
        let inner = InCallback::enter();
        drop(inner);
        assert!(in_callback());
        drop(outer);
        assert!(!in_callback());
    }
}
