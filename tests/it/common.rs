//! A BigFile kept in memory that records every call, and helpers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bigfile::virtmem::{BigFile, BlockError, FileH, Ram};

/// One call made to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Load(u64),
    Store(u64),
}

type Hook = Arc<dyn Fn(u64) -> Result<(), BlockError> + Send + Sync>;

/// A file whose block `n` is, unless stored, filled with the byte `n as u8 + 1`.
pub struct MemFile {
    pub blksize: usize,
    pub blocks: Mutex<HashMap<u64, Vec<u8>>>,
    pub calls: Mutex<Vec<Call>>,
    pub load_hook: Mutex<Option<Hook>>,
    pub store_hook: Mutex<Option<Hook>>,
}

pub const BLK: usize = 64 * 1024;

impl MemFile {
    pub fn new(blksize: usize) -> Arc<MemFile> {
        Arc::new(MemFile {
            blksize,
            blocks: Mutex::new(HashMap::new()),
            calls: Mutex::new(Vec::new()),
            load_hook: Mutex::new(None),
            store_hook: Mutex::new(None),
        })
    }

    pub fn initial(blk: u64) -> u8 {
        blk as u8 + 1
    }

    pub fn content(&self, blk: u64) -> Vec<u8> {
        self.blocks
            .lock()
            .unwrap()
            .get(&blk)
            .cloned()
            .unwrap_or_else(|| vec![Self::initial(blk); self.blksize])
    }

    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    pub fn on_load(&self, hook: impl Fn(u64) -> Result<(), BlockError> + Send + Sync + 'static) {
        *self.load_hook.lock().unwrap() = Some(Arc::new(hook));
    }

    pub fn on_store(&self, hook: impl Fn(u64) -> Result<(), BlockError> + Send + Sync + 'static) {
        *self.store_hook.lock().unwrap() = Some(Arc::new(hook));
    }
}

impl BigFile for MemFile {
    fn blksize(&self) -> usize {
        self.blksize
    }

    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.calls.lock().unwrap().push(Call::Load(blk));
        // Call the hook without holding its mutex: loads run in parallel.
        let hook = self.load_hook.lock().unwrap().clone();
        if let Some(h) = hook {
            h(blk)?;
        }
        buf.copy_from_slice(&self.content(blk));
        Ok(())
    }

    fn storeblk(&self, blk: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.calls.lock().unwrap().push(Call::Store(blk));
        let hook = self.store_hook.lock().unwrap().clone();
        if let Some(h) = hook {
            h(blk)?;
        }
        self.blocks.lock().unwrap().insert(blk, buf.to_vec());
        Ok(())
    }

    fn name(&self) -> String {
        "memfile".into()
    }
}

/// A private RAM of `BLK`-sized pages with a budget of `pages` pages.
pub fn ram(pages: u64) -> Ram {
    Ram::from_spec(&format!("memfd,pagesize={}", BLK))
        .unwrap()
        .with_budget(pages * BLK as u64)
}

pub fn open(file: &Arc<MemFile>, ram: &Ram) -> FileH {
    FileH::open(file.clone(), Some(ram)).unwrap()
}

/// Protection of the kernel mapping containing `addr`, as in /proc/self/maps ("r--p", "rw-s"...).
pub fn prot_at(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let range = it.next()?;
        let perms = it.next()?;
        let (a, b) = range.split_once('-')?;
        let (a, b) = (
            usize::from_str_radix(a, 16).ok()?,
            usize::from_str_radix(b, 16).ok()?,
        );
        if (a..b).contains(&addr) {
            return Some(perms.to_owned());
        }
    }
    None
}

/// Read one byte through a raw pointer (faulting the page in).
pub fn peek(ptr: *const u8) -> u8 {
    // SAFETY: callers pass addresses inside a live mapping.
    unsafe { std::ptr::read_volatile(ptr) }
}

/// Write one byte through a raw pointer (dirtying the page).
pub fn poke(ptr: *mut u8, v: u8) {
    // SAFETY: callers pass addresses inside a live mapping.
    unsafe { std::ptr::write_volatile(ptr, v) }
}
