//! `cargo xtask dist`: the release artifacts, under `<target>/dist/`:
//!
//! - `wheels/`: manylinux wheels of the Python package, one per CPython
//!   3.10+ found, built by maturin with zig against glibc 2.17
//!   (`--compatibility manylinux2014`), each checked by `auditwheel show`
//!   and by `wheel_check.py` (no symbol the promised glibc lacks);
//! - `sdist/`: the Python package's sdist, checked by building a wheel from
//!   it alone;
//! - `crates/`: `cargo package` of each publishable crate (verified: each
//!   builds from its package), after `cargo doc` without warnings;
//! - `capi/`: the C API as a tarball: shared and static library, header,
//!   pkg-config file;
//! - `MANIFEST`: every artifact with its size and SHA-256, and what is
//!   missing and why.
//!
//! Everything is made in `<target>/dist.partial/` and moved to `dist/` at
//! the end, so a `dist/` is never half written; if a part cannot be built
//! (no zig, no interpreter, no network), the others still are, the
//! `MANIFEST` says `incomplete` and names what is missing, and the task
//! fails. The tools (maturin, zig from PyPI's `ziglang`, auditwheel) live
//! in a venv of their own, `<target>/dist-tools`.
//!
//! `cargo xtask test` calls `check_installed_wheel`: the wheel of one
//! interpreter, built as above, installed into a fresh venv with no Rust
//! toolchain on PATH, and the Python test suite run against it from a copy
//! of the tests outside the source tree.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, python, root, run, target_dir, Result};

/// The crates published to crates.io, in dependency order.
pub(crate) const CRATES: &[&str] = &[
    "bigfile-os",
    "bigfile-ram",
    "bigfile-fault",
    "bigfile-uffd",
    "bigfile-virtmem",
    "bigfile-capi",
];
const PACKAGE: &str = "crates/bigfile-python";
const TOOLS: &[&str] = &["maturin>=1.5,<2", "ziglang", "auditwheel>=6"];
/// The glibc the wheels are built against: manylinux2014's.
const MANYLINUX: &str = "manylinux_2_17";

pub(crate) fn dist(args: &[String]) -> Result {
    if let Some(a) = args.first() {
        return Err(format!("dist takes no arguments, got {a:?}"));
    }
    let target = target_dir();
    let staging = target.join("dist.partial");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let mut missing: Vec<String> = Vec::new();

    let mut note = |what: &str, r: Result| {
        if let Err(e) = r {
            eprintln!("xtask: dist: no {what}: {e}");
            missing.push(format!("{what}: {e}"));
        }
    };
    note("crates", crates(&staging));
    note("C API tarball", capi_tarball(&staging));
    match tools() {
        Ok(tools) => {
            note("wheels", wheels(&tools, &staging));
            note("sdist", sdist(&tools, &staging));
        }
        Err(e) => note("wheels and sdist", Err(e)),
    }

    write_manifest(&staging, &missing)?;
    let out = target.join("dist");
    let _ = fs::remove_dir_all(&out);
    fs::rename(&staging, &out)
        .map_err(|e| format!("{} -> {}: {e}", staging.display(), out.display()))?;
    eprintln!("xtask: dist: {}", out.join("MANIFEST").display());
    print!(
        "{}",
        fs::read_to_string(out.join("MANIFEST")).unwrap_or_default()
    );
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("dist is incomplete: {}", missing.join("; ")))
    }
}

/// `<target>/dist-tools`: a venv with maturin, zig and auditwheel.
fn tools() -> Result<PathBuf> {
    let (_, exe) = python::interpreters()
        .into_iter()
        .next()
        .ok_or("no CPython found to install maturin, zig (ziglang) and auditwheel with")?;
    python::venv_with(&target_dir().join("dist-tools"), &exe, TOOLS)
}

/// PATH with the tools' venv first (maturin finds zig as `python -m ziglang`).
fn tools_path(tools: &Path) -> std::ffi::OsString {
    let mut paths = vec![tools.join("bin")];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap_or_default()
}

/// The interpreters wheels are built for: CPython 3.10 and later.
fn wheel_interpreters() -> Vec<(String, PathBuf)> {
    python::interpreters()
        .into_iter()
        .filter(|(v, _)| v.split('.').nth(1).and_then(|m| m.parse::<u32>().ok()) >= Some(10))
        .collect()
}

fn wheels(tools: &Path, staging: &Path) -> Result {
    let pys = wheel_interpreters();
    if pys.is_empty() {
        return Err("no CPython 3.10 or later found".into());
    }
    let out = staging.join("wheels");
    for (version, exe) in &pys {
        let wheel = build_wheel(tools, exe, &out)?;
        eprintln!("xtask: dist: CPython {version}: {}", wheel.display());
    }
    Ok(())
}

