//! The RAM budget's accounting: pages holding (or about to hold) memory,
//! and the spares of batched reclaim ("Batched reclaim" in ARCHITECTURE.md).
//! A spare is usable only once its reclaimer has unmapped it (`ready`):
//! before that its old slot still shows its old data. Fresh pages made
//! ahead of need (`fresh.rs`) count here too, as spares that are always ready.
//!
//! RAMs that share a budget (a forked child's default RAMs, `Ram::default_for`)
//! share the count it is compared with: each RAM's pages are counted in its
//! own `Budget` (under its own lock) and in the count of the budget's pool
//! (an atomic, which the other RAMs change under theirs).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

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
    /// Pages holding or about to hold memory (spares and fresh pages included).
    resident: u64,
    /// The pages of every RAM sharing the budget, these included: what
    /// the budget's limit is compared with.
    pooled: Arc<AtomicU64>,
    spares: Vec<Spare>,
    /// Fresh pages made ahead of need (`fresh.rs`), each of a handle.
    fresh: Vec<(FileKey, RamPage)>,
    /// The handle whose fresh page the worker is making now (counted).
    making: Option<FileKey>,
    /// The handle fresh pages are made for: the last that asked.
    asked: Option<FileKey>,
    /// The worker is asked to make fresh pages (and has not stopped).
    queued: bool,
    /// Reclaims (`Ram::reclaim`) under way: no fresh page is begun
    /// meanwhile, so that one waiting for the page being made is not kept
    /// waiting by the next, and what it gives back is not made again.
    reclaims: u32,
}

impl Budget {
    /// A budget counted in `pooled` too (the count of the RAMs it is shared
    /// with), holding nothing yet.
    pub(crate) fn pooled(pooled: Arc<AtomicU64>) -> Budget {
        let mut b = Budget::default();
        b.pooled = pooled;
        b
    }

    /// This budget emptied (a forked child forgets its pages), still
    /// counted in its pool.
    pub(crate) fn forget(&mut self) {
        *self = Budget::pooled(self.pooled.clone());
    }

    fn add(&mut self, n: u64) {
        self.resident += n;
        self.pooled.fetch_add(n, Relaxed);
    }

    fn sub(&mut self, n: u64) {
        self.resident -= n;
        self.pooled.fetch_sub(n, Relaxed);
    }

    /// Pages counted against the budget, of this RAM (the tests'; what is
    /// compared with the limit, and reported, is the pool's).
    #[cfg(test)]
    pub(crate) fn resident(&self) -> u64 {
        self.resident
    }

    /// Pages counted against the budget, of every RAM sharing it.
    pub(crate) fn pooled_resident(&self) -> u64 {
        self.pooled.load(Relaxed)
    }

    /// Whether `limit` pages are used up (by every RAM sharing the budget).
    pub(crate) fn is_full(&self, limit: u64) -> bool {
        self.pooled_resident() >= limit
    }

    /// One more page holds memory.
    pub(crate) fn charge(&mut self) {
        self.add(1);
    }

    /// One page less holds memory.
    pub(crate) fn release(&mut self) {
        self.sub(1);
    }

    /// Take a ready spare of handle `fileh` for a load. It leaves the
    /// count; the load charges it again.
    pub(crate) fn take_spare(&mut self, fileh: FileKey) -> Option<RamPage> {
        let i = self
            .spares
            .iter()
            .position(|s| s.ready && s.fileh == fileh)?;
        self.sub(1);
        Some(self.spares.swap_remove(i).ram_page)
    }

    /// Take a fresh page of handle `fileh` for a load (as
    /// [`take_spare`](Budget::take_spare)).
    pub(crate) fn take_fresh(&mut self, fileh: FileKey) -> Option<RamPage> {
        let i = self.fresh.iter().position(|&(f, _)| f == fileh)?;
        self.sub(1);
        Some(self.fresh.swap_remove(i).1)
    }

    /// Take any ready spare, to give its memory back.
    pub(crate) fn pop_ready_spare(&mut self) -> Option<Spare> {
        let i = self.spares.iter().position(|s| s.ready)?;
        self.sub(1);
        Some(self.spares.swap_remove(i))
    }

    /// Take any fresh page, to give its memory back.
    pub(crate) fn pop_fresh(&mut self) -> Option<(FileKey, RamPage)> {
        let taken = self.fresh.pop()?;
        self.sub(1);
        Some(taken)
    }

    /// Whether the worker may make a fresh page: none is being made, fewer
    /// than `reserve` are made, and the budget of `limit` pages has room.
    pub(crate) fn may_make_fresh(&self, limit: u64, reserve: u64) -> bool {
        self.making.is_none()
            && self.reclaims == 0
            && (self.fresh.len() as u64) < reserve
            && !self.is_full(limit)
    }

