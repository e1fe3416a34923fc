//! Races: threads faulting, writing, writing out, discarding, invalidating,
//! reclaiming, mapping and unmapping one file handle at once, for a fixed
//! number of iterations with fixed seeds, checked against a model.
//!
//! Each race runs in a child process (this binary with `--child races/NAME`):
//! a crash or a hang in it is a failure of that scenario, not of the suite.
//!
//! The model. Every 8-byte word of the file holds `word(blk, w, version)`
//! (`words.rs`): whoever reads it knows which block, word and version it
//! is. Blocks are of two kinds:
//! - *owned*: each belongs to one owner thread, the only one to write it; the
//!   owner knows exactly what its blocks hold in memory (its writes, or after
//!   an invalidation or discard, what the file has), so its reads check exact
//!   values; other threads check that a value is of the right word and no
//!   newer than the owner has written;
//! - *read-only*: nobody writes them; every read anywhere checks the exact
//!   initial value, while other threads invalidate and reclaim them.
//!
//! Discard drops every owner's changes at a moment the owners cannot know,
//! so it takes a gate (an RwLock) exclusively and owners hold it shared
//! around each operation; after a discard each owner rereads the file for
//! its blocks. Writeout takes no gate: owners write while it runs (their
//! writes wait for it in the fault handler), and what it stores is checked
//! word by word in `storeblk`. After the threads are joined: memory equals
//! the model, a final writeout makes the file equal it, and the RAM's
//! accounting and the process's mappings are back to where they started.
//!
//! On the userfaultfd backend owners also have the kernel read and write
//! their words inside system calls (`write(2)` from the mapping into a
//! pipe, `read(2)` from the pipe into the mapping), and a signaller sends
//! signals to owners all along, so that some arrive while one is blocked in
//! a kernel-mode fault (the kernel then retries that fault over and over
//! until it is served).

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::Duration;

use bigfile_testkit::hugepages::HugePages;
use bigfile_testkit::memory::ram_file_mappings;
use bigfile_testkit::model::Rng;
use bigfile_testkit::MemFile;
use bigfile_virtmem::{Access, Error, FaultBackend, FileH, Ram, Vma, WriteoutFlags};

use crate::coredump::{exit_child, expect_quiet_success, expect_success, last_line};
use crate::leaks;
use crate::python;
use crate::words::{self, decode, pause, read_word, word, write_word};
use crate::Scenario;

/// One race configuration.
#[derive(Clone, Copy)]
struct Config {
    name: &'static str,
    /// The RAM's kind (a bigfile-ram spec without its page size).
    ram: &'static str,
    /// The RAM's page size, the file's block size.
    blk: usize,
    owners: usize,
    blocks_per_owner: u64,
    readonly_blocks: u64,
    budget_pages: u64,
    owner_ops: u32,
    helper_ops: u32,
    seed: u64,
}

const CONFIGS: &[Config] = &[
    // More blocks than the budget: reclaim runs all the time, under loads,
    // writeouts and invalidations.
    Config {
        name: "rust-tight-budget",
        ram: "memfd",
        blk: OS_PAGE,
        owners: 4,
        blocks_per_owner: 6,
        readonly_blocks: 64,
        budget_pages: 48,
        owner_ops: 150_000,
        helper_ops: 6000,
        seed: 0x5eed_0001,
    },
    // Everything fits: pages stay, so faults race on mapping and
    // protection changes rather than on loads.
    Config {
        name: "rust-roomy",
        ram: "memfd",
        blk: OS_PAGE,
        owners: 4,
        blocks_per_owner: 4,
        readonly_blocks: 16,
        budget_pages: 1024,
        owner_ops: 150_000,
        helper_ops: 6000,
        seed: 0x5eed_0002,
    },
    // A hugetlbfs RAM (on userfaultfd where the suite runs on it): 2 MiB
    // pages, each one page-table entry, made present, write-protected and
    // taken away whole; more blocks than the budget. The pool is grown
    // for it (root only: else the race says it was skipped).
    Config {
        name: "rust-hugetlbfs",
        ram: "hugetlbfs",
        blk: 2 << 20,
        owners: 2,
        blocks_per_owner: 2,
        readonly_blocks: 4,
        budget_pages: 6,
        owner_ops: 50_000,
        helper_ops: 1000,
        seed: 0x5eed_0003,
    },
];

