//! What the soak's threads share: the handle and its pool of mappings, the
//! gate, the owners' models, the credits that keep dirty pages within the
//! budget, the read-only blocks' generations, counters, and the checks
//! every thread makes.
//!
//! The file's blocks: owner `t` has `BLOCKS_PER_OWNER` consecutive blocks
//! from `t * BLOCKS_PER_OWNER`, the only thread to write them (the
//! coordinator does too, with every owner stopped at the gate); the
//! read-only blocks after them are written by nobody, but the coordinator
//! changes them in the storage behind the handle's back.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bigfile_testkit::memory::read_u64_one_access;
use bigfile_testkit::model::Rng;
use bigfile_virtmem::{Advice, FileH, LoadPolicy, PageState, Ram, Vma};

use super::file::SoakFile;
use super::twins::Twins;
use crate::words::{self, decode, word};

pub const OWNERS: usize = 3;
pub const BLOCKS_PER_OWNER: u64 = 4;
pub const READONLY_BLOCKS: u64 = 10;
pub const OWNED_BLOCKS: u64 = OWNERS as u64 * BLOCKS_PER_OWNER;
pub const TOTAL_BLOCKS: u64 = OWNED_BLOCKS + READONLY_BLOCKS;
/// Mappings in the pool; the first always maps the whole file.
pub const POOL: usize = 6;

/// What the threads do, counted for the summary and named by the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Idle,
    Write,
    WriteRun,
    WriteSpan,
    WriteSkipped,
    Read,
    ReadRun,
    ReadSpan,
    ReadForeign,
    Scan,
    PrefaultRead,
    PrefaultWrite,
    Invalidate,
    Busy,
    Map,
    Advise,
    Reclaim,
    Query,
    Commit,
    Store,
    StoreThenMark,
    LostByMarkStored,
    StoreFailed,
    Discard,
    ChangeReadOnly,
    NewContentSeen,
    ChangeOwned,
    InvalidateReadOnly,
    CheckedCommit,
    PlannedStoreFailure,
    BrokenLoad,
    WaitedForBroken,
    SoloWrite,
    Phase,
}

impl Op {
    pub const ALL: [Op; 34] = [
        Op::Idle,
        Op::Write,
        Op::WriteRun,
        Op::WriteSpan,
        Op::WriteSkipped,
        Op::Read,
        Op::ReadRun,
        Op::ReadSpan,
        Op::ReadForeign,
        Op::Scan,
        Op::PrefaultRead,
        Op::PrefaultWrite,
        Op::Invalidate,
        Op::Busy,
        Op::Map,
        Op::Advise,
        Op::Reclaim,
        Op::Query,
        Op::Commit,
        Op::Store,
        Op::StoreThenMark,
        Op::LostByMarkStored,
        Op::StoreFailed,
        Op::Discard,
        Op::ChangeReadOnly,
        Op::NewContentSeen,
        Op::ChangeOwned,
        Op::InvalidateReadOnly,
        Op::CheckedCommit,
        Op::PlannedStoreFailure,
        Op::BrokenLoad,
        Op::WaitedForBroken,
        Op::SoloWrite,
        Op::Phase,
    ];

