//! The main job (`cargo xtask demo`): a file bigger than the RAM budget,
//! used as plain memory, changed in transactions that are committed or
//! aborted, then scanned and verified, and its scan timed against the
//! kernel's own mmap of the file.
//!
//! Options: `--file PATH` (default: a sparse file in a temporary directory),
//! `--size BYTES` (default 4G), `--ram-budget BYTES` (default 256M),
//! `--blksize BYTES` (default 2M). Sizes accept K, M, G suffixes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use bigfile::virtmem::{Advice, FileBigFile, FileH, Ram, WriteoutFlags};

struct Options {
    file: Option<PathBuf>,
    size: u64,
    budget: u64,
    blksize: usize,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            format!("bad size {s:?}: expected a number with an optional K, M or G suffix")
        })
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        file: None,
        size: 4 << 30,
        budget: 256 << 20,
        blksize: 2 << 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--file" => o.file = Some(PathBuf::from(val()?)),
            "--size" => o.size = parse_size(&val()?)?,
            "--ram-budget" => o.budget = parse_size(&val()?)?,
            "--blksize" => o.blksize = parse_size(&val()?)? as usize,
            _ => {
                return Err(format!(
                    "unknown argument {a:?}; see examples/demo.rs for the options"
                ))
            }
        }
    }
    if o.blksize == 0 || o.size < o.blksize as u64 * 8 {
        return Err(format!(
            "--size {} must hold at least 8 blocks of --blksize {}",
            o.size, o.blksize
        ));
    }
    if o.budget < 4 * o.blksize as u64 {
        return Err(format!(
            "--ram-budget {} must hold at least 4 blocks of {}",
            o.budget, o.blksize
        ));
    }
    Ok(o)
}

/// The committed pattern: word `i` of block `b`.
fn pattern(b: u64, i: u64) -> u64 {
    b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i ^ 0x5A5A
}

/// xorshift, for reproducible "random" block choices.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The wrapping sum of `ws`: the one loop both timed scans run, so that
/// their throughputs compare like with like.
#[inline(never)]
fn sum_words(ws: &[u64]) -> u64 {
    ws.iter().fold(0u64, |a, &w| a.wrapping_add(w))
}

fn words(vma: &bigfile::virtmem::Vma, blk: u64, blksize: usize) -> *mut u64 {
    vma.as_ptr().wrapping_add(blk as usize * blksize).cast()
}

