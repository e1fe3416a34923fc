//! The soak's file: the test kit's memory file of self-describing words
//! (`words.rs`), whose `loadblk` fails now and then (never so often in a
//! row that a fault gives up), whose `storeblk` fails now and then and
//! checks what it is given, and whose blocks can be broken (every load
//! fails) or changed behind the handle's back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use bigfile_testkit::memfile::BlockError;
use bigfile_testkit::MemFile;

use crate::words;

/// No block is broken.
const NONE: u64 = u64::MAX;

/// The failures the file's calls are given.
struct Injector {
    /// Blocks below this are written by their owners; storing any other
    /// is a violation.
    owned: u64,
    /// Per owned block: the highest version its owner has started writing
    /// (raised before the write: a reader may see the value at once).
    bounds: Vec<AtomicU32>,
    violations: Mutex<Vec<String>>,
    /// Chances of a load or store failing, per thousand calls.
    load_per_mille: AtomicU32,
    store_per_mille: AtomicU32,
    /// The most attempts in a row a load of one block may fail: one less
    /// than the handle's attempts, so a fault always gets its page.
    max_in_a_row: AtomicU32,
    in_a_row: Mutex<HashMap<u64, u32>>,
    /// Every load of this block fails.
    broken: AtomicU64,
    /// Stores left to succeed before one fails (-1: none planned, random
    /// failures instead).
    store_fails_after: AtomicI64,
    seed: u64,
    dice: AtomicU64,
    jitter: AtomicU64,
    load_failures: AtomicU64,
    broken_failures: AtomicU64,
    store_failures: AtomicU64,
}

/// What the file injected so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Injected {
    /// Transient `loadblk` failures (the fault retried them).
    pub loads: u64,
    /// `loadblk` failures of a broken block.
    pub broken: u64,
    /// `storeblk` failures, random or planned.
    pub stores: u64,
}

pub struct SoakFile {
    pub mem: Arc<MemFile>,
    inj: Arc<Injector>,
}

impl SoakFile {
    /// A file of `blksize`-byte blocks whose first `owned` blocks have
    /// owners; every word starts at version 0. No failures until
    /// [`SoakFile::set_failures`].
    pub fn new(blksize: usize, owned: u64, seed: u64) -> SoakFile {
        let mem = Arc::new(
            MemFile::new(blksize)
                .named("soak-file")
                .with_initial(|blk, buf| words::fill(blk, 0, buf)),
        );
        let inj = Arc::new(Injector {
            owned,
            bounds: (0..owned).map(|_| AtomicU32::new(0)).collect(),
            violations: Mutex::new(Vec::new()),
            load_per_mille: AtomicU32::new(0),
            store_per_mille: AtomicU32::new(0),
            max_in_a_row: AtomicU32::new(0),
            in_a_row: Mutex::new(HashMap::new()),
            broken: AtomicU64::new(NONE),
            store_fails_after: AtomicI64::new(-1),
            seed,
            dice: AtomicU64::new(0),
            jitter: AtomicU64::new(0),
            load_failures: AtomicU64::new(0),
            broken_failures: AtomicU64::new(0),
            store_failures: AtomicU64::new(0),
        });
        let on_load = inj.clone();
        mem.on_load(move |blk, _| on_load.load(blk));
        let on_store = inj.clone();
        mem.on_store(move |blk, buf| on_store.store(blk, buf));
        SoakFile { mem, inj }
    }

    /// Loads fail `load` and stores `store` times in a thousand; a load of
    /// one block fails at most `max_in_a_row` attempts in a row.
    pub fn set_failures(&self, load: u32, store: u32, max_in_a_row: u32) {
        self.inj.load_per_mille.store(load, SeqCst);
        self.inj.store_per_mille.store(store, SeqCst);
        self.inj.max_in_a_row.store(max_in_a_row, SeqCst);
        self.inj.in_a_row.lock().unwrap().clear();
    }

    /// Every load of `blk` fails from now on (`None`: of no block).
    pub fn break_block(&self, blk: Option<u64>) {
        self.inj.broken.store(blk.unwrap_or(NONE), SeqCst);
    }

