//! The reference model of a file and one handle's changes, and the BigFile
//! the injected workloads run against.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bigfile_virtmem::{BigFile, BlockError};

/// Block `blk`'s content before anything was stored: varies inside the block
/// and between blocks, so a page shown at the wrong block or offset differs.
pub fn initial(blk: u64, blksize: usize) -> Vec<u8> {
    (0..blksize)
        .map(|i| (blk.wrapping_mul(131) ^ (i as u64 / 97)) as u8)
        .collect()
}

/// A BigFile in memory whose `loadblk` and `storeblk` are failure points
/// (`file::loadblk`, `file::storeblk`) like the system calls below them.
pub struct InjectFile {
    pub blksize: usize,
    pub blocks: Mutex<HashMap<u64, Vec<u8>>>,
    /// Run by `storeblk` before storing: says what is wrong with the state
    /// the block is stored in (see `World::store_check`).
    pub store_check: Mutex<Option<StoreCheck>>,
    /// What `store_check` found.
    pub violations: Mutex<Vec<String>>,
}

pub type StoreCheck = Box<dyn Fn(u64) -> Option<String> + Send + Sync>;

impl InjectFile {
    pub fn new(blksize: usize) -> InjectFile {
        InjectFile {
            blksize,
            blocks: Mutex::new(HashMap::new()),
            store_check: Mutex::new(None),
            violations: Mutex::new(Vec::new()),
        }
    }

    /// What the backing store holds for `blk`.
    pub fn stored(&self, blk: u64) -> Vec<u8> {
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        blocks
            .get(&blk)
            .cloned()
            .unwrap_or_else(|| initial(blk, self.blksize))
    }
}

fn injected(op: &str, blk: u64) -> BlockError {
    format!("injected {op} failure on block {blk}").into()
}

impl BigFile for InjectFile {
    fn blksize(&self) -> usize {
        self.blksize
    }

    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        fail::fail_point!("file::loadblk", |_| Err(injected("loadblk", blk)));
        buf.copy_from_slice(&self.stored(blk));
        Ok(())
    }

    fn storeblk(&self, blk: u64, buf: &[u8]) -> Result<(), BlockError> {
        fail::fail_point!("file::storeblk", |_| Err(injected("storeblk", blk)));
        let check = self.store_check.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(problem) = check.as_ref().and_then(|c| c(blk)) {
            let mut v = self.violations.lock().unwrap_or_else(|p| p.into_inner());
            v.push(problem);
        }
        drop(check);
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        blocks.insert(blk, buf.to_vec());
        Ok(())
    }

    fn name(&self) -> String {
        "injectfile".into()
    }
}

/// What the file and a handle must show: the committed blocks (what the
/// backing store holds) and the handle's changes not yet written out.
#[derive(Debug)]
pub struct Model {
    pub blksize: usize,
    pub committed: HashMap<u64, Vec<u8>>,
    pub dirty: BTreeMap<u64, Vec<u8>>,
}

impl Model {
    pub fn new(blksize: usize) -> Model {
        Model {
            blksize,
            committed: HashMap::new(),
            dirty: BTreeMap::new(),
        }
    }

    pub fn committed(&self, blk: u64) -> Vec<u8> {
        self.committed
            .get(&blk)
            .cloned()
            .unwrap_or_else(|| initial(blk, self.blksize))
    }

    /// What the handle shows for `blk`: its change, else the file's data.
    pub fn view(&self, blk: u64) -> Vec<u8> {
        self.dirty
            .get(&blk)
            .cloned()
            .unwrap_or_else(|| self.committed(blk))
    }

    pub fn write(&mut self, blk: u64, off: usize, data: &[u8]) {
        let mut page = self.view(blk);
        page[off..off + data.len()].copy_from_slice(data);
        self.dirty.insert(blk, page);
    }

    pub fn dirty_blocks(&self) -> Vec<u64> {
        self.dirty.keys().copied().collect()
    }
}

/// A small deterministic generator (xorshift64*): the same seed gives the same
/// workload, so the Nth call of a failure point is the same call every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
