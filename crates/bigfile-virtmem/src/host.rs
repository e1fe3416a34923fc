//! Hooks for a host runtime's lock (the Python GIL).
//!
//! A thread that faults while holding the host lock must not wait for the
//! virtmem lock (or for another thread's load) while still holding it: the
//! thread it waits for may need the host lock to finish. Virtmem therefore
//! releases the host lock before it takes its own and retakes it after, in
//! the fault path and in every call that may wait.

use std::sync::{Arc, OnceLock};

/// A host runtime's lock, released around virtmem's own locking.
pub trait HostLock: Send + Sync + 'static {
    /// Release the lock if the calling thread holds it. Returns a token that
    /// `retake` gets back; `None` means the thread did not hold it.
    fn release(&self) -> Option<usize>;
    /// Retake the lock released by `release`.
    fn retake(&self, token: usize);
}

static HOST_LOCK: OnceLock<Arc<dyn HostLock>> = OnceLock::new();

/// Install the process's host-lock hooks. Only the first call takes effect;
/// returns `false` if hooks were already installed.
pub fn set_host_lock(hooks: Arc<dyn HostLock>) -> bool {
    HOST_LOCK.set(hooks).is_ok()
}

/// Releases the host lock for its lifetime.
pub(crate) struct HostUnlocked {
    token: Option<usize>,
}

impl HostUnlocked {
    pub(crate) fn new() -> Self {
        let token = HOST_LOCK.get().and_then(|h| h.release());
        HostUnlocked { token }
    }
}

impl Drop for HostUnlocked {
    fn drop(&mut self) {
        if let (Some(token), Some(hooks)) = (self.token, HOST_LOCK.get()) {
            hooks.retake(token);
        }
    }
}