    /// As the summary prints it.
    pub fn name(self) -> &'static str {
        match self {
            Op::Idle => "idle",
            Op::Write => "writes",
            Op::WriteRun => "write runs",
            Op::WriteSpan => "writes across blocks",
            Op::WriteSkipped => "writes skipped (dirty pages at budget - 1)",
            Op::Read => "own reads",
            Op::ReadRun => "read runs",
            Op::ReadSpan => "reads across blocks",
            Op::ReadForeign => "foreign reads",
            Op::Scan => "sequential scans",
            Op::PrefaultRead => "read prefaults",
            Op::PrefaultWrite => "write prefaults",
            Op::Invalidate => "own invalidations",
            Op::Busy => "refused during writeout",
            Op::Map => "mappings replaced",
            Op::Advise => "advice given",
            Op::Reclaim => "reclaims asked",
            Op::Query => "queries",
            Op::Commit => "STORE|MARKSTORED",
            Op::Store => "STORE alone",
            Op::StoreThenMark => "STORE then MARKSTORED",
            Op::LostByMarkStored => "writes MARKSTORED marked clean unstored",
            Op::StoreFailed => "writeouts failed",
            Op::Discard => "discards",
            Op::ChangeReadOnly => "read-only blocks changed in storage",
            Op::NewContentSeen => "new content seen after reclaim",
            Op::ChangeOwned => "owned blocks changed in storage",
            Op::InvalidateReadOnly => "read-only invalidations",
            Op::CheckedCommit => "checked commits",
            Op::PlannedStoreFailure => "planned storeblk failures",
            Op::BrokenLoad => "broken-block prefaults",
            Op::WaitedForBroken => "waiters given the broken load's error",
            Op::SoloWrite => "solo writes",
            Op::Phase => "budget phases",
        }
    }

    fn index(self) -> usize {
        Op::ALL.iter().position(|&o| o == self).unwrap()
    }

    /// One of `table`'s operations, each as likely as its weight.
    pub fn pick(rng: &mut Rng, table: &[(u64, Op)]) -> Op {
        let mut n = rng.below(table.iter().map(|&(weight, _)| weight).sum());
        for &(weight, op) in table {
            if n < weight {
                return op;
            }
            n -= weight;
        }
        unreachable!("a pick below the total weight")
    }
}

/// An owner's knowledge of its blocks.
pub struct OwnerModel {
    /// Per block, per word: the version memory holds.
    pub mem: Vec<Vec<u32>>,
    /// Blocks that hold a dirty-page credit (they may be dirty).
    pub held: BTreeSet<u64>,
}

pub struct World {
    pub blksize: usize,
    pub words: usize,
    pub file: SoakFile,
    pub ram: Ram,
    pub fh: FileH,
    /// Two threads to prefault at once.
    pub twins: Twins,
    pool: RwLock<Vec<Arc<Vma>>>,
    /// Owners hold it shared around each operation, the reader and the
    /// mapper too; the coordinator takes it alone to change what owners
    /// know (discard, a MARKSTORED apart, storage changed behind owned
    /// blocks, budgets).
    pub gate: RwLock<()>,
    pub models: Vec<Mutex<OwnerModel>>,
    /// Per owned block: bumped before and after anything its owner does
    /// that may change the page's state (a write, a write prefault,
    /// invalidation), and of these invalidations alone.
    stirs: Vec<AtomicU64>,
    drops: Vec<AtomicU64>,
    /// Per read-only block: the generation in storage that every mapping
    /// shows at least (`lo`, raised once the page is invalidated) and at
    /// most (`hi`, raised before the storage changes).
    lo: Vec<AtomicU32>,
    hi: Vec<AtomicU32>,
    budget_pages: AtomicU64,
    /// Dirty-page credits free: a budget's worth minus one, so a load
    /// always finds a page that is not dirty.
    credits: AtomicI64,
    stop: AtomicBool,
    counts: Vec<AtomicU64>,
    /// What each thread is doing, for the watchdog.
    doing: Vec<AtomicUsize>,
    ranges: Mutex<BTreeSet<(usize, usize)>>,
    max_resident: AtomicU64,
    budgets: Mutex<BTreeSet<u64>>,
}

/// Who reads, and so what a read may be checked against.
#[derive(Clone, Copy)]
pub enum Reader<'a> {
    /// Owner `t`, with its model: its own blocks exactly.
    Owner(usize, &'a OwnerModel),
    Other,
}

