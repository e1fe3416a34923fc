//! bigfile against what a user would use instead (issue 7), each figure with
//! its kernel baseline measured in the same run. `cargo xtask bench` runs
//! this and prints one table; `BIGFILE_BENCH_QUICK=1` shrinks files and
//! measurement times. Figures that are not timings go to
//! `bench-data/figures.tsv` (see `support::Figures`).
//!
//! Fault benchmarks run in steady state: a mapping much larger than the RAM
//! budget, touched cyclically, so every touch faults and every fault first
//! reclaims the least recently used page (as a scan of a file bigger than
//! RAM does). Iteration = one fault, one scan, one random read, one
//! write-and-writeout pass.
//!
//! The fault figures (1, 2, 3, 5's first write, 6) are measured on both
//! fault backends in the same run, the userfaultfd ones under names ending
//! in `_uffd` (`support::on`); the others on the signal backend.

mod baseline;
mod support;

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bigfile::virtmem::{
    Advice, BigFile, FaultBackend, FileBigFile, FileH, Ram, Stats, Vma, WriteoutFlags,
};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};

use support::{Config, FillFile, NoopFile, Rng, KIB, MIB};

fn main() {
    let cfg = Config::from_env();
    let figures = support::Figures::new();
    figures.set("quick", cfg.quick as u8);
    let mut c = Criterion::default()
        .warm_up_time(cfg.warm_up)
        .measurement_time(cfg.measure)
        .sample_size(if cfg.quick { 20 } else { 50 })
        .configure_from_args();
    // BIGFILE_BENCH_GROUPS=a,b runs only those groups, setup included (for
    // profiling one of them: criterion's filter still runs every setup).
    let only = std::env::var("BIGFILE_BENCH_GROUPS").ok();
    let on = |g: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == g));
    if on("fault_noop") {
        fault_noop(&mut c, &figures);
    }
    if on("fault_fill") {
        fault_fill(&mut c, &figures);
    }
    if on("scan") {
        scan(&mut c, &cfg, &figures);
    }
    if on("random_read") {
        random_read(&mut c, &cfg, &figures);
    }
    if on("write") {
        write(&mut c, &cfg, &figures);
    }
    if on("threads") {
        threads(&mut c, &figures);
    }
    c.final_summary();
}

fn size_name(bs: usize) -> String {
    if bs >= MIB {
        format!("{}M", bs / MIB)
    } else {
        format!("{}K", bs / KIB)
    }
}

/// A mapping of `nblocks` blocks over a RAM on `backend` with a budget of
/// `budget` blocks, touched cyclically so that every touch faults.
struct Cycle {
    vma: Vma,
    fh: FileH,
    ram: Ram,
    bs: usize,
    nblocks: u64,
}

impl Cycle {
    fn new(file: Arc<dyn BigFile>, backend: FaultBackend, budget: u64, nblocks: u64) -> Cycle {
        let bs = file.blksize();
        let ram = support::ram(&size_name(bs), backend)
            .expect("RAM")
            .with_budget(budget * bs as u64);
        let fh = FileH::open(file, Some(&ram)).expect("open the file handle");
        let vma = fh.mmap(0, nblocks).expect("mmap");
        let cycle = Cycle {
            vma,
            fh,
            ram,
            bs,
            nblocks,
        };
        // Fill the budget so that timed faults find it full.
        cycle.touch(0, budget);
        cycle
    }

    /// Read one byte of each of the `n` blocks from `from` on (cyclically);
    /// returns where the next touch goes.
    fn touch(&self, from: u64, n: u64) -> u64 {
        let mut blk = from;
        for _ in 0..n {
            // SAFETY: the offset lies inside the mapping, alive while `self`
            // is; the read is served by the fault handler.
            unsafe { ptr::read_volatile(self.vma.as_ptr().add(blk as usize * self.bs)) };
            blk += 1;
            if blk == self.nblocks {
                blk = 0;
            }
        }
        blk
    }

    /// Record `<prefix>.faults_per_touch`: the loads since `before` per
    /// touch (1 when every touch faulted).
    fn record_faults_per_touch(
        &self,
        figures: &support::Figures,
        prefix: &str,
        before: Stats,
        touches: u64,
    ) {
        let loads = self.fh.stats().loads - before.loads;
        figures.set(
            &format!("{prefix}.faults_per_touch"),
            format!("{:.3}", loads as f64 / touches as f64),
        );
    }

