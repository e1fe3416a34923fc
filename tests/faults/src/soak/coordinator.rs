//! The coordinator: everything that acts on the whole handle. Without the
//! gate, while owners write: STORE|MARKSTORED, STORE alone, the STORE of a
//! two-phase writeout, read-only blocks changed in storage and invalidated,
//! read-only invalidations. With the gate alone (every other thread
//! between two operations), what changes what owners know: the MARKSTORED
//! of a two-phase writeout, discard, owned blocks changed in storage,
//! commits checked against the model (some with a planned `storeblk`
//! failure), prefaults of a broken block, a write of its own, and the
//! budget phases.

use std::collections::BTreeSet;
use std::sync::MutexGuard;
use std::thread;
use std::time::{Duration, Instant};

use bigfile_testkit::model::Rng;
use bigfile_testkit::Call;
use bigfile_virtmem::{Access, Error, LoadError, WriteoutFlags};

use super::world::{
    Op, OwnerModel, Reader, World, OWNED_BLOCKS, OWNERS, POOL, READONLY_BLOCKS, TOTAL_BLOCKS,
};
use crate::words::{self, decode, MAX_VERSION};

/// What the coordinator does, and how often (idle: nothing this time).
#[rustfmt::skip]
const OPS: &[(u64, Op)] = &[
    (20, Op::Commit), (8, Op::Store), (10, Op::StoreThenMark), (4, Op::Discard),
    (15, Op::ChangeReadOnly), (5, Op::ChangeOwned), (10, Op::InvalidateReadOnly),
    (6, Op::CheckedCommit), (3, Op::BrokenLoad), (4, Op::SoloWrite), (15, Op::Idle),
];

/// The budgets the phases choose from, in pages.
const BUDGETS: &[u64] = &[1, 2, 3, 4, 6, 8, 12, 16];
/// Chances of a load and of a store failing, per thousand calls.
const LOAD_FAILURES: u32 = 10;
const STORE_FAILURES: u32 = 20;

type Models<'a> = [MutexGuard<'a, OwnerModel>];

/// Runs `f` with the gate alone and every owner's model; checks the RAM
/// after it, everyone being between operations: resident pages within the
/// budget and equal to the RAM pages allocated.
fn gated<T>(w: &World, f: impl FnOnce(&mut Models) -> Result<T, String>) -> Result<T, String> {
    let _gate = w.gate.write().unwrap_or_else(|p| p.into_inner());
    let mut models: Vec<_> = (0..OWNERS).map(|t| w.model(t)).collect();
    let r = f(&mut models)?;
    w.check_resident()?;
    let resident = w.ram.stats().stats.resident_pages;
    let allocated = w.ram.pages().stats().pages_allocated;
    if resident != allocated {
        return Err(format!(
            "{resident} pages counted resident, {allocated} RAM pages allocated"
        ));
    }
    Ok(r)
}

/// The first phase, before the threads start.
pub fn begin(w: &World, rng: &mut Rng) -> Result<(), String> {
    gated(w, |models| new_phase(w, rng, models))
}

/// The coordinator (thread `thread`), until the soak stops: an operation
/// every millisecond or two, a new budget phase every `phase`.
pub fn coordinator(w: &World, thread: usize, seed: u64, phase: Duration) -> Result<(), String> {
    let mut rng = Rng::spread(seed);
    let mut next_phase = Instant::now() + phase;
    while !w.stopped() {
        thread::sleep(Duration::from_micros(500 + rng.below(1500)));
        // The file's log of calls is only read by checked commits.
        w.file.mem.take_calls();
        let op = if Instant::now() >= next_phase {
            next_phase = Instant::now() + phase;
            Op::Phase
        } else {
            match Op::pick(&mut rng, OPS) {
                Op::Idle => continue,
                op => op,
            }
        };
        w.doing(thread, op);
        match op {
            Op::Commit => writeout(w, WriteoutFlags::STORE | WriteoutFlags::MARKSTORED),
            Op::Store => writeout(w, WriteoutFlags::STORE),
            Op::StoreThenMark => store_then_mark(w, &mut rng),
            Op::Discard => gated(w, |models| discard(w, models)),
            Op::ChangeReadOnly => change_readonly(w, &mut rng),
            Op::ChangeOwned => gated(w, |models| change_owned(w, &mut rng, models)),
            Op::InvalidateReadOnly => {
                let blk = OWNED_BLOCKS + rng.below(READONLY_BLOCKS);
                invalidate(w, blk)
            }
            Op::CheckedCommit => gated(w, |models| checked_commit(w, &mut rng, models)),
            Op::BrokenLoad => gated(w, |_| broken_load(w, &mut rng)),
            Op::SoloWrite => gated(w, |models| solo_write(w, &mut rng, models)),
            _ => gated(w, |models| new_phase(w, &mut rng, models)),
        }
        .map_err(|e| format!("coordinator, {}: {e}", op.name()))?;
        w.count(op);
        w.check_resident()?;
        w.doing(thread, Op::Idle);
    }
    Ok(())
}

