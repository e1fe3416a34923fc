//! One RAM as virtmem sees it: the page source, its budget, the lock over
//! its [`State`] and the condition variable its threads wait on.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};

use bigfile_os::HeldLock;

use crate::backend::{Backend, Wanted};
use crate::memlimit::{Memory, Policy};
use crate::state::State;
use crate::stats::Counters;
use crate::waits::{Cycle, Ticket, Tid};

/// A RAM's lock, held: the state behind it, and this thread counted as
/// holding one of bigfile's locks (a fault it takes meanwhile, from a
/// signal handler, fails instead of waiting for it: `source.rs`).
pub(crate) struct Guard<'a> {
    // Dropped first: the count goes before the lock does (a signal in
    // between could only make a fault wait, as without the count; never
    // fail a fault whose thread holds nothing).
    held: HeldLock,
    state: MutexGuard<'a, State>,
}

impl Deref for Guard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

/// A budget, and the pages counted against it: a RAM's own, or shared by
/// the default RAMs of a forked child (`Ram::default_for`).
#[derive(Debug)]
struct Pool {
    budget_pages: AtomicU64,
    /// Pages of every RAM sharing the budget (each RAM's `Budget` counts
    /// its own in it).
    resident: Arc<AtomicU64>,
    /// The clock of their LRU lists (`Lru::sharing`).
    clock: Arc<AtomicU64>,
    /// A default RAM's budget policy (`memlimit.rs`), while it is not
    /// overridden by an explicit budget.
    policy: OnceLock<Policy>,
    adaptive: AtomicBool,
}

impl Pool {
    fn new() -> Pool {
        Pool {
            budget_pages: AtomicU64::new(1),
            resident: Arc::default(),
            clock: Arc::default(),
            policy: OnceLock::new(),
            adaptive: AtomicBool::new(false),
        }
    }
}

pub(crate) struct Shared {
    ram: bigfile_ram::Ram,
    state: Mutex<State>,
    /// Signalled when a load finishes, a writeout ends, or a reclaimer has
    /// unmapped what it deferred.
    cond: Condvar,
    counters: Counters,
    /// How the RAM's mappings learn of faults; fixed before its first handle.
    backend: Backend,
    pool: Arc<Pool>,
    /// When the least recently used clean page was last used, by the
    /// pool's clock (0: there is none); shown by the LRU list.
    oldest_clean: Arc<AtomicU64>,
    /// The RAMs sharing the budget made before this one, oldest first: the
    /// default RAMs this one renewed, with theirs (fixed when it is made).
    renewed: Vec<Weak<Shared>>,
    /// The RAM that renewed this one (set once, under the default RAMs'
    /// table's lock: never while the process forks).
    renewer: OnceLock<Weak<Shared>>,
}

impl Shared {
    /// A RAM on the backend `BIGFILE_FAULTS` asks for (signals when it is
    /// unset, `auto`: the best available). A backend asked for there that cannot be had, or a value
    /// that names none, falls back to signals, with that as the reason.
    pub(crate) fn new(ram: bigfile_ram::Ram) -> Shared {
        let backend = Shared::backend_from_env(&ram);
        Shared::with_backend(ram, backend)
    }

    fn backend_from_env(ram: &bigfile_ram::Ram) -> Backend {
        Wanted::from_env()
            .and_then(|w| Backend::choose(w, ram))
            .unwrap_or_else(|why| Backend::Signals { why_not_uffd: why })
    }

    pub(crate) fn with_backend(ram: bigfile_ram::Ram, backend: Backend) -> Shared {
        Shared::in_pool(ram, backend, Arc::new(Pool::new()), Vec::new())
    }

    fn in_pool(
        ram: bigfile_ram::Ram,
        backend: Backend,
        pool: Arc<Pool>,
        renewed: Vec<Weak<Shared>>,
    ) -> Shared {
        let oldest_clean = Arc::new(AtomicU64::new(0));
        let state = State::pooled(
            pool.resident.clone(),
            pool.clock.clone(),
            oldest_clean.clone(),
        );
        Shared {
            ram,
            state: Mutex::new(state),
            cond: Condvar::new(),
            counters: Counters::default(),
            backend,
            pool,
            oldest_clean,
            renewed,
            renewer: OnceLock::new(),
        }
    }

