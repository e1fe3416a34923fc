//! Which of bigfile's own locks this thread holds. A page fault taken while
//! it holds one (a signal handler touching a mapping while its thread is
//! inside bigfile) cannot be served: serving takes those locks, and would
//! wait for this very thread. The fault path asks [`holds_lock`] and fails
//! such a fault with a diagnostic instead of hanging.

use std::cell::Cell;
use std::marker::PhantomData;

thread_local! {
    /// Const-initialised with no destructor: readable from a signal handler.
    static HELD: Cell<u32> = const { Cell::new(0) };
}

/// One of bigfile's locks, counted as held by this thread while this lives
/// (taken right after the lock, dropped right before it is released). Not
/// `Send`: it counts for the thread that made it.
#[derive(Debug)]
pub struct HeldLock(PhantomData<*const ()>);

impl HeldLock {
    /// Count a lock just taken by this thread.
    pub fn enter() -> HeldLock {
        HELD.with(|h| h.set(h.get() + 1));
        HeldLock(PhantomData)
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        HELD.with(|h| h.set(h.get() - 1));
    }
}

/// Whether this thread holds one of bigfile's locks now.
pub fn holds_lock() -> bool {
    HELD.with(|h| h.get() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_locks_count_per_thread() {
        assert!(!holds_lock());
        let a = HeldLock::enter();
        let b = HeldLock::enter();
        std::thread::spawn(|| assert!(!holds_lock()))
            .join()
            .unwrap();
        drop(a);
        assert!(holds_lock());
        drop(b);
        assert!(!holds_lock());
    }
}
