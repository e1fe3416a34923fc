//! The LRU list of clean pages: the order reclaim takes them in.
//!
//! Only LOADED pages are on it (a DIRTY page is never reclaimed, a LOADING
//! one has nothing to give back yet). A doubly linked list threaded through
//! a table indexed by page key: every operation is O(1) and allocates only
//! when the page table grows. Each page also carries when it was last used
//! (a count of uses, not a time), which a demotion keeps: read-ahead's room
//! policy asks whether a page was used before a stream began.
//!
//! RAMs sharing a budget (a forked child's default RAMs, `Ram::default_for`)
//! share the clock, and each shows the others, without its lock, when its
//! least recently used page was last used: reclaim for the budget takes
//! the pages of the RAM whose oldest page is oldest (`reclaim.rs`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::keys::PageKey;

#[derive(Debug, Clone, Copy, Default)]
struct Link {
    prev: Option<PageKey>,
    next: Option<PageKey>,
    linked: bool,
    /// The list's clock when the page was last used.
    used: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Lru {
    links: Vec<Link>,
    head: Option<PageKey>,
    tail: Option<PageKey>,
    len: u64,
    /// Uses so far: moved on by every `push_back` and `touch` (of every
    /// list sharing it).
    clock: Arc<AtomicU64>,
    /// When the oldest page was last used (0: the list is empty), for the
    /// RAMs sharing the budget to see.
    shown_oldest: Arc<AtomicU64>,
}

impl Lru {
    /// An empty list on `clock` (shared with the lists of the RAMs sharing
    /// the budget), showing its oldest page's use in `shown_oldest`.
    pub(crate) fn sharing(clock: Arc<AtomicU64>, shown_oldest: Arc<AtomicU64>) -> Lru {
        let lru = Lru {
            clock,
            shown_oldest,
            ..Lru::default()
        };
        lru.show_oldest();
        lru
    }

    /// This list emptied (a forked child forgets its pages), on the same clock.
    pub(crate) fn forget(&mut self) {
        *self = Lru::sharing(self.clock.clone(), self.shown_oldest.clone());
    }

    fn tick(&mut self) -> u64 {
        self.clock.fetch_add(1, Relaxed) + 1
    }

    fn show_oldest(&self) {
        let used = self.head.map_or(0, |pk| self.get(pk).used);
        self.shown_oldest.store(used, Relaxed);
    }

    fn link(&mut self, pk: PageKey) -> &mut Link {
        if pk.0 >= self.links.len() {
            self.links.resize(pk.0 + 1, Link::default());
        }
        &mut self.links[pk.0]
    }

    fn get(&self, pk: PageKey) -> Link {
        self.links.get(pk.0).copied().unwrap_or_default()
    }

    /// Whether `pk` is on the list.
    pub(crate) fn contains(&self, pk: PageKey) -> bool {
        self.get(pk).linked
    }

    /// Number of pages on the list.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The least recently used page: the next to reclaim.
    pub(crate) fn oldest(&self) -> Option<PageKey> {
        self.head
    }

    /// The clock now: a page whose [`used`](Lru::used) is below it was
    /// last used before this moment.
    pub(crate) fn clock(&self) -> u64 {
        self.clock.load(Relaxed)
    }

    /// When `pk` was last used (put on the list or touched), by the list's
    /// clock; `None` when it is not on the list. A demotion keeps it.
    pub(crate) fn used(&self, pk: PageKey) -> Option<u64> {
        let link = self.get(pk);
        link.linked.then_some(link.used)
    }

    /// Put `pk` (not on the list) at the most recently used end.
    pub(crate) fn push_back(&mut self, pk: PageKey) {
        debug_assert!(!self.contains(pk), "{pk:?} is on the LRU list already");
        let now = self.tick();
        self.insert(pk, false, now);
    }

    /// Link `pk` (not on the list) in at the oldest end, or the newest, as
    /// used at `used`.
    fn insert(&mut self, pk: PageKey, oldest: bool, used: u64) {
        let (prev, next) = if oldest {
            (None, self.head)
        } else {
            (self.tail, None)
        };
        *self.link(pk) = Link {
            prev,
            next,
            linked: true,
            used,
        };
        match prev {
            Some(p) => self.link(p).next = Some(pk),
            None => self.head = Some(pk),
        }
        match next {
            Some(n) => self.link(n).prev = Some(pk),
            None => self.tail = Some(pk),
        }
        self.len += 1;
        self.show_oldest();
    }

    /// Take `pk` off the list; nothing when it is not on it.
    pub(crate) fn remove(&mut self, pk: PageKey) {
        let Link {
            prev, next, linked, ..
        } = self.get(pk);
        if !linked {
            return;
        }
        *self.link(pk) = Link::default();
        match prev {
            Some(p) => self.link(p).next = next,
            None => self.head = next,
        }
        match next {
            Some(n) => self.link(n).prev = prev,
            None => self.tail = prev,
        }
        self.len -= 1;
        self.show_oldest();
    }

    /// Mark `pk` most recently used, if it is on the list.
    pub(crate) fn touch(&mut self, pk: PageKey) {
        if !self.contains(pk) {
            return;
        }
        if self.tail == Some(pk) {
            let now = self.tick();
            self.link(pk).used = now;
            self.show_oldest();
        } else {
            self.remove(pk);
            self.push_back(pk);
        }
    }

