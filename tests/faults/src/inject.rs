//! Injected failures: the Nth call of each failure point fails.
//!
//! For each failure point (see `POINTS`) and each seed, a scripted workload
//! (deterministic: same seed, one thread) runs once with the point counting
//! its calls (C), then once for every N in 1..=C+1 with the Nth call failing
//! (the last run reaches no Nth call and must simply succeed). The workload
//! maps, reads and writes blocks, writes out, discards, invalidates,
//! reclaims under a budget of a few pages, unmaps and maps again, and
//! reopens its handle, always through calls that return errors; an error is
//! retried once (the injected failure is spent by then, so the retry must
//! succeed) and its effect recorded in the model as the documented semantics
//! say. After every step the handle's dirty list, every page's mapping and
//! protection, and the RAM pages held are checked, and every `storeblk`
//! checks that its block is read-only everywhere; after each run, with
//! injection off, every block is read back through the handle, written out,
//! read back through a fresh handle and compared in the backing store, and
//! the process must hold no RAM, descriptors, mappings or fault
//! registrations that it did not hold before.
//!
//! A failure inside a page fault taken by a plain memory access cannot come
//! back as a value: the fault-path scenarios check that a transient loadblk
//! failure is retried there, and that the others end in SIGBUS with the
//! diagnostic, in a child process (this binary re-executed with
//! `BIGFILE_FAULTS_INJECT_CHILD`). Memory exhaustion for real is `tmpfs.rs`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bigfile_testkit::memory::{access_in, PageAccess};
use bigfile_virtmem::{
    Access, Advice, Error, FaultBackend, FileH, PageState, Ram, Vma, WriteoutFlags,
};

use crate::leaks::{self, Baseline};
use bigfile_testkit::child::{self, Death};
use bigfile_testkit::memfile::BlockError;
use bigfile_testkit::MemFile;

use crate::model::{inject_file, Model, Rng};
use crate::Scenario;

/// Blocks of the file the workload uses.
const NBLK: u64 = 40;
/// The RAM budget, in pages: far fewer than the blocks, so loads reclaim.
const BUDGET_PAGES: u64 = 16;
/// Steps of one workload.
const STEPS: usize = 250;
/// One workload per seed; each point is failed at every call of each.
const SEEDS: [u64; 4] = [0x5eed_b16f_11e5, 2, 0xdead_beef, 0x1234_5678_9abc];

/// Which errors an injected failure of a point may surface as.
#[derive(Clone, Copy)]
enum Expect {
    /// None: the library absorbs the failure (loadblk is retried, a page
    /// whose drop failed is reused).
    Nothing,
    /// Only errors of these kinds (see [`kind`]).
    Only(&'static [&'static str]),
}

struct Point {
    name: &'static str,
    /// The point failing the same step on the userfaultfd backend, where
    /// it is another call (see [`uffd_backend`]); `None`: the same point.
    on_uffd: Option<&'static str>,
    /// The errno the failure carries (`return(ERRNO)`); `None` for the
    /// file's own points, which fail with their own error.
    errno: Option<(i32, &'static str)>,
    expect: Expect,
}

const POINTS: &[Point] = &[
    // Out of memory at allocation: clean pages are reclaimed and the
    // allocation retried; with none left, prefault says the RAM is
    // exhausted (not the budget).
    Point {
        name: "ram::alloc_page",
        on_uffd: None,
        errno: Some((libc::ENOSPC, "ENOSPC")),
        expect: Expect::Only(&["RamExhausted"]),
    },
    Point {
        name: "ram::alloc_page",
        on_uffd: None,
        errno: Some((libc::EIO, "EIO")),
        expect: Expect::Only(&["Os"]),
    },
    Point {
        name: "ram::map_page",
        on_uffd: Some("virtmem::uffd_continue"),
        errno: Some((libc::ENOMEM, "ENOMEM")),
        expect: Expect::Only(&["Os"]),
    },
    Point {
        name: "ram::window",
        on_uffd: None,
        errno: Some((libc::ENOMEM, "ENOMEM")),
        expect: Expect::Only(&["Os"]),
    },
    Point {
        name: "ram::drop_page",
        on_uffd: None,
        errno: Some((libc::EIO, "EIO")),
        expect: Expect::Nothing,
    },
    Point {
        name: "virtmem::mmap",
        on_uffd: None,
        errno: Some((libc::ENOMEM, "ENOMEM")),
        expect: Expect::Only(&["Os"]),
    },
    Point {
        name: "virtmem::mprotect",
        on_uffd: Some("virtmem::uffd_writeprotect"),
        errno: Some((libc::ENOMEM, "ENOMEM")),
        expect: Expect::Only(&["Os"]),
    },
    // A transient loadblk failure is retried by the LoadPolicy.
    Point {
        name: "file::loadblk",
        on_uffd: None,
        errno: None,
        expect: Expect::Nothing,
    },
    // A failed storeblk stops the writeout with Error::Store, pages stay dirty.
    Point {
        name: "file::storeblk",
        on_uffd: None,
        errno: None,
        expect: Expect::Only(&["Store"]),
    },
];

impl Point {
    /// The failure point armed on this process's backend.
    fn point(&self) -> &'static str {
        self.on_uffd.filter(|_| uffd_backend()).unwrap_or(self.name)
    }
}