    /// Where `threads` threads touching the mapping start: each at the
    /// first block of its own part.
    fn starts(&self, threads: u64) -> Vec<u64> {
        (0..threads).map(|k| k * (self.nblocks / threads)).collect()
    }

    /// Touch `n` blocks in as many threads as `next` has places, each
    /// cycling over its own part of the mapping from its place in `next`
    /// (see [`Cycle::starts`]), which is moved on; returns the wall time.
    /// (Starting each call afresh would touch blocks left resident by the
    /// call before: calls of a few touches would then fault on few.)
    fn touch_parallel(&self, next: &mut [u64], n: u64) -> Duration {
        let threads = next.len() as u64;
        let part = self.nblocks / threads;
        let t = Instant::now();
        std::thread::scope(|s| {
            for (k, next) in (0..threads).zip(next.iter_mut()) {
                s.spawn(move || {
                    let mut blk = *next;
                    for _ in 0..n / threads {
                        // SAFETY: as in `touch`.
                        unsafe {
                            ptr::read_volatile(self.vma.as_ptr().add(blk as usize * self.bs))
                        };
                        blk += 1;
                        if blk == (k + 1) * part {
                            blk = k * part;
                        }
                    }
                    *next = blk;
                });
            }
        });
        t.elapsed()
    }
}

/// (1) A fault whose loadblk does nothing, against a bare SIGSEGV round trip.
fn fault_noop(c: &mut Criterion, figures: &support::Figures) {
    let mut g = c.benchmark_group("fault_noop");
    for bs in [2 * MIB, 64 * KIB, 4 * KIB] {
        let name = size_name(bs);
        for backend in support::backends(&name, figures) {
            let cycle = Cycle::new(Arc::new(NoopFile(bs)), backend, 16, 256);
            let mut next = 0;
            let before = cycle.fh.stats();
            let mut touches = 0;
            let id = support::on("bigfile", backend);
            g.bench_function(BenchmarkId::new(&id, &name), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    next = cycle.touch(next, iters);
                    touches += iters;
                    t.elapsed()
                })
            });
            cycle.record_faults_per_touch(
                figures,
                &format!("fault_noop.{id}.{name}"),
                before,
                touches,
            );
        }
        g.bench_function(BenchmarkId::new("sigsegv", &name), |b| {
            b.iter_custom(|iters| baseline::sigsegv_round_trips(bs, iters))
        });
    }
    // A fault that takes a fresh RAM page (nothing to recycle): the budget
    // is never reached; pages are dropped (hole punched) outside the timing.
    let bs = 2 * MIB;
    for backend in support::backends("2M", figures) {
        let ram = support::ram("2M", backend).expect("RAM");
        let fh = FileH::open(Arc::new(NoopFile(bs)), Some(&ram)).expect("open");
        let vma = fh.mmap(0, 64).expect("mmap");
        let id = support::on("bigfile_fresh_page", backend);
        g.bench_function(BenchmarkId::new(id, "2M"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let blk = (i % 64) as usize;
                    if blk == 0 {
                        ram.reclaim();
                    }
                    let t = Instant::now();
                    // SAFETY: inside the live mapping; served by the fault handler.
                    unsafe { ptr::read_volatile(vma.as_ptr().add(blk * bs)) };
                    total += t.elapsed();
                }
                ram.reclaim();
                total
            })
        });
    }
    g.finish();
}

/// (2) A fault whose loadblk writes the whole block, against the kernel
/// allocating, zeroing and the same fill on first touch of a memfd mapping.
fn fault_fill(c: &mut Criterion, figures: &support::Figures) {
    let mut g = c.benchmark_group("fault_fill");
    let bs = 2 * MIB;
    for backend in support::backends("2M", figures) {
        let cycle = Cycle::new(Arc::new(FillFile(bs)), backend, 16, 256);
        let mut next = 0;
        g.bench_function(
            BenchmarkId::new(support::on("bigfile", backend), "2M"),
            |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    next = cycle.touch(next, iters);
                    t.elapsed()
                })
            },
        );
    }
    g.bench_function(BenchmarkId::new("kernel", "2M"), |b| {
        b.iter_custom(|iters| baseline::memfd_first_touch_fill(bs, iters))
    });
    g.finish();
}

