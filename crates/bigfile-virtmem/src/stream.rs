//! Sequential detection: whether a mapping's faults form a forward scan
//! (a stream), as the kernel's read-ahead tells one for a file, and the
//! stream's read-ahead window. The policies are described in
//! ARCHITECTURE.md ("Sequential detection", "Read-ahead").

use std::ops::Range;

/// The largest read-ahead window, in blocks (never more than a quarter of
/// the budget, nor more than [`WINDOW_BYTES`]).
pub(crate) const MAX_WINDOW: u64 = 8;

/// The most bytes a read-ahead window holds (at least one block). A scan's
/// pages are recycled by drop-behind: a page comes back to be filled a
/// window after the scan read it, and the scan reads it a moment after a
/// worker filled it; with the window and the source read from the page
/// cache in the CPU caches (32 MiB of L3 here) both find it there. Measured
/// with 2 MiB blocks (benches/README.md, "Issue 19: the read-ahead window"):
/// a window of 3 blocks scanned at 1.11-1.18x of `pread`, 4 at 0.96-1.07x,
/// 8 at 0.84-1.02x.
pub(crate) const WINDOW_BYTES: u64 = 6 << 20;

/// The read-ahead window's largest size under a budget of `budget_pages`
/// pages of `page_size` bytes: [`MAX_WINDOW`] blocks, at most
/// [`WINDOW_BYTES`] (at least a block), never more than a quarter of the
/// budget.
pub(crate) fn max_window(budget_pages: u64, page_size: usize) -> u64 {
    let fits = (WINDOW_BYTES / (page_size as u64).max(1)).max(1);
    MAX_WINDOW.min(fits).min(budget_pages / 4)
}

/// A mapping's faults seen as a stream: the block of its last fault, how
/// many faults in a row continued it, and how far it was read ahead.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stream {
    last: Option<u64>,
    run: u64,
    /// Blocks below this were read ahead (issued).
    ahead: u64,
    /// The block where the stream's next fault is expected: read-ahead
    /// pages below it are mapped when loaded (the stream's accesses to them
    /// take no fault); the fault on it reads further ahead.
    trigger: u64,
    /// The LRU clock at the stream's first fault (`Lru::clock`): a page
    /// last used before it was used less recently than any of the stream's.
    since: u64,
}

/// What a fault made of its mapping's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Not right after the fault before: no stream (or not any more).
    Random,
    /// Right after a fault that was not itself sequential: a stream begins.
    Began,
    /// A stream goes on (or the same block faulted again within it: a
    /// write after a read, an access spanning two blocks).
    Continues,
}

impl Stream {
    /// A fault on block `blk`, at LRU clock `now`: what it makes of the
    /// stream. It continues the stream when it comes on the block right
    /// after the last fault, or (the pages between mapped by read-ahead, so
    /// touched without a fault) anywhere up to the trigger. A fault that
    /// does not is the first of the stream that may begin at the next.
    pub(crate) fn note(&mut self, blk: u64, now: u64) -> Step {
        let prev = self.last.replace(blk);
        if prev == Some(blk) {
            return if self.run > 0 {
                Step::Continues
            } else {
                Step::Random
            };
        }
        if let Some(next) = prev.and_then(|p| p.checked_add(1)) {
            if blk >= next && blk <= next.max(self.trigger) {
                self.run += 1;
                return if self.run == 1 {
                    Step::Began
                } else {
                    Step::Continues
                };
            }
        }
        self.run = 0;
        self.ahead = 0;
        self.trigger = 0;
        self.since = now;
        Step::Random
    }

    /// The LRU clock at the stream's first fault.
    pub(crate) fn since(&self) -> u64 {
        self.since
    }

    /// The block of the last fault noted.
    pub(crate) fn last(&self) -> Option<u64> {
        self.last
    }

    /// Whether the faults so far form a stream.
    pub(crate) fn is_sequential(&self) -> bool {
        self.run > 0
    }