/// Whether a RAM made here is on the userfaultfd backend, which serves a
/// first access by `UFFDIO_CONTINUE` where the signal backend maps the page
/// (`ram::map_page`), and changes a page's access by `UFFDIO_WRITEPROTECT`
/// where the signal backend calls mprotect.
fn uffd_backend() -> bool {
    static UFFD: OnceLock<bool> = OnceLock::new();
    *UFFD.get_or_init(|| {
        let ps = bigfile_ram::os_page_size();
        Ram::from_spec(&format!("memfd,pagesize={ps}"))
            .is_ok_and(|ram| ram.fault_backend() == FaultBackend::Userfaultfd)
    })
}

pub fn scenarios() -> Vec<Scenario> {
    // This binary re-executed by a fault-path scenario: run that child's
    // body, which must die.
    if let Ok(name) = std::env::var(CHILD_ENV) {
        fault_child(&name);
        eprintln!("faults: inject child {name:?} returned instead of dying");
        std::process::exit(101);
    }
    let mut v: Vec<Scenario> = POINTS
        .iter()
        .map(|p| {
            let name = match p.errno {
                Some((_, e)) => format!("inject/{}({e})", p.point()),
                None => format!("inject/{}", p.point()),
            };
            Scenario::new(name, move || nth_call_fails(p))
        })
        .collect();
    v.push(Scenario::new(
        "inject/fault-path/file::loadblk",
        fault_path_transient_load,
    ));
    for c in FAULT_CHILDREN {
        v.push(Scenario::new(c.scenario_name(), move || run_fault_child(c)));
    }
    v.push(Scenario::new("inject/tiny-tmpfs", crate::tmpfs::tiny_tmpfs));
    v
}

/// The variant name of an error, to compare with what a point may surface.
fn kind(e: &Error) -> &'static str {
    match e {
        Error::Store { .. } => "Store",
        Error::Load { .. } => "Load",
        Error::BudgetExhausted { .. } => "BudgetExhausted",
        Error::Os { .. } => "Os",
        Error::Ram(r) if r.is_exhausted() => "RamExhausted",
        Error::Ram(_) => "Ram",
        Error::Fault(_) => "Fault",
        _ => "other",
    }
}

fn nth_call_fails(p: &Point) -> Result<String, String> {
    let _scenario = fail::FailScenario::setup();
    // A first run warms up what the process sets up once (the signal
    // handler, allocator arenas) so that the baseline is the steady state.
    run_once(p, SEEDS[0], None, false)?;
    let mut surfaced: BTreeMap<&'static str, usize> = BTreeMap::new();
    let (mut total, mut absorbed) = (0, 0);
    for seed in SEEDS {
        let c = count_calls(p, seed)?;
        total += c;
        for n in 1..=c + 1 {
            let errors = run_once(p, seed, Some(n), n <= c)
                .map_err(|e| format!("seed {seed:#x}, N={n} of {c}: {e}"))?;
            let at = || format!("seed {seed:#x}, N={n} of {c}");
            if n <= c && errors.is_empty() {
                absorbed += 1;
            }
            if n > c && !errors.is_empty() {
                return Err(format!(
                    "{}: no call failed, yet errors surfaced: {errors:?}",
                    at()
                ));
            }
            if errors.len() > 1 {
                return Err(format!(
                    "{}: one injected failure surfaced {} times: {errors:?}",
                    at(),
                    errors.len()
                ));
            }
            for k in errors {
                let ok = match p.expect {
                    Expect::Nothing => false,
                    Expect::Only(kinds) => kinds.contains(&k),
                };
                if !ok {
                    return Err(format!(
                        "{}: the failure surfaced as Error::{k}, which this point must not cause",
                        at()
                    ));
                }
                *surfaced.entry(k).or_default() += 1;
            }
        }
    }
    let shown: Vec<String> = surfaced.iter().map(|(k, n)| format!("{k}×{n}")).collect();
    let surfaced = if shown.is_empty() {
        "no error surfaced".to_owned()
    } else {
        format!(
            "{} surfaced as errors ({}) and were retried",
            total - absorbed,
            shown.join(" ")
        )
    };
    Ok(format!(
        "{} workloads, {total} calls failed in turn: {surfaced}, {absorbed} absorbed",
        SEEDS.len()
    ))
}