/// (3) Sum of all u64 words of a file: through a file-backed BigFile with a
/// 64 MiB budget (so every scan loads every block), with the default advice
/// and with `Advice::Sequential`, through a fresh memmap2 mapping, and with
/// pread into one reused 2 MiB buffer.
fn scan(c: &mut Criterion, cfg: &Config, figures: &support::Figures) {
    let bs = 2 * MIB;
    let path = support::data_file(
        &format!("scan-{}M.bin", cfg.scan_bytes / MIB),
        cfg.scan_bytes,
    );
    support::warm_page_cache(&path);
    let nblocks = (cfg.scan_bytes / bs) as u64;
    let mut g = c.benchmark_group("scan");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .throughput(Throughput::Bytes(cfg.scan_bytes as u64));

    figures.set("scan.bytes", cfg.scan_bytes);
    let f = File::open(&path).expect("open the scan file");
    let mut expect = None;
    for backend in support::backends("2M", figures) {
        let file = Arc::new(FileBigFile::open_readonly(&path, bs).expect("open the scan file"));
        let ram = support::ram("2M", backend)
            .expect("RAM")
            .with_budget(64 * MIB as u64);
        let fh = FileH::open(file, Some(&ram)).expect("open");
        // Once with the default advice (the scan detected as a stream: drop-
        // behind and read-ahead), once through a mapping that declares the
        // scan (drop-behind: each fault recycles the page just scanned, still
        // in the CPU caches, instead of the least recently used one; the
        // whole read-ahead window from the first fault).
        for (name, advice) in [
            ("bigfile", Advice::Normal),
            ("bigfile_sequential", Advice::Sequential),
        ] {
            let vma = fh.mmap(0, nblocks).expect("mmap");
            vma.advise(advice);
            g.bench_function(support::on(name, backend), |b| {
                b.iter(|| {
                    // SAFETY: nothing writes the mapping while the slice lives.
                    let s = support::sum_words(unsafe { vma.as_slice() });
                    assert_eq!(*expect.get_or_insert(s), s);
                    s
                })
            });
        }
    }
    // The first pass of a fresh process: a new RAM (budget: all it can
    // hold, as the default RAMs' is in practice) whose every block takes a
    // fresh RAM page. Timed from the RAM's creation to the end of the pass;
    // closing it is not timed.
    for backend in support::backends("2M", figures) {
        let file: Arc<dyn BigFile> =
            Arc::new(FileBigFile::open_readonly(&path, bs).expect("open the scan file"));
        g.bench_function(support::on("bigfile_first_pass", backend), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let ram = support::ram("2M", backend).expect("RAM");
                    let fh = FileH::open(file.clone(), Some(&ram)).expect("open");
                    let vma = fh.mmap(0, nblocks).expect("mmap");
                    // SAFETY: nothing writes the mapping while the slice lives.
                    let s = support::sum_words(unsafe { vma.as_slice() });
                    total += t.elapsed();
                    assert_eq!(*expect.get_or_insert(s), s);
                    drop((vma, fh, ram));
                }
                total
            })
        });
    }
    let expect = expect.unwrap_or_else(|| {
        // SAFETY: the bench's own file, not modified while mapped.
        let m = unsafe { memmap2::Mmap::map(&f) }.expect("mmap the scan file");
        support::sum_words(&m)
    });

    g.bench_function("mmap", |b| {
        b.iter(|| {
            // SAFETY: the bench's own file, not modified while mapped.
            let m = unsafe { memmap2::Mmap::map(&f) }.expect("mmap the scan file");
            let s = support::sum_words(&m);
            assert_eq!(s, expect);
            s
        })
    });

    let mut buf = vec![0u64; bs / 8];
    g.bench_function("pread", |b| {
        b.iter(|| {
            let mut s = 0u64;
            for blk in 0..nblocks {
                // SAFETY: u64 has no invalid bit patterns; the view covers `buf` exactly.
                let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), bs) };
                f.read_exact_at(bytes, blk * bs as u64)
                    .expect("pread the scan file");
                s = s.wrapping_add(support::sum_words(bytes));
            }
            assert_eq!(s, expect);
            s
        })
    });
    g.finish();
}

