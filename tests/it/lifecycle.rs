//! The full lifecycle of a handle and its mappings, checked after every step.

use bigfile::virtmem::{FileH, PageState, Vma, WriteoutFlags};

use crate::common::{handle, mem_file, open, peek, poke, prot_at, ram, setup, Call, MemFile, BLK};

fn state(fh: &FileH, pg: u64) -> Option<PageState> {
    fh.page_state(pg)
}

#[test]
fn full_lifecycle() {
    let (file, ram, fh, vma) = setup(64, 4);
    let p = vma.as_ptr();
    let at = |pg: usize| p.wrapping_add(pg * BLK);
    assert_eq!(fh.stats().resident_pages, 0);
    assert_eq!(prot_at(at(0) as usize).as_deref(), Some("---p"));

    // read page 0: loaded, mapped read-only.
    assert_eq!(peek(at(0)), MemFile::initial(0));
    assert_eq!(file.take_calls(), [Call::Load(0)]);
    assert_eq!(state(&fh, 0), Some(PageState::Loaded));
    assert_eq!(prot_at(at(0) as usize).as_deref(), Some("r--s"));
    assert_eq!(vma.mapped_pages(), [0]);

    // write page 2: loaded, dirty, writable.
    poke(at(2).wrapping_add(5), 0xa2);
    assert_eq!(file.take_calls(), [Call::Load(2)]);
    assert_eq!(state(&fh, 2), Some(PageState::Dirty));
    assert_eq!(prot_at(at(2) as usize).as_deref(), Some("rw-s"));
    assert!(fh.is_dirty());
    assert_eq!(fh.dirty_blocks(), [2]);

    // read page 3.
    assert_eq!(peek(at(3)), MemFile::initial(3));
    assert_eq!(file.take_calls(), [Call::Load(3)]);
    assert_eq!(state(&fh, 3), Some(PageState::Loaded));

    // write page 0: already loaded, so no load; becomes dirty and writable.
    poke(at(0), 0xa0);
    assert_eq!(file.take_calls(), []);
    assert_eq!(state(&fh, 0), Some(PageState::Dirty));
    assert_eq!(prot_at(at(0) as usize).as_deref(), Some("rw-s"));
    assert_eq!(fh.dirty_blocks(), [0, 2]);

    // read page 1.
    assert_eq!(peek(at(1)), MemFile::initial(1));
    assert_eq!(file.take_calls(), [Call::Load(1)]);
    assert_eq!(vma.mapped_pages(), [0, 1, 2, 3]);
    assert_eq!(fh.stats().resident_pages, 4);
    assert_eq!(ram.stats().resident_bytes, 4 * BLK as u64);

    // reclaim: clean pages 1 and 3 go, dirty 0 and 2 stay.
    assert_eq!(ram.reclaim(), 2);
    assert_eq!(state(&fh, 1), None);
    assert_eq!(state(&fh, 3), None);
    assert_eq!(vma.mapped_pages(), [0, 2]);
    assert_eq!(prot_at(at(1) as usize).as_deref(), Some("---p"));
    assert_eq!(fh.stats().resident_pages, 2);
    assert_eq!(fh.stats().reclaims, 2);

    // unmap, map again: dirty data is still there, served without loading.
    drop(vma);
    assert_eq!(fh.mapping_count(), 0);
    let vma = fh.mmap(0, 4).unwrap();
    let p = vma.as_ptr();
    let at = |pg: usize| p.wrapping_add(pg * BLK);
    assert_eq!(vma.mapped_pages(), Vec::<u64>::new());
    assert_eq!(peek(at(0)), 0xa0);
    assert_eq!(peek(at(2).wrapping_add(5)), 0xa2);
    assert_eq!(file.take_calls(), []);
    // a read maps even a dirty page read-only at first; the next write upgrades it.
    assert_eq!(prot_at(at(2) as usize).as_deref(), Some("r--s"));

    // discard: changes gone, data reloads from the file.
    fh.dirty_discard().unwrap();
    assert!(!fh.is_dirty());
    assert_eq!(state(&fh, 0), None);
    assert_eq!(vma.mapped_pages(), Vec::<u64>::new());
    assert_eq!(peek(at(0)), MemFile::initial(0));
    assert_eq!(peek(at(2).wrapping_add(5)), MemFile::initial(2));
    assert_eq!(file.take_calls(), [Call::Load(0), Call::Load(2)]);

    // writeout STORE: stored in ascending order, pages stay dirty, read-only.
    poke(at(3), 0xb3);
    poke(at(1), 0xb1);
    assert_eq!(file.take_calls(), [Call::Load(3), Call::Load(1)]);
    fh.dirty_writeout(WriteoutFlags::STORE).unwrap();
    assert_eq!(file.take_calls(), [Call::Store(1), Call::Store(3)]);
    assert_eq!(fh.dirty_blocks(), [1, 3]);
    assert_eq!(prot_at(at(1) as usize).as_deref(), Some("r--s"));
    assert_eq!(file.content(1)[0], 0xb1);
    // a write after STORE needs no load and keeps the page dirty.
    poke(at(1).wrapping_add(1), 0xb2);
    assert_eq!(prot_at(at(1) as usize).as_deref(), Some("rw-s"));

    // MARKSTORED: clean and read-only what the STORE stored, nothing
    // stored; block 1, written since the STORE stored it, stays dirty (its
    // new byte was never stored).
    fh.dirty_writeout(WriteoutFlags::MARKSTORED).unwrap();
    assert_eq!(file.take_calls(), []);
    assert_eq!(fh.dirty_blocks(), [1]);
    assert_eq!(state(&fh, 3), Some(PageState::Loaded));
    assert_eq!(prot_at(at(3) as usize).as_deref(), Some("r--s"));
    assert_eq!(prot_at(at(1) as usize).as_deref(), Some("rw-s"));
    assert_eq!(file.content(1)[1], MemFile::initial(1));

    // STORE|MARKSTORED.
    poke(at(2), 0xc2);
    poke(at(0), 0xc0);
    file.take_calls();
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(
        file.take_calls(),
        [Call::Store(0), Call::Store(1), Call::Store(2)]
    );
    assert!(!fh.is_dirty());
    assert_eq!(file.content(2)[0], 0xc2);
    assert_eq!(file.content(1)[1], 0xb2, "the write after the STORE");
    assert_eq!(fh.stats().stores, 5);

    // invalidate in every state: EMPTY, LOADED, DIRTY (LOADING: threads.rs).
    drop(vma);
    assert_eq!(ram.reclaim(), 4);
    let vma = fh.mmap(0, 4).unwrap();
    let p = vma.as_ptr();
    let at = |pg: usize| p.wrapping_add(pg * BLK);
    fh.invalidate_page(0).unwrap(); // EMPTY: nothing happens
    assert_eq!(state(&fh, 0), None);
    assert_eq!(peek(at(1)), 0xb1);
    fh.invalidate_page(1).unwrap(); // LOADED
    assert_eq!(state(&fh, 1), None);
    assert_eq!(vma.mapped_pages(), Vec::<u64>::new());
    poke(at(2), 0xd2);
    fh.invalidate_page(2).unwrap(); // DIRTY: the change is dropped
    assert!(!fh.is_dirty());
    assert_eq!(peek(at(2)), 0xc2);
    assert_eq!(
        file.take_calls(),
        [Call::Load(1), Call::Load(2), Call::Load(2)]
    );

    // close: refused while mapped, then fine; pages are released.
    let (err, fh) = fh.close().unwrap_err();
    assert!(err.to_string().contains("live mapping"), "{err}");
    drop(vma);
    fh.close().unwrap();
    assert_eq!(ram.stats().stats.resident_pages, 0);
    assert_eq!(ram.pages().stats().pages_allocated, 0);
}

