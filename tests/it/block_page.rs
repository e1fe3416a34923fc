//! `BigFile::loadblk_page`/`storeblk_page`: a loader that maps the block's
//! RAM page at an address of its own (as the Python bindings do) fills and
//! stores the block through that mapping, with nothing copied.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bigfile::virtmem::{Advice, BigFile, BlockError, BlockPage, FileH, WriteoutFlags};

use crate::common::{access_at, ram, PageAccess, BLK};

/// Block `n` reads as bytes `n + 40`; stores are recorded as (block, the
/// page's first and last byte read through the loader's own mapping).
#[derive(Default)]
struct OwnMapping {
    stores: Mutex<Vec<(u64, u8, u8)>>,
}

/// An inaccessible address range of `len + align` bytes, and its first
/// address aligned to `align`.
fn reserve(len: usize, align: usize) -> (*mut libc::c_void, NonNull<u8>) {
    // SAFETY: a fresh anonymous mapping of the kernel's choosing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + align,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let start = (p as usize).div_ceil(align) * align;
    (p, NonNull::new(start as *mut u8).unwrap())
}

/// Run `f` on `page` mapped at an address of our own, then unmap it.
fn with_own_mapping<R>(page: &BlockPage<'_>, f: impl FnOnce(*mut u8) -> R) -> R {
    let (base, addr) = reserve(page.len(), page.alignment());
    // SAFETY: `addr` is a range we just reserved; no reference points in.
    unsafe { page.map_at(addr) }.unwrap();
    let r = f(addr.as_ptr());
    // SAFETY: the whole range `reserve` made, ours alone.
    unsafe { libc::munmap(base, page.len() + page.alignment()) };
    r
}

impl BigFile for OwnMapping {
    fn blksize(&self) -> usize {
        BLK
    }

    fn loadblk(&self, _: u64, _: &mut [u8]) -> Result<(), BlockError> {
        Err("virtmem loads through loadblk_page".into())
    }

    fn storeblk(&self, _: u64, _: &[u8]) -> Result<(), BlockError> {
        Err("virtmem stores through storeblk_page".into())
    }

    fn loadblk_page(&self, blk: u64, page: &mut BlockPage<'_>) -> Result<(), BlockError> {
        assert!(page.is_writable());
        with_own_mapping(page, |p| {
            // SAFETY: `p` maps the page read-write for `len` bytes.
            unsafe { std::ptr::write_bytes(p, blk as u8 + 40, BLK) }
        });
        Ok(())
    }

    fn storeblk_page(&self, blk: u64, page: &BlockPage<'_>) -> Result<(), BlockError> {
        assert!(!page.is_writable());
        let (first, last) = with_own_mapping(page, |p| {
            // SAFETY: `p` maps the page readable for `len` bytes.
            unsafe { (*p, *p.add(BLK - 1)) }
        });
        assert_eq!(page.as_slice()[0], first);
        self.stores.lock().unwrap().push((blk, first, last));
        Ok(())
    }
}

#[test]
fn a_loader_fills_and_stores_the_ram_page_through_its_own_mapping() {
    let file = Arc::new(OwnMapping::default());
    let ram = ram(4);
    let fh = FileH::open(file.clone(), Some(&ram)).unwrap();
    let vma = fh.mmap(0, 2).unwrap();
    let mut b = [0u8; 2];
    vma.read_at(0, &mut b[..1]).unwrap();
    vma.read_at(BLK + BLK - 1, &mut b[1..]).unwrap();
    assert_eq!(b, [40, 41]);
    vma.write_at(BLK, &[7]).unwrap();
    fh.dirty_writeout(WriteoutFlags::STORE).unwrap();
    assert_eq!(*file.stores.lock().unwrap(), [(1, 7, 41)]);
}

/// Records, for each load, how many OS pages of `buf` were not yet
/// writable without a fault when `loadblk` was called.
#[derive(Default)]
struct FaultCounting {
    unpopulated: Mutex<Vec<usize>>,
}

impl BigFile for FaultCounting {
    fn blksize(&self) -> usize {
        BLK
    }

    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        // SAFETY: sysconf has no preconditions.
        let os_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let start = buf.as_ptr() as usize;
        let missing = (start..start + buf.len())
            .step_by(os_page)
            .filter(|&a| access_at(a) != PageAccess::Write)
            .count();
        self.unpopulated.lock().unwrap().push(missing);
        buf.fill(blk as u8);
        Ok(())
    }

    fn storeblk(&self, _: u64, _: &[u8]) -> Result<(), BlockError> {
        Ok(())
    }
}

/// A fresh RAM page reaches `loadblk` populated, on either backend: the
/// loader's writes take no fault per OS page (on the userfaultfd backend
/// every load is into a fresh page; 512 minor faults per 2 MiB block there
/// cost several times the loader's own copy).
#[test]
fn a_fresh_page_reaches_the_loader_populated() {
    let file = Arc::new(FaultCounting::default());
    let ram = ram(4);
    let fh = FileH::open(file.clone(), Some(&ram)).unwrap();
    let vma = fh.mmap(0, 3).unwrap();
    // Each load the test's own, not a read-ahead worker's.
    vma.advise(Advice::Random);
    let mut b = [0u8; 1];
    for blk in 0..3 {
        vma.read_at(blk * BLK, &mut b).unwrap();
        assert_eq!(b[0], blk as u8);
    }
    assert_eq!(*file.unpopulated.lock().unwrap(), [0, 0, 0]);
}