/// (4) 4 KiB reads at random offsets of the scan file: through a BigFile
/// with a RAM budget of a quarter of the file (2 MiB and 64 KiB blocks),
/// and through one kernel mapping. Peak resident bytes are recorded.
fn random_read(c: &mut Criterion, cfg: &Config, figures: &support::Figures) {
    let path = support::data_file(
        &format!("scan-{}M.bin", cfg.scan_bytes / MIB),
        cfg.scan_bytes,
    );
    let reads = (cfg.scan_bytes / (4 * KIB)) as u64;
    let mut g = c.benchmark_group("random_read");
    g.throughput(Throughput::Bytes(4 * KIB as u64));
    for bs in [2 * MIB, 64 * KIB] {
        let name = size_name(bs);
        let file = Arc::new(FileBigFile::open_readonly(&path, bs).expect("open"));
        let ram = support::ram(&name, FaultBackend::Signals)
            .expect("RAM")
            .with_budget(cfg.random_budget as u64);
        let fh = FileH::open(file, Some(&ram)).expect("open");
        let vma = fh.mmap(0, (cfg.scan_bytes / bs) as u64).expect("mmap");
        let mut rng = Rng::new(42);
        let mut peak = 0;
        let read = |rng: &mut Rng| {
            let off = rng.below(reads) as usize * 4 * KIB;
            // SAFETY: inside the live mapping, which nothing writes.
            let page = unsafe { &vma.as_slice()[off..off + 4 * KIB] };
            black_box(support::sum_words(page));
        };
        g.bench_function(BenchmarkId::new("bigfile", &name), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    read(&mut rng);
                }
                t.elapsed()
            })
        });
        // Resident memory, sampled after every read of a further pass (the
        // accounting is updated under the RAM lock, so a read sees the peak).
        for _ in 0..reads / 4 {
            read(&mut rng);
            peak = peak.max(ram.stats().resident_bytes);
        }
        let st = ram.stats();
        figures.set(&format!("random_read.{name}.resident_peak"), peak);
        figures.set(&format!("random_read.{name}.budget"), st.budget);
        figures.set(&format!("random_read.{name}.block"), bs);
        figures.set(
            &format!("random_read.{name}.ram_allocated"),
            ram.pages().stats().bytes_resident,
        );
    }
    let f = File::open(&path).expect("open");
    // SAFETY: the bench's own file, not modified while mapped.
    let m = unsafe { memmap2::Mmap::map(&f) }.expect("mmap");
    let mut rng = Rng::new(42);
    g.bench_function("mmap", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let off = rng.below(reads) as usize * 4 * KIB;
                black_box(support::sum_words(&m[off..off + 4 * KIB]));
            }
            t.elapsed()
        })
    });
    figures.set("random_read.mmap.rss", mapped_rss(m.as_ptr(), m.len()));
    g.finish();
}

/// Bytes of `[addr, addr+len)` mapped in this process (from /proc/self/smaps).
fn mapped_rss(addr: *const u8, len: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (lo, hi) = (addr as u64, addr as u64 + len as u64);
    let mut inside = false;
    let mut rss = 0;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = a >= lo && b <= hi;
                    continue;
                }
            }
        }
        if inside {
            if let Some(kb) = line.strip_prefix("Rss:") {
                rss += kb
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
                    * 1024;
            }
        }
    }
    rss
}

