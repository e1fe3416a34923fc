//! Who waits for whom: tickets for work other threads may wait for (a load,
//! a writeout), and the graph of waits that lets a wait which would never
//! end (a cycle: two loaders each touching the other's page) fail at once
//! instead of hanging.
//!
//! Threads are named by their kernel thread id ([`Tid`]), which is what a
//! userfaultfd event names: a thread blocked in a kernel-mode fault waits
//! for the worker serving it (`uffd.rs` adds that edge), so a cycle through
//! a system call on mapped memory is found as any other. There is one graph
//! for the process ([`graph`]): a cycle may go through several RAMs (a
//! loader of a file on one RAM reading a mapping on another, whose loader
//! reads back).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};

use crate::failure::Failure;
use crate::keys::RamPage;

/// A thread, by its kernel thread id (gettid(2)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Tid(pub(crate) libc::pid_t);

impl Tid {
    /// The calling thread. (Asked of the kernel each time: a forked child's
    /// thread has a new id, which a cache would miss.)
    pub(crate) fn current() -> Tid {
        // SAFETY: gettid has no arguments and cannot fail.
        Tid(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t)
    }
}

impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "thread {}", self.0)
    }
}

/// A thread's promise to finish something (a page's load, a handle's
/// writeout) that other threads may wait for. Finished once, by its owner.
#[derive(Debug)]
pub(crate) struct Ticket {
    owner: Tid,
    /// Whether the work may take the host lock (a loader or storer that
    /// does): a thread holding it releases it before waiting.
    needs_host: bool,
    /// A read-ahead load (`readahead.rs`): its failure is no one's, and a
    /// thread that waited for it loads the block again itself.
    readahead: bool,
    /// A read-ahead job not begun yet, until its worker begins it or a
    /// faulting thread takes it over ([`Ticket::claim_job`]).
    job: Mutex<Job>,
    outcome: OnceLock<Result<(), Failure>>,
}

/// A read-ahead ticket's job, as far as claiming it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    /// None: claimed already, or not a read-ahead job.
    Gone,
    /// Asked, with the RAM page reclaimed for it, whose old mappings are
    /// still being taken away (`readahead::issue`'s deferred work): only
    /// its worker's or its handle's claim may have it yet; a fault waits.
    Held(RamPage),
    /// Claimable by anyone, with the RAM page reclaimed for it, if any.
    Open(Option<RamPage>),
}

/// What a faulting thread's [`Ticket::take_over`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TakeOver {
    /// The job, with the RAM page reclaimed for it, if any: to load here.
    Taken(Option<RamPage>),
    /// A job whose page is not free of its old mappings yet: wait for the
    /// RAM's next notification, then look again.
    NotYet,
    /// No job to take: begun by its worker (wait for it), or not one.
    No,
}

impl Ticket {
    /// A ticket of the calling thread, for work that never takes the host lock.
    #[cfg(test)]
    pub(crate) fn mine() -> Arc<Ticket> {
        Ticket::mine_for(false)
    }

    /// A ticket of the calling thread, for work of a file whose
    /// `needs_host_lock` is `needs_host`.
    pub(crate) fn mine_for(needs_host: bool) -> Arc<Ticket> {
        Arc::new(Ticket {
            owner: Tid::current(),
            needs_host,
            readahead: false,
            job: Mutex::new(Job::Gone),
            outcome: OnceLock::new(),
        })
    }

    /// A ticket of read-ahead worker `owner`, for a load of a file whose
    /// `needs_host_lock` is `needs_host` (a thread holding the host lock
    /// releases it before waiting for the worker), queued with the RAM page
    /// `recycled` for it (if any). A recycled page's job is held from
    /// faulting threads until [`Ticket::open_job`]: the page may still be
    /// mapped where its old block was, and a fault taking the job over would
    /// fill it under those mappings.
    pub(crate) fn read_ahead_by(
        owner: Tid,
        needs_host: bool,
        recycled: Option<RamPage>,
    ) -> Arc<Ticket> {
        let job = match recycled {
            Some(rp) => Job::Held(rp),
            None => Job::Open(None),
        };
        Arc::new(Ticket {
            owner,
            needs_host,
            readahead: true,
            job: Mutex::new(job),
            outcome: OnceLock::new(),
        })
    }