    /// A reclaim begins (`true`) or ends: fresh pages are not begun while
    /// one is under way, and an ask from before it is void (a worker woken
    /// by it may reach the lock only after the reclaim, and would make again
    /// what the reclaim gave back): pages are made again when asked again.
    pub(crate) fn hold_fresh(&mut self, reclaiming: bool) {
        if reclaiming {
            self.reclaims += 1;
            self.asked = None;
        } else {
            self.reclaims -= 1;
        }
    }

    /// Handle `fileh` asks for fresh pages: they are made for it from now
    /// on. Whether the worker is to be woken (there is room for one, and
    /// it is not at work already).
    pub(crate) fn ask_fresh(&mut self, fileh: FileKey, limit: u64, reserve: u64) -> bool {
        self.asked = Some(fileh);
        if self.queued || !self.may_make_fresh(limit, reserve) {
            return false;
        }
        self.queued = true;
        true
    }

    /// The handle to make a fresh page for, if it may be made now: counted
    /// from now on. Otherwise the worker stops (the next ask wakes it).
    pub(crate) fn begin_fresh(&mut self, limit: u64, reserve: u64) -> Option<FileKey> {
        let fileh = self.asked.filter(|_| self.may_make_fresh(limit, reserve));
        match fileh {
            Some(f) => {
                self.add(1);
                self.making = Some(f);
            }
            None => self.queued = false,
        }
        fileh
    }

    /// The worker stops (it failed to make a page, or never started).
    pub(crate) fn stop_fresh(&mut self) {
        self.queued = false;
    }

    /// The fresh page being made is `ram_page` (made), or none (failed:
    /// the worker stops).
    pub(crate) fn end_fresh(&mut self, ram_page: Option<RamPage>) {
        let Some(fileh) = self.making.take() else {
            return;
        };
        match ram_page {
            Some(rp) => self.fresh.push((fileh, rp)),
            None => {
                self.sub(1);
                self.queued = false;
            }
        }
    }

    /// Handle `fileh` is closing: fresh pages are no longer made for it.
    pub(crate) fn forget_asker(&mut self, fileh: FileKey) {
        if self.asked == Some(fileh) {
            self.asked = None;
        }
    }

    /// The handle whose fresh page is being made, if any.
    pub(crate) fn making_fresh(&self) -> Option<FileKey> {
        self.making
    }

    /// Whether handle `fileh` has a fresh page.
    #[cfg(test)]
    pub(crate) fn has_fresh(&self, fileh: FileKey) -> bool {
        self.fresh.iter().any(|&(f, _)| f == fileh)
    }

    /// Fresh pages made and not taken.
    pub(crate) fn fresh_pages(&self) -> u64 {
        self.fresh.len() as u64
    }

    /// Keep `ram_page` of `fileh` as a spare, not ready until
    /// [`spare_unmapped`](Budget::spare_unmapped).
    pub(crate) fn add_spare(&mut self, fileh: FileKey, ram_page: RamPage) {
        self.add(1);
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
    /// A fresh page being made counts too: its worker waits for nothing.
    pub(crate) fn spares_pending(&self) -> bool {
        self.making.is_some() || self.spares.iter().any(|s| !s.ready)
    }

    /// Ready spares and fresh pages: memory that reclaim can give back at once.
    pub(crate) fn spares_ready(&self) -> u64 {
        self.spares.iter().filter(|s| s.ready).count() as u64 + self.fresh_pages()
    }

    /// Take handle `fileh`'s spares (it is closing: none can be pending,
    /// its mappings being gone), to give their memory back.
    pub(crate) fn take_spares_of(&mut self, fileh: FileKey) -> Vec<RamPage> {
        let (mine, others): (Vec<Spare>, Vec<Spare>) = std::mem::take(&mut self.spares)
            .into_iter()
            .partition(|s| s.fileh == fileh);
        self.spares = others;
        self.sub(mine.len() as u64);
        mine.into_iter()
            .map(|s| {
                debug_assert!(s.ready, "a closing handle's spare is still being unmapped");
                s.ram_page
            })
            .collect()
    }

    /// Take handle `fileh`'s fresh pages (it is closing, and waited until
    /// none is being made for it), to give their memory back.
    pub(crate) fn take_fresh_of(&mut self, fileh: FileKey) -> Vec<RamPage> {
        debug_assert_ne!(
            self.making,
            Some(fileh),
            "a closing handle's page is being made"
        );
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fresh)
            .into_iter()
            .partition(|&(f, _)| f == fileh);
        self.fresh = others;
        self.sub(mine.len() as u64);
        mine.into_iter().map(|(_, rp)| rp).collect()
    }
}