/// (5) One word written into every block of a loaded mapping, then
/// `dirty_writeout` to an OS file, against pwrite of the same bytes; and the
/// first write to a clean loaded page (the dirty-tracking fault), on each
/// fault backend.
fn write(c: &mut Criterion, cfg: &Config, figures: &support::Figures) {
    let bs = 2 * MIB;
    let nblocks = (cfg.write_bytes / bs) as u64;
    let mut g = c.benchmark_group("write");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .throughput(Throughput::Bytes(cfg.write_bytes as u64));
    let name = format!("write-{}M", cfg.write_bytes / MIB);
    let path = support::data_file(&format!("{name}.bin"), cfg.write_bytes);
    let (fh, vma) = loaded(&path, nblocks, FaultBackend::Signals);
    let mut round = 0u64;
    g.bench_function("bigfile_writeout", |b| {
        b.iter(|| {
            round += 1;
            for blk in 0..nblocks as usize {
                let off = blk * bs + (round as usize % (bs / 8)) * 8;
                vma.write_at(off, &round.to_ne_bytes()).expect("write");
            }
            fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
                .expect("writeout");
        })
    });

    let path2 = support::data_file(&format!("{name}-pwrite.bin"), cfg.write_bytes);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .open(&path2)
        .expect("open the pwrite file");
    let mut data = vec![0u8; cfg.write_bytes];
    File::open(&path)
        .expect("open")
        .read_exact_at(&mut data, 0)
        .expect("read the data");
    g.bench_function("pwrite", |b| {
        b.iter(|| {
            round += 1;
            for blk in 0..nblocks as usize {
                let off = blk * bs + (round as usize % (bs / 8)) * 8;
                data[off..off + 8].copy_from_slice(&round.to_ne_bytes());
                out.write_all_at(&data[blk * bs..(blk + 1) * bs], (blk * bs) as u64)
                    .expect("pwrite");
            }
        })
    });
    g.finish();

    drop((vma, fh));

    let mut g = c.benchmark_group("first_write");
    for backend in support::backends("2M", figures) {
        let (fh, vma) = loaded(&path, nblocks, backend);
        g.bench_function(
            BenchmarkId::new(support::on("bigfile", backend), "2M"),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        // Every page clean and read-only again, outside the timing.
                        fh.dirty_writeout(WriteoutFlags::MARKSTORED)
                            .expect("markstored");
                        let n = left.min(nblocks);
                        let t = Instant::now();
                        for blk in 0..n as usize {
                            // SAFETY: inside the live mapping; served by the fault handler.
                            unsafe { ptr::write_volatile(vma.as_ptr().add(blk * bs), 1) };
                        }
                        total += t.elapsed();
                        left -= n;
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

/// The first `nblocks` 2 MiB blocks of the OS file at `path` mapped on
/// `backend`, every page loaded.
fn loaded(path: &std::path::Path, nblocks: u64, backend: FaultBackend) -> (FileH, Vma) {
    let file = Arc::new(FileBigFile::open(path, 2 * MIB).expect("open the write file"));
    let ram = support::ram("2M", backend).expect("RAM");
    let fh = FileH::open(file, Some(&ram)).expect("open");
    let vma = fh.mmap(0, nblocks).expect("mmap");
    vma.prefault(0..vma.len(), bigfile::virtmem::Access::Read)
        .expect("prefault");
    (fh, vma)
}

/// (6) Two threads faulting different blocks against one thread, with the
/// filling loadblk of (2) and with the no-op one of (1).
fn threads(c: &mut Criterion, figures: &support::Figures) {
    let bs = 2 * MIB;
    let mut g = c.benchmark_group("threads");
    for backend in support::backends("2M", figures) {
        for (kind, file, advice) in [
            (
                "fill",
                Arc::new(FillFile(bs)) as Arc<dyn BigFile>,
                Advice::Normal,
            ),
            ("noop", Arc::new(NoopFile(bs)), Advice::Normal),
            (
                "fill_sequential",
                Arc::new(FillFile(bs)),
                Advice::Sequential,
            ),
        ] {
            let cycle = Cycle::new(file, backend, 32, 512);
            cycle.vma.advise(advice);
            let id = support::on(kind, backend);
            for n in [1u64, 2] {
                let before = cycle.fh.stats();
                let mut touches = 0;
                let mut next = cycle.starts(n);
                g.bench_function(BenchmarkId::new(&id, n), |b| {
                    b.iter_custom(|iters| {
                        let iters = iters.max(n);
                        touches += iters / n * n;
                        cycle.touch_parallel(&mut next, iters)
                    })
                });
                cycle.record_faults_per_touch(
                    figures,
                    &format!("threads.{id}.{n}"),
                    before,
                    touches,
                );
            }
            figures.set(
                &format!("threads.{id}.ram_resident_max"),
                cycle.ram.stats().resident_bytes,
            );
        }
    }
    // The bound the machine puts on (6): the same fill into 32 blocks of
    // plain memory (the 32 pages of the budget), each thread cycling over
    // its half, no faults. Filling 2 MiB that is not in cache is limited by
    // memory bandwidth, which two threads may not double.
    let mut plain = vec![0u64; 32 * bs / 8];
    for n in [1usize, 2] {
        g.bench_function(BenchmarkId::new("bare_fill", n), |b| {
            b.iter_custom(|iters| {
                let iters = iters.max(n as u64);
                let t = Instant::now();
                std::thread::scope(|s| {
                    let part = plain.len() / n;
                    for half in plain.chunks_mut(part) {
                        s.spawn(move || {
                            let blocks = half.len() * 8 / bs;
                            for i in 0..iters / n as u64 {
                                let k = i as usize % blocks;
                                let words = &mut half[k * bs / 8..(k + 1) * bs / 8];
                                // SAFETY: reinterpreting initialised u64s as bytes.
                                let bytes = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        words.as_mut_ptr().cast::<u8>(),
                                        bs,
                                    )
                                };
                                support::fill_block(bytes, i);
                            }
                        });
                    }
                });
                t.elapsed()
            })
        });
    }
    g.finish();
}