/// Longer than this is a hang.
const TIMEOUT: Duration = Duration::from_secs(120);

pub fn scenarios() -> Vec<Scenario> {
    let mut out: Vec<Scenario> = CONFIGS
        .iter()
        .map(|c| {
            let name = c.name;
            let hugetlbfs = c.ram == "hugetlbfs";
            let pool = 2 * c.budget_pages + 2;
            Scenario::new(format!("races/{name}"), move || {
                // The pool, grown while the child runs (under the
                // machine-wide lock every test process takes).
                let _pool = match hugetlbfs.then(|| HugePages::set(pool)).transpose() {
                    Ok(p) => p,
                    Err(why) => return Ok(format!("skipped: {why}")),
                };
                let mut cmd =
                    std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
                cmd.args(["--child", &format!("races/{name}")]);
                let out = expect_quiet_success(cmd, TIMEOUT)?;
                last_line(&out, "races OK")
            })
        })
        .collect();
    out.push(Scenario::new("races/python-gc-in-callbacks", || {
        let out = expect_success(python::command(PYTHON_RACE)?, TIMEOUT)?;
        last_line(&out, "python races OK")
    }));
    out
}

/// The body of child `races/NAME`: runs the race and exits, 0 on success.
pub fn child(name: &str) {
    let Some(cfg) = CONFIGS.iter().find(|c| name == format!("races/{}", c.name)) else {
        eprintln!("faults: no race {name:?}");
        return;
    };
    exit_child(run(cfg), "races OK", &format!("race {name} failed"));
}

/// The OS page: the memfd races' page and block size.
const OS_PAGE: usize = 4096;

/// The race's file: the test kit's memory file, whose blocks start as
/// version 0 of every word, and whose storeblk checks what it is given.
struct RaceFile {
    mem: Arc<MemFile>,
    /// Everything wrong that storeblk saw.
    violations: Arc<Mutex<Vec<String>>>,
}

impl RaceFile {
    /// Blocks from `first_readonly` on are written by nobody: storing one
    /// is an error.
    fn new(first_readonly: u64, blk: usize) -> RaceFile {
        let mem = Arc::new(
            MemFile::new(blk)
                .named("race-file")
                .with_initial(|blk, buf| words::fill(blk, 0, buf)),
        );
        let violations = Arc::new(Mutex::new(Vec::new()));
        // Loads and stores take a little longer now and then, so that
        // other threads find pages LOADING and handles under writeout.
        let jitter = Arc::new(AtomicU64::new(0));
        let load_jitter = jitter.clone();
        mem.on_load(move |_, _| {
            pause(&load_jitter);
            Ok(())
        });
        let seen = violations.clone();
        mem.on_store(move |blk, buf| {
            pause(&jitter);
            if let Some(v) = check_store(blk, buf, first_readonly) {
                seen.lock().unwrap().push(v);
            }
            Ok(())
        });
        RaceFile { mem, violations }
    }

    /// The versions of block `blk`'s words in the file.
    fn versions(&self, blk: u64) -> Vec<u32> {
        words::versions(blk, &self.mem.content(blk))
    }
}

/// What is wrong with storing `buf` as block `blk`, if anything: a block
/// nobody writes, or a word that is not of this block at its place.
fn check_store(blk: u64, buf: &[u8], first_readonly: u64) -> Option<String> {
    if blk >= first_readonly {
        return Some(format!("storeblk of read-only block {blk}"));
    }
    words::misplaced(blk, buf).map(|m| format!("storeblk of {m}"))
}

