//! The threads that only read: the reader (words, runs, reads across
//! blocks, read prefaults, sequential scans of a mapping advised so) and
//! the mapper (replaces the pool's mappings, overlapping at random, asks
//! for reclaim, queries the handle). Both hold the gate shared around each
//! operation and check what they read as anyone may.

use std::time::Duration;

use bigfile_testkit::model::Rng;
use bigfile_virtmem::{Access, Advice};

use super::world::{Op, Reader, World, OWNED_BLOCKS, POOL, TOTAL_BLOCKS};

/// What the reader does, and how often.
#[rustfmt::skip]
const READER_OPS: &[(u64, Op)] = &[
    (50, Op::ReadForeign), (20, Op::ReadRun), (15, Op::ReadSpan), (10, Op::PrefaultRead),
    (5, Op::Scan),
];

/// The reader, until the soak stops.
pub fn reader(w: &World, thread: usize, seed: u64) -> Result<(), String> {
    let mut rng = Rng::spread(seed);
    w.operate(
        (thread, "reader"),
        (READER_OPS, Duration::ZERO),
        &mut rng,
        |rng, op| {
            let blk = rng.below(TOTAL_BLOCKS);
            let wd = rng.below(w.words as u64) as usize;
            match op {
                Op::ReadForeign => {
                    let vma = w.vma_for(rng, blk, 1);
                    w.read_one(Reader::Other, &vma, blk, wd)?;
                }
                Op::ReadRun => {
                    let room = (TOTAL_BLOCKS - blk) as usize * w.words - wd;
                    let n = (1 + rng.below(64) as usize).min(room);
                    let blocks = 1 + ((wd + n - 1) / w.words) as u64;
                    let vma = w.vma_for(rng, blk, blocks);
                    w.read_run(Reader::Other, &vma, (blk, wd, n))?;
                }
                Op::ReadSpan => {
                    let blk = blk.min(TOTAL_BLOCKS - 2);
                    let vma = w.vma_for(rng, blk, 2);
                    w.read_span(Reader::Other, &vma, blk)?;
                }
                Op::PrefaultRead => {
                    let n = 1 + rng.below(4.min(TOTAL_BLOCKS - blk));
                    let vma = w.vma_for(rng, blk, n);
                    let start = (blk - vma.pgoffset()) as usize * w.blksize;
                    vma.prefault(start..start + n as usize * w.blksize, Access::Read)
                        .map_err(|e| format!("prefault of blocks {blk}..{}: {e}", blk + n))?;
                }
                _ => scan(w, rng)?,
            }
            Ok(true)
        },
    )
}

/// A forward scan of a pool mapping, one word per block, advised sequential
/// (drop-behind) for its length, normal again after it half the time.
fn scan(w: &World, rng: &mut Rng) -> Result<(), String> {
    let vma = w.slot(rng.below(POOL as u64) as usize);
    vma.advise(Advice::Sequential);
    w.count(Op::Advise);
    let wd = rng.below(w.words as u64) as usize;
    for blk in vma.pgoffset()..vma.pgoffset() + vma.pglen() {
        w.read_one(Reader::Other, &vma, blk, wd)?;
    }
    if rng.below(2) == 0 {
        vma.advise(Advice::Normal);
        w.count(Op::Advise);
    }
    Ok(())
}

/// What the mapper does, and how often.
const MAPPER_OPS: &[(u64, Op)] = &[(50, Op::Map), (30, Op::Reclaim), (20, Op::Query)];

/// The mapper, until the soak stops: an operation every 200 µs or so.
pub fn mapper(w: &World, thread: usize, seed: u64) -> Result<(), String> {
    let mut rng = Rng::spread(seed);
    w.operate(
        (thread, "mapper"),
        (MAPPER_OPS, Duration::from_micros(200)),
        &mut rng,
        |rng, op| {
            match op {
                Op::Map => remap(w, rng)?,
                Op::Reclaim => {
                    match rng.below(10) {
                        0 => w.ram.reclaim(),
                        _ => w.ram.reclaim_up_to(1 + rng.below(4) as usize),
                    };
                }
                _ => query(w, rng)?,
            }
            Ok(true)
        },
    )
}

/// Replace a pool mapping (the first by another of the whole file, the
/// others by one of a random range), with random advice, and read through it.
fn remap(w: &World, rng: &mut Rng) -> Result<(), String> {
    let slot = rng.below(POOL as u64) as usize;
    let (start, len) = match slot {
        0 => (0, TOTAL_BLOCKS),
        _ => {
            let len = 1 + rng.below(TOTAL_BLOCKS);
            (rng.below(TOTAL_BLOCKS - len + 1), len)
        }
    };
    let advice = match rng.below(3) {
        0 => Advice::Sequential,
        _ => Advice::Normal,
    };
    w.remap(slot, start, len, advice)?;
    let vma = w.slot(slot);
    for _ in 0..2 {
        let blk = start + rng.below(len);
        let wd = rng.below(w.words as u64) as usize;
        w.read_one(Reader::Other, &vma, blk, wd)?;
    }
    Ok(())
}

/// What the handle and a mapping say must make sense: only owned blocks
/// are ever dirty; a mapping's pages are its own.
fn query(w: &World, rng: &mut Rng) -> Result<(), String> {
    let dirty = w.fh.dirty_blocks();
    if let Some(b) = dirty.iter().find(|&&b| b >= OWNED_BLOCKS) {
        return Err(format!("read-only block {b} is dirty ({dirty:?})"));
    }
    if !dirty.windows(2).all(|p| p[0] < p[1]) {
        return Err(format!("dirty blocks not ascending: {dirty:?}"));
    }
    let vma = w.slot(rng.below(POOL as u64) as usize);
    let range = vma.pgoffset()..vma.pgoffset() + vma.pglen();
    if let Some(p) = vma.mapped_pages().iter().find(|p| !range.contains(p)) {
        return Err(format!(
            "a mapping of blocks {range:?} says it maps block {p}"
        ));
    }
    Ok(())
}
