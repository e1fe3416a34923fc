//! `FileH`: a handle to a BigFile with its own in-memory changes.

use std::fmt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;

use bigfile_os::Prot;

use crate::bigfile::BigFile;
use crate::blockpage::BlockPage;
use crate::callback::InCallback;
use crate::error::{Error, Result};
use crate::fork_generation;
use crate::handle::{FileHInner, LoadPolicy};
use crate::host::HostUnlocked;
use crate::keys::PageKey;
use crate::mapper::Mapper;
use crate::pages::{Invalidation, PageState, Stored};
use crate::ram::Ram;
use crate::state::State;
use crate::stats::{Counter, Stats};
use crate::vma::Vma;
use crate::waits::Ticket;

/// What `dirty_writeout` does; combine with `|`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteoutFlags(u32);

impl WriteoutFlags {
    /// Call `storeblk` for every dirty page, in ascending block order; pages stay dirty.
    pub const STORE: WriteoutFlags = WriteoutFlags(1);
    /// Mark every dirty page clean (and read-only in every mapping).
    pub const MARKSTORED: WriteoutFlags = WriteoutFlags(2);

    /// Flags from their numeric value (the reference's WRITEOUT_STORE = 1,
    /// WRITEOUT_MARKSTORED = 2). Anything else, zero included, is an error.
    pub fn from_bits(bits: u32) -> Result<WriteoutFlags> {
        if bits == 0 || bits & !3 != 0 {
            return Err(Error::InvalidFlags(bits));
        }
        Ok(WriteoutFlags(bits))
    }

    /// The numeric value.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether all of `other`'s flags are set.
    pub fn contains(self, other: WriteoutFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for WriteoutFlags {
    type Output = WriteoutFlags;
    fn bitor(self, rhs: WriteoutFlags) -> WriteoutFlags {
        WriteoutFlags(self.0 | rhs.0)
    }
}

/// A handle to a BigFile: a snapshot of it with its own changes in memory.
///
/// One file may have many handles, each with its own changes. Mappings
/// ([`Vma`]) keep their handle alive.
pub struct FileH {
    pub(crate) inner: Arc<FileHInner>,
}

impl fmt::Debug for FileH {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileH")
            .field("file", &self.inner.name)
            .field("blksize", &self.blksize())
            .finish()
    }
}

impl FileH {
    /// Open a handle of `file` on `ram`, or on the default RAM for the file's
    /// blksize when `ram` is `None`. An explicit RAM must have page size
    /// equal to the file's blksize.
    pub fn open(file: Arc<dyn BigFile>, ram: Option<&Ram>) -> Result<FileH> {
        let blksize = file.blksize();
        let os_page = bigfile_os::os_page_size();
        if blksize == 0 || blksize % os_page != 0 {
            return Err(Error::BadBlksize { blksize, os_page });
        }
        let ram = match ram {
            Some(r) => {
                if r.page_size() != blksize {
                    return Err(Error::PageSizeMismatch {
                        ram_page: r.page_size(),
                        blksize,
                    });
                }
                r.clone()
            }
            None => Ram::default_for(blksize)?,
        };
        let inner = Arc::new(FileHInner::open(file, ram)?);
        let _ = inner.me.set(Arc::downgrade(&inner));
        Ok(FileH { inner })
    }

    /// The file's block size (= the page size).
    pub fn blksize(&self) -> usize {
        self.inner.page_size()
    }

    /// The file this handle is of.
    pub fn file(&self) -> &Arc<dyn BigFile> {
        &self.inner.file
    }

    /// The RAM this handle's pages live in.
    pub fn ram(&self) -> &Ram {
        &self.inner.ram
    }

    /// Map `pglen` pages of the file starting at page `pgoffset`. Nothing is
    /// loaded until touched (or prefaulted).
    pub fn mmap(&self, pgoffset: u64, pglen: u64) -> Result<Vma> {
        Vma::new(self.inner.clone(), pgoffset, pglen)
    }