/// How many times the workload of `seed` calls `p`: it is deterministic, so
/// every injected run reaches the Nth call for N up to this, and no further.
fn count_calls(p: &Point, seed: u64) -> Result<usize, String> {
    let calls = Arc::new(AtomicUsize::new(0));
    {
        let calls = calls.clone();
        fail::cfg_callback(p.point(), move || {
            calls.fetch_add(1, Ordering::Relaxed);
        })?;
    }
    run_once(p, seed, None, false).map_err(|e| format!("seed {seed:#x}, no failure: {e}"))?;
    let c = calls.load(Ordering::Relaxed);
    if c == 0 {
        return Err(format!(
            "the workload of seed {seed:#x} never reaches {}",
            p.point()
        ));
    }
    Ok(c)
}

/// One run: the workload with the `n`th call of `p` failing (or none), then
/// the checks with injection off. `fires` says whether the run reaches the
/// `n`th call. Returns the kinds of errors that surfaced.
fn run_once(
    p: &Point,
    seed: u64,
    n: Option<usize>,
    fires: bool,
) -> Result<Vec<&'static str>, String> {
    let baseline = Baseline::take()?;
    if let Some(n) = n {
        let ret = match p.errno {
            Some((errno, _)) => format!("1*return({errno})"),
            None => "1*return".to_owned(),
        };
        let actions = if n == 1 {
            ret
        } else {
            format!("{}*off->{ret}", n - 1)
        };
        fail::cfg(p.point(), &actions)?;
    }
    let mut w = World::new(seed)?;
    w.stray_ok = p.name == "ram::drop_page";
    let ran = w.workload();
    fail::remove(p.point());
    ran?;
    let errors = std::mem::take(&mut w.errors);
    let ram = w.ram.clone();
    let used = w.finish()?;
    // The transient loadblk failure was retried by the load policy: one
    // failed attempt, counted, and no error.
    let load_errors = ram.stats().stats.load_errors;
    drop(ram);
    if p.name == "file::loadblk" && load_errors != u64::from(fires) {
        return Err(format!(
            "{load_errors} failed loadblk attempts counted, expected {}",
            u64::from(fires)
        ));
    }
    baseline.check(&used)?;
    Ok(errors)
}

/// The workload's state: the file, its RAM, a handle, its mappings, the model.
struct World {
    ps: usize,
    file: Arc<MemFile>,
    ram: Ram,
    fh: Option<FileH>,
    vmas: Vec<Vma>,
    model: Model,
    /// Address ranges of every mapping made, to check nothing is left there.
    used: Vec<Range<usize>>,
    /// Kinds of the errors that surfaced (each retried successfully).
    errors: Vec<&'static str>,
    rng: Rng,
    /// Whether one RAM page may be held beyond the resident ones (see
    /// `check_state`): set by the scenario failing `ram::drop_page`.
    stray_ok: bool,
    /// The RAM is on the userfaultfd backend (see `page_access`).
    uffd: bool,
}

impl World {
    fn new(seed: u64) -> Result<World, String> {
        let ps = bigfile_ram::os_page_size();
        let ram = Ram::from_spec(&format!("memfd,pagesize={ps}"))
            .map_err(|e| format!("RAM: {e}"))?
            .with_budget(BUDGET_PAGES * ps as u64);
        let file = inject_file(ps);
        Ok(World {
            ps,
            file,
            fh: None,
            vmas: Vec::new(),
            model: Model::new(ps),
            used: Vec::new(),
            errors: Vec::new(),
            rng: Rng::new(seed),
            stray_ok: false,
            uffd: ram.fault_backend() == FaultBackend::Userfaultfd,
            ram,
        })
    }

    fn fh(&self) -> &FileH {
        self.fh.as_ref().expect("the workload has a handle")
    }

