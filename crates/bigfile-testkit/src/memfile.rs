//! [`MemFile`]: a BigFile in memory, for tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

/// The error a block call returns (the same type as bigfile-virtmem's
/// `BlockError`).
pub type BlockError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One call made to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Load(u64),
    Store(u64),
}

type LoadHook = Arc<dyn Fn(u64, &mut [u8]) -> Result<(), BlockError> + Send + Sync>;
type StoreHook = Arc<dyn Fn(u64, &[u8]) -> Result<(), BlockError> + Send + Sync>;
type Initial = Box<dyn Fn(u64, &mut [u8]) + Send + Sync>;

/// A file of blocks kept in a map. A block never stored holds its initial
/// content: by default every byte `blk % 255 + 1` (never a zero page);
/// see [`MemFile::with_initial`]. Every call is recorded; hooks run before
/// a call does its work and may fail it.
pub struct MemFile {
    blksize: usize,
    name: String,
    initial: Initial,
    blocks: Mutex<HashMap<u64, Vec<u8>>>,
    calls: Mutex<Vec<Call>>,
    load_hook: Mutex<Option<LoadHook>>,
    store_hook: Mutex<Option<StoreHook>>,
    loads: AtomicUsize,
    stores: AtomicUsize,
    /// Its `needs_host_lock` answer: a native loader's (`false`) or not.
    native: bool,
}

impl std::fmt::Debug for MemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemFile")
            .field("name", &self.name)
            .field("blksize", &self.blksize)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test thread that panicked while holding it leaves plain data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemFile {
    /// A file of `blksize`-byte blocks named "memfile".
    pub fn new(blksize: usize) -> MemFile {
        MemFile {
            blksize,
            name: "memfile".into(),
            initial: Box::new(|blk, buf| buf.fill(MemFile::initial(blk))),
            blocks: Mutex::new(HashMap::new()),
            calls: Mutex::new(Vec::new()),
            load_hook: Mutex::new(None),
            store_hook: Mutex::new(None),
            loads: AtomicUsize::new(0),
            stores: AtomicUsize::new(0),
            native: false,
        }
    }

    /// The default initial byte of block `blk`.
    pub fn initial(blk: u64) -> u8 {
        (blk % 255) as u8 + 1
    }

    /// This file, named `name` in diagnostics.
    pub fn named(mut self, name: &str) -> MemFile {
        self.name = name.into();
        self
    }

    /// This file as a native loader: `needs_host_lock()` is false (as a
    /// `FileBigFile`'s), so faults never give the host lock away for it and
    /// read-ahead runs it on its workers.
    pub fn native(mut self) -> MemFile {
        self.native = true;
        self
    }

    /// This file, with `fill(blk, buf)` giving a block's initial content.
    pub fn with_initial(
        mut self,
        fill: impl Fn(u64, &mut [u8]) + Send + Sync + 'static,
    ) -> MemFile {
        self.initial = Box::new(fill);
        self
    }

    pub fn blksize(&self) -> usize {
        self.blksize
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the file holds for block `blk`.
    pub fn content(&self, blk: u64) -> Vec<u8> {
        match lock(&self.blocks).get(&blk) {
            Some(data) => data.clone(),
            None => {
                let mut buf = vec![0; self.blksize];
                (self.initial)(blk, &mut buf);
                buf
            }
        }
    }

    /// Change what the file holds for block `blk` behind its handles' back
    /// (not a call: as another writer of the storage would).
    pub fn put(&self, blk: u64, data: Vec<u8>) {
        assert_eq!(data.len(), self.blksize);
        lock(&self.blocks).insert(blk, data);
    }

    /// Forget every stored block (all are initial again), behind the
    /// handles' back.
    pub fn clear(&self) {
        lock(&self.blocks).clear();
    }

    /// The calls made since the last `take_calls`.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *lock(&self.calls))
    }

    /// Successful loads so far.
    pub fn loads(&self) -> usize {
        self.loads.load(SeqCst)
    }

    /// Successful stores so far.
    pub fn stores(&self) -> usize {
        self.stores.load(SeqCst)
    }

    /// Run `hook(blk, buf)` at the start of every load; an error fails it.
    pub fn on_load(
        &self,
        hook: impl Fn(u64, &mut [u8]) -> Result<(), BlockError> + Send + Sync + 'static,
    ) {
        *lock(&self.load_hook) = Some(Arc::new(hook));
    }

    /// Run no hook on loads any more.
    pub fn clear_load_hook(&self) {
        *lock(&self.load_hook) = None;
    }

    /// Run `hook(blk, buf)` at the start of every store; an error fails it.
    pub fn on_store(
        &self,
        hook: impl Fn(u64, &[u8]) -> Result<(), BlockError> + Send + Sync + 'static,
    ) {
        *lock(&self.store_hook) = Some(Arc::new(hook));
    }

    /// `loadblk`: fill `buf` with block `blk`.
    pub fn load(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        lock(&self.calls).push(Call::Load(blk));
        fail::fail_point!("file::loadblk", |_| Err(injected("loadblk", blk)));
        // Called without holding its mutex: loads run in parallel.
        let hook = lock(&self.load_hook).clone();
        if let Some(h) = hook {
            h(blk, buf)?;
        }
        buf.copy_from_slice(&self.content(blk));
        self.loads.fetch_add(1, SeqCst);
        Ok(())
    }

    /// `storeblk`: store `buf` as block `blk`.
    pub fn store(&self, blk: u64, buf: &[u8]) -> Result<(), BlockError> {
        lock(&self.calls).push(Call::Store(blk));
        fail::fail_point!("file::storeblk", |_| Err(injected("storeblk", blk)));
        let hook = lock(&self.store_hook).clone();
        if let Some(h) = hook {
            h(blk, buf)?;
        }
        lock(&self.blocks).insert(blk, buf.to_vec());
        self.stores.fetch_add(1, SeqCst);
        Ok(())
    }
}

