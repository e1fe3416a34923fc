//! The file-backed BigFile through the whole stack.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bigfile::virtmem::{BigFile, FileBigFile, FileH, WriteoutFlags};

use crate::common::{peek, BLK};

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bigfile-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn sparse_file_round_trip() {
    let path = tmp("sparse");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    let file = Arc::new(FileBigFile::open(&path, BLK).unwrap());
    let fh = FileH::open(file.clone(), None).unwrap();
    let vma = fh.mmap(0, (1u64 << 30) / BLK as u64).unwrap();
    assert_eq!(peek(vma.as_ptr().wrapping_add(12345 * 64)), 0);
    vma.write_at(5000 * BLK + 3, b"hello").unwrap();
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    file.sync().unwrap();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(&data[5000 * BLK + 3..5000 * BLK + 8], b"hello");
    // Only the stored block takes disk space.
    assert!(std::fs::metadata(&path).unwrap().blocks() * 512 <= 4 * BLK as u64);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn short_file_reads_zeros_past_eof_and_grows_on_store() {
    let path = tmp("short");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&[9u8; 100])
        .unwrap();
    let file = Arc::new(FileBigFile::open(&path, BLK).unwrap());
    let fh = FileH::open(file.clone(), None).unwrap();
    let vma = fh.mmap(0, 3).unwrap();
    let mut b = [0u8; 2];
    vma.read_at(99, &mut b).unwrap();
    assert_eq!(b, [9, 0]);
    vma.write_at(2 * BLK, &[5]).unwrap();
    fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * BLK as u64);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn read_only_file_fails_store_cleanly() {
    let path = tmp("ro");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&[1u8; BLK])
        .unwrap();
    let file = Arc::new(FileBigFile::open_readonly(&path, BLK).unwrap());
    let fh = FileH::open(file, None).unwrap();
    let vma = fh.mmap(0, 1).unwrap();
    vma.write_at(0, &[2]).unwrap();
    let err = fh
        .dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("block 0") && msg.contains(&path.display().to_string()),
        "{msg}"
    );
    assert_eq!(fh.dirty_blocks(), [0]);
    let mut b = [0u8];
    vma.read_at(0, &mut b).unwrap();
    assert_eq!(b[0], 2, "the change is still in memory");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn file_shrinking_underneath_reads_zeros_after_reload() {
    let path = tmp("shrink");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&vec![3u8; 2 * BLK])
        .unwrap();
    let file = Arc::new(FileBigFile::open(&path, BLK).unwrap());
    let fh = FileH::open(file.clone(), None).unwrap();
    let vma = fh.mmap(0, 2).unwrap();
    assert_eq!(peek(vma.as_ptr().wrapping_add(BLK)), 3);
    file.file().set_len(BLK as u64).unwrap();
    // Loaded pages keep their data until invalidated...
    assert_eq!(peek(vma.as_ptr().wrapping_add(BLK)), 3);
    fh.invalidate_page(1).unwrap();
    // ...then read what the file has now: zeros past its end.
    assert_eq!(peek(vma.as_ptr().wrapping_add(BLK)), 0);
    assert_eq!(file.name(), path.display().to_string());
    std::fs::remove_file(&path).unwrap();
}