    /// A RAM (on the backend [`Shared::new`] chooses) renewing `old`: it
    /// shares its budget, policy included, and pages counted against it.
    /// The caller holds the default RAMs' table's lock.
    pub(crate) fn renewing(ram: bigfile_ram::Ram, old: &Arc<Shared>) -> Arc<Shared> {
        let backend = Shared::backend_from_env(&ram);
        let mut renewed = old.renewed.clone();
        renewed.push(Arc::downgrade(old));
        let new = Arc::new(Shared::in_pool(ram, backend, old.pool.clone(), renewed));
        let _ = old.renewer.set(Arc::downgrade(&new));
        new
    }

    /// The other RAMs sharing this one's budget, alive: those it renewed,
    /// and those renewing it (and them).
    pub(crate) fn sharing_budget(&self) -> Vec<Arc<Shared>> {
        let mut rams: Vec<Arc<Shared>> = self.renewed.iter().filter_map(Weak::upgrade).collect();
        let mut next = self.renewer.get().and_then(Weak::upgrade);
        while let Some(r) = next {
            next = r.renewer.get().and_then(Weak::upgrade);
            rams.push(r);
        }
        rams
    }

    /// When this RAM's least recently used clean page was last used, by
    /// the clock of the RAMs sharing its budget; `None` when it has none.
    /// (Read without the lock: as of a moment ago.)
    pub(crate) fn oldest_clean(&self) -> Option<u64> {
        Some(self.oldest_clean.load(Relaxed)).filter(|&used| used > 0)
    }

    /// Whether the budget is shared with other RAMs (alive or not).
    pub(crate) fn budget_is_shared(&self) -> bool {
        !self.renewed.is_empty() || self.renewer.get().is_some()
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The page source.
    pub(crate) fn ram(&self) -> &bigfile_ram::Ram {
        &self.ram
    }

    /// The RAM-wide counters.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    pub(crate) fn page_size(&self) -> usize {
        self.ram.page_size()
    }

    /// The budget, in pages (shared with the RAMs sharing it).
    pub(crate) fn budget_pages(&self) -> u64 {
        self.pool.budget_pages.load(Relaxed)
    }

    pub(crate) fn set_budget_pages(&self, pages: u64) {
        self.pool.budget_pages.store(pages.max(1), Relaxed);
    }

    /// Pages counted against the budget, of every RAM sharing it (read
    /// without the lock: the other RAMs change it under theirs).
    pub(crate) fn pooled_resident(&self) -> u64 {
        self.pool.resident.load(Relaxed)
    }

    /// In a forked child, once every RAM it has forgot its pages: the
    /// pool counts none (`fork::forget_in_child` says why it may, before).
    pub(crate) fn pool_forgotten_in_child(&self) {
        self.pool.resident.store(0, Relaxed);
    }

    /// Keep the budget by the memory the system has (a default RAM's
    /// policy, `memlimit.rs`) from now on, until an explicit budget is set.
    pub(crate) fn follow_memory(&self) {
        let _ = self.pool.policy.set(Policy::new());
        self.pool.adaptive.store(true, Relaxed);
        self.adapt_now();
    }

    /// Whether the budget follows the memory ([`Shared::follow_memory`]).
    pub(crate) fn follows_memory(&self) -> bool {
        self.pool.adaptive.load(Relaxed)
    }

    /// An explicit budget replaces the policy.
    pub(crate) fn stop_following_memory(&self) {
        self.pool.adaptive.store(false, Relaxed);
    }

    /// With the default policy, and when it is time: the budget for the
    /// memory available now. Called without the lock, by faults.
    pub(crate) fn adapt_budget(&self) {
        if !self.follows_memory() {
            return;
        }
        if self.pool.policy.get().is_some_and(Policy::due) {
            self.adapt_now();
        }
    }

    fn adapt_now(&self) {
        let ps = self.page_size() as u64;
        let resident = self.pooled_resident() * ps;
        self.set_budget_pages(Memory::now().budget(resident) / ps);
    }