    /// Run `f`; on an error record its kind and run `f` once more, which
    /// must succeed (the single injected failure is spent).
    fn retry<T>(
        errors: &mut Vec<&'static str>,
        what: &str,
        mut f: impl FnMut() -> bigfile_virtmem::Result<T>,
    ) -> Result<T, String> {
        match f() {
            Ok(v) => Ok(v),
            Err(first) => {
                errors.push(kind(&first));
                f().map_err(|e| {
                    format!("{what}: failed again after the injected failure was spent: {e} (first: {first})")
                })
            }
        }
    }

    fn open(&mut self) -> Result<(), String> {
        let fh =
            FileH::open(self.file.clone(), Some(&self.ram)).map_err(|e| format!("open: {e}"))?;
        self.fh = Some(fh);
        Ok(())
    }

    fn map(&mut self, pgoffset: u64, pglen: u64) -> Result<(), String> {
        let fh = self.fh.as_ref().expect("the workload has a handle");
        let vma = Self::retry(&mut self.errors, "mmap", || fh.mmap(pgoffset, pglen))?;
        self.used.push(vma.addr_range());
        self.vmas.push(vma);
        Ok(())
    }

    fn workload(&mut self) -> Result<(), String> {
        self.open()?;
        self.map(0, NBLK)?;
        self.map(4, 8)?;
        let layout = Arc::new(Mutex::new(Vec::new()));
        let violations = Arc::new(Mutex::new(Vec::new()));
        self.file.on_store(store_check(
            layout.clone(),
            self.ps,
            self.uffd,
            violations.clone(),
        ));
        for step in 0..STEPS {
            *layout.lock().unwrap() = self
                .vmas
                .iter()
                .map(|v| (v.pgoffset(), v.as_ptr() as usize, v.pglen()))
                .collect();
            let what = self.step(step)?;
            if let Some(v) = violations.lock().unwrap().pop() {
                return Err(format!("step {step} ({what}): {v}"));
            }
            self.check_state()
                .map_err(|e| format!("step {step} ({what}): {e}"))?;
        }
        Ok(())
    }

