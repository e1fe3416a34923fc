//! The table of registered ranges and the previous signal actions, published
//! through a [`HalfLock`] so that the signal handler looks it up without
//! taking a lock.

use std::sync::Arc;

use crate::halflock::{HalfLock, WriteGuard};
use crate::handler::FaultHandler;

/// One registered range and its handler. Shared by its [`Registration`](crate::Registration), the
/// published tables that list it, and the signal handler while it serves a
/// fault in it; the reference count is thus also the in-flight count that
/// [`Registration`](crate::Registration)'s drop waits on.
pub(crate) struct RangeState {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) handler: Arc<dyn FaultHandler>,
}

/// What the signal handler needs to know, as one immutable snapshot.
#[derive(Clone)]
pub(crate) struct Table {
    /// Sorted by start, non-overlapping.
    pub(crate) ranges: Vec<Arc<RangeState>>,
    /// Actions that were in place before ours, to chain to: SIGSEGV, SIGBUS.
    pub(crate) prev: [libc::sigaction; 2],
    pub(crate) installed: bool,
}

impl Table {
    fn empty() -> Self {
        // SAFETY: an all-zero sigaction is SIG_DFL with an empty mask.
        let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
        Self {
            ranges: Vec::new(),
            prev: [dfl, dfl],
            installed: false,
        }
    }

    /// The range containing `addr`, by binary search.
    pub(crate) fn find(&self, addr: usize) -> Option<&Arc<RangeState>> {
        let i = self.ranges.partition_point(|r| r.start <= addr);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        (addr < r.end).then_some(r)
    }
}

pub(crate) static TABLE: HalfLock<Table> = HalfLock::new();

/// The current table, or an empty one before anything was published.
pub(crate) fn current(guard: &WriteGuard<'_, Table>) -> Table {
    guard.get().cloned().unwrap_or_else(Table::empty)
}
