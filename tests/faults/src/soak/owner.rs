//! An owner: writes its blocks (a word, a run, eight bytes across two
//! blocks with one instruction, a write prefault), reads them back exactly
//! as its model says, reads other blocks as anyone may, and invalidates
//! its blocks; each operation through a random mapping of the pool, with
//! the gate held shared.

use std::time::Duration;

use bigfile_testkit::memory::write_u64_one_access;
use bigfile_testkit::model::Rng;
use bigfile_virtmem::{Access, Error};

use super::world::{Op, OwnerModel, Reader, World, BLOCKS_PER_OWNER, TOTAL_BLOCKS};
use crate::words::{self, word, MAX_VERSION};

/// What an owner does, and how often.
#[rustfmt::skip]
const OPS: &[(u64, Op)] = &[
    (30, Op::Write), (5, Op::WriteRun), (3, Op::WriteSpan), (20, Op::Read), (5, Op::ReadRun),
    (4, Op::ReadSpan), (20, Op::ReadForeign), (3, Op::PrefaultWrite), (3, Op::PrefaultRead),
    (7, Op::Invalidate),
];

/// Owner `t` (thread `thread` for the watchdog) until the soak stops.
pub fn owner(w: &World, t: usize, thread: usize, seed: u64) -> Result<(), String> {
    let first = t as u64 * BLOCKS_PER_OWNER;
    let name = format!("owner {t}");
    let mut rng = Rng::spread(seed);
    w.operate(
        (thread, &name),
        (OPS, Duration::ZERO),
        &mut rng,
        |rng, op| {
            let j = rng.below(BLOCKS_PER_OWNER) as usize;
            let wd = rng.below(w.words as u64) as usize;
            let mut m = w.model(t);
            let mut owner = Owner {
                w,
                t,
                first,
                m: &mut m,
                stirred: Vec::new(),
            };
            let done = owner.run(rng, op, j, wd);
            // Stirred before and after: a snapshot taken while it was under
            // way sees it as done since.
            for (blk, dropped) in owner.stirred {
                w.stir(blk);
                if dropped {
                    w.drop_mark(blk);
                }
            }
            done
        },
    )
}

struct Owner<'a> {
    w: &'a World,
    t: usize,
    first: u64,
    m: &'a mut OwnerModel,
    /// Blocks this operation stirred, and whether it invalidated them.
    stirred: Vec<(u64, bool)>,
}