/// The end, with every thread gone: memory is the model, and a commit
/// makes the storage the model too.
pub fn finish(w: &World, rng: &mut Rng) -> Result<(), String> {
    w.file.set_failures(0, 0, 0);
    gated(w, |models| {
        for blk in 0..TOTAL_BLOCKS {
            let got = read_block(w, blk)?;
            if got != expected(w, models, blk) {
                return Err(format!(
                    "at the end, block {blk} in memory differs from the model"
                ));
            }
        }
        checked_commit(w, rng, models)
    })
}

/// What block `blk` must hold, with every owner at the gate.
pub fn expected(w: &World, models: &Models, blk: u64) -> Vec<u32> {
    match World::owner_of(blk) {
        Some((t, j)) => models[t].mem[j].clone(),
        None => vec![w.generation(blk).0; w.words],
    }
}

/// The versions of block `blk`'s words in memory, read whole.
fn read_block(w: &World, blk: u64) -> Result<Vec<u32>, String> {
    let vma = w.slot(0);
    let mut buf = vec![0u8; w.blksize];
    vma.read_at(blk as usize * w.blksize, &mut buf)
        .map_err(|e| format!("read_at of block {blk}: {e}"))?;
    Ok(words::versions(blk, &buf))
}

/// A writeout while owners write: a failed `storeblk` leaves pages dirty
/// (checked when they are read and committed later).
fn writeout(w: &World, flags: WriteoutFlags) -> Result<(), String> {
    match w.fh.dirty_writeout(flags) {
        Ok(()) => Ok(()),
        Err(Error::Store { .. }) => {
            w.count(Op::StoreFailed);
            Ok(())
        }
        Err(e) => Err(format!("dirty_writeout({flags:?}): {e}")),
    }
}