    /// Take the lock. A panic while it was held leaves state that is still
    /// structurally valid (every step keeps the maps consistent), so poisoning
    /// is ignored rather than turned into a crash inside a page fault.
    pub(crate) fn lock(&self) -> Guard<'_> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let held = HeldLock::enter();
        #[cfg(feature = "failpoints")]
        crate::failpoint::hook("virtmem::locked");
        Guard { held, state }
    }

    /// Wait for a notification, counted in the state's waiters.
    pub(crate) fn wait<'a>(&self, st: Guard<'a>) -> Guard<'a> {
        let Guard { held, mut state } = st;
        state.count_waiter(true);
        #[cfg(feature = "failpoints")]
        crate::failpoint::hook("virtmem::wait");
        drop(held);
        let mut state = self.cond.wait(state).unwrap_or_else(|p| p.into_inner());
        let held = HeldLock::enter();
        state.count_waiter(false);
        Guard { held, state }
    }

    /// Wake every waiter, if any; `st` is the state just changed, still
    /// locked. (The standard condition variable makes a system call for
    /// every notification, waiters or not: two per fault otherwise.)
    pub(crate) fn notify(&self, st: &State) {
        if st.waiters() > 0 {
            self.cond.notify_all();
        }
    }

    /// Wait until `ticket` is finished, unless the wait would never end: the
    /// calling thread owns the ticket, or waiting would close a cycle of
    /// waits; then the lock is dropped and the cycle returned. The one place
    /// virtmem waits for another thread's work.
    pub(crate) fn wait_for<'a>(
        &self,
        mut st: Guard<'a>,
        ticket: &Arc<Ticket>,
    ) -> Result<Guard<'a>, Cycle> {
        let me = Tid::current();
        {
            // Looked for and joined at once: another RAM's thread may be
            // closing the same cycle.
            let mut graph = st.waits();
            if let Some(cycle) = graph.cycle(me, ticket) {
                return Err(cycle);
            }
            graph.start(me, ticket.clone());
        }
        while !ticket.is_finished() {
            st = self.wait(st);
        }
        st.waits().end(me);
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Failure;
    use std::thread;

    #[test]
    fn a_ram_following_the_memory_still_follows_it_on_another_backend() {
        let ram = bigfile_ram::Ram::new("memfd,pagesize=4K".parse().unwrap()).unwrap();
        let ram = crate::ram::Ram::new(ram)
            .following_memory()
            .with_fault_backend(crate::backend::FaultBackend::Signals)
            .unwrap();
        assert!(ram.shared().follows_memory());
    }

    fn shared() -> Arc<Shared> {
        let ram = bigfile_ram::Ram::new("memfd,pagesize=4K".parse().unwrap()).unwrap();
        Arc::new(Shared::with_backend(
            ram,
            crate::backend::Backend::Signals {
                why_not_uffd: "the test asks for signals".into(),
            },
        ))
    }

    #[test]
    fn waiting_for_ones_own_ticket_fails_at_once() {
        let s = shared();
        let t = Ticket::mine();
        let Err(cycle) = s.wait_for(s.lock(), &t) else {
            panic!("waited for its own ticket");
        };
        assert!(cycle.is_self());
    }

    #[test]
    fn a_waiter_wakes_when_the_ticket_is_finished() {
        let s = shared();
        let (tx, rx) = std::sync::mpsc::channel();
        let owner = {
            let s = s.clone();
            thread::spawn(move || {
                let t = Ticket::mine();
                tx.send(t.clone()).unwrap();
                // Finish once the other thread waits.
                loop {
                    let st = s.lock();
                    if st.waiters() > 0 {
                        t.finish(Err(Failure::Panicked));
                        s.notify(&st);
                        return;
                    }
                    drop(st);
                    thread::yield_now();
                }
            })
        };
        let t = rx.recv().unwrap();
        let Ok(st) = s.wait_for(s.lock(), &t) else {
            panic!("no cycle here");
        };
        assert!(matches!(t.outcome(), Some(Err(Failure::Panicked))));
        assert_eq!(st.waiters(), 0);
        drop(st);
        owner.join().unwrap();
    }

    #[test]
    fn the_budget_is_at_least_one_page() {
        let s = shared();
        s.set_budget_pages(0);
        assert_eq!(s.budget_pages(), 1);
    }
}