/// What every thread shares.
struct Shared {
    cfg: Config,
    file: Arc<RaceFile>,
    fh: FileH,
    ram: Ram,
    vma: Vma,
    /// Owners hold it shared around each operation; discard exclusively.
    gate: RwLock<()>,
    /// Bumped by every discard, under the gate.
    discards: AtomicU64,
    /// Per owned block: the highest version its owner has started writing.
    written: Vec<AtomicU32>,
    /// Address ranges of every mapping made, to look for leftovers.
    ranges: Mutex<Vec<(usize, usize)>>,
    skipped_busy: AtomicUsize,
    /// Operations done by all owners so far: helpers pace themselves by it.
    progress: AtomicU64,
    /// Owners still running (one that failed early stops counting too).
    owners_left: AtomicUsize,
    /// Whether owners do kernel I/O on their words (userfaultfd backend).
    kernel_io: bool,
    /// Each owner's kernel thread id while it runs (0 before and after):
    /// the signaller's targets.
    owner_tids: Vec<AtomicI32>,
    /// Kernel writes refused with EFAULT (a known limit of the userfaultfd
    /// backend: a kernel write into a clean page at the moment another
    /// thread maps it for a read, ARCHITECTURE.md), and signals sent.
    kernel_refused: AtomicUsize,
    /// Kernel reads and writes of the owners' words.
    kernel_reads: AtomicUsize,
    kernel_writes: AtomicUsize,
    signals: AtomicUsize,
}

impl Config {
    /// The words of a block.
    fn words_per_block(&self) -> usize {
        self.blk / 8
    }
}

impl Shared {
    fn owned_blocks(&self) -> u64 {
        self.cfg.owners as u64 * self.cfg.blocks_per_owner
    }

    fn total_blocks(&self) -> u64 {
        self.owned_blocks() + self.cfg.readonly_blocks
    }

    /// Waits until the owners are `k / helper_ops` of the way through, so a
    /// helper's fixed number of operations is spread over the whole race
    /// rather than done before the owners get going.
    fn pace(&self, k: u32) {
        let all = self.cfg.owners as u64 * self.cfg.owner_ops as u64;
        let target = all * k as u64 / self.cfg.helper_ops as u64;
        while self.progress.load(SeqCst) < target && self.owners_left.load(SeqCst) != 0 {
            thread::sleep(Duration::from_micros(50));
        }
    }

    /// Reads word `w` of block `blk` through `vma` (whose first page is
    /// `pgoffset`) and checks it as a non-owner can: exact for read-only
    /// blocks, of the right word and not newer than written for owned ones.
    fn check_foreign(&self, vma: &Vma, blk: u64, w: usize) -> Result<(), String> {
        let v = read_word(vma, blk - vma.pgoffset(), w);
        let bound = if blk < self.owned_blocks() {
            self.written[blk as usize].load(SeqCst)
        } else {
            0
        };
        match decode(v) {
            Some((b, ww, ver)) if b == blk && ww == w && ver <= bound => Ok(()),
            _ => Err(format!(
                "block {blk} word {w} reads {v:#x}: not version <= {bound} of that word"
            )),
        }
    }
}

