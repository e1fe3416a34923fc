//! The page table: every resident page of every handle of one RAM, each in
//! one of the states of the loading protocol (ARCHITECTURE.md), changed only
//! through the named transitions below.

use std::sync::Arc;

use slab::Slab;

use crate::keys::{FileKey, PageKey, RamPage};
use crate::waits::Ticket;

/// A page's state; a page absent from its handle's page map is EMPTY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// `loadblk` is filling it; it is mapped nowhere yet.
    Loading,
    /// Invalidated while loading: the loader drops its result.
    LoadingInvalidated,
    /// Holds the file's data; mapped read-only; on the LRU list.
    Loaded,
    /// Changed in memory; on the handle's dirty list; never reclaimed.
    Dirty,
}

/// A dirty page's content against the last STORE of its handle: what a
/// MARKSTORED apart from that STORE may mark clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// No STORE stored it since it became dirty: MARKSTORED takes the
    /// caller's word that it is stored (as wendelin.core does).
    Not,
    /// A STORE stored it and it has not been written since.
    Unchanged,
    /// Written after a STORE stored it: its content is not stored, and
    /// MARKSTORED leaves it dirty.
    Rewritten,
}

/// One resident page.
#[derive(Debug)]
pub(crate) struct Page {
    fileh: FileKey,
    blk: u64,
    state: PageState,
    /// Meaningful while DIRTY.
    stored: Stored,
    /// Its memory: a page of the handle's RAM file; `None` while loading.
    ram_page: Option<RamPage>,
    /// While loading: the loader's ticket, which waiters wait for.
    ticket: Option<Arc<Ticket>>,
    /// Loaded by read-ahead and not yet reached by a fault or by its stream.
    ahead: bool,
}

impl Page {
    pub(crate) fn fileh(&self) -> FileKey {
        self.fileh
    }

    pub(crate) fn blk(&self) -> u64 {
        self.blk
    }

    pub(crate) fn state(&self) -> PageState {
        self.state
    }

    pub(crate) fn ram_page(&self) -> Option<RamPage> {
        self.ram_page
    }

    pub(crate) fn ticket(&self) -> Option<&Arc<Ticket>> {
        self.ticket.as_ref()
    }

    pub(crate) fn stored(&self) -> Stored {
        self.stored
    }

    /// Loaded by read-ahead and not reached yet.
    pub(crate) fn is_ahead(&self) -> bool {
        self.ahead
    }

    fn is_loading(&self) -> bool {
        matches!(
            self.state,
            PageState::Loading | PageState::LoadingInvalidated
        )
    }
}

/// How a load ended, from [`PageTable::finish_load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoadEnd {
    /// The page is LOADED.
    Loaded,
    /// It was invalidated meanwhile: the caller drops it.
    Invalidated,
}

/// What [`PageTable::invalidate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalidation {
    /// The page is loading: marked, its loader drops the result.
    Marked,
    /// The page holds memory: the caller drops it.
    Resident,
}

#[derive(Debug, Default)]
pub(crate) struct PageTable {
    pages: Slab<Page>,
    /// Pages LOADING or LOADING_INVALIDATED.
    loading: usize,
    /// Of those, the ones whose loader may take the host lock.
    loading_needing_host: usize,
}

impl PageTable {
    pub(crate) fn get(&self, pk: PageKey) -> &Page {
        &self.pages[pk.0]
    }

    /// Whether some page is being loaded.
    pub(crate) fn any_loading(&self) -> bool {
        self.loading > 0
    }

    /// Whether some page is being loaded by a loader that may take the host lock.
    pub(crate) fn any_loading_needing_host(&self) -> bool {
        self.loading_needing_host > 0
    }

    /// A loading page starts (`+1`) or stops (`-1`) being counted.
    fn count_loading(&mut self, ticket: Option<&Arc<Ticket>>, starts: bool) {
        let host = usize::from(ticket.is_some_and(|t| t.needs_host()));
        if starts {
            self.loading += 1;
            self.loading_needing_host += host;
        } else {
            self.loading -= 1;
            self.loading_needing_host -= host;
        }
    }

