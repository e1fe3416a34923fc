//! What one faulting access holds: the pages served for one execution of
//! one instruction on this thread ("Accesses spanning pages" in
//! ARCHITECTURE.md).
//!
//! An instruction may touch two pages (a read across a block boundary). It
//! faults on one, which is loaded; it re-executes and faults on the other.
//! Were that load to reclaim the first page (with a budget of one page, or
//! a budget full of dirty pages), the instruction would fault on it again,
//! and so on forever. So a fault does not reclaim the page its own access
//! was served last, other than the one it faults on (the *pin*), and, when
//! nothing else can go, loads one page over the budget. An instruction touching still more pages than
//! that can hold would take its own pages back in turn: a fault on a page
//! this thread's own reclaim took from the same access fails instead.
//!
//! Thread-local: a fault is served on the thread that took it.

use std::cell::Cell;

use crate::keys::FileKey;

/// Pages of one access remembered: more than any single instruction
/// touches in practice (two for a straddling load, four for a straddling
/// string move); a longer cycle of losses would go unnoticed.
const REMEMBERED: usize = 4;

#[derive(Clone, Copy)]
struct Served {
    fileh: FileKey,
    blk: u64,
    /// This thread's own reclaim took it since.
    lost: bool,
}

#[derive(Clone, Copy)]
struct Streak {
    /// `Fault::execution` of the access; the RAM (its shared state's
    /// address) its pages are in. `ram == 0`: none.
    execution: u64,
    ram: usize,
    /// Oldest first; the last is the pin.
    served: [Served; REMEMBERED],
    len: usize,
}

const NONE: Served = Served {
    fileh: FileKey(0),
    blk: 0,
    lost: false,
};

thread_local! {
    static STREAK: Cell<Streak> = const {
        Cell::new(Streak {
            execution: 0,
            ram: 0,
            served: [NONE; REMEMBERED],
            len: 0,
        })
    };
}

/// One access on this thread, as its faults name it: `Fault::execution`,
/// in the RAM whose shared state is at `ram`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Execution {
    pub(crate) ram: usize,
    pub(crate) execution: u64,
}

/// This thread's own reclaim took back a page the access needs: it touches
/// more pages than the budget (plus one) holds.
#[derive(Debug)]
pub(crate) struct Lost;

impl Execution {
    /// The fault of this access on block `blk` of `fileh` begins: the page
    /// to keep (the last other page it was served), or `Lost` if this thread
    /// reclaimed the block from this very access. The page served last may
    /// be the one faulted on again, when another thread reclaimed it before
    /// the instruction ran again: keeping it would keep nothing, and this
    /// fault's reclaim could take the access's other page.
    pub(crate) fn begin(&self, fileh: FileKey, blk: u64) -> Result<Option<(FileKey, u64)>, Lost> {
        STREAK.with(|s| {
            let mut st = s.get();
            if st.ram != self.ram || st.execution != self.execution {
                st = Streak {
                    execution: self.execution,
                    ram: self.ram,
                    served: [NONE; REMEMBERED],
                    len: 0,
                };
                s.set(st);
                return Ok(None);
            }
            let served = &st.served[..st.len];
            if served
                .iter()
                .any(|p| p.lost && p.fileh == fileh && p.blk == blk)
            {
                return Err(Lost);
            }
            Ok(served
                .iter()
                .rev()
                .find(|p| p.fileh != fileh || p.blk != blk)
                .map(|p| (p.fileh, p.blk)))
        })
    }

    /// Block `blk` of `fileh` was served to this access: it is the pin now.
    pub(crate) fn served(&self, fileh: FileKey, blk: u64) {
        STREAK.with(|s| {
            let mut st = s.get();
            if st.ram != self.ram || st.execution != self.execution {
                // A nested fault (in a loadblk) served another access meanwhile.
                st.execution = self.execution;
                st.ram = self.ram;
                st.len = 0;
            }
            let mut kept = [NONE; REMEMBERED];
            let mut n = 0;
            for p in &st.served[..st.len] {
                if p.fileh != fileh || p.blk != blk {
                    kept[n] = *p;
                    n += 1;
                }
            }
            if n == REMEMBERED {
                kept.copy_within(1.., 0);
                n -= 1;
            }
            kept[n] = Served {
                fileh,
                blk,
                lost: false,
            };
            st.served = kept;
            st.len = n + 1;
            s.set(st);
        });
    }
}

impl Execution {
    /// This thread's reclaim, making room to serve this access, took block
    /// `blk` of `fileh`: if the access was served that page, it lost it.
    /// (A reclaim for anything else, a prefault, takes nothing from it: the
    /// access is over, or an access of the same instruction and registers
    /// later is another access that must be served.)
    pub(crate) fn reclaimed(&self, fileh: FileKey, blk: u64) {
        STREAK.with(|s| {
            let mut st = s.get();
            if st.ram != self.ram || st.execution != self.execution {
                return;
            }
            let mut hit = false;
            for p in &mut st.served[..st.len] {
                if p.fileh == fileh && p.blk == blk {
                    p.lost = true;
                    hit = true;
                }
            }
            if hit {
                s.set(st);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: FileKey = FileKey(1);

    /// Access `execution` in RAM 1.
    fn exec(execution: u64) -> Execution {
        Execution { ram: 1, execution }
    }

    #[test]
    fn the_page_served_last_is_the_pin_of_the_same_execution_only() {
        let a = exec(7);
        assert!(matches!(a.begin(F, 2), Ok(None)));
        a.served(F, 2);
        assert!(matches!(a.begin(F, 3), Ok(Some((F, 2)))));
        a.served(F, 3);
        assert!(matches!(a.begin(F, 2), Ok(Some((F, 3)))));
        let b = exec(8);
        assert!(matches!(b.begin(F, 2), Ok(None)), "another execution");
    }

    #[test]
    fn a_fault_on_the_page_served_last_keeps_the_other_one() {
        let a = exec(12);
        assert!(a.begin(F, 4).is_ok());
        a.served(F, 4);
        assert!(matches!(a.begin(F, 4), Ok(None)), "nothing else to keep");
        a.served(F, 5);
        // Another thread reclaimed block 5 before the instruction ran again.
        assert!(matches!(a.begin(F, 5), Ok(Some((F, 4)))));
    }

    #[test]
    fn a_page_this_thread_took_back_from_the_access_is_lost() {
        let a = exec(9);
        assert!(a.begin(F, 0).is_ok());
        a.served(F, 0);
        a.served(F, 1);
        Execution { ram: 2, ..a }.reclaimed(F, 0); // another RAM
        assert!(a.begin(F, 0).is_ok());
        Execution { execution: 3, ..a }.reclaimed(F, 0); // for another access
        assert!(a.begin(F, 0).is_ok());
        a.reclaimed(F, 0);
        assert!(a.begin(F, 0).is_err());
        // Served again (another thread's reclaim is no loss of ours).
        a.served(F, 0);
        assert!(matches!(a.begin(F, 5), Ok(Some((F, 0)))));
    }

    #[test]
    fn only_the_last_pages_are_remembered() {
        let a = exec(10);
        assert!(a.begin(F, 0).is_ok());
        for blk in 0..6 {
            a.served(F, blk);
        }
        a.reclaimed(F, 0);
        a.reclaimed(F, 1);
        assert!(a.begin(F, 0).is_ok() && a.begin(F, 1).is_ok());
        a.reclaimed(F, 2);
        assert!(a.begin(F, 2).is_err());
    }
}