fn run(cfg: &Config) -> Result<String, String> {
    let baseline_maps = ram_file_mappings();
    let owned = cfg.owners as u64 * cfg.blocks_per_owner;
    let total = owned + cfg.readonly_blocks;
    let file = Arc::new(RaceFile::new(owned, cfg.blk));
    let ram = Ram::from_spec(&format!("{},pagesize={}", cfg.ram, cfg.blk))
        .map_err(|e| e.to_string())?
        .with_budget(cfg.budget_pages * cfg.blk as u64);
    // The userfaultfd pass must not run on signals unnoticed.
    if std::env::var("BIGFILE_FAULTS").is_ok_and(|b| b == "userfaultfd")
        && ram.fault_backend() != FaultBackend::Userfaultfd
    {
        return Err(format!(
            "a {} RAM is not on userfaultfd: {:?}",
            cfg.ram,
            ram.fault_backend_fallback()
        ));
    }
    let kernel_io = ram.fault_backend() == FaultBackend::Userfaultfd;
    if kernel_io {
        extern "C" fn nothing(_: libc::c_int) {}
        // SAFETY: a handler that does nothing, for a signal nothing else in
        // this child uses; SA_RESTART, as an application's would be.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            if libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()) != 0 {
                return Err("sigaction(SIGUSR2) failed".into());
            }
        }
    }
    let fh = FileH::open(file.mem.clone(), Some(&ram)).map_err(|e| e.to_string())?;
    let vma = fh.mmap(0, total).map_err(|e| e.to_string())?;
    let sh = Arc::new(Shared {
        cfg: *cfg,
        file: file.clone(),
        ranges: Mutex::new(vec![(vma.addr_range().start, vma.addr_range().end)]),
        fh,
        ram,
        vma,
        gate: RwLock::new(()),
        discards: AtomicU64::new(0),
        written: (0..owned).map(|_| AtomicU32::new(0)).collect(),
        skipped_busy: AtomicUsize::new(0),
        progress: AtomicU64::new(0),
        owners_left: AtomicUsize::new(cfg.owners),
        kernel_io,
        owner_tids: (0..cfg.owners).map(|_| AtomicI32::new(0)).collect(),
        kernel_refused: AtomicUsize::new(0),
        kernel_reads: AtomicUsize::new(0),
        kernel_writes: AtomicUsize::new(0),
        signals: AtomicUsize::new(0),
    });

    let mut handles = Vec::new();
    for t in 0..cfg.owners {
        let sh = sh.clone();
        handles.push(thread::spawn(move || {
            let res = owner(&sh, t).map(Some);
            sh.owners_left.fetch_sub(1, SeqCst);
            res
        }));
    }
    let helpers: &[Helper] = if kernel_io {
        &[committer, chaos, mapper, signaller]
    } else {
        &[committer, chaos, mapper]
    };
    for (i, &helper) in helpers.iter().enumerate() {
        let sh = sh.clone();
        let seed = cfg.seed ^ (0x100 + i as u64);
        handles.push(thread::spawn(move || helper(&sh, seed).map(|()| None)));
    }
    let mut models: Vec<(Vec<Vec<u32>>, u64)> = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(Some(m))) => models.push(m),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("a thread panicked (see stderr)".into()),
        }
    }
    errors.extend(file.violations.lock().unwrap().iter().cloned());
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }

    // A discard after an owner's last operation dropped its changes: its
    // blocks hold what the file has (nobody wrote them since).
    let discards = sh.discards.load(SeqCst);
    let per = cfg.blocks_per_owner;
    let models: Vec<Vec<Vec<u32>>> = models
        .into_iter()
        .enumerate()
        .map(|(t, (mem, seen))| {
            if seen == discards {
                return mem;
            }
            (0..per)
                .map(|j| file.versions(t as u64 * per + j))
                .collect()
        })
        .collect();
    // Quiet now: memory must be exactly the model.
    let expect = |blk: u64| -> Vec<u32> {
        if blk < owned {
            models[(blk / per) as usize][(blk % per) as usize].clone()
        } else {
            vec![0; cfg.words_per_block()]
        }
    };
    for blk in 0..total {
        let want = expect(blk);
        for (w, &ver) in want.iter().enumerate() {
            let got = read_word(&sh.vma, blk, w);
            if got != word(blk, w, ver) {
                return Err(format!(
                    "after the race, block {blk} word {w} is {got:#x}, the model says version {ver}"
                ));
            }
        }
    }
    // Everything written out: the file must be the model too.
    sh.fh
        .dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
        .map_err(|e| format!("final writeout: {e}"))?;
    for blk in 0..total {
        if file.versions(blk) != expect(blk) {
            return Err(format!(
                "after the final writeout the file's block {blk} differs from the model"
            ));
        }
    }
    if let Some(v) = file.violations.lock().unwrap().first() {
        return Err(v.clone());
    }
    let stats = sh.fh.stats();
    if stats.dirty_pages != 0 || !sh.fh.dirty_blocks().is_empty() {
        return Err(format!("dirty after MARKSTORED: {stats:?}"));
    }
    let rs = sh.ram.stats();
    if rs.resident_bytes > rs.budget {
        return Err(format!(
            "resident {} over budget {}",
            rs.resident_bytes, rs.budget
        ));
    }
    if stats.loads != file.mem.loads() as u64 {
        return Err(format!(
            "the handle counted {} loads, loadblk ran {} times",
            stats.loads,
            file.mem.loads() as u64
        ));
    }
    let mut summary = format!(
        "{} loads, {} stores, {} reclaims, {} discards, {} busy skips, {} faults",
        stats.loads,
        file.mem.stores() as u64,
        stats.reclaims,
        sh.discards.load(SeqCst),
        sh.skipped_busy.load(SeqCst),
        stats.faults
    );
    if kernel_io {
        let (reads, writes) = (sh.kernel_reads.load(SeqCst), sh.kernel_writes.load(SeqCst));
        let refused = sh.kernel_refused.load(SeqCst);
        summary += &format!(
            ", {reads} kernel reads, {writes} kernel writes ({refused} refused: EFAULT), {} \
             signals sent",
            sh.signals.load(SeqCst),
        );
        // The known limit is a narrow window: more than one in a hundred
        // refused is a bug (every kernel write refused would pass unseen).
        if reads == 0 || writes == 0 || refused * 100 > writes {
            return Err(format!("kernel I/O: {summary}"));
        }
    }

    // Tear down and check that nothing is left behind.
    let sh = Arc::into_inner(sh).ok_or("a thread still holds the shared state")?;
    let ranges = sh.ranges.into_inner().unwrap();
    // The leftover check below must see a reservation when there is one.
    let probe = sh.fh.mmap(0, 2).map_err(|e| format!("mmap: {e}"))?;
    let probe_range = (probe.addr_range().start, probe.addr_range().end);
    if !leaks::reservations()?.contains(&probe_range) {
        return Err("a live mapping's reservation is not seen in /proc/self/smaps".into());
    }
    drop(probe);
    drop(sh.vma);
    if sh.fh.mapping_count() != 0 {
        return Err(format!(
            "{} mappings left after unmapping all",
            sh.fh.mapping_count()
        ));
    }
    sh.ram.reclaim();
    let rs = sh.ram.stats();
    if rs.resident_bytes != 0 || rs.stats.resident_pages != 0 || rs.stats.dirty_pages != 0 {
        return Err(format!(
            "RAM accounting not back to zero after reclaiming all: {rs:?}"
        ));
    }
    drop(sh.fh);
    drop(sh.ram);
    // Exactly a mapping's range: a part of it would be a piece or a page.
    if let Some(r) = leaks::reservations()?.iter().find(|r| ranges.contains(r)) {
        return Err(format!(
            "a mapping's reservation is still there: {:#x}..{:#x}",
            r.0, r.1
        ));
    }
    if ram_file_mappings() != baseline_maps {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        return Err(format!("RAM mappings left behind:\n{maps}"));
    }
    Ok(format!(
        "{summary}, {} mappings made and unmapped",
        ranges.len()
    ))
}