/// MARKSTORED apart from STORE marks clean what the STORE stored, and
/// pages no STORE stored (on the caller's word); a page written after the
/// STORE stored it, through any mapping, stays dirty.
#[test]
fn markstored_apart_keeps_pages_written_since_the_store_dirty() {
    let (file, _ram, fh, vma) = setup(8, 4);
    let other = fh.mmap(0, 4).unwrap();
    let at = |m: &Vma, pg: usize| m.as_ptr().wrapping_add(pg * BLK);
    poke(at(&vma, 0), 1);
    poke(at(&vma, 1), 1);
    fh.dirty_writeout(WriteoutFlags::STORE).unwrap();
    poke(at(&vma, 2), 1); // dirtied after the STORE: never stored
    poke(at(&other, 1).wrapping_add(1), 2); // through a mapping it was not in
    fh.dirty_writeout(WriteoutFlags::MARKSTORED).unwrap();
    assert_eq!(fh.dirty_blocks(), [1]);
    assert_eq!(file.content(1)[1], MemFile::initial(1));
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(file.content(1)[..2], [1, 2]);
    assert_eq!(
        file.content(2)[0],
        MemFile::initial(2),
        "marked, not stored"
    );
    assert!(!fh.is_dirty());
}

#[test]
fn overlapping_mappings_are_one_memory() {
    let (file, _ram, fh) = handle(16);
    let a = fh.mmap(0, 4).unwrap();
    let b = fh.mmap(2, 4).unwrap();
    // page 3: a[3] and b[1].
    poke(a.as_ptr().wrapping_add(3 * BLK + 7), 0x33);
    assert_eq!(peek(b.as_ptr().wrapping_add(BLK + 7)), 0x33);
    assert_eq!(file.take_calls(), [Call::Load(3)]);
    // a write through the other mapping dirties the same page.
    poke(b.as_ptr().wrapping_add(8), 0x22); // page 2
    assert_eq!(peek(a.as_ptr().wrapping_add(2 * BLK + 8)), 0x22);
    assert_eq!(fh.dirty_blocks(), [2, 3]);
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(file.content(3)[7], 0x33);
    assert_eq!(
        prot_at(a.as_ptr() as usize + 3 * BLK).as_deref(),
        Some("r--s")
    );
    assert_eq!(prot_at(b.as_ptr() as usize + BLK).as_deref(), Some("r--s"));
}