    /// The blocks read ahead and not yet passed by a fault: after the last
    /// fault, below the read-ahead end.
    pub(crate) fn pending(&self) -> Range<u64> {
        self.last.map_or(0, |l| l.saturating_add(1))..self.ahead
    }

    /// The read-ahead window after the stream's faults so far, at most
    /// `max` blocks: 1, 2, 4 ... as it goes on; `max` at once with
    /// `advised` (a mapping advised sequential).
    pub(crate) fn window(&self, advised: bool, max: u64) -> u64 {
        if advised {
            return max;
        }
        match self.run {
            0 => 0,
            run => 1u64
                .checked_shl((run - 1).min(63) as u32)
                .unwrap_or(u64::MAX)
                .min(max),
        }
    }

    /// Read `window` blocks ahead of a fault on `blk`: the blocks not read
    /// ahead yet among them; the trigger moves half a window on (at least
    /// one block).
    pub(crate) fn read_ahead(&mut self, blk: u64, window: u64) -> Range<u64> {
        let end = blk.saturating_add(window).saturating_add(1);
        let start = blk.saturating_add(1).max(self.ahead).min(end);
        self.ahead = self.ahead.max(end);
        // (Never back: a system call's buffer may have moved it further.)
        self.trigger = self.trigger.max(blk.saturating_add((window / 2).max(1)));
        start..end
    }

    /// Read ahead of a fault on `blk` up to block `end` (exclusive: the
    /// end of the buffer a system call copies): the blocks not read ahead
    /// yet among them. The faults up to `end` form a stream from here on,
    /// and every page read ahead below `end` is mapped once loaded (the
    /// trigger moves to `end`): the call copies them all, unless it fails.
    pub(crate) fn read_ahead_to(&mut self, blk: u64, end: u64) -> Range<u64> {
        let next = blk.saturating_add(1);
        let start = next.max(self.ahead);
        if next >= end {
            return start..start;
        }
        self.run = self.run.max(1);
        self.trigger = self.trigger.max(end);
        if start >= end {
            return start..start;
        }
        self.ahead = end;
        start..end
    }

    /// Read-ahead stopped short of block `at` (no room, no worker): the
    /// blocks from there on are asked again at the stream's next fault.
    pub(crate) fn cut_ahead(&mut self, at: u64) {
        self.ahead = self.ahead.min(at);
    }