impl Drop for Budget {
    /// A RAM gone (or a budget forgotten) counts no more in its pool.
    fn drop(&mut self) {
        self.pooled.fetch_sub(self.resident, Relaxed);
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
    fn budgets_sharing_a_pool_count_each_others_pages() {
        let pooled = Arc::new(AtomicU64::new(0));
        let mut a = Budget::pooled(pooled.clone());
        let mut b = Budget::pooled(pooled.clone());
        a.charge();
        b.charge();
        b.add_spare(FileKey(1), RamPage(5));
        assert_eq!((a.resident(), b.resident()), (1, 2));
        assert!(a.is_full(3) && !a.is_full(4), "b's pages count for a");
        assert!(!b.may_make_fresh(3, 9), "no room left for a fresh page");
        b.forget();
        assert_eq!(
            (b.resident(), a.pooled_resident()),
            (0, 1),
            "a forked child's"
        );
        b.charge();
        drop(b);
        assert_eq!(pooled.load(Relaxed), 1, "a RAM gone counts no more");
        a.release();
        assert_eq!(pooled.load(Relaxed), 0);
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

    #[test]
    fn fresh_pages_are_counted_made_only_into_room_and_taken_like_spares() {
        let mut b = Budget::default();
        b.charge();
        assert!(!b.ask_fresh(FileKey(1), 1, 2), "no room in the budget");
        assert!(!b.ask_fresh(FileKey(1), 3, 0), "no reserve");
        assert!(b.ask_fresh(FileKey(1), 3, 2), "the worker is woken");
        assert!(!b.ask_fresh(FileKey(1), 3, 2), "once");
        assert_eq!(b.begin_fresh(3, 2), Some(FileKey(1)));
        assert_eq!(b.resident(), 2, "counted while made");
        assert_eq!(b.making_fresh(), Some(FileKey(1)));
        assert!(!b.may_make_fresh(9, 9), "one at a time");
        assert!(b.spares_pending(), "a fault waits for it rather than fail");
        b.end_fresh(Some(RamPage(7)));
        assert_eq!((b.resident(), b.fresh_pages(), b.spares_ready()), (2, 1, 1));
        assert_eq!(
            b.begin_fresh(9, 1),
            None,
            "the reserve is made: the worker stops"
        );
        assert!(
            b.ask_fresh(FileKey(2), 9, 2),
            "woken again, for another handle"
        );
        assert_eq!(b.begin_fresh(9, 2), Some(FileKey(2)));
        b.end_fresh(None);
        assert_eq!(b.resident(), 2, "a failed one leaves the count");
        assert!(
            b.ask_fresh(FileKey(2), 9, 2),
            "the worker stopped on failure"
        );
        b.forget_asker(FileKey(2));
        assert_eq!(b.begin_fresh(9, 2), None, "the asker is closing");
        assert_eq!(b.take_fresh(FileKey(2)), None, "another handle's");
        assert_eq!(b.take_fresh(FileKey(1)), Some(RamPage(7)));
        assert_eq!(b.resident(), 1);
        let make = |b: &mut Budget, f: usize, rp: u64| {
            assert!(b.ask_fresh(FileKey(f), 9, 9));
            assert_eq!(b.begin_fresh(9, 9), Some(FileKey(f)));
            b.end_fresh(Some(RamPage(rp)));
            assert_eq!(b.begin_fresh(0, 9), None);
        };
        make(&mut b, 1, 8);
        assert_eq!(b.pop_fresh(), Some((FileKey(1), RamPage(8))));
        make(&mut b, 1, 9);
        make(&mut b, 2, 1);
        assert_eq!(b.take_fresh_of(FileKey(1)), [RamPage(9)]);
        assert_eq!((b.resident(), b.fresh_pages()), (2, 1));
    }

    /// A reclaim waiting for the page being made is not kept waiting by
    /// the next one (the worker retakes the lock first), nor sees what it
    /// gives back made again.
    #[test]
    fn no_fresh_page_is_begun_while_a_reclaim_is_under_way() {
        let mut b = Budget::default();
        assert!(b.ask_fresh(FileKey(1), 9, 9));
        b.hold_fresh(true);
        b.hold_fresh(true);
        assert_eq!(b.begin_fresh(9, 9), None, "two reclaims");
        b.hold_fresh(false);
        assert!(!b.ask_fresh(FileKey(1), 9, 9), "one reclaim: not woken");
        assert_eq!(b.begin_fresh(9, 9), None, "one reclaim");
        b.hold_fresh(false);
        assert!(b.ask_fresh(FileKey(1), 9, 9));
        assert_eq!(b.begin_fresh(9, 9), Some(FileKey(1)), "none");
    }

    /// A worker woken before a reclaim, which gets to the lock only after
    /// it, makes nothing for a handle that asked before the reclaim: what
    /// the reclaim gave back is made again only when asked for again (the
    /// fresh-page test of many handles found pages made for the last asker
    /// before `Ram::reclaim`, none for the handle loading after it).
    #[test]
    fn an_ask_before_a_reclaim_makes_nothing_after_it() {
        let mut b = Budget::default();
        assert!(b.ask_fresh(FileKey(7), 9, 9), "woken, not yet at the lock");
        b.hold_fresh(true);
        b.hold_fresh(false);
        assert_eq!(b.begin_fresh(9, 9), None, "made again for the old asker");
        assert!(b.ask_fresh(FileKey(3), 9, 9));
        assert_eq!(b.begin_fresh(9, 9), Some(FileKey(3)));
    }
}
