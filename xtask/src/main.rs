//! `cargo xtask <task>`: the project's automation, in Rust so it needs
//! nothing but cargo.
//!
//! - `test [lint|rust|python|wheel|faults]`: everything CI runs (formatting,
//!   clippy and the module-cycle check; every Rust test, the C API's header
//!   check and C tests among them; the Python tests on every CPython
//!   3.9-3.14 found; a built wheel tested installed; the fault suite), or
//!   one of those parts.
//! - `faults [FILTER] [--minutes N]`: the fault suite (crash, inject, race,
//!   ZODB stress and soak scenarios whose names contain FILTER; long-running
//!   ones for N minutes); see README.md.
//! - `bench [--quick]`: benchmarks with their baselines, one table.
//! - `demo [args]`: the main job, a file bigger than the RAM budget used as memory.
//! - `capi`: the C API's part of `test` alone (header check, C and C++ programs).
//! - `capi-header`: regenerate the C API's header (`crates/bigfile-capi/include/bigfile.h`).
//! - `dist`: the release artifacts (wheels, sdist, crates, C API tarball); see dist.rs.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

mod backends;
mod bench;
mod capi;
mod cycles;
mod dist;
mod python;

type Result<T = ()> = std::result::Result<T, String>;

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some((task, rest)) = args.split_first() else {
        usage();
    };
    let res = match task.as_str() {
        "test" => test(rest),
        "faults" => faults(rest),
        "bench" => bench::bench(rest),
        "demo" => demo(rest),
        "capi" => capi::test_task(rest),
        "capi-header" => capi::write_header(rest),
        "dist" => dist::dist(rest),
        "-h" | "--help" | "help" => usage(),
        other => Err(format!("unknown task {other:?}")),
    };
    if let Err(e) = res {
        eprintln!("xtask: {e}");
        exit(1);
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo xtask <task>\n\
         \n\
         tasks:\n  \
           test [PART]   what CI runs: lint (fmt, clippy, module cycles), rust, python, wheel, faults;\n                or only PART\n  \
           faults [FILTER] [--minutes N]\n                the fault suite (crash, inject, races, zodb-stress, soak) or the scenarios\n                matching FILTER; long-running scenarios for N minutes\n  \
           bench [--quick]  benchmarks with kernel baselines, printed as one table\n  \
           demo [--file PATH] [--size N] [--ram-budget N] [--blksize N]\n                the main job: a file bigger than the RAM budget used as memory\n  \
           capi          the C API's tests alone: header up to date, C programs (shared, static), C++\n  \
           capi-header   regenerate crates/bigfile-capi/include/bigfile.h (cbindgen)\n  \
           dist          release artifacts in <target>/dist: manylinux wheels, sdist, crates, C API tarball"
    );
    exit(2)
}

/// The workspace root of the checkout `cargo xtask` was run in, found at
/// run time: with a target directory shared by several checkouts, the
/// binary may have been built from another one. `cargo run` gives the
/// package's directory (xtask, one level below the root); without it, the
/// nearest directory above the current one holding a workspace with xtask.
pub(crate) fn root() -> PathBuf {
    if let Some(dir) = env::var_os("CARGO_MANIFEST_DIR") {
        let xtask = PathBuf::from(dir);
        if let Some(root) = xtask.parent().filter(|r| is_root(r)) {
            return root.to_path_buf();
        }
    }
    let cwd = env::current_dir().expect("a current directory");
    cwd.ancestors()
        .find(|d| is_root(d))
        .unwrap_or_else(|| panic!("no bigfile workspace above {}", cwd.display()))
        .to_path_buf()
}

fn is_root(dir: &Path) -> bool {
    dir.join("xtask/Cargo.toml").is_file()
        && std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.contains("[workspace]"))
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Run a command, echoing it; fail with its description when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: running {shown}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed: {status}"))
    }
}

/// A part of `cargo xtask test`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Formatting, clippy (of the workspace and of tests/faults) and the
    /// module-cycle check.
    Lint,
    /// Every Rust test: the workspace's, the libraries' failure-point
    /// tests, the fault suite's own unit tests.
    Rust,
    /// The Python tests on every CPython found.
    Python,
    /// A wheel as `cargo xtask dist` builds it, installed into a fresh venv
    /// without Rust, the Python tests run against it.
    Wheel,
    /// The fault suite.
    Faults,
}

const PARTS: [(&str, Part); 5] = [
    ("lint", Part::Lint),
    ("rust", Part::Rust),
    ("python", Part::Python),
    ("wheel", Part::Wheel),
    ("faults", Part::Faults),
];

