//! What the benchmarks share: sizes, test files, BigFile implementations,
//! the scan kernel and the file of figures that are not timings.

use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bigfile::virtmem::{BigFile, BlockError, FaultBackend, Ram};

pub const KIB: usize = 1 << 10;
pub const MIB: usize = 1 << 20;

/// Sizes and times for one run: full, or quick (`BIGFILE_BENCH_QUICK=1`).
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub quick: bool,
    /// The file scanned (3) and read at random (4).
    pub scan_bytes: usize,
    /// The RAM budget of the random reads (4): a quarter of the file.
    pub random_budget: usize,
    /// The mapping written (5).
    pub write_bytes: usize,
    pub warm_up: Duration,
    pub measure: Duration,
}

impl Config {
    pub fn from_env() -> Config {
        let quick = std::env::var_os("BIGFILE_BENCH_QUICK").is_some_and(|v| v != "0");
        if quick {
            Config {
                quick,
                scan_bytes: 256 * MIB,
                random_budget: 64 * MIB,
                write_bytes: 64 * MIB,
                warm_up: Duration::from_millis(200),
                measure: Duration::from_millis(700),
            }
        } else {
            Config {
                quick,
                scan_bytes: 1024 * MIB,
                random_budget: 256 * MIB,
                write_bytes: 256 * MIB,
                warm_up: Duration::from_secs(1),
                measure: Duration::from_secs(4),
            }
        }
    }
}

/// The RAM spec for pages of `pagesize` ("2M", "64K"): the backend is
/// `BIGFILE_BENCH_RAM` (e.g. `memfd,thp=off` for small pages, `shmfs:DIR`),
/// memfd (with transparent huge pages) by default.
pub fn ram_spec(pagesize: &str) -> String {
    let backend = std::env::var("BIGFILE_BENCH_RAM").unwrap_or_else(|_| "memfd".into());
    format!("{backend},pagesize={pagesize}")
}

/// A RAM of pages of `pagesize` (as [`ram_spec`]) on fault backend
/// `backend`; the reason when the process cannot have that backend, or
/// that RAM (`BIGFILE_BENCH_RAM=hugetlbfs` has no 64 KiB pages).
pub fn ram(pagesize: &str, backend: FaultBackend) -> Result<Ram, String> {
    let spec = ram_spec(pagesize);
    Ram::from_spec(&spec)
        .map_err(|e| format!("RAM {spec}: {e}"))?
        .with_fault_backend(backend)
        .map_err(|e| e.to_string())
}

/// The fault backends to measure: signals first (the userfaultfd figures
/// are read against it), then userfaultfd where this process can have it
/// for `pagesize` (else it is left out, with the reason on stderr and in
/// the figures file). `BIGFILE_BENCH_FAULTS=signals` or `=userfaultfd`
/// measures only that one (for profiling).
pub fn backends(pagesize: &str, figures: &Figures) -> Vec<FaultBackend> {
    let only = std::env::var("BIGFILE_BENCH_FAULTS").ok();
    let mut out = Vec::new();
    for b in [FaultBackend::Signals, FaultBackend::Userfaultfd] {
        if only.as_deref().is_some_and(|o| o != b.name()) {
            continue;
        }
        match ram(pagesize, b) {
            Ok(_) => out.push(b),
            Err(why) => {
                eprintln!("bench: no {b} figures: {why}");
                figures.set(&format!("unavailable.{b}"), why);
            }
        }
    }
    out
}

/// A benchmark's name on `backend`: `name` on signals (the names the rows
/// had before there were two backends), `name_uffd` on userfaultfd.
pub fn on(name: &str, backend: FaultBackend) -> String {
    match backend {
        FaultBackend::Signals => name.to_owned(),
        FaultBackend::Userfaultfd => format!("{name}_uffd"),
    }
}

/// Where data files and the figures file go: `$CARGO_TARGET_DIR` (or
/// `target/` under the working directory, which cargo sets to the package
/// root) plus `bench-data/`.
pub fn data_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("bench-data");
    fs::create_dir_all(&dir).expect("create the bench data directory");
    dir
}

