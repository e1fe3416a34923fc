//! Counters as C structs (for `bigfile_fileh_stats`, `bigfile_ram_stats`).

use bigfile_virtmem::{RamStats, Stats};

/// Counters of a file handle, or summed over a RAM's handles: page
/// `faults` served (prefault requests included), successful `loads`,
/// failed load attempts (`load_errors`, each retry counts), successful
/// `stores`, pages reclaimed (`reclaims`: clean pages dropped for the
/// budget or on request); now: `resident_pages` holding memory (loading,
/// clean, dirty, and pages reclaimed ahead of need, kept for the next
/// loads) and `dirty_pages`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bigfile_stats {
    pub faults: u64,
    pub loads: u64,
    pub load_errors: u64,
    pub stores: u64,
    pub reclaims: u64,
    pub resident_pages: u64,
    pub dirty_pages: u64,
}

/// A RAM's counters with its budget.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bigfile_ram_usage {
    /// Counters summed over the RAM's file handles.
    pub stats: bigfile_stats,
    /// The budget in bytes.
    pub budget: u64,
    /// Bytes held by pages now.
    pub resident_bytes: u64,
}

impl From<Stats> for bigfile_stats {
    fn from(s: Stats) -> bigfile_stats {
        bigfile_stats {
            faults: s.faults,
            loads: s.loads,
            load_errors: s.load_errors,
            stores: s.stores,
            reclaims: s.reclaims,
            resident_pages: s.resident_pages,
            dirty_pages: s.dirty_pages,
        }
    }
}

impl From<RamStats> for bigfile_ram_usage {
    fn from(s: RamStats) -> bigfile_ram_usage {
        bigfile_ram_usage {
            stats: s.stats.into(),
            budget: s.budget,
            resident_bytes: s.resident_bytes,
        }
    }
}