    fn job(&self) -> std::sync::MutexGuard<'_, Job> {
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's RAM page is free of its old mappings: faulting threads may
    /// take the job over from now on.
    pub(crate) fn open_job(&self) {
        let mut job = self.job();
        if let Job::Held(rp) = *job {
            *job = Job::Open(Some(rp));
        }
    }

    /// Claim a read-ahead job that nobody has begun, held or open: its
    /// worker, to run it (it gets it after it was opened), or its handle,
    /// going, to give its page back. The first claim gets the RAM page
    /// reclaimed for it (`Some(recycled)`); any later claim `None`.
    pub(crate) fn claim_job(&self) -> Option<Option<RamPage>> {
        match std::mem::replace(&mut *self.job(), Job::Gone) {
            Job::Gone => None,
            Job::Held(rp) => Some(Some(rp)),
            Job::Open(rp) => Some(rp),
        }
    }

    /// A faulting thread's claim of a job nobody has begun, to load the
    /// block itself instead of waiting for a job queued behind others
    /// (maybe behind the very load that faulted, on the same worker).
    pub(crate) fn take_over(&self) -> TakeOver {
        let mut job = self.job();
        match *job {
            Job::Gone => TakeOver::No,
            Job::Held(_) => TakeOver::NotYet,
            Job::Open(rp) => {
                *job = Job::Gone;
                TakeOver::Taken(rp)
            }
        }
    }

    /// Whether this is a read-ahead load's: its failure is not reported to
    /// those who waited for it (they load the block again).
    pub(crate) fn is_read_ahead(&self) -> bool {
        self.readahead
    }

    /// Whether finishing the work may take the host lock.
    pub(crate) fn needs_host(&self) -> bool {
        self.needs_host
    }

    /// The thread doing the work.
    pub(crate) fn owner(&self) -> Tid {
        self.owner
    }

    /// Record the outcome; waiters see it when notified. Only the first
    /// call counts.
    pub(crate) fn finish(&self, outcome: Result<(), Failure>) {
        let _ = self.outcome.set(outcome);
    }

    /// The outcome, once finished.
    pub(crate) fn outcome(&self) -> Option<&Result<(), Failure>> {
        self.outcome.get()
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.outcome.get().is_some()
    }
}

/// A cycle of waits that a new wait would close, from the thread that would
/// wait, each waiting for the next, back to it; with each thread, whether it
/// waits from inside a system call (a kernel-mode fault a worker serves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cycle(Vec<(Tid, Waits)>);

/// How a thread of a [`Cycle`] waits for the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waits {
    /// For a ticket, as a fault or an API call does.
    Ticket,
    /// Blocked in a kernel-mode fault, for the worker serving it.
    InSystemCall,
}

impl Cycle {
    /// The thread would wait for itself (it owns the ticket).
    pub(crate) fn is_self(&self) -> bool {
        self.0.len() == 2
    }

    /// A worker serving a system call's fault would wait for the load of
    /// that very thread: a loader's system call touched the page it is
    /// loading.
    pub(crate) fn is_own_load_in_system_call(&self) -> bool {
        self.0.len() == 3 && self.0[1].1 == Waits::InSystemCall
    }
}

impl fmt::Display for Cycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (t, how)) in self.0.iter().enumerate() {
            write!(f, "{t}")?;
            if i + 1 < self.0.len() {
                f.write_str(match how {
                    Waits::Ticket => " waits for ",
                    Waits::InSystemCall => " (in a system call on mapped memory) waits for ",
                })?;
            }
        }
        Ok(())
    }
}

