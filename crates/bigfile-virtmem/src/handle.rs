//! The part of a file handle that its mappings and the fault path share
//! (the public [`FileH`](crate::FileH) wraps it).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bigfile_ram::RamHandle;

use crate::bigfile::BigFile;
use crate::error::{Error, Result};
use crate::fresh;
use crate::host::HostUnlocked;
use crate::keys::FileKey;
use crate::mapper::Mapper;
use crate::ram::Ram;
use crate::shared::{Guard, Shared};
use crate::stats::{CountPair, Counters};

/// How a failing `loadblk` is retried before the fault is given up (SIGBUS).
/// The load-retry policy is described in ARCHITECTURE.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadPolicy {
    /// Total attempts, at least 1.
    pub attempts: u32,
    /// Sleep before retry `n` is `n * backoff`.
    pub backoff: Duration,
}

impl Default for LoadPolicy {
    fn default() -> Self {
        LoadPolicy {
            attempts: 3,
            backoff: Duration::from_millis(1),
        }
    }
}

pub(crate) struct FileHInner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) ram: Ram,
    pub(crate) key: FileKey,
    pub(crate) file: Arc<dyn BigFile>,
    pub(crate) ramh: Arc<RamHandle>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) name: String,
    /// The file's `needs_host_lock`, asked once.
    pub(crate) needs_host: bool,
    /// The file's `reads_ahead`, asked once.
    pub(crate) reads_ahead: bool,
    load_attempts: AtomicU32,
    load_backoff_us: AtomicU64,
    /// The handle itself, for read-ahead loads to hold (set once it is in
    /// its `Arc`).
    pub(crate) me: OnceLock<Weak<FileHInner>>,
}

impl FileHInner {
    /// A handle of `file` on `ram` (whose page size is the file's blksize).
    pub(crate) fn open(file: Arc<dyn BigFile>, ram: Ram) -> Result<FileHInner> {
        let shared = ram.shared().clone();
        // On the userfaultfd backend pages are mapped by small entries
        // (`Mapper::map`), and pages taken away keep mappings registered
        // for missing faults, under which a collapse fails: no huge pages.
        let ramh = Arc::new(match shared.backend().uffd() {
            Some(_) => shared.ram().open_handle_small()?,
            None => shared.ram().open_handle()?,
        });
        let counters = Arc::new(Counters::default());
        let name = file.name();
        let needs_host = file.needs_host_lock();
        let reads_ahead = file.reads_ahead();
        let key = {
            let _host = HostUnlocked::new();
            // The guard in a statement of its own: a temporary of the
            // block's tail expression would outlive `_host`, retaking the
            // host lock with the RAM lock held.
            let mut st = shared.lock();
            let key = st.open_handle(ramh.clone(), counters.clone());
            if fresh::wanted(&shared, reads_ahead) {
                // Its first loads' pages, made before it faults.
                fresh::ask(&shared, &mut st, key);
            }
            key
        };
        let policy = LoadPolicy::default();
        Ok(FileHInner {
            shared,
            ram,
            key,
            file,
            ramh,
            counters,
            name,
            needs_host,
            reads_ahead,
            load_attempts: AtomicU32::new(policy.attempts),
            load_backoff_us: AtomicU64::new(policy.backoff.as_micros() as u64),
            me: OnceLock::new(),
        })
    }

    pub(crate) fn load_policy(&self) -> LoadPolicy {
        LoadPolicy {
            attempts: self.load_attempts.load(Relaxed).max(1),
            backoff: Duration::from_micros(self.load_backoff_us.load(Relaxed)),
        }
    }

    pub(crate) fn set_load_policy(&self, policy: LoadPolicy) {
        self.load_attempts.store(policy.attempts.max(1), Relaxed);
        self.load_backoff_us
            .store(policy.backoff.as_micros() as u64, Relaxed);
    }

    /// The RAM lock, to change this handle's pages for `what`: refused
    /// while a writeout of the handle is in progress. The caller has
    /// released the host lock.
    pub(crate) fn lock_unless_writeout(&self, what: &'static str) -> Result<Guard<'_>> {
        let st = self.shared.lock();
        if st.writeout(self.key).is_some() {
            return Err(Error::WriteoutInProgress(what));
        }
        Ok(st)
    }

    pub(crate) fn page_size(&self) -> usize {
        self.shared.page_size()
    }

    /// The counters a change of this handle is counted in.
    pub(crate) fn counts(&self) -> CountPair<'_> {
        CountPair {
            fileh: &self.counters,
            ram: self.shared.counters(),
        }
    }
}

impl Drop for FileHInner {
    fn drop(&mut self) {
        // No mapping is alive (each holds an Arc to us), nor a read-ahead
        // job running (it holds one too), so the only pages loading are
        // those of read-ahead jobs not begun: claimed here (their workers
        // skip them), their RAM pages given back. Every other page is clean
        // or dirty, and all are dropped. Dirty pages not written out are
        // lost, as on close in the reference.
        let _host = HostUnlocked::new();
        let shared = self.shared.clone();
        let mapper = Mapper::of(&shared);
        let rc = shared.counters();
        // The worker may be making a fresh page in our file: waited for,
        // so that the file is closed here, not later by the worker.
        let mut st = fresh::wait_idle(&shared, shared.lock(), Some(self.key));
        for pk in st.pages_of(self.key) {
            if let Some(ticket) = st.pages().get(pk).ticket().cloned() {
                if let Some(Some(rp)) = ticket.claim_job() {
                    mapper.release(&self.ramh, rp);
                }
                ticket.finish(Ok(()));
            }
            mapper.forget(&mut st, pk, rc);
        }
        for rp in st.take_spares_of(self.key, rc) {
            mapper.release(&self.ramh, rp);
        }
        st.close_handle(self.key);
        // Room made, and loads ended that other handles' threads may be
        // waiting for (`make_room` waits for loads to end when the budget
        // holds nothing else to reclaim): no worker will notify for these.
        shared.notify(&st);
    }
}