    /// One step, chosen at random; returns what it did.
    fn step(&mut self, step: usize) -> Result<String, String> {
        if step == STEPS / 2 {
            // Close the handle with changes in it: they are dropped.
            self.vmas.clear();
            self.fh = None;
            self.model.dirty.clear();
            self.open()?;
            self.map(0, NBLK)?;
            return Ok("reopen".into());
        }
        let ps = self.ps;
        match self.rng.below(100) {
            0..=34 => {
                let (i, idx, blk) = self.pick();
                let vma = &self.vmas[i];
                Self::retry(&mut self.errors, "prefault read", || {
                    vma.prefault(idx * ps..(idx + 1) * ps, Access::Read)
                })?;
                let mut buf = vec![0; ps];
                vma.read_at(idx * ps, &mut buf)
                    .map_err(|e| format!("read_at: {e}"))?;
                if buf != self.model.view(blk) {
                    return Err(format!(
                        "block {blk} read through mapping {i} differs from the model"
                    ));
                }
                Ok(format!("read {blk}"))
            }
            35..=64 => {
                let (i, idx, blk) = self.pick();
                if !self.model.dirty.contains_key(&blk)
                    && self.model.dirty.len() as u64 >= BUDGET_PAGES - 1
                {
                    // Keep one page of the budget for loads: with every page
                    // dirty a load fails by design (tiny-tmpfs tests that).
                    self.writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)?;
                }
                let len = 1 + self.rng.below(64) as usize;
                let off = self.rng.below((ps - len) as u64) as usize;
                let data: Vec<u8> = (0..len).map(|_| self.rng.next_u64() as u8).collect();
                let vma = &self.vmas[i];
                Self::retry(&mut self.errors, "prefault write", || {
                    vma.prefault(idx * ps + off..idx * ps + off + len, Access::Write)
                })?;
                vma.write_at(idx * ps + off, &data)
                    .map_err(|e| format!("write_at: {e}"))?;
                self.model.write(blk, off, &data);
                Ok(format!("write {blk}"))
            }
            65..=72 => {
                self.writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)?;
                Ok("writeout STORE|MARKSTORED".into())
            }
            73..=77 => {
                self.writeout(WriteoutFlags::STORE)?;
                self.writeout(WriteoutFlags::MARKSTORED)?;
                Ok("writeout STORE, then MARKSTORED".into())
            }
            78..=82 => {
                let fh = self.fh.as_ref().expect("a handle");
                Self::retry(&mut self.errors, "discard", || fh.dirty_discard())?;
                self.model.dirty.clear();
                Ok("discard".into())
            }
            83..=88 => {
                let blk = self.rng.below(NBLK);
                let fh = self.fh.as_ref().expect("a handle");
                Self::retry(&mut self.errors, "invalidate", || fh.invalidate_page(blk))?;
                self.model.dirty.remove(&blk);
                Ok(format!("invalidate {blk}"))
            }
            89..=93 => {
                self.ram.reclaim();
                Ok("reclaim".into())
            }
            _ => {
                if self.vmas.len() > 1 || self.rng.below(2) == 0 {
                    let i = self.rng.below(self.vmas.len() as u64) as usize;
                    self.vmas.swap_remove(i);
                }
                if self.vmas.len() < 3 {
                    let pgoffset = self.rng.below(NBLK);
                    let pglen = 1 + self.rng.below(NBLK - pgoffset);
                    self.map(pgoffset, pglen)?;
                }
                if self.vmas.is_empty() {
                    self.map(0, NBLK)?;
                }
                Ok("unmap and map".into())
            }
        }
    }

    /// A random mapping, page index in it, and the file block there.
    fn pick(&mut self) -> (usize, usize, u64) {
        let i = self.rng.below(self.vmas.len() as u64) as usize;
        let idx = self.rng.below(self.vmas[i].pglen()) as usize;
        (i, idx, self.vmas[i].pgoffset() + idx as u64)
    }

    /// Write out with `flags`; an error is checked against the documented
    /// semantics (every page stays dirty; a block before the one whose
    /// storeblk failed was stored, the others hold old or new data), then the
    /// writeout is retried and must succeed.
    fn writeout(&mut self, flags: WriteoutFlags) -> Result<(), String> {
        let fh = self.fh.as_ref().expect("a handle");
        if let Err(first) = fh.dirty_writeout(flags) {
            self.errors.push(kind(&first));
            let dirty = fh.dirty_blocks();
            if dirty != self.model.dirty_blocks() {
                return Err(format!(
                    "after a failed writeout ({first}) dirty blocks are {dirty:?}, the model has {:?}",
                    self.model.dirty_blocks()
                ));
            }
            let failed_at = match &first {
                Error::Store { blk, .. } => Some(*blk),
                _ => None,
            };
            for (&blk, data) in &self.model.dirty {
                let stored = self.file.content(blk);
                let old = self.model.committed(blk);
                let ok = match failed_at {
                    Some(f) if blk < f => stored == *data,
                    Some(_) => stored == old,
                    None => stored == old || stored == *data,
                };
                if !ok {
                    return Err(format!(
                        "after a failed writeout ({first}) block {blk} in the file is neither as documented"
                    ));
                }
                self.model.committed.insert(blk, stored);
            }
            fh.dirty_writeout(flags).map_err(|e| {
                format!("writeout failed again after the injected failure was spent: {e} (first: {first})")
            })?;
        }
        if flags.contains(WriteoutFlags::STORE) {
            for (&blk, data) in &self.model.dirty {
                self.model.committed.insert(blk, data.clone());
            }
        }
        if flags.contains(WriteoutFlags::MARKSTORED) {
            self.model.dirty.clear();
        }
        Ok(())
    }

    /// The handle's dirty list is the model's; every page of every mapping is
    /// mapped as its state says: clean pages read-only, pages not mapped in
    /// (by the library's account) inaccessible (the reservation on the signal
    /// backend, not present on the userfaultfd backend); RAM pages held
    /// equal resident pages counted.
    fn check_state(&self) -> Result<(), String> {
        let fh = self.fh();
        let dirty = fh.dirty_blocks();
        if dirty != self.model.dirty_blocks() {
            return Err(format!(
                "dirty blocks are {dirty:?}, the model has {:?}",
                self.model.dirty_blocks()
            ));
        }
        let held = self.ram.pages().stats().pages_allocated;
        let resident = self.ram.stats().stats.resident_pages;
        // A page whose drop failed stays held until the next allocation reuses it.
        let stray = u64::from(self.stray_ok);
        if !(resident..=resident + stray).contains(&held) {
            return Err(format!(
                "the RAM holds {held} pages but {resident} are resident"
            ));
        }
        let maps = leaks::maps()?;
        for (i, vma) in self.vmas.iter().enumerate() {
            let mapped = vma.mapped_pages();
            for idx in 0..vma.pglen() {
                let blk = vma.pgoffset() + idx;
                let addr = vma.as_ptr() as usize + idx as usize * self.ps;
                let Some(m) = maps.iter().find(|m| m.range.contains(&addr)) else {
                    return Err(format!("mapping {i}: block {blk} is not mapped at all"));
                };
                let state = fh.page_state(blk);
                let access = page_access(&m.perms, addr, self.uffd);
                if mapped.contains(&blk) {
                    let ok = m.path.contains("bigfile-ram")
                        && match state {
                            Some(PageState::Loaded) => access == PageAccess::Read,
                            Some(PageState::Dirty) => access != PageAccess::None,
                            _ => false,
                        };
                    if !ok {
                        return Err(format!(
                            "mapping {i}: block {blk} in state {state:?} is mapped {} {} ({access:?})",
                            m.perms, m.path
                        ));
                    }
                } else if access != PageAccess::None {
                    // Not mapped in: the inaccessible reservation, or a page
                    // that could not be replaced by it and was made inaccessible.
                    return Err(format!(
                        "mapping {i}: block {blk} (state {state:?}) is not mapped in, yet the address shows {} {} ({access:?})",
                        m.perms, m.path
                    ));
                }
            }
        }
        Ok(())
    }

    /// With injection off: read everything back, write out, read back through
    /// a fresh handle, compare the backing store, drop everything and check
    /// the RAM is empty. Returns the address ranges used by mappings.
    fn finish(mut self) -> Result<Vec<Range<usize>>, String> {
        let ps = self.ps;
        self.vmas.clear();
        self.map(0, NBLK)?;
        let fail = |what: String| Err(format!("after the run: {what}"));
        for blk in 0..NBLK {
            let got =
                read_block(&self.vmas[0], blk, ps).map_err(|e| format!("after the run: {e}"))?;
            if got != self.model.view(blk) {
                return fail(format!("block {blk} differs from the model in the handle"));
            }
        }
        // Reading every block allocated pages, so a stray page was reused.
        self.stray_ok = false;
        self.check_state()
            .map_err(|e| format!("after the run: {e}"))?;
        let errors = self.errors.len();
        self.writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)?;
        if self.errors.len() != errors {
            return fail("the final writeout failed with injection off".into());
        }
        for blk in 0..NBLK {
            if self.file.content(blk) != self.model.committed(blk) {
                return fail(format!("block {blk} in the file differs from the model"));
            }
        }
        self.vmas.clear();
        self.fh = None;
        let st = self.ram.stats();
        if st.stats.resident_pages != 0 || st.stats.dirty_pages != 0 || st.resident_bytes != 0 {
            return fail(format!(
                "the handle is closed but the RAM still counts {st:?}"
            ));
        }
        let held = self.ram.pages().stats().pages_allocated;
        if held != 0 {
            return fail(format!(
                "the handle is closed but {held} RAM pages are allocated"
            ));
        }
        let fresh =
            FileH::open(self.file.clone(), Some(&self.ram)).map_err(|e| format!("reopen: {e}"))?;
        let vma = fresh.mmap(0, NBLK).map_err(|e| format!("map: {e}"))?;
        self.used.push(vma.addr_range());
        for blk in 0..NBLK {
            let got = read_block(&vma, blk, ps).map_err(|e| format!("after the run: {e}"))?;
            if got != self.model.committed(blk) {
                return fail(format!(
                    "block {blk} read through a fresh handle differs from the model"
                ));
            }
        }
        drop(vma);
        drop(fresh);
        if !self.errors.is_empty() {
            return fail(format!("errors with injection off: {:?}", self.errors));
        }
        let st = self.ram.stats();
        if st.stats.resident_pages != 0 || self.ram.pages().stats().pages_allocated != 0 {
            return fail(format!(
                "the fresh handle is closed but the RAM still counts {st:?}"
            ));
        }
        Ok(std::mem::take(&mut self.used))
    }
}

