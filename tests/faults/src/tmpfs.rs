//! Memory exhaustion for real: a RAM on a tmpfs of a few pages (mounted for
//! the scenario, as root), with a budget far above it, so that running out
//! comes from the filesystem (ENOSPC from fallocate) and not from the budget.

use std::sync::Arc;

use bigfile_virtmem::{Access, Error, FileH, Ram, Vma, WriteoutFlags};

use crate::leaks::Baseline;
use bigfile_testkit::mount::Mount;
use bigfile_testkit::MemFile;

use crate::model::{inject_file, Model};

/// Pages the tmpfs holds.
const FS_PAGES: u64 = 16;

/// One file on the tmpfs RAM with its handle, mapping and model.
struct Side {
    file: Arc<MemFile>,
    fh: Option<FileH>,
    vma: Option<Vma>,
    model: Model,
}

impl Side {
    fn new(ram: &Ram, ps: usize, nblk: u64) -> Result<Side, String> {
        let file = inject_file(ps);
        let fh = FileH::open(file.clone(), Some(ram)).map_err(|e| format!("open: {e}"))?;
        let vma = fh.mmap(0, nblk).map_err(|e| format!("mmap: {e}"))?;
        Ok(Side {
            file,
            fh: Some(fh),
            vma: Some(vma),
            model: Model::new(ps),
        })
    }

    fn vma(&self) -> &Vma {
        self.vma.as_ref().expect("mapped")
    }

    fn read(&self, blk: u64) -> Result<(), String> {
        let ps = self.model.blksize;
        let at = blk as usize * ps;
        self.vma()
            .prefault(at..at + ps, Access::Read)
            .map_err(|e| format!("read block {blk}: {e}"))?;
        let mut buf = vec![0; ps];
        self.vma()
            .read_at(at, &mut buf)
            .map_err(|e| e.to_string())?;
        if buf != self.model.view(blk) {
            return Err(format!("block {blk} differs from the model"));
        }
        Ok(())
    }

    fn write(&mut self, blk: u64) -> Result<(), Error> {
        let ps = self.model.blksize;
        let at = blk as usize * ps + 100;
        let data = [blk as u8 ^ 0xa5; 7];
        self.vma().prefault(at..at + data.len(), Access::Write)?;
        self.vma().write_at(at, &data)?;
        self.model.write(blk, 100, &data);
        Ok(())
    }
}

pub fn tiny_tmpfs() -> Result<String, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok("SKIPPED: needs root to mount a tmpfs (CI runs as root)".into());
    }
    let _scenario = fail::FailScenario::setup();
    let baseline = Baseline::take()?;
    let ps = bigfile_ram::os_page_size();
    let fs = Mount::new("tmpfs", &format!("size={},mode=0700", FS_PAGES * ps as u64))?;
    let ram = Ram::from_spec(&format!("shmfs:{},pagesize={ps}", fs.path().display()))
        .map_err(|e| format!("RAM on the tmpfs: {e}"))?
        .with_budget(1 << 30);
    let mut used = Vec::new();
    let result = exhaust(&ram, ps, &mut used);
    let used_after = fs.used();
    drop(ram);
    let detail = result?;
    match used_after? {
        0 => {}
        n => {
            return Err(format!(
                "{n} bytes still used on the tmpfs after everything was closed"
            ))
        }
    }
    drop(fs);
    baseline.check(&used)?;
    Ok(detail)
}

fn exhaust(ram: &Ram, ps: usize, used: &mut Vec<std::ops::Range<usize>>) -> Result<String, String> {
    let nblk = 4 * FS_PAGES;
    // Reading four times what the filesystem holds: each load past the
    // first FS_PAGES finds the RAM exhausted and reclaims a clean page.
    let mut a = Side::new(ram, ps, nblk)?;
    used.push(a.vma().addr_range());
    for blk in 0..nblk {
        a.read(blk)?;
    }
    let reclaims_a = ram.stats().stats.reclaims;
    if reclaims_a < nblk - FS_PAGES {
        return Err(format!(
            "{nblk} blocks read through a RAM of {FS_PAGES} pages with only {reclaims_a} reclaims"
        ));
    }
    // Ten of A's pages dirty; a second handle (its own file on the same
    // tmpfs) then gets ENOSPC from fallocate, not a full handle, and must
    // reclaim clean pages of either handle to go on.
    for blk in 0..10 {
        a.write(blk)
            .map_err(|e| format!("dirtying block {blk}: {e}"))?;
    }
    let mut b = Side::new(ram, ps, nblk)?;
    used.push(b.vma().addr_range());
    for blk in 0..nblk {
        b.read(blk)?;
    }
    // Everything the filesystem holds dirty: the next load has nothing to
    // reclaim and fails with the documented error, leaving the state intact.
    let mut dirtied = 0;
    let exhausted = loop {
        if dirtied == nblk {
            return Err(format!(
                "{} dirty pages fit in a tmpfs of {FS_PAGES} pages",
                10 + nblk
            ));
        }
        match b.write(dirtied) {
            Ok(()) => dirtied += 1,
            Err(e) => break e,
        }
    };
    // The budget has room: it is the RAM's filesystem that is full.
    if !matches!(&exhausted, Error::Ram(r) if r.is_exhausted()) {
        return Err(format!(
            "with every page dirty a load failed with {exhausted}, expected the RAM exhausted"
        ));
    }
    if 10 + dirtied != FS_PAGES {
        return Err(format!(
            "ran out with {} dirty pages in a tmpfs of {FS_PAGES} pages",
            10 + dirtied
        ));
    }
    let fh_a = a.fh.as_ref().expect("open");
    if fh_a.dirty_blocks() != a.model.dirty_blocks()
        || b.fh.as_ref().expect("open").dirty_blocks() != b.model.dirty_blocks()
    {
        return Err("the failed load changed the dirty lists".into());
    }
    // Recovery: writing A out makes its pages clean, hence reclaimable.
    fh_a.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .map_err(|e| format!("writeout: {e}"))?;
    for (&blk, data) in &a.model.dirty {
        a.model.committed.insert(blk, data.clone());
    }
    a.model.dirty.clear();
    // B can dirty more now, taking A's clean pages, and A still reads
    // everything through the pages left.
    for blk in dirtied..dirtied + 4 {
        b.write(blk)
            .map_err(|e| format!("after writing A out, dirtying B's block {blk}: {e}"))?;
    }
    for blk in 0..nblk {
        a.read(blk).map_err(|e| format!("A after recovery: {e}"))?;
    }
    for blk in 0..nblk {
        if a.file.content(blk) != a.model.committed(blk) {
            return Err(format!(
                "A's block {blk} in the file differs from the model"
            ));
        }
    }
    let b_dirty = b.model.dirty.len();
    let fh_b = b.fh.as_ref().expect("open");
    fh_b.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .map_err(|e| format!("writeout B: {e}"))?;
    for (&blk, data) in &b.model.dirty {
        if b.file.content(blk) != *data {
            return Err(format!(
                "B's block {blk} in the file differs from the model"
            ));
        }
    }
    for side in [&mut a, &mut b] {
        side.vma = None;
        side.fh = None;
    }
    let st = ram.stats();
    if st.stats.resident_pages != 0 || ram.pages().stats().pages_allocated != 0 {
        return Err(format!("everything closed but the RAM still counts {st:?}"));
    }
    Ok(format!(
        "{FS_PAGES}-page tmpfs: {} reclaims with the tmpfs full, RAM exhausted with {FS_PAGES} dirty, recovered after writeout ({b_dirty} of B's pages dirty)",
        ram.stats().stats.reclaims
    ))
}