    /// EMPTY → LOADING: a new page of block `blk` of `fileh`, loaded by the
    /// owner of `ticket`.
    pub(crate) fn begin_load(&mut self, fileh: FileKey, blk: u64, ticket: Arc<Ticket>) -> PageKey {
        self.count_loading(Some(&ticket), true);
        PageKey(self.pages.insert(Page {
            fileh,
            blk,
            state: PageState::Loading,
            stored: Stored::Not,
            ram_page: None,
            ticket: Some(ticket),
            ahead: false,
        }))
    }

    /// The loading page `pk` is loaded by the owner of `ticket` from now on
    /// (a thread took a queued read-ahead job over).
    pub(crate) fn hand_over(&mut self, pk: PageKey, ticket: Arc<Ticket>) {
        debug_assert!(self.pages[pk.0].is_loading(), "hand_over of a loaded page");
        let old = self.pages[pk.0].ticket.replace(ticket.clone());
        self.count_loading(old.as_ref(), false);
        self.count_loading(Some(&ticket), true);
    }

    /// The load filled `ram_page`: LOADING → LOADED, or, if invalidated
    /// meanwhile, the page keeps its memory for the caller to drop.
    pub(crate) fn finish_load(&mut self, pk: PageKey, ram_page: RamPage) -> LoadEnd {
        let p = &mut self.pages[pk.0];
        debug_assert!(p.is_loading(), "finish_load of a {:?} page", p.state);
        p.ram_page = Some(ram_page);
        match p.state {
            // Still counted as loading until detached.
            PageState::LoadingInvalidated => LoadEnd::Invalidated,
            _ => {
                p.state = PageState::Loaded;
                let ticket = p.ticket.take();
                self.count_loading(ticket.as_ref(), false);
                LoadEnd::Loaded
            }
        }
    }

    /// The loaded page `pk` came from read-ahead (`true`), or has been
    /// reached since (`false`). Returns what it was.
    pub(crate) fn set_ahead(&mut self, pk: PageKey, ahead: bool) -> bool {
        std::mem::replace(&mut self.pages[pk.0].ahead, ahead)
    }

    /// LOADED → DIRTY, for a write; false when it is dirty already (a
    /// page a STORE stored is then written again: `Stored::Rewritten`).
    pub(crate) fn mark_dirty(&mut self, pk: PageKey) -> bool {
        let p = &mut self.pages[pk.0];
        debug_assert!(!p.is_loading(), "mark_dirty of a {:?} page", p.state);
        let was_clean = p.state == PageState::Loaded;
        p.state = PageState::Dirty;
        p.stored = match (was_clean, p.stored) {
            (true, _) => Stored::Not,
            (false, Stored::Unchanged) => Stored::Rewritten,
            (false, s) => s,
        };
        was_clean
    }

    /// A STORE stored the (dirty) page's content.
    pub(crate) fn mark_stored(&mut self, pk: PageKey) {
        let p = &mut self.pages[pk.0];
        debug_assert_eq!(p.state, PageState::Dirty);
        p.stored = Stored::Unchanged;
    }

    /// DIRTY → LOADED (written out).
    pub(crate) fn mark_clean(&mut self, pk: PageKey) {
        let p = &mut self.pages[pk.0];
        debug_assert_eq!(p.state, PageState::Dirty);
        p.state = PageState::Loaded;
    }

    /// LOADING → LOADING_INVALIDATED; a resident page is the caller's to drop.
    pub(crate) fn invalidate(&mut self, pk: PageKey) -> Invalidation {
        let p = &mut self.pages[pk.0];
        match p.state {
            PageState::Loading | PageState::LoadingInvalidated => {
                p.state = PageState::LoadingInvalidated;
                Invalidation::Marked
            }
            PageState::Loaded | PageState::Dirty => Invalidation::Resident,
        }
    }

