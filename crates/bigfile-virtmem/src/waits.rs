//! Who waits for whom: tickets for work other threads may wait for (a load,
//! a writeout), and the graph of waits that lets a wait which would never
//! end (a cycle: two loaders each touching the other's page) fail at once
//! instead of hanging.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::ThreadId;

use crate::failure::Failure;
use crate::keys::RamPage;

/// A thread's promise to finish something (a page's load, a handle's
/// writeout) that other threads may wait for. Finished once, by its owner.
#[derive(Debug)]
pub(crate) struct Ticket {
    owner: ThreadId,
    /// Whether the work may take the host lock (a loader or storer that
    /// does): a thread holding it releases it before waiting.
    needs_host: bool,
    /// A read-ahead load (`readahead.rs`): its failure is no one's, and a
    /// thread that waited for it loads the block again itself.
    readahead: bool,
    /// A read-ahead job not begun yet: the RAM page reclaimed for it, if
    /// any, until its worker begins it or a faulting thread takes it over
    /// ([`Ticket::claim_job`]); `None` once claimed (and for other work).
    job: Mutex<Option<Option<RamPage>>>,
    outcome: OnceLock<Result<(), Failure>>,
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
            owner: std::thread::current().id(),
            needs_host,
            readahead: false,
            job: Mutex::new(None),
            outcome: OnceLock::new(),
        })
    }

    /// A ticket of read-ahead worker `owner`, for a load of a file whose
    /// `needs_host_lock` is `needs_host` (a thread holding the host lock
    /// releases it before waiting for the worker), queued with the RAM page
    /// `recycled` for it (if any).
    pub(crate) fn read_ahead_by(
        owner: ThreadId,
        needs_host: bool,
        recycled: Option<RamPage>,
    ) -> Arc<Ticket> {
        Arc::new(Ticket {
            owner,
            needs_host,
            readahead: true,
            job: Mutex::new(Some(recycled)),
            outcome: OnceLock::new(),
        })
    }

    /// Claim a read-ahead job that nobody has begun: its worker, to run it,
    /// or a thread that faults on its block, to load it itself instead of
    /// waiting for a job queued behind others (maybe behind the very load
    /// that faulted, on the same worker). The first to claim gets the RAM
    /// page reclaimed for it (`Some(recycled)`); any later claim `None`.
    pub(crate) fn claim_job(&self) -> Option<Option<RamPage>> {
        self.job.lock().unwrap_or_else(|p| p.into_inner()).take()
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
    pub(crate) fn owner(&self) -> ThreadId {
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
/// wait, each waiting for the next, back to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cycle(Vec<ThreadId>);

impl Cycle {
    /// The thread would wait for itself (it owns the ticket).
    pub(crate) fn is_self(&self) -> bool {
        self.0.len() == 2
    }
}

impl fmt::Display for Cycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" waits for ")?;
            }
            write!(f, "{t:?}")?;
        }
        Ok(())
    }
}

/// The threads waiting, each for one ticket. An edge is followed only
/// while its ticket is unfinished: a load that finished meanwhile leaves an
/// entry its waiter has not yet woken to remove.
#[derive(Debug, Default)]
pub(crate) struct WaitGraph {
    waiting: HashMap<ThreadId, Arc<Ticket>>,
}

impl WaitGraph {
    /// The cycle that `me` waiting for `ticket` would close, if any.
    pub(crate) fn cycle(&self, me: ThreadId, ticket: &Ticket) -> Option<Cycle> {
        let mut chain = vec![me, ticket.owner()];
        let mut cur = ticket.owner();
        while cur != me {
            cur = self.waiting.get(&cur).filter(|t| !t.is_finished())?.owner();
            if chain.len() > self.waiting.len() + 2 {
                // Not through `me`: a cycle of others, which is theirs to find.
                return None;
            }
            chain.push(cur);
        }
        Some(Cycle(chain))
    }

    /// `me` starts waiting for `ticket`.
    pub(crate) fn start(&mut self, me: ThreadId, ticket: Arc<Ticket>) {
        self.waiting.insert(me, ticket);
    }

    /// `me` stopped waiting.
    pub(crate) fn end(&mut self, me: ThreadId) {
        self.waiting.remove(&me);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// Distinct thread ids (of threads that have ended: only ids are used).
    fn ids(n: usize) -> Vec<ThreadId> {
        (0..n)
            .map(|_| thread::spawn(|| thread::current().id()).join().unwrap())
            .collect()
    }

    fn ticket_of(owner: ThreadId) -> Arc<Ticket> {
        Ticket::read_ahead_by(owner, false, None)
    }

    #[test]
    fn waiting_for_ones_own_ticket_is_a_cycle_of_one() {
        let g = WaitGraph::default();
        let t = Ticket::mine();
        let c = g.cycle(thread::current().id(), &t).unwrap();
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
        assert_eq!(cycle.0, [a, b, c, a]);
        assert_eq!(
            cycle.to_string(),
            format!("{a:?} waits for {b:?} waits for {c:?} waits for {a:?}")
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

    #[test]
    fn a_read_ahead_job_is_claimed_once() {
        let t = Ticket::read_ahead_by(thread::current().id(), false, Some(RamPage(7)));
        assert_eq!(t.claim_job(), Some(Some(RamPage(7))));
        assert_eq!(t.claim_job(), None, "begun or taken over already");
        assert_eq!(Ticket::mine().claim_job(), None, "no job");
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
