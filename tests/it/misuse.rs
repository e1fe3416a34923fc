//! Misuse is an error value with a clear message, never an abort.

use std::sync::Arc;

use bigfile::virtmem::{Error, FileH, Ram, WriteoutFlags};

use crate::common::{handle, mem_file, open, ram, setup, MemFile, BLK};

#[test]
fn bad_blksize_is_refused() {
    for blksize in [0, 1000, 4096 + 1] {
        let err = FileH::open(mem_file(blksize), None).unwrap_err();
        assert!(matches!(err, Error::BadBlksize { .. }), "{err}");
        assert!(
            err.to_string().contains("multiple of the OS page size"),
            "{err}"
        );
    }
}

#[test]
fn ram_of_another_page_size_is_refused() {
    let ram = Ram::from_spec("memfd,pagesize=2M").unwrap();
    let err = FileH::open(mem_file(BLK), Some(&ram)).unwrap_err();
    assert!(matches!(err, Error::PageSizeMismatch { .. }), "{err}");
}

#[test]
fn default_ram_follows_the_blksize() {
    let fh = FileH::open(mem_file(3 * 4096), None).unwrap();
    assert_eq!(fh.ram().page_size(), 3 * 4096);
    let vma = fh.mmap(0, 2).unwrap();
    let mut b = [0u8; 1];
    vma.read_at(3 * 4096, &mut b).unwrap();
    assert_eq!(b[0], MemFile::initial(1));
}

#[test]
fn bad_ranges_are_refused() {
    let (_file, _ram, fh) = handle(4);
    assert!(matches!(fh.mmap(0, 0), Err(Error::InvalidRange(_))));
    assert!(matches!(fh.mmap(u64::MAX, 2), Err(Error::InvalidRange(_))));
    assert!(matches!(
        fh.mmap(0, u64::MAX / 2),
        Err(Error::InvalidRange(_))
    ));
    // Far in the file: any offset can be mapped, on either backend (its
    // pages go wherever there is room in the handle's memory file).
    let far = u64::MAX - 2;
    let vma = fh.mmap(far, 2).unwrap();
    let mut b = [0u8; 2];
    assert!(matches!(
        vma.read_at(2 * BLK - 1, &mut b),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        vma.write_at(usize::MAX, &b),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        vma.prefault(0..3 * BLK, bigfile::virtmem::Access::Read),
        Err(Error::OutOfBounds { .. })
    ));
    assert_eq!(fh.mapping_count(), 1);
}

#[test]
fn bad_writeout_flags_are_refused() {
    for bits in [0, 4, 7, 0x100] {
        let err = WriteoutFlags::from_bits(bits).unwrap_err();
        assert!(
            err.to_string().contains("STORE (1), MARKSTORED (2)"),
            "{err}"
        );
    }
    assert_eq!(
        WriteoutFlags::from_bits(3).unwrap(),
        WriteoutFlags::STORE | WriteoutFlags::MARKSTORED
    );
}

#[test]
fn writeout_discard_invalidate_during_writeout_are_refused() {
    let file = mem_file(BLK);
    let ram = ram(4);
    let fh = Arc::new(open(&file, &ram));
    let vma = fh.mmap(0, 1).unwrap();
    vma.write_at(0, &[1]).unwrap();
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (fh2, results) = (fh.clone(), results.clone());
        // storeblk runs during the writeout: call the other operations from there.
        file.on_store(move |_, _| {
            let mut r = results.lock().unwrap();
            r.push(
                fh2.dirty_writeout(WriteoutFlags::STORE)
                    .map_err(|e| e.to_string()),
            );
            r.push(fh2.dirty_discard().map_err(|e| e.to_string()));
            r.push(fh2.invalidate_page(0).map_err(|e| e.to_string()));
            Ok(())
        });
    }
    fh.dirty_writeout(WriteoutFlags::STORE).unwrap();
    let r = results.lock().unwrap();
    assert_eq!(r.len(), 3);
    for res in r.iter() {
        let msg = res.as_ref().unwrap_err();
        assert!(
            msg.contains("writeout of this file handle is in progress"),
            "{msg}"
        );
    }
    assert_eq!(fh.dirty_blocks(), [0]);
}

#[test]
fn prefault_reports_load_errors_as_values() {
    let file = mem_file(BLK);
    file.on_load(|_, _| Err("no such block".into()));
    let ram = ram(4);
    let fh = open(&file, &ram);
    fh.set_load_policy(bigfile::virtmem::LoadPolicy {
        attempts: 2,
        backoff: std::time::Duration::ZERO,
    });
    let vma = fh.mmap(0, 1).unwrap();
    let err = vma
        .prefault(0..1, bigfile::virtmem::Access::Read)
        .unwrap_err();
    assert!(err.to_string().contains("no such block"), "{err}");
    assert_eq!(fh.stats().load_errors, 2);
    assert_eq!(fh.page_state(0), None);
    assert_eq!(ram.stats().stats.resident_pages, 0);
}

/// A `loadblk` that panics under `prefault` (outside a page fault, where a
/// panic aborts) unwinds to the caller and leaves nothing behind: no page,
/// no RAM held (whether the load had a recycled or a fresh RAM page), and
/// the block loads normally afterwards.
#[test]
fn panic_in_loadblk_under_prefault_unwinds_and_leaks_nothing() {
    use bigfile::virtmem::Access;
    let (file, ram, fh, vma) = setup(2, 4);
    vma.prefault(0..2 * BLK, Access::Read).unwrap();
    file.on_load(|_, _| panic!("loader exploded"));
    // Block 2: the budget is full, block 0's RAM page is recycled for it.
    // Block 3: block 2's failure left room, a fresh RAM page is allocated.
    for (blk, resident) in [(2usize, 1u64), (3, 1)] {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            vma.prefault(blk * BLK..(blk + 1) * BLK, Access::Read)
        }));
        assert!(res.is_err(), "the panic reaches the caller");
        assert_eq!(fh.page_state(blk as u64), None);
        assert_eq!(ram.stats().stats.resident_pages, resident);
        assert_eq!(
            ram.pages().stats().pages_allocated,
            resident,
            "block {blk}: no RAM page leaked"
        );
    }
    file.clear_load_hook();
    let mut b = [0u8];
    vma.read_at(3 * BLK, &mut b).unwrap();
    assert_eq!(b[0], MemFile::initial(3));
}