    /// Write out dirty pages: see [`WriteoutFlags`]. With STORE, writes to
    /// pages of this handle from other threads wait until the writeout ends.
    /// A failing `storeblk` stops the writeout with [`Error::Store`]; every
    /// page not yet stored, and with STORE|MARKSTORED every page, stays
    /// dirty, so nothing is lost and a later writeout retries. Failing to
    /// make the pages read-only (mprotect) stops it likewise, with
    /// [`Error::Os`], before storing (STORE) or before marking (MARKSTORED).
    ///
    /// MARKSTORED apart from STORE (as a two-phase commit does) marks clean
    /// every dirty page except those written since a STORE stored them:
    /// their new content was never stored, and they stay dirty for the next
    /// writeout. (wendelin.core marks those clean too, losing the writes.)
    /// A dirty page no STORE stored is marked clean on the caller's word.
    pub fn dirty_writeout(&self, flags: WriteoutFlags) -> Result<()> {
        let _host = HostUnlocked::new();
        let fh = &*self.inner;
        let shared = &*fh.shared;
        let mut st = fh.lock_unless_writeout("dirty_writeout")?;
        if flags.contains(WriteoutFlags::STORE) {
            let blocks = st.dirty_pages(fh.key);
            // Read-only everywhere, so a write during storeblk faults and waits.
            // If that fails (mprotect's ENOMEM), nothing is stored: a page left
            // writable could change unseen while stored, and the change be lost
            // when marked clean. Pages made read-only already stay dirty; a
            // write to them faults and makes them writable again.
            read_only_everywhere(&st, fh, &blocks)?;
            let to_store: Vec<(u64, u64)> = blocks
                .iter()
                .map(|&(blk, pk)| {
                    let rp = st.pages().get(pk).ram_page().expect("dirty page has RAM");
                    (blk, rp.0)
                })
                .collect();
            let ticket = Ticket::mine_for(fh.needs_host);
            st.begin_writeout(fh.key, ticket.clone());
            let forks = fork_generation::generation();
            drop(st);

            let stored = catch_unwind(AssertUnwindSafe(|| store_all(fh, &to_store, forks)));

            // Retake the lock and keep it through marking, so no discard or
            // invalidation slips in between and `blocks` stays exact.
            st = shared.lock();
            if fork_generation::generation() != forks {
                // A storeblk forked, and this is the child, whose state
                // forgot the pages (the parent's): nothing to mark.
                return Err(Error::Forked);
            }
            st.end_writeout(fh.key);
            ticket.finish(Ok(()));
            shared.notify(&st);
            let (n, res) = match stored {
                Ok(outcome) => outcome,
                Err(panic) => {
                    drop(st);
                    resume_unwind(panic)
                }
            };
            // No write could come in between: they waited for the writeout.
            for &(_, pk) in &blocks[..n] {
                st.mark_stored(pk);
            }
            res?;
        }
        if flags.contains(WriteoutFlags::MARKSTORED) {
            let blocks: Vec<(u64, PageKey)> = st
                .dirty_pages(fh.key)
                .into_iter()
                .filter(|&(_, pk)| st.pages().get(pk).stored() != Stored::Rewritten)
                .collect();
            // Every page read-only first: a clean page left writable would take
            // writes without becoming dirty. On failure all stay dirty.
            read_only_everywhere(&st, fh, &blocks)?;
            for (_, pk) in blocks {
                st.mark_clean(pk, shared.counters());
            }
        }
        Ok(())
    }

    /// Drop every change: dirty pages are forgotten; the next access loads
    /// the file's data again.
    pub fn dirty_discard(&self) -> Result<()> {
        let _host = HostUnlocked::new();
        let fh = &*self.inner;
        let shared = &*fh.shared;
        let mut st = fh.lock_unless_writeout("dirty_discard")?;
        let mapper = Mapper::of(shared);
        for (_, pk) in st.dirty_pages(fh.key) {
            mapper.forget(&mut st, pk, shared.counters());
        }
        Ok(())
    }

    /// Forget page `pgoffset` whatever its state (a dirty page's changes are
    /// dropped): the next access loads it again. A page being loaded is
    /// marked so its loader drops the result and the next access loads
    /// afresh. Used when the file's data changed underneath.
    pub fn invalidate_page(&self, pgoffset: u64) -> Result<()> {
        let _host = HostUnlocked::new();
        let fh = &*self.inner;
        let shared = &*fh.shared;
        let mut st = fh.lock_unless_writeout("invalidate_page")?;
        if let Some(pk) = st.lookup(fh.key, pgoffset) {
            if st.invalidate(pk) == Invalidation::Resident {
                Mapper::of(shared).forget(&mut st, pk, shared.counters());
            }
        }
        // A reclaimer may still be unmapping an earlier page of the block,
        // whose old data stays readable until it is done.
        while st.block_unmapping(fh.key, pgoffset) {
            st = shared.wait(st);
        }
        Ok(())
    }

    /// Whether any page has changes not written out.
    pub fn is_dirty(&self) -> bool {
        self.inner.counters.snapshot().dirty_pages != 0
    }

