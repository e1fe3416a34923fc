//! `soak/rust-4k`, `soak/rust-64k`, `soak/rust-2m`: a model-based
//! randomized soak of one file handle, for a time rather than a number of
//! operations, with random choices from a new seed each run.
//!
//! Threads: three owners, each writing its own blocks and reading
//! everything; a reader (runs, reads across blocks, prefaults, sequential
//! scans under `Advice::Sequential`); a mapper replacing a pool of
//! mappings of the handle (random, overlapping ranges, random advice) and
//! asking for reclaim; a coordinator writing out (STORE|MARKSTORED, STORE
//! alone, STORE then MARKSTORED apart), discarding, changing blocks in
//! storage behind the handle and invalidating them, prefaulting a block
//! whose loads all fail, and changing the budget (1 to 16 pages) every
//! few seconds. `loadblk` fails now and then (never as many times in a
//! row as the load policy's attempts, so faults get their page);
//! `storeblk` fails now and then, and once on purpose in some commits.
//!
//! The model (`world.rs`, `words.rs`): each word says which block, word
//! and version it is; an owner knows its blocks exactly; anyone else knows
//! the range of versions a block may show. What changes what owners know
//! (discard, a MARKSTORED apart, an owned block changed in storage, a
//! budget change) is done with every other thread stopped at a gate. Dirty
//! pages are kept below the budget (credits), so loads always find a page
//! to reclaim; resident pages are checked against the budget plus one page
//! after every operation, against the RAM pages allocated at every stop.
//! At the end, memory is the model, a commit makes the storage the model,
//! a fresh handle reads the model, the counters match the file's calls, and
//! nothing is left mapped, allocated or registered.
//!
//! Each soak runs in a child process (`--child soak/NAME`), which aborts
//! with what each thread was doing when nothing progresses for a minute.
//! It uses the public API only, so it runs on whichever fault backend its
//! RAM picks.

mod coordinator;
mod file;
mod helpers;
mod owner;
mod twins;
mod world;

use std::process::Command;
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bigfile_testkit::model::Rng;
use bigfile_virtmem::FileH;

use crate::coredump::{exit_child, expect_success, last_line};
use crate::leaks::Baseline;
use crate::words;
use crate::Scenario;
use world::{watchdog, World, OWNERS, TOTAL_BLOCKS};

/// The soaks: name and block size.
const SOAKS: &[(&str, usize)] = &[
    ("rust-4k", 4 << 10),
    ("rust-64k", 64 << 10),
    ("rust-2m", 2 << 20),
];

/// Seconds all the Rust soaks run together without `--minutes`.
const DEFAULT_SECONDS: f64 = 60.0;
/// The seconds one soak runs, from the parent to its child.
const SECONDS_ENV: &str = "BIGFILE_SOAK_SECONDS";
/// Fixes the random choices (threads still interleave as they will).
const SEED_ENV: &str = "BIGFILE_SOAK_SEED";
/// Nothing done by any thread for this long is a hang.
const HANG: Duration = Duration::from_secs(60);

pub fn scenarios() -> Vec<Scenario> {
    SOAKS
        .iter()
        .map(|&(name, _)| {
            Scenario::new(format!("soak/{name}"), move || {
                // `--minutes N`: the Rust soaks share N minutes.
                let total = crate::minutes().map_or(DEFAULT_SECONDS, |m| m * 60.0);
                let seconds = total / SOAKS.len() as f64;
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                let mut cmd = Command::new(exe);
                cmd.args(["--child", &format!("soak/{name}")])
                    .env(SECONDS_ENV, seconds.to_string());
                let timeout = Duration::from_secs_f64(seconds) + HANG * 3;
                let out = expect_success(cmd, timeout)?;
                last_line(&out, "soak OK")
            })
        })
        .collect()
}

/// The body of child `soak/NAME`: runs the soak and exits, 0 on success.
pub fn child(name: &str) {
    let Some(&(_, blksize)) = SOAKS.iter().find(|s| name == format!("soak/{}", s.0)) else {
        eprintln!("faults: no soak {name:?}");
        return;
    };
    let seconds = std::env::var(SECONDS_ENV)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(DEFAULT_SECONDS / SOAKS.len() as f64);
    let seed = match seed() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soak {name}: {e}");
            std::process::exit(2);
        }
    };
    exit_child(
        run(blksize, seconds, seed).map(|summary| format!("seed {seed:#x}, {summary}")),
        "soak OK",
        &format!("soak {name} failed ({SEED_ENV}={seed:#x} makes the same choices)"),
    );
}

/// `BIGFILE_SOAK_SEED` (decimal or 0x-hex), else a new one.
fn seed() -> Result<u64, String> {
    match std::env::var(SEED_ENV) {
        Ok(s) => match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => s.parse(),
        }
        .map_err(|e| format!("{SEED_ENV}={s:?}: {e}")),
        Err(_) => Ok(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ std::process::id() as u64),
    }
}

