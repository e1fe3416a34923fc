//! File handles and mappings across fork(2) ("Fork" in ARCHITECTURE.md).
//!
//! A forked child shares its parent's RAM memory (bigfile-ram renews the
//! handles' files in the child, so the child's pages are its own) but has
//! a copy of the bookkeeping, which describes the parent's pages. Before
//! fork returns in the child, every RAM's state forgets its pages, loads,
//! writeouts, waits and spares, and every mapping's whole range is
//! reserved again (PROT_NONE): the child starts with nothing resident and
//! nothing dirty, and every access loads the block through `loadblk` into
//! memory of its own. The parent's changes not written out are not the
//! child's; the child's changes, reclaims and exit are not the parent's.
//!
//! Every RAM's lock (and the tables of RAMs) is taken before the fork and
//! given back after it in both processes: the child never finds one held
//! by a thread it does not have. A thread that forks inside a `loadblk` or
//! `storeblk` (whose frames in the child hold keys of the forgotten pages)
//! finds the fork [`generation`] changed when it comes back: its load is
//! dropped and done again, its writeout fails with `Error::Forked`.

use std::any::Any;
use std::cell::RefCell;
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock, Weak};

use crate::fork_generation;
use crate::mapper::Mapper;
use crate::shared::{Guard, Shared};
use crate::waits::{self, WaitGraph};

/// Locks the default RAMs' table (`ram.rs`, which tracks RAMs here): the
/// lock taken first.
type LockOuter = fn() -> Box<dyn Any>;

static LOCK_OUTER: OnceLock<LockOuter> = OnceLock::new();

/// Every live RAM.
static RAMS: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

/// Track a new RAM (and register the fork handlers, once). A RAM is made
/// of a bigfile-ram RAM, whose crate registered its handlers before: so
/// ours, whose locks are taken first, prepare first.
/// `lock_outer` takes the lock held outside the table of RAMs (the
/// default RAMs' table).
pub(crate) fn track(shared: &Arc<Shared>, lock_outer: LockOuter) {
    let _ = LOCK_OUTER.set(lock_outer);
    install_handlers();
    let mut rams = RAMS.lock().unwrap_or_else(|p| p.into_inner());
    rams.retain(|w| w.strong_count() > 0);
    rams.push(Arc::downgrade(shared));
}

/// Register the fork handlers, once: before the generation counts (the
/// userfaultfd backend's depends on it: `backend.rs`).
pub(crate) fn install_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Without them a child could damage its parent's pages: no way on.
        bigfile_os::at_fork(prepare, parent, child).expect("pthread_atfork");
    });
}

/// One RAM's lock, held across a fork. The guard borrows `shared`:
/// declared before it, it is dropped before it.
struct HeldRam {
    state: Guard<'static>,
    shared: Arc<Shared>,
}

impl HeldRam {
    fn lock(shared: Arc<Shared>) -> HeldRam {
        let state = shared.lock();
        // SAFETY: the guard borrows `shared`'s mutex, which the `Arc`
        // stored beside it keeps alive; `HeldRam` drops it first.
        let state = unsafe { std::mem::transmute::<Guard<'_>, Guard<'static>>(state) };
        HeldRam { state, shared }
    }
}

/// Locks outer first; dropped in the reverse order of taking.
struct Held {
    /// The process's wait graph (`waits.rs`), taken last.
    graph: MutexGuard<'static, WaitGraph>,
    rams: Vec<HeldRam>,
    _registry: MutexGuard<'static, Vec<Weak<Shared>>>,
    _outer: Option<Box<dyn Any>>,
}

thread_local! {
    /// What the forking thread holds between `prepare` and `parent`/`child`
    /// (the same thread runs all three).
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

unsafe extern "C" fn prepare() {
    // The lock order: the default RAMs' table, the table of RAMs, each RAM,
    // the wait graph.
    let outer = LOCK_OUTER.get().map(|lock| lock());
    let registry = RAMS.lock().unwrap_or_else(|p| p.into_inner());
    let rams = registry
        .iter()
        .filter_map(Weak::upgrade)
        .map(HeldRam::lock)
        .collect();
    let graph = waits::graph();
    HELD.with(|h| {
        *h.borrow_mut() = Some(Held {
            graph,
            rams,
            _registry: registry,
            _outer: outer,
        })
    });
}

unsafe extern "C" fn parent() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

unsafe extern "C" fn child() {
    let Some(mut held) = HELD.with(|h| h.borrow_mut().take()) else {
        return;
    };
    fork_generation::advance();
    // The waits of threads the child does not have.
    *held.graph = WaitGraph::default();
    forget_in_child(&mut held.rams);
}

/// In the child: every RAM forgets its pages, its mappings reserved again;
/// then the pages of every budget's pool are none. (Its count may still
/// hold those of a RAM not among `rams`: one whose last reference was
/// dropping on another thread as the process forked, too late for
/// `prepare` to find it and before its budget took its pages out of the
/// count. That thread is not the child's: they would count forever.)
fn forget_in_child(rams: &mut [HeldRam]) {
    for r in rams.iter_mut() {
        let mapper = Mapper::of(&r.shared);
        for (start, pages) in r.state.forget_in_child(r.shared.counters()) {
            // SAFETY: the range of a mapping of this RAM (live, or removed
            // and not yet given back by a thread the child does not have):
            // its pages are the parent's memory, which the child must not
            // reach; the reservation is what the range holds between pages.
            unsafe { mapper.reserve_again(start, pages) };
        }
    }
    for r in rams.iter() {
        r.shared.pool_forgotten_in_child();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

    fn ram() -> bigfile_ram::Ram {
        bigfile_ram::Ram::new("memfd,pagesize=4K".parse().unwrap()).unwrap()
    }

    /// A RAM whose last reference drops on another thread while the process
    /// forks is not among those `prepare` locks, and its pages may still be
    /// counted in its pool: the child counts none of them.
    #[test]
    fn a_childs_pools_count_no_page_of_a_ram_dropping_at_the_fork() {
        let signals = || Backend::Signals {
            why_not_uffd: "the test asks for signals".into(),
        };
        let old = Arc::new(Shared::with_backend(ram(), signals()));
        let dropping = Shared::renewing(ram(), &old);
        let new = Shared::renewing(ram(), &dropping);
        for (r, pages) in [(&old, 2), (&dropping, 3), (&new, 1)] {
            let mut st = r.lock();
            for _ in 0..pages {
                st.budget_mut().charge();
            }
        }
        assert_eq!(new.pooled_resident(), 6);
        // Its budget never takes its pages out: the child has no thread
        // to finish dropping it.
        std::mem::forget(dropping);
        let mut held = [HeldRam::lock(old.clone()), HeldRam::lock(new.clone())];
        forget_in_child(&mut held);
        drop(held);
        assert_eq!((old.pooled_resident(), new.pooled_resident()), (0, 0));
        new.lock().budget_mut().charge();
        assert_eq!(old.pooled_resident(), 1, "counted again from none");
    }
}
