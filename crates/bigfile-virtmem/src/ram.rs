//! `Ram`: where pages live, and the budget they are kept within.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{Backend, FaultBackend, Wanted};
use crate::error::{Error, Result};
use crate::fresh;
use crate::host::HostUnlocked;
use crate::reclaim::reclaim_one;
use crate::shared::Shared;
use crate::stats::Stats;

/// A RAM as virtmem uses it: a page source from `bigfile-ram` plus a budget
/// of resident bytes and the LRU of clean pages reclaimed to stay within it.
///
/// Cloning gives another handle to the same RAM.
#[derive(Clone)]
pub struct Ram {
    shared: Arc<Shared>,
}

impl fmt::Debug for Ram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ram")
            .field("page_size", &self.page_size())
            .field("budget", &self.budget())
            .field("spec", self.shared.ram().spec())
            .finish()
    }
}

/// RAM-wide counters with the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamStats {
    /// Counters summed over the RAM's file handles.
    pub stats: Stats,
    /// The budget in bytes.
    pub budget: u64,
    /// Bytes held by pages now (resident pages times page size).
    pub resident_bytes: u64,
}

static DEFAULT_RAMS: Mutex<Option<HashMap<usize, Ram>>> = Mutex::new(None);

/// Lock the default RAMs' table.
fn lock_defaults() -> MutexGuard<'static, Option<HashMap<usize, Ram>>> {
    DEFAULT_RAMS.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ram {
    /// Use `ram`'s pages, with a budget of everything it can hold (set a
    /// smaller one with [`Ram::with_budget`], or take the default RAMs'
    /// budget, which follows the memory the process may use, with
    /// [`Ram::following_memory`]).
    pub fn new(ram: bigfile_ram::Ram) -> Ram {
        let budget = ram.max_size();
        // Forks are counted before the backend is chosen (a userfaultfd
        // opened now is known to be this process's: `backend.rs`).
        crate::fork::install_handlers();
        let shared = Arc::new(Shared::new(ram));
        crate::fork::track(&shared, || Box::new(lock_defaults()));
        let r = Ram { shared };
        r.set_budget(budget);
        r
    }

    /// A RAM from a spec string (see `bigfile_ram::RamSpec`), e.g. `memfd`,
    /// `shmfs:/dev/shm,pagesize=64K`.
    pub fn from_spec(spec: &str) -> Result<Ram> {
        Ok(Ram::new(bigfile_ram::Ram::new(spec.parse()?)?))
    }

    /// This RAM on fault backend `backend` (see [`FaultBackend`]; by
    /// default what the environment variable `BIGFILE_FAULTS` names:
    /// `signals`, `userfaultfd` or `auto`, the best available; signals when
    /// unset, userfaultfd being opt-in for now). Only
    /// before the RAM is used (no clone of it, no handle opened).
    ///
    /// # Errors
    /// [`Error::Backend`] when the RAM is in use, or userfaultfd is asked
    /// for and the process cannot have it (the reason says why).
    pub fn with_fault_backend(mut self, backend: FaultBackend) -> Result<Ram> {
        let chosen =
            Backend::choose(Wanted::Exactly(backend), self.shared.ram()).map_err(Error::Backend)?;
        // Every handle and clone holds the shared part (the fork registry
        // only a weak reference).
        if Arc::strong_count(&self.shared) != 1 {
            return Err(Error::Backend(
                "the fault backend of a RAM in use (cloned, or with handles) cannot change".into(),
            ));
        }
        let shared = Shared::with_backend(self.shared.ram().clone(), chosen);
        shared.set_budget_pages(self.shared.budget_pages());
        // The budget's policy goes along with it.
        if self.shared.follows_memory() {
            shared.follow_memory();
        }
        self.shared = Arc::new(shared);
        crate::fork::track(&self.shared, || Box::new(lock_defaults()));
        Ok(self)
    }

    /// The fault backend the RAM's mappings use.
    pub fn fault_backend(&self) -> FaultBackend {
        self.shared.backend().kind()
    }

    /// Why the RAM does not use userfaultfd, when it does not (signals
    /// asked for, the process may not use it, the RAM's kind).
    pub fn fault_backend_fallback(&self) -> Option<String> {
        self.shared.backend().fallback_reason().map(str::to_owned)
    }

    /// This RAM with a budget of `bytes`.
    pub fn with_budget(self, bytes: u64) -> Ram {
        self.set_budget(bytes);
        self
    }

    /// The process's default RAM for `page_size`: created on first use with
    /// the default backend (or `BIGFILE_RAM`'s), shared by every handle
    /// opened without an explicit RAM.
    ///
    /// In a forked child of a process whose default RAM was on userfaultfd,
    /// that RAM is on signals (its userfaultfd is the parent's): a new one
    /// replaces it on first use, on a userfaultfd of the child's own, for
    /// the handles opened from then on; the handles the child inherited
    /// stay on the old one. The two share one budget: the pages of both
    /// count against it, a load in either finding it full may reclaim the
    /// other's pages (when they are older than its own: precisely when, in
    /// "Shared budget"), [`Ram::set_budget`] on either sets it for
    /// both (the memory-following policy is one, of both RAMs' pages), and
    /// [`Ram::reclaim_defaults`] reclaims both ("Shared budget" in
    /// ARCHITECTURE.md).
    ///
    /// Its budget follows the memory the process may use: a quarter of the
    /// least of the machine's memory and the memory limits of its cgroups
    /// (v2 `memory.max`/`memory.high`, v1 `memory.limit_in_bytes`), lowered
    /// while memory is short (what is available, `MemAvailable` and the
    /// cgroups' room, beyond an eighth of that limit), never below a 64th
    /// of it; looked at again at most four times a second, by the faults
    /// that load. [`Ram::set_budget`] replaces that policy with a fixed
    /// budget. ("Default budget" in ARCHITECTURE.md says why.)
    pub fn default_for(page_size: usize) -> Result<Ram> {
        let mut rams = lock_defaults();
        let rams = rams.get_or_insert_with(HashMap::new);
        // One made on the userfaultfd of a process this one was forked from
        // is on signals here: renewed, so that this process's new handles
        // are on a userfaultfd of its own. It is kept if the new one cannot
        // be made.
        let old = rams.get(&page_size).cloned();
        if let Some(r) = old.as_ref().filter(|r| !r.shared.backend().forked()) {
            return Ok(r.clone());
        }
        let r = match (bigfile_ram::Ram::with_page_size(page_size), old) {
            (Ok(pages), Some(old)) => Ram::renewing(pages, &old),
            (Ok(pages), None) => Ram::new(pages).following_memory(),
            (Err(_), Some(old)) => return Ok(old),
            (Err(e), None) => return Err(e.into()),
        };
        rams.insert(page_size, r.clone());
        Ok(r)
    }

    /// A RAM of `pages` in place of default RAM `old`, sharing its budget
    /// (`Shared::renewing`). The caller holds the default RAMs' table.
    pub(crate) fn renewing(pages: bigfile_ram::Ram, old: &Ram) -> Ram {
        let shared = Shared::renewing(pages, &old.shared);
        crate::fork::track(&shared, || Box::new(lock_defaults()));
        Ram { shared }
    }

    /// This RAM with the default RAMs' budget policy ([`Ram::default_for`]):
    /// a budget that follows the memory the process may use, until
    /// [`Ram::set_budget`] sets one. For a RAM of one's own that should not
    /// grow to all the memory its backend has (its pages are shared memory,
    /// which the kernel cannot drop under pressure): the Python bindings
    /// give it to every RAM made without a budget. Each such RAM follows the
    /// policy on its own (two take up to half the memory).
    pub fn following_memory(self) -> Ram {
        self.shared.follow_memory();
        self
    }

    /// Reclaim every clean page of every default RAM (those a forked child
    /// replaced included: [`Ram::default_for`]); returns how many.
    pub fn reclaim_defaults() -> usize {
        let rams: Vec<Arc<Shared>> = {
            let rams = lock_defaults();
            let current = rams.iter().flat_map(|m| m.values());
            current
                .flat_map(|r| std::iter::once(r.shared.clone()).chain(r.shared.sharing_budget()))
                .collect()
        };
        rams.into_iter()
            .map(|shared| Ram { shared }.reclaim())
            .sum()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.shared.page_size()
    }

    /// The page source.
    pub fn pages(&self) -> &bigfile_ram::Ram {
        self.shared.ram()
    }

    /// Budget in bytes (a whole number of pages, at least one).
    pub fn budget(&self) -> u64 {
        self.shared.budget_pages() * self.page_size() as u64
    }

    /// Set the budget: at most `bytes` (rounded down to pages, at least one
    /// page) stay resident. Loading beyond it first reclaims least recently
    /// used clean pages, then waits for other threads' loads in progress
    /// (their pages will be clean), unless the faulting thread is itself
    /// inside a `loadblk` or `storeblk`; with no clean page to be had, the
    /// fault fails (SIGBUS with a diagnostic; `prefault` returns
    /// `Error::BudgetExhausted`).
    ///
    /// With a budget of 16 pages or more, reclaim works in batches (see
    /// "Batched reclaim" in ARCHITECTURE.md): up to a batch of clean pages
    /// may be dropped a little before they had to be, their memory kept,
    /// within the budget, for the handle's next loads.
    pub fn set_budget(&self, bytes: u64) {
        self.shared.stop_following_memory();
        self.shared
            .set_budget_pages(bytes / self.page_size() as u64);
    }

    /// Drop every clean page (the LRU list, RAM pages reclaimed ahead of
    /// need, see [`Ram::set_budget`], and fresh pages made ahead); returns
    /// how many were freed. (Pages
    /// another thread is reclaiming at this moment are freed by it or reused
    /// by the next load.)
    pub fn reclaim(&self) -> usize {
        self.reclaim_up_to(usize::MAX)
    }

    /// Drop up to `n` clean pages: those reclaimed ahead of need first, and
    /// fresh pages made ahead (after the one being made, if any: "Fresh
    /// pages" in ARCHITECTURE.md), then least recently used first.
    pub fn reclaim_up_to(&self, n: usize) -> usize {
        let _host = HostUnlocked::new();
        let mut st = self.shared.lock();
        st.hold_fresh(true);
        let mut st = fresh::wait_idle(&self.shared, st, None);
        // The lock is held from here to the end: no page is begun meanwhile.
        st.hold_fresh(false);
        let mut freed = 0;
        while freed < n && reclaim_one(&mut st, &self.shared) {
            freed += 1;
        }
        freed
    }

    /// Number of clean pages that reclaim could free now (including pages
    /// reclaimed ahead of need and kept for the next loads).
    pub fn reclaimable_pages(&self) -> u64 {
        let _host = HostUnlocked::new();
        let st = self.shared.lock();
        st.lru().len() + st.budget().spares_ready()
    }

    /// Counters over all handles of this RAM.
    pub fn stats(&self) -> RamStats {
        let stats = self.shared.counters().snapshot();
        RamStats {
            stats,
            budget: self.budget(),
            resident_bytes: stats.resident_pages * self.page_size() as u64,
        }
    }
}
