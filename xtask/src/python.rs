//! The Python side of `cargo xtask test`: a venv per CPython found, with
//! maturin, pytest, numpy and hypothesis (BigArray's property tests), ZODB,
//! ZEO, RelStorage and Dask from PyPI, the package built into it, the
//! wendelin alias distribution installed beside it for its own test, pytest
//! run; a PostgreSQL server for the RelStorage tests found or installed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::backends::{self, Backend};
use crate::{root, run, Result};

const PACKAGE: &str = "crates/bigfile-python";
/// The CPython versions the bindings support (pyo3's range; README.md).
const SUPPORTED: &[&str] = &["3.9", "3.10", "3.11", "3.12", "3.13", "3.14"];
const VENV_DEPS: &[&str] = &[
    "maturin>=1.5,<2",
    "pytest>=7",
    "numpy",
    "hypothesis>=6",
    "ZODB",
    "ZEO",
    "BTrees",
    "persistent",
    "transaction",
    "zodburi",
    "RelStorage",
    "psycopg2-binary",
    "dask[array]",
    "distributed",
];

/// Every supported CPython (3.9-3.14) on the machine: the default `python3` first, then
/// pyenv's interpreters; one per minor version.
pub(crate) fn interpreters() -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let mut candidates: Vec<PathBuf> = vec![PathBuf::from("python3")];
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")));
    if let Some(versions) = pyenv.map(|p| p.join("versions")) {
        if let Ok(rd) = std::fs::read_dir(versions) {
            let mut dirs: Vec<PathBuf> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin/python3"))
                .collect();
            dirs.sort();
            candidates.extend(dirs);
        }
    }
    for exe in candidates {
        let Ok(out) = Command::new(&exe)
            .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
            .output()
        else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let supported = SUPPORTED.contains(&version.as_str());
        if supported && !found.iter().any(|(v, _)| *v == version) {
            found.push((version, exe));
        }
    }
    found
}

/// Build the bindings and run their tests on every interpreter found, on
/// the first of `backends`; the first interpreter's on every one of them.
pub(crate) fn test_all(backends: &[Backend]) -> Result {
    if !root().join(PACKAGE).join("pyproject.toml").exists() {
        eprintln!("xtask: no Python package yet ({PACKAGE})");
        return Ok(());
    }
    let pys = interpreters();
    if pys.is_empty() {
        return Err("no CPython 3.9-3.14 found (python3 or pyenv)".into());
    }
    eprintln!(
        "xtask: Python interpreters: {}",
        pys.iter()
            .map(|(v, _)| v.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (version, exe) in &pys {
        let venv = venv(version, exe)?;
        let first = version == &pys[0].0;
        if first {
            ensure_postgres(&venv)?;
        }
        build_into(&venv)?;
        let on = if first { backends } else { &backends[..1] };
        for &b in on {
            backends::on(b, || pytest_in(&venv))?;
        }
    }
    Ok(())
}

/// The RelStorage tests start a PostgreSQL server of their own
/// (tests/servers.py finds its binaries); when there is none, install
/// Debian's (as root, the tests run it as `nobody`).
fn ensure_postgres(venv: &Path) -> Result {
    let tests = root().join(PACKAGE).join("tests");
    let found = || {
        Command::new(venv.join("bin/python"))
            .arg(tests.join("servers.py"))
            .arg("postgres-bindir")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found() {
        return Ok(());
    }
    // /proc/self belongs to the process's effective user.
    let root_user = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root_user || Command::new("apt-get").arg("--version").output().is_err() {
        return Err(
            "no PostgreSQL server for the RelStorage tests: install one (Debian: apt-get install \
                    postgresql), or name its binaries' directory in BIGFILE_TEST_PG_BINDIR"
                .into(),
        );
    }
    eprintln!("xtask: no PostgreSQL server found; installing Debian's postgresql package");
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "postgresql",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    if !found() {
        return Err(
            "installed postgresql, but tests/servers.py still finds no server binaries".into(),
        );
    }
    Ok(())
}

/// Create (once) `target/venv-X.Y` with the build and test dependencies.
pub(crate) fn venv(version: &str, exe: &Path) -> Result<PathBuf> {
    venv_with(
        &root().join("target").join(format!("venv-{version}")),
        exe,
        VENV_DEPS,
    )
}

/// Create (once) a venv at `venv` by `exe` with `deps` installed from PyPI.
pub(crate) fn venv_with(venv: &Path, exe: &Path, deps: &[&str]) -> Result<PathBuf> {
    let py = venv.join("bin/python");
    if !py.exists() {
        run(Command::new(exe).args(["-m", "venv"]).arg(venv))?;
    }
    // The stamp names what was installed, so a venv made before a
    // dependency was added gets it.
    let stamp = venv.join(".deps-installed");
    let wanted = deps.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        run(Command::new(&py).args(["-m", "pip", "install", "--quiet", "--upgrade", "pip"]))?;
        run(Command::new(&py)
            .args(["-m", "pip", "install", "--quiet"])
            .args(deps))?;
        std::fs::write(&stamp, &wanted).map_err(|e| format!("{}: {e}", stamp.display()))?;
    }
    Ok(venv.to_path_buf())
}

/// The optional distribution of wendelin.core's module paths (aliases of bigfile's).
const WENDELIN_ALIAS: &str = "crates/bigfile-python/wendelin-alias";

/// The Python tests in `venv`, the package built into it already.
fn pytest_in(venv: &Path) -> Result {
    let alias = install_wendelin_alias(venv)?;
    run(Command::new(venv.join("bin/python"))
        .args(["-m", "pytest", "-q"])
        .env("BIGFILE_WENDELIN_ALIAS", &alias)
        .current_dir(root().join(PACKAGE)))
}

/// Install the wendelin alias distribution into `venv/wendelin-alias`, a
/// directory not on the venv's `sys.path`: only the processes its test
/// starts put it there, so no other test can lean on it (it would let
/// `wendelin.*` imports succeed that the package itself does not offer).
fn install_wendelin_alias(venv: &Path) -> Result<PathBuf> {
    let dir = venv.join("wendelin-alias");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    run(Command::new(venv.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--no-index"])
        .args(["--disable-pip-version-check", "--target"])
        .arg(&dir)
        .arg(root().join(WENDELIN_ALIAS)))?;
    Ok(dir)
}

/// Build the package and install it into `venv` (editable).
fn build_into(venv: &Path) -> Result {
    run(Command::new(venv.join("bin/maturin"))
        .args(["develop", "--release", "--quiet"])
        .current_dir(root().join(PACKAGE))
        .env("VIRTUAL_ENV", venv)
        .env_remove("CONDA_PREFIX"))
}

/// The interpreter the fault suite's Python scenarios run in: the venv of
/// the first CPython found, with the package built into it. `rebuild`
/// builds even when the package is already importable there (its sources
/// may have changed); without it, a venv `test_all` just built is reused.
pub(crate) fn faults_python(rebuild: bool) -> Result<PathBuf> {
    let pys = interpreters();
    let Some((version, exe)) = pys.first() else {
        return Err("no CPython 3.9-3.14 found (python3 or pyenv) for the fault suite".into());
    };
    let venv = venv(version, exe)?;
    let py = venv.join("bin/python");
    let importable = Command::new(&py)
        .args(["-c", "import bigfile._bigfile"])
        .output()
        .is_ok_and(|o| o.status.success());
    if rebuild || !importable {
        build_into(&venv)?;
    }
    Ok(py)
}