/// Owner `t`: writes, reads and invalidates its own blocks, reads others'.
/// Returns the versions its blocks hold in memory at its end, and how many
/// discards that accounts for.
fn owner(sh: &Shared, t: usize) -> Result<(Vec<Vec<u32>>, u64), String> {
    let cfg = &sh.cfg;
    let per = cfg.blocks_per_owner;
    let first = t as u64 * per;
    let mut rng = Rng::spread(cfg.seed ^ t as u64);
    // What this owner's blocks hold in memory, and the last version written.
    let mut mem: Vec<Vec<u32>> = vec![vec![0; cfg.words_per_block()]; per as usize];
    let mut last: Vec<Vec<u32>> = vec![vec![0; cfg.words_per_block()]; per as usize];
    let mut seen_discards = 0;
    let resync = |mem: &mut Vec<u32>, blk: u64| *mem = sh.file.versions(blk);
    let pipe = if sh.kernel_io {
        Some(Pipe::new()?)
    } else {
        None
    };
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
    sh.owner_tids[t].store(tid, SeqCst);
    let res = (|| {
        for i in 0..cfg.owner_ops {
            sh.progress.fetch_add(1, SeqCst);
            let _gate = sh.gate.read().unwrap();
            let d = sh.discards.load(SeqCst);
            if d != seen_discards {
                seen_discards = d;
                for j in 0..per {
                    resync(&mut mem[j as usize], first + j);
                }
            }
            let j = rng.below(per);
            let blk = first + j;
            let w = rng.below(cfg.words_per_block() as u64) as usize;
            if let Some(pipe) = pipe.as_ref().filter(|_| rng.below(8) == 0) {
                let n = 1 + rng.below((cfg.words_per_block() - w).min(64) as u64) as usize;
                let (mem, last) = (&mut mem[j as usize], &mut last[j as usize]);
                if rng.below(2) == 0 {
                    kernel_read(sh, pipe, (blk, w, n), mem)
                } else {
                    kernel_write(sh, pipe, (blk, w, n), (mem, last))
                }
                .map_err(|e| format!("owner {t}, op {i}: {e}"))?;
                continue;
            }
            match rng.below(100) {
                0..=39 => {
                    let v = last[j as usize][w] + 1;
                    last[j as usize][w] = v;
                    // Published before the write: a reader may see it at once.
                    sh.written[blk as usize].fetch_max(v, SeqCst);
                    write_word(&sh.vma, blk, w, word(blk, w, v));
                    mem[j as usize][w] = v;
                }
                40..=64 => {
                    let got = read_word(&sh.vma, blk, w);
                    let want = word(blk, w, mem[j as usize][w]);
                    if got != want {
                        return Err(format!(
                        "owner {t}, op {i}: own block {blk} word {w} reads {got:#x}, wrote {want:#x}"
                    ));
                    }
                }
                65..=84 => {
                    let ro = sh.owned_blocks() + rng.below(cfg.readonly_blocks);
                    sh.check_foreign(&sh.vma, ro, w)
                        .map_err(|e| format!("owner {t}, op {i}: {e}"))?;
                }
                85..=94 => {
                    let other = rng.below(sh.owned_blocks());
                    sh.check_foreign(&sh.vma, other, w)
                        .map_err(|e| format!("owner {t}, op {i}: {e}"))?;
                }
                _ => match sh.fh.invalidate_page(blk) {
                    Ok(()) => resync(&mut mem[j as usize], blk),
                    Err(Error::WriteoutInProgress(_)) => {
                        sh.skipped_busy.fetch_add(1, SeqCst);
                    }
                    Err(e) => return Err(format!("owner {t}: invalidate_page({blk}): {e}")),
                },
            }
        }
        Ok(())
    })();
    sh.owner_tids[t].store(0, SeqCst);
    res.map(|()| (mem, seen_discards))
}

