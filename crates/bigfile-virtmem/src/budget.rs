//! The RAM budget's accounting: pages holding (or about to hold) memory,
//! and the spares of batched reclaim ("Batched reclaim" in ARCHITECTURE.md).
//! A spare is usable only once its reclaimer has unmapped it (`ready`):
//! before that its old slot still shows its old data.

use crate::keys::{FileKey, RamPage};

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

/// A RAM page reclaimed ahead of need, kept for its handle's next load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spare {
    pub(crate) fileh: FileKey,
    pub(crate) ram_page: RamPage,
    /// Unmapped from every mapping: safe to fill with another block.
    ready: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Budget {
    /// Pages holding or about to hold memory (spares included).
    resident: u64,
    spares: Vec<Spare>,
}

impl Budget {
    /// Pages counted against the budget.
    pub(crate) fn resident(&self) -> u64 {
        self.resident
    }

    /// Whether `limit` pages are used up.
    pub(crate) fn is_full(&self, limit: u64) -> bool {
        self.resident >= limit
    }

    /// One more page holds memory.
    pub(crate) fn charge(&mut self) {
        self.resident += 1;
    }

    /// One page less holds memory.
    pub(crate) fn release(&mut self) {
        self.resident -= 1;
    }

    /// Take a ready spare of handle `fileh` for a load. It leaves the
    /// count; the load charges it again.
    pub(crate) fn take_spare(&mut self, fileh: FileKey) -> Option<RamPage> {
        let i = self
            .spares
            .iter()
            .position(|s| s.ready && s.fileh == fileh)?;
        self.resident -= 1;
        Some(self.spares.swap_remove(i).ram_page)
    }

    /// Take any ready spare, to give its memory back.
    pub(crate) fn pop_ready_spare(&mut self) -> Option<Spare> {
        let i = self.spares.iter().position(|s| s.ready)?;
        self.resident -= 1;
        Some(self.spares.swap_remove(i))
    }

    /// Keep `ram_page` of `fileh` as a spare, not ready until
    /// [`spare_unmapped`](Budget::spare_unmapped).
    pub(crate) fn add_spare(&mut self, fileh: FileKey, ram_page: RamPage) {
        self.resident += 1;
        self.spares.push(Spare {
            fileh,
            ram_page,
            ready: false,
        });
    }

    /// The spare's reclaimer has unmapped it: it is ready.
    pub(crate) fn spare_unmapped(&mut self, fileh: FileKey, ram_page: RamPage) {
        if let Some(s) = self
            .spares
            .iter_mut()
            .find(|s| !s.ready && s.fileh == fileh && s.ram_page == ram_page)
        {
            s.ready = true;
        }
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

    /// Take handle `fileh`'s spares (it is closing: none can be pending,
    /// its mappings being gone), to give their memory back.
    pub(crate) fn take_spares_of(&mut self, fileh: FileKey) -> Vec<RamPage> {
        let (mine, others): (Vec<Spare>, Vec<Spare>) = std::mem::take(&mut self.spares)
            .into_iter()
            .partition(|s| s.fileh == fileh);
        self.spares = others;
        self.resident -= mine.len() as u64;
        mine.into_iter()
            .map(|s| {
                debug_assert!(s.ready, "a closing handle's spare is still being unmapped");
                s.ram_page
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_a_quarter_of_budgets_from_16_pages_at_most_8() {
        assert_eq!(batch_size(1), 1);
        assert_eq!(batch_size(15), 1);
        assert_eq!(batch_size(16), 4);
        assert_eq!(batch_size(31), 7);
        assert_eq!(batch_size(32), 8);
        assert_eq!(batch_size(1 << 40), 8);
    }

    #[test]
    fn pages_and_spares_count_against_the_budget() {
        let mut b = Budget::default();
        b.charge();
        b.charge();
        assert!(b.is_full(2) && !b.is_full(3));
        b.release();
        assert_eq!(b.resident(), 1);
        b.add_spare(FileKey(0), RamPage(5));
        assert_eq!(b.resident(), 2);
        b.release();
        b.release();
        assert_eq!(b.resident(), 0);
    }

    #[test]
    fn a_spare_is_used_only_once_unmapped_and_only_by_its_handle() {
        let mut b = Budget::default();
        b.add_spare(FileKey(1), RamPage(5));
        b.add_spare(FileKey(2), RamPage(6));
        assert!(b.spares_pending());
        assert_eq!(b.take_spare(FileKey(1)), None, "not unmapped yet");
        assert_eq!(b.pop_ready_spare(), None);
        b.spare_unmapped(FileKey(1), RamPage(5));
        assert_eq!(b.spares_ready(), 1);
        assert_eq!(b.take_spare(FileKey(2)), None, "another handle's");
        assert_eq!(b.take_spare(FileKey(1)), Some(RamPage(5)));
        assert_eq!(b.resident(), 1);
        b.spare_unmapped(FileKey(2), RamPage(6));
        assert!(!b.spares_pending());
        let s = b.pop_ready_spare().unwrap();
        assert_eq!((s.fileh, s.ram_page), (FileKey(2), RamPage(6)));
        assert_eq!(b.resident(), 0);
    }

    #[test]
    fn a_closing_handle_takes_its_spares() {
        let mut b = Budget::default();
        for (f, p) in [(1, 1), (2, 2), (1, 3)] {
            b.add_spare(FileKey(f), RamPage(p));
            b.spare_unmapped(FileKey(f), RamPage(p));
        }
        let mut mine = b.take_spares_of(FileKey(1));
        mine.sort();
        assert_eq!(mine, [RamPage(1), RamPage(3)]);
        assert_eq!((b.resident(), b.spares_ready()), (1, 1));
    }
}
