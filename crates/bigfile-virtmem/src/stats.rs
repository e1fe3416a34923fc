//! Counters: cheap to read (relaxed atomics), kept per file handle and per RAM.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of virtmem counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Page faults served (including prefault requests).
    pub faults: u64,
    /// Successful `loadblk` calls.
    pub loads: u64,
    /// Failed `loadblk` attempts (each retry counts).
    pub load_errors: u64,
    /// Successful `storeblk` calls.
    pub stores: u64,
    /// Pages reclaimed (clean pages dropped to stay within the budget or on request).
    pub reclaims: u64,
    /// Pages holding memory now: loading, clean or dirty, plus RAM pages
    /// reclaimed ahead of need and kept for the next loads (see
    /// [`Ram::set_budget`](crate::Ram::set_budget)).
    pub resident_pages: u64,
    /// Dirty pages now.
    pub dirty_pages: u64,
    /// Sequential streams detected: how many times a mapping under
    /// [`Advice::Normal`](crate::Advice::Normal) took a fault on the block
    /// right after the one it faulted on before, after a fault that was not
    /// so (sequential detection, see ARCHITECTURE.md).
    pub streams: u64,
    /// Blocks loaded by read-ahead (counted in `loads` too): loaded by a
    /// worker thread ahead of a stream's faults (see ARCHITECTURE.md,
    /// "Read-ahead").
    pub readahead_loads: u64,
    /// Pages read-ahead loaded that were reached before they were dropped:
    /// faulted on, or passed by their stream's faults.
    pub readahead_hits: u64,
    /// Pages read-ahead loaded that were dropped (reclaimed, invalidated,
    /// closed) before anything reached them.
    pub readahead_wasted: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    faults: AtomicU64,
    loads: AtomicU64,
    load_errors: AtomicU64,
    stores: AtomicU64,
    reclaims: AtomicU64,
    resident_pages: AtomicU64,
    dirty_pages: AtomicU64,
    streams: AtomicU64,
    readahead_loads: AtomicU64,
    readahead_hits: AtomicU64,
    readahead_wasted: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Faults,
    Loads,
    LoadErrors,
    Stores,
    Reclaims,
    Resident,
    Dirty,
    Streams,
    ReadAheadLoads,
    ReadAheadHits,
    ReadAheadWasted,
}

impl Counters {
    fn cell(&self, c: Counter) -> &AtomicU64 {
        match c {
            Counter::Faults => &self.faults,
            Counter::Loads => &self.loads,
            Counter::LoadErrors => &self.load_errors,
            Counter::Stores => &self.stores,
            Counter::Reclaims => &self.reclaims,
            Counter::Resident => &self.resident_pages,
            Counter::Dirty => &self.dirty_pages,
            Counter::Streams => &self.streams,
            Counter::ReadAheadLoads => &self.readahead_loads,
            Counter::ReadAheadHits => &self.readahead_hits,
            Counter::ReadAheadWasted => &self.readahead_wasted,
        }
    }

    pub(crate) fn add(&self, c: Counter, n: u64) {
        self.cell(c).fetch_add(n, Relaxed);
    }

    pub(crate) fn sub(&self, c: Counter, n: u64) {
        self.cell(c).fetch_sub(n, Relaxed);
    }

    /// Nothing is resident or dirty any more (a forked child's handles);
    /// the other counters keep their history.
    pub(crate) fn forget_pages(&self) {
        self.resident_pages.store(0, Relaxed);
        self.dirty_pages.store(0, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            faults: self.faults.load(Relaxed),
            loads: self.loads.load(Relaxed),
            load_errors: self.load_errors.load(Relaxed),
            stores: self.stores.load(Relaxed),
            reclaims: self.reclaims.load(Relaxed),
            resident_pages: self.resident_pages.load(Relaxed),
            dirty_pages: self.dirty_pages.load(Relaxed),
            streams: self.streams.load(Relaxed),
            readahead_loads: self.readahead_loads.load(Relaxed),
            readahead_hits: self.readahead_hits.load(Relaxed),
            readahead_wasted: self.readahead_wasted.load(Relaxed),
        }
    }
}

/// Both levels a change is counted at: the file handle and its RAM.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CountPair<'a> {
    pub(crate) fileh: &'a Counters,
    pub(crate) ram: &'a Counters,
}

impl CountPair<'_> {
    pub(crate) fn add(&self, c: Counter, n: u64) {
        self.fileh.add(c, n);
        self.ram.add(c, n);
    }

    pub(crate) fn sub(&self, c: Counter, n: u64) {
        self.fileh.sub(c, n);
        self.ram.sub(c, n);
    }
}
