//! Registering a range: adding it to the published table, and the
//! [`Registration`] whose drop removes it and waits for its handlers.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::error::FaultError;
use crate::frames::frames_serving;
use crate::handler::FaultHandler;
use crate::signal;
use crate::table::{current, RangeState, TABLE};

/// Registers `handler` for faults in `start..start + len`.
///
/// Installs the signal handler if needed and puts it back on top if another
/// handler displaced it (see [`ensure_on_top`](crate::ensure_on_top)). The
/// range need not be page-aligned, but faults are per page, so a range that
/// shares a page with unrelated memory will see faults meant for that memory.
///
/// # Errors
/// [`FaultError::EmptyRange`], [`FaultError::Overflow`], [`FaultError::Overlap`]
/// with an existing range, or [`FaultError::Sigaction`] if installing failed.
pub fn register(
    start: usize,
    len: usize,
    handler: Arc<dyn FaultHandler>,
) -> Result<Registration, FaultError> {
    if len == 0 {
        return Err(FaultError::EmptyRange { start });
    }
    let end = start
        .checked_add(len)
        .ok_or(FaultError::Overflow { start, len })?;
    crate::fork::install();
    let mut guard = TABLE.write();
    signal::ensure_on_top_locked(&mut guard)?;
    let mut table = current(&guard);
    let i = table.ranges.partition_point(|r| r.start < start);
    let neighbours = [i.checked_sub(1), Some(i)];
    for r in neighbours
        .into_iter()
        .flatten()
        .filter_map(|j| table.ranges.get(j))
    {
        if r.start < end && start < r.end {
            return Err(FaultError::Overlap {
                new: start..end,
                existing: r.start..r.end,
            });
        }
    }
    let state = Arc::new(RangeState {
        start,
        end,
        handler,
    });
    table.ranges.insert(i, Arc::clone(&state));
    guard.publish(table);
    Ok(Registration { state })
}

/// A registered range. Dropping it unregisters the range and waits until
/// handlers serving faults in it on other threads have returned; after that
/// the handler object is no longer used (and is dropped here unless something
/// else holds it). Handlers of this range running on the current thread (the
/// drop happens from inside one) are not waited for, so that cannot deadlock;
/// they keep their own reference until they return.
///
/// The wait is for handlers that are already running: the caller must make
/// sure nothing touches the range's protected memory once it is dropped (a
/// fault there then goes to the previous handler, usually killing the process).
#[must_use = "dropping a Registration unregisters the range at once"]
pub struct Registration {
    state: Arc<RangeState>,
}

impl Registration {
    /// The registered address range.
    pub fn range(&self) -> Range<usize> {
        self.state.start..self.state.end
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field(
                "range",
                &format_args!("{:#x}..{:#x}", self.state.start, self.state.end),
            )
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        {
            let mut guard = TABLE.write();
            let mut table = current(&guard);
            table.ranges.retain(|r| !Arc::ptr_eq(r, &self.state));
            // Once published, no new fault can find this range: later readers
            // see the new table, and the old one is freed after its readers left.
            guard.publish(table);
        }
        // Without the writer lock: a handler we wait for may itself register.
        let own = frames_serving(Arc::as_ptr(&self.state));
        let mut spins = 0u32;
        while Arc::strong_count(&self.state) > 1 + own {
            spins += 1;
            if spins < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
        // Pairs with the Release of the handlers' Arc drops: their effects
        // happen before whatever follows this drop.
        fence(Ordering::Acquire);
    }
}