/// The check `storeblk` runs: a block being stored is read-only in every
/// mapping (`layout`: first block, address, pages), or a write during the
/// writeout would change it unseen, and be lost once the page is marked
/// clean. What is wrong goes to `violations`; the store goes on.
fn store_check(
    layout: Arc<Mutex<Vec<(u64, usize, u64)>>>,
    ps: usize,
    uffd: bool,
    violations: Arc<Mutex<Vec<String>>>,
) -> impl Fn(u64, &[u8]) -> Result<(), BlockError> + Send + Sync + 'static {
    let check = move |blk| {
        let maps = match leaks::maps() {
            Ok(m) => m,
            Err(e) => return Some(e),
        };
        let layout = layout.lock().unwrap_or_else(|p| p.into_inner());
        for &(pgoffset, start, pglen) in layout.iter() {
            if (pgoffset..pgoffset + pglen).contains(&blk) {
                let addr = start + (blk - pgoffset) as usize * ps;
                if let Some(m) = maps.iter().find(|m| m.range.contains(&addr)) {
                    if page_access(&m.perms, addr, uffd) == PageAccess::Write {
                        return Some(format!(
                            "storeblk of block {blk} while it is mapped {} at {addr:#x}",
                            m.perms
                        ));
                    }
                }
            }
        }
        None
    };
    move |blk, _| {
        if let Some(problem) = check(blk) {
            violations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(problem);
        }
        Ok(())
    }
}