/// The process's wait graph. A leaf of the lock order, taken only under a
/// RAM's lock (through `State::waits`), so a fork, which holds every RAM's
/// lock and then this one (`fork.rs`), finds it free.
static GRAPH: LazyLock<Mutex<WaitGraph>> = LazyLock::new(Default::default);

/// The process's wait graph, locked. The caller holds a RAM's lock.
pub(crate) fn graph() -> MutexGuard<'static, WaitGraph> {
    GRAPH.lock().unwrap_or_else(|p| p.into_inner())
}

/// The threads waiting, each for one ticket. An edge is followed only
/// while its ticket is unfinished: a load that finished meanwhile leaves an
/// entry its waiter has not yet woken to remove.
#[derive(Debug, Default)]
pub(crate) struct WaitGraph {
    waiting: HashMap<Tid, (Arc<Ticket>, Waits)>,
}

impl WaitGraph {
    /// The cycle that `me` waiting for `ticket` would close, if any.
    pub(crate) fn cycle(&self, me: Tid, ticket: &Ticket) -> Option<Cycle> {
        let mut chain = vec![(me, Waits::Ticket), (ticket.owner(), Waits::Ticket)];
        let mut cur = ticket.owner();
        while cur != me {
            let (t, how) = self.waiting.get(&cur).filter(|(t, _)| !t.is_finished())?;
            chain.last_mut().expect("the chain starts with me").1 = *how;
            cur = t.owner();
            if chain.len() > self.waiting.len() + 2 {
                // Not through `me`: a cycle of others, which is theirs to find.
                return None;
            }
            chain.push((cur, Waits::Ticket));
        }
        Some(Cycle(chain))
    }

    /// `me` starts waiting for `ticket`.
    pub(crate) fn start(&mut self, me: Tid, ticket: Arc<Ticket>) {
        self.waiting.insert(me, (ticket, Waits::Ticket));
    }

    /// Thread `tid`, blocked in a kernel-mode fault, waits for the worker
    /// whose `ticket` serves it, until [`end`](Self::end).
    pub(crate) fn start_in_system_call(&mut self, tid: Tid, ticket: Arc<Ticket>) {
        self.waiting.insert(tid, (ticket, Waits::InSystemCall));
    }

    /// `me` stopped waiting.
    pub(crate) fn end(&mut self, me: Tid) {
        self.waiting.remove(&me);
    }

