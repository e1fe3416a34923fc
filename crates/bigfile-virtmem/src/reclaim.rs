//! Making room within the budget: taking spares, reclaiming least recently
//! used clean pages (in batches, their unmapping deferred), and waiting for
//! other threads' loads when only pinned pages are left. The policies
//! (batched reclaim, drop-behind) are described in ARCHITECTURE.md.

use std::sync::Arc;

use bigfile_ram::RamHandle;

use crate::budget::batch_size;
use crate::callback::in_callback;
use crate::failure::Failure;
use crate::host::HostLease;
use crate::keys::{FileKey, RamPage};
use crate::mapper::{Deferred, Mapper};
use crate::shared::{Guard, Shared};
use crate::state::{State, Unmap};
use crate::streak::Execution;

/// What [`make_room`] found.
pub(crate) enum Room {
    /// There is room for one more page; maybe with a RAM page of the
    /// handle's to reuse once the `Deferred` work is finished.
    Ready(Option<RamPage>),
    /// Other threads' loads hold the budget, and reclaim left work: finish
    /// it, then try again (the next try waits for those loads).
    Retry,
}

/// Reserve room for one more page of handle `fk` within the budget: take a
/// spare or fresh page of the handle if there is one, else reclaim (spares
/// and fresh pages of other handles, then, once no fresh page is being
/// made, LRU pages, their unmapping left to `deferred`). A reclaim
/// takes a batch of the handle's oldest pages, the extra ones kept as
/// spares, except in a mapping advised `sequential`, where drop-behind
/// already hands over the page just left.
///
/// When every resident page is dirty or loading, pages other threads are
/// loading will soon be clean and reclaimable: wait for them rather than
/// fail (unless this thread is itself inside a `loadblk` or `storeblk`: the
/// thread it would wait for may be waiting for that load or writeout);
/// spares other threads are still unmapping are waited for in any case
/// (their reclaimers wait for nothing). Otherwise, with no clean page left,
/// the budget is exhausted. Before waiting for loads whose loader may take
/// the host lock, `host` is released.
///
/// `access` is the faulting access (none for prefault) and `pin_block` the
/// block it holds (`streak.rs`): its page, the pin, is looked up again after
/// every wait, since meanwhile it may have been reclaimed and loaded again
/// as another page.
pub(crate) fn make_room<'a>(
    mut st: Guard<'a>,
    shared: &'a Shared,
    (fk, ramh): (FileKey, &Arc<RamHandle>),
    (sequential, access, pin_block): (bool, Option<&Execution>, Option<(FileKey, u64)>),
    host: &mut HostLease,
    deferred: &mut Deferred,
) -> (Guard<'a>, Result<Room, Failure>) {
    let rc = shared.counters();
    let budget = shared.budget_pages();
    let pin_of = |st: &State| pin_block.and_then(|(fk, blk)| st.find_page(fk, blk));
    if shared.budget_is_shared() && deferred.is_empty() && st.budget().is_full(budget) {
        // Only a load needs room: the other RAMs' pages older than this
        // one's go first, their locks taken with this one given up.
        drop(st);
        make_room_in_pool(shared, false);
        st = shared.lock();
    }
    let mut recycled = st.take_spare(fk, rc);
    let mut reclaimed = false;
    while st.budget().is_full(budget) {
        let pin = pin_of(&st);
        if recycled.is_none() {
            // After a wait, spares of the handle may have become ready.
            recycled = st.take_spare(fk, rc);
            if recycled.is_some() {
                continue;
            }
        }
        if let Some((owner, rp)) = st.drop_spare(rc) {
            deferred.release(owner, rp);
            continue;
        }
        if st.budget().making_fresh().is_some() {
            // A fresh page is being made into the last room (`fresh.rs`):
            // taken, or given back, once made, rather than a page holding
            // a block reclaimed beside it. Its worker waits for nothing.
            if !deferred.is_empty() {
                if let Some(rp) = recycled.take() {
                    deferred.release(ramh.clone(), rp);
                }
                return (st, Ok(Room::Retry));
            }
            st = shared.wait(st);
            continue;
        }
        if let Some(p) = pin.filter(|&p| st.lru().oldest() == Some(p)) {
            // The faulting access still needs it: the next oldest goes.
            st.touch(p);
        }
        let pinned_only = pin.is_some() && st.lru().oldest() == pin;
        let taken = if pinned_only {
            None
        } else {
            st.reclaim_oldest(rc, Unmap::Deferred, deferred.slots())
        };
        match taken {
            Some(d) => {
                reclaimed = true;
                if let Some(a) = access {
                    a.reclaimed(d.fileh, d.blk);
                }
                if let Some(rp) = d.ram_page {
                    if recycled.is_none() && d.fileh == fk {
                        // Reused by the load: saves a hole punch now and
                        // an allocation and zeroing then.
                        recycled = Some(rp);
                    } else {
                        deferred.release(st.ramh(d.fileh).clone(), rp);
                    }
                }
            }
            None if pin.is_some() && !st.budget().is_full(budget.saturating_add(1)) => {
                // Only the page the access holds is left (or dirty pages):
                // its other page goes one over the budget.
                break;
            }
            None => {
                if let Some(rp) = recycled.take() {
                    // Still mapped where it was until `deferred` is finished.
                    deferred.release(ramh.clone(), rp);
                }
                if shared.budget_is_shared() {
                    // Other RAMs' clean pages, taken without this lock:
                    // once what is deferred is done.
                    if !deferred.is_empty() {
                        return (st, Ok(Room::Retry));
                    }
                    drop(st);
                    let progress =
                        make_room_in_pool(shared, true) > 0 || wait_for_loads_in_pool(shared, host);
                    st = shared.lock();
                    if progress {
                        continue;
                    }
                }
                if st.budget().spares_pending() || may_wait_for_loads(&st) {
                    if !deferred.is_empty() {
                        return (st, Ok(Room::Retry));
                    }
                    if host.kept()
                        && may_wait_for_loads(&st)
                        && st.pages().any_loading_needing_host()
                    {
                        drop(st);
                        host.release_if(true);
                        st = shared.lock();
                        continue;
                    }
                    st = shared.wait(st);
                    continue;
                }
                let failure = Failure::Budget {
                    budget: budget.saturating_mul(shared.page_size() as u64),
                    // Of every RAM sharing the budget: what fills it.
                    pinned: st.budget().pooled_resident(),
                };
                return (st, Err(failure));
            }
        }
    }
    if reclaimed && !sequential {
        let pin = pin_of(&st);
        for _ in 1..batch_size(budget) {
            if pin.is_some() && st.lru().oldest() == pin {
                break;
            }
            match st.spare_from_lru(fk, rc, deferred.slots()) {
                Some(rp) => deferred.spare(fk, rp),
                None => break,
            }
        }
    }
    (st, Ok(Room::Ready(recycled)))
}

