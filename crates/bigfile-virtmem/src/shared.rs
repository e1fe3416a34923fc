//! One RAM as virtmem sees it: the page source, its budget, the lock over
//! its [`State`] and the condition variable its threads wait on.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

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

pub(crate) struct Shared {
    ram: bigfile_ram::Ram,
    state: Mutex<State>,
    /// Signalled when a load finishes, a writeout ends, or a reclaimer has
    /// unmapped what it deferred.
    cond: Condvar,
    counters: Counters,
    budget_pages: AtomicU64,
    /// How the RAM's mappings learn of faults; fixed before its first handle.
    backend: Backend,
    /// A default RAM's budget policy (`memlimit.rs`), while it is not
    /// overridden by an explicit budget.
    policy: OnceLock<Policy>,
    adaptive: AtomicBool,
}

impl Shared {
    /// A RAM on the backend `BIGFILE_FAULTS` asks for (signals when it is
    /// unset, `auto`: the best available). A backend asked for there that cannot be had, or a value
    /// that names none, falls back to signals, with that as the reason.
    pub(crate) fn new(ram: bigfile_ram::Ram) -> Shared {
        let backend = Wanted::from_env()
            .and_then(|w| Backend::choose(w, &ram))
            .unwrap_or_else(|why| Backend::Signals { why_not_uffd: why });
        Shared::with_backend(ram, backend)
    }

    pub(crate) fn with_backend(ram: bigfile_ram::Ram, backend: Backend) -> Shared {
        Shared {
            ram,
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            counters: Counters::default(),
            budget_pages: AtomicU64::new(1),
            backend,
            policy: OnceLock::new(),
            adaptive: AtomicBool::new(false),
        }
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

    pub(crate) fn budget_pages(&self) -> u64 {
        self.budget_pages.load(Relaxed)
    }

    pub(crate) fn set_budget_pages(&self, pages: u64) {
        self.budget_pages.store(pages.max(1), Relaxed);
    }

    /// Keep the budget by the memory the system has (a default RAM's
    /// policy, `memlimit.rs`) from now on, until an explicit budget is set.
    pub(crate) fn follow_memory(&self) {
        let _ = self.policy.set(Policy::new());
        self.adaptive.store(true, Relaxed);
        self.adapt_now();
    }

    /// Whether the budget follows the memory ([`Shared::follow_memory`]).
    pub(crate) fn follows_memory(&self) -> bool {
        self.adaptive.load(Relaxed)
    }

    /// An explicit budget replaces the policy.
    pub(crate) fn stop_following_memory(&self) {
        self.adaptive.store(false, Relaxed);
    }

    /// With the default policy, and when it is time: the budget for the
    /// memory available now. Called without the lock, by faults.
    pub(crate) fn adapt_budget(&self) {
        if !self.adaptive.load(Relaxed) {
            return;
        }
        if self.policy.get().is_some_and(Policy::due) {
            self.adapt_now();
        }
    }

    fn adapt_now(&self) {
        let ps = self.page_size() as u64;
        let resident = self.counters.snapshot().resident_pages * ps;
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