/// Read `path` through once, so that later reads find it in the page cache.
fn warm_page_cache(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 2 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// Shared memory resident in this process, each page counted once
/// (Pss_Shmem): a RAM page is mapped both where the program sees it and in
/// its handle's load window, which RssShmem would count twice.
fn pss_shmem() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss_Shmem:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn run(o: &Options) -> Result<(), String> {
    let _tmp;
    let path = match &o.file {
        Some(p) => p.clone(),
        None => {
            let dir = std::env::temp_dir().join(format!("bigfile-demo-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            _tmp = TempDir(dir.clone());
            dir.join("data.bin")
        }
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(o.file.is_none())
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(o.size)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    drop(f);
    let nblk = o.size / o.blksize as u64;
    let words_per_blk = (o.blksize / 8) as u64;
    let ram = Ram::from_spec(&format!("memfd,pagesize={}", o.blksize))
        .map_err(|e| e.to_string())?
        .with_budget(o.budget);
    println!(
        "bigfile demo: {} = {:.0} MiB of {} blocks of {} KiB, RAM budget {:.0} MiB",
        path.display(),
        mib(o.size),
        nblk,
        o.blksize >> 10,
        mib(ram.budget())
    );

    // 1. Write a pattern into a few hundred random blocks and commit. Dirty
    // pages cannot be reclaimed, so commit in batches that fit the budget.
    let file = Arc::new(
        FileBigFile::open(&path, o.blksize).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    let fh = FileH::open(file.clone(), Some(&ram)).map_err(|e| e.to_string())?;
    let vma = fh.mmap(0, nblk).map_err(|e| e.to_string())?;
    let mut seed = 0x2545_F491_4F6C_DD1D;
    let want = (300u64).min(nblk / 2);
    let mut committed = BTreeSet::new();
    while (committed.len() as u64) < want {
        committed.insert(next(&mut seed) % nblk);
    }
    let batch = ((ram.budget() / o.blksize as u64) / 2).max(1) as usize;
    let committed_v: Vec<u64> = committed.iter().copied().collect();
    for chunk in committed_v.chunks(batch) {
        for &b in chunk {
            let p = words(&vma, b, o.blksize);
            for i in 0..words_per_blk {
                // SAFETY: inside the mapping; this thread alone uses it.
                unsafe { p.add(i as usize).write(pattern(b, i)) };
            }
        }
        fh.dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
            .map_err(|e| e.to_string())?;
    }
    file.sync().map_err(|e| e.to_string())?;
    println!(
        "1. wrote a pattern into {} random blocks, committed in batches of {batch}",
        committed.len()
    );

    // 2. Change other blocks and abort.
    let mut aborted = BTreeSet::new();
    while (aborted.len() as u64) < (batch as u64).min(nblk - want) {
        let b = next(&mut seed) % nblk;
        if !committed.contains(&b) {
            aborted.insert(b);
        }
    }
    for &b in &aborted {
        vma.write_at(b as usize * o.blksize, &vec![0xEE; o.blksize])
            .map_err(|e| e.to_string())?;
    }
    let dirty = fh.dirty_blocks().len();
    fh.dirty_discard().map_err(|e| e.to_string())?;
    println!("2. changed {dirty} other blocks and aborted (discarded)");
    let stats_write = fh.stats();
    drop(vma);
    drop(fh);

    // 3. Reopen and scan everything. Both this scan and the kernel mmap scan
    // below read the file from the page cache: it is read through once first,
    // untimed (the first read of a sparse file's holes is the filesystem
    // zeroing new page-cache pages, whichever scan came first would pay it).
    warm_page_cache(&path).map_err(|e| e.to_string())?;
    let file = Arc::new(FileBigFile::open(&path, o.blksize).map_err(|e| e.to_string())?);
    let fh = FileH::open(file, Some(&ram)).map_err(|e| e.to_string())?;
    let vma = fh.mmap(0, nblk).map_err(|e| e.to_string())?;
    // A forward scan, each block once: recycle the page just left (cache-hot)
    // rather than the least recently used one.
    vma.advise(Advice::Sequential);
    let bar = indicatif::ProgressBar::new(o.size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "3. scanning {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template"),
    );
    let pss0 = pss_shmem();
    let (mut peak_acct, mut peak_pss) = (0u64, 0u64);
    let t0 = Instant::now();
    let mut sum = 0u64;
    let mut bad_commit = Vec::new();
    let mut bad_abort = Vec::new();
    for b in 0..nblk {
        // SAFETY: the mapping is alive and nobody writes it during the scan.
        let blk = unsafe {
            std::slice::from_raw_parts(words(&vma, b, o.blksize), words_per_blk as usize)
        };
        sum = sum.wrapping_add(sum_words(blk));
        // 4. Verify while the block is here.
        if committed.contains(&b) {
            if blk
                .iter()
                .enumerate()
                .any(|(i, &w)| w != pattern(b, i as u64))
            {
                bad_commit.push(b);
            }
        } else if aborted.contains(&b) && blk.iter().any(|&w| w != 0) {
            bad_abort.push(b);
        }
        peak_acct = peak_acct.max(ram.stats().resident_bytes);
        if b % 16 == 0 {
            peak_pss = peak_pss.max(pss_shmem().saturating_sub(pss0));
        }
        bar.inc(o.blksize as u64);
    }
    let scan_s = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    println!(
        "3. scanned {:.0} MiB in {:.2} s, checksum {sum:#018x}",
        mib(o.size),
        scan_s
    );

    let expected: u64 = committed
        .iter()
        .flat_map(|&b| (0..words_per_blk).map(move |i| pattern(b, i)))
        .fold(0u64, |a, w| a.wrapping_add(w));

    // The handle's counters of the scan of step 3.
    let st = fh.stats();
    // Timed: the sum alone, the same loop over the same blocks,
    // through a fresh bigfile mapping (its pages loaded from the page
    // cache) and through the kernel's mmap of the file (its pages mapped
    // from the page cache). Both read what step 3 left in the page cache.
    let scan_vma = fh.mmap(0, nblk).map_err(|e| e.to_string())?;
    scan_vma.advise(Advice::Sequential);
    let t1 = Instant::now();
    let mut bsum = 0u64;
    for b in 0..nblk {
        // SAFETY: the mapping is alive and nobody writes it during the scan.
        let blk = unsafe {
            std::slice::from_raw_parts(words(&scan_vma, b, o.blksize), words_per_blk as usize)
        };
        bsum = bsum.wrapping_add(sum_words(blk));
    }
    let bigfile_s = t1.elapsed().as_secs_f64();
    drop(scan_vma);
    let kf = std::fs::File::open(&path).map_err(|e| e.to_string())?;
    // SAFETY: the file is not modified while mapped.
    let km = unsafe { memmap2::Mmap::map(&kf) }.map_err(|e| e.to_string())?;
    // SAFETY: every bit pattern is a valid u64.
    let (pre, ws, post) = unsafe { km.align_to::<u64>() };
    assert!(pre.is_empty() && post.is_empty());
    let t2 = Instant::now();
    let ksum = ws
        .chunks(words_per_blk as usize)
        .fold(0u64, |a, blk| a.wrapping_add(sum_words(blk)));
    let kernel_s = t2.elapsed().as_secs_f64();
    drop(km);

    println!(
        "4. verified: {} committed blocks hold the pattern, {} aborted blocks are unchanged",
        committed.len(),
        aborted.len()
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| faults (write phase + scan) | {} + {} |",
        stats_write.faults, st.faults
    );
    println!(
        "| loads (write phase + scan) | {} + {} |",
        stats_write.loads, st.loads
    );
    println!("| stores | {} |", stats_write.stores);
    println!("| reclaims (scan) | {} |", st.reclaims);
    println!(
        "| peak resident, RAM accounting / Pss_Shmem | {:.0} MiB / {:.0} MiB of budget {:.0} MiB |",
        mib(peak_acct),
        mib(peak_pss),
        mib(ram.budget())
    );
    println!(
        "| scan throughput, the same sum of every word, page cache warm: bigfile / kernel mmap | {:.0} MiB/s / {:.0} MiB/s (ratio {:.2}) |",
        mib(o.size) / bigfile_s,
        mib(o.size) / kernel_s,
        kernel_s / bigfile_s
    );
    println!(
        "| the verifying scan of step 3 (sum, pattern checks, memory sampling) | {:.0} MiB/s |",
        mib(o.size) / scan_s
    );

    let mut errors = Vec::new();
    if !bad_commit.is_empty() {
        errors.push(format!(
            "committed blocks without the pattern: {bad_commit:?}"
        ));
    }
    if !bad_abort.is_empty() {
        errors.push(format!(
            "aborted changes still present in blocks {bad_abort:?}"
        ));
    }
    if sum != expected {
        errors.push(format!(
            "checksum {sum:#x} differs from the expected {expected:#x}"
        ));
    }
    if ksum != sum || bsum != sum {
        errors.push(format!(
            "checksum {sum:#x} differs from the timed scans' (bigfile {bsum:#x}, kernel mmap {ksum:#x})"
        ));
    }
    if peak_acct > ram.budget() + o.blksize as u64 {
        errors.push(format!(
            "peak resident {peak_acct} exceeds budget plus one block"
        ));
    }
    if errors.is_empty() {
        println!("\nOK");
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> ExitCode {
    let res = parse_args().and_then(|o| run(&o));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bigfile demo FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
