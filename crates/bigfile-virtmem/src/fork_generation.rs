//! How many forks this process is the child of (counted by the fork
//! handlers of `fork.rs`, registered before any RAM is made). A leaf, so
//! that what depends on it (the userfaultfd backend's choice) need not
//! depend on the fork handling, which depends on the RAMs.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many forks this process is the child of: a thread that compares it
/// before and after a `loadblk` or `storeblk` learns whether it forked
/// inside (and is now the child).
pub(crate) fn generation() -> u64 {
    GENERATION.load(Relaxed)
}

/// Count a fork, in the child.
pub(crate) fn advance() {
    GENERATION.fetch_add(1, Relaxed);
}