    /// The next `n` stores succeed, the one after fails (with no random
    /// failure meanwhile); `None` cancels what is left of the plan.
    pub fn fail_store_after(&self, n: Option<u64>) {
        let n = n.map_or(-1, |n| n as i64);
        self.inj.store_fails_after.store(n, SeqCst);
    }

    /// The highest version owned block `blk`'s owner has written.
    pub fn bound(&self, blk: u64) -> u32 {
        self.inj.bounds[blk as usize].load(SeqCst)
    }

    /// Owned block `blk` may hold `version` from now on.
    pub fn raise_bound(&self, blk: u64, version: u32) {
        self.inj.bounds[blk as usize].fetch_max(version, SeqCst);
    }

    /// The versions of block `blk`'s words in the storage.
    pub fn versions(&self, blk: u64) -> Vec<u32> {
        words::versions(blk, &self.mem.content(blk))
    }

    /// Make every word of block `blk` in the storage `version`, behind the
    /// handle's back (as another writer of the storage would).
    pub fn put(&self, blk: u64, version: u32) {
        let mut buf = vec![0; self.mem.blksize()];
        words::fill(blk, version, &mut buf);
        self.mem.put(blk, buf);
    }

    pub fn violations(&self) -> Vec<String> {
        self.inj.violations.lock().unwrap().clone()
    }

    pub fn injected(&self) -> Injected {
        Injected {
            loads: self.inj.load_failures.load(SeqCst),
            broken: self.inj.broken_failures.load(SeqCst),
            stores: self.inj.store_failures.load(SeqCst),
        }
    }
}

impl Injector {
    /// Whether this call is one of `per_mille` in a thousand.
    fn roll(&self, per_mille: u32) -> bool {
        // splitmix64 of a counter: one sequence shared by all threads.
        let mut z = self.seed.wrapping_add(
            self.dice
                .fetch_add(1, SeqCst)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % 1000 < per_mille as u64
    }

    fn load(&self, blk: u64) -> Result<(), BlockError> {
        words::pause(&self.jitter);
        if self.broken.load(SeqCst) == blk {
            // Slow to fail: another thread asking for the block meanwhile
            // waits for this load, and gets its error.
            std::thread::sleep(std::time::Duration::from_micros(300));
            self.broken_failures.fetch_add(1, SeqCst);
            return Err(format!("block {blk} is broken").into());
        }
        let mut in_a_row = self.in_a_row.lock().unwrap();
        let n = in_a_row.entry(blk).or_insert(0);
        if *n < self.max_in_a_row.load(SeqCst) && self.roll(self.load_per_mille.load(SeqCst)) {
            *n += 1;
            self.load_failures.fetch_add(1, SeqCst);
            return Err(format!("injected transient failure loading block {blk}").into());
        }
        in_a_row.remove(&blk);
        Ok(())
    }

    fn store(&self, blk: u64, buf: &[u8]) -> Result<(), BlockError> {
        words::pause(&self.jitter);
        if let Some(v) = self.check(blk, buf) {
            self.violations.lock().unwrap().push(v);
        }
        // One writer (the soak's coordinator) at a time: no race here.
        let planned = self.store_fails_after.load(SeqCst);
        let fail = if planned >= 0 {
            self.store_fails_after.store(planned - 1, SeqCst);
            planned == 0
        } else {
            self.roll(self.store_per_mille.load(SeqCst))
        };
        if fail {
            self.store_failures.fetch_add(1, SeqCst);
            return Err(format!("injected failure storing block {blk}").into());
        }
        Ok(())
    }

    /// What is wrong with storing `buf` as block `blk`, if anything: a
    /// block nobody writes, a word not of this block at its place, or a
    /// version its owner never wrote.
    fn check(&self, blk: u64, buf: &[u8]) -> Option<String> {
        if blk >= self.owned {
            return Some(format!("storeblk of read-only block {blk}"));
        }
        if let Some(m) = words::misplaced(blk, buf) {
            return Some(format!("storeblk of {m}"));
        }
        let bound = self.bounds[blk as usize].load(SeqCst);
        let newest = words::versions(blk, buf).into_iter().max().unwrap_or(0);
        (newest > bound).then(|| {
            format!("storeblk of block {blk}: version {newest}, its owner wrote up to {bound}")
        })
    }
}