/// A pipe of the owner's, for the kernel to copy its words through.
struct Pipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
}

impl Pipe {
    fn new() -> Result<Pipe, String> {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: two descriptors written into `fds`, owned from here on.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: just made, owned by nothing else.
        Ok(unsafe {
            Pipe {
                r: std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                w: std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }

    /// `write(2)` of `len` bytes at `addr` into the pipe (the kernel reads
    /// them), or `read(2)` of `len` bytes from it to `addr` (it writes them).
    fn copy(&self, into_pipe: bool, addr: usize, len: usize) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: `addr..addr + len` is memory of this process (a mapping's
        // words, or a buffer of the caller's); the kernel checks it.
        let n = unsafe {
            if into_pipe {
                libc::write(self.w.as_raw_fd(), addr as *const libc::c_void, len)
            } else {
                libc::read(self.r.as_raw_fd(), addr as *mut libc::c_void, len)
            }
        };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

/// The kernel reads `n` of the owner's words from `w` of block `blk`
/// (`write(2)` into the pipe): they must be what the owner wrote (`mem`).
fn kernel_read(
    sh: &Shared,
    pipe: &Pipe,
    (blk, w, n): (u64, usize, usize),
    mem: &[u32],
) -> Result<(), String> {
    sh.kernel_reads.fetch_add(1, SeqCst);
    let addr = words::word_addr(&sh.vma, blk, w);
    let sent = pipe
        .copy(true, addr, n * 8)
        .map_err(|e| format!("write(2) of block {blk} words {w}..{}: {e}", w + n))?;
    let mut back = vec![0u8; sent];
    if sent != n * 8 || pipe.copy(false, back.as_mut_ptr() as usize, sent).ok() != Some(sent) {
        return Err(format!(
            "write(2) of block {blk}: {sent} of {} bytes",
            n * 8
        ));
    }
    for (i, got) in words::words(&back).enumerate() {
        let want = word(blk, w + i, mem[w + i]);
        if got != want {
            return Err(format!(
                "the kernel read block {blk} word {} as {got:#x}, the owner wrote {want:#x}",
                w + i
            ));
        }
    }
    Ok(())
}

/// The kernel writes `n` new versions of the owner's words from `w` of
/// block `blk` (`read(2)` from the pipe into the mapping); `mem` and
/// `last` follow. A write refused with EFAULT (a known limit, counted) may
/// have written some words: each is then either version, read back.
fn kernel_write(
    sh: &Shared,
    pipe: &Pipe,
    (blk, w, n): (u64, usize, usize),
    (mem, last): (&mut [u32], &mut [u32]),
) -> Result<(), String> {
    let mut buf = Vec::with_capacity(n * 8);
    for i in 0..n {
        let v = last[w + i] + 1;
        last[w + i] = v;
        // Published before the write: a reader may see it at once.
        sh.written[blk as usize].fetch_max(v, SeqCst);
        buf.extend_from_slice(&word(blk, w + i, v).to_ne_bytes());
    }
    if pipe.copy(true, buf.as_ptr() as usize, buf.len()).ok() != Some(buf.len()) {
        return Err("write(2) into the pipe from a buffer failed".into());
    }
    sh.kernel_writes.fetch_add(1, SeqCst);
    let addr = words::word_addr(&sh.vma, blk, w);
    let done = pipe.copy(false, addr, n * 8);
    if done.as_ref().ok() == Some(&(n * 8)) {
        mem[w..w + n].copy_from_slice(&last[w..w + n]);
        return Ok(());
    }
    let copied = match done {
        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => 0,
        Ok(k) => k,
        Err(e) => return Err(format!("read(2) into block {blk}: {e}")),
    };
    sh.kernel_refused.fetch_add(1, SeqCst);
    // What it did not copy is still in the pipe.
    let mut rest = vec![0u8; n * 8 - copied];
    if pipe
        .copy(false, rest.as_mut_ptr() as usize, rest.len())
        .ok()
        != Some(rest.len())
    {
        return Err("draining the pipe failed".into());
    }
    for i in 0..n {
        let got = read_word(&sh.vma, blk, w + i);
        let (old, new) = (mem[w + i], last[w + i]);
        if got == word(blk, w + i, new) {
            mem[w + i] = new;
        } else if got != word(blk, w + i, old) {
            return Err(format!(
                "after a refused kernel write, block {blk} word {} is {got:#x}: \
                 neither version {old} nor {new}",
                w + i
            ));
        }
    }
    Ok(())
}

/// Sends SIGUSR2 to a running owner now and then, until the owners are
/// done: some arrive while the owner is blocked in a kernel-mode fault.
fn signaller(sh: &Shared, seed: u64) -> Result<(), String> {
    let mut rng = Rng::spread(seed);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    while sh.owners_left.load(SeqCst) != 0 {
        let t = rng.below(sh.cfg.owners as u64) as usize;
        let tid = sh.owner_tids[t].load(SeqCst);
        // A thread id of this process: at worst an owner that just ended
        // (ESRCH) or a thread that took its id since, whose SIGUSR2
        // handler does nothing.
        // SAFETY: tgkill has no memory arguments.
        if tid != 0 && unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR2) } == 0 {
            sh.signals.fetch_add(1, SeqCst);
        }
        thread::sleep(Duration::from_micros(20 + rng.below(200)));
    }
    Ok(())
}

/// A helper thread's body: the shared state and its seed.
type Helper = fn(&Shared, u64) -> Result<(), String>;

/// Writes out, mostly committing (STORE|MARKSTORED), sometimes storing only.
fn committer(sh: &Shared, seed: u64) -> Result<(), String> {
    let mut rng = Rng::spread(seed);
    for k in 0..sh.cfg.helper_ops {
        sh.pace(k);
        let flags = if rng.below(4) == 0 {
            WriteoutFlags::STORE
        } else {
            WriteoutFlags::STORE | WriteoutFlags::MARKSTORED
        };
        sh.fh
            .dirty_writeout(flags)
            .map_err(|e| format!("writeout: {e}"))?;
    }
    Ok(())
}

/// Discards (behind the gate), invalidates read-only blocks, reclaims.
fn chaos(sh: &Shared, seed: u64) -> Result<(), String> {
    let mut rng = Rng::spread(seed);
    for k in 0..sh.cfg.helper_ops {
        sh.pace(k);
        match rng.below(8) {
            0 => {
                let _gate = sh.gate.write().unwrap();
                loop {
                    match sh.fh.dirty_discard() {
                        Ok(()) => break,
                        // The committer finishes without the gate.
                        Err(Error::WriteoutInProgress(_)) => thread::yield_now(),
                        Err(e) => return Err(format!("discard: {e}")),
                    }
                }
                sh.discards.fetch_add(1, SeqCst);
            }
            1..=5 => {
                let blk = sh.owned_blocks() + rng.below(sh.cfg.readonly_blocks);
                match sh.fh.invalidate_page(blk) {
                    Ok(()) => {}
                    Err(Error::WriteoutInProgress(_)) => {
                        sh.skipped_busy.fetch_add(1, SeqCst);
                    }
                    Err(e) => return Err(format!("invalidate_page({blk}): {e}")),
                }
            }
            _ => {
                sh.ram.reclaim_up_to(1 + rng.below(4) as usize);
            }
        }
    }
    Ok(())
}

/// Maps small ranges of the handle, reads and prefaults them, unmaps them.
fn mapper(sh: &Shared, seed: u64) -> Result<(), String> {
    let mut rng = Rng::spread(seed);
    let total = sh.total_blocks();
    for k in 0..sh.cfg.helper_ops {
        sh.pace(k);
        let len = 1 + rng.below(8.min(total));
        let start = rng.below(total - len + 1);
        let m = sh.fh.mmap(start, len).map_err(|e| format!("mmap: {e}"))?;
        sh.ranges
            .lock()
            .unwrap()
            .push((m.addr_range().start, m.addr_range().end));
        if rng.below(3) == 0 {
            m.prefault(0..m.len(), Access::Read)
                .map_err(|e| format!("prefault: {e}"))?;
        }
        for _ in 0..4 {
            let blk = start + rng.below(len);
            let w = rng.below(sh.cfg.words_per_block() as u64) as usize;
            sh.check_foreign(&m, blk, w)
                .map_err(|e| format!("through a second mapping: {e}"))?;
        }
        drop(m);
    }
    Ok(())
}

/// The same race in Python: loadblk/storeblk in Python, with garbage cycles
/// made in them whose `__del__` runs `gc.collect()` and reads another
/// mapping (a nested fault) while the callback is in progress.
const PYTHON_RACE: &str = include_str!("races.py");
