//! The recent mappings a `BigFileH` keeps for `mmap_cached`, so code that
//! maps many small overlapping ranges (BigArray indexing element by element
//! or chunk by chunk) reuses a mapping instead of creating and tearing down
//! one per access.
//!
//! Bounded: at most [`CAPACITY`] mappings, none larger than [`MAX_CACHED`]
//! bytes, least recently used evicted first. An evicted mapping is unmapped
//! once no user (numpy array) holds it. The cache never holds a Python
//! object, so it creates no reference cycle with its handle.

use std::sync::Arc;

use crate::mapping::Mapping;

/// Mappings kept.
pub(crate) const CAPACITY: usize = 8;
/// Largest mapping kept, in bytes: bigger ones live only as long as their users.
pub(crate) const MAX_CACHED: u64 = 1 << 30;
/// Small requests are widened to a window of this many bytes (whole pages,
/// aligned), so neighbouring requests hit the same mapping.
pub(crate) const WINDOW: u64 = 8 << 20;

#[derive(Default)]
pub(crate) struct MapCache {
    /// Most recently used first.
    vmas: Vec<Arc<Mapping>>,
}

impl MapCache {
    /// A kept mapping covering pages `pgoffset .. pgoffset + pglen`, now the most recent.
    pub(crate) fn lookup(&mut self, pgoffset: u64, pglen: u64) -> Option<Arc<Mapping>> {
        let end = pgoffset.checked_add(pglen)?;
        let i = self
            .vmas
            .iter()
            .position(|v| v.pgoffset() <= pgoffset && end <= v.pgoffset() + v.pglen())?;
        let vma = self.vmas.remove(i);
        self.vmas.insert(0, vma.clone());
        Some(vma)
    }

    /// Keep `vma` as the most recent; returns what no longer fits, for the
    /// caller to drop outside its lock (dropping may unmap, which waits for
    /// the virtmem lock with the GIL released).
    pub(crate) fn insert(&mut self, vma: Arc<Mapping>) -> Vec<Arc<Mapping>> {
        self.vmas.insert(0, vma);
        if self.vmas.len() > CAPACITY {
            self.vmas.split_off(CAPACITY)
        } else {
            Vec::new()
        }
    }

    /// Forget every kept mapping; returns them for the caller to drop.
    pub(crate) fn take_all(&mut self) -> Vec<Arc<Mapping>> {
        std::mem::take(&mut self.vmas)
    }
}

/// The pages to map for a request of `pgoffset .. pgoffset + pglen` with
/// `pagesize`-byte pages: small requests widened to aligned windows. `None`
/// when the mapping would be too big to keep.
pub(crate) fn window(pgoffset: u64, pglen: u64, pagesize: usize) -> Option<(u64, u64)> {
    let ps = pagesize as u64;
    if pglen.checked_mul(ps)? > MAX_CACHED {
        return None;
    }
    let w = (WINDOW / ps).max(1);
    let start = pgoffset - pgoffset % w;
    let end = pgoffset.checked_add(pglen)?;
    let end = end.div_ceil(w).checked_mul(w).unwrap_or(end);
    let len = end - start;
    if len.checked_mul(ps)? > MAX_CACHED {
        return Some((pgoffset, pglen));
    }
    Some((start, len))
}