    /// Make `pk` the first to be reclaimed, if it is on the list.
    pub(crate) fn demote(&mut self, pk: PageKey) {
        if !self.contains(pk) || self.head == Some(pk) {
            return;
        }
        let used = self.get(pk).used;
        self.remove(pk);
        self.insert(pk, true, used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(lru: &Lru) -> Vec<usize> {
        let mut v = Vec::new();
        let mut cur = lru.head;
        while let Some(pk) = cur {
            v.push(pk.0);
            cur = lru.get(pk).next;
        }
        assert_eq!(v.len() as u64, lru.len(), "len agrees with the links");
        let mut back = Vec::new();
        let mut cur = lru.tail;
        while let Some(pk) = cur {
            back.push(pk.0);
            cur = lru.get(pk).prev;
        }
        back.reverse();
        assert_eq!(back, v, "backward links agree with the forward order");
        v
    }

    fn filled(n: usize) -> Lru {
        let mut lru = Lru::default();
        for i in 0..n {
            lru.push_back(PageKey(i));
        }
        lru
    }

    #[test]
    fn push_touch_remove_keep_order_and_links() {
        let mut lru = filled(4);
        assert_eq!(order(&lru), [0, 1, 2, 3]);
        lru.touch(PageKey(0));
        assert_eq!(order(&lru), [1, 2, 3, 0]);
        lru.remove(PageKey(2));
        lru.remove(PageKey(2)); // not on the list any more: no effect
        assert_eq!(order(&lru), [1, 3, 0]);
        assert_eq!(lru.oldest(), Some(PageKey(1)));
        for pk in [1, 0, 3] {
            lru.remove(PageKey(pk));
        }
        assert_eq!((lru.oldest(), lru.tail, lru.len()), (None, None, 0));
        // touching a page that is not on the list (dirty) does not add it
        lru.touch(PageKey(1));
        assert_eq!(lru.len(), 0);
    }

    #[test]
    fn demote_makes_a_page_oldest_and_keeps_links() {
        let mut lru = filled(4);
        lru.demote(PageKey(2));
        assert_eq!(order(&lru), [2, 0, 1, 3]);
        lru.demote(PageKey(2)); // already oldest
        assert_eq!(order(&lru), [2, 0, 1, 3]);
        lru.demote(PageKey(3)); // the newest: the tail moves back
        assert_eq!(order(&lru), [3, 2, 0, 1]);
        assert_eq!(lru.tail, Some(PageKey(1)));
        // a page off the list (dirty) is not put on it
        lru.remove(PageKey(0));
        lru.demote(PageKey(0));
        assert_eq!(order(&lru), [3, 2, 1]);
        // the only page on the list
        lru.remove(PageKey(3));
        lru.remove(PageKey(2));
        lru.demote(PageKey(1));
        assert_eq!(order(&lru), [1]);
        assert_eq!(lru.tail, Some(PageKey(1)));
    }

    #[test]
    fn a_page_keeps_when_it_was_used_through_a_demotion() {
        let mut lru = filled(3);
        let before = lru.clock();
        assert_eq!(lru.used(PageKey(2)), Some(before), "the last one put on");
        lru.touch(PageKey(0));
        assert!(lru.used(PageKey(0)) > Some(before), "touched after");
        lru.demote(PageKey(2));
        assert_eq!(lru.oldest(), Some(PageKey(2)));
        assert_eq!(lru.used(PageKey(2)), Some(before), "demoted, not used");
        assert!(lru.used(PageKey(1)) < lru.used(PageKey(2)));
        lru.remove(PageKey(1));
        assert_eq!(lru.used(PageKey(1)), None, "not on the list");
    }

    #[test]
    fn lists_sharing_a_clock_show_their_oldest_use() {
        let clock = Arc::new(AtomicU64::new(0));
        let (a_shown, b_shown) = (Arc::default(), Arc::default());
        let mut a = Lru::sharing(clock.clone(), Arc::clone(&a_shown));
        let mut b = Lru::sharing(clock, Arc::clone(&b_shown));
        a.push_back(PageKey(0));
        b.push_back(PageKey(0));
        a.push_back(PageKey(1));
        assert_eq!((a.clock(), b.clock()), (3, 3), "one clock");
        let shown = |s: &Arc<AtomicU64>| s.load(Relaxed);
        assert_eq!((shown(&a_shown), shown(&b_shown)), (1, 2));
        a.touch(PageKey(0));
        assert_eq!(shown(&a_shown), 3, "page 1, used at 3, is a's oldest");
        b.touch(PageKey(0));
        assert_eq!(shown(&b_shown), 5, "the only page, touched");
        b.forget();
        assert_eq!((shown(&b_shown), b.clock()), (0, 5), "empty: none");
    }

    #[test]
    fn a_key_reused_after_removal_starts_unlinked() {
        let mut lru = filled(3);
        lru.remove(PageKey(1));
        assert!(!lru.contains(PageKey(1)));
        lru.push_back(PageKey(1));
        assert_eq!(order(&lru), [0, 2, 1]);
        // keys far beyond the table grow it
        lru.push_back(PageKey(100));
        assert_eq!(order(&lru), [0, 2, 1, 100]);
    }
}