fn run(blksize: usize, seconds: f64, seed: u64) -> Result<String, String> {
    let baseline = Baseline::take()?;
    // Owners, the reader, the mapper, the coordinator.
    let threads = OWNERS + 3;
    let w = World::new(blksize, seed, threads)?;
    let mut rng = Rng::spread(seed);
    coordinator::begin(&w, &mut rng)?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(seconds);
    let phase = Duration::from_secs_f64((seconds / 8.0).clamp(0.5, 3.0));

    let errors: Vec<String> = thread::scope(|s| {
        let w = &w;
        let mut hs: Vec<_> = (0..OWNERS)
            .map(|t| {
                let seed = seed ^ (t as u64 + 1) << 32;
                spawn(s, w, format!("owner {t}"), move || {
                    owner::owner(w, t, t, seed)
                })
            })
            .collect();
        let (r, m, c) = (OWNERS, OWNERS + 1, OWNERS + 2);
        hs.push(spawn(s, w, "reader".into(), move || {
            helpers::reader(w, r, seed ^ 0x100)
        }));
        hs.push(spawn(s, w, "mapper".into(), move || {
            helpers::mapper(w, m, seed ^ 0x200)
        }));
        hs.push(spawn(s, w, "coordinator".into(), move || {
            coordinator::coordinator(w, c, seed ^ 0x300, phase)
        }));
        let twins = [s.spawn(|| w.twins.serve()), s.spawn(|| w.twins.serve())];
        s.spawn(move || watchdog(w, HANG));
        while Instant::now() < deadline && !w.stopped() {
            thread::sleep(Duration::from_millis(50));
        }
        w.halt();
        let errors = hs
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("a thread panicked (see stderr)".into()),
            })
            .collect();
        w.twins.close();
        for t in twins {
            let _ = t.join();
        }
        errors
    });
    let mut errors = errors;
    errors.extend(w.file.violations());
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    let secs = t0.elapsed().as_secs_f64();

    coordinator::finish(&w, &mut rng)?;
    let stats = w.fh.stats();
    let injected = w.file.injected();
    let calls = (w.file.mem.loads() as u64, w.file.mem.stores() as u64);
    if (stats.loads, stats.stores) != calls {
        return Err(format!(
            "the handle counted {} loads and {} stores, the file saw {calls:?}",
            stats.loads, stats.stores
        ));
    }
    if stats.load_errors != injected.loads + injected.broken || stats.dirty_pages != 0 {
        return Err(format!(
            "the handle counted {stats:?}; the file injected {injected:?}"
        ));
    }
    let fresh = fresh_handle(&w)?;
    let summary = format!(
        "{} KiB blocks, {secs:.0}s: {} faults, {} loads, {} reclaims, {} stores; \
         injected {} load failures, {} of broken blocks, {} store failures; {}",
        blksize >> 10,
        stats.faults,
        stats.loads,
        stats.reclaims,
        stats.stores,
        injected.loads,
        injected.broken,
        injected.stores,
        w.summary()
    );

    // Nothing left behind.
    let mut ranges = w.unmap_all();
    ranges.push(fresh);
    if w.fh.mapping_count() != 0 {
        return Err(format!("{} mappings left", w.fh.mapping_count()));
    }
    w.ram.reclaim();
    let rs = w.ram.stats().stats;
    let allocated = w.ram.pages().stats().pages_allocated;
    if rs.resident_pages != 0 || rs.dirty_pages != 0 || allocated != 0 {
        return Err(format!(
            "after reclaiming all: {rs:?}, {allocated} RAM pages allocated"
        ));
    }
    drop(w);
    baseline.check(&ranges)?;
    Ok(summary)
}

/// Runs `body` on a thread named `name`; an error it ends with stops the
/// soak.
fn spawn<'s, 'w: 's>(
    s: &'s Scope<'s, 'w>,
    w: &'w World,
    name: String,
    body: impl FnOnce() -> Result<(), String> + Send + 'w,
) -> ScopedJoinHandle<'s, Result<(), String>> {
    thread::Builder::new()
        .name(name)
        .spawn_scoped(s, move || {
            let res = body();
            if res.is_err() {
                w.halt();
            }
            res
        })
        .expect("a soak thread")
}

/// Another handle of the file shows what the model says; the range its
/// mapping had.
fn fresh_handle(w: &World) -> Result<std::ops::Range<usize>, String> {
    let fh = FileH::open(w.file.mem.clone(), Some(&w.ram)).map_err(|e| e.to_string())?;
    let vma = fh.mmap(0, TOTAL_BLOCKS).map_err(|e| e.to_string())?;
    let models: Vec<_> = (0..OWNERS).map(|t| w.model(t)).collect();
    let mut buf = vec![0; w.blksize];
    for blk in 0..TOTAL_BLOCKS {
        vma.read_at(blk as usize * w.blksize, &mut buf)
            .map_err(|e| e.to_string())?;
        if words::versions(blk, &buf) != coordinator::expected(w, &models, blk) {
            return Err(format!(
                "a fresh handle's block {blk} differs from the model"
            ));
        }
    }
    Ok(vma.addr_range())
}