/// Build the wheel for `python` into `out` and check it; its path.
fn build_wheel(tools: &Path, python: &Path, out: &Path) -> Result<PathBuf> {
    let tmp = out.with_extension("building");
    let _ = fs::remove_dir_all(&tmp);
    run(Command::new(tools.join("bin/maturin"))
        .args([
            "build",
            "--release",
            "--zig",
            "--compatibility",
            "manylinux2014",
            "--interpreter",
        ])
        .arg(python)
        .arg("--out")
        .arg(&tmp)
        .current_dir(root().join(PACKAGE))
        .env("PATH", tools_path(tools))
        .env("CARGO_TARGET_DIR", target_dir().join("dist-build")))?;
    let wheel = only_file(&tmp, ".whl")?;
    check_wheel(tools, &wheel)?;
    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let dest = out.join(wheel.file_name().unwrap_or_default());
    fs::rename(&wheel, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(dest)
}

/// auditwheel must find the wheel consistent with its manylinux tag, and
/// no extension module may need a symbol that glibc 2.17 lacks without
/// naming a version (auditwheel does not see those; the module would fail
/// to load on the older glibc the tag promises).
fn check_wheel(tools: &Path, wheel: &Path) -> Result {
    let out = Command::new(tools.join("bin/auditwheel"))
        .arg("show")
        .arg(wheel)
        .output()
        .map_err(|e| format!("cannot run auditwheel: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains(&format!("\"{MANYLINUX}_x86_64\"")) {
        return Err(format!(
            "auditwheel show {}: not {MANYLINUX}:\n{text}{}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    run(Command::new(tools.join("bin/python"))
        .arg(root().join("xtask/wheel_check.py"))
        .arg(wheel))
}

fn sdist(tools: &Path, staging: &Path) -> Result {
    let tmp = staging.join("sdist.building");
    run(Command::new(tools.join("bin/maturin"))
        .args(["sdist", "--out"])
        .arg(&tmp)
        .current_dir(root().join(PACKAGE))
        .env("PATH", tools_path(tools)))?;
    let sdist = only_file(&tmp, ".tar.gz")?;
    // It must build into a working package from itself alone.
    let built = tmp.join("wheel-from-sdist");
    run(Command::new(tools.join("bin/python"))
        .args(["-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir"])
        .arg(&built)
        .arg(&sdist)
        .current_dir(&tmp)
        .env("PATH", tools_path(tools))
        .env("CARGO_TARGET_DIR", target_dir().join("dist-build/sdist")))?;
    only_file(&built, ".whl")?;
    let out = staging.join("sdist");
    fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let dest = out.join(sdist.file_name().unwrap_or_default());
    fs::rename(&sdist, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(())
}

/// `cargo doc` without warnings, then `cargo package` of the crates
/// together (each verified by building it from its package, the others
/// from theirs).
fn crates(staging: &Path) -> Result {
    let build = target_dir().join("dist-build");
    let pkg_build = target_dir().join("dist-package");
    forget_earlier_packages(&pkg_build)?;
    let mut doc = cargo();
    doc.args(["doc", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    for c in CRATES {
        doc.args(["-p", c]);
    }
    run(doc.arg("--target-dir").arg(&build))?;
    let mut pkg = cargo();
    pkg.arg("package");
    for c in CRATES {
        pkg.args(["-p", c]);
    }
    run(pkg.arg("--target-dir").arg(&pkg_build))?;
    let out = staging.join("crates");
    fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let version = workspace_version()?;
    for c in CRATES {
        let name = format!("{c}-{version}.crate");
        fs::copy(pkg_build.join("package").join(&name), out.join(&name))
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// Cargo takes the crates it verifies for registry crates, whose sources
/// never change for a version: it reuses what it unpacked
/// (`$CARGO_HOME/registry/src/*/NAME-VERSION`) and what it built from them
/// (in `pkg_build`) for an earlier `dist`. With the version unchanged, the
/// verification would build the old sources. Start both afresh (no
/// registry has these crates, so nothing else put them there).
fn forget_earlier_packages(pkg_build: &Path) -> Result {
    let _ = fs::remove_dir_all(pkg_build);
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let version = workspace_version()?;
    let Ok(registries) = fs::read_dir(home.join("registry/src")) else {
        return Ok(());
    };
    for reg in registries.flatten() {
        for c in CRATES {
            let dir = reg.path().join(format!("{c}-{version}"));
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
        }
    }
    Ok(())
}

/// The C API: `capi/bigfile-capi-VERSION-x86_64-linux.tar.gz` holding
/// `lib/libbigfile_capi.{so,a}`, `include/bigfile.h` and
/// `lib/pkgconfig/bigfile.pc` (relocatable: paths from its own place).
fn capi_tarball(staging: &Path) -> Result {
    let build = target_dir().join("dist-build");
    run(cargo()
        .args(["build", "--release", "-p", "bigfile-capi", "--target-dir"])
        .arg(&build))?;
    let version = workspace_version()?;
    let name = format!("bigfile-capi-{version}-x86_64-linux");
    let tree = staging.join("capi.building").join(&name);
    for d in ["lib/pkgconfig", "include"] {
        fs::create_dir_all(tree.join(d)).map_err(|e| format!("{d}: {e}"))?;
    }
    for lib in ["libbigfile_capi.so", "libbigfile_capi.a"] {
        fs::copy(build.join("release").join(lib), tree.join("lib").join(lib))
            .map_err(|e| format!("{lib}: {e}"))?;
    }
    fs::copy(
        root().join("crates/bigfile-capi/include/bigfile.h"),
        tree.join("include/bigfile.h"),
    )
    .map_err(|e| format!("bigfile.h: {e}"))?;
    let pc = format!(
        "prefix=${{pcfiledir}}/../..\nlibdir=${{prefix}}/lib\nincludedir=${{prefix}}/include\n\n\
         Name: bigfile\nDescription: Files bigger than RAM, used as memory (the C API of bigfile)\n\
         Version: {version}\nLibs: -L${{libdir}} -lbigfile_capi\n\
         Libs.private: -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc\nCflags: -I${{includedir}}\n"
    );
    fs::write(tree.join("lib/pkgconfig/bigfile.pc"), pc).map_err(|e| format!("bigfile.pc: {e}"))?;
    let out = staging.join("capi");
    fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let tarball = out.join(format!("{name}.tar.gz"));
    run(Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(staging.join("capi.building"))
        .arg(&name))?;
    let _ = fs::remove_dir_all(staging.join("capi.building"));
    Ok(())
}

/// The workspace's version, as `cargo metadata` gives the C API crate's.
fn workspace_version() -> Result<String> {
    let toml =
        fs::read_to_string(root().join("Cargo.toml")).map_err(|e| format!("Cargo.toml: {e}"))?;
    let in_package = toml
        .split("[workspace.package]")
        .nth(1)
        .ok_or("Cargo.toml has no [workspace.package]")?;
    in_package
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .ok_or_else(|| "no version in [workspace.package]".into())
}

fn only_file(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!(
            "{}: want one *{suffix}, found {found:?}",
            dir.display()
        )),
    }
}

fn write_manifest(staging: &Path, missing: &[String]) -> Result {
    let mut files = BTreeMap::new();
    let mut stack = vec![staging.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)
            .map_err(|e| format!("{}: {e}", d.display()))?
            .flatten()
        {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(staging) {
                files.insert(rel.to_path_buf(), p);
            }
        }
    }
    let mut text = format!(
        "bigfile {} release artifacts: {}\n",
        workspace_version()?,
        if missing.is_empty() {
            "complete"
        } else {
            "incomplete"
        }
    );
    for (rel, p) in &files {
        let size = fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let sum = Command::new("sha256sum")
            .arg(p)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "?".into());
        text += &format!("{sum}  {size:>10}  {}\n", rel.display());
    }
    for m in missing {
        text += &format!("missing: {m}\n");
    }
    fs::write(staging.join("MANIFEST"), text).map_err(|e| format!("MANIFEST: {e}"))
}

/// The wheel of the first CPython 3.10+, built and checked as `dist` does,
/// installed into a fresh venv with no Rust toolchain on PATH; the Python
/// tests run against it from a copy of the tests outside the source tree.
pub(crate) fn check_installed_wheel() -> Result {
    let (version, exe) = wheel_interpreters()
        .into_iter()
        .next()
        .ok_or("no CPython 3.10 or later to test a wheel with")?;
    let tools = tools()?;
    let work = target_dir().join("wheel-check");
    let _ = fs::remove_dir_all(&work);
    let wheel = build_wheel(&tools, &exe, &work.join("wheels"))?;
    let venv = work.join("venv");
    run(Command::new(&exe).args(["-m", "venv"]).arg(&venv))?;
    let py = venv.join("bin/python");
    let spec = format!("{}[zodb,relstorage,dask]", wheel.display());
    run(Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "pytest>=7",
            "hypothesis>=6",
        ])
        .arg(&spec))?;
    // The tests, and what they take from beside themselves, copied out of
    // the source tree: `bigfile` can only come from the installed wheel.
    let copy = work.join("pkg");
    fs::create_dir_all(&copy).map_err(|e| format!("{}: {e}", copy.display()))?;
    for part in ["tests", "wendelin-alias", "pyproject.toml"] {
        run(Command::new("cp")
            .arg("-r")
            .arg(root().join(PACKAGE).join(part))
            .arg(&copy))?;
    }
    let path = no_rust_path(&venv);
    run(Command::new(&py)
        .args(["-c", "import bigfile, shutil, sys; \
                assert '/site-packages/' in bigfile.__file__, bigfile.__file__; \
                assert shutil.which('cargo') is None and shutil.which('rustc') is None, 'Rust on PATH'; \
                print('testing the installed wheel:', bigfile.__file__)"])
        .env("PATH", &path)
        .current_dir(&copy))?;
    eprintln!("xtask: Python tests against the installed wheel (CPython {version})");
    run(Command::new(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .env("PATH", &path)
        .env_remove("PYTHONPATH")
        .current_dir(&copy))
}

/// PATH without the Rust toolchain (cargo, rustup), the venv's bin first.
fn no_rust_path(venv: &Path) -> std::ffi::OsString {
    let mut paths = vec![venv.join("bin")];
    paths.extend(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).filter(|p| {
            !(p.join("cargo").exists()
                || p.join("rustc").exists()
                || p.to_string_lossy().contains("/.cargo/"))
        }),
    );
    std::env::join_paths(paths).unwrap_or_default()
}