#[test]
fn handles_of_one_file_have_their_own_changes() {
    let file = mem_file(BLK);
    let ram = ram(16);
    let fh1 = open(&file, &ram);
    let fh2 = open(&file, &ram);
    let v1 = fh1.mmap(0, 1).unwrap();
    let v2 = fh2.mmap(0, 1).unwrap();
    poke(v1.as_ptr(), 0x11);
    assert_eq!(peek(v2.as_ptr()), MemFile::initial(0));
    assert!(!fh2.is_dirty());
}

#[test]
fn failed_store_loses_nothing_and_retries() {
    let (file, _ram, fh, vma) = setup(16, 4);
    for pg in 0..4 {
        vma.write_at(pg * BLK, &[0x40 + pg as u8]).unwrap();
    }
    file.take_calls();
    file.on_store(|blk, _| {
        if blk == 2 {
            Err("disk full".into())
        } else {
            Ok(())
        }
    });
    let err = fh
        .dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("block 2") && msg.contains("disk full"),
        "{msg}"
    );
    assert_eq!(
        file.take_calls(),
        [Call::Store(0), Call::Store(1), Call::Store(2)]
    );
    assert_eq!(fh.dirty_blocks(), [0, 1, 2, 3]);
    // The handle stays usable.
    vma.write_at(3 * BLK + 1, &[0x99]).unwrap();
    file.on_store(|_, _| Ok(()));
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(
        file.take_calls(),
        [
            Call::Store(0),
            Call::Store(1),
            Call::Store(2),
            Call::Store(3)
        ]
    );
    for pg in 0..4u64 {
        assert_eq!(file.content(pg)[0], 0x40 + pg as u8);
    }
    assert_eq!(file.content(3)[1], 0x99);
    assert!(!fh.is_dirty());
}

#[test]
fn prefault_makes_kernel_io_into_the_mapping_work() {
    use std::io::{Read, Write};
    let (_file, _ram, fh, vma) = setup(16, 2);
    let mut tmp = tempfile();
    tmp.write_all(&[7u8; 100]).unwrap();
    // Without prefault read(2) into a not-yet-loaded page fails with EFAULT.
    let mut f = std::fs::File::open(tmp_path()).unwrap();
    // SAFETY: nothing else accesses these bytes while the slice lives.
    let dst = unsafe { &mut vma.as_mut_slice()[..100] };
    let err = f.read(dst).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    vma.prefault(0..100, bigfile::virtmem::Access::Write)
        .unwrap();
    let mut f = std::fs::File::open(tmp_path()).unwrap();
    // SAFETY: as above.
    let dst = unsafe { &mut vma.as_mut_slice()[..100] };
    assert_eq!(f.read(dst).unwrap(), 100);
    let mut got = [0u8; 100];
    vma.read_at(0, &mut got).unwrap();
    assert_eq!(got, [7u8; 100]);
    assert_eq!(fh.dirty_blocks(), [0]);
    let _ = std::fs::remove_file(tmp_path());
}

fn tmp_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("bigfile-it-prefault-{}", std::process::id()))
}

fn tempfile() -> std::fs::File {
    std::fs::File::create(tmp_path()).unwrap()
}

#[test]
fn loader_can_drop_another_mapping_from_inside_a_fault() {
    let (file, _ram, fh) = handle(16);
    let other = fh.mmap(0, 2).unwrap();
    poke(other.as_ptr(), 0x5a); // page 0 dirty, mapped in `other`
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(other)));
    {
        let slot = slot.clone();
        file.on_load(move |_, _| {
            // The last reference to `other` goes away inside this fault.
            drop(slot.lock().unwrap().take());
            Ok(())
        });
    }
    let vma = fh.mmap(0, 2).unwrap();
    assert_eq!(peek(vma.as_ptr().wrapping_add(BLK)), MemFile::initial(1));
    assert!(slot.lock().unwrap().is_none());
    assert_eq!(fh.mapping_count(), 1);
    assert_eq!(
        peek(vma.as_ptr()),
        0x5a,
        "the unmapped mapping's change stays in the handle"
    );
}

/// A handle is a snapshot of its file only as far as the file is one: a
/// clean page reclaimed is loaded again from the storage, which another
/// writer may have changed meanwhile; `invalidate_page` shows the change at
/// once.
#[test]
fn a_clean_page_shows_what_the_storage_holds_at_its_next_load() {
    let (file, ram, fh, vma) = setup(8, 2);
    assert_eq!(peek(vma.as_ptr()), MemFile::initial(0));
    file.put(0, vec![7; BLK]);
    assert_eq!(peek(vma.as_ptr()), MemFile::initial(0), "the page loaded");
    assert_eq!(ram.reclaim(), 1);
    assert_eq!(peek(vma.as_ptr()), 7, "loaded again after a reclaim");
    file.put(0, vec![8; BLK]);
    fh.invalidate_page(0).unwrap();
    assert_eq!(peek(vma.as_ptr()), 8);
}
