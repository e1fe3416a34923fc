//! Counters as Python dicts.

use std::collections::HashMap;

use bigfile_virtmem::{Ram, Stats};

pub(crate) fn stats_dict(s: Stats) -> HashMap<&'static str, u64> {
    HashMap::from([
        ("faults", s.faults),
        ("loads", s.loads),
        ("load_errors", s.load_errors),
        ("stores", s.stores),
        ("reclaims", s.reclaims),
        ("resident_pages", s.resident_pages),
        ("dirty_pages", s.dirty_pages),
    ])
}

pub(crate) fn ram_stats_dict(ram: &Ram) -> HashMap<&'static str, u64> {
    let s = ram.stats();
    let mut d = stats_dict(s.stats);
    d.insert("budget", s.budget);
    d.insert("resident_bytes", s.resident_bytes);
    d
}