/// A two-phase writeout: STORE while owners write, then, with the gate,
/// MARKSTORED apart. The documented contract, checked block by block:
/// a page the STORE stored and nobody wrote since is clean and stored
/// exactly; a page written since the STORE stored it stays dirty; a page
/// made dirty after the STORE took its pages (clean then, or invalidated
/// since) is marked clean on the caller's word, its content never stored,
/// so it shows the storage again
/// after its next reclaim: the soak makes that happen at once (invalidates
/// it) and the owner's model takes the storage's content.
fn store_then_mark(w: &World, rng: &mut Rng) -> Result<(), String> {
    // Counters first: what happens to a block after them, before the dirty
    // list is taken, counts as done since.
    let stir0: Vec<u64> = (0..OWNED_BLOCKS).map(|b| w.stirred(b)).collect();
    let drop0: Vec<u64> = (0..OWNED_BLOCKS).map(|b| w.dropped(b)).collect();
    let d0: BTreeSet<u64> = w.fh.dirty_blocks().into_iter().collect();
    match w.fh.dirty_writeout(WriteoutFlags::STORE) {
        Ok(()) => {}
        // A two-phase commit whose first phase failed is aborted instead.
        Err(Error::Store { .. }) => {
            w.count(Op::StoreFailed);
            return Ok(());
        }
        Err(e) => return Err(format!("STORE: {e}")),
    }
    thread::sleep(Duration::from_micros(rng.below(2000)));
    gated(w, |models| {
        let before: BTreeSet<u64> = w.fh.dirty_blocks().into_iter().collect();
        w.fh.dirty_writeout(WriteoutFlags::MARKSTORED)
            .map_err(|e| format!("MARKSTORED: {e}"))?;
        let after: BTreeSet<u64> = w.fh.dirty_blocks().into_iter().collect();
        for blk in 0..OWNED_BLOCKS {
            let (t, j) = World::owner_of(blk).unwrap();
            let touched = w.stirred(blk) != stir0[blk as usize];
            let dropped = w.dropped(blk) != drop0[blk as usize];
            let file = w.file.versions(blk);
            let model = &models[t].mem[j];
            let dirty = (
                d0.contains(&blk),
                before.contains(&blk),
                after.contains(&blk),
            );
            match dirty {
                (_, false, true) => {
                    return Err(format!("block {blk} became dirty in MARKSTORED"));
                }
                (_, true, true) if !touched => {
                    return Err(format!(
                        "block {blk} stays dirty after MARKSTORED, not written since the STORE"
                    ));
                }
                (_, true, true) => {}
                (true, was_dirty, _) if !touched => {
                    if !was_dirty {
                        return Err(format!(
                            "block {blk} became clean between STORE and MARKSTORED untouched"
                        ));
                    }
                    if *model != file {
                        return Err(format!(
                            "block {blk}, stored by the STORE and not written since, differs from the storage"
                        ));
                    }
                }
                _ if *model == file => {}
                (_, false, _) => {
                    return Err(format!(
                        "block {blk} is clean, but memory (the model) differs from the storage"
                    ));
                }
                (true, true, false) if !dropped => {
                    return Err(format!(
                        "block {blk}, dirty before the STORE and written since, was marked clean by MARKSTORED"
                    ));
                }
                (_, true, false) => {
                    let mem = read_block(w, blk)?;
                    if mem != *model && mem != file {
                        return Err(format!(
                            "block {blk}, marked clean unstored, shows neither its content nor the storage's"
                        ));
                    }
                    w.fh.invalidate_page(blk)
                        .map_err(|e| format!("invalidate_page({blk}): {e}"))?;
                    models[t].mem[j] = file;
                    w.count(Op::LostByMarkStored);
                }
            }
        }
        Ok(())
    })
}

/// Discard every change: owners' blocks hold the storage's content again.
fn discard(w: &World, models: &mut Models) -> Result<(), String> {
    w.fh.dirty_discard()
        .map_err(|e| format!("dirty_discard: {e}"))?;
    if !w.fh.dirty_blocks().is_empty() {
        return Err(format!("dirty after a discard: {:?}", w.fh.dirty_blocks()));
    }
    for blk in 0..OWNED_BLOCKS {
        let (t, j) = World::owner_of(blk).unwrap();
        models[t].mem[j] = w.file.versions(blk);
    }
    w.reset_credits(models);
    Ok(())
}

/// Another writer changes an owned block in storage; the handle forgets its
/// page (and the owner's changes to it).
fn change_owned(w: &World, rng: &mut Rng, models: &mut Models) -> Result<(), String> {
    let blk = rng.below(OWNED_BLOCKS);
    let (t, j) = World::owner_of(blk).unwrap();
    let v = w.file.bound(blk) + 1;
    if v > MAX_VERSION {
        return Err(format!("block {blk} ran out of versions"));
    }
    w.file.raise_bound(blk, v);
    w.file.put(blk, v);
    w.fh.invalidate_page(blk)
        .map_err(|e| format!("invalidate_page({blk}): {e}"))?;
    models[t].mem[j] = vec![v; w.words];
    let vma = w.vma_for(rng, blk, 1);
    let wd = rng.below(w.words as u64) as usize;
    w.read_one(Reader::Owner(t, &models[t]), &vma, blk, wd)
}

/// Another writer changes a read-only block in storage while everyone
/// reads it: until `invalidate_page`, a mapping shows the old generation,
/// or the new one once the page was reclaimed and loaded again (read
/// here after a reclaim, to see it happen); after it, the new one.
fn change_readonly(w: &World, rng: &mut Rng) -> Result<(), String> {
    let blk = OWNED_BLOCKS + rng.below(READONLY_BLOCKS);
    let (lo, hi) = w.generation(blk);
    let gen = hi + 1;
    if lo != hi || gen > MAX_VERSION {
        return Err(format!("block {blk}: generations {lo}..={hi}"));
    }
    w.raise_hi(blk, gen);
    w.file.put(blk, gen);
    let wd = rng.below(w.words as u64) as usize;
    if rng.below(2) == 0 {
        w.ram.reclaim();
        let vma = w.vma_for(rng, blk, 1);
        let v = words::read_word(&vma, blk - vma.pgoffset(), wd);
        match decode(v) {
            Some((b, ww, g)) if b == blk && ww == wd && (lo..=gen).contains(&g) => {
                if g == gen {
                    w.count(Op::NewContentSeen);
                }
            }
            _ => {
                return Err(format!(
                "block {blk} word {wd} reads {v:#x} after its storage changed to generation {gen}"
            ))
            }
        }
    }
    invalidate(w, blk)?;
    w.raise_lo(blk, gen);
    let vma = w.vma_for(rng, blk, 1);
    w.read_one(Reader::Other, &vma, blk, wd)
}

