//! Which handlers run on this thread: the nesting depth of faults, and the
//! range each level serves. Thread-local, const-initialised with no
//! destructor, so the signal handler may use them.

use std::cell::Cell;

use crate::table::RangeState;

/// Nesting deeper than this is runaway recursion: fatal.
pub const MAX_DEPTH: u32 = 8;

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The range served at each depth on this thread (its `RangeState` address).
    static FRAMES: [Cell<usize>; MAX_DEPTH as usize] = const { [const { Cell::new(0) }; MAX_DEPTH as usize] };
}

/// Nesting depth of fault handlers on this thread: 0 outside any handler, 1
/// inside the handler of a first fault, 2 inside a fault taken by that
/// handler, and so on.
pub fn current_depth() -> u32 {
    DEPTH.with(Cell::get)
}

/// A handler of `range` starts at `depth` (1 ..= MAX_DEPTH) on this thread.
pub(crate) fn enter(depth: u32, range: &RangeState) {
    FRAMES.with(|f| f[depth as usize - 1].set(std::ptr::from_ref(range) as usize));
    DEPTH.with(|d| d.set(depth));
}

/// The handler that [`enter`]ed at `depth` has returned.
pub(crate) fn leave(depth: u32) {
    DEPTH.with(|d| d.set(depth - 1));
    FRAMES.with(|f| f[depth as usize - 1].set(0));
}

/// How many handlers of `range` are running on this thread.
pub(crate) fn frames_serving(range: *const RangeState) -> usize {
    let depth = current_depth() as usize;
    FRAMES.with(|frames| {
        frames[..depth]
            .iter()
            .filter(|f| f.get() == range as usize)
            .count()
    })
}
