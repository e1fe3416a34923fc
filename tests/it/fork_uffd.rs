//! fork(2) on the userfaultfd backend: a userfaultfd acts on the address
//! space of the process that opened it, so a forked child opens its own
//! with its first RAM on that backend (and starts its own service), while
//! the RAMs it inherited are on signals there. System calls on a child's
//! new mappings then work with no prefault, as in the parent; the parent's
//! go on working after the child exits; a grandchild does the same.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bigfile::virtmem::{Access, Advice, Error, FaultBackend, FileH, Ram, Vma};
use bigfile_testkit::child::{forked, TIMEOUT};

use crate::common::{holds_initial, on_uffd, peek, poke, read_each, write_out, MemFile, BLK};

/// Blocks mapped and written out in one `write(2)`.
const BLOCKS: u64 = 8;

/// Whether one `write(2)` from `vma` (blocks `0..BLOCKS` of the memory
/// file, not loaded) copies the file's data.
fn writes_out(vma: &Vma) -> bool {
    let got = write_out(vma);
    got.len() == BLOCKS as usize * BLK && holds_initial(&got, 0..BLOCKS)
}

/// A RAM of `BLOCKS` pages on userfaultfd, if this process can have one
/// (not `common::ram`, which panics off it: a panic's message in a forked
/// child may wait for a lock of a thread it does not have).
fn uffd_ram() -> Option<Ram> {
    Ram::from_spec(&format!("memfd,pagesize={BLK}"))
        .ok()?
        .with_budget(BLOCKS * BLK as u64)
        .with_fault_backend(FaultBackend::Userfaultfd)
        .ok()
}

/// What a (grand)child of a process on userfaultfd checks: the RAM it
/// inherited is on signals, saying why; a RAM it makes is on a userfaultfd
/// of its own, whose mapping a `write(2)` copies from pages not loaded.
fn a_child_has_a_userfaultfd_of_its_own(file: &Arc<MemFile>, inherited: &Ram) -> bool {
    let on_signals = inherited.fault_backend() == FaultBackend::Signals
        && inherited
            .fault_backend_fallback()
            .is_some_and(|why| why.contains("forked child"));
    let Some(new) = uffd_ram() else {
        return false;
    };
    let fh = FileH::open(file.clone(), Some(&new)).unwrap();
    let vma = fh.mmap(0, BLOCKS).unwrap();
    // Twice: the pages taken away in between, faulted in again.
    let ok = on_signals && writes_out(&vma) && new.reclaim() > 0 && writes_out(&vma);
    ok && new.fault_backend_fallback().is_none()
}

#[test]
fn a_forked_child_and_grandchild_write_from_pages_not_loaded_on_their_own_userfaultfd() {
    let Some((file, parent_ram, fh)) = on_uffd(BLOCKS) else {
        return;
    };
    let vma = fh.mmap(0, BLOCKS).unwrap();
    assert!(writes_out(&vma), "the parent, before the fork");
    let status = forked(
        || {
            let mut ok = a_child_has_a_userfaultfd_of_its_own(&file, &parent_ram);
            // The child's own RAM, inherited by its child in turn.
            let Some(mine) = uffd_ram() else {
                return false;
            };
            let mine_fh = FileH::open(file.clone(), Some(&mine)).unwrap();
            let mine_vma = mine_fh.mmap(0, BLOCKS).unwrap();
            ok &= writes_out(&mine_vma);
            let grandchild = forked(
                || a_child_has_a_userfaultfd_of_its_own(&file, &mine),
                TIMEOUT,
            );
            ok &= grandchild.is_ok_and(|s| s.success());
            // The child's userfaultfd serves on after its child exits.
            ok &= mine.reclaim() > 0 && writes_out(&mine_vma);
            ok
        },
        TIMEOUT,
    )
    .unwrap();
    assert!(status.success(), "the child (or grandchild) failed");
    // The parent's, after the child exits: pages taken away, faulted in
    // again through the parent's userfaultfd.
    assert_eq!(parent_ram.fault_backend(), FaultBackend::Userfaultfd);
    assert!(parent_ram.reclaim() > 0);
    assert!(writes_out(&vma), "the parent, after the child");
}