    /// The dirty blocks, ascending.
    pub fn dirty_blocks(&self) -> Vec<u64> {
        let _host = HostUnlocked::new();
        let st = self.inner.shared.lock();
        st.dirty_pages(self.inner.key)
            .into_iter()
            .map(|(blk, _)| blk)
            .collect()
    }

    /// The state of page `pgoffset`, `None` when it is EMPTY.
    pub fn page_state(&self, pgoffset: u64) -> Option<PageState> {
        let _host = HostUnlocked::new();
        let st = self.inner.shared.lock();
        st.lookup(self.inner.key, pgoffset)
            .map(|pk| st.pages().get(pk).state())
    }

    /// This handle's counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// How a failing `loadblk` is retried.
    pub fn set_load_policy(&self, policy: LoadPolicy) {
        self.inner.set_load_policy(policy);
    }

    /// The current load policy.
    pub fn load_policy(&self) -> LoadPolicy {
        self.inner.load_policy()
    }

    /// Number of live mappings of this handle.
    pub fn mapping_count(&self) -> usize {
        let _host = HostUnlocked::new();
        let st = self.inner.shared.lock();
        st.vma_count(self.inner.key)
    }

    /// Close the handle, dropping changes not written out. Refused while
    /// mappings are alive: the handle is given back with the error.
    pub fn close(self) -> std::result::Result<(), (Error, FileH)> {
        let n = self.mapping_count();
        if n != 0 {
            return Err((Error::LiveMappings(n), self));
        }
        drop(self);
        Ok(())
    }
}

/// Make `blocks` (block, page) of handle `fh` read-only in every mapping;
/// stop at the first failure (mprotect's or UFFDIO_WRITEPROTECT's ENOMEM).
fn read_only_everywhere(st: &State, fh: &FileHInner, blocks: &[(u64, PageKey)]) -> Result<()> {
    let mapper = Mapper::of(&fh.shared);
    for &(blk, _) in blocks {
        mapper
            .protect_everywhere(st, fh.key, blk, Prot::Read)
            .map_err(|source| Error::Os {
                op: mapper.protect_call(),
                source,
            })?;
    }
    Ok(())
}

/// Store `blocks` (block, RAM page) in order; stop at the first failure,
/// or if a storeblk forked and this is the child (whose RAM handle does not
/// hold the parent's pages). Returns how many were stored, and the failure.
fn store_all(fh: &FileHInner, blocks: &[(u64, u64)], forks: u64) -> (usize, Result<()>) {
    for (n, &(blk, ram_page)) in blocks.iter().enumerate() {
        if fork_generation::generation() != forks {
            return (n, Err(Error::Forked));
        }
        if let Err(e) = store_one(fh, blk, ram_page) {
            return (n, Err(e));
        }
    }
    (blocks.len(), Ok(()))
}

/// Store block `blk` from `ram_page`.
fn store_one(fh: &FileHInner, blk: u64, ram_page: u64) -> Result<()> {
    let window = fh.ramh.window(ram_page)?;
    // SAFETY: the page is dirty and this handle is under writeout: it
    // cannot be dropped (discard/invalidate are refused, reclaim takes
    // clean pages only) and every mapping of it is read-only, so its
    // memory stays valid and unchanged while we read it.
    let page = unsafe { BlockPage::new(&fh.ramh, ram_page, window, false) };
    let _inside = InCallback::enter(("storeblk", blk, &fh.name));
    fh.file
        .storeblk_page(blk, &page)
        .map_err(|source| Error::Store {
            file: fh.name.clone(),
            blk,
            source,
        })?;
    fh.counts().add(Counter::Stores, 1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writeout_flags_accept_only_store_and_markstored() {
        assert_eq!(WriteoutFlags::from_bits(1).unwrap(), WriteoutFlags::STORE);
        assert_eq!(
            WriteoutFlags::from_bits(2).unwrap(),
            WriteoutFlags::MARKSTORED
        );
        let both = WriteoutFlags::from_bits(3).unwrap();
        assert!(both.contains(WriteoutFlags::STORE) && both.contains(WriteoutFlags::MARKSTORED));
        assert!(!WriteoutFlags::STORE.contains(WriteoutFlags::MARKSTORED));
        for bad in [0, 4, 5, u32::MAX] {
            assert!(
                matches!(WriteoutFlags::from_bits(bad), Err(Error::InvalidFlags(b)) if b == bad)
            );
        }
    }
}