impl World {
    pub fn new(blksize: usize, seed: u64, threads: usize) -> Result<World, String> {
        let file = SoakFile::new(blksize, OWNED_BLOCKS, seed);
        let ram = Ram::from_spec(&format!("memfd,pagesize={blksize}"))
            .map_err(|e| format!("RAM of {blksize}-byte pages: {e}"))?;
        let fh = FileH::open(file.mem.clone(), Some(&ram)).map_err(|e| e.to_string())?;
        let words = blksize / 8;
        let w = World {
            blksize,
            words,
            file,
            ram,
            fh,
            twins: Twins::new(),
            pool: RwLock::new(Vec::new()),
            gate: RwLock::new(()),
            models: (0..OWNERS)
                .map(|_| {
                    Mutex::new(OwnerModel {
                        mem: vec![vec![0; words]; BLOCKS_PER_OWNER as usize],
                        held: BTreeSet::new(),
                    })
                })
                .collect(),
            stirs: (0..OWNED_BLOCKS).map(|_| AtomicU64::new(0)).collect(),
            drops: (0..OWNED_BLOCKS).map(|_| AtomicU64::new(0)).collect(),
            lo: (0..READONLY_BLOCKS).map(|_| AtomicU32::new(0)).collect(),
            hi: (0..READONLY_BLOCKS).map(|_| AtomicU32::new(0)).collect(),
            budget_pages: AtomicU64::new(0),
            credits: AtomicI64::new(0),
            stop: AtomicBool::new(false),
            counts: Op::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            doing: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
            ranges: Mutex::new(BTreeSet::new()),
            max_resident: AtomicU64::new(0),
            budgets: Mutex::new(BTreeSet::new()),
        };
        let full = w.mmap(0, TOTAL_BLOCKS)?;
        let mut pool = vec![full.clone()];
        for _ in 1..POOL {
            pool.push(full.clone());
        }
        *w.pool.write().unwrap() = pool;
        Ok(w)
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }

    /// Stop every thread (the first error, or time is up).
    pub fn halt(&self) {
        self.stop.store(true, SeqCst);
    }

    pub fn count(&self, op: Op) {
        self.counts[op.index()].fetch_add(1, SeqCst);
    }

    pub fn counted(&self, op: Op) -> u64 {
        self.counts[op.index()].load(SeqCst)
    }

    /// Everything done so far, for the watchdog.
    pub fn progress(&self) -> u64 {
        self.counts.iter().map(|c| c.load(SeqCst)).sum()
    }

    /// Thread `thread` is now doing `op`.
    pub fn doing(&self, thread: usize, op: Op) {
        self.doing[thread].store(op.index(), SeqCst);
    }

    /// What each thread is doing.
    pub fn doings(&self) -> Vec<Op> {
        self.doing.iter().map(|d| Op::ALL[d.load(SeqCst)]).collect()
    }

    /// Operations of thread `thread` (`name` in errors) until the soak
    /// stops: each picked from `table`, done by `run` with the gate held
    /// shared (false: a write skipped), counted, and followed by the check
    /// of the resident pages; `pause` before each.
    pub fn operate(
        &self,
        (thread, name): (usize, &str),
        (table, pause): (&[(u64, Op)], Duration),
        rng: &mut Rng,
        mut run: impl FnMut(&mut Rng, Op) -> Result<bool, String>,
    ) -> Result<(), String> {
        while !self.stopped() {
            std::thread::sleep(pause);
            let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
            let op = Op::pick(rng, table);
            self.doing(thread, op);
            let done = run(rng, op).map_err(|e| format!("{name}, {}: {e}", op.name()))?;
            self.count(if done { op } else { Op::WriteSkipped });
            self.check_resident()?;
            self.doing(thread, Op::Idle);
        }
        Ok(())
    }

    pub fn model(&self, t: usize) -> MutexGuard<'_, OwnerModel> {
        self.models[t].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The owner of block `blk` and its index among the owner's blocks.
    pub fn owner_of(blk: u64) -> Option<(usize, usize)> {
        (blk < OWNED_BLOCKS).then_some((
            (blk / BLOCKS_PER_OWNER) as usize,
            (blk % BLOCKS_PER_OWNER) as usize,
        ))
    }

    /// Owned block `blk`'s owner is about to do something that may
    /// change its page's state.
    pub fn stir(&self, blk: u64) {
        self.stirs[blk as usize].fetch_add(1, SeqCst);
    }

    /// How many times owned block `blk` was stirred.
    pub fn stirred(&self, blk: u64) -> u64 {
        self.stirs[blk as usize].load(SeqCst)
    }

    /// Owned block `blk`'s owner is about to invalidate it, or has.
    pub fn drop_mark(&self, blk: u64) {
        self.drops[blk as usize].fetch_add(1, SeqCst);
    }

    /// How many times owned block `blk` was marked dropped.
    pub fn dropped(&self, blk: u64) -> u64 {
        self.drops[blk as usize].load(SeqCst)
    }