fn test(args: &[String]) -> Result {
    let parts: Vec<Part> = match args {
        [] => PARTS.iter().map(|&(_, p)| p).collect(),
        [name] => match PARTS.iter().find(|(n, _)| n == name) {
            Some(&(_, p)) => vec![p],
            None => {
                return Err(format!(
                    "test takes lint, rust, python, wheel or faults, got {name:?}"
                ))
            }
        },
        _ => return Err(format!("test takes at most one part, got {args:?}")),
    };
    let backends = backends::to_test();
    for part in &parts {
        match part {
            Part::Lint => lint()?,
            Part::Rust => rust_tests(&backends)?,
            Part::Python => python::test_all(&backends)?,
            // The default backend's: the wheel's is the same library.
            Part::Wheel => backends::on(backends[0], dist::check_installed_wheel)?,
            Part::Faults => {
                // After the Python part, the package is built in the first
                // CPython's venv already.
                let python = faults_python(!parts.contains(&Part::Python))?;
                for &b in &backends {
                    backends::on(b, || run_faults(&[], python.clone()))?;
                }
            }
        }
    }
    eprintln!("xtask: all tests passed");
    Ok(())
}

fn lint() -> Result {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The fault suite is a workspace of its own: the commands above do
    // not see it.
    let suite = root().join("tests/faults/Cargo.toml");
    run(cargo()
        .args(["fmt", "--check", "--manifest-path"])
        .arg(&suite))?;
    run(cargo()
        .args(["clippy", "--release", "--all-targets", "--manifest-path"])
        .arg(&suite)
        .arg("--target-dir")
        .arg(faults_target_dir())
        .args(["--", "-D", "warnings"]))?;
    cycles::check(&root())
}

/// The workspace's tests and the libraries' failure-point tests on each of
/// `backends`; the C API's and the fault suite's own unit tests once.
fn rust_tests(backends: &[backends::Backend]) -> Result {
    for &b in backends {
        backends::on(b, rust_tests_on_backend)?;
    }
    capi::test()?;
    // The suite's own unit tests (its helpers, e.g. reading gdb output).
    run(cargo()
        .args(["test", "--release", "--manifest-path"])
        .arg(root().join("tests/faults/Cargo.toml"))
        .arg("--target-dir")
        .arg(faults_target_dir()))
}

fn rust_tests_on_backend() -> Result {
    run(cargo().args(["test", "--workspace"]))?;
    // The libraries' own failure-point tests (regressions found by the
    // suite), built where the suite builds, so the feature stays out of the
    // workspace's target directory.
    run(cargo()
        .args([
            "test",
            "--release",
            "-p",
            "bigfile-ram",
            "-p",
            "bigfile-virtmem",
            "--features",
            "failpoints",
            "--target-dir",
        ])
        .arg(faults_target_dir()))
}

fn faults(args: &[String]) -> Result {
    run_faults(args, faults_python(true)?)
}

/// The interpreter for the suite's Python scenarios: the one the caller
/// named in `BIGFILE_FAULTS_PYTHON`, used as it is; else the first CPython's
/// venv, with the package built into it (`rebuild`: even if it is there).
fn faults_python(rebuild: bool) -> Result<PathBuf> {
    match env::var_os(FAULTS_PYTHON) {
        Some(p) => Ok(PathBuf::from(p)),
        None => python::faults_python(rebuild),
    }
}

/// Names the Python interpreter (with bigfile installed) the fault suite's
/// Python scenarios run in.
const FAULTS_PYTHON: &str = "BIGFILE_FAULTS_PYTHON";

/// Where the fault suite is built: its own directory under the target
/// directory (`CARGO_TARGET_DIR` if set), never shared with the main build.
fn faults_target_dir() -> PathBuf {
    target_dir().join("faults")
}

/// The target directory: `CARGO_TARGET_DIR` (relative to the workspace
/// root, where `cargo()` runs) if set, else `target/`.
pub(crate) fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(|d| root().join(d))
        .unwrap_or_else(|| root().join("target"))
}

/// Runs the fault suite with `python` (a venv's interpreter with bigfile
/// built into it) for its Python scenarios.
fn run_faults(args: &[String], python: PathBuf) -> Result {
    let suite = root().join("tests/faults");
    if !suite.exists() {
        eprintln!("xtask: no fault suite yet (tests/faults)");
        return Ok(());
    }
    // Its own workspace and target directory: the failpoints it compiles in
    // must not reach the libraries the other tasks build.
    run(cargo()
        .args(["run", "--release", "--manifest-path"])
        .arg(suite.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(faults_target_dir())
        .arg("--")
        .args(args)
        .env(FAULTS_PYTHON, python))
}

fn demo(args: &[String]) -> Result {
    run(cargo()
        .args(["run", "--release", "--example", "demo", "--"])
        .args(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_the_checkout_being_run() {
        // `cargo test` runs this with CARGO_MANIFEST_DIR naming this
        // checkout's xtask, as `cargo run` does for `cargo xtask`.
        let xtask = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
        assert_eq!(root(), xtask.parent().unwrap());
        assert!(is_root(&root()));
        assert!(!is_root(&xtask), "xtask/ is not the workspace root");
        assert!(!is_root(&env::temp_dir()));
    }
}