    /// Forget the page (any state → EMPTY); it is returned with its memory.
    pub(crate) fn detach(&mut self, pk: PageKey) -> Page {
        let p = self.pages.remove(pk.0);
        if p.is_loading() {
            self.count_loading(p.ticket.as_ref(), false);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with(n: u64) -> (PageTable, Vec<PageKey>) {
        let mut t = PageTable::default();
        let pks = (0..n)
            .map(|blk| t.begin_load(FileKey(0), blk, Ticket::mine()))
            .collect();
        (t, pks)
    }

    #[test]
    fn a_load_goes_from_loading_to_loaded_and_counts_loading_pages() {
        let (mut t, pks) = table_with(2);
        assert!(t.any_loading());
        let p = t.get(pks[0]);
        assert_eq!(
            (p.state(), p.blk(), p.ram_page()),
            (PageState::Loading, 0, None)
        );
        assert!(p.ticket().is_some());
        assert_eq!(t.finish_load(pks[0], RamPage(7)), LoadEnd::Loaded);
        let p = t.get(pks[0]);
        assert_eq!(
            (p.state(), p.ram_page()),
            (PageState::Loaded, Some(RamPage(7)))
        );
        assert!(p.ticket().is_none());
        assert!(t.any_loading(), "block 1 still loads");
        t.detach(pks[1]);
        assert!(!t.any_loading());
    }

    #[test]
    fn loads_whose_loader_takes_the_host_lock_are_counted() {
        let mut t = PageTable::default();
        let native = t.begin_load(FileKey(0), 0, Ticket::mine_for(false));
        assert!(t.any_loading() && !t.any_loading_needing_host());
        let hosted = t.begin_load(FileKey(0), 1, Ticket::mine_for(true));
        let hosted_too = t.begin_load(FileKey(0), 2, Ticket::mine_for(true));
        assert!(t.any_loading_needing_host());
        t.finish_load(hosted, RamPage(1));
        assert!(t.any_loading_needing_host(), "block 2 still loads");
        t.invalidate(hosted_too);
        t.finish_load(hosted_too, RamPage(2));
        assert!(t.any_loading_needing_host(), "counted until detached");
        t.detach(hosted_too);
        assert!(!t.any_loading_needing_host() && t.any_loading());
        t.detach(native);
        assert!(!t.any_loading());
    }

    #[test]
    fn a_page_invalidated_while_loading_is_left_to_the_caller() {
        let (mut t, pks) = table_with(1);
        assert_eq!(t.invalidate(pks[0]), Invalidation::Marked);
        assert_eq!(t.get(pks[0]).state(), PageState::LoadingInvalidated);
        assert_eq!(t.invalidate(pks[0]), Invalidation::Marked);
        assert_eq!(t.finish_load(pks[0], RamPage(1)), LoadEnd::Invalidated);
        let page = t.detach(pks[0]);
        assert_eq!(page.ram_page(), Some(RamPage(1)));
        assert!(!t.any_loading());
    }

    #[test]
    fn dirty_and_clean_transitions() {
        let (mut t, pks) = table_with(1);
        t.finish_load(pks[0], RamPage(0));
        assert!(t.mark_dirty(pks[0]));
        assert!(!t.mark_dirty(pks[0]), "dirty already");
        assert_eq!(t.get(pks[0]).stored(), Stored::Not);
        t.mark_stored(pks[0]);
        assert_eq!(t.get(pks[0]).stored(), Stored::Unchanged);
        t.mark_dirty(pks[0]);
        assert_eq!(t.get(pks[0]).stored(), Stored::Rewritten);
        t.mark_dirty(pks[0]);
        assert_eq!(t.get(pks[0]).stored(), Stored::Rewritten);
        t.mark_stored(pks[0]);
        assert_eq!(t.get(pks[0]).stored(), Stored::Unchanged);
        assert_eq!(t.get(pks[0]).state(), PageState::Dirty);
        assert_eq!(t.invalidate(pks[0]), Invalidation::Resident);
        t.mark_clean(pks[0]);
        assert_eq!(t.get(pks[0]).state(), PageState::Loaded);
    }
}