    /// The worker whose `ticket` served thread `tid`'s kernel-mode fault is
    /// done: the edge goes, unless `tid` waits for something else by now
    /// (given up by the watchdog, its system call failed meanwhile and it
    /// went on).
    pub(crate) fn end_in_system_call(&mut self, tid: Tid, ticket: &Arc<Ticket>) {
        if self
            .waiting
            .get(&tid)
            .is_some_and(|(t, _)| Arc::ptr_eq(t, ticket))
        {
            self.waiting.remove(&tid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct thread ids (only ids are used).
    fn ids(n: usize) -> Vec<Tid> {
        (0..n).map(|i| Tid(1_000_000 + i as libc::pid_t)).collect()
    }

    fn ticket_of(owner: Tid) -> Arc<Ticket> {
        Ticket::read_ahead_by(owner, false, None)
    }

    #[test]
    fn waiting_for_ones_own_ticket_is_a_cycle_of_one() {
        let g = WaitGraph::default();
        let t = Ticket::mine();
        let c = g.cycle(Tid::current(), &t).unwrap();
        assert!(c.is_self());
    }

    #[test]
    fn a_chain_back_to_the_waiter_is_a_cycle_and_a_finished_edge_breaks_it() {
        let [a, b, c] = ids(3)[..] else {
            unreachable!()
        };
        let mut g = WaitGraph::default();
        let (ta, tb, tc) = (ticket_of(a), ticket_of(b), ticket_of(c));
        // b waits for c, c waits for a: a waiting for b closes the cycle.
        g.start(b, tc.clone());
        g.start(c, ta.clone());
        let cycle = g.cycle(a, &tb).expect("a cycle");
        assert!(!cycle.is_self());
        let w = Waits::Ticket;
        assert_eq!(cycle.0, [(a, w), (b, w), (c, w), (a, w)]);
        assert_eq!(
            cycle.to_string(),
            format!("{a} waits for {b} waits for {c} waits for {a}")
        );
        // c's wait is over (its ticket finished): no cycle any more.
        ta.finish(Ok(()));
        assert_eq!(g.cycle(a, &tb), None);
        g.end(b);
        g.end(c);
        assert_eq!(g.cycle(a, &tb), None);
    }

    #[test]
    fn a_cycle_of_others_is_not_the_waiters() {
        let [a, b, c] = ids(3)[..] else {
            unreachable!()
        };
        let mut g = WaitGraph::default();
        // b and c wait for each other; a waits for b: no cycle through a.
        g.start(b, ticket_of(c));
        g.start(c, ticket_of(b));
        assert_eq!(g.cycle(a, &ticket_of(b)), None);
    }

    /// A loader (l) whose system call faults on its own page: the worker
    /// (w) serving that fault would wait for l's load, and l waits for w.
    #[test]
    fn a_wait_through_a_system_call_closes_a_cycle() {
        let [w, l, m] = ids(3)[..] else {
            unreachable!()
        };
        let mut g = WaitGraph::default();
        let (tw, tl) = (ticket_of(w), ticket_of(l));
        g.start_in_system_call(l, tw.clone());
        let cycle = g.cycle(w, &tl).expect("a cycle");
        assert!(cycle.is_own_load_in_system_call());
        assert_eq!(
            cycle.to_string(),
            format!("{w} waits for {l} (in a system call on mapped memory) waits for {w}")
        );
        // Through a third thread: l's system call faults on the block m
        // loads, and m's loader waits for l's load.
        g.start(m, tl.clone());
        let cycle = g.cycle(w, &ticket_of(m)).expect("a cycle");
        assert!(!cycle.is_own_load_in_system_call());
        assert_eq!(cycle.0.len(), 4);
        // The fault served: no edge; but only its own.
        g.start(l, ticket_of(w));
        g.end_in_system_call(l, &tw);
        assert!(g.cycle(w, &tl).is_some(), "l's later wait stays");
        g.end(l);
        g.start_in_system_call(l, tw.clone());
        g.end_in_system_call(l, &tw);
        assert_eq!(g.cycle(w, &tl), None);
    }

    #[test]
    fn a_read_ahead_job_is_claimed_once() {
        let t = Ticket::read_ahead_by(Tid::current(), false, Some(RamPage(7)));
        assert_eq!(t.take_over(), TakeOver::NotYet, "its page still mapped");
        t.open_job();
        assert_eq!(t.take_over(), TakeOver::Taken(Some(RamPage(7))));
        assert_eq!(t.claim_job(), None, "begun or taken over already");
        assert_eq!(t.take_over(), TakeOver::No);
        assert_eq!(Ticket::mine().claim_job(), None, "no job");
        let held = Ticket::read_ahead_by(Tid::current(), false, Some(RamPage(8)));
        assert_eq!(held.claim_job(), Some(Some(RamPage(8))), "its worker's");
        let fresh = Ticket::read_ahead_by(Tid::current(), false, None);
        assert_eq!(fresh.take_over(), TakeOver::Taken(None), "open at once");
    }

    #[test]
    fn a_ticket_is_finished_once() {
        let t = Ticket::mine();
        assert!(!t.is_finished());
        t.finish(Ok(()));
        t.finish(Err(Failure::Panicked));
        assert!(matches!(t.outcome(), Some(Ok(()))));
    }
}