/// The default RAM (of handles opened without one): one made on the
/// parent's userfaultfd would put a child's new handles on signals; the
/// child makes a new one on first use. On the signal pass, the child's is
/// on signals as the parent's.
#[test]
fn a_forked_child_renews_a_default_ram_on_userfaultfd() {
    let parent = Ram::default_for(BLK).unwrap().fault_backend();
    let file = Arc::new(MemFile::new(BLK).native());
    let status = forked(
        || {
            let Ok(default) = Ram::default_for(BLK) else {
                return false;
            };
            let fh = FileH::open(file.clone(), None).unwrap();
            let vma = fh.mmap(0, BLOCKS).unwrap();
            let ok = default.fault_backend() == parent;
            // A fixed budget is the renewed RAM's too (a grandchild's).
            let budget = 24 * BLK as u64;
            default.set_budget(budget);
            let kept = forked(
                || Ram::default_for(BLK).is_ok_and(|r| r.budget() == budget),
                TIMEOUT,
            )
            .is_ok_and(|s| s.success());
            // Kernel I/O from pages not loaded, where the backend has it.
            ok && kept && (parent == FaultBackend::Signals || writes_out(&vma))
        },
        TIMEOUT,
    )
    .unwrap();
    assert!(
        status.success(),
        "the child's default RAM is not on {parent}"
    );
}

/// The child's default RAMs, the one its inherited handles stay on and the
/// one renewing it, keep within one budget (set on either) and are both
/// reached by `Ram::reclaim_defaults`. Found in review: their budgets added
/// up, and the inherited one's clean pages were out of its reach. (On the
/// signal pass the child's default RAM is the inherited one: the same
/// checks, on one RAM.)
#[test]
fn a_forked_childs_default_rams_share_one_budget_and_are_reclaimed_together() {
    const BUDGET: u64 = 6;
    let inherited = Ram::default_for(BLK).unwrap();
    let file = Arc::new(MemFile::new(BLK).native());
    let old_fh = FileH::open(file.clone(), None).unwrap();
    let old_vma = old_fh.mmap(0, BLOCKS).unwrap();
    // No read-ahead: each page is loaded by the access, one at a time.
    old_vma.advise(Advice::Random);
    let status = forked(
        || {
            let Ok(default) = Ram::default_for(BLK) else {
                return false;
            };
            let renewed = default.fault_backend() != inherited.fault_backend();
            default.set_budget(BUDGET * BLK as u64);
            let fh = FileH::open(file.clone(), None).unwrap();
            let vma = fh.mmap(0, BLOCKS).unwrap();
            vma.advise(Advice::Random);
            let pages = || {
                let of = |r: &Ram| r.stats().resident_bytes / BLK as u64;
                of(&inherited) + if renewed { of(&default) } else { 0 }
            };
            let mut ok = inherited.budget() == default.budget();
            // Four pages through each: the second four take the first's room.
            read_each(&old_vma, BLK, [0, 2, 4, 6].into_iter());
            ok &= pages() == 4;
            read_each(&vma, BLK, [1, 3, 5, 7].into_iter());
            ok &= pages() == BUDGET;
            // The RAM loading took the room of the one left idle.
            ok &= !renewed || default.stats().resident_bytes == 4 * BLK as u64;
            read_each(&old_vma, BLK, [1, 3, 5, 7].into_iter());
            ok &= pages() == BUDGET;
            // A budget set on the inherited one is the renewed one's too.
            inherited.set_budget(3 * BLK as u64);
            ok &= default.budget() == 3 * BLK as u64;
            read_each(&vma, BLK, [0, 2, 4, 6].into_iter());
            ok &= pages() == 3;
            // Pages of both (fewer than a budget each: both must be held).
            read_each(&old_vma, BLK, [0].into_iter());
            let held = pages();
            let both = !renewed || inherited.stats().resident_bytes > 0;
            ok &= both && default.stats().resident_bytes > 0;
            ok &= Ram::reclaim_defaults() as u64 >= held && pages() == 0;
            ok
        },
        TIMEOUT,
    )
    .unwrap();
    assert!(
        status.success(),
        "the child's default RAMs went over their budget or were not all reclaimed"
    );
}

/// In a forked child: the default RAM it inherited (on signals there),
/// and a mapping `old` of blocks of `file` opened through it in the
/// parent; new handles of `file` are on the default RAM renewed there.
struct Renewed<'a> {
    inherited: &'a Ram,
    file: &'a Arc<MemFile>,
    old: &'a Vma,
}

impl Renewed<'_> {
    /// A new handle of `file` (on the renewed default RAM) and a mapping
    /// of its block `blk`.
    fn map_new(&self, blk: u64) -> Option<(FileH, Vma)> {
        let fh = FileH::open(self.file.clone(), None).ok()?;
        let vma = fh.mmap(blk, 1).ok()?;
        Some((fh, vma))
    }
}