/// `invalidate_page` of a read-only block: never refused (the coordinator
/// is the only one to write out).
fn invalidate(w: &World, blk: u64) -> Result<(), String> {
    w.fh.invalidate_page(blk)
        .map_err(|e| format!("invalidate_page({blk}): {e}"))
}

/// A commit with every owner at the gate, sometimes with a `storeblk`
/// failing on purpose first, then checked: nothing dirty, the storage and
/// memory equal to the model, stores in ascending block order.
fn checked_commit(w: &World, rng: &mut Rng, models: &mut Models) -> Result<(), String> {
    let dirty = w.fh.dirty_blocks();
    if !dirty.is_empty() && rng.below(2) == 0 {
        planned_store_failure(w, rng, models, &dirty)?;
        w.count(Op::PlannedStoreFailure);
    }
    commit(w, models)?;
    for blk in 0..TOTAL_BLOCKS {
        let want = expected(w, models, blk);
        if w.file.versions(blk) != want {
            return Err(format!(
                "after a commit, block {blk} in storage differs from the model"
            ));
        }
        let vma = w.vma_for(rng, blk, 1);
        let wd = rng.below(w.words as u64) as usize;
        match World::owner_of(blk) {
            Some((t, _)) => w.read_one(Reader::Owner(t, &models[t]), &vma, blk, wd)?,
            None => w.read_one(Reader::Other, &vma, blk, wd)?,
        }
    }
    Ok(())
}

/// STORE|MARKSTORED until it succeeds (stores fail at random); then nothing
/// is dirty and every credit is free.
fn commit(w: &World, models: &mut Models) -> Result<(), String> {
    for _ in 0..100 {
        w.file.mem.take_calls();
        let res =
            w.fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED);
        stores_ascend(w)?;
        match res {
            Ok(()) => {
                if !w.fh.dirty_blocks().is_empty() {
                    return Err(format!("dirty after a commit: {:?}", w.fh.dirty_blocks()));
                }
                w.reset_credits(models);
                return Ok(());
            }
            Err(Error::Store { .. }) => w.count(Op::StoreFailed),
            Err(e) => return Err(format!("commit: {e}")),
        }
    }
    Err("100 commits in a row failed".into())
}

/// The file's `storeblk` calls since the log was last taken went in
/// ascending block order.
fn stores_ascend(w: &World) -> Result<(), String> {
    let stores: Vec<u64> = w
        .file
        .mem
        .take_calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Store(b) => Some(b),
            Call::Load(_) => None,
        })
        .collect();
    match stores.windows(2).all(|p| p[0] < p[1]) {
        true => Ok(()),
        false => Err(format!("storeblk calls not in ascending order: {stores:?}")),
    }
}

/// A writeout (STORE, or STORE|MARKSTORED) whose `storeblk` fails at a
/// chosen dirty block: the error names it; every page stays dirty; blocks
/// before it are stored, it and those after it not.
fn planned_store_failure(
    w: &World,
    rng: &mut Rng,
    models: &Models,
    dirty: &[u64],
) -> Result<(), String> {
    let before: Vec<Vec<u32>> = dirty.iter().map(|&b| w.file.versions(b)).collect();
    let k = rng.below(dirty.len() as u64) as usize;
    let flags = match rng.below(2) {
        0 => WriteoutFlags::STORE,
        _ => WriteoutFlags::STORE | WriteoutFlags::MARKSTORED,
    };
    w.file.mem.take_calls();
    w.file.fail_store_after(Some(k as u64));
    let res = w.fh.dirty_writeout(flags);
    w.file.fail_store_after(None);
    stores_ascend(w)?;
    match res {
        Err(Error::Store { blk, .. }) if blk == dirty[k] => {}
        other => {
            return Err(format!(
                "{flags:?} with storeblk of block {} failing returned {other:?}",
                dirty[k]
            ))
        }
    }
    let now = w.fh.dirty_blocks();
    if now != dirty {
        return Err(format!(
            "{flags:?} failed at block {}: dirty blocks were {dirty:?}, are {now:?}",
            dirty[k]
        ));
    }
    for (i, &blk) in dirty.iter().enumerate() {
        let want = match i < k {
            true => expected(w, models, blk),
            false => before[i].clone(),
        };
        if w.file.versions(blk) != want {
            return Err(format!(
                "{flags:?} failed at block {}: block {blk} in storage is not as it should be",
                dirty[k]
            ));
        }
    }
    Ok(())
}