fn read_block(vma: &Vma, blk: u64, ps: usize) -> Result<Vec<u8>, String> {
    let idx = (blk - vma.pgoffset()) as usize;
    vma.prefault(idx * ps..(idx + 1) * ps, Access::Read)
        .map_err(|e| format!("prefault block {blk}: {e}"))?;
    let mut buf = vec![0; ps];
    vma.read_at(idx * ps, &mut buf)
        .map_err(|e| format!("read block {blk}: {e}"))?;
    Ok(buf)
}

/// Names the fault-path child to run when this binary is re-executed.
const CHILD_ENV: &str = "BIGFILE_FAULTS_INJECT_CHILD";

/// A failure inside a page fault taken by a plain memory access: nothing can
/// return an error there, so the documented end is SIGBUS for the faulting
/// thread with a diagnostic naming the block and the failed call.
struct FaultChild {
    name: &'static str,
    point: &'static str,
    errno: i32,
    /// Read block 0 before arming, so the failing fault is a write to a
    /// page mapped read-only (upgrade by mprotect) rather than a first load.
    preload: bool,
    access: Access,
    /// What the diagnostic on stderr must contain.
    message: &'static str,
    /// The point failing the same step on the userfaultfd backend and
    /// what its diagnostic names (see [`uffd_backend`]).
    on_uffd: Option<(&'static str, &'static str)>,
}

impl FaultChild {
    /// The failure point armed and the diagnostic expected on this
    /// process's backend.
    fn point_and_message(&self) -> (&'static str, &'static str) {
        self.on_uffd
            .filter(|_| uffd_backend())
            .unwrap_or((self.point, self.message))
    }

    /// The scenario's name, naming the point armed.
    fn scenario_name(&self) -> String {
        let name = self
            .name
            .replacen(self.point, self.point_and_message().0, 1);
        format!("inject/fault-path/{name}")
    }
}

const FAULT_CHILDREN: &[FaultChild] = &[
    FaultChild {
        name: "ram::map_page(ENOMEM)",
        point: "ram::map_page",
        errno: libc::ENOMEM,
        preload: false,
        access: Access::Read,
        message: "map page",
        on_uffd: Some(("virtmem::uffd_continue", "UFFDIO_CONTINUE")),
    },
    FaultChild {
        name: "ram::alloc_page(EIO)",
        point: "ram::alloc_page",
        errno: libc::EIO,
        preload: false,
        access: Access::Read,
        message: "allocating RAM for block 0",
        on_uffd: None,
    },
    FaultChild {
        name: "ram::alloc_page(ENOSPC)",
        point: "ram::alloc_page",
        errno: libc::ENOSPC,
        preload: false,
        access: Access::Write,
        message: "no clean page to reclaim",
        on_uffd: None,
    },
    FaultChild {
        name: "virtmem::mprotect(ENOMEM)",
        point: "virtmem::mprotect",
        errno: libc::ENOMEM,
        preload: true,
        access: Access::Write,
        message: "mprotect",
        on_uffd: Some(("virtmem::uffd_writeprotect", "UFFDIO_WRITEPROTECT")),
    },
];

/// Spawn this binary as child `c`; it must die by SIGBUS after its marker,
/// with the diagnostic.
fn run_fault_child(c: &FaultChild) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.env(CHILD_ENV, c.name);
    let ended = child::run(cmd, child::TIMEOUT)?;
    Death::by(libc::SIGBUS)
        .stderr(&["bigfile:", c.point_and_message().1])
        .absent(&["survived"])
        .check(&ended)?;
    if !ended.stdout.contains("armed") {
        return Err(format!("died in the wrong place\n{}", ended.describe()));
    }
    let diag = ended.stderr.lines().find(|l| l.starts_with("bigfile:"));
    Ok(format!("SIGBUS as documented: {}", diag.unwrap_or("")))
}