    // Mappings.

    /// A new mapping of `len` blocks from `start`, its range recorded for
    /// the leak check.
    pub fn mmap(&self, start: u64, len: u64) -> Result<Arc<Vma>, String> {
        let vma = self
            .fh
            .mmap(start, len)
            .map_err(|e| format!("mmap({start}, {len}): {e}"))?;
        let r = vma.addr_range();
        self.ranges.lock().unwrap().insert((r.start, r.end));
        Ok(Arc::new(vma))
    }

    /// A mapping of the pool that covers blocks `first..first + n`: a
    /// random one if it does, else the first (the whole file).
    pub fn vma_for(&self, rng: &mut Rng, first: u64, n: u64) -> Arc<Vma> {
        let pool = self.pool.read().unwrap();
        for _ in 0..3 {
            let v = &pool[rng.below(POOL as u64) as usize];
            if v.pgoffset() <= first && first + n <= v.pgoffset() + v.pglen() {
                return v.clone();
            }
        }
        pool[0].clone()
    }

    /// Pool mapping `slot`.
    pub fn slot(&self, slot: usize) -> Arc<Vma> {
        self.pool.read().unwrap()[slot].clone()
    }

    /// Replace pool mapping `slot` by a mapping of `len` blocks from
    /// `start` advised `advice`; the old one is unmapped when its last user
    /// lets go of it (maybe now).
    pub fn remap(&self, slot: usize, start: u64, len: u64, advice: Advice) -> Result<(), String> {
        let vma = self.mmap(start, len)?;
        vma.advise(advice);
        // Checked before others may advise it.
        if vma.advice() != advice {
            return Err(format!(
                "advised {advice:?}, the mapping says {:?}",
                vma.advice()
            ));
        }
        let old = std::mem::replace(&mut self.pool.write().unwrap()[slot], vma);
        drop(old);
        Ok(())
    }

    /// Drop every mapping of the pool; the ranges they had.
    pub fn unmap_all(&self) -> Vec<Range<usize>> {
        self.pool.write().unwrap().clear();
        self.ranges
            .lock()
            .unwrap()
            .iter()
            .map(|&(a, b)| a..b)
            .collect()
    }

    // The budget and the credits.

    pub fn budget_pages(&self) -> u64 {
        self.budget_pages.load(SeqCst)
    }