/// Maps blocks 0.. of a file through the default RAM (`old_blocks` of
/// them), forks, and runs `body` in the child with its default RAM
/// renewed, the budget shared set to `budget` blocks; asserts it returned
/// true (`failure` says what went wrong otherwise). Nothing to check where
/// the child's default RAM is not renewed (the signal pass: the inherited
/// one, on signals, is the child's too).
fn in_child_with_renewed_default(
    (old_blocks, budget): (u64, u64),
    body: impl FnOnce(Renewed<'_>) -> bool,
    failure: &str,
) {
    let inherited = Ram::default_for(BLK).unwrap();
    let file = Arc::new(MemFile::new(BLK).native());
    let old_fh = FileH::open(file.clone(), None).unwrap();
    let old = old_fh.mmap(0, old_blocks).unwrap();
    let status = forked(
        || {
            let Ok(default) = Ram::default_for(BLK) else {
                return false;
            };
            if default.fault_backend() == inherited.fault_backend() {
                return true;
            }
            default.set_budget(budget * BLK as u64);
            body(Renewed {
                inherited: &inherited,
                file: &file,
                old: &old,
            })
        },
        TIMEOUT,
    )
    .unwrap();
    assert!(status.success(), "{failure}");
}

/// A load in the inherited default RAM holds the whole shared budget: a
/// fault of the renewed one waits for it (then reclaims its page), as a
/// fault waits for the loads of its own RAM, rather than failing with the
/// budget exhausted. (On the signal pass nothing is renewed: nothing to
/// check.)
#[test]
fn a_forked_childs_renewed_default_ram_waits_for_the_loads_of_the_one_it_replaced() {
    in_child_with_renewed_default(
        (1, 1),
        |r| {
            let file = r.file;
            // (entered, open): the inherited RAM's load waits at the gate.
            let gate = Arc::new((Mutex::new((false, false)), Condvar::new()));
            let g = gate.clone();
            file.on_load(move |_, _| {
                let (m, c) = &*g;
                let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
                s.0 = true;
                c.notify_all();
                while !s.1 {
                    s = c.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                Ok(())
            });
            let old_ptr = r.old.as_ptr() as usize;
            let loader = std::thread::spawn(move || peek(old_ptr as *const u8));
            {
                let (m, c) = &*gate;
                let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
                while !s.0 {
                    s = c.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            }
            file.clear_load_hook();
            // Opened a while later: the fault below finds the load still
            // in progress (with a fault that waits, the delay only delays).
            let g = gate.clone();
            let opener = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                let (m, c) = &*g;
                m.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
                c.notify_all();
            });
            let Some((_fh, vma)) = r.map_new(1) else {
                return false;
            };
            let served = vma.prefault(0..BLK, Access::Read).is_ok();
            let opened = opener.join().is_ok();
            let loaded = loader.join().ok() == Some(MemFile::initial(0));
            served && opened && loaded && peek(vma.as_ptr()) == MemFile::initial(1)
        },
        "the renewed default RAM's fault failed instead of waiting for the inherited one's load",
    );
}

/// The inherited default RAM's dirty pages fill the shared budget: a load
/// of the renewed one fails, its error counting the pages that hold the
/// budget (the other RAM's), not the pages of the RAM loading (none).
/// (On the signal pass nothing is renewed: nothing to check.)
#[test]
fn a_budget_exhausted_by_the_replaced_default_ram_counts_its_pages() {
    in_child_with_renewed_default(
        (2, 2),
        |r| {
            poke(r.old.as_ptr(), 7);
            poke(r.old.as_ptr().wrapping_add(BLK), 7);
            let Some((_fh, vma)) = r.map_new(2) else {
                return false;
            };
            matches!(
                vma.prefault(0..BLK, Access::Read),
                Err(Error::BudgetExhausted { pinned: 2, .. })
            )
        },
        "the error did not count the two dirty pages of the inherited default RAM",
    );
}

/// A fault that needs no room (a write to a page loaded) leaves the other
/// RAM's pages alone, the shared budget not exceeded. Found in review: any
/// fault of the renewed RAM, the pool full, reclaimed the inherited one's
/// page. (On the signal pass nothing is renewed: nothing to check.)
#[test]
fn a_fault_needing_no_room_leaves_the_replaced_default_rams_pages() {
    in_child_with_renewed_default(
        (1, 2),
        |r| {
            peek(r.old.as_ptr());
            let Some((_fh, vma)) = r.map_new(1) else {
                return false;
            };
            peek(vma.as_ptr());
            let held = r.inherited.stats().resident_bytes;
            poke(vma.as_ptr(), 9);
            held == BLK as u64 && r.inherited.stats().resident_bytes == held
        },
        "a write fault on a loaded page reclaimed the inherited default RAM's page",
    );
}