/// Every load of a read-only block fails: two threads (the twins) prefault
/// it at once and both get the load error (as the loader, or as a thread
/// that waited for the other's load); mended, it loads again.
fn broken_load(w: &World, rng: &mut Rng) -> Result<(), String> {
    let blk = OWNED_BLOCKS + rng.below(READONLY_BLOCKS);
    invalidate(w, blk)?;
    w.file.break_block(Some(blk));
    let job = |rng: &mut Rng| {
        let v = w.slot(rng.below(POOL as u64) as usize);
        let v = match v.pgoffset() <= blk && blk < v.pgoffset() + v.pglen() {
            true => v,
            false => w.slot(0),
        };
        let start = (blk - v.pgoffset()) as usize * w.blksize;
        (v, start..start + w.blksize)
    };
    let results = w.twins.prefault(job(rng), job(rng));
    w.file.break_block(None);
    for r in results {
        match r {
            Err(e @ Error::Load { blk: b, .. })
                if b == blk && e.to_string().contains("is broken") =>
            {
                if let Error::Load {
                    source: LoadError::Waited(_),
                    ..
                } = e
                {
                    w.count(Op::WaitedForBroken);
                }
            }
            other => return Err(format!("prefault of broken block {blk} returned {other:?}")),
        }
    }
    let vma = w.slot(0);
    let start = blk as usize * w.blksize;
    vma.prefault(start..start + w.blksize, Access::Read)
        .map_err(|e| format!("prefault of mended block {blk}: {e}"))?;
    w.read_one(Reader::Other, &vma, blk, rng.below(w.words as u64) as usize)
}

/// A write of the coordinator's own to an owned block, committed at once:
/// with a budget of one page, the only writes there are.
fn solo_write(w: &World, rng: &mut Rng, models: &mut Models) -> Result<(), String> {
    let blk = rng.below(OWNED_BLOCKS);
    let (t, j) = World::owner_of(blk).unwrap();
    let wd = rng.below(w.words as u64) as usize;
    let v = models[t].mem[j][wd] + 1;
    if v > MAX_VERSION {
        return Err(format!("block {blk} ran out of versions"));
    }
    w.file.raise_bound(blk, v);
    let vma = w.vma_for(rng, blk, 1);
    words::write_word(&vma, blk - vma.pgoffset(), wd, words::word(blk, wd, v));
    models[t].mem[j][wd] = v;
    checked_commit(w, rng, models)
}

/// A new budget phase: everything committed, a budget other than the last,
/// clean pages reclaimed (nothing may be left), the load policy's attempts
/// and the failures chosen again.
fn new_phase(w: &World, rng: &mut Rng, models: &mut Models) -> Result<(), String> {
    commit(w, models)?;
    let old = w.budget_pages();
    let pages = loop {
        let b = BUDGETS[rng.below(BUDGETS.len() as u64) as usize];
        if b != old {
            break b;
        }
    };
    w.set_budget(pages, models);
    w.ram.reclaim();
    let (resident, allocated) = (
        w.ram.stats().stats.resident_pages,
        w.ram.pages().stats().pages_allocated,
    );
    if resident != 0 || allocated != 0 {
        return Err(format!(
            "all clean and reclaimed, yet {resident} pages resident, {allocated} allocated"
        ));
    }
    let attempts = 2 + rng.below(3) as u32;
    w.set_attempts(attempts);
    w.file
        .set_failures(LOAD_FAILURES, STORE_FAILURES, attempts - 1);
    Ok(())
}