fn fault_child(name: &str) {
    let Some(c) = FAULT_CHILDREN.iter().find(|c| c.name == name) else {
        eprintln!("faults: no inject child {name:?}");
        return;
    };
    // No core file: the death is expected.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a valid struct has no memory-safety preconditions.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    let _scenario = fail::FailScenario::setup();
    let ps = bigfile_ram::os_page_size();
    let ram = Ram::from_spec(&format!("memfd,pagesize={ps}")).expect("RAM");
    let fh = FileH::open(inject_file(ps), Some(&ram)).expect("open");
    let vma = fh.mmap(0, 2).expect("mmap");
    let p = vma.as_ptr();
    if c.preload {
        vma.prefault(0..ps, Access::Read).expect("prefault");
    }
    fail::cfg(c.point_and_message().0, &format!("1*return({})", c.errno)).expect("cfg");
    println!("armed");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // SAFETY: `p` is the start of a live mapping of two pages; the access is
    // served by the fault handler (here: fails, and the process dies).
    unsafe {
        match c.access {
            Access::Read => {
                std::ptr::read_volatile(p);
            }
            Access::Write => std::ptr::write_volatile(p, 1),
        }
    }
    println!("survived");
}

/// A transient loadblk failure inside a page fault taken by a plain memory
/// access is retried by the load policy: for every N, the Nth loadblk of a
/// scan fails once and the scan reads every block right.
fn fault_path_transient_load() -> Result<String, String> {
    let _scenario = fail::FailScenario::setup();
    let ps = bigfile_ram::os_page_size();
    let scan = |armed_at: Option<usize>| -> Result<u64, String> {
        let ram = Ram::from_spec(&format!("memfd,pagesize={ps}"))
            .map_err(|e| e.to_string())?
            .with_budget(BUDGET_PAGES * ps as u64);
        let fh = FileH::open(inject_file(ps), Some(&ram)).map_err(|e| e.to_string())?;
        let vma = fh.mmap(0, NBLK).map_err(|e| e.to_string())?;
        // Every read of both passes a load: no sequential detection (its
        // drop-behind would keep the first pass's first blocks for the
        // second, its read-ahead would load on other threads).
        vma.advise(Advice::Random);
        if let Some(n) = armed_at {
            let a = if n == 1 {
                "1*return".to_owned()
            } else {
                format!("{}*off->1*return", n - 1)
            };
            fail::cfg("file::loadblk", &a)?;
        }
        // Twice over, so that reclaimed blocks load again.
        for blk in (0..NBLK).chain(0..NBLK) {
            let at = blk as usize * ps;
            for off in [0, ps / 2, ps - 1] {
                // SAFETY: inside the live mapping; a read is served by the
                // fault handler, which loads the block.
                let got = unsafe { std::ptr::read_volatile(vma.as_ptr().add(at + off)) };
                if got != crate::model::initial(blk, ps)[off] {
                    fail::remove("file::loadblk");
                    return Err(format!("block {blk} byte {off} differs"));
                }
            }
        }
        fail::remove("file::loadblk");
        Ok(ram.stats().stats.load_errors)
    };
    let calls = 2 * NBLK as usize;
    for n in 1..=calls {
        let errors = scan(Some(n)).map_err(|e| format!("N={n}: {e}"))?;
        if errors != 1 {
            return Err(format!(
                "N={n}: {errors} failed loadblk attempts counted, expected 1"
            ));
        }
    }
    Ok(format!(
        "{calls} loads by plain reads, each failed once in turn: retried, data right"
    ))
}

/// How the page at `addr` (in a mapping of protection `perms`) can be
/// accessed without a fault bigfile serves: from the protection alone on the
/// signal backend (an accessible page is mapped; the kernel fills its
/// page-table entry itself); on the userfaultfd backend (`uffd`), where a
/// mapping is accessible throughout, from whether the page is present and
/// write-protected.
fn page_access(perms: &str, addr: usize, uffd: bool) -> PageAccess {
    if uffd {
        return access_in(Some(perms), addr);
    }
    match perms.get(..2) {
        Some("rw") => PageAccess::Write,
        Some("r-") => PageAccess::Read,
        _ => PageAccess::None,
    }
}
