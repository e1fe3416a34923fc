//! The fault-injection suite: `cargo xtask faults [FILTER]`.
//!
//! Every scenario prints one line; the run ends with `N passed, M failed`
//! and exits non-zero if anything failed. Scenarios that must crash run in a
//! child process: this binary re-executed with `--child NAME`.
//!
//! - `crash`: the process must die, with the right signal, in the right place.
//! - `inject`: the Nth call of a fallible operation fails; the process must
//!   survive with nothing lost and nothing leaked.
//! - `races`: threads doing everything at once, checked against a model.
//! - `zodb-stress`: concurrent ZODB transactions through a real ZEO server.
//! - `soak`: model-based randomized soaks of one handle (Rust, and the
//!   Python bindings), for a time.
//!
//! Arguments: `[FILTER] [--minutes N]`; `--minutes` makes the long-running
//! scenarios (`zodb-stress`, `soak/…`) run for N minutes instead of their
//! default.

mod coredump;
mod crash;
mod inject;
mod leaks;
mod model;
mod python;
mod races;
mod soak;
mod soak_python;
mod tmpfs;
mod words;
mod zodb;

use std::sync::OnceLock;
use std::time::Instant;

/// One scenario of the suite.
pub struct Scenario {
    /// `group/name`, unique; what a FILTER argument matches against.
    pub name: String,
    /// Runs the scenario in this process (spawning children as it needs);
    /// `Ok` carries the detail printed after the name (e.g.
    /// `crashed OK (in loadblk)`), `Err` why it failed.
    pub run: Box<dyn FnOnce() -> Result<String, String>>,
}

impl Scenario {
    pub fn new(
        name: impl Into<String>,
        run: impl FnOnce() -> Result<String, String> + 'static,
    ) -> Self {
        Scenario {
            name: name.into(),
            run: Box::new(run),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, name] = args.as_slice() {
        if flag == "--child" {
            // Child bodies crash or exit on their own; returning is a failure.
            if name.starts_with("races/") {
                races::child(name);
            } else if name.starts_with("soak/") {
                soak::child(name);
            } else {
                crash::child(name);
            }
            eprintln!("faults: child {name:?} returned instead of dying");
            std::process::exit(101);
        }
    }
    let filter = match parse_args(&args) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("faults: {e}\nusage: bigfile-faults [FILTER] [--minutes N]");
            std::process::exit(2);
        }
    };

    let mut scenarios = Vec::new();
    scenarios.extend(crash::scenarios());
    scenarios.extend(inject::scenarios());
    scenarios.extend(races::scenarios());
    scenarios.extend(zodb::scenarios());
    scenarios.extend(soak::scenarios());
    scenarios.extend(soak_python::scenarios());

    let (mut passed, mut failed) = (0, 0);
    let t0 = Instant::now();
    for s in scenarios.into_iter().filter(|s| s.name.contains(&filter)) {
        let t = Instant::now();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(s.run))
            .unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(&*p))));
        let secs = t.elapsed().as_secs_f64();
        match res {
            Ok(detail) => {
                passed += 1;
                println!("ok    {:<44} {detail} ({secs:.1}s)", s.name);
            }
            Err(why) => {
                failed += 1;
                println!("FAIL  {:<44} {why} ({secs:.1}s)", s.name);
            }
        }
    }
    println!(
        "{passed} passed, {failed} failed ({:.0}s)",
        t0.elapsed().as_secs_f64()
    );
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

static MINUTES: OnceLock<f64> = OnceLock::new();

/// `--minutes N` of the command line: how long long-running scenarios run.
pub fn minutes() -> Option<f64> {
    MINUTES.get().copied()
}

/// The FILTER of `[FILTER] [--minutes N]`; records the minutes.
fn parse_args(args: &[String]) -> Result<String, String> {
    let mut filter = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--minutes" {
            let n = it.next().ok_or("--minutes needs a number")?;
            let m: f64 = n
                .parse()
                .ok()
                .filter(|m: &f64| m.is_finite() && *m > 0.0)
                .ok_or_else(|| format!("--minutes {n:?}: not a positive number"))?;
            MINUTES.set(m).map_err(|_| "--minutes given twice")?;
        } else if a.starts_with('-') {
            return Err(format!("unknown option {a:?}"));
        } else if filter.replace(a.clone()).is_some() {
            return Err(format!("one FILTER only, got a second: {a:?}"));
        }
    }
    Ok(filter.unwrap_or_default())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}
