//! Hooks for a host runtime's lock (the Python GIL).
//!
//! A thread holding the host lock must not wait for work that may need it
//! (another thread's load by a loader that takes it): that thread could
//! never finish. The calls of the API release the host lock before they
//! take virtmem's own lock and retake it after ([`HostUnlocked`]). A page
//! fault instead keeps it as long as it can ([`HostLease`]): the host code
//! that touched the memory (a C function that assumed it held the lock)
//! then sees no other host thread run during the access, unless the fault
//! has to wait for such work or call a loader that takes the lock (see
//! [`BigFile::needs_host_lock`](crate::BigFile::needs_host_lock)). No thread
//! ever waits for the host lock while holding virtmem's, so a thread may
//! hold the host lock while it takes virtmem's.

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
        // Lock order: no thread waits for the host lock holding one of
        // virtmem's (another thread holding the host lock may be waiting
        // for it). A lock guard made in a tail expression outlives the
        // locals of its block: the kind of slip this catches in tests.
        debug_assert!(
            !bigfile_os::holds_lock(),
            "the host lock retaken while this thread holds a lock of bigfile's"
        );
        if let (Some(token), Some(hooks)) = (self.token, HOST_LOCK.get()) {
            hooks.retake(token);
        }
    }
}

/// The host lock during one page fault: kept (if the thread holds it) until
/// something needs it released, then released until the fault ends.
#[derive(Default)]
pub(crate) struct HostLease(Option<HostUnlocked>);

impl HostLease {
    /// Released from the start: for calls that wait as they please.
    pub(crate) fn released() -> HostLease {
        HostLease(Some(HostUnlocked::new()))
    }

    /// Whether the lock may still be held (not given away yet).
    pub(crate) fn kept(&self) -> bool {
        self.0.is_none()
    }

    /// Release the lock now if `needed` and not done yet. The caller holds
    /// no lock of virtmem's.
    pub(crate) fn release_if(&mut self, needed: bool) {
        if needed && self.kept() {
            self.0 = Some(HostUnlocked::new());
        }
    }
}