    /// Whether a read-ahead page of block `blk`, once loaded, is mapped in
    /// the stream's mapping: below the trigger (and not passed yet).
    pub(crate) fn maps_ahead(&self, blk: u64) -> bool {
        self.is_sequential() && self.last.is_some_and(|l| blk > l) && blk < self.trigger
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(blocks: &[u64]) -> Vec<Step> {
        let mut s = Stream::default();
        blocks.iter().map(|&b| s.note(b, 0)).collect()
    }

    #[test]
    fn a_fault_right_after_the_one_before_begins_a_stream() {
        use Step::*;
        assert_eq!(
            steps(&[5, 6, 7, 7, 8]),
            [Random, Began, Continues, Continues, Continues]
        );
    }

    #[test]
    fn random_and_backward_faults_keep_it_shut() {
        use Step::*;
        assert_eq!(steps(&[9, 3, 3, 8, 7, 1]), [Random; 6]);
        let mut s = Stream::default();
        s.note(1, 0);
        s.note(2, 0);
        assert!(s.is_sequential());
        assert_eq!(s.note(10, 0), Random, "a jump ends it");
        assert!(!s.is_sequential());
        assert_eq!(s.note(11, 0), Began, "and a new one may begin there");
    }

    #[test]
    fn the_window_grows_to_its_maximum_and_opens_at_once_when_advised() {
        let mut s = Stream::default();
        let mut windows = Vec::new();
        for blk in 0..7 {
            s.note(blk, 0);
            windows.push(s.window(false, MAX_WINDOW));
        }
        assert_eq!(windows, [0, 1, 2, 4, 8, 8, 8]);
        assert_eq!(s.window(false, 3), 3, "never more than the maximum given");
        assert_eq!(Stream::default().window(true, 5), 5);
        let mut long = Stream::default();
        for blk in 0..200 {
            long.note(blk, 0);
        }
        assert_eq!(long.window(false, 3), 3, "however long the stream");
    }

    #[test]
    fn the_largest_window_holds_a_few_mib_and_a_quarter_of_the_budget() {
        const MIB: usize = 1 << 20;
        assert_eq!(max_window(32, 2 * MIB), 3, "6 MiB of 2 MiB blocks");
        assert_eq!(max_window(1024, 64 << 10), MAX_WINDOW, "small blocks");
        assert_eq!(max_window(32, 16 * MIB), 1, "at least one block");
        assert_eq!(max_window(8, 64 << 10), 2, "a quarter of the budget");
        assert_eq!(max_window(3, 64 << 10), 0, "none under 4 pages");
    }

    #[test]
    fn read_ahead_tops_up_the_window_and_faults_up_to_the_trigger_continue() {
        let mut s = Stream::default();
        s.note(10, 0);
        s.note(11, 0);
        assert_eq!(s.read_ahead(11, 8), 12..20);
        assert_eq!(s.pending(), 12..20);
        assert!(s.maps_ahead(14) && !s.maps_ahead(15) && !s.maps_ahead(11));
        // The stream's accesses to 12..15 took no fault: the next is on 15.
        assert_eq!(s.note(15, 0), Step::Continues);
        assert_eq!(s.read_ahead(15, 8), 20..24, "only what is new");
        assert_eq!(s.pending(), 16..24);
        s.cut_ahead(22);
        assert_eq!(s.pending(), 16..22, "22 and 23 not read ahead after all");
        assert_eq!(s.read_ahead(15, 8), 22..24, "asked again");
        assert_eq!(s.note(30, 0), Step::Random, "beyond the trigger: a jump");
        assert!(s.pending().is_empty(), "nothing pending once stopped");
    }

    #[test]
    fn a_system_calls_buffer_is_read_ahead_and_mapped_to_its_end() {
        let mut s = Stream::default();
        assert_eq!(s.note(40, 0), Step::Random, "the call's first fault");
        assert_eq!(s.read_ahead_to(40, 40), 41..41, "nothing past the buffer");
        assert!(!s.is_sequential());
        assert_eq!(s.read_ahead_to(40, 300), 41..300);
        assert!(s.is_sequential(), "a stream from there on");
        assert!(s.maps_ahead(41) && s.maps_ahead(299), "mapped as loaded");
        assert!(!s.maps_ahead(300) && !s.maps_ahead(40));
        assert_eq!(s.pending(), 41..300);
        // The call caught up with a load at 90: its stream goes on.
        assert_eq!(s.note(90, 0), Step::Continues);
        s.cut_ahead(120);
        assert_eq!(s.read_ahead_to(90, 300), 120..300, "only what was cut");
        assert!(
            s.read_ahead_to(90, 200).is_empty(),
            "a shorter call: nothing new"
        );
        assert_eq!(s.window(false, 3), 2, "a window as any stream's");
        assert!(s.read_ahead(90, 2).is_empty(), "which never shrinks it");
        assert!(s.maps_ahead(299), "nor the mapping ahead");
        assert_eq!(s.note(300, 0), Step::Continues, "a next call's fault");
        assert_eq!(s.read_ahead_to(300, 310), 301..310);
        assert!(s.maps_ahead(309));
    }

    #[test]
    fn a_stream_remembers_the_clock_at_its_first_fault() {
        let mut s = Stream::default();
        s.note(4, 10);
        assert_eq!(s.note(5, 11), Step::Began);
        s.note(6, 12);
        assert_eq!(s.since(), 10, "the fault before the one that began it");
        assert_eq!(s.note(20, 13), Step::Random);
        assert_eq!(s.since(), 13, "a jump: a stream may begin here");
    }

    #[test]
    fn the_last_block_ends_nothing() {
        let mut s = Stream::default();
        s.note(u64::MAX, 0);
        assert_eq!(s.note(0, 0), Step::Random, "no wrap around");
    }
}