/// Word `i` of the test files: never zero, different everywhere.
fn word(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

/// A file of `bytes` bytes of non-zero words, made once and reused while
/// its size matches.
pub fn data_file(name: &str, bytes: usize) -> PathBuf {
    let path = data_dir().join(name);
    if fs::metadata(&path).is_ok_and(|m| m.len() == bytes as u64) {
        return path;
    }
    let mut f = File::create(&path).expect("create a data file");
    let mut chunk = vec![0u8; 2 * MIB];
    let mut w = 0u64;
    for _ in 0..bytes / chunk.len() {
        for c in chunk.chunks_exact_mut(8) {
            c.copy_from_slice(&word(w).to_ne_bytes());
            w += 1;
        }
        f.write_all(&chunk).expect("write a data file");
    }
    f.sync_all().expect("sync a data file");
    path
}

/// Read a whole file once so it sits in the page cache.
pub fn warm_page_cache(path: &Path) {
    let f = File::open(path).expect("open a data file");
    let mut buf = vec![0u8; 2 * MIB];
    let mut off = 0;
    loop {
        let n = f.read_at(&mut buf, off).expect("read a data file");
        if n == 0 {
            break;
        }
        off += n as u64;
    }
}

/// Sum of the native-endian u64 words of `bytes` (a multiple of 8 long, 8-aligned).
#[inline]
pub fn sum_words(bytes: &[u8]) -> u64 {
    // SAFETY: every bit pattern is a valid u64; callers pass page-aligned
    // memory, so the middle part is the whole slice.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    debug_assert!(head.is_empty() && tail.is_empty());
    words.iter().fold(0u64, |a, &w| a.wrapping_add(w))
}

/// The fill both fault benchmark (2) and its kernel baseline do: one store
/// per word.
#[inline]
pub fn fill_block(buf: &mut [u8], blk: u64) {
    // SAFETY: as in `sum_words`; buffers are page-aligned.
    let (_, words, _) = unsafe { buf.align_to_mut::<u64>() };
    for (i, w) in words.iter_mut().enumerate() {
        *w = blk ^ i as u64;
    }
    black_box(buf);
}

/// A BigFile whose `loadblk` does nothing (the page keeps whatever the RAM
/// gave: zeros or a recycled page's old data).
#[derive(Debug)]
pub struct NoopFile(pub usize);

impl BigFile for NoopFile {
    fn blksize(&self) -> usize {
        self.0
    }
    fn loadblk(&self, _blk: u64, _buf: &mut [u8]) -> Result<(), BlockError> {
        Ok(())
    }
    fn storeblk(&self, _blk: u64, _buf: &[u8]) -> Result<(), BlockError> {
        Ok(())
    }
}

/// A BigFile whose `loadblk` writes every word of the block.
#[derive(Debug)]
pub struct FillFile(pub usize);

impl BigFile for FillFile {
    fn blksize(&self) -> usize {
        self.0
    }
    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        fill_block(buf, blk);
        Ok(())
    }
    fn storeblk(&self, _blk: u64, _buf: &[u8]) -> Result<(), BlockError> {
        Ok(())
    }
}

/// Figures that are not timings (resident memory, counters), written to
/// `bench-data/figures.tsv` as `key<TAB>value` for `cargo xtask bench`.
pub struct Figures {
    path: PathBuf,
    lines: Mutex<Vec<(String, String)>>,
}

impl Figures {
    pub fn new() -> Figures {
        let path = std::env::var_os("BIGFILE_BENCH_FIGURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| data_dir().join("figures.tsv"));
        // Named by `cargo xtask bench`, its directory may not exist yet (a
        // fresh clone): the first figure is set before any data file is made.
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).expect("create the figures file's directory");
        }
        Figures {
            path,
            lines: Mutex::new(Vec::new()),
        }
    }

    /// Record `key = value`, replacing an earlier value, and rewrite the file.
    pub fn set(&self, key: &str, value: impl ToString) {
        let mut lines = self.lines.lock().expect("figures lock");
        lines.retain(|(k, _)| k != key);
        lines.push((key.to_owned(), value.to_string()));
        let text: String = lines.iter().map(|(k, v)| format!("{k}\t{v}\n")).collect();
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)
            .expect("open the figures file");
        f.write_all(text.as_bytes())
            .expect("write the figures file");
    }
}

/// A small fast PRNG (xorshift64*) for random offsets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}