/// Room in a budget shared with other RAMs (a forked child's default RAMs,
/// `Ram::default_for`) when the pages of them all fill it: up to a batch
/// of clean pages of the other RAM whose least recently used one is the
/// oldest (by their shared LRU clock), if it is older than `shared`'s own
/// (any, with `any`: `shared` has none left to reclaim). So the pages of
/// the RAMs go least recently used first, as those of one RAM do: a RAM
/// loading now takes the room of one left idle. Returns how many went.
///
/// Called holding no lock of bigfile's: the other RAM's is taken alone (a
/// thread holding a RAM's lock waits for nothing but its condition
/// variable, which gives the lock back).
fn make_room_in_pool(shared: &Shared, any: bool) -> usize {
    let budget = shared.budget_pages();
    let full = shared.pooled_resident();
    if full < budget {
        return 0;
    }
    let mine = match shared.oldest_clean() {
        Some(used) if !any => used,
        _ => u64::MAX,
    };
    let Some((_, other)) = shared
        .sharing_budget()
        .into_iter()
        .filter_map(|o| Some((o.oldest_clean()?, o)))
        .filter(|&(used, _)| used < mine)
        .min_by_key(|&(used, _)| used)
    else {
        return 0;
    };
    let n = (full + 1 - budget).min(batch_size(budget));
    let mut st = other.lock();
    let mut freed = 0;
    while freed < n && reclaim_one_sparing_pins(&mut st, &other) {
        freed += 1;
    }
    freed as usize
}

/// With no clean page left in any RAM sharing `shared`'s budget: wait for
/// a load of another of them (its page, once loaded, is clean), as
/// `make_room` waits for its own RAM's (`may_wait_for_loads`), giving the
/// host lock up first if that load's loader may take it. Returns whether
/// it waited (or gave up the host lock). Called holding no lock of
/// bigfile's, like [`make_room_in_pool`].
fn wait_for_loads_in_pool(shared: &Shared, host: &mut HostLease) -> bool {
    for other in shared.sharing_budget() {
        let st = other.lock();
        if !may_wait_for_loads(&st) {
            continue;
        }
        if host.kept() && st.pages().any_loading_needing_host() {
            drop(st);
            host.release_if(true);
        } else {
            drop(other.wait(st));
        }
        return true;
    }
    false
}

/// Whether a thread finding the budget full may wait for loads in progress
/// (a loaded page is clean and can be reclaimed): some page is loading, and
/// the thread is not itself inside a `loadblk` or `storeblk` (of any RAM).
fn may_wait_for_loads(st: &State) -> bool {
    !in_callback() && st.pages().any_loading()
}

/// As [`reclaim_one`], in another RAM sharing the budget, sparing the
/// pages its faults in progress keep (`State::spare_pins`): taken, the
/// access of such a fault would fault on its other page again (and, with
/// few pages in that RAM, take the pool's room back in turn).
fn reclaim_one_sparing_pins(st: &mut State, shared: &Shared) -> bool {
    if st.budget().spares_ready() == 0 && !st.spare_pins() {
        return false;
    }
    reclaim_one(st, shared)
}

/// Give back the memory of one clean page now: a ready spare first, else
/// the least recently used page. Returns false when there is none.
pub(crate) fn reclaim_one(st: &mut State, shared: &Shared) -> bool {
    let mapper = Mapper::of(shared);
    let rc = shared.counters();
    if let Some((ramh, rp)) = st.drop_spare(rc) {
        mapper.release(&ramh, rp);
        return true;
    }
    let mut slots = Vec::new();
    let Some(d) = st.reclaim_oldest(rc, Unmap::Now, &mut slots) else {
        return false;
    };
    mapper.revoke_slots(st, &slots);
    if let Some(rp) = d.ram_page {
        mapper.release(st.ramh(d.fileh), rp);
    }
    true
}