/// The error an armed failure point makes a block call return.
#[allow(dead_code)] // reason: `fail_point!` expands to nothing unless the fail crate's failpoints are on, by this crate's feature or another's
fn injected(op: &str, blk: u64) -> BlockError {
    format!("injected {op} failure on block {blk}").into()
}

#[cfg(feature = "virtmem")]
impl bigfile_virtmem::BigFile for MemFile {
    fn blksize(&self) -> usize {
        self.blksize
    }

    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.load(blk, buf)
    }

    fn storeblk(&self, blk: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.store(blk, buf)
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn needs_host_lock(&self) -> bool {
        !self.native
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_start_initial_and_keep_what_is_stored() {
        let f = MemFile::new(4);
        let mut buf = [0; 4];
        f.load(2, &mut buf).unwrap();
        assert_eq!(buf, [3; 4]);
        f.store(2, b"abcd").unwrap();
        f.load(2, &mut buf).unwrap();
        assert_eq!(&buf, b"abcd");
        assert_eq!(
            f.take_calls(),
            [Call::Load(2), Call::Store(2), Call::Load(2)]
        );
        assert_eq!((f.loads(), f.stores()), (2, 1));
    }

    /// Past block 254 too: never zero (a zero page would pass for data
    /// never loaded), and no overflow (it panicked at block 255).
    #[test]
    fn every_block_starts_nonzero() {
        assert_eq!(MemFile::initial(254), 255);
        assert_eq!(MemFile::initial(255), 1);
        assert!((0..1 << 12).all(|blk| MemFile::initial(blk) != 0));
        let mut buf = [0; 2];
        MemFile::new(2).load(300, &mut buf).unwrap();
        assert_eq!(buf, [MemFile::initial(300); 2]);
    }

    #[test]
    fn hooks_run_first_and_may_fail_the_call() {
        let f = MemFile::new(2)
            .named("disk")
            .with_initial(|blk, buf| buf.fill(blk as u8 * 10));
        f.on_load(|blk, _| match blk {
            1 => Err("media error".into()),
            _ => Ok(()),
        });
        let mut buf = [0; 2];
        assert_eq!(f.load(1, &mut buf).unwrap_err().to_string(), "media error");
        f.load(3, &mut buf).unwrap();
        assert_eq!(buf, [30; 2]);
        f.on_store(|_, data| Err(format!("refused {data:?}").into()));
        assert!(f.store(0, &[1, 2]).is_err());
        assert_eq!(f.content(0), [0; 2]);
        assert_eq!((f.name(), f.loads(), f.stores()), ("disk", 1, 0));
    }
}