    /// A budget of `pages` (with everything clean and every owner at the
    /// gate): credits for `pages - 1` dirty pages, none held.
    pub fn set_budget(&self, pages: u64, models: &mut [MutexGuard<'_, OwnerModel>]) {
        self.ram.set_budget(pages * self.blksize as u64);
        self.budget_pages.store(pages, SeqCst);
        self.budgets.lock().unwrap().insert(pages);
        self.reset_credits(models);
    }

    /// Every page is clean (with every owner at the gate): all credits free.
    pub fn reset_credits(&self, models: &mut [MutexGuard<'_, OwnerModel>]) {
        for m in models.iter_mut() {
            m.held.clear();
        }
        self.credits
            .store(self.budget_pages().saturating_sub(1) as i64, SeqCst);
    }

    fn take_credits(&self, n: usize) -> bool {
        let n = n as i64;
        self.credits
            .fetch_update(SeqCst, SeqCst, |c| (c >= n).then_some(c - n))
            .is_ok()
    }

    /// Credits for `blocks` of owner `m` to be dirty, unless it holds them
    /// already; false when there are not enough (the write is skipped: a
    /// budget all dirty would make the next load fail). Credits of blocks
    /// that are clean again are given back first.
    pub fn dirty_room(&self, m: &mut OwnerModel, blocks: &[u64]) -> bool {
        let need = |m: &OwnerModel| -> BTreeSet<u64> {
            blocks
                .iter()
                .copied()
                .filter(|b| !m.held.contains(b))
                .collect()
        };
        let mut needed = need(m);
        if needed.is_empty() {
            return true;
        }
        if !self.take_credits(needed.len()) {
            // Only the owner makes its blocks dirty: one found clean stays so.
            let clean: Vec<u64> = m
                .held
                .iter()
                .copied()
                .filter(|&b| self.fh.page_state(b) != Some(PageState::Dirty))
                .collect();
            for b in &clean {
                m.held.remove(b);
            }
            self.credits.fetch_add(clean.len() as i64, SeqCst);
            // Blocks asked for may have been among them.
            needed = need(m);
            if !self.take_credits(needed.len()) {
                return false;
            }
        }
        m.held.extend(needed);
        true
    }

    /// The pages resident are within the budget plus the one page an
    /// access spanning two blocks may take over it.
    pub fn check_resident(&self) -> Result<(), String> {
        let stats = self.ram.stats().stats;
        let r = stats.resident_pages;
        self.max_resident.fetch_max(r, SeqCst);
        let b = self.budget_pages();
        if r > b + 1 {
            return Err(format!(
                "{r} pages resident, over the budget of {b} pages plus one"
            ));
        }
        if stats.dirty_pages >= b.max(2) {
            return Err(format!(
                "{} pages dirty ({:?}), the credits allow {} (free {})",
                stats.dirty_pages,
                self.fh.dirty_blocks(),
                b.max(2) - 1,
                self.credits.load(SeqCst)
            ));
        }
        Ok(())
    }

    /// The load policy: `attempts`, with a short backoff.
    pub fn set_attempts(&self, attempts: u32) {
        self.fh.set_load_policy(LoadPolicy {
            attempts,
            backoff: Duration::from_micros(20),
        });
    }

    // Read-only generations.

    fn ro(blk: u64) -> usize {
        (blk - OWNED_BLOCKS) as usize
    }

    pub fn generation(&self, blk: u64) -> (u32, u32) {
        (
            self.lo[Self::ro(blk)].load(SeqCst),
            self.hi[Self::ro(blk)].load(SeqCst),
        )
    }

    /// Read-only block `blk` is about to hold `gen` in storage.
    pub fn raise_hi(&self, blk: u64, gen: u32) {
        self.hi[Self::ro(blk)].store(gen, SeqCst);
    }

    /// Every mapping now shows generation `gen` of read-only block `blk`.
    pub fn raise_lo(&self, blk: u64, gen: u32) {
        self.lo[Self::ro(blk)].store(gen, SeqCst);
    }

    // Checked reads.

    /// The versions block `blk` may show to anyone now: below `lo`
    /// nothing, above `hi` nothing; `lo` is taken before a read, `hi` after.
    fn lo_of(&self, blk: u64) -> u32 {
        if blk < OWNED_BLOCKS {
            0
        } else {
            self.lo[Self::ro(blk)].load(SeqCst)
        }
    }

    fn hi_of(&self, blk: u64) -> u32 {
        if blk < OWNED_BLOCKS {
            self.file.bound(blk)
        } else {
            self.hi[Self::ro(blk)].load(SeqCst)
        }
    }

    /// Runs `read` between taking the lower and the upper bounds of what
    /// blocks `blks` may show; returns them per block with its result.
    fn bounded<T>(&self, blks: Range<u64>, read: impl FnOnce() -> T) -> (Vec<(u32, u32)>, T) {
        let lo: Vec<u32> = blks.clone().map(|b| self.lo_of(b)).collect();
        fence(SeqCst);
        let got = read();
        fence(SeqCst);
        let bounds = blks.zip(lo).map(|(b, lo)| (lo, self.hi_of(b))).collect();
        (bounds, got)
    }

    /// Checks that version `ver` of word `w` of block `blk` is one `who`
    /// may see: exactly its model's for an owner's own block, else within
    /// `(lo, hi)`.
    fn check_version(
        who: Reader,
        blk: u64,
        w: usize,
        ver: u32,
        (lo, hi): (u32, u32),
    ) -> Result<(), String> {
        if let (Reader::Owner(t, m), Some((o, j))) = (who, Self::owner_of(blk)) {
            if o == t {
                let want = m.mem[j][w];
                return match ver == want {
                    true => Ok(()),
                    false => Err(format!(
                        "own block {blk} word {w} shows version {ver}, the model says {want}"
                    )),
                };
            }
        }
        match (lo..=hi).contains(&ver) {
            true => Ok(()),
            false => Err(format!(
                "block {blk} word {w} shows version {ver}, not within {lo}..={hi}"
            )),
        }
    }

    fn check_word(
        who: Reader,
        blk: u64,
        w: usize,
        v: u64,
        bounds: (u32, u32),
    ) -> Result<(), String> {
        match decode(v) {
            Some((b, ww, ver)) if b == blk && ww == w => {
                Self::check_version(who, blk, w, ver, bounds)
            }
            _ => Err(format!(
                "block {blk} word {w} reads {v:#x}, a word of another place"
            )),
        }
    }

    /// Reads word `w` of block `blk` through `vma` with one load and checks it.
    pub fn read_one(&self, who: Reader, vma: &Vma, blk: u64, w: usize) -> Result<(), String> {
        let (bounds, v) = self.bounded(blk..blk + 1, || {
            words::read_word(vma, blk - vma.pgoffset(), w)
        });
        Self::check_word(who, blk, w, v, bounds[0])
    }

    /// Reads `n` words from word `w` of block `blk` on (maybe into the
    /// next blocks) through `vma` with one copy (`read_at`) and checks them.
    pub fn read_run(
        &self,
        who: Reader,
        vma: &Vma,
        (blk, w, n): (u64, usize, usize),
    ) -> Result<(), String> {
        let off = (blk - vma.pgoffset()) as usize * self.blksize + w * 8;
        let mut buf = vec![0u8; n * 8];
        let last = blk + ((w + n - 1) / self.words) as u64;
        let (bounds, res) = self.bounded(blk..last + 1, || vma.read_at(off, &mut buf));
        res.map_err(|e| format!("read_at: {e}"))?;
        for (i, v) in words::words(&buf).enumerate() {
            let g = w + i;
            let (b, ww) = (blk + (g / self.words) as u64, g % self.words);
            Self::check_word(who, b, ww, v, bounds[(b - blk) as usize])?;
        }
        Ok(())
    }

    /// Reads the 8 bytes across the end of block `blk` and the start of the
    /// next with one instruction (both pages at once) and checks both halves.
    pub fn read_span(&self, who: Reader, vma: &Vma, blk: u64) -> Result<(), String> {
        let addr = vma.as_ptr() as usize + (blk + 1 - vma.pgoffset()) as usize * self.blksize - 4;
        let (bounds, v) = self.bounded(blk..blk + 2, || read_u64_one_access(addr));
        let last = self.words - 1;
        // Little-endian: the low half is the high half of `blk`'s last word,
        // which holds no version bits; the high half is the low half of the
        // next block's first word: its version, and word 0's low bits.
        if v as u32 != (word(blk, last, 0) >> 32) as u32 {
            return Err(format!(
                "across blocks {blk}|{}: the first half {:#x} is not of block {blk} word {last}",
                blk + 1,
                v as u32
            ));
        }
        let next = (v >> 32) as u32;
        if next > words::MAX_VERSION {
            return Err(format!(
                "across blocks {blk}|{}: the second half {next:#x} is not of word 0",
                blk + 1
            ));
        }
        Self::check_version(who, blk + 1, 0, next, bounds[1])
    }

    /// What the summary says of budgets, residence and the counters.
    pub fn summary(&self) -> String {
        let budgets = self.budgets.lock().unwrap();
        let ops: Vec<String> = Op::ALL
            .iter()
            .filter(|&&op| op != Op::Idle && self.counted(op) != 0)
            .map(|&op| format!("{} {}", self.counted(op), op.name()))
            .collect();
        format!(
            "budgets {:?} pages, at most {} resident; {}",
            budgets,
            self.max_resident.load(SeqCst),
            ops.join(", ")
        )
    }
}

/// Stops everything and dies with what each thread was doing when nothing
/// progressed for `limit`: a hang, which the parent would otherwise only
/// see as a timeout.
pub fn watchdog(w: &World, limit: Duration) {
    let mut last = (w.progress(), Instant::now());
    while !w.stopped() {
        std::thread::sleep(Duration::from_millis(200));
        let now = w.progress();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > limit {
            eprintln!(
                "soak: no progress for {limit:?}; the threads are in {:?}",
                w.doings()
            );
            std::process::abort();
        }
    }
}