impl Owner<'_> {
    /// Block `blk` is about to change state (and be invalidated, `dropped`).
    fn stir(&mut self, blk: u64, dropped: bool) {
        self.w.stir(blk);
        if dropped {
            self.w.drop_mark(blk);
        }
        self.stirred.push((blk, dropped));
    }

    /// Does `op` on own block `j` (word `wd`); false when a write was
    /// skipped for want of a dirty-page credit.
    fn run(&mut self, rng: &mut Rng, op: Op, j: usize, wd: usize) -> Result<bool, String> {
        let w = self.w;
        let blk = self.first + j as u64;
        match op {
            Op::Write => {
                if !w.dirty_room(self.m, &[blk]) {
                    return Ok(false);
                }
                let v = self.next_version(j, wd)?;
                self.stir(blk, false);
                let vma = w.vma_for(rng, blk, 1);
                words::write_word(&vma, blk - vma.pgoffset(), wd, word(blk, wd, v));
                self.m.mem[j][wd] = v;
            }
            Op::WriteRun => {
                let (n, blocks) = self.run_of(rng, j, wd);
                if !w.dirty_room(self.m, &blocks) {
                    return Ok(false);
                }
                let mut buf = Vec::with_capacity(n * 8);
                let mut writes = Vec::with_capacity(n);
                for i in 0..n {
                    let (jj, ww) = (j + (wd + i) / w.words, (wd + i) % w.words);
                    let v = self.next_version(jj, ww)?;
                    writes.push((jj, ww, v));
                    buf.extend_from_slice(&word(self.first + jj as u64, ww, v).to_ne_bytes());
                }
                for &b in &blocks {
                    self.stir(b, false);
                }
                let vma = w.vma_for(rng, blk, blocks.len() as u64);
                let off = (blk - vma.pgoffset()) as usize * w.blksize + wd * 8;
                vma.write_at(off, &buf)
                    .map_err(|e| format!("write_at: {e}"))?;
                for (jj, ww, v) in writes {
                    self.m.mem[jj][ww] = v;
                }
            }
            Op::WriteSpan => {
                let j = j.min(BLOCKS_PER_OWNER as usize - 2);
                let blk = self.first + j as u64;
                if !w.dirty_room(self.m, &[blk, blk + 1]) {
                    return Ok(false);
                }
                let v = self.next_version(j + 1, 0)?;
                for b in [blk, blk + 1] {
                    self.stir(b, false);
                }
                // The last word of `blk` keeps its value (its high half holds
                // no version), word 0 of the next block gets version `v`.
                let last = w.words - 1;
                let x = (word(blk + 1, 0, v) << 32) | (word(blk, last, 0) >> 32);
                let vma = w.vma_for(rng, blk, 2);
                let addr =
                    vma.as_ptr() as usize + (blk + 1 - vma.pgoffset()) as usize * w.blksize - 4;
                write_u64_one_access(addr, x);
                self.m.mem[j + 1][0] = v;
            }
            Op::Read => {
                let vma = w.vma_for(rng, blk, 1);
                w.read_one(Reader::Owner(self.t, self.m), &vma, blk, wd)?;
            }
            Op::ReadRun => {
                let (n, blocks) = self.run_of(rng, j, wd);
                let vma = w.vma_for(rng, blk, blocks.len() as u64);
                w.read_run(Reader::Owner(self.t, self.m), &vma, (blk, wd, n))?;
            }
            Op::ReadSpan => {
                let j = j.min(BLOCKS_PER_OWNER as usize - 2);
                let blk = self.first + j as u64;
                let vma = w.vma_for(rng, blk, 2);
                w.read_span(Reader::Owner(self.t, self.m), &vma, blk)?;
            }
            Op::ReadForeign => {
                let other = rng.below(TOTAL_BLOCKS);
                let vma = w.vma_for(rng, other, 1);
                w.read_one(Reader::Owner(self.t, self.m), &vma, other, wd)?;
            }
            Op::PrefaultWrite | Op::PrefaultRead => {
                let n = 1 + rng.below(BLOCKS_PER_OWNER - j as u64);
                let blocks: Vec<u64> = (blk..blk + n).collect();
                let access = if op == Op::PrefaultWrite {
                    if !w.dirty_room(self.m, &blocks) {
                        return Ok(false);
                    }
                    for &b in &blocks {
                        self.stir(b, false);
                    }
                    Access::Write
                } else {
                    Access::Read
                };
                let vma = w.vma_for(rng, blk, n);
                let start = (blk - vma.pgoffset()) as usize * w.blksize;
                vma.prefault(start..start + n as usize * w.blksize, access)
                    .map_err(|e| format!("prefault of blocks {blk}..{}: {e}", blk + n))?;
            }
            Op::Invalidate => {
                self.stir(blk, true);
                match w.fh.invalidate_page(blk) {
                    // Nobody else writes the block, and a page not dirty is
                    // not stored: the storage holds what the next load shows.
                    Ok(()) => self.m.mem[j] = w.file.versions(blk),
                    Err(Error::WriteoutInProgress(_)) => w.count(Op::Busy),
                    Err(e) => return Err(format!("invalidate_page({blk}): {e}")),
                }
            }
            other => unreachable!("owners do not {other:?}"),
        }
        Ok(true)
    }

    /// The version to write to word `wd` of own block `j`: newer than what
    /// memory holds (and so than what the storage holds), published first.
    fn next_version(&self, j: usize, wd: usize) -> Result<u32, String> {
        let v = self.m.mem[j][wd] + 1;
        if v > MAX_VERSION {
            return Err(format!("word {wd} of own block {j} ran out of versions"));
        }
        self.w.file.raise_bound(self.first + j as u64, v);
        Ok(v)
    }

    /// A run of words from word `wd` of own block `j`: its length and the
    /// blocks it touches (two when it crosses into the next own block).
    fn run_of(&self, rng: &mut Rng, j: usize, wd: usize) -> (usize, Vec<u64>) {
        let room = (BLOCKS_PER_OWNER as usize - j) * self.w.words - wd;
        let n = (1 + rng.below(64) as usize).min(room);
        let last = j + (wd + n - 1) / self.w.words;
        let blocks = (j..=last).map(|jj| self.first + jj as u64).collect();
        (n, blocks)
    }
}
