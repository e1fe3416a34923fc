//! Batched reclaim: RAM pages taken from the LRU ahead of need.
//!
//! Taking a reclaimed page away from its mapping is an `mmap` over its slot,
//! which holds the process's `mmap_lock` for writing and, for a page that was
//! accessed, sends a TLB-shootdown interrupt to every other CPU running the
//! process. One per fault serialises threads faulting in parallel. So when a
//! load finds the budget full, reclaim takes several clean pages of the
//! faulting handle at once ([`batch_size`]): one is reused for the load, the
//! others are kept as *spares*, still counted against the budget and as
//! resident, for the handle's next loads. Their slots, often adjacent (a
//! scan's least recently used pages are consecutive blocks), are unmapped
//! together after the lock is dropped ([`crate::state::Deferred`]), so a run
//! of faults costs one unmap and one interrupt instead of one each.
//!
//! A spare is usable only once its reclaimer has unmapped it (`ready`):
//! before that its old slot still shows its old data.

use crate::state::{Deferred, State};
use crate::stats::{CountPair, Counter, Counters};

/// A RAM page reclaimed ahead of need, kept for its handle's next load.
#[derive(Debug)]
pub(crate) struct Spare {
    pub(crate) fileh: usize,
    pub(crate) ram_page: u64,
    /// Unmapped from every mapping: safe to fill with another block.
    pub(crate) ready: bool,
}

/// How many clean pages a load that finds the budget full reclaims at once:
/// a quarter of the budget, at most 8 (measured: two threads faulting 2 MiB
/// blocks under a 32-page budget ran 0.8x of one thread's fault rate with
/// single reclaims, 1.0x with batches of 4, 1.1x with 8). Budgets under 16
/// pages reclaim one page at a time: spares would be too large a part of them.
pub(crate) fn batch_size(budget_pages: u64) -> u64 {
    if budget_pages < 16 {
        1
    } else {
        (budget_pages / 4).min(8)
    }
}

impl State {
    /// Take a ready spare of handle `fk` for a load. The page leaves the
    /// resident count; the load counts it again when it succeeds.
    pub(crate) fn take_spare(&mut self, fk: usize, ram_counters: &Counters) -> Option<u64> {
        let i = self.spares.iter().position(|s| s.ready && s.fileh == fk)?;
        let spare = self.spares.swap_remove(i);
        self.resident -= 1;
        CountPair {
            fileh: &self.filehs[fk].counters,
            ram: ram_counters,
        }
        .sub(Counter::Resident, 1);
        Some(spare.ram_page)
    }

    /// Give the memory of one ready spare (of any handle) back: now, or with
    /// `defer` after the lock is dropped. False when there is none.
    pub(crate) fn drop_spare(
        &mut self,
        ram_counters: &Counters,
        defer: Option<&mut Deferred>,
    ) -> bool {
        let Some(i) = self.spares.iter().position(|s| s.ready) else {
            return false;
        };
        let spare = self.spares.swap_remove(i);
        self.resident -= 1;
        let fh = &self.filehs[spare.fileh];
        CountPair {
            fileh: &fh.counters,
            ram: ram_counters,
        }
        .sub(Counter::Resident, 1);
        match defer {
            Some(d) => d.drops.push((fh.ramh.clone(), spare.ram_page)),
            // On failure the RAM keeps it for its next allocation.
            None => drop(fh.ramh.drop_page(spare.ram_page)),
        }
        true
    }

    /// Reclaim the least recently used clean page as a spare if it belongs
    /// to handle `fk`; its slots are unmapped by `defer`, which makes it
    /// ready. False (nothing done) when the oldest page is another handle's,
    /// or there is none.
    pub(crate) fn spare_from_lru(
        &mut self,
        fk: usize,
        page_size: usize,
        ram_counters: &Counters,
        defer: &mut Deferred,
    ) -> bool {
        match self.lru_oldest() {
            Some(pk) if self.pages[pk].fileh == fk => {}
            _ => return false,
        }
        let Some(Some(rp)) = self.reclaim_lru(page_size, ram_counters, Some(fk), Some(defer))
        else {
            return false;
        };
        self.resident += 1;
        CountPair {
            fileh: &self.filehs[fk].counters,
            ram: ram_counters,
        }
        .add(Counter::Resident, 1);
        self.spares.push(Spare {
            fileh: fk,
            ram_page: rp,
            ready: false,
        });
        defer.spares.push((fk, rp));
        true
    }

    /// Whether some spare is still being unmapped by its reclaimer (it will
    /// be ready, or at least droppable, as soon as that thread finishes).
    pub(crate) fn spares_pending(&self) -> bool {
        self.spares.iter().any(|s| !s.ready)
    }

    /// Ready spares: memory that reclaim can give back at once.
    pub(crate) fn spares_ready(&self) -> u64 {
        self.spares.iter().filter(|s| s.ready).count() as u64
    }

    /// Mark the spare `(fk, ram_page)` ready (its reclaimer has unmapped it).
    pub(crate) fn spare_unmapped(&mut self, fk: usize, ram_page: u64) {
        if let Some(s) = self
            .spares
            .iter_mut()
            .find(|s| !s.ready && s.fileh == fk && s.ram_page == ram_page)
        {
            s.ready = true;
        }
    }

    /// Forget handle `fk`'s spares (the handle is closing; none can be
    /// pending then, its mappings being gone) and give their memory back.
    pub(crate) fn drop_spares_of(&mut self, fk: usize, ram_counters: &Counters) {
        let (mine, others): (Vec<Spare>, Vec<Spare>) = std::mem::take(&mut self.spares)
            .into_iter()
            .partition(|s| s.fileh == fk);
        self.spares = others;
        let fh = &self.filehs[fk];
        for s in mine {
            debug_assert!(s.ready, "a closing handle's spare is still being unmapped");
            self.resident -= 1;
            CountPair {
                fileh: &fh.counters,
                ram: ram_counters,
            }
            .sub(Counter::Resident, 1);
            // On failure the RAM keeps it for its next allocation.
            let _ = fh.ramh.drop_page(s.ram_page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::batch_size;

    #[test]
    fn batch_is_a_quarter_of_budgets_from_16_pages_at_most_8() {
        assert_eq!(batch_size(1), 1);
        assert_eq!(batch_size(15), 1);
        assert_eq!(batch_size(16), 4);
        assert_eq!(batch_size(31), 7);
        assert_eq!(batch_size(32), 8);
        assert_eq!(batch_size(1 << 40), 8);
    }
}
